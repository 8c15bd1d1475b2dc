"""Input pipeline: TFDS array_record source -> grain -> global `jax.Array` batches.

Per host, for training:
  one global order of the split (a full permutation per epoch from grain's IndexSampler, so no
  shuffle buffer is needed; epochs follow each other without a gap) cut into global batches of
  B; host p of P reads rows [p * B/P, (p+1) * B/P) of every global batch -> pick one of the
  image's captions at random -> decode + random-resized-crop (or resize + center crop) ->
  normalise images, tokenize captions (BOS .. EOS PAD, truncated to max_len and counted) ->
  `jax.make_array_from_process_local_data(batch_sharding, ...)`.

The sequence of global batches is therefore the same whatever the number of processes (and of
grain workers): a 1-process debug run sees a pod run's batches, and a run resumed on a
different number of hosts continues the same order. Every random choice comes from a
per-record generator seeded by (seed, global position), so the stream is a pure function of
(dataset, seed, global position). The iterator's state is one number, `position`, the global
batches consumed; `set_position(n)` moves to batch n on any number of hosts.
`coca_jax.training.checkpoint` saves it next to the model (`DIR/checkpoints/<step>/data/`), so
a resumed run sees exactly the batches the uninterrupted run would have produced.

Config fields read (config.data.<field>; the schema and its defaults are in coca_jax/core/config.py,
which every loaded config is completed with; this module reads completed configs only):
  name                 TFDS dataset name built by `python -m coca_jax.data.build` (required)
  data_dir             TFDS data_dir ("" = DEFAULT_DATA_DIR outside a training run)
  train_split          split to train on ("train"); TFDS slices like "train[:90%]" work
  eval_split           split `make_eval_source` reads by default ("test")
  image_size           output height = width in pixels (required; = config.model.image_size)
  tokenizer            path to the SentencePiece .model (required)
  num_workers          grain worker processes; 0 = decode in the training process (0).
                       The batches do not depend on it. On a 2-core machine 0 is fastest:
                       workers compete with the train step for the cores.
  worker_buffer_size   batches each worker prepares ahead (2)
  random_resized_crop  True: random crop of area fraction in crop_scale, aspect in crop_ratio;
                       False: resize shorter side + center crop (True)
  crop_scale           area fraction range of the random crop ((0.9, 1.0)); small values can crop
                       out the objects a caption names
  crop_ratio           aspect ratio range of the random crop ((3/4, 4/3))
  in_memory            "auto" | "always" | "never": which training input path ("auto", see
                       below)
  in_memory_max_mb     the "auto" rule's budget for the decoded split, MiB (1024)
Other fields: config.train.batch_size (global batch B), config.train.seed (shuffle/augment seed),
config.model.text.max_len (L).

Two paths give the same batches, bit for bit, for the same (dataset, seed, position):
  streaming  grain reads, decodes, crops and tokenises each example when its batch is due
             (`make_host_loader`, `TrainIterator`); for any size of dataset.
  in-memory  the split is decoded once into memory-mapped uint8 arrays cached next to the
             dataset (`decoded_cache`), its captions are tokenised once per run, and each batch
             is a gather (plus, with random_resized_crop, one Pillow resize per example from
             the decoded pixels, with the streaming path's own random draws) that a background
             thread prepares one batch ahead (`InMemoryBatches`, `InMemoryTrainIterator`).
The rule (config.data.in_memory="auto"): in-memory when the split's decoded images fit the
budget min(config.data.in_memory_max_mb MiB, a quarter of this machine's RAM), counted as
N * S * S * 3 bytes without random crops (what is cached is the final image) and as the stored
images' h * w * 3 bytes with them (crops are drawn per epoch from the full image), and, with
random crops, no stored JPEG's shorter side reaches 2 * S (the streaming path decodes those at
reduced scale, which a decoded copy cannot reproduce); otherwise streaming. "always" ignores
the budget (and fails on such a JPEG); "never" always streams. Each host decides for itself:
both paths give the same batches, so hosts may differ. The crops stay per example: the batches
must equal the streaming path's, whose resampling is Pillow's fixed-point bicubic, and a numpy
version over the batch would have to reproduce its integer rounding exactly.

Programs that use num_workers > 0 must start under `if __name__ == "__main__":` (grain spawns
workers that re-import the main module).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
from typing import Any, Iterator, Mapping

from absl import flags
from absl import logging
import grain
import jax
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from coca_jax.data import decoded_cache
from coca_jax.data import preprocess
from coca_jax.data import sources
from coca_jax.data.tokenizer import Tokenizer, load_tokenizer

# Where config.data.data_dir is "" (the schema's default) outside a training run.
DEFAULT_DATA_DIR = "~/tensorflow_datasets"
IN_MEMORY_MODES = ("auto", "always", "never")
# The "auto" rule's budget is at most this share of the machine's RAM.
IN_MEMORY_RAM_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """The pipeline's settings, read and validated from a config (see module docstring)."""
  name: str
  data_dir: str
  train_split: str
  eval_split: str
  image_size: int
  tokenizer: str
  tokenizer_kind: str
  num_workers: int
  worker_buffer_size: int
  random_resized_crop: bool
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  max_len: int
  global_batch_size: int
  seed: int
  in_memory: str = "auto"
  in_memory_max_mb: float = 1024.0
  text_only: bool = False
  image_only: bool = False

  @classmethod
  def from_config(cls, config) -> "DataOptions":
    data = config.data

    def field(name):
      if name not in data:
        raise ValueError(f"config.data.{name} is missing: pass a completed config "
                         "(coca_jax.core.config.load_config / complete fill in every default)")
      return data[name]

    options = cls(
        name=field("name"),
        # "" (the config default): train fills in DIR/tensorflow_datasets before this runs.
        data_dir=os.path.expanduser(field("data_dir") or DEFAULT_DATA_DIR),
        train_split=field("train_split"), eval_split=field("eval_split"),
        image_size=int(field("image_size")), tokenizer=field("tokenizer"),
        tokenizer_kind=field("tokenizer_kind"),
        num_workers=int(field("num_workers")), worker_buffer_size=int(field("worker_buffer_size")),
        random_resized_crop=bool(field("random_resized_crop")),
        crop_scale=tuple(float(x) for x in field("crop_scale")),
        crop_ratio=tuple(float(x) for x in field("crop_ratio")),
        max_len=int(config.model.text.max_len), global_batch_size=int(config.train.batch_size),
        seed=int(config.train.seed), in_memory=field("in_memory"),
        in_memory_max_mb=field("in_memory_max_mb"), text_only=bool(data.get("text_only", False)),
        image_only=bool(data.get("image_only", False)))
    if options.in_memory not in IN_MEMORY_MODES:
      raise ValueError(f"config.data.in_memory={options.in_memory!r} is unknown; use one of "
                       f"{', '.join(IN_MEMORY_MODES)} ('auto': in memory when the decoded split "
                       "fits config.data.in_memory_max_mb)")
    if (not isinstance(options.in_memory_max_mb, (int, float))
        or isinstance(options.in_memory_max_mb, bool) or options.in_memory_max_mb < 0):
      raise ValueError(f"config.data.in_memory_max_mb={options.in_memory_max_mb!r} must be a "
                       "number of MiB >= 0")
    if not 0.0 < options.crop_scale[0] <= options.crop_scale[1] <= 1.0:
      raise ValueError(f"config.data.crop_scale={options.crop_scale} must satisfy "
                       "0 < low <= high <= 1")
    if not 0.0 < options.crop_ratio[0] <= options.crop_ratio[1]:
      raise ValueError(f"config.data.crop_ratio={options.crop_ratio} must satisfy 0 < low <= high")
    if options.image_size <= 0:
      raise ValueError(f"config.data.image_size={options.image_size} must be positive")
    if not 0 <= options.seed < 2**32:
      raise ValueError(f"config.train.seed={options.seed} must be in [0, 2**32) (grain's sampler)")
    return options


