r"""open_clip CoCa weights in and out.

  # An open_clip CoCa state dict (.safetensors read without torch; .pt/.bin need torch) ->
  # a bundle that `coca_jax.load` opens and `--config.init.source` fine-tunes.
  python -m coca_jax.interop.open_clip import --src open_clip_model.safetensors \
      --model coca_ViT-B-32 --out /tmp/coca_b32 [--bpe bpe_simple_vocab_16e6.txt.gz]
  # A workdir, checkpoint step or bundle -> an open_clip state dict (.safetensors) that
  # `open_clip.create_model(name)` + `load_state_dict` accepts.
  python -m coca_jax.interop.open_clip export --src /tmp/finetuned --out coca.safetensors

`--model` is one of MODEL_CONFIGS (open_clip's own model-config JSON, as published) or a path to
such a JSON file. The model group it gives (`model_group`) switches on the architecture options
where open_clip's CoCa differs from ours (see CoCaConfig): exact GELU, LayerNorm eps 1e-5, a ViT
class token with ln_pre and no final encoder norm, a bias-free patch embedding, one 256-query
pooler at the embedding width (query 0 contrastive), the multimodal layer layout with an MLP
after self-attention and after cross-attention, the legacy CLS mask its weights were trained
with, and a bias-free vocab head. Parameters map one to one (`to_open_clip` / `from_open_clip`);
nothing is dropped or invented (both directions check that every key was used).
"""

from __future__ import annotations

import copy
import functools
import json
import re

import ml_collections
import numpy as np

from coca_jax.core import cli
from coca_jax.core import config as config_lib
from coca_jax.core import fs
from coca_jax.core import schema
from coca_jax.data.clip_bpe import ClipBpeTokenizer
from coca_jax.inference import api
from coca_jax.inference import bundle
from coca_jax.interop import params as flat_params
from coca_jax.training import step as step_lib

# open_clip's model_configs/coca_ViT-B-32.json and coca_ViT-L-14.json (open_clip 3.3.0).
MODEL_CONFIGS = {
    "coca_ViT-B-32": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32,
                       "attentional_pool": True, "attn_pooler_heads": 8, "output_tokens": True},
        "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8,
                     "layers": 12, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8,
                           "layers": 12, "attn_pooler_heads": 8},
        "custom_text": True,
    },
    "coca_ViT-L-14": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14,
                       "attentional_pool": True, "attn_pooler_heads": 8, "output_tokens": True},
        "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 768, "heads": 12,
                     "layers": 12, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 768, "heads": 12,
                           "layers": 12, "attn_pooler_heads": 12},
        "custom_text": True,
    },
}
# open_clip's defaults for fields its CoCa JSONs leave out (CLIPVisionCfg / CLIPTextCfg).
VISION_HEAD_WIDTH, MLP_RATIO, POOLER_QUERIES = 64, 4.0, 256


class ConversionError(ValueError):
  """A state dict or model config that does not fit; the message lists every problem."""


def read_model_config(model: str) -> dict:
  """open_clip model-config dict from a MODEL_CONFIGS name or a JSON file path."""
  if model in MODEL_CONFIGS:
    return copy.deepcopy(MODEL_CONFIGS[model])
  if fs.exists(model):
    return json.loads(fs.read_text(model))
  raise ConversionError(f"--model {model!r} is neither one of {sorted(MODEL_CONFIGS)} nor an "
                        "open_clip model-config JSON file")


