"""Warm start: a new run's parameters from a trained or imported model (`config.init`).

  python -m coca_jax.train --config experiments/demo.py --workdir NEW \\
      --config.init.source=OLD_WORKDIR_OR_STEP_DIR_OR_BUNDLE

Fields of `config.init` (all optional except source):
  source         a workdir (its newest READABLE checkpoint, the rule resuming uses), a
                 checkpoints/<step> directory, a bundle (`coca_jax.export`, orbax or
                 safetensors; `coca_jax.interop.open_clip import`), or a published name
                 (`coca_jax.list_pretrained()`, e.g. open_clip:coca_ViT-B-32/laion2b_s13b_b90k;
                 `python -m coca_jax.train` downloads and converts it once).
  include_regex  only parameters whose '/'-joined unscanned path matches are copied ('' = all);
  exclude_regex  parameters that match are not copied;
  reinit_regex   parameters that match keep their fresh initialisation (same as exclude; named
                 for intent: a new head, a re-initialised pooler).
Only parameters are read: the optimizer starts fresh, so the new run may use another optimizer,
schedule or batch size. Parameters that are not copied keep the new run's initialisation, and
the log says how many there are and which.

Shapes must agree leaf by leaf, with three handled differences:
  * the image position embedding when the image size (or patch size) changed: resized as a 2-D
    grid (cubic), the class-token row kept as is — the paper fine-tunes at a higher resolution;
  * the text position embedding of a shorter text: its first rows (VLMo's stage 3 starts from
    stage 2's 196 positions with 40);
  * the vocabulary (token embedding, vocab head) when the tokenizer changed (another kind,
    another file or another size): re-initialised, since ids no longer mean the same pieces.
Any other mismatch raises one error naming every mismatching leaf. Source and target may differ
in `scan_layers` (paths are compared in the unscanned layout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from typing import Any, Callable

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from coca_jax.core import fs
from coca_jax.core import pretrained
from coca_jax.core import schema
from coca_jax.core import sharding
from coca_jax.data.tokenizer import TOKENIZER_FILES
from coca_jax.interop import params as flat_params
from coca_jax.training import checkpoint
from coca_jax.training import lora as lora_lib
from coca_jax.training import step as step_lib

EXPORT_MANIFEST = "export.json"
EXPORT_PARAMS = "params"

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


def resize_pos_embed(table: np.ndarray, source: schema.CoCa, target: schema.CoCa) -> np.ndarray:
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


def merge(source_flat: dict, fresh_flat: dict, source: schema.CoCa, target: schema.CoCa, *,
          include: str = "", exclude: str = "", reinit: str = "",
          tokenizer_changed: bool = False, layout_rules: bool = True) -> tuple[dict, dict]:
  """Target flat params: source values where they apply, fresh ones elsewhere.
  `layout_rules`: the CoCa position-embedding and vocabulary rules apply (`source`, `target`
  are then schema.CoCa); without them every leaf must agree in shape.
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
    if layout_rules and path == "image_pos_embed" and value.shape != fresh.shape:
      value = resize_pos_embed(value, source, target)
      report["interpolated"].append(path)
    elif (layout_rules and path == "text_pos_embed" and value.ndim == 2
          and value.shape[0] > fresh.shape[0] and value.shape[1:] == fresh.shape[1:]):
      # A shorter text: the first positions keep their meaning (VLMo's stage 3 truncates its
      # stage-2 table of 196 to 40 the same way).
      value = value[:fresh.shape[0]]
      report["interpolated"].append(path)
    elif (layout_rules and VOCAB_LEAVES.match(path)
          and (tokenizer_changed or value.shape != fresh.shape)):
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


# ----------------------------------------------------------------------------------------------
# Finding and reading a source: a workdir, one checkpoint step, or an export bundle.
# ----------------------------------------------------------------------------------------------

def resolve(path: str, step: int | None = None) -> dict:
  """Finds what `path` is: a workdir, a checkpoint step, a bundle, or a published name
  (`core.pretrained`) whose converted bundle is in the cache. Returns dict(kind, path (the
  resolved path), root (where config.json lives), state_dir or params_dir, step)."""
  path = pretrained_bundle(path)
  return {**_resolve(path, step), "path": path}


