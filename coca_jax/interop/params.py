"""Flat parameter names: one '/'-joined path per array, in the UNSCANNED layer layout
(`vision/layer_3/attention/query/kernel`) whatever `scan_layers` the model was built with, so
files written from scanned and unscanned models are the same. Used by the safetensors export and
the open_clip conversion."""

from __future__ import annotations

from flax import traverse_util
import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from coca_jax.models.coca import CoCaConfig, unscanned_layers

STACKS = ("vision", "unimodal", "multimodal")

# safetensors dtype names -> numpy. safetensors' own numpy API has no BF16 (it writes bfloat16
# arrays but cannot read them back), so bundles exported with --dtype bfloat16 are read here.
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
                       "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def load_safetensors(data: bytes, path: str = "safetensors data") -> dict[str, np.ndarray]:
  """{name: numpy array} of a safetensors file's bytes, bfloat16 included. A damaged file
  raises ValueError naming `path` (the file the bytes came from)."""
  import safetensors
  out = {}
  try:
    tensors = safetensors.deserialize(data)
  except Exception as e:  # pylint: disable=broad-except  # SafetensorError, or a bad header
    raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                     "it may be truncated or not a safetensors file: write it again") from e
  for name, view in tensors:
    if view["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {view['dtype']}, which is not "
                       f"one of {sorted(_SAFETENSORS_DTYPES)}")
    try:
      out[name] = np.frombuffer(view["data"], _SAFETENSORS_DTYPES[view["dtype"]]).reshape(
          view["shape"])
    except ValueError as e:
      raise ValueError(f"{path}: tensor {name!r} does not match its shape {view['shape']} "
                       f"({e})") from e
  return out


def _paths(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict) or hasattr(value, "items"):
      out.update(_paths(value, path + "/"))
    else:
      out[path] = value
  return out


def flatten(config: CoCaConfig, params) -> dict[str, np.ndarray]:
  """Params of a model built from `config` -> {unscanned path: numpy array} (host copies)."""
  _, params = unscanned_layers(config, nn.meta.unbox(params))
  return {k: np.asarray(jax.device_get(v)) for k, v in _paths(params).items()}


def unflatten(config: CoCaConfig, flat: dict) -> dict:
  """{unscanned path: array} -> the nested params of a model built from `config` (layer stacks
  re-stacked on a leading axis when `config.scan_layers`)."""
  tree = traverse_util.unflatten_dict(flat, sep="/")
  if config.scan_layers:
    depths = {"vision": config.vision.depth, "unimodal": config.text.n_uni,
              "multimodal": config.text.n_multi}
    for name, depth in depths.items():
      if name in tree:
        layers = [tree[name].pop(f"layer_{i}") for i in range(depth)]
        tree[name]["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  return tree


def check_against(abstract, params) -> None:
  """Raises ValueError naming every missing, unexpected or mis-shaped leaf of `params` against
  the abstract tree `abstract` (ShapeDtypeStructs)."""
  want = {k: tuple(v.shape) for k, v in _paths(abstract).items()}
  have = {k: tuple(np.shape(v)) for k, v in _paths(params).items()}
  problems = [f"missing {k} {s}" for k, s in want.items() if k not in have]
  problems += [f"unexpected {k} {s}" for k, s in have.items() if k not in want]
  problems += [f"{k}: have {have[k]}, model wants {s}" for k, s in want.items()
               if k in have and have[k] != s]
  if problems:
    raise ValueError(f"{len(problems)} parameter(s) do not fit the model:\n  - "
                     + "\n  - ".join(problems))
