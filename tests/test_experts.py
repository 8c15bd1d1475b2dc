"""Learned expert routing: `FeedForward`'s top-k router against a per-token reference (position
priority, token-major causal priority, and Batch Priority Routing over groups of examples),
dropped image tokens spread over the raster under BPR, causal safety (no token sees a later
one; cached decoding equals the full pass), mixed dense/routed stacks, and the router's
auxiliary losses reaching the train loss and its gradient."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.core import schema
from coca_jax.inference import generate as gen
from coca_jax.models.backbone import Stack, unscanned_params
from coca_jax.models.coca import CoCa, CoCaConfig, router_statistics
from coca_jax.models.experts import FeedForward, RoutedExperts
from coca_jax.training import losses
from coca_jax.training import step

BATCH, LENGTH, WIDTH, MLP, EXPERTS = 2, 6, 8, 16, 4


def _routed(top_k, capacity_factor, causal=False, seed=0, token_mask=None, priority="position",
            group_size=0):
  module = FeedForward(MLP, num_experts=EXPERTS, routing="topk", top_k=top_k,
                       capacity_factor=capacity_factor, causal=causal, priority=priority,
                       group_size=group_size)
  x = jax.random.normal(jax.random.key(seed), (BATCH, LENGTH, WIDTH))
  params = nn.unbox(module.init(jax.random.key(1), x))["params"]
  # A router strong enough that its choices are not near-ties.
  params["router"] = 3.0 * jax.random.normal(jax.random.key(2), params["router"].shape)
  y, state = module.apply({"params": params}, x, token_mask, mutable=["intermediates"])
  return module, params, x, np.asarray(y), state["intermediates"]["router"][0]


def _reference(params, x, top_k, capacity, causal, token_mask=None, group=0):
  """Loops over tokens: the expected output, which (token, choice) pairs fit, the probs.
  Slots go in position order within each choice rank (causal=False: all first choices first) or
  in choice order within each position (causal=True: token-major). group > 0: Batch Priority
  Routing, written directly from V-MoE's description: the batch in groups of `group` sequences
  sharing each expert's `capacity`; tokens ranked by their largest router probability (ties: the
  earlier token), all first choices in that order, then all second choices."""
  p = jax.tree.map(np.asarray, params)
  x = np.asarray(x, np.float64)
  valid = np.ones(x.shape[:2], bool) if token_mask is None else np.asarray(token_mask)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  ln = p["ln"]["LayerNorm_0"]
  h = (x - mean) / np.sqrt(var + 1e-6) * ln["scale"] + ln["bias"]
  logits = h @ p["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  gelu = lambda a: np.asarray(nn.gelu(jnp.asarray(a, jnp.float32)), np.float64)
  out = np.zeros_like(x)
  kept = np.zeros((x.shape[0], x.shape[1], top_k), bool)
  order = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
  batch, length = x.shape[:2]
  if group:
    groups = [[(b, t) for b in range(g, g + group) for t in range(length)]
              for g in range(0, batch, group)]
  else:
    groups = [[(b, t) for t in range(length)] for b in range(batch)]
  for tokens in groups:
    load = np.zeros(EXPERTS, int)
    if group:
      tokens = sorted(tokens, key=lambda bt: -probs[bt].max())  # sorted() is stable.
    pairs = ([(bt, j) for bt in tokens for j in range(top_k)] if causal else
             [(bt, j) for j in range(top_k) for bt in tokens])
    for (b, t), j in pairs:
      e = order[b, t, j]
      if valid[b, t] and load[e] < capacity:
        load[e] += 1
        kept[b, t, j] = True
        hidden = gelu(h[b, t] @ p["wi"][e] + p["bi"][e])
        out[b, t] += probs[b, t, e] * (hidden @ p["wo"][e] + p["bo"][e])
  return out, kept, probs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_each_token_gets_its_top_k_experts_weighted_by_the_router(top_k, causal):
  # capacity_factor = EXPERTS / top_k: every expert can take every token, nothing is dropped.
  _, params, x, y, stats = _routed(top_k, EXPERTS / top_k, causal)
  expected, kept, _ = _reference(params, x, top_k, LENGTH, causal)
  assert kept.all()
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5)
  assert float(stats["dropped_count"]) == 0.0


@pytest.mark.parametrize("causal", [False, True])
def test_tokens_over_capacity_skip_the_expert_and_are_counted(causal):
  top_k, factor = 2, 0.5
  capacity = int(np.ceil(top_k * LENGTH * factor / EXPERTS))
  _, params, x, y, stats = _routed(top_k, factor, causal)
  expected, kept, probs = _reference(params, x, top_k, capacity, causal)
  assert 0 < kept.sum() < kept.size  # The setting does drop some choices.
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(float(stats["dropped_count"]), (~kept).sum())
  order = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
  np.testing.assert_array_equal(stats["choice_count"],
                                np.bincount(order.ravel(), minlength=EXPERTS))
  np.testing.assert_allclose(stats["prob_sum"], probs.sum((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(float(stats["entropy_sum"]),
                             -np.sum(probs * np.log(probs)), rtol=1e-4)
  # Switch balance loss: EXPERTS * sum_e share of first choices * mean probability.
  _, metrics = losses.router_losses({"ffn": stats})
  share = np.bincount(order[..., 0].ravel(), minlength=EXPERTS) / order[..., 0].size
  np.testing.assert_allclose(float(metrics["router_balance_loss"]),
                             EXPERTS * np.sum(share * probs.mean((0, 1))), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["router/ffn/dropped_fraction"]), 1 - kept.mean(),
                             rtol=1e-5)


@pytest.mark.parametrize("top_k,group_size", [(1, 0), (2, 0), (2, 1)])
def test_batch_priority_routing_equals_a_per_token_reference(top_k, group_size):
  """BPR: capacity per group of examples (0: the whole batch), tokens queue by their top gate.
  Some choices are dropped, so the order decides which."""
  group = group_size or BATCH
  factor = 0.5
  capacity = int(np.ceil(top_k * group * LENGTH * factor / EXPERTS))
  _, params, x, y, stats = _routed(top_k, factor, priority="batch", group_size=group_size)
  expected, kept, _ = _reference(params, x, top_k, capacity, False, group=group)
  assert 0 < kept.sum() < kept.size
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(float(stats["dropped_count"]), (~kept).sum())


def test_batch_priority_routing_with_padding_and_odd_groups():
  mask = np.ones((BATCH, LENGTH), bool)
  mask[1, 3:] = False
  _, params, x, y, stats = _routed(2, 0.5, token_mask=jnp.asarray(mask), priority="batch")
  capacity = int(np.ceil(2 * BATCH * LENGTH * 0.5 / EXPERTS))
  expected, kept, _ = _reference(params, x, 2, capacity, False, token_mask=mask, group=BATCH)
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5)
  assert float(stats["dropped_count"]) == (~kept[mask]).sum()
  # A batch that group_size does not divide (init's dummy batch) routes in gcd-sized groups.
  _, params, x, y, _ = _routed(2, 0.5, priority="batch", group_size=3)
  expected, _, _ = _reference(params, x, 2, int(np.ceil(2 * LENGTH * 0.5 / EXPERTS)), False,
                              group=1)
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5)
  with pytest.raises(ValueError, match="priority='gate' is unknown"):
    _routed(1, 1.0, priority="gate")


def _drop_rate_by_position(priority, examples=64, length=16):
  """Top-1 routing of `examples` images of `length` i.i.d. patches, with a router that sends
  about half the patches to expert 0, which has room for a quarter (capacity factor 1): the
  fraction of images whose patch at each position is dropped. A dropped top-1 patch gets an
  exactly zero update."""
  module = FeedForward(MLP, num_experts=EXPERTS, routing="topk", top_k=1, capacity_factor=1.0,
                       priority=priority)
  x = jax.random.normal(jax.random.key(3), (examples, length, WIDTH))
  params = nn.unbox(module.init(jax.random.key(1), x))["params"]
  router = 2.0 * jax.random.normal(jax.random.key(2), params["router"].shape)
  params["router"] = router.at[:, 0].set(0.0)
  params["ln"]["LayerNorm_0"]["bias"] = jnp.zeros((WIDTH,)).at[0].set(1.0)
  params["router"] = params["router"].at[0, 0].set(2.5)  # Expert 0 oversubscribed.
  y = np.asarray(module.apply({"params": params}, x))
  dropped = np.all(y == 0.0, axis=-1)
  return dropped.mean(axis=0), dropped.mean()


def test_bpr_drops_image_patches_evenly_over_the_raster_where_position_priority_drops_the_end():
  """The patches are i.i.d., so nothing but the routing rule can make one position likelier to
  be dropped. Position priority drops the end of every image; BPR's drop rate by position is
  flat within binomial noise (chi-square over positions, and first half vs second half)."""
  examples, length = 64, 16
  results = {}
  for priority in ("position", "batch"):
    by_position, overall = _drop_rate_by_position(priority, examples, length)
    assert 0.1 < overall < 0.5, (priority, overall)  # Capacity binds, not everything dropped.
    first, second = by_position[:length // 2].mean(), by_position[length // 2:].mean()
    # Binomial standard error of a half's mean drop rate, and of the difference of halves.
    se = np.sqrt(2 * overall * (1 - overall) / (examples * length / 2))
    counts = by_position * examples
    expected = overall * examples
    chi2 = np.sum((counts - expected) ** 2 / (expected * (1 - overall)))
    results[priority] = (first, second, se, chi2)
  first, second, se, chi2 = results["batch"]
  assert abs(second - first) < 4 * se, results
  assert chi2 < 45.0, results  # 15 degrees of freedom: P(chi2 > 45) < 1e-4 when flat.
  first, second, se, chi2 = results["position"]
  assert second - first > 10 * se and chi2 > 200.0, results


def test_router_noise_is_drawn_from_the_router_rng_only():
  """Noise on the router logits when the call passes a 'router' rng (the train step does), the
  same noise for the same rng, and none without one (evaluation, decoding)."""
  noisy = FeedForward(MLP, num_experts=EXPERTS, routing="topk", top_k=1, capacity_factor=1.0,
                      noise_std=1.0)
  _, params, x, quiet, _ = _routed(1, 1.0, priority="batch")
  apply = lambda **kw: np.asarray(noisy.apply({"params": params}, x, **kw))
  np.testing.assert_array_equal(apply(), quiet)
  first = apply(rngs={"router": jax.random.key(5)})
  np.testing.assert_array_equal(apply(rngs={"router": jax.random.key(5)}), first)
  assert not np.allclose(first, quiet)
  assert not np.allclose(apply(rngs={"router": jax.random.key(6)}), first)


def test_padding_takes_no_slot_and_is_left_out_of_the_statistics():
  mask = np.ones((BATCH, LENGTH), bool)
  mask[0, 2:] = False
  _, params, x, y, stats = _routed(2, 0.5, causal=True, token_mask=jnp.asarray(mask))
  expected, kept, _ = _reference(params, x, 2, 2, True, token_mask=mask)
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5)
  assert float(stats["tokens"]) == mask.sum()
  assert float(stats["dropped_count"]) == (~kept[mask]).sum()


def test_causal_routing_never_lets_a_later_token_change_an_earlier_output():
  """Token-major slots: perturbing token t leaves every output before t bit-identical. The
  choice-rank order (bidirectional layers) does not have this property: a later token's first
  choice can evict an earlier token's second choice (and under BPR a later token's larger
  gate can too)."""
  leaks = {False: 0, True: 0}
  for causal in (False, True):
    module, params, x, y, _ = _routed(2, 0.5, causal, priority="batch")
    for trial in range(8):
      t = 2 + trial % (LENGTH - 2)
      noise = 3.0 * jax.random.normal(jax.random.key(10 + trial), (BATCH, LENGTH - t, WIDTH))
      y2 = np.asarray(module.apply({"params": params}, x.at[:, t:].set(noise)))
      leaks[causal] += int(not np.array_equal(y2[:, :t], y[:, :t]))
  assert leaks[True] == 0
  assert leaks[False] > 0  # The test setting is one where the old order does leak.


@pytest.mark.parametrize("top_k,capacity_factor", [(1, 1.0), (2, 0.5), (2, 2.0)])
def test_decoding_token_by_token_equals_the_full_causal_pass(top_k, capacity_factor):
  """Cached decoding feeds one token a call; each call's tokens take buffer rows from 0 while
  their slots (and so what capacity drops) continue the sequence's counts. (1, 1.0) and (2, 2.0)
  give an expert more slots per sequence than one call's tokens need."""
  module, params, x, y, stats = _routed(top_k, capacity_factor, causal=True)
  step = FeedForward(MLP, num_experts=EXPERTS, routing="topk", top_k=top_k,
                     capacity_factor=capacity_factor, causal=True, decode=True,
                     capacity_length=LENGTH)
  # init runs the module once, counting its token: start from empty counts.
  cache = jax.tree.map(jnp.zeros_like, step.init(jax.random.key(1), x[:, :1])["cache"])
  outputs = []
  for t in range(LENGTH):
    out, state = step.apply({"params": params, "cache": cache}, x[:, t:t + 1], mutable=["cache"])
    cache = state["cache"]
    outputs.append(np.asarray(out))
  np.testing.assert_allclose(np.concatenate(outputs, axis=1), y, rtol=1e-5, atol=1e-6)
  if capacity_factor < 1:
    assert float(stats["dropped_count"]) > 0  # Capacity binds: later tokens are dropped.


