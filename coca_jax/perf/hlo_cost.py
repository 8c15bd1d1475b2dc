"""A static cost estimate of a compiled XLA module: per launched op, the bytes it moves and the
FLOPs of its matmuls, with while-loop trip counts applied; summed per kind of op (the kinds of
`trace_summary.op_kind`) and turned into a roofline time for a device.

It reads `compiled.as_text()` only, so it works on a module compiled for a device this host does
not have (`coca_jax.bench --mode compile --target h100`), and it ranks changes to the model or
to XLA's options by the memory traffic they cause before any device time is spent. It is an
estimate, not a measurement: each op is charged its operands and outputs once (a slice read
or an in-place update only for the part it touches), as if caches held nothing between ops;
docs/performance.md compares it with a measured GPU profile.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
import math
import re

from coca_jax.perf.trace_summary import op_kind

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
          "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\) -> .* \{$")
_DEF = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = ")
_COLLECTIVES = {"all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast"}
# Ops that launch no kernel of their own (views, tuples, constants, ids).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
         "get-dimension-size", "iota"}


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in _ARRAY.findall(shape) if dtype in _BYTES]


def shape_bytes(shape: str, skip_workspace: bool = False) -> float:
  """Bytes of an HLO shape string (arrays and tuples); with skip_workspace, the s8/u8 scratch
  buffers that library calls (cuBLAS, cuDNN) return beside their results are left out."""
  total = 0.0
  for dtype, dims in _arrays(shape):
    if skip_workspace and dtype in ("s8", "u8"):
      continue
    total += _BYTES[dtype] * math.prod(dims)
  return total


@dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  root: bool


def _matching(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "({":
      depth += 1
    elif text[i] in ")}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _parse_instruction(line: str) -> Instruction | None:
  match = _DEF.match(line)
  if not match:
    return None
  rest = line[match.end():]
  if rest.startswith("("):
    end = _matching(rest, 0)
  else:
    end = rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find("(")
  if paren < 0:
    return None
  opcode = rest[:paren]
  close = _matching(rest, paren)
  operands = re.findall(r"%([\w.\-]+)", rest[paren + 1:close - 1])
  return Instruction(match.group(2), shape, opcode, operands, rest[close:], bool(match.group(1)))


def parse_module(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
  """{computation name: instructions} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      instruction = _parse_instruction(line)
      if instruction is not None:
        computations[current].append(instruction)
  if entry is None:
    raise ValueError("no ENTRY computation in this HLO text (pass compiled.as_text())")
  return computations, entry


def _called(attrs: str, key: str) -> list[str]:
  found = re.search(key + r"=\{?([%\w.\-, ]+)\}?", attrs)
  return re.findall(r"%([\w.\-]+)", found.group(1)) if found else []


def _fusion_bytes(fused: list[Instruction]) -> tuple[float, bool]:
  """Bytes a fusion reads and writes: each operand once, except operands only sliced (the
  slices' bytes) and buffers updated in place (the update's bytes, read and written once);
  and whether its every output is such an in-place update."""
  by_name = {i.name: i for i in fused}
  params = {i.name for i in fused if i.opcode == "parameter"}
  users = collections.defaultdict(list)
  for i in fused:
    for operand in i.operands:
      users[operand].append(i)

  def source_param(name: str) -> str | None:  # Through bitcasts to a parameter.
    while name in by_name and by_name[name].opcode == "bitcast":
      name = by_name[name].operands[0]
    return name if name in params else None

  root = next((i for i in fused if i.root), fused[-1] if fused else None)
  outputs = [by_name[o] for o in root.operands] if root and root.opcode == "tuple" else [root]
  written, in_place, updates = 0.0, set(), 0
  for out in outputs:
    while out is not None and out.opcode == "bitcast" and out.operands[0] in by_name:
      out = by_name[out.operands[0]]
    if out is not None and out.opcode == "dynamic-update-slice":
      buffer = source_param(out.operands[0])
      if buffer is not None:
        in_place.add(buffer)
        updates += 1
      written += shape_bytes(by_name[out.operands[1]].shape)
    elif out is not None:
      written += shape_bytes(out.shape)
  read = 0.0
  for name in params:
    if name in in_place:
      continue
    views, readers, pending = {name}, [], [name]
    while pending:  # The parameter's readers, looking through bitcasts.
      for user in users.get(pending.pop(), []):
        if user.opcode == "bitcast":
          views.add(user.name)
          pending.append(user.name)
        else:
          readers.append(user)
    sliced = readers and all(u.opcode in ("dynamic-slice", "slice") and u.operands[0] in views
                             for u in readers)
    read += (sum(shape_bytes(u.shape) for u in readers) if sliced
             else shape_bytes(by_name[name].shape))
  return read + written, updates == len(outputs)


