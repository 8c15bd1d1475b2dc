"""Stroke digits: handwriting-like digit glyphs drawn from pen strokes, made by this project.

Each digit 0-9 has a few allographs (the ways people write it: a 1 plain or with flag and
foot, a 4 open or closed, a 7 plain or barred, ...), each a few pen strokes given as points in
a unit box (x right, y down, height 1). A glyph is one allograph with its shape jittered by a
smooth random warp, slanted, rotated and stretched at random, then drawn with a round pen of
random width, anti-aliased, keeping its aspect ratio and filling the box's height as MNIST's
digits fill theirs. The 8x8 scans of `digit_scenes` upscaled are blurry, square-filled blobs;
these glyphs have the thin, crisp strokes of other people's digits.

Everything is drawn from the generator passed in: the same generator state gives the same
pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Pen-width range as a fraction of the glyph height (MNIST: ~2-3 px strokes on 20-px digits).
_PEN = (0.08, 0.2)
# Slant as a shear of x by height (positive leans right, as most handwriting does), rotation in
# degrees, width stretch, and the amplitude of the smooth warp (fraction of the height).
_SLANT = (-0.15, 0.45)
_ROTATION = 10.0
_STRETCH = (0.75, 1.25)
_WARP = 0.05
# Drawn at this many times the glyph size, then box-filtered down: anti-aliased edges.
_SUPERSAMPLE = 4


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float,
         n: int = 0) -> list[tuple[float, float]]:
  """Points of an elliptic arc from angle `start` to `end` in degrees (0 = right, 90 = down,
  the direction of travel follows the sign of end - start)."""
  n = n or max(4, int(abs(end - start) / 12))
  angles = np.radians(np.linspace(start, end, n))
  return [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles]


def _line(*points: tuple[float, float]) -> list[tuple[float, float]]:
  return list(points)


# digit -> allographs; each allograph a tuple of strokes, each stroke a list of (x, y) points.
ALLOGRAPHS: dict[int, tuple[tuple[list[tuple[float, float]], ...], ...]] = {
    0: (
        (_arc(0.5, 0.5, 0.3, 0.5, -90, 270),),  # An oval, closed at the top.
        (_arc(0.5, 0.5, 0.32, 0.5, -60, 290),),  # Started right of the top, overlapping.
    ),
    1: (
        (_line((0.5, 0.0), (0.5, 1.0)),),  # Plain.
        (_line((0.25, 0.25), (0.55, 0.0), (0.55, 1.0)),),  # With a flag.
        (_line((0.25, 0.25), (0.55, 0.0), (0.55, 1.0)),  # Flag and foot.
         _line((0.25, 1.0), (0.85, 1.0))),
    ),
    2: (
        (_arc(0.5, 0.3, 0.35, 0.3, 190, 370) + _line((0.12, 1.0), (0.92, 1.0)),),
        # With a loop at the bottom left.
        (_arc(0.5, 0.3, 0.35, 0.3, 190, 370) + _line((0.25, 0.85))
         + _arc(0.25, 0.9, 0.1, 0.1, 270, 90, 8)[::-1] + _line((0.3, 0.95), (0.92, 1.0)),),
        # A neck curving into the base.
        (_arc(0.45, 0.28, 0.35, 0.28, 180, 400)
         + _line((0.62, 0.62), (0.35, 0.85), (0.1, 1.0), (0.4, 0.95), (0.7, 0.97), (0.95, 0.92)),),
    ),
    3: (
        # Two bumps meeting in the middle.
        (_arc(0.45, 0.26, 0.33, 0.26, 200, 450) + _arc(0.45, 0.74, 0.37, 0.26, -90, 160),),
        # A flat top, a diagonal to the middle, then the lower bump.
        (_line((0.15, 0.0), (0.8, 0.0), (0.4, 0.45)) + _arc(0.45, 0.72, 0.37, 0.28, -100, 160),),
    ),
    4: (
        # Open: a left arm into the crossbar, the stem apart.
        (_line((0.2, 0.0), (0.12, 0.6), (0.95, 0.6)), _line((0.72, 0.05), (0.72, 1.0))),
        # Closed: a diagonal from the top of the stem down into the crossbar.
        (_line((0.65, 0.0), (0.05, 0.65), (0.95, 0.65)), _line((0.65, 0.0), (0.65, 1.0))),
    ),
    5: (
        (_line((0.85, 0.0), (0.25, 0.0), (0.2, 0.42))
         + _arc(0.48, 0.68, 0.36, 0.3, -130, 150),),
        # The bar drawn last, as a second stroke.
        (_line((0.25, 0.0), (0.2, 0.42)) + _arc(0.48, 0.68, 0.36, 0.3, -130, 150),
         _line((0.25, 0.0), (0.85, 0.02))),
        # A short neck and a deep, round belly.
        (_line((0.8, 0.0), (0.3, 0.02), (0.25, 0.3)) + _arc(0.45, 0.62, 0.38, 0.36, -120, 145),),
    ),
    6: (
        # A curved stem into a closed loop at the bottom.
        (_arc(0.75, 0.62, 0.55, 0.62, 235, 180) + _arc(0.5, 0.7, 0.3, 0.3, 180, -180),),
        # A straighter stem.
        (_line((0.7, 0.0), (0.25, 0.55)) + _arc(0.5, 0.72, 0.3, 0.28, 210, -150),),
        # A long stem and a small loop.
        (_arc(0.9, 0.75, 0.7, 0.75, 240, 180) + _arc(0.45, 0.8, 0.25, 0.2, 180, -180),),
    ),
    7: (
        (_line((0.1, 0.0), (0.9, 0.0), (0.4, 1.0)),),  # Plain.
        (_line((0.1, 0.0), (0.9, 0.0), (0.4, 1.0)), _line((0.35, 0.5), (0.85, 0.5))),  # Barred.
        (_line((0.1, 0.15), (0.12, 0.0), (0.9, 0.0), (0.45, 1.0)),),  # With a hook.
        # A stem turning down to the vertical.
        (_line((0.15, 0.05), (0.85, 0.0), (0.62, 0.4), (0.5, 0.7), (0.46, 1.0)),),
    ),
    8: (
        # Two loops stacked.
        (_arc(0.5, 0.25, 0.25, 0.25, 0, 360), _arc(0.5, 0.73, 0.32, 0.27, -90, 270)),
        # One stroke: an S down, then back up.
        (_arc(0.5, 0.25, 0.27, 0.25, 0, -270) + _arc(0.5, 0.74, 0.3, 0.26, -90, 180)
         + _line((0.7, 0.15)),),
        # One stroke crossing itself: the top curve, a diagonal down, the bottom curve, back up.
        (_arc(0.5, 0.2, 0.25, 0.2, 180, 360) + _line((0.25, 0.8))
         + _arc(0.5, 0.8, 0.25, 0.2, 180, 0) + _line((0.25, 0.2)),),
    ),
    9: (
        # A loop at the top and a straight tail.
        (_arc(0.45, 0.28, 0.3, 0.28, 0, -360), _line((0.75, 0.28), (0.7, 1.0))),
        # A curved tail.
        (_arc(0.45, 0.28, 0.3, 0.28, 0, -360),
         _line((0.75, 0.25)) + _arc(0.35, 0.5, 0.4, 0.5, 0, 100)),
        # A small loop on a long, straight stem, one stroke.
        (_arc(0.42, 0.2, 0.26, 0.2, 0, -360) + _line((0.62, 1.0)),),
    ),
}


def num_allographs(digit: int) -> int:
  return len(ALLOGRAPHS[digit])


def _warp(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A smooth random displacement of every point (one sine per axis over the other axis), so a
  stroke bends as a whole instead of jittering point by point."""
  amplitude = rng.uniform(-_WARP, _WARP, size=2)
  frequency = rng.uniform(0.5, 1.5, size=2)
  phase = rng.uniform(0, 2 * np.pi, size=2)
  x, y = points[:, 0], points[:, 1]
  return np.stack([x + amplitude[0] * np.sin(2 * np.pi * frequency[0] * y + phase[0]),
                   y + amplitude[1] * np.sin(2 * np.pi * frequency[1] * x + phase[1])], axis=1)


