r"""The matmul rates a train step's shapes can reach on this device: bf16 operands, float32
accumulation, for the projections of CoCa-Base at a given batch (vision tokens x 768 -> 768,
3 x 768, 3072 and back; the vocab head's 64k columns) and a large square reference. An MFU target
is only as high as these allow.

  python benchmarks/matmul_ceiling.py [--batch 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import time


def rate(m: int, k: int, n: int, out_dtype, repeats: int = 20) -> float:
  """TFLOP/s of a jitted [m, k] @ [k, n] in bfloat16 with float32 accumulation."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32).astype(out_dtype))
  jax.block_until_ready(f(a, b))
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a, b)
  jax.block_until_ready(out)
  return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e12


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  import jax.numpy as jnp
  vision, text = args.batch * 256, args.batch * 63
  shapes = {
      "square 8192^3": (8192, 8192, 8192, jnp.bfloat16),
      "vision q/k/v/out 768->768": (vision, 768, 768, jnp.bfloat16),
      "vision fused qkv 768->2304": (vision, 768, 2304, jnp.bfloat16),
      "vision mlp in 768->3072": (vision, 768, 3072, jnp.bfloat16),
      "vision mlp out 3072->768": (vision, 3072, 768, jnp.bfloat16),
      "text q/k/v/out 768->768": (text, 768, 768, jnp.bfloat16),
      "text mlp in 768->3072": (text, 768, 3072, jnp.bfloat16),
      "vocab head 768->64000 (f32 out)": (text, 768, 64000, jnp.float32),
      "vocab head grad wrt input 64000->768": (text, 64000, 768, jnp.bfloat16),
  }
  results = {name: round(rate(*shape), 1) for name, shape in shapes.items()}
  if args.json:
    print(json.dumps({"batch": args.batch, "tflop_per_s": results}))
  else:
    for name, value in results.items():
      print(f"{name:<40} {value:8.1f} TFLOP/s")


if __name__ == "__main__":
  main()