def test_mixed_stack_scanned_in_groups_equals_unscanned_and_sows_per_layer():
  experts = RoutedExperts(num_experts=EXPERTS, top_k=2, capacity_factor=1.0, every=2)
  kwargs = dict(depth=4, num_heads=2, mlp_dim=MLP, experts=experts)
  x = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, WIDTH))
  scanned = Stack(**kwargs, scan=True)
  params = nn.unbox(scanned.init(jax.random.key(1), x))["params"]
  y, state = scanned.apply({"params": params}, x, mutable=["intermediates"])
  flat = unscanned_params(params)
  # Layers 1 and 3 are routed (a router), 0 and 2 dense (an MLP).
  assert [("router" in flat[f"layer_{i}"]["ffn"]) for i in range(4)] == [False, True, False, True]
  y2, state2 = Stack(**kwargs, scan=False).apply({"params": flat}, x, mutable=["intermediates"])
  np.testing.assert_allclose(y, y2, rtol=1e-5, atol=1e-6)
  config = routed_coca_config(scan_layers=True)
  config = dataclasses.replace(config, vision=schema.Vision(width=WIDTH, depth=4, heads=2,
                                                            mlp_dim=MLP))
  stats = router_statistics({"vision": state["intermediates"]}, config)
  stats2 = router_statistics({"vision": state2["intermediates"]}, config)
  assert sorted(stats) == sorted(stats2) == ["vision/layer_1", "vision/layer_3"]
  for name in stats:
    np.testing.assert_allclose(stats[name]["prob_sum"], stats2[name]["prob_sum"], rtol=1e-5)