class _DecodeExample(grain.transforms.RandomMap):
  """One stored example -> {"image": uint8 [S, S, 3], "caption": str, "key": str} (no "image"
  with config.data.text_only)."""

  def __init__(self, options: DataOptions):
    self.text_only = options.text_only
    self.image_only = options.image_only
    self.image_size = options.image_size
    self.random_crop = options.random_resized_crop
    self.crop_scale = options.crop_scale
    self.crop_ratio = options.crop_ratio

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    captions = element["captions"]
    # A fresh choice per epoch: the record's generator is seeded by its position in the stream.
    caption = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
    if self.text_only:
      return {"caption": _to_str(caption), "key": _to_str(element["key"])}
    image = preprocess.decode_train_image(
        element["image"], self.image_size, rng if self.random_crop else None,
        self.crop_scale, self.crop_ratio)
    if self.image_only:
      return {"image": image, "key": _to_str(element["key"])}
    return {"image": image, "caption": _to_str(caption), "key": _to_str(element["key"])}


class _TokenizeAndNormalize(grain.transforms.Map):
  """Batched: normalise images, tokenize captions; counts truncated captions."""

  def __init__(self, tokenizer: Tokenizer, max_len: int):
    self.tokenizer = tokenizer
    self.max_len = max_len
    self._next_report = 1

  def map(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "caption" not in batch:  # config.data.image_only
      return {"image": preprocess.normalize_images(batch["image"]), "key": batch["key"]}
    text = self.tokenizer.tokenize(batch["caption"].tolist(), self.max_len)
    truncated = self.tokenizer.num_truncated
    if truncated >= self._next_report:  # log at 1, 2, 4, 8, ... so it is visible, not a flood
      logging.warning("%d captions longer than config.model.text.max_len=%d were truncated so "
                      "far (this process, pid %d)", truncated, self.max_len, os.getpid())
      while self._next_report <= truncated:
        self._next_report *= 2
    if "image" not in batch:  # config.data.text_only
      return {"text": text, "key": batch["key"]}
    return {"image": preprocess.normalize_images(batch["image"]), "text": text,
            "key": batch["key"]}


def _to_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class GlobalOrderSampler:
  """A grain sampler that gives host `shard_index` its rows of each global batch.

  grain's DataLoader asks the sampler of host p (of P) for indices `k = j * P + p`, j = 0, 1, ...
  (the j-th record this host reads); with W worker processes, worker j % W reads it and batches
  its records in order, and the host's batches come from workers 0, 1, ..., W-1 in turn. This
  sampler inverts that bookkeeping: the j-th record lands in row r of the host's batch s, and is
  the record at global position s * B + p * b + r of one global order (b = B / P). The record
  key and its random generator are those of that global position, so the batch contents do not
  depend on P or W.
  """

  def __init__(self, num_records: int, seed: int, global_batch_size: int, shard_index: int,
               shard_count: int, num_workers: int):
    self.global_order = grain.samplers.IndexSampler(
        num_records=num_records, shard_options=grain.sharding.NoSharding(), shuffle=True,
        num_epochs=None, seed=seed)
    self.num_records, self.seed = num_records, seed
    self.global_batch_size = global_batch_size
    self.host_batch_size = global_batch_size // shard_count
    self.shard_index, self.shard_count = shard_index, shard_count
    self.lanes = max(num_workers, 1)

  def __len__(self) -> int:
    return sys.maxsize

  def global_position(self, index: int) -> int:
    local, shard = divmod(index, self.shard_count)
    if shard != self.shard_index:
      raise IndexError(f"index {index} belongs to host {shard}, not {self.shard_index}")
    lane, in_lane = local % self.lanes, local // self.lanes
    lane_batch, row = divmod(in_lane, self.host_batch_size)
    batch = lane_batch * self.lanes + lane
    return batch * self.global_batch_size + shard * self.host_batch_size + row

  def __getitem__(self, index: int):
    return dataclasses.replace(self.global_order[self.global_position(index)], index=index)

  def __repr__(self) -> str:
    return (f"GlobalOrderSampler(num_records={self.num_records}, seed={self.seed}, "
            f"global_batch_size={self.global_batch_size}, shard_index={self.shard_index}, "
            f"shard_count={self.shard_count}, lanes={self.lanes})")


def make_host_loader(options: DataOptions, *, shard_index: int, shard_count: int,
                     split: str | None = None, tokenizer: Tokenizer | None = None,
                     ) -> grain.DataLoader:
  """The grain loader of one host: its shard of `split`, in per-host batches.

  Args:
    options: from `DataOptions.from_config`.
    shard_index, shard_count: this host's position (jax.process_index(), jax.process_count()).
    split: defaults to options.train_split.
    tokenizer: defaults to loading options.tokenizer.

  Returns:
    A DataLoader whose iterator yields numpy dicts: "image" float32 [b, S, S, 3] (normalised),
    "text" int32 [b, max_len], "key" str [b] (which stored example; for debugging and tests),
    with b = global_batch_size / shard_count: rows [shard_index * b, (shard_index + 1) * b) of
    each global batch (see `GlobalOrderSampler`). It repeats epochs forever.
  """
  _check_hosts(options, shard_count)
  host_batch_size = options.global_batch_size // shard_count
  source = sources.open_source(options.name, options.data_dir, split or options.train_split,
                                decode_images=False)
  _check_records(options, len(source), shard_count, split)
  _check_text_only(options, source)
  tokenizer = tokenizer or load_tokenizer(options.tokenizer, options.tokenizer_kind)
  shard_options = grain.sharding.ShardOptions(
      shard_index=shard_index, shard_count=shard_count, drop_remainder=False)
  sampler = GlobalOrderSampler(len(source), options.seed, options.global_batch_size,
                               shard_index, shard_count, options.num_workers)
  operations = [
      _DecodeExample(options),
      grain.transforms.Batch(batch_size=host_batch_size, drop_remainder=True),
      _TokenizeAndNormalize(tokenizer, options.max_len),
  ]
  if options.num_workers > 0 and not flags.FLAGS.is_parsed():
    # Grain workers read absl flags; a program that never called app.run has not parsed them.
    flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=options.num_workers,
                          worker_buffer_size=options.worker_buffer_size,
                          shard_options=shard_options)


