r"""BEiT's weights (timm's `Beit` state-dict layout) into VLMo's backbone: VLMo starts from BEiT.

  # A BEiT checkpoint (.safetensors, or .pt/.pth through torch's weights-only loader) -> a
  # bundle of a VLMo model whose image side is BEiT's, for `--config.init.source`.
  python -m coca_jax.interop.beit import --src beit_base_patch16_224.safetensors \
      --model vlmo_base_patch16 --vocab bert-base-uncased-vocab.txt --out /tmp/vlmo_from_beit

`--model` names the VLMo architecture (interop/vlmo.py's MODEL_CONFIGS); the BEiT must have its
width, depth, heads, MLP size, patch size and patch grid. The mapping is the one the official
VLMo code applies when it loads BEiT (vlmo/modules/vlmo_module.py, `convert_to_textpt_ckpt`,
used when stage 2 starts from BEiT's weights):
  patch_embed, cls_token, blocks.N.{norm1, attn, gamma_1, gamma_2}
                          -> the patch embedding, image [CLS] and layer N's shared attention
  blocks.N.{norm2, mlp}   -> layer N's V-FFN (official norm2_imag, mlp_imag)
  relative position bias  -> the image rows of layer N's columns of VLMo's one table: a
                             per-layer table (blocks.N.attn.relative_position_bias_table) as it
                             is, a shared one (rel_pos_bias.relative_position_bias_table, BEiT's
                             pre-training checkpoints) copied into every layer, as BEiT's own
                             fine-tuning does (both, if a model has both: summed)
  norm                    -> the shared final norm (only BEiT's pre-training layout has it)
Everything else keeps this model's initialisation (`--seed`), as the official code leaves it
at its own: the L-FFN (stage 2 trains it), the VL-FFN (the official stage-2 model has none;
stage 3 starts it fresh), the text embeddings, the text rows of the relative position table
(zeros), the final norm when BEiT has none, and the heads. One deliberate difference: VLMo's
image token-type embedding (added to every image token) is set to zero, where the official code
leaves it random, so that the imported image-only pass is BEiT's exactly. A BEiT without layer
scale gets gamma = 1 and one without q/v biases gets zero biases (the same function; the
official loader would leave VLMo's 0.1 and its initial biases).
Dropped (not part of VLMo): head and fc_norm (the classifier after mean pooling), mask_token
and lm_head (BEiT's masked-image-modelling head), relative_position_index buffers. Refused,
with the fix: absolute position embeddings (VLMo has none), another patch size or patch grid
than the target's (the table would need resampling), another width/depth/heads/MLP size, and
any key of a BEiT variant this does not map (timm's scale_mlp / swiglu_mlp).
"""

from __future__ import annotations

import argparse
import re
import sys

import jax
import numpy as np

from coca_jax.core import cli
from coca_jax.core import fs
from coca_jax.data.wordpiece import WordPieceTokenizer
from coca_jax.inference import bundle
from coca_jax.interop import vlmo
from coca_jax.interop.vlmo import ConversionError, MODEL_CONFIGS
from coca_jax.models.mome import relative_position_rows
from coca_jax.training import step as step_lib

# BEiT keys that have no place in VLMo (see the module docstring).
DROPPED = re.compile(r"^(head\.|fc_norm\.|lm_head\.|mask_token$)|relative_position_index$")
TOP = {"cls_token": "transformer.cls_token",
       "patch_embed.proj.weight": "transformer.patch_embed.proj.weight",
       "patch_embed.proj.bias": "transformer.patch_embed.proj.bias",
       "norm.weight": "transformer.norm.weight", "norm.bias": "transformer.norm.bias"}
