r"""VLMo-Base's train step against the MoME-CoCa step at the same sizes, alternating processes.

  python benchmarks/bench_vlmo_step.py [--batch 4] [--rounds 3] [--steps 3] [--dtype float32]

The two models (both VLMo-Base widths: 12 layers of 768, MLP 3072, 224px images in 16px patches,
30,522 ids, 40 text positions, the VL-FFN in the top 2 layers; AdamW):
  vlmo       experiments/vlmo_base.py (stage 3): BERT-style text encoder, ITC + ITC on the VL-FFN
             features + ITM on hard negatives + MLM on the fused pass;
  mome_coca  `recipes.mome` at the same sizes, which is what vlmo_base was before it followed the
             official code (experiments/mome_coca_base.py uses the same recipe at CoCa-Base's
             sizes): causal text with the [CLS] last, contrastive + captioning + ITM.
Each round benchmarks each model in its own process (`coca_jax.bench.benchmark`: compile, one
warm-up step, `--steps` timed steps, their median), one after the other, so only one model's
state is in memory and both run under nearly the same machine load. Prints one JSON line per run,
then a summary line: each model's median step over rounds, the median of the per-round ratios
vlmo / mome_coca (the steadier figure on a shared machine), XLA's FLOPs of each compiled step
and the model FLOPs (coca_jax/perf/flops.py) per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("mome_coca", "vlmo")


def config_for(name: str, batch: int, dtype: str):
  """The experiment config of `name` (see the module docstring) at `batch` and `dtype`."""
  from coca_jax.core import config as config_lib
  from coca_jax.core import recipes
  if name == "vlmo":
    config = config_lib.load_config(os.path.join(REPO, "experiments", "vlmo_base.py") +
                                    f":batch={batch}")
  elif name == "mome_coca":
    config = config_lib.complete(recipes.mome(
        width=768, depth=12, heads=12, mlp_dim=3072, fusion_layers=2, arg=f"batch={batch}",
        where="benchmarks/bench_vlmo_step.py"))
  else:
    raise ValueError(f"bench_vlmo_step: unknown model {name!r}; use one of {MODELS}")
  config.model.dtype = dtype
  return config


def run_one(name: str, batch: int, steps: int, dtype: str) -> dict:
  from coca_jax import bench
  result = bench.benchmark(config_for(name, batch, dtype), "train", steps)
  keep = ("step_seconds", "step_seconds_min", "compile_seconds", "xla_flops_per_device",
          "model_flops_per_example", "params", "global_batch", "dtype", "loss",
          "temp_size_in_bytes")
  return {"model": name, **{k: result.get(k) for k in keep}}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)  # A child process.
  args = parser.parse_args(argv)
  if args.one:
    print(json.dumps(run_one(args.one, args.batch, args.steps, args.dtype)), flush=True)
    return
  runs = {name: [] for name in MODELS}
  for _ in range(args.rounds):
    for name in MODELS:
      out = subprocess.run(
          [sys.executable, os.path.abspath(__file__), "--one", name, "--batch", str(args.batch),
           "--steps", str(args.steps), "--dtype", args.dtype],
          cwd=REPO, check=True, stdout=subprocess.PIPE, text=True).stdout
      result = json.loads(out.strip().splitlines()[-1])
      print(json.dumps(result), flush=True)
      runs[name].append(result)
  seconds = {name: [r["step_seconds"] for r in rs] for name, rs in runs.items()}
  ratios = [v / m for v, m in zip(seconds["vlmo"], seconds["mome_coca"])]
  summary = {"batch": args.batch, "dtype": args.dtype, "rounds": args.rounds,
             "steps_per_round": args.steps,
             "ratio_vlmo_over_mome_coca": round(statistics.median(ratios), 3),
             "round_ratios": [round(r, 3) for r in ratios]}
  for name, rs in runs.items():
    summary[name] = {
        "step_seconds_median": round(statistics.median(seconds[name]), 3),
        "xla_flops_per_step": rs[0]["xla_flops_per_device"],
        "model_flops_per_step": rs[0]["model_flops_per_example"] * args.batch}
  summary["xla_flops_ratio"] = round(summary["vlmo"]["xla_flops_per_step"]
                                     / summary["mome_coca"]["xla_flops_per_step"], 3)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  from coca_jax.core import runtime
  runtime.preload_allocator()
  main()
