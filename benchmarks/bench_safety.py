r"""Step-time cost of the safety machinery on the demo model (experiments/demo.py).

  python benchmarks/bench_safety.py [--reps 8] [--steps 10] [--ckpt_every 50]

Times blocks of `--steps` train steps on a fixed batch (no input pipeline). Each repetition
runs one block of every variant back to back (the order rotating), and each variant is compared
with the `unguarded` block of the same repetition, so slow swings of a shared machine's load
cancel out; the figure is the median of those paired ratios.
  unguarded   the train step without the non-finite check (the check patched out)
  halt        the default: the step's finite flag (loss, gradient norm, and an isfinite
              reduction over the updated parameters and optimizer state) + the loop's
              on-device counters
  skip        the flag, the counters, and the state kept when the flag is set (a select)
  halt+save   halt, plus one asynchronous orbax checkpoint at the block's first step; the block
              waits for the write to finish, so the whole cost of the save is inside it. Its
              extra time over the paired `halt` block, spread over `--ckpt_every` steps, is the
              overhead of checkpointing every `--ckpt_every` steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from coca_jax import train as train_lib  # noqa: E402
from coca_jax.core import config as config_lib  # noqa: E402
from coca_jax.training import checkpoint  # noqa: E402
from coca_jax.training import step as step_lib  # noqa: E402


def _random_batch(config):
  import numpy as np
  rng = np.random.default_rng(0)
  b, size, length = config.train.batch_size, config.model.image_size, config.model.text.max_len
  text = rng.integers(4, config.model.text.vocab_size, (b, length)).astype("int32")
  text[:, 0], text[:, -1] = 2, 3
  image = rng.standard_normal((b, size, size, 3)).astype("float32")
  return {"image": jax.numpy.asarray(image), "text": jax.numpy.asarray(text)}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default=os.path.join(REPO, "experiments", "demo.py"))
  parser.add_argument("--reps", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--ckpt_every", type=int, default=50)
  args = parser.parse_args()

  config = config_lib.load_config(args.config)
  built = step_lib.setup(config)
  batch = _random_batch(config)
  steps = {}
  guard = step_lib.guard_nonfinite
  for name, policy in (("unguarded", "halt"), ("halt", "halt"), ("skip", "skip")):
    config.train.nonfinite = policy
    step_lib.guard_nonfinite = (
        (lambda old, new, metrics, policy: (new, {**metrics, "nonfinite": jax.numpy.int32(0)}))
        if name == "unguarded" else guard)
    steps[name] = built.train_step().lower(
        built.abstract_state, step_lib.dummy_batch(config, config.train.batch_size)).compile()
  step_lib.guard_nonfinite = guard

  state = built.init_state()
  workdir = tempfile.mkdtemp()
  manager = checkpoint.make_manager(workdir, keep=2, async_save=True)
  variants = ["unguarded", "halt", "skip", "halt+save"]
  times = {v: [] for v in variants}
  cpu = {v: [] for v in variants}  # process CPU time (all threads): less sensitive to load
  saved = 0
  with jax.set_mesh(built.mesh):
    for name in ("unguarded", "halt", "skip"):  # warm-up
      state, metrics = steps[name](state, batch)
    jax.block_until_ready(state)
    for rep in range(args.reps):
      for variant in variants[rep % 4:] + variants[:rep % 4]:
        compiled = steps["halt" if variant == "halt+save" else variant]
        watch = None if variant == "unguarded" else train_lib.NonFiniteWatch(
            "halt", 10, built.mesh)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(args.steps):
          state, metrics = compiled(state, batch)
          if watch is not None:
            watch.observe(metrics, i)
          if variant == "halt+save" and i == 0:
            watch.check()
            saved += 1
            checkpoint.save(manager, saved, state, force=True)
        jax.block_until_ready((state, metrics))
        if watch is not None:
          watch.check()
        manager.wait_until_finished()
        times[variant].append(time.perf_counter() - t0)
        cpu[variant].append(time.process_time() - c0)
  manager.close()

  step_time = statistics.median(times["unguarded"]) / args.steps
  print(f"{jax.devices()[0].platform}, {jax.device_count()} device(s), batch "
        f"{config.train.batch_size}, {args.reps} repetitions of {args.steps}-step blocks; "
        f"unguarded median {step_time * 1e3:.0f} ms/step")
  for variant in ("halt", "skip"):
    ratios = [t / b for t, b in zip(times[variant], times["unguarded"])]
    print(f"{variant:>10}: step time {100 * (statistics.median(ratios) - 1):+.1f}% vs unguarded "
          f"(median of paired ratios; range {100 * (min(ratios) - 1):+.0f}% .. "
          f"{100 * (max(ratios) - 1):+.0f}%)")
  for variant in ("halt", "skip"):
    ratios = [t / b for t, b in zip(cpu[variant], cpu["unguarded"])]
    print(f"{variant:>10}: CPU time  {100 * (statistics.median(ratios) - 1):+.1f}% vs unguarded "
          f"(median of paired ratios; range {100 * (min(ratios) - 1):+.0f}% .. "
          f"{100 * (max(ratios) - 1):+.0f}%)")
  cpu_step = statistics.median(cpu["unguarded"]) / args.steps
  cpu_save = statistics.median([t - b for t, b in zip(cpu["halt+save"], cpu["halt"])])
  print(f"async save CPU time: {cpu_save * 1e3:+.0f} ms per save; every {args.ckpt_every} steps: "
        f"{100 * cpu_save / (args.ckpt_every * cpu_step):+.1f}% of step CPU time")
  extra = [t - b for t, b in zip(times["halt+save"], times["halt"])]
  per_save = statistics.median(extra)
  print(f"async save: {per_save * 1e3:+.0f} ms per save (median of paired differences); every "
        f"{args.ckpt_every} steps: {100 * per_save / (args.ckpt_every * step_time):+.1f}% "
        "of step time")


if __name__ == "__main__":
  main()
