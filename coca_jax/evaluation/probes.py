"""Frozen-encoder probes: how much a trained image encoder knows about a labelled task when
only a small head is trained on its features (config.evals.probe; docs/evaluation.md,
"Frozen-encoder probes").

* Attentional probe (the CoCa paper's frozen-feature protocol, §4.1): a NEW attentional pooler
  (one learned query, multi-head, the architecture of `models.layers.AttentionalPooler`), a
  LayerNorm and a linear head, trained with AdamW on the encoder's output tokens
  [N, tokens, width] -> eval/probe_attn_top1.
* Linear probe (as big_vision's few-shot linear evaluator: closed-form L2-regularised least
  squares on standardised features, one-hot targets in {-1, 1}) on the pooled image embedding
  [N, D]; the regularisation is chosen on a held-out part of the train split and the probe refit
  on all of it -> eval/probe_linear_top1, eval/probe_linear_l2 (the weight chosen).

Features are computed once per (model parameters, dataset, split, examples) and cached
(`FeatureCache`): in memory for the current parameters (a training run's next eval has new
parameters and drops them), and in `cache_dir` when one is given, one folder per parameter
fingerprint. The parameters never change: the probes read cached features only.

Both probes are deterministic: the linear one is a float64 closed form (its regularisation
sweep costs one eigendecomposition); the attentional one is seeded (initialisation and a fixed
minibatch order from `seed`), each step one jitted call on features kept on the device. Its
pooler is computed in a cheaper but equal form (`pool`): with one query, the key projection
folds into the query and the value projection applies after the attention-weighted mean, so a
step costs O(tokens x width) per example and head instead of O(tokens x width^2). A training
step reads its batch's tokens in cache-sized chunks gathered from the device copy
(`_gathered_attention_mean`, with its own backward pass), never materialising the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from coca_jax.core import fs
from coca_jax.core import schema
from coca_jax.data import preprocess

NORM_EPS = 1e-6  # The LayerNorm epsilon of the model's poolers (layers.AttentionalPooler).


# ---- Features and their cache -----------------------------------------------------------------

@dataclasses.dataclass
class Features:
  """A labelled split seen through a frozen image encoder.

  embeddings: float32 [N, D], the model's (unit-norm) image embeddings;
  tokens: float32 [N, image_tokens, width], the encoder's output tokens;
  labels: int64 [N]."""
  embeddings: np.ndarray
  tokens: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@functools.partial(jax.jit)
def _leaf_sums(params):
  """Per leaf (sum, sum of squares) in float32: [leaves, 2]."""
  leaves = jax.tree.leaves(params)
  return jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)),
                               jnp.sum(jnp.square(x.astype(jnp.float32)))]) for x in leaves])


def params_fingerprint(model, params) -> str:
  """A hex digest of the model's settings and its parameters' values (per-leaf sums, computed on
  the devices that hold them): features cached under it are reused only for these parameters,
  so another model or another training step never reads them."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  layout = [(jax.tree_util.keystr(path), tuple(x.shape), str(x.dtype)) for path, x in leaves]
  sums = np.asarray(jax.device_get(_leaf_sums(params)), np.float32)
  digest = hashlib.sha256(repr((getattr(model, "config", type(model).__name__),
                                layout)).encode())
  digest.update(sums.tobytes())
  return digest.hexdigest()


_FEATURE_FNS: dict = {}  # id(model) -> (model, jitted features function); one compile per model.


def image_features_fn(model):
  """A jitted (params, normalised images [B, H, W, 3]) -> (image embeddings [B, D], encoder
  tokens [B, image_tokens, width]): the model's `image_features`, compiled once per model."""
  entry = _FEATURE_FNS.get(id(model))
  if entry is None or entry[0] is not model:
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="image_features"))
    entry = _FEATURE_FNS[id(model)] = (model, fn)
  return entry[1]


