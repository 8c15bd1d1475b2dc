"""Safety specs: nothing a user has is lost to a diverging run, a bad checkpoint directory, a
second run on the same workdir, an interrupted build or bad input; no score is ever faked.

CLI runs share two smoke trainings (a 4-step workdir with checkpoints 3 and 4, and an
uninterrupted 6-step reference, both logging every step), copied per test.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax import train as train_lib
from coca_jax.data import build as build_cli
from coca_jax.data import builders
from coca_jax.data import sources
from coca_jax.evaluation import evaluators, metrics
from coca_jax.training import checkpoint
from coca_jax.training import step as step_lib
from conftest import REPO, random_batch, smoke_config

SMOKE = os.path.join(REPO, "experiments", "demo.py") + ":smoke"
SHARED_DATA = []  # conftest's smoke_data flags: no test here is about building the data.


@pytest.fixture(scope="module", autouse=True)
def _shared_smoke_data(smoke_data):
  SHARED_DATA[:] = smoke_data


def _train(workdir, *overrides, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "coca_jax.train", "--config", SMOKE, "--workdir",
                         # A constant learning rate: runs of different lengths then train
                         # the same steps alike, so their losses compare step by step.
                         str(workdir), "--config.train.log_every=1", "--config.optim.decay="
                         "constant", "--config.optim.warmup_fraction=0.0", *SHARED_DATA,
                         *overrides], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _losses(workdir) -> dict:
  from coca_jax.training import metrics_log as metrics  # Reads a NaN loss (written as the string "NaN") back as NaN.
  records = metrics.read_metrics(str(workdir))[0]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Losses of an uninterrupted 6-step smoke run, one per step."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  result = _train(workdir, "--config.train.steps=6")
  assert result.returncode == 0, result.stderr[-3000:]
  return _losses(workdir)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
  """A workdir trained 4 steps: checkpoints 3 and 4 (its dataset and tokenizer: smoke_data)."""
  workdir = tmp_path_factory.mktemp("four") / "run"
  result = _train(workdir, "--config.train.steps=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert checkpoint.step_dirs(str(workdir))[0] == [3, 4]
  return workdir


def _copy(workdir, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(workdir, target)
  return target


def _assert_same_losses(got: dict, want: dict, steps):
  for step in steps:
    assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)


# ---- Problem 1: a diverging run ----------------------------------------------------------------

def test_resume_continues_with_the_uninterrupted_losses(four_steps, reference, tmp_path):
  # Same batches after the restore: a restore that ignored the data iterator's position would
  # train steps 5 and 6 on the first batches again and log other losses.
  workdir = _copy(four_steps, tmp_path)
  result = _train(workdir, "--config.train.steps=6")
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_same_losses(_losses(workdir), reference, range(1, 7))


def test_nonfinite_halt_exits_nonzero_and_keeps_the_good_checkpoints(four_steps, tmp_path):
  workdir = _copy(four_steps, tmp_path)
  good = {s: _params(workdir, s) for s in (3, 4)}
  result = _train(workdir, "--config.train.steps=12", "--config.optim.lr=1e30",
                  "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=2")
  assert result.returncode == train_lib.NONFINITE_EXIT_CODE, result.stderr[-3000:]
  assert "non-finite loss, gradient norm or updated state at step" in result.stderr
  bad_step = int(result.stderr.split("gradient norm or updated state at step ")[1].split()[0])
  assert not np.isfinite(_losses(workdir)[bad_step])
  steps = checkpoint.step_dirs(str(workdir))[0]
  assert steps and max(steps) < bad_step
  for step in steps:  # every checkpoint left is finite; nothing was evaluated into a fake score
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_params(workdir, step)))
  if 4 in steps:
    jax.tree.map(np.testing.assert_array_equal, _params(workdir, 4), good[4])
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert not any("eval/zeroshot_top1" in r and r["step"] >= bad_step for r in records)


def _params(workdir, step):
  from coca_jax.inference import api
  config = checkpoint.read_config(str(workdir))
  abstract = step_lib.abstract_params(config)
  state_dir = os.path.join(checkpoint.checkpoint_dir(str(workdir)), str(step), checkpoint.STATE)
  return jax.tree.map(np.asarray, api.restore_params_from_state(state_dir, abstract))


def test_skip_policy_leaves_the_state_bit_identical_across_a_bad_step():
  config = smoke_config()
  config.train.nonfinite = "skip"
  built = step_lib.setup(config)
  state = built.init_state()
  train_step = built.train_step()
  good = random_batch(config, config.train.batch_size)
  bad = dict(good, image=good["image"].at[0, 0, 0, 0].set(jnp.nan))
  with jax.set_mesh(built.mesh):
    state, metrics = train_step(state, good)
    assert int(metrics["nonfinite"]) == 0
    before = jax.tree.map(np.array, state)  # the step donates its input state
    state, metrics = train_step(state, bad)
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    after = jax.tree.map(np.array, state)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, after, before)))
    assert int(state.step) == 1
    state, metrics = train_step(state, good)  # and then it trains on
    assert int(metrics["nonfinite"]) == 0 and int(state.step) == 2


def test_nonfinite_watch_policies():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  flags = [0, 1, 0, 1, 1, 1, 0]

  halt = train_lib.NonFiniteWatch("halt", 3, mesh)
  halt.observe({"nonfinite": jnp.int32(0)}, 1)
  assert halt.check() == {"nonfinite_steps": 0}
  halt.observe({"nonfinite": jnp.int32(1)}, 2)
  with pytest.raises(train_lib.NonFiniteError, match="at step 2"):
    halt.check()

  skip = train_lib.NonFiniteWatch("skip", 3, mesh)
  for step, flag in enumerate(flags[:5], 1):
    skip.observe({"nonfinite": jnp.int32(flag)}, step)
  assert skip.check() == {"nonfinite_steps": 3}  # 2 in a row at most: goes on
  skip.observe({"nonfinite": jnp.int32(1)}, 6)
  skip.observe({"nonfinite": jnp.int32(0)}, 7)  # the streak ended before the read: still seen
  with pytest.raises(train_lib.NonFiniteError, match="3 consecutive .*the last at step 6"):
    skip.check()


def test_an_update_that_leaves_a_nonfinite_state_is_flagged_and_skipped():
  # The loss and the gradient are finite, but a learning rate past float32's range makes the
  # update inf: a guard that looked at the loss alone would let that state be saved.
  config = smoke_config()
  config.train.nonfinite = "skip"
  config.optim.lr = 1e39
  built = step_lib.setup(config)
  state = built.init_state()
  with jax.set_mesh(built.mesh):
    before = jax.tree.map(np.array, state)
    state, metrics = built.train_step()(state, random_batch(config, config.train.batch_size))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(metrics["nonfinite"]) == 1
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, jax.tree.map(np.array, state),
                                          before)))


def _max_abs(params) -> float:
  return max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("policy", ["halt", "skip"])
def test_exploded_but_finite_weights_never_rotate_the_newest_good_checkpoint_away(
    four_steps, tmp_path, policy):
  # lr=1e30: step 5's loss (from checkpoint 4) is finite and its update plants finite weights
  # of ~1e29, whose forward pass is NaN from step 6 on. With keep=1, rotation must still keep
  # checkpoint 4, the newest one a clean step ran from, and the message must name it.
  workdir = _copy(four_steps, tmp_path)
  good = _params(workdir, 4)
  result = _train(workdir, "--config.train.steps=12", "--config.optim.lr=1e30",
                  f"--config.train.nonfinite={policy}", "--config.train.max_consecutive_skips=3",
                  "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=1")
  assert result.returncode == train_lib.NONFINITE_EXIT_CODE, result.stderr[-3000:]
  steps = checkpoint.step_dirs(str(workdir))[0]
  assert 4 in steps, steps
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, 4), good)
  exploded = [s for s in steps if s > 4]
  assert exploded, steps  # the exploded state was saved (it is finite), but not alone
  for step in exploded:
    params = _params(workdir, step)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    assert _max_abs(params) > 1e20
  assert json.loads((workdir / checkpoint.KNOWN_GOOD_FILE).read_text()) == {"step": 4}
  error = result.stderr.split("error: ")[-1]
  assert "Step 4 is known-good" in error and "--resume_step=4" in error
  assert f"Not known to be good: {exploded}" in error
  assert "intact" not in error and "saved state is finite" not in error


def test_rotation_keeps_the_known_good_step_whatever_keep_says(tmp_path):
  config = smoke_config()
  built = step_lib.setup(config)
  state = built.init_state()
  known_good = checkpoint.KnownGood()
  manager = checkpoint.make_manager(str(tmp_path), keep=1, async_save=False,
                                    known_good=known_good)
  for step in range(1, 5):
    if step == 3:
      known_good.step = 2
    checkpoint.save(manager, step, state, force=True)
  manager.close()
  assert checkpoint.step_dirs(str(tmp_path))[0] == [2, 4]


def test_nan_embeddings_never_score():
  rng = np.random.default_rng(0)
  images, classifier = rng.normal(size=(8, 4)), rng.normal(size=(3, 4))
  nan = np.full_like(images, np.nan)
  with pytest.raises(metrics.NonFiniteEmbeddings, match="image_embeds"):
    metrics.zero_shot_accuracy(nan, classifier, np.zeros(8, int))
  with pytest.raises(metrics.NonFiniteEmbeddings, match="text_embeds"):
    metrics.retrieval_metrics(images, nan, np.arange(8))

  class NanEmbedder:
    def embed_images(self, x):
      return np.full((len(x), 4), np.nan, np.float32)

    def embed_texts(self, texts):
      return np.full((len(texts), 4), np.nan, np.float32)

  class Source:
    name, split = "fake", "digits"

    def batches(self, size, limit=None):
      del size, limit
      yield {"image": np.zeros((8, 2, 2, 3), np.uint8), "captions": [["a"]] * 8,
             "label": np.zeros(8, np.int64)}

  zero_shot = evaluators.zeroshot_eval(NanEmbedder(), Source(), ["a", "b"], ["{}"])
  retrieval = evaluators.retrieval_eval(NanEmbedder(), Source())
  # Every score is NaN; the recall ceilings come from the captions alone and stay finite.
  scores = {k: v for k, v in (*zero_shot.items(), *retrieval.items()) if "_ceiling" not in k}
  assert scores and all(np.isnan(v) for v in scores.values()), scores


# ---- Problem 3: one bad checkpoint directory ---------------------------------------------------

def test_corrupted_latest_checkpoint_and_junk_dirs_fall_back_to_the_previous_step(
    four_steps, reference, tmp_path):
  workdir = _copy(four_steps, tmp_path)
  step_dir = workdir / "checkpoints" / "4" / "state"
  data_files = [os.path.join(root, name) for root, _, names in os.walk(step_dir)
                for name in names if os.path.basename(root) == "d"]
  assert data_files
  for path in data_files:  # truncate every array data file of the latest step
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  (workdir / "checkpoints" / "999").mkdir()
  (workdir / "checkpoints" / "999" / "garbage").write_bytes(b"\0" * 10)
  (workdir / "checkpoints" / "notes").mkdir()

  result = _train(workdir, "--config.train.steps=6")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from step 3" in result.stderr
  assert "step 4: restoring failed" in result.stderr  # step and reason
  assert "Ignoring" in result.stderr and "notes" in result.stderr
  _assert_same_losses(_losses(workdir), reference, (4, 5, 6))
  assert checkpoint.step_dirs(str(workdir))[0] == [5, 6] or 6 in checkpoint.step_dirs(
      str(workdir))[0]
  assert sorted(os.listdir(workdir / checkpoint.SET_ASIDE)) == ["4", "999"]


@pytest.mark.parametrize("damage", ["metadata", "data_position"])
def test_incomplete_checkpoints_are_reported_with_their_reason(four_steps, tmp_path, damage):
  workdir = _copy(four_steps, tmp_path)
  step4 = workdir / "checkpoints" / "4"
  if damage == "metadata":
    os.remove(step4 / "state" / "_METADATA")
  else:
    os.remove(step4 / "data" / "position.json")
  _, step, skipped = checkpoint.restore_newest_readable(str(workdir), lambda s: s)
  assert step == 3 and skipped[0][0] == 4
  assert ("_METADATA" if damage == "metadata" else "position") in skipped[0][1]


def test_resume_step_and_changed_model_are_explained(four_steps, reference, tmp_path):
  workdir = _copy(four_steps, tmp_path)
  changed = _train(workdir, "--config.train.steps=6", "--config.model.vision.width=64")
  assert changed.returncode == 2
  assert "config.model.vision.width: 32 in config.json, 64 now" in changed.stderr
  assert "strict" not in changed.stderr

  result = _train(workdir, "--config.train.steps=5", "--resume_step=3")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from step 3" in result.stderr
  _assert_same_losses(_losses(workdir), reference, (4, 5))
  assert os.listdir(workdir / checkpoint.SET_ASIDE) == ["4"]  # newer: moved aside, not deleted


# ---- Problem 4: two trainings on one workdir ---------------------------------------------------

def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, caplog):
  first = checkpoint.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(checkpoint.CheckpointError, match="in use by another training"):
    checkpoint.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  assert not (tmp_path / checkpoint.LOCK_FILE).exists()

  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / checkpoint.LOCK_FILE).write_text(json.dumps(
      {"pid": dead.pid, "host": __import__("socket").gethostname(), "started": "earlier"}))
  taken = checkpoint.WorkdirLock(str(tmp_path)).acquire()
  assert "stale lock" in caplog.text
  assert json.loads((tmp_path / checkpoint.LOCK_FILE).read_text())["pid"] == os.getpid()
  taken.release()

  (tmp_path / checkpoint.LOCK_FILE).write_text(json.dumps(
      {"pid": 1, "host": "another-host", "started": "earlier"}))
  with pytest.raises(checkpoint.CheckpointError, match="another-host"):
    checkpoint.WorkdirLock(str(tmp_path)).acquire()


_FULL_DISK_AT_STEP_4 = """
import errno, sys
from coca_jax.training import checkpoint
from coca_jax import train
real_save = checkpoint.save
def save(manager, step, *args, **kwargs):
  if step >= 4:
    raise OSError(errno.ENOSPC, "No space left on device")
  return real_save(manager, step, *args, **kwargs)
