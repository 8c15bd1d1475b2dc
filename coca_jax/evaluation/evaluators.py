"""Evaluators that run a model over evaluation sets: zero-shot classification, retrieval,
captioning and frozen-encoder probes.

Configured by `config.evals` (every field and default: `coca_jax.core.config.defaults`):
  every_steps          0 = only after training; N = also every N steps.
  batch_size           images / texts embedded per call.
  zeroshot             dict(enabled, dataset, split, examples, data_dir, image_feature,
                       label_feature, class_names, class_names_file, templates, templates_file,
                       transfer_splits, transfer_templates). Class names and templates: given,
                       from a file, from an installed open_clip ("open_clip:imagenet"), or the
                       label's ClassLabel names (`prompts`). transfer_splits: more labelled
                       splits of the same dataset (other data sources, e.g. the demo's MNIST
                       digits), each read whole and reported as eval/zeroshot_<split>_top1, _top5;
                       classified with the group's templates, or with transfer_templates[i] for
                       split i where that list is given and entry i is not empty.
  retrieval            dict(enabled, dataset, split, examples, data_dir, image_feature,
                       captions_feature); reports recall@k and, beside it, the ceiling that
                       identical captions put on it (`metrics.retrieval_ceiling`).
  captioning           dict(enabled, dataset, split, examples, data_dir, image_feature,
                       captions_feature, batch_size, and every `generate.Decoding` field:
                       method, num_beams, length_penalty, max_new_tokens (0 = the most the
                       decoder was trained on), min_len, ...)
  video                dict(dir, zeroshot_split, retrieval_split, probe_split, ...): clips,
                       frames through the image encoder (`coca_jax.evaluation.video`).
  probe                dict(enabled, dataset, split, train_split, ...): attentional and linear
                       probes on the frozen image encoder (`probes`, schema.Probe).
A group runs when it is enabled and names a split; it reads `dataset` from `data_dir` ("" =
config.data.name / config.data.data_dir): a dataset built by `coca_jax.data.build`, or a TFDS
catalog dataset prepared as array_record (`tfds build imagenet2012 --file_format=array_record`;
nothing is downloaded here), its image, label and captions read from the features named
(`*_feature`; "a/b" = nested, e.g. coco_captions' "captions/text"); `examples` 0 = the whole
split (a slice such as split="validation[:1000]" works too).
The train loop and the `evaluate` CLI both call `run_evals`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from coca_jax.core import config as config_lib
from coca_jax.data import preprocess
from coca_jax.evaluation import metrics
from coca_jax.evaluation import probes
from coca_jax.evaluation import prompts
from coca_jax.evaluation import video
from coca_jax.inference import generate as gen
from coca_jax.models.coca import CoCa


def pad_rows(x: np.ndarray, size: int, *, repeat_first: bool = False) -> np.ndarray:
  """x [n, ...] (n <= size) -> [size, ...]: the fixed batch a jitted function compiles for once,
  whatever the number of inputs. The added rows are zeros, or copies of row 0 with
  `repeat_first` (inputs where a zero row is no real example); callers keep the first n outputs."""
  pad = size - len(x)
  if pad <= 0:
    return x
  fill = (np.repeat(x[:1], pad, axis=0) if repeat_first
          else np.zeros((pad, *x.shape[1:]), x.dtype))
  return np.concatenate([x, fill])


class Embedder:
  """Batched, jitted image/text embedding. Inputs are padded to a fixed batch so each function
  compiles once; outputs are L2-normalised numpy [N, D]."""

  def __init__(self, model: CoCa, params, tokenizer, batch_size: int = 256):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.batch_size = batch_size
    self.max_len = model.config.text.max_len
    self._image_fn = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                      method="encode_image")[0])
    self._text_fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method="encode_text"))

  def _batched(self, fn, array: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(array), self.batch_size):
      chunk = array[start:start + self.batch_size]
      out.append(np.asarray(fn(self.params, pad_rows(chunk, self.batch_size)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.model.config.embed_dim), np.float32)

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    """images: uint8 [N, H, W, 3] (or float pixel values in [0, 255]) at the model's size."""
    return self._batched(self._image_fn, preprocess.normalize_images(images))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    return self._batched(self._text_fn, self.tokenizer.tokenize(list(texts), self.max_len))