def test_bad_router_settings_fail_clearly():
  x = jnp.zeros((1, 4, WIDTH))
  with pytest.raises(ValueError, match="top_k=5"):
    FeedForward(MLP, num_experts=EXPERTS, routing="topk", top_k=5).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="routing='learned' is unknown"):
    FeedForward(MLP, num_experts=EXPERTS, routing="learned").init(jax.random.key(0), x)


# -- A CoCa with routed text decoders ---------------------------------------------------------


def routed_coca_config(capacity_factor=0.5, scan_layers=False) -> CoCaConfig:
  """Tiny CoCa, every text layer routed (4 experts, top-2) with a capacity that drops choices;
  the image encoder routed too (bidirectional, batch priority per image). One layer per stack,
  unscanned: the tests below compile its gradients a few times, ~40% faster than two scanned
  multimodal layers (scanned stacks: test_mixed_stack_scanned_in_groups_equals_unscanned...)."""
  text = RoutedExperts(num_experts=4, top_k=2, capacity_factor=capacity_factor, every=1)
  # group_size=1: BPR within each image, so microbatches route as the whole batch does (the
  # accumulation test below relies on it).
  vision = RoutedExperts(num_experts=4, top_k=1, capacity_factor=1.0, every=1, group_size=1)
  return schema.CoCa(
      image_size=16, patch_size=8, embed_dim=16, n_gen_queries=4, pooler_heads=2,
      scan_layers=scan_layers,
      vision=schema.Vision(width=32, depth=1, heads=2, mlp_dim=64, experts=vision),
      text=schema.Text(vocab_size=32, max_len=8, width=32, heads=2, mlp_dim=64, n_uni=1,
                       n_multi=1, experts=text))


