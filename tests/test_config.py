"""The config schema: every experiment config (and each documented arg) validates and builds
abstractly; unknown keys, misspelled overrides and inconsistent pairs fail with one clear error;
runs saved before a field existed still load; the paper configs run their evals."""

import functools
import json
import os
import subprocess
import sys

from absl import flags
import jax
import ml_collections
import pytest

from coca_jax import models
from coca_jax.core import config as config_lib
from coca_jax.core import schema
from coca_jax.data import tokenizer
from coca_jax.evaluation import evaluators
from coca_jax.training import checkpoint
from coca_jax.training import step as step_lib
from conftest import REPO, smoke_config

# Every experiments/ file with the args its docstring documents (finetune_captions needs a
# source: test_finetune_config_from_an_old_saved_run). All validate; BUILT (one per distinct
# model or optimizer) also build abstractly: the unrolled 12-layer stacks take seconds to trace.
SPECS = ["demo.py", "demo.py:smoke", "demo.py:mini", "demo.py:limoe", "demo.py:limoe,smoke",
         "demo.py:limoe,mini", "demo.py:mome", "demo.py:mome,smoke", "demo.py:vary,smoke",
         "demo.py:mixture", "demo.py:mixture,smoke", "demo.py:mome,limoe", "demo.py:mome,limoe,smoke", "demo.py:vlmo",
         "demo.py:vlmo,stage=2",
         "coca_base.py", "coca_base.py:runlocal", "coca_base.py:b32",
         "coca_base.py:batch=4096,steps=10,dtype=float32,remat=full", "coca_large.py",
         "coca_2b.py", "coca_2b.py:runlocal",
         "vlmo_base.py", "vlmo_base.py:stage=2", "vlmo_base.py:stage=2,runlocal",
         "vlmo_base.py:stage=3,batch=64,steps=5", "mome_coca_base.py",
         "mome_coca_base.py:runlocal", "openclip_coca.py",
         "openclip_coca.py:runlocal,unrolled,remat=none,dtype=bfloat16,lr=1e-4,steps=3,batch=8",
         "openclip_coca.py:model=coca_ViT-L-14"]
BUILT = [s for s in SPECS if s not in (
    "demo.py:mixture", "demo.py:mixture,smoke",  # The demo's and the smoke model.
    "vlmo_base.py:stage=2,runlocal", "vlmo_base.py:stage=3,batch=64,steps=5",
    "mome_coca_base.py:runlocal", "coca_base.py:batch=4096,steps=10,dtype=float32,remat=full")]
PAPER = ("coca_base.py", "coca_large.py", "coca_2b.py", "vlmo_base.py", "mome_coca_base.py")


def _load(spec):
  return config_lib.load_config(os.path.join(REPO, "experiments", spec))


@pytest.mark.parametrize("spec", SPECS)
def test_experiment_config_validates(spec):
  config = _load(spec)
  config_lib.validate(config, num_devices=1)
  # Completed: every schema field is there, so modules read them without defaults of their own.
  assert not config_lib.unknown_keys(config)
  for group in ("train", "optim", "evals", "profile", "init"):
    assert set(config_lib.defaults(config.model.backbone)[group]) <= set(config[group]), group
  with pytest.raises(TypeError):  # Typed: a field keeps its type.
    config.train.steps = "5"


@pytest.mark.parametrize("spec", BUILT)
def test_experiment_config_builds_abstractly(spec):
  built = step_lib.setup(_load(spec))  # Model, optimizer, sharded state: shapes only.
  leaves = jax.tree.leaves(built.abstract_state)
  assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)


@pytest.mark.parametrize("spec", PAPER)
def test_paper_configs_run_retrieval_and_captioning_on_the_named_dataset(spec):
  config = _load(spec)
  config.data.name = "my_pairs"
  config.evals.zeroshot.update(dataset="my_labelled", split="validation",
                               class_names=["cat", "dog"])
  opened = []

  class Source:
    def __len__(self):
      return 2

    def __getitem__(self, index):
      return {"label": index}

  def make_source(split, group):
    opened.append((split, group.dataset))
    return Source()

  evaluators.check_evals(config, make_source)
  # VLMo's BERT text encoder is no captioner: its config evaluates zero-shot and retrieval.
  captions = spec != "vlmo_base.py"
  assert [name for name, _ in evaluators._groups(config.evals)] == [
      "zeroshot", "retrieval"] + ["captioning"] * captions
  # Zero-shot on the labelled set named; retrieval and captioning on config.data.name ("").
  assert opened == [("validation", "my_labelled"), ("test", "")] + [("test", "")] * captions
  assert config.evals.every_steps > 0 and config.evals.retrieval.examples > 0


def _config_file(tmp_path, body):
  path = tmp_path / "my_config.py"
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(REPO, 'experiments')!r})\n"
      "import demo\n\n"
      "def get_config():\n"
      "  c = demo.get_config('smoke')\n"
      f"  {body}\n"
      "  return c\n")
  return str(path)


