"""Spec: the trace summary (coca_jax/perf/trace_summary.py, run on a train step by
benchmarks/profile_train_step.py) names what each op is and which part of the model it belongs
to, and reads op times from a real trace.

Its kind and model-part tables are what a user reads to decide where to work (docs/performance.md's GPU
profile came from them), so a GEMM must not be reported as elementwise work, nor a backward op
as a forward one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from coca_jax.perf import trace_summary as profiler


# Instruction lines in the form XLA:GPU prints them (names, targets and backend configs as in
# a CoCa-Base compile on an H200; operands and metadata shortened).
GPU_HLO = """
ENTRY %main.1 (p0: bf16[256,256,768]) -> f32[] {
  %custom-call.15 = (f32[768,64000]{1,0}, s8[33554432]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/transpose(jvp(CoCa))/CoCa.caption_logits/CoCa._vocab_logits/vocab_head/dot_general"}
  %dot_product_attention_bwd.32 = (bf16[256,256,12,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k), custom_call_target="__cudnn$fmhaSoftmaxBackward", metadata={op_name="jit(train_step)/transpose(jvp(CoCa))/CoCa.encode_image/vision/while/body/closed_call/layers/attention/dot_product_attention"}
  %gemm_fusion_dot.55 = bf16[65536,768]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_fusion_dot.55_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":{"block_m":"128"}}}, metadata={op_name="jit(train_step)/jvp(CoCa)/CoCa._unimodal/unimodal/while/body/closed_call/layers/layers._ffn/ffn/mlp/wo/dot_general"}
  %loop_dynamic_update_slice_fusion.3 = bf16[12,256,256,768]{3,2,1,0} fusion(%s, %u, %i), kind=kLoop, calls=%fused_dus.3
  %input_add_reduce_fusion.10 = (bf16[256,3072]{1,0}, bf16[256,256,3072]{2,1,0}) fusion(%g, %h), kind=kInput, calls=%fused_reduce.10, metadata={op_name="jit(train_step)/transpose(jvp(CoCa))/CoCa.encode_image/vision/while/body/closed_call/layers/layers._ffn/ffn/mlp/wi/reduce_sum"}
  %loop_multiply_fusion.8 = f32[256,63,64000]{2,1,0} fusion(%l, %m), kind=kLoop, calls=%fused_multiply.8, metadata={op_name="jit(train_step)/mul"}
  ROOT %copy.7 = f32[768,768]{0,1} copy(%w2)
}
"""


def test_gpu_ops_are_classified_by_what_they_compute():
  index = profiler.hlo_index(GPU_HLO)
  kinds = {name: profiler.op_kind(name, index.get(name)) for name in index}
  assert kinds == {
      "custom-call.15": "matmul (library)",
      "dot_product_attention_bwd.32": "attention (cuDNN fused)",
      "gemm_fusion_dot.55": "matmul (Triton/fused GEMM)",
      "loop_dynamic_update_slice_fusion.3": "dynamic-update-slice (scan stacking)",
      "input_add_reduce_fusion.10": "reduction fusion",
      "loop_multiply_fusion.8": "elementwise fusion",
      "copy.7": "copy/transpose",
  }
  assert index["custom-call.15"]["shape"].startswith("(f32[768,64000]")


def test_ops_are_attributed_to_direction_and_model_part():
  index = profiler.hlo_index(GPU_HLO)
  part = lambda name: profiler.model_part(index[name])
  assert part("custom-call.15") == "bwd CoCa.caption_logits/CoCa._vocab_logits/vocab_head"
  assert part("dot_product_attention_bwd.32") == "bwd CoCa.encode_image/vision/layers/attention"
  assert part("gemm_fusion_dot.55") == "fwd CoCa._unimodal/unimodal/layers/layers._ffn"
  assert part("loop_multiply_fusion.8") == "outside the model (loss, optimizer, casts)"
  assert part("loop_dynamic_update_slice_fusion.3") == "(no source metadata)"


def test_op_times_come_from_a_real_trace(tmp_path):
  """On this CPU: a traced jitted function's ops are found, with time, under the names its
  compiled HLO gives them (the join the kind and part tables rely on)."""
  f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
  a = jnp.ones((256, 256))
  compiled = f.lower(a).compile()
  jax.block_until_ready(compiled(a))
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      jax.block_until_ready(compiled(a))
  totals, source = profiler.op_times(str(tmp_path))
  assert source == "cpu"
  index = profiler.hlo_index(compiled.as_text())
  assert totals and set(totals) <= set(index), (set(totals), sorted(index))
  assert all(micros > 0 and calls >= 2 for micros, calls in totals.values())
  assert any(profiler.op_kind(name, index[name]).startswith("matmul") for name in totals)
