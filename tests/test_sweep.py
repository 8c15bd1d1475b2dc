"""Sweep specs: expansion and trial names, validation of every trial before anything runs, the
results table with the best per metric marked, and a half-finished sweep re-run that finishes
only what is missing."""

import csv
import functools
import json
import os
import shlex
import subprocess
import sys

import pytest

from coca_jax import sweep
from coca_jax.core import config as config_lib
from conftest import REPO, smoke_config

SMOKE = os.path.join(REPO, "experiments", "demo.py") + ":smoke"


def test_product_and_zip_expand_in_order():
  trials = sweep.product({"optim.lr": [1e-3, 3e-3]}, {"train.seed": [0, 1, 2]})
  assert len(trials) == 6
  assert trials[0] == {"optim.lr": 1e-3, "train.seed": 0}
  assert trials[3] == {"optim.lr": 3e-3, "train.seed": 0}  # The first part varies slowest.
  zipped = sweep.zip({"optim.lr": [1e-3, 3e-3], "optim.warmup_steps": [10, 30]})
  assert zipped == [{"optim.lr": 1e-3, "optim.warmup_steps": 10},
                    {"optim.lr": 3e-3, "optim.warmup_steps": 30}]
  # Parts compose: a zipped pair of axes crossed with seeds.
  assert len(sweep.product(zipped, {"train.seed": [0, 1]})) == 4
  with pytest.raises(ValueError, match="one length"):
    sweep.zip({"optim.lr": [1e-3, 3e-3], "train.seed": [0]})


def test_trial_names_are_short_safe_and_unique():
  names = sweep.trial_names([
      {"optim.lr": 0.001, "model.text.width": 32}, {"optim.lr": 3e-4, "model.text.width": 64},
      {"data.name": "a/b c"}, {"data.name": "a/b c"}, {}])
  assert names[:2] == ["lr=0.001_width=32", "lr=0.0003_width=64"]
  assert names[2] == "name=a-b-c" and names[3] == "name=a-b-c_2"  # No '/', no space, unique.
  assert names[4] == "base"
  # Two swept keys with the same last part keep their full paths.
  assert sweep.trial_names([{"model.vision.width": 8, "model.text.width": 4}]) == [
      "model.vision.width=8_model.text.width=4"]


def test_every_bad_trial_is_reported_before_anything_runs(tmp_path):
  with pytest.raises(config_lib.ConfigError) as err:
    sweep.make_trials(SMOKE, smoke_config(), str(tmp_path),
                      [{"optim.lrr": 1e-3}, {"train.steps": "ten"}, {"optim.lr": -1.0}], [])
  text = str(err.value)
  assert "3 sweep problem(s)" in text
  assert "'optim.lrr' is not a config key; did you mean 'optim.lr'?" in text
  assert "trial steps=ten: train.steps='ten'" in text
  assert "config.optim.lr=-1.0 must be > 0" in text


def _fake_trial(root, name, overrides, losses, evals, finished=True, steps=4):
  workdir = os.path.join(root, name)
  os.makedirs(os.path.join(workdir, "checkpoints", str(steps if finished else 2)))
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for i, loss in enumerate(losses):
      f.write(json.dumps({"step": 2 * (i + 1), "loss": loss, "contrastive_loss": loss / 3,
                          "caption_loss": loss / 3, "learning_rate": 1e-3}) + "\n")
    if evals:
      f.write(json.dumps({"step": 2 * len(losses), **evals}) + "\n")
  if finished:
    with open(os.path.join(workdir, sweep.TRIAL_FILE), "w") as f:
      json.dump({"status": "finished", "steps": steps}, f)
  return sweep.Trial(name, overrides, workdir, steps)