def test_unknown_keys_in_a_config_file_fail_with_suggestions(tmp_path):
  path = _config_file(tmp_path, "c.train.stpes = 5; c.evals.zeroshot.exmaples = 3; "
                      "c.data.source = 'tfds'")
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.load_config(path)
  text = str(err.value)
  assert "3 config problem(s)" in text
  assert "config.train.stpes is not a config key; did you mean config.train.steps?" in text
  assert ("config.evals.zeroshot.exmaples is not a config key; did you mean "
          "config.evals.zeroshot.examples?") in text
  assert "config.data.source is not a config key" in text


def test_overrides_apply_to_defaults_and_misspelled_ones_fail_in_process():
  spec = os.path.join(REPO, "experiments", "demo.py:smoke")
  # A field the demo file never sets (its default comes from the schema) can be overridden.
  values = flags.FlagValues()
  argv = ["prog", f"--config={spec}", "--config.train.microbatches=2",
          "--config.evals.retrieval.dataset=other"]
  config_lib.define_config_flag("config", flag_values=values, sys_argv=argv)
  values(argv)
  assert values.config.train.microbatches == 2
  assert values.config.evals.retrieval.dataset == "other"
  values = flags.FlagValues()
  argv = ["prog", f"--config={spec}", "--config.trian.steps=5"]
  config_lib.define_config_flag("config", flag_values=values, sys_argv=argv)
  with pytest.raises(flags.IllegalFlagValueError,
                     match=r"config.trian.steps is not a config key; did you mean "
                           r"config.train.steps\?"):
    values(argv)


def test_list_fields_are_overridden_with_a_list_literal():
  # docs/config.md: --config.evals.zeroshot.class_names="['cat', 'dog']" (ml_collections itself
  # parses tuples from the command line, not lists).
  spec = os.path.join(REPO, "experiments", "demo.py:smoke")
  values = flags.FlagValues()
  argv = ["prog", f"--config={spec}", "--config.evals.zeroshot.class_names=['cat', 'dog']",
          "--config.evals.zeroshot.transfer_splits=[]",
          '--config.optim.freeze_regex=(".*/ffn_image/.*",)']
  config_lib.define_config_flag("config", flag_values=values, sys_argv=argv)
  values(argv)
  assert values.config.evals.zeroshot.class_names == ["cat", "dog"]
  assert values.config.evals.zeroshot.transfer_splits == []
  assert values.config.optim.freeze_regex == [".*/ffn_image/.*"]
  values = flags.FlagValues()
  argv = ["prog", f"--config={spec}", "--config.evals.zeroshot.class_names=cat"]
  config_lib.define_config_flag("config", flag_values=values, sys_argv=argv)
  with pytest.raises(flags.IllegalFlagValueError, match=r"'cat' is not a list; write a Python "
                                                         r"list literal"):
    values(argv)


def _train_dry_run(*overrides: str) -> subprocess.CompletedProcess:
  """`python -m coca_jax.train --config experiments/demo.py:smoke OVERRIDES --dry_run`."""
  return subprocess.run(
      [sys.executable, "-m", "coca_jax.train", "--config", "experiments/demo.py:smoke",
       *overrides, "--dry_run"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300)


def test_misspelled_override_fails_on_the_command_line():
  result = _train_dry_run("--config.trian.steps=5")
  assert result.returncode != 0
  assert "--config.trian.steps: config.trian.steps is not a config key; did you mean " \
         "config.train.steps?" in result.stderr, result.stderr[-2000:]


def test_train_reports_config_problems_without_a_traceback():
  result = _train_dry_run("--config.data.image_size=40")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.startswith("error: 1 config problem(s):\n  - config.data.image_size=40 "
                                  "differs from config.model.image_size=32"), result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def _one_problem(config, num_devices=None) -> str:
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config, num_devices=num_devices, load_tokenizer=tokenizer.load_tokenizer)
  text = str(err.value)
  assert text.startswith("1 config problem(s)"), text
  return text


def test_image_sizes_must_agree():
  config = smoke_config()
  config.data.image_size = 48
  text = _one_problem(config)
  assert "config.data.image_size=48 differs from config.model.image_size=32" in text
  assert "--config.data.image_size=32" in text


def test_vocabulary_must_hold_the_tokenizer():
  config = smoke_config()
  config.data.tokenizer_vocab = 100  # A trained tokenizer larger than the embedding.
  text = _one_problem(config)
  assert "config.data.tokenizer_vocab=100 exceeds config.model.text.vocab_size=64" in text
  config = smoke_config()  # A given tokenizer: its vocabulary and special ids must fit.
  bpe = os.path.join(REPO, "tests", "data", "clip_bpe_tiny.txt.gz")
  config.data.update(tokenizer_kind="clip_bpe", tokenizer=bpe)
  config.model.text.update(bos_id=576, eos_id=577)
  text = _one_problem(config)
  assert "config.model.text.vocab_size=64 is smaller than the 578 pieces of " \
         "config.data.tokenizer=" in text and "set config.model.text.vocab_size=578" in text


