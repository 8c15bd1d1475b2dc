"""Specs for the mixture-of-modality-experts (MoME) backbone: which expert each pass uses, the
prefix-causal fused pass and its reuse of the image pass, cached decoding, ITM hard negatives,
freezing one expert, the configs, and the train CLI -> coca_jax.load round trip."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.core import config as config_lib
from coca_jax.core import schema
from coca_jax.inference import generate as gen
from coca_jax.models.mome import FUSION, IMAGE, TEXT, MoME
from coca_jax.perf import flops
from coca_jax.training import losses
from coca_jax.training import optim
from coca_jax.training import step as step_lib
from conftest import REPO, random_batch

CONFIG = schema.MoME(
    image_size=16, patch_size=8, embed_dim=8, pooler_heads=2,
    pooling="cls",  # demo.py:mome (the CLI and freeze tests) covers 'attention'.
    text=schema.MoMEText(vocab_size=24, max_len=7),
    mome=schema.MoMEStack(width=16, depth=3, heads=2, mlp_dim=32, fusion_layers=2))


@pytest.fixture(scope="module")
def tiny():
  model = MoME(CONFIG, itm=True)
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.standard_normal((3, 16, 16, 3)), jnp.float32)
  text = jnp.asarray([[1, 5, 6, 7, 9, 2, 0], [1, 8, 2, 0, 0, 0, 0], [1, 4, 4, 11, 12, 13, 2]],
                     jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), image, text))["params"]
  return model, params, image, text


_JITTED = {}


def _forward(model, params, image, text):
  """model(image, text) outputs, compiled once per model (the tests call it many times)."""
  if id(model) not in _JITTED:
    _JITTED[id(model)] = (model, jax.jit(model.apply))
  return _JITTED[id(model)][1]({"params": params}, image, text)


def _perturb(params, layer: int, expert: str):
  """params with layer `layer`'s ffn_<expert> output weights perturbed (a different function;
  random, since the next LayerNorm would cancel a uniform shift)."""
  params = jax.tree.map(lambda x: x, params)  # Shallow copy of the dicts.
  mlp = params[f"layers_{layer}"][f"ffn_{expert}"]["mlp"]
  kernel = mlp["wo"]["kernel"]
  noise = jax.random.normal(jax.random.key(layer), kernel.shape, kernel.dtype)
  mlp["wo"] = {**mlp["wo"], "kernel": kernel + 0.5 * noise}
  return params


def test_each_layer_holds_named_modality_experts(tiny):
  _, params, _, _ = tiny
  for i in range(CONFIG.mome.depth):
    experts = {k for k in params[f"layers_{i}"] if k.startswith("ffn_")}
    expected = {"ffn_image", "ffn_text"} | ({"ffn_fusion"} if i >= 1 else set())
    assert experts == expected, (i, experts)
    assert "ln_attention" in params[f"layers_{i}"] and "attention" in params[f"layers_{i}"]
    for name in expected:  # Each expert has its own LayerNorm.
      assert "ln" in params[f"layers_{i}"][name]


def test_image_expert_never_touches_text_only_outputs_and_vice_versa(tiny):
  model, params, image, text = tiny
  base = _forward(model, params, image, text)
  moved_image = _forward(model, _perturb(_perturb(params, 0, IMAGE), 2, IMAGE), image, text)
  np.testing.assert_array_equal(moved_image["text_embed"], base["text_embed"])
  assert not np.allclose(moved_image["image_embed"], base["image_embed"])
  moved_text = _forward(model, _perturb(_perturb(params, 0, TEXT), 2, TEXT), image, text)
  np.testing.assert_array_equal(moved_text["image_embed"], base["image_embed"])
  assert not np.allclose(moved_text["text_embed"], base["text_embed"])


def test_fused_pass_uses_the_fusion_expert_exactly_in_the_top_layers(tiny):
  model, params, image, text = tiny
  base = _forward(model, params, image, text)["caption_logits"]

  def moves(layer, expert):
    logits = _forward(model, _perturb(params, layer, expert), image, text)["caption_logits"]
    return not np.array_equal(np.asarray(logits), np.asarray(base))

  # Bottom layer 0: text through ffn_text, image through ffn_image; no ffn_fusion there.
  assert moves(0, TEXT) and moves(0, IMAGE)
  # Top layers 1 and 2: every token of the fused pass goes through ffn_fusion, so the image and
  # text experts of those layers do not touch the captions.
  for layer in (1, 2):
    assert moves(layer, FUSION)
    assert not moves(layer, TEXT)
    assert not moves(layer, IMAGE)


def test_prefix_causal_later_text_never_changes_earlier_outputs(tiny):
  model, params, image, text = tiny
  base = _forward(model, params, image, text)["caption_logits"]
  changed = text.at[:, 3].set(17)  # Input position 3 (predicts label 3).
  out = _forward(model, params, image, changed)["caption_logits"]
  np.testing.assert_array_equal(out[:, :3], base[:, :3])
  assert not np.allclose(out[:, 3:], base[:, 3:])
  # Image tokens see only image tokens: the prefix the text reads is a function of the image.
  _, context = jax.jit(lambda p, i: model.apply({"params": p}, i, method="encode_image"))(
      params, image)
  assert context.shape == (3, CONFIG.mome.depth, 2, CONFIG.image_tokens, CONFIG.mome.heads,
                           CONFIG.mome.width // CONFIG.mome.heads)


def _naive_fused_logits(module, image, text):
  """Reference fused pass with NO reuse: [image; text] through every layer as one sequence
  under a prefix-causal mask (image rows see image only; text rows see every image token and
  earlier non-pad text), ffn_image/ffn_text at the bottom, ffn_fusion at the top."""
  c = module.config
  image_tokens = module._image_tokens(image)
  text_tokens = module._text_tokens(text, with_cls=False)
  num_image, num_text = image_tokens.shape[1], text_tokens.shape[1]
  x = jnp.concatenate([image_tokens, text_tokens], axis=1)
  length = num_image + num_text
  row = jnp.arange(length)[:, None]
  col = jnp.arange(length)[None, :]
  image_row_ok = (row < num_image) & (col < num_image)
  text_row_ok = (row >= num_image) & ((col < num_image) | (col <= row))
  key_valid = jnp.concatenate([jnp.ones((text.shape[0], num_image), bool),
                               text[:, :-1] != 0], axis=1)
  mask = (image_row_ok | text_row_ok)[None, None] & key_valid[:, None, None, :]
  for i, layer in enumerate(module.layers):
    if i < c.mome.bottom_layers:
      segments = ((IMAGE, num_image), (TEXT, num_text))
    else:
      segments = ((FUSION, length),)
    x, _ = layer(x, mask, None, segments)
  return module._vocab_logits(x[:, num_image:])


def test_fused_pass_reusing_the_image_pass_equals_the_naive_full_pass(tiny):
  model, params, image, text = tiny
  reused = _forward(model, params, image, text)["caption_logits"]
  naive = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t, method=_naive_fused_logits))(
      params, image, text)
  np.testing.assert_allclose(reused, naive, atol=1e-5, rtol=1e-5)


def test_cached_greedy_and_beam_decoding_equal_full_recomputation(tiny):
  model, params, image, _ = tiny
  cached = gen.generate(model, params, image, gen.Decoding(), return_logits=True)
  recomputed = gen.recompute_greedy(model, params, image, return_logits=True)
  np.testing.assert_array_equal(cached["tokens"], recomputed["tokens"])
  for row, length in enumerate(np.asarray(cached["lengths"])):
    np.testing.assert_allclose(cached["logits"][row, :length], recomputed["logits"][row, :length],
                               atol=1e-5, rtol=1e-5)
  assert len(set(map(tuple, np.asarray(cached["tokens"])))) > 1  # Not a degenerate model.
  # One beam is exactly greedy search (beam search reorders the cache, prefix included).
  beam = gen.generate(model, params, image, gen.Decoding(method="beam", num_beams=1,
                                                         length_penalty=0.0))
  np.testing.assert_array_equal(beam["tokens"], cached["tokens"])


# -- ITM hard negatives --------------------------------------------------------------------------


def _unit(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_hard_negatives_never_pick_the_positive_or_a_duplicate_of_it():
  rng = np.random.default_rng(0)
  image = _unit(rng.standard_normal((6, 4)))
  text = image + 0.01 * rng.standard_normal((6, 4))
  # Example 1's caption is example 0's, and image 3 is image 2; these would be ties with the
  # positive, the hardest "negatives" of all, but they match.
  text = _unit(text.at[1].set(text[0]))
  image = image.at[3].set(image[2])
  for seed in range(50):
    neg_text, neg_image, (text_ok, image_ok) = losses.hard_negatives(
        image, text, 100.0, jax.random.key(seed))
    neg_text, neg_image = np.asarray(neg_text), np.asarray(neg_image)
    assert np.all(neg_text != np.arange(6)) and np.all(neg_image != np.arange(6))
    assert neg_text[0] != 1 and neg_text[1] != 0
    assert neg_image[2] != 3 and neg_image[3] != 2
    assert np.all(text_ok) and np.all(image_ok)
  # A batch of one caption repeated has no valid negative text: flagged, not silently used.
  _, _, (text_ok, _) = losses.hard_negatives(image, jnp.tile(text[:1], (6, 1)), 10.0,
                                             jax.random.key(0))
  assert not np.any(text_ok)


def test_hard_negatives_follow_the_similarities():
  image = _unit([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  text = _unit([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
  scale = 5.0
  draws = jax.vmap(lambda k: losses.hard_negatives(image, text, scale, k)[0])(
      jax.random.split(jax.random.key(0), 4000))
  counts = np.bincount(np.asarray(draws[:, 0]), minlength=3) / 4000.0
  # Image 0's candidates are texts 1 (cosine 0.8) and 2 (cosine 0): softmax over 5 * cosine.
  expected = np.exp(scale * np.array([0.8, 0.0]))
  expected /= expected.sum()
  np.testing.assert_allclose(counts[1:], expected, atol=0.03)
  assert counts[0] == 0.0


# -- Training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("itm_examples", [0, 2], ids=["all_rows", "itm_examples"])
def test_accumulated_step_with_itm_equals_the_whole_batch_step(tiny, itm_examples):
  """train.microbatches with ITM: the hard negatives are drawn once from the whole batch's
  embeddings, so loss, every metric and the gradients equal the unaccumulated step's."""
  import ml_collections
  model, params, _, _ = tiny
  rng = np.random.default_rng(2)
  text = np.concatenate([np.full((4, 1), 1), rng.integers(4, 14, (4, 6))], axis=1)
  text[1, 4:] = 0  # Padding: microbatches with unequal token counts.
  batch = {"image": jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32),
           "text": jnp.asarray(text, jnp.int32)}
  loss_config = ml_collections.ConfigDict(mome_smoke_config().loss.to_dict())
  loss_config.update(itm_weight=1.0, itm_examples=itm_examples)
  key = jax.random.key(5)

  @jax.jit
  def both(p):
    whole = jax.value_and_grad(step_lib.loss_fn, has_aux=True)(p, model, batch, loss_config, key)
    return whole, step_lib.accumulated_loss_and_grads(p, model, batch, loss_config, 2, key)

  ((loss1, m1), g1), ((loss2, m2), g2) = both(params)
  assert set(m1) == set(m2) and {"itm_loss", "itm_accuracy", "caption_tokens"} <= set(m1)
  assert float(m1["itm_loss"]) > 0
  for name in m1:
    np.testing.assert_allclose(m2[name], m1[name], rtol=2e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(loss2, loss1, rtol=2e-5)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))




