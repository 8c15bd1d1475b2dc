r"""Draws the README's pictures from a trained demo run: held-out scenes with the captions the
model wrote, and the run's loss curves.

  python -m coca_jax.train --config experiments/demo.py --workdir /tmp/coca_demo
  python benchmarks/make_readme_figure.py --workdir /tmp/coca_demo --out_dir docs

Writes OUT_DIR/demo_captions.png (the first --num scenes of the held-out split, each with the
model's greedy caption above it and the true caption below, in red where they differ) and
OUT_DIR/demo_loss.png (`coca_jax.report`'s loss figure of the run).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

import coca_jax  # pylint: disable=wrong-import-position
from coca_jax import report  # pylint: disable=wrong-import-position
from coca_jax.data import sources  # pylint: disable=wrong-import-position


def caption_grid(workdir: str, path: str, num: int = 8, cols: int = 4) -> list[tuple[str, str]]:
  """Captions the first `num` scenes of the run's eval split and saves them as a grid; returns
  (model caption, true caption) pairs."""
  model = coca_jax.load(workdir)
  data = model.config.data
  source = sources.open_source(data.name, data.data_dir, data.eval_split)
  examples = [source[i] for i in range(num)]
  images = [e["image"] for e in examples]
  truths = [e["captions"][0] for e in examples]
  truths = [t.decode() if isinstance(t, bytes) else str(t) for t in truths]
  written = model.caption(images)
  rows = -(-num // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.75 * rows), squeeze=False)
  for ax, image, ours, truth in zip(axes.flat, images, written, truths):
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(ours, fontsize=9, color="black")
    ax.set_xlabel(truth, fontsize=8, color="#555555" if ours == truth else "#c62828")
  for ax in axes.flat[num:]:
    ax.axis("off")
  fig.suptitle(f"Held-out scenes: the demo model's captions (above), the true ones (below); "
               f"step {model.step}", fontsize=9)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=80)
  plt.close(fig)
  with open(path, "wb") as f:
    f.write(buffer.getvalue())
  return list(zip(written, truths))


def loss_figure(workdir: str, path: str) -> None:
  """The loss figure `python -m coca_jax.report` draws for the run."""
  with tempfile.TemporaryDirectory() as tmp:
    written = report.render(workdir, tmp)
    if "loss.png" not in written:
      raise SystemExit(f"{workdir}/metrics.jsonl has no loss records: train the demo first")
    shutil.copyfile(os.path.join(tmp, "loss.png"), path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained demo run")
  parser.add_argument("--out_dir", default="docs")
  parser.add_argument("--num", type=int, default=8, help="scenes in the grid")
  args = parser.parse_args()
  if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
    raise SystemExit(f"{args.workdir} has no checkpoints/: train the demo there first "
                     f"(python -m coca_jax.train --config experiments/demo.py --workdir "
                     f"{args.workdir})")
  pairs = caption_grid(args.workdir, os.path.join(args.out_dir, "demo_captions.png"), args.num)
  loss_figure(args.workdir, os.path.join(args.out_dir, "demo_loss.png"))
  for ours, truth in pairs:
    print(f"{'ok  ' if ours == truth else 'diff'}  {ours!r:40} true: {truth!r}")


if __name__ == "__main__":
  main()
