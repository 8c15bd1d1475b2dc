"""The train loop as parts: `Trainer(config, workdir, built, options).run()`.

  restore_or_init  lock the workdir, open the data, resume from the newest readable checkpoint
                   (setting unreadable and newer steps aside) or initialise / warm start;
  compile          the train step, ahead of time (compile time and memory logged);
  loop             the steps: metrics one step late, periodic checkpoints and evals, stop
                   signals, the non-finite watch;
  finish           the final checkpoint and evals, their metrics, then every writer closed.
Everything comes in as arguments (`TrainOptions` for what the command line adds); the CLI is
`coca_jax.train`.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp

from coca_jax.core import console
from coca_jax.core import fs
from coca_jax.core import sharding
from coca_jax.data import mixture, pipeline, prepare
from coca_jax.evaluation import evaluators
from coca_jax.evaluation import prompts
from coca_jax.perf import flops
from coca_jax.training import checkpoint
from coca_jax.training import lora as lora_lib
from coca_jax.training import metrics_log as metrics_lib
from coca_jax.training import preemption
from coca_jax.training import step as step_lib
from coca_jax.training import warm_start


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """What a run adds to its config: resume_step (None: the newest readable checkpoint);
  verbose (keep the data libraries' stdout)."""
  resume_step: int | None = None
  verbose: bool = False


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


class Trainer:
  """One training run of `built` (a `step_lib.TrainSetup`) in `workdir`; see the module
  docstring for its parts. `profiler`: a `metrics_lib.Profiler` (default: from the config)."""

  def __init__(self, config, workdir: str, built: step_lib.TrainSetup,
               options: TrainOptions = TrainOptions(), profiler=None):
    self.config, self.workdir, self.built, self.options = config, workdir, built, options
    self.profiler = profiler or metrics_lib.Profiler(config, workdir)
    self.lock = self.train_iter = self.manager = self.writer = None
    self.state, self.first_step, self.compiled = None, 0, None
    self.base = None  # LoRA: the frozen base parameters (config.init.source), on their shards

  def run(self) -> dict:
    """restore_or_init, compile, loop, finish; the workdir's lock, data, checkpoint manager and
    metrics writer are closed whatever happens. Returns the final evals (empty when stopped)."""
    try:
      self.restore_or_init()
      self.compile()
      return self.loop_and_finish()
    finally:
      self.close()

  # ---- Restore or init ----------------------------------------------------------------------
  def restore_or_init(self) -> None:
    config, workdir, built = self.config, self.workdir, self.built
    # One writer; the checkpointed model must be this one.
    lock = checkpoint.WorkdirLock(workdir)
    if jax.process_index() == 0:
      lock.acquire()
    self.lock = lock  # released by `close` only once held
    checkpoint.check_resume_config(workdir, config)

    # Input (and every eval split checked now, not after training).
    t0 = time.perf_counter()
    with console.quiet_stdout(self.options.verbose):
      self.tokenizer = prepare.prepare_data(config, workdir, class_names=prompts.class_names)
    logging.info("Data %r and tokenizer ready (%.1fs)", config.data.name,
                 time.perf_counter() - t0)
    evaluators.check_evals(config)
    batch_sharding = step_lib.batch_shardings(built.mesh, config.data.text_only,
                                             config.data.image_only)
    if config.data.sources:  # A mixture (data/mixture.py); class names as zero-shot reads them.
      self.train_iter = mixture.make_mixture_iterator(
          config, batch_sharding, self.tokenizer, class_names=prompts.class_names)
    else:
      self.train_iter = pipeline.make_train_iterator(config, batch_sharding, self.tokenizer)

    # Checkpoint: resume from the newest readable step, or initialise.
    ckpt = config.checkpoint
    self.known_good = checkpoint.KnownGood()  # rotation keeps it, whatever ckpt.keep says
    self.manager = checkpoint.make_manager(
        workdir, keep=ckpt.keep, every_steps=ckpt.every_steps, async_save=ckpt.async_save,
        known_good=self.known_good)
    steps, _ = checkpoint.step_dirs(workdir)
    if built.lora is not None:  # Checkpoints hold the adapters; the base is read every time.
      self.base = warm_start.lora_base(config, built)
    resume_step = self.options.resume_step
    if steps or resume_step is not None:
      self.state, self.first_step, skipped = checkpoint.restore_newest_readable(
          workdir, lambda s: checkpoint.restore(self.manager, built.abstract_state,
                                                built.state_shardings, self.train_iter,
                                                step=s)[0], resume_step)
      first_step = self.first_step
      newer = [s for s in steps if s > first_step and s not in dict(skipped)]
      if jax.process_index() == 0:
        # Out of the way, never deleted: orbax would otherwise keep them as the newest steps
        # and rotate this run's good checkpoints away, or refuse to save those steps again.
        checkpoint.set_aside(workdir, [s for s, _ in skipped], "cannot be read")
        checkpoint.set_aside(workdir, newer, f"newer than the resumed step {first_step}")
      prepare.sync("checkpoints set aside")
      self.manager.reload()
      logging.info("Resumed from step %d", first_step)
      if skipped and jax.process_index() == 0:
        print(f"Resumed from step {first_step}; unreadable newer steps were moved to "
              f"{fs.join(workdir, checkpoint.SET_ASIDE)}: " +
              "; ".join(f"step {s}: {r}" for s, r in skipped), file=sys.stderr)
    elif built.lora is not None:
      self.state = built.init_state(base=self.base)
      logging.info("LoRA: %s trained values on %d kernels", lora_lib.counts(self.state.params),
                   len(built.lora.targets))
    else:
      self.state = built.init_state()
      if config.init.source:  # Parameters from another run or an import.
        self.state = warm_start.warm_start(config, self.state, built.state_shardings)
    self.known_good.step = checkpoint.read_known_good(workdir)  # an earlier run's, if there
    if jax.process_index() == 0:
      checkpoint.write_config(workdir, config)

  # ---- Compile (ahead of time, so compile time and memory are logged, not mixed in) --------
  def compile(self) -> None:
    config = self.config
    if self.first_step >= config.train.steps:  # A finished run re-run: evaluate, train nothing.
      self.compiled = None
      logging.info("Step %d of %d reached: nothing left to train", self.first_step,
                   config.train.steps)
      return
    train_step = self.built.train_step()
    with jax.set_mesh(self.built.mesh):
      t0 = time.perf_counter()
      self.compiled = train_step.lower(
          self.state, step_lib.dummy_batch(config, config.train.batch_size),
          *self.built.step_args(self.base)).compile()
      compile_seconds = time.perf_counter() - t0
    memory = self.compiled.memory_analysis()
    logging.info("Compiled train step in %.1fs; temp bytes/device %s", compile_seconds,
                 getattr(memory, "temp_size_in_bytes", "n/a"))

  # ---- Loop and finish ----------------------------------------------------------------------
  def loop_and_finish(self) -> dict:
    """The steps, then the final checkpoint and evals (`finish`). A run stopped by a signal
    saves where it stopped and skips the evals."""
    config, workdir, built = self.config, self.workdir, self.built
    mesh, manager, train_iter = built.mesh, self.manager, self.train_iter
    ckpt, known_good, first_step = config.checkpoint, self.known_good, self.first_step
    self.writer = writer = metrics_lib.MetricsWriter(workdir)
    data_wait = metrics_lib.TimedIterator(train_iter)
    flops_per_example = flops.model_flops_per_example(config)
    peak_flops = flops.peak_flops_per_device()  # On CPU: measured once per machine, kept.
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
      watch.saved(first_step)  # the resumed checkpoint: known-good once a step runs cleanly

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
        started = checkpoint.save(manager, step_num, self.state, train_iter, force=force)
      except Exception as e:  # pylint: disable=broad-except  # only a full disk becomes a message
        if not checkpoint.is_disk_full(e):
          raise
        try:  # an earlier asynchronous save still in flight: let it finish (or fail) first,
          manager.wait_until_finished()  # so the message lists what is really on disk
        except Exception as pending_error:  # pylint: disable=broad-except
          if not checkpoint.is_disk_full(pending_error):
            raise
        # The failed write is this save's, or (asynchronous saves) an earlier one's: the
        # message names the step whose temporary directory is left, else this one.
        raise checkpoint.DiskFullError(checkpoint.disk_full_message(
            workdir, step_num, checkpoint.state_bytes(built.abstract_state), known_good.step)
                                       ) from None
      if started:
        watch.saved(step_num)

    # Built once per run (its compiled functions too): periodic evals do not recompile.
    embedder = evaluators.Embedder(built.model, built.model_params(self.state, self.base),
                                   self.tokenizer, batch_size=config.evals.batch_size)

    def evaluate():
      embedder.params = built.model_params(self.state, self.base)
      return evaluators.evaluate(config, embedder)

    step_args = built.step_args(self.base)
    stop = preemption.StopSignal(manager)
    step_num, stopped, self._disk_full = first_step, False, False
    try:
      with jax.set_mesh(mesh):
        for step_num in range(first_step + 1, config.train.steps + 1):
          batch = next(data_wait)
          self.profiler.before(step_num)
          self.state, metrics = self.compiled(self.state, batch, *step_args)
          self.profiler.after(step_num, self.state)
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
        self.profiler.stop(self.state)

        # ---- Finish: the final checkpoint (the last step, or where a stop came) and evals ---
        if manager.latest_step() != step_num:
          save(step_num, force=True)
        manager.wait_until_finished()
        if stopped:
          logging.warning("Process %d/%d stopped at step %d; re-run with the same --workdir "
                          "to resume", jax.process_index(), jax.process_count(), step_num)
          return {}
        results = evaluate()
      # Written while the writer is open: the last metrics line and TensorBoard event.
      if results:
        writer.write({"step": step_num, **results})
      return results
    except NonFiniteError as e:
      if pending is not None:
        try:  # the record of the step being logged: it shows where the loss went
          flush(pending)
        except NonFiniteError:
          pass
      manager.wait_until_finished()  # finish writing the checkpoints already started
      raise NonFiniteError(f"{e} {checkpoint_facts(workdir, known_good.step)}") from None
    except checkpoint.DiskFullError:
      self._disk_full = True
      raise
    except Exception as e:  # pylint: disable=broad-except  # only a full disk becomes a message
      if not checkpoint.is_disk_full(e):
        raise
      self._disk_full = True  # an asynchronous save's failure, or metrics.jsonl's write
      raise checkpoint.DiskFullError(checkpoint.disk_full_message(
          workdir, None, checkpoint.state_bytes(built.abstract_state), known_good.step)
                                     ) from None

  # ---- Cleanup ------------------------------------------------------------------------------
  def close(self) -> None:
    """The checkpoint manager, the metrics writer, the data iterator and the lock, in that
    order; a full disk already reported is not reported again."""
    try:
      if self.manager is not None:
        try:
          self.manager.close()
        except Exception as e:  # pylint: disable=broad-except
          if not (getattr(self, "_disk_full", False) and checkpoint.is_disk_full(e)):
            raise
    finally:
      if self.writer is not None:
        self.writer.close()
      if self.train_iter is not None:
        self.train_iter.close()
      if self.lock is not None:
        self.lock.release()


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
    # The terms this run has: VLMo has no caption loss, its text-only stage 2 only MLM.
    parts = "".join(f"{label} {record[key]:.4f}  " for key, label in PROGRESS_TERMS
                    if key in record)
    print(f"step {record['step']:>6}/{self.total}  loss {record['loss']:.4f}  {parts}"
          f"{record.get('examples_per_sec', 0):.0f} ex/s  eta {eta:.0f}s", flush=True)


# The loss parts (and the accuracies of ITM, MLM and MIM) the progress line shows where a run
# has them.
PROGRESS_TERMS = (("contrastive_loss", "contrastive"), ("vl_contrastive_loss", "vl_contrastive"),
                  ("caption_loss", "caption"), ("itm_loss", "itm"), ("itm_accuracy", "itm_acc"),
                  ("mlm_loss", "mlm"), ("mlm_accuracy", "mlm_acc"), ("mim_loss", "mim"),
                  ("mim_accuracy", "mim_acc"))
