"""Evaluators that run a model over evaluation sets: zero-shot classification and retrieval.

Configured by `config.evals`:
  every_steps          0 = only after training; N = also every N steps.
  zeroshot             dict(split, class_names, templates, examples) or None
  retrieval            dict(split, examples) or None
The train loop and the `evaluate` CLI both call `run_evals`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from coca_jax.data import preprocess
from coca_jax.evaluation import metrics
from coca_jax.models.coca import CoCa


class Embedder:
  """Batched, jitted image/text embedding. Inputs are padded to a fixed batch so each function
  compiles once; outputs are L2-normalised numpy [N, D]."""

  def __init__(self, model: CoCa, params, tokenizer, batch_size: int = 256):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.batch_size = batch_size
    self.max_len = model.config.max_len
    self._image_fn = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                      method=CoCa.encode_image)[0])
    self._text_fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method=CoCa.encode_text))

  def _batched(self, fn, array: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(array), self.batch_size):
      chunk = array[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      out.append(np.asarray(fn(self.params, chunk))[:self.batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, self.model.config.embed_dim), np.float32)

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    """images: uint8 [N, H, W, 3] at the model's image size."""
    return self._batched(self._image_fn, preprocess.normalize_images(images))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    return self._batched(self._text_fn, self.tokenizer.tokenize(list(texts), self.max_len))


def _take(source, limit: int | None):
  images, captions, labels = [], [], []
  for batch in source.batches(256, limit=limit):
    images.append(batch["image"])
    captions.extend(batch["captions"])
    if "label" in batch:
      labels.append(batch["label"])
  return np.concatenate(images), captions, (np.concatenate(labels) if labels else None)


def zeroshot_eval(embedder: Embedder, source, class_names, templates, limit=None) -> dict:
  images, _, labels = _take(source, limit)
  if labels is None:
    raise ValueError(f"zero-shot split {source.split!r} of {source.name!r} has no labels")
  classifier = metrics.zero_shot_classifier(embedder.embed_texts, class_names, templates)
  accuracy = metrics.zero_shot_accuracy(embedder.embed_images(images), classifier, labels)
  return {f"eval/zeroshot_{k}": float(v) for k, v in accuracy.items()}


def retrieval_eval(embedder: Embedder, source, limit=None) -> dict:
  images, captions, _ = _take(source, limit)
  texts = [c for caps in captions for c in caps]
  text_to_image = np.asarray([i for i, caps in enumerate(captions) for _ in caps])
  result = metrics.retrieval_metrics(embedder.embed_images(images), embedder.embed_texts(texts),
                                     text_to_image)
  return {f"eval/{k}": float(v) for k, v in result.items()}


def run_evals(config, embedder: Embedder, make_source) -> dict:
  """Runs each configured evaluator. `make_source(split)` returns an EvalSource."""
  results = {}
  evals = config.evals
  if evals.get("zeroshot"):
    z = evals.zeroshot
    results.update(zeroshot_eval(embedder, make_source(z.split), list(z.class_names),
                                 list(z.templates), z.get("examples")))
  if evals.get("retrieval"):
    r = evals.retrieval
    results.update(retrieval_eval(embedder, make_source(r.split), r.get("examples")))
  return results
