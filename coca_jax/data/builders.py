"""TFDS builders that write image-caption datasets as `array_record` (no TensorFlow needed).

Three input formats, one schema, read back with `sources.open_source` (or `tfds.data_source`):

  demo        digit scenes made offline from scikit-learn's bundled digits (`digit_scenes.py`);
              splits "train", "test" (scenes) and "digits" (one digit per canvas, with `label`,
              for zero-shot classification); with num_transfer > 0 also "mnist_on_white" and
              "mnist_on_black" (num_transfer of the MNIST sample's 4,000 "test" digits, from
              another package, with `label`: the transfer eval; never read by the train split).
  folder      a folder of images plus `captions.jsonl` ({"image": "rel/path.jpg", "caption": "..."}
              per line; "captions": [...] also accepted) or `captions.csv` (header `image,caption`).
              Several lines may name the same image: its captions are grouped into one example.
  webdataset  tar shards as written by img2dataset (`000000.tar` holding `KEY.jpg` + `KEY.txt`
              pairs; `.json` and other members are ignored). `src` is a folder of `*.tar`, a
              single tar, or a glob.
  text        texts only (VLMo's stage-2 corpus): .txt files (a text a line) or .jsonl (a "text"
              or "caption" field a line); `src` is a file, a folder of them, or a glob. Its
              examples have no "image" (and `key` is "file:line").

Schema of every example (what `open_source` returns per index):
  image     uint8 [height, width, 3] (or the encoded bytes with decode_images=False)
  captions  list of bytes (UTF-8), at least one, whitespace-normalised, never empty
  key       bytes: relative image path (folder), "shard/key" (webdataset), "split/index" (demo)
  label     int64, demo only: the digit of a "digits" example, -1 for scenes

Bad input never stops a build and is never dropped silently: unreadable/corrupt images,
missing files, empty or non-UTF-8 captions, malformed lines, truncated tar shards are skipped
and counted by reason; grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit, EXIF-
rotated images are converted to 8-bit RGB and counted. The counts are in `builder.report`.

Why our own image check instead of letting TFDS encode numpy arrays: TFDS encodes numpy images
with TensorFlow. We hand it already-encoded bytes (the original file when it is a plain 8-bit RGB
JPEG/PNG/WebP, else a PNG/JPEG re-encode by Pillow), which TFDS stores as-is without TF.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import glob
import hashlib
import inspect
import io
import json
import os
import posixpath
import shutil
import socket
import stat
import tarfile
import tempfile
import types
from typing import Any, Iterator

from absl import logging
import numpy as np
from PIL import Image, ImageOps
import tensorflow_datasets as tfds
from tqdm import tqdm

from coca_jax.data import sources
from coca_jax.data.digit_scenes import TRANSFER_SPLITS

FORMATS = ("demo", "folder", "webdataset", "text")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Originals in these formats are stored byte-for-byte when already 8-bit RGB.
_KEEP_FORMATS = ("JPEG", "PNG", "WEBP")
_EXAMPLES_PER_REASON = 5  # how many offending keys the report lists per reason


class SkipExample(Exception):
  """An input that cannot become an example; `reason` is the report category."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass
class SplitReport:
  """What happened to the inputs of one split."""
  written: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  converted: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  dropped_captions: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def skip(self, reason: str, where: str) -> None:
    self.skipped[reason] += 1
    listed = self.skipped_examples.setdefault(reason, [])
    if len(listed) < _EXAMPLES_PER_REASON:
      listed.append(where)

  def to_json(self) -> dict[str, Any]:
    return {"written": self.written, "skipped": dict(self.skipped),
            "converted": dict(self.converted), "dropped_captions": dict(self.dropped_captions),
            "skipped_examples": self.skipped_examples}


# ----------------------------------------------------------------------------------------------
# Input validation shared by all formats.
# ----------------------------------------------------------------------------------------------

def clean_caption(raw: bytes | str) -> str:
  """Whitespace-normalised caption; raises SkipExample for non-UTF-8 or empty text."""
  if isinstance(raw, bytes):
    try:
      raw = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise SkipExample("non-UTF-8 caption", str(e)) from None
  elif not isinstance(raw, str):
    raise SkipExample("caption is not a string", repr(raw)[:80])
  else:
    try:  # Text read with errors="surrogateescape" carries undecodable bytes as surrogates.
      raw.encode("utf-8")
    except UnicodeEncodeError as e:
      raise SkipExample("non-UTF-8 caption", str(e)) from None
  caption = " ".join(raw.split())
  if not caption:
    raise SkipExample("empty caption")
  return caption


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
  """Converts any Pillow mode to 8-bit RGB; returns (image, conversion label)."""
  mode = image.mode
  if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
    # Transparent pixels carry arbitrary colour values; white is what viewers show.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode} composited on white"
  if mode.startswith("I") or mode == "F":
    pixels = np.asarray(image).astype(np.float64)
    if mode == "F" and pixels.max(initial=0) <= 1.0:
      pixels = pixels * 255.0
    elif mode != "F" and (mode.startswith("I;16") or pixels.max(initial=0) > 255):
      pixels = pixels / 257.0  # 65535 -> 255
    gray = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB"), f"{mode} (16/32-bit) to 8-bit RGB"
  return image.convert("RGB"), f"{mode} to RGB"


