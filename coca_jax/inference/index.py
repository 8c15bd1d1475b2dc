"""A cross-modal search index: image embeddings of a folder or a dataset, searched by text or
by image.

  from coca_jax.inference.index import Index, Dataset
  index = Index.build("/path/to/model", "photos/", "photos.index")   # or Dataset(name, split, dir)
  index = Index.open("photos.index")               # the model it was built with, loaded on use
  hits = index.search(texts=["a red car"], k=10)   # or images=[path or uint8 array], vectors=
  hits.paths[0], hits.scores[0]                    # best first
  index.add("more_photos/")                        # embeds only images not in the index yet

On disk (a directory):
  index.json         the manifest: format, the model (path, step, embed dim, config and weights
                     hashes), storage dtype, the chunks written so far, the ANN file. Written
                     last, by rename, after each chunk: it lists only complete chunks.
  chunks/NNNNN.npy   L2-normalised embeddings [n, D], float32 or float16, one chunk per
                     `chunk_size` planned images (a chunk holds fewer where files were unreadable).
  chunks/NNNNN.json  {"refs", "paths", "captions" (datasets) or null, "skipped": [[ref, reason]]}
  ann.faiss          the approximate-search index (4-bit product-quantisation codes of every
                     row, faiss; exact re-ranking from the chunks), when one was built (`ann`).
Row i of the concatenated chunks is id i; ids never change (an append adds rows at the end).

Building is resumable: a killed build leaves complete chunks listed in the manifest (each file
is written to a temporary name and renamed, so a half-written chunk is never read), and the same
build run again embeds only the images no listed chunk covers; the chunks it writes are the ones
an uninterrupted build would have written. Appending is the same operation with new images.

Search: the ANN index when there is one, else exact search (`metrics.sharded_topk`: the gallery
split over every device, a jitted matmul + top_k per shard, the shards' top-k merged); `exact=
True` forces exact search. A query with another model than the index's is refused: embeddings
of two models live in different spaces.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import time
from typing import Iterable, Sequence

from absl import logging
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import tqdm

from coca_jax.core import fs
from coca_jax.data import pipeline, preprocess, sources
from coca_jax.evaluation import metrics
from coca_jax.inference import api

FORMAT = "coca_jax.index/1"
MANIFEST = "index.json"
CHUNKS = "chunks"
ANN_FILE = "ann.faiss"
ANN_BACKEND = "faiss-pq4fs-rerank"
DTYPES = ("float32", "float16")
ANN_CHOICES = ("auto", "faiss", "none")
# `ann="auto"` builds the ANN index from this many vectors up. Below it exact search is as fast
# batched and never wrong: at 10k x 512 exact took 0.15 CPU-ms a query batched, the ANN index
# 0.19; at 30k exact 0.49, the ANN index 0.28 (docs/search.md).
AUTO_ANN_MIN = 20_000


class SearchIndexError(ValueError):
  """A problem with an index directory or its use; the message names the path and the fix."""


class ModelMismatch(SearchIndexError):
  """A query (or an append) with another model than the one the index was built with."""


# ----------------------------------------------------------------------------------------------
# What to index
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A prepared split to index: one built by `coca_jax.data.build`, or a TFDS catalog dataset
  prepared as array_record. Results show each example's stored key and its captions."""
  name: str
  split: str
  data_dir: str
  image_feature: str = "image"
  captions_feature: str = "captions"


@dataclasses.dataclass(frozen=True)
class _Item:
  ref: str        # the image's identity in the index: an absolute file path, or NAME/SPLIT[i]
  row: int = -1   # the dataset row (-1 for a file)


def list_images(folder: str) -> tuple[list[str], int]:
  """(image files under `folder`, recursively, in sorted order; how many other files were
  ignored for not having an image suffix)."""
  found, ignored = [], 0
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      if name.lower().endswith(api.IMAGE_SUFFIXES):
        found.append(os.path.join(root, name))
      else:
        ignored += 1
  return found, ignored


