"""VLMo as published: our MoME with the VLMo options against the official module (microsoft/unilm
vlmo/) on committed fixtures (tests/data/make_vlmo_fixtures.py builds them in a torch
environment; no torch here), VLMo checkpoints in and out, and BERT's WordPiece tokenizer."""

import dataclasses
import functools
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.core import config as config_lib
from coca_jax.core import schema
from coca_jax.data.tokenizer import load_tokenizer
from coca_jax.data.wordpiece import WordPieceTokenizer
from coca_jax.interop import params as flat_params
from coca_jax.interop import vlmo
from coca_jax.models.mome import MoME, MoMEConfig
from coca_jax.training import step as step_lib

DATA = os.path.join(os.path.dirname(__file__), "data")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = json.load(open(os.path.join(DATA, "vlmo_tiny.json")))
OUT = dict(np.load(os.path.join(DATA, "vlmo_tiny_outputs.npz")))
TOL = dict(atol=1e-5, rtol=1e-5)


def _state():
  with open(os.path.join(DATA, "vlmo_tiny.safetensors"), "rb") as f:
    return flat_params.load_safetensors(f.read())


def _tiny_model(name=None):
  t = INFO["tiny"]
  return dict(image_size=t["image_size"], patch_size=t["patch_size"], width=t["width"],
              depth=t["depth"], heads=t["heads"], mlp_dim=4 * t["width"],
              vlffn_start=t["vlffn_start"])


def _tiny_text():
  t = INFO["tiny"]
  return dict(vocab_size=t["vocab_size"], max_len=t["max_text_len"],
              relative_text_length=t["max_text_len_of_initckpt"], cls_id=2, sep_id=3,
              mask_id=4, unk_id=1)


def _tiny_config(**mome):
  c = vlmo.experiment_config(_tiny_model(), "", **_tiny_text())
  c.model.mome.update(mome)
  return c


@pytest.fixture(scope="module")
def tiny():
  config = _tiny_config()
  model = step_lib.build_model(config)
  params = vlmo.import_params(_state(), config)
  return model, params


def _all_passes(model, params, image, text, mlm_text):
  """Every output the fixture holds, from one jitted function (one compilation)."""
  v = {"params": params}
  out = dict(model.apply(v, image, text))
  out["image_tokens"] = model.apply(v, image, method=lambda m, i: m._bert_image(i)["tokens"])
  out["text_tokens"] = model.apply(v, text, method=lambda m, t: m._bert_text(t)["tokens"])
  fused = model.apply(v, image, text, method="fused_features")
  out.update(fused_text_tokens=fused["text_tokens"], fused_image_tokens=fused["image_tokens"],
             fused_pooled=fused["pooled"])
  out["itm_logits"] = model.apply(v, image, text, method="itm_logits")
  # MLM on the text-only pass (VLMo's stage 2) and on the fused pass (stage 3).
  out["text_mlm_logits"] = model.apply(v, mlm_text, method="mlm_logits")
  out["fused_mlm_logits"] = model.apply(v, mlm_text, None, image, method="mlm_logits")
  out["picked_mlm_logits"] = model.apply(v, mlm_text, jnp.array([[2, 0], [4, 7]]), image,
                                         method="mlm_logits")
  return out


def test_every_pass_equals_the_official_module(tiny):
  model, params = tiny
  out = jax.jit(functools.partial(_all_passes, model))(
      params, *(jnp.asarray(OUT[k]) for k in ("image", "text", "mlm_text")))
  names = ("image_embed", "image_vl_embed", "text_embed", "text_vl_embed", "logit_scale",
           "logit_vl_scale", "image_tokens", "text_tokens", "fused_text_tokens",
           "fused_image_tokens", "fused_pooled", "itm_logits", "text_mlm_logits",
           "fused_mlm_logits")
  for name in names:
    np.testing.assert_allclose(out[name], OUT[name], **TOL, err_msg=name)
  # Logits at chosen positions are those positions' rows.
  np.testing.assert_allclose(out["picked_mlm_logits"], np.take_along_axis(
      OUT["fused_mlm_logits"], np.array([[2, 0], [4, 7]])[..., None], axis=1), **TOL)


@pytest.fixture(scope="module")
def base():
  """experiments/vlmo_base.py: (config, abstract params)."""
  config = config_lib.load_config(os.path.join(REPO, "experiments", "vlmo_base.py"))
  return config, step_lib.abstract_params(config)