def prepare_image(raw: bytes, max_image_side: int = 0) -> tuple[bytes, list[str]]:
  """Validates encoded image bytes and returns bytes TFDS can store as an 8-bit RGB image.

  Args:
    raw: the file's bytes.
    max_image_side: if > 0, images whose longer side exceeds it are downscaled (bicubic).

  Returns:
    (image bytes, list of conversions applied; empty when the original bytes are kept).

  Raises:
    SkipExample: the bytes are not a decodable image.
  """
  try:
    image = Image.open(io.BytesIO(raw))
    image.load()  # Full decode: catches truncated files that open() alone accepts.
  except Image.DecompressionBombError as e:
    raise SkipExample("image too large", str(e)) from None
  except Exception as e:  # pylint: disable=broad-except  # Pillow raises many types on bad data.
    raise SkipExample("unreadable image", f"{type(e).__name__}: {e}") from None
  source_format = image.format
  conversions = []
  try:
    orientation = image.getexif().get(0x0112, 1)
  except Exception:  # pylint: disable=broad-except  # a broken EXIF block is not worth a skip
    orientation = 1
  if orientation not in (1, None):
    image = ImageOps.exif_transpose(image)
    conversions.append("EXIF orientation applied")
  if image.mode != "RGB":
    image, label = _to_rgb(image)
    conversions.append(label)
  if max_image_side and max(image.size) > max_image_side:
    scale = max_image_side / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    conversions.append("downscaled to max_image_side")
  if not conversions and source_format in _KEEP_FORMATS:
    return raw, []
  if not conversions:
    conversions.append(f"{source_format} re-encoded")
  buffer = io.BytesIO()
  if source_format == "JPEG":  # lossy stays lossy (size), lossless stays lossless
    image.save(buffer, format="JPEG", quality=95)
  else:
    image.save(buffer, format="PNG")
  return buffer.getvalue(), conversions


def _in_eval_holdout(key: str, eval_fraction: float) -> bool:
  """Stable pseudo-random split by key, independent of input order and of Python's hash seed."""
  digest = hashlib.md5(key.encode("utf-8", "surrogateescape")).digest()
  return int.from_bytes(digest[:8], "little") / 2.0**64 < eval_fraction


# ----------------------------------------------------------------------------------------------
# Builders.
# ----------------------------------------------------------------------------------------------

class _CaptionBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common schema, array_record output, per-split reports and progress bars."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, data_dir: str, show_progress: bool = True, **kwargs):
    self.report: dict[str, SplitReport] = {}
    self.show_progress = show_progress
    super().__init__(data_dir=data_dir, file_format="array_record", **kwargs)

  def _extra_features(self) -> dict[str, Any]:
    return {}

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        # Shape (None, None, 3): the stored bytes always decode to 8-bit RGB (prepare_image).
        "image": tfds.features.Image(shape=(None, None, 3)),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "key": tfds.features.Text(),
        **self._extra_features(),
    }
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(features))

  def _split_names(self) -> list[str]:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: all inputs are local.
    return {split: self._generate_examples(split) for split in self._split_names()}

  def _progress(self, iterable, split: str, total: int | None = None, unit: str = "images"):
    return tqdm(iterable, total=total, unit=f" {unit}", desc=f"{self.name}/{split}",
                disable=not self.show_progress, leave=True, dynamic_ncols=True)

  def _new_report(self, split: str) -> SplitReport:
    self.report[split] = SplitReport()
    return self.report[split]


