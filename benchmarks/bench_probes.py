"""Frozen-encoder probe speed on cached features (a script; docs/evaluation.md, "Frozen-encoder
probes").

  python benchmarks/bench_probes.py [--examples 10000] [--tokens 49] [--width 768] \
      [--embed_dim 512] [--classes 100] [--epochs 10] [--batch 256] [--test 2000]

Makes `examples` train and `test` test features shaped like a ViT-B/32's at 224 px (49 output
tokens of width 768, a 512-d embedding), with a class signal (one token, and the embedding,
carry a class direction under noise), then times what `probes.probe_eval` runs after the
features are cached:
  linear        the closed-form ridge probe: its L2 sweep on a held-out fifth, then the refit;
  attn_first    the attentional probe's first run (compilation included) and the prediction;
  attn          a second run of the same shapes (what every later eval of a run costs);
                attn_step_ms: its wall time per training step;
  step_folded / step_naive   one training step (forward, backward) of the probe's folded
                pooler vs the same pooler as `layers.AttentionalPooler` computes it.
Prints JSON: wall and CPU seconds (all threads), top-1 of each probe, the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

from coca_jax.core import schema  # pylint: disable=wrong-import-position
from coca_jax.evaluation import probes  # pylint: disable=wrong-import-position
from coca_jax.models import layers  # pylint: disable=wrong-import-position


def features(num, args, seed):
  """(embeddings [num, D], tokens [num, T, W], labels [num]) with a class signal under noise."""
  rng = np.random.default_rng(seed)
  directions = np.random.default_rng(99)
  token_dirs = directions.standard_normal((args.classes, args.width)).astype(np.float32)
  embed_dirs = directions.standard_normal((args.classes, args.embed_dim)).astype(np.float32)
  labels = rng.integers(0, args.classes, num)
  tokens = rng.standard_normal((num, args.tokens, args.width), dtype=np.float32)
  tokens[np.arange(num), rng.integers(0, args.tokens, num)] += 1.0 * token_dirs[labels]
  embeddings = rng.standard_normal((num, args.embed_dim), dtype=np.float32)
  embeddings += 0.1 * embed_dirs[labels]
  return embeddings, tokens, labels


def step_seconds(pool_fn, params, tokens, labels, repeats=5):
  """Median seconds of one jitted forward+backward of a probe whose pooler is `pool_fn`."""
  def loss(p, x, y):
    pooled = probes._layer_norm(pool_fn(p["pooler"], x), p["head"]["norm"])  # pylint: disable=protected-access
    logits = pooled @ p["head"]["kernel"] + p["head"]["bias"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  grad = jax.jit(jax.grad(loss))
  jax.block_until_ready(grad(params, tokens, labels))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(grad(params, tokens, labels))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--examples", type=int, default=10_000)
  parser.add_argument("--test", type=int, default=2_000)
  parser.add_argument("--tokens", type=int, default=49)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--embed_dim", type=int, default=512)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch", type=int, default=256)
  args = parser.parse_args()
  train = features(args.examples, args, seed=0)
  test = features(args.test, args, seed=1)
  defaults = schema.Probe()
  out = {"device": str(jax.devices()[0].device_kind), "examples": args.examples,
         "tokens": args.tokens, "width": args.width, "embed_dim": args.embed_dim,
         "classes": args.classes}

  t0, c0 = time.perf_counter(), time.process_time()
  linear = probes.linear_probe(train[0], train[2], test[0], test[2], args.classes,
                               defaults.linear_l2, defaults.linear_holdout)
  out["linear_seconds"] = time.perf_counter() - t0
  out["linear_cpu_seconds"] = time.process_time() - c0
  out["linear_top1"], out["linear_l2"] = linear["top1"], linear["l2"]

  settings = probes.AttentionalSettings(heads=args.heads, epochs=args.epochs,
                                        batch_size=args.batch, lr=defaults.attn_lr,
                                        weight_decay=defaults.attn_weight_decay)
  for name in ("attn_first", "attn"):
    t0, c0 = time.perf_counter(), time.process_time()
    params, losses = probes.train_attentional_probe(train[1], train[2], args.classes, settings)
    top1 = float(np.mean(probes.predict(params, test[1]) == test[2]))
    out[f"{name}_seconds"] = time.perf_counter() - t0
    out[f"{name}_cpu_seconds"] = time.process_time() - c0
  out["attn_steps"], out["attn_top1"] = len(losses), top1
  out["attn_step_ms"] = 1e3 * out["attn_seconds"] / len(losses)

  params = probes.init_probe(jax.random.key(0), args.width, args.heads, args.classes)
  batch_tokens = jnp.asarray(train[1][:args.batch])
  batch_labels = jnp.asarray(train[2][:args.batch])
  naive = lambda pooler, x: layers.AttentionalPooler(1, args.heads).apply(
      {"params": pooler}, x)[:, 0]
  out["step_folded_seconds"] = step_seconds(probes.pool, params, batch_tokens, batch_labels)
  out["step_naive_seconds"] = step_seconds(naive, params, batch_tokens, batch_labels)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  from coca_jax.core import runtime  # pylint: disable=wrong-import-position
  runtime.preload_allocator()  # As `python -m coca_jax.evaluate` runs the probes.
  main()
