"""Warm start: a new run's parameters from a trained or imported model (`config.init`).

  python -m coca_jax.train --config experiments/demo.py --workdir NEW \\
      --config.init.source=OLD_WORKDIR_OR_STEP_DIR_OR_BUNDLE

Fields of `config.init` (all optional except source):
  source         a workdir (its latest checkpoint), a checkpoints/<step> directory, or a bundle
                 (`coca_jax.export`, `coca_jax.interop.open_clip import`).
  include_regex  only parameters whose '/'-joined unscanned path matches are copied ('' = all);
  exclude_regex  parameters that match are not copied;
  reinit_regex   parameters that match keep their fresh initialisation (same as exclude; named
                 for intent: a new head, a re-initialised pooler).
Only parameters are read: the optimizer starts fresh, so the new run may use another optimizer,
schedule or batch size. Parameters that are not copied keep the new run's initialisation, and
the log says how many there are and which.

Shapes must agree leaf by leaf, with two handled differences:
  * the image position embedding when the image size (or patch size) changed: resized as a 2-D
    grid (cubic), the class-token row kept as is — the paper fine-tunes at a higher resolution;
  * the vocabulary (token embedding, vocab head) when the tokenizer changed (another kind,
    another file or another size): re-initialised, since ids no longer mean the same pieces.
Any other mismatch raises one error naming every mismatching leaf. Source and target may differ
in `scan_layers` (paths are compared in the unscanned layout).
"""

from __future__ import annotations

import hashlib
import math
import re

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from coca_jax.core import fs
from coca_jax.interop import params as flat_params
from coca_jax.core import schema
from coca_jax.data.tokenizer import TOKENIZER_FILES
from coca_jax.inference import api
from coca_jax.models.coca import CoCaConfig
from coca_jax.training import checkpoint

VOCAB_LEAVES = re.compile(r"^(token_embed/embedding|vocab_head/(kernel|bias))$")


class WarmStartError(ValueError):
  """The source does not fit the new model; the message names every leaf."""


def _tokenizer_digest(config, root: str | None = None) -> tuple[str, str]:
  kind = config.data.tokenizer_kind
  candidates = [fs.join(root, TOKENIZER_FILES.get(kind, ""))] if root else []
  candidates.append(config.data.tokenizer)
  for path in candidates:
    if path and fs.isfile(path):
      return kind, hashlib.sha256(fs.read_bytes(path)).hexdigest()
  return kind, ""


def resize_pos_embed(table: np.ndarray, source: CoCaConfig, target: CoCaConfig) -> np.ndarray:
  """[source image tokens, width] -> [target image tokens, width]: the patch rows resized as a
  2-D grid, the class-token row (first, if any) unchanged."""
  cls_rows = int(source.vision.class_token)
  if cls_rows != int(target.vision.class_token):
    raise WarmStartError("image_pos_embed: source and target disagree on model.vision.class_token")
  grid_in = int(math.isqrt(table.shape[0] - cls_rows))
  grid_out = target.image_size // target.patch_size
  patches = table[cls_rows:].reshape(grid_in, grid_in, -1)
  resized = jax.image.resize(jnp.asarray(patches), (grid_out, grid_out, table.shape[-1]), "cubic")
  return np.concatenate([table[:cls_rows], np.asarray(resized).reshape(grid_out ** 2, -1)])


