"""Digit scenes: a small, real image-caption set made offline.

Real handwritten digits (scikit-learn's bundled `load_digits`, 1,797 scans of 8x8 pixels, BSD-3)
are upscaled, coloured and placed 1-2 per canvas (more with `max_digits`), left to right. The
caption names each digit with its colour in reading order, e.g. "a red 3 left of a blue 7".
Train and test scenes draw digits from disjoint sets of scans, so held-out scenes show handwriting
the model never saw.

`grid` > 0 draws each glyph a whole number of grid cells tall at positions that are multiples of
`grid`; with grid = patch size every digit covers whole ViT patches. A small ViT learns the digits
several times faster that way (the demo's choice); grid=0 places digits anywhere.

(A second, digits-only caption per scene was tried and dropped: identical captions of different
images within a batch are false negatives for the contrastive loss, and it learned slower.)

Everything is deterministic in (split, num, seed): the same call returns the same pixels.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

COLOURS = {
    "red": (235, 50, 50),
    "green": (50, 210, 70),
    "blue": (60, 110, 255),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
COLOUR_NAMES = tuple(COLOURS)
DIGIT_NAMES = tuple(str(d) for d in range(10))
# Fraction of the scans used for training; the rest are only ever shown in the test split.
_TRAIN_FRACTION = 0.78


@functools.lru_cache(maxsize=None)
def _digit_scans() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Returns (train_images, train_labels, test_images, test_labels); images float [N,8,8] in [0,1]."""
  from sklearn.datasets import load_digits  # Imported lazily: only the demo needs it.

  digits = load_digits()
  images = digits.images.astype(np.float32) / 16.0
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(1234).permutation(len(labels))
  cut = int(len(order) * _TRAIN_FRACTION)
  train, test = order[:cut], order[cut:]
  return images[train], labels[train], images[test], labels[test]


def _scans(split: str) -> tuple[np.ndarray, np.ndarray]:
  train_images, train_labels, test_images, test_labels = _digit_scans()
  if split == "train":
    return train_images, train_labels
  if split == "test":
    return test_images, test_labels
  raise ValueError(f"digit scenes split={split!r} is unknown; use 'train' or 'test'")


def _glyph(scan: np.ndarray, size: int) -> np.ndarray:
  """Upscales one 8x8 scan to a [size, size] float intensity map."""
  img = Image.fromarray((scan * 255).astype(np.uint8), mode="L").resize(
      (size, size), Image.BILINEAR)
  return np.asarray(img, np.float32) / 255.0


def _glyph_size(image_size: int, max_digits: int, grid: int = 0) -> int:
  # Digits fill 40% of the canvas height: large enough to read, small enough to move around.
  size = max(8, min(int(image_size * 0.4), image_size // max_digits))
  if grid:  # A whole number of grid cells.
    size = max(grid, round(size / grid) * grid)
  return size


def _snap(low: int, high: int, grid: int, rng: np.random.Generator) -> int:
  """A random position in [low, high], a multiple of `grid` when grid > 0."""
  if not grid:
    return int(rng.integers(low, high + 1))
  first, last = -(-low // grid), high // grid
  if last < first:
    return low
  return int(rng.integers(first, last + 1)) * grid


def _render(rng: np.random.Generator, scans: np.ndarray, labels: np.ndarray, count: int,
            image_size: int, glyph_size: int, grid: int = 0) -> tuple[np.ndarray, str, list[int]]:
  """Draws one canvas with `count` digits left to right; returns (uint8 [H,W,3], caption, labels)."""
  canvas = rng.uniform(0, 30, size=(image_size, image_size, 3)).astype(np.float32)
  slot_width = image_size // count
  parts, digit_labels = [], []
  for slot in range(count):
    index = rng.integers(len(labels))
    colour_name = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    # Each digit stays inside its own horizontal slot, so reading order == slot order.
    x_max = max(slot * slot_width, (slot + 1) * slot_width - glyph_size)
    x = _snap(slot * slot_width, x_max, grid, rng)
    x = min(x, image_size - glyph_size)
    y = _snap(0, image_size - glyph_size, grid, rng)
    alpha = _glyph(scans[index], glyph_size)[..., None]
    colour = np.asarray(COLOURS[colour_name], np.float32) * rng.uniform(0.8, 1.0)
    region = canvas[y:y + glyph_size, x:x + glyph_size]
    canvas[y:y + glyph_size, x:x + glyph_size] = region * (1 - alpha) + colour * alpha
    digit = int(labels[index])
    parts.append(f"a {colour_name} {digit}")
    digit_labels.append(digit)
  return np.clip(canvas, 0, 255).astype(np.uint8), " left of ".join(parts), digit_labels


def make_scenes(split: str, num: int, seed: int, image_size: int = 48,
                max_digits: int = 2, grid: int = 0) -> dict:
  """Scenes of 1..max_digits digits.

  Returns:
    dict(image=uint8 [num, image_size, image_size, 3], caption=list[str] of length num,
         captions=list of [caption] per scene, the several-captions-per-image form).
  """
  scans, labels = _scans(split)
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  glyph_size = _glyph_size(image_size, max_digits, grid)
  images, captions = [], []
  for _ in range(num):
    count = int(rng.integers(1, max_digits + 1))
    image, caption, _ = _render(rng, scans, labels, count, image_size, glyph_size, grid)
    images.append(image)
    captions.append(caption)
  return {"image": np.stack(images), "caption": captions, "captions": [[c] for c in captions]}


def make_single_digits(split: str, num: int, seed: int, image_size: int = 48,
                       max_digits: int = 2, grid: int = 0) -> dict:
  """Canvases with exactly one digit, for zero-shot digit classification.

  `max_digits` only sets the glyph size, to match scenes made with the same value.

  Returns:
    dict(image=uint8 [num, H, W, 3], label=int32 [num] (the digit), caption=list[str],
         captions=list of [caption]).
  """
  scans, labels = _scans(split)
  rng = np.random.default_rng([seed, 2 if split == "train" else 3])
  glyph_size = _glyph_size(image_size, max_digits, grid)
  images, captions, targets = [], [], []
  for _ in range(num):
    image, caption, digit_labels = _render(rng, scans, labels, 1, image_size, glyph_size, grid)
    images.append(image)
    captions.append(caption)
    targets.append(digit_labels[0])
  return {"image": np.stack(images), "label": np.asarray(targets, np.int32), "caption": captions,
          "captions": [[c] for c in captions]}


# Prompt templates for zero-shot digit classification: one per colour, averaged (prompt ensembling).
ZERO_SHOT_TEMPLATES = tuple(f"a {colour} {{}}" for colour in COLOUR_NAMES)