def image_features(embedder, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings float32 [N, D], encoder tokens float32 [N, image_tokens, width]) of uint8
  images [N, H, W, 3], in batches of `embedder.batch_size` padded to one compiled shape."""
  fn, size = image_features_fn(embedder.model), embedder.batch_size
  embeddings, tokens = [], []
  for start in range(0, len(images), size):
    chunk = preprocess.normalize_images(images[start:start + size])
    count = len(chunk)
    if count < size:
      chunk = np.concatenate([chunk, np.zeros((size - count, *chunk.shape[1:]), chunk.dtype)])
    embed, toks = fn(embedder.params, chunk)
    embeddings.append(np.asarray(embed, np.float32)[:count])
    tokens.append(np.asarray(toks, np.float32)[:count])
  return np.concatenate(embeddings), np.concatenate(tokens)


def extract_features(embedder, source, limit: int | None = None) -> Features:
  """The image embeddings, encoder tokens and labels of the first `limit` examples (None: all)
  of `source` (an EvalSource), batched and padded like `Embedder` (one compile per model)."""
  embeddings, tokens, labels = [], [], []
  for batch in source.batches(embedder.batch_size, limit=limit):
    if "label" not in batch:
      raise ValueError(f"split {source.split!r} of {source.name!r} has no labels; the probes "
                       "need a labelled split (config.evals.probe.label_feature names the label)")
    embed, toks = image_features(embedder, batch["image"])
    embeddings.append(embed)
    tokens.append(toks)
    labels.append(np.asarray(batch["label"], np.int64))
  if not labels:
    raise ValueError(f"split {source.split!r} of {source.name!r} is empty")
  return Features(np.concatenate(embeddings), np.concatenate(tokens), np.concatenate(labels))


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


class FeatureCache:
  """Features per (parameter fingerprint, dataset, split, examples, ...): in memory for the
  newest fingerprint only, and under `directory` (when given) as
  <directory>/<fingerprint[:16]>/<dataset>_<split>_<key[:10]>/{embeddings,tokens,labels}.npy,
  written whole or not at all (labels.npy last)."""

  def __init__(self):
    self.memory: dict[str, Features] = {}
    self.fingerprint = None
    self.computed = 0  # Splits embedded (not found in a cache); tests read it.

  def get(self, embedder, source, limit: int | None, directory: str = "",
          fingerprint: str | None = None) -> Features:
    fingerprint = fingerprint or params_fingerprint(embedder.model, embedder.params)
    if fingerprint != self.fingerprint:  # New parameters (a later step): old features go.
      self.memory, self.fingerprint = {}, fingerprint
    info = getattr(getattr(source, "source", None), "dataset_info", None)
    fields = dict(dataset=getattr(source, "name", "?"), split=getattr(source, "split", "?"),
                  data_dir=str(getattr(info, "data_dir", "")), examples=limit or 0,
                  size=len(source), image_size=getattr(source, "image_size", 0),
                  features=repr(getattr(source, "features", None)))
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    if key in self.memory:
      return self.memory[key]
    folder = (fs.join(directory, fingerprint[:16],
                      f"{_slug(fields['dataset'])}_{_slug(fields['split'])}_{key[:10]}")
              if directory else None)
    features = _read(folder) if folder else None
    if features is None:
      t0, c0 = time.perf_counter(), time.process_time()
      features = extract_features(embedder, source, limit)
      self.computed += 1
      logging.info("Probe features of %s/%s: %d examples in %.1fs (%.1f CPU-s)",
                   fields["dataset"], fields["split"], len(features), time.perf_counter() - t0,
                   time.process_time() - c0)
      if folder and jax.process_index() == 0:
        _write(folder, features, fields)
    self.memory[key] = features
    return features


def _read(folder: str) -> Features | None:
  if not fs.exists(fs.join(folder, "labels.npy")):
    return None
  if fs.is_url(folder):
    load = lambda name: np.load(fs.open(fs.join(folder, name), "rb"))
  else:
    load = lambda name: np.load(os.path.join(folder, name), mmap_mode="r")
  return Features(load("embeddings.npy"), load("tokens.npy"), np.asarray(load("labels.npy")))


def _write(folder: str, features: Features, fields: dict) -> None:
  def write(directory):
    fs.makedirs(directory)
    for name in ("embeddings", "tokens", "labels"):  # labels.npy last: the completion marker.
      with fs.open(fs.join(directory, f"{name}.npy"), "wb") as f:
        np.save(f, getattr(features, name))
    fs.write_text(fs.join(directory, "key.json"), json.dumps(fields, indent=1) + "\n")
  try:
    fs.write_directory(folder, write)
  except FileExistsError:  # Another process wrote the same features first.
    pass


CACHE = FeatureCache()  # The process's cache: the train loop's and the evaluate CLI's evals.


# ---- Linear probe -------------------------------------------------------------------------------

def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  return (np.asarray(x, np.float64) - mean) / std


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and standard deviation (1 where a feature is constant, as sklearn's
  StandardScaler does)."""
  x = np.asarray(x, np.float64)
  std = x.std(axis=0)
  return x.mean(axis=0), np.where(std > 0, std, 1.0)


