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
- Attentional probe: the image evals' attentional probe (`probes.train_attentional_probe`: a
  new one-query attentional pooler, a LayerNorm and a linear head) over all frames' encoder
  tokens (spatial x temporal, [clips, frames * tokens, width]), trained with softmax
  cross-entropy on a labelled train split of clips, the encoder frozen (paper 4.2.1: a single
  query token weights all tokens of spatial patches x temporal frames); eval/video_probe_top1.

Configured by config.evals.video (fields and defaults: `coca_jax.core.config`); clip sets are
read by `coca_jax.data.video` (a manifest per split, clips as video files or folders of frames).
Frames go through the `Embedder` of the image evals (batched, padded to one compiled shape).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

from absl import logging
import numpy as np

from coca_jax.data import video as video_data
from coca_jax.evaluation import metrics
from coca_jax.evaluation import probes

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
  accuracy = metrics.zero_shot_top_k(embedder.embed_texts, video_embeds, labels, class_names,
                                     templates, "Video zero-shot eval")
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

def clip_tokens(embedder, source, limit: int | None = None):
  """(tokens float32 [N, frames * L, width], labels int64 [N]) of the first `limit` clips of a
  labelled ClipSource: every frame's encoder tokens (the model's `image_features`, what its
  poolers read), the frames' token sequences concatenated in frame order."""
  source.require("label")
  tokens, labels = [], []
  for batch in source.batches(max(1, embedder.batch_size // source.num_frames), limit=limit):
    frames = batch["frames"]
    _, frame_tokens = probes.image_features(embedder, frames.reshape(-1, *frames.shape[2:]))
    tokens.append(frame_tokens.reshape(len(frames), -1, frame_tokens.shape[-1]))
    labels.append(batch["label"])
  if not tokens:
    raise ValueError(f"split {source.split!r} of clip set {source.clip_dir} has no clips; the "
                     "video probe needs clips in probe_train_split and probe_split")
  return np.concatenate(tokens), np.concatenate(labels)


def probe_settings(config, model) -> probes.AttentionalSettings:
  """The video probe's run: config.evals.video.probe_steps AdamW steps of probe_batch_size
  clips, peak learning rate probe_lr, initialisation and batch order from probe_seed; the probe
  itself (heads, weight decay) as config.evals.probe sets the image probe's."""
  video = config.evals.video
  image = probes.settings_of(config.evals.get("probe") or {}, model)
  return dataclasses.replace(image, steps=int(video.probe_steps),
                             batch_size=int(video.probe_batch_size), lr=float(video.probe_lr),
                             seed=int(video.probe_seed))


def video_probe_eval(embedder, train_source, eval_source, num_classes: int,
                     settings: probes.AttentionalSettings, limit=None) -> dict:
  """eval/video_probe_top1: the image evals' attentional probe (`probes.
  train_attentional_probe`) trained on all of `train_source`'s clips, each clip one example of
  [frames * L, width] tokens, and scored on the first `limit` of `eval_source`."""
  train_tokens, train_labels = clip_tokens(embedder, train_source)
  eval_tokens, eval_labels = clip_tokens(embedder, eval_source, limit)
  for name, labels in (("train", train_labels), ("eval", eval_labels)):
    if labels.max() >= num_classes:
      raise ValueError(f"video probe {name} split has label {labels.max()}, outside the "
                       f"{num_classes} classes of config.evals.video.class_names")
  t0, c0 = time.perf_counter(), time.process_time()
  params, losses = probes.train_attentional_probe(train_tokens, train_labels, num_classes,
                                                  settings)
  top1 = float(np.mean(probes.predict(params, eval_tokens, settings.batch_size) == eval_labels))
  logging.info("Video probe: top-1 %.4f after %d steps (loss %.3f -> %.3f) in %.2fs "
               "(%.1f CPU-s)", top1, len(losses), losses[0], losses[-1],
               time.perf_counter() - t0, time.process_time() - c0)
  return {"eval/video_probe_top1": top1}


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
        len(group.class_names), probe_settings(config, embedder.model), limit))
  return results