def test_parameter_counts_equal_the_official_modules(tiny, base):
  _, params = tiny
  assert sum(x.size for x in jax.tree.leaves(params)) == INFO["parameters"]
  base, abstract = base
  assert (sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
          == INFO["vlmo_base"]["parameters"] == 202_445_470)
  m = base.model.mome
  assert (m.depth, m.width, m.heads, m.mlp_dim, m.fusion_layers) == (12, 768, 12, 3072, 2)
  assert (base.model.image_size, base.model.patch_size, base.model.text.vocab_size,
          base.model.text.max_len) == (224, 16, 30_522, 40)


def test_export_is_the_official_state_dict(tiny, base):
  model, params = tiny
  state = vlmo.to_vlmo(vlmo.flatten(params), model)
  official = _state()
  assert {k: list(v.shape) for k, v in state.items()} == INFO["state_dict"]
  for key, value in official.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)
  # VLMo-Base: the layout the official module loads with load_state_dict(strict=True).
  base, abstract = base
  state = vlmo.to_vlmo(_shaped(abstract), step_lib.build_model(base), contiguous=False)
  assert {k: list(v.shape) for k, v in state.items()} == INFO["vlmo_base"]["state_dict"]


def _shaped(abstract):
  """Zero arrays of an abstract tree's shapes, flat (broadcast views: no memory)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    flat[name] = np.broadcast_to(np.float32(0), leaf.shape)
  return flat


def test_import_writes_a_bundle_that_loads_with_the_official_outputs(tmp_path):
  import coca_jax
  vocab = tmp_path / "vocab.txt"
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  words += [f"w{i}" for i in range(INFO["tiny"]["vocab_size"] - len(words))]
  vocab.write_text("\n".join(words) + "\n")
  bundle = vlmo.import_bundle(os.path.join(DATA, "vlmo_tiny.safetensors"), _tiny_model(),
                              str(tmp_path / "bundle"), str(vocab))
  loaded = coca_jax.load(bundle)
  assert isinstance(loaded.module, MoME) and loaded.module.config.mome.bert
  assert (loaded.tokenizer.bos_id, loaded.tokenizer.eos_id) == (2, 3)
  v = {"params": loaded.params}
  image, text = jnp.asarray(OUT["image"]), jnp.asarray(OUT["text"])
  embed, _ = loaded.module.apply(v, image, method="encode_image")
  np.testing.assert_allclose(embed, OUT["image_embed"], **TOL)
  np.testing.assert_allclose(loaded.module.apply(v, text, method="encode_text"),
                             OUT["text_embed"], **TOL)
  np.testing.assert_allclose(loaded.module.apply(v, image, text, method="itm_logits"),
                             OUT["itm_logits"], **TOL)
  # And out again: the official keys, shapes and values.
  out = vlmo.export_state_dict(bundle, str(tmp_path / "vlmo.safetensors"))
  with open(out, "rb") as f:
    exported = flat_params.load_safetensors(f.read())
  official = _state()
  assert sorted(exported) == sorted(official)
  for key in official:
    np.testing.assert_array_equal(exported[key], official[key], err_msg=key)


def test_import_names_missing_and_unexpected_keys(tiny):
  model, _ = tiny
  state = _state()
  state.pop("transformer.blocks.0.gamma_1")
  state["vqa_classifier.0.weight"] = np.zeros((2, 2), np.float32)
  state["text_embeddings.position_ids"] = np.arange(8)[None]  # A buffer: skipped.
  with pytest.raises(vlmo.ConversionError,
                     match=r"(?s)missing transformer.blocks.0.gamma_1.*unexpected "
                           r"vqa_classifier.0.weight"):
    vlmo.from_vlmo(state, model)


def test_pt_files_need_a_torch_with_a_safe_weights_only_loader(tmp_path, monkeypatch):
  path = tmp_path / "vlmo.pt"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.5.1"))
  with pytest.raises(ImportError, match=r"2\.5\.1 is too old.*weights-only.*2\.6"):
    vlmo.read_state_dict(str(path))


def test_stochastic_depth_only_in_training(tiny):
  model, params = tiny
  config = dataclasses.replace(
      model.config, mome=dataclasses.replace(model.config.mome, drop_path_rate=0.5))
  dropping = MoME(config, itm=True)
  v = {"params": params}
  image, text = jnp.asarray(OUT["image"]), jnp.asarray(OUT["text"])
  # train=False: no rng needed, nothing dropped.
  evaluated = jax.jit(lambda: (dropping.apply(v, image, text)["text_embed"],
                               dropping.apply(v, image, text, method="itm_logits")))()
  np.testing.assert_allclose(evaluated[0], OUT["text_embed"], **TOL)
  np.testing.assert_allclose(evaluated[1], OUT["itm_logits"], **TOL)
  train = jax.jit(lambda key: dropping.apply(v, image, text, train=True,
                                             rngs={"dropout": key})["text_embed"])
  trained = [train(jax.random.key(s)) for s in (0, 0, 1)]
  np.testing.assert_array_equal(trained[0], trained[1])
  assert not np.allclose(trained[0], OUT["text_embed"], atol=1e-3)
  assert not np.allclose(trained[0], trained[2], atol=1e-3)
  with pytest.raises(Exception, match="dropout"):  # Training without an rng is refused.
    jax.eval_shape(lambda: dropping.apply(v, image, text, train=True))


def test_vlmo_train_step_runs(tiny):
  config = _tiny_config(drop_path_rate=0.1)
  config.train.batch_size = 2
  config.optim.lr = 1e-3
  built = step_lib.setup(config)
  state = built.init_state()
  batch = {"image": jnp.asarray(OUT["image"]), "text": jnp.asarray(OUT["text"])}
  state, metrics = built.train_step()(state, batch)
  for key in ("loss", "contrastive_loss", "itm_loss"):
    assert np.isfinite(float(metrics[key])), key
  assert "caption_loss" not in metrics


def test_config_errors_name_the_fix():
  config = _tiny_config()
  config.loss.caption_weight = 2.0
  with pytest.raises(config_lib.ConfigError, match=r"caption_weight=2.0 needs a causal text "
                     r"path.*set config.loss.caption_weight=0"):
    config_lib.validate(config)
  causal = _tiny_config(text_encoder="causal")
  with pytest.raises(config_lib.ConfigError, match=r"are VLMo options of the BERT text encoder"):
    config_lib.validate(causal)
  short = _tiny_config(relative_text_length=4)
  with pytest.raises(config_lib.ConfigError, match=r"relative_text_length=4 is shorter"):
    config_lib.validate(short)
  config_lib.validate(_tiny_config())  # The tiny VLMo config itself is valid.


def test_mome_coca_defaults_are_unchanged():
  """The VLMo options default to MoME-CoCa's model: causal text, no layer scale, key biases."""
  c = config_lib.load_config(os.path.join(REPO, "experiments", "mome_coca_base.py"))
  m = schema.build(MoMEConfig, c.model).mome
  assert (m.text_encoder, m.layer_scale, m.key_bias, m.relative_position, m.activation,
          m.drop_path_rate) == ("causal", 0.0, True, False, "gelu_tanh", 0.0)


