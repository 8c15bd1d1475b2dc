"""LoRA (config.optim.lora): adapters on a frozen base, trained alone, checkpointed alone, applied
on load, folded by export --merge_lora; their optimizer state next to full fine-tuning's."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

import coca_jax
from coca_jax import export
from coca_jax.core import config as config_lib
from coca_jax.core import schema
from coca_jax.data.tokenizer import TOKENIZER_FILES, Tokenizer
from coca_jax.training import checkpoint
from coca_jax.training import lora as lora_lib
from coca_jax.training import step as step_lib
from coca_jax.training import warm_start
from conftest import REPO, random_batch, smoke_config


def _lora_config(base_dir, **lora):
  config = smoke_config()
  config.optim.update(warmup_fraction=0.0, decay="constant", lr=1e-2)
  config.optim.lora = dict(rank=4, alpha=8.0, **lora)
  config.init.source = base_dir
  return config


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_params):
  """A base bundle (the smoke model), one LoRA train step on it (logit_scale unfrozen), and a
  workdir holding that step's checkpoint, as a training run leaves it."""
  root = tmp_path_factory.mktemp("lora")
  tokenizer = Tokenizer.train([f"a red {i}" for i in range(50)], vocab_size=40, model_type="bpe")
  base_dir = str(root / "base")
  export.write_bundle(base_dir, tiny_params, smoke_config(), tokenizer, step=0)

  config = _lora_config(base_dir, unfrozen_regex="logit_scale")
  built = step_lib.setup(config)
  base = warm_start.lora_base(config, built)  # Read from config.init.source, as training does.
  state = built.init_state(base=base)
  initial = jax.device_get(state)
  batch = random_batch(config, config.train.batch_size)
  with jax.set_mesh(built.mesh):
    state, metrics = built.train_step()(state, batch, base)

  workdir = str(root / "run")
  os.makedirs(workdir)
  checkpoint.write_config(workdir, config)
  with open(os.path.join(workdir, TOKENIZER_FILES[config.data.tokenizer_kind]), "wb") as f:
    f.write(tokenizer.model_proto)
  manager = checkpoint.make_manager(workdir, async_save=False)
  checkpoint.save(manager, 1, state)
  manager.wait_until_finished()
  manager.close()
  return dict(config=config, built=built, base=base, initial=initial, state=state,
              metrics=metrics, workdir=workdir, root=root, tiny_params=tiny_params)


def test_default_targets_are_attention_and_mlp_kernels_of_every_tower(run):
  paths = {"/".join(p) for p in run["built"].lora.targets}
  for expected in ("vision/layers/attention/query/kernel", "vision/layers/ffn/mlp/wi/kernel",
                   "unimodal/layers/attention/out/kernel",
                   "multimodal/layers/cross_attention/value/kernel",
                   "multimodal/layers/ffn/mlp/wo/kernel"):
    assert expected in paths
  assert not any(p.startswith(("patch_embed", "vocab_head", "token_embed", "image_projection"))
                 for p in paths)


def test_mome_modality_experts_get_adapters():
  mome = config_lib.load_config(os.path.join(REPO, "experiments", "demo.py") + ":mome,smoke")
  boxed = step_lib.abstract_params(mome, boxed=True)
  paths = {"/".join(p) for p in lora_lib.targets(boxed, schema.Lora(rank=2))}
  assert any("attention/query" in p for p in paths)
  # Each modality expert's feed-forward (image, text and, on top, fusion) is adapted.
  for expert in ("image", "text", "fusion"):
    assert any(expert in p and p.endswith(("wi/kernel", "wo/kernel")) for p in paths), expert


def test_adapted_model_starts_equal_to_its_base(run):
  base, initial = run["tiny_params"], run["initial"]
  adapted = lora_lib.apply(base, initial.params, run["built"].lora.settings.scale)
  for path, value in _flat(base).items():
    np.testing.assert_array_equal(_flat(adapted)[path], value, err_msg=path)
  config = run["config"]
  batch = random_batch(config, 2)
  forward = jax.jit(lambda p: run["built"].model.apply({"params": p}, batch["image"],
                                                       batch["text"]))
  for a, b in zip(jax.tree.leaves(forward(base)), jax.tree.leaves(forward(adapted))):
    np.testing.assert_array_equal(a, b)


def test_a_step_updates_only_adapters_and_unfrozen_parameters(run):
  built, state, initial = run["built"], run["state"], run["initial"]
  assert np.isfinite(float(run["metrics"]["loss"]))
  # The state holds the adapters and the unfrozen logit scale: no base weight, no moment of one.
  assert set(state.params) == {lora_lib.ADAPTERS, lora_lib.UNFROZEN}
  assert set(_flat(state.params[lora_lib.UNFROZEN])) == {"logit_scale"}
  # The base the step read is bit for bit the bundle's.
  for path, value in _flat(run["tiny_params"]).items():
    np.testing.assert_array_equal(_flat(run["base"])[path], value, err_msg=path)
  # B leaves start at zero and moved; so did the unfrozen scale.
  moved = {p for p, v in _flat(state.params).items()
           if not np.array_equal(v, _flat(initial.params)[p])}
  assert {p for p in moved if p.endswith("lora_b")} == {
      p for p in _flat(state.params) if p.endswith("lora_b")}
  assert "unfrozen/logit_scale" in moved
  # The model's weights after the step: only adapted kernels and the logit scale differ.
  after = _flat(built.model_params(state, run["base"]))
  changed = {p for p, v in _flat(run["tiny_params"]).items() if not np.array_equal(after[p], v)}
  targets = {"/".join(p) for p in built.lora.targets}
  assert changed <= targets | {"logit_scale"} and changed & targets