class _RidgeSolver:
  """Least squares with intercept on standardised x [N, D], targets 2 * one_hot - 1, for many
  L2 weights at the cost of one eigendecomposition (of x^T x, or of x x^T when N < D):
  W(l2) = argmin mean |x W + b - y|^2 + l2 |W|^2, b unregularised."""

  def __init__(self, x: np.ndarray, labels: np.ndarray, num_classes: int):
    self.mean, self.std = _moments(x)
    x = _standardise(x, self.mean, self.std)  # Centered: the intercept is the targets' mean.
    y = 2.0 * np.eye(num_classes)[labels] - 1.0
    self.intercept = y.mean(axis=0)
    y = y - self.intercept
    self.n, dim = x.shape
    if self.n >= dim:
      self.eigs, q = np.linalg.eigh(x.T @ x)
      self.left, self.right = q, q.T @ (x.T @ y)
    else:
      self.eigs, q = np.linalg.eigh(x @ x.T)
      self.left, self.right = x.T @ q, q.T @ y

  def weights(self, l2: float) -> np.ndarray:
    return (self.left / (self.eigs + l2 * self.n)) @ self.right

  def predict(self, l2: float, x: np.ndarray) -> np.ndarray:
    scores = _standardise(x, self.mean, self.std) @ self.weights(l2) + self.intercept
    return np.argmax(scores, axis=1)


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit indices, held-out indices) of n train examples: a seeded permutation, the held-out
  part ceil(fraction * n) (at least 1, leaving at least 1 to fit)."""
  order = np.random.default_rng([seed, 1]).permutation(n)
  held = min(max(1, math.ceil(fraction * n)), n - 1)
  return np.sort(order[held:]), np.sort(order[:held])


def linear_probe(train_x, train_labels, test_x, test_labels, num_classes: int,
                 l2s=(1e-4,), holdout: float = 0.2, seed: int = 0) -> dict:
  """{"top1": test accuracy, "l2": the weight chosen, "holdout_top1": {l2: held-out accuracy}}
  of the ridge classifier chosen among `l2s` on a seeded held-out `holdout` of train (ties:
  the strongest), refit on all of train."""
  train_x, train_labels = np.asarray(train_x), np.asarray(train_labels)
  fit, held = holdout_split(len(train_labels), holdout, seed)
  solver = _RidgeSolver(train_x[fit], train_labels[fit], num_classes)
  scores = {float(l2): float(np.mean(solver.predict(l2, train_x[held]) == train_labels[held]))
            for l2 in l2s}
  best = max(scores.values())
  chosen = max(l2 for l2, score in scores.items() if score == best)
  final = _RidgeSolver(train_x, train_labels, num_classes)
  top1 = float(np.mean(final.predict(chosen, test_x) == np.asarray(test_labels)))
  return {"top1": top1, "l2": chosen, "holdout_top1": scores}


# ---- Attentional probe --------------------------------------------------------------------------

def _layer_norm(x, p):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + NORM_EPS) * p["scale"] + p["bias"]


def init_probe(key, width: int, heads: int, num_classes: int) -> dict:
  """Fresh probe parameters: {"pooler": the parameter tree of a one-query
  `layers.AttentionalPooler(1, heads)` over width-wide tokens (its initialisers), "head": a
  LayerNorm and a zero-initialised linear classifier [width, num_classes]}."""
  if width % heads:
    raise ValueError(f"config.evals.probe.attn_heads={heads} does not divide the encoder's "
                     f"token width {width}; use a divisor of {width}")
  head_dim = width // heads
  keys = jax.random.split(key, 5)

  def xavier(k, shape, fan_in, fan_out):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(k, shape, jnp.float32, -limit, limit)

  norm = lambda: {"LayerNorm_0": {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}}
  projection = lambda k: {"kernel": xavier(k, (width, heads, head_dim), width, width),
                          "bias": jnp.zeros((heads, head_dim))}
  return {
      "pooler": {
          "queries": 0.02 * jax.random.normal(keys[0], (1, width), jnp.float32),
          "ln_queries": norm(), "ln_context": norm(),
          "attention": {"query": projection(keys[1]), "key": projection(keys[2]),
                        "value": projection(keys[3]),
                        "out": {"kernel": xavier(keys[4], (heads, head_dim, width), width, width),
                                "bias": jnp.zeros((width,))}}},
      "head": {"norm": {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))},
               "kernel": jnp.zeros((width, num_classes)), "bias": jnp.zeros((num_classes,))},
  }


def normalize_tokens(tokens):
  """The parameter-free part of the pooler's context LayerNorm: each token [..., width] to zero
  mean and unit variance. `pool_normalized` applies the LayerNorm's scale and bias."""
  mean = jnp.mean(tokens, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(tokens - mean), axis=-1, keepdims=True)
  return (tokens - mean) * jax.lax.rsqrt(var + NORM_EPS)


