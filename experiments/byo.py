r"""Bring your own data: a small CoCa trained from scratch on your images + captions.

  # 1. A folder of images and a captions.jsonl (or captions.csv) naming them, 5% held out:
  python -m coca_jax.data.build --format folder --src photos/ --name my_photos \
      --data_dir ~/tfds --eval_fraction 0.05          # --help shows the captions file format
  # 2. Train (CPU laptop: minutes for the default 2,000 steps; any GPU/TPU: much faster):
  python -m coca_jax.train --config experiments/byo.py:name=my_photos,data_dir=~/tfds \
      --workdir /tmp/my_photos
  # 3. Use it:
  python -m coca_jax.caption --model /tmp/my_photos photos/beach/0001.jpg
  python -m coca_jax.report --workdir /tmp/my_photos

A SentencePiece tokenizer is trained on the train captions into the workdir. At the end the run
evaluates on the held-out split "test" (what --eval_fraction or --eval_src wrote): image-text
retrieval (R@1/5/10 both ways) and greedy captioning (BLEU-4, CIDEr-D) against its captions; no
zero-shot eval (it needs class names: add --config.evals.zeroshot.* for a labelled dataset).

Args (comma-separated after ':'):
  name=NAME       the dataset's --name (required)
  data_dir=DIR    the --data_dir it was built into (required; ~ is expanded)
  image_size=N    square input size in pixels (default 64; a multiple of the 8-px patch)
  steps=N         train steps (default 2000)
  batch=N         global batch (default 32)
  vocab=N         tokenizer pieces (default 2000; lower it for a few hundred captions)
  runlocal        a tiny model, 8 steps and small evals: checks the whole path in seconds
Anything else: --config.FIELD=VALUE, e.g. --config.model.vision.depth=8 --config.optim.lr=3e-4.
"""

import os

import ml_collections

from coca_jax.core.config_args import parse_arg

PATCH = 8


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = parse_arg(arg, "experiments/byo.py", name="", data_dir="", image_size=64, steps=2_000,
                   batch=32, vocab=2_000, runlocal=False)
  if not args.name or not args.data_dir:
    raise ValueError("experiments/byo.py needs name=NAME,data_dir=DIR: the --name and "
                     "--data_dir given to `python -m coca_jax.data.build`")
  if args.image_size % PATCH:
    raise ValueError(f"experiments/byo.py: image_size={args.image_size} must be a multiple of "
                     f"the patch size {PATCH}")
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      image_size=args.image_size, patch_size=PATCH, embed_dim=256, pooling="cascade",
      n_gen_queries=32, pooler_heads=4, dtype="float32", remat="none",
      scan_layers=False,  # A shallow stack: unrolled runs faster on CPU, compiles quickly.
      temperature_init=0.07, max_logit_scale=100.0,
      vision=dict(width=256, depth=6, heads=4, mlp_dim=1024),
      text=dict(vocab_size=args.vocab, max_len=32, width=256, heads=4, mlp_dim=1024, n_uni=3,
                n_multi=3),
  ))
  c.data = ml_collections.ConfigDict(dict(
      name=args.name, data_dir=os.path.expanduser(args.data_dir), train_split="train",
      eval_split="test", image_size=args.image_size, tokenizer="", tokenizer_vocab=args.vocab,
      num_workers=0, random_resized_crop=True, crop_scale=(0.8, 1.0)))
  c.train = ml_collections.ConfigDict(dict(steps=args.steps, batch_size=args.batch, seed=0,
                                           log_every=50))
  c.loss = ml_collections.ConfigDict(dict(contrastive_weight=1.0, caption_weight=2.0))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05,
      warmup_fraction=0.05, decay="cosine", clip_norm=1.0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2, async_save=True))
  c.evals = ml_collections.ConfigDict(dict(
      every_steps=0, batch_size=64,  # 0: at the end of training.
      zeroshot=dict(enabled=False),
      retrieval=dict(split="test", examples=1_000),
      captioning=dict(split="test", examples=500, batch_size=64, method="greedy")))
  if args.runlocal:
    c.model.update(embed_dim=32, n_gen_queries=4, pooler_heads=2)
    c.model.vision.update(width=32, depth=1, heads=2, mlp_dim=64)
    c.model.text.update(width=32, heads=2, mlp_dim=64, n_uni=1, n_multi=1)
    c.train.update(steps=8, batch_size=min(args.batch, 8), log_every=4)
    c.checkpoint.every_steps = 0
    c.evals.update(batch_size=16)
    c.evals.retrieval.examples = 64
    c.evals.captioning.update(examples=16, batch_size=16)
  return c