def merge(source_flat: dict, fresh_flat: dict, source: CoCaConfig, target: CoCaConfig, *,
          include: str = "", exclude: str = "", reinit: str = "",
          tokenizer_changed: bool = False) -> tuple[dict, dict]:
  """Target flat params: source values where they apply, fresh ones elsewhere.
  Returns (flat params, report {copied, interpolated, reinitialised, missing_in_source, unused})."""
  out, problems = {}, []
  report = {"copied": [], "interpolated": [], "reinitialised": [], "missing_in_source": [],
            "unused": sorted(set(source_flat) - set(fresh_flat))}
  for path, fresh in fresh_flat.items():
    keep_fresh = ((include and not re.search(include, path))
                  or (exclude and re.search(exclude, path)) or (reinit and re.search(reinit, path)))
    if keep_fresh:
      out[path] = fresh
      report["reinitialised"].append(path)
      continue
    if path not in source_flat:
      out[path] = fresh
      report["missing_in_source"].append(path)
      continue
    value = source_flat[path]
    if path == "image_pos_embed" and value.shape != fresh.shape:
      value = resize_pos_embed(value, source, target)
      report["interpolated"].append(path)
    elif VOCAB_LEAVES.match(path) and (tokenizer_changed or value.shape != fresh.shape):
      out[path] = fresh
      report["reinitialised"].append(path)
      continue
    if value.shape != fresh.shape:
      problems.append(f"{path}: source {value.shape}, new model {fresh.shape}")
      continue
    out[path] = value.astype(fresh.dtype)
    if path not in report["interpolated"]:
      report["copied"].append(path)
  if problems:
    raise WarmStartError(
        f"config.init.source does not fit the new model: {len(problems)} parameter(s) differ "
        "in shape (exclude them with config.init.exclude_regex / reinit_regex, or match the "
        "model config):\n  - " + "\n  - ".join(problems))
  return out, report


def warm_start_params(config, fresh_params):
  """The new run's parameters (same tree and dtypes as `fresh_params`, host numpy) from
  `config.init`. Logs and returns (params, report)."""
  init = config.init
  found = api.resolve(init.source)
  source_config = checkpoint.read_config(found["root"])
  _, source_params = api.load_params(found, source_config)
  source_model = schema.build(schema.CoCa, source_config.model)
  target_model = schema.build(schema.CoCa, config.model)
  (source_kind, source_digest), (kind, digest) = (
      _tokenizer_digest(source_config, found["root"]), _tokenizer_digest(config))
  # A file on both sides that differs, another kind, or another size: ids mean other pieces.
  tokenizer_changed = (source_model.text.vocab_size != target_model.text.vocab_size
                       or source_kind != kind
                       or bool(source_digest and digest and source_digest != digest))
  flat, report = merge(
      flat_params.flatten(source_model, source_params),
      flat_params.flatten(target_model, fresh_params), source_model, target_model,
      include=init.include_regex, exclude=init.exclude_regex,
      reinit=init.reinit_regex, tokenizer_changed=tokenizer_changed)
  params = flat_params.unflatten(target_model, flat)
  logging.info("Warm start from %s%s: %d copied, %d interpolated %s, %d re-initialised "
               "%s, %d not in the source %s, %d source parameters unused %s", init.source,
               "" if found["step"] is None else f" (step {found['step']})", len(report["copied"]), len(report["interpolated"]),
               report["interpolated"], len(report["reinitialised"]), report["reinitialised"][:10],
               len(report["missing_in_source"]), report["missing_in_source"][:10],
               len(report["unused"]), report["unused"][:10])
  return params, report


def warm_start(config, state, shardings):
  """TrainState with its params replaced by `warm_start_params`, placed on `shardings`
  (the optimizer state stays fresh). A MoME (VLMo stages) takes its source's parameters leaf by
  leaf (`checkpoint.load_params_for_init`: same-shaped leaves copied, new heads kept fresh);
  the regex filters, position-embedding resizing and vocabulary replacement are CoCa-towers
  features for now."""
  if config.model.backbone == "mome":
    params, report = checkpoint.load_params_for_init(config.init.source, state.params,
                                                     shardings.params)
    logging.info("Initialised %d parameter arrays from %s; kept fresh: %s; ignored: %s",
                 report["loaded"], config.init.source, report["kept_fresh"] or "none",
                 report["ignored"] or "none")
    return state.replace(params=params)
  params, _ = warm_start_params(config, state.params)
  params = jax.tree.map(lambda p, s: jax.device_put(p, s), params, shardings.params)
  return state.replace(params=params)
