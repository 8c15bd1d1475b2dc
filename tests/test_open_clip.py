"""open_clip CoCa interop against reference outputs of open_clip itself (tests/data, built by
tests/data/make_open_clip_fixtures.py from a random tiny open_clip CoCa; CI needs no torch)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.core import config as config_lib
from coca_jax.core import schema
from coca_jax.data.clip_bpe import ClipBpeTokenizer, installed_vocab_file
from coca_jax.inference import generate
from coca_jax.interop import open_clip, params as flat_params
from coca_jax.perf import flops
from coca_jax.training import step

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_JSON = os.path.join(DATA, "open_clip_tiny_coca.json")
STATE = os.path.join(DATA, "open_clip_tiny_coca.safetensors")


def _experiment(arg: str):
  return config_lib.load_config(os.path.join(REPO, "experiments", "openclip_coca.py") + ":" + arg)


@pytest.fixture(scope="module")
def imported():
  config = _experiment(f"model={TINY_JSON},unrolled")  # The export test scans it too.
  state = open_clip.read_state_dict(STATE)
  params = open_clip.import_params(state, config)
  reference = dict(np.load(os.path.join(DATA, "open_clip_tiny_coca_outputs.npz")))
  return config, state, params, reference


def _ours(config, params, reference):
  model = step.build_model(config)
  images = jnp.asarray(reference["images"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  texts = reference["texts"]
  text = np.concatenate([texts, np.zeros((len(texts), 1), texts.dtype)], 1).astype(np.int32)
  return model, images, model.apply({"params": params}, images, jnp.asarray(text))


def test_imported_model_matches_open_clip_outputs(imported):
  config, _, params, ref = imported
  model, images, out = _ours(config, params, ref)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(out["image_embed"], unit(ref["image_features"]), atol=1e-4)
  np.testing.assert_allclose(out["text_embed"], unit(ref["text_features"]), atol=1e-4)
  # Logits of every real input token (open_clip's decoder drops the last position, ours
  # predicts from it too; pad positions carry no loss and open_clip does not mask them).
  logits = np.asarray(out["caption_logits"])[:, :ref["logits"].shape[1]]
  real = ref["texts"][:, :ref["logits"].shape[1]] != 0
  np.testing.assert_allclose(logits[real], ref["logits"][real], atol=1e-4)
  greedy = generate.generate(model, params, images, generate.Decoding(method="greedy"))
  np.testing.assert_array_equal(np.asarray(greedy["tokens"]), ref["greedy"])


def test_export_gives_back_the_open_clip_state_dict(imported):
  config, state, params, _ = imported
  model_config = schema.build(schema.CoCa, config.model)
  exported = open_clip.to_open_clip(flat_params.flatten(model_config, params), model_config)
  assert sorted(exported) == sorted(state)
  for key, value in state.items():
    assert exported[key].shape == value.shape, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # The same through a scanned model's parameter layout.
  config.model.scan_layers = True
  scanned = open_clip.import_params(state, config)
  assert scanned["vision"]["layers"]["attention"]["query"]["kernel"].shape[0] == 2
  scanned_config = schema.build(schema.CoCa, config.model)
  again = open_clip.to_open_clip(flat_params.flatten(scanned_config, scanned), scanned_config)
  for key, value in state.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_state_dict_that_does_not_fit_names_the_keys(imported):
  config, state, _, _ = imported
  broken = dict(state)
  del broken["visual.ln_pre.weight"]
  broken["text.extra"] = np.zeros(3, np.float32)
  with pytest.raises(open_clip.ConversionError, match=r"visual\.ln_pre\.weight.*text\.extra"):
    open_clip.import_params(broken, config)


def test_openclip_experiment_configs_match_open_clip_parameter_counts():
  # open_clip 3.3.0 create_model(...) parameter counts (sum of numel).
  for name, count in (("coca_ViT-B-32", 253_560_065), ("coca_ViT-L-14", 638_450_177)):
    config = config_lib.load_config(
        os.path.join(REPO, "experiments", "openclip_coca.py") + f":model={name}")
    config_lib.validate(config, num_devices=1)
    assert flops.param_counts(config)["total"] == count, name


def test_import_cli_bundle_loads_and_captions(tmp_path):
  out = str(tmp_path / "bundle")
  proc = subprocess.run(
      [sys.executable, "-m", "coca_jax.interop.open_clip", "import", "--src", STATE,
       "--model", TINY_JSON, "--out", out, "--bpe", os.path.join(DATA, "clip_bpe_tiny.txt.gz")],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import coca_jax
  model = coca_jax.load(out, batch_size=2)
  ref = dict(np.load(os.path.join(DATA, "open_clip_tiny_coca_outputs.npz")))
  images = ref["images"][:2].transpose(0, 2, 3, 1)
  tokens = generate.generate(model.module, model.params, jnp.asarray(images))["tokens"]
  np.testing.assert_array_equal(np.asarray(tokens), ref["greedy"][:2])
  assert isinstance(model.tokenizer, ClipBpeTokenizer)
  # Fine-tuning from the bundle (experiments/openclip_coca.py:init=BUNDLE) reads the vocabulary
  # kept in it: no bpe= and no open_clip install needed.
  assert _experiment(f"model={TINY_JSON},init={out}").data.tokenizer == os.path.join(
      out, "bpe_simple_vocab_16e6.txt.gz")
  # And back out to an open_clip state dict equal to the one imported.
  exported = str(tmp_path / "back.safetensors")
  proc = subprocess.run([sys.executable, "-m", "coca_jax.interop.open_clip", "export", "--src",
                         out, "--out", exported], capture_output=True, text=True, cwd=REPO,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  back, state = open_clip.read_state_dict(exported), open_clip.read_state_dict(STATE)
  assert sorted(back) == sorted(state)
  assert all(back[k].shape == state[k].shape for k in state)
  assert max(float(np.abs(back[k] - state[k]).max()) for k in state) == 0.0


def test_bfloat16_checkpoints_are_read(tmp_path):
  import ml_dtypes
  import safetensors.numpy
  state = open_clip.read_state_dict(STATE)
  path = str(tmp_path / "bf16.safetensors")
  safetensors.numpy.save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}, path)
  back = open_clip.read_state_dict(path)
  assert all(np.array_equal(back[k], state[k].astype(ml_dtypes.bfloat16).astype(np.float32))
             for k in state)


def _tokenizer_reference():
  with open(os.path.join(DATA, "clip_bpe_reference.json")) as f:
    return json.load(f)


def test_clip_bpe_ids_match_open_clip_with_the_committed_vocab():
  ref = _tokenizer_reference()
  tok = ClipBpeTokenizer.load(os.path.join(DATA, "clip_bpe_tiny.txt.gz"))
  assert tok.vocab_size == ref["tiny"]["vocab_size"]
  assert [tok.encode(s) for s in ref["strings"]] == ref["tiny"]["ids"]
  np.testing.assert_array_equal(tok.tokenize(ref["strings"], 20), ref["tiny"]["batch_20"])


@pytest.mark.skipif(installed_vocab_file() is None,
                    reason="open_clip (which ships the full CLIP vocabulary) is not installed")
def test_clip_bpe_ids_match_open_clip_with_the_full_vocab():
  ref = _tokenizer_reference()
  tok = ClipBpeTokenizer.load("")
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (49408, 49406, 49407)
  assert [tok.encode(s) for s in ref["strings"]] == ref["full"]["ids"]
  np.testing.assert_array_equal(tok.tokenize(ref["strings"], 20), ref["full"]["batch_20"])


def test_export_refuses_a_model_open_clip_cannot_express(tiny_config, tiny_params):
  model_config = schema.build(schema.CoCa, tiny_config.model)  # Our demo CoCa: cascade pooling etc.
  with pytest.raises(open_clip.ConversionError, match="pooling='cascade'.*activation"):
    open_clip.to_open_clip(flat_params.flatten(model_config, tiny_params), model_config)


def test_import_finetune_export_round_trip_through_the_clis(tmp_path):
  """open_clip state dict -> bundle -> 4 fine-tuning steps on digit scenes (CLIP BPE tokens,
  warm start) -> open_clip state dict with the same keys and shapes and changed values."""
  bundle, workdir = str(tmp_path / "bundle"), str(tmp_path / "run")
  bpe = os.path.join(DATA, "clip_bpe_tiny.txt.gz")
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True,
                                     text=True, cwd=REPO, timeout=900)
  proc = run("coca_jax.interop.open_clip", "import", "--src", STATE, "--model", TINY_JSON,
             "--out", bundle, "--bpe", bpe)
  assert proc.returncode == 0, proc.stderr[-3000:]
  config_file = tmp_path / "finetune_digits.py"
  config_file.write_text(f"""
