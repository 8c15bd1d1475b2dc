r"""open_clip's CoCa models (coca_ViT-B-32, coca_ViT-L-14: their model-config JSONs, mirrored in
coca_jax/interop/open_clip.py MODEL_CONFIGS), ready to load the published weights and fine-tune
them. Parameter counts equal open_clip's (253,560,065 and 638,450,177).

  python -m coca_jax.interop.open_clip import --src open_clip_model.safetensors \
      --model coca_ViT-B-32 --out /tmp/coca_ViT-B-32
  python -m coca_jax.train \
      --config experiments/openclip_coca.py:model=coca_ViT-B-32,init=/tmp/coca_ViT-B-32,name=NAME,data_dir=DIR \
      --workdir /tmp/finetune

The model, tokenizer and loss convention are open_clip's (`open_clip.base_config`: the model
group, the CLIP BPE tokenizer, contrastive terms averaged, weights 1 : 2); this file adds an
AdamW fine-tuning recipe around them.

Args (comma-separated after ':'):
  model=M      a MODEL_CONFIGS name or an open_clip model-config JSON path (default coca_ViT-B-32)
  init=PATH    warm start: a bundle, workdir or checkpoints/<step> directory, or a published
               name (coca_jax.list_pretrained(), e.g. open_clip:coca_ViT-B-32/laion2b_s13b_b90k)
  name=, data_dir=   a dataset built by `python -m coca_jax.data.build`
  bpe=PATH     the CLIP BPE merges file (default: the one beside init's config.json, else an
               installed open_clip's)
  steps=N (2000), batch=N (64), lr=F (1e-5), dtype=D (float32)
  remat=R      default dots: layers are scanned with remat='dots' (on CPU the B/32 step then
               needs about half the XLA scratch memory of the unrolled stack without remat, for
               a slightly slower step; docs/performance.md)
  unrolled     one parameter set per layer instead of the scanned stack
  runlocal     10 steps of batch 8, small evals
"""

import ml_collections

from coca_jax.core import fs
from coca_jax.core import recipes
from coca_jax.core.config_args import parse_arg
from coca_jax.data.tokenizer import TOKENIZER_FILES
from coca_jax.inference import api
from coca_jax.interop import open_clip
from coca_jax.interop import pretrained


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = parse_arg(arg, "experiments/openclip_coca.py", model="coca_ViT-B-32", init="",
                   name="", data_dir="", bpe="", steps=2_000, batch=64, lr=1e-5,
                   dtype="float32", remat="dots", unrolled=False, runlocal=False)
  bpe = args.bpe
  if args.init and not bpe:
    # An import bundle (or a run fine-tuned from one) keeps the vocabulary beside its config:
    # use it, so no open_clip install is needed to fine-tune.
    root = api.resolve(pretrained.ensure(args.init))["root"]  # A published name: fetched once.
    beside = fs.join(root, TOKENIZER_FILES["clip_bpe"])
    if fs.exists(beside):
      bpe = beside
  c = open_clip.base_config(args.model, bpe)
  c.model.update(dtype=args.dtype, scan_layers=not args.unrolled, remat=args.remat)
  c.data.update(name=args.name, data_dir=args.data_dir, train_split="train", eval_split="test",
                num_workers=0, random_resized_crop=True)
  return recipes.finetune(c, source=args.init, steps=args.steps, batch=args.batch, lr=args.lr,
                          eval_every=0, runlocal=args.runlocal)
