"""Spec: two real processes (jax.distributed on localhost, CPU gloo collectives) train exactly
what one process trains.

Each process owns one CPU device and feeds only ITS half of every global batch
(`jax.make_array_from_process_local_data`); the mesh is fsdp=2, so parameters and optimizer
state are split across the two processes. After a few steps the parameters (gathered) equal a
single-process run over the same global batches.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import portpicker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _train(out_path: str, coordinator: str | None, num_processes: int, process_id: int) -> None:
  """Trains STEPS steps of the tiny config; process 0 writes the final parameters (npz)."""
  import jax
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  from jax.experimental import multihost_utils
  sys.path.insert(0, os.path.join(REPO, "tests"))
  from coca_jax.core import sharding
  from coca_jax.training import optim
  from coca_jax.training import step
  from test_sharding import tiny_batch, tiny_config

  config = tiny_config()
  config.mesh.update(data=1, fsdp=-1)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config)
  model = step.build_model(config)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  _, shardings = step.state_shardings(model, tx, config, mesh, rules)
  with jax.set_mesh(mesh):
    state = step.make_init_fn(model, tx, config, shardings)(jax.random.key(0))
    train_step = step.make_train_step(model, tx, config, schedule, mesh, shardings, rules)
    for i in range(STEPS):
      batch = tiny_batch(config, seed=i)
      rows = config.train.batch_size // jax.process_count()
      local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows]
               for k, v in batch.items()}
      global_batch = {
          k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v,
                                                    batch[k].shape)
          for k, v in local.items()}
      state, metrics = train_step(state, global_batch)
    params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(out_path, loss=np.asarray(metrics["loss"]),
             **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})
  if coordinator:
    jax.distributed.shutdown()


def _start(tmp_path, num_processes: int):
  """Starts one run (1 or 2 processes); returns (processes, path of the parameters file)."""
  out = str(tmp_path / f"params_{num_processes}.npz")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "JAX_ENABLE_COMPILATION_CACHE": "false",  # see test_sharding
         # One process alone gets two devices, so its mesh (fsdp=2) is the same. Unoptimised
         # CPU code generation: same arithmetic, faster compiles.
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") +
             f" --xla_force_host_platform_device_count={3 - num_processes} "
                      "--xla_backend_optimization_level=0"}
  coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}" if num_processes > 1 else ""
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), out, coordinator, str(num_processes), str(i)],
      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(num_processes)]
  return procs, out


def _wait(procs, out) -> dict:
  for proc in procs:
    _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-4000:]
  with np.load(out) as data:
    return dict(data)


def test_two_processes_train_like_one(tmp_path):
  # Both runs at once: compiling is mostly single-threaded, so they overlap well on 2 cores.
  single_run, multi_run = _start(tmp_path, 1), _start(tmp_path, 2)
  single, multi = _wait(*single_run), _wait(*multi_run)
  assert single.keys() == multi.keys() and len(single) > 10
  for name, value in single.items():
    np.testing.assert_allclose(multi[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  assert np.isfinite(single["loss"])


NO_EVALS = ("--config.evals.zeroshot.enabled=False", "--config.evals.retrieval.enabled=False")


def _train_cli(workdir, num_processes: int, devices_per_process: int, steps: int,
               extra: tuple[str, ...] = (), arg: str = "smoke", wait: bool = True):
  """The train CLI on `num_processes` local processes with `devices_per_process` CPU devices
  each (demo.py:`arg`, a loss logged every step, a checkpoint every 2 steps); with wait=False
  returns the running processes (`_finish` them)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "JAX_ENABLE_COMPILATION_CACHE": "false",  # see test_sharding
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") +
             f" --xla_force_host_platform_device_count={devices_per_process}"}
  args = [sys.executable, "-m", "coca_jax.train", "--config",
          os.path.join(REPO, "experiments", "demo.py") + ":" + arg, "--workdir", str(workdir),
          "--config.train.log_every=1", f"--config.train.steps={steps}",
          # Constant learning rate: a 2-step and a 4-step run train their common steps alike.
          "--config.optim.decay=constant", "--config.optim.warmup_fraction=0.0",
          "--config.checkpoint.every_steps=2", "--config.evals.zeroshot.examples=16",
          "--config.evals.retrieval.examples=16", "--config.evals.captioning.enabled=False",
          *extra]
  if num_processes > 1:
    coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
    args += ["--coordinator_address", coordinator, f"--num_processes={num_processes}"]
  procs = [subprocess.Popen(args + ([f"--process_id={i}"] if num_processes > 1 else []),
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(num_processes)]
  if wait:
    _finish(procs)
  return procs


def _finish(procs) -> None:
  for proc in procs:
    _, stderr = proc.communicate(timeout=500)
    assert proc.returncode == 0, stderr[-4000:]


def _logged_losses(workdir) -> dict:
  import json
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_data_order_does_not_depend_on_the_number_of_processes(tmp_path):
  # 2 processes x 2 devices train on the same global batches as 1 process x 4 devices (each
  # process reads its rows of every global batch), and the 2-process checkpoint resumes in 1
  # process on the same next batch. The reference streams its input; the others take the
  # in-memory path (the smoke split is small): both input paths give the same batches.
  # No evals: this is about the training batches (test_preemption covers 2-process evals).
  one, two = tmp_path / "one", tmp_path / "two"
  _train_cli(one, 1, 4, steps=4, extra=("--config.data.in_memory=never", *NO_EVALS))
  _train_cli(two, 2, 2, steps=2, extra=NO_EVALS)
  reference, first = _logged_losses(one), _logged_losses(two)
  assert sorted(first) == [1, 2]
  for step in (1, 2):
    np.testing.assert_allclose(first[step], reference[step], rtol=1e-5, err_msg=str(step))
  _train_cli(two, 1, 4, steps=4, extra=NO_EVALS)  # resumed from the 2-process checkpoint
  resumed = _logged_losses(two)
  for step in (3, 4):
    np.testing.assert_allclose(resumed[step], reference[step], rtol=1e-5, err_msg=str(step))


def test_a_mixture_trains_alike_on_one_and_two_processes(tmp_path):
  # The mixture (scenes + labelled digits as text, demo.py:mixture) reads each global row from
  # the source and position grain's interleave gives it, whatever the process count: 1 process
  # x 4 devices and 2 processes x 2 devices log the same total and per-source losses. Both runs
  # at once (compiling is mostly single-threaded).
  one, two = tmp_path / "one", tmp_path / "two"
  # max_len 24: the smoke tokenizer cuts "a photo of the digit {}." into 20 pieces with BOS
  # and EOS, which the run refuses at the default 12 (mixture.check_label_texts).
  extra = (*NO_EVALS, "--config.model.text.max_len=24")
  runs = [_train_cli(one, 1, 4, steps=2, arg="smoke,mixture", wait=False, extra=extra),
          _train_cli(two, 2, 2, steps=2, arg="smoke,mixture", wait=False, extra=extra)]
  for procs in runs:
    _finish(procs)
  import json
  records = {}
  for name, workdir in (("one", one), ("two", two)):
    records[name] = {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl"))
                     if "loss" in r}
  assert sorted(records["one"]) == sorted(records["two"]) == [1, 2]
  for step in (1, 2):
    reference, other = records["one"][step], records["two"][step]
    keys = [k for k in reference if k == "loss" or k.startswith(("loss/", "examples/"))]
    assert {"loss/scenes", "loss/digits", "examples/scenes", "examples/digits"} <= set(keys)
    for key in keys:
      np.testing.assert_allclose(other[key], reference[key], rtol=1e-5, err_msg=f"{step} {key}")
    # 16 rows a step at 15:1: 15 scenes, 1 labelled digit.
    assert (reference["examples/scenes"], reference["examples/digits"]) == (15, 1)


if __name__ == "__main__":
  out_path, coordinator, num_processes, process_id = sys.argv[1:5]
  _train(out_path, coordinator or None, int(num_processes), int(process_id))