def model_group(oc: dict) -> ml_collections.ConfigDict:
  """Our `config.model` group for an open_clip CoCa model-config dict."""
  v, t, m = oc["vision_cfg"], oc["text_cfg"], oc["multimodal_cfg"]
  problems = []
  if not t.get("embed_cls", False):
    problems.append("text_cfg.embed_cls must be true (CoCa's CLS token)")
  for key in ("width", "heads"):
    if m.get(key, t.get(key)) != t.get(key):
      problems.append(f"multimodal_cfg.{key}={m.get(key)} != text_cfg.{key}={t.get(key)}: "
                      "our text decoder shares width and heads between its two halves")
  if m.get("width", t["width"]) != oc["embed_dim"]:
    problems.append(f"embed_dim={oc['embed_dim']} must equal the multimodal width "
                    f"{m.get('width')} (the decoder cross-attends to embed_dim-wide tokens)")
  if isinstance(v.get("attentional_pool"), str) or not v.get("attentional_pool", False):
    problems.append("vision_cfg.attentional_pool must be true (open_clip's one-pooler CoCa)")
  for key in ("ls_init_value", "patch_dropout", "hf_model_name", "timm_model_name"):
    if v.get(key) or t.get(key):
      problems.append(f"{key}={v.get(key) or t.get(key)!r} is not supported")
  if problems:
    raise ConversionError(f"{len(problems)} unsupported open_clip setting(s):\n  - "
                          + "\n  - ".join(problems))
  vision_width, text_width = v["width"], t["width"]
  vocab = t.get("vocab_size", 49408)
  return ml_collections.ConfigDict(dict(
      image_size=v["image_size"], patch_size=v["patch_size"], embed_dim=oc["embed_dim"],
      pooling="open_clip", n_gen_queries=v.get("attn_pooler_queries", POOLER_QUERIES),
      pooler_heads=v.get("attn_pooler_heads", 8), pooler_width=oc["embed_dim"],
      dtype="float32", remat="none", scan_layers=False, temperature_init=0.07,
      max_logit_scale=100.0, tie_embeddings=False,
      activation="quick_gelu" if oc.get("quick_gelu") else "gelu", norm_eps=1e-5,
      vision=dict(width=vision_width, depth=v["layers"],
                  heads=vision_width // v.get("head_width", VISION_HEAD_WIDTH),
                  mlp_dim=int(vision_width * v.get("mlp_ratio", MLP_RATIO)),
                  class_token=True, ln_pre=True, final_norm=False, patch_bias=False),
      # Our text layout is [BOS .. EOS PAD] of max_len tokens and the towers read the first
      # max_len - 1, which is open_clip's context_length; CLIP's sot/eot are its last two ids.
      text=dict(vocab_size=vocab, max_len=t.get("context_length", 76) + 1, width=text_width,
                heads=t["heads"], mlp_dim=int(text_width * t.get("mlp_ratio", MLP_RATIO)),
                n_uni=t["layers"], n_multi=m["layers"], multimodal_layout="open_clip",
                cls_mask="correct" if t.get("correct_cls_mask") else "open_clip_legacy",
                vocab_bias=False, bos_id=vocab - 2, eos_id=vocab - 1),
  ))


# -- Parameter mapping ---------------------------------------------------------------------------
# Ours: '/'-joined paths of the UNSCANNED parameter tree (a scanned model is converted to and
# from that layout). Theirs: open_clip state-dict keys (torch Linear weights are [out, in]; our
# kernels are [in, ...out] with attention heads split out).


def _ln(ours: str, theirs: str):
  return [(f"{ours}/LayerNorm_0/scale", f"{theirs}.weight", "copy"),
          (f"{ours}/LayerNorm_0/bias", f"{theirs}.bias", "copy")]


def _mlp(ours: str, ln: str, mlp: str):
  return _ln(f"{ours}/ln", ln) + [
      (f"{ours}/mlp/wi/kernel", f"{mlp}.c_fc.weight", "linear"),
      (f"{ours}/mlp/wi/bias", f"{mlp}.c_fc.bias", "copy"),
      (f"{ours}/mlp/wo/kernel", f"{mlp}.c_proj.weight", "linear"),
      (f"{ours}/mlp/wo/bias", f"{mlp}.c_proj.bias", "copy")]


def _attention(ours: str, theirs: str):
  """q/k/v projections (from open_clip's packed in_proj_weight or separate q/k/v_proj_weight,
  whichever the state dict has) and the output projection."""
  return [(f"{ours}/{{query,key,value}}", theirs, "qkv"),
          (f"{ours}/out/kernel", f"{theirs}.out_proj.weight", "attn_out"),
          (f"{ours}/out/bias", f"{theirs}.out_proj.bias", "copy")]


def _block(ours: str, theirs: str):
  return (_ln(f"{ours}/ln_attention", f"{theirs}.ln_1") + _attention(f"{ours}/attention", f"{theirs}.attn")
          + _mlp(f"{ours}/ffn", f"{theirs}.ln_2", f"{theirs}.mlp"))