# Within blocks.N: BEiT's name -> the official VLMo block's (the V-FFN takes BEiT's FFN).
BLOCK = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
         "attn.qkv.weight": "attn.qkv.weight", "attn.q_bias": "attn.q_bias",
         "attn.v_bias": "attn.v_bias", "attn.proj.weight": "attn.proj.weight",
         "attn.proj.bias": "attn.proj.bias", "gamma_1": "gamma_1", "gamma_2": "gamma_2",
         "norm2.weight": "norm2_imag.weight", "norm2.bias": "norm2_imag.bias",
         "mlp.fc1.weight": "mlp_imag.fc1.weight", "mlp.fc1.bias": "mlp_imag.fc1.bias",
         "mlp.fc2.weight": "mlp_imag.fc2.weight", "mlp.fc2.bias": "mlp_imag.fc2.bias"}
# Absent from a BEiT built without them: the value with the same function.
NEUTRAL = {"attn.q_bias": 0.0, "attn.v_bias": 0.0, "gamma_1": 1.0, "gamma_2": 1.0}
PER_LAYER_TABLE = "attn.relative_position_bias_table"
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def _grid(rows: int) -> int:
  """The patch grid of a BEiT relative position table of `rows` rows ((2 grid - 1)^2 + 3)."""
  side = int(round(np.sqrt(max(rows - 3, 0))))
  return (side + 1) // 2 if side * side == rows - 3 and side % 2 else -1


def check_architecture(beit: dict, arch: dict, model_name: str = "") -> None:
  """Raises ConversionError naming every way BEiT state dict `beit` differs from VLMo
  architecture `arch` (MODEL_CONFIGS fields; `model_name`: its --model name), each with its
  fix."""
  target = f"--model {model_name}" if model_name else "the target model"
  problems = []
  if "pos_embed" in beit:
    problems.append("it has absolute position embeddings (pos_embed), which VLMo's backbone "
                    "does not have (its image positions are the relative position bias only); "
                    "import a BEiT built with use_abs_pos_emb=False (timm's beit_* models)")
  width = beit["cls_token"].shape[-1] if "cls_token" in beit else None
  if width is not None and width != arch["width"]:
    problems.append(f"width {width}, {target} has {arch['width']}; pick the --model of "
                    "BEiT's size (base: vlmo_base_patch16, large: vlmo_large_patch16)")
  patch = beit.get("patch_embed.proj.weight")
  if patch is not None and (patch.ndim != 4 or patch.shape[1] != 3):
    problems.append(f"patch_embed.proj.weight has shape {tuple(patch.shape)}; VLMo embeds "
                    "RGB patches ([width, 3, patch, patch])")
  elif patch is not None and patch.shape[-1] != arch["patch_size"]:
    problems.append(f"{patch.shape[-1]}px patches, {target} has {arch['patch_size']}px; import "
                    f"a BEiT of {arch['patch_size']}px patches (e.g. beit_base_patch16_224)")
  blocks = {int(m.group(1)) for m in map(re.compile(r"^blocks\.(\d+)\.").match, beit) if m}
  if blocks and len(blocks) != arch["depth"]:
    problems.append(f"{len(blocks)} blocks, {target} has {arch['depth']}; pick the --model of "
                    "BEiT's depth")
  fc1 = beit.get("blocks.0.mlp.fc1.weight")
  if fc1 is not None and fc1.shape[0] != arch["mlp_dim"]:
    problems.append(f"MLP size {fc1.shape[0]}, {target} has {arch['mlp_dim']}")
  grid = arch["image_size"] // arch["patch_size"]
  for key, table in beit.items():
    if not key.endswith("relative_position_bias_table"):
      continue
    have = _grid(table.shape[0])
    if have != grid:
      size = f"a {have}x{have} patch grid" if have > 0 else f"{table.shape[0]} rows"
      problems.append(
          f"{key} is for {size} but {target} has a {grid}x{grid} grid "
          f"({arch['image_size']}px / {arch['patch_size']}px); the table is not resampled "
          f"here: import a BEiT trained at {arch['image_size']}px in {arch['patch_size']}px "
          "patches (e.g. beit_base_patch16_224 for vlmo_base_patch16)")
    elif table.shape[1] != arch["heads"]:
      problems.append(f"{key} has {table.shape[1]} heads, {target} has {arch['heads']}")
    break  # Every table of a model has the same shape; one report is enough.
  if problems:
    raise ConversionError(f"the BEiT does not fit {target}: " + "; ".join(problems))


