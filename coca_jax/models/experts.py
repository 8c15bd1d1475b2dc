"""Feed-forward sub-layer of a block: one dense FFN, or feed-forward experts chosen per token.

One implementation serves the model families by configuration:
  * `num_experts=1`: the dense FFN of CoCa / ViT (LayerNorm + MLP). VLMo's modality experts
    (V-FFN, L-FFN, VL-FFN) are several of these, one named sub-module per modality, chosen by
    static sequence segments in `backbone.Block` (no router).
  * `routing='topk'`: a learned router (LIMoE / V-MoE style). Each token goes to its `top_k`
    most probable experts, weighted by the router's softmax probability; each expert takes at
    most `capacity` tokens per sequence; a (token, choice) over capacity skips that expert (the
    residual carries it). Who gets a slot first:
      - bidirectional (`causal=False`, the image encoder): choice-rank priority, all first
        choices (in position order) before any second choice, so second choices never evict a
        first choice;
      - causal (`causal=True`, the text decoders): token-major priority, position first, then
        choice rank. A token's slots then depend only on itself and EARLIER tokens, so no output
        depends on a later token, and KV-cached decoding (`decode=True`) reproduces the full pass
        by carrying each sequence's per-expert counts in the 'cache' collection.
    The router's raw statistics (sums over tokens, see `_routed`) are sown into the
    'intermediates' collection; `coca_jax.training.losses.router_losses` turns them into the auxiliary
    losses and metrics.
Tokens reach the experts by index (a per-sequence scatter of slot -> token, then row gathers
in and out), not by one-hot dispatch einsums whose cost grows with length x capacity.
Expert parameters are stacked on a leading logical axis "expert", so `sharding.py` can place
experts on the mesh's `expert` axis; the dispatched [expert, batch, capacity, embed] buffers are
constrained to ("expert", "expert_batch", ...), so with mesh `expert` > 1 XLA moves tokens to
their experts' devices (an all-to-all) and back.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from coca_jax.core import schema
from coca_jax.models.layers import MLP, LayerNorm, constrain

Dtype = Any
# Learned-routing settings of one side of the model (`config.model.<side>.experts`).
RoutedExperts = schema.Routing


def expert_capacity(length: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert per sequence of `length` tokens."""
  return max(1, math.ceil(top_k * length * capacity_factor / num_experts))


