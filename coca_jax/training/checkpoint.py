"""Checkpoints: one orbax CheckpointManager per workdir holding the TrainState and the data
iterator's position side by side, so a resumed run sees exactly the batches it would have seen.

Layout of a workdir:
  DIR/config.json          the resolved experiment config
  DIR/tokenizer.model      the SentencePiece model the run used
  DIR/metrics.jsonl        one JSON object per log step (and per eval)
  DIR/checkpoints/<step>/{state,data}
  DIR/checkpoints_set_aside/<step>   unreadable steps, or steps newer than --resume_step, moved
                           out of the way by the trainer (never deleted)
  DIR/known_good.json      {"step": S}: the newest checkpoint a clean train step has run from
                           (kept whatever `keep` says until a newer one is known-good)
  DIR/LOCK                 {pid, host, started} of the training that writes here
  DIR/LOCK.takeover-<id>   the claim of the one run that took over a stale LOCK

Restoring takes an abstract TrainState whose leaves carry the TARGET shardings, so a checkpoint
written on one mesh restores onto any other (orbax reshards on read).

Which step is used (one rule for `train` and `coca_jax.load`, `restore_newest_readable`): the
requested step if one is given (an error if it cannot be read), else the newest step that can be
read; each newer step that cannot (no state/_METADATA, no data position, a truncated or
corrupted file) is reported with its step and reason. Directories under checkpoints/ that are
not steps are ignored with a warning.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import errno
import hashlib
import json
import math
import os
import shutil
import socket
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from coca_jax.core import config as config_lib
from coca_jax.core import fs
from coca_jax.core import sharding

STATE, DATA = "state", "data"
SET_ASIDE = "checkpoints_set_aside"
LOCK_FILE = "LOCK"


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a checkpoint that does not fit this run; says why."""


class DiskFullError(CheckpointError):
  """A save (or another write of the run) found no space left; see `disk_full_message`."""


def checkpoint_dir(workdir: str) -> str:
  return fs.join(fs.resolve(workdir), "checkpoints")


KNOWN_GOOD_FILE = "known_good.json"


class KnownGood(ocp.checkpoint_managers.PreservationPolicy):
  """Rotation's exception: the checkpoint at `step`, the newest known-good one, is never
  deleted, whatever `keep` says. A checkpoint is known-good once a train step has run from it
  with a finite loss, gradient and update (the train loop sets `step`; it only grows). A finite
  state can still be broken (exploded weights give NaN in the next forward pass), so a state
  is not known-good merely because its own values are finite."""

  def __init__(self, step: int | None = None):
    self.step = step

  def should_preserve(self, checkpoints, *, context):
    del context
    return [info.step == self.step for info in checkpoints]


def read_known_good(workdir: str) -> int | None:
  """The step DIR/known_good.json names, if that checkpoint is still under DIR/checkpoints."""
  path = fs.join(fs.resolve(workdir), KNOWN_GOOD_FILE)
  try:
    step = json.loads(fs.read_text(path)).get("step")
  except (OSError, ValueError, AttributeError):
    return None
  return step if isinstance(step, int) and step in step_dirs(workdir)[0] else None


def write_known_good(workdir: str, step: int) -> None:
  fs.write_text(fs.join(fs.resolve(workdir), KNOWN_GOOD_FILE), json.dumps({"step": step}))


def make_manager(workdir: str, *, keep: int = 2, every_steps: int = 0,
                 async_save: bool = True, known_good: KnownGood | None = None,
                 ) -> ocp.CheckpointManager:
  """A manager saving every `every_steps` (0: only when forced) and on preemption. It keeps the
  newest `keep` checkpoints and, with `known_good`, also the one that policy names."""
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  if known_good is not None:
    policies.append(known_good)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      save_interval_steps=every_steps if every_steps > 0 else 1,
      enable_async_checkpointing=async_save,
      create=True,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=(STATE, DATA))


def should_save(manager: ocp.CheckpointManager, step: int, every_steps: int) -> bool:
  """Periodic save, or the cluster told us we are about to be preempted."""
  periodic = every_steps > 0 and step % every_steps == 0
  return periodic or manager.reached_preemption(step)


# ----------------------------------------------------------------------------------------------
# The data iterator's position, an item of every checkpoint.
# ----------------------------------------------------------------------------------------------

