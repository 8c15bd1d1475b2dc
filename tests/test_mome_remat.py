"""Specs for activation rematerialisation of the MoME stack (config.model.remat): the loss and
every gradient are those without remat (image-only, text-only, captioning and ITM passes, a
routed expert included), the step compiled as train steps are needs less scratch memory, cached
decoding and ITM still work, and the config accepts exactly the towers' policy names."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mome import CONFIG

from coca_jax.core import config as config_lib
from coca_jax.core.schema import MoMEExperts
from coca_jax.inference import generate as gen
from coca_jax.models.experts import RoutedExperts
from coca_jax.models.mome import MoME
from coca_jax.training import step as step_lib
from conftest import REPO, smoke_config

# Two layers (the bottom one, a fusion one), ITM on, and a routed VL-FFN (top-2, capacity
# binding) that the captioning and ITM passes route through: its sown router statistics and the
# router loss terms must come out of the rematerialised layers too.
ROUTED = dataclasses.replace(CONFIG, mome=dataclasses.replace(
    CONFIG.mome, depth=2, fusion_layers=1, experts=MoMEExperts(
        fusion=RoutedExperts(num_experts=4, top_k=2, capacity_factor=0.5, every=1))))


def _mome_smoke_config():
  return config_lib.load_config(os.path.join(REPO, "experiments", "demo.py") + ":mome,smoke")


BATCH = 16  # Enough examples that activations dominate the step's scratch memory.


@pytest.fixture(scope="module")
def routed():
  model = MoME(ROUTED, itm=True)
  rng = np.random.default_rng(0)
  text = np.zeros((BATCH, ROUTED.text.max_len), np.int32)
  for row in range(BATCH):  # BOS, 1-5 words, EOS, padding.
    words = rng.integers(4, ROUTED.text.vocab_size, 1 + row % 5)
    text[row, :len(words) + 2] = [ROUTED.text.bos_id, *words, ROUTED.text.eos_id]
  batch = {"image": jax.random.normal(jax.random.key(1), (BATCH, 16, 16, 3)),
           "text": jnp.asarray(text)}
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["image"][:1],
                                        batch["text"][:1])["params"])
  loss_config = smoke_config().loss
  loss_config.update(itm_weight=1.0, itm_examples=0, router_balance_weight=0.1)
  return params, batch, loss_config


def _compiled_loss_and_grads(remat, params, batch, loss_config):
  """(((loss, metrics), grads), XLA temp bytes) of `step.loss_fn`, compiled as a train step is
  on this host (`step.compiler_options`)."""
  model = MoME(dataclasses.replace(ROUTED, remat=remat), itm=True)
  grad_fn = jax.value_and_grad(step_lib.loss_fn, has_aux=True)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  compiled = jax.jit(lambda p: grad_fn(p, model, batch, loss_config, jax.random.key(3)),
                     compiler_options=step_lib.compiler_options(mesh)).lower(params).compile()
  return compiled(params), compiled.memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def without_remat(routed):
  return _compiled_loss_and_grads("none", *routed)


@pytest.mark.parametrize("remat,most_scratch", [("dots", 0.85), ("full", 0.75)])
def test_remat_keeps_loss_and_gradients_and_lowers_scratch_memory(routed, without_remat, remat,
                                                                  most_scratch):
  """Every pass (image-only, text-only, captioning, ITM) through rematerialised layers: the
  same loss, metrics and gradients as remat='none', for less scratch memory in the compiled
  step (a 2-layer stack: at most `most_scratch` of it; a 6-layer demo stack: 0.33-0.46)."""
  ((loss, metrics), grads), temp = without_remat
  ((loss_r, metrics_r), grads_r), temp_r = _compiled_loss_and_grads(remat, *routed)
  # Every loss term ran: contrastive, captioning, ITM and the routed expert's router terms.
  assert {"itm_loss", "caption_loss", "contrastive_loss"} <= set(metrics)
  assert any("router" in name for name in metrics), sorted(metrics)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for name in metrics:
    np.testing.assert_allclose(metrics_r[name], metrics[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  assert jax.tree.structure(grads_r) == jax.tree.structure(grads)  # Same parameter names.
  for (path, g), g_r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # Not vacuous: the VL-FFN's router and the ITM head get gradients.
  assert np.abs(grads["layers_1"]["ffn_fusion"]["router"]).max() > 0
  assert np.abs(grads["itm_head"]["kernel"]).max() > 0
  assert temp_r < most_scratch * temp, (remat, temp_r, temp)


def test_cached_decoding_and_itm_work_with_remat():
  """Inference with a remat config: cached greedy decoding equals recomputation and the ITM
  logits equal remat='none' (the decode model never rematerialises)."""
  model = MoME(dataclasses.replace(CONFIG, remat="dots"), itm=True)
  plain = MoME(CONFIG, itm=True)
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
  text = jnp.asarray([[1, 5, 6, 7, 9, 2, 0], [1, 8, 2, 0, 0, 0, 0]], jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), image, text))["params"]
  cached = gen.generate(model, params, image, gen.Decoding(), return_logits=True)
  recomputed = gen.recompute_greedy(model, params, image, return_logits=True)
  np.testing.assert_array_equal(cached["tokens"], recomputed["tokens"])
  itm = jax.jit(lambda m, p: m.apply({"params": p}, image, text, method="itm_logits"),
                static_argnums=0)
  np.testing.assert_allclose(itm(model, params), itm(plain, params), rtol=1e-6, atol=1e-6)


def test_config_accepts_the_towers_remat_policies_for_mome():
  for remat in config_lib.REMAT_NAMES:
    config = _mome_smoke_config()
    config.model.remat = remat
    config_lib.validate(config)
    assert step_lib.build_model(config).config.remat == remat
  assert _mome_smoke_config().model.get("remat", "none") == "none"
  config = _mome_smoke_config()
  config.model.remat = "dot"
  with pytest.raises(config_lib.ConfigError,
                     match="config.model.remat='dot' is unknown; use one of none, full, dots"):
    config_lib.validate(config)