class FeedForward(nn.Module):
  """x [batch, length, embed] -> FFN update [batch, length, embed] (residual added by caller).

  Attributes:
    mlp_dim: hidden width of each expert.
    num_experts: 1 for a dense FFN.
    routing: 'topk' (learned router); only used when num_experts > 1.
    top_k: experts per token ('topk').
    capacity_factor: each expert's capacity per sequence is
      ceil(top_k * length * capacity_factor / num_experts) tokens ('topk').
    causal: token-major slot priority, so routing never looks at later tokens ('topk').
    decode: KV-cached decoding ('topk' needs `causal`): per-sequence expert counts live in the
      'cache' collection and each call routes the next tokens after those already decoded.
    capacity_length: the full sequence length the capacity is computed from; 0 = the input's
      length. Decoding feeds a token at a time, so a causal decoder passes its training length.
  """
  mlp_dim: int
  dtype: Dtype = jnp.float32
  num_experts: int = 1
  routing: str = "topk"
  top_k: int = 1
  capacity_factor: float = 1.0
  causal: bool = False
  decode: bool = False
  capacity_length: int = 0
  activation: str = "gelu_tanh"  # Dense FFN only (layers.ACTIVATIONS); experts use gelu_tanh.
  norm_eps: float = 1e-6  # Dense FFN only.

  @nn.compact
  def __call__(self, x, token_mask=None, statistics: str = "router"):
    """`token_mask` [batch, length] bool ('topk'): False marks padding, which takes no expert slot
    and is left out of the router statistics. `statistics`: the name the router's statistics are
    sown under (a MoME's ffn_fusion keeps its image and text tokens' statistics apart)."""
    if self.num_experts == 1:
      h = LayerNorm(self.dtype, self.norm_eps, name="ln")(x)
      return MLP(self.mlp_dim, self.dtype, self.activation, name="mlp")(h)
    if self.routing != "topk":
      raise ValueError(f"routing={self.routing!r} is unknown; use 'topk' (modality experts are "
                       "named feed-forwards of backbone.Block)")
    return self._routed(x, token_mask, statistics)

  def _param(self, name, init, shape, axes):
    return self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)

  def _expert_weights(self, width: int):
    """wi [E, embed, mlp], bi [E, mlp], wo [E, mlp, embed], bo [E, embed] on the expert axis."""
    num = self.num_experts
    xavier = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    wi = self._param("wi", xavier, (num, width, self.mlp_dim), ("expert", "embed", "mlp"))
    bi = self._param("bi", nn.initializers.zeros_init(), (num, self.mlp_dim), ("expert", "mlp"))
    wo = self._param("wo", xavier, (num, self.mlp_dim, width), ("expert", "mlp", "embed"))
    bo = self._param("bo", nn.initializers.zeros_init(), (num, width), ("expert", "embed"))
    return wi, bi, wo, bo

  def _routed(self, x, token_mask=None, statistics="router"):
    """x [batch, length, embed] -> [batch, length, embed]; sows 'router' statistics."""
    batch, length, width = x.shape
    num, k = self.num_experts, self.top_k
    if not 1 <= k <= num:
      raise ValueError(f"top_k={k} must be between 1 and num_experts={num}")
    if self.capacity_factor <= 0:
      raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0")
    if self.decode and not self.causal:
      raise ValueError("cached decoding with routed experts needs causal=True (token-major "
                       "priority); choice-rank priority looks at later tokens")
    capacity = expert_capacity(self.capacity_length or length, num, k, self.capacity_factor)
    h = LayerNorm(self.dtype, name="ln")(x)
    router = self._param("router", nn.initializers.normal(stddev=0.02), (width, num),
                         ("embed", None))
    logits = jnp.einsum("blw,we->ble", h.astype(jnp.float32), router)
    probs = jax.nn.softmax(logits, axis=-1)
    gates, index = jax.lax.top_k(probs, k)  # [batch, length, k]
    valid = (jnp.ones((batch, length), jnp.float32) if token_mask is None
             else token_mask.astype(jnp.float32))
    choice = jax.nn.one_hot(index, num, dtype=jnp.int32) * valid[:, :, None, None].astype(jnp.int32)
    if self.causal:
      # Token-major: (token t, choice j) queues behind every choice of tokens < t and behind
      # choices < j of token t; nothing later can take its slot.
      order = choice.reshape(batch, length * k, num)
      slots = (jnp.cumsum(order, axis=1) - order).reshape(batch, length, k, num)
      if self.decode:
        counts = self.variable("cache", "expert_counts", jnp.zeros, (batch, num), jnp.int32)
        counts_before = counts.value
        slots = slots + counts_before[:, None, None, :]
        counts.value = counts_before + jnp.sum(choice, axis=(1, 2))
    else:
      # Choice-rank: all first choices in position order, then all second choices, ...
      order = choice.transpose(0, 2, 1, 3).reshape(batch, k * length, num)
      slots = (jnp.cumsum(order, axis=1) - order).reshape(batch, k, length, num)
      slots = slots.transpose(0, 2, 1, 3)
    slot = jnp.sum(slots * choice, axis=-1)  # [batch, length, k]
    chosen = jnp.sum(choice, axis=-1) > 0  # False for padding.
    kept = jnp.logical_and(chosen, slot < capacity)
    if self.decode:
      # A decoding call's tokens take slots after the sequence's earlier ones, but only its own
      # (at most length * k) need buffer rows: place them from 0, not at their absolute slot.
      slot = slot - jnp.sum(counts_before[:, None, None, :] * choice, axis=-1)
      buffer_rows = min(capacity, length * k)
    else:
      buffer_rows = capacity
    wi, bi, wo, bo = self._expert_weights(width)
    cast = lambda a: a.astype(self.dtype)
    # Dispatch by index: row (e, c) of each sequence's [expert * buffer_rows] buffer holds the
    # token that took slot c of expert e (a gather of rows), and each (token, choice) reads its
    # row back (a gather) weighted by its gate. Empty slots and dropped choices point at an
    # appended zero row. Unlike one-hot [batch, length, expert, capacity] dispatch and combine
    # einsums, whose cost grows with length x capacity (~length^2), this moves each token once.
    rows = num * buffer_rows
    target = jnp.where(kept, index * buffer_rows + slot, rows)  # [batch, length, k]
    # Per sequence (vmapped: the batch stays a batch axis of the scatter and gathers, so they
    # stay on the batch's devices under sharding).
    position = jnp.repeat(jnp.arange(length, dtype=jnp.int32), k)
    token_of = jax.vmap(lambda t: jnp.full((rows + 1,), length, jnp.int32).at[t].set(position))(
        target.reshape(batch, length * k))[:, :rows]
    padded = jnp.concatenate([cast(h), jnp.zeros((batch, 1, width), self.dtype)], axis=1)
    expert_in = jax.vmap(lambda x, i: x[i])(padded, token_of)  # [batch, rows, embed]
    # Expert-major buffers [expert, batch, buffer_rows, embed]: each expert's tokens are then
    # one [batch * buffer_rows, embed] matrix (a batched matmul over experts). Expert
    # parallelism: the constraint moves the buffers from the batch's shards to the experts'
    # devices (an all-to-all over the mesh's `expert` axis) and back.
    buffer_axes = ("expert", "expert_batch", None, "embed")
    expert_in = constrain(expert_in.reshape(batch, num, buffer_rows, width).transpose(1, 0, 2, 3),
                          buffer_axes)
    slots_in = expert_in.reshape(num, batch * buffer_rows, width)
    hidden = nn.gelu(jnp.einsum("enw,ewm->enm", slots_in, cast(wi)) + cast(bi)[:, None])
    expert_out = jnp.einsum("enm,emw->enw", hidden, cast(wo)) + cast(bo)[:, None]
    expert_out = constrain(expert_out.reshape(num, batch, buffer_rows, width), buffer_axes)
    expert_out = jnp.concatenate(
        [expert_out.transpose(1, 0, 2, 3).reshape(batch, rows, width),
         jnp.zeros((batch, 1, width), self.dtype)], axis=1)
    picked = jax.vmap(lambda x, i: x[i])(expert_out, target.reshape(batch, length * k))
    picked = picked.reshape(batch, length, k, width)
    choice = choice.astype(jnp.float32)
    # Raw statistics as sums over the (valid) tokens, so microbatches add up exactly;
    # `losses.router_losses` combines them into losses and metrics.
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    self.sow("intermediates", statistics, {
        "tokens": jnp.sum(valid),
        "prob_sum": jnp.einsum("ble,bl->e", probs, valid),  # Importance.
        "first_choice_count": jnp.sum(choice[:, :, 0], axis=(0, 1)),
        "choice_count": jnp.sum(choice, axis=(0, 1, 2)),  # Load, before capacity.
        "dropped_count": jnp.sum(jnp.logical_and(chosen, ~kept).astype(jnp.float32)),
        "entropy_sum": -jnp.sum(jnp.sum(probs * log_probs, axis=-1) * valid),
    })
    return jnp.einsum("blkw,blk->blw", picked, cast(gates * kept))