def mome_smoke_config(limoe: bool = False):
  args = "mome,limoe,smoke" if limoe else "mome,smoke"
  return config_lib.load_config(os.path.join(REPO, "experiments", "demo.py") + ":" + args)


@pytest.mark.parametrize("routed", [False, True], ids=["dense", "routed"])
def test_freezing_one_expert_leaves_it_bit_identical_while_the_rest_trains(routed):
  """Routed (demo.py:mome,limoe): layer 1's ffn_image holds a router and 4 experts; freezing the
  expert by its path freezes all of it, while the routed text/fusion experts train."""
  config = mome_smoke_config(limoe=routed)
  config.optim.freeze_regex = [".*/ffn_image/.*"]
  config.optim.warmup_fraction = 0.0
  config.loss.itm_weight = 0.0  # ITM in a train step: the CLI test below.
  built = step_lib.setup(config)
  state = built.init_state()
  before = jax.tree.map(np.asarray, state.params)
  train_step = built.train_step()
  with jax.set_mesh(built.mesh):
    for seed in range(2):
      state, _ = train_step(state, random_batch(config, config.train.batch_size, seed))
  paths = jax.tree.leaves(optim.param_paths(before))
  changed = dict(zip(paths, jax.tree.leaves(jax.tree.map(
      lambda a, b: not np.array_equal(a, np.asarray(b)), before, state.params))))
  frozen = [p for p in paths if "/ffn_image/" in p]
  assert frozen and not any(changed[p] for p in frozen)
  moving = ["layers_0/ffn_text/mlp/wi/kernel", "layers_0/attention/query/kernel",
            "patch_embed/kernel"]
  if routed:
    assert "layers_1/ffn_image/router" in frozen and "layers_1/ffn_image/wi" in frozen
    moving += ["layers_1/ffn_fusion/wi", "layers_1/ffn_fusion/router", "layers_1/ffn_text/wi"]
  else:
    moving += ["layers_1/ffn_fusion/mlp/wi/kernel"]
  for path in moving:
    assert changed[path], path


