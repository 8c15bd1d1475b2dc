r"""VLMo's weights (microsoft/unilm, vlmo/) in and out.

  # A VLMo checkpoint (.pt through torch's weights-only loader, or .safetensors) -> a bundle
  # that `coca_jax.load` opens and `--config.init.source` fine-tunes.
  python -m coca_jax.interop.vlmo import --src vlmo_base_patch16_224.pt \
      --model vlmo_base_patch16 --vocab bert-base-uncased-vocab.txt --out /tmp/vlmo_base
  # A workdir, checkpoint step or bundle -> the official state dict (.safetensors) that the
  # official `VLMo(config)` accepts with load_state_dict(strict=True).
  python -m coca_jax.interop.vlmo export --src /tmp/vlmo_base --out vlmo.safetensors

`--model` names one of MODEL_CONFIGS (the official `vlmo_*_patch16` architectures and the sizes
of vlmo/config.py); the model group it gives selects the MoME options that reproduce the
official module (models/mome.py, text_encoder='bert'; docs/vlmo.md). Which heads exist follows
the checkpoint: the ITM head and pooler, the MLM head and the VL-FFN contrastive pair are
imported where its state dict has them. Parameters map one to one (`from_vlmo` / `to_vlmo`):
nothing is dropped or invented, both directions check that every key was used. The official
module's non-parameter entries (BERT's position_ids buffer of older transformers, the relative
position index tensors) are recomputed, not stored, and skipped on import.
"""

from __future__ import annotations

import re

from flax import traverse_util
import ml_collections
import numpy as np

from coca_jax.core import cli
from coca_jax.core import config as config_lib
from coca_jax.core import fs
from coca_jax.core import recipes
from coca_jax.data.wordpiece import WordPieceTokenizer
from coca_jax.inference import api
from coca_jax.inference import bundle
from coca_jax.interop import params as flat_params
from coca_jax.models.mome import relative_position_rows
from coca_jax.training import step as step_lib

# vlmo/modules/multiway_transformer.py's registered architectures, vlmo/config.py's text
# settings (max_text_len 40, max_text_len_of_initckpt 196, bert-base-uncased's 30,522).
MODEL_CONFIGS = {
    "vlmo_base_patch16": dict(image_size=224, patch_size=16, width=768, depth=12, heads=12,
                              mlp_dim=3072, vlffn_start=10),
    "vlmo_large_patch16": dict(image_size=224, patch_size=16, width=1024, depth=24, heads=16,
                               mlp_dim=4096, vlffn_start=21),
}
TEXT = dict(vocab_size=30_522, max_len=40, relative_text_length=196, cls_id=101, sep_id=102,
            mask_id=103, unk_id=100)
# State-dict entries that are not parameters (recomputed by both sides).
BUFFERS = ("text_embeddings.position_ids", "text_embeddings.token_type_ids",
           "relative_position_index", "text_relative_position_index",
           "text_imag_relative_position_index")


class ConversionError(ValueError):
  """A state dict or model that does not fit; the message lists every problem."""


def model_group(model: str | dict, *, itm: bool = True, mlm_head: bool = True,
                vl_contrastive: bool = True, drop_path_rate: float = 0.1,
                dtype: str = "float32", **text) -> ml_collections.ConfigDict:
  """Our `config.model` for a VLMo architecture (a MODEL_CONFIGS name or a dict of its fields:
  image_size, patch_size, width, depth, heads, mlp_dim, vlffn_start), with the options that
  reproduce the official module. `text` overrides TEXT (vocab_size, max_len, ...).
  `itm` only documents intent here: the ITM head follows config.loss.itm_weight."""
  del itm
  if isinstance(model, str):
    if model not in MODEL_CONFIGS:
      raise ConversionError(f"--model {model!r} is not one of {sorted(MODEL_CONFIGS)}")
    model = MODEL_CONFIGS[model]
  t = dict(TEXT, **text)
  return ml_collections.ConfigDict(dict(
      backbone="mome", image_size=model["image_size"], patch_size=model["patch_size"],
      embed_dim=model["width"], pooler_heads=model["heads"], pooling="cls", dtype=dtype,
      temperature_init=0.07, max_logit_scale=100.0, tie_embeddings=False,
      text=dict(vocab_size=t["vocab_size"], max_len=t["max_len"], bos_id=t["cls_id"],
                eos_id=t["sep_id"]),
      mome=dict(depth=model["depth"], width=model["width"], heads=model["heads"],
                mlp_dim=model["mlp_dim"], fusion_layers=model["depth"] - model["vlffn_start"],
                text_encoder="bert", token_types=True, layer_scale=0.1,
                relative_position=True, relative_text_length=t["relative_text_length"],
                key_bias=False, shared_final_norm=True, itm_pooler=True,
                drop_path_rate=drop_path_rate, activation="gelu",
                vl_contrastive=vl_contrastive, mlm_head=mlm_head)))


