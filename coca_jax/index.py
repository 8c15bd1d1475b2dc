r"""Builds a search index of images and queries it by text or by image.

  python -m coca_jax.index build --model PATH --images FOLDER --out INDEX
      [--dtype float16] [--ann auto|faiss|none] [--batch_size 64] [--chunk_size 4096]
  python -m coca_jax.index build --model PATH --images DATASET --split test --data_dir DIR \
      --out INDEX        # a dataset built by coca_jax.data.build (or TFDS array_record)
  python -m coca_jax.index query --index INDEX --text "a red car" [--text ...] [--k 10]
  python -m coca_jax.index query --index INDEX --image FILE [--exact] [--json]

build: embeds every image under FOLDER (recursively) with a progress bar, batched and split
over every device, into chunks of --chunk_size images. Killed, the same command continues where
it stopped; on an existing index it appends the images not in it yet (the old ones are not
embedded again). Unreadable files are skipped, each named with the reason on stderr, and
counted. An ANN index (faiss: 4-bit product-quantised scan + exact re-rank, `pip install
'coca_jax[search]'`) is built from 20,000 images up with --ann auto; exact search works
without it.
query: prints, per query, `rank<TAB>score<TAB>path` (and a dataset's first caption) best first,
or one JSON object per query with --json. The query is embedded with the model the index was
built with; --model another model is refused.
Bad paths and a refused model exit with status 2 and one line naming the problem.
"""

from __future__ import annotations

from coca_jax.core import runtime

if __name__ == "__main__":  # Before JAX starts (python -m); see coca_jax/core/runtime.py.
  runtime.preload_allocator()

import json
import os
import sys

from absl import app, flags

from coca_jax.core import cli
from coca_jax.core import console
from coca_jax.inference import api
from coca_jax.inference import index as index_lib
from coca_jax.interop import pretrained

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "build: workdir, checkpoint step directory, export bundle "
                    "or published name (coca_jax.list_pretrained()). "
                    "query: optional, must be the index's own model.")
flags.DEFINE_string("images", None, "build: a folder of images, or a dataset name (with "
                    "--split and --data_dir).")
flags.DEFINE_string("split", None, "build from a dataset: its split (e.g. test).")
flags.DEFINE_string("data_dir", None, "build from a dataset: the TFDS data_dir it was built in.")
flags.DEFINE_string("out", None, "build: the index directory (an existing index is continued).")
flags.DEFINE_string("index", None, "query: the index directory.")
flags.DEFINE_multi_string("text", [], "query: a text query (repeatable).")
flags.DEFINE_multi_string("image", [], "query: an image file query (repeatable).")
flags.DEFINE_integer("k", 10, "query: results per query.")
flags.DEFINE_bool("exact", False, "query: exact search even where there is an ANN index.")
flags.DEFINE_bool("json", False, "query: one JSON object per query instead of TSV lines.")
flags.DEFINE_enum("dtype", "float32", list(index_lib.DTYPES), "build: stored embedding dtype.")
flags.DEFINE_enum("ann", "auto", list(index_lib.ANN_CHOICES), "build: the ANN index (auto: from 20,000 images up).")
flags.DEFINE_integer("batch_size", 64, "build: images per device call.")
flags.DEFINE_integer("chunk_size", 4096, "build: images per chunk file (the most a kill loses).")
flags.DEFINE_bool("progress", True, "build: a progress bar on stderr.")

USAGE = ("usage: python -m coca_jax.index build --model M --images DIR_OR_DATASET --out INDEX\n"
         "       python -m coca_jax.index query --index INDEX (--text T | --image FILE) [--k 10]")


def images_argument():
  """--images as `Index.build` takes it: a folder/file, or a Dataset."""
  images = FLAGS.images
  if FLAGS.split or FLAGS.data_dir:
    if not FLAGS.split or not FLAGS.data_dir:
      raise FileNotFoundError(f"--images {images} with --split/--data_dir reads a dataset: pass "
                              "both --split and --data_dir")
    return index_lib.Dataset(images, FLAGS.split, FLAGS.data_dir)
  if not os.path.exists(images):
    raise FileNotFoundError(f"--images {images} does not exist; pass a folder of images, or a "
                            "dataset name with --split and --data_dir")
  return images


def build() -> None:
  if not FLAGS.model or not FLAGS.images or not FLAGS.out:
    raise app.UsageError("build needs --model, --images and --out\n" + USAGE)
  images = images_argument()
  index = index_lib.Index.build(pretrained.ensure_or_exit(FLAGS.model), images, FLAGS.out, dtype=FLAGS.dtype,
                                chunk_size=FLAGS.chunk_size, batch_size=FLAGS.batch_size,
                                ann=FLAGS.ann, progress=FLAGS.progress)
  report = index.last_build
  ann = index.manifest["ann"]
  print(f"{index.path}: {len(index)} images ({report.embedded} embedded now, {report.already} "
        f"already in the index) in {report.seconds:.1f} s; "
        f"{'ANN index over ' + str(ann['count']) if ann else 'exact search only'}")
  if report.ignored:
    print(f"ignored {report.ignored} files without an image suffix "
          f"({', '.join(api.IMAGE_SUFFIXES)})", file=sys.stderr)
  if report.skipped:
    print(f"skipped {len(report.skipped)} unreadable images (each named above)", file=sys.stderr)


def query() -> None:
  if not FLAGS.index or bool(FLAGS.text) == bool(FLAGS.image):
    raise app.UsageError("query needs --index and either --text or --image\n" + USAGE)
  for path in FLAGS.image:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--image {path} does not exist")
  model = FLAGS.model and pretrained.ensure_or_exit(FLAGS.model)
  index = index_lib.Index.open(FLAGS.index, model)
  queries = FLAGS.text or FLAGS.image
  results = index.search(texts=FLAGS.text or None, images=FLAGS.image or None, k=FLAGS.k,
                         exact=FLAGS.exact or None)
  if FLAGS.json:
    for q, query_text in enumerate(queries):
      print(json.dumps({"query": query_text, "results": [
          {"path": p, "score": float(s), "id": int(i), **({"captions": c} if c else {})}
          for p, s, i, c in zip(results.paths[q], results.scores[q], results.ids[q],
                                results.captions[q])]}))
  else:
    for line in index_lib.format_results(results, queries):
      print(line)


def main(argv) -> None:
  console.setup()
  if len(argv) != 2 or argv[1] not in ("build", "query"):
    raise app.UsageError(USAGE)
  try:
    build() if argv[1] == "build" else query()
  except (FileNotFoundError, FileExistsError, index_lib.SearchIndexError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  runtime.preload_allocator()  # Console scripts.
  cli.run(main)


if __name__ == "__main__":
  run()
