r"""Where a train step's time goes: a jax.profiler trace of a few steps, summarised per XLA op
(fusion, GEMM, attention kernel, copy, ...), by kind of op and by model part, beside XLA's own
cost analysis (FLOPs, bytes) of the compiled step. Works on CPU and GPU.

  python benchmarks/profile_train_step.py --config experiments/openclip_coca.py:model=coca_ViT-B-32,batch=16 \
      [--steps 2] [--top 25] [--trace_dir /tmp/coca_trace] [--config.model.remat=dots ...]

Synthetic batch (as `coca_jax.bench`, whose flags it shares); two warm-up steps, three timed
untraced steps, then `--steps` traced steps. Op times come from the trace's XLA op events: on CPU the host threads' op events,
on a GPU the kernels on the device's streams, each attributed to the HLO instruction that
launched it. XLA's GPU command buffers (CUDA graphs replaying many ops as one, in whose kernels
the trace cannot tell the ops apart) are switched off for the run unless --command_buffers (at
batch 256 on an H200: 270 ms of summed kernel time per step with them, 281 ms without). Each op
is classified from the compiled HLO (GEMM through cuBLAS or Triton, fused attention,
elementwise or reduction fusion, copy, dynamic slice, ...) and attributed to a model part from
its source metadata (e.g. "bwd CoCa.encode_image/vision/layers/attention"). Prints three tables
(top ops, kinds, parts; per step: ms, share of all op time, calls) and one JSON line with the
untraced and traced step times, the totals, XLA's cost analysis and memory analysis. The trace
directory opens in TensorBoard's profile plugin or Perfetto (ui.perfetto.dev).
"""

from __future__ import annotations

from coca_jax.core import runtime

if __name__ == "__main__":  # Before JAX starts; see coca_jax/core/runtime.py.
  runtime.preload_allocator()

import json
import os
import time

from absl import app, flags

from coca_jax import bench  # Defines --config (with overrides) and --steps.
from coca_jax.perf.trace_summary import hlo_index, op_times, summarize

FLAGS = flags.FLAGS
flags.DEFINE_integer("top", 25, "Ops (and model parts) to list.")
flags.DEFINE_string("trace_dir", "/tmp/coca_trace", "Where the profiler writes its trace.")
flags.DEFINE_bool("command_buffers", False,
                  "Keep XLA's GPU command buffers (their kernels are then one op in the trace).")


def main(argv) -> None:
  del argv
  if not FLAGS.command_buffers:  # Read when the backend starts (below), on GPU only.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_gpu_enable_command_buffer=").strip()
  import jax
  from coca_jax.perf import flops
  from coca_jax.training import step

  config = FLAGS.config
  built = step.setup(config)
  with jax.set_mesh(built.mesh):
    compiled = built.train_step().lower(
        built.sharded_abstract_state, bench._abstract_batch(config, built.mesh)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state = built.init_state(seed=0)
    batch = bench._synthetic_batch(config, built.mesh)
    untraced = []
    for _ in range(5):  # Two warm-up steps (first-run allocations), then three timed.
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      untraced.append(time.perf_counter() - start)
    start = time.perf_counter()
    with jax.profiler.trace(FLAGS.trace_dir):
      for _ in range(FLAGS.steps):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    step_ms = (time.perf_counter() - start) / FLAGS.steps * 1e3
  totals, source = op_times(FLAGS.trace_dir)
  index = hlo_index(compiled.as_text())
  kinds = summarize(totals, index, FLAGS.steps, FLAGS.top)
  busy_ms = sum(v[0] for v in totals.values()) / FLAGS.steps / 1e3
  flops_per_step = flops.model_flops_per_example(config) * config.train.batch_size
  matmul_ms = sum(ms for kind, ms in kinds.items() if kind.startswith(("matmul", "attention")))
  summary = {
      "device_kind": jax.devices()[0].device_kind,
      "times_from": source,
      "step_ms": round(sorted(untraced[2:])[1] * 1e3, 2),  # Median of three, not traced.
      "step_ms_traced": round(step_ms, 2),  # Tracing slows the host side.
      # Summed op time per step: on a GPU the device's busy time (kernels run one at a time on
      # its compute stream), so step_ms minus this is time the device waited on the host; on
      # CPU ops overlap across threads and events are sampled less completely.
      "ops_ms_per_step": round(busy_ms, 2),
      "ms_per_kind": kinds,
      "model_tflops_per_step": flops_per_step / 1e12,
      # Model FLOPs over the time in matmul and attention kernels: their achieved rate if they
      # did all the model's FLOPs (they do nearly all of them).
      "matmul_attention_tflop_per_s": (round(flops_per_step / matmul_ms / 1e9, 1)
                                       if matmul_ms else None),
      "distinct_ops": len(totals),
      "op_calls_per_step": sum(v[1] for v in totals.values()) / FLAGS.steps,  # GPU: kernels
      "xla_flops": (cost or {}).get("flops"),
      "xla_bytes_accessed": (cost or {}).get("bytes accessed"),
      **bench._memory_report(compiled),
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  app.run(main)
