"""Experiment configs: the schema of every field and its default, loading, and validation.

A config is an `ml_collections.ConfigDict` from `experiments/<name>.py:get_config(arg)` with
groups model, data, train, loss, optim, mesh, checkpoint, evals (and optionally init, profile).
`defaults(backbone)` below is the one place that names every field and its default; `complete`
merges an experiment's config over it at load time (`load_config`, the CLIs' --config flag,
`checkpoint.read_config` for saved runs, so a run saved before a field existed loads with its
default), and modules read `config.train.foo` directly. A field marked REQUIRED has no default:
the experiment must set it.

`validate` reports every problem at once, each naming the field and the fix: keys no code reads
(with a "did you mean" suggestion), required fields left out, bad values, and pairs that must
agree (image sizes, vocabulary vs tokenizer, batch vs devices vs microbatches), so a pod job
fails in seconds, not after compile.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import re
import sys

from absl import flags
import ml_collections
from ml_collections.config_flags import config_flags

from coca_jax.core import fs
from coca_jax.core import pretrained
from coca_jax.core import schema
from coca_jax.core import sharding
from coca_jax.core.schema import REQUIRED

REQUIRED_GROUPS = ("model", "data", "train", "loss", "optim", "mesh", "checkpoint", "evals")


class ConfigError(ValueError):
  """One or more config problems; the message lists each with its fix."""


# config.profile: a jax.profiler trace of num_steps steps from start_step (0 = off).
PROFILE_DEFAULTS = {"start_step": 0, "num_steps": 3}


def defaults(backbone: str = "towers") -> dict:
  """A fresh copy of `_defaults(backbone)` (see there)."""
  return copy.deepcopy(_defaults(backbone))


@functools.lru_cache(maxsize=None)
def _defaults(backbone: str) -> dict:
  """Every config field and its default (REQUIRED: none), as nested dicts, for `backbone`.

  The model, train, loss and optim groups and the captioning eval's decoding knobs come from
  their `schema` dataclasses: each default has one home. A nested dict is a group (its keys
  are checked); any other value is a leaf (lists and tuples included).
  """
  decoding = schema.defaults_of(schema.Decoding)
  decoding["max_new_tokens"] = 0  # 0 = config.model.text.max_len - 1 (Decoding's None).
  # An eval group runs when it is enabled and names a split; `dataset` "" = config.data.name,
  # else another prepared dataset: one built by coca_jax.data.build, or a TFDS catalog dataset
  # prepared as array_record (e.g. imagenet2012); `data_dir` "" = config.data.data_dir;
  # `*_feature` name the stored features read ("a/b" = nested). examples 0 = the whole split.
  eval_group = dict(enabled=True, dataset="", split="", examples=0, data_dir="",
                    image_feature="image")
  return dict(
      model=schema.defaults_of(schema.MODELS[backbone]),
      data=dict(
          name="",  # The dataset built by `python -m coca_jax.data.build` (TFDS name).
          data_dir="",  # "" = DIR/tensorflow_datasets under the workdir (train fills it in).
          train_split="train", eval_split="test", image_size=REQUIRED,
          tokenizer="",  # "" = train a SentencePiece tokenizer on the train captions.
          # Or "clip_bpe" (open_clip's fixed 49,408 BPE) or "wordpiece" (BERT's, VLMo's).
          tokenizer_kind="sentencepiece",
          tokenizer_vocab=0,  # Pieces of a trained tokenizer; 0 = config.model.text.vocab_size.
          tokenizer_type="unigram",  # SentencePiece model type of a trained tokenizer.
          num_workers=0, worker_buffer_size=2, random_resized_crop=True, crop_scale=(0.9, 1.0),
          crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
          # Training input path: "auto" decodes a split that fits in_memory_max_mb (MiB, and a
          # quarter of RAM) once and keeps it memory-mapped; "always" / "never" force it.
          in_memory="auto", in_memory_max_mb=1024.0,
          # A mixture (docs/data.md, "Mixtures"): a list of dicts of schema.Source's fields
          # (name, weight; tag, data_dir, split, text "captions" | "labels", templates,
          # class_names, class_names_file, *_feature, label_join). [] = the one dataset `name`,
          # which a mixture still uses for its tokenizer and default eval splits.
          sources=[],
          # Train on the texts alone (VLMo's stage 2, masked language modelling): batches hold
          # "text" only. A text dataset (data.build --format text) needs it; an image-caption
          # dataset then gives its captions.
          text_only=False,
          # Train on the images alone (BEiT's masked image modelling, VLMo's stage 1 at demo
          # scale): batches hold "image" only.
          image_only=False,
          build_demo=False,  # Build the digit-scenes demo set into data_dir if missing.
          # Keyword arguments of data.builders.DemoBuilder (its defaults).
          build_demo_options=dict(num_train=5000, num_test=500, num_digits=1000, image_size=48,
                                  seed=0, grid=0, variation=0.0, strokes=0.0, varied_grid=-1,
                                  varied_single=-1.0, num_transfer=0, num_train_digits=0,
                                  varied_train_digits=False,
                                  show_progress=True)),
      train=schema.defaults_of(schema.Train),
      loss=schema.defaults_of(schema.Loss),
      optim=schema.defaults_of(schema.Optim),
      mesh=dict(data=-1, fsdp=1, tensor=1, expert=1,
                **{f"dcn_{axis}": 1 for axis in sharding.MESH_AXES},
                rules=[]),  # (logical axis, mesh axes) pairs overriding sharding.RULES.
      checkpoint=dict(every_steps=1000, keep=2, async_save=True),
      evals=dict(
          every_steps=0,  # 0 = only at the end of training.
          batch_size=256,
          # transfer_splits: more labelled splits of `dataset`, each read whole and scored
          # with `templates`, or with its own entry of transfer_templates (one list per split;
          # [] = `templates`).
          # Class names: class_names_file (one name per line in label order, or
          # "open_clip:imagenet"; replaces class_names), class_names, or neither: the label's
          # ClassLabel names. Prompts: templates_file (one per line, "open_clip:imagenet" or
          # "open_clip:imagenet_simple"; replaces templates), else templates.
          # See coca_jax/evaluation/prompts.py.
          zeroshot=dict(eval_group, label_feature="label", class_names=[], class_names_file="",
                        templates=[], templates_file="", transfer_splits=[],
                        transfer_templates=[]),
          retrieval=dict(eval_group, captions_feature="captions"),
          captioning=dict(eval_group, captions_feature="captions", batch_size=0,
                          **decoding),  # batch_size 0 = evals'.
          # Video evals (docs/evaluation.md, "Video"; coca_jax/evaluation/video.py) on the clip
          # set in `dir` (relative: under data.data_dir): a manifest `<split>.jsonl` per split,
          # a clip a line ({"clip": video file or folder of frames, "caption", "label"}).
          # num_frames are sampled uniformly per clip (the paper: 16); zero-shot and retrieval
          # use the mean of the frame embeddings; the attentional probe (the image probe's,
          # evaluation/probes.py) trains on probe_train_split's frame tokens for probe_steps
          # steps of probe_batch_size clips at peak lr probe_lr, seeded by probe_seed (heads
          # and weight decay: config.evals.probe's attn_*), and reports probe_split.
          # Each *_split "" = that eval off. build_demo: build the demo's moving-digit clips
          # (data.video.build_demo_clips, build_demo_options) into `dir` if missing.
          video=dict(enabled=True, dir="", zeroshot_split="", retrieval_split="",
                     probe_split="", probe_train_split="", num_frames=16, examples=0,
                     class_names=[], templates=[], probe_steps=200, probe_lr=5e-4,
                     probe_batch_size=128, probe_seed=0, build_demo=False,
                     build_demo_options=dict(num_clips=200, num_frames=16, image_size=48,
                                             grid=8, seed=0)),
          # Frozen-encoder probes (schema.Probe, docs/evaluation.md): an attentional and a
          # linear probe trained on `train_split`, top-1 reported on `split` ("" = off).
          probe=schema.defaults_of(schema.Probe)),
      init=dict(source="", include_regex="", exclude_regex="", reinit_regex=""),
      profile=dict(PROFILE_DEFAULTS),
  )


def _has(tree: dict, dotted: str) -> bool:
  for part in dotted.split("."):
    if not (isinstance(tree, dict) and part in tree):
      return False
    tree = tree[part]
  return True


def _backbone(config) -> str:
  model = config.get("model") if hasattr(config, "get") else None
  backbone = model.get("backbone", "towers") if hasattr(model, "get") else "towers"
  return backbone if backbone in schema.BACKBONES else "towers"


def _merge(schema: dict, given) -> dict:
  """`given` over `schema`, recursively; REQUIRED fields are left out where `given` lacks them;
  keys unknown to the schema are kept (`unknown_keys` reports them)."""
  out = {}
  given = given if hasattr(given, "items") else {}
  for key, default in schema.items():
    if key in given:
      value = given[key]
      if isinstance(default, dict):
        # None (an old run's "group off") takes the group's defaults; a group given as a
        # non-dict is kept as it is for validation to report.
        value = _merge(default, {} if value is None else value) if (
            value is None or hasattr(value, "items")) else value
      out[key] = value
    elif isinstance(default, dict):
      out[key] = _merge(default, {})
    elif default is not REQUIRED:
      out[key] = copy.deepcopy(default)
  for key in given:
    if key not in schema:
      value = given[key]
      out[key] = value.to_dict() if hasattr(value, "to_dict") else value
  return out


def complete(config) -> ml_collections.ConfigDict:
  """A new ConfigDict: `config` over `defaults(its backbone)`. Unknown keys are kept, for
  `validate` / `check_keys` to report."""
  given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return ml_collections.ConfigDict(_merge(defaults(_backbone(config)), given))


def _keys(schema: dict, prefix: str = "") -> list[str]:
  keys = []
  for key, value in schema.items():
    keys.append(prefix + key)
    if isinstance(value, dict):
      keys += _keys(value, prefix + key + ".")
  return keys


def _suggest(path: str, schema: dict) -> str:
  """'; did you mean config.X?' for the closest known key: a sibling in the same group first,
  else any key (whole dotted paths compared); with no close key, the group's known keys."""
  parent, _, leaf = path.rpartition(".")
  group = schema
  for part in filter(None, parent.split(".")):
    group = group.get(part) if isinstance(group, dict) else None
  siblings = list(group) if isinstance(group, dict) else []
  close = [f"{parent}.{c}" if parent else c
           for c in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)]
  if not close:
    ancestors = {".".join(path.split(".")[:i]) for i in range(1, path.count(".") + 1)}
    close = difflib.get_close_matches(
        path, [k for k in _keys(schema) if k not in ancestors], n=1, cutoff=0.75)
  if close:
    return f"; did you mean config.{close[0]}?"
  if siblings:
    where = f"config.{parent}" if parent else "config"
    return f"; {where} has {', '.join(siblings)}"
  return ""