class _Source:
  """The images of one `build`/`add` call: what to plan, and how to read one item."""

  def __init__(self, images, image_size: int):
    self.image_size = image_size
    self.dataset = None
    self.ignored = 0
    if isinstance(images, Dataset):
      self.dataset = images
      try:
        opened = sources.open_source(images.name, os.path.expanduser(images.data_dir),
                                      images.split, decode_images=False,
                                      image_feature=images.image_feature)
      except ValueError as e:  # A split it does not have, or not array_record: the fix is in e.
        raise SearchIndexError(str(e)) from e
      self.eval_source = pipeline.EvalSource(
          opened, image_size, images.name, images.split,
          pipeline.EvalFeatures(image=images.image_feature, captions=images.captions_feature))
      prefix = f"{images.name}/{images.split}"
      self.items = [_Item(f"{prefix}[{i}]", i) for i in range(len(self.eval_source))]
      return
    if isinstance(images, (str, os.PathLike)):
      images = [images]
    files = []
    for path in map(os.fspath, images):
      if os.path.isdir(path):
        listed, ignored = list_images(path)
        files += listed
        self.ignored += ignored
      elif os.path.isfile(path):
        files.append(path)
      else:
        raise FileNotFoundError(f"images {path!r} is neither a folder nor a file; pass a folder "
                                "of images, image files, or a Dataset(name, split, data_dir)")
    self.items = [_Item(os.path.abspath(f)) for f in dict.fromkeys(files)]

  def read(self, item: _Item):
    """-> (uint8 [S, S, 3], path shown in results, captions or None). Raises ImageFileError."""
    if self.dataset is None:
      return api.read_image(item.ref, self.image_size), item.ref, None
    try:
      example = self.eval_source[item.row]
    except Exception as e:  # pylint: disable=broad-except  # a damaged record: skip, say why
      raise api.ImageFileError(f"cannot read {item.ref}: {type(e).__name__}: {e}") from e
    # The key is the builder's (ours: "<split>/<number>"), else "<split>/<row>".
    return example["image"], f"{self.dataset.name}/{example['key']}", example["captions"]


# ----------------------------------------------------------------------------------------------
# Model identity and embedding
# ----------------------------------------------------------------------------------------------


def model_identity(model: api.Model, path: str | None = None) -> dict:
  """What an index records of the model that embedded it: path, step, embed dim, a hash of the
  model config and a hash of a sample of every weight (two checkpoints of one config differ
  there). Cheap: reads at most 64 values per parameter."""
  config_hash = hashlib.sha256(
      model.config.model.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]
  weights = hashlib.sha256()
  # One device call for the whole tree (an eager slice per leaf would compile per shape).
  samples = jax.jit(lambda tree: jax.tree.map(
      lambda leaf: leaf.reshape(-1)[:64].astype(np.float32), tree))(model.params)
  for (key_path, leaf), sample in zip(jax.tree_util.tree_leaves_with_path(model.params),
                                      jax.tree.leaves(samples)):
    weights.update(jax.tree_util.keystr(key_path).encode())
    weights.update(str(tuple(leaf.shape)).encode())
    weights.update(np.asarray(sample).tobytes())
  path = path or model.path
  return {"path": fs.resolve(path) if path else None, "step": model.step,
          "embed_dim": int(model.module.config.embed_dim), "config_hash": config_hash,
          "weights_hash": weights.hexdigest()[:16]}


def check_same_model(recorded: dict, model: api.Model, where: str) -> None:
  """Raises ModelMismatch unless `model` is the one `recorded` describes."""
  current = model_identity(model)
  differ = [k for k in ("embed_dim", "config_hash", "weights_hash") if recorded[k] != current[k]]
  if differ:
    raise ModelMismatch(
        f"{where} was built with the model at {recorded['path']} (step {recorded['step']}, "
        f"embed dim {recorded['embed_dim']}), and this model differs in "
        f"{', '.join(f'{k} ({recorded[k]} vs {current[k]})' for k in differ)}; its embeddings "
        "live in another space. Query with the index's own model (leave --model out), or build "
        "a new index with this one")


