"""Transformer layers that speak logical axis names only.

Logical axes used here (mapped to mesh axes by `coca_jax.core.sharding` alone):
  batch, length, embed, mlp, heads, kv (per-head features), vocab, queries, expert, layers.
Parameters are always float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from coca_jax.models.kernels import cpu as cpu_kernels

Dtype = Any
with_axes = nn.with_logical_partitioning
constrain = nn.with_logical_constraint

embed_init = nn.initializers.normal(stddev=0.02)

# config.model.activation: the MLP non-linearity. 'gelu_tanh' (tanh approximation) is ours;
# 'gelu' (exact, erf) is open_clip's nn.GELU; 'quick_gelu' (x * sigmoid(1.702 x)) is OpenAI CLIP's.
ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class Dense(nn.Module):
  """x [..., *in] -> [..., *features] with a kernel [*in, *features] named by logical `axes`.

  `in_dims` trailing input axes are contracted (2 for an attention output [.., heads, kv]).
  The kernel is created in its final shape (not flattened), so its logical names always match
  its rank, and it is Xavier-initialised over the flattened fan-in/fan-out.
  `out_dtype` (default: `dtype`) is the accumulation and output dtype: float32 for the vocab
  head, so a bf16 model's softmax sees logits that were never rounded to bf16.
  A kernel handed in as int8 (with its `kernel_scale`) or bfloat16 is a decoding weight
  (`quantize_kernel`, prepared by `generate.decoder_params`): the layer then multiplies it in
  that format with float32 accumulation. Training always creates float32 kernels.
  """
  features: int | tuple[int, ...]
  axes: tuple[str, ...]
  dtype: Dtype = jnp.float32
  use_bias: bool = True
  in_dims: int = 1
  out_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    shape = tuple(in_shape) + features
    if len(self.axes) != len(shape):
      raise ValueError(f"{self.name}: {len(self.axes)} logical axes {self.axes} for a kernel "
                       f"of shape {shape}")
    out_dtype = self.out_dtype or self.dtype
    if self.has_variable("params", "kernel_tiles"):  # Decoding weights, tiled (quantize_kernel).
      tiles = self.get_variable("params", "kernel_tiles")
      scale = self.get_variable("params", "kernel_scale") if tiles.dtype == jnp.int8 else None
      y = tiled_matmul(x, tiles, scale, self.in_dims, features).astype(out_dtype)
    else:
      init = nn.initializers.variance_scaling(
          1.0, "fan_avg", "uniform", in_axis=tuple(range(self.in_dims)),
          out_axis=tuple(range(self.in_dims, len(shape))))
      kernel = self.param("kernel", with_axes(init, self.axes), shape, jnp.float32)
      contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
      if kernel.dtype == jnp.int8:  # Decoding weights (see quantize_kernel).
        scale = self.param("kernel_scale", nn.initializers.ones_init(), features, jnp.float32)
        y = int8_matmul(x, kernel, scale, self.in_dims, self.dtype).astype(out_dtype)
      else:
        # A kernel stored in bfloat16 (decoding weights) multiplies bfloat16 inputs: XLA:CPU has
        # a fast bf16 x bf16 -> f32 dot, but converts a bf16 kernel to f32 in memory for an f32
        # input.
        operand_dtype = jnp.bfloat16 if kernel.dtype == jnp.bfloat16 else self.dtype
        y = jax.lax.dot_general(x.astype(operand_dtype), kernel.astype(operand_dtype),
                                (contract, ((), ())), preferred_element_type=out_dtype)
    if self.use_bias:
      bias = self.param("bias", with_axes(nn.initializers.zeros_init(), self.axes[self.in_dims:]),
                        features, jnp.float32)
      y = y + bias.astype(out_dtype)
    return y


# Decoding weights (`quantize_kernel`): 'int8' (per-output-channel scales) or 'bfloat16'.
DECODE_WEIGHTS = ("int8", "bfloat16")


def quantize_kernel(kernel, in_dims: int, weights: str, tiled: bool = False) -> dict:
  """A Dense kernel [*in, *features] float32 -> its decoding-weights entries.

  'int8': {"kernel": int8 [*in, *features], "kernel_scale": float32 [*features]}, symmetric,
  one scale per output channel (max |w| over the contracted axes / 127), so w ~ kernel * scale.
  'bfloat16': {"kernel": bfloat16 [*in, *features]}. `Dense` reads either (by the kernel's
  dtype) with float32 accumulation.
  tiled=True: the same values as "kernel_tiles" [ceil(N / 64), K, 64] (K = prod(in), N =
  prod(features); `kernels.cpu.tile`), the layout the CPU decoding kernel streams; `Dense`
  multiplies them with it (`tiled_matmul`).
  """
  if weights not in DECODE_WEIGHTS:
    raise ValueError(f"decode_weights={weights!r} is unknown; use one of {DECODE_WEIGHTS} or None")
  if weights == "bfloat16":
    entries = {"kernel": kernel.astype(jnp.bfloat16)}
  else:
    kernel = kernel.astype(jnp.float32)
    scale = jnp.max(jnp.abs(kernel), axis=tuple(range(in_dims))) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)  # An all-zero channel stays exactly zero.
    entries = {"kernel": jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8),
               "kernel_scale": scale}
  if tiled:
    k = math.prod(kernel.shape[:in_dims])
    entries["kernel_tiles"] = cpu_kernels.tile(entries.pop("kernel").reshape(k, -1))
  return entries


def tiled_matmul(x, tiles, scale, in_dims: int, features: tuple[int, ...]):
  """x [..., *in] @ tiled decoding weights (`quantize_kernel(tiled=True)`) -> float32
  [..., *features]: on CPU the kernel (`kernels.cpu.tiled_matmul`; it reads the weights once for
  all rows; docs/performance.md, "Decoding weights", compares it with XLA's dot), elsewhere (or
  with no kernel built) the weights untiled and widened for XLA's dot. Both accumulate in
  float32 from float32 inputs."""
  lead = x.shape[:x.ndim - in_dims]
  k, n = math.prod(x.shape[x.ndim - in_dims:]), math.prod(features)
  rows = x.reshape(-1, k).astype(jnp.float32)
  flat_scale = None if scale is None else scale.reshape(n)

  def widened(rows, tiles, *scale):
    y = jnp.dot(rows, cpu_kernels.untile(tiles, n).astype(jnp.float32),
                preferred_element_type=jnp.float32)
    return y * scale[0] if scale else y

  operands = (rows, tiles) + (() if flat_scale is None else (flat_scale,))
  if cpu_kernels.available():
    def kernel(rows, tiles, *scale):
      return cpu_kernels.tiled_matmul(rows, tiles, scale[0] if scale else None, n)

    y = jax.lax.platform_dependent(*operands, cpu=kernel, default=widened)
  else:
    y = widened(*operands)
  return y.reshape(*lead, *features)


def int8_matmul(x, kernel, scale, in_dims: int, dtype):
  """x [..., *in] @ (int8 kernel [*in, *features] * scale [*features]) -> float32 [..., *features].

  The kernel is widened to `dtype` and multiplied by the usual dot; the per-channel scale is
  applied to the float32 result. (A fused multiply-reduce that reads the int8 kernel in place
  was tried on XLA:CPU and was far slower than the float32 dot, so it is not used;
  docs/performance.md, "Captions: the float32 floor".)
  """
  contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
  y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())),
                          preferred_element_type=jnp.float32)
  return y * scale


def dense(features, axes: tuple[str, ...], dtype: Dtype, name: str, use_bias: bool = True,
          in_dims: int = 1, out_dtype: Dtype | None = None) -> Dense:
  return Dense(features, axes, dtype, use_bias, in_dims, out_dtype=out_dtype, name=name)


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
  (fixed) context once and reuses it, so one decoder step costs O(one token). Cached keys and
  values are heads-major, [batch, heads, length, kv]: the layout the attention dots consume, so a
  step never transposes the cache (in [batch, length, heads, kv], a CoCa-B/32 step on CPU
  spent most of its time transposing all of it).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  cache_length: int = 0
  # False: the key projection has no bias (VLMo/BEiT: a key bias only shifts every logit of a
  # query by the same amount, so it changes nothing; their checkpoints have q and v biases only).
  key_bias: bool = True

  @nn.compact
  def __call__(self, x, context=None, mask=None, decode: bool = False, prefix_kv=None,
               return_kv: bool = False, bias=None, query_rows: int = 0):
    """`prefix_kv` (keys, values), each [batch, prefix_len, heads, kv] (self-attention only):
    already projected tokens every query also attends to, placed before x (a modality-experts
    layer's image tokens, for its text tokens). The mask then covers [.., prefix_len + kv_len]
    keys. With `decode`, they are written once into the head of the cache (its `cache_length`
    counts them) on the first step. `return_kv`: also return this call's own (keys, values).
    `bias`: float32 added to the scaled logits, broadcastable to [batch, heads, q_len, kv_len]
    (a relative position bias; full-sequence attention only, computed by XLA).
    `query_rows` > 0 (self-attention, no cache): only the first `query_rows` tokens of x query
    (every token still gives its key and value), so the output is [batch, query_rows, embed]:
    the rows of the full call, for a pass that reads only those."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    proj = lambda name: dense((self.num_heads, head_dim), ("embed", "heads", "kv"), self.dtype,
                              name, use_bias=name != "key" or self.key_bias)
    is_cross = context is not None
    if query_rows:
      if is_cross or decode:
        raise ValueError("query_rows selects self-attention queries; not with a context or "
                         "decode")
      query_axis = lambda a: a if a is None or a.shape[-2] == 1 else a[..., :query_rows, :]
      mask, bias = query_axis(mask), query_axis(bias)
    query = constrain(proj("query")(x[:, :query_rows] if query_rows else x),
                      ("batch", "length", "heads", "kv"))
    if is_cross and prefix_kv is not None:
      raise ValueError("prefix_kv extends self-attention; cross-attention takes `context` only")
    own_kv = None
    if decode and bias is not None:
      raise ValueError("an attention bias is not supported with the KV cache (decode=True)")
    if decode:
      if is_cross:
        key, value = self._cached_cross_kv(context, proj)
      else:
        own_kv = (proj("key")(x), proj("value")(x))
        key, value, mask = self._append_to_cache(*own_kv, mask, prefix_kv)
      out = attend_heads_major(query, key, value, mask)
    else:
      source = context if is_cross else x
      key = constrain(proj("key")(source), ("batch", "length", "heads", "kv"))
      value = constrain(proj("value")(source), ("batch", "length", "heads", "kv"))
      own_kv = (key, value)
      if prefix_kv is not None:
        key = jnp.concatenate([prefix_kv[0].astype(key.dtype), key], axis=1)
        value = jnp.concatenate([prefix_kv[1].astype(value.dtype), value], axis=1)
      out = dot_product_attention(query, key, value, mask, bias)
    out = dense(width, ("heads", "kv", "embed"), self.dtype, "out", in_dims=2)(out)
    return (out, own_kv) if return_kv else out

  def _cached_cross_kv(self, context, proj):
    # The context never changes while decoding: project it on the first step, then reuse it.
    cross_key = self.variable("cache", "cross_key", lambda: heads_major(proj("key")(context)))
    cross_value = self.variable("cache", "cross_value",
                                lambda: heads_major(proj("value")(context)))
    return cross_key.value, cross_value.value

  def _append_to_cache(self, key, value, mask, prefix_kv=None):
    """key, value [batch, q_len, heads, kv] at the next q_len positions -> (all cached keys and
    values [batch, heads, cache_length, kv], mask [.., q_len, cache_length]). `prefix_kv` fills
    the first prefix_len slots when the cache is created; positions count on from there."""
    batch, q_len, heads, head_dim = key.shape
    shape = (batch, heads, self.cache_length, head_dim)
    prefix_len = 0 if prefix_kv is None else prefix_kv[0].shape[1]
    if prefix_len >= self.cache_length:
      raise ValueError(f"cache_length={self.cache_length} leaves no room after the "
                       f"{prefix_len} prefix tokens")

    def buffer(which, dtype):
      zeros = jnp.zeros(shape, dtype)
      if prefix_kv is None:
        return zeros
      return jax.lax.dynamic_update_slice(zeros, heads_major(prefix_kv[which]).astype(dtype),
                                          (0, 0, 0, 0))

    cached_key = self.variable("cache", "cached_key", buffer, 0, key.dtype)
    cached_value = self.variable("cache", "cached_value", buffer, 1, value.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(prefix_len, jnp.int32))
    start = index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, heads_major(key),
                                                    (0, 0, start, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, heads_major(value),
                                                      (0, 0, start, 0))
    index.value = start + q_len
    # New query i (absolute position start+i) sees cached positions <= start+i.
    positions = jnp.arange(self.cache_length)
    causal = positions[None, :] <= (start + jnp.arange(q_len))[:, None]
    cache_mask = causal[None, None]
    mask = cache_mask if mask is None else jnp.logical_and(mask, cache_mask)
    return cached_key.value, cached_value.value, mask


MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)  # What dot_product_attention uses.

# Which kernel computes full-sequence attention (the same function either way):
#   auto  - cuDNN's fused flash attention on a GPU for bfloat16/float16 inputs where it has a
#           kernel for the shapes (see _cudnn_has_kernel), XLA otherwise;
#   xla   - XLA's einsum-softmax-einsum everywhere (what CPU and TPU always use);
#   cudnn - cuDNN or an error.
# Chosen when a step is traced, from the environment so that a benchmark can compare both in one
# process; it changes speed and memory only (tests/test_model.py compares auto with xla).
ATTENTION_ENV = "COCA_JAX_ATTENTION"
_warned_fallback = []


def attention_implementation(dtype) -> str | None:
  """'cudnn' or 'xla' for inputs of `dtype` on the default backend (see ATTENTION_ENV)."""
  choice = os.environ.get(ATTENTION_ENV, "auto")
  if choice not in ("auto", "xla", "cudnn"):
    raise ValueError(f"{ATTENTION_ENV}={choice!r} is unknown; use auto, xla or cudnn")
  if choice == "auto":
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    choice = "cudnn" if half and target_platform() == "gpu" else "xla"
  return choice


def target_platform() -> str:
  """The platform being compiled for: that of the mesh set by `jax.set_mesh` where it names one
  (a GPU mesh compiled on a host without GPUs, `coca_jax.bench --target`), else JAX's default
  backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  platform = getattr(device, "platform", None)
  return platform or jax.default_backend()


def _cudnn_has_kernel(query) -> bool:
  """cuDNN's fused bf16 attention trains only with head widths <= 128 that are multiples of 8.
  (Its length rule, even query and key lengths, `_cudnn_shapes` meets by padding.) Its own
  checks run when the backward pass is traced, too late to fall back, hence this check before
  the call."""
  head_dim = query.shape[-1]
  return head_dim <= 128 and head_dim % 8 == 0


def _cudnn_shapes(attend, query, key, value, mask=None):
  """`attend(query, key, value, mask)` with the shapes cuDNN's fused attention takes: even
  query and key lengths (e.g. the 63-position shifted caption, the contrastive pooler's single
  query, a 197-token [CLS] + patches sequence) and a mask as long as both (cuDNN turns it into a
  bias, which may broadcast over batch and heads but not over positions). An odd length gets
  one zero position more, a padded key is masked out of every query, a padded query's output is
  dropped; a mask that broadcasts over positions (a key-padding mask [batch, 1, 1, kv_len]) is
  expanded. The real positions get exactly what they would get without all this."""
  q_len, kv_len = query.shape[1], key.shape[1]
  q_pad, kv_pad = q_len % 2, kv_len % 2
  if q_pad or kv_pad:
    rows = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
    query, key, value = rows(query, q_pad), rows(key, kv_pad), rows(value, kv_pad)
  if mask is not None:  # Broadcastable [batch, heads, q_len, kv_len]: pad the full-length axes.
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, q_pad if mask.shape[2] == q_len else 0),
                          (0, 0)), constant_values=True)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, kv_pad if mask.shape[3] == kv_len else 0)),
                   constant_values=False)
  if kv_pad:
    real_keys = (jnp.arange(kv_len + 1) < kv_len)[None, None, None, :]
    mask = real_keys if mask is None else jnp.logical_and(mask, real_keys)
  if mask is not None:
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (query.shape[1], key.shape[1]))
  return attend(query, key, value, mask)[:, :q_len]


def _cudnn_attention(query, key, value, mask):
  return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="cudnn")


def dot_product_attention(query, key, value, mask=None, bias=None):
  """query [batch, q_len, heads, kv], key/value [batch, kv_len, heads, kv], mask (True = may
  attend) broadcastable to [batch, heads, q_len, kv_len] -> [batch, q_len, heads, kv].
  `bias` (float32, broadcastable like the mask) is added to the scaled logits; attention with a
  bias is XLA's (its logits are float32, as VLMo's relative position bias is added).

  With 'auto', shapes cuDNN rejects (e.g. a head width it has no kernel for) fall back to XLA
  with one warning; an explicit 'cudnn' raises instead. Odd lengths go to cuDNN padded to even
  ones (`_cudnn_shapes`)."""
  if bias is not None:
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / math.sqrt(query.shape[-1])) + bias
    if mask is not None:
      logits = jnp.where(mask, logits, MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, value)
  implementation = attention_implementation(query.dtype)
  if implementation == "cudnn" and not _cudnn_has_kernel(query):
    if os.environ.get(ATTENTION_ENV, "auto") == "cudnn":
      raise ValueError(f"{ATTENTION_ENV}=cudnn: cuDNN has no fused training kernel for query "
                       f"{query.shape} / key {key.shape}; use auto (XLA for such layers)")
    implementation = "xla"
  if implementation == "cudnn":
    try:
      return _cudnn_shapes(_cudnn_attention, query, key, value, mask)
    except (ValueError, NotImplementedError, RuntimeError) as error:
      if os.environ.get(ATTENTION_ENV, "auto") == "cudnn":
        raise
      if not _warned_fallback:
        _warned_fallback.append(True)
        logging.warning("cuDNN attention unavailable for %s (%s); using XLA's", query.shape, error)
  return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")


def heads_major(x):
  """[batch, length, heads, kv] -> [batch, heads, length, kv]."""
  return constrain(jnp.swapaxes(x, 1, 2), ("batch", "heads", "length", "kv"))


def attend_heads_major(query, key, value, mask=None):
  """Dot-product attention over heads-major keys and values (the KV cache's layout).

  query [batch, q_len, heads, kv]; key, value [batch, heads, kv_len, kv]; mask (True = may
  attend) broadcastable to [batch, heads, q_len, kv_len]. Returns [batch, q_len, heads, kv].
  The arithmetic of `jax.nn.dot_product_attention` (scaled float32 logits, masked with a large
  negative number, float32 softmax), so cached decoding matches the uncached forward pass.
  """
  logits = jnp.einsum("bqhd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(1.0 / math.sqrt(query.shape[-1]))
  if mask is not None:
    logits = jnp.where(mask, logits, MASKED_LOGIT)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("bhqk,bhkd->bqhd", probs, value)


class MLP(nn.Module):
  """Position-wise feed-forward: embed -> mlp (`activation`, see ACTIVATIONS) -> embed."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x):
    shape = x.shape
    # Tokens are flattened to [batch * length, embed] around the activation: XLA:CPU fuses the
    # GELU derivative into a transpose for the weight gradient, and from a 3-D layout that fusion
    # is several times slower than the whole 2-D MLP (docs/performance.md, "XLA:CPU notes").
    h = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "wi")(x.reshape(-1, shape[-1]))
    h = constrain(ACTIVATIONS[self.activation](h), ("batch", "mlp"))
    y = dense(shape[-1], ("mlp", "embed"), self.dtype, "wo")(h)
    return y.reshape(shape)


class AttentionalPooler(nn.Module):
  """One multi-head attention layer with `num_queries` learned queries over a token sequence.

  [batch, tokens, embed] -> [batch, num_queries, width] (CoCa §3.2). `width` (0: the tokens'
  width) is the queries' and the output's width; open_clip's pooler works at the joint
  embedding width and reads the wider encoder tokens through its key/value projections.
  """
  num_queries: int
  num_heads: int
  dtype: Dtype = jnp.float32
  width: int = 0
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens):
    width = self.width or tokens.shape[-1]
    queries = self.param("queries", with_axes(embed_init, ("queries", "embed")),
                         (self.num_queries, width), jnp.float32)
    queries = LayerNorm(self.dtype, self.norm_eps, name="ln_queries")(queries)
    queries = jnp.broadcast_to(queries.astype(self.dtype), (tokens.shape[0], *queries.shape))
    context = LayerNorm(self.dtype, self.norm_eps, name="ln_context")(tokens)
    return Attention(self.num_heads, self.dtype, name="attention")(queries, context)
