"""What a run records about itself: metrics (metrics.jsonl and TensorBoard), host memory, time
spent waiting for data, and a profiler trace of a few chosen steps.

Layout in the workdir:
  DIR/metrics.jsonl    one JSON object per log step (and per evaluation), process 0 only;
                       strict JSON: a NaN or infinite value is the string "NaN", "Infinity"
                       or "-Infinity" (see docs/training.md)
  DIR/tensorboard/     TensorBoard event files with the same keys (tensorboardX, no TensorFlow;
                       '@' becomes '_' in tags): `tensorboard --logdir DIR/tensorboard`
  DIR/profile/         a jax.profiler trace of steps [profile.start_step, + profile.num_steps)
                       (every process writes its own), viewable in TensorBoard's profile tab
                       or xprof
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
from typing import Iterator

import jax

from coca_jax.core import config as config_lib
from coca_jax.core import fs

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"


class MetricsWriter:
  """Appends one record per `write` to DIR/metrics.jsonl and logs its numeric values to
  TensorBoard under the same keys, at the record's `step` (process 0 only)."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.path = fs.join(workdir, METRICS_FILE)
    self.tensorboard_dir = fs.join(workdir, TENSORBOARD_DIR) if tensorboard else None
    self.enabled = jax.process_index() == 0
    self._summary = None  # Opened on the first write: a dry run leaves no event file behind.

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with fs.open(self.path, "a") as f:
      f.write(json.dumps(_json_safe(record), sort_keys=True, allow_nan=False) + "\n")
    if self.tensorboard_dir is None:
      return
    if self._summary is None:
      from tensorboardX import SummaryWriter
      self._summary = SummaryWriter(logdir=self.tensorboard_dir)
    step = int(record["step"])
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._summary.add_scalar(tensorboard_tag(key), value, global_step=step)
    self._summary.flush()

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()
      self._summary = None


# Non-finite numbers are written as these strings: bare NaN / Infinity (Python's default) is not
# JSON, and strict parsers (jq, JavaScript, Go, pandas' default engine) reject the whole line.
# The string is Python's own spelling, so float(value) reads it back; `read_metrics` does so.
NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _json_safe(value):
  """`value` with every non-finite float replaced by its NON_FINITE string."""
  if isinstance(value, float) and not math.isfinite(value):
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def _from_json(value):
  """A record as written: NON_FINITE strings back to floats (the other way of `_json_safe`)."""
  if isinstance(value, str) and value in NON_FINITE:
    return NON_FINITE[value]
  if isinstance(value, dict):
    return {k: _from_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_from_json(v) for v in value]
  return value


def tensorboard_tag(key: str) -> str:
  """A metrics.jsonl key as a TensorBoard tag: characters TensorBoard rejects become '_'
  (`eval/i2t_recall@1` -> `eval/i2t_recall_1`); everything else is the same key."""
  return re.sub(r"[^A-Za-z0-9_./-]", "_", key)


def read_metrics(workdir: str) -> tuple[list[dict], int]:
  """Records of DIR/metrics.jsonl in file order, and how many lines could not be parsed (a run
  killed mid-write can leave a torn last line). Non-finite values, written as the strings
  "NaN" / "Infinity" / "-Infinity", come back as floats."""
  path = fs.join(workdir, METRICS_FILE)
  if not fs.exists(path):
    raise FileNotFoundError(f"{path} does not exist; is {workdir!r} a coca_jax workdir?")
  records, bad = [], 0
  with fs.open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        # Bare NaN (files written before the strings) still parses: Python's json accepts it.
        records.append(_from_json(json.loads(line)))
      except json.JSONDecodeError:
        bad += 1
  return records, bad


def split_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
  """(train records: those with a `loss`, eval records: those with an `eval/...` key). A record
  that a re-run wrote again for the same step replaces the earlier one."""
  train = {r["step"]: r for r in records if "loss" in r}
  evals = {r["step"]: r for r in records if any(k.startswith("eval/") for k in r)}
  return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def host_memory() -> dict:
  """This process's resident memory now and at its peak, in GB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes.
  current = peak
  try:
    with open("/proc/self/statm") as f:
      current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    pass
  # The kernel updates the peak lazily; it is never below the current value.
  return {"host_memory_gb": current / 1e9, "host_memory_peak_gb": max(peak, current) / 1e9}


class TimedIterator:
  """Wraps an iterator and adds up the seconds its `next` blocks: time the loop waited for
  data. `take()` returns the sum since the previous call."""

  def __init__(self, iterator: Iterator):
    self.iterator, self.seconds = iterator, 0.0

  def __iter__(self):
    return self

  def __next__(self):
    t0 = time.perf_counter()
    try:
      return next(self.iterator)
    finally:
      self.seconds += time.perf_counter() - t0

  def take(self) -> float:
    seconds, self.seconds = self.seconds, 0.0
    return seconds


# config.profile: trace `num_steps` steps from `start_step` (0 = no trace). Past the first steps,
# so that compilation and warm-up stay out of the trace.
PROFILE_DEFAULTS = config_lib.PROFILE_DEFAULTS  # For experiment files; the home is config.py.


def profile_window(config) -> tuple[int, int] | None:
  """(first, last) step to trace from `config.profile` (PROFILE_DEFAULTS where unset)."""
  start, num = config.profile.start_step, config.profile.num_steps
  problems = []
  if not (isinstance(start, int) and start >= 0):
    problems.append(f"config.profile.start_step={start!r} must be an integer >= 0 (0 = off)")
  if not (isinstance(num, int) and num >= 1):
    problems.append(f"config.profile.num_steps={num!r} must be a positive integer")
  if problems:
    raise config_lib.ConfigError("; ".join(problems))
  return (start, start + num - 1) if start > 0 else None


class Profiler:
  """Traces the steps of `profile_window` into DIR/profile with jax.profiler. Call `before(step)`
  before dispatching a step and `after(step, state)` after it; the trace waits for the last
  traced step's results, so it holds device work, not only dispatch."""

  def __init__(self, config, workdir: str):
    self.window = profile_window(config)
    self.dir = fs.join(workdir, PROFILE_DIR)
    self.active = False

  def before(self, step: int) -> None:
    if self.window and step == self.window[0] and not self.active:
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.window[1]:
      self.stop(state)

  def stop(self, state=None) -> None:
    if self.active:
      if state is not None:
        jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False

