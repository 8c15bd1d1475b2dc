"""Losses against plain numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.training import losses


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_softmax_contrastive_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = _unit(rng.standard_normal((6, 5))), _unit(rng.standard_normal((6, 5)))
  scale = 7.0
  logits = scale * img @ txt.T
  i2t = -np.mean(np.diag(_log_softmax(logits, axis=1)))
  t2i = -np.mean(np.diag(_log_softmax(logits, axis=0)))
  loss, metrics = losses.softmax_contrastive_loss(jnp.asarray(img), jnp.asarray(txt), scale)
  # The paper's eq. 1 sums the two directions; 'mean' (open_clip) halves it.
  np.testing.assert_allclose(loss, i2t + t2i, rtol=1e-5)
  mean, _ = losses.softmax_contrastive_loss(jnp.asarray(img), jnp.asarray(txt), scale, "mean")
  np.testing.assert_allclose(mean, (i2t + t2i) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics["contrastive_i2t"], i2t, rtol=1e-5)
  np.testing.assert_allclose(metrics["contrastive_t2i"], t2i, rtol=1e-5)


def test_contrastive_loss_is_low_for_aligned_pairs_and_high_for_shuffled():
  rng = np.random.default_rng(1)
  emb = jnp.asarray(_unit(rng.standard_normal((8, 16))))
  aligned, _ = losses.softmax_contrastive_loss(emb, emb, 50.0)
  shuffled, _ = losses.softmax_contrastive_loss(emb, emb[::-1], 50.0)
  assert float(aligned) < 0.1 < float(shuffled)


def test_sigmoid_contrastive_matches_numpy():
  rng = np.random.default_rng(2)
  img, txt = _unit(rng.standard_normal((4, 3))), _unit(rng.standard_normal((4, 3)))
  scale, bias = 10.0, -3.0
  logits = scale * img @ txt.T + bias
  labels = 2 * np.eye(4) - 1
  expected = np.sum(np.log1p(np.exp(-labels * logits))) / 4
  loss, _ = losses.sigmoid_contrastive_loss(jnp.asarray(img), jnp.asarray(txt), scale, bias)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_caption_loss_matches_numpy_and_ignores_pad():
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
  labels = np.array([[4, 5, 3, 0, 0], [6, 4, 4, 5, 3]], np.int32)
  logp = _log_softmax(logits, axis=-1)
  picked = np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  real = labels != 0
  expected = -picked[real].mean()
  loss, metrics = losses.caption_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert float(metrics["caption_tokens"]) == real.sum()
  # Whatever the model predicts at pad positions cannot change the loss.
  noisy = logits.copy()
  noisy[~real] += 100 * rng.standard_normal(noisy[~real].shape)
  np.testing.assert_allclose(losses.caption_loss(jnp.asarray(noisy), jnp.asarray(labels))[0],
                             expected, rtol=1e-5)
  # Token accuracy: the share of real tokens whose label is the argmax (some made so).
  hits = labels.copy()
  hits[0, :2] = np.argmax(noisy[0, :2], -1)
  hits[1, 3] = np.argmax(noisy[1, 3], -1)
  hits[hits == 0] = 1  # Stay real tokens (a wrong guess at worst).
  accuracy = (np.argmax(noisy, -1) == hits)[hits != 0].mean()
  assert accuracy > 0
  np.testing.assert_allclose(
      losses.caption_loss(jnp.asarray(noisy), jnp.asarray(hits))[1]["caption_accuracy"],
      accuracy, rtol=1e-6)


def test_caption_label_smoothing_matches_numpy():
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((1, 3, 5)).astype(np.float32)
  labels = np.array([[1, 2, 0]], np.int32)
  eps = 0.1
  target = np.full((1, 3, 5), eps / 5) + (1 - eps) * np.eye(5)[labels]
  per_token = -(target * _log_softmax(logits, -1)).sum(-1)
  expected = per_token[0, :2].mean()
  loss, _ = losses.caption_loss(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=eps)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_coca_loss_weights_parts_1_and_2_by_default():
  rng = np.random.default_rng(5)
  emb = jnp.asarray(_unit(rng.standard_normal((3, 4))))
  text = jnp.asarray([[2, 5, 3, 0], [2, 6, 7, 3], [2, 3, 0, 0]])
  outputs = {"image_embed": emb, "text_embed": emb[::-1], "logit_scale": jnp.array(5.0),
             "caption_logits": jnp.asarray(rng.standard_normal((3, 3, 9)), jnp.float32)}
  total, metrics = losses.coca_loss(outputs, text)
  assert float(total) == pytest.approx(
      float(metrics["contrastive_loss"]) + 2 * float(metrics["caption_loss"]), rel=1e-6)
  assert set(metrics) >= {"loss", "contrastive_loss", "caption_loss"}
  with pytest.raises(ValueError, match="contrastive"):
    losses.coca_loss(outputs, text, contrastive="hinge")
