r"""Exports a trained model as a self-contained bundle: parameters only (no optimizer state),
the config and the tokenizer.

  python -m coca_jax.export --workdir DIR --out OUT [--step N] [--dtype bfloat16]

OUT/params (orbax StandardSave of the params pytree), OUT/config.json, OUT/tokenizer.model and
OUT/export.json (format, source step, stored dtype). `coca_jax.load(OUT)` reads it back (as
float32 whatever the stored dtype).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from coca_jax import api, console

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir or checkpoints/<step> directory.")
flags.DEFINE_string("out", None, "Directory to write the bundle to (must not exist).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored parameter dtype.")

FORMAT = "coca_jax.export/1"


def export(source: str, out: str, *, step: int | None = None, dtype: str = "float32") -> str:
  """Writes the bundle for `source` (a workdir or checkpoint step dir) to `out`; returns out."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise FileExistsError(f"--out {out} already exists; pick a new directory")
  model = api.load(source, step=step)
  params = model.params
  if dtype == "bfloat16":  # Halves the bundle; loading casts back to float32.
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  os.makedirs(out)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out, api.EXPORT_PARAMS), params)
    ckptr.wait_until_finished()
  with open(os.path.join(out, "config.json"), "w") as f:
    f.write(model.config.to_json_best_effort(indent=2, sort_keys=True))
  with open(os.path.join(out, "tokenizer.model"), "wb") as f:
    f.write(model.tokenizer.model_proto)
  with open(os.path.join(out, api.EXPORT_MANIFEST), "w") as f:
    json.dump({"format": FORMAT, "step": model.step, "dtype": dtype,
               "source": os.path.abspath(source)}, f, indent=2)
  return out


def main(argv) -> None:
  del argv
  console.setup()
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("--workdir and --out are required")
  print(export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype))


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
