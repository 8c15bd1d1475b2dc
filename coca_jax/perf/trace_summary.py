"""Summaries of a jax.profiler trace: time per XLA op, per kind of op, per model part.

`op_times(trace_dir)` reads the op times (on CPU the host threads' XLA op events, on a GPU the
kernels on the device's streams, each carrying the HLO instruction that launched it);
`hlo_index(compiled.as_text())` reads what each instruction is; `op_kind` and `model_part`
classify an op (GEMM through cuBLAS or Triton, fused attention, reduction or elementwise fusion,
scan slicing, ...) and place it in the model from its source metadata; `summarize` prints the
three tables. benchmarks/profile_train_step.py runs them on a train step (docs/performance.md).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import warnings

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
  if opcode == "dot":
    return "matmul (dot)"
  if "cublas" in text:
    return "matmul (library)"
  if "triton_gemm" in text or "gemm_fusion" in text:
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
  gpu = collections.defaultdict(lambda: [0.0, 0])
  cpu = collections.defaultdict(lambda: [0.0, 0])
  gpu_planes = 0
  with warnings.catch_warnings():  # Reading event stats warns about the binding's types.
    warnings.simplefilter("ignore", DeprecationWarning)
    for plane in profile.planes:
      on_gpu = plane.name.startswith("/device:GPU")
      if not on_gpu and not plane.name.startswith("/host:CPU"):
        continue
      gpu_planes += on_gpu
      for line in plane.lines:
        # A GPU plane's "Stream #N(...)" lines hold the kernels; its other lines ("XLA Ops",
        # "XLA Modules", "Steps") summarise the same time again.
        if on_gpu and not line.name.startswith("Stream"):
          continue
        totals = gpu if on_gpu else cpu
        for event in line.events:
          op = dict(event.stats).get("hlo_op")
          if op:
            totals[op][0] += event.duration_ns / 1e3
            totals[op][1] += 1
  if gpu_planes and not gpu:
    raise ValueError(f"{files[-1]} has {gpu_planes} GPU plane(s) but no kernel carrying an "
                     "hlo_op on a 'Stream' line: the trace layout is not one this reads")
  return (dict(gpu), "gpu") if gpu_planes else (dict(cpu), "cpu")


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
