"""Fine-tune a trained or imported CoCa on your own captioned images.

  # 1. Your images + captions as a dataset (a folder of image/caption pairs, or webdataset shards):
  python -m coca_jax.data.build --format folder --src photos/ --name my_captions \\
      --data_dir ~/tfds --eval_fraction 0.05
  # 2. Fine-tune from a bundle (`coca_jax.export`, `coca_jax.interop.open_clip import`), a
  #    workdir, a checkpoints/<step> directory, or a published name (`coca_jax.list_pretrained()`,
  #    e.g. init=open_clip:coca_ViT-B-32/mscoco_finetuned_laion2b_s13b_b90k):
  python -m coca_jax.train --config \\
      experiments/finetune_captions.py:init=/tmp/coca_b32,name=my_captions,data_dir=~/tfds \\
      --workdir /tmp/finetuned

The model (architecture and tokenizer) is the source's own: its config.json is read here, so
the run builds exactly the model the weights belong to (override fields with --config.model.*,
e.g. --config.model.image_size=288 to fine-tune at a higher resolution: the position embedding
is resized). Parameters come from the source (config.init); the optimizer starts fresh.
Evals: retrieval and greedy captioning (BLEU/CIDEr) on the dataset's eval split.

Args (comma-separated after ':'): init=PATH_OR_NAME (required), name=, data_dir= (the built
dataset), steps= (default 2000), batch= (64), lr= (1e-5), caption_only (contrastive weight 0),
runlocal.
"""

import os

import ml_collections

from coca_jax.core import fs
from coca_jax.core import pretrained as published
from coca_jax.core import recipes
from coca_jax.core.config_args import parse_arg
from coca_jax.inference import api
from coca_jax.interop import pretrained
from coca_jax.training import checkpoint


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = parse_arg(arg, "experiments/finetune_captions.py", init="", name="", data_dir="",
                   steps=2_000, batch=64, lr=1e-5, caption_only=False, runlocal=False)
  if not args.init:
    raise ValueError("experiments/finetune_captions.py needs init=PATH: a bundle, workdir, "
                     "checkpoints/<step> directory or published name to start from")
  # A local path, a gs:// URL, or a published name (downloaded and converted once).
  source = args.init if published.is_name(args.init) else fs.resolve(args.init)
  found = api.resolve(pretrained.ensure(source))
  source_config = checkpoint.read_config(found["root"])  # Completed with today's defaults.
  tokenizer = api.TOKENIZER_FILES[source_config.data.tokenizer_kind]

  c = ml_collections.ConfigDict()
  c.model = source_config.model
  c.data = ml_collections.ConfigDict(dict(
      name=args.name, data_dir=os.path.expanduser(args.data_dir),
      train_split="train", eval_split="test", image_size=c.model.image_size,
      tokenizer=fs.join(found["root"], tokenizer),
      tokenizer_kind=source_config.data.tokenizer_kind,
      num_workers=0, random_resized_crop=True, crop_scale=(0.8, 1.0)))
  c.loss = source_config.loss  # The source's loss settings (contrastive kind, reduction, ...).
  c.loss.update(dict(contrastive_weight=0.0 if args.caption_only else 1.0,
                     caption_weight=2.0))
  return recipes.finetune(c, source=source, steps=args.steps, batch=args.batch, lr=args.lr,
                          eval_every=500, runlocal=args.runlocal)
