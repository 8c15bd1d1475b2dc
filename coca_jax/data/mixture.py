"""Training on a mixture of datasets (config.data.sources), labelled datasets read as text.

A mixture is a list of sources (`schema.Source`), each a prepared TFDS split with a weight.
Global batch n holds rows n * B .. (n + 1) * B - 1 of ONE mixed stream of examples, and
`grain.MapDataset.mix` says, in closed form, which source each row of that stream comes from
and at which position of that source's own order it reads:

  global row t  ->  (source i, position p in source i)     (grain's weighted interleave)
  source i, position p  ->  (record, generator)            (the source's own epoch order: a
                                                            fresh permutation per epoch from
                                                            grain's IndexSampler, seeded)

The realised count of each source after t rows is within one example of t times its share, at
every t (exact, not only in expectation). The share is the weight's over their sum after grain
rounds the weights to integers with the smallest at 100: exact for ratios such as 3:1 or 5:6,
within 1% of the smallest weight otherwise. Everything is a pure function of (seed, global row): the mixture position is
the global batch count, saved in checkpoints as the one-source pipeline saves its position
(`pipeline.checkpoint_args`), and each host reads only its rows [p * b, (p + 1) * b) of each
global batch, so the batches do not depend on the number of processes. docs/data.md
("Mixtures") says why grain's map-level mix is used and its iterator-level mix is not.

Each example keeps the one-source pipeline's treatment (the draws of `pipeline._DecodeExample`
in its order, the same crop from the stored bytes or from the decoded copy of the in-memory
path, the same tokenisation and normalisation), so a mixture of one source yields today's
batches bit for bit. Labelled sources ("labels"): an example's text is a template applied to its class
name(s), the template drawn from the example's own generator (so fixed by (seed, global row)),
the names of a multi-label example joined by `label_join`.

Batches carry "source": int32 one-hot [B, sources], from which the train step logs
examples/<tag> and loss/<tag> (training/step.py `source_metrics`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import grain
import jax
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from coca_jax.core import schema
from coca_jax.data import pipeline
from coca_jax.data import preprocess
from coca_jax.data import sources as catalog
from coca_jax.data.tokenizer import Tokenizer, load_tokenizer

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# Resolves a label source's class names: (source settings with class_names_file / class_names,
# the dataset's ClassLabel names or None, dataset name) -> names in label order. The training
# loop passes the zero-shot eval's resolver (evaluation/prompts.py `class_names`), so the files,
# lists and "open_clip:imagenet" mean what they mean there.
ClassNames = Callable[[Any, Sequence[str] | None, str], list]


@dataclasses.dataclass(frozen=True)
class Source:
  """One resolved entry of config.data.sources (`schema.Source` with data_dir filled in)."""
  settings: schema.Source
  data_dir: str
  index: int

  @property
  def tag(self) -> str:
    return self.settings.tag or self.settings.name

  @property
  def seed_offset(self) -> int:
    # Each source's own order and generators; source 0 keeps the run's seed, so a mixture of
    # one source is the one-source pipeline.
    return 1_000_003 * self.index


def sources_of(config) -> list[Source]:
  """config.data.sources resolved (data_dir "" = config.data.data_dir); [] for one dataset."""
  entries = list(config.data.get("sources", ()) or ())
  out = []
  for i, entry in enumerate(entries):
    settings = schema.build(schema.Source, dict(entry))
    data_dir = settings.data_dir or config.data.data_dir or pipeline.DEFAULT_DATA_DIR
    out.append(Source(settings, os.path.expanduser(data_dir), i))
  return out


def mixed_order(weights: Sequence[float]) -> grain.MapDataset:
  """Global row t -> (source index, position in that source), for every t >= 0."""
  if not weights or any(not w > 0 for w in weights):
    raise ValueError(f"config.data.sources weights {list(weights)} must all be > 0")
  # Each source's stream is unbounded (its epochs follow each other); the tuple says which.
  streams = [grain.MapDataset.range(2**62).map(functools.partial(_tag_source, i))
             for i in range(len(weights))]
  return grain.MapDataset.mix(streams, list(weights))


def _tag_source(index: int, position: int) -> tuple[int, int]:
  return index, position


def _split_base(split: str) -> str:
  return re.split(r"[\[+]", split, maxsplit=1)[0].strip()


def zero_shot_overlaps(config) -> list[str]:
  """Label sources that are also a split the run reports zero-shot on (the same dataset and
  split name; slices of one split count as overlapping), one message each."""
  group = config.evals.zeroshot
  if not (group.enabled and group.split):
    return []
  dataset = group.dataset or config.data.name
  splits = [group.split, *[s for s in group.transfer_splits if isinstance(s, str)]]
  messages = []
  for source in sources_of(config):
    s = source.settings
    if s.text != "labels" or s.name != dataset:
      continue
    for split in splits:
      if _split_base(split) == _split_base(s.split):
        messages.append(
            f"config.data.sources[{source.index}] trains on {s.name!r} split {s.split!r} as "
            f"labels-as-text, and config.evals.zeroshot reports on its split {split!r}: the "
            "zero-shot figure is then not zero-shot; train on another split, or evaluate on a "
            "held-out one (the CoCa paper de-duplicates its eval sets from JFT)")
  return messages


def tokenizer_texts(config, class_names: ClassNames | None = None) -> list[str]:
  """The texts a mixture run trains on, for training its tokenizer (data/prepare.py): every
  caption of each caption source, and each example of a label source with its text (template
  i mod len(templates) applied to its class name(s)), so words that only a label source uses
  ("photo", a class name) get pieces of their own."""
  texts = []
  for source in sources_of(config):
    s = source.settings
    data = catalog.open_source(s.name, source.data_dir, s.split, decode_images=False,
                               image_feature=s.image_feature)
    where = f"config.data.sources[{source.index}] ({s.name}/{s.split})"
    if s.text == "captions":
      for i in range(len(data)):
        captions = _feature(data[i], s.captions_feature)
        if isinstance(captions, (bytes, str, np.bytes_, np.str_)):
          captions = [captions]
        texts += [_to_str(c) for c in captions]
      continue
    spec = catalog.feature_spec(data.dataset_info.features, s.label_feature)
    if spec is None:
      raise ValueError(f"{where} reads labels as text but has no label feature "
                       f"{s.label_feature!r}; set its label_feature")
    if class_names is None:
      raise ValueError(f"{where}: a label source needs a class-name resolver "
                       "(the training loop passes evaluation.prompts.class_names)")
    names = [str(n) for n in class_names(s, _label_names(spec), s.name)]
    templates = list(s.templates) or list(DEFAULT_TEMPLATES)
    for i in range(len(data)):
      labels = np.atleast_1d(np.asarray(_feature(data[i], s.label_feature))).astype(np.int64)
      if labels.size and not (0 <= labels.min() and labels.max() < len(names)):
        raise ValueError(f"{where}: label {labels.tolist()} of example {i} has no class name "
                         f"({len(names)} names)")
      texts.append(templates[i % len(templates)].format(
          s.label_join.join(names[v] for v in labels.tolist())))
  return texts


def _to_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _feature(element: Mapping[str, Any], path: str):
  value = element
  for part in path.split("/"):
    value = value[part]
  return value


def _label_names(spec) -> list[str] | None:
  """ClassLabel names of a label feature (also of a Sequence of ClassLabel); else None."""
  if isinstance(spec, tfds.features.Sequence):
    spec = spec.feature
  return list(spec.names) if isinstance(spec, tfds.features.ClassLabel) else None


class _SourceReader:
  """One source's examples by position in its own order: decoded image, text, key."""

  def __init__(self, source: Source, options: pipeline.DataOptions,
               class_names: ClassNames | None):
    s = source.settings
    self.source, self.settings = source, s
    self.data = catalog.open_source(s.name, source.data_dir, s.split, decode_images=False,
                                     image_feature=s.image_feature)
    if len(self.data) == 0:
      raise ValueError(f"config.data.sources[{source.index}]: {s.name}/{s.split} is empty")
    seed = (options.seed + source.seed_offset) % 2**32
    self.order = grain.samplers.IndexSampler(
        num_records=len(self.data), shard_options=grain.sharding.NoSharding(), shuffle=True,
        num_epochs=None, seed=seed)
    # The same order without a generator per record, where nothing is drawn (InMemoryBatches).
    self.shuffled = grain.MapDataset.range(len(self.data)).shuffle(seed=seed)
    self.options = options
    features = self.data.dataset_info.features
    where = f"config.data.sources[{source.index}] ({s.name}/{s.split})"
    if s.text == "labels":
      spec = catalog.feature_spec(features, s.label_feature)
      if spec is None:
        raise ValueError(f"{where} reads labels as text but has no label feature "
                         f"{s.label_feature!r} (its features: {', '.join(sorted(features))}); "
                         "set its label_feature")
      if class_names is None:
        raise ValueError(f"{where}: a label source needs a class-name resolver "
                         "(the training loop passes evaluation.prompts.class_names)")
      self.names = [str(n) for n in class_names(s, _label_names(spec), s.name)]
      self.templates = list(s.templates) or list(DEFAULT_TEMPLATES)
      bad = [t for t in self.templates if "{}" not in t]
      if bad:
        raise ValueError(f"{where}: the templates {bad} have no '{{}}' for the class name")
    elif catalog.feature_spec(features, s.captions_feature) is None:
      raise ValueError(f"{where} has no captions feature {s.captions_feature!r} (its "
                       f"features: {', '.join(sorted(features))}); for a labelled dataset set "
                       "text='labels'")
    # A source in our builders' schema (an "image" and a "captions" feature) uses the
    # one-source pipeline's decoded copy (config.data.in_memory and its budget, per source):
    # the same pixels, no image decoded per row.
    self.decoded = None
    if (s.image_feature == "image" and catalog.feature_spec(features, "captions") is not None
        and (s.text == "labels" or s.captions_feature == "captions")):
      self.decoded = pipeline.load_decoded(
          dataclasses.replace(options, name=s.name, data_dir=source.data_dir), s.split)
    if self.decoded is not None:
      self.caption_count = np.asarray(self.decoded.caption_count)
      self.captions = self.decoded.all_captions()
      draws = ((np.diff(self.caption_count) > 1).any() if s.text == "captions"
               else len(self.templates) > 1)
      self.random = options.random_resized_crop or bool(draws)
      if s.text == "labels":  # Read once: a stored record is slow to read for its label alone.
        self.labels = [_feature(self.data[i], s.label_feature) for i in range(len(self.data))]

  def __len__(self) -> int:
    return len(self.data)

  def example(self, position: int) -> dict[str, Any]:
    if self.decoded is not None:
      return self._decoded_example(position)
    metadata = self.order[position]
    record, rng = metadata.record_key, metadata.rng
    element = self.data[record]
    s = self.settings
    key = element["key"] if "key" in element else f"{s.name}/{s.split}/{record}"
    # The one-source pipeline's draws in its order (pipeline._DecodeExample, InMemoryBatches):
    # the text first, then the crop, so one source gives its batches bit for bit.
    if s.text == "captions":
      captions = _feature(element, s.captions_feature)
      if isinstance(captions, (bytes, str, np.bytes_, np.str_)):
        captions = [captions]
      text = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
    else:
      text = self.label_text(_feature(element, s.label_feature), rng)
    return {"image": self.image(record, _feature(element, s.image_feature), rng),
            "caption": _to_str(text), "key": _to_str(key)}

  def _record_and_rng(self, position: int):
    """(record index, its rng or None) that position `position` of this source reads."""
    if self.random:
      metadata = self.order[position]
      return metadata.record_key, metadata.rng
    return self.shuffled[position], None

  def _decoded_example(self, position: int) -> dict[str, Any]:
    """`example` from the decoded copy alone: the same draws, no stored record read."""
    record, rng = self._record_and_rng(position)
    if self.settings.text == "labels":
      caption = self.label_text(self.labels[record], rng)
    else:
      first, choices = int(self.caption_count[record]), int(
          self.caption_count[record + 1] - self.caption_count[record])
      caption = self.captions[first + (int(rng.integers(choices)) if choices > 1 else 0)]
    return {"image": self.image(record, None, rng), "caption": caption,
            "key": self.decoded.key(record)}

  def key(self, position: int) -> str:
    """`example(position)["key"]`."""
    if self.decoded is None:
      return self.example(position)["key"]
    return self.decoded.key(self._record_and_rng(position)[0])

  def image(self, record: int, stored, rng: np.random.Generator) -> np.ndarray:
    """uint8 [S, S, 3]: the random crop (config.data.random_resized_crop) or the center crop,
    from the decoded copy where there is one, else decoded from the stored bytes."""
    o = self.options
    if self.decoded is None:
      return preprocess.decode_train_image(stored, o.image_size,
                                           rng if o.random_resized_crop else None,
                                           o.crop_scale, o.crop_ratio)
    if o.random_resized_crop:
      return preprocess.random_resized_crop(Image.fromarray(self.decoded.image(record)),
                                            o.image_size, rng, o.crop_scale, o.crop_ratio)
    return self.decoded.images[record]

  def _draw_label(self, label, rng: np.random.Generator) -> tuple[list[int], int]:
    """(the example's labels, the index of its template: drawn from its generator when there
    are several)."""
    labels = np.atleast_1d(np.asarray(label)).astype(np.int64).tolist()
    for value in labels:
      if not 0 <= value < len(self.names):
        raise ValueError(f"config.data.sources[{self.source.index}]: label {value} of "
                         f"{self.settings.name} has no class name ({len(self.names)} names)")
    templates = self.templates
    return labels, int(rng.integers(len(templates))) if len(templates) > 1 else 0

  def label_text(self, label, rng: np.random.Generator) -> str:
    """The template (one drawn from the example's generator when there are several) applied
    to the class name, or to the names of a multi-label example joined by `label_join`."""
    labels, template = self._draw_label(label, rng)
    return self.templates[template].format(
        self.settings.label_join.join(self.names[v] for v in labels))

  def tokenize_texts(self, tokenize: Callable[[list[str]], np.ndarray]) -> None:
    """Tokenises, once, what the decoded copy's rows read: every caption of a caption source,
    every template x class name of a label source (`row_tokens` reads them)."""
    if self.decoded is None:
      return
    if self.settings.text == "captions":
      self.tokens = tokenize(list(self.captions))
    else:
      texts = [t.format(name) for t in self.templates for name in self.names]
      self.label_tokens = tokenize(texts).reshape(len(self.templates), len(self.names), -1)

  def row(self, position: int, tokenize: Callable[[list[str]], np.ndarray]
          ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image [S, S, 3], token ids [L]) of `example(position)`, the text tokenised as
    `tokenize` does (after `tokenize_texts`, looked up, not tokenised again)."""
    if self.decoded is None:
      example = self.example(position)
      return example["image"], tokenize([example["caption"]])[0]
    record, rng = self._record_and_rng(position)
    # The draws of `_decoded_example` in its order: the text, then the crop.
    if self.settings.text == "labels":
      labels, template = self._draw_label(self.labels[record], rng)
      if len(labels) == 1:
        tokens = self.label_tokens[template, labels[0]]
      else:
        tokens = tokenize([self.templates[template].format(
            self.settings.label_join.join(self.names[v] for v in labels))])[0]
    else:
      first, choices = int(self.caption_count[record]), int(
          self.caption_count[record + 1] - self.caption_count[record])
      tokens = self.tokens[first + (int(rng.integers(choices)) if choices > 1 else 0)]
    return self.image(record, None, rng), tokens


_LABEL_TEXT_FIXES = ("a shorter template, a larger config.data.tokenizer_vocab (more words get "
                     "a piece of their own), or a larger config.model.text.max_len")


def check_label_texts(readers: Sequence[_SourceReader], tokenizer, max_len: int) -> None:
  """Raises ValueError when a label source's text would not reach the model whole: a template
  applied to a class name that takes more than `max_len` tokens with BOS and EOS (it would be
  cut, and the cut part is usually the class name), or two classes whose texts are the same
  token ids under one template (the model could not tell them apart). Every template x class
  name of every label source is tokenised once, at the start of a run."""
  for reader in readers:
    if reader.settings.text != "labels":
      continue
    where = f"config.data.sources[{reader.source.index}] (tag {reader.source.tag!r})"
    for template in reader.templates:
      seen: dict[tuple, int] = {}
      for label, name in enumerate(reader.names):
        text = template.format(name)
        ids = tuple(tokenizer.encode(text))
        if len(ids) + 2 > max_len:
          raise ValueError(
              f"{where}: the label text {text!r} (template {template!r}, class {label} "
              f"{name!r}) takes {len(ids) + 2} tokens with BOS and EOS, more than "
              f"config.model.text.max_len={max_len}, so its end (often the class name) "
              f"would be cut; use {_LABEL_TEXT_FIXES}")
        if ids in seen:
          other = seen[ids]
          raise ValueError(
              f"{where}: under template {template!r} the classes {other} "
              f"{reader.names[other]!r} and {label} {name!r} give the same token ids "
              f"{list(ids)}, so the model cannot tell them apart; give them distinct class "
              f"names, or use {_LABEL_TEXT_FIXES}")
        seen[ids] = label


def report_truncated_captions(readers: Sequence[_SourceReader], tokenizer, max_len: int,
                              sample: int = 1_000) -> dict[str, tuple[int, int]]:
  """Logs once, per caption source, how many of its captions take more than `max_len` tokens
  with BOS and EOS (training keeps their first max_len - 2 pieces): all captions of a source
  held in memory (the decoded copy), else those of its first `sample` records. Returns
  {tag: (truncated, counted)}."""
  counts = {}
  for reader in readers:
    s = reader.settings
    if s.text != "captions":
      continue
    if reader.decoded is not None:
      captions, where = list(reader.captions), "all"
    else:
      captions, where = [], f"the first {min(sample, len(reader))} records'"
      for i in range(min(sample, len(reader))):
        value = _feature(reader.data[i], s.captions_feature)
        if isinstance(value, (bytes, str, np.bytes_, np.str_)):
          value = [value]
        captions += [_to_str(c) for c in value]
    truncated = sum(len(tokenizer.encode(c)) + 2 > max_len for c in captions)
    counts[reader.source.tag] = (truncated, len(captions))
    if truncated:
      logging.warning("config.data.sources[%d] (tag %r): %d of %s %d captions take more than "
                      "config.model.text.max_len=%d tokens and are cut to their first %d pieces",
                      reader.source.index, reader.source.tag, truncated, where, len(captions),
                      max_len, max_len - 2)
    else:
      logging.info("config.data.sources[%d] (tag %r): none of %s %d captions is cut by "
                   "config.model.text.max_len=%d", reader.source.index, reader.source.tag, where,
                   len(captions), max_len)
  return counts


@dataclasses.dataclass(frozen=True)
class MixtureSampler:
  """What `pipeline.PositionHandler` records next to the position (a change warns on resume)."""
  global_batch_size: int
  seed: int
  num_records: int
  host_batch_size: int
  shard_index: int
  shard_count: int


class MixtureBatches:
  """Host batches of a mixture: `host_batch(n)` is this host's rows of global batch n.

  Rows [p * b, (p + 1) * b) of global batch n are the mixed stream's rows n * B + p * b + r,
  each read from its source at the position the interleave gives (module docstring), so the
  batches depend on (seed, n) only, not on the number of hosts. Thread-safe (reads only).
  """

  def __init__(self, options: pipeline.DataOptions, sources: Sequence[Source],
               tokenizer: Tokenizer | None = None, *, shard_index: int = 0,
               shard_count: int = 1, class_names: ClassNames | None = None):
    if not sources:
      raise ValueError("config.data.sources is empty: the one-source pipeline reads "
                       "config.data.name (pipeline.make_train_iterator)")
    B = options.global_batch_size
    if B % shard_count:
      raise ValueError(f"config.train.batch_size={B} is not divisible by the {shard_count} "
                       f"hosts (jax.process_count()); use a multiple of {shard_count}")
    self.options, self.sources = options, list(sources)
    self.readers = [_SourceReader(s, options, class_names) for s in self.sources]
    self.order = mixed_order([s.settings.weight for s in self.sources])
    # Which source and position a row reads, from grain's closed form itself: 7x faster a row
    # than `order[t]`, which adds grain's per-element stats bookkeeping (tests: the same rows).
    self._select = getattr(self.order, "_selection_map", self.order)
    self.sampler = MixtureSampler(B, options.seed, sum(len(r) for r in self.readers),
                                  B // shard_count, shard_index, shard_count)
    tokenizer = tokenizer or load_tokenizer(options.tokenizer, options.tokenizer_kind)
    check_label_texts(self.readers, tokenizer, options.max_len)
    report_truncated_captions(self.readers, tokenizer, options.max_len)
    self.tokenize = pipeline._TokenizeAndNormalize(tokenizer, options.max_len)  # pylint: disable=protected-access
    for reader in self.readers:  # The in-memory path's way: each text tokenised once.
      reader.tokenize_texts(self._tokenize)

  def _tokenize(self, texts: list[str]) -> np.ndarray:
    return self.tokenize.tokenizer.tokenize(texts, self.options.max_len)

  @property
  def tags(self) -> list[str]:
    return [s.tag for s in self.sources]

  def rows(self, global_batch: int) -> list[tuple[int, int]]:
    """(source, position in source) of this host's rows of global batch `global_batch`."""
    s = self.sampler
    start = global_batch * s.global_batch_size + s.shard_index * s.host_batch_size
    return [tuple(self._select[t]) for t in range(start, start + s.host_batch_size)]

  def host_batch(self, global_batch: int, keys: bool = True) -> dict[str, np.ndarray]:
    """This host's rows: "image" float32 [b, S, S, 3], "text" int32 [b, L], "source" int32
    one-hot [b, sources], and with `keys` "key" str [b]."""
    rows = self.rows(global_batch)
    size = self.options.image_size
    # One array of each filled row by row: no per-row dicts, text strings or tokenizer calls
    # (the texts were tokenised once, `_SourceReader.tokenize_texts`).
    images = np.empty((len(rows), size, size, 3), np.uint8)
    text = np.empty((len(rows), self.options.max_len), np.int32)
    for row, (i, position) in enumerate(rows):
      images[row], text[row] = self.readers[i].row(position, self._tokenize)
    source = np.zeros((len(rows), len(self.sources)), np.int32)
    source[np.arange(len(rows)), [i for i, _ in rows]] = 1
    out = {"image": preprocess.normalize_images(images), "text": text, "source": source}
    if keys:
      out["key"] = np.asarray([self.readers[i].key(p) for i, p in rows])
    return out

  def host_texts(self, global_batch: int) -> list[str]:
    """The untokenised texts of this host's rows (for checks and the demo's printout)."""
    return [self.readers[i].example(p)["caption"] for i, p in self.rows(global_batch)]


