r"""Builds an image-caption dataset as TFDS array_record files.

  python -m coca_jax.data.build --format demo --name digit_scenes --data_dir ~/tfds
  python -m coca_jax.data.build --format folder --src photos/ --name my_captions --data_dir ~/tfds \
      --eval_fraction 0.02
  python -m coca_jax.data.build --format webdataset --src laion_shards/ --name laion_subset \
      --data_dir ~/tfds --eval_src laion_eval_shards/ --max_image_side 512

Shows a progress bar per split and ends with a report: examples written per split, inputs
skipped and why, images converted and how, captions dropped and why. The report is also saved
as `build_report.json` next to the data. See `coca_jax/data/builders.py` for the formats.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Sequence

from coca_jax.core import console
from coca_jax.data import builders


format_report = builders.format_report


def build(format: str, name: str, data_dir: str, overwrite: bool = False,  # pylint: disable=redefined-builtin
          **options) -> tuple[str, dict[str, builders.SplitReport]]:
  """Builds the dataset (atomically: see `builders.build_atomically`); returns (dataset version
  folder, per-split report).

  Raises:
    FileExistsError: the dataset version exists and `overwrite` is False.
    builders.EmptyBuildError: every input of a split was skipped (the message has the report).
  """
  version_dir = os.path.join(builders.local_data_dir(data_dir), name, builders.VERSION)
  if builders.is_built(name, data_dir):
    if not overwrite:
      raise FileExistsError(f"{version_dir} already holds a built dataset; pass --overwrite to "
                            "rebuild it or choose another --name")
    shutil.rmtree(os.path.dirname(version_dir))
  return builders.build_atomically(format, name, data_dir, **options)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m coca_jax.data.build",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
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
  parser.add_argument("--image_size", type=int, default=48, help="demo: canvas size in pixels")
  parser.add_argument("--seed", type=int, default=0, help="demo: generation seed")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing build")
  parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
  args = parser.parse_args(argv)

  if args.format == "demo":
    options = dict(num_train=args.num_train, num_test=args.num_test, num_digits=args.num_digits,
                   image_size=args.image_size, seed=args.seed)
  else:
    if not args.src:
      parser.error(f"--format {args.format} needs --src")
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