def pool(pooler: dict, tokens):
  """`layers.AttentionalPooler(1, heads)` applied with `pooler` (its parameter tree) to tokens
  [batch, T, width] -> [batch, width], in an equal, cheaper form (`pool_normalized`)."""
  return pool_normalized(pooler, normalize_tokens(tokens))


def _folded_query(pooler: dict):
  """[width, heads]: the pooler's one query, through its LayerNorm and query projection, folded
  into the key projection and the context LayerNorm's scale (`pool_normalized`): a normalised
  token's attention logit per head is `token @ folded` (up to terms the softmax drops)."""
  att, norm = pooler["attention"], pooler["ln_context"]["LayerNorm_0"]
  width, heads, head_dim = att["query"]["kernel"].shape
  query = _layer_norm(pooler["queries"], pooler["ln_queries"]["LayerNorm_0"])
  # Plain [1, width] @ [width, heads * head_dim] and a multiply-reduce over head_dim: the einsum
  # forms of these two made XLA:CPU transpose both width x width kernels every step.
  query = ((query @ att["query"]["kernel"].reshape(width, heads * head_dim))[0]
           + att["query"]["bias"].reshape(heads * head_dim)).reshape(heads, head_dim)
  folded = jnp.sum(att["key"]["kernel"] * query, axis=-1) / math.sqrt(head_dim)
  return folded * norm["scale"][:, None]


def _attention_mean(folded, normed):
  """([batch, heads, width], [batch, T, heads]): per head, the attention-weighted mean of
  normalised tokens [batch, T, width] with logits `normed @ folded`, and the attention weights
  (softmax over the T tokens)."""
  batch, length, width = normed.shape
  logits = (normed.reshape(batch * length, width) @ folded).reshape(batch, length, -1)
  probs = jax.nn.softmax(logits, axis=1)
  return jnp.einsum("bth,btw->bhw", probs, normed), probs


def _project(pooler: dict, mean):
  """The pooler's output [batch, width] from `_attention_mean`'s [batch, heads, width]: the
  context LayerNorm's scale and bias, each head's value projection, the output projection."""
  att, norm = pooler["attention"], pooler["ln_context"]["LayerNorm_0"]
  width, heads, head_dim = att["value"]["kernel"].shape
  mixed = mean * norm["scale"] + norm["bias"]
  # One [batch, width] @ [width, head_dim] product per head on split operands (their gradients
  # concatenate): the batched einsum over heads made XLA:CPU transpose the [batch, heads, width]
  # activations and the value kernel every step, 1.5x the time of these.
  kernels = jax.lax.split(att["value"]["kernel"].reshape(width, heads * head_dim),
                          [head_dim] * heads, axis=1)
  means = jax.lax.split(mixed, [1] * heads, axis=1)
  values = jnp.concatenate([m[:, 0] @ k for m, k in zip(means, kernels)], axis=-1)
  values = values + att["value"]["bias"].reshape(heads * head_dim)
  return values @ att["out"]["kernel"].reshape(heads * head_dim, width) + att["out"]["bias"]


