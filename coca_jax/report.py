r"""Renders a run's curves to PNG and writes a short markdown summary.

  python -m coca_jax.report --workdir DIR [--out DIR/report.md]

Reads DIR/metrics.jsonl (and DIR/config.json for the target step count) and writes, next to the
markdown file: loss.png (total, contrastive, caption), lr.png, throughput.png (examples/s, MFU),
system.png (host memory, fraction of time waiting for data) and, when the run evaluated,
eval.png (each eval metric against step). Works on a run in progress.
"""

from __future__ import annotations

import io
import json
import statistics

from absl import flags

from coca_jax.core import cli
from coca_jax.core import console
from coca_jax.core import fs
from coca_jax.training import metrics_log as metrics_lib

# (file stem, title, keys) of the train-curve figures; a key a run never logged is left out.
TRAIN_FIGURES = (
    ("loss", "Loss", ("loss", "contrastive_loss", "caption_loss")),
    ("lr", "Learning rate", ("learning_rate",)),
    ("throughput", "Throughput", ("examples_per_sec", "mfu")),
    ("system", "Host", ("host_memory_gb", "data_wait_fraction")),
)


def plot_panels(panels: list[tuple[str, list[tuple[str, list, list]]]], path: str,
                xlabel: str = "step") -> None:
  """One PNG with a subplot per panel: (title, [(label, xs, ys), ...]). Matplotlib's Agg backend,
  so no display is needed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = min(len(panels), 3)
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
  for ax, (title, lines) in zip(axes.flat, panels):
    for label, xs, ys in lines:
      ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
      ax.legend(fontsize=8)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=90)
  fs.write_bytes(path, buffer.getvalue())
  plt.close(fig)


def _series(records: list[dict], key: str) -> tuple[list, list]:
  points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
  return [p[0] for p in points], [p[1] for p in points]


def render(workdir: str, out_dir: str) -> list[str]:
  """Writes the figures of the run in `workdir` into `out_dir`; returns their file names."""
  records, _ = metrics_lib.read_metrics(workdir)
  train, evals = metrics_lib.split_records(records)
  fs.makedirs(out_dir)
  written = []
  for stem, _, keys in TRAIN_FIGURES:
    panels = [(key, [(key, *_series(train, key))]) for key in keys]
    panels = [p for p in panels if p[1][0][1]]
    if panels:
      plot_panels(panels, fs.join(out_dir, f"{stem}.png"))
      written.append(f"{stem}.png")
  eval_keys = sorted({k for r in evals for k in r if k.startswith("eval/") and k != "eval/seconds"})
  if eval_keys:
    plot_panels([(key, [(key, *_series(evals, key))]) for key in eval_keys],
                fs.join(out_dir, "eval.png"))
    written.append("eval.png")
  return written


def _median(records: list[dict], key: str) -> float | None:
  values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
  return statistics.median(values) if values else None


def summary(workdir: str, images: list[str]) -> str:
  """A short markdown summary of the run: progress, final losses, throughput, evals."""
  records, bad = metrics_lib.read_metrics(workdir)
  train, evals = metrics_lib.split_records(records)
  target = None
  config_path = fs.join(workdir, "config.json")
  if fs.exists(config_path):
    with fs.open(config_path) as f:
      target = json.load(f).get("train", {}).get("steps")
  lines = [f"# Run report: `{workdir}`", ""]
  if train:
    last = train[-1]
    lines.append(f"- step {last['step']}" + (f" of {target}" if target else "") +
                 f"; {len(train)} log records")
    lines.append("- final loss {:.4f} (contrastive {:.4f}, caption {:.4f})".format(
        last["loss"], last.get("contrastive_loss", float("nan")),
        last.get("caption_loss", float("nan"))))
    # The first log interval includes compilation; leave it out of the medians.
    steady = train[1:] or train
    for key, label, fmt in (("examples_per_sec", "examples/s", "{:.1f}"), ("mfu", "MFU", "{:.1%}"),
                            ("data_wait_fraction", "time waiting for data", "{:.1%}")):
      value = _median(steady, key)
      if value is not None:
        lines.append(f"- median {label}: {fmt.format(value)}")
    peaks = [r["host_memory_peak_gb"] for r in train if "host_memory_peak_gb" in r]
    if peaks:
      lines.append(f"- host memory peak (process 0): {max(peaks):.2f} GB")
  else:
    lines.append("- no train records yet")
  if bad:
    lines.append(f"- {bad} unreadable line(s) in metrics.jsonl skipped (a torn write)")
  if evals:
    final = evals[-1]
    lines += ["", f"## Evals at step {final['step']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k[len('eval/'):]} | {v:.4f} |" for k, v in sorted(final.items())
              if k.startswith("eval/") and isinstance(v, (int, float))]
  if images:
    lines += ["", "## Curves", ""] + [f"![{name[:-4]}]({name})" for name in images]
  return "\n".join(lines) + "\n"


def write_report(workdir: str, out: str | None = None) -> str:
  """Renders the figures and writes the markdown; returns the markdown path."""
  out = fs.resolve(out or fs.join(workdir, "report.md"))
  out_dir = fs.dirname(out)
  images = render(workdir, out_dir)
  with fs.open(out, "w") as f:
    f.write(summary(workdir, images))
  return out


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as the CLI (coca_jax.sweep imports this module for its plots)."""
  flags.DEFINE_string("workdir", None, "Training workdir (holds metrics.jsonl).")
  flags.DEFINE_string("out", None, "Markdown file to write (default DIR/report.md); the PNGs go "
                      "beside it.")


def main(argv) -> None:
  del argv
  console.setup()
  path = write_report(FLAGS.workdir, FLAGS.out)
  print(path)


def run() -> None:
  _define_flags()
  cli.run(main, required=("workdir",))


if __name__ == "__main__":
  run()
