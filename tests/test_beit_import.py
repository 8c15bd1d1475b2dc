"""BEiT into VLMo's backbone (VLMo's stage-1 start): our image-only pass of an imported timm
`Beit` equals timm's on committed fixtures (tests/data/make_beit_fixtures.py builds them in a
torch environment; no torch here), and bad input is a one-line usage error."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from coca_jax.interop import beit
from coca_jax.interop import params as flat_params
from coca_jax.interop import vlmo
from coca_jax.training import step as step_lib

DATA = os.path.join(os.path.dirname(__file__), "data")
INFO = json.load(open(os.path.join(DATA, "beit_tiny.json")))
OUT = dict(np.load(os.path.join(DATA, "beit_tiny_outputs.npz")))
TOL = dict(atol=1e-5, rtol=1e-5)
T = INFO["tiny"]
# The VLMo architecture of the tiny BEiT, its VL-FFN in the top layer.
ARCH = dict(image_size=T["img_size"], patch_size=T["patch_size"], width=T["embed_dim"],
            depth=T["depth"], heads=T["num_heads"], mlp_dim=T["mlp_ratio"] * T["embed_dim"],
            vlffn_start=T["depth"] - 1)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(11)]


def _beit(layout):
  with open(os.path.join(DATA, f"beit_tiny_{layout}.safetensors"), "rb") as f:
    return flat_params.load_safetensors(f.read())


def _config():
  return vlmo.experiment_config(ARCH, "", vocab_size=len(WORDS), cls_id=2, sep_id=3)


def _layer_norm(x, eps=1e-6):
  """A LayerNorm at its initialisation (scale 1, bias 0)."""
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _image_tokens(model, params, image):
  """Our image-only pass: [batch, 1 + patches, width] after the final norm."""
  return model.apply({"params": params}, image,
                     method=lambda m, i: m._bert_image(i)["tokens"])


@pytest.fixture(scope="module")
def tiny():
  """(config, model, the target's initial official state, the jitted image pass)."""
  config = _config()
  model = step_lib.build_model(config)
  return (config, model, beit.initial_state(config, model, seed=0),
          jax.jit(functools.partial(_image_tokens, model)))


@pytest.mark.parametrize("layout", ["per_layer", "shared"])
def test_image_pass_equals_timms_beit(tiny, layout):
  _, model, template, image_pass = tiny
  state, report = beit.to_vlmo_state(_beit(layout), template, ARCH)
  params = traverse_util.unflatten_dict(vlmo.from_vlmo(state, model), sep="/")
  tokens = image_pass(params, jnp.asarray(OUT["image"]))
  timm_tokens = OUT[f"{layout}_tokens"]
  if layout == "per_layer":
    # beit_base_patch16_224's layout: no final norm (it pools with fc_norm, which is dropped);
    # VLMo's final norm stays at its initialisation, as the official loader leaves it.
    assert report["dropped"] == ["fc_norm.bias", "fc_norm.weight"]
    timm_tokens = _layer_norm(timm_tokens)
  else:  # BEiT's pre-training layout: one table for every layer, the final norm.
    assert report["dropped"] == []
  np.testing.assert_allclose(tokens, timm_tokens, **TOL)
  assert sorted(report["mapped"] + report["dropped"]) == sorted(_beit(layout))
  # The other experts keep the target's initialisation, as the official code leaves them: the
  # L-FFN (stage 2 trains it), the VL-FFN, the text rows of the relative position table.
  top = f"transformer.blocks.{ARCH['depth'] - 1}"
  for key in ("transformer.blocks.0.mlp_text.fc1.weight", f"{top}.mlp_vl.fc2.weight",
              f"{top}.norm2_vl.weight", "text_embeddings.word_embeddings.weight"):
    assert key in report["initialised"]
    np.testing.assert_array_equal(state[key], template[key], err_msg=key)
  image_rows, _ = beit.relative_position_rows(ARCH["image_size"] // ARCH["patch_size"], 0)
  np.testing.assert_array_equal(state["relative_position_bias_table"][image_rows:], 0)


def test_bundle_opens_with_beits_image_pass(tiny, tmp_path):
  import coca_jax
  _, model, _, image_pass = tiny
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(WORDS) + "\n")
  path, report = beit.import_bundle(os.path.join(DATA, "beit_tiny_shared.safetensors"), ARCH,
                                    str(tmp_path / "bundle"), str(vocab))
  loaded = coca_jax.load(path)
  assert loaded.module == model and loaded.tokenizer.vocab_size == len(WORDS)
  tokens = image_pass(loaded.params, jnp.asarray(OUT["image"]))  # (The same model's pass.)
  np.testing.assert_allclose(tokens, OUT["shared_tokens"], **TOL)
  assert report["dropped"] == [] and len(report["mapped"]) == len(_beit("shared"))


def test_what_cannot_map_is_refused_with_the_fix(tiny):
  _, _, template, _ = tiny
  state = _beit("per_layer")
  bigger = dict(ARCH, image_size=2 * ARCH["image_size"])
  with pytest.raises(vlmo.ConversionError, match=r"is for a 4x4 patch grid but --model big has "
                     r"a 8x8 grid \(64px / 8px\).*import a BEiT trained at 64px"):
    beit.check_architecture(state, bigger, "big")
  with pytest.raises(vlmo.ConversionError, match=r"8px patches, the target model has 16px"):
    beit.check_architecture(state, dict(ARCH, patch_size=16, image_size=64))
  with pytest.raises(vlmo.ConversionError, match=r"absolute position embeddings.*"
                     r"use_abs_pos_emb=False"):
    beit.to_vlmo_state(dict(state, pos_embed=np.zeros((1, 17, 32), np.float32)), template, ARCH)
  variant = dict(state, **{"blocks.0.mlp.norm.weight": np.ones(128, np.float32)})
  del variant["blocks.1.norm1.weight"]
  with pytest.raises(vlmo.ConversionError, match=r"(?s)missing blocks.1.norm1.weight.*"
                     r"unexpected blocks.0.mlp.norm.weight"):
    beit.to_vlmo_state(variant, template, ARCH)


def _usage_error(capsys, *args):
  with pytest.raises(SystemExit) as exit_info:
    beit.main(["import", *args])
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2 and "\n" not in err and "Traceback" not in err, err
  return err


def test_bad_paths_and_files_are_one_line_usage_errors(tmp_path, capsys):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(WORDS) + "\n")
  common = ["--model", "vlmo_base_patch16", "--vocab", str(vocab), "--out", str(tmp_path / "o")]
  assert "does not exist" in _usage_error(capsys, "--src", str(tmp_path / "nope.pt"), *common)
  bad = tmp_path / "beit.safetensors"
  bad.write_bytes(b"not a safetensors file")
  assert f"{bad} is not a readable safetensors file" in _usage_error(
      capsys, "--src", str(bad), *common)
  # A BEiT of another size than --model: named before anything is built.
  assert "width 32, --model vlmo_base_patch16 has 768" in _usage_error(
      capsys, "--src", os.path.join(DATA, "beit_tiny_shared.safetensors"), *common)