# -- Parameter mapping -------------------------------------------------------------------------


def _entries(model) -> list[tuple[str, str, str]]:
  """(our flat path, official key, how) for every parameter of the MoME module `model`. how: 'copy',
  'linear' (our kernel = their weight.T), 'patch', 'cls', 'heads_in' (a q/k/v slice of qkv),
  'heads_bias', 'heads_out' (the attention output projection), 'pos'."""
  mc = model.config
  ln = lambda ours, theirs: [(f"{ours}/LayerNorm_0/scale", f"{theirs}.weight", "copy"),
                             (f"{ours}/LayerNorm_0/bias", f"{theirs}.bias", "copy")]
  linear = lambda ours, theirs, bias=True: (
      [(f"{ours}/kernel", f"{theirs}.weight", "linear")]
      + ([(f"{ours}/bias", f"{theirs}.bias", "copy")] if bias else []))
  out = [("patch_embed/kernel", "transformer.patch_embed.proj.weight", "patch"),
         ("patch_embed/bias", "transformer.patch_embed.proj.bias", "copy"),
         ("image_cls_token", "transformer.cls_token", "cls"),
         ("token_embed/embedding", "text_embeddings.word_embeddings.weight", "copy"),
         ("text_pos_embed", "text_embeddings.position_embeddings.weight", "copy"),
         ("text_type_embed", "text_embeddings.token_type_embeddings.weight", "copy")]
  out += ln("ln_text_embed", "text_embeddings.LayerNorm")
  if not mc.mome.relative_position:
    out.append(("image_pos_embed", "transformer.pos_embed", "pos"))
  else:
    out.append(("relative_position_bias", "relative_position_bias_table", "copy"))
  if mc.mome.token_types:
    out.append(("token_type_embed", "token_type_embeddings.weight", "copy"))
  for i in range(mc.mome.depth):
    ours, theirs = f"layers_{i}", f"transformer.blocks.{i}"
    out += ln(f"{ours}/ln_attention", f"{theirs}.norm1")
    for j, name in enumerate(("query", "key", "value")):
      out.append((f"{ours}/attention/{name}/kernel", f"{theirs}.attn.qkv.weight#{j}", "heads_in"))
    out += [(f"{ours}/attention/query/bias", f"{theirs}.attn.q_bias", "heads_bias"),
            (f"{ours}/attention/value/bias", f"{theirs}.attn.v_bias", "heads_bias"),
            (f"{ours}/attention/out/kernel", f"{theirs}.attn.proj.weight", "heads_out"),
            (f"{ours}/attention/out/bias", f"{theirs}.attn.proj.bias", "copy")]
    if mc.mome.layer_scale:
      out += [(f"{ours}/layer_scale_attention", f"{theirs}.gamma_1", "copy"),
              (f"{ours}/layer_scale_ffn", f"{theirs}.gamma_2", "copy")]
    for expert, suffix in (("text", "text"), ("image", "imag"), ("fusion", "vl")):
      if expert == "fusion" and i < mc.mome.bottom_layers:
        continue
      out += ln(f"{ours}/ffn_{expert}/ln", f"{theirs}.norm2_{suffix}")
      out += linear(f"{ours}/ffn_{expert}/mlp/wi", f"{theirs}.mlp_{suffix}.fc1")
      out += linear(f"{ours}/ffn_{expert}/mlp/wo", f"{theirs}.mlp_{suffix}.fc2")
  out += ln("final_norm", "transformer.norm")
  out += linear("image_projection", "itc_image_proj.fc", bias=False)
  out += linear("text_projection", "itc_text_proj.fc", bias=False)
  out.append(("logit_scale", "logit_scale", "copy"))
  if mc.mome.vl_contrastive:
    out += linear("image_vl_projection", "itc_vl_image_proj.fc", bias=False)
    out += linear("text_vl_projection", "itc_vl_text_proj.fc", bias=False)
    out.append(("logit_vl_scale", "logit_vl_scale", "copy"))
  if mc.mome.itm_pooler:
    out += linear("itm_pooler", "pooler.dense")
  if model.itm:
    out += linear("itm_head", "itm_score.fc")
  if mc.mome.mlm_head:
    out += linear("mlm/transform", "mlm_score.transform.dense")
    out += ln("mlm/ln", "mlm_score.transform.LayerNorm")
    out += [("mlm/decoder/kernel", "mlm_score.decoder.weight", "linear"),
            ("mlm/decoder/bias", "mlm_score.bias", "copy")]
  return out


