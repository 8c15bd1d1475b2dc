"""hlo_cost: bytes and FLOPs per launched op of a compiled module, loop trip counts applied."""

import jax
import jax.numpy as jnp
import pytest

from coca_jax.perf import hlo_cost

# The shape of a GPU module as XLA prints it (names, layouts and configs as the CUDA compiler
# writes them; sizes small): a scanned layer stack (an outer loop of 2 around an inner one of
# 3) stacking a [4, 8] f32 activation per step into a [3, 4, 8] buffer in place, a cuBLAS GEMM
# with its workspace, a cuDNN attention call, and an asynchronous all-gather.
GPU_MODULE = """HloModule jit_step, entry_computation_layout={(f32[3,4,8]{2,1,0})->f32[3,4,8]{2,1,0}}

%fused_dynamic_update_slice (param_0: f32[3,4,8], param_1: s32[], param_2: f32[4,8]) -> f32[3,4,8] {
  %param_0 = f32[3,4,8]{2,1,0} parameter(0)
  %param_2 = f32[4,8]{1,0} parameter(2)
  %bitcast.1 = f32[1,4,8]{2,1,0} bitcast(%param_2)
  %param_1 = s32[] parameter(1)
  %constant_0 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[3,4,8]{2,1,0} dynamic-update-slice(%param_0, %bitcast.1, %param_1, %constant_0, %constant_0)
}

%fused_slice_add (param_0.1: f32[3,4,8], param_1.1: s32[], param_2.1: f32[4,8]) -> f32[4,8] {
  %param_0.1 = f32[3,4,8]{2,1,0} parameter(0)
  %bitcast.2 = f32[3,32]{1,0} bitcast(%param_0.1)
  %param_1.1 = s32[] parameter(1)
  %constant_1 = s32[] constant(0)
  %dynamic-slice.1 = f32[1,32]{1,0} dynamic-slice(%bitcast.2, %param_1.1, %constant_1), dynamic_slice_sizes={1,32}
  %bitcast.3 = f32[4,8]{1,0} bitcast(%dynamic-slice.1)
  %param_2.1 = f32[4,8]{1,0} parameter(2)
  ROOT %add.1 = f32[4,8]{1,0} add(%bitcast.3, %param_2.1), metadata={op_name="jit(step)/layers/add"}
}

%inner_body (p: (s32[], f32[4,8], f32[3,4,8])) -> (s32[], f32[4,8], f32[3,4,8]) {
  %p = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %stack = f32[3,4,8]{2,1,0} get-tuple-element(%p), index=2
  %w = f32[8,8]{1,0} constant({...})
  %gemm = (f32[4,8]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %y = f32[4,8]{1,0} get-tuple-element(%gemm), index=0
  %updated = f32[3,4,8]{2,1,0} fusion(%stack, %i, %y), kind=kLoop, calls=%fused_dynamic_update_slice
  %sum = f32[4,8]{1,0} fusion(%stack, %i, %y), kind=kLoop, calls=%fused_slice_add, metadata={op_name="jit(step)/layers/add"}
  ROOT %t = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}) tuple(%i, %sum, %updated)
}

%inner_cond (p.1: (s32[], f32[4,8], f32[3,4,8])) -> pred[] {
  %p.1 = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%outer_body (q: (s32[], f32[4,8], f32[3,4,8])) -> (s32[], f32[4,8], f32[3,4,8]) {
  %q = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}) parameter(0)
  ROOT %inner = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}) while(%q), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
}

ENTRY %main (a: f32[3,4,8]) -> f32[3,4,8] {
  %a = f32[3,4,8]{2,1,0} parameter(0)
  %zero = s32[] constant(0)
  %x0 = f32[4,8]{1,0} constant({...})
  %init = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}) tuple(%zero, %x0, %a)
  %outer = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}) while(%init), condition=%inner_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"2"}}
  %q4 = bf16[2,16,4,8]{3,2,1,0} parameter(1)
  %k4 = bf16[2,32,4,8]{3,2,1,0} parameter(2)
  %v4 = bf16[2,32,4,8]{3,2,1,0} parameter(3)
  %fmha = (bf16[2,16,4,8]{3,2,1,0}, f32[2,4,16]{2,1,0}, u8[0]{0}) custom-call(%q4, %k4, %v4), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/attention/dot_product_attention_fwd"}
  %ag = (f32[4,8]{1,0}, f32[32,8]{1,0}) all-gather-start(%x0), dimensions={0}
  %agd = f32[32,8]{1,0} all-gather-done(%ag)
  ROOT %out = f32[3,4,8]{2,1,0} get-tuple-element(%outer), index=2
}
"""


def _by_name(costs):
  return {cost.name: cost for cost in costs}


