"""Masked image modelling (BEiT; VLMo's stage 1 at demo scale): BEiT's blockwise masks, the
visual codes of the k-means codebook, a loss over the masked patches only, and a model that
cannot see the pixels of a masked patch."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.core import config as config_lib
from coca_jax.data import visual_codebook
from coca_jax.training import losses
from coca_jax.training import step as step_lib
from conftest import REPO


def test_block_mask_masks_the_configured_count_in_blocks_and_is_deterministic():
  grid, count, min_block = 6, 14, 4  # The demo's 36 patches at ratio 0.4.
  mask = np.asarray(losses.block_mask(jax.random.key(0), 64, grid, count, min_block))
  assert mask.shape == (64, grid * grid) and mask.dtype == bool
  per_image = mask.sum(axis=1)
  assert per_image.max() <= count
  assert np.mean(per_image == count) >= 0.9, per_image
  # Blocks, not scattered patches: every masked patch has a masked 4-neighbour (each block is
  # a rectangle of >= 2 patches). Random masks of 14 of 36 patches almost never do.
  grids = mask.reshape(-1, grid, grid)
  padded = np.pad(grids, ((0, 0), (1, 1), (1, 1)))
  neighbour = (padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2]
               | padded[:, 1:-1, 2:])
  assert not np.any(grids & ~neighbour)
  # The same key draws the same masks; another key others; images differ within a batch.
  np.testing.assert_array_equal(
      mask, np.asarray(losses.block_mask(jax.random.key(0), 64, grid, count, min_block)))
  assert not np.array_equal(
      mask, np.asarray(losses.block_mask(jax.random.key(1), 64, grid, count, min_block)))
  assert len({row.tobytes() for row in mask}) > 32


def test_mim_loss_counts_only_masked_patches():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((2, 9, 5)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 5, (2, 9)), jnp.int32)
  mask = jnp.asarray(rng.random((2, 9)) < 0.4)
  total, hits = losses.mim_sums(logits, targets, mask)
  per_patch = -jax.nn.log_softmax(logits)[jnp.arange(2)[:, None], jnp.arange(9), targets]
  np.testing.assert_allclose(total, jnp.sum(jnp.where(mask, per_patch, 0.0)), rtol=1e-6)
  right = jnp.argmax(logits, -1) == targets
  assert hits == jnp.sum(right & mask)
  # Anything at an unmasked patch changes nothing.
  changed = jnp.where(mask[..., None], logits, 100.0 * logits)
  np.testing.assert_allclose(losses.mim_sums(changed, targets, mask)[0], total, rtol=1e-6)


def test_codebook_is_deterministic_and_the_step_codes_patches_as_it_was_fitted():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  patches = visual_codebook.image_patches(images, 8)
  assert patches.shape == (6 * 4, 8 * 8 * 3)
  features = visual_codebook.patch_features(patches, 8)
  assert features.shape == (6 * 4, visual_codebook.CELLS ** 2 * 3)
  codebook = visual_codebook.fit(features, 8, seed=0)
  np.testing.assert_array_equal(codebook, visual_codebook.fit(features, 8, seed=0))
  # The step's codes (jnp, from patches in patchify's order) are the fit's nearest codewords.
  batched = jnp.asarray(patches.reshape(6, 4, -1))
  np.testing.assert_array_equal(
      np.asarray(losses.visual_codes(batched, jnp.asarray(codebook), 8,
                                     visual_codebook.CELLS)).reshape(-1),
      visual_codebook.nearest(features, codebook))
  # Patches in patchify's order: row-major over the grid, each flattened (row, column,
  # channel) from the normalised pixels. Patch 2 of a 2 x 2 grid is grid row 1, column 0.
  normalised_image = visual_codebook.preprocess.normalize_images(images[:1])[0]
  np.testing.assert_array_equal(visual_codebook.image_patches(images[:1], 8)[2],
                                normalised_image[8:16, 0:8].reshape(-1))


@pytest.fixture(scope="module")
def stage1():
  """The VLMo demo's stage-1 smoke model (MIM head) and its parameters."""
  config = config_lib.load_config(os.path.join(REPO, "experiments", "demo.py:vlmo,smoke,stage=1"))
  model = step_lib.build_model(config)
  params = nn.unbox(step_lib.init_params(config, model, jax.random.key(0)))
  return config, model, params


def test_a_masked_patch_is_hidden_from_the_model(stage1):
  config, model, params = stage1
  size, patch = config.model.image_size, config.model.patch_size
  grid = size // patch
  image = jnp.asarray(np.random.default_rng(0).standard_normal((2, size, size, 3)), jnp.float32)
  mask = jnp.zeros((2, grid * grid), bool).at[:, 0].set(True)  # Patch (0, 0) masked.
  logits = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, method="mim_logits"))
  base = logits(params, image, mask)
  assert base.shape == (2, grid * grid, config.model.mome.mim_vocab)
  # New pixels under the masked patch: nothing changes; under an unmasked one: it does.
  np.testing.assert_array_equal(logits(params, image.at[:, :patch, :patch].set(3.0), mask), base)
  assert not np.allclose(logits(params, image.at[:, :patch, patch:2 * patch].set(3.0), mask),
                         base)
