"""Frozen-encoder probes (evaluation/probes.py): the linear probe is the ridge classifier sklearn
fits on the same cached features, the attentional probe is deterministic, learns, and is the
model's attentional pooler; the image encoder never changes; features are cached per
parameters and split, and never reused for others."""

import dataclasses

import jax
import numpy as np
import pytest
from sklearn.linear_model import RidgeClassifier
from sklearn.preprocessing import StandardScaler

from coca_jax.core import config as config_lib
from coca_jax.evaluation import evaluators, probes
from coca_jax.models import layers
from coca_jax.training import step as step_lib
from conftest import smoke_config

NUM_CLASSES = 4


class LabelledSource:
  """What `pipeline.make_eval_source` returns, for made-up labelled images: the class sets the
  colour of the top-left quarter, the rest is noise (a random encoder's features still carry
  it, so the probes score above chance)."""

  def __init__(self, split, num, image_size, seed, labelled=True):
    rng = np.random.default_rng(seed)
    self.name, self.split, self.image_size = "shapes", split, image_size
    self.features, self.class_names = "image,label", None
    self.labels = rng.integers(0, NUM_CLASSES, num)
    self.images = rng.integers(0, 256, (num, image_size, image_size, 3)).astype(np.uint8)
    colours = np.asarray([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    half = image_size // 2
    self.images[:, :half, :half] = colours[self.labels][:, None, None]
    self.labelled = labelled

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    example = {"image": self.images[index], "captions": [], "key": f"{self.split}/{index}"}
    if self.labelled:
      example["label"] = int(self.labels[index])
    return example

  def batches(self, batch_size, limit=None):
    total = len(self) if limit is None else min(limit, len(self))
    for start in range(0, total, batch_size):
      stop = min(start + batch_size, total)
      batch = {"image": self.images[start:stop], "captions": [[]] * (stop - start),
               "key": [f"{self.split}/{i}" for i in range(start, stop)]}
      if self.labelled:
        batch["label"] = self.labels[start:stop].astype(np.int64)
      yield batch


def _sources(image_size):
  return {"train": LabelledSource("train", 96, image_size, seed=0),
          "test": LabelledSource("test", 64, image_size, seed=1),
          "scenes": LabelledSource("scenes", 8, image_size, seed=2, labelled=False)}


def _probe_config(**fields):
  config = smoke_config()
  for name in ("zeroshot", "retrieval", "captioning"):
    config.evals[name].enabled = False
  config.evals.probe.update(dict(split="test", train_split="train", attn_epochs=5,
                                 attn_batch_size=32), **fields)
  return config


@pytest.fixture(scope="module")
def sources(tiny_config):
  return _sources(tiny_config.model.image_size)


def _embedder(model, params, config):
  return evaluators.Embedder(model, params, None, batch_size=config.evals.batch_size)


@pytest.mark.filterwarnings("ignore:An ill-conditioned matrix")  # sklearn, at the smallest l2.
def test_probe_eval_reports_both_probes_and_the_linear_one_is_sklearns_ridge(
    tiny_model, tiny_params, tiny_config, sources):
  config = _probe_config()
  cache = probes.FeatureCache()
  before = jax.tree.map(np.array, tiny_params)
  embedder = _embedder(tiny_model, tiny_params, config)
  make_source = lambda split, group: sources[split]
  original, probes.CACHE = probes.CACHE, cache
  try:
    results = evaluators.evaluate(config, embedder, make_source)
  finally:
    probes.CACHE = original
  assert {"eval/probe_attn_top1", "eval/probe_linear_top1", "eval/probe_linear_l2",
          "eval/seconds"} == set(results)
  # The encoder is frozen: every parameter bit-identical after both probes trained.
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, embedder.params))

  # sklearn on the same cached features: the l2 chosen on the same held-out part, the test
  # top-1 of the refit (sklearn's alpha is the per-example weight times the examples fitted).
  train, test = cache.memory.values()  # Cached in the order read: train_split, then split.
  assert (len(train), len(test)) == (96, 64)
  group = config.evals.probe
  fit, held = probes.holdout_split(len(train), group.linear_holdout, group.seed)

  def sklearn_predictions(x, y, l2, x_eval):
    scaler = StandardScaler().fit(x)
    ridge = RidgeClassifier(alpha=l2 * len(y)).fit(scaler.transform(x), y)
    return ridge.predict(scaler.transform(x_eval))

  held_scores = {l2: np.mean(sklearn_predictions(
      train.embeddings[fit], train.labels[fit], l2, train.embeddings[held]) == train.labels[held])
                 for l2 in group.linear_l2}
  best = max(held_scores.values())
  assert results["eval/probe_linear_l2"] == max(l2 for l2, s in held_scores.items() if s == best)
  direct = np.mean(sklearn_predictions(train.embeddings, train.labels,
                                       results["eval/probe_linear_l2"], test.embeddings)
                   == test.labels)
  assert results["eval/probe_linear_top1"] == pytest.approx(direct, abs=1.5 / len(test))
  assert results["eval/probe_linear_top1"] > 1.5 / NUM_CLASSES  # The colour is found.


def _toy_tokens(num, seed, tokens=6, width=16):
  """Noise tokens; one token at a random position carries its class's direction."""
  rng = np.random.default_rng(seed)
  directions = np.random.default_rng(99).standard_normal((NUM_CLASSES, width))
  labels = rng.integers(0, NUM_CLASSES, num)
  x = rng.standard_normal((num, tokens, width)).astype(np.float32)
  x[np.arange(num), rng.integers(0, tokens, num)] += 3.0 * directions[labels]
  return x, labels


