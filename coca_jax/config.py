"""Experiment configs: loading, and validation before anything is built.

A config is an `ml_collections.ConfigDict` from `experiments/<name>.py:get_config(arg)` with
groups model, data, train, loss, optim, mesh, checkpoint, evals. `validate` reports every problem
at once, each naming the field and the fix, so a pod job fails in seconds, not after compile.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import ml_collections

from coca_jax import sharding

REQUIRED_GROUPS = ("model", "data", "train", "loss", "optim", "mesh", "checkpoint", "evals")


class ConfigError(ValueError):
  """One or more config problems; the message lists each with its fix."""


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/file.py[:arg]' the same way the CLIs' --config flag does."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_coca_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def validate(config, num_devices: int | None = None) -> None:
  """Raises ConfigError listing every problem found. `num_devices` enables mesh checks."""
  problems: list[str] = []
  missing = [g for g in REQUIRED_GROUPS if g not in config]
  if missing:
    raise ConfigError("config is missing groups " + ", ".join(missing) +
                      "; start from experiments/demo.py")

  def need(cond, message):
    if not cond:
      problems.append(message)

  def positive(prefix, group, name):
    value = group[name]
    need(isinstance(value, int) and value > 0,
         f"config.{prefix}.{name}={value!r} must be a positive integer")

  m = config.model
  for name in ("image_size", "patch_size", "embed_dim", "n_gen_queries", "pooler_heads"):
    positive("model", m, name)
  for name in ("width", "depth", "heads", "mlp_dim"):
    positive("model.vision", m.vision, name)
  for name in ("vocab_size", "max_len", "width", "heads", "mlp_dim", "n_uni", "n_multi"):
    positive("model.text", m.text, name)
  if not problems:
    need(m.image_size % m.patch_size == 0,
         f"config.model.image_size={m.image_size} is not divisible by config.model.patch_size="
         f"{m.patch_size}; pick a patch size that divides the image size")
    need(m.vision.width % m.vision.heads == 0,
         f"config.model.vision.width={m.vision.width} is not divisible by "
         f"config.model.vision.heads={m.vision.heads}")
    need(m.text.width % m.text.heads == 0,
         f"config.model.text.width={m.text.width} is not divisible by "
         f"config.model.text.heads={m.text.heads}")
    need(m.vision.width % m.pooler_heads == 0,
         f"config.model.vision.width={m.vision.width} is not divisible by "
         f"config.model.pooler_heads={m.pooler_heads}")
    need(m.text.max_len >= 3, f"config.model.text.max_len={m.text.max_len} must be >= 3 "
         "(BOS, at least one token, EOS)")
    need(not (m.pooling == "open_clip" and m.n_gen_queries < 2),
         "config.model.pooling='open_clip' needs config.model.n_gen_queries >= 2 "
         "(query 0 is contrastive, the rest feed the decoder)")
  need(m.pooling in ("cascade", "parallel", "open_clip"),
       f"config.model.pooling={m.pooling!r} is unknown; use cascade, parallel or open_clip")
  need(m.get("activation", "gelu_tanh") in ("gelu_tanh", "gelu", "quick_gelu"),
       f"config.model.activation={m.get('activation')!r} is unknown; use gelu_tanh, gelu "
       "(exact, open_clip) or quick_gelu")
  need(m.text.get("multimodal_layout", "coca") in ("coca", "open_clip"),
       f"config.model.text.multimodal_layout={m.text.get('multimodal_layout')!r} is unknown; "
       "use coca or open_clip")
  need(m.text.get("cls_mask", "correct") in ("correct", "open_clip_legacy"),
       f"config.model.text.cls_mask={m.text.get('cls_mask')!r} is unknown; use correct or "
       "open_clip_legacy")
  pooler_width = m.get("pooler_width", 0)
  need(isinstance(pooler_width, int) and pooler_width >= 0
       and pooler_width % m.pooler_heads == 0,
       f"config.model.pooler_width={pooler_width!r} must be 0 (the vision width) or a "
       f"multiple of config.model.pooler_heads={m.pooler_heads}")
  need(m.dtype in ("float32", "bfloat16"),
       f"config.model.dtype={m.dtype!r} is unknown; use float32 or bfloat16")
  need(m.remat in ("none", "full", "dots", "minimal"),
       f"config.model.remat={m.remat!r} is unknown; use none, full, dots or minimal")
  need(0 < m.temperature_init < 1, f"config.model.temperature_init={m.temperature_init} must be "
       "in (0, 1); the paper uses 0.07")

  t = config.train
  for name in ("steps", "batch_size", "log_every"):
    positive("train", t, name)
  need(config.optim.name in ("adamw", "adafactor"),
       f"config.optim.name={config.optim.name!r} is unknown; use adamw or adafactor")
  need(config.optim.lr > 0, f"config.optim.lr={config.optim.lr} must be > 0")
  need(config.optim.get("decay", "cosine") in ("cosine", "linear", "constant"),
       f"config.optim.decay={config.optim.get('decay')!r} is unknown; use cosine, linear or constant")
  need(config.loss.get("contrastive", "softmax") in ("softmax", "sigmoid"),
       f"config.loss.contrastive={config.loss.get('contrastive')!r} is unknown; use softmax or sigmoid")
  need(config.loss.get("contrastive_impl", "gathered") in ("gathered", "chunked"),
       f"config.loss.contrastive_impl={config.loss.get('contrastive_impl')!r} is unknown; "
       "use gathered or chunked")
  need(config.loss.get("contrastive_reduction", "sum") in ("sum", "mean"),
       f"config.loss.contrastive_reduction={config.loss.get('contrastive_reduction')!r} is "
       "unknown; use sum (the paper's eq. 1) or mean (open_clip)")
  init = config.get("init", {})
  for name in ("include_regex", "exclude_regex", "reinit_regex"):
    try:
      re.compile(init.get(name, "") or "")
    except re.error as e:
      problems.append(f"config.init.{name}={init.get(name)!r} is not a valid regex ({e})")
  microbatches = t.get("microbatches", 1)
  need(isinstance(microbatches, int) and microbatches >= 1,
       f"config.train.microbatches={microbatches!r} must be a positive integer")
  need(config.checkpoint.every_steps >= 0, "config.checkpoint.every_steps must be >= 0 (0 = off)")
  need(config.checkpoint.keep >= 1, f"config.checkpoint.keep={config.checkpoint.keep} must be >= 1")

  if num_devices is not None:
    try:
      sizes = sharding.mesh_shape(config.mesh, num_devices)
    except sharding.MeshConfigError as e:
      problems.append(str(e))
    else:
      shards = math.prod(sizes[a] for a in sharding.BATCH_AXES)
      per = shards * (microbatches if isinstance(microbatches, int) and microbatches > 0 else 1)
      if isinstance(t.batch_size, int) and t.batch_size > 0 and t.batch_size % per:
        split = f" x {microbatches} microbatches" if per != shards else ""
        problems.append(
            f"config.train.batch_size={t.batch_size} is not divisible by the {shards} batch "
            f"shards of the mesh {sizes}{split}; use a multiple of {per}")
      tensor = sizes["tensor"]
      for field, heads in (("vision.heads", m.vision.heads), ("text.heads", m.text.heads),
                           ("pooler_heads", m.pooler_heads)):
        if isinstance(heads, int) and heads % tensor:
          problems.append(f"config.model.{field}={heads} is not divisible by config.mesh.tensor="
                          f"{tensor}; use a tensor size that divides every head count")
  if problems:
    raise ConfigError(f"{len(problems)} config problem(s):\n  - " + "\n  - ".join(problems))

