"""Approximate nearest-neighbour structures against exact search, on random unit vectors.

  PYTHONPATH=. python benchmarks/bench_index.py [--num 100000] [--dim 512] [--queries 1000]
      [--k 10] [--threads 1] [--backends coca_jax,scann_ah,...] [--near_cosine 0.8]

Random unit vectors (Gaussian, normalised) are the hard case for an ANN index: no clusters, and
every distance close to every other. The exact reference is the index's exact search
(`Index.exact_search`: `metrics.sharded_topk`, a jitted matmul + top_k with the gallery kept on
the devices), itself checked against numpy on every run. For each back end, and for each
search-effort setting, it prints build time (wall and process CPU seconds: on a shared machine
CPU-s is the steadier figure), batched query time per query (wall and CPU-ms), single-query
latency (median of 100 one-query calls) and recall@k against exact (the fraction of the exact
top-k ids the ANN returns), for random queries and ("near") for queries at --near_cosine to a
random gallery row. `coca_jax` is the index's own ANN back end (`coca_jax.inference.index
.QuantizedAnn`, what `python -m coca_jax.index build` writes; effort = candidates re-ranked);
the others are the libraries called directly with the settings shown. A library that is not
installed is reported and skipped. PYTHONPATH=. makes `coca_jax` this checkout's.
Results: docs/search.md.
"""

import argparse
import os
import statistics
import time

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from coca_jax.evaluation import metrics
from coca_jax.inference import index as index_lib


