"""Input pipeline throughput vs what the demo model's train step consumes (a script, not a test).

  python benchmarks/bench_data.py                      # full run, a few minutes on 2 cores
  python benchmarks/bench_data.py --num_images 128 --seconds 3   # quicker

Measures, on this machine:
  1. pipeline images/sec at 224 px: img2dataset-like JPEGs (320x256, q90) written as webdataset
     shards, built with our builder, read through `make_host_loader` (decode, random-resized-
     crop, normalise, tokenize), with num_workers 0 (in-process) and 2;
  2. pipeline images/sec at the demo model's resolution on the demo digit scenes;
  3. the demo model's train step (experiments/demo.py) on a fixed batch: images/sec consumed;
  4. the same train step fed by the real pipeline (num_workers 0 and 2): images/sec end to end.
The pipeline is not the bottleneck when (4) is close to (3).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("a", "photo", "of", "red", "blue", "dog", "cat", "on", "the", "beach", "in", "snow",
         "two", "people", "walking", "near", "old", "building", "with", "small", "boat")


def _natural_like_jpeg(rng: np.random.Generator, width=320, height=256) -> bytes:
  """Smooth colour fields plus noise: compresses like a photo, unlike uniform noise."""
  low = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3)).astype(np.uint8)
  image = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
  pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def _write_shards(folder: str, num_images: int, per_shard: int = 64) -> list[str]:
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  captions = []
  for shard in range(0, num_images, per_shard):
    with tarfile.open(os.path.join(folder, f"{shard // per_shard:06d}.tar"), "w") as tar:
      for index in range(shard, min(shard + per_shard, num_images)):
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 15))))
        captions.append(caption)
        for ext, data in (("jpg", _natural_like_jpeg(rng)), ("txt", caption.encode())):
          info = tarfile.TarInfo(f"{index:09d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return captions


def _pipeline_rate(options, seconds: float) -> float:
  """Images/sec of one host's loader after a short warm-up."""
  from coca_jax.data import pipeline
  iterator = iter(pipeline.make_host_loader(options, shard_index=0, shard_count=1))
  for _ in range(2):
    next(iterator)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    count += next(iterator)["image"].shape[0]
  rate = count / (time.perf_counter() - start)
  del iterator
  return rate


def _load_demo_config(arg: str):
  """experiments/demo.py[:arg], completed with every default (what the CLIs load)."""
  from coca_jax.core import config as config_lib
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "demo.py")
  return config_lib.load_config(f"{path}:{arg}" if arg else path)


