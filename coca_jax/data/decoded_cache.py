"""A prepared split decoded once into memory-mapped uint8 arrays (the in-memory input path).

The streaming path decodes every image again each epoch. A small split is instead decoded once
into `<dataset version dir>/_decoded/<key>/` and memory-mapped by every later run (and by every
process of a run on one machine: the page cache holds one copy):

  manifest.json   what the arrays were made from (the key's inputs) and their sizes
  images.npy      geometry "center": uint8 [N, S, S, 3], each example exactly what the streaming
                  path's `preprocess.decode_train_image(bytes, S, None)` returns;
                  geometry "full": uint8 [sum of h * w * 3], every image decoded at its stored
                  size, for crops drawn per example and epoch
  layout.npy      geometry "full" only: int64 [N, 3] (offset, height, width) into images.npy
  captions.npy    uint8: the UTF-8 captions of all examples, back to back
  caption_ends.npy  int64 [C]: where each caption ends in captions.npy (C = all captions)
  caption_count.npy int64 [N + 1]: example i owns captions [count[i], count[i + 1])
  keys.npy, key_ends.npy  the examples' "key" strings, packed the same way

Staleness: the key hashes the dataset's version directory (its path, and the name, size and
modification time of every file in it), the split, the image feature, the geometry, the
output size and `LAYOUT_VERSION`; `load` also checks the manifest's fields and the arrays'
shapes against what it expects. A rebuilt or edited dataset therefore gets a new cache, and
older caches of the same split and geometry are removed when it is written. A cache is
written into a temporary directory and renamed into place, so an interrupted build never
leaves one that looks finished and two processes building at once do not mix their files.
Where the dataset directory is read-only the arrays live in this process's memory instead.

Exactness with random crops (geometry "full"): the streaming path decodes a JPEG at a reduced
DCT scale when its crop is at least twice the output size (`preprocess._to_rgb`'s draft), which
changes the pixels; a full-resolution copy cannot reproduce that. So "full" refuses a JPEG whose
shorter side is >= 2 * S (`NotExact`); below that the draft never reduces and both paths resize
the same pixels with the same Pillow call.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import shutil
import socket
from typing import Callable, Sequence
import uuid

from absl import logging
import numpy as np
from PIL import Image

from coca_jax.data import preprocess
from coca_jax.data import sources

# Bump when the files' meaning changes: every older cache then misses.
LAYOUT_VERSION = 1
CACHE_DIR = "_decoded"
GEOMETRIES = ("center", "full")


class TooLarge(Exception):
  """The decoded split exceeds the byte budget it was built under."""


class NotExact(Exception):
  """A cached copy could not give the streaming path's exact pixels (see the module docstring)."""


@dataclasses.dataclass
class DecodedSplit:
  """A decoded split: memory-mapped arrays (or in-memory ones, see the module docstring)."""
  geometry: str
  images: np.ndarray
  layout: np.ndarray | None
  captions: np.ndarray
  caption_ends: np.ndarray
  caption_count: np.ndarray
  keys: np.ndarray
  key_ends: np.ndarray
  path: str | None  # The cache directory; None when kept in memory only.

  def __len__(self) -> int:
    return len(self.caption_count) - 1

  @property
  def nbytes(self) -> int:
    return int(self.images.nbytes)

  def image(self, index: int) -> np.ndarray:
    """uint8 [h, w, 3] of example `index` (geometry "full"), or [S, S, 3] ("center")."""
    if self.layout is None:
      return self.images[index]
    offset, height, width = (int(v) for v in self.layout[index])
    return self.images[offset:offset + height * width * 3].reshape(height, width, 3)

  def all_captions(self) -> list[str]:
    return _unpack(self.captions, self.caption_ends)

  def key(self, index: int) -> str:
    start = int(self.key_ends[index - 1]) if index else 0
    return bytes(self.keys[start:int(self.key_ends[index])]).decode("utf-8")


def estimate_bytes(source, image_size: int, geometry: str, image_feature: str = "image") -> int:
  """The decoded images' bytes: exact for "center" (N * S * S * 3); for "full", N times the
  first stored image's h * w * 3 (read from its header: nothing is decoded)."""
  if geometry == "center":
    return len(source) * image_size * image_size * 3
  width, height = Image.open(io.BytesIO(_image_bytes(source[0], image_feature))).size
  return len(source) * width * height * 3


def cache_key(version_dir: str, split: str, image_feature: str, geometry: str,
              image_size: int) -> dict:
  """What a cache is made from; its sha256 (`_digest`) names the cache directory."""
  files = []
  for entry in sorted(os.listdir(version_dir)):
    path = os.path.join(version_dir, entry)
    if os.path.isfile(path):
      stat = os.stat(path)
      files.append([entry, stat.st_size, stat.st_mtime_ns])
  return {"layout_version": LAYOUT_VERSION, "dataset": os.path.realpath(version_dir),
          "files": files, "split": split, "image_feature": image_feature,
          "geometry": geometry, "image_size": image_size}