def unknown_keys(config) -> list[str]:
  """One problem per key of `config` that no code reads (not in the schema of its backbone),
  with the closest known key; and one per REQUIRED field left out."""
  backbone = _backbone(config)
  schema = defaults(backbone)
  other = defaults("towers" if backbone == "mome" else "mome")["model"]
  problems = []

  def walk(group, node, prefix):
    for key in group:
      path = f"{prefix}{key}"
      if key not in node:
        if prefix.startswith("model.") and _has(other, path[len("model."):]):
          owner = ("CoCa towers (config.model.backbone='towers')" if backbone == "mome" else
                   "a MoME backbone (config.model.backbone='mome')")
          problems.append(f"config.{path} is only read by {owner}; remove it or set the "
                          "backbone")
        else:
          kind = "key" if prefix else "group"
          problems.append(f"config.{path} is not a config {kind}{_suggest(path, schema)} "
                          "(no code reads it; remove it or fix the name)")
        continue
      value = group[key]
      if isinstance(node[key], dict) and hasattr(value, "items"):
        walk(value, node[key], path + ".")
      elif isinstance(node[key], dict) and value is not None:
        problems.append(f"config.{path}={value!r} must be a group (a dict of "
                        f"{', '.join(node[key])})")

  def required(node, group, prefix):
    for key, default in node.items():
      present = hasattr(group, "items") and key in group
      if default is REQUIRED and not present:
        problems.append(f"config.{prefix}{key} is required (it has no default); set it in the "
                        "experiment config")
      elif isinstance(default, dict) and present and hasattr(group[key], "items"):
        required(default, group[key], f"{prefix}{key}.")

  walk(config, schema, "")
  if not problems:
    required(schema, config, "")
  return problems


