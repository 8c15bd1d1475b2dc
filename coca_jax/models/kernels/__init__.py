"""Hand-written kernels that XLA does not generate well, each with an XLA fallback.

cpu: narrow-weight (int8 / bfloat16) matmuls for cached decoding on CPU.
"""
