r"""Train-step throughput / MFU, and compile-only memory planning, for an experiment config.

  # Throughput and MFU of the real train step on this machine's devices (synthetic batch):
  python -m coca_jax.bench --config experiments/demo.py --mode train --steps 10 --json
  # Will CoCa-2.1B at 16 examples per chip fit 64 chips? Compile only, on 64 simulated CPU
  # devices; prints per-device bytes from XLA's memory analysis, compile time and FLOPs:
  python -m coca_jax.bench --config experiments/coca_2b.py:batch=1024 --mode compile \
      --devices 64 --json
  # The same with the compiler of an accelerator this host does not have (coca_jax/perf/targets.py):
  # GPUs, with an estimate of the step time and MFU from the compiled module; TPU slices.
  python -m coca_jax.bench --config experiments/coca_base.py:batch=256 --mode compile \
      --target h200 [--devices 8] [--top 20]
  python -m coca_jax.bench --config experiments/coca_2b.py:batch=256 --mode compile \
      --target v5e:4x4 --config.mesh.fsdp=16 --config.mesh.data=1

`--devices N` simulates N CPU devices (compile mode, or a CPU train benchmark). Config overrides
work as in training: --config.mesh.fsdp=8 --config.model.remat=full ...
The compile-mode byte counts are those of the CPU compilation of the same sharded program: a
planning estimate of a TPU/GPU's per-device footprint (same shapes and shardings; layouts and
fusion differ), good for "fits or not by a wide margin" before booking hardware.
"""

from __future__ import annotations

from coca_jax.core import runtime

if __name__ == "__main__":  # Before JAX starts (python -m); see coca_jax/core/runtime.py.
  runtime.preload_allocator()

import json
import os
import statistics
import sys
import time

from absl import app, flags
import jax  # Imported, not started: --devices and --target configure it before first use.
import numpy as np

from coca_jax.core import cli
from coca_jax.core import config as config_lib
from coca_jax.core import sharding
from coca_jax.data import tokenizer as tokenizer_lib
from coca_jax.perf import flops
from coca_jax.perf import hlo_cost
from coca_jax.perf import targets
from coca_jax.training import step

FLAGS = flags.FLAGS
config_lib.define_config_flag("config", "Experiment config file[:args].")
flags.DEFINE_enum("mode", "train", ["train", "compile"],
                  "train: time real steps; compile: lower + compile only, report memory.")
flags.DEFINE_integer("devices", None, "Simulate this many CPU devices (before JAX starts).")
flags.DEFINE_integer("steps", 10, "Timed steps (train mode), after one warm-up step.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
flags.DEFINE_string("target", None,
                    "Compile mode: compile here for an accelerator this host lacks, with its own "
                    "compiler (coca_jax/perf/targets.py: h100 or h200, --devices N of them, plus an "
                    "estimate of the step from coca_jax/perf/hlo_cost.py; or a TPU slice such as "
                    "v5e:4x4, memory only).")
flags.DEFINE_integer("top", 0, "With a GPU --target: also list this many ops with the most "
                     "bytes.")


def _abstract_batch(config, mesh):
  return {name: jax.ShapeDtypeStruct(shape.shape, shape.dtype,
                                     sharding=sharding.batch_sharding(mesh, len(shape.shape)))
          for name, shape in step.dummy_batch(config, config.train.batch_size).items()}


def _synthetic_batch(config, mesh, seed: int = 0):
  """Random normalised images and BOS..EOS captions of random lengths, placed on the mesh."""
  rng = np.random.default_rng(seed)
  batch, size = config.train.batch_size, config.model.image_size
  length, vocab = config.model.text.max_len, config.model.text.vocab_size
  text = np.zeros((batch, length), np.int32)
  for row, n in enumerate(rng.integers(1, length - 1, batch)):
    text[row, 0], text[row, 1:n + 1], text[row, n + 1] = 2, rng.integers(4, vocab, n), 3
  arrays = {"image": rng.standard_normal((batch, size, size, 3), dtype=np.float32), "text": text}
  return {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in arrays.items()}


def _memory_report(compiled) -> dict:
  memory = compiled.memory_analysis()
  if memory is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  report = {name: int(getattr(memory, name, 0) or 0) for name in fields}
  # Live at the peak: inputs + outputs (donated inputs alias outputs: counted once) + scratch.
  report["bytes_per_device"] = (report["argument_size_in_bytes"] + report["output_size_in_bytes"]
                                - report["alias_size_in_bytes"] + report["temp_size_in_bytes"])
  return report


def benchmark(config, mode: str, steps: int = 10, target: str | None = None,
        devices: int | None = None) -> dict:
  """The benchmark as a dict (what `--json` prints). `target` (compile mode): compile for that
  accelerator (`coca_jax/perf/targets.py`; GPUs: `devices` of them) on this host, report whether the
  step fits its memory, and for GPUs add `hlo_cost`'s estimate of the step."""

  if target is not None and mode != "compile":
    raise targets.TargetError(f"--target={target} compiles for an accelerator this host lacks: use "
                     "--mode compile")
  target_devices = None
  if target is not None:
    target_devices = targets.devices(target, devices)
  device_list = target_devices or jax.devices()
  config_lib.validate(config, num_devices=len(device_list),
                      load_tokenizer=tokenizer_lib.load_tokenizer)
  built = step.setup(config, devices=target_devices)
  mesh = built.mesh
  train_step = built.train_step()
  abstract_state = built.sharded_abstract_state
  extra_args = built.step_args(built.sharded_abstract_base)
  flops_per_example = flops.model_flops_per_example(config)
  result = {
      "mode": mode,
      "params": flops.param_counts(config)["total"],
      "devices": len(device_list),
      "device_kind": device_list[0].device_kind,
      "mesh": dict(mesh.shape),
      "global_batch": config.train.batch_size,
      "batch_per_device": config.train.batch_size / len(device_list),
      "microbatches": int(config.train.microbatches),
      "dtype": config.model.dtype,
      "remat": config.model.remat,
      "contrastive_impl": config.loss.contrastive_impl,
      "model_flops_per_example": flops_per_example,
      **step.state_part_bytes(built),
  }
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    lowered = train_step.lower(abstract_state, _abstract_batch(config, mesh), *extra_args)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
      if target is None or "RESOURCE_EXHAUSTED" not in str(error):
        raise
      # The TPU compiler plans every byte of HBM and refuses a program that does not fit.
      result.update(fits=False, compile_error=str(error).splitlines()[0])
      return result
    result["compile_seconds"] = time.perf_counter() - start
  result.update(_memory_report(compiled))
  if target is not None:
    capacity = targets.device_memory_bytes(target)
    result.update(device_memory_bytes=capacity,
                  fits=result.get("bytes_per_device", 0) <= capacity)
  # XLA's count per device (a scanned layer stack is counted once, not per layer).
  result["xla_flops_per_device"] = flops.compiled_flops(compiled)
  estimate_for = (target if target in targets.GPU_TARGETS
                  else targets.for_device_kind(device_list[0].device_kind))
  if estimate_for is not None:  # A GPU target, or a real GPU of a known kind: the estimate too.
    result.update(_estimate(compiled, estimate_for, device_list[0],
                            flops_per_example * config.train.batch_size / len(device_list)))
  if mode == "compile":
    return result

  with jax.set_mesh(mesh):
    # Under LoRA the base is freshly initialised: the step's cost does not depend on its values.
    args = built.step_args(built.init_base(0) if built.lora is not None else None)
    state = built.init_state(seed=0, **({"base": args[0]} if args else {}))
    batch = _synthetic_batch(config, mesh)
    state, metrics = compiled(state, batch, *args)  # Warm-up (first-run allocations).
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch, *args)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  step_seconds = statistics.median(times)
  # Spec sheet, or on CPU a matmul measured here, now: the step and the peak share the load.
  peak = flops.peak_flops_per_device(fresh=True)
  result.update({
      "step_seconds": step_seconds,
      "step_seconds_min": min(times),
      "examples_per_second": config.train.batch_size / step_seconds,
      "peak_flops_per_device": peak,
      "loss": float(metrics["loss"]),
      **flops.throughput_metrics(flops_per_example, config.train.batch_size / step_seconds,
                                 jax.device_count(), peak),
  })
  return result