def type_problems(config) -> list[str]:
  """One problem per field whose value has another type than its default (an int field given
  "512" or 16.0, a flag given "yes"): a config.json edited by hand or written by another tool
  would otherwise fail deep inside JAX with a TypeError naming no field. A float field takes an
  int; a field whose default is None, or a group, is not checked here (nor `REQUIRED` ones
  left out: `unknown_keys` reports those)."""
  problems = []

  def kind(default):
    if isinstance(default, bool):
      return (bool,), "true or false"
    if isinstance(default, int):
      return (int,), "an integer"
    if isinstance(default, float):
      return (int, float), "a number"
    if isinstance(default, str):
      return (str,), "a string"
    if isinstance(default, (list, tuple)):
      return (list, tuple), "a list"
    return None, ""

  def walk(node, group, prefix):
    for key, default in node.items():
      if not (hasattr(group, "items") and key in group):
        continue
      value = group[key]
      if isinstance(default, dict):
        walk(default, value, f"{prefix}{key}.")
        continue
      if default is REQUIRED:  # No default to compare with: every one is a count or size,
        default = 0.0 if f"{prefix}{key}" == "optim.lr" else 0  # but the learning rate.
      types, word = kind(default)
      if types is None or (isinstance(value, types) and (bool in types or not isinstance(
          value, bool))):
        continue
      like = "" if node[key] is REQUIRED else f", like its default {default!r}"
      problems.append(f"config.{prefix}{key}={value!r} ({type(value).__name__}) must be "
                      f"{word}{like}")

  walk(defaults(_backbone(config)), config, "")
  return problems


def check_keys(config) -> None:
  """Raises ConfigError listing every unknown key and missing required field."""
  problems = unknown_keys(config)
  if problems:
    raise ConfigError(f"{len(problems)} config problem(s):\n  - " + "\n  - ".join(problems))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/file.py[:arg]' the same way the CLIs' --config flag does: the file's
  get_config(arg) completed with the defaults; raises ConfigError on unknown keys."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"--config {path}: no such file (from {os.getcwd()}); give the path of an experiment "
        "config file, e.g. experiments/demo.py, and its args after ':'")
  module_spec = importlib.util.spec_from_file_location("_coca_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  try:
    check_keys(config)
  except ConfigError as e:
    raise ConfigError(f"{spec}: {e}") from None
  return complete(config)


def check_overrides(config, overrides) -> None:
  """Raises ConfigError naming every `--config.KEY` override whose KEY is not in `config` (a
  completed config), with the closest known key."""
  schema = defaults(_backbone(config))
  problems = []
  for key in overrides:
    node, parts = config, key.split(".")
    for part in parts:
      if not (hasattr(node, "items") and part in node):
        problems.append(f"--config.{key}: config.{key} is not a config key"
                        f"{_suggest(key, schema)}")
        break
      node = node[part]
  if problems:
    raise ConfigError(f"{len(problems)} config override problem(s):\n  - " +
                      "\n  - ".join(problems))


def override_keys(argv, name: str = "config") -> list[str]:
  """KEY of every --config.KEY[=VALUE] in `argv`."""
  keys = []
  for arg in argv:
    match = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if match:
      keys.append(match.group(1))
  return keys


class _CompletingParser(config_flags.ConfigFileFlagParser):
  """--config FILE[:args]: loads like `load_config` (defaults merged, unknown keys rejected)
  and checks every --config.KEY override on the command line before it is applied."""

  def __init__(self, name: str, sys_argv=None):
    super().__init__(name=name, lock_config=False)
    self._sys_argv = sys_argv

  def parse(self, path):
    config = load_config(path)
    argv = sys.argv if self._sys_argv is None else self._sys_argv
    check_overrides(config, override_keys(flags.FLAGS.read_flags_from_files(
        argv, force_gnu=False), self.name))
    return config


class _ListParser(flags.ArgumentParser):
  """Parses `--config.KEY="['a', 'b']"` for list fields (class names, templates, freeze
  regexes, ...): ml_collections parses tuples from the command line but not lists."""

  def parse(self, argument):
    if isinstance(argument, (list, tuple)):  # The config's own value (the flag's default).
      return list(argument)
    try:
      value = ast.literal_eval(argument)
    except (ValueError, SyntaxError):
      value = None
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"{argument!r} is not a list; write a Python list literal in quotes, "
                       "e.g. --config.evals.zeroshot.class_names=\"['cat', 'dog']\" ([] for none)")
    return list(value)

  def flag_type(self):
    return "list"


config_flags.register_flag_parser_for_type(list, _ListParser())


def define_config_flag(name: str = "config", help_string: str = "Experiment config "
                       "file[:args].", flag_values=flags.FLAGS, sys_argv=None):
  """Like `config_flags.DEFINE_config_file`, but the loaded config is completed with the
  defaults before the overrides apply (so every field can be overridden) and unknown keys, in
  the file or in a --config.KEY override, fail with a "did you mean" suggestion."""
  flag = config_flags._ConfigFlag(  # pylint: disable=protected-access
      parser=_CompletingParser(name, sys_argv), serializer=flags.ArgumentSerializer(),
      name=name, default=None, help_string=help_string, flag_values=flag_values,
      sys_argv=sys_argv)
  # Filed under the CLI that calls this (as absl names it: sys.argv[0] for __main__), so that
  # CLI's --help lists --config, not only --helpfull.
  caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
  return flags.DEFINE_flag(flag, flag_values,
                           module_name=sys.argv[0] if caller == "__main__" else caller)