def mapping(config) -> list[tuple[str, str, str]]:
  """(our path, open_clip key, how) for every parameter of an open_clip-layout CoCa `config`
  (a CoCaConfig)."""
  rows = [
      ("patch_embed/kernel", "visual.conv1.weight", "patch"),
      ("image_cls_token", "visual.class_embedding", "copy"),
      ("image_pos_embed", "visual.positional_embedding", "copy"),
      *_ln("ln_pre", "visual.ln_pre"),
      ("generative_pooler/queries", "visual.attn_pool.query", "copy"),
      *_ln("generative_pooler/ln_queries", "visual.attn_pool.ln_q"),
      *_ln("generative_pooler/ln_context", "visual.attn_pool.ln_k"),
      *_attention("generative_pooler/attention", "visual.attn_pool.attn"),
      *_ln("ln_image_embed", "visual.ln_post"),
      ("image_projection/kernel", "visual.proj", "copy"),
      ("token_embed/embedding", "text.token_embedding.weight", "copy"),
      ("text_pos_embed", "text.positional_embedding", "copy"),
      ("cls_token", "text.cls_emb", "copy"),
      *_ln("ln_text_embed", "text.ln_final"),
      ("text_projection/kernel", "text.text_projection", "copy"),
      *_ln("ln_decoder", "text_decoder.ln_final"),
      ("vocab_head/kernel", "text_decoder.text_projection", "copy"),
      ("logit_scale", "logit_scale", "copy"),
  ]
  for i in range(config.vision.depth):
    rows += _block(f"vision/layer_{i}", f"visual.transformer.resblocks.{i}")
  for i in range(config.text.n_uni):
    rows += _block(f"unimodal/layer_{i}", f"text.transformer.resblocks.{i}")
  for i in range(config.text.n_multi):
    ours, self_attn, cross = f"multimodal/layer_{i}", f"text_decoder.resblocks.{i}", \
        f"text_decoder.cross_attn.{i}"
    rows += _block(ours, self_attn)
    rows += _ln(f"{ours}/ln_cross_attention", f"{cross}.ln_1")
    rows += _ln(f"{ours}/ln_cross_context", f"{cross}.ln_1_kv")
    rows += _attention(f"{ours}/cross_attention", f"{cross}.attn")
    rows += _mlp(f"{ours}/cross_ffn", f"{cross}.ln_2", f"{cross}.mlp")
  return rows


def check_open_clip_layout(config) -> None:
  """Raises ConversionError unless `config` (CoCaConfig) is open_clip's CoCa architecture (so
  its parameters mean the same thing there)."""
  want = {"pooling": "open_clip", "vision.class_token": True, "vision.ln_pre": True,
          "vision.final_norm": False, "vision.patch_bias": False,
          "text.multimodal_layout": "open_clip", "text.vocab_bias": False,
          "tie_embeddings": False, "contrastive": "softmax", "norm_eps": 1e-5}
  field = lambda path: functools.reduce(getattr, path.split("."), config)
  wrong = [f"{k}={field(k)!r} (open_clip: {v!r})" for k, v in want.items() if field(k) != v]
  if config.activation not in ("gelu", "quick_gelu"):
    wrong.append(f"activation={config.activation!r} (open_clip: 'gelu', or 'quick_gelu' with "
                 "quick_gelu=True)")
  if (config.pooler_width or config.vision.width) != config.embed_dim:
    wrong.append(f"pooler_width={config.pooler_width} (open_clip: embed_dim={config.embed_dim})")
  if wrong:
    raise ConversionError("this model is not in open_clip's CoCa layout, so it has no open_clip "
                          "state dict: " + "; ".join(wrong) + ". Start from "
                          "experiments/openclip_coca.py or an imported bundle.")


def _heads(config, ours: str) -> tuple[int, int]:
  """(heads, head_dim) of the attention at `ours` (a path prefix)."""
  if ours.startswith("vision/"):
    heads, width = config.vision.heads, config.vision.width
  elif ours.startswith("generative_pooler/"):
    heads, width = config.pooler_heads, config.pooler_width or config.vision.width
  else:
    heads, width = config.text.heads, config.text.width
  return heads, width // heads