def pretrained_bundle(path: str) -> str:
  """`path` resolved; a published name is replaced by its converted bundle in the cache. A name
  not converted yet is a FileNotFoundError saying what converts it (this layer only reads)."""
  if not pretrained.is_name(path):
    return fs.resolve(path)
  bundle = pretrained.bundle_dir(path)
  if not fs.exists(fs.join(bundle, EXPORT_MANIFEST)):
    raise FileNotFoundError(
        f"{path} is not downloaded and converted yet (its bundle would be {bundle}); "
        f"coca_jax.load({path!r}) or `python -m coca_jax.interop.pretrained fetch {path}` "
        "does both once")
  return bundle


def _resolve(path: str, step: int | None) -> dict:
  if fs.exists(fs.join(path, EXPORT_MANIFEST)):
    manifest = json.loads(fs.read_text(fs.join(path, EXPORT_MANIFEST)))
    return dict(kind="export", root=path,
                params_dir=fs.join(path, manifest.get("params", EXPORT_PARAMS)),
                step=manifest.get("step"))
  if fs.isdir(fs.join(path, checkpoint.STATE)):  # DIR/checkpoints/<step>
    root = fs.dirname(fs.dirname(path))
    return dict(kind="checkpoint", root=root, state_dir=fs.join(path, checkpoint.STATE),
                step=int(fs.basename(path)))
  if fs.exists(fs.join(path, "config.json")):
    ckpt_dir = checkpoint.checkpoint_dir(path)
    if not checkpoint.step_dirs(path)[0]:
      raise FileNotFoundError(f"{path} is a workdir without checkpoints under {ckpt_dir}; "
                              "train it first (python -m coca_jax.train)")
    # The step is chosen when the parameters are read (`load_params`), by the rule train uses.
    return dict(kind="workdir", root=path, step=step, state_dir=None)
  raise FileNotFoundError(
      f"{path} is neither a training workdir (config.json + checkpoints/), a checkpoint step "
      f"directory (checkpoints/<step>/state) nor an export ({EXPORT_MANIFEST}); pass one of those")


def _on_device(abstract, device=None):
  """Restore targets: each leaf placed whole on one of this host's devices."""
  return sharding.with_shardings(
      abstract, jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0]))


def restore_params_from_state(state_dir: str, abstract):
  """Reads only TrainState.params from an orbax StandardSave of the TrainState at state_dir."""
  target = _on_device(abstract)
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(
        fs.as_path(state_dir),
        args=ocp.args.PyTreeRestore(item={"params": target},
                                    restore_args={"params": restore_args}, partial_restore=True))
  return restored["params"]


def restore_exported_params(params_dir: str, abstract, dtype=None):
  """Reads an exported params tree (saved in f32 or bf16) and casts it to `dtype` (default: the
  abstract dtypes, i.e. float32 master weights)."""
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(fs.as_path(params_dir)).item_metadata
    target = jax.tree.map(lambda a, m: jax.ShapeDtypeStruct(a.shape, m.dtype),
                          abstract, stored.tree if hasattr(stored, "tree") else stored)
    params = ckptr.restore(fs.as_path(params_dir), _on_device(target))
  return jax.tree.map(lambda p, a: p.astype(dtype or a.dtype), params, abstract)


def read_safetensors_params(path: str, config, abstract):
  """A bundle's model.safetensors (flat unscanned keys, f32 or bf16) -> float32 params in the
  layout of `config` (scanned or not); every leaf checked against `abstract`."""
  flat = {k: np.asarray(v, np.float32)
          for k, v in flat_params.load_safetensors(fs.read_bytes(path), path).items()}
  params = flat_params.unflatten(schema.build(schema.CoCa, config.model), flat)
  flat_params.check_against(abstract, params)
  device = jax.local_devices()[0]
  return jax.tree.map(lambda p, a: jax.device_put(jnp.asarray(p, a.dtype), device),
                      params, abstract)