def unit_vectors(num: int, dim: int, seed: int) -> np.ndarray:
  x = np.random.default_rng(seed).standard_normal((num, dim), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_searcher(data):
  """The index's exact search over `data` (gallery placed on the devices once)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  rows = -(-len(data) // mesh.size) * mesh.size
  gallery = jax.device_put(index_lib.pad_rows(data, rows), NamedSharding(mesh, P("data")))
  return lambda queries, k: metrics.sharded_topk(queries, gallery, k, mesh=mesh,
                                                 gallery_axes="data", num_gallery=len(data))[1]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
  k = exact.shape[1]
  return float(np.mean([len(set(f[:k]) & set(e)) / k for f, e in zip(found, exact)]))


# Each back end: build(data, threads) -> searcher; searcher.set(effort); searcher(queries, k)
# -> int ids [Q, k]. `efforts` are the search-effort settings swept (higher = slower, better).


class UsearchRaw:
  name, efforts = "usearch", (128, 256, 512)

  def __init__(self, data, threads, dtype="f32", connectivity=32, expansion_add=128):
    from usearch.index import Index
    self.threads = threads
    self.index = Index(ndim=data.shape[1], metric="ip", dtype=dtype, connectivity=connectivity,
                       expansion_add=expansion_add)
    self.index.add(np.arange(len(data)), data, threads=threads)

  def set(self, effort):
    self.index.expansion_search = effort

  def __call__(self, queries, k):
    return np.asarray(self.index.search(queries, k, threads=self.threads).keys)


class UsearchF16(UsearchRaw):
  name = "usearch_f16"

  def __init__(self, data, threads):
    super().__init__(data, threads, dtype="f16")


class CocaJax:
  """The index's own back end, as `Index` builds and searches it (`QuantizedAnn`: 4-bit PQ
  fast scan, the best `effort` re-ranked exactly)."""
  name, efforts = "coca_jax", (200, 300, 500, 1000)

  def __init__(self, data, threads):
    import faiss
    if threads:
      faiss.omp_set_num_threads(threads)
    self.data = data
    self.ann = index_lib.QuantizedAnn.build(data)

  def set(self, effort):
    self.ann.rerank = effort

  def __call__(self, queries, k):
    return self.ann.search(queries, k, self.data)[1]


class UsearchIndex(UsearchRaw):
  """usearch HNSW as the index used it before (connectivity 32, expansion_add 128)."""
  name = "usearch_index"


class FaissHnsw:
  name, efforts = "faiss_hnsw", (128, 256, 512)

  def __init__(self, data, threads):
    import faiss
    if threads:
      faiss.omp_set_num_threads(threads)
    self.index = faiss.IndexHNSWFlat(data.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    self.index.hnsw.efConstruction = 128
    self.index.add(data)

  def set(self, effort):
    self.index.hnsw.efSearch = effort

  def __call__(self, queries, k):
    return self.index.search(queries, k)[1]


class FaissIvf:
  name, efforts = "faiss_ivf", (32, 64, 128, 256)

  def __init__(self, data, threads):
    import faiss
    if threads:
      faiss.omp_set_num_threads(threads)
    lists = int(4 * np.sqrt(len(data)))
    self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(data.shape[1]), data.shape[1], lists,
                                    faiss.METRIC_INNER_PRODUCT)
    self.index.train(data)
    self.index.add(data)

  def set(self, effort):
    self.index.nprobe = effort

  def __call__(self, queries, k):
    return self.index.search(queries, k)[1]


class Hnswlib:
  name, efforts = "hnswlib", (128, 256, 512)

  def __init__(self, data, threads):
    import hnswlib
    self.index = hnswlib.Index(space="ip", dim=data.shape[1])
    self.index.init_index(max_elements=len(data), M=32, ef_construction=128)
    self.index.set_num_threads(threads or os.cpu_count())
    self.index.add_items(data, np.arange(len(data)))

  def set(self, effort):
    self.index.set_ef(effort)

  def __call__(self, queries, k):
    return self.index.knn_query(queries, k)[0]


class Scann:
  """Partitioning (sqrt(N)*2 leaves) + anisotropic hashing + exact re-ranking of the top 100;
  the effort is the number of leaves searched."""
  name, efforts = "scann", (32, 64, 128, 256)

  def __init__(self, data, threads):
    import scann
    leaves = int(2 * np.sqrt(len(data)))
    builder = scann.scann_ops_pybind.builder(data, 10, "dot_product")
    self.searcher = (builder.tree(num_leaves=leaves, num_leaves_to_search=64,
                                  training_sample_size=min(len(data), 100_000))
                     .score_ah(2, anisotropic_quantization_threshold=0.2)
                     .reorder(100).set_n_training_threads(threads or os.cpu_count()).build())
    self.leaves = 64

  def set(self, effort):
    self.leaves = effort

  def __call__(self, queries, k):
    if len(queries) == 1:
      return self.searcher.search(queries[0], k, leaves_to_search=self.leaves,
                                  pre_reorder_num_neighbors=100)[0][None]
    return self.searcher.search_batched(queries, k, leaves_to_search=self.leaves,
                                        pre_reorder_num_neighbors=100)[0]


class ScannAh:
  """ScaNN without partitioning: every vector scored by anisotropic hashing (2 dims per 4-bit
  code), the best `effort` re-ranked exactly."""
  name, efforts = "scann_ah", (100, 200, 400, 800)

  def __init__(self, data, threads):
    import scann
    builder = scann.scann_ops_pybind.builder(data, 10, "dot_product")
    self.searcher = (builder.score_ah(2, anisotropic_quantization_threshold=0.2)
                     .reorder(800).set_n_training_threads(threads or os.cpu_count()).build())
    self.reorder = 100

  def set(self, effort):
    self.reorder = effort

  def __call__(self, queries, k):
    if len(queries) == 1:
      return self.searcher.search(queries[0], k,
                                  pre_reorder_num_neighbors=self.reorder)[0][None]
    return self.searcher.search_batched(queries, k, pre_reorder_num_neighbors=self.reorder)[0]


class FaissFactory:
  """A faiss index_factory string over inner product; ",RFlat" = exact re-ranking of the best
  k * k_factor candidates (the effort). IVF strings are searched with `nprobe`."""
  efforts = (10, 20, 50, 100)

  def __init__(self, data, threads, spec, nprobe=None):
    import faiss
    self.faiss = faiss
    if threads:
      faiss.omp_set_num_threads(threads)
    self.index = faiss.index_factory(data.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    self.index.train(data)
    self.index.add(data)
    self.nprobe = nprobe
    self.params = None

  def set(self, effort):
    params = self.faiss.IndexRefineSearchParameters()
    params.k_factor = effort
    if self.nprobe:
      base = self.faiss.SearchParametersIVF()
      base.nprobe = self.nprobe
      params.base_index_params = base
      self._keep = base  # the C++ object holds only a pointer to it
    self.params = params

  def __call__(self, queries, k):
    return self.index.search(queries, k, params=self.params)[1]


def faiss_factory(name, spec, efforts=FaissFactory.efforts, nprobe=None):
  return type(name, (FaissFactory,), {
      "name": name, "efforts": efforts,
      "__init__": lambda self, data, threads: FaissFactory.__init__(self, data, threads, spec,
                                                                    nprobe)})


class UsearchDense(UsearchRaw):
  name, efforts = "usearch_dense", (512, 1024, 2048)

  def __init__(self, data, threads):
    super().__init__(data, threads, connectivity=64, expansion_add=256)


BACKENDS = {b.name: b for b in (
    CocaJax, UsearchIndex, UsearchRaw, UsearchF16, UsearchDense, FaissHnsw, FaissIvf, Hnswlib, Scann, ScannAh,
    faiss_factory("faiss_pq128fs_refine", "PQ128x4fs,RFlat"),
    faiss_factory("faiss_pq256fs_refine", "PQ256x4fs,RFlat"),
    faiss_factory("faiss_sq4_refine", "SQ4,RFlat", efforts=(2, 5, 10, 20)),
    faiss_factory("faiss_sq8", "SQ8,RFlat", efforts=(1, 2, 5)),
    faiss_factory("faiss_ivf_pq256fs_refine", "IVF1024,PQ256x4fs,RFlat", efforts=(20, 50),
                  nprobe=256),
)}


def single_query_ms(search, queries, k, calls=100) -> float:
  times = []
  for q in queries[:calls]:
    start = time.perf_counter()
    search(q[None], k)
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def near_queries(data: np.ndarray, num: int, cosine: float, seed: int) -> np.ndarray:
  """Queries near gallery points (a real retrieval query resembles some images): a random
  gallery row turned away from itself by a random direction, to `cosine` with it."""
  rng = np.random.default_rng(seed)
  rows = data[rng.choice(len(data), num, replace=False)]
  noise = rng.standard_normal(rows.shape, dtype=np.float32)
  noise -= np.sum(noise * rows, axis=1, keepdims=True) * rows  # orthogonal to the row
  noise /= np.linalg.norm(noise, axis=1, keepdims=True)
  return cosine * rows + np.sqrt(1 - cosine**2) * noise


def timed_row(label, search, warm_queries, queries, k, exact=None, build=0.0, cpu=0.0,
              near=None):
  """Warms `search` on `warm_queries`, times it batched (wall and process CPU) and one query
  at a time, prints one row; returns what the batched search found. Recall is against `exact`
  (itself if None); `near` = (queries near gallery points, their exact ids): a second recall."""
  search(warm_queries, k)
  start, cpu_start = time.perf_counter(), time.process_time()
  found = search(queries, k)
  batched, batched_cpu = time.perf_counter() - start, time.process_time() - cpu_start
  single = single_query_ms(search, queries, k)
  recall_at_k = 1.0 if exact is None else recall(found, exact)
  near_text = ""
  if near is not None:
    near_text = f"  near {recall(search(near[0], k), near[1]) if exact is not None else 1:.3f}"
  print(f"{label:32s} build {build:6.1f} s {cpu:7.1f} CPU-s  batched "
        f"{1e3 * batched / len(queries):7.3f} ms/query ({1e3 * batched_cpu / len(queries):7.3f} "
        f"CPU-ms)  single {single:7.2f} ms  recall@{k} {recall_at_k:.3f}{near_text}", flush=True)
  return found


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num", type=int, default=100_000)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--threads", type=int, default=0, help="0 = every core")
  parser.add_argument("--near_cosine", type=float, default=0.8,
                      help="the second recall column: queries at this cosine to a gallery row")
  parser.add_argument("--backends", default=",".join(BACKENDS))
  args = parser.parse_args()
  data = unit_vectors(args.num, args.dim, seed=0)
  queries = unit_vectors(args.queries, args.dim, seed=1)
  near = near_queries(data, args.queries, args.near_cosine, seed=2)
  print(f"{args.num:,} x {args.dim} random unit vectors, {args.queries} random queries and "
        f"{args.queries} at cosine {args.near_cosine} to a gallery row, k={args.k}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")

  exact_search = exact_searcher(data)
  exact_search(queries[:1], args.k)  # compile both shapes before timing
  exact = timed_row("exact", exact_search, queries, queries, args.k)
  exact_near = exact_search(near, args.k)
  # The reference itself, checked against numpy on a few queries (ties aside, the same ids).
  for q, ids in ((queries, exact), (near, exact_near)):
    expected = np.argsort(-(q[:20] @ data.T), axis=1)[:, :args.k]
    assert recall(ids[:20], expected) == 1.0, "exact search disagrees with numpy"

  for name in args.backends.split(","):
    try:
      start, cpu = time.perf_counter(), time.process_time()
      searcher = BACKENDS[name](data, args.threads)
      build, cpu = time.perf_counter() - start, time.process_time() - cpu
    except ImportError as e:
      print(f"{name:32s} skipped: {e}")
      continue
    for effort in BACKENDS[name].efforts:
      searcher.set(effort)
      timed_row(f"{name} effort={effort}", searcher, queries[:10], queries, args.k, exact,
                build, cpu, near=(near, exact_near))


if __name__ == "__main__":
  main()
