"""Transformer layers that speak logical axis names only.

Logical axes used here (mapped to mesh axes by `coca_jax.sharding` alone):
  batch, length, embed, mlp, heads, kv (per-head features), vocab, queries, expert, layers.
Parameters are always float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
with_axes = nn.with_logical_partitioning
constrain = nn.with_logical_constraint

embed_init = nn.initializers.normal(stddev=0.02)


class Dense(nn.Module):
  """x [..., *in] -> [..., *features] with a kernel [*in, *features] named by logical `axes`.

  `in_dims` trailing input axes are contracted (2 for an attention output [.., heads, kv]).
  The kernel is created in its final shape (not flattened), so its logical names always match
  its rank, and it is Xavier-initialised over the flattened fan-in/fan-out.
  """
  features: int | tuple[int, ...]
  axes: tuple[str, ...]
  dtype: Dtype = jnp.float32
  use_bias: bool = True
  in_dims: int = 1

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    shape = tuple(in_shape) + features
    if len(self.axes) != len(shape):
      raise ValueError(f"{self.name}: {len(self.axes)} logical axes {self.axes} for a kernel "
                       f"of shape {shape}")
    init = nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=tuple(range(self.in_dims)),
        out_axis=tuple(range(self.in_dims, len(shape))))
    kernel = self.param("kernel", with_axes(init, self.axes), shape, jnp.float32)
    contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param("bias", with_axes(nn.initializers.zeros_init(), self.axes[self.in_dims:]),
                        features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(features, axes: tuple[str, ...], dtype: Dtype, name: str, use_bias: bool = True,
          in_dims: int = 1) -> Dense:
  return Dense(features, axes, dtype, use_bias, in_dims, name=name)


class LayerNorm(nn.Module):
  """LayerNorm over `embed`, scale and bias sharded like activations' embed axis."""
  dtype: Dtype = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(
        epsilon=self.epsilon, dtype=self.dtype, param_dtype=jnp.float32,
        scale_init=with_axes(nn.initializers.ones_init(), ("embed",)),
        bias_init=with_axes(nn.initializers.zeros_init(), ("embed",)))(x)


class Attention(nn.Module):
  """Multi-head attention, self or cross, with an optional autoregressive KV cache.

  Inputs: queries [batch, q_len, embed], context [batch, kv_len, embed] (None = self-attention),
  mask broadcastable to [batch, heads, q_len, kv_len] (True = may attend).

  Decoding (`decode=True`): self-attention keeps keys/values for `cache_length` positions in the
  'cache' collection and each call appends q_len new positions; cross-attention projects the
  (fixed) context once and reuses it, so one decoder step costs O(one token).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  cache_length: int = 0

  @nn.compact
  def __call__(self, x, context=None, mask=None, decode: bool = False):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    proj = lambda name: dense((self.num_heads, head_dim), ("embed", "heads", "kv"), self.dtype, name)
    query = proj("query")(x)
    is_cross = context is not None
    if is_cross and decode:
      key, value = self._cached_cross_kv(context, proj)
    else:
      source = context if is_cross else x
      key, value = proj("key")(source), proj("value")(source)
    if decode and not is_cross:
      key, value, mask = self._append_to_cache(key, value, mask)
    query = constrain(query, ("batch", "length", "heads", "kv"))
    key = constrain(key, ("batch", "length", "heads", "kv"))
    value = constrain(value, ("batch", "length", "heads", "kv"))
    out = jax.nn.dot_product_attention(query, key, value, mask=mask)
    return dense(width, ("heads", "kv", "embed"), self.dtype, "out", in_dims=2)(out)

  def _cached_cross_kv(self, context, proj):
    # The context never changes while decoding: project it on the first step, then reuse it.
    cross_key = self.variable("cache", "cross_key", lambda: proj("key")(context))
    cross_value = self.variable("cache", "cross_value", lambda: proj("value")(context))
    return cross_key.value, cross_value.value

  def _append_to_cache(self, key, value, mask):
    batch, q_len, heads, head_dim = key.shape
    shape = (batch, self.cache_length, heads, head_dim)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    start = index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, start, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, start, 0, 0))
    index.value = start + q_len
    # New query i (absolute position start+i) sees cached positions <= start+i.
    positions = jnp.arange(self.cache_length)
    causal = positions[None, :] <= (start + jnp.arange(q_len))[:, None]
    cache_mask = causal[None, None]
    mask = cache_mask if mask is None else jnp.logical_and(mask, cache_mask)
    return cached_key.value, cached_value.value, mask


class MLP(nn.Module):
  """Position-wise feed-forward: embed -> mlp (GELU) -> embed."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = x.shape
    # Tokens are flattened to [batch * length, embed] around the activation: XLA:CPU fuses the
    # GELU derivative into a transpose for the weight gradient, and from a 3-D layout that fusion
    # ran 4x slower than the whole 2-D MLP (61 ms vs 15 ms fwd+bwd at the demo's shapes).
    h = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "wi")(x.reshape(-1, shape[-1]))
    h = constrain(nn.gelu(h), ("batch", "mlp"))
    y = dense(shape[-1], ("mlp", "embed"), self.dtype, "wo")(h)
    return y.reshape(shape)


class AttentionalPooler(nn.Module):
  """One multi-head attention layer with `num_queries` learned queries over a token sequence.

  [batch, tokens, embed] -> [batch, num_queries, embed] (CoCa §3.2).
  """
  num_queries: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    width = tokens.shape[-1]
    queries = self.param("queries", with_axes(embed_init, ("queries", "embed")),
                         (self.num_queries, width), jnp.float32)
    queries = LayerNorm(self.dtype, name="ln_queries")(queries)
    queries = jnp.broadcast_to(queries.astype(self.dtype), (tokens.shape[0], *queries.shape))
    context = LayerNorm(self.dtype, name="ln_context")(tokens)
    return Attention(self.num_heads, self.dtype, name="attention")(queries, context)
