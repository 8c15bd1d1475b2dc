r"""Train-step time, parameters (total / active) and model FLOPs of each model family and routing
mode of the demo, side by side in one process.

  python benchmarks/bench_routing.py [--rounds 5] [--steps 3] [--specs "demo.py;demo.py:limoe;..."]

Every spec's train step is compiled first; then each round times `--steps` steps of every spec in
turn on a synthetic batch (so all see the same machine load). Prints one JSON line per spec with
the median step time over rounds, its ratio to the first spec's median (the dense demo by
default), the median over rounds of the per-round ratio, and for routed specs the share of
image-token choices over capacity (`image_dropped`, mean over the image-side routers, from the
last timed step's metrics: the routers as the synthetic steps left them).

A spec may end in '@' and comma-separated changes of the image side's experts:
`image_capacity=F` (capacity factor), `image_priority=position|batch`, `image_group=G`
(BPR group size), e.g. `demo.py:limoe@image_priority=position`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = ("demo.py", "demo.py:limoe", "demo.py:limoe@image_capacity=2.0", "demo.py:mome",
         "demo.py:mome,limoe")


IMAGE_CHANGES = {"image_capacity": ("capacity_factor", float), "image_priority": ("priority", str),
                 "image_group": ("group_size", int)}


def load(spec: str):
  """experiments/<spec>; a suffix '@name=value,...' changes the image side's experts (see the
  module docstring)."""
  from coca_jax.core import config as config_lib
  spec, _, changes = spec.partition("@")
  config = config_lib.load_config(os.path.join(REPO, "experiments", spec))
  mome = config.model.get("backbone") == "mome"
  for change in filter(None, changes.split(",")):
    name, _, value = change.partition("=")
    if name not in IMAGE_CHANGES:
      raise ValueError(f"bench_routing: unknown change {name!r}; known: {sorted(IMAGE_CHANGES)}")
    field, kind = IMAGE_CHANGES[name]
    groups = ([config.model.mome.experts.image] + (
        [config.model.mome.experts.fusion] if config.model.mome.experts.get("fusion") else [])
              if mome else [config.model.vision.experts])
    for experts in groups:  # MoME: ffn_fusion routes image tokens too.
      experts[field] = kind(value)
  return config


def image_dropped(metrics) -> float | None:
  """Mean dropped share of image-token choices over the image-side routers, or None."""
  shares = [float(v) for k, v in metrics.items() if k.endswith("/dropped_fraction")
            and ("router/vision/" in k or "/ffn_image/" in k or "/image/" in k)]
  return round(sum(shares) / len(shares), 4) if shares else None


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--specs", default=";".join(SPECS),
                      help="';'-separated experiments/ specs; the first is the baseline")
  args = parser.parse_args(argv)
  import jax
  from coca_jax import bench
  from coca_jax.perf import flops
  from coca_jax.training import step
  specs = args.specs.split(";")
  runs = {}
  for spec in specs:
    config = load(spec)
    built = step.setup(config)
    train_step = built.train_step()
    with jax.set_mesh(built.mesh):
      state = built.init_state(seed=0)
      batch = bench._synthetic_batch(config, built.mesh)  # pylint: disable=protected-access
      state, metrics = train_step(state, batch)  # Compile.
      jax.block_until_ready(metrics)
    counts = flops.param_counts(config)
    runs[spec] = dict(config=config, built=built, step=train_step, state=state, batch=batch,
                      times=[], params_total=counts["total"],
                      params_active=counts.get("active", counts["total"]),
                      forward_flops=flops.model_flops_per_example(config, train=False))
    print(f"compiled {spec}", file=sys.stderr, flush=True)
  for _ in range(args.rounds):
    for spec, run in runs.items():
      with jax.set_mesh(run["built"].mesh):
        start = time.perf_counter()
        for _ in range(args.steps):
          run["state"], metrics = run["step"](run["state"], run["batch"])
        jax.block_until_ready(metrics)
      run["times"].append((time.perf_counter() - start) / args.steps)
      run["metrics"] = metrics
  base = statistics.median(runs[specs[0]]["times"])
  base_times = runs[specs[0]]["times"]
  for spec, run in runs.items():
    median = statistics.median(run["times"])
    # On a loaded machine the per-round ratio (both timed seconds apart) is the steadier figure.
    round_ratio = statistics.median(t / b for t, b in zip(run["times"], base_times))
    print(json.dumps(dict(spec=spec, step_seconds=round(median, 4),
                          step_ratio=round(median / base, 3),
                          round_ratio_median=round(round_ratio, 3),
                          params_total=run["params_total"], params_active=run["params_active"],
                          forward_flops=run["forward_flops"],
                          image_dropped=image_dropped(run["metrics"]),
                          times=[round(t, 4) for t in run["times"]])), flush=True)


if __name__ == "__main__":
  from coca_jax.core import runtime
  runtime.preload_allocator()
  main()