def _embed_split(embedder: Embedder, source, limit: int | None):
  """(image embeddings [N, D], captions: N lists, labels int64 [N] or None) of the first
  `limit` examples (None: all). Reads and embeds one batch at a time and keeps only the
  embeddings: ImageNet's 50,000 validation images at 288 px would be 12 GB as uint8."""
  embeds, captions, labels = [], [], []
  for batch in source.batches(getattr(embedder, "batch_size", 256), limit=limit):
    embeds.append(embedder.embed_images(batch["image"]))
    captions.extend(batch["captions"])
    if "label" in batch:
      labels.append(batch["label"])
  return np.concatenate(embeds), captions, (np.concatenate(labels) if labels else None)


def zeroshot_eval(embedder: Embedder, source, class_names, templates, limit=None,
                  prefix="zeroshot") -> dict:
  """eval/<prefix>_top1, _top5; NaN (with an error logged) if the embeddings are non-finite."""
  image_embeds, _, labels = _embed_split(embedder, source, limit)
  if labels is None:
    raise ValueError(f"zero-shot split {source.split!r} of {source.name!r} has no labels")
  logging.info("Zero-shot %s: %d examples of %s/%s, %d classes, %d templates", prefix,
               len(labels), getattr(source, "name", "?"), getattr(source, "split", "?"),
               len(class_names), len(templates))
  accuracy = metrics.zero_shot_top_k(embedder.embed_texts, image_embeds, labels, class_names,
                                     templates, "Zero-shot eval")
  return {f"eval/{prefix}_{k}": float(v) for k, v in accuracy.items()}


def retrieval_eval(embedder: Embedder, source, limit=None) -> dict:
  """eval/{i2t,t2i}_recall@{1,5,10}, NaN (with an error logged) for non-finite embeddings; and
  eval/{i2t,t2i}_recall@{1,5,10}_ceiling, the best recall any model could reach on this split
  when identical captions tie (see `metrics.retrieval_ceiling`)."""
  image_embeds, captions, _ = _embed_split(embedder, source, limit)
  texts = [c.decode() if isinstance(c, bytes) else str(c) for caps in captions for c in caps]
  text_to_image = np.asarray([i for i, caps in enumerate(captions) for _ in caps])
  ceiling = metrics.retrieval_ceiling(texts, text_to_image)
  try:
    result = metrics.retrieval_metrics(image_embeds, embedder.embed_texts(texts),
                                       text_to_image)
  except metrics.NonFiniteEmbeddings as e:
    logging.error("Retrieval eval reported as NaN: %s", e)
    result = {f"{d}_recall@{k}": float("nan") for d in ("i2t", "t2i") for k in (1, 5, 10)}
  result.update({f"{k}_ceiling": v for k, v in ceiling.items()})
  return {f"eval/{k}": float(v) for k, v in result.items()}


def transfer_prompts(zeroshot, templates: Sequence[str] | None = None) -> dict[str, list[str]]:
  """{transfer split: its prompts} of a config.evals.zeroshot group: the split's entry of
  transfer_templates, or the group's templates where none is given (`templates`: those
  already read, default `prompts.templates(zeroshot)`)."""
  splits = list(zeroshot.transfer_splits)
  per_split = list(zeroshot.transfer_templates or []) or [[]] * len(splits)
  shared = list(templates) if templates is not None else prompts.templates(zeroshot)
  return {split: list(own or shared) for split, own in zip(splits, per_split)}


def _groups(evals):
  """(name, group) of each eval group that runs: enabled, with a split."""
  # .get: a config written before a group existed (an older run's config.json) lacks it.
  return [(name, evals[name]) for name in ("zeroshot", "retrieval", "captioning", "probe")
          if evals.get(name) is not None and evals[name].enabled and evals[name].split]


def _eval_source(config):
  """make_source(split, group): the split of the group's dataset, read with its features."""
  from coca_jax.data import pipeline  # heavy: grain and TFDS, only where evals run.

  def make_source(split, group):
    features = pipeline.EvalFeatures(**{kind: group[f"{kind}_feature"] for kind in (
        "image", "label", "captions") if f"{kind}_feature" in group})
    return pipeline.make_eval_source(config, split, group.dataset or None,
                                     data_dir=group.data_dir or None, features=features)
  return make_source


def _dataset_name(group) -> str:
  return group.dataset or "the run's dataset"