def _check_hosts(options: DataOptions, shard_count: int) -> None:
  if options.global_batch_size % shard_count:
    raise ValueError(f"config.train.batch_size={options.global_batch_size} is not divisible by "
                     f"the {shard_count} hosts (jax.process_count()); use a multiple of "
                     f"{shard_count}")


def _check_text_only(options: DataOptions, source) -> None:
  """A text dataset (no "image" feature) trains only with config.data.text_only."""
  if not options.text_only and len(source) and "image" not in source[0]:
    raise ValueError(f"dataset {options.name!r} holds texts only (data.build --format text): "
                     "train on it with config.data.text_only=True and masked language "
                     "modelling (experiments/vlmo_base.py:stage=2)")


def _check_records(options: DataOptions, num_records: int, shard_count: int,
                   split: str | None) -> None:
  if num_records < shard_count:
    raise ValueError(f"split {split or options.train_split!r} of {options.name!r} has "
                     f"{num_records} examples, fewer than the {shard_count} hosts")


def in_memory_budget(options: DataOptions) -> float:
  """Bytes the "auto" rule lets a decoded split take: min(config.data.in_memory_max_mb MiB,
  IN_MEMORY_RAM_FRACTION of this machine's RAM)."""
  budget = float(options.in_memory_max_mb) * 2**20
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (AttributeError, ValueError, OSError):  # No sysconf: the configured budget alone.
    return budget
  return min(budget, IN_MEMORY_RAM_FRACTION * ram)