import importlib.util
spec = importlib.util.spec_from_file_location("ft", {os.path.join(REPO, 'experiments', 'finetune_captions.py')!r})
ft = importlib.util.module_from_spec(spec); spec.loader.exec_module(ft)

def get_config():
  c = ft.get_config("init={bundle},runlocal")
  c.data.update(name="digit_scenes", build_demo=True, random_resized_crop=False,
                build_demo_options=dict(num_train=64, num_test=16, num_digits=16, image_size=32,
                                        grid=8, seed=0, show_progress=False))
  c.train.update(steps=4, batch_size=4, log_every=2)
  c.evals.update(retrieval=dict(split="test", examples=8), captioning=dict(
      enabled=True, split="test", examples=4, batch_size=4, method="greedy"))
  return c
""")
  proc = run("coca_jax.train", "--config", str(config_file), "--workdir", workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Warm start from" in proc.stderr
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert np.isfinite(records[0]["loss"])
  exported = str(tmp_path / "finetuned.safetensors")
  proc = run("coca_jax.interop.open_clip", "export", "--src", workdir, "--out", exported)
  assert proc.returncode == 0, proc.stderr[-3000:]
  back, state = open_clip.read_state_dict(exported), open_clip.read_state_dict(STATE)
  assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}
  assert not np.array_equal(back["text_decoder.text_projection"],
                            state["text_decoder.text_projection"])