def test_towers_reject_itm_and_mome_fields_are_checked():
  towers = config_lib.load_config(os.path.join(REPO, "experiments", "demo.py") + ":smoke")
  towers.loss.itm_weight = 1.0
  with pytest.raises(config_lib.ConfigError, match="itm_weight=1.0 needs a fused"):
    config_lib.validate(towers)
  mome = mome_smoke_config()
  mome.model.mome.fusion_layers = 5
  mome.model.mome.heads = 3
  mome.model.n_gen_queries = 4
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(mome)
  message = str(error.value)
  assert "fusion_layers=5 exceeds config.model.mome.depth=2" in message
  assert "config.model.mome.width=32 is not divisible by config.model.mome.heads=3" in message
  assert "config.model.n_gen_queries is only read by CoCa towers" in message


@pytest.mark.parametrize("spec", ["vlmo_base.py", "mome_coca_base.py", "demo.py:mome",
                                  "demo.py:mome,limoe",
                                  "vlmo_base.py:stage=2", "vlmo_base.py:stage=3"])
def test_experiment_configs_validate_and_build_abstractly(spec):
  config = config_lib.load_config(os.path.join(REPO, "experiments", spec))
  config_lib.validate(config, num_devices=1)
  counts = flops.param_counts(config)
  assert counts["active"] < counts["total"]
  assert flops.model_flops_per_example(config) > 0
  if spec in ("vlmo_base.py:stage=3", "vlmo_base.py"):
    # The official VLMo-Base module with ITC + ITM + MLM, to the parameter (tests/test_vlmo.py).
    assert counts["total"] == 202_445_470, counts["total"]
  if spec in ("vlmo_base.py:stage=3", "vlmo_base.py"):
    # A token runs one of the 2 experts in the 10 bottom layers and one of 3 in the top 2.
    ffn = 2 * 768 * 3072 + 3072 + 768 + 2 * 768  # MLP weights and biases, LayerNorm.
    assert counts["total"] - counts["active"] == (10 * 1 + 2 * 2) * ffn