def load_decoded(options: DataOptions, split: str | None = None
                 ) -> decoded_cache.DecodedSplit | None:
  """The decoded split for the in-memory path, or None where the rule (module docstring)
  picks streaming. Decodes and caches it on first use."""
  mode, split = options.in_memory, split or options.train_split
  if mode == "never" or options.text_only:  # The in-memory path caches decoded images.
    return None
  source = sources.open_source(options.name, options.data_dir, split, decode_images=False)
  geometry = "full" if options.random_resized_crop else "center"
  budget = None if mode == "always" else in_memory_budget(options)
  estimate = decoded_cache.estimate_bytes(source, options.image_size, geometry)
  where = f"{options.name}/{split}"
  if budget is not None and estimate > budget:
    logging.info("Input: streaming %s: decoded it would take ~%.0f MiB, over the in-memory "
                 "budget of %.0f MiB (config.data.in_memory_max_mb, at most %.0f%% of RAM)",
                 where, estimate / 2**20, budget / 2**20, 100 * IN_MEMORY_RAM_FRACTION)
    return None
  try:
    decoded = decoded_cache.load_or_build(options.name, options.data_dir, split, source,
                                          image_size=options.image_size, geometry=geometry,
                                          max_bytes=budget)
  except decoded_cache.TooLarge as e:
    logging.info("Input: streaming %s: %s (config.data.in_memory_max_mb)", where, e)
    return None
  except decoded_cache.NotExact as e:
    if mode == "always":
      raise ValueError(f"config.data.in_memory='always' cannot hold {where}: {e}; use "
                       "config.data.in_memory='auto' or 'never' (streaming)") from e
    logging.info("Input: streaming %s: %s", where, e)
    return None
  logging.info("Input: %s in memory (%.0f MiB decoded, %s)", where, decoded.nbytes / 2**20,
               decoded.path or "not cached")
  return decoded


