"""The transformer block and the layer stack (scanned, optionally rematerialised).

A `Block` is pre-LN: shared self-attention, optional cross-attention, then a `FeedForward`
(dense or routed), or, with `modality_experts`, one named `FeedForward` per modality. ViT
encoder layers, CoCa's unimodal and multimodal text decoder layers, and a VLMo
mixture-of-modality-experts layer are all this block with different settings.
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
    num_experts, routing, top_k, capacity_factor: the feed-forward (see `experts.FeedForward`).
    modality_experts: names of per-modality feed-forwards (VLMo), e.g. ("image", "text",
      "fusion"): each is its own `FeedForward` (own LayerNorm) named `ffn_<name>`, so one can be
      frozen or loaded alone by its path. Empty: one feed-forward named `ffn`.
  """
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  cross_attention: bool = False
  num_experts: int = 1
  decode: bool = False
  cache_length: int = 0
  routing: str = "topk"
  top_k: int = 1
  capacity_factor: float = 1.0
  modality_experts: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x, mask, context, segments: Sequence[tuple[str, int]] | None = None,
               prefix_kv=None, return_kv: bool = False):
    """x [batch, length, embed] -> (x', None), or (x', (keys, values) of x) with `return_kv`.

    segments: with modality experts, static ((expert name, length), ...) covering the length
      axis in order: the tokens of each segment go through `ffn_<name>` (no gather, no router).
    prefix_kv: keys and values [batch, prefix_len, heads, kv] the self-attention also attends
      to (see `Attention`).
    """
    x = constrain(x, ("batch", "length", "embed"))
    h = LayerNorm(self.dtype, name="ln_attention")(x)
    update, kv = Attention(self.num_heads, self.dtype, self.cache_length, name="attention")(
        h, mask=mask, decode=self.decode, prefix_kv=prefix_kv, return_kv=True)
    x = x + update
    if self.cross_attention:
      h = LayerNorm(self.dtype, name="ln_cross_attention")(x)
      x = x + Attention(self.num_heads, self.dtype, name="cross_attention")(
          h, context, decode=self.decode)
    if self.modality_experts:
      x = x + self._modality_ffn(x, segments)
    else:
      x = x + FeedForward(self.mlp_dim, self.dtype, self.num_experts, self.routing, self.top_k,
                          self.capacity_factor, name="ffn")(x)
    return constrain(x, ("batch", "length", "embed")), (kv if return_kv else None)

  def _modality_ffn(self, x, segments):
    """Each static segment of the length axis through its modality's own feed-forward."""
    if not segments or sum(length for _, length in segments) != x.shape[1]:
      raise ValueError(f"segments {segments} must cover the {x.shape[1]} tokens with "
                       "((expert name, length), ...)")
    outputs, start = [], 0
    for name, length in segments:
      if name not in self.modality_experts:
        raise ValueError(f"segment expert {name!r} is not among this layer's modality experts "
                         f"{self.modality_experts}")
      outputs.append(FeedForward(self.mlp_dim, self.dtype, name=f"ffn_{name}")(
          x[:, start:start + length]))
      start += length
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


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
  routing: str = "topk"
  top_k: int = 1
  capacity_factor: float = 1.0
  scan: bool = True
  remat: str = "none"
  decode: bool = False
  cache_length: int = 0

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
                  routing=self.routing, top_k=self.top_k, capacity_factor=self.capacity_factor)
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
