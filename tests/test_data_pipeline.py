"""Pipeline spec: batch contract, exact host sharding, bitwise resume through one orbax checkpoint."""

import io
import json
import os
import socket
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from coca_jax.core import config as config_lib
from coca_jax.data import builders
from coca_jax.data import decoded_cache
from coca_jax.data import pipeline
from coca_jax.data import preprocess
from coca_jax.data import sources
from coca_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from coca_jax.training import checkpoint

NUM_TRAIN = 30
IMAGE_SIZE = 16
MAX_LEN = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A tiny demo build (30 train scenes, 24px) and a tokenizer trained on its captions."""
  root = tmp_path_factory.mktemp("pipeline")
  builder = builders.make_builder("demo", "tiny_scenes", str(root / "tfds"), num_train=NUM_TRAIN,
                                  num_test=6, num_digits=5, image_size=24, show_progress=False)
  builder.download_and_prepare()
  source = sources.open_source("tiny_scenes", str(root / "tfds"), "train", decode_images=False)
  captions = [c.decode() for i in range(len(source)) for c in source[i]["captions"]]
  Tokenizer.train(captions, str(root / "sp"), vocab_size=100, model_type="bpe")
  return root


def _config(root, batch_size=6, **data):
  """A completed config (every other field at the schema's default)."""
  return config_lib.complete(ml_collections.ConfigDict(dict(
      data=dict(name="tiny_scenes", data_dir=str(root / "tfds"), image_size=IMAGE_SIZE,
                tokenizer=str(root / "sp.model"), **data),
      model=dict(text=dict(max_len=MAX_LEN)),
      train=dict(batch_size=batch_size, seed=3))))


def _host_loader(root, shard_index=0, shard_count=1, batch_size=6, **data):
  options = pipeline.DataOptions.from_config(_config(root, batch_size, **data))
  return pipeline.make_host_loader(options, shard_index=shard_index, shard_count=shard_count)


def _batch_sharding():
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def test_batches_follow_the_contract(dataset):
  sharding = _batch_sharding()
  batch_size = 2 * jax.device_count()
  iterator = pipeline.make_train_iterator(_config(dataset, batch_size), sharding)
  batch = next(iterator)
  assert set(batch) == {"image", "text"}
  assert isinstance(batch["image"], jax.Array) and batch["image"].sharding == sharding
  assert batch["image"].shape == (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch["image"].dtype == jnp.float32
  assert batch["text"].shape == (batch_size, MAX_LEN) and batch["text"].dtype == jnp.int32
  text = np.asarray(batch["text"])
  assert (text[:, 0] == BOS_ID).all()
  for row in text:  # exactly one EOS, then only PAD
    (eos,) = np.flatnonzero(row == EOS_ID)
    assert (row[eos + 1:] == PAD_ID).all() and (row[1:eos] > EOS_ID).all()
  # Normalised pixels: within the range uint8 maps to.
  low = (0 - np.array(preprocess.IMAGE_MEAN)) / np.array(preprocess.IMAGE_STD)
  high = (1 - np.array(preprocess.IMAGE_MEAN)) / np.array(preprocess.IMAGE_STD)
  image = np.asarray(batch["image"])
  assert (image >= low - 1e-5).all() and (image <= high + 1e-5).all()


def test_without_crop_images_and_captions_equal_the_stored_example(dataset):
  loader = _host_loader(dataset, random_resized_crop=False)
  batch = next(iter(loader))
  eval_source = pipeline.make_eval_source(_config(dataset), "train")
  by_key = {eval_source[i]["key"]: eval_source[i] for i in range(len(eval_source))}
  tokenizer = Tokenizer.load(str(dataset / "sp.model"))
  for key, image, text in zip(batch["key"], batch["image"], batch["text"]):
    example = by_key[str(key)]
    np.testing.assert_array_equal(image, preprocess.normalize_images(example["image"]))
    # Same ids as tokenizing the stored caption (MAX_LEN=12 truncates 3-digit scenes).
    np.testing.assert_array_equal(text, tokenizer.tokenize(example["captions"], MAX_LEN)[0])


def _host_keys(root, host, hosts, batches, num_workers=0, start=0):
  """Keys of `batches` host batches of host `host` of `hosts`, from global batch `start`."""
  options = pipeline.DataOptions.from_config(_config(root, num_workers=num_workers))
  iterator = pipeline.TrainIterator(
      pipeline.make_host_loader(options, shard_index=host, shard_count=hosts), None)
  if start:
    iterator.set_position(start)
  return [[str(k) for k in next(iterator.grain_iterator)["key"]] for _ in range(batches)]


def test_hosts_read_their_slices_of_the_same_global_batches(dataset):
  # The global batch sequence does not depend on the number of hosts: with 2 hosts, host 0's
  # batch s followed by host 1's is the 1-host batch s (30 examples, global batch 6).
  one = _host_keys(dataset, 0, 1, 10)
  hosts = [_host_keys(dataset, h, 2, 10) for h in (0, 1)]
  assert [hosts[0][s] + hosts[1][s] for s in range(10)] == one
  # Each epoch (5 global batches) covers every example once, in a new order each epoch.
  first, second = sum(one[:5], []), sum(one[5:], [])
  assert sorted(first) == sorted(second) == sorted(f"train/{i:06d}" for i in range(NUM_TRAIN))
  assert first != second


def test_position_resumes_on_another_number_of_hosts(dataset):
  # A position (global batches consumed) written by 2 hosts resumes on 1 host, and vice versa,
  # at the same next global batch as an uninterrupted run.
  one = _host_keys(dataset, 0, 1, 7)
  resumed_on_two = [_host_keys(dataset, h, 2, 3, start=4) for h in (0, 1)]
  assert [resumed_on_two[0][s] + resumed_on_two[1][s] for s in range(3)] == one[4:]
  assert _host_keys(dataset, 0, 1, 2, start=5) == one[5:]


def test_global_order_is_independent_of_worker_processes(dataset):
  in_process = _host_keys(dataset, 1, 2, 4)
  assert _host_keys(dataset, 1, 2, 4, num_workers=2) == in_process
  assert _host_keys(dataset, 1, 2, 2, num_workers=2, start=2) == in_process[2:]


def test_state_round_trip_reproduces_the_next_batches(dataset):
  uninterrupted = iter(_host_loader(dataset))
  for _ in range(4):
    next(uninterrupted)
  state = uninterrupted.get_state()
  expected = [next(uninterrupted) for _ in range(3)]

  resumed = iter(_host_loader(dataset))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in ("image", "text", "key"):
      np.testing.assert_array_equal(got[key], want[key])


def test_close_stops_the_reading_threads(dataset):
  """Training closes its iterator when it ends: grain's prefetch threads stop then, instead of
  living on until a garbage collection (which fails when it runs on such a thread)."""
  import threading
  sharding = _batch_sharding()
  before = set(threading.enumerate())
  iterator = pipeline.make_train_iterator(_config(dataset, 2 * jax.device_count()),
                                          sharding)
  next(iterator)
  started = [t for t in threading.enumerate() if t not in before and t.is_alive()]
  assert started  # The input path reads ahead on a thread of its own.
  iterator.close()
  iterator.close()  # Twice is harmless.
  for thread in started:
    thread.join(timeout=10)
  assert not any(t.is_alive() for t in started)


def test_model_and_iterator_restore_from_one_orbax_checkpoint(dataset, tmp_path):
  sharding = _batch_sharding()
  batch_size = 2 * jax.device_count()
  config = _config(dataset, batch_size)
  train_state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.asarray(3)}

  iterator = pipeline.make_train_iterator(config, sharding)
  for _ in range(3):
    next(iterator)
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
    manager.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data=checkpoint.checkpoint_args(iterator)))
    manager.wait_until_finished()
  expected = [next(iterator) for _ in range(3)]

  fresh = pipeline.make_train_iterator(config, sharding)
  next(fresh)  # a fresh iterator that moved elsewhere must be rewound by the restore
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, train_state)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=checkpoint.checkpoint_args(fresh, restore=True)))
  np.testing.assert_array_equal(restored["state"]["params"]["w"], train_state["params"]["w"])
  for want in expected:
    got = next(fresh)
    for key in ("image", "text"):
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_each_caption_of_an_image_is_used(tmp_path):
  src = tmp_path / "photos"
  src.mkdir()
  buffer = io.BytesIO()
  Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(buffer, format="PNG")
  (src / "only.png").write_bytes(buffer.getvalue())
  captions = ["a gray square", "a flat gray picture", "nothing but gray"]
  (src / "captions.jsonl").write_text(
      "\n".join(json.dumps({"image": "only.png", "caption": c}) for c in captions))
  builder = builders.make_builder("folder", "one_image", str(tmp_path / "tfds"), src=str(src),
                                  show_progress=False)
  builder.download_and_prepare()
  Tokenizer.train(captions * 10, str(tmp_path / "sp"), vocab_size=40, model_type="bpe")
  config = _config(tmp_path, batch_size=1)
  config.data.update(name="one_image", data_dir=str(tmp_path / "tfds"),
                     tokenizer=str(tmp_path / "sp.model"))
  options = pipeline.DataOptions.from_config(config)
  tokenizer = Tokenizer.load(str(tmp_path / "sp.model"))
  iterator = iter(pipeline.make_host_loader(options, shard_index=0, shard_count=1))
  seen = {tokenizer.decode(next(iterator)["text"][0]) for _ in range(30)}
  assert seen == set(captions)


