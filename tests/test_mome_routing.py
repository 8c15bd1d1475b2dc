"""Specs for learned (LIMoE-style top-k) routing inside a MoME's modality experts
(config.model.mome.experts): causal text stays causal with capacity-limited routers, cached
decoding equals recomputation, the router losses reach the loss and every router's gradient, and
FLOPs / active parameters count only the experts a token runs through. Freezing a routed expert:
test_mome.py (the freeze test, 'routed')."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mome import CONFIG

from coca_jax import models
from coca_jax.core import config as config_lib
from coca_jax.core.schema import MoMEExperts
from coca_jax.inference import generate as gen
from coca_jax.models.experts import RoutedExperts
from coca_jax.models.mome import MoME
from coca_jax.perf import flops
from coca_jax.training import step
from conftest import REPO, loss_and_grads_without_and_with_balance_loss

# Text and fusion experts: top-2 with room for half the choices, so capacity binds and slot
# order matters (choice-rank order would let a later token evict an earlier second choice).
TEXT = RoutedExperts(num_experts=4, top_k=2, capacity_factor=0.5, every=1)
ROUTED = dataclasses.replace(CONFIG, mome=dataclasses.replace(CONFIG.mome, experts=MoMEExperts(
    image=RoutedExperts(num_experts=4, top_k=1, capacity_factor=1.0, every=2), text=TEXT,
    fusion=TEXT)))


@pytest.fixture(scope="module")
def routed_mome():
  model = MoME(ROUTED, itm=True)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((3, 16, 16, 3)), jnp.float32)
  params = nn.unbox(jax.jit(model.init)(
      jax.random.key(0), images[:1], jnp.zeros((1, ROUTED.text.max_len), jnp.int32))["params"])
  params["vocab_head"]["kernel"] = params["vocab_head"]["kernel"] * 4.0  # Peaked next tokens.
  for layer in range(ROUTED.mome.depth):  # Decisive routers: capacity-limited choices.
    for name, _ in ROUTED.mome.routed_experts(layer):
      ffn = params[f"layers_{layer}"][f"ffn_{name}"]
      ffn["router"] = 20.0 * ffn["router"]
  return model, params, images


def _text(rng, batch=3):
  words = rng.integers(4, ROUTED.text.vocab_size, (batch, ROUTED.text.max_len - 1))
  return np.concatenate([np.full((batch, 1), 1), words], 1)


def test_routed_experts_sit_where_configured_and_sow_per_modality(routed_mome):
  model, params, images = routed_mome
  # Layer 0: ffn_image dense (every=2), ffn_text routed; layers 1-2: ffn_fusion routed too.
  assert "mlp" in params["layers_0"]["ffn_image"] and "router" in params["layers_1"]["ffn_image"]
  for layer in range(3):
    assert params[f"layers_{layer}"]["ffn_text"]["wi"].shape == (4, 16, 32)
  text = jnp.asarray(_text(np.random.default_rng(0)), jnp.int32)
  _, state = model.apply({"params": params}, images, text, mutable=["intermediates"])
  stats = models.router_statistics(state["intermediates"], ROUTED)
  assert set(stats) == {"layers_0/ffn_text", "layers_1/ffn_image", "layers_1/ffn_text",
                        "layers_1/ffn_fusion/image", "layers_1/ffn_fusion/text",
                        "layers_2/ffn_fusion/image", "layers_2/ffn_fusion/text",
                        "layers_2/ffn_text"}
  # ffn_text routes the text-only pass (T inputs + CLS) and, in the bottom layer, the captioning
  # pass (T inputs): its statistics cover both.
  inputs = ROUTED.text.max_len - 1
  assert float(stats["layers_0/ffn_text"]["tokens"]) == 3 * (2 * inputs + 1)
  assert float(stats["layers_1/ffn_fusion/image"]["tokens"]) == 3 * ROUTED.image_tokens
  assert float(stats["layers_1/ffn_fusion/text"]["tokens"]) == 3 * inputs


def test_routed_mome_text_never_depends_on_later_tokens(routed_mome):
  model, params, images = routed_mome
  rng = np.random.default_rng(1)
  text = _text(rng)
  apply = jax.jit(lambda t: model.apply({"params": params}, images, t,
                                        mutable=["intermediates"]))
  out, state = apply(jnp.asarray(text, jnp.int32))
  stats = models.router_statistics(state["intermediates"], ROUTED)
  assert float(stats["layers_2/ffn_fusion/text"]["dropped_count"]) > 0  # Capacity binds.
  for t in range(2, ROUTED.text.max_len - 1):
    changed = text.copy()
    changed[:, t:] = rng.integers(4, ROUTED.text.vocab_size, (3, ROUTED.text.max_len - t))
    out2, _ = apply(jnp.asarray(changed, jnp.int32))
    # Logits predicting tokens 1..t depend only on inputs 0..t-1.
    np.testing.assert_array_equal(out2["caption_logits"][:, :t], out["caption_logits"][:, :t])
    assert not np.allclose(out2["caption_logits"][:, t:], out["caption_logits"][:, t:])


def test_routed_mome_cached_decoding_equals_full_recomputation(routed_mome):
  model, params, images = routed_mome
  min_len = ROUTED.text.max_len - 2  # Long captions: the routers' capacity binds while decoding.
  cached = gen.generate(model, params, images, gen.Decoding(min_len=min_len), return_logits=True)
  recomputed = gen.recompute_greedy(model, params, images, min_len=min_len, return_logits=True)
  np.testing.assert_array_equal(cached["tokens"], recomputed["tokens"])
  np.testing.assert_array_equal(cached["lengths"], recomputed["lengths"])
  assert len(set(map(tuple, np.asarray(cached["tokens"])))) > 1  # Not a degenerate model.
  for row, length in enumerate(np.asarray(cached["lengths"])):
    np.testing.assert_allclose(cached["logits"][row, :length], recomputed["logits"][row, :length],
                               rtol=1e-4, atol=1e-4)


def test_router_losses_reach_the_mome_loss_and_every_router_gradient(routed_mome):
  """Fails if the MoME's router statistics are not collected (the loss would not change with
  the balance weight) or do not reach a router (its gradient would not change)."""
  model, params, images = routed_mome
  batch = {"image": images, "text": jnp.asarray(_text(np.random.default_rng(2)), jnp.int32)}
  ((loss0, _), g0), ((loss1, m1), g1) = loss_and_grads_without_and_with_balance_loss(
      model, params, batch)
  np.testing.assert_allclose(float(loss1 - loss0), float(m1["router_balance_loss"]), rtol=1e-4)
  assert float(m1["router_balance_loss"]) >= 1.0
  for name in ("layers_0/ffn_text", "layers_1/ffn_image", "layers_2/ffn_fusion/image",
               "layers_2/ffn_fusion/text"):
    for metric in ("load_min", "load_max", "dropped_fraction", "entropy", "balance_loss"):
      assert f"router/{name}/{metric}" in m1, (name, metric)
  for layer in range(ROUTED.mome.depth):
    for expert, _ in ROUTED.mome.routed_experts(layer):
      delta = (g1[f"layers_{layer}"][f"ffn_{expert}"]["router"]
               - g0[f"layers_{layer}"][f"ffn_{expert}"]["router"])
      assert float(jnp.max(jnp.abs(delta))) > 0, (layer, expert)


def test_router_statistics_count_each_pass_once(routed_mome):
  """The step adds the ITM pass's router statistics to the main passes'. A router the ITM pass
  does not run through (layer 1's ffn_image: ITM's image tokens take ffn_fusion there) keeps
  the image-only pass's token count; one both run through (layer 0's ffn_text) gets the sum.
  The old merge doubled the first kind, which ratios hid and counts do not."""
  model, params, images = routed_mome
  batch = {"image": images, "text": jnp.asarray(_text(np.random.default_rng(3)), jnp.int32)}
  outputs, stats = step.apply_with_router_statistics(model, params, batch["image"], batch["text"])
  embeds = {k: outputs[k] for k in ("image_embed", "text_embed", "logit_scale")}
  plan = step._itm_plan(batch, embeds, jax.random.key(0))  # pylint: disable=protected-access
  _, _, itm_stats = step._itm_sums(params, model, outputs, batch, plan["rows"], batch)  # pylint: disable=protected-access
  merged = step._add_statistics(stats, itm_stats)  # pylint: disable=protected-access
  assert "layers_1/ffn_image" not in itm_stats
  assert float(merged["layers_1/ffn_image"]["tokens"]) == 3 * ROUTED.image_tokens
  assert float(merged["layers_1/ffn_image"]["choice_count"].sum()) == 3 * ROUTED.image_tokens
  inputs = ROUTED.text.max_len - 1
  # ffn_text of layer 0: text-only (T + CLS) and captioning (T) passes, plus ITM's 3 pairs of
  # (T + 1) text tokens each per example.
  itm_text = float(itm_stats["layers_0/ffn_text"]["tokens"])
  assert itm_text == 3 * 3 * (inputs + 1)
  assert float(merged["layers_0/ffn_text"]["tokens"]) == 3 * (2 * inputs + 1) + itm_text
  np.testing.assert_allclose(merged["layers_0/ffn_text"]["prob_sum"],
                             stats["layers_0/ffn_text"]["prob_sum"]
                             + itm_stats["layers_0/ffn_text"]["prob_sum"], rtol=1e-6)


def _mome_config(args):
  return config_lib.load_config(os.path.join(REPO, "experiments", "demo.py") + ":" + args)


def test_flops_and_active_params_count_the_experts_a_token_runs_through():
  dense, routed = _mome_config("mome,smoke"), _mome_config("mome,limoe,smoke")
  for c in (dense, routed):
    c.loss.itm_weight = 0.0
  m = models.model_config(routed.model)
  width, experts = m.mome.width, 4
  patches, inputs = m.image_tokens, m.text.max_len - 1
  # Top-1 of 4 experts in layer 1 (the top layer: ffn_fusion on the fused pass): a token runs
  # one expert, as in the dense model, plus the router.
  router = lambda tokens: 2 * tokens * width * experts
  expected = (router(patches)  # image-only pass, ffn_image of layer 1
              + router(patches)  # fused image tokens, ffn_fusion of layer 1
              + router(inputs + 1)  # text-only pass, ffn_text of layer 1
              + router(inputs))  # captioning text, ffn_fusion of layer 1
  assert (flops.model_flops_per_example(routed, train=False)
          - flops.model_flops_per_example(dense, train=False)) == expected
  # Top-2: one more expert MLP per routed token.
  routed.model.mome.experts.text.top_k = 2
  top2 = flops.model_flops_per_example(routed, train=False)
  routed.model.mome.experts.text.top_k = 1
  mlp = 2 * 2 * width * m.mome.mlp_dim
  assert top2 - flops.model_flops_per_example(routed, train=False) == (inputs + 1) * mlp
  # Parameters: 4x the expert weights in layer 1, but one token runs through one expert of one
  # modality expert (plus its router).
  dense_counts, routed_counts = flops.param_counts(dense), flops.param_counts(routed)
  assert routed_counts["total"] > dense_counts["total"] + 3 * 3 * 2 * width * m.mome.mlp_dim
  assert routed_counts["active"] - dense_counts["active"] == width * experts


def test_mome_experts_config_is_validated_with_field_names():
  c = _mome_config("mome,limoe,smoke")
  c.model.mome.experts.image.update(top_k=5, every=3)
  c.model.mome.experts.fusion.num_experts = 3
  c.model.mome.experts.audio = dict(num_experts=2)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(c, num_devices=1)
  message = str(error.value)
  for expected in ("config.model.mome.experts.audio is not a config key; did you mean "
                   "config.model.mome.experts.fusion?",
                   "config.model.mome.experts.image.top_k=5 exceeds "
                   "config.model.mome.experts.image.num_experts=4",
                   "config.model.mome.experts.image.every=3 routes none of the layers 0..1"):
    assert expected in message, message
  c = _mome_config("mome,limoe,smoke")
  c.mesh.update(data=1, expert=2)
  c.model.mome.experts.fusion.num_experts = 3
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.model.mome.experts.fusion.num_experts=3 is not divisible by "
                           r"config.mesh.expert=2"):
    config_lib.validate(c, num_devices=2)