def load_params(found: dict, config):
  """(module, float32 params on one device) of what `resolve` found, built from `config` (the
  config stored beside it). A workdir gives its requested step, else its newest readable one
  (the rule `train` resumes by); `found["step"]` is set to the step read. A LoRA run's
  checkpoint (config.optim.lora) holds adapters only: they are read and applied to the base
  its config.init.source names, so the params returned are the adapted model's."""
  model = step_lib.build_model(config)
  settings = lora_lib.lora_settings(config)
  if settings.enabled and found["kind"] != "export":
    boxed = step_lib.abstract_params(config, model, boxed=True)
    trainable, _ = lora_lib.abstract_trainable(lora_lib.targets(boxed, settings), boxed,
                                               settings)
    adapters = _restore_state_params(found, trainable)
    return model, jax.jit(lora_lib.apply, static_argnums=2)(
        _on_device_tree(base_params(config)), adapters, settings.scale)
  abstract = step_lib.abstract_params(config, model)
  if found["kind"] == "export" and found["params_dir"].endswith(".safetensors"):
    params = read_safetensors_params(found["params_dir"], config, abstract)
  elif found["kind"] == "export":
    params = restore_exported_params(found["params_dir"], abstract)
  else:
    params = _restore_state_params(found, abstract)
  return model, params


def _restore_state_params(found: dict, abstract):
  """TrainState.params of a workdir (its step by the resume rule) or a checkpoint step."""
  if found["kind"] == "workdir":
    root = found["root"]
    params, found["step"], _ = checkpoint.restore_newest_readable(
        root, lambda s: restore_params_from_state(
            fs.join(checkpoint.checkpoint_dir(root), str(s), checkpoint.STATE), abstract),
        step=found["step"], need_data=False)
    return params
  return restore_params_from_state(found["state_dir"], abstract)


def _on_device_tree(params):
  device = jax.local_devices()[0]
  return jax.tree.map(lambda p: jax.device_put(jnp.asarray(p), device), params)


def base_params(config):
  """The frozen base of a LoRA run (host numpy, this config's layout): config.init.source read
  as a warm start reads it, every parameter from the source. A parameter the source lacks
  (or that include/exclude/reinit or a tokenizer change would re-initialise) is an error: a
  frozen random weight would never learn."""
  if not config.init.source:
    raise WarmStartError("config.optim.lora adapts a trained model: set config.init.source to "
                         "its workdir, checkpoint step or bundle")
  fresh = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), step_lib.abstract_params(config))
  params, report = warm_start_params(config, fresh)
  fresh_leaves = report["missing_in_source"] + report["reinitialised"]
  if fresh_leaves:
    raise WarmStartError(
        f"config.init.source={config.init.source!r} does not give every parameter of the LoRA "
        f"base ({len(fresh_leaves)} would stay at zero: {fresh_leaves[:5]}); use a source of "
        "the same model and tokenizer, without config.init include/exclude/reinit regexes")
  return params


def adopt_base_tokenizer(config) -> str | None:
  """A LoRA run keeps the base's embeddings frozen, so its token ids must mean what they meant
  to the base. With config.data.tokenizer unset (which would train a new tokenizer on the new
  data), a LoRA run takes the base's tokenizer file, kind and vocabulary size instead. Returns
  the file adopted, or None (no LoRA, no source, a tokenizer given, or none found there)."""
  if not (config.optim.lora.rank and config.init.source) or config.data.tokenizer:
    return None
  found = resolve(config.init.source)
  source = checkpoint.read_config(found["root"])
  path = fs.join(found["root"], TOKENIZER_FILES.get(source.data.tokenizer_kind, ""))
  if not fs.isfile(path):
    return None
  config.data.tokenizer = path
  config.data.tokenizer_kind = source.data.tokenizer_kind
  config.data.tokenizer_vocab = source.data.tokenizer_vocab
  config.model.text.vocab_size = source.model.text.vocab_size
  logging.info("LoRA: using the base's tokenizer %s (%d ids), as its embeddings stay frozen",
               path, source.model.text.vocab_size)
  return path


def lora_base(config, built):
  """`base_params` placed on the base's shards of `built` (a LoRA TrainSetup)."""
  return jax.tree.map(lambda p, s: _place(np.asarray(p), s), base_params(config),
                      built.lora.base_shardings)


# ----------------------------------------------------------------------------------------------
# The per-backbone part: params <-> {'/'-joined path: numpy array}.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamMapping:
  """How a backbone's parameter tree maps to flat paths compared leaf by leaf."""
  flatten: Callable[[Any, Any], dict]    # (config, params) -> {path: np.ndarray}
  unflatten: Callable[[Any, dict], Any]  # (config, {path: array}) -> params
  resizes_and_revocabs: bool             # the CoCa-layout rules of `merge` apply


