"""Video evaluations as the CoCa paper runs them (arXiv 2205.01917, section 3.3, "CoCa for Video
Action Recognition"): each frame goes through the image encoder on its own, no temporal fusion.

- Zero-shot video-text retrieval: the video embedding is the mean of the frame embeddings (the
  paper: "the mean embedding of 16 frames of the video", frames sampled uniformly), compared by
  cosine with the caption embeddings. The frame embeddings are unit vectors (the contrastive
  embedding); their mean is renormalised, so the score is a cosine like the image evals'.
  Reported as eval/video_t2v_recall@{1,5,10} and eval/video_v2t_recall@{1,5,10}.
- Zero-shot video classification: the same video embedding against the prompt-ensembled class
  embeddings of the image zero-shot eval (eval/video_zeroshot_top1, _top5). The paper reports
  Kinetics / Moments-in-Time with a frozen encoder, not zero-shot; this applies its retrieval
  embedding to classification, as its image zero-shot does.
- Attentional probe: a new pooler with one learned query over all frames' encoder tokens
  (spatial x temporal, [clips, frames * tokens, width]) plus a linear head, trained with softmax
  cross-entropy on a labelled train split of clips, the encoder frozen (paper 4.2.1: a single
  query token weights all tokens of spatial patches x temporal frames); eval/video_probe_top1.

Configured by config.evals.video (fields and defaults: `coca_jax.core.config`); clip sets are
read by `coca_jax.data.video` (a manifest per split, clips as video files or folders of frames).
Frames go through the `Embedder` of the image evals (batched, padded to one compiled shape).
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from coca_jax.data import preprocess
from coca_jax.data import video as video_data
from coca_jax.evaluation import metrics

# ----------------------------------------------------------------------------------------------
# Frame embeddings -> video embeddings
# ----------------------------------------------------------------------------------------------


def video_embeddings(frame_embeds: np.ndarray) -> np.ndarray:
  """[clips, frames, D] unit frame embeddings -> [clips, D]: their mean, renormalised (a zero
  mean stays zero)."""
  mean = np.asarray(frame_embeds, np.float32).mean(axis=1)
  return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def embed_clips(embedder, source, limit: int | None = None):
  """(video embeddings [N, D], captions: N lists, labels int64 [N] or None) of a ClipSource's
  first `limit` clips. All frames of a read batch of clips go through `embedder.embed_images`
  as one image batch."""
  embeds, captions, labels = [], [], []
  clips_per_read = max(1, getattr(embedder, "batch_size", 256) // source.num_frames)
  for batch in source.batches(clips_per_read, limit=limit):
    frames = batch["frames"]
    flat = embedder.embed_images(frames.reshape(-1, *frames.shape[2:]))
    embeds.append(video_embeddings(flat.reshape(len(frames), source.num_frames, -1)))
    captions.extend(batch["captions"])
    if "label" in batch:
      labels.append(batch["label"])
  return np.concatenate(embeds), captions, (np.concatenate(labels) if labels else None)


def video_zeroshot_eval(embedder, source, class_names: Sequence[str],
                        templates: Sequence[str], limit=None) -> dict:
  """eval/video_zeroshot_top1, _top5 of the mean-frame video embeddings."""
  source.require("label")
  video_embeds, _, labels = embed_clips(embedder, source, limit)
  try:
    classifier = metrics.zero_shot_classifier(embedder.embed_texts, class_names, templates)
    accuracy = metrics.zero_shot_accuracy(video_embeds, classifier, labels)
  except metrics.NonFiniteEmbeddings as e:
    logging.error("Video zero-shot eval reported as NaN: %s", e)
    accuracy = {"top1": float("nan"), "top5": float("nan")}
  return {f"eval/video_zeroshot_{k}": float(v) for k, v in accuracy.items()}


def video_retrieval_eval(embedder, source, limit=None) -> dict:
  """eval/video_{t2v,v2t}_recall@{1,5,10} (every caption of a clip counts as its text), and
  their _ceiling where identical captions tie (`metrics.retrieval_ceiling`)."""
  source.require("captions")
  video_embeds, captions, _ = embed_clips(embedder, source, limit)
  texts = [c for caps in captions for c in caps]
  text_to_video = np.asarray([i for i, caps in enumerate(captions) for _ in caps])
  names = {"i2t": "v2t", "t2i": "t2v"}
  rename = lambda k: names[k[:3]] + k[3:]
  ceiling = metrics.retrieval_ceiling(texts, text_to_video)
  try:
    result = metrics.retrieval_metrics(video_embeds, embedder.embed_texts(texts), text_to_video)
  except metrics.NonFiniteEmbeddings as e:
    logging.error("Video retrieval eval reported as NaN: %s", e)
    result = {f"{d}_recall@{k}": float("nan") for d in ("i2t", "t2i") for k in (1, 5, 10)}
  out = {f"eval/video_{rename(k)}": float(v) for k, v in result.items()}
  out.update({f"eval/video_{rename(k)}_ceiling": float(v) for k, v in ceiling.items()})
  return out


# ----------------------------------------------------------------------------------------------
# Frame tokens and the attentional probe
# ----------------------------------------------------------------------------------------------

# The module whose output is the image encoder's final token states, per model family: the
# towers' final LayerNorm (or the ViT stack without one), MoME's image-pass LayerNorm.
_TOKEN_MODULES = ("ln_vision", "ln_image")


def frame_tokens_fn(model):
  """A jitted (params, images [B, H, W, 3] normalised) -> encoder tokens [B, L, width]: the
  image encoder's output states that its poolers read, captured from `encode_image`."""
  c = model.config
  names = set(_TOKEN_MODULES)
  if getattr(getattr(c, "vision", None), "final_norm", True) is False:
    names = {"vision"}

  def tokens(params, images):
    _, state = model.apply({"params": params}, images, method="encode_image",
                           capture_intermediates=lambda mdl, method: (
                               method == "__call__" and mdl.name in names and
                               mdl.scope.path[:-1] == ()),
                           mutable=["intermediates"])
    captured = [v["__call__"][0] for k, v in state["intermediates"].items() if k in names]
    if len(captured) != 1:
      raise ValueError(f"the image encoder's tokens were not found (looked for the output of "
                       f"{sorted(names)}; got {sorted(state['intermediates'])})")
    return captured[0]

  return jax.jit(tokens)