class DemoBuilder(_CaptionBuilder, skip_registration=True):
  """Digit scenes (real scikit-learn digits, coloured, 1-2 per canvas) with position captions."""

  def __init__(self, *, data_dir: str, num_train: int = 5000, num_test: int = 500,
               num_digits: int = 1000, image_size: int = 48, seed: int = 0, grid: int = 0,
               variation: float = 0.0, strokes: float = 0.0, varied_grid: int = -1,
               varied_single: float = -1.0, num_transfer: int = 0, num_train_digits: int = 0,
               varied_train_digits: bool = False, **kwargs):
    # "train_digits": labelled single digits drawn from the TRAINING scans, a labelled source
    # to train on as text (experiments/demo.py:mixture); "digits" (the zero-shot eval) draws
    # from the held-out scans only. varied_train_digits: drawn varied (each a large stroke
    # digit anywhere, any polarity and ink) instead of as the scenes draw them.
    self.num_per_split = {"train": num_train, "test": num_test, "digits": num_digits,
                          "train_digits": num_train_digits,
                          **{split: num_transfer for split in TRANSFER_SPLITS}}
    self.image_size = image_size
    self.grid = grid
    self.variation = variation
    self.strokes = strokes
    self.varied_grid = varied_grid
    self.varied_single = varied_single
    self.varied_train_digits = varied_train_digits
    self.seed = seed
    super().__init__(data_dir=data_dir, **kwargs)

  def _extra_features(self):
    return {"label": tfds.features.Tensor(shape=(), dtype=np.int64)}

  def _split_names(self):
    return [split for split, num in self.num_per_split.items() if num > 0]

  def _generate_examples(self, split):
    from coca_jax.data import digit_scenes  # heavy: pulls in scikit-learn.

    report = self._new_report(split)
    num = self.num_per_split[split]
    if split in TRANSFER_SPLITS:
      data = digit_scenes.make_transfer_digits(num, self.seed, image_size=self.image_size,
                                               background=TRANSFER_SPLITS[split])
      labels = data["label"]
    elif split == "train_digits" and self.varied_train_digits:
      data = digit_scenes.make_single_digits("train", num, self.seed, image_size=self.image_size,
                                             grid=self.grid, variation=1.0, strokes=1.0,
                                             varied_grid=0)
      labels = data["label"]
    elif split in ("digits", "train_digits"):
      data = digit_scenes.make_single_digits("test" if split == "digits" else "train", num,
                                             self.seed, image_size=self.image_size,
                                             grid=self.grid, variation=self.variation,
                                             strokes=self.strokes, varied_grid=self.varied_grid)
      labels = data["label"]
    else:
      data = digit_scenes.make_scenes(split, num, self.seed, image_size=self.image_size,
                                      grid=self.grid, variation=self.variation,
                                      strokes=self.strokes, varied_grid=self.varied_grid,
                                      varied_single=self.varied_single)
      labels = np.full((num,), -1)
    for index in self._progress(range(num), split, total=num):
      buffer = io.BytesIO()
      Image.fromarray(data["image"][index]).save(buffer, format="PNG")
      report.written += 1
      key = f"{split}/{index:06d}"
      yield key, {"image": buffer.getvalue(), "captions": list(data["captions"][index]), "key": key,
                  "label": int(labels[index])}


class _FileBuilder(_CaptionBuilder, skip_registration=True):
  """Shared options of the user-data formats: eval split from a second source or a holdout."""

  def __init__(self, *, data_dir: str, src: str, eval_src: str | None = None,
               eval_fraction: float = 0.0, eval_split: str = "test",
               max_image_side: int = 0, allow_outside_src: bool = False, **kwargs):
    if eval_src and eval_fraction:
      raise ValueError("give either eval_src (a second folder/shards for the eval split) or "
                       "eval_fraction (hold out part of src), not both")
    if not 0.0 <= eval_fraction < 1.0:
      raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    self.src = src
    self.eval_src = eval_src
    self.eval_fraction = eval_fraction
    self.eval_split = eval_split
    self.max_image_side = max_image_side
    self.allow_outside_src = allow_outside_src
    super().__init__(data_dir=data_dir, **kwargs)

  def _encode_counted(self, raw: bytes, report: "SplitReport", where: str) -> bytes | None:
    """Validated/converted image bytes, with the report's counts updated; None if skipped."""
    try:
      image_bytes, conversions = prepare_image(raw, self.max_image_side)
    except SkipExample as e:
      report.skip(e.reason, where)
      return None
    for conversion in conversions:
      report.converted[conversion] += 1
    report.written += 1
    return image_bytes

  def _split_names(self):
    splits = ["train"]
    if self.eval_src or self.eval_fraction:
      splits.append(self.eval_split)
    return splits

  def _source_and_filter(self, split):
    """(source path, keep(key) predicate) for a split."""
    if split == "train":
      if self.eval_fraction:
        return self.src, lambda key: not _in_eval_holdout(key, self.eval_fraction)
      return self.src, lambda key: True
    if self.eval_src:
      return self.eval_src, lambda key: True
    return self.src, lambda key: _in_eval_holdout(key, self.eval_fraction)