checkpoint.save = save
sys.argv = ["train"] + sys.argv[1:]
train.run()
"""


def test_a_full_disk_during_a_save_gives_one_message(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-c", _FULL_DISK_AT_STEP_4, "--config", SMOKE, "--workdir", str(workdir),
       "--config.train.steps=6", "--config.checkpoint.every_steps=2", *SHARED_DATA],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  error = result.stderr.split("error: ")[-1]
  assert "the disk is full: writing the checkpoint of step 4" in error
  config = checkpoint.read_config(str(workdir))
  needed = checkpoint.state_bytes(step_lib.setup(config).abstract_state)
  assert f"needs up to {needed / 1000:.1f} KB" in error
  # Step 2 is known-good once step 3 ran cleanly from it (marked when its async save is done).
  assert re.search(r"Complete checkpoints on disk \(checked now\): steps 2( \(known-good\))?\.",
                   error), error
  assert "re-run the same command: it resumes from step 2" in error
  assert checkpoint.step_dirs(str(workdir))[0] == [2]


def test_train_refuses_a_workdir_locked_by_a_live_run(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    (tmp_path / checkpoint.LOCK_FILE).write_text(json.dumps(
        {"pid": holder.pid, "host": __import__("socket").gethostname(), "started": "now"}))
    result = _train(tmp_path, "--config.train.steps=2")
    assert result.returncode == 2
    assert f"pid {holder.pid}" in result.stderr and "in use by another training" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
  finally:
    holder.kill()
    holder.wait()


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_losses(
    reference, tmp_path):
  # Killed hard (no handler runs: the lock stays, a save may be cut off) at random moments,
  # each re-run resumes from what is readable and the logged losses are the uninterrupted ones.
  workdir = tmp_path / "run"
  rng = np.random.default_rng(int(time.time()))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  args = [sys.executable, "-m", "coca_jax.train", "--config", SMOKE, "--workdir", str(workdir),
          "--config.train.log_every=1", "--config.train.steps=6", "--config.optim.decay=constant",
          "--config.optim.warmup_fraction=0.0",
          "--config.checkpoint.every_steps=1"]
  for _ in range(2):
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    metrics_file = workdir / "metrics.jsonl"
    start = len(metrics_file.read_text().splitlines()) if metrics_file.exists() else 0
    while time.time() < deadline and proc.poll() is None and (
        not metrics_file.exists() or len(metrics_file.read_text().splitlines()) <= start):
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  losses = {}
  for r in records:  # a step logged before a kill and again after it must agree
    if "loss" in r:
      assert r["loss"] == pytest.approx(losses.setdefault(r["step"], r["loss"]), rel=1e-5)
  _assert_same_losses(losses, reference, sorted(losses))
  assert max(losses) == 6


# ---- Problem 2: interrupted builds -------------------------------------------------------------

def test_a_build_killed_midway_is_rebuilt_on_rerun(tmp_path, caplog):
  data_dir = tmp_path / "tfds"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
      [sys.executable, "-m", "coca_jax.data.build", "--format", "demo", "--name", "scenes",
       "--data_dir", str(data_dir), "--num_train", "20000", "--num_test", "10",
       "--num_digits", "10", "--image_size", "32", "--no_progress"],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and not any(
      "incomplete" in path for path, _, _ in os.walk(data_dir)):
    assert proc.poll() is None, "the build ended before it could be interrupted"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not builders.is_built("scenes", str(data_dir))
  with pytest.raises(FileNotFoundError, match="no finished build|not found"):
    sources.open_source("scenes", str(data_dir), "train")

  # What train does on a re-run: it sees no finished build, cleans up and builds again.
  version_dir, report = builders.build_atomically(
      "demo", "scenes", str(data_dir), num_train=20, num_test=4, num_digits=4, image_size=32,
      show_progress=False)
  assert "interrupted build" in caplog.text
  assert report["train"].written == 20
  assert len(sources.open_source("scenes", str(data_dir), "train")) == 20
  assert sorted(os.listdir(data_dir)) == ["scenes"]  # no temporary directory left


def test_two_concurrent_builds_do_not_corrupt_each_other(tmp_path):
  data_dir = tmp_path / "tfds"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  args = [sys.executable, "-m", "coca_jax.data.build", "--format", "demo", "--name", "scenes",
          "--data_dir", str(data_dir), "--num_train", "200", "--num_test", "4",
          "--num_digits", "4", "--image_size", "32", "--no_progress"]
  procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outcomes = [p.communicate(timeout=300) for p in procs]
  codes = [p.returncode for p in procs]
  # One builds; the other either builds too (the first rename wins) or, if it started after the
  # first finished, refuses to overwrite. Never a crash, never a broken dataset.
  assert 0 in codes and set(codes) <= {0, 2}, outcomes
  assert len(sources.open_source("scenes", str(data_dir), "train")) == 200
  assert sorted(os.listdir(data_dir)) == ["scenes"]


# ---- Problem 5: inputs that gave silently wrong answers ----------------------------------------

def _png(seed=0) -> bytes:
  import io
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), np.uint8)).save(
      buffer, format="PNG")
  return buffer.getvalue()


def test_caption_file_paths_are_confined_to_src(tmp_path, capsys):
  src = tmp_path / "photos"
  src.mkdir()
  (src / "in.png").write_bytes(_png(0))
  (tmp_path / "outside.png").write_bytes(_png(1))
  (src / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in [
      {"image": "in.png", "caption": "inside"},
      {"image": "../outside.png", "caption": "parent"},
      {"image": str(tmp_path / "outside.png"), "caption": "absolute"}]) + "\n")
  argv = ["--format", "folder", "--src", str(src), "--name", "confined", "--data_dir",
          str(tmp_path / "tfds"), "--no_progress"]
  assert build_cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "train: 1 examples written" in out and "outside --src" in out
  assert build_cli.main(argv + ["--overwrite", "--allow_outside_src"]) == 0
  assert "train: 3 examples written" in capsys.readouterr().out


def test_duplicate_webdataset_keys_get_unique_names(tmp_path):
  import io
  import tarfile
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
    with tarfile.open(tmp_path / folder / "00000.tar", "w") as tar:
      for name, data in (("k.png", _png(0)), ("k.txt", f"from {folder}".encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  _, report = builders.build_atomically("webdataset", "dupes", str(tmp_path / "tfds"),
                                        src=str(tmp_path / "*" / "00000.tar"),
                                        show_progress=False)
  assert report["train"].written == 2
  assert report["train"].converted["duplicate key renamed KEY#N"] == 1
  source = sources.open_source("dupes", str(tmp_path / "tfds"), "train")
  assert sorted(source[i]["key"].decode() for i in range(2)) == ["00000.tar/k", "00000.tar/k#2"]


def test_an_all_bad_build_prints_its_skip_report(tmp_path, capsys):
  src = tmp_path / "photos"
  src.mkdir()
  (src / "x.png").write_bytes(b"broken")
  (src / "captions.jsonl").write_text('{"image": "x.png", "caption": "an x"}\n'
                                      '{"image": "gone.png", "caption": "a y"}\n')
  code = build_cli.main(["--format", "folder", "--src", str(src), "--name", "all_bad",
                         "--data_dir", str(tmp_path / "tfds"), "--no_progress"])
  err = capsys.readouterr().err
  assert code == 2
  assert "no usable example in split(s) train" in err
  assert "unreadable image" in err and "missing image file" in err and "gone.png" in err


def test_eval_splits_and_prompts_are_checked_before_training(tmp_path):
  result = _train(tmp_path / "run", "--config.train.steps=2",
                  "--config.evals.retrieval.split=validation",
                  "--config.evals.zeroshot.split=test")  # scenes: no digit labels
  assert result.returncode == 2, result.stderr[-3000:]
  assert "config.evals.retrieval.split='validation' cannot be read" in result.stderr
  assert "config.evals.zeroshot.split='test' has label -1, outside the 10" in result.stderr
  assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_zero_shot_names_and_templates_are_checked():
  from coca_jax.core import config as config_lib
  config = smoke_config()
  config.evals.zeroshot.update(class_names=["zero", "zero", "one"],
                               templates=["a {} digit", "no placeholder"])

  class Source:
    def __len__(self):
      return 3

    def __getitem__(self, index):
      return {"label": 2}

  with pytest.raises(config_lib.ConfigError) as err:
    evaluators.check_evals(config, lambda split, dataset: Source())
  assert "repeats ['zero']" in str(err.value) and "'no placeholder'" in str(err.value)


def test_zero_shot_transfer_splits_are_checked():
  from coca_jax.core import config as config_lib
  config = smoke_config()
  config.evals.zeroshot.transfer_splits = ["mnist_on_white", "test", "missing"]

  class Source:
    def __init__(self, label):
      self.label = label

    def __len__(self):
      return 3

    def __getitem__(self, index):
      return {"label": self.label}

  def make_source(split, dataset=""):
    del dataset  # The run's own dataset.
    if split == "missing":
      raise FileNotFoundError("no split 'missing'")
    return Source(-1 if split == "test" else 4)  # Scenes carry label -1.

  with pytest.raises(config_lib.ConfigError) as err:
    evaluators.check_evals(config, make_source)
  message = str(err.value)
  assert "transfer_splits names 'missing', which cannot be read" in message
  assert "transfer_splits entry 'test' has label -1, outside the 10" in message
  assert "mnist_on_white" not in message  # A good split raises nothing.
  # Per-split prompts: one list per split, each template with one '{}'.
  config.evals.zeroshot.transfer_splits = ["mnist_on_white", "mnist_on_black"]
  config.evals.zeroshot.transfer_templates = [["a black {}"]]
  with pytest.raises(config_lib.ConfigError, match="has 1 entries for 2 transfer_splits"):
    evaluators.check_evals(config, make_source)
  config.evals.zeroshot.transfer_templates = [["a black"], []]
  with pytest.raises(config_lib.ConfigError,
                     match=r"transfer_templates for 'mnist_on_white': \['a black'\]"):
    evaluators.check_evals(config, make_source)
  config.evals.zeroshot.transfer_templates = [["a black {}"], []]
  evaluators.check_evals(config, make_source)


# Claimants are spawned processes (forking a process that imported JAX can deadlock the child
# on a lock a native thread held); each is started once and takes part in every trial.
_STALE_LOCK_TRIALS = """
import json, multiprocessing, os, socket, subprocess, sys

