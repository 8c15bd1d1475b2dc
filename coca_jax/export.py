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
import os
import shutil
import tempfile

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from coca_jax import api, console
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


def atomic_directory(out: str, write) -> str:
  """Calls write(tmp_dir), then renames tmp_dir to `out` (which must not exist)."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise FileExistsError(f"--out {out} already exists; pick a new directory")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp")
  try:
    write(tmp)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


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
        ckptr.save(os.path.join(tmp, api.EXPORT_PARAMS),
                   jax.tree.map(lambda p: jnp.asarray(p).astype(cast), params))
        ckptr.wait_until_finished()
    else:
      import safetensors.numpy
      model_config = CoCaConfig.from_config(config.model)
      flat = flat_params.flatten(model_config, params)
      flat = {k: np.asarray(jnp.asarray(v).astype(cast), order="C") for k, v in flat.items()}
      safetensors.numpy.save_file(flat, os.path.join(tmp, SAFETENSORS_FILE),
                                  metadata={"format": FORMAT, "layout": "unscanned"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    kind = config.data.tokenizer_kind
    with open(os.path.join(tmp, TOKENIZER_FILES[kind]), "wb") as f:
      f.write(tokenizer.model_proto)
    with open(os.path.join(tmp, api.EXPORT_MANIFEST), "w") as f:
      json.dump({"format": FORMAT, "step": step, "dtype": dtype, "source": source,
                 "params": SAFETENSORS_FILE if fmt == "safetensors" else api.EXPORT_PARAMS},
                f, indent=2)
  return atomic_directory(out, write)


def export(source: str, out: str, *, step: int | None = None, dtype: str = "float32",
           fmt: str = "orbax") -> str:
  """Writes the bundle for `source` (a workdir, checkpoint step dir or bundle) to `out`."""
  model = api.load(source, step=step)
  return write_bundle(out, model.params, model.config, model.tokenizer, step=model.step,
                      source=os.path.abspath(source), dtype=dtype, fmt=fmt)


def main(argv) -> None:
  del argv
  console.setup()
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("--src (or --workdir) and --out are required")
  print(export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype, fmt=FLAGS.format))


def run() -> None:
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