def _tower_flatten(config, params):
  return flat_params.flatten(schema.build(schema.CoCa, config.model), params)


def _tower_unflatten(config, flat):
  return flat_params.unflatten(schema.build(schema.CoCa, config.model), flat)


def _path_flatten(config, params):
  del config
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def _path_unflatten(config, flat):
  del config
  return traverse_util.unflatten_dict(flat, sep="/")


MAPPINGS = {
    # Towers compare in the unscanned layout, so source and target may differ in scan_layers.
    "towers": ParamMapping(_tower_flatten, _tower_unflatten, resizes_and_revocabs=True),
    # MoME stages (VLMo) share one layout: paths as they are.
    "mome": ParamMapping(_path_flatten, _path_unflatten, resizes_and_revocabs=False),
}


def _mapping(config) -> ParamMapping:
  backbone = config.model.get("backbone", "towers")
  if backbone not in MAPPINGS:
    raise WarmStartError(f"config.model.backbone={backbone!r} has no warm-start mapping; "
                         f"known: {sorted(MAPPINGS)}")
  return MAPPINGS[backbone]


def warm_start_params(config, fresh_params):
  """The new run's parameters (same tree and dtypes as `fresh_params`, host numpy) from
  `config.init`. Logs and returns (params, report)."""
  init = config.init
  found = resolve(init.source)
  source_config = checkpoint.read_config(found["root"])
  source_backbone = source_config.model.get("backbone", "towers")
  if source_backbone != config.model.get("backbone", "towers"):
    raise WarmStartError(
        f"config.init.source={init.source!r} is a {source_backbone!r} model and this run builds "
        f"a {config.model.get('backbone', 'towers')!r} one; start from a source of the same "
        "config.model.backbone")
  mapping = _mapping(config)
  _, source_params = load_params(found, source_config)
  source_flat = mapping.flatten(source_config, source_params)
  del source_params
  fresh_flat = mapping.flatten(config, fresh_params)
  tokenizer_changed, source_model, target_model = False, None, None
  if mapping.resizes_and_revocabs:
    source_model = schema.build(schema.CoCa, source_config.model)
    target_model = schema.build(schema.CoCa, config.model)
    (source_kind, source_digest), (kind, digest) = (
        _tokenizer_digest(source_config, found["root"]), _tokenizer_digest(config))
    # A file on both sides that differs, another kind, or another size: ids mean other pieces.
    tokenizer_changed = (source_model.text.vocab_size != target_model.text.vocab_size
                         or source_kind != kind
                         or bool(source_digest and digest and source_digest != digest))
  flat, report = merge(
      source_flat, fresh_flat, source_model, target_model,
      include=init.include_regex, exclude=init.exclude_regex, reinit=init.reinit_regex,
      tokenizer_changed=tokenizer_changed, layout_rules=mapping.resizes_and_revocabs)
  params = mapping.unflatten(config, flat)
  report["step"] = found["step"]
  logging.info("Warm start from %s%s: %d copied, %d interpolated %s, %d re-initialised "
               "%s, %d not in the source %s, %d source parameters unused %s", init.source,
               "" if found["step"] is None else f" (step {found['step']})",
               len(report["copied"]), len(report["interpolated"]), report["interpolated"],
               len(report["reinitialised"]), report["reinitialised"][:10],
               len(report["missing_in_source"]), report["missing_in_source"][:10],
               len(report["unused"]), report["unused"][:10])
  return params, report


def _place(value: np.ndarray, target: jax.sharding.Sharding):
  # Every host holds the whole array and hands each of its devices its own slice.
  return jax.make_array_from_callback(value.shape, target, lambda index: value[index])


def warm_start(config, state, shardings):
  """TrainState with its params replaced by `warm_start_params`, placed on `shardings`
  (the optimizer state stays fresh)."""
  params, _ = warm_start_params(config, state.params)
  params = jax.tree.map(
      lambda p, f, s: _place(np.asarray(p, f.dtype), s), params, state.params, shardings.params)
  return state.replace(params=params)