# -- BERT WordPiece -------------------------------------------------------------------------


def test_wordpiece_tokenizer_is_berts_uncased():
  tokenizer = load_tokenizer(os.path.join(DATA, "bert_vocab_tiny.txt"), "wordpiece")
  assert isinstance(tokenizer, WordPieceTokenizer)
  # bert-base-uncased's special ids; [PAD] is the project's PAD_ID.
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
          tokenizer.mask_id) == (0, 100, 101, 102, 103)
  vocab = tokenizer.vocab
  ids = tokenizer.encode("A Café, UNAFFABLE dog!")  # Lowercased, accents stripped, '##' pieces.
  assert ids == [vocab[p] for p in ("a", "cafe", ",", "un", "##aff", "##able", "dog", "!")]
  batch = tokenizer.tokenize(["the red dog", "a cat playing on the bench in the park"], 8)
  assert batch.dtype == np.int32 and batch.shape == (2, 8)
  assert batch[0].tolist() == [101, vocab["the"], vocab["red"], vocab["dog"], 102, 0, 0, 0]
  assert batch[1, 0] == 101 and batch[1, -1] == 102 and tokenizer.num_truncated == 1
  assert tokenizer.decode(batch[0]) == "the red dog"
  assert tokenizer.encode("qq") == [100]  # No piece for it: [UNK].


def test_wordpiece_vocabulary_errors_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match="bert-base-uncased's vocab.txt"):
    load_tokenizer("", "wordpiece")
  bad = tmp_path / "vocab.txt"
  bad.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\n")
  with pytest.raises(ValueError, match=r"\[PAD\] at 1.*\[PAD\] first"):
    load_tokenizer(str(bad), "wordpiece")