def test_attentional_probe_is_deterministic_and_learns_a_separable_task():
  train_x, train_y = _toy_tokens(256, seed=0)
  test_x, test_y = _toy_tokens(128, seed=1)
  settings = probes.AttentionalSettings(heads=2, epochs=20, batch_size=64, lr=1e-2)
  params, losses = probes.train_attentional_probe(train_x, train_y, NUM_CLASSES, settings)
  again, losses_again = probes.train_attentional_probe(train_x, train_y, NUM_CLASSES, settings)
  jax.tree.map(np.testing.assert_array_equal, params, again)  # Bit-identical.
  np.testing.assert_array_equal(losses, losses_again)
  assert len(losses) == 20 * 256 // 64
  accuracy = np.mean(probes.predict(params, test_x) == test_y)
  assert accuracy >= 0.95, accuracy  # Chance: 0.25.
  other = probes.train_attentional_probe(train_x, train_y, NUM_CLASSES,
                                         dataclasses.replace(settings, seed=1))[1]
  assert not np.array_equal(losses, other)  # The seed draws the init and the batch order.


def test_the_probe_pooler_is_the_models_attentional_pooler():
  """`probes.pool` (the folded form) equals `layers.AttentionalPooler(1, heads)` applied to the
  same parameters, biases included."""
  width, heads = 16, 4
  params = probes.init_probe(jax.random.key(0), width, heads, NUM_CLASSES)["pooler"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])
  tokens = jax.random.normal(jax.random.key(2), (3, 7, width))
  expected = jax.jit(layers.AttentionalPooler(1, heads).apply)({"params": params}, tokens)
  np.testing.assert_allclose(jax.jit(probes.pool)(params, tokens), expected[:, 0], rtol=2e-5,
                             atol=2e-5)


def test_features_are_cached_per_parameters_split_and_model(tiny_model, tiny_params, tiny_config,
                                                             sources, tmp_path):
  config = _probe_config(attentional=False, cache_dir=str(tmp_path))
  group = config.evals.probe
  cache = probes.FeatureCache()
  run = lambda model, params, group: probes.probe_eval(
      _embedder(model, params, config), lambda split, g: sources[split], group, cache)
  first = run(tiny_model, tiny_params, group)
  assert cache.computed == 2  # train_split and split.
  assert run(tiny_model, tiny_params, group) == first and cache.computed == 2  # Reused.
  # Another split (here: another slice of it) is embedded; the cached ones are still reused.
  group.examples = 32
  run(tiny_model, tiny_params, group)
  assert cache.computed == 3
  # The next training step: every parameter value is part of the key.
  stepped = jax.tree.map(lambda x: x, tiny_params)
  stepped["logit_scale"] = tiny_params["logit_scale"] + 1e-3
  run(tiny_model, stepped, group)
  assert cache.computed == 5
  # Another model with parameters of the same shapes.
  other_config = smoke_config()
  other_config.model.pooling = "parallel"  # Its contrastive pooler reads the encoder tokens.
  other = step_lib.build_model(other_config)
  run(other, tiny_params, group)
  assert cache.computed == 7
  # A new process finds the features of the same parameters on disk, as they were computed.
  fresh = probes.FeatureCache()
  embedder = _embedder(tiny_model, tiny_params, config)
  read = fresh.get(embedder, sources["train"], None, str(tmp_path))
  assert fresh.computed == 0
  computed = probes.extract_features(embedder, sources["train"])
  for name in ("embeddings", "tokens", "labels"):
    np.testing.assert_array_equal(getattr(read, name), getattr(computed, name))
  model = tiny_config.model
  assert read.tokens.shape == (96, (model.image_size // model.patch_size) ** 2,
                               model.vision.width)


def test_probe_config_errors_name_the_field_and_the_fix(sources):
  config = _probe_config(train_split="")
  problems = config_lib.eval_problems(config)
  assert any("config.evals.probe.train_split is empty" in p for p in problems), problems
  config = _probe_config(train_split="test")
  assert any("config.evals.probe.train_split='test' is the split the probes report on" in p
             for p in config_lib.eval_problems(config))
  config = _probe_config(linear_l2=[0.1, -1.0], attn_heads=-1)
  problems = "\n".join(config_lib.eval_problems(config))
  assert "config.evals.probe.linear_l2=[0.1, -1.0] must be a non-empty list of numbers > 0" in (
      problems)
  assert "config.evals.probe.attn_heads=-1" in problems
  # A train split without labels (the demo's scenes), found before training.
  config = _probe_config(train_split="scenes")
  with pytest.raises(config_lib.ConfigError, match=r"config.evals.probe.train_split='scenes' "
                     r"has no labels"):
    evaluators.check_evals(config, lambda split, group: sources[split])
  evaluators.check_evals(_probe_config(), lambda split, group: sources[split])


def test_attentional_heads_must_divide_the_token_width():
  with pytest.raises(ValueError, match="attn_heads=3 does not divide the encoder's token width"):
    probes.init_probe(jax.random.key(0), 16, 3, NUM_CLASSES)


def test_image_features_are_encode_images_embedding(tiny_model, tiny_params, tiny_config):
  """The linear probe reads the embedding zero-shot reads, the attentional one the encoder's
  output tokens."""
  model = tiny_config.model
  images = jax.random.normal(jax.random.key(0), (tiny_config.evals.batch_size, model.image_size,
                                                 model.image_size, 3))
  embed, tokens = probes.image_features_fn(tiny_model)(tiny_params, images)  # The probes' compile.
  expected = jax.jit(lambda p, x: tiny_model.apply({"params": p}, x, method="encode_image")[0])(
      tiny_params, images)
  np.testing.assert_allclose(embed, expected, rtol=1e-6, atol=1e-6)
  assert tokens.shape == (len(images), (model.image_size // model.patch_size) ** 2,
                          model.vision.width)
