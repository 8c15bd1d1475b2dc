"""The transformer block and the layer stack (scanned, optionally rematerialised).

A `Block` is pre-LN: shared self-attention, optional cross-attention, then a `FeedForward`
(dense or routed), or, with `modality_experts`, one named `FeedForward` per modality. ViT
encoder layers, CoCa's unimodal and multimodal text decoder layers, and a VLMo
mixture-of-modality-experts layer are all this block with different settings.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from coca_jax.models.experts import FeedForward, RoutedExperts
from coca_jax.models.layers import Attention, LayerNorm, constrain, with_axes

Dtype = Any

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The same policy as dots (JAX's checkpoint_dots_with_no_batch_dims, which dots named
    # before, is an alias of it); the name stays so that existing configs keep working.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # dots, and the outputs of cuDNN's fused attention (output and softmax statistics), so the
    # backward pass does not run each attention forward again: a little less time for a little
    # more memory on a GPU (docs/performance.md, "Changes ranked without a device"). Where
    # attention is XLA's (CPU, TPU), the same as dots.
    "dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        lambda prim, *_, **__: prim.name.startswith("dot_product_attention_fwd")),
}


class Block(nn.Module):
  """x [batch, length, embed] -> [batch, length, embed].

  Attributes:
    cross_attention: attend to `context` [batch, ctx_len, embed] after self-attention.
    decode: use the KV cache (autoregressive decoding; see `Attention`).
    num_experts, routing, top_k, capacity_factor, causal, capacity_length: the feed-forward
      (see `experts.FeedForward`).
    modality_experts: names of per-modality feed-forwards (VLMo), e.g. ("image", "text",
      "fusion"): each is its own `FeedForward` (own LayerNorm) named `ffn_<name>`, so one can be
      frozen or loaded alone by its path. Empty: one feed-forward named `ffn`.
    routed_experts: ((name, RoutedExperts), ...): the modality experts of this layer that are
      learned-routed feed-forwards (LIMoE-style top-k experts inside `ffn_<name>`); the others
      are dense.
    layout: with cross-attention, 'coca' is self-attention, cross-attention, FFN; 'open_clip'
      is self-attention, FFN, cross-attention (its context layer-normed, 'ln_cross_context'),
      a second FFN ('cross_ffn'): open_clip's MultimodalTransformer layer.
    activation, norm_eps: the dense FFN's non-linearity (layers.ACTIVATIONS), LayerNorm epsilon.
    layer_scale: > 0: each residual update (self-attention, feed-forward) is multiplied by its
      own learned per-channel scale initialised to this value (CaiT/BEiT/VLMo layer scale,
      'layer_scale_attention' and 'layer_scale_ffn'); 0: none.
    drop_path: stochastic depth: in training (`deterministic=False`, a 'dropout' rng) each
      example's residual updates are dropped with this probability and the kept ones scaled by
      1 / (1 - drop_path); evaluation and decoding never drop.
    key_bias: False: the attention's key projection has no bias (VLMo/BEiT q/v-only biases).
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
  causal: bool = False
  capacity_length: int = 0
  modality_experts: tuple[str, ...] = ()
  routed_experts: tuple[tuple[str, RoutedExperts], ...] = ()
  layout: str = "coca"
  activation: str = "gelu_tanh"
  norm_eps: float = 1e-6
  # Non-causal routing (experts.RoutedExperts): slot priority, BPR group, router noise.
  priority: str = "batch"
  group_size: int = 0
  noise_std: float = 0.0
  layer_scale: float = 0.0
  drop_path: float = 0.0
  key_bias: bool = True

  @nn.compact
  def __call__(self, x, mask, context, segments: Sequence[tuple] | None = None,
               prefix_kv=None, return_kv: bool = False, token_mask=None,
               causal_routing: bool = False, routing_length: int = 0, attention_bias=None,
               deterministic: bool = True, query_rows: int = 0):
    """x [batch, length, embed] -> (x', None), or (x', (keys, values) of x) with `return_kv`.

    segments: with modality experts, static ((expert name, length[, modality]), ...) covering
      the length axis in order: the tokens of each segment go through `ffn_<name>` (no gather,
      no modality router). A routed expert routes each segment on its own (its own capacity;
      statistics sown as 'router', or 'router_<modality>' where the expert is not the tokens'
      modality, i.e. ffn_fusion).
    prefix_kv: keys and values [batch, prefix_len, heads, kv] the self-attention also attends
      to (see `Attention`).
    token_mask, causal_routing, routing_length: for routed modality experts, the pass's
      [batch, length] bool non-padding mask (None = all tokens), whether its slots go
      token-major (a causal pass; needed with `decode`) and the length its capacity comes from
      (0 = the segment's length); see `experts.FeedForward`.
    attention_bias: float32 [heads, length, prefix_len + length] (or broadcastable with a
      batch axis) added to the self-attention logits (a relative position bias).
    deterministic: False in training: stochastic depth (`drop_path`) is on.
    query_rows: > 0: x' is the first `query_rows` rows only, as the full call computes them
      (every token still attends as a key and value), for a pass that reads no other row of
      its last layer; `segments` and `token_mask` then cover those rows. Not with
      cross-attention or a KV cache.
    """
    if self.layout not in ("coca", "open_clip"):
      raise ValueError(f"layout={self.layout!r} is unknown; use 'coca' or 'open_clip'")
    norm = lambda name: LayerNorm(self.dtype, self.norm_eps, name=name)
    routing = (token_mask, causal_routing, routing_length)
    x = constrain(x, ("batch", "length", "embed"))
    h = norm("ln_attention")(x)
    update, kv = Attention(self.num_heads, self.dtype, self.cache_length, self.key_bias,
                           name="attention")(
        h, mask=mask, decode=self.decode, prefix_kv=prefix_kv, return_kv=True,
        bias=attention_bias, query_rows=query_rows)
    if query_rows:
      if self.cross_attention:
        raise ValueError("query_rows: not with cross-attention")
      x = x[:, :query_rows]
      mask = None if mask is None or mask.shape[-2] == 1 else mask[..., :query_rows, :]
    x = x + self._residual("attention", update, deterministic)
    open_clip = self.cross_attention and self.layout == "open_clip"
    if open_clip:
      x = x + self._ffn("ffn", x, mask, segments, routing)
    if self.cross_attention:
      h = norm("ln_cross_attention")(x)
      if open_clip:
        context = norm("ln_cross_context")(context)
      x = x + Attention(self.num_heads, self.dtype, name="cross_attention")(
          h, context, decode=self.decode)
    update = self._ffn("cross_ffn" if open_clip else "ffn", x, mask, segments, routing)
    x = x + self._residual("ffn", update, deterministic)
    return constrain(x, ("batch", "length", "embed")), (kv if return_kv else None)

  def _residual(self, name, update, deterministic):
    """A residual branch's update after layer scale and stochastic depth (both optional)."""
    if self.layer_scale:
      scale = self.param(f"layer_scale_{name}", with_axes(
          nn.initializers.constant(self.layer_scale), ("embed",)), (update.shape[-1],),
          jnp.float32)
      update = update * scale.astype(update.dtype)
    if deterministic or not self.drop_path or self.decode:
      return update
    keep = 1.0 - self.drop_path
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep,
                                (update.shape[0],) + (1,) * (update.ndim - 1))
    return jnp.where(kept, update / jnp.asarray(keep, update.dtype), jnp.zeros_like(update))

  def _ffn(self, name, x, mask, segments, routing):
    """The feed-forward update: per-modality experts, or one (dense or routed) FFN."""
    if self.modality_experts:
      return self._modality_ffn(x, segments, *routing)
    # A token may attend to itself exactly when it is not padding: the mask's diagonal.
    token_mask = None if mask is None else jnp.diagonal(mask[:, 0], axis1=-2, axis2=-1)
    return FeedForward(self.mlp_dim, self.dtype, self.num_experts, self.routing, self.top_k,
                       self.capacity_factor, self.causal, self.decode, self.capacity_length,
                       self.activation, self.norm_eps, self.priority, self.group_size,
                       self.noise_std, name=name)(x, token_mask)

  def _modality_ffn(self, x, segments, token_mask, causal_routing, routing_length):
    """Each static segment of the length axis through its modality's own feed-forward."""
    if not segments or sum(segment[1] for segment in segments) != x.shape[1]:
      raise ValueError(f"segments {segments} must cover the {x.shape[1]} tokens with "
                       "((expert name, length[, modality]), ...)")
    routed = dict(self.routed_experts)
    modules, outputs, start = {}, [], 0
    for name, length, *modality in segments:
      if name not in self.modality_experts:
        raise ValueError(f"segment expert {name!r} is not among this layer's modality experts "
                         f"{self.modality_experts}")
      if name not in modules:  # One module per expert, called once per segment.
        experts = routed.get(name)
        settings = {} if experts is None else dict(
            num_experts=experts.num_experts, routing="topk", top_k=experts.top_k,
            capacity_factor=experts.capacity_factor, causal=causal_routing,
            decode=self.decode and causal_routing, capacity_length=routing_length,
            priority=experts.priority, group_size=experts.group_size,
            noise_std=experts.noise_std)
        modules[name] = FeedForward(self.mlp_dim, self.dtype, activation=self.activation,
                                    norm_eps=self.norm_eps, name=f"ffn_{name}", **settings)
      modality = modality[0] if modality else name
      segment_mask = None if token_mask is None else token_mask[:, start:start + length]
      outputs.append(modules[name](
          x[:, start:start + length], segment_mask,
          "router" if modality == name else f"router_{modality}"))
      start += length
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


