"""Input pipeline throughput vs what the demo model's train step consumes (a script, not a test).

  python benchmarks/bench_data.py                      # full run, a few minutes on 2 cores
  python benchmarks/bench_data.py --num_images 128 --seconds 3   # quicker
  python benchmarks/bench_data.py --only paths --demo_data_dir DIR   # the two input paths only

Measures, on this machine:
  1. pipeline images/sec at 224 px: img2dataset-like JPEGs (320x256, q90) written as webdataset
     shards, built with our builder, read through `make_host_loader` (decode, random-resized-
     crop, normalise, tokenize), with num_workers 0 (in-process) and 2;
  2. pipeline images/sec at the demo model's resolution on the demo digit scenes;
  3. the demo model's train step (experiments/demo.py) on a fixed batch: images/sec consumed;
  4. the same train step fed by the real pipeline (num_workers 0 and 2): images/sec end to end.
The pipeline is not the bottleneck when (4) is close to (3).
  5. ("paths") the streaming and the in-memory input path (config.data.in_memory never / auto)
     side by side, alternating rounds, medians: examples/s of each alone (one thread, the
     224-px JPEG set with random crops and the demo's own split and settings), and the
     data_wait_fraction the train loop logs in metrics.jsonl during a short run of
     `python -m coca_jax.train --config experiments/demo.py` (evals and checkpoints off).
     --demo_data_dir reuses a data_dir where the full demo set is built (else it is built,
     ~1.5 min on 2 cores). --mixture adds `demo.py:mixture` (two sources mixed per batch,
     in memory) as a third training path.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
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
  import dataclasses
  import jax
  from coca_jax.core import sharding
  from coca_jax.data import pipeline
  from coca_jax.training import optim
  from coca_jax.training import step

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
  options = next(iter(data_options_by_workers.values()))
  decoded = pipeline.load_decoded(dataclasses.replace(options, in_memory="always"))
  iterator = pipeline.InMemoryTrainIterator(pipeline.InMemoryBatches(options, decoded), where)
  rates["pipeline, in memory"] = run(lambda it=iterator: next(it))
  iterator.close()
  return rates


def _alternating(rates: dict, rounds: int) -> dict[str, list[float]]:
  """Calls each of `rates` (label -> no-argument function giving a figure) in turn, `rounds`
  times: on a shared machine the paths then see the same load."""
  results = {label: [] for label in rates}
  for _ in range(rounds):
    for label, rate in rates.items():
      results[label].append(rate())
  return results


def _path_rates(options, seconds: float, rounds: int) -> dict[str, list[float]]:
  """Examples/sec of each input path alone, on one thread: the streaming loader, and the
  in-memory batches (decoded cache built first, outside the timing)."""
  import dataclasses
  from coca_jax.data import pipeline

  decoded = pipeline.load_decoded(dataclasses.replace(options, in_memory="always"))
  in_memory = pipeline.InMemoryBatches(options, decoded)
  streaming = iter(pipeline.make_host_loader(options, shard_index=0, shard_count=1))
  position = {"n": 0}

  def time_it(next_batch):
    next_batch()  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      count += next_batch()["image"].shape[0]
    return count / (time.perf_counter() - start)

  def next_in_memory():
    position["n"] += 1
    return in_memory.host_batch(position["n"], keys=False)

  return _alternating({"streaming": lambda: time_it(lambda: next(streaming)),
                       "in-memory": lambda: time_it(next_in_memory)}, rounds)


def _train_data_wait(data_dir: str, workdir: str, steps: int, in_memory: str,
                     arg: str = "", flags: tuple[str, ...] = ()) -> dict:
  """A short demo training run (experiments/demo.py:`arg`, evals and checkpoints off) on one
  input path: the data_wait_fraction and step_seconds of each logged window but the first
  (warm-up)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  log_every = max(steps // 4, 1)
  config = os.path.join(repo, "experiments", "demo.py") + (f":{arg}" if arg else "")
  args = [sys.executable, "-m", "coca_jax.train", "--config", config, "--workdir", workdir,
          f"--config.train.steps={steps}", f"--config.train.log_every={log_every}",
          f"--config.data.data_dir={data_dir}", f"--config.data.in_memory={in_memory}",
          "--config.checkpoint.every_steps=0", "--config.evals.zeroshot.enabled=False",
          "--config.evals.retrieval.enabled=False", "--config.evals.captioning.enabled=False",
          *flags]
  start = time.perf_counter()
  done = subprocess.run(args, cwd=repo, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [r for r in map(json.loads, f) if "data_wait_fraction" in r][1:]
  return {"data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in records),
          "step_seconds": statistics.median(r["step_seconds"] for r in records), "wall": wall}


def _paths(args, workdir: str, photo_options) -> None:
  """Section 5 (module docstring): both input paths side by side."""
  import dataclasses
  from coca_jax.data import builders, pipeline, sources
  from coca_jax.data.tokenizer import Tokenizer

  print("\ninput paths, alternating rounds (median of the rounds):")
  if photo_options is not None:
    rates = _path_rates(photo_options, args.seconds, args.rounds)
    print(f"  224 px JPEGs, random crop, batch {photo_options.global_batch_size}: " + ", ".join(
        f"{label} {statistics.median(r):8.1f} examples/s" for label, r in rates.items()))

  demo = _load_demo_config("")
  data_dir = args.demo_data_dir or os.path.join(workdir, "demo_tfds")
  name = demo.data.name
  if not builders.is_built(name, data_dir):
    start = time.perf_counter()
    builders.build_atomically("demo", name, data_dir, **dict(demo.data.build_demo_options))
    print(f"  built the demo set in {time.perf_counter() - start:.0f}s")
  source = sources.open_source(name, data_dir, demo.data.train_split, decode_images=False)
  sp = os.path.join(workdir, "paths_sp")
  Tokenizer.train([c.decode() for i in range(len(source)) for c in source[i]["captions"]], sp,
                  vocab_size=demo.data.tokenizer_vocab, model_type=demo.data.tokenizer_type)
  demo.data.update(data_dir=data_dir, tokenizer=sp + ".model")
  options = pipeline.DataOptions.from_config(demo)
  start = time.perf_counter()
  decoded = pipeline.load_decoded(dataclasses.replace(options, in_memory="always"))
  print(f"  demo train split: {len(source)} examples, {decoded.nbytes / 2**20:.0f} MiB decoded "
        f"(cache ready in {time.perf_counter() - start:.1f}s: {decoded.path})")
  rates = _path_rates(options, args.seconds, args.rounds)
  print(f"  demo input alone ({options.image_size} px, batch {options.global_batch_size}, "
        f"random_resized_crop={options.random_resized_crop}): " + ", ".join(
            f"{label} {statistics.median(r):8.1f} examples/s" for label, r in rates.items()))
  if not args.train_steps:
    return
  paths = [("streaming", "never", "", data_dir), ("in-memory", "auto", "", data_dir)]
  if args.mixture:
    # demo.py:mixture: the scenes + labelled digits as text; its data set has one more split,
    # so it is built (by the first run) into a directory of its own.
    paths.append(("mixture", "auto", "mixture", os.path.join(workdir, "mixture_tfds")))
  runs = _alternating({
      label: (lambda mode=mode, label=label, arg=arg, where=where: _train_data_wait(
          where, tempfile.mkdtemp(prefix=f"bench_{label}_", dir=workdir), args.train_steps,
          mode, arg, tuple(args.train_flags.split())))
      for label, mode, arg, where in paths}, args.rounds)
  print(f"  demo training, {args.train_steps} steps per run, {args.rounds} runs per path "
        "(data_wait_fraction and step time: medians over each run's logged windows, then over "
        "runs):")
  for label, results in runs.items():
    waits = [r["data_wait_fraction"] for r in results]
    print(f"    {label:10s} data_wait_fraction {statistics.median(waits):.3f} "
          f"(runs: {', '.join(f'{w:.3f}' for w in waits)}), step "
          f"{statistics.median(r['step_seconds'] for r in results):.3f} s, run wall "
          f"{statistics.median(r['wall'] for r in results):.0f} s")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default=None, help="where to build (default: a temp dir)")
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=64, help="224px pipeline batch")
  parser.add_argument("--seconds", type=float, default=6.0, help="timing window per figure")
  parser.add_argument("--workers", default="0,2")
  parser.add_argument("--only", choices=("all", "paths"), default="all",
                      help="paths: only section 5 (the two input paths side by side)")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per path")
  parser.add_argument("--mixture", action="store_true",
                      help="paths: also train demo.py:mixture (two sources, in memory)")
  parser.add_argument("--train_steps", type=int, default=80,
                      help="steps of each demo training run in section 5 (0 = none)")
  parser.add_argument("--train_flags", default="",
                      help="more flags for every demo training run of section 5, e.g. "
                           "'--train_flags=--config.model.text.max_len=24' (space-separated)")
  parser.add_argument("--demo_data_dir", default="",
                      help="a data_dir holding the full demo set (else built into workdir)")
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]

  import dataclasses
  import jax
  import tensorflow_datasets as tfds
  from coca_jax.data import builders, pipeline, sources
  from coca_jax.data.tokenizer import Tokenizer
  tfds.disable_progress_bar()

  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
  data_dir = os.path.join(workdir, "tfds")
  print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores, devices: {jax.devices()}")
  print(f"workdir {workdir}")

  if args.only == "paths":
    _paths(args, workdir, None)
    return

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
      image_size=224, tokenizer=os.path.join(workdir, "photos_sp.model"),
      tokenizer_kind="sentencepiece", num_workers=0,
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
  source = sources.open_source("bench_digit_scenes", data_dir, "train", decode_images=False)
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

  _paths(args, workdir, dataclasses.replace(base, random_resized_crop=True))


if __name__ == "__main__":
  main()