def _digest(key: dict) -> str:
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def load_or_build(name: str, data_dir: str, split: str, source, *, image_size: int,
                  geometry: str, max_bytes: float | None = None,
                  image_feature: str = "image") -> DecodedSplit:
  """The decoded split `split` of dataset `name` (prepared in `data_dir`, opened as `source`
  with encoded images), from its cache, or decoded now and cached.

  Raises:
    TooLarge: the decoded images would exceed `max_bytes` (None = no limit).
    NotExact: geometry "full" and a JPEG too large to be reproduced (module docstring).
  """
  if geometry not in GEOMETRIES:
    raise ValueError(f"geometry={geometry!r}: use one of {GEOMETRIES}")
  version_dir = sources.version_dir(name, sources.local_data_dir(data_dir))
  key = cache_key(version_dir, split, image_feature, geometry, image_size)
  root = os.path.join(version_dir, CACHE_DIR)
  final = os.path.join(root, _digest(key))
  cached = _load(final, key, len(source))
  if cached is not None:
    logging.info("Decoded %s/%s from %s", name, split, final)
    return cached
  if os.path.isdir(final):  # Same key, unreadable (an old crash, a partial copy): replace it.
    shutil.rmtree(final, ignore_errors=True)
  logging.info("Decoding %s/%s once (%d examples) into %s", name, split, len(source), final)
  try:
    os.makedirs(root, exist_ok=True)
    _remove_interrupted(root)
    temporary = os.path.join(root, f"{_TMP}{socket.gethostname()}-{os.getpid()}-"
                                   f"{uuid.uuid4().hex[:8]}")
    os.makedirs(temporary)
  except OSError as e:
    logging.warning("Cannot write a decoded cache next to %s (%s): decoding %s/%s into this "
                    "process's memory instead", version_dir, e, name, split)
    return _build(None, key, source, max_bytes)
  try:
    _build(temporary, key, source, max_bytes)
    try:
      os.rename(temporary, final)
    except OSError:  # Another process finished first: keep its copy.
      if _load(final, key, len(source)) is None:
        raise
    _remove_stale(root, key, keep=os.path.basename(final))
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
  loaded = _load(final, key, len(source))
  if loaded is None:
    raise RuntimeError(f"the decoded cache {final} just written does not read back")
  return loaded


_TMP = ".tmp-"


def _remove_interrupted(root: str) -> None:
  """Removes the temporary directories of builds on this host whose process is gone (a
  killed run); other hosts' and live processes' are left alone."""
  for entry in os.listdir(root):
    if not entry.startswith(_TMP):
      continue
    host, _, rest = entry[len(_TMP):].rpartition("-")[0].rpartition("-")
    try:
      pid = int(rest)
    except ValueError:
      continue
    if host != socket.gethostname():
      continue
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      logging.info("Removing an interrupted decoded-cache build: %s", entry)
      shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    except OSError:  # Alive under another user: not ours to judge.
      pass


def _image_bytes(element, image_feature: str) -> bytes:
  value = element
  for part in image_feature.split("/"):
    value = value[part]
  return bytes(value)


