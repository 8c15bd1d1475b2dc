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
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp

from coca_jax.training import checkpoint

from coca_jax.core import config as config_lib

from coca_jax.core import cli
from coca_jax.core import console

from coca_jax.perf import flops

from coca_jax.core import sharding

from coca_jax.training import step as step_lib
from coca_jax.core import fs
from coca_jax.training import metrics_log as metrics_lib
from coca_jax.training import preemption
from coca_jax.training import warm_start
from coca_jax.data import pipeline, prepare
from coca_jax.data import tokenizer as tokenizer_lib
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
  """The run met a NaN/inf loss, gradient norm or updated state and its policy says stop."""


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
  is never saved), "skip" after `max_consecutive` in a row.

  It also marks checkpoints known-good. A saved state can be finite and still broken (weights
  of 1e29 after a huge learning rate: the next forward pass gives NaN), so a checkpoint is
  known-good only once the step run FROM it had a clear flag (finite loss, gradient and
  update). That flag is kept on the device and read at the next `check`; the newest such step
  goes to `known_good` (the rotation policy that keeps it) and to `on_known_good`."""

  def __init__(self, policy: str, max_consecutive: int, mesh,
               known_good: checkpoint.KnownGood | None = None, on_known_good=None):
    self.policy, self.max_consecutive = policy, max_consecutive
    self.known_good = checkpoint.KnownGood() if known_good is None else known_good
    self.on_known_good = on_known_good
    self._unverified = {}  # saved step -> the flag of the step run from it (device), or None
    replicated = sharding.replicated(mesh)
    start = {"total": 0, "consecutive": 0, "longest": 0, "first": -1, "last": -1}
    # Made by a jitted function so that it also works on a mesh that spans processes.
    self.counters = jax.jit(lambda: {k: jnp.int32(v) for k, v in start.items()},
                            out_shardings=replicated)()
    self._update = jax.jit(_count_nonfinite, out_shardings=replicated)

  def saved(self, step: int) -> None:
    """The state after `step` is in a checkpoint (or was restored from one): the flag of step
    `step + 1` decides whether it is known-good."""
    self._unverified[step] = None

  def observe(self, metrics: dict, step: int) -> None:
    self.counters = self._update(self.counters, metrics["nonfinite"], step)
    if step - 1 in self._unverified and self._unverified[step - 1] is None:
      self._unverified[step - 1] = metrics["nonfinite"]

  def _verify(self) -> None:
    ran = {s: flag for s, flag in self._unverified.items() if flag is not None}
    if not ran:
      return
    newest = None
    for step, flag in jax.device_get(ran).items():
      del self._unverified[step]
      if int(flag) == 0 and (self.known_good.step is None or step > self.known_good.step):
        self.known_good.step = newest = step
    if newest is not None and self.on_known_good is not None:
      self.on_known_good(newest)

  def check(self, counters: dict | None = None) -> dict:
    """Reads the counters (default: the current ones) and the flags that decide known-good
    checkpoints; returns {"nonfinite_steps": total}."""
    self._verify()
    c = {k: int(v) for k, v in jax.device_get(counters or self.counters).items()}
    if self.policy == "halt" and c["first"] >= 0:
      raise NonFiniteError(
          f"non-finite loss, gradient norm or updated state at step {c['first']} "
          f"(config.train.nonfinite='halt'). No state from step {c['first']} on was saved. "
          "Lower config.optim.lr, check the data, or set --config.train.nonfinite=skip to "
          "discard such updates.")
    if self.policy == "skip" and c["longest"] >= self.max_consecutive:
      raise NonFiniteError(
          f"{c['longest']} consecutive steps with a non-finite loss, gradient norm or updated "
          f"state (the last at step {c['last']}; config.train.max_consecutive_skips="
          f"{self.max_consecutive}). Their updates were discarded, so no NaN/inf entered the "
          "state; but the state kept may itself be the cause (a finite, exploded state gives a "
          "non-finite loss at every step). The run is diverging: lower config.optim.lr or "
          "check the data.")
    return {"nonfinite_steps": c["total"]}


def checkpoint_facts(workdir: str, known_good: int | None) -> str:
  """What is on disk after a stop, checked now: the complete checkpoints, which one is
  known-good, and how to resume from it."""
  intact = checkpoint.intact_steps(workdir)
  if not intact:
    return "No complete checkpoint is on disk."
  text = f"Complete checkpoints on disk (checked now): steps {intact}."
  if known_good in intact:
    text += (f" Step {known_good} is known-good (a train step ran from it with finite "
             "values).")
  else:
    known_good = None
  newer = [s for s in intact if known_good is None or s > known_good]
  if newer:
    text += (f" Not known to be good: {newer} (no clean train step has run from them; a "
             "finite state can still be exploded).")
  if known_good is not None and newer:
    text += (f" A plain re-run resumes from step {intact[-1]}; to resume from the known-good "
             f"one add --resume_step={known_good} (newer steps are then moved to "
             f"{checkpoint.SET_ASIDE}, not deleted).")
  return text


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
  known_good = checkpoint.KnownGood()  # rotation keeps it, whatever ckpt.keep says
  manager = checkpoint.make_manager(workdir, keep=ckpt.keep, every_steps=ckpt.every_steps,
                                    async_save=ckpt.async_save, known_good=known_good)
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
  known_good.step = checkpoint.read_known_good(workdir)  # from an earlier run, if still there
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
  def record_known_good(step):
    if jax.process_index() == 0:
      checkpoint.write_known_good(workdir, step)

  watch = NonFiniteWatch(config.train.nonfinite, config.train.max_consecutive_skips, mesh,
                         known_good, record_known_good)
  if first_step > 0:
    watch.saved(first_step)  # the resumed checkpoint: known-good once a step runs cleanly from it

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
    save would wait for the step anyway), so no state with a NaN/inf ever reaches the disk.
    The same check marks the newest known-good checkpoint, which rotation then keeps."""
    watch.check()
    try:
      started = checkpoint.save(manager, step_num, state, train_iter, force=force)
    except Exception as e:  # pylint: disable=broad-except  # only a full disk is turned into a message
      if not checkpoint.is_disk_full(e):
        raise
      # The failed write is this save's, or (asynchronous saves) an earlier one's: the
      # message names the step whose temporary directory is left, else this one.
      raise checkpoint.DiskFullError(checkpoint.disk_full_message(
          workdir, step_num, checkpoint.state_bytes(abstract_state), known_good.step)) from None
    if started:
      watch.saved(step_num)

  # Built once per run (its compiled functions too): periodic evals do not recompile.
  embedder = evaluators.Embedder(model, state.params, tokenizer,
                                 batch_size=config.evals.batch_size)

  def evaluate():
    embedder.params = state.params
    return evaluators.evaluate(config, embedder)

  stop = preemption.StopSignal(manager)
  step_num, stopped, disk_full = first_step, False, False
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
  except NonFiniteError as e:
    if pending is not None:
      try:  # the record of the step being logged: it shows where the loss went
        flush(pending)
      except NonFiniteError:
        pass
    manager.wait_until_finished()  # finish writing the checkpoints already started
    raise NonFiniteError(f"{e} {checkpoint_facts(workdir, known_good.step)}") from None
  except checkpoint.DiskFullError:
    disk_full = True
    raise
  except Exception as e:  # pylint: disable=broad-except  # only a full disk is turned into a message
    if not checkpoint.is_disk_full(e):
      raise
    disk_full = True  # an asynchronous save's failure, or metrics.jsonl's write
    raise checkpoint.DiskFullError(checkpoint.disk_full_message(
        workdir, None, checkpoint.state_bytes(abstract_state), known_good.step)) from None
  finally:
    try:
      manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if not (disk_full and checkpoint.is_disk_full(e)):  # already reported
        raise
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
  cli.run(main, required=("config",))


if __name__ == "__main__":
  run()