def check_evals(config, make_source=None) -> None:
  """Checks config.evals before training starts: every split opens (prepared, as
  array_record), has the features the eval reads, the zero-shot split has labels within the
  class list, the class names (given, from a file, or the dataset's) are distinct non-empty
  strings, as many as the label's classes, templates each hold one '{}'. `make_source(split,
  group)` opens a split of an eval group (default: the pipeline's eval source). Raises
  config.ConfigError listing every problem (each naming the field)."""
  make_source = make_source or _eval_source(config)
  problems = config_lib.eval_problems(config)
  for name, group in _groups(config.evals):
    split, where = group.split, f" of dataset {group.dataset!r}" if group.dataset else ""
    try:
      source = make_source(split, group)
      size = len(source)
    except (FileNotFoundError, ValueError, KeyError) as e:
      problems.append(f"config.evals.{name}.split={split!r}{where} cannot be read: {e}")
      continue
    if size == 0:
      problems.append(f"config.evals.{name}.split={split!r}{where} is empty")
      continue
    has_feature = getattr(source, "has_feature", lambda path: True)
    if name == "probe":  # Both its splits labelled (evaluation/probes.py).
      problems.extend(probes.check_probe(group, make_source))
      continue
    feature = "label_feature" if name == "zeroshot" else "captions_feature"
    if feature in group and not has_feature(group[feature]):
      problems.append(
          f"config.evals.{name}.{feature}={group[feature]!r}: split {split!r}{where} has no such "
          f"feature (its features: {', '.join(source.feature_names)}); name the one that holds "
          f"the {'labels' if name == 'zeroshot' else 'captions'} ('a/b' for a nested feature, "
          "e.g. 'captions/text')")
      continue
    if name != "zeroshot":
      continue
    names_field = "class_names_file" if group.class_names_file else "class_names"
    dataset_names = getattr(source, "class_names", None)
    try:
      names = prompts.class_names(group, dataset_names, _dataset_name(group))
    except prompts.PromptError as e:
      problems.append(str(e))
      names = []
    else:
      if not names or not all(isinstance(n, str) and n.strip() for n in names):
        problems.append(f"config.evals.zeroshot.{names_field}: {names!r} must be a non-empty "
                        "list of non-empty strings")
      elif len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        problems.append(f"config.evals.zeroshot.{names_field} repeats {duplicates}; each class "
                        "needs its own name")
      elif dataset_names is not None and len(names) != len(dataset_names):
        problems.append(
            f"config.evals.zeroshot.{names_field} gives {len(names)} class names, but the "
            f"label {group.label_feature!r} of {_dataset_name(group)} has {len(dataset_names)} "
            f"classes ({', '.join(map(str, dataset_names[:3]))}, ...); give one name per class, "
            "in label order")
    templates_field = "templates_file" if group.templates_file else "templates"
    try:
      templates = prompts.templates(group)
    except prompts.PromptError as e:
      problems.append(str(e))
      templates = ["{}"]
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if not templates or bad:
      problems.append(f"config.evals.zeroshot.{templates_field}: {bad or 'none given'}; each "
                      "template needs exactly one '{}' for the class name, e.g. 'a photo of {}.'")
    problems.extend(_label_problems(f"config.evals.zeroshot.split={split!r}", source, names))
    transfer = group.transfer_splits or []
    if isinstance(transfer, str):
      problems.append(f"config.evals.zeroshot.transfer_splits={transfer!r} must be a list of "
                      f"split names, e.g. [{transfer!r}]")
      transfer = []
    per_split = list(group.transfer_templates or [])
    if per_split and len(per_split) != len(transfer):
      problems.append(f"config.evals.zeroshot.transfer_templates has {len(per_split)} entries "
                      f"for {len(transfer)} transfer_splits; give one list of templates per "
                      "split ([] = the group's templates), or none")
    for extra, split_templates in zip(transfer, per_split):
      bad = ([split_templates] if isinstance(split_templates, str) else
             [t for t in split_templates if not isinstance(t, str) or t.count("{}") != 1])
      if bad:
        problems.append(f"config.evals.zeroshot.transfer_templates for {extra!r}: {bad}; give a "
                        "list of templates, each with exactly one '{}' for the class name")
    for extra in transfer:
      try:
        extra_source = make_source(extra, group)
        empty = len(extra_source) == 0
      except (FileNotFoundError, ValueError, KeyError) as e:
        problems.append(f"config.evals.zeroshot.transfer_splits names {extra!r}, which cannot "
                        f"be read: {e}")
        continue
      if empty:
        problems.append(f"config.evals.zeroshot.transfer_splits names {extra!r}, which is empty")
        continue
      problems.extend(_label_problems(
          f"config.evals.zeroshot.transfer_splits entry {extra!r}", extra_source, names))
  problems.extend(video.check_video_evals(config))
  if problems:
    raise config_lib.ConfigError(f"{len(problems)} eval config problem(s), found before "
                                 "training:\n  - " + "\n  - ".join(problems))


