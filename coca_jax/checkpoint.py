"""Checkpoints: one orbax CheckpointManager per workdir holding the TrainState and the data
iterator's position side by side, so a resumed run sees exactly the batches it would have seen.

Layout of a workdir:
  DIR/config.json          the resolved experiment config
  DIR/tokenizer.model      the SentencePiece model the run used
  DIR/metrics.jsonl        one JSON object per log step (and per eval)
  DIR/checkpoints/<step>/{state,data}

Restoring takes an abstract TrainState whose leaves carry the TARGET shardings, so a checkpoint
written on one mesh restores onto any other (orbax reshards on read).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from coca_jax.data import pipeline

STATE, DATA = "state", "data"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, keep: int = 2, every_steps: int = 0,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """A manager saving every `every_steps` (0: only when forced) and on preemption."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      save_interval_steps=every_steps if every_steps > 0 else 1,
      enable_async_checkpointing=async_save,
      create=True,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=(STATE, DATA))


def should_save(manager: ocp.CheckpointManager, step: int, every_steps: int) -> bool:
  """Periodic save, or the cluster told us we are about to be preempted."""
  periodic = every_steps > 0 and step % every_steps == 0
  return periodic or manager.reached_preemption(step)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None,
         force: bool = False) -> bool:
  """Saves state (+ the data iterator's position, one file per host). Asynchronous unless the
  manager was made with async_save=False; `manager.wait_until_finished()` before exiting."""
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items[DATA] = pipeline.checkpoint_args(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_with_shardings(abstract_state, shardings) -> Any:
  """ShapeDtypeStructs that carry the target shardings: the restore target for any mesh."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def restore(manager: ocp.CheckpointManager, abstract_state, shardings, data_iterator=None,
            step: int | None = None) -> tuple[Any, int]:
  """Returns (state, step) from `step` (default: the latest); with `data_iterator`, also moves
  the iterator to the saved position."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {manager.directory}")
  items = {STATE: ocp.args.StandardRestore(abstract_with_shardings(abstract_state, shardings))}
  if data_iterator is not None:
    items[DATA] = pipeline.checkpoint_args(data_iterator, restore=True)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE], step


def write_config(workdir: str, config) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str):
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; is {workdir!r} a coca_jax workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
