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

The three paper sizes share this file's recipe; experiments/coca_large.py and coca_2b.py only
change the model size. Args (comma-separated after ':'):
  batch=N      global batch (paper: 65,536)
  steps=N      train steps (paper: 500k)
  dtype=D      compute dtype, bfloat16 (default) or float32
  remat=R      none | full | dots | minimal (default: dots; on one H200, dots at 256-512
               examples per chip was the fastest measured: 29.3% MFU at 512, docs/performance.md)
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

import ml_collections

from coca_jax.training.metrics_log import PROFILE_DEFAULTS

# Table 1 of the CoCa paper: (vision width, depth, mlp; text width, n_uni, n_multi, mlp; heads).
PAPER_SIZES = {
    "base": dict(vision=dict(width=768, depth=12, heads=12, mlp_dim=3072),
                 text=dict(width=768, heads=12, mlp_dim=3072, n_uni=12, n_multi=12),
                 embed_dim=768, pooler_heads=12),
    "large": dict(vision=dict(width=1024, depth=24, heads=16, mlp_dim=4096),
                  text=dict(width=1024, heads=16, mlp_dim=4096, n_uni=12, n_multi=12),
                  embed_dim=1024, pooler_heads=16),
    "2b": dict(vision=dict(width=1408, depth=40, heads=16, mlp_dim=6144),
               text=dict(width=1408, heads=16, mlp_dim=5632, n_uni=18, n_multi=18),
               embed_dim=1408, pooler_heads=16, tie_embeddings=True),
}
PAPER_PARAMS = {"base": 383e6, "large": 787e6, "2b": 2.1e9}
VOCAB_SIZE = 64_000
# Evals every 10k steps and at the end (coca_jax/evaluation/evaluators.py): image-text retrieval
# and greedy captioning on the eval split of config.data.name, and zero-shot classification
# once you name a labelled dataset (the `imagenet` arg, or any prepared TFDS dataset: its
# ClassLabel names are the class names unless a file gives them, one per line in label order),
# e.g.
#   --config.evals.zeroshot.dataset=cifar100 --config.evals.zeroshot.split=test \
#   --config.evals.zeroshot.data_dir=~/tensorflow_datasets
#   [--config.evals.zeroshot.class_names_file=names.txt]
# Any group is switched off with --config.evals.<group>.enabled=False.
EVALS = dict(
    every_steps=10_000, batch_size=256,
    zeroshot=dict(dataset="", split="", examples=50_000, class_names=[],
                  templates=["a photo of a {}.", "a picture of a {}.", "an image of a {}."]),
    retrieval=dict(split="test", examples=5_000),
    captioning=dict(split="test", examples=5_000, batch_size=256, method="greedy"))

# Zero-shot ImageNet-1k (the CoCa paper's 86.3%, open_clip coca_ViT-L-14's 75.6%): the 50,000
# validation images of TFDS's imagenet2012, whose label names are WordNet ids, so the names and
# prompts are open_clip's (read from an installed open_clip_torch; never copied here).
IMAGENET_ZEROSHOT = dict(dataset="imagenet2012", split="validation", examples=0,
                         class_names_file="open_clip:imagenet", templates_file="open_clip:imagenet")


def _parse(arg: str) -> dict:
  known = {"batch", "steps", "dtype", "remat", "runlocal", "b32", "imagenet"}
  parsed = {}
  for item in filter(None, arg.split(",")):
    key, _, value = item.partition("=")
    if key not in known:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(known)}")
    parsed[key] = value if value else True
  return parsed


def paper_config(size: str, arg: str = "") -> ml_collections.ConfigDict:
  """The paper's recipe at `size` in PAPER_SIZES."""
  args = _parse(arg)
  s = PAPER_SIZES[size]
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      image_size=288, patch_size=18, embed_dim=s["embed_dim"], pooling="cascade",
      n_gen_queries=256, pooler_heads=s["pooler_heads"], dtype=args.get("dtype", "bfloat16"),
      remat=args.get("remat", "dots"), scan_layers=True, temperature_init=0.07,
      max_logit_scale=100.0, tie_embeddings=s.get("tie_embeddings", False),
      vision=dict(s["vision"]),
      text=dict(vocab_size=VOCAB_SIZE, max_len=64, **s["text"]),
  ))
  # Your image-text data, built by `python -m coca_jax.data.build` (--config.data.name=NAME
  # --config.data.data_dir=DIR); a SentencePiece tokenizer of VOCAB_SIZE pieces is trained on
  # its train captions unless --config.data.tokenizer names one.
  c.data = ml_collections.ConfigDict(dict(
      name="", train_split="train", eval_split="test", image_size=288,
      tokenizer_vocab=VOCAB_SIZE))
  c.train = ml_collections.ConfigDict(dict(
      steps=int(args.get("steps", 500_000)), batch_size=int(args.get("batch", 65_536)), seed=0,
      log_every=100, microbatches=1, nonfinite="halt", max_consecutive_skips=10))
  c.loss = ml_collections.ConfigDict(dict(
      contrastive_weight=1.0, caption_weight=2.0, label_smoothing=0.0, contrastive="softmax",
      contrastive_reduction="sum",  # i2t + t2i, the paper's eq. 1.
      contrastive_impl="chunked"))  # Memory-bounded logits: the [B, B] matrix never exists whole.
  c.optim = ml_collections.ConfigDict(dict(
      name="adafactor", lr=8e-4, b1=0.9, b2=0.999, eps=1e-30, weight_decay=0.01,
      warmup_fraction=0.02, decay="linear", end_lr_fraction=0.0, clip_norm=0.0,
      freeze_regex=[]))
  # Parameters and optimizer state fully sharded across every chip; batch over the same chips.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=5_000, keep=3, async_save=True))
  c.profile = ml_collections.ConfigDict(PROFILE_DEFAULTS)  # --config.profile.start_step=N traces
  c.evals = ml_collections.ConfigDict(EVALS)
  if args.get("imagenet"):
    data_dir = args["imagenet"] if isinstance(args["imagenet"], str) else ""
    c.evals.zeroshot.update(IMAGENET_ZEROSHOT, data_dir=data_dir)
  if args.get("b32"):
    c.model.update(image_size=224, patch_size=32, embed_dim=512, pooling="open_clip",
                   n_gen_queries=256, pooler_heads=8, dtype=args.get("dtype", "float32"),
                   remat=args.get("remat", "none"), tie_embeddings=False,
                   # 12 layers compile in ~30 s unscanned, and the CPU step is faster without
                   # the scan's stacking of per-layer activations (19.0 s vs 21.3 s measured).
                   scan_layers=False)
    c.model.vision.update(width=768, depth=12, heads=12, mlp_dim=3072)
    c.model.text.update(vocab_size=49_408, max_len=76, width=512, heads=8, mlp_dim=2048,
                        n_uni=12, n_multi=12)
    c.data.update(image_size=224, tokenizer_vocab=49_408)
    c.loss.contrastive_impl = "gathered"
    c.mesh.update(data=-1, fsdp=1)
    if "batch" not in args:
      c.train.batch_size = 16
  if args.get("runlocal"):
    c.train.update(steps=10, log_every=1)
    if "batch" not in args:
      c.train.batch_size = 8
    c.checkpoint.update(every_steps=0)
    shrink_evals(c.evals)
  return c


def shrink_evals(evals: ml_collections.ConfigDict) -> None:
  """runlocal: the evals only at the end, on a few examples."""
  evals.every_steps = 0
  evals.zeroshot.examples = evals.retrieval.examples = 64
  evals.captioning.update(examples=8, batch_size=8)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return paper_config("base", arg)