def test_eval_source_gives_uint8_images_captions_and_labels(dataset):
  config = _config(dataset)
  test = pipeline.make_eval_source(config)  # config.data.eval_split defaults to "test"
  assert len(test) == 6
  batches = list(test.batches(4))
  assert [b["image"].shape for b in batches] == [(4, IMAGE_SIZE, IMAGE_SIZE, 3),
                                                 (2, IMAGE_SIZE, IMAGE_SIZE, 3)]
  assert batches[0]["image"].dtype == np.uint8
  assert all(isinstance(c, list) and c and isinstance(c[0], str) for c in batches[0]["captions"])
  np.testing.assert_array_equal(test[1]["image"], batches[0]["image"][1])
  digits = pipeline.make_eval_source(config, "digits")
  labels = next(digits.batches(5))["label"]
  assert labels.shape == (5,) and ((labels >= 0) & (labels <= 9)).all()
  for example in digits:
    assert str(example["label"]) in example["captions"][0]


def test_config_errors_name_the_field(dataset):
  with pytest.raises(ValueError, match="config.train.batch_size=7"):
    _host_loader(dataset, shard_index=0, shard_count=2, batch_size=7)
  with pytest.raises(ValueError, match="config.data.crop_scale"):
    _host_loader(dataset, crop_scale=(0.5, 1.5))
  bad = _config(dataset)
  del bad.data["name"]
  with pytest.raises(ValueError, match="config.data.name"):
    pipeline.DataOptions.from_config(bad)