class InMemoryBatches:
  """Host batches from a decoded split: `host_batch(n)` is, bit for bit, the n-th batch this
  host's streaming loader (`make_host_loader` with the same options) yields.

  The same global order and per-record generators as the streaming path (`GlobalOrderSampler`
  over grain's `IndexSampler`): record keys from the same shuffle, the caption choice and the
  crop drawn from the record's own generator in the same order, the same Pillow resize of the
  same decoded pixels, the same tokens and normalisation. Thread-safe: `host_batch` reads only.
  """

  def __init__(self, options: DataOptions, decoded: decoded_cache.DecodedSplit,
               tokenizer: Tokenizer | None = None, *, shard_index: int = 0,
               shard_count: int = 1, split: str | None = None):
    _check_hosts(options, shard_count)
    _check_records(options, len(decoded), shard_count, split)
    self.options, self.decoded = options, decoded
    self.sampler = GlobalOrderSampler(len(decoded), options.seed, options.global_batch_size,
                                      shard_index, shard_count, num_workers=0)
    # The sampler's own order (IndexSampler shuffles MapDataset.range with the seed), read
    # without making each record's generator where no random choice needs it.
    self._order = grain.MapDataset.range(len(decoded)).shuffle(seed=options.seed)
    tokenizer = tokenizer or load_tokenizer(options.tokenizer, options.tokenizer_kind)
    before = tokenizer.num_truncated
    self.tokens = decoded_cache.tokenize_all(decoded, tokenizer.tokenize, options.max_len)
    truncated = tokenizer.num_truncated - before
    if truncated:
      logging.warning("%d of the %d captions are longer than config.model.text.max_len=%d and "
                      "are truncated", truncated, len(self.tokens), options.max_len)
    self._caption_count = np.asarray(decoded.caption_count)
    self._random = options.random_resized_crop or bool(
        (np.diff(self._caption_count) > 1).any())

  def host_batch(self, global_batch: int, keys: bool = True) -> dict[str, np.ndarray]:
    """This host's rows of global batch `global_batch`: "image" float32 [b, S, S, 3],
    "text" int32 [b, L], and with `keys` "key" str [b] (which stored examples)."""
    sampler, options = self.sampler, self.options
    start = (global_batch * sampler.global_batch_size
             + sampler.shard_index * sampler.host_batch_size)
    positions = range(start, start + sampler.host_batch_size)
    count = self._caption_count
    records = np.empty(len(positions), np.int64)
    captions = np.empty(len(positions), np.int64)
    crops = []
    for row, position in enumerate(positions):
      if self._random:
        metadata = sampler.global_order[position]
        record, rng = metadata.record_key, metadata.rng
      else:
        record, rng = self._order[position], None
      first, choices = int(count[record]), int(count[record + 1] - count[record])
      # The streaming path's draws in its order: the caption, then the crop (_DecodeExample).
      captions[row] = first + (int(rng.integers(choices)) if choices > 1 else 0)
      records[row] = record
      if options.random_resized_crop:
        crops.append(preprocess.random_resized_crop(
            Image.fromarray(self.decoded.image(record)), options.image_size, rng,
            options.crop_scale, options.crop_ratio))
    images = np.stack(crops) if crops else self.decoded.images[records]
    batch = {"image": preprocess.normalize_images(images)}
    if not options.image_only:  # config.data.image_only: no captions.
      batch["text"] = self.tokens[captions]
    if keys:
      batch["key"] = np.asarray([self.decoded.key(int(r)) for r in records])
    return batch