class MixtureIterator(pipeline.InMemoryTrainIterator):
  """Global batches {"image", "text", "source"} of a mixture as jax.Arrays, one prepared ahead
  on a background thread; `position` and `set_position` as the one-source iterators (so
  `pipeline.checkpoint_args` saves and restores it)."""

  def _make(self, global_batch: int) -> dict[str, jax.Array]:
    host_batch = self.batches.host_batch(global_batch, keys=False)
    return {key: jax.make_array_from_process_local_data(self._sharding(key), host_batch[key])
            for key in ("image", "text", "source")}

  def _sharding(self, key: str):
    if isinstance(self.batch_sharding, Mapping) and key not in self.batch_sharding:
      # "source" [B, sources] is split along the batch like "text" [B, L].
      return self.batch_sharding["text"]
    return super()._sharding(key)


def make_mixture_iterator(config, batch_sharding, tokenizer: Tokenizer | None = None, *,
                          class_names: ClassNames | None = None, shard_index: int | None = None,
                          shard_count: int | None = None) -> MixtureIterator:
  """The training stream of a mixture config (config.data.sources non-empty) on this host.
  Warns once per label source that is also a zero-shot eval split (`zero_shot_overlaps`)."""
  for message in zero_shot_overlaps(config):
    logging.warning("%s", message)
  options = pipeline.DataOptions.from_config(config)
  batches = MixtureBatches(
      options, sources_of(config), tokenizer,
      shard_index=jax.process_index() if shard_index is None else shard_index,
      shard_count=jax.process_count() if shard_count is None else shard_count,
      class_names=class_names)
  return MixtureIterator(batches, batch_sharding)
