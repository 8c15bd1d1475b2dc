r"""Trains a CoCa model from an experiment config.

  python -m coca_jax.train --config experiments/demo.py --workdir /tmp/coca_demo \
      [--config.train.steps=100 ...] [--dry_run]

Re-running with the same --workdir resumes from the newest readable checkpoint (model,
optimizer and data position; `--resume_step N` picks one), after checking that the model in
the config is the one checkpointed. One training at a time per workdir (DIR/LOCK).
`--dry_run` validates the config, builds the state abstractly (no allocation), prints one JSON
object (parameter counts, mesh, batch, FLOPs per example) and exits.

A NaN/inf loss or gradient norm, or an update that leaves a NaN/inf in the parameters or the
optimizer state, stops the run with exit code 3 (`config.train.nonfinite="halt"`, the
default), before any such state is saved; with "skip" the update is discarded and counted
(`nonfinite_steps` in metrics.jsonl) and the run stops after
`config.train.max_consecutive_skips` such steps in a row. A checkpoint becomes known-good when a
clean step has run from it (DIR/known_good.json); rotation (`config.checkpoint.keep`) never
deletes the newest known-good one. A full disk ends the run with one message (exit code 2).
See docs/training.md, "Safety".
"""

from __future__ import annotations

from coca_jax.core import runtime

if __name__ == "__main__":  # Before JAX starts (python -m); see coca_jax/core/runtime.py.
  runtime.preload_allocator()

import json
import os
import sys

from absl import app, flags, logging
import jax

from coca_jax.core import cli
from coca_jax.core import config as config_lib
from coca_jax.core import console
from coca_jax.core import fs
from coca_jax.data import tokenizer as tokenizer_lib
from coca_jax.interop import pretrained
from coca_jax.perf import flops
from coca_jax.training import checkpoint
from coca_jax.training import loop
from coca_jax.training import metrics_log as metrics_lib
from coca_jax.training import step as step_lib
from coca_jax.training import warm_start
from coca_jax.training.loop import (  # the CLI's exit codes name these; tests use them here
    NonFiniteError, NonFiniteWatch, checkpoint_facts)

FLAGS = flags.FLAGS
config_lib.define_config_flag("config", "Experiment config file[:args].")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.DEFINE_bool("dry_run", False, "Validate + build abstractly, print a JSON summary, exit.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_bool("verbose", False, "Also print the INFO logs of orbax, TFDS, JAX (debugging).")
flags.DEFINE_integer("resume_step", None, "Resume from this checkpoint step (default: the "
                     "newest readable one). Newer steps are moved to DIR/checkpoints_set_aside.")

NONFINITE_EXIT_CODE = 3


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Joins a multi-process run. Explicit flags win; otherwise JAX auto-detects TPU pods and
  SLURM; a lone process with nothing to detect stays single-process."""
  if coordinator_address or (num_processes and num_processes > 1):
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def dry_run_summary(config, mesh) -> dict:
  return {
      "params": flops.param_counts(config),
      "mesh": dict(mesh.shape),
      "devices": mesh.size,
      "global_batch": config.train.batch_size,
      "model_flops_per_example": flops.model_flops_per_example(config),
      # The launch scripts refuse an empty name before a machine is created (launch/common.sh).
      "data_name": config.data.name,
  }


def main(argv) -> None:
  del argv
  config, workdir = FLAGS.config, FLAGS.workdir
  console.setup(FLAGS.verbose)
  if config is None:
    raise app.UsageError("--config is required, e.g. --config experiments/demo.py")
  initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

  # ---- Validate -----------------------------------------------------------------------------
  try:
    config_lib.validate(config, num_devices=jax.device_count(),
                        load_tokenizer=tokenizer_lib.load_tokenizer)
    # A published name as the warm start: downloaded and converted once, before the mesh.
    pretrained.ensure(config.init.source)
    if warm_start.adopt_base_tokenizer(config):  # LoRA: the frozen base's token ids
      config_lib.validate(config, num_devices=jax.device_count(),
                          load_tokenizer=tokenizer_lib.load_tokenizer)
  except (config_lib.ConfigError, warm_start.WarmStartError, pretrained.PretrainedUnavailable,
          pretrained.ChecksumError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

  # ---- Mesh, model, optimizer, abstract state (nothing allocated yet) ----------------------
  built = step_lib.setup(config)
  mesh = built.mesh
  if FLAGS.dry_run:
    print(json.dumps(dry_run_summary(config, mesh), indent=2))
    return
  if workdir is None:
    raise app.UsageError("--workdir is required (unless --dry_run)")
  workdir = fs.resolve(workdir)
  fs.makedirs(workdir)
  profiler = metrics_lib.Profiler(config, workdir)  # Checks config.profile before the long part.
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  # ---- Train: restore or init, compile, loop, finish (coca_jax/training/loop.py) ------------
  try:
    results = loop.Trainer(config, workdir, built, loop.TrainOptions(
        resume_step=FLAGS.resume_step, verbose=FLAGS.verbose), profiler).run()
    if results and jax.process_index() == 0:
      print(json.dumps(results, indent=2, sort_keys=True))
  except (checkpoint.CheckpointError, config_lib.ConfigError) as e:
    _exit_with(e, 2)
  except OSError as e:  # a full disk outside a checkpoint save (metrics, config.json, data)
    if not checkpoint.is_disk_full(e):
      raise
    _exit_with(checkpoint.DiskFullError(checkpoint.disk_full_message(
        workdir, None, checkpoint.state_bytes(built.abstract_state),
        checkpoint.read_known_good(workdir))), 2)
  except NonFiniteError as e:
    _exit_with(e, NONFINITE_EXIT_CODE)


def _exit_with(error, code: int) -> None:
  print(f"error: {error}", file=sys.stderr)
  if isinstance(error, checkpoint.DiskFullError) or checkpoint.is_disk_full(error):
    # Storage threads that failed on the full disk may still complain while Python shuts
    # down; the message above already said what happened.
    sys.unraisablehook = lambda unraisable: None
  sys.exit(code)


def run() -> None:
  runtime.preload_allocator()  # Console scripts.
  cli.run(main, required=("config",))


if __name__ == "__main__":
  run()