def clip_tokens(embedder, source, limit: int | None = None):
  """(tokens float32 [N, frames * L, width], labels int64 [N]) of a labelled ClipSource: every
  frame's encoder tokens, the frames' token sequences concatenated in frame order."""
  source.require("label")
  fn = frame_tokens_fn(embedder.model)
  size = getattr(embedder, "batch_size", 256)
  out = []
  for batch in source.batches(max(1, size // source.num_frames), limit=limit):
    frames = batch["frames"]
    flat = preprocess.normalize_images(frames.reshape(-1, *frames.shape[2:]))
    pieces = []
    for start in range(0, len(flat), size):
      chunk = flat[start:start + size]
      padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]),
                                                chunk.dtype)]) if len(chunk) < size else chunk
      pieces.append(np.asarray(fn(embedder.params, padded), np.float32)[:len(chunk)])
    tokens = np.concatenate(pieces)
    out.append(tokens.reshape(len(frames), -1, tokens.shape[-1]))
  limit = len(source) if limit is None else min(limit, len(source))
  return np.concatenate(out), source.labels[:limit]


class AttentionProbe(nn.Module):
  """Tokens [B, N, D] -> logits [B, classes]: one learned query attending over the tokens
  (`heads` heads), output projection, LayerNorm, linear head: the paper's attentional pooler with
  a single query plus a classifier.

  It is the function of one multi-head attention layer with one learned query, computed in
  another order: with the query fixed, each head's query-key product is a learned linear
  functional of a token (`key`, [D, heads]; key biases shift every logit equally and cancel in
  the softmax), and the value projection, being linear, is applied after the weighted sum. A
  step then costs O(N x D) per head instead of O(N x D^2) for projecting every frozen token."""
  num_classes: int
  heads: int = 1

  @nn.compact
  def __call__(self, tokens):
    width = tokens.shape[-1]
    head_dim = max(1, width // self.heads)
    # Zeros: every token weighs the same at the start (mean pooling), a stable first step.
    key = self.param("key", nn.initializers.zeros, (width, self.heads))
    value = self.param("value", nn.initializers.lecun_normal(), (width, self.heads, head_dim))
    logits = jnp.einsum("bnd,dh->bnh", tokens, key) / np.sqrt(head_dim)
    weights = jax.nn.softmax(logits, axis=1)
    pooled = jnp.einsum("bnh,bnd->bhd", weights, tokens)
    heads = jnp.einsum("bhd,dhk->bhk", pooled, value).reshape(tokens.shape[0], -1)
    heads = heads + self.param("value_bias", nn.initializers.zeros, (heads.shape[-1],))
    pooled = nn.Dense(width, name="out")(heads)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    name="head")(nn.LayerNorm()(pooled))