def check_vlmo_layout(mc) -> None:
  """Raises ConversionError unless MoME config `mc` (schema.MoME) has the official module's
  architecture."""
  wanted = dict(text_encoder="bert", key_bias=False, shared_final_norm=True, activation="gelu")
  problems = [f"mome.{k}={getattr(mc.mome, k)!r} (VLMo: {v!r})" for k, v in wanted.items()
              if getattr(mc.mome, k) != v]
  if mc.pooling != "cls":
    problems.append(f"pooling={mc.pooling!r} (VLMo: 'cls')")
  routed = [name for name in ("image", "text", "fusion")
            if getattr(mc.mome.experts, name).enabled]
  if routed:
    problems.append(f"mome.experts {routed} are routed (VLMo: dense modality experts)")
  if mc.embed_dim != mc.mome.width:
    problems.append(f"embed_dim={mc.embed_dim} (VLMo's ITC heads keep the width "
                    f"{mc.mome.width})")
  if problems:
    raise ConversionError("the model is not in VLMo's layout: " + "; ".join(problems) +
                          "; start from experiments/vlmo_base.py or interop.vlmo.model_group")


def from_vlmo(state: dict, model) -> dict:
  """Official state dict {key: array} -> our flat {path: float32 array} for the MoME module
  `model` (its config and heads: `step.build_model`)."""
  mc = model.config
  check_vlmo_layout(mc)
  heads, head_dim, width = mc.mome.heads, mc.mome.width // mc.mome.heads, mc.mome.width
  state = {k: np.asarray(v, np.float32) for k, v in state.items() if k not in BUFFERS}
  used, flat, missing = set(), {}, []
  for ours, theirs, how in _entries(model):
    key, _, part = theirs.partition("#")
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    w = state[key]
    if how == "copy":
      value = w
    elif how == "linear":
      value = w.T
    elif how == "patch":  # [width, 3, p, p] -> our patchify order (p, q, c).
      value = w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
    elif how in ("cls", "pos"):
      value = w.reshape(w.shape[-2:]) if how == "pos" else w.reshape(-1)
    elif how == "heads_in":
      j = int(part)
      value = w[j * width:(j + 1) * width].T.reshape(width, heads, head_dim)
    elif how == "heads_bias":
      value = w.reshape(heads, head_dim)
    elif how == "heads_out":
      value = w.T.reshape(heads, head_dim, width)
    else:
      raise AssertionError(how)
    flat[ours] = np.array(value, np.float32, order="C")  # (ascontiguousarray makes 0-d 1-d.)
  unused = sorted(set(state) - used)
  problems = [f"missing {k}" for k in sorted(set(missing))]
  problems += [f"unexpected {k} {tuple(state[k].shape)}" for k in unused]
  if problems:
    raise ConversionError(f"{len(problems)} state-dict problem(s) for this VLMo model:\n  - "
                          + "\n  - ".join(problems[:20]))
  return flat


def to_vlmo(flat: dict, model, contiguous: bool = True) -> dict:
  """Our flat {path: array} of the MoME module `model` -> the official state dict {key:
  float32} (`contiguous=False`: numpy views where a layout change allows, e.g. to check
  shapes)."""
  mc = model.config
  check_vlmo_layout(mc)
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  width, state, used, qkv = mc.mome.width, {}, set(), {}
  for ours, theirs, how in _entries(model):
    if ours not in flat:
      raise ConversionError(f"the model has no parameter {ours} (VLMo's {theirs})")
    used.add(ours)
    p = flat[ours]
    key, _, part = theirs.partition("#")
    if how == "copy":
      state[key] = p
    elif how == "linear":
      state[key] = p.T
    elif how == "patch":
      size = mc.patch_size
      state[key] = p.reshape(size, size, 3, width).transpose(3, 2, 0, 1)
    elif how == "cls":
      state[key] = p.reshape(1, 1, width)
    elif how == "pos":
      state[key] = p[None]
    elif how == "heads_in":
      qkv.setdefault(key, {})[int(part)] = p.reshape(width, width).T
    elif how == "heads_bias":
      state[key] = p.reshape(width)
    elif how == "heads_out":
      state[key] = p.reshape(width, width).T
  for key, parts in qkv.items():
    state[key] = np.concatenate([parts[j] for j in range(3)], axis=0)
  unused = sorted(set(flat) - used)
  if unused:
    raise ConversionError(f"{len(unused)} parameter(s) have no VLMo counterpart: {unused[:8]}")
  return {k: np.array(v, np.float32, order="C") if contiguous else v for k, v in state.items()}


