"""Spec: two real processes (jax.distributed on localhost, CPU gloo collectives) train exactly
what one process trains, on the same global batches, and a checkpoint of one resumes in the other.

The train CLI runs on 1 process x 4 CPU devices and on 2 processes x 2 devices, with the same
mesh (fsdp=4: parameters and optimizer state split over both processes). Each process feeds
only ITS rows of every global batch. One set of runs serves the properties below (processes
are the slow part of these tests): the losses of every step and the parameters after 2 steps
equal the single-process run's, and the 2-process checkpoint resumes in 1 process on the same
next batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from coca_jax.inference import api

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


# Parameters and optimizer state split over all devices of both processes. AdamW's eps=1: its
# first updates are then lr * g / (|g| + 1), smooth in g, so parameters compare with a tight
# tolerance (with eps=1e-8 an update is ~lr * sign(g), which flips on round-off for gradients
# that are zero up to round-off; see test_sharding).
FSDP = ("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.optim.eps=1.0")


def _params(workdir, step: int) -> dict:
  """{path: array} of the parameters checkpointed at `step` (gathered into this process)."""
  leaves = jax.tree_util.tree_flatten_with_path(api.load(str(workdir), step=step).params)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smoke_data):
  """1 process x 4 devices trains 4 steps (the reference; it streams its input, the others take
  the in-memory path: both give the same batches); 2 processes x 2 devices train 2 steps (both
  runs at once: compiling is mostly single-threaded); then 1 process x 4 devices resumes the
  2-process run to step 4. No evals: this is about training (test_preemption covers 2-process
  evals). All read conftest's smoke_data. Returns the logged losses and the step-2 parameters
  of each run."""
  root = tmp_path_factory.mktemp("multihost")
  one, two = root / "one", root / "two"
  started = [_train_cli(one, 1, 4, steps=4, wait=False,
                        extra=("--config.data.in_memory=never", *NO_EVALS, *FSDP, *smoke_data)),
             _train_cli(two, 2, 2, steps=2, wait=False, extra=(*NO_EVALS, *FSDP, *smoke_data))]
  for procs in started:
    _finish(procs)
  result = {"reference": _logged_losses(one), "two_processes": _logged_losses(two),
            "params_one": _params(one, 2), "params_two": _params(two, 2)}
  _train_cli(two, 1, 4, steps=4, extra=(*NO_EVALS, *FSDP, *smoke_data))  # resumed from the 2-process step 2
  result["resumed"] = _logged_losses(two)
  return result


def test_two_processes_train_like_one(runs):
  single, multi = runs["params_one"], runs["params_two"]
  assert single.keys() == multi.keys() and len(single) > 10
  for name, value in single.items():
    np.testing.assert_allclose(multi[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_data_order_does_not_depend_on_the_number_of_processes(runs):
  # 2 processes x 2 devices train on the same global batches as 1 process x 4 devices (each
  # process reads its rows of every global batch).
  reference, first = runs["reference"], runs["two_processes"]
  assert sorted(first) == [1, 2] and sorted(reference) == [1, 2, 3, 4]
  for step in (1, 2):
    np.testing.assert_allclose(first[step], reference[step], rtol=1e-5, err_msg=str(step))
  assert all(np.isfinite(loss) for loss in reference.values())


def test_a_two_process_checkpoint_resumes_in_one_process_on_the_same_next_batches(runs):
  resumed, reference = runs["resumed"], runs["reference"]
  for step in (3, 4):
    np.testing.assert_allclose(resumed[step], reference[step], rtol=1e-5, err_msg=str(step))


def test_a_mixture_trains_alike_on_one_and_two_processes(tmp_path):
  # The mixture (scenes + labelled digits as text, demo.py:mixture) reads each global row from
  # the source and position grain's interleave gives it, whatever the process count: 1 process
  # x 4 devices and 2 processes x 2 devices log the same total and per-source losses. Both runs
  # at once (compiling is mostly single-threaded).
  one, two = tmp_path / "one", tmp_path / "two"
  extra = NO_EVALS
  runs = [_train_cli(one, 1, 4, steps=2, arg="smoke,mixture", wait=False, extra=extra),
          _train_cli(two, 2, 2, steps=2, arg="smoke,mixture", wait=False, extra=extra)]
  for procs in runs:
    _finish(procs)
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
    # The global batch splits as the run's source weights say (16 rows at demo.py's 3:1: 12
    # scenes, 4 labelled digits).
    config = json.load(open(one / "config.json"))
    weights = {s["tag"]: s["weight"] for s in config["data"]["sources"]}
    batch = config["train"]["batch_size"]
    for tag, weight in weights.items():
      assert reference[f"examples/{tag}"] == batch * weight / sum(weights.values()), tag