def pool_normalized(pooler: dict, normed):
  """`pool` of tokens already through `normalize_tokens`. With one query q, per head h, and
  the context ctx_t = normed_t * s + c (the LayerNorm's scale s and bias c):
    logits[t] = q_h . (K_h ctx_t + k_bias_h) / sqrt(d) = normed_t . (s * K_h^T q_h) / sqrt(d)
                + (terms equal for every t, which the softmax drops),
    output    = sum_t p_t (V_h ctx_t + v_bias_h) = V_h ((sum_t p_t normed_t) * s + c) + v_bias_h,
  so the key projection folds into the query, the value projection applies once after the
  weighted mean, and no gradient flows through a per-token LayerNorm (4x faster per step than
  this form with the LayerNorm inside, on CPU)."""
  return _project(pooler, _attention_mean(_folded_query(pooler), normed)[0])


def _head_logits(head: dict, pooled):
  return _layer_norm(pooled, head["norm"]) @ head["kernel"] + head["bias"]


def probe_logits(params: dict, tokens, normalized: bool = False):
  """tokens [batch, T, width] (through `normalize_tokens` if `normalized`) -> class logits
  [batch, num_classes]."""
  normed = tokens if normalized else normalize_tokens(tokens)
  return _head_logits(params["head"], pool_normalized(params["pooler"], normed))


# A training step reads its batch's tokens (256 x 49 x 768 floats, 38 MB, for a ViT-B/32) in
# chunks of about this many bytes: each chunk is gathered, and its logits, softmax and weighted
# mean (in the backward pass: its two products with the gradient) read while it is still in the
# cache, instead of five passes over the whole batch through main memory.
_CHUNK_BYTES = 4 << 20


def _chunk_examples(batch: int, length: int, width: int) -> int:
  return max(1, min(batch, _CHUNK_BYTES // (4 * length * width)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gathered_attention_mean(folded, normed, indices, chunk: int):
  """`_attention_mean(folded, normed[indices])[0]`, computed `chunk` examples at a time (the
  gather inside: the batch is never materialised), with a backward pass that gathers each chunk
  again. Only `folded` gets a gradient."""
  return _gathered_forward(folded, normed, indices, chunk)[0]


def _chunked(indices, chunk: int):
  """indices [batch] -> [chunks, chunk], padded with example 0 (its outputs are dropped and its
  gradient is zero)."""
  pad = -len(indices) % chunk
  return jnp.pad(indices, (0, pad)).reshape(-1, chunk)


def _gathered_forward(folded, normed, indices, chunk):
  def body(_, rows):
    return None, _attention_mean(folded, normed[rows])

  rows = _chunked(indices, chunk)
  _, (mean, probs) = jax.lax.scan(body, None, rows)
  mean = mean.reshape(-1, *mean.shape[2:])[:len(indices)]
  return mean, (probs, normed, rows)


def _gathered_backward(chunk, residuals, grad_mean):
  """d folded = sum over the batch's tokens of x_t (x) d logits_t, where d logits =
  p * (x . g - sum_t p x . g) for the gradient g of the weighted mean; the per-example outer
  products are summed with the same batched product as the forward's weighted mean (2x faster on
  XLA:CPU than one [width, batch * T] @ [batch * T, heads] product)."""
  probs, normed, rows = residuals
  pad = rows.size - grad_mean.shape[0]
  grad_mean = jnp.pad(grad_mean, ((0, pad), (0, 0), (0, 0))).reshape(
      rows.shape[0], chunk, *grad_mean.shape[1:])

  def body(total, inputs):
    rows, p, g = inputs
    x = normed[rows]
    dot = jnp.einsum("bhw,btw->bth", g, x)
    dlogits = p * (dot - jnp.sum(p * dot, axis=1, keepdims=True))
    return total + jnp.sum(jnp.einsum("bth,btw->bhw", dlogits, x), axis=0), None

  heads, width = grad_mean.shape[2], normed.shape[-1]
  total, _ = jax.lax.scan(body, jnp.zeros((heads, width), grad_mean.dtype),
                          (rows, probs, grad_mean))
  return total.T, None, None


_gathered_attention_mean.defvjp(_gathered_forward, _gathered_backward)


def _train_loss(params: dict, normed, labels, indices):
  """The mean cross-entropy of `probe_logits(params, normed[indices], normalized=True)` against
  `labels[indices]`, its attention part chunked (`_gathered_attention_mean`)."""
  pooler = params["pooler"]
  chunk = _chunk_examples(len(indices), normed.shape[1], normed.shape[2])
  mean = _gathered_attention_mean(_folded_query(pooler), normed, indices, chunk)
  logits = _head_logits(params["head"], _project(pooler, mean))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels[indices]))


