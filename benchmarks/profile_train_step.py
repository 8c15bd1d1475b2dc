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

from coca_jax import runtime

if __name__ == "__main__":  # Before JAX starts; see coca_jax/runtime.py.
  runtime.preload_allocator()

import collections
import glob
import json
import os
import re
import time
import warnings

from absl import app, flags

from coca_jax import bench  # Defines --config (with overrides) and --steps.

FLAGS = flags.FLAGS
flags.DEFINE_integer("top", 25, "Ops (and model parts) to list.")
flags.DEFINE_string("trace_dir", "/tmp/coca_trace", "Where the profiler writes its trace.")
flags.DEFINE_bool("command_buffers", False,
                  "Keep XLA's GPU command buffers (their kernels are then one op in the trace).")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\(")


def hlo_index(hlo_text: str) -> dict[str, dict]:
  """{instruction name: {opcode, kind (fusion kind), target (custom call), shape, op_name}}
  from a compiled module's text (`compiled.as_text()`)."""
  index = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode = match.groups()
    fields = {"opcode": opcode, "shape": shape[:80]}
    for key, pattern in (("kind", r"kind=(k\w+)"), ("target", r'custom_call_target="([^"]+)"'),
                         ("op_name", r'op_name="([^"]+)"'),
                         ("backend", r'"kind":"(__[\w$]+)"')):
      found = re.search(pattern, line)
      if found:
        fields[key] = found.group(1)
    index[name] = fields
  return index


def op_kind(name: str, info: dict | None) -> str:
  """A coarse class of an XLA op: what kind of work its time is."""
  info = info or {}
  opcode, target = info.get("opcode", ""), info.get("target", "")
  backend, kind = info.get("backend", ""), info.get("kind", "")
  text = " ".join((name, opcode, target, backend)).lower()
  if "fmha" in text or ("cudnn" in text and "attention" in text):
    return "attention (cuDNN fused)"
  if "cublas" in text or opcode in ("dot", "convolution") or "gemm" in target.lower():
    return "matmul (library)" if opcode != "dot" else "matmul (dot)"
  if "triton_gemm" in text or "gemm_fusion" in text or "cutlass" in text:
    return "matmul (Triton/fused GEMM)"
  if "ynn_fusion" in text:
    return "matmul (XNNPACK fusion)"
  if "dynamic-update-slice" in text or "dynamic_update_slice" in text:
    return "dynamic-update-slice (scan stacking)"
  if "dynamic-slice" in text or "dynamic_slice" in text:
    return "dynamic-slice (scan reads)"
  if opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
    return "copy/transpose"
  if opcode in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all") or "nccl" in text:
    return "collectives"
  if kind == "kInput" or opcode in ("reduce", "reduce-window") or "reduce" in name:
    return "reduction fusion"
  if kind == "kLoop" or "fusion" in name or opcode == "fusion":
    return "elementwise fusion"
  return opcode or "other"


_WRAPPERS = re.compile(r"^(jit|vmap|pjit|closed_call|checkpoint|rematted_computation|while|body|"
                       r"cond|remat|custom_jvp_call|custom_vjp_call|shard_map|jvp|transpose|"
                       r"eval_jaxpr)\b")


def model_part(info: dict | None, depth: int = 4) -> str:
  """'fwd'/'bwd' and the first `depth` module names of an op's source path, e.g.
  'bwd CoCa.encode_image/vision/layers/attention'; the optimizer update and loss keep their
  own names."""
  op_name = (info or {}).get("op_name", "")
  if not op_name:
    return "(no source metadata)"
  direction = "bwd" if "transpose(jvp(" in op_name else ("fwd" if "jvp(" in op_name else "")
  segments = [s for s in op_name.split("/")[1:-1] if s and not _WRAPPERS.match(s)]
  segments = [s for s in segments if not s.startswith(("jvp(", "transpose("))]
  if not segments:  # Ops of the step function itself: loss, gradient sums, optimizer update.
    return f"{direction} outside the model (loss, optimizer, casts)".strip()
  return f"{direction} {'/'.join(segments[:depth])}".strip()


def op_times(trace_dir: str) -> tuple[dict, str]:
  """{hlo op name: (total microseconds, calls)} over the newest trace in trace_dir, and where
  the times came from ('gpu' kernels on the device streams, or 'cpu' op events)."""
  from jax.profiler import ProfileData
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: the profiler wrote nothing")
  profile = ProfileData.from_file(files[-1])
  warnings.filterwarnings("ignore", message="builtin type", category=DeprecationWarning)
  gpu = collections.defaultdict(lambda: [0.0, 0])
  cpu = collections.defaultdict(lambda: [0.0, 0])
  for plane in profile.planes:
    on_gpu = plane.name.startswith("/device:GPU")
    if not on_gpu and not plane.name.startswith("/host:CPU"):
      continue
    # A GPU plane's stream lines hold the kernels; its other lines ("XLA Ops", "XLA Modules",
    # "Steps", ...) are summaries of the same time.
    streams = [line.name for line in plane.lines if line.name.startswith("Stream")]
    for line in plane.lines:
      if on_gpu and streams and line.name not in streams:
        continue
      if on_gpu and not streams and line.name in ("XLA Ops", "XLA Modules", "Steps"):
        continue
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get("hlo_op")
        if not op:
          continue
        totals = gpu if on_gpu else cpu
        totals[op][0] += event.duration_ns / 1e3
        totals[op][1] += 1
  return (dict(gpu), "gpu") if gpu else (dict(cpu), "cpu")


def _table(title: str, rows, steps: int, top: int) -> None:
  total = sum(micros for micros, _ in rows.values()) or 1.0
  print(f"\n{title:<64} {'ms/step':>9} {'share':>7} {'calls/step':>10}")
  for name, (micros, calls) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
    print(f"{name[:64]:<64} {micros / steps / 1e3:9.2f} {micros / total:7.1%} "
          f"{calls / steps:10.0f}")


def summarize(totals: dict, index: dict, steps: int, top: int) -> dict:
  """Prints the op, kind and model-part tables; returns {kind: ms per step}."""
  ops = {f"{name}  [{op_kind(name, index.get(name))}; {index.get(name, {}).get('shape', '?')}]":
         v for name, v in totals.items()}
  _table("op [kind; result shape]", ops, steps, top)
  kinds = collections.defaultdict(lambda: [0.0, 0])
  parts = collections.defaultdict(lambda: [0.0, 0])
  for name, (micros, calls) in totals.items():
    for group, key in ((kinds, op_kind(name, index.get(name))),
                       (parts, model_part(index.get(name)))):
      group[key][0] += micros
      group[key][1] += calls
  _table("kind", kinds, steps, top)
  _table("model part", parts, steps, top)
  return {kind: round(micros / steps / 1e3, 2) for kind, (micros, _) in kinds.items()}


def main(argv) -> None:
  del argv
  if not FLAGS.command_buffers:  # Read when the backend starts (below), on GPU only.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_gpu_enable_command_buffer=").strip()
  import jax
  from coca_jax import flops, step

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
      "kernels_per_step": sum(v[1] for v in totals.values()) / FLAGS.steps,
      "xla_flops": (cost or {}).get("flops"),
      "xla_bytes_accessed": (cost or {}).get("bytes accessed"),
      **bench._memory_report(compiled),
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  app.run(main)
