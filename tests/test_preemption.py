"""Spec: a preemption notice to ONE process of a multi-process run stops every process after the
same step with one checkpoint, and the same launch command resumes from it.

Two real processes on localhost (launch/local_multiprocess.sh, jax.distributed, CPU collectives);
SIGTERM goes to process 1 only, as a cluster would deliver it to one host.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import REPO

SCRIPT = os.path.join(REPO, "launch", "local_multiprocess.sh")
# Small evals and no captioning: the resume run ends with the final evals on both processes.
OVERRIDES = ["--config.checkpoint.every_steps=0", "--config.train.log_every=1",
             "--config.evals.zeroshot.examples=16", "--config.evals.retrieval.examples=16",
             "--config.evals.captioning.enabled=False"]


def _launch(workdir, log_path, steps, data_flags):
  log = open(log_path, "w")
  proc = subprocess.Popen(
      ["bash", SCRIPT, "--python", sys.executable, "--config",
       os.path.join(REPO, "experiments", "demo.py") + ":smoke", "--workdir", str(workdir), "--",
       f"--config.train.steps={steps}", *OVERRIDES, *data_flags],
      cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stdout=log, stderr=subprocess.STDOUT)
  return proc, log


def _stopped_steps(text):
  return {int(p): int(s) for p, s in re.findall(r"Process (\d)/2 stopped at step (\d+)", text)}


def test_sigterm_to_one_process_stops_all_at_the_same_step_then_resumes(tmp_path, smoke_data):
  workdir, log_path = tmp_path / "run", tmp_path / "first.log"
  proc, log = _launch(workdir, log_path, steps=100_000, data_flags=smoke_data)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 400
  try:
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
      assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-4000:]
      time.sleep(0.5)
    pid = int(re.search(r"\[process 1\] pid (\d+)", log_path.read_text()).group(1))
    os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log_path.read_text()[-4000:]
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  text = log_path.read_text()
  stopped = _stopped_steps(text)
  assert set(stopped) == {0, 1}, text[-4000:]
  assert stopped[0] == stopped[1], stopped
  step = stopped[0]
  assert 2 <= step < 100_000
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved == [step]

  # The same command with a nearer end resumes from that checkpoint on both processes.
  proc, log = _launch(workdir, tmp_path / "second.log", steps=step + 2, data_flags=smoke_data)
  try:
    assert proc.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-4000:]
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  train_steps = [r["step"] for r in records if "loss" in r]
  assert train_steps[-2:] == [step + 1, step + 2]
  assert train_steps == sorted(set(train_steps))  # resumed, not restarted from 0
  assert any("eval/zeroshot_top1" in r for r in records)
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved[-1] == step + 2


def test_one_process_stops_on_sigterm_or_sigint():
  from coca_jax.training import preemption
  saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    for sig in saved:
      stop = preemption.StopSignal(manager=None)  # One process: the manager is not asked.
      assert not stop.reached(1)
      os.kill(os.getpid(), sig)
      time.sleep(0.1)  # Python runs the handler between bytecodes of the main thread.
      assert stop.reached(2)
  finally:
    for sig, handler in saved.items():
      signal.signal(sig, handler)
