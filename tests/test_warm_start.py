"""Warm start (config.init): a trained model's parameters carried into a new run with another
optimizer and image size; the safetensors bundle format round trip."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import coca_jax
from coca_jax import export
from coca_jax.core import schema
from coca_jax.data.tokenizer import Tokenizer
from coca_jax.training import step as step_lib
from coca_jax.training import warm_start
from conftest import random_batch, smoke_config


def _smooth_images(count, size):
  """Low-frequency random images (4x4 noise upsampled): their content survives a resize."""
  coarse = jax.random.normal(jax.random.key(3), (count, 4, 4, 3))
  return jax.image.resize(coarse, (count, size, size, 3), "cubic")


def _loss(built, config, params, batch):
  with jax.set_mesh(built.mesh):
    return float(step_lib.loss_fn(params, built.model, batch, config.loss)[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A smoke model trained 15 steps on one batch, exported as a safetensors bundle."""
  config = smoke_config()
  config.optim.update(warmup_fraction=0.0, decay="constant", lr=3e-3)
  built = step_lib.setup(config)
  state, train_step = built.init_state(), built.train_step()
  batch = random_batch(config, config.train.batch_size)
  batch["image"] = _smooth_images(batch["image"].shape[0], 32)
  initial = _loss(built, config, state.params, batch)
  with jax.set_mesh(built.mesh):
    for _ in range(15):
      state, metrics = train_step(state, batch)
  final = _loss(built, config, state.params, batch)
  tokenizer = Tokenizer.train([f"a red {i}" for i in range(50)], vocab_size=40, model_type="bpe")
  out = str(tmp_path_factory.mktemp("warm") / "bundle")
  export.write_bundle(out, state.params, config, tokenizer, step=15, fmt="safetensors")
  return dict(config=config, params=state.params, batch=batch, initial=initial, final=final,
              bundle=out)


def test_safetensors_bundle_has_flat_unscanned_keys_and_loads(trained):
  tensors = safetensors.numpy.load_file(os.path.join(trained["bundle"], export.SAFETENSORS_FILE))
  # The smoke model scans its layers; the file names them one by one.
  assert "vision/layer_0/attention/query/kernel" in tensors
  assert not any("/layers/" in k for k in tensors)
  model = coca_jax.load(trained["bundle"], batch_size=2)
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                      model.params, trained["params"])
  assert all(jax.tree.leaves(same))


def test_bfloat16_safetensors_bundle_loads(trained, tmp_path):
  # docs/open_clip.md: `coca_jax.export --format safetensors --dtype bfloat16`, opened by coca_jax.load
  # (safetensors' numpy reader has no BF16).
  out = str(tmp_path / "bundle_bf16")
  export.write_bundle(out, trained["params"], trained["config"], Tokenizer.train(
      [f"a red {i}" for i in range(50)], vocab_size=40, model_type="bpe"), step=15,
      dtype="bfloat16", fmt="safetensors")
  model = coca_jax.load(out, batch_size=2)
  rounded = jax.tree.map(lambda p: np.asarray(jnp.asarray(p).astype(jnp.bfloat16), np.float32),
                         trained["params"])
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a, np.float32), b),
                      model.params, rounded)
  assert all(jax.tree.leaves(same))


def test_warm_start_continues_from_the_same_loss_with_a_new_optimizer(trained):
  config = smoke_config()
  config.optim.update(name="adafactor", b1=0.0, lr=1e-3)
  config.init.source = trained["bundle"]
  built = step_lib.setup(config)
  state = warm_start.warm_start(config, built.init_state(), built.state_shardings)
  assert _loss(built, config, state.params, trained["batch"]) == pytest.approx(
      trained["final"], rel=1e-5)
  with jax.set_mesh(built.mesh):
    state, metrics = built.train_step()(state, trained["batch"])
  assert float(metrics["loss"]) == pytest.approx(trained["final"], rel=1e-5)
  assert int(state.step) == 1  # A new run: step and optimizer state start over.


def test_warm_start_at_a_new_image_size_interpolates_the_position_embedding(trained):
  config = smoke_config()
  config.optim.update(name="adafactor", b1=0.0, lr=1e-3)
  config.model.image_size = config.data.image_size = 40  # 4x4 -> 5x5 patches.
  config.init = dict(source=trained["bundle"], include_regex="", exclude_regex="",
                     reinit_regex="")
  built = step_lib.setup(config)
  fresh = built.init_state()
  state = warm_start.warm_start(config, fresh, built.state_shardings)
  old = trained["params"]["image_pos_embed"]
  assert state.params["image_pos_embed"].shape == (25, old.shape[1])
  np.testing.assert_allclose(state.params["image_pos_embed"],
                             warm_start.resize_pos_embed(np.asarray(old), *(
                                 schema.build(schema.CoCa, c.model)
                                 for c in (trained["config"], config))), atol=1e-6)
  batch = dict(trained["batch"])
  batch["image"] = _smooth_images(batch["image"].shape[0], 40)
  warm = _loss(built, config, state.params, batch)
  cold = _loss(built, config, fresh.params, batch)
  gap = trained["initial"] - trained["final"]
  assert gap > 1.0
  # The new resolution moves the loss off the trained model's, but it stays far below a fresh
  # model's: the carried weights (and the resized grid) still apply.
  assert cold - warm > 0.5 * gap, (warm, trained["final"], cold)
  with jax.set_mesh(built.mesh):
    state, metrics = built.train_step()(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) < cold


