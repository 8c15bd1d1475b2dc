r"""Trains a CoCa model from an experiment config.

  python -m coca_jax.train --config experiments/demo.py --workdir /tmp/coca_demo \
      [--config.train.steps=100 ...] [--dry_run]

Re-running with the same --workdir resumes from the newest readable checkpoint (model,
optimizer and data position; `--resume_step N` picks one), after checking that the model in
the config is the one checkpointed. One training at a time per workdir (DIR/LOCK).
`--dry_run` validates the config, builds the state abstractly (no allocation), prints one JSON
object (parameter counts, mesh, batch, FLOPs per example) and exits.

A NaN/inf loss or gradient norm stops the run with exit code 3 (`config.train.nonfinite=
"halt"`, the default), before any non-finite state is saved; with "skip" the update is
discarded and counted (`nonfinite_steps` in metrics.jsonl) and the run stops after
`config.train.max_consecutive_skips` such steps in a row.
"""

from __future__ import annotations

from coca_jax import runtime

if __name__ == "__main__":  # Before JAX starts (python -m); see coca_jax/runtime.py.
  runtime.preload_allocator()

import json
import os
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp

from coca_jax import checkpoint, config as config_lib, console, flops, sharding, step as step_lib
from coca_jax import fs, metrics as metrics_lib, preemption, warm_start
from coca_jax.data import pipeline, prepare
from coca_jax.evaluation import evaluators

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