def to_vlmo_state(beit: dict, template: dict, arch: dict,
                  model_name: str = "") -> tuple[dict, dict]:
  """BEiT state dict {key: array} -> an official VLMo state dict: `template` (the official
  state dict of the target model at its initialisation, `vlmo.to_vlmo`) with BEiT's values
  where they map (module docstring). Returns (state, report {mapped, dropped, initialised}):
  the BEiT keys used, the BEiT keys dropped, the VLMo keys left at their initialisation."""
  beit = {k: np.asarray(v, np.float32) for k, v in beit.items()}
  check_architecture(beit, arch, model_name)
  state, written = dict(template), set()
  dropped = sorted(k for k in beit if DROPPED.search(k))
  used, problems = set(dropped), []

  def put(official: str, value: np.ndarray, source: str) -> None:
    if official not in template:
      problems.append(f"{source} has no VLMo counterpart {official}")
    elif value.shape != template[official].shape:
      problems.append(f"{source} {tuple(value.shape)}: VLMo's {official} is "
                      f"{tuple(template[official].shape)}")
    else:
      state[official] = value
      written.add(official)

  for key, official in TOP.items():
    if key in beit:
      put(official, beit[key], key)
      used.add(key)
  for layer in range(arch["depth"]):
    for name, official in BLOCK.items():
      key, target = f"blocks.{layer}.{name}", f"transformer.blocks.{layer}.{official}"
      if key in beit:
        put(target, beit[key], key)
        used.add(key)
      elif name in NEUTRAL:
        put(target, np.full(template[target].shape, NEUTRAL[name], np.float32), key)
      else:
        problems.append(f"missing {key}")
  for key in ("cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"):
    if key not in beit:
      problems.append(f"missing {key}")

  # The relative position bias: VLMo's one table is [rows, depth * heads], layer N's heads in
  # columns N * heads ..; BEiT's image rows are numbered the same way (the official loader
  # copies them as they are), the text rows after them are VLMo's own.
  heads, grid = arch["heads"], arch["image_size"] // arch["patch_size"]
  image_rows, _ = relative_position_rows(grid, 0)
  shared = beit.get(SHARED_TABLE)
  used.add(SHARED_TABLE)
  table = template["relative_position_bias_table"].copy()
  for layer in range(arch["depth"]):
    key = f"blocks.{layer}.{PER_LAYER_TABLE}"
    used.add(key)
    bias = np.zeros((image_rows, heads), np.float32)
    for part in (beit.get(key), shared):
      if part is not None:
        bias = bias + part
    table[:image_rows, layer * heads:(layer + 1) * heads] = bias
  state["relative_position_bias_table"] = table
  written.add("relative_position_bias_table")
  # VLMo adds its image token type to every image token; zero keeps BEiT's image pass.
  types = state["token_type_embeddings.weight"].copy()
  types[1] = 0.0
  state["token_type_embeddings.weight"] = types

  problems += [f"unexpected {k} {tuple(beit[k].shape)} (a BEiT variant this importer does not "
               "map, e.g. timm's scale_mlp or swiglu_mlp)" for k in sorted(set(beit) - used)]
  if problems:
    raise ConversionError(f"{len(problems)} BEiT state-dict problem(s):\n  - "
                          + "\n  - ".join(problems[:20]))
  report = dict(mapped=sorted(set(beit) & used - set(dropped)), dropped=dropped,
                initialised=sorted(set(template) - written))
  return state, report


# The initialisation runs once: unoptimised code compiles several times faster, which
# outweighs its slower run up to VLMo-Base's size (about even there).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


_compiled_init = {}  # (model, config JSON) -> the executable: the last one only.


