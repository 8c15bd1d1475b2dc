r"""Exports a trained model as a self-contained bundle: parameters only (no optimizer state),
the config and the tokenizer.

  python -m coca_jax.export --src DIR --out OUT [--step N] [--dtype bfloat16] \
      [--format orbax|safetensors]

DIR is a training workdir, a checkpoints/<step> directory or another bundle (`--workdir` is the
same flag). OUT is a directory holding:
  config.json             the experiment config (`coca_jax.load` and `--config.init.source`
                          rebuild the model from it);
  tokenizer.model, or bpe_simple_vocab_16e6.txt.gz for data.tokenizer_kind='clip_bpe';
  export.json             {"format", "step", "dtype", "source", "params"};
  params/                 (--format orbax) an orbax StandardSave of the params pytree, or
  model.safetensors       (--format safetensors) one flat tensor per parameter, read with any
                          safetensors library (numpy, torch, ...), no JAX needed.
safetensors keys are '/'-joined parameter paths in the UNSCANNED layer layout whatever
scan_layers the model used, e.g. `vision/layer_3/attention/query/kernel` [width, heads, head_dim],
`vision/layer_3/ffn/mlp/wi/kernel` [width, mlp], `token_embed/embedding` [vocab, width],
`vocab_head/kernel` [width, vocab], `logit_scale` [] (log of the contrastive scale).
Dense kernels are [inputs..., outputs...] (x @ kernel), not torch's [out, in].
The bundle is written to a temporary directory beside OUT and renamed into place, so OUT is
either absent or complete. `coca_jax.load(OUT)` reads either format back as float32.
"""

from __future__ import annotations

import json

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from coca_jax.inference import api

from coca_jax.core import cli
from coca_jax.core import console

from coca_jax.core import fs
from coca_jax.data.tokenizer import TOKENIZER_FILES

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The CLI's flags, defined when the CLI runs: `export()` is also a library function, and a
  program that imports this module next to another CLI (train defines --workdir too) must not
  collide."""
  flags.DEFINE_string("workdir", None, "Training workdir, checkpoints/<step> directory or bundle.")
  flags.DEFINE_alias("src", "workdir")
  flags.DEFINE_string("out", None, "Directory to write the bundle to (must not exist).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored parameter dtype.")
  flags.DEFINE_enum("format", "orbax", ["orbax", "safetensors"], "Parameter file format.")

FORMAT = "coca_jax.export/1"
SAFETENSORS_FILE = "model.safetensors"


def write_bundle(out: str, params, config, tokenizer, *, step=None, source: str = "",
                 dtype: str = "float32", fmt: str = "orbax") -> str:
  """Writes a bundle (see the module docstring) for `params` of a model built from `config`."""
  from coca_jax.interop import params as flat_params
  from coca_jax.models.coca import CoCaConfig
  if fmt not in ("orbax", "safetensors"):
    raise ValueError(f"format={fmt!r} is unknown; use orbax or safetensors")
  cast = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32

  def write(tmp):
    if fmt == "orbax":
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(fs.as_path(fs.join(tmp, api.EXPORT_PARAMS)),
                   jax.tree.map(lambda p: jnp.asarray(p).astype(cast), params))
        ckptr.wait_until_finished()
    else:
      import safetensors.numpy
      model_config = CoCaConfig.from_config(config.model)
      flat = flat_params.flatten(model_config, params)
      flat = {k: np.asarray(jnp.asarray(v).astype(cast), order="C") for k, v in flat.items()}
      fs.write_bytes(fs.join(tmp, SAFETENSORS_FILE), safetensors.numpy.save(
          flat, metadata={"format": FORMAT, "layout": "unscanned"}))
    fs.write_text(fs.join(tmp, "config.json"),
                  config.to_json_best_effort(indent=2, sort_keys=True))
    kind = config.data.tokenizer_kind
    fs.write_bytes(fs.join(tmp, TOKENIZER_FILES[kind]), tokenizer.model_proto)
    # Last: on an object store the bundle is written in place, and the manifest is what makes
    # a directory a bundle (`api.resolve`), so a half-written one is never loaded.
    fs.write_text(fs.join(tmp, api.EXPORT_MANIFEST), json.dumps(
        {"format": FORMAT, "step": step, "dtype": dtype, "source": source,
         "params": SAFETENSORS_FILE if fmt == "safetensors" else api.EXPORT_PARAMS}, indent=2))
  try:
    return fs.write_directory(out, write)
  except FileExistsError:
    raise FileExistsError(f"--out {fs.resolve(out)} already exists; pick a new directory"
                          ) from None


def export(source: str, out: str, *, step: int | None = None, dtype: str = "float32",
           fmt: str = "orbax") -> str:
  """Writes the bundle for `source` (a workdir, checkpoint step dir or bundle) to `out`."""
  model = api.load(source, step=step)
  return write_bundle(out, model.params, model.config, model.tokenizer, step=model.step,
                      source=fs.resolve(source), dtype=dtype, fmt=fmt)


def main(argv) -> None:
  del argv
  console.setup()
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("--src (or --workdir) and --out are required")
  print(export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype, fmt=FLAGS.format))


def run() -> None:
  _define_flags()
  cli.run(main, required=("workdir", "out"))


if __name__ == "__main__":
  run()