def test_mismatching_shapes_are_named_in_one_error(trained):
  config = smoke_config()
  config.model.embed_dim = 48
  config.init.source = trained["bundle"]
  built = step_lib.setup(config)
  with pytest.raises(warm_start.WarmStartError) as error:
    warm_start.warm_start(config, built.init_state(), built.state_shardings)
  message = str(error.value)
  assert "image_projection/kernel: source (32, 32), new model (32, 48)" in message
  assert "text_projection/kernel" in message


def test_reinit_regex_and_vocab_change_keep_fresh_parameters(trained):
  config = smoke_config()
  config.model.text.vocab_size = 80  # Another tokenizer: the vocabulary leaves start fresh.
  config.init.update(source=trained["bundle"], reinit_regex=r"^generative_pooler/")
  built = step_lib.setup(config)
  fresh = built.init_state()
  params, report = warm_start.warm_start_params(config, fresh.params)
  for leaf in ("token_embed/embedding", "vocab_head/kernel", "vocab_head/bias",
               "generative_pooler/queries"):
    assert leaf in report["reinitialised"], leaf
  np.testing.assert_array_equal(params["generative_pooler"]["queries"],
                                fresh.params["generative_pooler"]["queries"])
  np.testing.assert_array_equal(params["cls_token"], trained["params"]["cls_token"])


def test_finetune_captions_config_builds_the_source_model(trained):
  from coca_jax.core import config as config_lib
  from coca_jax.perf import flops
  from conftest import REPO
  spec = os.path.join(REPO, "experiments", "finetune_captions.py") + (
      f":init={trained['bundle']},name=my_captions,data_dir=/tmp/none")
  config = config_lib.load_config(spec)
  config_lib.validate(config, num_devices=1)
  assert config.init.source == trained["bundle"]
  assert config.data.tokenizer == os.path.join(trained["bundle"], "tokenizer.model")
  assert flops.param_counts(config) == flops.param_counts(trained["config"])


# -- MoME: the same path, a MoME parameter mapping ------------------------------------------------


def _mome_config():
  from coca_jax.core import config as config_lib
  from conftest import REPO
  return config_lib.load_config(os.path.join(REPO, "experiments", "demo.py") + ":mome,smoke")


def _shifted(params, by):
  return jax.tree.map(lambda p: p + by, params)


def _assert_params_equal(a, b):
  same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
  assert all(jax.tree.leaves(same))


@pytest.fixture(scope="module")
def mome_built():
  config = _mome_config()
  built = step_lib.setup(config)
  return config, built, built.init_state()


def test_mome_warm_start_reads_an_export_bundle(mome_built, tmp_path):
  config, built, state = mome_built
  source = _shifted(state.params, 0.5)
  tokenizer = Tokenizer.train([f"a red {i}" for i in range(50)], vocab_size=40, model_type="bpe")
  bundle = str(tmp_path / "bundle")
  export.write_bundle(bundle, source, config, tokenizer, step=7)
  target = _mome_config()
  target.init.source = bundle
  warmed = warm_start.warm_start(target, state, built.state_shardings)
  _assert_params_equal(warmed.params, source)
  # The optimizer starts fresh: only the parameters came from the bundle.
  _assert_params_equal(warmed.opt_state, state.opt_state)


def test_mome_warm_start_from_a_workdir_skips_an_unreadable_newest_step(mome_built, tmp_path):
  from coca_jax.training import checkpoint
  config, built, state = mome_built
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  checkpoint.write_config(workdir, config)
  manager = checkpoint.make_manager(workdir, keep=5)
  readable = state.replace(params=_shifted(state.params, 0.25))
  checkpoint.save(manager, 10, readable, force=True)
  checkpoint.save(manager, 20, state.replace(params=_shifted(state.params, 1.0)), force=True)
  manager.wait_until_finished()
  # Step 20 is the highest but its save never finished: its metadata is gone.
  os.remove(os.path.join(workdir, "checkpoints", "20", "state", "_METADATA"))
  target = _mome_config()
  target.init.source = workdir
  params, report = warm_start.warm_start_params(target, state.params)
  assert report["step"] == 10
  _assert_params_equal(params, readable.params)
  # A stage without the ITM head ignores the source's, and a wider model is refused by name.
  target.loss.itm_weight = 0.0
  fresh = step_lib.setup(target).abstract_state.params
  _, report = warm_start.warm_start_params(target, jax.tree.map(
      lambda a: np.zeros(a.shape, a.dtype), fresh))
  assert report["unused"] == ["itm_head/bias", "itm_head/kernel"]
  assert not report["missing_in_source"]
  wider = _mome_config()
  wider.model.mome.mlp_dim = 128
  wider.init.source = workdir
  fresh = step_lib.setup(wider).abstract_state.params
  with pytest.raises(warm_start.WarmStartError,
                     match=r"layers_0/ffn_image/mlp/wi/kernel: source \(32, 64\), new model "
                           r"\(32, 128\)"):
    warm_start.warm_start_params(wider, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), fresh))
