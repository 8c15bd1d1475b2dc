"""Experiment configs: loading, and validation before anything is built.

A config is an `ml_collections.ConfigDict` from `experiments/<name>.py:get_config(arg)` with
groups model, data, train, loss, optim, mesh, checkpoint, evals. `validate` reports every problem
at once, each naming the field and the fix, so a pod job fails in seconds, not after compile.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import ml_collections

from coca_jax import fs, sharding

REQUIRED_GROUPS = ("model", "data", "train", "loss", "optim", "mesh", "checkpoint", "evals")


class ConfigError(ValueError):
  """One or more config problems; the message lists each with its fix."""


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/file.py[:arg]' the same way the CLIs' --config flag does."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_coca_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()



# Fields of config.model that only CoCa towers read: a MoME config must not set them (they would
# be silently ignored).
TOWER_ONLY_MODEL_FIELDS = ("vision", "n_gen_queries", "remat", "scan_layers")
TOWER_ONLY_TEXT_FIELDS = ("width", "heads", "mlp_dim", "n_uni", "n_multi")
MOME_FIELDS = ("depth", "width", "heads", "mlp_dim", "fusion_layers")
MOME_OPTIONAL_FIELDS = ("experts",)  # Learned routing inside the modality experts.
MOME_EXPERTS = ("image", "text", "fusion")


def _validate_common_model(m, need, positive):
  for name in ("image_size", "patch_size", "embed_dim", "pooler_heads"):
    positive("model", m, name)
  for name in ("vocab_size", "max_len"):
    positive("model.text", m.text, name)
  if isinstance(m.image_size, int) and isinstance(m.patch_size, int) and m.patch_size > 0:
    need(m.image_size % m.patch_size == 0,
         f"config.model.image_size={m.image_size} is not divisible by config.model.patch_size="
         f"{m.patch_size}; pick a patch size that divides the image size")
  if isinstance(m.text.max_len, int):
    need(m.text.max_len >= 3, f"config.model.text.max_len={m.text.max_len} must be >= 3 "
         "(BOS, at least one token, EOS)")
  need(m.dtype in ("float32", "bfloat16"),
       f"config.model.dtype={m.dtype!r} is unknown; use float32 or bfloat16")
  need(0 < m.temperature_init < 1, f"config.model.temperature_init={m.temperature_init} must be "
       "in (0, 1); the paper uses 0.07")


def _validate_towers(config, need, positive, problems):
  m = config.model
  _validate_common_model(m, need, positive)
  positive("model", m, "n_gen_queries")
  for name in ("width", "depth", "heads", "mlp_dim"):
    positive("model.vision", m.vision, name)
  for name in ("width", "heads", "mlp_dim", "n_uni", "n_multi"):
    positive("model.text", m.text, name)
  need("mome" not in m, "config.model.mome is only read with config.model.backbone='mome'; "
       "remove it or set the backbone")
  if not problems:
    need(m.vision.width % m.vision.heads == 0,
         f"config.model.vision.width={m.vision.width} is not divisible by "
         f"config.model.vision.heads={m.vision.heads}")
    need(m.text.width % m.text.heads == 0,
         f"config.model.text.width={m.text.width} is not divisible by "
         f"config.model.text.heads={m.text.heads}")
    need(m.vision.width % m.pooler_heads == 0,
         f"config.model.vision.width={m.vision.width} is not divisible by "
         f"config.model.pooler_heads={m.pooler_heads}")
    need(not (m.pooling == "open_clip" and m.n_gen_queries < 2),
         "config.model.pooling='open_clip' needs config.model.n_gen_queries >= 2 "
         "(query 0 is contrastive, the rest feed the decoder)")
  need(m.pooling in ("cascade", "parallel", "open_clip"),
       f"config.model.pooling={m.pooling!r} is unknown; use cascade, parallel or open_clip")
  need(m.remat in ("none", "full", "dots", "minimal"),
       f"config.model.remat={m.remat!r} is unknown; use none, full, dots or minimal")


def _validate_mome(config, need, positive):
  """backbone='mome': config.model.mome = dict(depth, width, heads, mlp_dim, fusion_layers);
  image/patch size, vocabulary and text length from the usual fields; nothing tower-only."""
  m = config.model
  _validate_common_model(m, need, positive)
  unused = [f"config.model.{f}" for f in TOWER_ONLY_MODEL_FIELDS if f in m]
  unused += [f"config.model.text.{f}" for f in TOWER_ONLY_TEXT_FIELDS if f in m.text]
  verb = "is" if len(unused) == 1 else "are"
  need(not unused, f"{', '.join(unused)} {verb} only read by CoCa towers; with "
       "config.model.backbone='mome' the shared stack is config.model.mome: remove them")
  pooling = m.get("pooling", "attention")
  need(pooling in ("attention", "cls"), f"config.model.pooling={pooling!r} is not a MoME "
       "pooling; use 'attention' (an attentional pooler, as CoCa) or 'cls' (an image [CLS] "
       "token, as VLMo)")
  if "mome" not in m:
    need(False, "config.model.backbone='mome' needs config.model.mome = dict(depth, width, "
         "heads, mlp_dim, fusion_layers)")
    return
  s = m.mome
  missing = [f for f in MOME_FIELDS if f not in s]
  known = list(MOME_FIELDS + MOME_OPTIONAL_FIELDS)
  extra = sorted(set(s.keys()) - set(known))
  need(not missing, f"config.model.mome is missing {missing}; it needs {list(MOME_FIELDS)}")
  need(not extra, f"config.model.mome has unknown fields {extra}; known: {known}")
  experts = s.get("experts") or {}
  unknown = sorted(set(experts) - set(MOME_EXPERTS))
  need(not unknown, f"config.model.mome.experts has unknown modality experts {unknown}; route "
       f"any of {', '.join(MOME_EXPERTS)} (each dict(num_experts, top_k, capacity_factor, "
       "every) or None)")
  if missing:
    return
  for name in ("depth", "width", "heads", "mlp_dim"):
    positive("model.mome", s, name)
  need(isinstance(s.fusion_layers, int) and 0 <= s.fusion_layers,
       f"config.model.mome.fusion_layers={s.fusion_layers!r} must be an integer >= 0")
  ints = all(isinstance(s[f], int) and s[f] > 0 for f in ("depth", "width", "heads"))
  if ints and isinstance(s.fusion_layers, int):
    need(s.fusion_layers <= s.depth,
         f"config.model.mome.fusion_layers={s.fusion_layers} exceeds config.model.mome.depth="
         f"{s.depth}; the VL-FFN sits in the top fusion_layers of the stack: use at most "
         f"{s.depth}")
    need(s.width % s.heads == 0, f"config.model.mome.width={s.width} is not divisible by "
         f"config.model.mome.heads={s.heads}")
    # `every` counts the layers of the shared stack; ffn_fusion lives in the top fusion_layers.
    for name in MOME_EXPERTS:
      every = (experts.get(name) or {}).get("every", 1)
      if not experts.get(name) or not isinstance(every, int) or every < 1:
        continue
      first = s.depth - s.fusion_layers if name == "fusion" else 0
      need(any((i + 1) % every == 0 for i in range(first, s.depth)),
           f"config.model.mome.experts.{name}.every={every} routes none of the layers "
           f"{first}..{s.depth - 1} that hold ffn_{name}; use every <= {s.depth} (layer i is "
           "routed when (i + 1) % every == 0) or remove the group")
    if isinstance(m.pooler_heads, int) and m.pooler_heads > 0:
      need(s.width % m.pooler_heads == 0, f"config.model.mome.width={s.width} is not divisible "
           f"by config.model.pooler_heads={m.pooler_heads}")
  need(config.train.get("microbatches", 1) == 1 or not config.loss.get("itm_weight", 0.0),
       "config.loss.itm_weight > 0 (image-text matching) needs config.train.microbatches=1")
  itm_examples = config.loss.get("itm_examples", 0)
  batch = config.train.batch_size
  need(isinstance(itm_examples, int) and itm_examples >= 0
       and (not itm_examples or (isinstance(batch, int) and batch % itm_examples == 0)),
       f"config.loss.itm_examples={itm_examples!r} must be 0 (the whole batch) or divide "
       f"config.train.batch_size={batch}")


def heads_of(config) -> tuple[tuple[str, int], ...]:
  """(field, head count) of every attention in the model, for the tensor-parallel check."""
  m = config.model
  if m.get("backbone", "towers") == "mome":
    return (("mome.heads", m.get("mome", {}).get("heads")), ("pooler_heads", m.pooler_heads))
  return (("vision.heads", m.vision.heads), ("text.heads", m.text.heads),
          ("pooler_heads", m.pooler_heads))


def routed_groups(config) -> list[tuple[str, dict]]:
  """(field, settings) of every learned-routing group the config sets: CoCa towers
  model.vision.experts / model.text.experts; MoME model.mome.experts.<image|text|fusion>."""
  m = config.model
  if m.get("backbone", "towers") == "mome":
    experts = m.get("mome", {}).get("experts") or {}
    return [(f"model.mome.experts.{name}", experts[name]) for name in MOME_EXPERTS
            if experts.get(name)]
  return [(f"model.{side}.experts", m[side].experts) for side in ("vision", "text")
          if m[side].get("experts")]


def _validate_experts(config, need) -> None:
  """Learned routing (`routed_groups`; absent = dense) and the router loss weights."""
  from coca_jax.models.experts import EXPERTS_FIELDS  # Light: flax only, no model built.
  for field, experts in routed_groups(config):
    prefix = f"config.{field}"
    side = field.split(".")[1]
    unknown = sorted(set(experts) - set(EXPERTS_FIELDS))
    need(not unknown, f"{prefix} has unknown fields {unknown}; known: {', '.join(EXPERTS_FIELDS)}")
    num, top_k = experts.get("num_experts", 1), experts.get("top_k", 1)
    factor, every = experts.get("capacity_factor", 1.0), experts.get("every", 1)
    need(isinstance(num, int) and num >= 1,
         f"{prefix}.num_experts={num!r} must be a positive integer (1 = dense)")
    need(isinstance(top_k, int) and top_k >= 1,
         f"{prefix}.top_k={top_k!r} must be a positive integer")
    if isinstance(num, int) and isinstance(top_k, int):
      need(top_k <= num, f"{prefix}.top_k={top_k} exceeds {prefix}.num_experts={num}; use "
           f"top_k <= num_experts")
    need(isinstance(factor, (int, float)) and factor > 0,
         f"{prefix}.capacity_factor={factor!r} must be > 0 (1.0 = an even share per expert)")
    need(isinstance(every, int) and every >= 1,
         f"{prefix}.every={every!r} must be a positive integer (1 = every layer routed)")
    towers = side in ("vision", "text")
    if (towers and isinstance(every, int) and every > 1
        and config.model.get("scan_layers", True)):
      depths = ({"vision": config.model.vision.depth} if side == "vision" else
                {"text.n_uni": config.model.text.n_uni, "text.n_multi": config.model.text.n_multi})
      for depth_field, depth in depths.items():
        need(not isinstance(depth, int) or depth % every == 0,
             f"config.model.{depth_field}={depth} is not a multiple of {prefix}.every={every}: a "
             "scanned stack repeats groups of `every` layers; set config.model.scan_layers=False "
             "or change one of them")
  for name in ("router_balance_weight", "router_local_entropy_weight",
               "router_global_entropy_weight"):
    weight = config.loss.get(name, 0.0)
    need(isinstance(weight, (int, float)) and weight >= 0,
         f"config.loss.{name}={weight!r} must be a number >= 0")


def validate(config, num_devices: int | None = None) -> None:
  """Raises ConfigError listing every problem found. `num_devices` enables mesh checks."""
  problems: list[str] = []
  missing = [g for g in REQUIRED_GROUPS if g not in config]
  if missing:
    raise ConfigError("config is missing groups " + ", ".join(missing) +
                      "; start from experiments/demo.py")

  def need(cond, message):
    if not cond:
      problems.append(message)

  def positive(prefix, group, name):
    value = group[name]
    need(isinstance(value, int) and value > 0,
         f"config.{prefix}.{name}={value!r} must be a positive integer")

  m = config.model
  backbone = m.get("backbone", "towers")
  need(backbone in ("towers", "mome"),
       f"config.model.backbone={backbone!r} is unknown; use 'towers' (CoCa) or 'mome' "
       "(one shared stack with modality experts)")
  itm_weight = config.loss.get("itm_weight", 0.0)
  need(isinstance(itm_weight, (int, float)) and itm_weight >= 0,
       f"config.loss.itm_weight={itm_weight!r} must be a number >= 0 (0 = off)")
  if backbone == "mome":
    _validate_mome(config, need, positive)
    if "mome" in m:
      _validate_experts(config, need)
  elif backbone == "towers":
    _validate_towers(config, need, positive, problems)
    _validate_experts(config, need)
    need(not itm_weight, f"config.loss.itm_weight={itm_weight} needs a fused image-text pass, "
         "which CoCa towers do not have; set it to 0 or use config.model.backbone='mome'")
    # open_clip architecture options (towers only).
    need(m.get("activation", "gelu_tanh") in ("gelu_tanh", "gelu", "quick_gelu"),
         f"config.model.activation={m.get('activation')!r} is unknown; use gelu_tanh, gelu "
         "(exact, open_clip) or quick_gelu")
    need(m.text.get("multimodal_layout", "coca") in ("coca", "open_clip"),
         f"config.model.text.multimodal_layout={m.text.get('multimodal_layout')!r} is unknown; "
         "use coca or open_clip")
    need(m.text.get("cls_mask", "correct") in ("correct", "open_clip_legacy"),
         f"config.model.text.cls_mask={m.text.get('cls_mask')!r} is unknown; use correct or "
         "open_clip_legacy")
    pooler_width = m.get("pooler_width", 0)
    need(isinstance(pooler_width, int) and pooler_width >= 0
         and pooler_width % m.pooler_heads == 0,
         f"config.model.pooler_width={pooler_width!r} must be 0 (the vision width) or a "
         f"multiple of config.model.pooler_heads={m.pooler_heads}")

  t = config.train
  for name in ("steps", "batch_size", "log_every"):
    positive("train", t, name)
  need(config.optim.name in ("adamw", "adafactor"),
       f"config.optim.name={config.optim.name!r} is unknown; use adamw or adafactor")
  need(config.optim.lr > 0, f"config.optim.lr={config.optim.lr} must be > 0")
  need(config.optim.get("decay", "cosine") in ("cosine", "linear", "constant"),
       f"config.optim.decay={config.optim.get('decay')!r} is unknown; use cosine, linear or constant")
  need(config.loss.get("contrastive", "softmax") in ("softmax", "sigmoid"),
       f"config.loss.contrastive={config.loss.get('contrastive')!r} is unknown; use softmax or sigmoid")
  need(config.loss.get("contrastive_impl", "gathered") in ("gathered", "chunked"),
       f"config.loss.contrastive_impl={config.loss.get('contrastive_impl')!r} is unknown; "
       "use gathered or chunked")
  need(t.get("nonfinite", "halt") in ("halt", "skip"),
       f"config.train.nonfinite={t.get('nonfinite')!r} is unknown; use halt (stop at the first "
       "NaN/inf loss or gradient) or skip (discard that update and go on)")
  skips = t.get("max_consecutive_skips", 10)
  need(isinstance(skips, int) and skips >= 1,
       f"config.train.max_consecutive_skips={skips!r} must be a positive integer")
  need(config.loss.get("contrastive_reduction", "sum") in ("sum", "mean"),
       f"config.loss.contrastive_reduction={config.loss.get('contrastive_reduction')!r} is "
       "unknown; use sum (the paper's eq. 1) or mean (open_clip)")
  init = config.get("init", {})
  for name in ("include_regex", "exclude_regex", "reinit_regex"):
    try:
      re.compile(init.get(name, "") or "")
    except re.error as e:
      problems.append(f"config.init.{name}={init.get(name)!r} is not a valid regex ({e})")
  microbatches = t.get("microbatches", 1)
  need(isinstance(microbatches, int) and microbatches >= 1,
       f"config.train.microbatches={microbatches!r} must be a positive integer")
  source = config.get("init", {}).get("source", "")
  need(not source or fs.exists(source),
       f"config.init.source={source!r} does not exist; give a previous run's workdir or one of "
       "its checkpoint step directories (DIR/checkpoints/<step>)")
  need(config.checkpoint.every_steps >= 0, "config.checkpoint.every_steps must be >= 0 (0 = off)")
  need(config.checkpoint.keep >= 1, f"config.checkpoint.keep={config.checkpoint.keep} must be >= 1")

  if num_devices is not None:
    try:
      sizes = sharding.mesh_shape(config.mesh, num_devices)
    except sharding.MeshConfigError as e:
      problems.append(str(e))
    else:
      shards = math.prod(sizes[a] for a in sharding.BATCH_AXES)
      if isinstance(t.batch_size, int) and t.batch_size > 0:
        problem = sharding.batch_split_problem(
            t.batch_size, shards,
            microbatches if isinstance(microbatches, int) and microbatches > 0 else 1, sizes)
        if problem:
          problems.append(problem)
      expert_axis = sizes["expert"]
      for field, experts in routed_groups(config) if backbone in ("towers", "mome") else ():
        num = experts.get("num_experts", 1)
        if isinstance(num, int) and num > 1 and num % expert_axis:
          problems.append(
              f"config.{field}.num_experts={num} is not divisible by "
              f"config.mesh.expert={expert_axis}; use a multiple of {expert_axis} experts or "
              "a mesh expert size that divides it")
      tensor = sizes["tensor"]
      for field, heads in heads_of(config):
        if isinstance(heads, int) and heads % tensor:
          problems.append(f"config.model.{field}={heads} is not divisible by config.mesh.tensor="
                          f"{tensor}; use a tensor size that divides every head count")
  if problems:
    raise ConfigError(f"{len(problems)} config problem(s):\n  - " + "\n  - ".join(problems))