POSITION_FILE = "position.json"


class PositionHandler:
  """orbax CheckpointHandler for a training data iterator (`data.pipeline.TrainIterator` or
  `InMemoryTrainIterator`: it reads `position` and `sampler`, and calls `set_position`).
  One JSON file, written by process 0: {"global_batches", "global_batch_size", "seed",
  "num_records"}. Restoring moves the iterator (on however many hosts now run) to that global
  batch."""

  def save(self, directory: epath.Path, item=None, args=None) -> None:
    iterator = item or args.item
    if jax.process_index() == 0:
      sampler = iterator.sampler
      record = {"global_batches": iterator.position,
                "global_batch_size": sampler.global_batch_size, "seed": sampler.seed,
                "num_records": sampler.num_records}
      (epath.Path(directory) / POSITION_FILE).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, item=None, args=None):
    iterator = item or args.item
    path = epath.Path(directory) / POSITION_FILE
    if not path.exists():
      raise FileNotFoundError(f"{path} (the data iterator's position) is missing")
    record = json.loads(path.read_text())
    sampler = iterator.sampler
    changed = [f"{name} {record[name]} -> {now}" for name, now in (
        ("global_batch_size", sampler.global_batch_size), ("seed", sampler.seed),
        ("num_records", sampler.num_records)) if record.get(name) != now]
    if changed:
      logging.warning("The data order changed since the checkpoint (%s): resuming at global "
                      "batch %d of the new order, not where the old one stopped",
                      ", ".join(changed), record["global_batches"])
    iterator.set_position(int(record["global_batches"]))
    return iterator

  def structure(self, directory):  # Required by orbax's interface.
    del directory

  def metadata(self, directory):
    del directory

  def finalize(self, directory):
    del directory

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(PositionHandler, for_save=True)
@dataclasses.dataclass
class PositionSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(PositionHandler, for_restore=True)
@dataclasses.dataclass
class PositionRestore(ocp.args.CheckpointArgs):
  item: Any