@pytest.fixture(scope="module")
def routed_coca():
  config = routed_coca_config()
  model = CoCa(config)
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  params = nn.unbox(jax.jit(model.init)(
      jax.random.key(0), images[:1], jnp.zeros((1, config.text.max_len), jnp.int32))["params"])
  params["vocab_head"]["kernel"] = params["vocab_head"]["kernel"] * 4.0  # Peaked next tokens.
  # Routers strong enough to make decisive (and capacity-limited) choices.
  for name in ("unimodal", "multimodal"):
    router = params[name]["layer_0"]["ffn"]["router"]
    params[name]["layer_0"]["ffn"]["router"] = 20.0 * router
  return model, params, images


def test_routed_decoder_is_causal(routed_coca):
  model, params, images = routed_coca
  rng = np.random.default_rng(0)
  text = np.concatenate([np.full((3, 1), 2), rng.integers(4, 32, (3, 7))], axis=1)
  apply = jax.jit(lambda t: model.apply({"params": params}, images, t, train=True,
                                        mutable=["intermediates"]))
  out, state = apply(jnp.asarray(text, jnp.int32))
  stats = router_statistics(state["intermediates"], model.config)
  assert any(float(s["dropped_count"]) > 0 for name, s in stats.items()
             if not name.startswith("vision"))  # Capacity binds in the text decoders.
  for t in range(2, 7):
    changed = text.copy()
    changed[:, t:] = rng.integers(4, 32, (3, 8 - t))
    out2, _ = apply(jnp.asarray(changed, jnp.int32))
    # Logits predicting tokens 1..t depend only on inputs 0..t-1.
    np.testing.assert_array_equal(out2["caption_logits"][:, :t], out["caption_logits"][:, :t])


