r"""Hyper-parameter sweeps: one training run per set of config overrides, each in its own workdir.

A config file may define `sweep()` (or `sweep(arg)`, which gets the ':arg' of --config) returning a
list of override dicts {"optim.lr": 1e-3, ...}; `product` and `zip` build such lists:

  from coca_jax.sweep import product, zip
  def sweep():
    return product({"optim.lr": [1e-3, 3e-3]}, {"train.seed": [0, 1]})     # 4 trials
    # zip({"optim.lr": [1e-3, 3e-3], "optim.warmup_steps": [100, 300]})    # 2 trials

  python -m coca_jax.sweep --config experiments/demo.py:smoke --workdir ROOT \
      [--dry_run] [--parallel N] [--print_commands] [--trials NAME,NAME] [--results_only] \
      [--config.train.steps=100 ...]

Each trial trains in ROOT/<name>/ (name from its overrides, e.g. `lr=0.001_seed=0`) with
`python -m coca_jax.train`, one after another or N at a time (on CPU, or where each process gets
its own devices); its output goes to ROOT/<name>/train.log. `--config.*` overrides apply to every
trial (a trial's own override of the same key wins). Re-running the same command skips the
finished trials and resumes the unfinished ones from their checkpoints. `--print_commands` prints
one train command per unfinished trial (to hand to a cluster launcher; collect the results later
with `--results_only`). At the end: ROOT/results.csv and ROOT/results.md (overrides, final train
metrics, final evals, the best per metric marked) and ROOT/curves.png (the trials' curves).
"""

from __future__ import annotations

import builtins
import csv
from dataclasses import dataclass, field
import difflib
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from coca_jax import report
from coca_jax.core import cli
from coca_jax.core import config as config_lib
from coca_jax.core import console
from coca_jax.core import fs
from coca_jax.data import tokenizer as tokenizer_lib
from coca_jax.training import metrics_log as metrics_lib

TRIAL_FILE = "trial.json"   # Written by the sweep into a trial's workdir when its run ends.
VALUE_TYPES = (bool, int, float, str)


# ---- Building sweeps ---------------------------------------------------------------------------

def _trials_of(part, combine) -> list[dict]:
  if isinstance(part, dict):
    keys = list(part)
    for key in keys:
      if not isinstance(part[key], (list, tuple)):
        raise TypeError(f"sweep axis {key!r} must map to a list of values, got {part[key]!r}")
    return [dict(builtins.zip(keys, values)) for values in combine(*(part[k] for k in keys))]
  return [dict(trial) for trial in part]


def product(*parts) -> list[dict]:
  """Every combination of the parts, the first varying slowest. A part is a list of override
  dicts, or a dict {key: [values]} (several keys: every combination of them)."""
  trials = [{}]
  for part in parts:
    trials = [{**a, **b} for a in trials for b in _trials_of(part, itertools.product)]
  return trials


def zip(*parts) -> list[dict]:  # pylint: disable=redefined-builtin
  """The parts side by side: trial i merges the i-th trial of every part. A part is a list of
  override dicts, or a dict {key: [values]} (several keys: their lists zipped). All parts must
  have the same length."""
  def strict_zip(*lists):
    lengths = {len(values) for values in lists}
    if len(lengths) > 1:
      raise ValueError(f"sweep.zip needs lists of one length, got lengths {sorted(lengths)}")
    return builtins.zip(*lists)
  expanded = [_trials_of(part, strict_zip) for part in parts]
  if len({len(trials) for trials in expanded}) > 1:
    raise ValueError("sweep.zip needs parts of one length, got lengths "
                     f"{[len(trials) for trials in expanded]}")
  return [{k: v for trial in group for k, v in trial.items()}
          for group in builtins.zip(*expanded)]


def _format_name_value(value) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def trial_names(trials: list[dict]) -> list[str]:
  """File-system-safe, unique names from the overrides: `key=value` joined by '_' in the order the
  sweep names the keys, each key the last part of its dotted path unless two swept keys share
  it."""
  keys = list(dict.fromkeys(k for trial in trials for k in trial))  # In the sweep's order.
  last = {k: k.rsplit(".", 1)[-1] for k in keys}
  short = {k: last[k] if list(last.values()).count(last[k]) == 1 else k for k in keys}
  names, seen = [], {}
  for trial in trials:
    name = "_".join(f"{short[k]}={_format_name_value(trial[k])}" for k in keys if k in trial)
    name = name or "base"
    name = re.sub(r"[^A-Za-z0-9._=+-]", "-", name)
    if len(name) > 100:  # File names stay short; the hash keeps them distinct.
      name = name[:90] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    seen[name] = seen.get(name, 0) + 1
    names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
  return names