class TrainIterator:
  """Yields global batches {"image": float32 [B, S, S, 3], "text": int32 [B, L]} as jax.Arrays.

  `position` is the number of global batches returned so far; `set_position(n)` moves to the
  n-th global batch on any number of hosts (`training.checkpoint` saves and restores it).
  (`get_state()` / `set_state()` expose grain's own host-local state, bytes.)
  """

  def __init__(self, loader: grain.DataLoader, batch_sharding):
    self.loader = loader
    self.grain_iterator = iter(loader)
    self.batch_sharding = batch_sharding
    self.position = 0

  def __iter__(self) -> "TrainIterator":
    return self

  def close(self) -> None:
    """Stops grain's reading thread now, not whenever the iterator is garbage-collected (a
    collection that happens on that thread itself fails: "cannot join current thread").
    Safe to call twice; the iterator yields nothing after it."""
    inner = getattr(self.grain_iterator, "_iterator", None)  # grain has no public close here.
    if hasattr(inner, "close"):
      inner.close()

  def __next__(self) -> dict[str, jax.Array]:
    host_batch = next(self.grain_iterator)
    self.position += 1
    return {key: jax.make_array_from_process_local_data(self._sharding(key), host_batch[key])
            for key in ("image", "text") if key in host_batch}

  @property
  def sampler(self) -> GlobalOrderSampler:
    return self.loader._sampler  # pylint: disable=protected-access

  def set_position(self, global_batches: int) -> None:
    """Moves to global batch `global_batches` (0 = the first): grain's state for this host is
    derived from the number (see `GlobalOrderSampler` for the index layout it inverts)."""
    sampler = self.sampler
    state = json.loads(self.grain_iterator.get_state())
    workers = state["worker_count"]
    hosts, host = sampler.shard_count, sampler.shard_index
    per_batch = sampler.host_batch_size
    if workers == 0:
      # The next index of the in-process reader is n * b; grain stores the last one seen.
      state["last_seen_indices"] = {"0": host - hosts + global_batches * per_batch * hosts}
      state["last_worker_index"] = -1
    else:
      lanes = hosts * workers
      seen = {}
      for worker in range(workers):
        batches_done = (global_batches - worker + workers - 1) // workers
        seen[str(worker)] = host - lanes + worker * hosts + batches_done * per_batch * lanes
      state["last_seen_indices"] = seen
      state["last_worker_index"] = global_batches % workers - 1
    self.grain_iterator.set_state(json.dumps(state).encode())
    self.position = global_batches

  def _sharding(self, key: str):
    if isinstance(self.batch_sharding, Mapping):
      return self.batch_sharding[key]
    return self.batch_sharding

  def get_state(self) -> bytes:
    return self.grain_iterator.get_state()

  def set_state(self, state: bytes) -> None:
    self.grain_iterator.set_state(state)


