"""Specs for the search index (coca_jax.inference.index and `python -m coca_jax.index`), on a
randomly initialised smoke model exported as a bundle (no training)."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest
from tests.conftest import smoke_config

from coca_jax import export
from coca_jax.data import digit_scenes
from coca_jax.data.tokenizer import Tokenizer
from coca_jax.evaluation import metrics
from coca_jax.inference import api
from coca_jax.inference import index as index_lib
from coca_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bundle(out, seed):
  config = smoke_config()
  module = step_lib.build_model(config)
  size, length = config.model.image_size, config.model.text.max_len
  variables = jax.jit(module.init)(jax.random.key(seed), np.zeros((1, size, size, 3), np.float32),
                                   np.zeros((1, length), np.int32))
  tokenizer = Tokenizer.train([f"a {c} {d}" for c in ("red", "blue", "green") for d in range(10)],
                              vocab_size=40, model_type="bpe")
  return export.write_bundle(out, nn.unbox(variables)["params"], config, tokenizer,
                             fmt="safetensors")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  return _bundle(str(tmp_path_factory.mktemp("index") / "bundle"), seed=0)


@pytest.fixture(scope="module")
def model(bundle):
  return api.load(bundle, batch_size=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """10 scene PNGs in two nested folders, one unreadable .png and one text file."""
  root = tmp_path_factory.mktemp("photos")
  (root / "b" / "deeper").mkdir(parents=True)
  scenes = digit_scenes.make_scenes("test", 10, seed=1, image_size=32)
  for i, image in enumerate(scenes["image"]):
    Image.fromarray(image).save(root / ("b/deeper" if i >= 6 else "") / f"{i}.png")
  (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
  (root / "notes.txt").write_text("not an image")
  return str(root)


def _image_files(folder):
  return index_lib.list_images(folder)[0]


def test_exact_search_equals_numpy_brute_force(model, folder, tmp_path):
  index = index_lib.Index.build(model, folder, str(tmp_path / "idx"), chunk_size=4, ann="none",
                                progress=False)
  files = [f for f in _image_files(folder) if "broken" not in f]
  assert index.paths == files  # Recursive, sorted, the unreadable file skipped ...
  assert [os.path.basename(r) for r, _ in index.last_build.skipped] == ["broken.png"]
  assert "cannot read image" in index.last_build.skipped[0][1]  # ... with the reason,
  assert index.last_build.ignored == 1  # and the text file ignored.
  np.testing.assert_allclose(index.embeddings, model.embed_images(files), atol=1e-5)
  queries = ["a red 3", "a blue 7 left of a green 1"]
  results = index.search(texts=queries, k=4)
  scores = model.embed_texts(queries) @ index.embeddings.T
  expected = np.argsort(-scores, axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(results.ids, expected)
  np.testing.assert_allclose(results.scores, np.take_along_axis(scores, expected, 1), atol=1e-5)
  assert results.paths[0] == [files[i] for i in expected[0]]
  # An image finds itself first; k larger than the index returns every row.
  found = index.search(images=[files[7]], k=100)
  assert found.ids.shape == (1, 10) and found.ids[0, 0] == 7
  assert found.scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_sharded_topk_ignores_rows_past_num_gallery():
  """The index keeps its gallery padded to the device count; padding (zeros, which would beat
  negative scores) is never returned."""
  rng = np.random.default_rng(0)
  gallery = -np.abs(rng.standard_normal((7, 8))).astype(np.float32)
  queries = np.abs(rng.standard_normal((3, 8))).astype(np.float32)
  padded = np.concatenate([gallery, np.zeros((5, 8), np.float32)])
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  scores, ids = metrics.sharded_topk(queries, padded, 7, mesh=mesh, num_gallery=7)
  expected = metrics.dense_topk(queries, gallery, 7)
  np.testing.assert_array_equal(ids, expected[1])
  np.testing.assert_allclose(scores, expected[0], atol=1e-6)
  with pytest.raises(ValueError, match="k=8"):
    metrics.sharded_topk(queries, padded, 8, mesh=mesh, num_gallery=7)


def _unit(rng, n, d):
  x = rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(found, exact):
  return np.mean([len(set(a) & set(e)) / exact.shape[1] for a, e in zip(found, exact)])


def test_ann_recall_at_10_on_random_unit_vectors_at_the_index_settings():
  """Random 512-d unit vectors (no clusters: the hard case), 20x more rows than are re-ranked,
  so a broken quantiser or re-rank would miss most neighbours."""
  rng = np.random.default_rng(0)
  data, queries = _unit(rng, 10_000, 512), _unit(rng, 100, 512)
  ann = index_lib.QuantizedAnn.build(data)
  assert ann.rerank * 20 == len(data)
  scores, ids = ann.search(queries, 10, data)
  exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
  assert _recall(ids, exact) >= 0.95
  # Scores are exact inner products, best first.
  np.testing.assert_allclose(scores, np.take_along_axis(queries @ data.T, ids, 1), atol=1e-5)
  assert (np.diff(scores, axis=1) <= 0).all()
  one = ann.search(queries[:1], 10, data)  # a single query answers as in a batch
  np.testing.assert_array_equal(one[1], ids[:1])


def test_ann_add_extends_the_index_and_retrains_one_started_small():
  rng = np.random.default_rng(1)
  data, queries = _unit(rng, 8_000, 64), _unit(rng, 100, 64)
  ann = index_lib.QuantizedAnn.build(data[:5_000])
  codebook = index_lib._faiss().vector_to_array(ann.index.pq.centroids)
  ann.add(data[5_000:], 5_000)
  assert len(ann) == 8_000 and not ann.needs_retraining(8_000)
  # Extended, not rebuilt: the codebooks are the ones trained on the first 5,000 ...
  np.testing.assert_array_equal(index_lib._faiss().vector_to_array(ann.index.pq.centroids),
                                codebook)
  # ... and the appended rows are found: each finds itself, and recall holds over all rows.
  _, ids = ann.search(data[5_000:5_100], 1, data)
  assert ids[:, 0].tolist() == list(range(5_000, 5_100))
  exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
  assert _recall(ann.search(queries, 10, data)[1], exact) >= 0.95
  with pytest.raises(index_lib.SearchIndexError, match="holds 8000 rows"):
    ann.add(data[:10], 5_000)  # rows must continue the ids
  # Trained on a handful, grown past twice that: the next add retrains it.
  small = index_lib.QuantizedAnn.build(data[:20])
  assert small.needs_retraining(8_000) and not small.needs_retraining(40)


def test_ann_index_answers_like_exact_and_survives_reopening(model, folder, tmp_path,
                                                              monkeypatch):
  out = str(tmp_path / "idx")
  index_lib.Index.build(model, folder, out, ann="faiss", progress=False)
  index = index_lib.Index.open(out, model)
  assert index.manifest["ann"]["count"] == len(index) == 10
  assert os.path.exists(os.path.join(out, index_lib.ANN_FILE))
  queries = ["a red 3", "a green 9"]
  ann, exact = index.search(texts=queries, k=5), index.search(texts=queries, k=5, exact=True)
  assert index._ann is not None  # the ANN index answered, ...
  np.testing.assert_array_equal(ann.ids, exact.ids)  # exactly: 10 rows, all re-ranked
  np.testing.assert_allclose(ann.scores, exact.scores, atol=1e-5)
  # Where faiss is not installed the same index still answers, exactly.
  monkeypatch.setattr(index_lib, "ann_available", lambda: False)
  without = index_lib.Index.open(out, model).search(texts=queries, k=5)
  np.testing.assert_array_equal(without.ids, exact.ids)


class _Killed(Exception):
  pass


def test_resume_after_a_kill_ends_equal_to_an_uninterrupted_build(model, folder, tmp_path,
                                                                  monkeypatch):
  whole = index_lib.Index.build(model, folder, str(tmp_path / "whole"), chunk_size=3,
                                ann="none", progress=False)
  out = str(tmp_path / "resumed")
  original = index_lib.Index._append_chunk
  written = []

  def append_then_die(self, *args):
    original(self, *args)
    written.append(1)
    if len(written) == 2:
      raise _Killed()
  monkeypatch.setattr(index_lib.Index, "_append_chunk", append_then_die)
  with pytest.raises(_Killed):
    index_lib.Index.build(model, folder, out, chunk_size=3, ann="none", progress=False)
  monkeypatch.setattr(index_lib.Index, "_append_chunk", original)
  # A chunk the kill left half-written under its final name is not trusted: it is not listed.
  with open(os.path.join(out, "chunks", "00002.npy"), "wb") as f:
    f.write(b"\x93NUMPY half")
  assert len(index_lib.Index.open(out).manifest["chunks"]) == 2
  resumed = index_lib.Index.build(model, out=out, images=folder, progress=False)
  assert resumed.last_build.already == 6 and resumed.last_build.embedded == 4
  assert resumed.manifest["chunks"] == whole.manifest["chunks"]
  assert resumed.refs == whole.refs and resumed.skipped == whole.skipped
  np.testing.assert_array_equal(resumed.embeddings, whole.embeddings)


def test_append_embeds_only_new_images_and_leaves_old_rows(model, folder, tmp_path,
                                                           monkeypatch):
  files = [f for f in _image_files(folder) if "broken" not in f]
  out = str(tmp_path / "idx")
  first = index_lib.Index.build(model, files[:6], out, chunk_size=4, ann="faiss",
                                dtype="float16", progress=False)
  before = first.embeddings.copy()
  chunk_bytes = open(os.path.join(out, "chunks", "00000.npy"), "rb").read()
  embedded = []
  original = index_lib.ShardedImageEmbedder.__call__
  monkeypatch.setattr(index_lib.ShardedImageEmbedder, "__call__",
                      lambda self, x: embedded.append(len(x)) or original(self, x))
  index = index_lib.Index.open(out, model)
  report = index.add(folder, progress=False)  # The whole folder: 6 known, 4 new, 1 unreadable.
  assert sum(embedded) == 4 and report.embedded == 4 and report.already == 6
  assert len(index) == 10 and index.paths[:6] == files[:6]
  np.testing.assert_array_equal(index.embeddings[:6], before)
  assert open(os.path.join(out, "chunks", "00000.npy"), "rb").read() == chunk_bytes
  reopened = index_lib.Index.open(out, model)
  assert reopened.manifest["ann"]["count"] == 10 and reopened.embeddings.dtype == np.float32
  assert np.load(os.path.join(out, "chunks", "00000.npy")).dtype == np.float16
  # The new rows are searchable through the extended ANN index: each new image finds itself.
  found = reopened.search(images=files[6:], k=1)
  assert found.ids[:, 0].tolist() == [6, 7, 8, 9]
  assert index.add(folder, progress=False).embedded == 0  # nothing new: nothing embedded


def test_an_older_versions_usearch_graph_is_searched_exactly_then_replaced(model, folder,
                                                                           tmp_path):
  files = [f for f in _image_files(folder) if "broken" not in f]
  out = str(tmp_path / "idx")
  index_lib.Index.build(model, files[:6], out, ann="none", progress=False)
  manifest_path = os.path.join(out, index_lib.MANIFEST)
  manifest = json.load(open(manifest_path))
  manifest["ann"] = {"backend": "usearch", "file": "ann.usearch", "count": 6}
  manifest["ann_choice"] = "usearch"  # --ann usearch, as that version named "always"
  json.dump(manifest, open(manifest_path, "w"))
  open(os.path.join(out, "ann.usearch"), "wb").write(b"an HNSW graph")
  index = index_lib.Index.open(out, model)
  found = index.search(texts=["a red 3"], k=3)
  np.testing.assert_array_equal(found.ids, index.search(texts=["a red 3"], k=3, exact=True).ids)
  assert index.add(folder, progress=False).embedded == 4
  assert index.manifest["ann"]["backend"] == index_lib.ANN_BACKEND
  assert index.manifest["ann"]["count"] == 10
  assert not os.path.exists(os.path.join(out, "ann.usearch"))
  assert index_lib.Index.open(out, model).search(images=files[6:], k=1).ids[:, 0].tolist() == [
      6, 7, 8, 9]


def test_a_query_with_another_model_is_refused(model, folder, tmp_path):
  out = str(tmp_path / "idx")
  index_lib.Index.build(model, folder, out, ann="none", progress=False)
  # Same config, weights one fine-tuning step away.
  other = api.Model(model.module, jax.tree.map(lambda p: p * 1.001, model.params),
                    model.tokenizer, model.config, batch_size=4)
  with pytest.raises(index_lib.ModelMismatch, match="weights_hash"):
    index_lib.Index.open(out, other)
  with pytest.raises(index_lib.ModelMismatch, match="built with the model at"):
    index_lib.Index.build(other, folder, out, progress=False)
  with pytest.raises(FileNotFoundError, match="not a search index"):
    index_lib.Index.open(str(tmp_path))


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", COCA_JAX_ALLOCATOR="system")
  return subprocess.run([sys.executable, "-m", "coca_jax.index", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_build_and_query(bundle, folder, tmp_path):
  out = str(tmp_path / "idx")
  built = _cli("build", "--model", bundle, "--images", folder, "--out", out, "--chunk_size", "4",
               "--noprogress")
  assert built.returncode == 0, built.stderr[-3000:]
  assert "10 images" in built.stdout
  assert "broken.png" in built.stderr and "skipped 1 unreadable" in built.stderr
  query_image = [f for f in _image_files(folder) if f.endswith("7.png")][0]
  found = _cli("query", "--index", out, "--image", query_image, "--k", "3", "--json")
  assert found.returncode == 0, found.stderr[-3000:]
  result = json.loads(found.stdout.strip().splitlines()[-1])
  assert len(result["results"]) == 3 and result["results"][0]["path"] == query_image
  missing = _cli("query", "--index", str(tmp_path / "nothing"), "--text", "a red 3")
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1].startswith("error: index ")