# ---- Trials ------------------------------------------------------------------------------------

@dataclass
class Trial:
  name: str
  overrides: dict
  workdir: str
  steps: int                      # The trial's config.train.steps: where it is finished.
  command: list[str] = field(default_factory=list)

  def record(self) -> dict | None:
    path = fs.join(self.workdir, TRIAL_FILE)
    if not fs.exists(path):
      return None
    return json.loads(fs.read_text(path))

  def finished(self) -> bool:
    record = self.record()
    return bool(record and record.get("status") == "finished" and record.get("steps") == self.steps)

  def status(self) -> str:
    if self.finished():
      return "finished"
    record = self.record()
    if record and record.get("status") == "failed":
      return f"failed (exit {record.get('returncode')})"
    step = latest_checkpoint_step(self.workdir)
    return f"partial (step {step} of {self.steps})" if step is not None else "new"


def latest_checkpoint_step(workdir: str) -> int | None:
  steps = [int(d) for d in fs.listdir(fs.join(workdir, "checkpoints")) if d.isdigit()]
  return max(steps) if steps else None


def _config_keys(config, prefix="") -> list[str]:
  keys = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    keys.append(path)
    if hasattr(value, "items"):
      keys += _config_keys(value, path + ".")
  return keys


def apply_overrides(config, overrides: dict) -> list[str]:
  """Sets each dotted key in place; returns the problems (unknown key, wrong type)."""
  problems = []
  for key, value in overrides.items():
    if not isinstance(value, VALUE_TYPES):
      problems.append(f"{key}={value!r}: sweeps take int, float, str or bool values")
      continue
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if hasattr(node, "get") else None
    if node is None or not hasattr(node, "items") or leaf not in node:
      close = difflib.get_close_matches(key, _config_keys(config), n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      problems.append(f"{key!r} is not a config key{hint}")
      continue
    try:
      node[leaf] = value
    except TypeError as e:
      problems.append(f"{key}={value!r}: {e}")
  return problems


def _override_arg(key: str, value) -> str:
  return f"--config.{key}={value!r}" if isinstance(value, float) else f"--config.{key}={value}"


def make_trials(config_spec: str, base_config, root: str, sweep_overrides: list[dict],
                global_args: list[str]) -> list[Trial]:
  """Validates every trial's config (all problems at once) and builds its train command."""
  names = trial_names(sweep_overrides)
  trials, problems = [], []
  for name, overrides in builtins.zip(names, sweep_overrides):
    config = base_config.copy_and_resolve_references()
    trial_problems = apply_overrides(config, overrides)
    if not trial_problems:
      try:
        config_lib.validate(config, load_tokenizer=tokenizer_lib.load_tokenizer)
      except config_lib.ConfigError as e:
        trial_problems.append(str(e))
    problems += [f"trial {name}: {p}" for p in trial_problems]
    workdir = fs.join(root, name)
    own = [a for a in global_args
           if a.split("=", 1)[0][len("--config."):] not in overrides]
    command = [sys.executable, "-m", "coca_jax.train", "--config", config_spec,
               "--workdir", workdir, *own, *(_override_arg(k, v) for k, v in overrides.items())]
    trials.append(Trial(name, dict(overrides), workdir,
                        config.train.steps if not trial_problems else -1, command))
  if problems:
    raise config_lib.ConfigError(f"{len(problems)} sweep problem(s):\n  - " +
                                 "\n  - ".join(problems))
  return trials


def load_sweep(config_path: str, config_arg: str) -> list[dict]:
  """Calls the config file's `sweep()` (passing the config arg if it takes one)."""
  spec = importlib.util.spec_from_file_location("_coca_sweep_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise config_lib.ConfigError(
        f"{config_path} defines no sweep(); add one returning a list of override dicts, e.g. "
        "`def sweep(): return coca_jax.sweep.product({'optim.lr': [1e-3, 3e-3]})`")
  takes_arg = bool(inspect.signature(module.sweep).parameters)
  trials = module.sweep(config_arg) if takes_arg else module.sweep()
  if not trials or not all(isinstance(t, dict) for t in trials):
    raise config_lib.ConfigError(f"{config_path}: sweep() must return a non-empty list of dicts")
  return trials


# ---- Running -----------------------------------------------------------------------------------

def run_trials(trials: list[Trial], parallel: int = 1, say=print) -> dict:
  """Runs the unfinished trials, `parallel` at a time; returns counts by outcome."""
  todo = [t for t in trials if not t.finished()]
  counts = {"skipped": len(trials) - len(todo), "finished": 0, "failed": 0}
  for trial in trials:
    if trial.finished():
      say(f"{trial.name}: finished before, skipped")
  running: list[tuple[Trial, subprocess.Popen, float, object]] = []
  queue = list(todo)
  while queue or running:
    while queue and len(running) < max(parallel, 1):
      trial = queue.pop(0)
      fs.makedirs(trial.workdir)
      log = open(_local_log(trial), "a")  # A subprocess writes to a local file only.
      state = trial.status()
      say(f"{trial.name}: {'resuming' if state.startswith('partial') else 'starting'} "
          f"({state}); log {log.name}")
      proc = subprocess.Popen(trial.command, stdout=log, stderr=subprocess.STDOUT)
      running.append((trial, proc, time.perf_counter(), log))
    time.sleep(0.2)
    for item in list(running):
      trial, proc, t0, log = item
      if proc.poll() is None:
        continue
      running.remove(item)
      log.close()
      if fs.is_url(trial.workdir):  # Its log goes beside the trial once the trial ends.
        with open(log.name, "rb") as f, fs.open(fs.join(trial.workdir, "train.log"), "ab") as g:
          g.write(f.read())
        os.remove(log.name)
      seconds = time.perf_counter() - t0
      done = proc.returncode == 0 and (latest_checkpoint_step(trial.workdir) or 0) >= trial.steps
      record = {"name": trial.name, "overrides": trial.overrides, "steps": trial.steps,
                "status": "finished" if done else "failed", "returncode": proc.returncode,
                "seconds": round(seconds, 1)}
      fs.write_text(fs.join(trial.workdir, TRIAL_FILE),
                    json.dumps(record, indent=2, sort_keys=True))
      counts["finished" if done else "failed"] += 1
      if done:
        say(f"{trial.name}: finished in {seconds:.0f}s")
      else:
        say(f"{trial.name}: FAILED (exit {proc.returncode}, stopped before step {trial.steps}); "
            f"see {fs.join(trial.workdir, 'train.log')}")
  return counts


def _local_log(trial: Trial) -> str:
  """Where the trial's training writes its console: WORKDIR/train.log for a local workdir; for
  a URL a local file in the temp directory, copied beside the trial when it ends."""
  if not fs.is_url(trial.workdir):
    return fs.join(trial.workdir, "train.log")
  return os.path.join(tempfile.gettempdir(), f"coca_jax-sweep-{os.getpid()}-{trial.name}.log")


# ---- Results -----------------------------------------------------------------------------------

TRAIN_COLUMNS = ("loss", "contrastive_loss", "caption_loss", "examples_per_sec", "mfu")


def _better(column: str):
  """min or max for columns with a direction; None for the rest (not marked)."""
  if column.endswith("loss"):
    return min
  if (column.startswith("eval/") and column != "eval/seconds") or column in (
      "examples_per_sec", "mfu"):
    return max
  return None


def collect(trials: list[Trial]) -> tuple[list[str], list[dict]]:
  """(columns, one row per trial): name, status, step, overrides, final train metrics, evals."""
  keys = sorted({k for t in trials for k in t.overrides})
  rows, eval_columns = [], set()
  for trial in trials:
    row = {"trial": trial.name, "status": trial.status(), **trial.overrides}
    try:
      train, evals = metrics_lib.split_records(metrics_lib.read_metrics(trial.workdir)[0])
    except FileNotFoundError:
      train, evals = [], []
    if train:
      row["step"] = train[-1]["step"]
      row.update({k: train[-1][k] for k in TRAIN_COLUMNS if k in train[-1]})
    if evals:
      final = {k: v for k, v in evals[-1].items() if k.startswith("eval/")}
      eval_columns.update(final)
      row.update(final)
    rows.append(row)
  columns = ["trial", "status", "step", *keys, *TRAIN_COLUMNS, *sorted(eval_columns)]
  columns = [c for c in columns if any(c in r for r in rows)]
  return columns, rows


def best_marks(columns: list[str], rows: list[dict]) -> dict[str, set[int]]:
  """Column -> indices of the rows holding its best value (ties all marked)."""
  marks = {}
  for column in columns:
    pick = _better(column)
    values = [(i, r[column]) for i, r in enumerate(rows) if isinstance(r.get(column), (int, float))
              and not isinstance(r.get(column), bool)]
    if pick is None or len({v for _, v in values}) < 2:  # All equal: nothing to point at.
      continue
    best = pick(v for _, v in values)
    marks[column] = {i for i, v in values if v == best}
  return marks


def _cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return "" if value is None else str(value)


def write_results(root: str, trials: list[Trial]) -> list[str]:
  """ROOT/results.csv, ROOT/results.md and ROOT/curves.png; returns the paths written."""
  columns, rows = collect(trials)
  marks = best_marks(columns, rows)
  csv_path = fs.join(root, "results.csv")
  with fs.open(csv_path, "w") as f:
    writer = csv.writer(f)
    writer.writerow(columns + ["best_in"])
    for i, row in enumerate(rows):
      best_in = ";".join(c for c in columns if i in marks.get(c, ()))
      writer.writerow([row.get(c, "") for c in columns] + [best_in])
  md_path = fs.join(root, "results.md")
  lines = [f"# Sweep results: `{root}`", "",
           "Final logged train metrics and the last evaluation of each trial; **bold** marks the "
           "best per column (lowest loss; highest eval metric, examples/s, MFU).", "",
           "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for i, row in enumerate(rows):
    cells = [f"**{_cell(row.get(c))}**" if i in marks.get(c, ()) else _cell(row.get(c))
             for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  written = [csv_path, md_path]
  panels = []
  curves = {}
  for trial in trials:
    try:
      curves[trial.name] = metrics_lib.split_records(metrics_lib.read_metrics(trial.workdir)[0])[0]
    except FileNotFoundError:
      pass
  for key in ("loss", "contrastive_loss", "caption_loss", "learning_rate"):
    lines_ = [(name, [r["step"] for r in recs if key in r], [r[key] for r in recs if key in r])
              for name, recs in curves.items()]
    lines_ = [line for line in lines_ if line[1]]
    if lines_:
      panels.append((key, lines_))
  if panels:
    png = fs.join(root, "curves.png")
    report.plot_panels(panels, png)
    lines += ["", "![curves](curves.png)"]
    written.append(png)
  fs.write_text(md_path, "\n".join(lines) + "\n")
  return written


# ---- CLI ---------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as the CLI: a config file's sweep() imports this module for
  `product`/`zip` inside other CLIs, whose flags must not clash."""
  config_lib.define_config_flag("config", "Experiment config file[:args] defining sweep().")
  flags.DEFINE_string("workdir", None, "Root directory: one subdirectory per trial.")
  flags.DEFINE_bool("dry_run", False, "Validate every trial, print the plan and commands, run "
                    "none.")
  flags.DEFINE_integer("parallel", 1, "Trials to run at once on this machine.")
  flags.DEFINE_bool("print_commands", False, "Print one train command per unfinished trial (for "
                    "a cluster launcher) and run none.")
  flags.DEFINE_list("trials", None, "Only these trial names (default: all).")
  flags.DEFINE_bool("results_only", False, "Only (re)write results.csv / results.md / "
                    "curves.png.")

def _global_overrides(argv: list[str]) -> list[str]:
  """The --config.KEY=VALUE arguments as given, to pass on to every trial."""
  found = []
  for arg in argv[1:]:
    if arg.startswith("--config."):
      if "=" not in arg:
        raise app.UsageError(f"write config overrides as --config.KEY=VALUE (got {arg!r})")
      found.append(arg)
  return found


def main(argv) -> None:
  console.setup()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  spec = FLAGS["config"].config_filename
  path, _, arg = spec.partition(":")
  root = fs.resolve(FLAGS.workdir)
  trials = make_trials(spec, FLAGS.config, root, load_sweep(path, arg),
                       _global_overrides(sys.argv))
  if FLAGS.trials:
    unknown = sorted(set(FLAGS.trials) - {t.name for t in trials})
    if unknown:
      raise app.UsageError(f"--trials: unknown names {unknown}; the sweep's trials are "
                           f"{[t.name for t in trials]}")
    trials = [t for t in trials if t.name in FLAGS.trials]
  if FLAGS.print_commands:
    for trial in trials:
      if not trial.finished():
        print(shlex.join(trial.command))
    return
  if FLAGS.dry_run:
    print(f"{len(trials)} trial(s) under {root}:")
    for trial in trials:
      print(f"  {trial.name}  [{trial.status()}]  {json.dumps(trial.overrides, sort_keys=True)}")
      print(f"    {shlex.join(trial.command)}")
    return
  if not FLAGS.results_only:
    fs.makedirs(root)
    counts = run_trials(trials, FLAGS.parallel)
    print(f"{len(trials)} trial(s): {counts['finished']} run to the end, "
          f"{counts['skipped']} skipped (finished before), {counts['failed']} failed")
  for written in write_results(root, trials):
    print(f"wrote {written}")
  if not FLAGS.results_only and counts["failed"]:
    sys.exit(1)


def run() -> None:
  _define_flags()
  cli.run(main, required=("config", "workdir"))


if __name__ == "__main__":
  run()