def flatten(params) -> dict:
  """A MoME's params tree (boxed or not) -> {'/'-joined path: numpy array}."""
  import flax.linen as nn
  import jax
  tree = jax.device_get(nn.meta.unbox(params))
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def heads_of_state(state: dict) -> dict:
  """Which optional heads a VLMo state dict carries: MoME options for `model_group`."""
  return dict(mlm_head="mlm_score.bias" in state,
              vl_contrastive="itc_vl_image_proj.fc.weight" in state)


# -- Experiment config ---------------------------------------------------------------------------


def experiment_config(model: str | dict, vocab: str = "", *, itm: bool = True,
                      mlm_head: bool = True, vl_contrastive: bool = True,
                      **text) -> ml_collections.ConfigDict:
  """A full experiment config around a VLMo architecture: `model_group`, BERT's WordPiece
  tokenizer from `vocab`, VLMo's stage-3 losses (config.loss: both ITC terms, ITM, MLM) and its
  AdamW recipe."""
  c = ml_collections.ConfigDict()
  c.model = model_group(model, mlm_head=mlm_head, vl_contrastive=vl_contrastive, **text)
  t = dict(TEXT, **text)
  c.data = ml_collections.ConfigDict(dict(
      name="", train_split="train", eval_split="test", image_size=c.model.image_size,
      tokenizer=vocab, tokenizer_kind="wordpiece"))
  c.train = ml_collections.ConfigDict(dict(steps=200_000, batch_size=1024, seed=0,
                                           log_every=100, microbatches=1))
  # vlmo/objectives.py: ITC = (ITC of the V/L-FFN pair + ITC of the VL-FFN pair) / 2, each the
  # mean of i2t and t2i; MLM on the fused pass x 0.25 (compute_mlm).
  c.loss = ml_collections.ConfigDict(dict(
      contrastive_weight=0.5 if vl_contrastive else 1.0,
      vl_contrastive_weight=0.5 if vl_contrastive else 0.0, caption_weight=0.0,
      contrastive="softmax", contrastive_impl="gathered", contrastive_reduction="mean",
      itm_weight=1.0 if itm else 0.0, itm_examples=0, mlm_weight=0.25 if mlm_head else 0.0,
      mlm_mask_id=t["mask_id"],
      mlm_special_ids=[t["unk_id"], t["cls_id"], t["sep_id"], t["mask_id"]]))
  c.optim = recipes.vlmo_optim(warmup_fraction=0.1)
  recipes.pretraining_layout(c)
  c.evals = ml_collections.ConfigDict(dict(every_steps=0, batch_size=64))
  c.init = ml_collections.ConfigDict(dict(source="", include_regex="", exclude_regex="",
                                          reinit_regex=""))
  return config_lib.complete(c)


# -- Files ---------------------------------------------------------------------------------------

# torch.load's weights_only loader had a remote-code-execution hole before 2.6 (CVE-2025-32434).
MIN_TORCH = (2, 6)


def read_state_dict(path: str) -> dict:
  """{key: float32 numpy} from a VLMo checkpoint: .safetensors (no torch needed), or a torch
  .pt/.ckpt read ONLY with torch's weights-only loader (torch >= 2.6): a state dict, or one
  under 'state_dict' / 'module' (DeepSpeed, keys prefixed 'module.') / 'model', as the official
  loader looks for them. Never unpickled any other way."""
  if not fs.exists(path):
    raise FileNotFoundError(f"--src {path} does not exist")
  if path.endswith(".safetensors"):
    try:
      state = flat_params.load_safetensors(fs.read_bytes(path), path)  # bf16 / fp16 too.
    except ValueError as e:  # Truncated or not safetensors: a usage error naming the file.
      raise ConversionError(str(e)) from e
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path} needs torch (>= 2.6, for its weights-only loader); or "
                        "convert it to .safetensors where torch is installed") from e
    version = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    if version < MIN_TORCH:
      raise ImportError(
          f"torch {torch.__version__} is too old to read {path} safely: its weights-only "
          "loader can be made to run code (CVE-2025-32434, fixed in 2.6); install torch >= 2.6 "
          "or convert the checkpoint to .safetensors elsewhere")
    with fs.open(path, "rb") as f:
      try:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
      except Exception as e:  # The weights-only unpickler rejects anything but tensors.
        raise ConversionError(
            f"{path} holds objects torch's weights-only loader refuses ({e}); save its state "
            "dict alone (torch.save(ckpt['state_dict'], ...)) or as .safetensors where you "
            "trust the file") from e
    state = ckpt
    for key in ("state_dict", "module", "model"):
      if isinstance(ckpt, dict) and key in ckpt:
        state = ckpt[key]
        break
    state = {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}
  return {re.sub(r"^module\.", "", k): np.asarray(v) for k, v in state.items()}