# -- End to end: train CLI -> coca_jax.load ------------------------------------------------------


@pytest.fixture(scope="module")
def mome_workdir(tmp_path_factory):
  import subprocess
  import sys
  workdir = str(tmp_path_factory.mktemp("mome") / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "coca_jax.train", "--config",
       os.path.join(REPO, "experiments", "demo.py") + ":mome,smoke", "--workdir", workdir],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_mome_trains_from_the_cli_and_loads_for_inference(mome_workdir):
  import json
  from coca_jax.data import digit_scenes
  from coca_jax.inference import api
  records = [json.loads(line) for line in open(os.path.join(mome_workdir, "metrics.jsonl"))]
  train = [r for r in records if "loss" in r]
  for key in ("itm_loss", "itm_accuracy", "caption_loss", "contrastive_loss"):
    assert np.isfinite(train[-1][key]), key
  for key in ("eval/zeroshot_top1", "eval/i2t_recall@1"):
    assert 0.0 <= records[-1][key] <= 1.0
  model = api.load(mome_workdir, batch_size=4)
  assert isinstance(model.module, MoME)
  scenes = digit_scenes.make_scenes("test", 3, seed=1, image_size=32)
  images = scenes["image"]
  captions = model.caption(images)
  assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
  # Cached captions equal the uncached reference on the trained model too.
  out = model.caption_tokens(images)
  from coca_jax.data import preprocess
  reference = gen.recompute_greedy(model.module, model.params,
                                   jnp.asarray(preprocess.normalize_images(images)))
  np.testing.assert_array_equal(out["tokens"], np.asarray(reference["tokens"]))
  scores = model.itm_score(images, [scenes["caption"][0], "a blue seven"])
  assert scores.shape == (3, 2) and np.all((scores >= 0) & (scores <= 1))
  # Same pair scored alone or among others: batching does not change it.
  np.testing.assert_allclose(model.itm_score(images[1:2], ["a blue seven"])[0, 0],
                             scores[1, 1], atol=1e-5)
  assert model.embed_images(images).shape == (3, 32)


# Warm starting one stage from another: tests/test_warm_start.py (the MoME cases).


# What each VLMo stage trains: tests/test_vlmo_objectives.py (run.py's frozen set, stage 3).