def stroke_glyph(digit: int, size: int, rng: np.random.Generator,
                 allograph: int | None = None) -> np.ndarray:
  """One handwriting-like glyph of `digit` as a float ink coverage map [size, size] in [0, 1].

  The digit fills the box's height (its width follows its own aspect ratio, at most the box),
  centred. `allograph` picks the way it is written (default: one at random).
  """
  if digit not in ALLOGRAPHS:
    raise ValueError(f"stroke digit {digit!r} is unknown; use 0-9")
  choices = ALLOGRAPHS[digit]
  if allograph is None:
    allograph = int(rng.integers(len(choices)))
  strokes = [np.asarray(stroke, np.float64) for stroke in choices[allograph]]
  # One warp, slant, rotation and stretch for the whole glyph: its strokes stay joined.
  lengths = np.cumsum([0] + [len(s) for s in strokes])
  points = _warp(np.concatenate(strokes), rng)
  points[:, 0] *= rng.uniform(*_STRETCH)
  points[:, 0] += rng.uniform(*_SLANT) * (0.5 - points[:, 1])
  angle = np.radians(rng.uniform(-_ROTATION, _ROTATION))
  rotation = np.asarray([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  points = points @ rotation.T
  pen = rng.uniform(*_PEN)  # Of the glyph height.
  # Fit the ink (points plus half a pen each side) into the box, aspect kept, centred.
  low, high = points.min(axis=0), points.max(axis=0)
  extent = high - low + pen
  scale = size * _SUPERSAMPLE / max(extent[1], extent[0])
  pixels = (points - (low + high) / 2) * scale + size * _SUPERSAMPLE / 2
  width = max(1.0, pen * scale)
  canvas = Image.new("L", (size * _SUPERSAMPLE,) * 2, 0)
  draw = ImageDraw.Draw(canvas)
  for start, end in zip(lengths[:-1], lengths[1:]):
    stroke = [tuple(p) for p in pixels[start:end]]
    draw.line(stroke, fill=255, width=int(round(width)), joint="curve")
    for x, y in (stroke[0], stroke[-1]):  # Round pen ends.
      r = width / 2
      draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
  return np.asarray(canvas.resize((size, size), Image.BOX), np.float32) / 255.0