class ShardedImageEmbedder:
  """Images -> L2-normalised float32 [N, D], data-parallel over every device: each batch is
  split by rows over a 1-D mesh of `jax.devices()`, the parameters replicated. Batches are
  padded to one fixed size (a multiple of the device count) so the function compiles once."""

  def __init__(self, model: api.Model, batch_size: int = 64):
    devices = jax.devices()
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    self.rows = NamedSharding(self.mesh, P("data"))
    self.params = jax.device_put(model.params, NamedSharding(self.mesh, P()))
    self.embed_dim = int(model.module.config.embed_dim)
    module = model.module
    self._fn = jax.jit(
        lambda p, x: module.apply({"params": p}, x, method="encode_image")[0],
        out_shardings=self.rows)

  @classmethod
  def for_model(cls, model: api.Model, batch_size: int) -> "ShardedImageEmbedder":
    """One per (model, batch size), kept on the model: each compiles once, however many
    builds and appends use it."""
    cache = model.__dict__.setdefault("_sharded_image_embedders", {})
    if batch_size not in cache:
      cache[batch_size] = cls(model, batch_size)
    return cache[batch_size]

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """images: uint8 [N, S, S, 3] at the model's size."""
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      batch = jax.device_put(
          preprocess.normalize_images(pad_rows(chunk, self.batch_size)), self.rows)
      out.append(np.asarray(self._fn(self.params, batch), np.float32)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  if len(x) == size:
    return x
  return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


# ----------------------------------------------------------------------------------------------
# Approximate search
# ----------------------------------------------------------------------------------------------


def ann_available() -> bool:
  return importlib.util.find_spec("faiss") is not None


def _faiss():
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the ANN index needs faiss: pip install 'coca_jax[search]' (or pip "
                      "install faiss-cpu); exact search works without it") from e
  return faiss


class QuantizedAnn:
  """Approximate search by a quantised scan of every vector and an exact re-rank (faiss).

  Each vector is held as 4-bit product-quantisation codes, one code per DIMS_PER_CODE
  dimensions (128 bytes for D = 512, a sixteenth of float32), scored against a query by SIMD
  table lookups (faiss IndexPQFastScan); the `rerank` best by that score are scored exactly
  against the index's float32 embeddings and the best k of those returned, with exact scores.
  Row ids are the order of `add` (row i of the index is code i).

  Why this and not a graph (docs/search.md, benchmarks/bench_index.py): on 100k random 512-d
  unit vectors an HNSW graph stayed below recall@10 0.6 and slower than exact search, while
  this scan reached 0.95+ at a fraction of exact search's time, single and batched.

  The codebooks are trained on the vectors there when it is built (a sample of TRAIN_SAMPLE:
  faiss trains a 16-centroid codebook on at most 256 points a centroid). An index that has
  grown to more than twice what it was trained on, while that was under TRAIN_SAMPLE, is
  retrained on its next `add`, so one started small does not keep a codebook fit to a few
  vectors. Below `rerank` vectors every row is re-ranked: the search is exact."""

  DIMS_PER_CODE = 2
  RERANK = 500
  TRAIN_SAMPLE = 4096

  def __init__(self, index, trained_on: int):
    self.index = index
    self.trained_on = trained_on
    self.rerank = self.RERANK

  @classmethod
  def codes_per_vector(cls, dim: int) -> int:
    """The number of 4-bit codes: dim / DIMS_PER_CODE, or the nearest divisor of dim below."""
    return max(m for m in range(1, max(1, dim // cls.DIMS_PER_CODE) + 1) if dim % m == 0)

  @classmethod
  def build(cls, vectors: np.ndarray) -> "QuantizedAnn":
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, np.float32)
    dim = vectors.shape[1]
    index = faiss.IndexPQFastScan(dim, cls.codes_per_vector(dim), 4, faiss.METRIC_INNER_PRODUCT)
    sample = vectors
    if len(vectors) > cls.TRAIN_SAMPLE:
      rows = np.random.default_rng(0).choice(len(vectors), cls.TRAIN_SAMPLE, replace=False)
      sample = vectors[np.sort(rows)]
    # k-means needs at least one point per centroid (16): a smaller set is repeated. Those
    # indexes are searched exactly anyway (every row is re-ranked).
    sample = np.ascontiguousarray(np.tile(sample, (-(-16 // len(sample)), 1)))
    # One thread: training is one small k-means per code (16 centroids, 2 dims, a few thousand
    # points), too small to split; OpenMP's threads spin at every step, and on a busy machine
    # that made a 10k build take 10x the CPU (27 against 2.6 CPU-s).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
      index.train(sample)
    finally:
      faiss.omp_set_num_threads(threads)
    ann = cls(index, trained_on=len(vectors))
    ann.add(vectors, 0)
    return ann

  def needs_retraining(self, total: int) -> bool:
    return self.trained_on < self.TRAIN_SAMPLE and total > 2 * self.trained_on

  def __len__(self) -> int:
    return self.index.ntotal

  def add(self, vectors: np.ndarray, first_id: int) -> None:
    if first_id != self.index.ntotal:
      raise SearchIndexError(f"the ANN index holds {self.index.ntotal} rows, and rows from "
                             f"{first_id} on were given; build it again (ann='none' then the "
                             "default)")
    if len(vectors):
      self.index.add(np.ascontiguousarray(vectors, np.float32))

  def search(self, queries: np.ndarray, k: int, vectors: np.ndarray):
    """-> (scores float32 [Q, k] (exact inner products with `vectors`, the index's rows),
    ids int64 [Q, k]); id -1 (score -inf) where the index holds fewer than k rows."""
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, np.float32)
    vectors = np.ascontiguousarray(vectors, np.float32)
    if len(vectors) != len(self):
      raise SearchIndexError(f"the ANN index holds {len(self)} rows, the embeddings "
                             f"{len(vectors)}; add to the index to bring them level")
    candidates = max(k, min(self.rerank, len(self)))
    _, found = self.index.search(queries, candidates)  # -1 past the last row
    found = np.ascontiguousarray(found, np.int64)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    faiss.knn_inner_products_by_idx(
        faiss.swig_ptr(queries), faiss.swig_ptr(vectors), faiss.swig_ptr(found),
        queries.shape[1], len(queries), len(vectors), candidates, k, faiss.swig_ptr(scores),
        faiss.swig_ptr(ids), candidates)
    missing = ids < 0
    scores[missing], ids[missing] = -np.inf, -1
    return scores, ids

  def save(self, path: str) -> None:
    """Written whole (a temporary file renamed, or one upload): never half an index."""
    fs.write_bytes(path, _faiss().serialize_index(self.index).tobytes())

  @classmethod
  def load(cls, path: str, trained_on: int) -> "QuantizedAnn":
    faiss = _faiss()
    try:
      index = faiss.deserialize_index(np.frombuffer(fs.read_bytes(path), np.uint8))
    except RuntimeError as e:
      raise SearchIndexError(f"{path} is not a faiss index file ({e}); delete it and run "
                             "`python -m coca_jax.index build` again to rebuild it") from e
    return cls(index, trained_on)


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Results:
  """Search results for Q queries, best first: scores float32 [Q, k] (cosine similarity), ids
  int64 [Q, k] (rows of the index), paths [Q][k], captions [Q][k] (a dataset's captions; None
  for files)."""
  scores: np.ndarray
  ids: np.ndarray
  paths: list[list[str]]
  captions: list[list[list[str] | None]]


@dataclasses.dataclass
class BuildReport:
  """What one build/add call did."""
  embedded: int = 0           # images embedded by this call
  already: int = 0            # images the index already covered (not embedded again)
  skipped: list = dataclasses.field(default_factory=list)  # [(ref, reason)] unreadable here
  ignored: int = 0            # files under the folders without an image suffix
  seconds: float = 0.0


class Index:
  """A search index directory (module docstring). Open one with `Index.open`, make one with
  `Index.build`; `search` and `add` as documented there."""

  def __init__(self, path: str, manifest: dict, model: api.Model | None = None):
    self.path = path
    self.manifest = manifest
    self._model = model
    self._model_checked = False
    self._embeddings = None
    self._gallery = None
    self._ann = None
    self._ann_loaded = False
    self.refs: list[str] = []
    self.paths: list[str] = []
    self.captions: list = []
    self.skipped: list = []
    for chunk in manifest["chunks"]:
      meta = json.loads(fs.read_text(self._chunk_file(chunk["name"], "json")))
      self.refs += meta["refs"]
      self.paths += meta["paths"]
      self.captions += meta["captions"] or [None] * len(meta["refs"])
      self.skipped += [tuple(s) for s in meta["skipped"]]

  # -- Opening and building ----------------------------------------------------------------------

  @classmethod
  def open(cls, path: str, model: api.Model | str | None = None, *,
           batch_size: int = 16) -> "Index":
    """Opens the index at `path`. `model` (a loaded Model or a model path) embeds queries; by
    default the model recorded in the index, loaded on the first text or image query. A model
    other than the index's is refused (ModelMismatch)."""
    path = fs.resolve(path)
    manifest_path = fs.join(path, MANIFEST)
    if not fs.exists(manifest_path):
      what = "does not exist" if not fs.exists(path) else f"has no {MANIFEST}"
      raise FileNotFoundError(f"index {path} {what}: it is not a search index; build one with "
                              "python -m coca_jax.index build --model M --images DIR --out "
                              f"{path}")
    manifest = json.loads(fs.read_text(manifest_path))
    if manifest.get("format") != FORMAT:
      raise SearchIndexError(f"{manifest_path} has format {manifest.get('format')!r}, not {FORMAT!r}; "
                        "rebuild the index with this version of coca_jax")
    index = cls(path, manifest)
    if model is not None:
      index.set_model(model, batch_size=batch_size)
    index._batch_size = batch_size
    return index

  @classmethod
  def build(cls, model: api.Model | str, images, out: str, *, dtype: str = "float32",
            chunk_size: int = 4096, batch_size: int = 64, ann: str = "auto",
            progress: bool = True, workers: int = 8) -> "Index":
    """Embeds `images` into a new index at `out`, or continues the index there (a killed build
    resumes; new images are appended; images already in it are not embedded again).

    Args:
      model: a loaded Model, or a path `coca_jax.load` opens (workdir, checkpoint, export).
      images: a folder (searched recursively), image files, a list of those, or a `Dataset`.
      out: the index directory (created; an existing index there is continued).
      dtype: "float32" or "float16" (half the disk and memory; cosine scores change by ~1e-3).
      chunk_size: images per chunk file: the most a kill can lose.
      batch_size: images per device call (rounded up to a multiple of the device count).
      ann: "auto" (an ANN index from AUTO_ANN_MIN vectors up, when faiss is installed),
        "faiss" (always; an error without it) or "none" (exact search only).
      progress: a tqdm progress bar on stderr.
      workers: threads reading and decoding images while the devices embed.
    Returns the open index; `index.last_build` is its BuildReport.
    """
    if dtype not in DTYPES:
      raise ValueError(f"dtype={dtype!r}: use one of {DTYPES}")
    if ann not in ANN_CHOICES:
      raise ValueError(f"ann={ann!r}: use one of {ANN_CHOICES}")
    if chunk_size < 1:
      raise ValueError(f"chunk_size={chunk_size}: must be at least 1")
    if not isinstance(model, api.Model):
      model = api.load(os.fspath(model), batch_size=16)
    out = fs.resolve(out)
    if fs.exists(fs.join(out, MANIFEST)):
      index = cls.open(out, model)
    else:
      if fs.isdir(out) and fs.listdir(out):
        raise FileExistsError(f"--out {out} exists and is not a search index (no {MANIFEST}); "
                              "pick a new directory")
      if ann == "faiss":
        _faiss()  # Fail before embedding anything, not after.
      manifest = {"format": FORMAT, "model": model_identity(model), "dtype": dtype,
                  "dim": int(model.module.config.embed_dim), "chunk_size": chunk_size,
                  "chunks": [], "count": 0, "ann": None, "ann_choice": ann}
      fs.makedirs(fs.join(out, CHUNKS))
      index = cls(out, manifest, model)
      index._model_checked = True
      index._write_manifest()
    index.add(images, batch_size=batch_size, progress=progress, workers=workers, ann=ann)
    return index

  def set_model(self, model: api.Model | str, *, batch_size: int = 16) -> None:
    """Uses `model` for queries and appends; refused unless it is the index's model."""
    if not isinstance(model, api.Model):
      model = api.load(os.fspath(model), batch_size=batch_size)
    check_same_model(self.manifest["model"], model, f"index {self.path}")
    self._model, self._model_checked = model, True

  @property
  def model(self) -> api.Model:
    """The model that embeds queries: the one given, else the index's own (loaded on use)."""
    if self._model is None:
      recorded = self.manifest["model"]["path"]
      if not recorded or not fs.exists(recorded):
        raise FileNotFoundError(
            f"index {self.path} was built with the model at {recorded}, which no longer exists; "
            "pass that model (--model / Index.open(path, model=...)) from where it is now")
      self.set_model(recorded, batch_size=getattr(self, "_batch_size", 16))
    return self._model

  # -- Appending ---------------------------------------------------------------------------------

  def add(self, images, *, batch_size: int = 64, progress: bool = True, workers: int = 8,
          ann: str | None = None) -> BuildReport:
    """Embeds the images of `images` (as in `build`) that the index does not hold yet and
    appends them in new chunks; the rows already there are neither re-embedded nor changed.
    Images that cannot be read are skipped and listed (`BuildReport.skipped`, with reasons)."""
    started = time.perf_counter()
    model = self.model
    source = _Source(images, model.image_size)
    covered = set(self.refs) | {ref for ref, _ in self.skipped}
    todo = [item for item in source.items if item.ref not in covered]
    report = BuildReport(already=len(source.items) - len(todo), ignored=source.ignored)
    chunk_size = self.manifest["chunk_size"]
    embedder = None
    bar = tqdm.tqdm(total=len(todo), unit="img", disable=not progress or not todo,
                    desc=f"embedding into {os.path.basename(self.path)}")
    planned = [todo[s:s + chunk_size] for s in range(0, len(todo), chunk_size)]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      read_chunk = lambda items: [pool.submit(_read, source, item) for item in items]
      # The next chunk's images are read and decoded while this one is embedded.
      upcoming = read_chunk(planned[0]) if planned else []
      for number, items in enumerate(planned):
        read = [future.result() for future in upcoming]
        upcoming = read_chunk(planned[number + 1]) if number + 1 < len(planned) else []
        if embedder is None:
          embedder = ShardedImageEmbedder.for_model(model, batch_size)
        good = [(item, r) for item, r in zip(items, read) if not isinstance(r, str)]
        skipped = [(item.ref, r) for item, r in zip(items, read) if isinstance(r, str)]
        for _, reason in skipped:
          logging.warning("skipped: %s", reason)
        pixels = (np.stack([r[0] for _, r in good]) if good else
                  np.zeros((0, model.image_size, model.image_size, 3), np.uint8))
        vectors = embedder(pixels)
        self._append_chunk(vectors, [i.ref for i, _ in good], [r[1] for _, r in good],
                           [r[2] for _, r in good] if source.dataset else None, skipped)
        report.embedded += len(good)
        report.skipped += skipped
        bar.update(len(items))
    bar.close()
    self._update_ann(self.manifest.get("ann_choice", "auto") if ann is None else ann)
    report.seconds = time.perf_counter() - started
    self.last_build = report
    return report

  def _append_chunk(self, vectors, refs, paths, captions, skipped) -> None:
    name = f"{len(self.manifest['chunks']):05d}"
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(vectors, self.manifest["dtype"]))
    # Data files first, each renamed into place whole; the manifest that lists them last.
    fs.write_bytes(self._chunk_file(name, "npy"), buffer.getvalue())
    fs.write_text(self._chunk_file(name, "json"), json.dumps(
        {"refs": refs, "paths": paths, "captions": captions,
         "skipped": [list(s) for s in skipped]}))
    self.manifest["chunks"].append({"name": name, "count": len(refs)})
    self.manifest["count"] += len(refs)
    self._write_manifest()
    self.refs += refs
    self.paths += paths
    self.captions += captions or [None] * len(refs)
    self.skipped += skipped
    self._embeddings = self._gallery = None

  def _update_ann(self, choice: str) -> None:
    """Brings the ANN index up to every row: built when `choice` asks for one, else extended
    by the rows added since it was saved (or retrained, when it has outgrown its codebooks)."""
    recorded, total = self.manifest.get("ann"), self.manifest["count"]
    if choice == "usearch":  # An older version's "always build one" (its manifests keep it).
      choice = "faiss"
    if recorded is not None and recorded.get("backend") != ANN_BACKEND:
      # An older version's structure (a usearch graph): replaced by this version's.
      logging.warning("%s has an ANN index of another kind (%s); building this version's",
                      self.path, recorded.get("backend"))
      if fs.exists(fs.join(self.path, recorded["file"])):
        fs.remove(fs.join(self.path, recorded["file"]))
      choice, recorded = "faiss", None
      self.manifest["ann"] = None
    if recorded is None:
      wanted = choice == "faiss" or (choice == "auto" and total >= AUTO_ANN_MIN
                                     and ann_available())
      if not wanted or not total:
        self._write_manifest()
        return
      ann = QuantizedAnn.build(self.embeddings)
      logging.info("Built the ANN index over %d vectors", total)
    else:
      if recorded["count"] == total:
        return
      if not ann_available():
        logging.warning("faiss is not installed, so the ANN index of %s cannot take the new "
                        "rows; it is dropped and searches are exact (pip install faiss-cpu, "
                        "then add again to rebuild it)", self.path)
        fs.remove(fs.join(self.path, recorded["file"]))
        self.manifest["ann"] = None
        self._write_manifest()
        self._ann, self._ann_loaded = None, True
        return
      ann = self._load_ann()
      if ann.needs_retraining(total):
        ann = QuantizedAnn.build(self.embeddings)
        logging.info("Retrained the ANN index on %d vectors (it was trained on %d)", total,
                     recorded["trained_on"])
      else:
        ann.add(self.embeddings[recorded["count"]:], recorded["count"])
    ann.save(fs.join(self.path, ANN_FILE))
    self.manifest["ann"] = {"backend": ANN_BACKEND, "file": ANN_FILE, "count": total,
                            "trained_on": ann.trained_on,
                            "dims_per_code": self.dim // ann.index.M}
    self._write_manifest()
    self._ann, self._ann_loaded = ann, True

  # -- Reading -----------------------------------------------------------------------------------

  def __len__(self) -> int:
    return self.manifest["count"]

  @property
  def dim(self) -> int:
    return self.manifest["dim"]

  @property
  def embeddings(self) -> np.ndarray:
    """float32 [N, D], every chunk in id order (read once)."""
    if self._embeddings is None:
      parts = []
      for chunk in self.manifest["chunks"]:
        file = self._chunk_file(chunk["name"], "npy")
        part = np.load(io.BytesIO(fs.read_bytes(file)))
        if part.shape != (chunk["count"], self.dim):
          raise SearchIndexError(f"{file} holds {part.shape}, but {MANIFEST} lists "
                            f"{(chunk['count'], self.dim)}; the index is damaged: build it "
                            "again into a new directory")
        parts.append(part.astype(np.float32))
      self._embeddings = (np.concatenate(parts) if parts
                          else np.zeros((0, self.dim), np.float32))
    return self._embeddings

  def _load_ann(self) -> QuantizedAnn | None:
    if not self._ann_loaded:
      recorded = self.manifest.get("ann")
      self._ann = None
      if recorded is not None:
        if recorded.get("backend") != ANN_BACKEND:
          logging.warning("%s has an ANN index of another kind (%s), which this version does "
                          "not read; searching exactly (an `add` builds this version's)",
                          self.path, recorded.get("backend"))
        elif ann_available():
          self._ann = QuantizedAnn.load(fs.join(self.path, recorded["file"]),
                                        recorded["trained_on"])
        else:
          logging.warning("%s has an ANN index but faiss is not installed; searching exactly "
                          "(pip install 'coca_jax[search]' for it)", self.path)
      self._ann_loaded = True
    return self._ann

  # -- Search ------------------------------------------------------------------------------------

  def embed_queries(self, texts=None, images=None) -> np.ndarray:
    if (texts is None) == (images is None):
      raise ValueError("search: give exactly one of texts=, images= (or vectors=)")
    if texts is not None:
      return self.model.embed_texts([texts] if isinstance(texts, str) else list(texts))
    return self.model.embed_images(images)

  def search(self, texts: Sequence[str] | str | None = None, images=None, *,
             vectors: np.ndarray | None = None, k: int = 10,
             exact: bool | None = None) -> Results:
    """The k most similar images to each query: texts (strings), images (paths or uint8
    arrays) embedded with the index's model, or ready query `vectors` [Q, D] (unit norm).
    `exact`: None = the ANN index when the index has one; True = exact search."""
    if vectors is None:
      vectors = self.embed_queries(texts, images)
    elif texts is not None or images is not None:
      raise ValueError("search: give exactly one of texts=, images=, vectors=")
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != self.dim:
      raise ValueError(f"search: query vectors have shape {vectors.shape}; this index holds "
                       f"[N, {self.dim}] embeddings")
    if not len(self):
      raise SearchIndexError(f"index {self.path} is empty; add images first")
    k = min(k, len(self))
    ann = None if exact else self._load_ann()
    if ann is not None:
      scores, ids = ann.search(vectors, k, self.embeddings)
    else:
      scores, ids = self.exact_search(vectors, k)
    return Results(scores=scores, ids=ids,
                   paths=[[self.paths[i] for i in row] for row in ids],
                   captions=[[self.captions[i] for i in row] for row in ids])

  def exact_search(self, vectors: np.ndarray, k: int):
    """(scores float32 [Q, k], ids int64 [Q, k]): every row scored; the gallery lives on the
    devices (rows split over all of them) between calls."""
    if self._gallery is None:
      # Padded once to a multiple of the device count and kept on the devices, rows split over
      # them; the padding rows are never returned (num_gallery).
      self._mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
      rows = -(-len(self) // self._mesh.size) * self._mesh.size
      self._gallery = jax.device_put(pad_rows(self.embeddings, rows),
                                     NamedSharding(self._mesh, P("data")))
    scores, ids = metrics.sharded_topk(vectors, self._gallery, k, mesh=self._mesh,
                                       gallery_axes="data", num_gallery=len(self))
    return scores, ids.astype(np.int64)

  # -- Files -------------------------------------------------------------------------------------

  def _chunk_file(self, name: str, suffix: str) -> str:
    return fs.join(self.path, CHUNKS, f"{name}.{suffix}")

  def _write_manifest(self) -> None:
    fs.write_text(fs.join(self.path, MANIFEST), json.dumps(self.manifest, indent=1))


def _read(source: _Source, item: _Item):
  """(pixels, path, captions), or the reason it could not be read (a string)."""
  try:
    return source.read(item)
  except api.ImageFileError as e:
    # Pillow names the in-memory buffer by its address; the reason is stored, so keep it the
    # same from run to run.
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file's bytes", str(e))


def format_results(results: Results, queries: Iterable[str]) -> Iterable[str]:
  """Lines `rank<TAB>score<TAB>path[<TAB>first caption]` under a `# query` line per query."""
  for q, query in enumerate(queries):
    yield f"# {query}"
    for rank, (score, path, captions) in enumerate(
        zip(results.scores[q], results.paths[q], results.captions[q]), 1):
      caption = f"\t{captions[0]}" if captions else ""
      yield f"{rank}\t{score:.4f}\t{path}{caption}"