def test_worker_processes_resume_exactly(dataset):
  # Grain worker processes (spawned) must give the same resumable stream as in-process decoding
  # gives for itself: restore with the same num_workers reproduces the next batches.
  uninterrupted = iter(_host_loader(dataset, num_workers=2))
  for _ in range(3):
    next(uninterrupted)
  state = uninterrupted.get_state()
  expected = [next(uninterrupted) for _ in range(2)]
  resumed = iter(_host_loader(dataset, num_workers=2))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["text"], want["text"])
  with pytest.raises(ValueError, match="[Ww]orker count"):
    iter(_host_loader(dataset, num_workers=0)).set_state(state)


# ---- In-memory path: the streaming path's batches, bit for bit ---------------------------------

# Sizes with a shorter side below 2 x IMAGE_SIZE (no reduced-scale JPEG decode), one caption to
# three per image: the layout of varied sizes, the caption draw and the crop draw are all used.
JPEG_SIZES = ((20, 14), (24, 24), (31, 18), (17, 29), (26, 22), (18, 18), (30, 25))


@pytest.fixture(scope="module")
def jpeg_dataset(tmp_path_factory):
  """7 JPEGs of varied sizes with 1-3 captions each (folder build), and a tokenizer."""
  root = tmp_path_factory.mktemp("jpegs")
  src = root / "src"
  src.mkdir()
  rng = np.random.default_rng(1)
  rows, captions = [], []
  for index, (width, height) in enumerate(JPEG_SIZES):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(
        buffer, format="JPEG", quality=85)
    (src / f"{index}.jpg").write_bytes(buffer.getvalue())
    for c in range(1 + index % 3):
      captions.append(f"picture {index} take {c}")
      rows.append(json.dumps({"image": f"{index}.jpg", "caption": captions[-1]}))
  (src / "captions.jsonl").write_text("\n".join(rows))
  builders.make_builder("folder", "jpegs", str(root / "tfds"), src=str(src),
                        show_progress=False).download_and_prepare()
  Tokenizer.train(captions * 5, str(root / "sp"), vocab_size=40, model_type="bpe")
  return root