def from_open_clip(state: dict, config) -> dict:
  """open_clip state dict {key: np.ndarray} -> our flat unscanned params {path: float32 array}.
  Raises ConversionError listing every missing, unused or mis-shaped key."""
  check_open_clip_layout(config)
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  used, missing, flat = set(), [], {}

  def take(key):
    if key not in state:
      missing.append(key)
      return None
    used.add(key)
    return state[key]

  for ours, theirs, how in mapping(config):
    if how == "qkv":
      prefix = ours.split("/{")[0]
      heads, head_dim = _heads(config, prefix)
      if f"{theirs}.in_proj_weight" in state:
        packed = take(f"{theirs}.in_proj_weight")
        weights = np.split(packed, 3, axis=0)
      else:
        weights = [take(f"{theirs}.{n}_proj_weight") for n in "qkv"]
      bias = take(f"{theirs}.in_proj_bias")
      if any(w is None for w in weights) or bias is None:
        continue
      for name, w, b in zip(("query", "key", "value"), weights, np.split(bias, 3)):
        flat[f"{prefix}/{name}/kernel"] = w.T.reshape(w.shape[1], heads, head_dim)
        flat[f"{prefix}/{name}/bias"] = b.reshape(heads, head_dim)
      continue
    value = take(theirs)
    if value is None:
      continue
    if how == "linear":
      value = value.T
    elif how == "attn_out":
      heads, head_dim = _heads(config, ours)
      value = value.T.reshape(heads, head_dim, value.shape[0])
    elif how == "patch":  # conv [out, c, p, q] -> our patch order (p, q, c).
      value = value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    flat[ours] = value
  unused = sorted(set(state) - used)
  if missing or unused:
    raise ConversionError(
        f"the state dict does not fit this model: {len(missing)} missing key(s) "
        f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; {len(unused)} unused key(s) "
        f"{unused[:8]}{' ...' if len(unused) > 8 else ''}. Check --model.")
  return flat