REMAT_NAMES = schema.REMAT_NAMES
MOME_EXPERTS = tuple(f.name for f in dataclasses.fields(schema.MoMEExperts))


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
  need(isinstance(m.pooler_width, int) and m.pooler_width >= 0
       and m.pooler_width % m.pooler_heads == 0,
       f"config.model.pooler_width={m.pooler_width!r} must be 0 (the vision width) or a "
       f"multiple of config.model.pooler_heads={m.pooler_heads}")


def _validate_mome(config, need, positive):
  """backbone='mome': config.model.mome = dict(depth, width, heads, mlp_dim, fusion_layers);
  image/patch size, vocabulary and text length from the usual fields."""
  m = config.model
  _validate_common_model(m, need, positive)
  s = m.mome
  experts = s.get("experts") or {}
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
      experts_of = (experts.get(name) or {}).get("num_experts", 1)
      # Only a routed group (num_experts > 1) needs a layer to route: VLMo's stage 2 has no
      # ffn_fusion at all (fusion_layers 0) and no routing.
      if (not experts.get(name) or not isinstance(every, int) or every < 1
          or (isinstance(experts_of, int) and experts_of <= 1)):
        continue
      first = s.depth - s.fusion_layers if name == "fusion" else 0
      need(any((i + 1) % every == 0 for i in range(first, s.depth)),
           f"config.model.mome.experts.{name}.every={every} routes none of the layers "
           f"{first}..{s.depth - 1} that hold ffn_{name}; use every <= {s.depth} (layer i is "
           "routed when (i + 1) % every == 0) or remove the group")
    if isinstance(m.pooler_heads, int) and m.pooler_heads > 0:
      need(s.width % m.pooler_heads == 0, f"config.model.mome.width={s.width} is not divisible "
           f"by config.model.pooler_heads={m.pooler_heads}")
  _validate_vlmo_options(config, need)
  itm_examples = config.loss.itm_examples
  microbatches = config.train.microbatches
  # Under microbatches each one scores the ITM pairs of its share of the kept rows.
  need(not config.loss.itm_weight or not isinstance(itm_examples, int) or not itm_examples
       or not isinstance(microbatches, int) or microbatches < 1
       or itm_examples % microbatches == 0,
       f"config.loss.itm_examples={itm_examples!r} does not split into config.train."
       f"microbatches={microbatches!r}; use a multiple of {microbatches!r}")
  batch = config.train.batch_size
  need(isinstance(itm_examples, int) and itm_examples >= 0
       and (not itm_examples or (isinstance(batch, int) and batch % itm_examples == 0)),
       f"config.loss.itm_examples={itm_examples!r} must be 0 (the whole batch) or divide "
       f"config.train.batch_size={batch}")


def _validate_vlmo_options(config, need) -> None:
  """config.model.mome's VLMo options (docs/vlmo.md): which need the BERT text encoder, and what
  the BERT text encoder rules out. Their allowed values and types come from schema.MoMEStack."""
  m, s = config.model, config.model.mome
  encoder = s.text_encoder
  need(not isinstance(s.layer_scale, (int, float)) or s.layer_scale >= 0,
       f"config.model.mome.layer_scale={s.layer_scale!r} must be >= 0 (0 = none)")
  rate = s.drop_path_rate
  need(not isinstance(rate, (int, float)) or 0 <= rate < 1,
       f"config.model.mome.drop_path_rate={rate!r} must be in [0, 1)")
  if encoder == "causal":
    bert_only = [name for name, off in (("token_types", False), ("relative_position", False),
                                        ("shared_final_norm", False), ("vl_contrastive", False),
                                        ("mlm_head", False), ("drop_path_rate", 0.0),
                                        ("mim_vocab", 0))
                 if s[name] != off]
    need(not bert_only, f"config.model.mome {bert_only} are VLMo options of the BERT text "
         "encoder; set config.model.mome.text_encoder='bert' or leave them off")
  elif encoder == "bert":
    need(m.pooling == "cls", f"config.model.pooling={m.pooling!r}: the BERT text encoder (VLMo) "
         "pools the image [CLS] token; set config.model.pooling='cls'")
    caption = config.loss.caption_weight
    need(not caption, f"config.loss.caption_weight={caption} needs a causal text path, which "
         "config.model.mome.text_encoder='bert' (VLMo) does not have; set "
         "config.loss.caption_weight=0, or text_encoder='causal' for captioning")
    need(config.train.microbatches == 1, "config.model.mome.text_encoder='bert' needs "
         f"config.train.microbatches=1 (got {config.train.microbatches})")
    captioning = config.evals.captioning
    need(not (captioning.enabled and captioning.split), "config.evals.captioning needs a "
         "captioner, which config.model.mome.text_encoder='bert' (VLMo) is not; set "
         "config.evals.captioning.enabled=False")
    if s.relative_position and isinstance(m.text.max_len, int):
      need(isinstance(s.relative_text_length, int) and s.relative_text_length >= m.text.max_len,
           f"config.model.mome.relative_text_length={s.relative_text_length!r} is shorter than "
           f"config.model.text.max_len={m.text.max_len}; the relative position table needs "
           f"relative_text_length >= {m.text.max_len}")


