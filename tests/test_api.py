"""Specs for the public API (coca_jax.load / Model), export, and the caption / evaluate CLIs,
on the smoke demo run (trained once per session, ~25 s)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from coca_jax import export
from coca_jax.data import digit_scenes
from coca_jax.inference import api
from coca_jax.inference import generate as gen

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
  assert model.pixels_at_model_size([big]).shape == (1, 32, 32, 3)
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
  (folder / "1b.png").write_bytes(b"\x89PNG not really")  # unreadable: skipped, named, exit 1
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "coca_jax.caption", "--model", smoke_workdir,
                           "--json", str(folder)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "1b.png" in result.stderr and "1 of 4 images could not be read" in result.stderr
  records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
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


def test_evaluate_help_and_a_missing_workdir_are_usage_messages():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, "-m", "coca_jax.evaluate", *args],
                                     cwd=REPO, env=env, capture_output=True, text=True,
                                     timeout=300)
  result = run("--help")
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "python -m coca_jax.evaluate --workdir DIR" in result.stdout
  result = run()  # A usage mistake: one line, exit 2 (core/cli.py).
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "missing --workdir" in result.stderr


def test_float_images_embed_like_uint8_and_bad_ranges_are_rejected(model, scenes):
  uint8 = scenes["image"][:4]
  as_float = uint8.astype(np.float32) / 255.0
  np.testing.assert_allclose(model.embed_images(as_float), model.embed_images(uint8), atol=1e-5)
  # A float image of another size goes through the same resize as its uint8 twin.
  big = np.kron(uint8[0], np.ones((2, 2, 1), np.uint8))
  np.testing.assert_allclose(model.embed_images([big / 255.0]), model.embed_images([big]),
                             atol=1e-5)
  with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
    model.embed_images(uint8.astype(np.float32))  # 0..255 floats: the old silent black image
  with pytest.raises(ValueError, match="uint8 in \\[0, 255\\] or float in \\[0, 1\\]"):
    model.embed_images(uint8.astype(np.int64))
  with pytest.raises(ValueError, match="must lie in"):
    model.embed_images(np.full_like(as_float, np.nan))


def test_unreadable_image_file_error_names_the_file(model, tmp_path):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not a jpeg")
  with pytest.raises(api.ImageFileError, match="broken.jpg"):
    model.embed_images([str(bad)])


def test_load_picks_the_step_train_would_and_skips_unreadable_ones(smoke_workdir, tmp_path):
  import shutil
  from coca_jax.training import checkpoint
  workdir = tmp_path / "run"
  shutil.copytree(smoke_workdir, workdir)
  steps, _ = checkpoint.step_dirs(str(workdir))
  assert len(steps) == 2
  (workdir / "checkpoints" / "999").mkdir()  # junk: ignored
  (workdir / "checkpoints" / "999" / "garbage").write_text("x")
  os.remove(workdir / "checkpoints" / str(steps[-1]) / "state" / "_METADATA")
  assert api.load(str(workdir), batch_size=2).step == steps[0]
  chosen = checkpoint.restore_newest_readable(str(workdir), lambda s: s)
  assert chosen[:2] == (steps[0], steps[0])
  assert [s for s, _ in chosen[2]] == [999, steps[-1]]
  with pytest.raises(checkpoint.CheckpointError, match="_METADATA is missing"):
    api.load(str(workdir), step=steps[-1])


@pytest.fixture(scope="module")
def mini_workdir(tmp_path_factory):
  """experiments/demo.py:mini trained through the CLI (~20 s of training)."""
  workdir = str(tmp_path_factory.mktemp("mini") / "run")
  _run("coca_jax.train", "--config", "experiments/demo.py:mini", "--workdir", workdir)
  return workdir


def test_demo_model_zero_shot_is_above_chance(mini_workdir):
  demo = api.load(mini_workdir, batch_size=100)
  # Held-out handwriting, a different draw from the one the train loop evaluated.
  options = demo.config.data.build_demo_options
  digits = digit_scenes.make_single_digits(  # Drawn like the run's own data.
      "test", 500, seed=3, image_size=demo.image_size, grid=options.grid,
      variation=options.get("variation", 0.0), strokes=options.get("strokes", 0.0),
      varied_grid=options.get("varied_grid", -1))
  names = list(digit_scenes.DIGIT_NAMES)
  templates = list(demo.config.evals.zeroshot.templates)  # The run's own prompts.
  accuracy = np.mean(demo.zero_shot(digits["image"], names, templates)["labels"]
                     == digits["label"])
  # Chance is 0.1 over 10 digits; 0.1 + 4 binomial standard deviations at n=500 is 0.154.
  assert accuracy > 0.1 + 4 * np.sqrt(0.1 * 0.9 / len(digits["label"])), accuracy
  # The train loop's own end-of-run zero-shot eval agrees that the model learned digits.
  with open(os.path.join(mini_workdir, "metrics.jsonl")) as f:
    evals = [json.loads(line) for line in f if "eval/zeroshot_top1" in line]
  assert evals and evals[-1]["eval/zeroshot_top1"] > 0.154, evals


def test_decode_weights_keep_captions_of_a_trained_model(mini_workdir):
  """int8 and bf16 decoding weights caption held-out scenes like float32 (all but at most one
  of 64 identical); float32 is the default."""
  exact = api.load(mini_workdir, batch_size=32)
  assert exact.decode_weights is None
  assert {leaf.dtype for leaf in jax.tree.leaves(exact.decoder_params)} == {np.dtype("float32")}
  options = exact.config.data.build_demo_options
  scenes = digit_scenes.make_scenes("test", 64, seed=5, image_size=exact.image_size,
                                    grid=options.grid)
  reference = exact.caption(scenes["image"])
  assert len(set(reference)) > 5  # A trained model, not one caption for everything.
  for weights in ("int8", "bfloat16"):
    narrow = api.load(mini_workdir, batch_size=32, decode_weights=weights)
    assert np.dtype(weights) in {leaf.dtype for leaf in jax.tree.leaves(narrow.decoder_params)}
    # A scene whose two best next tokens are closer than the narrow weights' rounding can
    # flip (this small model is retrained for the test, so its margins vary with the compiler's
    # rounding); at most one of the 64 may, and the rest are identical word for word.
    same = sum(a == b for a, b in zip(narrow.caption(scenes["image"]), reference))
    assert same >= len(reference) - 1, (weights, same)
  with pytest.raises(ValueError, match="decode_weights='int4' is unknown"):
    api.load(mini_workdir, decode_weights="int4")