def _train_rates(config, seconds: float, data_options_by_workers) -> dict[str, float]:
  """Images/sec of the demo train step on a fixed batch, then fed by the pipeline."""
  import jax
  from coca_jax.training import optim
  from coca_jax.core import sharding
  from coca_jax.training import step
  from coca_jax.data import pipeline

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config)
  model = step.build_model(config)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  _, shardings = step.state_shardings(model, tx, config, mesh, rules)
  state = step.make_init_fn(model, tx, config, shardings)(jax.random.key(0))
  train_step = step.make_train_step(model, tx, config, schedule, mesh, shardings, rules)
  batch_size = config.train.batch_size

  def run(next_batch):
    nonlocal state
    for _ in range(2):  # compile + warm-up
      state, metrics = train_step(state, next_batch())
    jax.block_until_ready(metrics)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      state, metrics = train_step(state, next_batch())
      # Read back one step late, as a train loop would: the host keeps feeding.
      count += batch_size
    jax.block_until_ready(metrics)
    return count / (time.perf_counter() - start)

  rng = np.random.default_rng(0)
  size, max_len = config.model.image_size, config.model.text.max_len
  where = step.batch_shardings(mesh)
  fixed = {"image": jax.device_put(rng.standard_normal((batch_size, size, size, 3), np.float32),
                                   where["image"]),
           "text": jax.device_put(rng.integers(4, 60, (batch_size, max_len)).astype(np.int32),
                                  where["text"])}
  rates = {"fixed batch": run(lambda: fixed)}
  for workers, options in data_options_by_workers.items():
    loader = pipeline.make_host_loader(options, shard_index=0, shard_count=1)
    iterator = pipeline.TrainIterator(loader, where)
    rates[f"pipeline, num_workers={workers}"] = run(lambda it=iterator: next(it))
    del iterator
  return rates


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default=None, help="where to build (default: a temp dir)")
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=64, help="224px pipeline batch")
  parser.add_argument("--seconds", type=float, default=6.0, help="timing window per figure")
  parser.add_argument("--workers", default="0,2")
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]

  import dataclasses
  import jax
  import tensorflow_datasets as tfds
  from coca_jax.data import builders, pipeline
  from coca_jax.data.tokenizer import Tokenizer
  tfds.disable_progress_bar()

  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
  data_dir = os.path.join(workdir, "tfds")
  print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores, devices: {jax.devices()}")
  print(f"workdir {workdir}")

  # --- 224 px photo-like set -------------------------------------------------------------
  captions = _write_shards(os.path.join(workdir, "shards"), args.num_images)
  start = time.perf_counter()
  builder = builders.make_builder("webdataset", "bench_photos", data_dir,
                                  src=os.path.join(workdir, "shards"), show_progress=False)
  builder.download_and_prepare()
  print(f"built {builder.report['train'].written} JPEGs (320x256) in "
        f"{time.perf_counter() - start:.1f}s")
  Tokenizer.train(captions, os.path.join(workdir, "photos_sp"), vocab_size=64, model_type="bpe")

  demo = _load_demo_config("")
  base = pipeline.DataOptions(
      name="bench_photos", data_dir=data_dir, train_split="train", eval_split="train",
      image_size=224, tokenizer=os.path.join(workdir, "photos_sp.model"), num_workers=0,
      worker_buffer_size=2, random_resized_crop=True, crop_scale=(0.9, 1.0),
      crop_ratio=(3 / 4, 4 / 3), max_len=demo.model.text.max_len,
      global_batch_size=args.batch_size, seed=0)
  print("\n224 px pipeline (decode JPEG + random-resized-crop + normalise + tokenize):")
  for w in workers:
    for crop in (True, False):
      rate = _pipeline_rate(dataclasses.replace(base, num_workers=w, random_resized_crop=crop),
                            args.seconds)
      print(f"  num_workers={w} {'random crop' if crop else 'resize+center crop'}: "
            f"{rate:8.1f} images/sec")

  # --- demo model: its own resolution -------------------------------------------------------
  size = demo.model.image_size
  builder = builders.make_builder("demo", "bench_digit_scenes", data_dir, num_train=2048,
                                  num_test=0, num_digits=0, image_size=size, show_progress=False)
  builder.download_and_prepare()
  source = builders.open_source("bench_digit_scenes", data_dir, "train", decode_images=False)
  Tokenizer.train([c.decode() for i in range(len(source)) for c in source[i]["captions"]],
                  os.path.join(workdir, "demo_sp"), vocab_size=demo.model.text.vocab_size,
                  model_type="bpe")
  demo_options = dataclasses.replace(
      base, name="bench_digit_scenes", image_size=size,
      tokenizer=os.path.join(workdir, "demo_sp.model"), global_batch_size=demo.train.batch_size)
  print(f"\ndemo pipeline at {size} px (batch {demo.train.batch_size}):")
  for w in workers:
    rate = _pipeline_rate(dataclasses.replace(demo_options, num_workers=w), args.seconds)
    print(f"  num_workers={w}: {rate:8.1f} images/sec")

  print(f"\ndemo train step (experiments/demo.py, {size} px, batch {demo.train.batch_size}):")
  rates = _train_rates(demo, args.seconds, {
      w: dataclasses.replace(demo_options, num_workers=w) for w in workers})
  for label, rate in rates.items():
    print(f"  {label:28s}: {rate:8.1f} images/sec")


if __name__ == "__main__":
  main()
