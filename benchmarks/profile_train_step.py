r"""Where a train step's time goes: a jax.profiler trace of a few steps, summarised per XLA op
(fusion, dot, copy, ...), beside XLA's own cost analysis (FLOPs, bytes) of the compiled step.

  python benchmarks/profile_train_step.py --config experiments/openclip_coca.py:model=coca_ViT-B-32,batch=16 \
      [--steps 2] [--top 25] [--trace_dir /tmp/coca_trace] [--config.model.remat=dots ...]

Synthetic batch (as `coca_jax.bench`, whose flags it shares); one warm-up step, then `--steps`
traced steps. Prints a
table of the top ops by total time over the traced steps (per step: ms, share of the step,
calls) and one JSON line with the step's XLA cost analysis and memory analysis. The trace
directory opens in TensorBoard's profile plugin or Perfetto (ui.perfetto.dev).
"""

from __future__ import annotations

from coca_jax import runtime

if __name__ == "__main__":  # Before JAX starts; see coca_jax/runtime.py.
  runtime.preload_allocator()

import collections
import glob
import gzip
import json
import os
import re
import time

from absl import app, flags

from coca_jax import bench  # Defines --config (with overrides) and --steps.

FLAGS = flags.FLAGS
flags.DEFINE_integer("top", 25, "Ops to list.")
flags.DEFINE_string("trace_dir", "/tmp/coca_trace", "Where the profiler writes its trace.")


def op_times(trace_dir: str) -> tuple[dict, float]:
  """{op name: (total microseconds, calls)} over the XLA op events of the newest trace in
  trace_dir, and the summed duration of the step executions ('PjitFunction'/'execute' events)."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}: the profiler wrote nothing")
  with gzip.open(files[-1]) as f:
    events = json.load(f)["traceEvents"]
  totals = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e.get("name", "")
    # XLA:CPU op events carry the HLO instruction name (fusion.12, dot.3, copy.7, ...).
    if re.match(r"^[a-z][a-z0-9_\-]*(\.\d+)+$", name) or e.get("args", {}).get("hlo_op"):
      totals[name][0] += e["dur"]
      totals[name][1] += 1
  return dict(totals), sum(v[0] for v in totals.values())


def main(argv) -> None:
  del argv
  import jax
  from coca_jax import step

  config = FLAGS.config
  built = step.setup(config)
  with jax.set_mesh(built.mesh):
    compiled = built.train_step().lower(
        built.sharded_abstract_state, bench._abstract_batch(config, built.mesh)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state = built.init_state(seed=0)
    batch = bench._synthetic_batch(config, built.mesh)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    with jax.profiler.trace(FLAGS.trace_dir):
      for _ in range(FLAGS.steps):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    step_ms = (time.perf_counter() - start) / FLAGS.steps * 1e3
  totals, op_total = op_times(FLAGS.trace_dir)
  ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
  print(f"{'op':<48} {'ms/step':>9} {'share':>7} {'calls/step':>10}")
  for name, (micros, calls) in ranked[:FLAGS.top]:
    per_step = micros / FLAGS.steps / 1e3
    print(f"{name:<48} {per_step:9.1f} {per_step / step_ms:7.1%} {calls / FLAGS.steps:10.0f}")
  kinds = collections.defaultdict(lambda: [0.0, 0])  # fusion kind: ynn_fusion, dot, copy, ...
  for name, (micros, calls) in totals.items():
    kind = re.sub(r"(\.\d+)+$", "", name)
    kind = "ynn_fusion (XNNPACK)" if kind.startswith("ynn_fusion") else (
        "dot" if kind.startswith("dot") else ("copy/transpose" if "copy" in kind or
                                              "transpose" in kind else "other fusions"))
    kinds[kind][0] += micros
    kinds[kind][1] += calls
  print(f"\n{'kind':<48} {'ms/step':>9} {'share':>7} {'calls/step':>10}")
  for kind, (micros, calls) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
    per_step = micros / FLAGS.steps / 1e3
    print(f"{kind:<48} {per_step:9.1f} {per_step / step_ms:7.1%} {calls / FLAGS.steps:10.0f}")
  summary = {
      "step_ms_wall_traced": round(step_ms, 1),
      "ops_ms_per_step": round(op_total / FLAGS.steps / 1e3, 1),
      "distinct_ops": len(totals),
      "xla_flops": (cost or {}).get("flops"),
      "xla_bytes_accessed": (cost or {}).get("bytes accessed"),
      **bench._memory_report(compiled),
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  app.run(main)