def test_routed_cached_greedy_equals_full_recomputation(routed_coca):
  model, params, images = routed_coca
  cached = gen.generate(model, params, images, gen.Decoding(), return_logits=True)
  recomputed = gen.recompute_greedy(model, params, images, return_logits=True)
  np.testing.assert_array_equal(cached["tokens"], recomputed["tokens"])
  np.testing.assert_array_equal(cached["lengths"], recomputed["lengths"])
  assert int(np.max(cached["lengths"])) >= 4  # Long enough for capacity to matter.
  for row, length in enumerate(np.asarray(cached["lengths"])):
    np.testing.assert_allclose(cached["logits"][row, :length], recomputed["logits"][row, :length],
                               rtol=1e-4, atol=1e-4)


# -- Router losses in the train step ----------------------------------------------------------


def test_router_losses_reach_the_train_loss_and_the_router_gradient(routed_coca):
  """Fails if the train step drops the 'intermediates' again: the weighted balance loss must be
  in the total and in every router kernel's gradient."""
  from conftest import loss_and_grads_without_and_with_balance_loss
  model, params, _ = routed_coca
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
           "text": jnp.asarray(np.concatenate([np.full((4, 1), 2), rng.integers(4, 32, (4, 7))],
                                              axis=1), jnp.int32)}
  ((loss0, m0), g0), ((loss1, m1), g1) = loss_and_grads_without_and_with_balance_loss(
      model, params, batch)
  # The total includes the weighted balance loss (averaged over routed layers).
  np.testing.assert_allclose(float(loss1 - loss0), float(m1["router_balance_loss"]), rtol=1e-4)
  assert float(m1["router_balance_loss"]) >= 1.0  # Its minimum, reached when balanced.
  assert m1["router/vision/layer_0/load_min"] <= 1.0 <= m1["router/vision/layer_0/load_max"]
  assert 0.0 < m1["router/unimodal/layer_0/dropped_fraction"] < 1.0
  assert "router/multimodal/layer_0/entropy" in m1
  # ... and its gradient reaches each router kernel.
  routers = [(("vision",)), ("unimodal",), ("multimodal",)]
  for (name,) in routers:
    delta = g1[name]["layer_0"]["ffn"]["router"] - g0[name]["layer_0"]["ffn"]["router"]
    assert float(jnp.max(jnp.abs(delta))) > 0, name