def heads_of(config) -> tuple[tuple[str, int], ...]:
  """(field, head count) of every attention in the model, for the tensor-parallel check."""
  m = config.model
  if m.backbone == "mome":
    return (("mome.heads", m.mome.heads), ("pooler_heads", m.pooler_heads))
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
  for field, experts in routed_groups(config):
    prefix = f"config.{field}"
    side = field.split(".")[1]
    num, top_k = experts.get("num_experts", 1), experts.get("top_k", 1)
    factor, every = experts.get("capacity_factor", 1.0), experts.get("every", 1)
    need(isinstance(num, int) and num >= 1,
         f"{prefix}.num_experts={num!r} must be a positive integer (1 = dense)")
    need(isinstance(top_k, int) and top_k >= 1,
         f"{prefix}.top_k={top_k!r} must be a positive integer")
    if isinstance(num, int) and isinstance(top_k, int) and num > 1:
      need(top_k <= num, f"{prefix}.top_k={top_k} exceeds {prefix}.num_experts={num}; use "
           f"top_k <= num_experts")
    need(isinstance(factor, (int, float)) and factor > 0,
         f"{prefix}.capacity_factor={factor!r} must be > 0 (1.0 = an even share per expert)")
    need(isinstance(every, int) and every >= 1,
         f"{prefix}.every={every!r} must be a positive integer (1 = every layer routed)")
    priority, group = experts.get("priority", "batch"), experts.get("group_size", 0)
    noise = experts.get("noise_std", 0.0)
    need(isinstance(group, int) and group >= 0,
         f"{prefix}.group_size={group!r} must be an integer >= 0 (examples per routing group; "
         "0 = the whole batch)")
    need(isinstance(noise, (int, float)) and noise >= 0,
         f"{prefix}.noise_std={noise!r} must be a number >= 0 (0 = no router noise)")
    if isinstance(noise, (int, float)) and noise > 0:
      need(config.train.microbatches == 1,
           f"{prefix}.noise_std={noise} needs config.train.microbatches=1: the accumulated step "
           "embeds and backpropagates each microbatch in two passes, which would draw different "
           "noise; set noise_std=0 or microbatches=1")
    if isinstance(group, int) and group > 0 and priority == "batch":
      batch, micro = config.train.batch_size, config.train.microbatches
      if isinstance(batch, int) and isinstance(micro, int) and micro >= 1 and batch % micro == 0:
        need((batch // micro) % group == 0,
             f"{prefix}.group_size={group} does not divide the batch of a step "
             f"(config.train.batch_size={batch} / config.train.microbatches={micro}); use a "
             "divisor of it")
      itm = config.loss.get("itm_examples", 0) if config.loss.get("itm_weight", 0) > 0 else 0
      if isinstance(itm, int) and itm > 0:
        need(itm % group == 0, f"{prefix}.group_size={group} does not divide "
             f"config.loss.itm_examples={itm} (the ITM pass routes 3 x that many examples); use "
             "a divisor of both")
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
    weight = config.loss[name]
    need(isinstance(weight, (int, float)) and weight >= 0,
         f"config.loss.{name}={weight!r} must be a number >= 0")


def _validate_pairs(config, need, load_tokenizer) -> None:
  """Fields that must agree with each other; each problem names both fields and the fix.
  `load_tokenizer` (data.tokenizer's; None: skip) reads a given tokenizer to check it against
  the model's vocabulary and special ids."""
  m, data = config.model, config.data
  if isinstance(data.image_size, int) and isinstance(m.image_size, int):
    need(data.image_size == m.image_size,
         f"config.data.image_size={data.image_size} differs from config.model.image_size="
         f"{m.image_size}: the pipeline would feed images the model was not built for; set "
         f"both to the same size (e.g. --config.data.image_size={m.image_size})")
  vocab = m.text.vocab_size
  kinds = schema.TOKENIZER_KINDS
  if load_tokenizer and isinstance(vocab, int) and data.tokenizer and (
      data.tokenizer_kind in kinds) and (os.path.isfile(os.path.expanduser(data.tokenizer))):
    tokenizer = load_tokenizer(os.path.expanduser(data.tokenizer), data.tokenizer_kind)
    need(tokenizer.vocab_size <= vocab,
         f"config.model.text.vocab_size={vocab} is smaller than the {tokenizer.vocab_size} "
         f"pieces of config.data.tokenizer={data.tokenizer!r}; set "
         f"config.model.text.vocab_size={tokenizer.vocab_size} (or more)")
    specials = (m.text.bos_id, m.text.eos_id)
    need(specials == (tokenizer.bos_id, tokenizer.eos_id),
         f"config.model.text (bos_id, eos_id)={specials} but config.data.tokenizer's are "
         f"{(tokenizer.bos_id, tokenizer.eos_id)}; set them to the tokenizer's")
  elif isinstance(vocab, int) and not data.tokenizer:  # A tokenizer trained by the run.
    need(isinstance(data.tokenizer_vocab, int) and 0 <= data.tokenizer_vocab <= vocab,
         f"config.data.tokenizer_vocab={data.tokenizer_vocab!r} exceeds "
         f"config.model.text.vocab_size={vocab}: the trained tokenizer's ids would not fit the "
         f"embedding; set config.data.tokenizer_vocab <= {vocab} (0 = the same)")
  need(data.tokenizer_kind in kinds,
       f"config.data.tokenizer_kind={data.tokenizer_kind!r} is unknown; use one of "
       f"{', '.join(map(repr, kinds))}")


def _validate_sources(sources, need, problems) -> None:
  """config.data.sources: each entry a schema.Source, with a positive weight and its own tag."""
  if not isinstance(sources, (list, tuple)):
    problems.append(f"config.data.sources={sources!r} must be a list of dicts (schema.Source); "
                    "[] = the one dataset config.data.name")
    return
  known = schema.defaults_of(schema.Source)
  tags = []
  for i, entry in enumerate(sources):
    where = f"config.data.sources[{i}]"
    if not hasattr(entry, "items"):
      problems.append(f"{where}={entry!r} must be a dict with keys {', '.join(known)}")
      continue
    for key in entry:
      close = difflib.get_close_matches(str(key), list(known), n=1)
      need(key in known, f"{where}.{key} is not a source field"
           f"{f' (did you mean {close[0]}?)' if close else ''}; use {', '.join(known)}")
    for key, default in known.items():
      need(default is not schema.REQUIRED or key in entry,
           f"{where}.{key} is required (every source names its dataset and its weight)")
    problems += schema.problems_of(schema.Source, entry, f"data.sources[{i}].")
    weight = entry.get("weight")
    need(not isinstance(weight, (int, float)) or weight > 0,
         f"{where}.weight={weight!r} must be > 0 (a source's share of each global batch)")
    tags.append(entry.get("tag") or entry.get("name"))
  repeated = sorted({t for t in tags if tags.count(t) > 1})
  need(not repeated, f"config.data.sources: the tags {repeated} repeat; give each source its "
       "own `tag` (metrics are logged as loss/<tag>)")


def _validate_input_path(data, need) -> None:
  need(data.in_memory in ("auto", "always", "never"),
       f"config.data.in_memory={data.in_memory!r} is unknown; use auto (in memory when the "
       "decoded split fits config.data.in_memory_max_mb), always or never (streaming)")
  budget = data.in_memory_max_mb
  need(isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget >= 0,
       f"config.data.in_memory_max_mb={budget!r} must be a number of MiB >= 0")


def _validate_microbatches(config, need) -> None:
  """Without a device count: the batch must at least split into the microbatches (with one,
  sharding.batch_split_problem checks shards x microbatches)."""
  batch, microbatches = config.train.batch_size, config.train.microbatches
  if isinstance(batch, int) and batch > 0 and isinstance(microbatches, int) and microbatches > 0:
    need(batch % microbatches == 0,
         f"config.train.batch_size={batch} is not divisible by config.train.microbatches="
         f"{microbatches}; use a batch that is a multiple of {microbatches} or fewer "
         "microbatches")


def _validate_evals(config, need) -> None:
  evals = config.evals
  for name in ("zeroshot", "retrieval", "captioning", "probe"):
    group = evals[name]
    examples = group.examples
    need(isinstance(examples, int) and examples >= 0,
         f"config.evals.{name}.examples={examples!r} must be an integer >= 0 (0 = the whole "
         "split)")
    need(isinstance(group.split, str) and isinstance(group.dataset, str),
         f"config.evals.{name}.split / .dataset must be strings (split '' = this eval off)")
    for field in ("data_dir", "image_feature", "label_feature", "captions_feature",
                  "class_names_file", "templates_file", "train_split", "cache_dir"):
      if field in group:
        need(isinstance(group[field], str),
             f"config.evals.{name}.{field}={group[field]!r} must be a string")
  zeroshot = evals.zeroshot
  if zeroshot.enabled and zeroshot.split:
    need(len(zeroshot.templates) > 0 or zeroshot.templates_file,
         "config.evals.zeroshot.split is set but config.evals.zeroshot.templates / "
         "templates_file are empty; give prompt templates, e.g. ['a photo of a {}.'], or a "
         "file of them (templates_file, or 'open_clip:imagenet'), or set "
         "config.evals.zeroshot.split='' to turn it off")
  video = evals.get("video")
  if video is not None:
    for field, low in (("num_frames", 1), ("examples", 0), ("probe_steps", 1),
                       ("probe_batch_size", 1)):
      need(isinstance(video[field], int) and video[field] >= low,
           f"config.evals.video.{field}={video[field]!r} must be an integer >= {low}")
    need(isinstance(video.probe_lr, (int, float)) and video.probe_lr > 0,
         f"config.evals.video.probe_lr={video.probe_lr!r} must be a number > 0")
    need(isinstance(video.dir, str), f"config.evals.video.dir={video.dir!r} must be a string "
         "(the clip set's folder)")
  _validate_probe(evals.probe, need)
  for field in ("every_steps", "batch_size"):
    value = evals[field]
    need(isinstance(value, int) and value >= (1 if field == "batch_size" else 0),
         f"config.evals.{field}={value!r} must be an integer >= "
         f"{1 if field == 'batch_size' else 0}")


def _validate_probe(probe, need) -> None:
  """config.evals.probe (types and Literal values: `_validate_types`)."""
  if not (probe.enabled and probe.split):
    return
  need(isinstance(probe.train_split, str) and probe.train_split,
       f"config.evals.probe.split={probe.split!r} is set but config.evals.probe.train_split is "
       "empty; name a labelled split the probes train on (not the split they report on), e.g. "
       "'train', or config.evals.probe.split='' to turn the probes off")
  need(probe.train_split != probe.split,
       f"config.evals.probe.train_split={probe.train_split!r} is the split the probes report "
       "on; train them on another split (or a disjoint slice: 'x[:50%]' and 'x[50%:]')")
  need(probe.attentional or probe.linear, "config.evals.probe has attentional=False and "
       "linear=False; enable one, or set config.evals.probe.split='' to turn the probes off")
  need(isinstance(probe.train_examples, int) and probe.train_examples >= 0,
       f"config.evals.probe.train_examples={probe.train_examples!r} must be an integer >= 0 "
       "(0 = the whole train_split)")
  l2 = probe.linear_l2
  need(isinstance(l2, (list, tuple)) and len(l2) > 0 and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in l2),
       f"config.evals.probe.linear_l2={l2!r} must be a non-empty list of numbers > 0, e.g. "
       "[1e-4, 1e-2, 1.0]")
  holdout = probe.linear_holdout
  need(isinstance(holdout, (int, float)) and 0 < holdout < 1,
       f"config.evals.probe.linear_holdout={holdout!r} must be in (0, 1): the fraction of "
       "train_split held out to choose linear_l2")
  for field in ("attn_epochs", "attn_batch_size"):
    need(isinstance(probe[field], int) and probe[field] >= 1,
         f"config.evals.probe.{field}={probe[field]!r} must be an integer >= 1")
  need(isinstance(probe.attn_heads, int) and probe.attn_heads >= 0,
       f"config.evals.probe.attn_heads={probe.attn_heads!r} must be an integer >= 0 (0 = "
       "config.model.pooler_heads)")
  need(isinstance(probe.attn_lr, (int, float)) and probe.attn_lr > 0,
       f"config.evals.probe.attn_lr={probe.attn_lr!r} must be > 0")


