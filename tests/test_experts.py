"""The learned top-k router of `FeedForward` against a per-token reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.models.backbone import Stack
from coca_jax.models.experts import FeedForward

BATCH, LENGTH, WIDTH, MLP, EXPERTS = 2, 6, 8, 16, 4


def _routed(top_k, capacity_factor, seed=0):
  module = FeedForward(MLP, num_experts=EXPERTS, routing="topk", top_k=top_k,
                       capacity_factor=capacity_factor)
  x = jax.random.normal(jax.random.key(seed), (BATCH, LENGTH, WIDTH))
  params = nn.unbox(module.init(jax.random.key(1), x))["params"]
  # A router strong enough that its choices are not near-ties.
  params["router"] = 3.0 * jax.random.normal(jax.random.key(2), params["router"].shape)
  y, state = module.apply({"params": params}, x, mutable=["intermediates"])
  return module, params, x, np.asarray(y), state["intermediates"]


def _reference(params, x, top_k, capacity):
  """Loops over tokens: the expected output, and which (token, choice) pairs fit."""
  p = jax.tree.map(np.asarray, params)
  x = np.asarray(x, np.float64)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  h = (x - mean) / np.sqrt(var + 1e-6) * p["ln"]["LayerNorm_0"]["scale"] + p["ln"]["LayerNorm_0"]["bias"]
  logits = h @ p["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  gelu = lambda a: np.asarray(nn.gelu(jnp.asarray(a, jnp.float32)), np.float64)
  out = np.zeros_like(x)
  kept = np.zeros((x.shape[0], x.shape[1], top_k), bool)
  for b in range(x.shape[0]):
    load = np.zeros(EXPERTS, int)
    order = np.argsort(-probs[b], axis=-1, kind="stable")[:, :top_k]
    for j in range(top_k):  # First choices before second choices, then by position.
      for t in range(x.shape[1]):
        e = order[t, j]
        if load[e] < capacity:
          load[e] += 1
          kept[b, t, j] = True
          hidden = gelu(h[b, t] @ p["wi"][e] + p["bi"][e])
          out[b, t] += probs[b, t, e] * (hidden @ p["wo"][e] + p["bo"][e])
  return out, kept, probs


@pytest.mark.parametrize("top_k", [1, 2])
def test_each_token_gets_its_top_k_experts_weighted_by_the_router(top_k):
  # capacity_factor = EXPERTS / top_k: every expert can take every token, nothing is dropped.
  _, params, x, y, inter = _routed(top_k, EXPERTS / top_k)
  expected, kept, _ = _reference(params, x, top_k, capacity=LENGTH)
  assert kept.all()
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5)
  assert float(inter["router_dropped_fraction"][0]) == 0.0


def test_tokens_over_capacity_skip_the_expert_and_are_counted():
  top_k, factor = 2, 0.5
  capacity = int(np.ceil(top_k * LENGTH * factor / EXPERTS))
  _, params, x, y, inter = _routed(top_k, factor)
  expected, kept, probs = _reference(params, x, top_k, capacity)
  assert 0 < kept.sum() < kept.size  # The setting does drop some choices.
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(float(inter["router_dropped_fraction"][0]), 1 - kept.mean(),
                             rtol=1e-6)
  # Switch balance loss: EXPERTS * sum_e share of first choices * mean probability.
  share = np.bincount(probs.argmax(-1).ravel(), minlength=EXPERTS) / probs[..., 0].size
  np.testing.assert_allclose(float(inter["router_balance_loss"][0]),
                             EXPERTS * np.sum(share * probs.mean((0, 1))), rtol=1e-5)


def test_router_is_trained_through_the_output_and_the_balance_loss():
  module, params, x, _, _ = _routed(2, 1.0)

  def loss(p):
    y, state = module.apply({"params": p}, x, mutable=["intermediates"])
    return jnp.mean(y ** 2) + state["intermediates"]["router_balance_loss"][0]

  grads = jax.grad(loss)(params)
  assert float(jnp.abs(grads["router"]).max()) > 0
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_scanned_stack_sows_the_router_losses_per_layer():
  stack = Stack(depth=3, num_heads=2, mlp_dim=MLP, num_experts=EXPERTS, routing="topk",
                top_k=2, scan=True)
  x = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, WIDTH))
  variables = stack.init(jax.random.key(1), x)
  _, state = stack.apply({"params": variables["params"]}, x, mutable=["intermediates"])
  losses = jax.tree.leaves(state["intermediates"])
  assert losses and all(leaf.shape[0] == 3 for leaf in losses)  # One value per layer.


def test_bad_router_settings_fail_clearly():
  x = jnp.zeros((1, 4, WIDTH))
  with pytest.raises(ValueError, match="top_k=5"):
    FeedForward(MLP, num_experts=EXPERTS, routing="topk", top_k=5).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="routing='learned' is unknown"):
    FeedForward(MLP, num_experts=EXPERTS, routing="learned").init(jax.random.key(0), x)