def test_experts_config_is_validated_with_field_names():
  from coca_jax.core import config as config_lib
  from conftest import smoke_config
  c = smoke_config()
  c.model.vision.experts = dict(num_experts=4, top_k=5, capacity_factor=0.0, every=1, k=2,
                                priority="gate", group_size=-1, noise_std=-0.5)
  c.model.text.experts = dict(num_experts=4, top_k=1, capacity_factor=1.0, every=2)
  c.loss.router_balance_weight = -1.0
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(c)
  message = str(error.value)
  for expected in ("config.model.vision.experts.k is not a config key; did you mean "
                   "config.model.vision.experts.top_k?",
                   "config.model.vision.experts.top_k=5 exceeds "
                   "config.model.vision.experts.num_experts=4",
                   "config.model.vision.experts.capacity_factor=0.0 must be > 0",
                   "config.model.vision.experts.priority='gate' is unknown; use one of batch, "
                   "position",
                   "config.model.vision.experts.group_size=-1 must be an integer >= 0",
                   "config.model.vision.experts.noise_std=-0.5 must be a number >= 0",
                   # The smoke decoders are 1 + 1 layers deep and scanned.
                   "config.model.text.n_uni=1 is not a multiple of config.model.text.experts.every=2",
                   "config.loss.router_balance_weight=-1.0 must be a number >= 0"):
    assert expected in message, message
  config_lib.validate(config_lib.load_config("experiments/demo.py:limoe"))
  config_lib.validate(config_lib.load_config("experiments/demo.py:limoe,smoke"))


def test_accumulated_step_keeps_routing_and_router_metrics_of_the_whole_batch(routed_coca):
  """Microbatches: capacity is per sequence (text) or per image (BPR with group_size=1), so
  routing, the caption and contrastive terms and
  the router metrics (from summed statistics) equal the whole batch's; only the balance and
  global-entropy terms are per-microbatch averages (documented in step.py)."""
  import ml_collections
  from conftest import smoke_config
  model, params, _ = routed_coca
  rng = np.random.default_rng(1)
  text = np.concatenate([np.full((4, 1), 2), rng.integers(4, 32, (4, 7))], axis=1)
  text[1, 5:] = 0  # Some padding.
  batch = {"image": jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
           "text": jnp.asarray(text, jnp.int32)}
  loss_config = ml_collections.ConfigDict(smoke_config().loss.to_dict())

  @jax.jit
  def both(p):
    whole = jax.value_and_grad(step.loss_fn, has_aux=True)(p, model, batch, loss_config)
    return whole, step.accumulated_loss_and_grads(p, model, batch, loss_config, 2)

  ((_, m1), g1), ((loss2, m2), g2) = both(params)
  for key in ("contrastive_loss", "caption_loss"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5)
  for key in m1:
    if key.startswith("router/") and not key.endswith(("balance_loss", "global_entropy")):
      np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert float(m2["router_loss"]) > 0
  np.testing.assert_allclose(
      float(loss2), float(m2["contrastive_loss"] + 2 * m2["caption_loss"] + m2["router_loss"]),
      rtol=1e-6)
  # Batch statistics of 2 sequences vs 4: the per-microbatch balance term is close, not equal
  # (8% apart here), and its weight (0.01) keeps the gradients within 1e-3 of the whole batch's.
  np.testing.assert_allclose(float(m2["router_loss"]), float(m1["router_loss"]), rtol=0.2)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1))
  worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g2),
                                                             jax.tree.leaves(g1)))
  assert worst < 1e-3 * scale