def _gemm_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
  """2 x output elements x contracted size, from a cuBLAS call's backend config or a dot."""
  text = instruction.attrs
  found = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', text) or \
      re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", text)
  if not found or not instruction.operands:
    return 0.0
  lhs = _arrays(shapes.get(instruction.operands[0], ""))
  out = _arrays(instruction.shape)
  if not lhs or not out:
    return 0.0
  dims = [int(d) for d in re.findall(r"\d+", found.group(1))]
  contracted = math.prod(lhs[0][1][d] for d in dims if d < len(lhs[0][1]))
  return 2.0 * math.prod(out[0][1]) * contracted


def _attention_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
  """cuDNN fused attention: query and key [batch, length, heads, head_dim] (logical order);
  forward 2 matmuls of 2*B*H*Tq*Tk*D FLOPs, backward 5 (with the recomputed scores)."""
  operands = [_arrays(shapes.get(o, "")) for o in instruction.operands[:2]]
  if len(operands) < 2 or not operands[0] or not operands[1]:
    return 0.0
  (_, q), (_, k) = operands[0][0], operands[1][0]
  if len(q) != 4 or len(k) != 4:
    return 0.0
  per_matmul = 2.0 * q[0] * q[2] * q[1] * k[1] * q[3]
  return per_matmul * (5 if "Backward" in instruction.attrs else 2)


@dataclass
class OpCost:
  name: str
  kind: str
  calls: int  # Launches per step (trip counts of enclosing loops multiplied).
  bytes: float  # Per call.
  flops: float  # Per call; matmuls and fused attention only.
  op_name: str


def op_costs(hlo_text: str) -> list[OpCost]:
  """Every kernel-launching op of a compiled module with its per-call bytes and FLOPs."""
  computations, entry = parse_module(hlo_text)
  costs: list[OpCost] = []

  def walk(computation: str, calls: int) -> None:
    shapes = {i.name: i.shape for i in computations[computation]}
    for instruction in computations[computation]:
      opcode, attrs = instruction.opcode, instruction.attrs
      if opcode in _FREE or opcode.endswith("-done"):  # An async op's -done only waits.
        continue
      if opcode == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
        if not trips:
          raise ValueError(f"while loop {instruction.name} has no known trip count; this "
                           "estimate needs it (scans over fixed layer counts have one)")
        for body in _called(attrs, "body"):
          walk(body, calls * int(trips.group(1)))
        continue
      if opcode in ("call", "conditional"):
        for callee in _called(attrs, "to_apply") + _called(attrs, "branch_computations"):
          walk(callee, calls)
        continue
      flops, updates_in_place = 0.0, False
      if opcode == "fusion":
        fused = computations.get((_called(attrs, "calls") or [""])[0], [])
        moved, updates_in_place = _fusion_bytes(fused)
        if any(i.opcode == "dot" for i in fused):
          flops = sum(_gemm_flops(i, {j.name: j.shape for j in fused})
                      for i in fused if i.opcode == "dot")
      elif opcode == "dynamic-update-slice":
        moved = 2 * shape_bytes(shapes.get(instruction.operands[1], ""))
      elif opcode == "dynamic-slice":
        moved = 2 * shape_bytes(instruction.shape)
      elif opcode.removesuffix("-start") in _COLLECTIVES:
        # Bytes over the interconnect: the largest array of the op (the gathered or reduced
        # buffer), each device sending or receiving about that much.
        moved = max((_BYTES[d] * math.prod(dims) for d, dims in _arrays(instruction.shape)),
                    default=0.0)
        opcode = opcode.removesuffix("-start")
      else:
        moved = (sum(shape_bytes(shapes.get(o, "")) for o in instruction.operands)
                 + shape_bytes(instruction.shape, skip_workspace=True))
        if opcode == "dot" or "cublas" in attrs:
          flops = _gemm_flops(instruction, shapes)
        elif "fmha" in attrs:
          flops = _attention_flops(instruction, shapes)
      info = {"opcode": opcode}
      for key, pattern in (("kind", r"kind=(k\w+)"),
                           ("target", r'custom_call_target="([^"]+)"'),
                           ("backend", r'"kind":"(__[\w$]+)"')):
        found = re.search(pattern, attrs)
        if found:
          info[key] = found.group(1)
      kind = op_kind(instruction.name, info)
      if opcode == "fusion" and updates_in_place:
        kind = op_kind("dynamic-update-slice", {})
      op_name = re.search(r'op_name="([^"]+)"', attrs)
      costs.append(OpCost(instruction.name, kind, calls, moved, flops,
                          op_name.group(1) if op_name else ""))

  walk(entry, 1)
  return costs