def to_open_clip(flat: dict, config) -> dict:
  """Our flat unscanned params {path: array} -> open_clip state dict {key: float32 array}."""
  check_open_clip_layout(config)
  state, used = {}, set()

  def get(path):
    used.add(path)
    return np.asarray(flat[path], np.float32)

  for ours, theirs, how in mapping(config):
    if how == "qkv":
      prefix = ours.split("/{")[0]
      ws = [get(f"{prefix}/{n}/kernel") for n in ("query", "key", "value")]
      ws = [w.reshape(w.shape[0], -1).T for w in ws]  # [out, in]
      bs = [get(f"{prefix}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]
      if ws[0].shape == ws[1].shape:  # open_clip packs q/k/v when their input widths agree.
        state[f"{theirs}.in_proj_weight"] = np.concatenate(ws, axis=0)
      else:
        for n, w in zip("qkv", ws):
          state[f"{theirs}.{n}_proj_weight"] = w
      state[f"{theirs}.in_proj_bias"] = np.concatenate(bs)
      continue
    value = get(ours)
    if how == "linear":
      value = value.T
    elif how == "attn_out":
      value = value.reshape(-1, value.shape[-1]).T
    elif how == "patch":
      p = config.patch_size
      value = value.reshape(p, p, 3, -1).transpose(3, 2, 0, 1)
    state[theirs] = np.asarray(value, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
  unused = sorted(set(flat) - used)
  if unused:
    raise ConversionError(f"{len(unused)} parameter(s) have no open_clip counterpart: {unused[:8]}")
  return state


# -- The config a bundle carries --------------------------------------------------------------


def base_config(model: str, bpe: str = "") -> ml_collections.ConfigDict:
  """The groups that say what open_clip model `model` (MODEL_CONFIGS name or JSON path) is: its
  model group (`model_group`), its tokenizer (CLIP BPE from `bpe`; empty: an installed
  open_clip's) and open_clip's CoCa loss convention (contrastive terms averaged, weights 1 : 2).
  An imported bundle carries these (completed with the schema's defaults); the fine-tuning
  experiment (experiments/openclip_coca.py) adds its training groups around them."""
  c = ml_collections.ConfigDict()
  c.model = model_group(read_model_config(model))
  c.data = ml_collections.ConfigDict(dict(image_size=c.model.image_size, tokenizer=bpe,
                                          tokenizer_kind="clip_bpe"))
  c.loss = ml_collections.ConfigDict(dict(
      contrastive_weight=1.0, caption_weight=2.0, label_smoothing=0.0, contrastive="softmax",
      contrastive_impl="gathered", contrastive_reduction="mean"))
  return c


# -- Files ---------------------------------------------------------------------------------------


# torch.load(weights_only=True) could still run code from a crafted file before torch 2.6
# (CVE-2025-32434); a downloaded .pt/.bin is not read with an older torch.
SAFE_TORCH_LOAD = (2, 6)


def check_torch_load_is_safe(version: str, path: str) -> None:
  """Raises ImportError naming the fix when torch `version` is older than SAFE_TORCH_LOAD."""
  match = re.match(r"(\d+)\.(\d+)", version)
  if match and tuple(int(x) for x in match.groups()) >= SAFE_TORCH_LOAD:
    return
  raise ImportError(
      f"reading {path} needs torch >= {'.'.join(map(str, SAFE_TORCH_LOAD))} (installed: "
      f"{version}): before 2.6, torch.load(weights_only=True) can still run code hidden in a "
      "crafted checkpoint (CVE-2025-32434). Upgrade torch (pip install -U torch), or convert "
      "the file to .safetensors where a trusted torch is installed")


def read_state_dict(path: str) -> dict:
  """{key: float32 numpy} from an open_clip checkpoint: .safetensors (no torch needed) or a
  torch .pt/.bin (a state dict, or a training checkpoint holding one under 'state_dict')."""
  if not fs.exists(path):
    raise FileNotFoundError(f"--src {path} does not exist")
  if path.endswith(".safetensors"):
    state = flat_params.load_safetensors(fs.read_bytes(path), path)  # bf16 / fp16 too.
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path} needs torch; or convert it to .safetensors where torch "
                        "is installed (safetensors.torch.save_file(state_dict, ...))") from e
    check_torch_load_is_safe(torch.__version__, path)
    with fs.open(path, "rb") as f:
      state = torch.load(f, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k: v.float().numpy() for k, v in state.items()}
  # Checkpoints saved from DistributedDataParallel prefix every key with 'module.'.
  return {re.sub(r"^module\.", "", k): np.asarray(v, np.float32) for k, v in state.items()}


def write_safetensors(state: dict, out: str, metadata: dict | None = None) -> str:
  """Writes {key: array} to `out` whole or not at all (see `fs.write_bytes`)."""
  import safetensors.numpy
  out = fs.resolve(out)
  fs.write_bytes(out, safetensors.numpy.save(
      {k: np.asarray(v, order="C") for k, v in state.items()}, metadata=metadata))
  return out


def import_params(state: dict, config) -> dict:
  """open_clip state dict -> our params tree for experiment `config` (scanned or not), checked
  leaf by leaf against the model's abstract parameters."""
  model_config = schema.build(schema.CoCa, config.model)
  params = flat_params.unflatten(model_config, from_open_clip(state, model_config))
  abstract = step_lib.abstract_params(config)
  flat_params.check_against(abstract, params)
  return params


def import_bundle(src: str, model: str, out: str, bpe: str = "", dtype: str = "float32") -> str:
  """open_clip checkpoint `src` of model `model` -> a coca_jax bundle at `out`."""
  config = config_lib.complete(base_config(model, bpe))
  tokenizer = ClipBpeTokenizer.load(bpe)
  if tokenizer.vocab_size != config.model.text.vocab_size:
    raise ConversionError(f"the tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but "
                          f"{model} has a vocabulary of {config.model.text.vocab_size}")
  config.data.tokenizer = ""  # The bundle keeps its own copy beside config.json.
  params = import_params(read_state_dict(src), config)
  return bundle.write_bundle(out, params, config, tokenizer, source=fs.resolve(src),
                             dtype=dtype)


def export_state_dict(src: str, out: str, step: int | None = None) -> str:
  """A workdir / step dir / bundle of an open_clip-layout model -> open_clip .safetensors."""
  loaded = api.load(src, step=step)
  model_config = schema.build(schema.CoCa, loaded.config.model)
  state = to_open_clip(flat_params.flatten(model_config, loaded.params), model_config)
  return write_safetensors(state, out, {"format": "pt", "source": "coca_jax"})


def main(argv=None) -> None:
  parser, imp = cli.conversion_parser(
      "python -m coca_jax.interop.open_clip", __doc__.split("\n\n")[0],
      imports="open_clip CoCa checkpoint -> coca_jax bundle",
      src_help=".safetensors, .pt or .bin state dict",
      exports="coca_jax model -> open_clip .safetensors")
  imp.add_argument("--model", required=True,
                   help=f"one of {sorted(MODEL_CONFIGS)} or an open_clip model-config JSON")
  imp.add_argument("--bpe", default="", help="CLIP BPE merges file (default: open_clip's)")
  cli.run_conversion(
      parser, argv, errors=(ConversionError,), export_state_dict=export_state_dict,
      import_bundle=lambda a: import_bundle(a.src, a.model, a.out, a.bpe, a.dtype))


if __name__ == "__main__":
  main()