def _jpeg_config(root, batch_size=4, **data):
  config = _config(root, batch_size, **data)
  config.data.update(name="jpegs", data_dir=str(root / "tfds"), tokenizer=str(root / "sp.model"))
  return config


def _assert_same(got, want, what):
  assert set(got) == set(want), what
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]),
                                  err_msg=f"{what}: {key}")


@pytest.mark.parametrize("which", ["scenes, random crop", "scenes, center crop",
                                   "varied JPEGs, random crop"])
def test_in_memory_batches_equal_streaming_bit_for_bit(dataset, jpeg_dataset, which):
  # Both hosts of 2, across epoch boundaries: the same images, tokens and keys as the
  # streaming loader gives for the same seed and position.
  if which.startswith("scenes"):
    config = _config(dataset, random_resized_crop=which.endswith("random crop"))
  else:
    config = _jpeg_config(jpeg_dataset)
  options = pipeline.DataOptions.from_config(config)
  decoded = pipeline.load_decoded(options)
  assert decoded is not None and decoded.path  # cached next to the dataset
  for host in (0, 1):
    streaming = iter(pipeline.make_host_loader(options, shard_index=host, shard_count=2))
    in_memory = pipeline.InMemoryBatches(options, decoded, shard_index=host, shard_count=2)
    for n in range(8):
      _assert_same(in_memory.host_batch(n), next(streaming), f"{which}, host {host}, batch {n}")


def test_in_memory_iterator_resumes_like_the_streaming_one(dataset, jpeg_dataset):
  # The prefetching iterator gives the streaming iterator's global batches, also after
  # set_position (a restore) while a batch for another position is already prepared, and
  # on another number of hosts.
  sharding = _batch_sharding()
  config = _jpeg_config(jpeg_dataset, batch_size=2 * jax.device_count())
  options = pipeline.DataOptions.from_config(config)
  in_memory = pipeline.make_train_iterator(config, sharding)
  assert isinstance(in_memory, pipeline.InMemoryTrainIterator)
  streaming = pipeline.TrainIterator(
      pipeline.make_host_loader(options, shard_index=0, shard_count=1), sharding)
  for n in range(3):
    _assert_same(next(in_memory), next(streaming), f"batch {n}")
  for position in (7, 1):
    in_memory.set_position(position)
    streaming.set_position(position)
    for n in range(2):
      _assert_same(next(in_memory), next(streaming), f"after set_position({position}), {n}")
  assert in_memory.position == streaming.position == 3
  in_memory.close()
  in_memory.close()
  with pytest.raises(StopIteration):
    next(in_memory)


