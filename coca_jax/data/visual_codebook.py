"""A demo-scale visual tokenizer for masked image modelling: a k-means codebook over patches.

BEiT (arXiv 2106.08254) predicts, for each masked patch, the discrete code that DALL-E's dVAE
gives it (8,192 codes, learned on 250M images). No such tokenizer exists at the demo's scale and
nothing may be downloaded, so this fits a stand-in once, deterministically: k-means (Lloyd's
iterations from a k-means++ start, a fixed seed) over patch features of train images. A patch's
feature is its normalised pixels (`preprocess.normalize_images`, what the model sees) averaged
over CELLS x CELLS cells per colour channel ([CELLS * CELLS * 3]; at 8x8 patches, 4x4 pixels a
cell): the demo's background is pixel noise, and on raw pixels k-means spent its codes splitting
that noise (7 codes of 12% each), which no model can predict. The fit runs on the distinct
features rounded to QUANTUM, so the background (84% of the patches) is one point among the
digits' thousands and gets one code, the digit strokes the others. A patch's code is its
nearest codeword (Euclidean) of its unrounded feature. Unlike the dVAE, a code describes one
patch's coarse colours and shape alone (the dVAE's encoder sees the whole image), and the
codebook is small (`config.model.mome.mim_vocab`).
"""

from __future__ import annotations

import os

import numpy as np

from coca_jax.data import preprocess
from coca_jax.data import sources

CODEBOOK_FILE = "visual_codebook.npy"
CELLS = 2  # Cells per patch side that a feature averages the pixels over.
QUANTUM = 0.25  # Feature rounding for the fit only (normalised units: about 16 pixel levels).


def image_patches(images: np.ndarray, patch: int) -> np.ndarray:
  """uint8 [N, S, S, 3] -> float32 [N * (S / patch)^2, patch * patch * 3]: normalised pixels,
  each patch flattened (row, column, channel) in `patchify`'s order."""
  x = preprocess.normalize_images(images)
  n, size = x.shape[0], x.shape[1]
  if size % patch:
    raise ValueError(f"image size {size} is not a multiple of the patch size {patch}")
  g = size // patch
  x = x.reshape(n, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n * g * g, patch * patch * 3)


def patch_features(patches, patch: int, cells: int = CELLS):
  """Patches [..., patch * patch * 3] (`image_patches`' layout) -> features
  [..., cells * cells * 3]: each channel's mean over each of cells x cells equal cells. NumPy
  or JAX arrays alike (array methods only): the fit and the train step's targets
  (`training.losses.visual_codes`) share it."""
  if patch % cells:
    raise ValueError(f"patch size {patch} is not a multiple of {cells} feature cells")
  lead, side = patches.shape[:-1], patch // cells
  x = patches.reshape(*lead, cells, side, cells, side, 3).mean(axis=(-4, -2))
  return x.reshape(*lead, cells * cells * 3)


def nearest(points: np.ndarray, codebook: np.ndarray) -> np.ndarray:
  """The index [N] of each point's nearest codeword (Euclidean); codebook [K, D]."""
  distances = (np.sum(points ** 2, axis=1, keepdims=True) - 2.0 * points @ codebook.T
               + np.sum(codebook ** 2, axis=1))
  return np.argmin(distances, axis=1)


def fit(points: np.ndarray, size: int, seed: int = 0, iterations: int = 20) -> np.ndarray:
  """k-means of points [N, D] into `size` codewords: a k-means++ start, then Lloyd's
  iterations; an emptied cluster takes the point farthest from its codeword. Deterministic in
  `seed`. Returns float32 [size, D]."""
  points = np.asarray(points, np.float32)
  distinct = np.unique(points, axis=0)
  if len(distinct) < size:
    raise ValueError(f"only {len(distinct)} distinct patches for a codebook of {size}; fit on "
                     "more images or lower config.model.mome.mim_vocab")
  rng = np.random.default_rng(seed)
  centres = [distinct[rng.integers(len(distinct))]]
  closest = np.sum((distinct - centres[0]) ** 2, axis=1)
  for _ in range(size - 1):
    index = rng.choice(len(distinct), p=closest / closest.sum())
    centres.append(distinct[index])
    closest = np.minimum(closest, np.sum((distinct - distinct[index]) ** 2, axis=1))
  codebook = np.stack(centres)
  for _ in range(iterations):
    assigned = nearest(points, codebook)
    counts = np.bincount(assigned, minlength=size)
    sums = np.zeros_like(codebook)
    np.add.at(sums, assigned, points)
    empty = counts == 0
    codebook = np.where(empty[:, None], codebook, sums / np.maximum(counts, 1)[:, None])
    if empty.any():
      far = np.sum((points - codebook[assigned]) ** 2, axis=1)
      codebook[empty] = points[np.argsort(-far)[:int(empty.sum())]]
  return codebook.astype(np.float32)


def fit_on_dataset(name: str, data_dir: str, split: str, path: str, *, size: int, patch: int,
                   image_size: int, max_images: int = 2_000, seed: int = 0) -> np.ndarray:
  """Fits the codebook on the distinct rounded features (module docstring) of the patches of the
  first `max_images` images of `split` (decoded at `image_size` as the training pipeline
  decodes them, without crops) and saves it to `path` (.npy)."""
  source = sources.open_source(name, data_dir, split, decode_images=False)
  count = min(len(source), max_images)
  images = np.stack([preprocess.decode_train_image(source[i]["image"], image_size, None)
                     for i in range(count)])
  features = patch_features(image_patches(images, patch), patch)
  codebook = fit(np.unique(np.round(features / QUANTUM) * QUANTUM, axis=0), size, seed)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npy"
  np.save(tmp, codebook)
  os.replace(tmp, path)
  return codebook


def load(path: str, size: int, patch: int) -> np.ndarray:
  """The codebook at `path`, checked against the model: float32 [size, CELLS * CELLS * 3]."""
  if not os.path.exists(path):
    raise ValueError(f"config.loss.mim_codebook={path!r} does not exist; leave it '' to fit "
                     "one on the train images when the run starts")
  codebook = np.load(path)
  want = (size, CELLS * CELLS * 3)
  if codebook.shape != want or patch % CELLS:
    raise ValueError(f"config.loss.mim_codebook={path!r} has shape {codebook.shape}, but the "
                     f"model needs {want} (config.model.mome.mim_vocab, {CELLS}x{CELLS} cells "
                     f"x 3 channels of a {patch}-pixel patch); fit it again (leave "
                     "config.loss.mim_codebook '')")
  return codebook.astype(np.float32)