def _pack(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  encoded = [t.encode("utf-8") for t in texts]
  ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
  return np.frombuffer(b"".join(encoded), np.uint8).copy(), ends


def _unpack(data: np.ndarray, ends: np.ndarray) -> list[str]:
  raw = bytes(data)
  starts = np.concatenate([[0], ends[:-1]])
  return [raw[s:e].decode("utf-8") for s, e in zip(starts.tolist(), ends.tolist())]


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _build(folder: str | None, key: dict, source, max_bytes: float | None) -> DecodedSplit:
  """Decodes every example of `source` into `folder` (None: into memory)."""
  geometry, size, feature = key["geometry"], key["image_size"], key["image_feature"]
  count = len(source)
  if geometry == "center" and max_bytes is not None and count * size * size * 3 > max_bytes:
    raise TooLarge(f"{count * size * size * 3} decoded bytes > budget {max_bytes:.0f}")
  elements = [source[i] for i in range(count)]
  encoded = [_image_bytes(e, feature) for e in elements]
  captions, caption_count, keys = [], [0], []
  for element in elements:
    values = element["captions"]
    values = [values] if isinstance(values, (bytes, str)) else list(values)
    captions += [_text(c) for c in values]
    caption_count.append(len(captions))
    keys.append(_text(element["key"]))
  del elements

  def array(name: str, shape, dtype):
    if folder is None:
      return np.empty(shape, dtype)
    return np.lib.format.open_memmap(os.path.join(folder, name), mode="w+", dtype=dtype,
                                     shape=shape)

  layout = None
  if geometry == "center":
    total = count * size * size * 3
    images = array("images.npy", (count, size, size, 3), np.uint8)

    def decode(index: int) -> None:
      images[index] = preprocess.decode_train_image(encoded[index], size, None)
  else:
    shapes = np.zeros((count, 3), np.int64)
    for index, data in enumerate(encoded):  # Headers only: sizes and formats.
      with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if image.format == "JPEG" and min(width, height) >= 2 * size:
          raise NotExact(
              f"example {keys[index]!r} is a {width}x{height} JPEG: with random crops the "
              f"streaming path decodes JPEGs whose shorter side is >= 2 x {size} px at reduced "
              "scale, which a full-resolution copy cannot reproduce")
      shapes[index] = (0, height, width)
    sizes = shapes[:, 1] * shapes[:, 2] * 3
    shapes[1:, 0] = np.cumsum(sizes)[:-1]
    total = int(sizes.sum())
    if max_bytes is not None and total > max_bytes:
      raise TooLarge(f"{total} decoded bytes > budget {max_bytes:.0f}")
    images = array("images.npy", (total,), np.uint8)
    layout = array("layout.npy", shapes.shape, np.int64)
    layout[:] = shapes

    def decode(index: int) -> None:
      offset, height, width = (int(v) for v in shapes[index])
      # Full scale, no draft: what the streaming path decodes below the JPEG limit above.
      pixels = np.asarray(preprocess.decode_image(encoded[index]), np.uint8)
      images[offset:offset + height * width * 3] = pixels.reshape(-1)

  # Pillow releases the GIL while it decodes: one thread per core.
  with concurrent.futures.ThreadPoolExecutor(max(os.cpu_count() or 1, 1)) as pool:
    list(pool.map(decode, range(count), chunksize=256))
  packed_captions, caption_ends = _pack(captions)
  packed_keys, key_ends = _pack(keys)
  arrays = {"captions.npy": packed_captions, "caption_ends.npy": caption_ends,
            "caption_count.npy": np.asarray(caption_count, np.int64),
            "keys.npy": packed_keys, "key_ends.npy": key_ends}
  if folder is None:
    return DecodedSplit(geometry, images, layout, packed_captions, caption_ends,
                        arrays["caption_count.npy"], packed_keys, key_ends, None)
  for file_name, value in arrays.items():
    np.save(os.path.join(folder, file_name), value)
  images.flush()
  if layout is not None:
    layout.flush()
  manifest = {**key, "examples": count, "captions": len(captions), "image_bytes": total}
  with open(os.path.join(folder, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  return None  # The caller loads it back from its final place.


def _load(folder: str, key: dict, count: int) -> DecodedSplit | None:
  """The cache in `folder` when it was made from `key` and holds `count` examples, else None."""
  try:
    with open(os.path.join(folder, "manifest.json")) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  if {k: manifest.get(k) for k in key} != json.loads(json.dumps(key)):
    logging.warning("Decoded cache %s was made from another dataset state: not used", folder)
    return None

  def read(name: str) -> np.ndarray:
    return np.load(os.path.join(folder, name), mmap_mode="r", allow_pickle=False)

  try:
    full = key["geometry"] == "full"
    images, layout = read("images.npy"), read("layout.npy") if full else None
    split = DecodedSplit(key["geometry"], images, layout, read("captions.npy"),
                         read("caption_ends.npy"), read("caption_count.npy"), read("keys.npy"),
                         read("key_ends.npy"), folder)
  except (OSError, ValueError) as e:
    logging.warning("Decoded cache %s cannot be read (%s): not used", folder, e)
    return None
  size = key["image_size"]
  expected = (count, size, size, 3) if not full else (manifest.get("image_bytes"),)
  if (manifest.get("examples") != count or len(split) != count or images.shape != expected
      or (full and layout.shape != (count, 3))
      or len(split.caption_ends) != manifest.get("captions")):
    logging.warning("Decoded cache %s does not match its split (%d examples): not used",
                    folder, count)
    return None
  return split


def _remove_stale(root: str, key: dict, keep: str) -> None:
  """Removes caches of the same split and geometry made from an older state of the dataset."""
  same = ("split", "image_feature", "geometry", "image_size")
  for entry in os.listdir(root):
    folder = os.path.join(root, entry)
    if entry == keep or entry.startswith(".") or not os.path.isdir(folder):
      continue
    try:
      with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    except (OSError, ValueError):
      continue
    if all(manifest.get(k) == key[k] for k in same):
      shutil.rmtree(folder, ignore_errors=True)


def tokenize_all(split: DecodedSplit, tokenize: Callable[[list[str], int], np.ndarray],
                 max_len: int) -> np.ndarray:
  """int32 [C, max_len]: every caption of the split, tokenised once."""
  return tokenize(split.all_captions(), max_len)
