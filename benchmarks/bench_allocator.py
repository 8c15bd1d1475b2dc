r"""Train-step time, kernel time and page faults with the system allocator vs mimalloc.

  python benchmarks/bench_allocator.py [--config experiments/demo.py] [--rounds 3] [--steps 8]

Each round runs one child process per allocator, alternating (so both see the same machine
load), each timing `--steps` train steps after two warm-up steps on a synthetic batch, and
reading its own page-fault and CPU-time counters around the timed steps. Prints one JSON object
per child and a summary with medians over rounds and the ratios (system / mimalloc).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(config_spec: str, steps: int) -> dict:
  import jax
  from coca_jax import bench
  from coca_jax.core import config as config_lib
  from coca_jax.training import step
  config = config_lib.load_config(config_spec)
  built = step.setup(config)
  train_step = built.train_step()
  with jax.set_mesh(built.mesh):
    state = built.init_state(seed=0)
    batch = bench._synthetic_batch(config, built.mesh)  # pylint: disable=protected-access
    for _ in range(2):
      state, metrics = train_step(state, batch)
      jax.block_until_ready(metrics)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = train_step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
  maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
  return {
      "allocator": "mimalloc" if "libmimalloc" in maps else "system",
      "step_seconds": statistics.median(times),
      "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
      "kernel_seconds_per_step": (after.ru_stime - before.ru_stime) / steps,
      "user_seconds_per_step": (after.ru_utime - before.ru_utime) / steps,
      "peak_rss_gb": after.ru_maxrss / 2**20,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(REPO, "experiments", "demo.py"))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.config, args.steps)))
    return
  from coca_jax.core import runtime
  runs = {"system": [], "mimalloc": []}
  for _ in range(args.rounds):
    for allocator in runs:
      env = {**os.environ, runtime.ENV_CHOICE: allocator, "PYTHONPATH": REPO}
      env.pop("LD_PRELOAD", None)
      cmd = [sys.executable, os.path.abspath(__file__), "--child", "--config", args.config,
             "--steps", str(args.steps)]
      if allocator == "mimalloc":  # The same re-exec the CLIs do, done up front here.
        env["LD_PRELOAD"] = runtime.mimalloc_library()
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
      result = json.loads(out.stdout.strip().splitlines()[-1])
      print(json.dumps(result), flush=True)
      runs[allocator].append(result)
  summary = {}
  for allocator, results in runs.items():
    summary[allocator] = {key: statistics.median(r[key] for r in results)
                          for key in results[0] if key != "allocator"}
  s, m = summary["system"], summary["mimalloc"]
  summary["step_time_ratio_system_over_mimalloc"] = s["step_seconds"] / m["step_seconds"]
  summary["fault_ratio_system_over_mimalloc"] = (
      s["minor_faults_per_step"] / max(m["minor_faults_per_step"], 1.0))
  summary["cpu_time_ratio_system_over_mimalloc"] = (
      (s["kernel_seconds_per_step"] + s["user_seconds_per_step"])
      / (m["kernel_seconds_per_step"] + m["user_seconds_per_step"]))
  print(json.dumps({"config": args.config, "rounds": args.rounds, "steps": args.steps,
                    **summary}, indent=2))


if __name__ == "__main__":
  main()