def test_results_table_marks_the_best_per_metric(tmp_path):
  root = str(tmp_path)
  trials = [
      _fake_trial(root, "lr=0.001", {"optim.lr": 1e-3}, [5.0, 4.0], {"eval/zeroshot_top1": 0.5}),
      _fake_trial(root, "lr=0.003", {"optim.lr": 3e-3}, [5.0, 3.0], {"eval/zeroshot_top1": 0.25}),
      _fake_trial(root, "lr=0.01", {"optim.lr": 1e-2}, [6.0], {}, finished=False)]
  assert [t.status() for t in trials] == ["finished", "finished", "partial (step 2 of 4)"]
  written = sweep.write_results(root, trials)
  assert sorted(os.path.basename(p) for p in written) == ["curves.png", "results.csv",
                                                          "results.md"]
  with open(os.path.join(root, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["trial"] for r in rows] == ["lr=0.001", "lr=0.003", "lr=0.01"]
  assert float(rows[1]["loss"]) == 3.0 and rows[2]["step"] == "2"
  assert rows[0]["best_in"] == "eval/zeroshot_top1"                   # Highest accuracy.
  assert set(rows[1]["best_in"].split(";")) == {"loss", "contrastive_loss", "caption_loss"}
  assert rows[2]["best_in"] == ""
  md = open(os.path.join(root, "results.md")).read()
  assert "| lr=0.003 | finished | 4 | 0.003 | **3** |" in md
  assert "**0.5**" in md and "**0.25**" not in md
  with open(os.path.join(root, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _sweep_cli(root, *args, data_flags=()):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
      [sys.executable, "-m", "coca_jax.sweep", "--config", SMOKE, "--workdir", root,
       "--config.train.steps=2", "--config.checkpoint.every_steps=0",
       "--config.evals.captioning.enabled=False", *data_flags, *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_half_finished_sweep_rerun_finishes_only_what_is_missing(tmp_path, smoke_data):
  root = str(tmp_path / "sweep")
  sweep_cli = functools.partial(_sweep_cli, data_flags=smoke_data)  # Every trial reads them.
  first = sweep_cli(root, "--trials", "lr=0.001")   # As if the sweep died after one trial.
  assert first.returncode == 0, first.stdout + first.stderr[-3000:]
  done_metrics = os.path.join(root, "lr=0.001", "metrics.jsonl")
  before = open(done_metrics).read()
  assert not os.path.exists(os.path.join(root, "lr=0.003"))

  dry = sweep_cli(root, "--dry_run")
  assert "lr=0.001  [finished]" in dry.stdout and "lr=0.003  [new]" in dry.stdout
  (command,) = sweep_cli(root, "--print_commands").stdout.splitlines()  # Unfinished ones only.
  words = shlex.split(command)
  assert words[1:3] == ["-m", "coca_jax.train"]
  assert words[words.index("--workdir") + 1] == os.path.join(root, "lr=0.003")
  assert words[-1] == "--config.optim.lr=0.003" and "--config.train.steps=2" in words

  second = sweep_cli(root)
  assert second.returncode == 0, second.stdout + second.stderr[-3000:]
  assert "lr=0.001: finished before, skipped" in second.stdout
  assert "lr=0.003: starting" in second.stdout
  assert "1 run to the end, 1 skipped" in second.stdout
  assert open(done_metrics).read() == before        # The finished trial was not touched.
  with open(os.path.join(root, "results.csv")) as f:
    rows = {r["trial"]: r for r in csv.DictReader(f)}
  assert set(rows) == {"lr=0.001", "lr=0.003"}
  for row in rows.values():
    assert row["status"] == "finished" and row["step"] == "2"
    assert 0.0 <= float(row["eval/zeroshot_top1"]) <= 1.0
  assert float(rows["lr=0.003"]["optim.lr"]) == 0.003
  assert json.load(open(os.path.join(root, "lr=0.003", "config.json")))["optim"]["lr"] == 0.003


def _scripted_trial(root, name, code, steps=2):
  """A trial whose command is a tiny Python script instead of a training run."""
  workdir = os.path.join(root, name)
  return sweep.Trial(name, {}, workdir, steps, [sys.executable, "-c", code, workdir])


def test_trials_run_in_parallel_and_a_failed_one_is_retried(tmp_path):
  ok = ("import os, sys, time; d = sys.argv[1]; t0 = time.time(); time.sleep(1.0); "
        "os.makedirs(os.path.join(d, 'checkpoints', '2')); "
        "open(os.path.join(d, 'span'), 'w').write(f'{t0} {time.time()}')")
  trials = [_scripted_trial(str(tmp_path), "a", ok), _scripted_trial(str(tmp_path), "b", ok),
            _scripted_trial(str(tmp_path), "c", "import sys; sys.exit(3)")]
  said = []
  counts = sweep.run_trials(trials, parallel=3, say=said.append)
  assert counts == {"skipped": 0, "finished": 2, "failed": 1}
  spans = [tuple(map(float, open(tmp_path / n / "span").read().split())) for n in "ab"]
  assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # They overlapped.
  assert [t.status() for t in trials] == ["finished", "finished", "failed (exit 3)"]
  assert any("c: FAILED (exit 3" in line for line in said)
  # A re-run skips the finished trials and tries the failed one again.
  said.clear()
  counts = sweep.run_trials(trials, parallel=1, say=said.append)
  assert counts == {"skipped": 2, "finished": 0, "failed": 1}
  assert "a: finished before, skipped" in said