def _find_captions_file(folder: str) -> str:
  for name in ("captions.jsonl", "captions.csv"):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  if os.path.isfile(folder) and folder.endswith((".jsonl", ".csv")):
    return folder
  raise FileNotFoundError(
      f"no captions.jsonl or captions.csv in {folder!r}; the folder format needs one of them "
      '(lines like {"image": "relative/path.jpg", "caption": "..."}, or CSV columns image,caption)')


def _read_caption_rows(path: str) -> Iterator[tuple[str, Any, Any]]:
  """Yields (where, image, caption_or_list) per row; (where, None, SkipExample) for bad rows."""
  if path.endswith(".jsonl"):
    with open(path, "rb") as f:
      for line_no, line in enumerate(f, 1):
        where = f"{os.path.basename(path)}:{line_no}"
        if not line.strip():
          continue
        try:
          row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
          yield where, None, SkipExample("non-UTF-8 caption", str(e))
          continue
        except json.JSONDecodeError as e:
          yield where, None, SkipExample("malformed captions line", str(e))
          continue
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not (
            "caption" in row or "captions" in row):
          yield where, None, SkipExample("malformed captions line",
                                         'needs "image" (string) and "caption" (or "captions")')
          continue
        yield where, row["image"], row["caption"] if "caption" in row else row["captions"]
    return
  with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
      raise ValueError(f"{path}: the CSV header must name the columns 'image' and 'caption', "
                       f"got {reader.fieldnames}")
    for row_no, row in enumerate(reader, 2):
      where = f"{os.path.basename(path)}:{row_no}"
      if row["image"] is None or row["caption"] is None:
        yield where, None, SkipExample("malformed captions line", "missing column value")
        continue
      yield where, row["image"], row["caption"]


class FolderBuilder(_FileBuilder, skip_registration=True):
  """Images in a folder, captions in captions.jsonl or captions.csv (several per image allowed)."""

  def _generate_examples(self, split):
    report = self._new_report(split)
    source, keep = self._source_and_filter(split)
    captions_path = _find_captions_file(source)
    root = os.path.dirname(os.path.abspath(captions_path))
    # Group captions per image, in first-seen order; remember why captions were dropped so an
    # image that ends with none is reported with that reason.
    captions_by_image: dict[str, list[str]] = {}
    drop_reason: dict[str, str] = {}
    where_by_image: dict[str, str] = {}
    for where, image, value in _read_caption_rows(captions_path):
      if isinstance(value, SkipExample):
        report.skip(value.reason, where)
        continue
      try:
        image.encode("utf-8")
      except UnicodeEncodeError:
        report.skip("non-UTF-8 image path", where)
        continue
      if not keep(image):
        continue
      captions = captions_by_image.setdefault(image, [])
      where_by_image.setdefault(image, where)
      for raw in value if isinstance(value, list) else [value]:
        try:
          caption = clean_caption(raw)
        except SkipExample as e:
          report.dropped_captions[e.reason] += 1
          drop_reason[image] = e.reason
          continue
        if caption in captions:
          report.dropped_captions["duplicate caption"] += 1
        else:
          captions.append(caption)

    for image, captions in self._progress(captions_by_image.items(), split,
                                          total=len(captions_by_image)):
      where = f"{image} ({where_by_image[image]})"
      if not captions:
        reason = drop_reason.get(image, "empty caption")
        # The captions were counted as dropped; count the image as skipped for that reason.
        report.dropped_captions[reason] -= 1
        if not report.dropped_captions[reason]:
          del report.dropped_captions[reason]
        report.skip(reason, where)
        continue
      path = os.path.join(root, image)
      real_root = os.path.realpath(root)
      if not self.allow_outside_src and os.path.commonpath(
          [real_root, os.path.realpath(path)]) != real_root:
        # "../x.png", "/etc/...", or a link out of the folder: not read unless allowed.
        report.skip("image path outside --src (pass --allow_outside_src to allow)", where)
        continue
      try:
        # A FIFO, device or socket would block the read (or never end): only regular files
        # (through links) are read.
        if not stat.S_ISREG(os.stat(path).st_mode):
          report.skip("not a regular file", where)
          continue
        with open(path, "rb") as f:
          raw = f.read()
      except FileNotFoundError:
        report.skip("missing image file", where)
        continue
      except OSError as e:
        report.skip("unreadable image file", f"{where}: {e}")
        continue
      image_bytes = self._encode_counted(raw, report, where)
      if image_bytes is not None:
        yield image, {"image": image_bytes, "captions": captions, "key": image}