def _to_python(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


class NonFiniteError(RuntimeError):
  """The run met a NaN/inf loss or gradient norm and its policy says stop."""


def _count_nonfinite(counters: dict, flag, step) -> dict:
  bad = flag > 0
  consecutive = jnp.where(bad, counters["consecutive"] + 1, 0)
  return {"total": counters["total"] + flag, "consecutive": consecutive,
          "longest": jnp.maximum(counters["longest"], consecutive),
          "first": jnp.where(bad & (counters["first"] < 0), step, counters["first"]),
          "last": jnp.where(bad, step, counters["last"])}


class NonFiniteWatch:
  """Counts the step's `nonfinite` flags on the device (one tiny fused update per step, no host
  sync) and reads the counts only where the host reads anyway: with the metrics of a log step
  (one step late) and before every checkpoint or evaluation (which wait for the step anyway).
  `check` raises NonFiniteError per the policy: "halt" at any non-finite step (the state after it
  is never saved), "skip" after `max_consecutive` in a row."""

  def __init__(self, policy: str, max_consecutive: int, mesh):
    self.policy, self.max_consecutive = policy, max_consecutive
    replicated = sharding.replicated(mesh)
    start = {"total": 0, "consecutive": 0, "longest": 0, "first": -1, "last": -1}
    # Made by a jitted function so that it also works on a mesh that spans processes.
    self.counters = jax.jit(lambda: {k: jnp.int32(v) for k, v in start.items()},
                            out_shardings=replicated)()
    self._update = jax.jit(_count_nonfinite, out_shardings=replicated)

  def observe(self, metrics: dict, step: int) -> None:
    self.counters = self._update(self.counters, metrics["nonfinite"], step)

  def check(self, counters: dict | None = None) -> dict:
    """Reads the counters (default: the current ones); returns {"nonfinite_steps": total}."""
    c = {k: int(v) for k, v in jax.device_get(counters or self.counters).items()}
    if self.policy == "halt" and c["first"] >= 0:
      raise NonFiniteError(
          f"non-finite loss or gradient norm at step {c['first']} (config.train.nonfinite="
          f"'halt'). No state from step {c['first']} on was saved; the checkpoints in the "
          "workdir are intact. Lower config.optim.lr, check the data, or set "
          "--config.train.nonfinite=skip to discard such updates.")
    if self.policy == "skip" and c["longest"] >= self.max_consecutive:
      raise NonFiniteError(
          f"{c['longest']} consecutive steps with a non-finite loss or gradient norm (the last "
          f"at step {c['last']}; config.train.max_consecutive_skips={self.max_consecutive}). "
          "Their updates were discarded, so the saved state is finite; the run is diverging: "
          "lower config.optim.lr or check the data.")
    return {"nonfinite_steps": c["total"]}


def dry_run_summary(config, mesh) -> dict:
  return {
      "params": flops.param_counts(config),
      "mesh": dict(mesh.shape),
      "devices": mesh.size,
      "global_batch": config.train.batch_size,
      "model_flops_per_example": flops.model_flops_per_example(config),
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
    config_lib.validate(config, num_devices=jax.device_count())
  except config_lib.ConfigError as e:
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
  try:
    _train(config, workdir, built, profiler)
  except (checkpoint.CheckpointError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(NONFINITE_EXIT_CODE)


def _train(config, workdir: str, built: step_lib.TrainSetup, profiler) -> None:
  mesh, model = built.mesh, built.model
  abstract_state, state_shardings = built.abstract_state, built.state_shardings
  # ---- Workdir: one writer; the checkpointed model must be this one ------------------------
  lock = checkpoint.WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  checkpoint.check_resume_config(workdir, config)

  # ---- Input (and every eval split checked now, not after training) -------------------------
  t0 = time.perf_counter()
  with console.quiet_stdout(FLAGS.verbose):
    tokenizer = prepare.prepare_data(config, workdir)
  logging.info("Data %r and tokenizer ready (%.1fs)", config.data.name, time.perf_counter() - t0)
  evaluators.check_evals(config)
  train_iter = pipeline.make_train_iterator(config, mesh, step_lib.batch_shardings(mesh),
                                            tokenizer)

  # ---- Checkpoint: resume from the newest readable step, or initialise ----------------------
  ckpt = config.checkpoint
  manager = checkpoint.make_manager(workdir, keep=ckpt.keep, every_steps=ckpt.every_steps,
                                    async_save=ckpt.async_save)
  steps, _ = checkpoint.step_dirs(workdir)
  first_step = 0
  if steps or FLAGS.resume_step is not None:
    state, first_step, skipped = checkpoint.restore_newest_readable(
        workdir, lambda s: checkpoint.restore(manager, abstract_state, state_shardings,
                                              train_iter, step=s)[0], FLAGS.resume_step)
    newer = [s for s in steps if s > first_step and s not in dict(skipped)]
    if jax.process_index() == 0:
      # Out of the way, never deleted: orbax would otherwise keep them as the newest steps and
      # rotate this run's good checkpoints away, or refuse to save those steps again.
      checkpoint.set_aside(workdir, [s for s, _ in skipped], "cannot be read")
      checkpoint.set_aside(workdir, newer, f"newer than the resumed step {first_step}")
    prepare.sync("checkpoints set aside")
    manager.reload()
    logging.info("Resumed from step %d", first_step)
    if skipped and jax.process_index() == 0:
      print(f"Resumed from step {first_step}; unreadable newer steps were moved to "
            f"{fs.join(workdir, checkpoint.SET_ASIDE)}: " +
            "; ".join(f"step {s}: {r}" for s, r in skipped), file=sys.stderr)
  else:
    state = built.init_state()
    if config.init.source:  # Parameters from another run or an import.
      state = warm_start.warm_start(config, state, state_shardings)
  if jax.process_index() == 0:
    checkpoint.write_config(workdir, config)

  # ---- Compile (ahead of time, so compile time and memory are logged, not mixed in) --------
  if first_step >= config.train.steps:  # A finished run re-run: evaluate, train nothing.
    compiled = None
    logging.info("Step %d of %d reached: nothing left to train", first_step,
                 config.train.steps)
  else:
    train_step = built.train_step()
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      compiled = train_step.lower(state, step_lib.dummy_batch(config, config.train.batch_size)
                                  ).compile()
      compile_seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    logging.info("Compiled train step in %.1fs; temp bytes/device %s", compile_seconds,
                 getattr(memory, "temp_size_in_bytes", "n/a"))

  # ---- Loop ---------------------------------------------------------------------------------
  writer = metrics_lib.MetricsWriter(workdir)
  data_wait = metrics_lib.TimedIterator(train_iter)
  flops_per_example = flops.model_flops_per_example(config)
  peak_flops = flops.peak_flops_per_device()  # On CPU: a matmul measured once, here.
  # (step, metrics, non-finite counters) read back one step late so the host never stalls.
  pending = None
  last_time, last_step = time.perf_counter(), first_step
  progress = _Progress(config.train.steps, first_step)
  watch = NonFiniteWatch(config.train.nonfinite,
                         config.train.max_consecutive_skips, mesh)

  def flush(pending):
    nonlocal last_time, last_step
    step_num, metrics, counters = pending
    now = time.perf_counter()
    steps = step_num - last_step
    record = {"step": step_num, **_to_python(metrics), **metrics_lib.host_memory()}
    waited = data_wait.take()
    if steps > 0:
      sec_per_step = (now - last_time) / steps
      examples_per_sec = config.train.batch_size / sec_per_step
      record.update(examples_per_sec=examples_per_sec, step_seconds=sec_per_step,
                    data_wait_seconds=waited, data_wait_fraction=waited / (now - last_time),
                    **flops.throughput_metrics(flops_per_example, examples_per_sec,
                                               jax.device_count(), peak_flops))
    try:
      record.update(watch.check(counters))
    finally:  # The record of a bad step is written too: it shows where the loss went.
      writer.write(record)
      progress.log(record)
    last_time, last_step = now, step_num

  def save(step_num, force=False):
    """Saves only a state the watch has cleared: the counters include this step's flag (the
    save would wait for the step anyway), so no non-finite state ever reaches the disk and
    orbax's rotation never replaces good checkpoints with bad ones."""
    watch.check()
    checkpoint.save(manager, step_num, state, train_iter, force=force)

  # Built once per run (its compiled functions too): periodic evals do not recompile.
  embedder = evaluators.Embedder(model, state.params, tokenizer,
                                 batch_size=config.evals.batch_size)

  def evaluate():
    embedder.params = state.params
    return evaluators.evaluate(config, embedder)

  stop = preemption.StopSignal(manager)
  step_num, stopped = first_step, False
  try:
    with jax.set_mesh(mesh):
      for step_num in range(first_step + 1, config.train.steps + 1):
        batch = next(data_wait)
        profiler.before(step_num)
        state, metrics = compiled(state, batch)
        profiler.after(step_num, state)
        watch.observe(metrics, step_num)
        if pending is not None:
          late, pending = pending, None
          flush(late)
        if step_num % config.train.log_every == 0 or step_num == config.train.steps:
          pending = (step_num, metrics, watch.counters)
        if stop.reached(step_num):  # Saved below, like the last step; no evals.
          stopped = True
          break
        if checkpoint.should_save(manager, step_num, ckpt.every_steps):
          save(step_num)
        every = config.evals.every_steps
        if every and step_num % every == 0 and step_num != config.train.steps:
          watch.check()
          results = evaluate()
          if results:
            writer.write({"step": step_num, **results})
      if pending is not None:
        late, pending = pending, None
        flush(late)
      profiler.stop(state)

      # ---- Final checkpoint (the last step, or where a stop signal came) and evals ----------
      if manager.latest_step() != step_num:
        save(step_num, force=True)
      manager.wait_until_finished()
      if stopped:
        logging.warning("Process %d/%d stopped at step %d; re-run with the same --workdir "
                        "to resume", jax.process_index(), jax.process_count(), step_num)
        return
      results = evaluate()
  except NonFiniteError:
    if pending is not None:
      try:  # the record of the step being logged: it shows where the loss went
        flush(pending)
      except NonFiniteError:
        pass
    manager.wait_until_finished()  # finish writing the good checkpoints already started
    raise
  finally:
    manager.close()
    writer.close()
    train_iter.close()
    lock.release()
  if results:
    writer.write({"step": step_num, **results})
    if jax.process_index() == 0:
      print(json.dumps(results, indent=2, sort_keys=True))


class _Progress:
  """One line per log step: step, loss parts, throughput, ETA."""

  def __init__(self, total: int, start: int):
    self.total, self.start, self.t0 = total, start, time.perf_counter()
    self.enabled = jax.process_index() == 0

  def log(self, record: dict) -> None:
    if not self.enabled:
      return
    done = record["step"] - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / max(done, 1) * (self.total - record["step"])
    # A model without captioning (MoME with BERT text, VLMo) has no caption loss.
    caption = (f"caption {record['caption_loss']:.4f}  " if "caption_loss" in record else "")
    print(f"step {record['step']:>6}/{self.total}  loss {record['loss']:.4f}  "
          f"contrastive {record['contrastive_loss']:.4f}  {caption}"
          f"{record.get('examples_per_sec', 0):.0f} ex/s  eta {eta:.0f}s", flush=True)


def run() -> None:
  runtime.preload_allocator()  # Console scripts.
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
