"""Spec: bring your own data, as a user does it (docs/data.md): a folder of images and a
captions.jsonl, built with `python -m coca_jax.data.build --eval_fraction`, trains from scratch
with experiments/byo.py and ends with retrieval and captioning evals on the held-out split."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import REPO

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
           "yellow": (230, 210, 40)}


def _photos(folder, count=20):
  """`count` small generated photos in a subfolder, one caption each, named in captions.jsonl."""
  rng = np.random.default_rng(0)
  names = list(COLOURS)
  os.makedirs(os.path.join(folder, "shapes"))
  lines = []
  for i in range(count):
    fg, bg = names[i % 4], names[(i // 4 + 1 + i % 4) % 4]
    image = np.zeros((40, 48, 3), np.uint8) + np.array(COLOURS[bg], np.uint8)
    x, y = rng.integers(4, 24, 2)
    image[y:y + 14, x:x + 14] = COLOURS[fg]
    path = f"shapes/{i:03d}.png"
    Image.fromarray(image).save(os.path.join(folder, path))
    lines.append(json.dumps({"image": path, "caption": f"a {fg} square on a {bg} background"}))
  with open(os.path.join(folder, "captions.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")


def test_byo_folder_builds_trains_from_scratch_and_evaluates_its_held_out_split(tmp_path):
  photos, data_dir, workdir = (str(tmp_path / n) for n in ("photos", "tfds", "run"))
  _photos(photos)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  build = subprocess.run(
      [sys.executable, "-m", "coca_jax.data.build", "--format", "folder", "--src", photos,
       "--name", "my_photos", "--data_dir", data_dir, "--eval_fraction", "0.25",
       "--no_progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert build.returncode == 0, build.stderr[-3000:]
  assert "config.data.name='my_photos'" in build.stdout
  config = (os.path.join(REPO, "experiments", "byo.py") +
            f":name=my_photos,data_dir={data_dir},image_size=32,vocab=40,runlocal")
  train = subprocess.run(
      [sys.executable, "-m", "coca_jax.train", "--config", config, "--workdir", workdir,
       "--config.train.steps=4"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert train.returncode == 0, train.stderr[-3000:]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert max(r["step"] for r in records if "loss" in r) == 4
  evals = records[-1]
  # Both evals ran on the held-out split (5 of the 20 pairs), none needs class names.
  for metric in ("eval/i2t_recall@1", "eval/t2i_recall@1", "eval/caption_cider",
                 "eval/caption_bleu4"):
    assert metric in evals and np.isfinite(evals[metric]), (metric, evals)
  assert not any(k.startswith("eval/zeroshot") for k in evals)
