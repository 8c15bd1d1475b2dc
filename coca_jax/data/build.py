r"""Builds an image-caption dataset as TFDS array_record files.

  python -m coca_jax.data.build --format folder --src photos/ --name my_captions --data_dir ~/tfds \
      --eval_fraction 0.05
  python -m coca_jax.data.build --format webdataset --src laion_shards/ --name laion_subset \
      --data_dir ~/tfds --eval_src laion_eval_shards/ --max_image_side 512
  python -m coca_jax.data.build --format demo --name digit_scenes --data_dir ~/tfds

Formats (--src):
  folder      a folder of images (any depth; JPEG, PNG, WebP, ...) and ONE captions file beside
              them naming each image by its path relative to the folder, either
                captions.jsonl   one JSON object per line:
                                 {"image": "beach/0001.jpg", "caption": "a dog runs on the sand"}
                                 ("captions": ["...", "..."] gives several at once)
                captions.csv     a header line, then one row per caption:
                                 image,caption
                                 beach/0001.jpg,a dog runs on the sand
              An image named on several lines gets all of those captions.
  webdataset  tar shards as img2dataset writes them: 000000.tar holding KEY.jpg + KEY.txt (the
              caption) per sample; --src is a folder of *.tar, one tar, or a glob.
  demo        the digit-scenes demo data, made offline (no --src).
  text        texts only, for VLMo's text-only MLM stage (experiments/vlmo_base.py:stage=2):
              .txt files (one text a line) or .jsonl files (a "text" or "caption" field a
              line); --src is a file, a folder of them, or a glob. A bad line (not UTF-8, not
              JSON, no text field, empty) is skipped and counted, named by file and line.

--eval_fraction F holds out a stable fraction F of --src as the eval split "test" (what the
retrieval and captioning evals read; or give --eval_src). Then train on it:
  python -m coca_jax.train --config experiments/byo.py:name=my_captions,data_dir=~/tfds \
      --workdir /tmp/my_run

Shows a progress bar per split and ends with a report: examples written per split, inputs
skipped and why, images converted and how, captions dropped and why. The report is also saved
as `build_report.json` next to the data. See `coca_jax/data/builders.py` for the schema.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from coca_jax.core import console
from coca_jax.data import builders
from coca_jax.data import sources


format_report = builders.format_report


def build(format: str, name: str, data_dir: str, overwrite: bool = False,  # pylint: disable=redefined-builtin
          **options) -> tuple[str, dict[str, builders.SplitReport]]:
  """Builds the dataset (atomically: see `builders.build_atomically`); returns (dataset version
  folder, per-split report).

  Raises:
    FileExistsError: `data_dir/name` exists (a build, or anything else) and `overwrite` is
      False; with `overwrite` it is replaced once the new build has finished.
    ValueError: the source and `data_dir/name` overlap (even with `overwrite`).
    builders.EmptyBuildError: every input of a split was skipped (the message has the report).
  """
  version_dir = os.path.join(sources.local_data_dir(data_dir), name, builders.VERSION)
  if builders.is_built(name, data_dir) and not overwrite:
    raise FileExistsError(f"{version_dir} already holds a built dataset; pass --overwrite to "
                          "rebuild it or choose another --name")
  return builders.build_atomically(format, name, data_dir, overwrite=overwrite, **options)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m coca_jax.data.build",
                                   description=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--format", required=True, choices=builders.FORMATS)
  parser.add_argument("--name", required=True, help="TFDS dataset name (lower_snake_case)")
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write into")
  parser.add_argument("--src", help="folder (with captions.jsonl/.csv) or tar shards "
                      "(folder, file or glob); not used by --format demo")
  parser.add_argument("--eval_src", help="second source written as the eval split")
  parser.add_argument("--eval_fraction", type=float, default=0.0,
                      help="hold out this fraction of --src (stable, by key) as the eval split")
  parser.add_argument("--eval_split", default="test", help="name of the eval split")
  parser.add_argument("--max_image_side", type=int, default=0,
                      help="downscale images whose longer side exceeds this (0: keep size)")
  parser.add_argument("--allow_outside_src", action="store_true",
                      help="folder: read image paths of the captions file that lead outside "
                      "--src (absolute, ../, links); skipped and counted by default")
  parser.add_argument("--num_train", type=int, default=5000, help="demo: train scenes")
  parser.add_argument("--num_test", type=int, default=500, help="demo: test scenes")
  parser.add_argument("--num_digits", type=int, default=1000,
                      help="demo: single-digit canvases (split 'digits', zero-shot eval)")
  parser.add_argument("--num_train_digits", type=int, default=0,
                      help="demo: labelled single digits from the training scans (split "
                      "'train_digits', a labels-as-text training source)")
  parser.add_argument("--image_size", type=int, default=48, help="demo: canvas size in pixels")
  parser.add_argument("--seed", type=int, default=0, help="demo: generation seed")
  parser.add_argument("--overwrite", action="store_true", help="replace what is at DATA_DIR/NAME (once the new build has finished)")
  parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
  args = parser.parse_args(argv)

  if args.format == "demo":
    options = dict(num_train=args.num_train, num_test=args.num_test, num_digits=args.num_digits,
                   image_size=args.image_size, seed=args.seed,
                   num_train_digits=args.num_train_digits)
  else:
    if not args.src:
      parser.error(f"--format {args.format} needs --src (see the formats below --help)")
    for flag, src in (("--src", args.src), ("--eval_src", args.eval_src)):
      if src and not any(c in src for c in "*?[") and not os.path.exists(
          os.path.expanduser(src)):
        parser.exit(2, f"{parser.prog}: error: {flag} {src}: no such file or folder "
                    f"(from {os.getcwd()})\n")
    options = dict(src=args.src, eval_src=args.eval_src, eval_fraction=args.eval_fraction,
                   eval_split=args.eval_split, max_image_side=args.max_image_side,
                   allow_outside_src=args.allow_outside_src)
  # Our own bars have totals; the TFDS ones would interleave with them.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  try:
    # TFDS prints where it prepares the data: our temporary directory, renamed when done.
    with console.quiet_stdout():
      version_dir, report = build(args.format, args.name, args.data_dir, args.overwrite,
                                  show_progress=not args.no_progress, **options)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_report(args.name, report))
  print(f"Data in {version_dir} (report: build_report.json). Read it with "
        f"config.data.name={args.name!r}, config.data.data_dir={os.path.abspath(args.data_dir)!r}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
