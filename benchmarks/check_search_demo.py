"""Searches an index of the demo's held-out scenes by caption text and reports how often the
results' captions match the query, beside the retrieval eval's text-to-image recall@1.

  python -m coca_jax.index build --model /work/demo_run --images digit_scenes --split test \
      --data_dir /work/demo_run/tensorflow_datasets --out /tmp/demo.index
  python benchmarks/check_search_demo.py --index /tmp/demo.index [--queries "a red 3" ...]

Every distinct caption of the indexed scenes is a query (exact search). Printed:
  t2i_recall@1     the retrieval eval's figure, recomputed through the index: the fraction of
                   scenes whose own caption finds that scene first (identical captions compete);
  caption_match@1  the fraction of queries whose top result carries the query caption;
  caption_match@10 the fraction of the top 10 results that carry it (a query with fewer than
                   10 matching scenes cannot reach 1.0: the ceiling is printed beside it).
and the same two figures over the queries naming two red digits ("a red 4 left of a red 3").
Then the top 5 results of each --queries text (default: a one-digit caption, the most common
two-red-digit caption and a two-colour one), with their captions.
"""

import argparse
import collections
import re

import numpy as np

from coca_jax.inference import index as index_lib

TWO_RED = re.compile(r"^a red \d left of a red \d$")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--index", required=True)
  parser.add_argument("--queries", nargs="*", default=None)
  args = parser.parse_args()
  index = index_lib.Index.open(args.index)
  captions = [c[0] for c in index.captions]
  counts = collections.Counter(captions)
  distinct = sorted(counts)
  k = min(10, len(index))

  own = index.search(texts=captions, k=1, exact=True)
  recall1 = float(np.mean(own.ids[:, 0] == np.arange(len(index))))
  found = index.search(texts=distinct, k=k, exact=True)
  match = np.asarray([[c[0] == q for c in row] for q, row in zip(distinct, found.captions)])
  ceiling = np.mean([min(counts[q], k) / k for q in distinct])
  two_red = np.asarray([bool(TWO_RED.match(q)) for q in distinct])
  two_red_ceiling = np.mean([min(counts[q], k) / k for q in np.asarray(distinct)[two_red]])
  print(f"{len(index)} scenes, {len(distinct)} distinct captions")
  print(f"t2i_recall@1 {recall1:.3f}  caption_match@1 {match[:, 0].mean():.3f}  "
        f"caption_match@10 {match.mean():.3f} (ceiling {ceiling:.3f})")
  print(f"two red digits ({two_red.sum()} queries): caption_match@1 "
        f"{match[two_red, 0].mean():.3f}  caption_match@10 {match[two_red].mean():.3f} "
        f"(ceiling {two_red_ceiling:.3f})")
  queries = args.queries
  if queries is None:
    by_count = sorted(distinct, key=lambda q: -counts[q])
    queries = [next(q for q in by_count if " left of " not in q and "red" in q),
               next(q for q in by_count if TWO_RED.match(q)),
               next(q for q in by_count if " left of " in q and not TWO_RED.match(q))]
  results = index.search(texts=queries, k=5, exact=True)
  for line in index_lib.format_results(results, queries):
    print(line)


if __name__ == "__main__":
  main()
