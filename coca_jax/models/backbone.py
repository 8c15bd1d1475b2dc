"""The transformer block and the layer stack (scanned, optionally rematerialised).

A `Block` is pre-LN: shared self-attention, optional cross-attention, then a `FeedForward`
(dense, or modality experts). ViT encoder layers, CoCa's unimodal and multimodal text decoder
layers, and a VLMo mixture-of-modality-experts layer are all this block with different settings.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from coca_jax.models.experts import FeedForward
from coca_jax.models.layers import Attention, LayerNorm, constrain

Dtype = Any

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """x [batch, length, embed] -> [batch, length, embed].

  Attributes:
    cross_attention: attend to `context` [batch, ctx_len, embed] after self-attention.
    decode: use the KV cache (autoregressive decoding; see `Attention`).
    num_experts, segments, routing, top_k, capacity_factor: the feed-forward (see
      `experts.FeedForward`).
    layout: with cross-attention, 'coca' is self-attention, cross-attention, FFN; 'open_clip'
      is self-attention, FFN, cross-attention (its context layer-normed, 'ln_cross_context'),
      a second FFN ('cross_ffn'): open_clip's MultimodalTransformer layer.
    activation, norm_eps: the dense FFN's non-linearity (layers.ACTIVATIONS), LayerNorm epsilon.
  """
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  cross_attention: bool = False
  num_experts: int = 1
  decode: bool = False
  cache_length: int = 0
  segments: Sequence[tuple[int, int]] | None = None
  routing: str = "modality"
  top_k: int = 1
  capacity_factor: float = 1.0
  layout: str = "coca"
  activation: str = "gelu_tanh"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, mask, context):
    if self.layout not in ("coca", "open_clip"):
      raise ValueError(f"layout={self.layout!r} is unknown; use 'coca' or 'open_clip'")
    ffn = lambda name: FeedForward(
        self.mlp_dim, self.dtype, self.num_experts, self.routing, self.top_k,
        self.capacity_factor, self.activation, self.norm_eps, name=name)
    norm = lambda name: LayerNorm(self.dtype, self.norm_eps, name=name)
    x = constrain(x, ("batch", "length", "embed"))
    h = norm("ln_attention")(x)
    x = x + Attention(self.num_heads, self.dtype, self.cache_length, name="attention")(
        h, mask=mask, decode=self.decode)
    open_clip = self.cross_attention and self.layout == "open_clip"
    if open_clip:
      x = x + ffn("ffn")(x, self.segments)
    if self.cross_attention:
      h = norm("ln_cross_attention")(x)
      if open_clip:
        context = norm("ln_cross_context")(context)
      x = x + Attention(self.num_heads, self.dtype, name="cross_attention")(
          h, context, decode=self.decode)
    x = x + ffn("cross_ffn" if open_clip else "ffn")(x, self.segments)
    return constrain(x, ("batch", "length", "embed")), None


class Stack(nn.Module):
  """`depth` Blocks. With `scan`, parameters are stacked on a leading "layers" axis and the
  block is traced once, so compile time does not grow with depth.

  `decode` (KV-cached decoding) needs `scan=False`: every layer then keeps its own cache buffers,
  which a step updates in place; a scanned cache would be sliced per layer and re-stacked, a copy
  of all of it every token. `unscanned_params` gives a scanned stack's parameters that layout.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  cross_attention: bool = False
  num_experts: int = 1
  segments: Sequence[tuple[int, int]] | None = None
  routing: str = "modality"
  top_k: int = 1
  capacity_factor: float = 1.0
  scan: bool = True
  remat: str = "none"
  decode: bool = False
  cache_length: int = 0
  layout: str = "coca"
  activation: str = "gelu_tanh"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, mask=None, context=None):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is unknown; use one of {sorted(REMAT_POLICIES)}")
    if self.decode and self.scan:
      raise ValueError("decoding runs unscanned layers: build the decoder with scan_layers=False "
                       "and its parameters with unscanned_params (coca.unscanned_layers does both)")
    block_cls = Block
    if self.remat != "none":
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                  cross_attention=self.cross_attention, num_experts=self.num_experts,
                  decode=self.decode, cache_length=self.cache_length,
                  segments=tuple(self.segments) if self.segments else None,
                  routing=self.routing, top_k=self.top_k, capacity_factor=self.capacity_factor,
                  layout=self.layout, activation=self.activation, norm_eps=self.norm_eps)
    if self.scan:
      scanned = nn.scan(
          block_cls, variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
          length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**kwargs, name="layers")(x, mask, context)
    else:
      for i in range(self.depth):
        x, _ = block_cls(**kwargs, name=f"layer_{i}")(x, mask, context)
    return x


def unscanned_params(stack_params, depth: int) -> dict:
  """A scanned Stack's parameters, {"layers": tree of [depth, ...]}, in the unscanned layout,
  {"layer_0": tree, ..., f"layer_{depth-1}": tree}: the same layers and values."""
  return {f"layer_{i}": jax.tree.map(lambda p, i=i: p[i], stack_params["layers"])
          for i in range(depth)}
