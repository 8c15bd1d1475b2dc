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


def state_dir_for_init(source: str) -> str:
  """The TrainState directory of `source`: a workdir (its latest checkpoint) or one checkpoint
  step directory (DIR/checkpoints/<step>)."""
  source = os.path.abspath(source)
  if os.path.isdir(os.path.join(source, STATE)):
    return os.path.join(source, STATE)
  ckpt_dir = checkpoint_dir(source)
  steps = sorted(int(d) for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
                 if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, STATE)))
  if not steps:
    raise FileNotFoundError(f"config.init.source={source!r} is neither a workdir with "
                            "checkpoints nor a checkpoint step directory (DIR/checkpoints/<step>)")
  return os.path.join(ckpt_dir, str(steps[-1]), STATE)


def _paths(tree) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def load_params_for_init(source: str, params, shardings) -> tuple[Any, dict]:
  """Warm start (`config.init.source`): the parameters of another run's checkpoint, placed with
  `shardings`, for a run that starts fresh otherwise (its own optimizer state and step 0).

  params: this model's freshly initialised parameters (arrays or ShapeDtypeStructs). A leaf the
  source lacks keeps its fresh value (e.g. a head a later stage adds); a source leaf this model
  lacks is ignored; both are reported. A leaf whose shape differs is an error naming each one.
  Returns (params, report: dict(loaded, kept_fresh: [paths], ignored: [paths])).
  """
  state_dir = state_dir_for_init(source)
  with ocp.PyTreeCheckpointer() as ckptr:
    stored = ckptr.metadata(state_dir)
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
  stored = _paths(stored["params"])
  own = _paths(params)
  mismatched = [f"{path}: checkpoint {tuple(stored[path].shape)} vs model {tuple(leaf.shape)}"
                for path, leaf in own.items()
                if path in stored and tuple(stored[path].shape) != tuple(leaf.shape)]
  if mismatched:
    raise ValueError(f"config.init.source={source!r} does not fit this model; {len(mismatched)} "
                     "parameter(s) differ in shape:\n  " + "\n  ".join(mismatched))
  kept_fresh = sorted(set(own) - set(stored))
  ignored = sorted(set(stored) - set(own))
  # Restore exactly the leaves both have, each onto this model's sharding.
  flat_shardings = _paths(shardings)
  target = {path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=flat_shardings[path])
            for path, leaf in own.items() if path in stored}
  nested: dict = {}
  for path, leaf in target.items():
    node = nested
    *parents, last = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), nested)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": nested}, restore_args={"params": restore_args}, partial_restore=True))
  loaded = _paths(restored["params"])
  treedef = jax.tree.structure(params)
  merged = [loaded.get(path, leaf) for path, leaf in own.items()]
  return (jax.tree.unflatten(treedef, merged),
          {"loaded": len(loaded), "kept_fresh": kept_fresh, "ignored": ignored})
