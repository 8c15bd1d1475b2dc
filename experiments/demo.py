"""Demo: a small CoCa trained on digit scenes (real handwritten digits, coloured, 1-3 per image).

Reproduces, on 2 CPU cores in ~7 minutes, what the paper's model is for: one image-text model
that classifies held-out digits zero-shot (~0.97 top-1), retrieves scenes from captions and back,
and captions them (README, "Measured figures"). The data set is built offline from scikit-learn's
digits on the first run.

  python -m coca_jax.train --config experiments/demo.py --workdir /tmp/coca_demo
  python -m coca_jax.train --config experiments/demo.py:smoke --workdir /tmp/coca_smoke
  python -m coca_jax.sweep --config experiments/demo.py:smoke --workdir /tmp/coca_sweep
  python -m coca_jax.report --workdir /tmp/coca_demo

Args (comma-separated after ':'):
  smoke  shrinks everything to finish in well under a minute (most tests use it).
  mini   a small model that learns held-out digits well above chance in ~20 s of training
         (the zero-shot test uses it).
sweep() below: peak learning rate 1e-3 vs 3e-3, two trials.
"""

import ml_collections

from coca_jax.data.digit_scenes import DIGIT_NAMES, ZERO_SHOT_TEMPLATES
from coca_jax.metrics import PROFILE_DEFAULTS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = set(filter(None, arg.split(",")))
  unknown = args - {"smoke", "mini"}
  if unknown:
    raise ValueError(f"experiments/demo.py: unknown args {sorted(unknown)}; known: mini, smoke")
  if len(args) > 1:
    raise ValueError("experiments/demo.py: use one of the args 'mini' or 'smoke', not both")
  smoke, mini = "smoke" in args, "mini" in args
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      image_size=48, patch_size=8, embed_dim=128, pooling="cascade", n_gen_queries=16,
      # Unrolled layers: on CPU the scanned stack spends ~20% of the step stacking per-layer
      # activations and gradients; at depth 4 the compile time is no concern.
      pooler_heads=4, dtype="float32", remat="none", scan_layers=False,
      temperature_init=0.07, max_logit_scale=100.0,
      vision=dict(width=128, depth=4, heads=4, mlp_dim=512),
      text=dict(vocab_size=64, max_len=12, width=128, heads=4, mlp_dim=512, n_uni=2, n_multi=2),
  ))
  # Digit scenes are built once into DIR/tensorflow_datasets (TFDS array_record) and read with
  # grain like any user dataset; the tokenizer is trained on the train captions into DIR.
  c.data = ml_collections.ConfigDict(dict(
      name="digit_scenes", data_dir="", train_split="train", eval_split="test",
      build_demo=True,
      # grid=8: digits are drawn 16 px tall at multiples of 8 px, so each covers whole 8-px
      # patches. Free placement (grid=0) leaves the small ViT on a ~300-step plateau before it
      # starts reading digits; aligned, it reads them from step ~100.
      build_demo_options=dict(num_train=20_000, num_test=1_000, num_digits=1_000, image_size=48,
                              grid=8, seed=0, show_progress=False),
      image_size=48, tokenizer="", tokenizer_vocab=64, tokenizer_type="bpe", num_workers=0,
      random_resized_crop=False,  # Crops could cut off a digit the caption names.
  ))
  c.train = ml_collections.ConfigDict(dict(steps=1_000, batch_size=128, seed=0, log_every=50))
  c.loss = ml_collections.ConfigDict(dict(
      contrastive_weight=1.0, caption_weight=2.0, label_smoothing=0.0, contrastive="softmax",
      contrastive_reduction="sum"))  # i2t + t2i, the paper's eq. 1.
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05,
      warmup_fraction=0.05, decay="cosine", end_lr_fraction=0.0, clip_norm=1.0,
      freeze_regex=[]))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=400, keep=2, async_save=True))
  # A jax.profiler trace of a few steps into DIR/profile: --config.profile.start_step=100.
  c.profile = ml_collections.ConfigDict(PROFILE_DEFAULTS)
  c.evals = ml_collections.ConfigDict(dict(
      every_steps=0,  # 0 = only at the end of training.
      batch_size=250,
      # Held-out single digits (unseen handwriting), classes prompted as "a <colour> <digit>".
      zeroshot=dict(split="digits", class_names=list(DIGIT_NAMES),
                    templates=list(ZERO_SHOT_TEMPLATES), examples=1_000),
      retrieval=dict(split="test", examples=1_000),
      # Greedy captions of held-out scenes against their reference caption.
      captioning=dict(enabled=True, split="test", examples=1_000, batch_size=250, method="greedy"),
  ))

  if smoke or mini:
    c.model.vision.update(width=32, depth=1, heads=2, mlp_dim=64)
    c.model.text.update(width=32, heads=2, mlp_dim=64, n_uni=1, n_multi=1)
    # Tests exercise the scanned stack, the default for real configs.
    c.model.update(embed_dim=32, n_gen_queries=4, pooler_heads=2, image_size=32,
                   scan_layers=True)
    c.data.image_size = 32
    c.data.build_demo_options.update(num_train=256, num_test=64, num_digits=64, image_size=32)
    c.train.update(steps=6, batch_size=16, log_every=2)
    c.checkpoint.update(every_steps=3)
    c.evals.update(batch_size=32)
    c.evals.zeroshot.examples = 64
    c.evals.retrieval.examples = 64
    c.evals.captioning.update(examples=32, batch_size=32)
  if mini:
    c.model.vision.update(width=64, depth=2, mlp_dim=128)
    c.data.build_demo_options.update(num_train=4_000, num_digits=500)
    c.train.update(steps=300, batch_size=64, log_every=50)
    c.optim.lr = 2e-3
    c.checkpoint.update(every_steps=300)
    c.evals.zeroshot.examples = 500
  return c


def sweep():
  """Peak learning rate x 2, e.g. on the smoke config:
  python -m coca_jax.sweep --config experiments/demo.py:smoke --workdir /tmp/coca_sweep"""
  from coca_jax.sweep import product
  return product({"optim.lr": [1e-3, 3e-3]})