def write_safetensors(state: dict, out: str) -> str:
  import safetensors.numpy
  out = fs.resolve(out)
  fs.write_bytes(out, safetensors.numpy.save(
      {k: np.asarray(v, np.float32, order="C") for k, v in state.items()},
      metadata={"format": "pt", "source": "coca_jax"}))
  return out


def import_params(state: dict, config) -> dict:
  """Official state dict -> our params tree for experiment `config`, checked leaf by leaf
  against the model's abstract parameters."""
  model = step_lib.build_model(config)
  params = traverse_util.unflatten_dict(from_vlmo(state, model), sep="/")
  flat_params.check_against(step_lib.abstract_params(config, model), params)
  return params


def import_bundle(src: str, model: str, out: str, vocab: str, dtype: str = "float32") -> str:
  """VLMo checkpoint `src` of architecture `model` -> a coca_jax bundle at `out`."""
  if isinstance(model, str) and model not in MODEL_CONFIGS:
    raise ConversionError(f"--model {model!r} is not one of {sorted(MODEL_CONFIGS)}")
  state = read_state_dict(src)
  tokenizer = WordPieceTokenizer.load(vocab)
  # The text length and the relative position table's text rows follow the checkpoint.
  positions = state.get("text_embeddings.position_embeddings.weight")
  text = {} if positions is None else {"max_len": int(positions.shape[0])}
  table = state.get("relative_position_bias_table")
  if table is not None:
    arch = MODEL_CONFIGS[model] if isinstance(model, str) else model
    image_rows, _ = relative_position_rows(arch["image_size"] // arch["patch_size"], 0)
    text["relative_text_length"] = (int(table.shape[0]) - image_rows - 2) // 2
  config = experiment_config(model, "", itm="itm_score.fc.weight" in state,
                             vocab_size=tokenizer.vocab_size, cls_id=tokenizer.bos_id,
                             sep_id=tokenizer.eos_id, mask_id=tokenizer.mask_id,
                             unk_id=tokenizer.unk_id, **text, **heads_of_state(state))
  words = state.get("text_embeddings.word_embeddings.weight")
  if words is not None and words.shape[0] != tokenizer.vocab_size:
    raise ConversionError(f"--vocab {vocab} has {tokenizer.vocab_size} entries but the "
                          f"checkpoint's word embedding has {words.shape[0]}; give the "
                          "vocabulary it was trained with (bert-base-uncased's vocab.txt)")
  params = import_params(state, config)
  config.data.tokenizer = ""  # The bundle keeps its own copy (vocab.txt) beside config.json.
  return bundle.write_bundle(out, params, config, tokenizer, source=fs.resolve(src),
                             dtype=dtype)


def export_state_dict(src: str, out: str, step: int | None = None) -> str:
  """A workdir / step dir / bundle of a VLMo-layout MoME -> the official .safetensors."""
  loaded = api.load(src, step=step)
  state = to_vlmo(flatten(loaded.params), loaded.module)
  return write_safetensors(state, out)


def main(argv=None) -> None:
  parser, imp = cli.conversion_parser(
      "python -m coca_jax.interop.vlmo", __doc__.split("\n\n")[0],
      imports="VLMo checkpoint -> coca_jax bundle",
      src_help=".pt / .ckpt (torch >= 2.6) or .safetensors",
      exports="coca_jax VLMo model -> official .safetensors")
  imp.add_argument("--model", required=True, choices=sorted(MODEL_CONFIGS))
  imp.add_argument("--vocab", required=True,
                   help="BERT's WordPiece vocabulary (bert-base-uncased's vocab.txt)")
  cli.run_conversion(
      parser, argv, errors=(ConversionError, ImportError), export_state_dict=export_state_dict,
      import_bundle=lambda a: import_bundle(a.src, a.model, a.out, a.vocab, a.dtype))


if __name__ == "__main__":
  main()
