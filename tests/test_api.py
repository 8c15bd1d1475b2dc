"""Specs for the public API (coca_jax.load / Model), export, and the caption / evaluate CLIs,
on the smoke demo run (trained once per session, ~25 s)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from coca_jax import api, export, generate as gen
from coca_jax.data import digit_scenes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke") / "run")
  _run("coca_jax.train", "--config", "experiments/demo.py:smoke", "--workdir", workdir)
  return workdir


@pytest.fixture(scope="module")
def model(smoke_workdir):
  return api.load(smoke_workdir, batch_size=4)


@pytest.fixture(scope="module")
def scenes():
  return digit_scenes.make_scenes("test", 6, seed=1, image_size=32)


def test_load_workdir_step_dir_and_export_agree(smoke_workdir, model, tmp_path):
  assert model.step == 6
  by_step = api.load(os.path.join(smoke_workdir, "checkpoints", "3"))
  assert by_step.step == 3
  exported = api.load(export.export(smoke_workdir, str(tmp_path / "f32")))
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(exported.params)):
    np.testing.assert_array_equal(a, b)
  half = api.load(export.export(smoke_workdir, str(tmp_path / "bf16"), dtype="bfloat16"))
  leaves = jax.tree.leaves(half.params)
  assert all(leaf.dtype == np.float32 for leaf in leaves)  # Cast back to f32 on load.
  for a, b in zip(jax.tree.leaves(model.params), leaves):
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-6)
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(model.params), jax.tree.leaves(by_step.params))]
  assert any(changed)  # Step 3 really is another checkpoint.
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    api.load(str(tmp_path))


def test_embeddings_are_normalised_and_independent_of_batching(model, scenes, tmp_path):
  images = scenes["image"]
  embeds = model.embed_images(images)  # 6 images in batches of 4: one padded batch.
  assert embeds.shape == (6, model.module.config.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, atol=1e-5)
  one_by_one = np.concatenate([model.embed_images(images[i:i + 1]) for i in range(6)])
  np.testing.assert_allclose(embeds, one_by_one, atol=1e-5)
  # Paths are read with the evaluation geometry; a PNG holds the exact pixels.
  paths = []
  for i, image in enumerate(images[:2]):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(image).save(paths[-1])
  np.testing.assert_allclose(model.embed_images(paths), embeds[:2], atol=1e-5)
  # A larger image is resized to the model's size (shorter side, center crop).
  big = np.asarray(Image.fromarray(images[0]).resize((64, 64), Image.Resampling.NEAREST))
  assert model.images_to_uint8([big]).shape == (1, 32, 32, 3)
  texts = model.embed_texts(scenes["caption"])
  np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(model.similarity(images, scenes["caption"]), embeds @ texts.T,
                             atol=1e-5)


def test_caption_matches_generate_and_batching(model, scenes):
  captions = model.caption(scenes["image"])
  assert len(captions) == 6 and all(isinstance(c, str) for c in captions)
  tokens = gen.generate(model.module, model.params,
                        jax.numpy.asarray(api.preprocess.normalize_images(scenes["image"])))
  assert captions == gen.decode_texts(model.tokenizer, tokens["tokens"])
  beams = model.caption(scenes["image"], method="beam", num_beams=2)
  assert len(beams) == 6
  with pytest.raises(ValueError, match="method"):
    model.caption(scenes["image"], method="nucleus")


def test_zero_shot_predicts_the_most_similar_class(model, scenes):
  names = list(digit_scenes.DIGIT_NAMES)
  result = model.zero_shot(scenes["image"], names, ["a {}"])
  scores = model.embed_images(scenes["image"]) @ model.embed_texts([f"a {n}" for n in names]).T
  np.testing.assert_array_equal(result["labels"], scores.argmax(1))
  np.testing.assert_allclose(result["probs"].sum(1), 1.0, atol=1e-5)
  index, top = model.retrieve(scenes["caption"], scenes["image"], k=2)
  assert index.shape == top.shape == (6, 2) and (top[:, 0] >= top[:, 1]).all()


def test_caption_and_evaluate_clis(smoke_workdir, scenes, tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  for i, image in enumerate(scenes["image"][:3]):
    Image.fromarray(image).save(folder / f"{i}.png")
  lines = _run("coca_jax.caption", "--model", smoke_workdir, "--json", str(folder)).splitlines()
  records = [json.loads(line) for line in lines if line.startswith("{")]
  assert [os.path.basename(r["path"]) for r in records] == ["0.png", "1.png", "2.png"]
  out = tmp_path / "evals.json"
  _run("coca_jax.evaluate", "--workdir", smoke_workdir, "--out", str(out),
       "--config.evals.captioning.enabled=True", "--config.evals.captioning.examples=16",
       "--config.evals.retrieval.examples=16", "--config.evals.zeroshot.examples=16")
  results = json.loads(out.read_text())
  assert results["step"] == 6
  for key in ("eval/caption_cider", "eval/caption_bleu4", "eval/caption_exact_match",
              "eval/zeroshot_top1", "eval/i2t_recall@1"):
    assert key in results


@pytest.fixture(scope="module")
def mini_workdir(tmp_path_factory):
  """experiments/demo.py:mini trained through the CLI (~20 s of training)."""
  workdir = str(tmp_path_factory.mktemp("mini") / "run")
  _run("coca_jax.train", "--config", "experiments/demo.py:mini", "--workdir", workdir)
  return workdir


def test_demo_model_zero_shot_is_above_chance(mini_workdir):
  demo = api.load(mini_workdir, batch_size=100)
  # Held-out handwriting, a different draw from the one the train loop evaluated.
  digits = digit_scenes.make_single_digits(
      "test", 500, seed=3, image_size=demo.image_size,
      grid=demo.config.data.build_demo_options.grid)  # Drawn like the run's own data.
  names = list(digit_scenes.DIGIT_NAMES)
  templates = list(digit_scenes.ZERO_SHOT_TEMPLATES)
  accuracy = np.mean(demo.zero_shot(digits["image"], names, templates)["labels"]
                     == digits["label"])
  # Chance is 0.1 over 10 digits; 0.1 + 4 binomial standard deviations at n=500 is 0.154.
  assert accuracy > 0.1 + 4 * np.sqrt(0.1 * 0.9 / len(digits["label"])), accuracy
  # The train loop's own end-of-run zero-shot eval agrees that the model learned digits.
  with open(os.path.join(mini_workdir, "metrics.jsonl")) as f:
    evals = [json.loads(line) for line in f if "eval/zeroshot_top1" in line]
  assert evals and evals[-1]["eval/zeroshot_top1"] > 0.154, evals