def eval_problems(config) -> list[str]:
  """The problems `validate` finds in config.evals (a completed config), for programs that
  run evals on a saved run's config without validating the rest (`coca_jax.evaluate`)."""
  problems = []
  _validate_evals(config, lambda cond, message: cond or problems.append(message))
  return problems


def _validate_lora(config, need, problems) -> None:
  """config.optim.lora: a rank >= 0, a positive alpha, regexes that compile. Whether `targets`
  matches a kernel is checked when the model is known (training/lora.py); the base comes from
  config.init.source when training starts (warm_start.base_params says so if it is unset), so
  `bench` can plan a LoRA run without one."""
  lora = config.optim.lora
  need(lora.rank >= 0, f"config.optim.lora.rank={lora.rank} must be >= 0 (0 = off)")
  if lora.rank <= 0:
    return
  need(lora.alpha > 0, f"config.optim.lora.alpha={lora.alpha} must be > 0 (the scale is "
       "alpha / rank)")
  for name in ("targets", "unfrozen_regex"):
    try:
      re.compile(lora[name] or "")
    except re.error as e:
      problems.append(f"config.optim.lora.{name}={lora[name]!r} is not a valid regex ({e})")
  need(lora.targets != "", "config.optim.lora.targets is empty; give a regex over parameter "
       "paths (its default adapts attention and MLP kernels)")
  need(not config.optim.freeze_regex, "config.optim.freeze_regex with config.optim.lora: "
       "LoRA already freezes every parameter but the adapters and "
       "config.optim.lora.unfrozen_regex; drop freeze_regex")



