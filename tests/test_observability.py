"""Observability specs: a run's TensorBoard events carry exactly the keys of its metrics.jsonl,
each log record has host memory and data-wait time, `config.profile` writes a trace, the console
shows our lines only, and `coca_jax.report` renders the curves."""

import json
import os
import struct
import subprocess
import sys

import pytest

from coca_jax import report
from coca_jax.training import metrics_log as metrics_lib
from conftest import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def _tensorboard_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """tag -> {step: value}, read from the event files' TFRecord framing and Event protos."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for name in os.listdir(logdir):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("observed") / "run")
  result = subprocess.run(
      [sys.executable, "-m", "coca_jax.train", "--config",
       os.path.join(REPO, "experiments", "demo.py") + ":smoke", "--workdir", workdir,
       "--config.train.steps=4", "--config.profile.start_step=3", "--config.profile.num_steps=2",
       "--config.evals.captioning.enabled=False"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_tensorboard_has_the_keys_and_values_of_metrics_jsonl(profiled_run):
  workdir, _ = profiled_run
  records, bad = metrics_lib.read_metrics(workdir)
  assert bad == 0
  scalars = _tensorboard_scalars(os.path.join(workdir, "tensorboard"))
  expected = {}
  for record in records:
    for key, value in record.items():
      if key != "step":
        expected.setdefault(metrics_lib.tensorboard_tag(key), {})[record["step"]] = value
  assert "eval/i2t_recall_1" in scalars  # From eval/i2t_recall@1: '@' is not a tag character.
  assert set(scalars) == set(expected)
  for key, by_step in expected.items():
    assert scalars[key] == pytest.approx(by_step, rel=1e-6), key


def test_each_log_record_has_host_memory_and_data_wait(profiled_run):
  workdir, _ = profiled_run
  train, evals = metrics_lib.split_records(metrics_lib.read_metrics(workdir)[0])
  assert [r["step"] for r in train] == [2, 4] and evals
  for record in train:
    assert 0.05 < record["host_memory_gb"] <= record["host_memory_peak_gb"] < 64
    assert 0.0 <= record["data_wait_seconds"] and 0.0 <= record["data_wait_fraction"] <= 1.0


def test_profile_steps_write_a_trace(profiled_run):
  workdir, _ = profiled_run
  traces = [f for _, _, files in os.walk(os.path.join(workdir, "profile")) for f in files
            if f.endswith(".xplane.pb")]
  assert len(traces) == 1


def test_console_shows_our_lines_only(profiled_run):
  _, result = profiled_run
  console = result.stdout + result.stderr
  assert "step      2/4  loss" in result.stdout and "step      4/4  loss" in result.stdout
  assert "Compiled train step in" in console
  # Third-party INFO (orbax's manager options, TFDS's build banner) and absl's line prefix.
  for noise in ("CheckpointManagerOptions", "Downloading and preparing", "I1", "I0",
                "dataset_info.py"):
    assert noise not in console, noise


def test_report_renders_the_run(profiled_run, tmp_path):
  workdir, _ = profiled_run
  out = str(tmp_path / "report" / "run.md")
  os.makedirs(os.path.dirname(out))
  result = subprocess.run([sys.executable, "-m", "coca_jax.report", "--workdir", workdir,
                           "--out", out], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  text = open(out).read()
  assert "step 4 of 4" in text and "## Evals at step 4" in text
  for name in ("loss", "lr", "throughput", "system", "eval"):
    assert f"![{name}]({name}.png)" in text
    with open(tmp_path / "report" / f"{name}.png", "rb") as f:
      assert f.read(8) == PNG


def test_report_of_a_synthetic_log_skips_torn_lines_and_missing_keys(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in (10, 20, 30):
      f.write(json.dumps({"step": step, "loss": 5.0 - step / 10, "learning_rate": 1e-3}) + "\n")
    f.write('{"step": 40, "loss": 1.')  # Killed mid-write.
  path = report.write_report(workdir)
  text = open(path).read()
  assert "step 30; 3 log records" in text and "final loss 2.0000" in text
  assert "1 unreadable line(s)" in text
  assert "![loss](loss.png)" in text and "![lr](lr.png)" in text
  assert "throughput.png" not in text and "eval.png" not in text  # Nothing logged for them.
  with open(os.path.join(workdir, "loss.png"), "rb") as f:
    assert f.read(8) == PNG


def test_trainer_writes_the_final_evals_before_closing_its_writers(tmp_path):
  """The Trainer's parts in-process, no FLAGS: the final evals are the last metrics.jsonl line
  and a TensorBoard event at the last step, written before the writer closes (a write after
  close would open a second event file that nothing flushes)."""
  import jax
  from coca_jax.core import config as config_lib
  from coca_jax.training import loop
  from coca_jax.training import step as step_lib
  config = config_lib.load_config(os.path.join(REPO, "experiments", "demo.py") + ":smoke")
  config.train.steps = 2
  config.evals.captioning.enabled = False
  config_lib.validate(config, num_devices=jax.device_count())
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  trainer = loop.Trainer(config, workdir, step_lib.setup(config), loop.TrainOptions())
  results = trainer.run()
  assert results and trainer.writer._summary is None  # closed, after the last write
  records, bad = metrics_lib.read_metrics(workdir)
  assert bad == 0 and records[-1]["step"] == 2
  assert {k: records[-1][k] for k in results} == pytest.approx(results)
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
  scalars = _tensorboard_scalars(os.path.join(workdir, "tensorboard"))
  assert scalars["eval/i2t_recall_1"] == {2: pytest.approx(results["eval/i2t_recall@1"])}
  from coca_jax.training import checkpoint
  assert not os.path.exists(os.path.join(workdir, checkpoint.LOCK_FILE))  # released