@functools.lru_cache(maxsize=8)
def _probe_functions(num_classes: int, heads: int, steps: int, lr: float, weight_decay: float):
  """(probe, optimizer, jitted train step, jitted predict) of one probe setting, built once so
  periodic evals and repeated runs reuse their compilations."""
  probe = AttentionProbe(num_classes, heads)
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)

  @jax.jit
  def step(params, opt_state, tokens, labels, index):
    def loss_fn(p):
      logits = probe.apply({"params": p}, tokens[index])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels[index]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  predict = jax.jit(lambda p, x: jnp.argmax(probe.apply({"params": p}, x), axis=-1))
  return probe, tx, step, predict


def attention_probe(train_tokens: np.ndarray, train_labels: np.ndarray,
                    eval_tokens: np.ndarray, eval_labels: np.ndarray, num_classes: int, *,
                    steps: int = 200, lr: float = 5e-4, batch_size: int = 128, heads: int = 1,
                    weight_decay: float = 1e-4, seed: int = 0) -> dict:
  """Trains `AttentionProbe` on frozen tokens [N, T*L, D] with softmax cross-entropy (AdamW,
  cosine schedule; the paper's probe uses lr 5e-4, batch 128, cosine) and returns
  {'top1': accuracy on eval_tokens}. Deterministic in `seed`: fixed minibatch order, jitted.

  The image probe (evaluation/probes.py, issue 26 item 4) takes the same [N, tokens, D] input;
  once it lands this can call it instead."""
  train_tokens = np.asarray(train_tokens, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  if len(train_tokens) == 0 or len(eval_tokens) == 0:
    raise ValueError(f"attention_probe: {len(train_tokens)} train and {len(eval_tokens)} eval "
                     "examples; both splits need clips")
  probe, tx, step, predict = _probe_functions(num_classes, heads, steps, lr, weight_decay)
  params = probe.init(jax.random.key(seed), train_tokens[:1])["params"]
  opt_state = tx.init(params)
  batch_size = min(batch_size, len(train_tokens))
  # The minibatch order: a fixed permutation per epoch, drawn from `seed`.
  order_rng = np.random.default_rng(seed)
  per_epoch = len(train_tokens) // batch_size
  order = np.concatenate([order_rng.permutation(len(train_tokens))[:per_epoch * batch_size]
                          for _ in range(-(-steps // per_epoch))]).reshape(-1, batch_size)

  # The features go to the device once, as an argument (never a compiled-in constant); each
  # step gathers its minibatch there.
  tokens, labels = jnp.asarray(train_tokens), jnp.asarray(train_labels)
  for i in range(steps):
    params, opt_state, _ = step(params, opt_state, tokens, labels, jnp.asarray(order[i]))
  predictions = np.concatenate([np.asarray(predict(params, jnp.asarray(eval_tokens[i:i + 256])))
                                for i in range(0, len(eval_tokens), 256)])
  return {"top1": float(np.mean(predictions == np.asarray(eval_labels)))}


def video_probe_eval(embedder, train_source, eval_source, num_classes: int, limit=None,
                     **probe_options) -> dict:
  """eval/video_probe_top1: the attentional probe trained on `train_source`'s clips (all of
  them) and scored on the first `limit` of `eval_source`."""
  train_tokens, train_labels = clip_tokens(embedder, train_source)
  eval_tokens, eval_labels = clip_tokens(embedder, eval_source, limit)
  for name, labels in (("train", train_labels), ("eval", eval_labels)):
    if labels.size and labels.max() >= num_classes:
      raise ValueError(f"video probe {name} split has label {labels.max()}, outside the "
                       f"{num_classes} classes of config.evals.video.class_names")
  result = attention_probe(train_tokens, train_labels, eval_tokens, eval_labels, num_classes,
                           **probe_options)
  return {"eval/video_probe_top1": result["top1"]}


# ----------------------------------------------------------------------------------------------
# config.evals.video
# ----------------------------------------------------------------------------------------------


def clip_dir(config) -> str:
  """config.evals.video.dir, a relative path read under config.data.data_dir."""
  group = config.evals.video
  return os.path.join(config.data.get("data_dir", "") or "", group.dir)


def _enabled(config) -> bool:
  group = config.evals.get("video")
  return bool(group and group.enabled and group.dir and (
      group.zeroshot_split or group.retrieval_split or group.probe_split))


def check_video_evals(config) -> list[str]:
  """Problems of config.evals.video that show before training: manifests that do not open,
  lack the captions or labels their eval reads; class names and templates."""
  if not _enabled(config):
    return []
  group, problems = config.evals.video, []
  if not os.path.isdir(clip_dir(config)) and group.build_demo:
    return []  # Built by prepare_data before the first eval.
  splits = {"zeroshot_split": "label", "retrieval_split": "captions", "probe_split": "label",
            "probe_train_split": "label"}
  for field, needs in splits.items():
    if not group[field] or (field == "probe_train_split" and not group.probe_split):
      continue
    try:
      source = video_data.ClipSource(clip_dir(config), group[field], 1, 8)
      source.require(needs)
    except video_data.ClipError as e:
      problems.append(f"config.evals.video.{field}={group[field]!r}: {e}")
  if (group.zeroshot_split or group.probe_split) and not group.class_names:
    problems.append("config.evals.video.class_names is empty; give one name per label, in "
                    "label order")
  if group.zeroshot_split and not all(isinstance(t, str) and t.count("{}") == 1
                                      for t in group.templates or [None]):
    problems.append(f"config.evals.video.templates={list(group.templates)!r}: give templates "
                    "each with exactly one '{}' for the class name, e.g. 'a video of {}.'")
  if group.probe_split and not group.probe_train_split:
    problems.append("config.evals.video.probe_split is set but probe_train_split is empty: the "
                    "probe trains on a labelled split of its own (never the eval split)")
  return problems


def run_video_evals(config, embedder) -> dict:
  """The video evals config.evals.video names: zero-shot, retrieval, attentional probe."""
  if not _enabled(config):
    return {}
  group = config.evals.video
  if group.build_demo and not os.path.isdir(clip_dir(config)):
    # Normally built by data.prepare before training; `evaluate` on a run made before the
    # video evals existed builds them here.
    video_data.build_demo_clips(clip_dir(config), **dict(group.build_demo_options))
  size = embedder.model.config.image_size
  source = lambda split: video_data.ClipSource(clip_dir(config), split, group.num_frames, size)
  limit = group.examples or None
  results = {}
  if group.zeroshot_split:
    results.update(video_zeroshot_eval(embedder, source(group.zeroshot_split),
                                       list(group.class_names), list(group.templates), limit))
  if group.retrieval_split:
    results.update(video_retrieval_eval(embedder, source(group.retrieval_split), limit))
  if group.probe_split:
    results.update(video_probe_eval(
        embedder, source(group.probe_train_split), source(group.probe_split),
        len(group.class_names), limit, steps=group.probe_steps, lr=group.probe_lr,
        batch_size=group.probe_batch_size, seed=group.probe_seed))
  return results