# The loss terms a batch of one modality can train: MLM on texts alone (VLMo's stage 2), MIM on
# images alone (BEiT, VLMo's stage 1 at demo scale); every other weight must be 0.
_ONE_MODALITY_TERMS = ("contrastive_weight", "vl_contrastive_weight", "caption_weight",
                       "itm_weight", "mlm_weight", "mim_weight")


def _validate_one_modality(config, need, flag: str, weight: str, what: str, objective: str,
                           example: str) -> None:
  """config.data.<flag>=True: only config.loss.<weight> may be (and must be) positive."""
  loss = config.loss
  others = [f"config.loss.{k} (now {loss[k]})" for k in _ONE_MODALITY_TERMS
            if k != weight and loss[k]]
  fix = f"set {', '.join(others)} to 0" if others else f"set config.loss.{weight} > 0"
  need(not others and loss[weight] > 0,
       f"config.data.{flag}=True trains on {what} alone, so only {objective} "
       f"(config.loss.{weight}, now {loss[weight]}) can train: {fix} ({example} does)")

def _validate_vlmo_losses(config, need) -> None:
  """VLMo's second ITC and MLM: weights >= 0, and the heads they score with."""
  loss, m = config.loss, config.model
  mome = m.get("mome") if m.get("backbone") == "mome" else None
  for name, head in (("vl_contrastive_weight", "vl_contrastive"), ("mlm_weight", "mlm_head")):
    weight = loss[name]
    if not (isinstance(weight, (int, float)) and weight >= 0):
      need(False, f"config.loss.{name}={weight!r} must be a number >= 0 (0 = off)")
      continue
    need(not weight or (mome is not None and mome.get(head)),
         f"config.loss.{name}={weight} needs a MoME with config.model.mome.{head}=True "
         "(VLMo: text_encoder='bert'); set it or the weight to 0")
  p = loss.mlm_probability
  need(isinstance(p, (int, float)) and 0 < p < 1,
       f"config.loss.mlm_probability={p!r} must be in (0, 1) (BERT and VLMo: 0.15)")
  mim = loss.mim_weight
  if not (isinstance(mim, (int, float)) and mim >= 0):
    need(False, f"config.loss.mim_weight={mim!r} must be a number >= 0 (0 = off)")
  elif mim:
    codes = mome.get("mim_vocab") if mome is not None else 0
    need(isinstance(codes, int) and codes > 0,
         f"config.loss.mim_weight={mim} needs a MoME with config.model.mome.mim_vocab > 0 (the "
         "visual codebook's size; text_encoder='bert'); set it or the weight to 0")
    ratio = loss.mim_mask_ratio
    need(isinstance(ratio, (int, float)) and 0 < ratio < 1,
         f"config.loss.mim_mask_ratio={ratio!r} must be in (0, 1) (BEiT: 0.4)")
    block = loss.mim_min_block
    need(isinstance(block, int) and block >= 2,
         f"config.loss.mim_min_block={block!r} must be an integer >= 2 patches (BEiT: 16)")
  vocab = m.get("text", {}).get("vocab_size")
  if loss.mlm_weight and isinstance(vocab, int):
    need(isinstance(loss.mlm_mask_id, int) and 0 <= loss.mlm_mask_id < vocab,
         f"config.loss.mlm_mask_id={loss.mlm_mask_id!r} must be a token id below "
         f"config.model.text.vocab_size={vocab} (bert-base-uncased's [MASK] is 103)")