def _tar_paths(src: str) -> list[str]:
  if os.path.isdir(src):
    paths = sorted(glob.glob(os.path.join(src, "*.tar")))
  elif any(ch in src for ch in "*?["):
    paths = sorted(glob.glob(src))
  else:
    paths = [src]
  if not paths or not all(os.path.isfile(p) for p in paths):
    raise FileNotFoundError(f"no webdataset .tar shards at {src!r}; give a folder of *.tar "
                            "(as written by img2dataset), one .tar file, or a glob")
  return paths


def _iter_tar_samples(tar_path: str, report: SplitReport) -> Iterator[tuple[str, dict[str, bytes]]]:
  """Groups consecutive tar members by key (path up to the first dot of the file name).

  A truncated or corrupt shard yields the samples before the damage and is counted.
  """
  shard = os.path.basename(tar_path)
  key, parts = None, {}
  try:
    with tarfile.open(tar_path, "r:*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        folder, file_name = posixpath.split(member.name)
        stem, _, extension = file_name.partition(".")
        member_key = posixpath.join(folder, stem)
        if member_key != key:
          if key is not None:
            yield f"{shard}/{key}", parts
          key, parts = member_key, {}
        parts[extension.lower()] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError) as e:
    report.skip("corrupt or truncated tar shard", f"{shard}: {type(e).__name__}: {e}")
    if key is not None:
      report.skip("sample lost in corrupt tar shard", f"{shard}/{key}")
    return
  if key is not None:
    yield f"{shard}/{key}", parts


class WebDatasetBuilder(_FileBuilder, skip_registration=True):
  """img2dataset-style tar shards: KEY.jpg (or .png/.webp) + KEY.txt per sample."""

  def _generate_examples(self, split):
    report = self._new_report(split)
    source, keep = self._source_and_filter(split)
    shards = _tar_paths(source)
    seen = collections.Counter()
    for shard in self._progress(shards, split, total=len(shards), unit="shards"):
      for key, parts in _iter_tar_samples(shard, report):
        if not keep(key):
          continue
        seen[key] += 1
        if seen[key] > 1:  # e.g. two folders' shards with the same file names, or a repeated key
          report.converted["duplicate key renamed KEY#N"] += 1
          key = f"{key}#{seen[key]}"
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if image_ext is None:
          report.skip("missing image in sample", key)
          continue
        if "txt" not in parts:
          report.skip("missing caption (.txt) in sample", key)
          continue
        try:
          caption = clean_caption(parts["txt"])
        except SkipExample as e:
          report.skip(e.reason, key)
          continue
        image_bytes = self._encode_counted(parts[image_ext], report, key)
        if image_bytes is not None:
          yield key, {"image": image_bytes, "captions": [caption], "key": key}


def _text_paths(src: str) -> list[str]:
  """The .txt / .jsonl files of `src`: a file, a folder of them, or a glob."""
  if os.path.isdir(src):
    paths = sorted(p for ext in ("txt", "jsonl") for p in glob.glob(os.path.join(src, f"*.{ext}")))
  elif any(ch in src for ch in "*?["):
    paths = sorted(glob.glob(os.path.expanduser(src)))
  else:
    paths = [src]
  bad = [p for p in paths if not p.endswith((".txt", ".jsonl"))]
  if bad:
    raise ValueError(f"--format text reads .txt (one text a line) and .jsonl (a \"text\" or "
                     f"\"caption\" field a line) files; {bad[0]!r} is neither")
  if not paths:
    raise FileNotFoundError(f"no .txt or .jsonl file in {src!r}")
  return paths


def _read_texts(path: str) -> Iterator[tuple[str, Any]]:
  """Yields (where "file:line", raw text or a SkipExample) per non-blank line of `path`."""
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, 1):
      where = f"{path}:{line_no}"
      if not line.strip():
        continue
      if path.endswith(".txt"):
        yield where, line
        continue
      try:
        row = json.loads(line.decode("utf-8"))
      except UnicodeDecodeError as e:
        yield where, SkipExample("non-UTF-8 caption", str(e))
        continue
      except json.JSONDecodeError as e:
        yield where, SkipExample("malformed text line", str(e))
        continue
      field = next((k for k in ("text", "caption") if isinstance(row, dict) and k in row), None)
      if field is None:
        yield where, SkipExample("malformed text line", 'needs a "text" or "caption" field')
        continue
      yield where, row[field]


