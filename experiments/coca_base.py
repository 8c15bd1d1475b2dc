r"""CoCa-Base as in the paper (Table 1; 383M parameters) and the paper's pretraining recipe.

  python -m coca_jax.train --config experiments/coca_base.py --dry_run     # sizes, FLOPs
  python -m coca_jax.bench --config experiments/coca_base.py:batch=4096 --mode compile --json
  launch/tpu_pod.sh --tpu NAME --zone ZONE --config experiments/coca_base.py \
      --workdir gs://BUCKET/coca_base [-- --config.data.name=YOUR_TFDS_DATASET ...]

Data and evals: train on the dataset named by --config.data.name (built with
`python -m coca_jax.data.build` into --config.data.data_dir); retrieval and captioning run on
its "test" split, zero-shot on a labelled dataset you name (see EVALS below).
  python -m coca_jax.train --config experiments/coca_base.py:runlocal --workdir /tmp/coca_base \
      --config.data.name=NAME --config.data.data_dir=DIR

The three paper sizes share one recipe (`coca_jax.core.recipes.coca_paper`); experiments/coca_large.py and coca_2b.py only
change the model size. Args (comma-separated after ':'):
  batch=N      global batch (paper: 65,536)
  steps=N      train steps (paper: 500k)
  dtype=D      compute dtype, bfloat16 (default) or float32
  remat=R      none | full | dots | minimal (default: dots; on one H200, dots at 256-512
               examples per chip was the fastest measured: 29.3% MFU at 512, docs/performance.md)
  mixture=labels:NAME+alt_text:NAME
               the paper's two-source pretraining (sec. 4.1): a labelled dataset (JFT-3B in
               the paper; e.g. imagenet21k) whose texts are "a photo of a {class names}.",
               mixed with an alt-text dataset (ALIGN in the paper) at 5:6 per global batch,
               the ratio of ~5 epochs of JFT-3B to ~10 of ALIGN over 500k steps at batch
               65,536 (recipes.PAPER_MIXTURE_WEIGHTS derives it); each NAME a prepared TFDS
               dataset read from its "train" split; either part alone also works
  label_names=F  class names of the labels source (one per line, or open_clip:imagenet);
               default: its ClassLabel names
  runlocal     shrink the data and step counts for a smoke run on one machine (model size kept)
  imagenet[=D] zero-shot ImageNet-1k in the evals: TFDS's imagenet2012 "validation" (50,000
               images) prepared as array_record in D (default: config.data.data_dir) with
               `tfds build imagenet2012 --data_dir=D --file_format=array_record`, prompted with
               open_clip's curated class names and 80 templates (needs open_clip_torch
               installed; read from its files, torch is not imported)
  b32          NOT a paper size: open_clip's coca_ViT-B-32 shapes (224px, patch 32, vision
               768 x 12, text 512 x 12+12, 8 heads, vocab 49,408, 76 tokens, one 256-query
               pooler), batch 16, float32, no remat: the CPU MFU benchmark of docs/performance.md
Model: 288px images, 18px patches (256 patches), 256 generative pooler queries, cascade pooling,
64k SentencePiece vocabulary. Base and Large have an untied vocab head: with it their counts match
Table 1's text decoders exactly (297M, 484M). For the 2.1B model an untied head would give a
1.18B text decoder and 2.21B in all (+5%); sharing the token embedding gives 1.09B / 2.12B,
matching Table 1's 1.1B / 2.1B, so CoCa-2B ties them (`model.tie_embeddings`).
Optimizer: Adafactor (b1 0.9, b2 0.999), decoupled weight decay 0.01, peak lr 8e-4,
2% linear warmup, then linear decay to 0.
"""

from coca_jax.core import recipes

# The recipe (coca_jax/core/recipes.py, shared with coca_large.py and coca_2b.py); its zero-shot
# settings: recipes.EVALS, recipes.IMAGENET_ZEROSHOT.


def get_config(arg: str = ""):
  return recipes.coca_paper("base", arg)
