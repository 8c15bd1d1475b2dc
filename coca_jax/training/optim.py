"""The optax chain built from `config.optim`.

Fields (defaults: `coca_jax.core.config.defaults`):
  name: 'adamw' | 'adafactor'; lr (peak); b1, b2, eps (0 = adamw 1e-8, adafactor 1e-30);
  weight_decay (decoupled, multiplied by the schedule like AdamW); warmup_steps (int) or
  warmup_fraction (of train.steps);
  decay: 'cosine' | 'linear' | 'constant'; end_lr_fraction; clip_norm (0 = off);
  no_decay_regex: parameter paths without weight decay (norms, biases, embeddings, ...);
  freeze_regex: list of regexes; matching parameters get zero updates (e.g. stagewise training).
Parameter paths are '/'-joined, e.g. 'vision/layers/attention/query/kernel'.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from coca_jax.core import schema
from coca_jax.core.schema import DEFAULT_NO_DECAY


def param_paths(params) -> object:
  """A pytree like `params` whose leaves are '/'-joined key paths."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), params)


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  warmup = int(optim.warmup_steps or round(optim.warmup_fraction * total_steps))
  warmup = min(warmup, total_steps)
  peak, end = optim.lr, optim.lr * optim.end_lr_fraction
  decay_steps = max(total_steps - warmup, 1)
  decay = optim.decay
  if decay == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif decay == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  elif decay == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.optim.decay={decay!r} is unknown; use one of "
                     f"{', '.join(schema.allowed(schema.DecayName))}")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _mask_from_regex(params, patterns: Sequence[str], match_means: bool):
  compiled = [re.compile(p) for p in patterns]
  return jax.tree.map(lambda path: any(c.search(path) for c in compiled) == match_means,
                      param_paths(params))


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, schedule). tx is `params`-structured; its masks are computed from paths."""
  schedule = learning_rate_schedule(optim, total_steps)
  name = optim.name
  parts = []
  if optim.clip_norm:
    parts.append(optax.clip_by_global_norm(optim.clip_norm))
  if name == "adamw":
    parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps or 1e-8))
  elif name == "adafactor":
    # Factored second moment with a FIXED beta2 (the paper's 0.999) instead of Adafactor's
    # step-dependent default, followed by first-moment momentum b1.
    b2 = optim.b2
    parts.append(optax.scale_by_factored_rms(
        decay_rate_fn=lambda step, rate: jnp.asarray(b2, jnp.float32),
        epsilon=optim.eps or 1e-30))
    if optim.b1:
      parts.append(optax.ema(optim.b1, debias=True))
  else:
    raise ValueError(f"config.optim.name={name!r} is unknown; use one of "
                     f"{', '.join(schema.allowed(schema.OptimizerName))}")
  if optim.weight_decay:
    no_decay = optim.no_decay_regex
    parts.append(optax.add_decayed_weights(
        optim.weight_decay, mask=lambda p: _mask_from_regex(p, [no_decay], match_means=False)))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  freeze = list(optim.freeze_regex or ())
  if freeze:
    def labels(params):
      frozen = _mask_from_regex(params, freeze, match_means=True)
      return jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