class TextBuilder(_FileBuilder, skip_registration=True):
  """Texts only (no images), one per line of .txt files or per "text"/"caption" field of .jsonl
  lines: the corpus of VLMo's text-only stage 2. Example: {"captions": [text], "key":
  "file:line"}; no "image" feature, which is how the pipeline knows a text-only dataset."""

  def _info(self) -> tfds.core.DatasetInfo:
    features = {"captions": tfds.features.Sequence(tfds.features.Text()),
                "key": tfds.features.Text()}
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(features))

  def _generate_examples(self, split):
    report = self._new_report(split)
    source, keep = self._source_and_filter(split)
    paths = _text_paths(source)
    # Keys name each line by its file relative to the files' common folder: unique, and the
    # same wherever the corpus lies (the eval holdout hashes them).
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    for path in paths:
      name = os.path.relpath(os.path.abspath(path), root)
      for where, raw in self._progress(_read_texts(path), split, unit="texts"):
        key = f"{name}:{where.rsplit(':', 1)[1]}"
        if isinstance(raw, SkipExample):
          report.skip(raw.reason, where)
          continue
        try:
          text = clean_caption(raw)
        except SkipExample as e:
          report.skip(e.reason, where)
          continue
        if not keep(key):
          continue
        report.written += 1
        yield key, {"captions": [text], "key": key}


_BUILDER_CLASSES = {"demo": DemoBuilder, "folder": FolderBuilder, "webdataset": WebDatasetBuilder,
                    "text": TextBuilder}
VERSION = str(_CaptionBuilder.VERSION)


class EmptyBuildError(ValueError):
  """A split ended with no usable example; the message holds the skip report."""


def format_report(name: str, report: dict[str, SplitReport]) -> str:
  """Human-readable summary of a build."""
  lines = [f"Built {name}:"]
  for split, split_report in report.items():
    lines.append(f"  {split}: {split_report.written} examples written")
    for title, counter in (("skipped", split_report.skipped),
                           ("converted", split_report.converted),
                           ("captions dropped", split_report.dropped_captions)):
      if not counter:
        continue
      lines.append(f"    {title}: {sum(counter.values())}")
      for reason, count in counter.most_common():
        examples = split_report.skipped_examples.get(reason, []) if title == "skipped" else []
        shown = f"  e.g. {', '.join(examples)}" if examples else ""
        lines.append(f"      {count:>8}  {reason}{shown}")
  return "\n".join(lines)


def is_built(name: str, data_dir: str) -> bool:
  """True when `data_dir/name/<version>/` holds a finished build (an interrupted one never
  does: `build_atomically` moves a version directory there only once it is complete)."""
  return os.path.isfile(os.path.join(sources.local_data_dir(data_dir), name, VERSION,
                                     "dataset_info.json"))


BUILD_OPTIONS_FILE = "build_options.json"  # What built a dataset: {"format", "options"}.


def _options_record(format: str, options: dict) -> dict:  # pylint: disable=redefined-builtin
  """The format and options of a build as plain JSON data, the builder's defaults filled in
  (display options left out)."""
  defaults = {n: p.default for n, p in
              inspect.signature(_BUILDER_CLASSES[format].__init__).parameters.items()
              if p.kind == p.KEYWORD_ONLY and p.default is not p.empty}
  kept = {k: v for k, v in {**defaults, **options}.items() if k != "show_progress"}
  return json.loads(json.dumps({"format": format, "options": kept}, default=str))


