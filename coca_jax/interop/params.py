"""Flat parameter names: one '/'-joined path per array, in the UNSCANNED layer layout
(`vision/layer_3/attention/query/kernel`) whatever `scan_layers` the model was built with, so
files written from scanned and unscanned models are the same. Used by the safetensors export and
the open_clip conversion."""

from __future__ import annotations

from flax import traverse_util
import flax.linen as nn
import jax
import numpy as np

from coca_jax.models.coca import CoCaConfig, unscanned_layers

STACKS = ("vision", "unimodal", "multimodal")


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
    depths = {"vision": config.vision.depth, "unimodal": config.n_uni,
              "multimodal": config.n_multi}
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