def initial_state(config, model, seed: int = 0) -> dict:
  """The official VLMo state dict of `model` (built from experiment `config`) at this
  model's initialisation from `seed`: the values BEiT does not give. A second import of the
  same architecture in one process does not compile again."""
  key = (model, config.to_json())
  if key not in _compiled_init:
    init = jax.jit(lambda rng: step_lib.init_params(config, model, rng))
    _compiled_init.clear()
    _compiled_init[key] = init.lower(jax.random.key(0)).compile(
        compiler_options=INIT_COMPILER_OPTIONS)
  fresh = _compiled_init[key](jax.random.key(seed))
  return vlmo.to_vlmo(vlmo.flatten(fresh), model)


def import_params(beit: dict, config, arch: dict, model_name: str = "",
                  seed: int = 0) -> tuple[dict, dict]:
  """BEiT state dict -> (our params tree for VLMo experiment `config` of architecture `arch`,
  the report of `to_vlmo_state`). What BEiT does not give is this model's initialisation from
  `seed`."""
  check_architecture(beit, arch, model_name)  # Before the initialisation: fail fast.
  template = initial_state(config, step_lib.build_model(config), seed)
  state, report = to_vlmo_state(beit, template, arch, model_name)
  return vlmo.import_params(state, config), report


def import_bundle(src: str, model: str | dict, out: str, vocab: str, dtype: str = "float32",
                  seed: int = 0, max_text_len: int = vlmo.TEXT["max_len"]) -> tuple[str, dict]:
  """BEiT checkpoint `src` -> a bundle at `out` of VLMo architecture `model` (a MODEL_CONFIGS
  name or a dict of its fields) with BERT's vocabulary `vocab` and `max_text_len` text
  positions. Returns (bundle, report)."""
  if isinstance(model, str) and model not in MODEL_CONFIGS:
    raise ConversionError(f"--model {model!r} is not one of {sorted(MODEL_CONFIGS)}")
  arch = MODEL_CONFIGS[model] if isinstance(model, str) else model
  state = vlmo.read_state_dict(src)
  tokenizer = WordPieceTokenizer.load(vocab)
  config = vlmo.experiment_config(arch, "", vocab_size=tokenizer.vocab_size,
                                  cls_id=tokenizer.bos_id, sep_id=tokenizer.eos_id,
                                  max_len=max_text_len)
  params, report = import_params(state, config, arch,
                                 model if isinstance(model, str) else "", seed)
  config.data.tokenizer = ""  # The bundle keeps its own copy (vocab.txt) beside config.json.
  path = bundle.write_bundle(out, params, config, tokenizer, source=fs.resolve(src),
                             dtype=dtype)
  return path, report


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m coca_jax.interop.beit",
                                   description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="BEiT checkpoint -> bundle of a VLMo model")
  imp.add_argument("--src", required=True,
                   help=".safetensors, or .pt/.pth (torch >= 2.6, weights-only) in timm's "
                        "Beit layout (BEiT's own checkpoints share it)")
  imp.add_argument("--model", required=True, choices=sorted(MODEL_CONFIGS))
  imp.add_argument("--vocab", required=True,
                   help="BERT's WordPiece vocabulary (bert-base-uncased's vocab.txt) for the "
                        "text side, which starts from its initialisation")
  imp.add_argument("--out", required=True, help="bundle directory to create")
  imp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  imp.add_argument("--max_text_len", type=int, default=vlmo.TEXT["max_len"],
                   help="text positions of the model (VLMo trains stage 2 with 196, stage 3 "
                        "with 40)")
  imp.add_argument("--seed", type=int, default=0,
                   help="initialisation of what BEiT does not give (text side, L-/VL-FFN, heads)")
  args = parser.parse_args(argv)
  with cli.usage_errors(parser.prog, also=(ConversionError, ImportError)):
    path, report = import_bundle(args.src, args.model, args.out, args.vocab, args.dtype,
                                 args.seed, args.max_text_len)
    print(f"{len(report['mapped'])} BEiT tensors mapped; dropped {report['dropped'] or 'none'}; "
          f"{len(report['initialised'])} VLMo tensors left at their initialisation",
          file=sys.stderr)
    print(path)


if __name__ == "__main__":
  main()