@dataclasses.dataclass(frozen=True)
class AttentionalSettings:
  """The attentional probe's training run (config.evals.probe.attn_*, seed; the video probe's
  config.evals.video.probe_*). `steps` > 0 sets the number of steps and overrides `epochs`."""
  heads: int = 8
  epochs: int = 20
  steps: int = 0
  batch_size: int = 256
  lr: float = 1e-3
  weight_decay: float = 1e-4
  seed: int = 0


def batch_order(n: int, settings: AttentionalSettings) -> np.ndarray:
  """int32 [steps, batch]: the example indices of each step, a fresh seeded permutation per
  epoch, read as one stream cut into equal batches (batch = min(batch_size, n); steps =
  settings.steps, or when 0 ceil(epochs * n / batch))."""
  batch = min(settings.batch_size, n)
  steps = settings.steps or math.ceil(settings.epochs * n / batch)
  rng = np.random.default_rng([settings.seed, 2])
  stream = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps * batch / n))])
  return stream[:steps * batch].reshape(steps, batch).astype(np.int32)


def _optimizer(settings: AttentionalSettings, steps: int):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, settings.lr, warmup_steps=max(1, steps // 20), decay_steps=steps, end_value=0.0)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path).endswith("['kernel']"), params)
  return optax.adamw(schedule, weight_decay=settings.weight_decay, mask=decay_mask)


_init = jax.jit(init_probe, static_argnums=(1, 2, 3))
_optimizer_init = jax.jit(lambda params, settings, steps: _optimizer(settings, steps).init(params),
                          static_argnums=(1, 2))


_normalize_all = jax.jit(normalize_tokens)


@functools.partial(jax.jit, static_argnames=("settings", "steps"))
def _train_step(params, opt_state, normed, labels, indices, *, settings: AttentionalSettings,
                steps: int):
  """One AdamW step on the examples `indices` of `normalize_tokens(tokens)` [N, T, width] (on
  the device once, normalised once: the normalisation has no parameters): (params, opt_state,
  loss)."""
  loss, grads = jax.value_and_grad(_train_loss)(params, normed, labels, indices)
  updates, opt_state = _optimizer(settings, steps).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def train_attentional_probe(tokens: np.ndarray, labels: np.ndarray, num_classes: int,
                            settings: AttentionalSettings) -> tuple[dict, np.ndarray]:
  """(probe parameters, training loss per step) of the attentional probe on tokens
  [N, T, width] with labels [N]; the same inputs and settings give the same parameters. One
  jitted step in a loop over the fixed batch order (the step's own time dwarfs a call's
  dispatch; the same steps in one `lax.scan` compiled 3x longer)."""
  order = batch_order(len(labels), settings)
  steps = len(order)
  normed = _normalize_all(jnp.asarray(tokens, jnp.float32))
  labels = jnp.asarray(labels, jnp.int32)
  params = _init(jax.random.key(settings.seed), normed.shape[-1], settings.heads, num_classes)
  opt_state = _optimizer_init(params, settings, steps)
  losses = []
  for indices in order:
    params, opt_state, loss = _train_step(params, opt_state, normed, labels, indices,
                                          settings=settings, steps=steps)
    losses.append(loss)
  return params, np.asarray(jax.device_get(losses))


_predict = jax.jit(lambda params, tokens: jnp.argmax(probe_logits(params, tokens), axis=-1))


def predict(params: dict, tokens: np.ndarray, batch_size: int = 1024) -> np.ndarray:
  """The probe's class for each of tokens [N, T, width], in fixed-size (padded) batches."""
  batch = min(batch_size, len(tokens))
  out = []
  for start in range(0, len(tokens), batch):
    chunk = np.asarray(tokens[start:start + batch], np.float32)
    count = len(chunk)
    if count < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - count, *chunk.shape[1:]), chunk.dtype)])
    out.append(np.asarray(_predict(params, chunk))[:count])
  return np.concatenate(out)


# ---- The eval -----------------------------------------------------------------------------------

def settings_of(group, model=None) -> AttentionalSettings:
  """AttentionalSettings of a config.evals.probe group (heads 0 = the model's pooler_heads)."""
  probe = schema.build(schema.Probe, group)
  heads = probe.attn_heads or getattr(getattr(model, "config", None), "pooler_heads", 8)
  return AttentionalSettings(heads=heads, epochs=probe.attn_epochs,
                             batch_size=probe.attn_batch_size, lr=float(probe.attn_lr),
                             weight_decay=float(probe.attn_weight_decay), seed=probe.seed)