def claim(workdirs, starts, dones, results, holders):
  from coca_jax.training import checkpoint
  for workdir, start, done in zip(workdirs, starts, dones):
    start.wait()
    held = False
    try:
      checkpoint.WorkdirLock(workdir).acquire()
      held = True
      results.put((os.getpid(), "held"))
    except checkpoint.CheckpointError as e:
      results.put((os.getpid(), "refused: %s" % e))
    except Exception as e:  # reported, not a hang
      results.put((os.getpid(), "crashed: %r" % e))
    done.wait()  # every claimant has tried; the holder (still alive) reads whose pid the LOCK has
    if held:
      with open(os.path.join(workdir, checkpoint.LOCK_FILE)) as f:
        holders.put(json.load(f)["pid"] == os.getpid())

if __name__ == "__main__":
  from coca_jax.training import checkpoint
  root, claimants, trials = sys.argv[1], 8, 6
  ctx = multiprocessing.get_context("spawn")
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  workdirs = [os.path.join(root, "trial%d" % t) for t in range(trials)]
  for t, workdir in enumerate(workdirs):
    os.mkdir(workdir)
    with open(os.path.join(workdir, checkpoint.LOCK_FILE), "w") as f:
      json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": "trial %d" % t}, f)
  starts = [ctx.Barrier(claimants) for _ in workdirs]
  dones = [ctx.Barrier(claimants) for _ in workdirs]
  results, holders = ctx.Queue(), ctx.Queue()
  procs = [ctx.Process(target=claim, args=(workdirs, starts, dones, results, holders))
           for _ in range(claimants)]
  for p in procs:
    p.start()
  report = []
  for workdir in workdirs:
    outcomes = [outcome for _, outcome in (results.get(timeout=300) for _ in procs)]
    # The LOCK names the one holder after every claimant tried (none overwrote it).
    lock_is_the_holders = holders.get(timeout=300) if "held" in outcomes else False
    report.append({"outcomes": outcomes, "holder_is_the_taker": lock_is_the_holders})
  for p in procs:
    p.join(timeout=60)
  print(json.dumps(report))
"""


def test_a_stale_lock_has_exactly_one_taker_among_concurrent_claimants(tmp_path):
  # Read, liveness check and removal of a stale LOCK are three steps; 8 claimants doing them at
  # once must still leave exactly one holder, in every trial.
  script = tmp_path / "claimants.py"
  script.write_text(_STALE_LOCK_TRIALS)
  (tmp_path / "runs").mkdir()
  result = subprocess.run([sys.executable, str(script), str(tmp_path / "runs")], cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  trials = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(trials) == 6
  for trial, report in enumerate(trials):
    assert report["outcomes"].count("held") == 1, (trial, report["outcomes"])
    assert all(o == "held" or o.startswith("refused: ") for o in report["outcomes"]), report
    assert report["holder_is_the_taker"], (trial, report)
