"""Feed-forward sub-layer of a block: one dense FFN, or feed-forward experts chosen per token.

One implementation serves three model families by configuration:
  * `num_experts=1`: the dense FFN of CoCa / ViT (LayerNorm + MLP).
  * `routing='modality'`: VLMo-style modality experts. Tokens arrive as static segments
    (e.g. image tokens then text tokens); each segment goes to the expert named for its modality
    (V-FFN, L-FFN, VL-FFN), and each expert has its own LayerNorm. No router, no waste: every
    token runs through exactly one expert.
Expert parameters are stacked on a leading logical axis "expert", so `sharding.py` can place
experts on the mesh's `expert` axis.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from coca_jax.models.layers import MLP, LayerNorm

Dtype = Any


class FeedForward(nn.Module):
  """x [batch, length, embed] -> FFN update [batch, length, embed] (residual added by caller).

  Attributes:
    mlp_dim: hidden width of each expert.
    num_experts: 1 for a dense FFN.
    routing: 'modality' (static segments); only used when num_experts > 1.
  """
  mlp_dim: int
  dtype: Dtype = jnp.float32
  num_experts: int = 1
  routing: str = "modality"

  @nn.compact
  def __call__(self, x, segments: Sequence[tuple[int, int]] | None = None):
    """`segments`: static ((expert_index, length), ...) covering the length axis in order."""
    if self.num_experts == 1:
      return MLP(self.mlp_dim, self.dtype, name="mlp")(LayerNorm(self.dtype, name="ln")(x))
    if self.routing != "modality":
      raise ValueError(f"routing={self.routing!r} is not supported; use 'modality'")
    if segments is None:
      raise ValueError("modality experts need `segments`: ((expert, length), ...) per modality")
    if sum(length for _, length in segments) != x.shape[1]:
      raise ValueError(f"segments {segments} do not cover the {x.shape[1]} tokens")
    width = x.shape[-1]
    param = lambda name, init, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    num = self.num_experts
    ln_scale = param("ln_scale", nn.initializers.ones_init(), (num, width), ("expert", "embed"))
    ln_bias = param("ln_bias", nn.initializers.zeros_init(), (num, width), ("expert", "embed"))
    xavier = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    wi = param("wi", xavier, (num, width, self.mlp_dim), ("expert", "embed", "mlp"))
    bi = param("bi", nn.initializers.zeros_init(), (num, self.mlp_dim), ("expert", "mlp"))
    wo = param("wo", xavier, (num, self.mlp_dim, width), ("expert", "mlp", "embed"))
    bo = param("bo", nn.initializers.zeros_init(), (num, width), ("expert", "embed"))
    outputs, start = [], 0
    for expert, length in segments:
      # Static slicing: each token runs through exactly the one expert of its modality.
      piece = x[:, start:start + length].astype(jnp.float32)
      mean = piece.mean(-1, keepdims=True)
      var = jnp.square(piece - mean).mean(-1, keepdims=True)
      h = (piece - mean) * jax.lax.rsqrt(var + 1e-6) * ln_scale[expert] + ln_bias[expert]
      h = h.astype(self.dtype).reshape(-1, width)  # 2-D around the GELU: see layers.MLP.
      h = nn.gelu(h @ wi[expert].astype(self.dtype) + bi[expert].astype(self.dtype))
      out = h @ wo[expert].astype(self.dtype) + bo[expert].astype(self.dtype)
      outputs.append(out.reshape(piece.shape))
      start += length
    return jnp.concatenate(outputs, axis=1)