def check_built_options(name: str, data_dir: str, format: str, options: dict) -> list[str]:  # pylint: disable=redefined-builtin
  """How the finished build of `name` differs from building it with `format` and `options`
  (one "option: built X, asked Y" line each); [] when they agree or the build recorded no
  options (built before they were recorded)."""
  path = os.path.join(sources.local_data_dir(data_dir), name, VERSION, BUILD_OPTIONS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    built = json.load(f)
  wanted = _options_record(format, options)
  if built.get("format") != format:
    return [f"format: built {built.get('format')!r}, asked {format!r}"]
  # An option added after that build agrees at its default: the build did what the default does.
  have = {**_options_record(format, {})["options"], **built.get("options", {})}
  want = wanted["options"]
  return [f"{key}: built {have.get(key, '(unset)')!r}, asked {want.get(key, '(unset)')!r}"
          for key in sorted(set(have) | set(want)) if have.get(key) != want.get(key)]


def _building_dir(data_dir: str, name: str) -> str:
  return os.path.join(data_dir, f".building-{name}-{socket.gethostname()}-{os.getpid()}")


# Written into a temporary build directory when we create it: the one thing a build removes
# without --overwrite is a directory holding this marker (ours, left by an interrupted build).
BUILD_MARKER = ".coca_jax_building"


def _make_building_dir(path: str) -> None:
  os.makedirs(path)
  with open(os.path.join(path, BUILD_MARKER), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)


def _ours(path: str) -> bool:
  return os.path.isdir(path) and not os.path.islink(path) and os.path.isfile(
      os.path.join(path, BUILD_MARKER))


def _remove_interrupted_builds(data_dir: str, name: str) -> None:
  """Removes the temporary directories that interrupted builds of `name` left (on this host,
  their process gone), recognised by the marker we wrote into them. Each is reported; a
  directory of that name without our marker is left alone."""
  prefix = f".building-{name}-{socket.gethostname()}-"
  for entry in os.listdir(data_dir) if os.path.isdir(data_dir) else []:
    if entry.startswith(prefix) and entry[len(prefix):].isdigit():
      pid = int(entry[len(prefix):])
      try:
        os.kill(pid, 0)
        continue  # a build running now, in another process
      except ProcessLookupError:
        pass
      except PermissionError:
        continue
      path = os.path.join(data_dir, entry)
      if not _ours(path):
        logging.warning("Leaving %s alone: it is named like a temporary build directory but "
                        "holds no %s marker, so this program did not make it", path, BUILD_MARKER)
        continue
      logging.warning("Removing the half-built dataset %s left by an interrupted build "
                      "(process %d); building %r again", path, pid, name)
      shutil.rmtree(path, ignore_errors=True)


def _source_paths(options: dict) -> list[str]:
  """The folders (or files) a build reads: --src and --eval_src; a glob gives the paths it
  matches (cut at its first wildcard when it matches nothing here)."""
  paths = []
  for key in ("src", "eval_src"):
    value = options.get(key)
    if not value:
      continue
    value = os.fspath(value)
    if any(ch in value for ch in "*?["):
      matches = glob.glob(os.path.expanduser(value))
      if matches:
        paths.extend(os.path.realpath(match) for match in matches)
        continue
      value = os.path.dirname(value[:min(value.index(ch) for ch in "*?[" if ch in value)])
    paths.append(os.path.realpath(os.path.expanduser(value or ".")))
  return paths


def _check_target(name: str, data_dir: str, options: dict, overwrite: bool) -> None:
  """Refuses a build whose sources and target overlap, and one whose target `data_dir/name`
  holds something we would have to delete without --overwrite (a finished build is the
  caller's to handle: `build_atomically` then keeps it)."""
  target = os.path.join(data_dir, name)
  real_target = os.path.realpath(target)
  for source in _source_paths(options):
    if os.path.commonpath([source, real_target]) in (source, real_target):
      common = os.path.commonpath([source, real_target])
      inside = ("they are the same folder" if source == real_target else
                "the source lies inside the dataset folder" if common == real_target else
                "the dataset folder lies inside the source")
      raise ValueError(
          f"the source {source} and the dataset folder {real_target} (--data_dir/--name) "
          f"overlap: {inside}, so building (or --overwrite) would write into or delete the "
          "source. Give another --data_dir or --name, outside the source")
  if not os.path.lexists(target) or is_built(name, data_dir) or overwrite:
    return
  if os.path.isdir(target) and not os.path.islink(target) and not os.listdir(target):
    return  # Empty (an interrupted build stops after making it): nothing to lose.
  raise FileExistsError(
      f"{target} exists and is not a dataset built by coca_jax.data.build (contents: "
      f"{', '.join(sorted(os.listdir(target))[:5]) if os.path.isdir(target) else 'a file'}); "
      "nothing was deleted. Pass --overwrite to replace it, or choose another --name or "
      "--data_dir")


def build_atomically(format: str, name: str, data_dir: str,  # pylint: disable=redefined-builtin
                     overwrite: bool = False, **options) -> tuple[str, dict[str, SplitReport]]:
  """Builds `name` into a private temporary directory and moves the finished version directory
  to `data_dir/name/<version>` with one rename, so an interrupted build (Ctrl-C, a killed job)
  never leaves something that looks like a dataset, and two processes building at once do not
  corrupt each other (the first to finish wins; the other's copy is discarded). Temporary
  directories of interrupted builds (marked as ours) are removed with a message. Also writes
  `build_report.json`.

  Nothing we did not create is deleted: a `data_dir/name` that is not empty and not a finished
  build is an error unless `overwrite`; with `overwrite` the old folder is replaced only once
  the new build has finished (a failed build leaves it as it was). A source that overlaps the
  target is always an error.

  Returns:
    (the version directory, the per-split report).

  Raises:
    EmptyBuildError: a split had no usable example (the message holds the skip report).
    FileExistsError: `data_dir/name` holds something else and `overwrite` is False.
    ValueError: the source and `data_dir/name` overlap.
  """
  data_dir = sources.local_data_dir(data_dir)
  _check_target(name, data_dir, options, overwrite)
  os.makedirs(data_dir, exist_ok=True)
  _remove_interrupted_builds(data_dir, name)
  temporary = _building_dir(data_dir, name)
  if os.path.lexists(temporary):
    if not _ours(temporary):
      raise FileExistsError(f"{temporary} exists and was not made by this program (no "
                            f"{BUILD_MARKER} marker); move it away and build again")
    shutil.rmtree(temporary)  # Ours, from a dead process that had our process id.
  _make_building_dir(temporary)
  target = os.path.join(data_dir, name)
  final = os.path.join(target, VERSION)
  try:
    builder = make_builder(format, name, temporary, **options)
    try:
      builder.download_and_prepare()
    except AssertionError as e:  # TFDS: "No examples were yielded"
      empty = [split for split, r in builder.report.items() if r.written == 0]
      if empty:
        raise EmptyBuildError(_empty_split_message(name, empty, builder, options)) from e
      raise
    built = os.fspath(builder.data_path)
    with open(os.path.join(built, "build_report.json"), "w") as f:
      json.dump({split: r.to_json() for split, r in builder.report.items()}, f, indent=2)
    with open(os.path.join(built, BUILD_OPTIONS_FILE), "w") as f:
      json.dump(_options_record(format, options), f, indent=2, sort_keys=True)
    if overwrite and os.path.lexists(target):
      # Moved into our temporary directory (removed below) only now that the new build is done.
      os.rename(target, os.path.join(temporary, "replaced"))
    os.makedirs(target, exist_ok=True)
    try:
      os.rename(built, final)
    except OSError:
      if not is_built(name, data_dir):
        raise
      logging.warning("%s was built by another process at the same time; using that one", final)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
  return final, builder.report


def _empty_split_message(name: str, empty: list[str], builder, options: dict) -> str:
  """Why each split in `empty` got no example: inputs skipped (the report says why), or none
  reached it (an --eval_fraction holdout that took no key, an empty source)."""
  report = builder.report
  skipped = [split for split in empty if report[split].skipped]
  reached_none = [split for split in empty if not report[split].skipped]
  lines = []
  if skipped:
    lines.append(f"no usable example in split(s) {', '.join(skipped)} of {name!r}: every input "
                 "was skipped.")
  for split in reached_none:
    fraction = options.get("eval_fraction") or 0.0
    if split != "train" and fraction and not options.get("eval_src"):
      total = sum(r.written + sum(r.skipped.values()) for r in report.values())
      lines.append(
          f"no input of {name!r} fell in the {split!r} split: --eval_fraction {fraction} holds "
          f"out each input by a hash of its key, and took none of these {total} (expected "
          f"{fraction * total:.1f}); raise --eval_fraction or give the eval inputs as "
          "--eval_src.")
    else:
      lines.append(f"split {split!r} of {name!r} received no input: its source is empty.")
  return " ".join(lines) + f" What was written and skipped:\n{format_report(name, report)}"


def make_builder(format: str, name: str, data_dir: str, **options) -> _CaptionBuilder:  # pylint: disable=redefined-builtin
  """A builder of `format` writing dataset `name` under `data_dir`.

  Args:
    format: "demo", "folder" or "webdataset".
    name: TFDS dataset name (lower_snake_case); read it back with the same name.
    data_dir: TFDS data_dir; the data lands in `data_dir/name/1.0.0/`.
    **options: the format's options: demo (num_train, num_test, num_digits, image_size, seed,
      grid, variation, strokes, varied_grid, varied_single, num_transfer);
      folder/webdataset/text (src, eval_src, eval_fraction, eval_split, max_image_side,
      allow_outside_src: read caption-file image paths outside `src`); all (show_progress).
  """
  if format not in _BUILDER_CLASSES:
    raise ValueError(f"format={format!r} is unknown; use one of {FORMATS}")
  if not tfds.core.naming.is_valid_dataset_name(name) or name != name.lower():
    raise ValueError(f"dataset name {name!r} is not valid for TFDS; use lower_snake_case "
                     "like 'my_captions'")
  # A subclass per name: TFDS takes the dataset name from the class. skip_registration keeps
  # the global registry clean, so building the same name twice in one process works.
  named = types.new_class(f"{format.title()}Builder_{name}", (_BUILDER_CLASSES[format],),
                          {"skip_registration": True}, lambda ns: ns.update({"name": name}))
  with _tempdir_removed_after():
    return named(data_dir=sources.local_data_dir(data_dir), **options)


@contextlib.contextmanager
def _tempdir_removed_after():
  """Python's temporary files go to a private directory, removed on exit. A TFDS builder for a
  dataset not built yet makes a temporary directory for precomputed metadata it then looks for
  in its bucket (none exists for ours) and leaves it behind: one empty /tmp/tmp*tfds per build."""
  with tempfile.TemporaryDirectory(prefix="coca_jax_") as private:
    previous, tempfile.tempdir = tempfile.tempdir, private
    try:
      yield
    finally:
      tempfile.tempdir = previous