def _estimate(compiled, target: str, device, model_flops_per_device: float) -> dict:
  """hlo_cost's roofline of the compiled step on `target`: estimated step time, the MFU it
  would give, and the time per kind of op."""
  try:
    costs = hlo_cost.op_costs(compiled.as_text())
  except ValueError as error:  # A module the estimate cannot read: say so, keep the rest.
    return {"estimate_error": str(error)}
  kinds = hlo_cost.roofline(costs, targets.roofline_device(target))
  step_ms = sum(row["ms"] for row in kinds.values())
  report = {"estimated_step_seconds": step_ms / 1e3,
            "estimated_mfu": model_flops_per_device / (step_ms / 1e3)
                             / flops.device_peak_flops(device),
            "estimated_gb_moved": sum(row["gb"] for row in kinds.values()),
            "estimated_ms_per_kind": {kind: round(row["ms"], 2) for kind, row in kinds.items()}}
  if FLAGS.is_parsed() and FLAGS.top:
    print(hlo_cost.table(kinds))
    print(hlo_cost.top_ops(costs, FLAGS.top, targets.roofline_device(target)))
  return report


def _print_table(result: dict) -> None:
  for key, value in result.items():
    if isinstance(value, float):
      value = f"{value:.4g}"
    elif isinstance(value, int) and "bytes" in key:
      value = f"{value:,} ({value / 2**30:.2f} GiB)"
    print(f"{key:>32}: {value}")


def main(argv) -> None:
  del argv
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config experiments/demo.py")
  if FLAGS.target:
    targets.prepare(FLAGS.target)  # Before JAX starts.
  elif FLAGS.devices:
    # Must happen before JAX creates its CPU client: simulated devices for planning/testing.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
  try:
    result = benchmark(FLAGS.config, FLAGS.mode, FLAGS.steps, FLAGS.target, FLAGS.devices)
  except (targets.TargetError, config_lib.ConfigError) as e:  # Each names its fix.
    sys.exit(f"error: {e}")
  if FLAGS.json:
    print(json.dumps(result))
  else:
    _print_table(result)
  if result.get("fits") is False:  # A target the step does not fit: fail (launch --check_fit).
    why = (result["compile_error"] if "compile_error" in result else
           f"{result['bytes_per_device']:,} bytes per device > {result['device_memory_bytes']:,}")
    sys.exit(f"does not fit {FLAGS.target}: {why}")


def run() -> None:
  runtime.preload_allocator()  # Console scripts.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  cli.run(main, required=("config",))


if __name__ == "__main__":
  run()
