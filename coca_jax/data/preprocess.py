"""Image preprocessing on the host: decode, resize, random-resized-crop, normalise.

Everything here runs in grain workers (or in-process), so it is numpy + Pillow only and
works on one image at a time except `normalize_images`, which is vectorised over a batch.

Shapes: a single image is uint8 `[height, width, 3]`; a batch is uint8 `[batch, height, width, 3]`.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# CLIP/CoCa normalisation constants (per RGB channel), part of the batch contract.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# (x / 255 - mean) / std == x * scale + offset, folded once so a batch costs one fused
# multiply-add per pixel.
_NORM_SCALE = (1.0 / (255.0 * np.asarray(IMAGE_STD, np.float64))).astype(np.float32)
_NORM_OFFSET = (-np.asarray(IMAGE_MEAN, np.float64) / np.asarray(IMAGE_STD, np.float64)).astype(
  np.float32
)

# Aspect ratio range of the random crop (width / height), the common Inception default.
DEFAULT_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def normalize_images(images: np.ndarray) -> np.ndarray:
  """Maps uint8 pixels to the model's input scale.

  Args:
    images: uint8 `[..., height, width, 3]` (a single image or a batch).

  Returns:
    float32 of the same shape: `(images / 255 - IMAGE_MEAN) / IMAGE_STD` per channel.
  """
  images = np.asarray(images)
  if images.shape[-1] != 3:
    raise ValueError(f"normalize_images expects RGB images [..., H, W, 3], got shape {images.shape}")
  out = images.astype(np.float32)
  out *= _NORM_SCALE
  out += _NORM_OFFSET
  return out


def decode_image(image_bytes: bytes, *, min_size: tuple[int, int] | None = None) -> Image.Image:
  """Decodes encoded image bytes to an RGB PIL image.

  Args:
    image_bytes: PNG/JPEG/... bytes as stored by our builders.
    min_size: optional (width, height) the caller will crop/resize down to. For JPEG the
      decoder then decodes at a reduced DCT scale (1/2, 1/4, 1/8) that still covers that
      size, which makes decoding large photos several times cheaper.
  """
  image = Image.open(io.BytesIO(image_bytes))
  return _to_rgb(image, min_size or image.size)


def resize_and_center_crop(image: Image.Image, size: int) -> np.ndarray:
  """Evaluation geometry: shorter side to `size` (bicubic), then the central square.

  Returns:
    uint8 `[size, size, 3]`.
  """
  width, height = image.size
  if not width or not height:  # Scaling the shorter side would divide by zero.
    raise ValueError(f"the image is {width}x{height}: it has no pixels to resize")
  scale = size / min(width, height)
  new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
  left, top = (new_w - size) // 2, (new_h - size) // 2
  # Resize only the box that survives the crop: box coordinates are in source pixels.
  box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
  resized = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
  return np.asarray(resized, dtype=np.uint8)


def sample_crop_box(
  width: int,
  height: int,
  rng: np.random.Generator,
  scale: tuple[float, float],
  ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
) -> tuple[int, int, int, int]:
  """Samples an Inception-style crop: area fraction in `scale`, aspect ratio in `ratio`.

  Tries 10 draws; if none fits inside the image, falls back to the largest central crop
  whose aspect ratio is clipped into `ratio`.

  Returns:
    (left, top, crop_width, crop_height) in source pixels.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      left = int(rng.integers(0, width - crop_w + 1))
      top = int(rng.integers(0, height - crop_h + 1))
      return left, top, crop_w, crop_h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    crop_w, crop_h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    crop_w, crop_h = int(round(height * ratio[1])), height
  else:
    crop_w, crop_h = width, height
  return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def random_resized_crop(
  image: Image.Image,
  size: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = (0.9, 1.0),
  ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
) -> np.ndarray:
  """Training geometry: a random crop (see `sample_crop_box`) resized to `size` x `size`.

  No horizontal flip on purpose: captions name positions ("a red 3 left of a blue 7").

  Returns:
    uint8 `[size, size, 3]`.
  """
  left, top, crop_w, crop_h = sample_crop_box(image.size[0], image.size[1], rng, scale, ratio)
  box = (left, top, left + crop_w, top + crop_h)
  resized = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
  return np.asarray(resized, dtype=np.uint8)


def decode_train_image(
  image_bytes: bytes,
  size: int,
  rng: np.random.Generator | None,
  scale: tuple[float, float] = (0.9, 1.0),
  ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
) -> np.ndarray:
  """Decode + geometry for one training example.

  With `rng=None` this is the evaluation geometry (resize shorter side + center crop).
  JPEGs are decoded at reduced scale when the output is much smaller than the image; the
  crop is drawn on the full-resolution size first so the sampled box (hence the result up
  to resampling) does not depend on that speed-up.

  Returns:
    uint8 `[size, size, 3]`.
  """
  image = Image.open(io.BytesIO(image_bytes))
  full_w, full_h = image.size
  if rng is None:
    short = min(full_w, full_h)
    need = (math.ceil(size * full_w / short), math.ceil(size * full_h / short))
    return resize_and_center_crop(_to_rgb(image, need), size)
  left, top, crop_w, crop_h = sample_crop_box(full_w, full_h, rng, scale, ratio)
  # Smallest full-image size at which the crop still has >= size pixels per side.
  reduction = min(crop_w / size, crop_h / size)
  need = (math.ceil(full_w / max(reduction, 1.0)), math.ceil(full_h / max(reduction, 1.0)))
  image = _to_rgb(image, need)
  sx, sy = image.size[0] / full_w, image.size[1] / full_h
  box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
  resized = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
  return np.asarray(resized, dtype=np.uint8)


def _to_rgb(image: Image.Image, min_size: tuple[int, int]) -> Image.Image:
  if image.format == "JPEG" and (min_size[0] < image.size[0] or min_size[1] < image.size[1]):
    image.draft("RGB", min_size)
  if image.mode != "RGB":
    image = image.convert("RGB")
  return image
