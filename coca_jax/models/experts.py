"""Feed-forward sub-layer of a block: one dense FFN, or feed-forward experts chosen per token.

One implementation serves three model families by configuration:
  * `num_experts=1`: the dense FFN of CoCa / ViT (LayerNorm + MLP).
  * `routing='modality'`: VLMo-style modality experts. Tokens arrive as static segments
    (e.g. image tokens then text tokens); each segment goes to the expert named for its modality
    (V-FFN, L-FFN, VL-FFN), and each expert has its own LayerNorm. No router, no waste: every
    token runs through exactly one expert.
  * `routing='topk'`: a learned router (LIMoE / V-MoE style). Each token goes to its `top_k`
    most probable experts, weighted by the router's softmax probability; each expert takes at
    most `capacity` tokens per sequence, first choices before second choices, earlier positions
    first; a token over capacity skips that expert (the residual carries it). The Switch-style
    load-balancing loss and the dropped fraction are sown into the 'intermediates' collection.
Expert parameters are stacked on a leading logical axis "expert", so `sharding.py` can place
experts on the mesh's `expert` axis.
"""

from __future__ import annotations

import math
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
    routing: 'modality' (static segments) or 'topk' (learned router); only used when
      num_experts > 1.
    top_k: experts per token ('topk').
    capacity_factor: each expert's capacity per sequence is
      ceil(top_k * length * capacity_factor / num_experts) tokens ('topk').
  """
  mlp_dim: int
  dtype: Dtype = jnp.float32
  num_experts: int = 1
  routing: str = "modality"
  top_k: int = 1
  capacity_factor: float = 1.0
  activation: str = "gelu_tanh"  # Dense FFN only (layers.ACTIVATIONS); experts use gelu_tanh.
  norm_eps: float = 1e-6  # Dense FFN only.

  @nn.compact
  def __call__(self, x, segments: Sequence[tuple[int, int]] | None = None):
    """`segments`: static ((expert_index, length), ...) covering the length axis in order."""
    if self.num_experts == 1:
      h = LayerNorm(self.dtype, self.norm_eps, name="ln")(x)
      return MLP(self.mlp_dim, self.dtype, self.activation, name="mlp")(h)
    if self.routing == "topk":
      return self._routed(x)
    if self.routing != "modality":
      raise ValueError(f"routing={self.routing!r} is unknown; use 'modality' or 'topk'")
    if segments is None:
      raise ValueError("modality experts need `segments`: ((expert, length), ...) per modality")
    if sum(length for _, length in segments) != x.shape[1]:
      raise ValueError(f"segments {segments} do not cover the {x.shape[1]} tokens")
    width = x.shape[-1]
    num = self.num_experts
    ln_scale = self._param("ln_scale", nn.initializers.ones_init(), (num, width),
                           ("expert", "embed"))
    ln_bias = self._param("ln_bias", nn.initializers.zeros_init(), (num, width),
                          ("expert", "embed"))
    wi, bi, wo, bo = self._expert_weights(width)
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

  def _routed(self, x):
    batch, length, width = x.shape
    num, k = self.num_experts, self.top_k
    if not 1 <= k <= num:
      raise ValueError(f"top_k={k} must be between 1 and num_experts={num}")
    if self.capacity_factor <= 0:
      raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0")
    capacity = max(1, math.ceil(k * length * self.capacity_factor / num))
    h = LayerNorm(self.dtype, name="ln")(x)
    router = self._param("router", nn.initializers.normal(stddev=0.02), (width, num),
                         ("embed", None))
    probs = jax.nn.softmax(jnp.einsum("blw,we->ble", h.astype(jnp.float32), router), axis=-1)
    gates, index = jax.lax.top_k(probs, k)  # [batch, length, k]
    choice = jax.nn.one_hot(index, num, dtype=jnp.int32)  # [batch, length, k, E]
    # Slot of each (token, choice) in its expert's buffer: all first choices in position order,
    # then all second choices, ...
    by_priority = choice.transpose(0, 2, 1, 3).reshape(batch, k * length, num)
    slots = (jnp.cumsum(by_priority, axis=1) - 1).reshape(batch, k, length, num)
    slot = jnp.sum(slots.transpose(0, 2, 1, 3) * choice, axis=-1)  # [batch, length, k]
    kept = slot < capacity
    # one_hot of an out-of-range slot is all zeros: a dropped choice dispatches nothing.
    slot_hot = jax.nn.one_hot(jnp.where(kept, slot, capacity), capacity, dtype=jnp.float32)
    choice = choice.astype(jnp.float32)
    dispatch = jnp.einsum("blke,blkc->blec", choice, slot_hot)
    combine = jnp.einsum("blke,blkc,blk->blec", choice, slot_hot, gates)
    wi, bi, wo, bo = self._expert_weights(width)
    cast = lambda a: a.astype(self.dtype)
    expert_in = jnp.einsum("blec,blw->becw", cast(dispatch), cast(h))
    hidden = nn.gelu(jnp.einsum("becw,ewm->becm", expert_in, cast(wi)) + cast(bi)[:, None])
    expert_out = jnp.einsum("becm,emw->becw", hidden, cast(wo)) + cast(bo)[:, None]
    # Switch-Transformer balance loss: num * sum_e (share of first choices) * (mean probability);
    # 1 when balanced, num when one expert takes everything.
    first_share = jnp.mean(choice[:, :, 0], axis=(0, 1))
    self.sow("intermediates", "router_balance_loss",
             num * jnp.sum(first_share * jnp.mean(probs, axis=(0, 1))))
    self.sow("intermediates", "router_dropped_fraction", 1.0 - jnp.mean(kept))
    return jnp.einsum("blec,becw->blw", cast(combine), expert_out)
