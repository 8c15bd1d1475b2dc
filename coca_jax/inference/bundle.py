"""Writing a bundle: a trained model's parameters (no optimizer state), its config and its
tokenizer in one directory that `coca_jax.load` and `--config.init.source` read. The layout is
described in `coca_jax/export.py` (the CLI)."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from coca_jax.core import fs
from coca_jax.core import schema
from coca_jax.data.tokenizer import TOKENIZER_FILES
from coca_jax.inference import api
from coca_jax.interop import params as flat_params
from coca_jax.training import lora as lora_lib

FORMAT = "coca_jax.export/1"
SAFETENSORS_FILE = "model.safetensors"


def write_bundle(out: str, params, config, tokenizer, *, step=None, source: str = "",
                 dtype: str = "float32", fmt: str = "orbax") -> str:
  """Writes a bundle (see the module docstring) for `params` of a model built from `config`."""
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
      model_config = schema.build(schema.CoCa, config.model)
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


class LoraExportError(ValueError):
  """A LoRA run exported without merge_lora."""


def export(source: str, out: str, *, step: int | None = None, dtype: str = "float32",
           fmt: str = "orbax", merge_lora: bool = False) -> str:
  """Writes the bundle for `source` (a workdir, checkpoint step dir or bundle) to `out`. A
  LoRA run's checkpoint (config.optim.lora) holds adapters only: `merge_lora` folds them into
  their base (W + alpha / rank * A @ B) and writes a plain bundle whose config has LoRA off."""
  found = api.resolve(source, step)
  config = api.read_checked_config(found["root"])
  is_lora = lora_lib.enabled(config) and found["kind"] != "export"
  if is_lora and not merge_lora:
    raise LoraExportError(f"{source} is a LoRA run (config.optim.lora.rank="
                     f"{config.optim.lora.rank}): its checkpoints hold adapters, not a model; "
                     "pass --merge_lora to fold them into their base as a plain bundle")
  model = api.load(source, step=step)
  config = model.config
  if is_lora:
    config = copy.deepcopy(config)
    config.optim.lora.rank = 0  # The bundle is the adapted model itself.
  return write_bundle(out, model.params, config, model.tokenizer, step=model.step,
                      source=fs.resolve(source), dtype=dtype, fmt=fmt)