def checkpoint_args(iterator, restore: bool = False):
  """orbax args item for the iterator's position: use as the "data" item of a Composite. The
  position is in global batches, so a checkpoint restores on any number of hosts."""
  return PositionRestore(iterator) if restore else PositionSave(iterator)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None,
         force: bool = False) -> bool:
  """Saves state (+ the data iterator's position, one file per host). Asynchronous unless the
  manager was made with async_save=False; `manager.wait_until_finished()` before exiting."""
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items[DATA] = checkpoint_args(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


# ----------------------------------------------------------------------------------------------
# Which step: one rule for train and load.
# ----------------------------------------------------------------------------------------------

def step_dirs(workdir: str) -> tuple[list[int], list[str]]:
  """(step numbers found under DIR/checkpoints, ascending; names there that are not steps).
  orbax's own in-progress directories (`*.orbax-checkpoint-tmp-*`) are in neither list."""
  root = checkpoint_dir(workdir)
  steps, junk = [], []
  for name in fs.listdir(root):
    if "orbax-checkpoint-tmp" in name:
      continue
    if name.isdigit() and fs.isdir(fs.join(root, name)):
      steps.append(int(name))
    else:
      junk.append(name)
  return sorted(steps), junk


def unreadable_reason(workdir: str, step: int, need_data: bool = True) -> str | None:
  """Why DIR/checkpoints/<step> is not a complete checkpoint (None if it looks complete).
  Cheap checks of the layout; a truncated or corrupted array file shows only when read."""
  directory = fs.join(checkpoint_dir(workdir), str(step))
  state = fs.join(directory, STATE)
  if not fs.isdir(state):
    return f"no {STATE}/ directory (not a checkpoint written by coca_jax)"
  metadata = fs.join(state, "_METADATA")
  if not fs.isfile(metadata):
    return f"{STATE}/_METADATA is missing (an interrupted save or deleted files)"
  try:
    json.loads(fs.read_text(metadata))
  except (OSError, ValueError) as e:
    return f"{STATE}/_METADATA is unreadable ({type(e).__name__}: {e})"
  if need_data and not fs.isfile(fs.join(directory, DATA, POSITION_FILE)):
    return f"{DATA}/{POSITION_FILE} (the data iterator's position) is missing"
  return None


def _short(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def restore_newest_readable(workdir: str, restore_fn: Callable[[int], Any],
                            step: int | None = None, need_data: bool = True,
                            ) -> tuple[Any, int, list[tuple[int, str]]]:
  """The shared step rule. Calls `restore_fn(step)` on the requested step, or on each step from
  the newest down until one restores.

  Returns:
    (what restore_fn returned, the step used, [(step, reason)] of the newer steps skipped).

  Raises:
    CheckpointError: the requested step, or every step, cannot be read (each reason listed).
  """
  steps, junk = step_dirs(workdir)
  root = checkpoint_dir(workdir)
  for name in junk:
    logging.warning("Ignoring %s: not a checkpoint step (step directories are named by their "
                    "step number)", fs.join(root, name))
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"--resume_step / step={step} is not among the checkpoints under "
                            f"{root}: {steps or 'none'}")
    candidates = [step]
  else:
    candidates = sorted(steps, reverse=True)
  skipped = []
  for candidate in candidates:
    reason = unreadable_reason(workdir, candidate, need_data)
    if reason is None:
      try:
        return restore_fn(candidate), candidate, skipped
      except Exception as e:  # pylint: disable=broad-except  # any failure: try the next step
        reason = f"restoring failed: {_short(e)}"
    skipped.append((candidate, reason))
    logging.warning("Checkpoint step %d under %s cannot be read: %s", candidate, root, reason)
  listing = "; ".join(f"step {s}: {r}" for s, r in skipped)
  if step is not None:
    raise CheckpointError(f"checkpoint step {step} under {root} cannot be read ({listing}); "
                          f"readable steps are tried newest first when no step is given")
  raise CheckpointError(f"no readable checkpoint under {root} ({listing or 'no steps'})")


def set_aside(workdir: str, steps: list[int], why: str) -> list[str]:
  """Moves DIR/checkpoints/<step> to DIR/checkpoints_set_aside/<step>[.N] (never deletes), so
  that neither resuming nor orbax's rotation (`keep`) mistakes them for this run's steps.
  Returns the new paths."""
  moved = []
  for step in steps:
    source = fs.join(checkpoint_dir(workdir), str(step))
    if not fs.exists(source):
      continue
    target_dir = fs.join(fs.resolve(workdir), SET_ASIDE)
    fs.makedirs(target_dir)
    target, n = fs.join(target_dir, str(step)), 1
    while fs.exists(target):
      target, n = fs.join(target_dir, f"{step}.{n}"), n + 1
    fs.move(source, target)
    logging.warning("Moved checkpoint step %d to %s (%s)", step, target, why)
    moved.append(target)
  return moved


def restore(manager: ocp.CheckpointManager, abstract_state, shardings, data_iterator=None,
            step: int | None = None) -> tuple[Any, int]:
  """Returns (state, step) from `step` (default: the latest); with `data_iterator`, also moves
  the iterator to the saved position."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {manager.directory}")
  items = {STATE: ocp.args.StandardRestore(sharding.with_shardings(abstract_state, shardings))}
  if data_iterator is not None:
    items[DATA] = checkpoint_args(data_iterator, restore=True)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE], step


def changed_model_fields(saved, config) -> list[str]:
  """'config.model.<field>: <saved> in config.json, <now> now' for each field that shapes the
  parameters and differs between the workdir's config.json and this run (model group, and the
  contrastive loss kind, which adds a logit bias)."""
  def flat(tree, prefix):
    if isinstance(tree, dict):
      out = {}
      for key, value in tree.items():
        out.update(flat(value, f"{prefix}.{key}"))
      return out
    return {prefix: tree}

  def as_json(c):
    c = c.to_dict() if hasattr(c, "to_dict") else c
    return json.loads(json.dumps(c, default=str))

  saved, now = as_json(saved), as_json(config)
  old = flat(saved.get("model", {}), "config.model")
  new = flat(now.get("model", {}), "config.model")
  old["config.loss.contrastive"] = saved.get("loss", {}).get("contrastive", "softmax")
  new["config.loss.contrastive"] = now.get("loss", {}).get("contrastive", "softmax")
  missing = object()
  return [f"{name}: {old.get(name, 'absent')!r} in config.json, {new.get(name, 'absent')!r} now"
          for name in sorted(set(old) | set(new))
          if old.get(name, missing) != new.get(name, missing)]


def check_resume_config(workdir: str, config) -> None:
  """Raises CheckpointError naming each model field that differs from DIR/config.json (the
  checkpoint's parameters would not fit this model)."""
  if not fs.exists(fs.join(workdir, "config.json")) or not step_dirs(workdir)[0]:
    return  # nothing saved yet: any model may start here
  changed = changed_model_fields(read_config(workdir), config)
  if changed:
    raise CheckpointError(
        f"this run's model differs from the one checkpointed in {workdir}:\n  - " +
        "\n  - ".join(changed) + "\nUse a new --workdir for a different model, or drop the "
        "overrides to resume this one.")


# ----------------------------------------------------------------------------------------------
# One writer per workdir.
# ----------------------------------------------------------------------------------------------

class WorkdirLock:
  """DIR/LOCK holds {pid, host, started} of the one training that writes the workdir.

  `acquire()` creates it atomically (`fs.create_exclusive`: O_EXCL locally, a create-only
  upload on GCS; see fs.py for other stores). If it exists: held by a live process, or by one
  on another host (whose liveness cannot be checked from here), the run is refused with a
  message naming the holder; left by a dead process on this host (a SIGKILL, a crash, a lost
  machine), it is taken over with a warning. In a multi-process run only process 0 holds it.
  Released on `release()` and at interpreter exit.

  Taking over is atomic too: reading the stale LOCK, finding its process dead and replacing it
  are three steps, and two runs doing them at once could each replace the other's fresh LOCK.
  So a run first claims that one stale LOCK by exclusively creating DIR/LOCK.takeover-<id>,
  <id> a hash of the stale LOCK's bytes: of all the runs that read the same stale LOCK, exactly
  one creates the claim, and only it removes the LOCK and creates its own; the others are
  refused. Claims are never removed (a run that read the stale LOCK long ago must still find
  its claim taken); each is a few bytes, one per takeover.
  """

  def __init__(self, workdir: str):
    self.path = fs.join(fs.resolve(workdir), LOCK_FILE)
    self.held = False

  def _record(self) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

  def _create(self) -> bool:
    return fs.create_exclusive(self.path, json.dumps(self._record()).encode("utf-8"))

  def _held(self) -> "WorkdirLock":
    self.held = True
    atexit.register(self.release)
    return self

  def acquire(self) -> "WorkdirLock":
    for _ in range(3):  # a lock removed between our attempts is simply tried again
      if self._create():
        return self._held()
      try:
        raw = fs.read_bytes(self.path)
      except FileNotFoundError:
        continue
      try:
        holder = json.loads(raw)
      except ValueError:
        holder = {}
      holder = holder if isinstance(holder, dict) else {}
      pid, host = holder.get("pid"), holder.get("host")
      described = f"pid {pid} on host {host}, started {holder.get('started', '?')}"
      if host != socket.gethostname() or not isinstance(pid, int):
        raise CheckpointError(
            f"{fs.dirname(self.path)} is in use by another training ({described}; "
            f"{self.path}). Wait for it to finish, or use another --workdir. If that run is "
            f"gone, delete {self.path}.")
      if _alive(pid):
        raise CheckpointError(
            f"{fs.dirname(self.path)} is in use by another training ({described}): two "
            f"runs would interleave metrics and overwrite each other's checkpoints. Wait for it "
            f"to finish (or stop it), or use another --workdir.")
      claim = f"{self.path}.takeover-{hashlib.sha256(raw).hexdigest()[:16]}"
      if not fs.create_exclusive(claim, json.dumps(self._record()).encode("utf-8")):
        raise CheckpointError(
            f"{fs.dirname(self.path)}: another run is taking over the stale lock {self.path} "
            f"({described}) at the same time; it keeps the workdir. If no other run is "
            f"starting, delete {self.path} and {claim}.")
      logging.warning("Taking over the stale lock %s of a process that no longer runs (%s)",
                      self.path, described)
      fs.remove(self.path)
      if self._create():
        return self._held()
      # A run that never saw the stale LOCK created one in between: theirs stands (the next
      # attempt reads it); our claim stays, so no late reader of the stale LOCK removes theirs.
    raise CheckpointError(f"could not take the lock {self.path}; another run is starting "
                          "in the same --workdir")

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    try:
      mine = json.loads(fs.read_text(self.path)).get("pid") == os.getpid()
    except (OSError, ValueError):
      mine = False
    try:
      if mine:
        fs.remove(self.path)
    except Exception as e:  # pylint: disable=broad-except  # e.g. a bucket client at exit
      logging.warning("Could not remove the lock %s (%s): a later run on this host takes it "
                      "over (this process is gone); from another host, delete it first",
                      self.path, _short(e))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def write_config(workdir: str, config) -> None:
  fs.write_text(fs.join(workdir, "config.json"), config.to_json_best_effort(indent=2,
                                                                            sort_keys=True))


def read_config(workdir: str):
  import ml_collections
  path = fs.join(workdir, "config.json")
  if not fs.exists(path):
    raise FileNotFoundError(f"{path} does not exist; is {workdir!r} a coca_jax workdir?")
  saved = ml_collections.ConfigDict(json.loads(fs.read_text(path)))
  # Fields added since the run was saved take their defaults.
  return config_lib.complete(saved)


# ----------------------------------------------------------------------------------------------
# A full disk: one message of ours instead of the storage library's tracebacks.
# ----------------------------------------------------------------------------------------------

DISK_FULL_TEXT = "No space left on device"


def is_disk_full(error: BaseException | None) -> bool:
  """True if `error` or an exception it was raised from is ENOSPC. orbax reports tensorstore's
  ENOSPC as a ValueError('RESOURCE_EXHAUSTED: ... No space left on device'), so the text
  counts too."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if DISK_FULL_TEXT in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _size(num_bytes: float) -> str:
  for unit in ("bytes", "KB", "MB", "GB", "TB"):
    if num_bytes < 1000 or unit == "TB":
      return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1000
  return ""


def state_bytes(state) -> int:
  """Bytes of every array in `state`, uncompressed (global shapes): an upper estimate of one
  checkpoint (orbax compresses the arrays; the data position adds a few bytes)."""
  return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(state)
             if hasattr(leaf, "dtype"))


def intact_steps(workdir: str) -> list[int]:
  """Steps under DIR/checkpoints whose layout is complete (see `unreadable_reason`)."""
  return [s for s in step_dirs(workdir)[0] if unreadable_reason(workdir, s) is None]


def disk_full_message(workdir: str, step: int | None, needed: int,
                      known_good: int | None = None) -> str:
  """The one message for a full disk: which save (the step whose orbax temporary directory is
  left, else `step`, the newest save started), the space one checkpoint needs, what is
  complete on disk (checked now), and how to resume."""
  root = checkpoint_dir(workdir)
  partial = sorted(name for name in fs.listdir(root) if "orbax-checkpoint-tmp" in name)
  failed = sorted({int(name.split(".")[0]) for name in partial if name.split(".")[0].isdigit()})
  failed = failed or ([step] if step is not None else [])
  free = ""
  if not fs.is_url(root):
    probe = root
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
      probe = os.path.dirname(probe)
    free = f"; {_size(shutil.disk_usage(probe).free)} free there now"
  what = (f"the checkpoint of step {', '.join(map(str, failed))}" if failed
          else "the run's files")
  intact = intact_steps(workdir)
  listed = ", ".join(str(s) + (" (known-good)" if s == known_good else "") for s in intact)
  message = (f"the disk is full: writing {what} under {root} failed ({DISK_FULL_TEXT}). One "
             f"checkpoint needs up to {_size(needed)} (the state's arrays, uncompressed){free}. "
             f"Complete checkpoints on disk (checked now): "
             f"{'steps ' + listed if intact else 'none'}.")
  if partial:
    message += (f" The partly written save is left as {', '.join(partial)}; resuming ignores "
                "it, and it can be deleted.")
  if intact:
    message += (" Free space (or lower config.checkpoint.keep), then re-run the same command: "
                f"it resumes from step {intact[-1]}, the newest complete checkpoint.")
  else:
    message += " Free space, then re-run the same command: with no checkpoint it starts at step 0."
  return message