def num_classes_of(train: Features, test: Features, class_names=None) -> int:
  """The label's class count (its ClassLabel names where known, else the largest label + 1)."""
  found = int(max(train.labels.max(), test.labels.max())) + 1
  return max(len(class_names), found) if class_names else found


def _check_labels(features: Features, where: str) -> None:
  if features.labels.min() < 0:
    raise ValueError(f"{where} has label {int(features.labels.min())} (-1 marks an unlabelled "
                     "example); the probes need a labelled split")


def probe_eval(embedder, make_source, group, cache: FeatureCache | None = None) -> dict:
  """eval/probe_attn_top1, eval/probe_linear_top1 and eval/probe_linear_l2 of a
  config.evals.probe group: features of group.train_split and group.split (`make_source(split,
  group)` opens them; cached in `cache`, default the process's `CACHE`), probes trained on the
  first, scored on the second."""
  cache = CACHE if cache is None else cache
  probe = schema.build(schema.Probe, group)
  fingerprint = params_fingerprint(embedder.model, embedder.params)
  train_source = make_source(probe.train_split, group)
  test_source = make_source(probe.split, group)
  train = cache.get(embedder, train_source, probe.train_examples or None, probe.cache_dir,
                    fingerprint)
  test = cache.get(embedder, test_source, probe.examples or None, probe.cache_dir, fingerprint)
  _check_labels(train, f"config.evals.probe.train_split={probe.train_split!r}")
  _check_labels(test, f"config.evals.probe.split={probe.split!r}")
  num_classes = num_classes_of(train, test, getattr(test_source, "class_names", None))
  results = {}
  if probe.linear:
    t0, c0 = time.perf_counter(), time.process_time()
    linear = linear_probe(train.embeddings, train.labels, test.embeddings, test.labels,
                          num_classes, probe.linear_l2, probe.linear_holdout, probe.seed)
    results.update({"eval/probe_linear_top1": linear["top1"], "eval/probe_linear_l2": linear["l2"]})
    logging.info("Linear probe: top-1 %.4f (l2 %g; held-out top-1 per l2 %s) in %.2fs "
                 "(%.1f CPU-s)", linear["top1"], linear["l2"], linear["holdout_top1"],
                 time.perf_counter() - t0, time.process_time() - c0)
  if probe.attentional:
    t0, c0 = time.perf_counter(), time.process_time()
    settings = settings_of(group, embedder.model)
    params, losses = train_attentional_probe(train.tokens, train.labels, num_classes, settings)
    top1 = float(np.mean(predict(params, test.tokens) == test.labels))
    results["eval/probe_attn_top1"] = top1
    logging.info("Attentional probe: top-1 %.4f after %d steps (loss %.3f -> %.3f) in %.2fs "
                 "(%.1f CPU-s)", top1, len(losses), losses[0], losses[-1],
                 time.perf_counter() - t0, time.process_time() - c0)
  return results


def check_probe(group, make_source) -> list[str]:
  """Problems of a config.evals.probe group found before training: its train_split opens, is
  not empty and has labels (`split` itself is checked like every eval group's)."""
  where = f" of dataset {group.dataset!r}" if group.dataset else ""
  try:
    source = make_source(group.train_split, group)
    size = len(source)
  except (FileNotFoundError, ValueError, KeyError) as e:
    return [f"config.evals.probe.train_split={group.train_split!r}{where} cannot be read: {e}"]
  if size == 0:
    return [f"config.evals.probe.train_split={group.train_split!r}{where} is empty"]
  problems = []
  for name, split_source in (("train_split", source), ("split", None)):
    if split_source is None:
      try:
        split_source = make_source(group.split, group)
      except (FileNotFoundError, ValueError, KeyError):
        continue  # Reported with the group's split.
      if len(split_source) == 0:
        continue
    label = split_source[0].get("label")
    if label is None or label < 0:
      problems.append(
          f"config.evals.probe.{name}={group[name]!r}{where} has no labels "
          f"(label_feature={group.label_feature!r}{'' if label is None else ' is -1'}); the "
          "probes need a labelled split (the demo's: 'digits', 'mnist_on_white', "
          "'mnist_on_black')")
  return problems