def test_gpu_module_bytes_flops_and_trip_counts():
  costs = _by_name(hlo_cost.op_costs(GPU_MODULE))
  assert set(costs) == {"gemm", "updated", "sum", "fmha", "ag"}  # Views, tuples, -done: free.
  row = 4 * 8 * 4  # One f32 [4, 8] slice of the stack.
  # Inside both loops: 2 x 3 launches per step.
  assert costs["gemm"].calls == costs["updated"].calls == costs["sum"].calls == 6
  assert costs["fmha"].calls == costs["ag"].calls == 1
  # GEMM: 2 * 4 * 8 output-elements * 8 contracted; reads x and w, writes y, not its workspace.
  assert costs["gemm"].flops == 2 * 4 * 8 * 8
  assert costs["gemm"].bytes == row + 8 * 8 * 4 + row
  assert costs["gemm"].kind == "matmul (library)"
  # In-place update of one slice: its update and index read, the slice written; not the stack.
  assert costs["updated"].bytes == row + 4 + row
  assert costs["updated"].kind == "dynamic-update-slice (scan stacking)"
  # A read of one slice through a bitcast counts the slice, not the whole stack.
  assert costs["sum"].bytes == row + 4 + row + row
  # cuDNN forward attention: 2 matmuls of 2 * B * H * Tq * Tk * D.
  assert costs["fmha"].flops == 2 * (2 * 2 * 4 * 16 * 32 * 8)
  assert costs["fmha"].kind == "attention (cuDNN fused)"
  # An all-gather moves its gathered buffer over the interconnect.
  assert costs["ag"].kind == "collectives" and costs["ag"].bytes == 32 * 8 * 4

  device = hlo_cost.Device("test", bytes_per_s=1e9, matmul_flops_per_s=1e6,
                           attention_flops_per_s=1e5, interconnect_bytes_per_s=1e6)
  kinds = hlo_cost.roofline(list(costs.values()), device)
  # The GEMM is compute-bound at these rates (512 FLOP / 1e6 > 384 B / 1e9): 6 x 0.512 ms.
  assert kinds["matmul (library)"]["ms"] == pytest.approx(6 * 512 / 1e6 * 1e3)
  assert kinds["matmul (library)"]["tflop"] == pytest.approx(6 * 512 / 1e12)
  assert kinds["collectives"]["ms"] == pytest.approx(1024 / 1e6 * 1e3)
  assert "total" in hlo_cost.table(kinds)
  assert "jit(step)/layers/add" in hlo_cost.top_ops(list(costs.values()), 5, device)


def test_a_loop_without_a_known_trip_count_is_an_error():
  module = GPU_MODULE.replace(', backend_config={"known_trip_count":{"n":"2"}}', "")
  with pytest.raises(ValueError, match="while loop outer has no known trip count"):
    hlo_cost.op_costs(module)
  with pytest.raises(ValueError, match="no ENTRY computation"):
    hlo_cost.op_costs("HloModule empty")


def test_a_compiled_scan_counts_every_layer():
  """On a real module (this host's compiler): a 3-step scan's matmul is charged 3 times its
  2*M*K*N FLOPs, where XLA's own cost analysis counts the loop body once."""
  def stack(x, weights):
    return jax.lax.scan(lambda h, w: (jax.nn.gelu(h @ w), None), x, weights)[0]

  compiled = jax.jit(stack).lower(jax.ShapeDtypeStruct((64, 128), jnp.float32),
                                  jax.ShapeDtypeStruct((3, 128, 128), jnp.float32)).compile()
  costs = hlo_cost.op_costs(compiled.as_text())
  matmuls = [c for c in costs if c.kind.startswith("matmul")]
  assert sum(c.flops * c.calls for c in matmuls) == 3 * 2 * 64 * 128 * 128
  assert all(c.calls == 3 for c in matmuls)
  # Each step reads one [128, 128] weight slice, not the whole [3, 128, 128] stack.
  assert max(c.bytes for c in costs) < 3 * 128 * 128 * 4


def test_gpu_targets_name_their_requirements():
  """An unknown target names the known ones; without the CUDA plugin (CI), asking for a target's
  devices says what to install instead of failing deep inside JAX."""
  from coca_jax.perf import targets
  for bad in ("a100", "v5e:4x4x4", "v4:4x4", "v6e:4xfour", "v5e"):
    with pytest.raises(ValueError, match=f"--target={bad!r} is unknown; use one of"):
      targets.prepare(bad)
  assert set(targets.GPU_TARGETS) == {"h100", "h200"}
  assert [targets.is_tpu(t) for t in ("v5e:16x16", "v5p:4x4x4", "v6e:2x2", "h200")] == [
      True, True, True, False]
  assert targets.device_memory_bytes("v5e:4x4") == 16 * 2**30  # What --check_fit compares.
  assert targets.device_memory_bytes("v5p:4x4x4") == 95 * 2**30
  assert 80e9 < targets.device_memory_bytes("h100") < 2**40
  assert targets.for_device_kind("NVIDIA H200") == "h200"
  assert targets.for_device_kind("TPU v5 lite") is None
  try:
    import jax_plugins.xla_cuda13  # noqa: F401  (the CUDA plugin: GPU targets work here)
  except ImportError:
    with pytest.raises(RuntimeError, match="pip install \"jax-cuda13-plugin=="):
      targets.devices("h200")
  try:
    import libtpu  # noqa: F401  (TPU targets work here)
  except ImportError:
    with pytest.raises(RuntimeError, match=r"pip install \"jax\[tpu\]=="):
      targets.devices("v5e:4x4")


def test_bench_compile_mode_and_target_misuse():
  """`coca_jax.bench --mode compile` on this host's devices reports XLA's memory and no GPU
  estimate; `--target` with timed steps is refused with the fix (use compile mode)."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "coca_jax.bench", "--config", "experiments/demo.py:smoke", *args],
      cwd=root, capture_output=True, text=True, timeout=300)
  done = run("--mode", "compile", "--json")
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["bytes_per_device"] > 0 and "estimated_step_seconds" not in result
  refused = run("--mode", "train", "--target", "h200")
  assert refused.returncode != 0
  assert ("--target=h200 compiles for an accelerator this host lacks: use --mode compile"
          in refused.stderr)
  assert "Traceback" not in refused.stderr  # A usage problem, told as one line with its fix.
