"""Mixture input speed: host-batch time of a mixture vs the one-source paths (a script).

  python benchmarks/bench_mixture.py [--data_dir DIR] [--batch 128] [--batches 10] [--rounds 3]

Builds the smoke demo set (experiments/demo.py:smoke's build options, 32 px) into DIR (default
a temporary directory) unless it is there, trains a small tokenizer on its captions, then times
`host_batch` (one process, one thread) of
  in_memory   the one-source in-memory path (pipeline.InMemoryBatches),
  streaming   the one-source streaming path (pipeline.make_host_loader, num_workers 0),
  mixture_1   a mixture of that one source (data/mixture.py),
  mixture_2   3:1 scenes (captions) and the "digits" split read as labels-as-text,
each in turn per round; prints the median seconds per batch of each as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coca_jax.core import config as config_lib  # pylint: disable=wrong-import-position
from coca_jax.data import builders, mixture, pipeline, sources as data_sources  # pylint: disable=wrong-import-position
from coca_jax.data.digit_scenes import DIGIT_NAMES  # pylint: disable=wrong-import-position
from coca_jax.data.tokenizer import Tokenizer  # pylint: disable=wrong-import-position
from coca_jax.evaluation import prompts  # pylint: disable=wrong-import-position

NAME = "digit_scenes"
# A label text the 64-piece smoke tokenizer keeps whole within max_len 12 ("a photo of a {}."
# falls apart into letters, and the run refuses cut label texts: mixture.check_label_texts).
LABEL_TEMPLATE = "a {}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  root = args.data_dir or tempfile.mkdtemp(prefix="bench_mixture_")
  config = config_lib.load_config("experiments/demo.py:smoke")
  data_dir = os.path.join(root, "tfds")
  if not builders.is_built(NAME, data_dir):
    builders.build_atomically("demo", NAME, data_dir,
                              **dict(config.data.build_demo_options, show_progress=False))
  tokenizer = os.path.join(root, "sp")
  if not os.path.exists(tokenizer + ".model"):
    source = data_sources.open_source(NAME, data_dir, "train", decode_images=False)
    captions = [c.decode() for i in range(len(source)) for c in source[i]["captions"]]
    Tokenizer.train(captions, tokenizer, vocab_size=64, model_type="bpe")
  config.data.update(data_dir=data_dir, tokenizer=tokenizer + ".model")
  config.train.batch_size = args.batch
  options = pipeline.DataOptions.from_config(config)

  makers = {
      "in_memory": lambda: pipeline.InMemoryBatches(options, pipeline.load_decoded(options)),
      "streaming": lambda: iter(pipeline.make_host_loader(options, shard_index=0,
                                                          shard_count=1)),
  }
  mixtures = {
      "mixture_1": [dict(name=NAME, weight=1.0)],
      "mixture_2": [dict(name=NAME, tag="scenes", weight=3.0),
                    dict(name=NAME, tag="digits", split="digits", weight=1.0, text="labels",
                         class_names=list(DIGIT_NAMES), templates=[LABEL_TEMPLATE])],
  }
  for key, sources in mixtures.items():
    config.data.sources = sources
    resolved = mixture.sources_of(config)
    makers[key] = (lambda resolved=resolved: mixture.MixtureBatches(
        options, resolved, class_names=prompts.class_names))
  readers = {key: make() for key, make in makers.items()}

  def batch(key, reader, n):
    return next(reader) if key == "streaming" else reader.host_batch(n, keys=False)

  times = {key: [] for key in readers}
  position = 0
  for _ in range(args.rounds):
    for key, reader in readers.items():
      batch(key, reader, position)  # warm
      start = time.perf_counter()
      for n in range(1, args.batches + 1):
        batch(key, reader, position + n)
      times[key].append((time.perf_counter() - start) / args.batches)
    position += args.batches + 1
  print(json.dumps({"batch": args.batch, "seconds_per_batch": {
      key: round(statistics.median(values), 4) for key, values in times.items()}}, indent=2))


if __name__ == "__main__":
  main()
