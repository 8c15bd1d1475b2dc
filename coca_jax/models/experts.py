"""Feed-forward sub-layer of a block: one dense FFN, or feed-forward experts chosen per token.

One implementation serves the model families by configuration:
  * `num_experts=1`: the dense FFN of CoCa / ViT (LayerNorm + MLP). VLMo's modality experts
    (V-FFN, L-FFN, VL-FFN) are several of these, one named sub-module per modality, chosen by
    static sequence segments in `backbone.Block` (no router).
  * `routing='topk'`: a learned router (LIMoE / V-MoE style). Each token goes to its `top_k`
    most probable experts, weighted by the router's softmax probability; each expert takes at
    most `capacity` tokens per routing group; a (token, choice) over capacity skips that expert
    (the residual carries it). Groups and who gets a slot first:
      - bidirectional (`causal=False`, image tokens), `priority='batch'` (default): V-MoE's Batch
        Priority Routing. A group is `group_size` examples of the batch (0: the whole batch),
        capacity is per group, and tokens queue by their top gate, most confident first, all
        first choices before any second choice (every token's k-th choice in the same order).
        Which patches are dropped then follows the router, not the raster: position priority
        drops the bottom and right of every image first. Groups are contiguous rows, so a group
        of g examples stays on one data shard whenever the per-shard batch is a multiple of g,
        and the result is the same on any mesh.
      - bidirectional, `priority='position'`: the earlier rule, kept to measure against: capacity
        per sequence, first choices in position order, then second choices.
      - causal (`causal=True`, the text decoders): token-major priority per sequence, position
        first, then choice rank. A token's slots then depend only on itself and EARLIER tokens,
        so no output depends on a later token, and KV-cached decoding (`decode=True`) reproduces
        the full pass by carrying each sequence's per-expert counts in the 'cache' collection.
        Gate priority cannot serve here: a later token with a larger gate would take an earlier
        token's slot.
    Router noise (`noise_std` > 0, V-MoE's noisy top-k): Gaussian noise of that std is added to
    the router logits when the apply call passes a 'router' rng, which the train step does
    (from its seed and step, so a resumed run draws the same noise); evaluation and decoding
    pass none and route without noise.
    The router's raw statistics (sums over tokens, see `_routed`) are sown into the
    'intermediates' collection; `coca_jax.training.losses.router_losses` turns them into the auxiliary
    losses and metrics.
Tokens reach the experts by index (a per-group scatter of slot -> token, then row gathers in
and out), not by one-hot dispatch einsums whose cost grows with length x capacity.
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
  """Slots per expert per routing group of `length` tokens."""
  return max(1, math.ceil(top_k * length * capacity_factor / num_experts))


class FeedForward(nn.Module):
  """x [batch, length, embed] -> FFN update [batch, length, embed] (residual added by caller).

  Attributes:
    mlp_dim: hidden width of each expert.
    num_experts: 1 for a dense FFN.
    routing: 'topk' (learned router); only used when num_experts > 1.
    top_k: experts per token ('topk').
    capacity_factor: each expert's capacity per routing group is
      ceil(top_k * tokens * capacity_factor / num_experts) tokens ('topk').
    causal: token-major slot priority per sequence, so routing never looks at later tokens
      ('topk').
    priority: non-causal slot priority ('topk'): 'batch' (BPR over groups of `group_size`
      examples) or 'position' (per sequence, position order).
    group_size: examples per BPR group; 0 = the whole batch.
    noise_std: router-logit noise std, drawn from the 'router' rng when the call has one.
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
  priority: str = "batch"
  group_size: int = 0
  noise_std: float = 0.0

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
                       "priority); batch and choice-rank priority look at later tokens")
    if self.priority not in schema.allowed(schema.RoutingPriority):
      raise ValueError(f"priority={self.priority!r} is unknown; use one of {schema.allowed(schema.RoutingPriority)}")
    batch_priority = not self.causal and self.priority == "batch"
    # A routing group: `group` examples (BPR) or one sequence. The dispatch below runs per group.
    group = 1
    if batch_priority:
      if self.group_size < 0:
        raise ValueError(f"group_size={self.group_size} must be >= 0 (0 = the whole batch)")
      # A batch that is not a multiple of group_size (init's dummy batch, a last eval batch)
      # routes in the largest groups that tile it; config.validate holds the training batch to
      # multiples.
      group = math.gcd(self.group_size, batch) if self.group_size else batch
    groups, tokens = batch // group, group * length
    capacity = expert_capacity(self.capacity_length * group or tokens, num, k,
                               self.capacity_factor)
    h = LayerNorm(self.dtype, name="ln")(x)
    router = self._param("router", nn.initializers.normal(stddev=0.02), (width, num),
                         ("embed", None))
    logits = jnp.einsum("blw,we->ble", h.astype(jnp.float32), router)
    if self.noise_std > 0 and self.has_rng("router"):
      logits = logits + self.noise_std * jax.random.normal(self.make_rng("router"), logits.shape)
    probs = jax.nn.softmax(logits, axis=-1)
    gates, index = jax.lax.top_k(probs, k)  # [batch, length, k]
    valid = (jnp.ones((batch, length), jnp.float32) if token_mask is None
             else token_mask.astype(jnp.float32))
    choice = jax.nn.one_hot(index, num, dtype=jnp.int32) * valid[:, :, None, None].astype(jnp.int32)
    # From here on a row is a routing group of `tokens` tokens.
    h_rows = h.reshape(groups, tokens, width)
    index, choice = index.reshape(groups, tokens, k), choice.reshape(groups, tokens, k, num)
    if self.causal:
      # Token-major: (token t, choice j) queues behind every choice of tokens < t and behind
      # choices < j of token t; nothing later can take its slot.
      order = choice.reshape(groups, tokens * k, num)
      slots = (jnp.cumsum(order, axis=1) - order).reshape(groups, tokens, k, num)
      if self.decode:
        counts = self.variable("cache", "expert_counts", jnp.zeros, (batch, num), jnp.int32)
        counts_before = counts.value
        slots = slots + counts_before[:, None, None, :]
        counts.value = counts_before + jnp.sum(choice, axis=(1, 2))
    else:
      # Choice-rank: all first choices, then all second choices, ...; within a rank in position
      # order ('position') or by the token's top gate, largest first ('batch'; stable, so equal
      # gates keep position order). The same token order serves every rank, as in V-MoE.
      if batch_priority:
        rank = jnp.argsort(-gates[..., 0].reshape(groups, tokens), axis=1, stable=True)
        ranked = jnp.take_along_axis(choice, rank[:, :, None, None], axis=1)
      else:
        ranked = choice
      order = ranked.transpose(0, 2, 1, 3).reshape(groups, k * tokens, num)
      slots = (jnp.cumsum(order, axis=1) - order).reshape(groups, k, tokens, num)
      slots = slots.transpose(0, 2, 1, 3)
      if batch_priority:  # Back to token order: slots[rank[i]] = ranked slots[i].
        slots = jax.vmap(lambda s, r: jnp.zeros_like(s).at[r].set(s))(slots, rank)
    slot = jnp.sum(slots * choice, axis=-1)  # [groups, tokens, k]
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
    # Dispatch by index: row (e, c) of each group's [expert * buffer_rows] buffer holds the
    # token that took slot c of expert e (a gather of rows), and each (token, choice) reads its
    # row back (a gather) weighted by its gate. Empty slots and dropped choices point at an
    # appended zero row. Unlike one-hot [batch, length, expert, capacity] dispatch and combine
    # einsums, whose cost grows with length x capacity (~length^2), this moves each token once.
    rows = num * buffer_rows
    target = jnp.where(kept, index * buffer_rows + slot, rows)  # [groups, tokens, k]
    # Per group (vmapped: the groups stay a batch axis of the scatter and gathers, so they
    # stay on the batch's devices under sharding).
    position = jnp.repeat(jnp.arange(tokens, dtype=jnp.int32), k)
    token_of = jax.vmap(lambda t: jnp.full((rows + 1,), tokens, jnp.int32).at[t].set(position))(
        target.reshape(groups, tokens * k))[:, :rows]
    padded = jnp.concatenate([cast(h_rows), jnp.zeros((groups, 1, width), self.dtype)], axis=1)
    expert_in = jax.vmap(lambda x, i: x[i])(padded, token_of)  # [groups, rows, embed]
    # Expert-major buffers [expert, groups, buffer_rows, embed]: each expert's tokens are then
    # one [groups * buffer_rows, embed] matrix (a batched matmul over experts). Expert
    # parallelism: the constraint moves the buffers from the batch's shards to the experts'
    # devices (an all-to-all over the mesh's `expert` axis) and back.
    buffer_axes = ("expert", "expert_batch", None, "embed")
    expert_in = constrain(expert_in.reshape(groups, num, buffer_rows, width).transpose(1, 0, 2, 3),
                          buffer_axes)
    slots_in = expert_in.reshape(num, groups * buffer_rows, width)
    hidden = nn.gelu(jnp.einsum("enw,ewm->enm", slots_in, cast(wi)) + cast(bi)[:, None])
    expert_out = jnp.einsum("enm,emw->enw", hidden, cast(wo)) + cast(bo)[:, None]
    expert_out = constrain(expert_out.reshape(num, groups, buffer_rows, width), buffer_axes)
    expert_out = jnp.concatenate(
        [expert_out.transpose(1, 0, 2, 3).reshape(groups, rows, width),
         jnp.zeros((groups, 1, width), self.dtype)], axis=1)
    picked = jax.vmap(lambda x, i: x[i])(expert_out, target.reshape(groups, tokens * k))
    picked = picked.reshape(batch, length, k, width)
    choice = choice.reshape(batch, length, k, num).astype(jnp.float32)
    chosen, kept = chosen.reshape(batch, length, k), kept.reshape(batch, length, k)
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