# Block.__call__ arguments that are Python values fixed per call site (not arrays): a
# rematerialised Block traces them as static, so they must be passed positionally.
BLOCK_STATIC_ARGUMENTS = ("segments", "return_kv", "causal_routing", "routing_length",
                          "deterministic", "query_rows")


def remat_block(remat: str, prevent_cse: bool = True,
                static_arguments: tuple[str, ...] = BLOCK_STATIC_ARGUMENTS):
  """`Block`, or with remat != 'none' `nn.remat(Block)` under `REMAT_POLICIES[remat]`: the
  backward pass recomputes what the policy does not save from the block's inputs. The named
  `static_arguments` are static (pass them positionally; () when the block is only called with
  x, mask, context); its parameters keep Block's names, so a checkpoint loads under any policy.
  `prevent_cse` must stay on for unscanned layers (else XLA may merge the recomputation with
  the forward pass and keep its activations)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} is unknown; use one of {sorted(REMAT_POLICIES)}")
  if remat == "none":
    return Block
  names = list(inspect.signature(Block.__call__).parameters)  # names[0] is self, as flax counts.
  return nn.remat(Block, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse,
                  static_argnums=tuple(names.index(name) for name in static_arguments))


class Stack(nn.Module):
  """`depth` Blocks. With `scan`, parameters are stacked on a leading "layers" axis and the
  block is traced once, so compile time does not grow with depth.

  `decode` (KV-cached decoding) needs `scan=False`: every layer then keeps its own cache buffers,
  which a step updates in place; a scanned cache would be sliced per layer and re-stacked, a copy
  of all of it every token. `unscanned_params` gives a scanned stack's parameters that layout.

  `experts` (learned routing) makes layer i routed when `experts.routed(layer_offset + i)`; the
  others stay dense. A scanned stack with both kinds scans over groups of `experts.every` layers
  (parameters {"layers": {"block_0": ..., "block_<every-1>": ...}}, each [depth / every, ...]).
  `causal` and `capacity_length` go to routed feed-forwards (see `experts.FeedForward`).
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
  experts: RoutedExperts | None = None
  layer_offset: int = 0
  causal: bool = False
  capacity_length: int = 0
  scan: bool = True
  remat: str = "none"
  decode: bool = False
  cache_length: int = 0
  layout: str = "coca"
  activation: str = "gelu_tanh"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, mask=None, context=None):
    if self.decode and self.scan:
      raise ValueError("decoding runs unscanned layers: build the decoder with scan_layers=False "
                       "and its parameters with unscanned_params (coca.unscanned_layers does both)")
    block_cls = remat_block(self.remat, prevent_cse=not self.scan, static_arguments=())
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                  cross_attention=self.cross_attention, num_experts=self.num_experts,
                  decode=self.decode, cache_length=self.cache_length,
                  routing=self.routing, top_k=self.top_k, capacity_factor=self.capacity_factor,
                  causal=self.causal, capacity_length=self.capacity_length,
                  layout=self.layout, activation=self.activation, norm_eps=self.norm_eps)
    experts = self.experts
    layer_kwargs = [{**kwargs, **(experts.ffn_kwargs(self.layer_offset + i) if experts else {})}
                    for i in range(self.depth)]
    if self.scan and any(kw != layer_kwargs[0] for kw in layer_kwargs):
      every = experts.every
      if self.depth % every:
        raise ValueError(
            f"a scanned stack of {self.depth} layers cannot repeat groups of experts.every="
            f"{every} layers; make the depth a multiple of {every} or set "
            "config.model.scan_layers=False")
      group = tuple(tuple(sorted(kw.items())) for kw in layer_kwargs[:every])
      scanned = nn.scan(
          _Group, variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
          length=self.depth // every, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(block_cls, group, name="layers")(x, mask, context)
    elif self.scan:
      scanned = nn.scan(
          block_cls, variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
          length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**layer_kwargs[0], name="layers")(x, mask, context)
    else:
      for i in range(self.depth):
        x, _ = block_cls(**layer_kwargs[i], name=f"layer_{i}")(x, mask, context)
    return x


class _Group(nn.Module):
  """`len(layer_kwargs)` consecutive Blocks (dense and routed): the unit a mixed stack scans."""
  block_cls: Any
  layer_kwargs: tuple  # Per block: sorted (name, value) pairs of its Block settings.

  @nn.compact
  def __call__(self, x, mask, context):
    for j, kwargs in enumerate(self.layer_kwargs):
      x, _ = self.block_cls(**dict(kwargs), name=f"block_{j}")(x, mask, context)
    return x, None


def unscanned_params(stack_params, depth: int | None = None) -> dict:
  """A scanned Stack's parameters, {"layers": tree of [depth, ...]} (or, for a mixed stack,
  {"layers": {"block_j": tree of [depth / every, ...]}}), in the unscanned layout,
  {"layer_0": tree, ..., f"layer_{depth-1}": tree}: the same layers and values. Also maps any
  collection with that layout (e.g. sown 'intermediates', where a mixed stack's dense blocks
  may be absent: then `depth` is needed). An unscanned tree is returned as it is."""
  if "layers" not in stack_params:
    return dict(stack_params)
  layers = stack_params["layers"]
  steps = jax.tree.leaves(layers)[0].shape[0]
  blocks = sorted(int(name.split("_")[1]) for name in layers if name.startswith("block_"))
  if not blocks:
    return {f"layer_{i}": jax.tree.map(lambda p, i=i: p[i], layers) for i in range(steps)}
  per = (blocks[-1] + 1) if depth is None else depth // steps
  return {f"layer_{g * per + j}": jax.tree.map(lambda p, g=g: p[g], layers[f"block_{j}"])
          for g in range(steps) for j in blocks}