def _label_problems(where: str, source, names: list) -> list[str]:
  """Problems of a zero-shot split's labels (checked on its first example); `where` names the
  split in the config, e.g. "config.evals.zeroshot.split='digits'"."""
  label = source[0].get("label")
  if label is None:
    return [f"{where} has no labels; zero-shot classification needs a labelled split (the "
            "demo's are 'digits', 'mnist_on_white', 'mnist_on_black')"]
  if names and not 0 <= label < len(names):
    unlabelled = (" (-1 marks an unlabelled example, e.g. imagenet2012's 'test' split: use a "
                  "labelled split such as 'validation')" if label == -1 else "")
    return [f"{where} has label {label}, outside the {len(names)} "
            f"class names of config.evals.zeroshot{unlabelled}"]
  return []


def captioning_eval(embedder: Embedder, source, decoding, limit=None, batch_size=None) -> dict:
  """Greedy/beam/sampled captions of `source`'s images scored against its reference captions:
  eval/caption_cider (CIDEr-D), eval/caption_bleu4, eval/caption_exact_match (fraction whose
  normalised caption equals one of the references)."""
  batch_size = batch_size or embedder.batch_size
  model, params, tokenizer = embedder.model, embedder.params, embedder.tokenizer
  rng = jax.random.key(0)
  predictions, references = {}, {}
  for index, batch in enumerate(source.batches(batch_size, limit=limit)):
    images = preprocess.normalize_images(batch["image"])
    count = len(images)
    images = pad_rows(images, batch_size)  # One compilation for the whole split.
    out = gen.generate(model, params, jnp.asarray(images), decoding,
                       jax.random.fold_in(rng, index) if decoding.method == "sample" else None)
    texts = gen.decode_texts(tokenizer, np.asarray(out["tokens"])[:count])
    for key, text, refs in zip(batch["key"], texts, batch["captions"]):
      predictions[key], references[key] = text, list(refs)
  scores = metrics.caption_scores(predictions, references)
  exact = np.mean([metrics.tokenize_caption(predictions[k]) in
                   {metrics.tokenize_caption(r) for r in references[k]} for k in predictions])
  return {"eval/caption_cider": scores["cider"], "eval/caption_bleu4": scores["bleu4"],
          "eval/caption_exact_match": float(exact)}


def decoding_from_config(captioning):
  """The generate.Decoding named by the fields of config.evals.captioning (others ignored)."""
  fields = {f.name for f in dataclasses.fields(gen.Decoding)}
  decoding = {k: v for k, v in dict(captioning).items() if k in fields}
  decoding["max_new_tokens"] = decoding.get("max_new_tokens") or None  # 0 = max_len - 1.
  return gen.Decoding(**decoding)


def evaluate(config, embedder: Embedder, make_source=None) -> dict:
  """Runs config.evals with the embedder's current params ({metric: value}, plus eval/seconds
  when any eval ran). `make_source(split, dataset)` returns an EvalSource; default: the
  pipeline's eval source (`pipeline.make_eval_source`). Training (periodic and final evals) and
  the `evaluate` CLI both call this."""
  t0 = time.perf_counter()
  results = run_evals(config, embedder, make_source)
  if results:
    results["eval/seconds"] = time.perf_counter() - t0
  return results


def run_evals(config, embedder: Embedder, make_source=None) -> dict:
  """Runs each configured evaluator. `make_source(split, group)` returns an EvalSource
  (default: the pipeline's)."""
  make_source = make_source or _eval_source(config)
  results = {}
  for name, g in _groups(config.evals):
    source, limit = make_source(g.split, g), g.examples or None
    if name == "zeroshot":
      names = prompts.class_names(g, getattr(source, "class_names", None), _dataset_name(g))
      templates = prompts.templates(g)
      results.update(zeroshot_eval(embedder, source, names, templates, limit))
      for split, split_templates in transfer_prompts(g, templates).items():
        results.update(zeroshot_eval(embedder, make_source(split, g), names, split_templates,
                                     prefix=f"zeroshot_{split}"))
    elif name == "retrieval":
      results.update(retrieval_eval(embedder, source, limit))
    elif name == "probe":
      results.update(probes.probe_eval(embedder, make_source, g))
    else:
      results.update(captioning_eval(embedder, source, decoding_from_config(g), limit,
                                     g.batch_size or None))
  results.update(video.run_video_evals(config, embedder))  # config.evals.video
  return results