def test_size_rule_streams_a_split_over_the_budget(dataset, jpeg_dataset):
  sharding = _batch_sharding()
  batch_size = 2 * jax.device_count()

  def path(config):
    iterator = pipeline.make_train_iterator(config, sharding)
    iterator.close()
    return type(iterator).__name__

  # 30 decoded 16-px images are 23,040 bytes: over a 0.01 MiB budget, within the default.
  assert path(_config(dataset, batch_size)) == "InMemoryTrainIterator"
  assert path(_config(dataset, batch_size, in_memory_max_mb=0.01)) == "TrainIterator"
  assert path(_config(dataset, batch_size, in_memory_max_mb=0.01,
                      in_memory="always")) == "InMemoryTrainIterator"
  assert path(_config(dataset, batch_size, in_memory="never")) == "TrainIterator"
  budget = pipeline.in_memory_budget(
      pipeline.DataOptions.from_config(_config(dataset, in_memory_max_mb=1e9)))
  assert budget <= pipeline.IN_MEMORY_RAM_FRACTION * (
      os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  # Random crops of JPEGs at least twice the output size are decoded at reduced scale by the
  # streaming path: a decoded copy cannot give the same pixels, so "auto" streams them.
  small_output = _jpeg_config(jpeg_dataset, batch_size)
  small_output.data.image_size = 6
  assert path(small_output) == "TrainIterator"
  small_output.data.in_memory = "always"
  with pytest.raises(ValueError, match="config.data.in_memory='always'"):
    path(small_output)
  with pytest.raises(ValueError, match="config.data.in_memory="):
    pipeline.DataOptions.from_config(_config(dataset, in_memory="yes"))


def test_decoded_cache_is_reused_and_never_stale(tmp_path, monkeypatch):
  def build(data_dir, seed):
    builders.make_builder("demo", "scenes", str(tmp_path / data_dir), num_train=8, num_test=2,
                          num_digits=2, image_size=16, seed=seed,
                          show_progress=False).download_and_prepare()
    return tmp_path / data_dir / "scenes" / builders.VERSION

  first, second = build("first", 0), build("second", 1)
  source = sources.open_source("scenes", str(tmp_path / "second"), "train",
                                decode_images=False)
  Tokenizer.train([c.decode() for i in range(len(source)) for c in source[i]["captions"]],
                  str(tmp_path / "sp"), vocab_size=60, model_type="bpe")
  config = _config(tmp_path, batch_size=4, random_resized_crop=False)
  config.data.update(name="scenes", data_dir=str(tmp_path / "first"),
                     tokenizer=str(tmp_path / "sp.model"))
  options = pipeline.DataOptions.from_config(config)
  cached = pipeline.load_decoded(options)

  def no_decoding(*args, **kwargs):
    raise AssertionError("decoded again although a valid cache exists")

  with monkeypatch.context() as patch:  # A second run maps the cache and decodes nothing.
    patch.setattr(decoded_cache, "_build", no_decoding)
    assert pipeline.load_decoded(options).path == cached.path

  # The dataset changes in place (its files replaced by another build's): the old cache is not
  # used, the new one decodes the new content and the old one is removed.
  old_first = pipeline.InMemoryBatches(options, cached).host_batch(0)
  # A build killed half way left its temporary directory behind.
  finished = subprocess.Popen(["true"])
  finished.wait()
  leftover = os.path.join(os.path.dirname(cached.path),
                          f".tmp-{socket.gethostname()}-{finished.pid}-0")
  os.makedirs(leftover)
  for file in second.iterdir():
    if file.is_file():
      (first / file.name).write_bytes(file.read_bytes())
  fresh = pipeline.load_decoded(options)
  assert fresh.path != cached.path and not os.path.exists(cached.path)
  assert not os.path.exists(leftover)
  streaming = next(iter(pipeline.make_host_loader(options, shard_index=0, shard_count=1)))
  _assert_same(pipeline.InMemoryBatches(options, fresh).host_batch(0), streaming, "batch 0")
  assert (old_first["image"] != streaming["image"]).any()  # The content did change.