class InMemoryTrainIterator:
  """`TrainIterator`'s interface over `InMemoryBatches`, one batch prepared ahead.

  A background thread makes global batch `position + 1` (host rows, normalised, and the global
  `jax.Array`s) while the step runs on batch `position`. Each prepared batch is tagged with its
  position: `set_position` (a restore) discards one prepared for another, so the next batch is
  always `host_batch(position)` whatever the thread did.
  """

  def __init__(self, batches: InMemoryBatches, batch_sharding):
    self.batches = batches
    self.batch_sharding = batch_sharding
    self.position = 0
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="coca-input")
    self._ahead: tuple[int, concurrent.futures.Future] | None = None
    self._closed = False

  def __iter__(self) -> "InMemoryTrainIterator":
    return self

  @property
  def sampler(self) -> GlobalOrderSampler:
    return self.batches.sampler

  def _make(self, global_batch: int) -> dict[str, jax.Array]:
    host_batch = self.batches.host_batch(global_batch, keys=False)
    return {key: jax.make_array_from_process_local_data(self._sharding(key), host_batch[key])
            for key in ("image", "text") if key in host_batch}

  def _sharding(self, key: str):
    if isinstance(self.batch_sharding, Mapping):
      return self.batch_sharding[key]
    return self.batch_sharding

  def __next__(self) -> dict[str, jax.Array]:
    if self._closed:
      raise StopIteration
    if self._ahead is not None and self._ahead[0] == self.position:
      future = self._ahead[1]
    else:
      future = self._pool.submit(self._make, self.position)
    batch = future.result()
    self.position += 1
    self._ahead = (self.position, self._pool.submit(self._make, self.position))
    return batch

  def set_position(self, global_batches: int) -> None:
    """Moves to global batch `global_batches` (0 = the first), on any number of hosts."""
    self.position = int(global_batches)

  def close(self) -> None:
    """Stops the prefetch thread; safe to call twice; the iterator yields nothing after it."""
    self._closed = True
    self._ahead = None
    self._pool.shutdown(wait=True, cancel_futures=True)


def make_train_iterator(config, batch_sharding,
                        tokenizer: Tokenizer | None = None
                        ) -> TrainIterator | InMemoryTrainIterator:
  """The training input stream of this host, as global jax.Arrays.

  Args:
    config: experiment config (fields: see module docstring).
    batch_sharding: a `jax.sharding.Sharding` for the leading (batch) axis, applied to both
      "image" [B, S, S, 3] and "text" [B, L]; or a dict {"image": ..., "text": ...}.
    tokenizer: the run's tokenizer (e.g. from `prepare.prepare_data`); default: loaded from
      config.data.tokenizer.

  Returns:
    An `InMemoryTrainIterator` or a `TrainIterator` (config.data.in_memory; the same batches
    either way); each host reads only its shard (jax.process_index()).
  """
  options = DataOptions.from_config(config)
  decoded = load_decoded(options)
  if decoded is not None:
    batches = InMemoryBatches(options, decoded, tokenizer, shard_index=jax.process_index(),
                              shard_count=jax.process_count())
    return InMemoryTrainIterator(batches, batch_sharding)
  loader = make_host_loader(options, shard_index=jax.process_index(),
                            shard_count=jax.process_count(), tokenizer=tokenizer)
  return TrainIterator(loader, batch_sharding)


@dataclasses.dataclass(frozen=True)
class EvalFeatures:
  """Which stored feature holds what an eval reads ("a/b" names a nested one, e.g.
  coco_captions' "captions/text"). The defaults are our builders' schema, and also the names
  most TFDS catalog datasets use ("image", "label")."""
  image: str = "image"
  label: str = "label"
  captions: str = "captions"


def _feature(element: Mapping[str, Any], path: str):
  """The value of feature `path` ("a/b": nested) in a decoded element; KeyError if absent."""
  value = element
  for part in path.split("/"):
    value = value[part]
  return value