def validate(config, num_devices: int | None = None, load_tokenizer=None) -> None:
  """Raises ConfigError listing every problem found. `num_devices` enables mesh checks;
  `load_tokenizer` (`data.tokenizer.load_tokenizer`; core does not import data) enables the
  check of a given config.data.tokenizer against config.model.text.

  `config` may be partial (fields left out take their defaults) but every key must be known.
  """
  problems: list[str] = []
  missing = [g for g in REQUIRED_GROUPS if g not in config]
  if missing:
    raise ConfigError("config is missing groups " + ", ".join(missing) +
                      "; start from experiments/demo.py")
  problems += unknown_keys(config)
  if any("is required" in p or "must be a group" in p for p in problems):
    raise ConfigError(f"{len(problems)} config problem(s):\n  - " + "\n  - ".join(problems))
  config = complete(config)
  # The checks below compare values; a value of the wrong type would make them raise TypeError.
  typed = type_problems(config)
  if typed:
    # The schema's own enumeration and type messages where it declares the field; the
    # default-type ones for the rest (data, evals, ...).
    declared = []
    _validate_types(config, declared)
    reported = {p.split("=", 1)[0] for p in declared}
    typed = declared + [p for p in typed if p.split("=", 1)[0] not in reported]
    raise ConfigError(f"{len(problems + typed)} config problem(s):\n  - " +
                      "\n  - ".join(problems + typed))

  def need(cond, message):
    if not cond:
      problems.append(message)

  def positive(prefix, group, name):
    value = group[name]
    need(isinstance(value, int) and value > 0,
         f"config.{prefix}.{name}={value!r} must be a positive integer")

  m = config.model
  backbone = m.backbone
  need(backbone in schema.BACKBONES,
       f"config.model.backbone={backbone!r} is unknown; use 'towers' (CoCa) or 'mome' "
       "(one shared stack with modality experts)")
  itm_weight = config.loss.itm_weight
  need(isinstance(itm_weight, (int, float)) and itm_weight >= 0,
       f"config.loss.itm_weight={itm_weight!r} must be a number >= 0 (0 = off)")
  _validate_vlmo_losses(config, need)
  if config.data.text_only is True:
    _validate_one_modality(config, need, "text_only", "mlm_weight", "texts",
                           "masked language modelling", "experiments/vlmo_base.py:stage=2")
  if config.data.image_only is True:
    _validate_one_modality(config, need, "image_only", "mim_weight", "images",
                           "masked image modelling", "experiments/demo.py:vlmo,stage=1")
    need(config.data.text_only is not True, "config.data.image_only and config.data.text_only "
         "are both True: a batch needs images or texts; set one of them to False")
  if backbone == "mome":
    _validate_mome(config, need, positive)
    if "mome" in m:
      _validate_experts(config, need)
  elif backbone == "towers":
    _validate_towers(config, need, positive, problems)
    _validate_experts(config, need)
    need(not itm_weight, f"config.loss.itm_weight={itm_weight} needs a fused image-text pass, "
         "which CoCa towers do not have; set it to 0 or use config.model.backbone='mome'")

  t = config.train
  for name in ("steps", "batch_size", "log_every"):
    positive("train", t, name)
  need(not isinstance(config.optim.lr, (int, float)) or config.optim.lr > 0,
       f"config.optim.lr={config.optim.lr} must be > 0")
  skips = t.max_consecutive_skips
  need(isinstance(skips, int) and skips >= 1,
       f"config.train.max_consecutive_skips={skips!r} must be a positive integer")
  init = config.init
  for name in ("include_regex", "exclude_regex", "reinit_regex"):
    try:
      re.compile(init[name] or "")
    except re.error as e:
      problems.append(f"config.init.{name}={init[name]!r} is not a valid regex ({e})")
  _validate_lora(config, need, problems)
  microbatches = t.microbatches
  need(isinstance(microbatches, int) and microbatches >= 1,
       f"config.train.microbatches={microbatches!r} must be a positive integer")
  if init.source and pretrained.is_name(init.source):
    try:
      pretrained.lookup(init.source)
    except pretrained.UnknownPretrainedError as e:
      problems.append(f"config.init.source: {e}")
  else:
    need(not init.source or fs.exists(init.source),
         f"config.init.source={init.source!r} does not exist; give a previous run's workdir, "
         "one of its checkpoint step directories (DIR/checkpoints/<step>), a bundle, or a "
         "published name (coca_jax.list_pretrained())")
  need(config.checkpoint.every_steps >= 0, "config.checkpoint.every_steps must be >= 0 (0 = off)")
  need(config.checkpoint.keep >= 1, f"config.checkpoint.keep={config.checkpoint.keep} must be >= 1")
  _validate_pairs(config, need, load_tokenizer)
  _validate_input_path(config.data, need)
  _validate_sources(config.data.sources, need, problems)
  _validate_evals(config, need)
  if num_devices is None:
    _validate_microbatches(config, need)

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
        # A BPR group must lie on one batch shard: else routing would need the other shards'
        # tokens (communication), and a group of "the shard's batch" would make the result
        # depend on the mesh. A fixed group size that divides the per-shard batch does neither.
        # Only non-causal tokens route by batch priority: images (a MoME's ffn_fusion routes
        # image tokens too) and a MoME's text in the bidirectional ITM pass; the towers' text
        # decoders are causal.
        non_causal = (field in ("model.vision.experts", "model.mome.experts.image",
                                "model.mome.experts.fusion")
                      or (field.startswith("model.mome.") and config.loss.get("itm_weight", 0) > 0))
        group, batch = experts.get("group_size", 0), t.batch_size
        if (num > 1 and non_causal and experts.get("priority", "batch") == "batch" and shards > 1
            and isinstance(group, int) and isinstance(batch, int) and batch > 0):
          per_shard = batch // shards // max(microbatches if isinstance(microbatches, int) else 1,
                                             1)
          if group == 0 or per_shard % group:
            problems.append(
                f"config.{field}.group_size={group} must divide the {per_shard} examples per batch "
                f"shard ({shards} shards of config.mesh's data x fsdp x expert) so that each Batch "
                f"Priority Routing group lies on one shard; e.g. group_size={per_shard}")
      tensor = sizes["tensor"]
      for field, heads in heads_of(config):
        if isinstance(heads, int) and heads % tensor:
          problems.append(f"config.model.{field}={heads} is not divisible by config.mesh.tensor="
                          f"{tensor}; use a tensor size that divides every head count")
  _validate_types(config, problems)
  if problems:
    raise ConfigError(f"{len(problems)} config problem(s):\n  - " + "\n  - ".join(problems))


def _validate_types(config, problems) -> None:
  """Enumerations and scalar types, from the schema's field types. A field a hand-written check
  above already reported is not reported again."""
  reported = {p.split("=", 1)[0] for p in problems}
  groups = [(schema.MODELS.get(config.model.backbone), config.model, "model."),
            (schema.Train, config.train, "train."), (schema.Loss, config.loss, "loss."),
            (schema.Optim, config.optim, "optim."),
            (schema.Decoding, config.evals.captioning, "evals.captioning."),
            (schema.Probe, config.evals.probe, "evals.probe.")]
  for cls, group, prefix in groups:
    if cls is not None:
      problems += [p for p in schema.problems_of(cls, group, prefix)
                   if p.split("=", 1)[0] not in reported]