def test_batch_must_split_into_microbatches_and_devices():
  config = smoke_config()
  config.train.microbatches = 3  # batch 16
  text = _one_problem(config)
  assert ("config.train.batch_size=16 is not divisible by config.train.microbatches=3" in text)
  config.train.update(microbatches=2, batch_size=20)  # 20 / 2 = 10 rows, 4 devices.
  text = _one_problem(config, num_devices=4)
  assert ("config.train.batch_size=20 is not divisible by the 4 batch shards of the mesh" in text
          and "x 2 microbatches; use a multiple of 8" in text)


def test_required_fields_and_cross_backbone_fields_are_named():
  config = smoke_config().to_dict()
  del config["train"]["steps"]
  with pytest.raises(config_lib.ConfigError, match="config.train.steps is required"):
    config_lib.validate(ml_collections.ConfigDict(config))
  mome = config_lib.load_config(os.path.join(REPO, "experiments", "demo.py:mome,smoke"))
  mome.model.text.n_uni = 2
  text = _one_problem(mome)
  assert "config.model.text.n_uni is only read by CoCa towers" in text


def test_a_run_saved_before_fields_existed_still_loads(tmp_path):
  old = smoke_config().to_dict()
  # Fields that older runs did not write, and an eval group saved as "off".
  for group, key in (("train", "microbatches"), ("model", "activation"), ("optim", "eps"),
                     ("evals", "captioning")):
    old[group].pop(key, None)
  old.pop("profile")
  old["evals"]["zeroshot"] = None
  (tmp_path / "config.json").write_text(json.dumps(old))
  config = checkpoint.read_config(str(tmp_path))
  config_lib.validate(config)
  assert config.train.microbatches == 1 and config.model.activation == "gelu_tanh"
  assert config.profile.num_steps == config_lib.PROFILE_DEFAULTS["num_steps"]
  assert [name for name, _ in evaluators._groups(config.evals)] == ["retrieval"]
  step_lib.build_model(config)


def test_finetune_config_from_an_old_saved_run(tmp_path):
  old = smoke_config().to_dict()
  old["train"].pop("max_consecutive_skips")
  (tmp_path / "config.json").write_text(json.dumps(old))
  (tmp_path / "export.json").write_text(json.dumps({"step": 6}))
  config = _load(f"finetune_captions.py:init={tmp_path},name=my_captions,runlocal")
  config_lib.validate(config, num_devices=1)
  assert config.model.image_size == config.data.image_size == 32
  assert config.train.max_consecutive_skips == 10


def test_schema_is_the_one_home_of_defaults_and_model_settings():
  """defaults() is the schema's dataclasses as dicts, and the model settings built from a
  completed config mirror its tree leaf for leaf (config.model.vision.width is cfg.vision.width),
  so a field added to the schema is a config field with its default and a model attribute."""
  for backbone, cls in schema.MODELS.items():
    model = config_lib.defaults(backbone)["model"]
    assert model == schema.defaults_of(cls)
    assert model["backbone"] == backbone
  towers = config_lib.defaults("towers")["model"]
  assert towers["vision"]["width"] is schema.REQUIRED
  assert towers["text"]["experts"] == {"num_experts": 1, "top_k": 1, "capacity_factor": 1.0,
                                       "every": 1, "priority": "batch", "group_size": 0,
                                       "noise_std": 0.0}
  mome = config_lib.defaults("mome")["model"]
  assert set(mome["mome"]["experts"]) == {"image", "text", "fusion"}
  assert config_lib.defaults()["optim"]["no_decay_regex"] == schema.DEFAULT_NO_DECAY
  assert set(tokenizer.TOKENIZER_FILES) == set(schema.TOKENIZER_KINDS)

  def leaves(tree, prefix=""):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from leaves(value, f"{prefix}{key}.")
      else:
        yield prefix + key, value

  for spec in ("demo.py", "demo.py:mome,limoe,smoke"):
    config = _load(spec)
    settings = models.model_config(config.model)
    for path, value in leaves(config.model.to_dict()):
      built = functools.reduce(getattr, path.split("."), settings)
      assert built == (tuple(value) if isinstance(value, list) else value), path
    hash(settings)  # A jit static argument.


def test_enumerations_and_types_are_checked_from_the_schema():
  config = smoke_config().to_dict()  # As an experiment file writes it (no typed defaults yet).
  config["model"]["text"]["cls_mask"] = "legacy"
  config["model"]["vision"]["final_norm"] = "yes"
  config["loss"]["contrastive_reduction"] = "avg"
  config["evals"]["captioning"]["method"] = "nucleus"
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(ml_collections.ConfigDict(config))
  text = str(err.value)
  assert text.startswith("4 config problem(s)"), text
  assert ("config.model.text.cls_mask='legacy' is unknown; use one of correct, "
          "open_clip_legacy") in text
  assert "config.model.vision.final_norm='yes' must be True or False" in text
  assert "config.loss.contrastive_reduction='avg' is unknown; use one of sum, mean" in text
  assert "config.evals.captioning.method='nucleus' is unknown; use one of greedy, beam" in text
  mome = config_lib.load_config(os.path.join(REPO, "experiments", "demo.py:mome,smoke"))
  mome.model.pooling = "cascade"  # A towers pooling: not one of a MoME's.
  assert "config.model.pooling='cascade' is unknown; use one of attention, cls" in (
      _one_problem(mome))