@dataclass(frozen=True)
class Device:
  """What the roofline needs: memory bandwidth and the rates this model's matmuls and fused
  attention calls reach (measured, not the spec: see coca_jax/perf/targets.py)."""
  name: str
  bytes_per_s: float
  matmul_flops_per_s: float
  attention_flops_per_s: float
  interconnect_bytes_per_s: float  # Per device, one direction (collectives).


def op_seconds(cost: OpCost, device: Device) -> float:
  """One call's time: the longer of moving its bytes and doing its FLOPs."""
  if cost.kind == "collectives":  # Counted as if not overlapped with compute.
    return cost.bytes / device.interconnect_bytes_per_s
  rate = (device.attention_flops_per_s if cost.kind.startswith("attention")
          else device.matmul_flops_per_s)
  return max(cost.bytes / device.bytes_per_s, cost.flops / rate)


def roofline(costs: list[OpCost], device: Device) -> dict[str, dict]:
  """{kind: {ms, gb, tflop, calls}} per step: each op takes the longer of moving its bytes and
  doing its FLOPs (a lower bound on its time if it ran alone at those rates)."""
  kinds = collections.defaultdict(lambda: {"ms": 0.0, "gb": 0.0, "tflop": 0.0, "calls": 0})
  for cost in costs:
    row = kinds[cost.kind]
    row["ms"] += op_seconds(cost, device) * cost.calls * 1e3
    row["gb"] += cost.bytes * cost.calls / 1e9
    row["tflop"] += cost.flops * cost.calls / 1e12
    row["calls"] += cost.calls
  return dict(sorted(kinds.items(), key=lambda item: -item[1]["ms"]))


def table(kinds: dict[str, dict]) -> str:
  """The roofline as a text table, with a total row."""
  lines = [f"{'kind of op':40s} {'est. ms':>9s} {'GB':>9s} {'TFLOP':>8s} {'launches':>9s}"]
  for kind, row in kinds.items():
    lines.append(f"{kind:40s} {row['ms']:9.1f} {row['gb']:9.1f} {row['tflop']:8.2f} "
                 f"{row['calls']:9d}")
  total = {key: sum(row[key] for row in kinds.values()) for key in ("ms", "gb", "tflop", "calls")}
  lines.append(f"{'total':40s} {total['ms']:9.1f} {total['gb']:9.1f} {total['tflop']:8.2f} "
               f"{total['calls']:9d}")
  return "\n".join(lines)


def top_ops(costs: list[OpCost], count: int, device: Device) -> str:
  """The `count` ops that move the most bytes per step, with their estimated time and source."""
  lines = [f"{'GB/step':>8s} {'est. ms':>8s} {'calls':>5s}  {'kind':30s} source op"]
  for cost in sorted(costs, key=lambda c: -c.bytes * c.calls)[:count]:
    ms = op_seconds(cost, device) * cost.calls * 1e3
    lines.append(f"{cost.bytes * cost.calls / 1e9:8.2f} {ms:8.2f} {cost.calls:5d}  "
                 f"{cost.kind[:30]:30s} {cost.op_name[-100:] or cost.name}")
  return "\n".join(lines)