class EvalSource:
  """Decoded evaluation examples (whole split, same on every host), in stored order.

  Item i: {"image": uint8 [S, S, 3] (shorter side resized to S, center crop),
           "captions": list[str] (all captions of the image; [] for a dataset without them),
           "key": str (the stored "key", else "<split>/<index>"),
           "label": int (only for datasets with labels, e.g. the demo's "digits" split or a
           TFDS catalog dataset's ClassLabel)}.
  `features` names the stored features read (`EvalFeatures`). Normalise images with
  `preprocess.normalize_images` before the model.
  """

  def __init__(self, source, image_size: int, name: str, split: str,
               features: EvalFeatures = EvalFeatures()):
    self.source = source
    self.image_size = image_size
    self.name = name
    self.split = split
    self.features = features
    info = getattr(source, "dataset_info", None)
    self._spec = info.features if info is not None else None

  def __len__(self) -> int:
    return len(self.source)

  def has_feature(self, path: str) -> bool:
    """Whether the dataset stores feature `path` (True when the source has no metadata)."""
    return self._spec is None or sources.feature_spec(self._spec, path) is not None

  @property
  def feature_names(self) -> list[str]:
    return sorted(self._spec.keys()) if self._spec is not None else []

  @property
  def class_names(self) -> list[str] | None:
    """The label feature's ClassLabel names in label order; None when it is not a ClassLabel
    (our builders store a plain integer) or absent."""
    spec = None if self._spec is None else sources.feature_spec(self._spec, self.features.label)
    return list(spec.names) if isinstance(spec, tfds.features.ClassLabel) else None

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {self.name}/{self.split} "
                       f"({len(self)} examples)")
    index %= len(self)
    element = self.source[index]
    example = {"image": self._image(_feature(element, self.features.image)),
               "captions": self._captions(element),
               "key": _to_str(element["key"]) if "key" in element else f"{self.split}/{index}"}
    try:
      example["label"] = int(_feature(element, self.features.label))
    except KeyError:
      pass
    return example

  def _image(self, value) -> np.ndarray:
    if isinstance(value, (bytes, np.bytes_)):
      return preprocess.decode_train_image(bytes(value), self.image_size, None)
    # A decoded image (an Image feature read without SkipDecoding, or a uint8 Tensor feature).
    pixels = np.asarray(value)
    if pixels.ndim == 2 or pixels.shape[-1] == 1:
      pixels = np.repeat(pixels.reshape(*pixels.shape[:2], 1), 3, axis=-1)
    return preprocess.resize_and_center_crop(Image.fromarray(pixels.astype(np.uint8)),
                                             self.image_size)

  def _captions(self, element) -> list[str]:
    try:
      value = _feature(element, self.features.captions)
    except KeyError:
      return []
    if isinstance(value, (bytes, str, np.bytes_, np.str_)):
      return [_to_str(value)]  # One Text feature: one caption.
    return [_to_str(c) for c in value]

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for index in range(len(self)):
      yield self[index]

  def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Consecutive batches (the last may be smaller): "image" uint8 [b, S, S, 3],
    "captions" list of b lists, "key" list of b, "label" int64 [b] when present."""
    total = len(self) if limit is None else min(limit, len(self))
    for start in range(0, total, batch_size):
      examples = [self[i] for i in range(start, min(start + batch_size, total))]
      batch = {"image": np.stack([e["image"] for e in examples]),
               "captions": [e["captions"] for e in examples],
               "key": [e["key"] for e in examples]}
      if "label" in examples[0]:
        batch["label"] = np.asarray([e["label"] for e in examples], np.int64)
      yield batch


def make_eval_source(config, split: str | None = None, name: str | None = None, *,
                     data_dir: str | None = None,
                     features: EvalFeatures | None = None) -> EvalSource:
  """Decoded examples of `split` (default config.data.eval_split) for evaluation.

  Uses config.data.image_size; `split` may name any prepared split (e.g. the demo's "digits")
  or a TFDS slice ("validation[:1000]"); `name` reads another dataset (default
  config.data.name): one built by `coca_jax.data.build`, or a TFDS catalog dataset prepared as
  array_record ("imagenet2012", "cifar100", "coco_captions"); `data_dir` where it is prepared
  (default config.data.data_dir); `features` which stored features hold the image, label and
  captions (default `EvalFeatures()`).
  """
  options = DataOptions.from_config(config)
  split = split or options.eval_split
  name = name or options.name
  data_dir = os.path.expanduser(data_dir) if data_dir else options.data_dir
  features = features or EvalFeatures()
  source = sources.open_source(name, data_dir, split, decode_images=False,
                                image_feature=features.image)
  spec = source.dataset_info.features
  if sources.feature_spec(spec, features.image) is None:
    raise ValueError(f"dataset {name!r} has no image feature {features.image!r} (its features: "
                     f"{', '.join(sorted(spec.keys()))}); name the image feature of the eval "
                     "(image_feature)")
  return EvalSource(source, options.image_size, name, split, features)