def test_checkpoint_holds_only_adapters_and_load_applies_them(run):
  state_dir = os.path.join(run["workdir"], "checkpoints", "1", checkpoint.STATE)
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(state_dir).item_metadata
  stored = stored.tree if hasattr(stored, "tree") else stored
  params = traverse_util.flatten_dict(dict(stored["params"]))
  assert params and all(p[0] in (lora_lib.ADAPTERS, lora_lib.UNFROZEN) for p in params)
  assert not any(p[-1] == "kernel" for p in params)  # adapters end in lora_a / lora_b

  loaded = coca_jax.load(run["workdir"], batch_size=2)
  expected = _flat(run["built"].model_params(run["state"], run["base"]))
  for path, value in _flat(loaded.params).items():
    np.testing.assert_allclose(value, expected[path], atol=1e-6, err_msg=path)


def test_merged_export_equals_adapter_inference(run, tmp_path):
  with pytest.raises(export.LoraExportError, match="--merge_lora"):
    export.export(run["workdir"], str(tmp_path / "refused"))
  out = export.export(run["workdir"], str(tmp_path / "merged"), merge_lora=True)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["optim"]["lora"]["rank"] == 0  # a plain bundle
  adapted = coca_jax.load(run["workdir"], batch_size=2)
  merged = coca_jax.load(out, batch_size=2)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  texts = ["a red 3", "two blue 7"]
  np.testing.assert_allclose(merged.embed_images(images), adapted.embed_images(images),
                             atol=1e-5)
  np.testing.assert_allclose(merged.embed_texts(texts), adapted.embed_texts(texts), atol=1e-5)


def test_rank_8_optimizer_state_is_under_5_percent_of_full_finetuning_on_b32():
  """The B/32 layout (open_clip's coca_ViT-B-32), planned abstractly: nothing allocated."""
  full = config_lib.load_config(os.path.join(REPO, "experiments", "openclip_coca.py"))
  adapted = config_lib.load_config(os.path.join(REPO, "experiments", "openclip_coca.py"))
  adapted.optim.lora = dict(rank=8)
  full_bytes = step_lib.state_part_bytes(step_lib.setup(full))
  lora_bytes = step_lib.state_part_bytes(step_lib.setup(adapted))
  ratio = lora_bytes["optimizer_state_bytes"] / full_bytes["optimizer_state_bytes"]
  assert ratio <= 0.05, (ratio, lora_bytes, full_bytes)
  assert lora_bytes["frozen_param_bytes"] == full_bytes["trained_param_bytes"]


def test_a_targets_regex_that_matches_nothing_is_a_config_error(tiny_config):
  boxed = step_lib.abstract_params(tiny_config, boxed=True)
  with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.lora\.targets"):
    lora_lib.targets(boxed, schema.Lora(rank=4, targets="no_such_layer"))
  config = smoke_config()
  config.optim.lora = dict(rank=4, targets="(")
  with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.lora\.targets"):
    config_lib.validate(config)


def test_adapters_shard_like_their_kernels(run):
  """A carries its kernel's stacked and input mesh axes, B its stacked and output ones; the
  rank axis is never split."""
  built = run["built"]
  adapters = built.state_shardings.params[lora_lib.ADAPTERS]
  kernels = traverse_util.flatten_dict(built.lora.base_shardings)
  pad = lambda spec, n: tuple(spec) + (None,) * (n - len(spec))
  split = set()
  for path, t in built.lora.targets.items():
    kernel = pad(kernels[path].spec, len(t.shape))
    node = adapters
    for key in path:
      node = node[key]
    a = pad(node[lora_lib.LORA_A].spec, len(t.shape) - len(t.out_shape) + 1)
    b = pad(node[lora_lib.LORA_B].spec, len(t.shape) - len(t.in_shape) + 1)
    assert a == kernel[:t.stack + t.inputs] + (None,), path
    assert b == kernel[:t.stack] + (None,) + kernel[t.stack + t.inputs:], path
    split |= {axis for axis in a + b if axis}
  assert {"fsdp", "tensor"} <= split  # embed and heads/mlp are split as in the base


def test_a_lora_run_without_a_tokenizer_takes_the_bases(run):
  # Training a new tokenizer on the new data would give the frozen embeddings other ids: a LoRA
  # run with config.data.tokenizer unset uses the base's file, kind and vocabulary size.
  base_dir = str(run["root"] / "base")
  config = _lora_config(base_dir)
  config.data.tokenizer, config.model.text.vocab_size, config.data.tokenizer_vocab = "", 999, 7
  adopted = warm_start.adopt_base_tokenizer(config)
  base = checkpoint.read_config(base_dir)
  assert adopted == os.path.join(base_dir, TOKENIZER_FILES[base.data.tokenizer_kind])
  assert config.data.tokenizer == adopted
  assert config.model.text.vocab_size == base.model.text.vocab_size
  assert config.data.tokenizer_vocab == base.data.tokenizer_vocab
  # A tokenizer the user names is kept (the warm start then checks it against the base).
  config.data.tokenizer = "/elsewhere/tokenizer.model"
  assert warm_start.adopt_base_tokenizer(config) is None
  assert config.data.tokenizer == "/elsewhere/tokenizer.model"
