"""VLMo-Base (Bao et al. 2022, "VLMo: Unified Vision-Language Pre-Training with
Mixture-of-Modality-Experts"): a MoME backbone of 12 layers, width 768, 12 heads, MLP 3072, with
the VL-FFN in the top 2 layers; 224px images in 16px patches (196 tokens); BERT's uncased
WordPiece vocabulary size (30,522); 40 text positions.

  python -m coca_jax.train --config experiments/vlmo_base.py --dry_run
  python -m coca_jax.train --config experiments/vlmo_base.py:stage=image --workdir W1
  python -m coca_jax.train --config experiments/vlmo_base.py:stage=text,init=W1 --workdir W2
  python -m coca_jax.train --config experiments/vlmo_base.py:stage=image_text,init=W2 --workdir W3
Each training command also takes the dataset, built with `python -m coca_jax.data.build`:
--config.data.name=NAME --config.data.data_dir=DIR.

Args (comma-separated after ':'):
  stage=S   image | text | image_text (default): VLMo's stagewise pretraining schedule, as
            parameter freezing (`optim.freeze_regex`):
              image       trains the shared attention, ffn_image and the image side; ffn_text,
                          ffn_fusion and the text side are frozen.
              text        the shared attention (and its LayerNorm) and ffn_image are frozen
                          (VLMo's stage 2); ffn_text and the text side train.
              image_text  everything trains, with image-text matching on hard negatives.
  init=DIR  start from the parameters of a previous stage's workdir or checkpoint step
            directory (`config.init.source`; the optimizer starts fresh).
  batch=N, steps=N, runlocal  as in experiments/coca_base.py.

Parameters: --dry_run reports 176.6M total (VLMo's paper: 175M; +0.9%). Where they are: 12
layers of shared attention (2.36M each) + V-FFN and L-FFN (4.72M each) = 141.7M; VL-FFN in the
top 2 layers, 9.4M; the word embedding, 23.4M, shared with the vocab head (`tie_embeddings`,
like VLMo's MLM head; an untied head would add another 23.4M); patch embedding 0.6M; positions
and [CLS] 0.18M: 175.4M, the paper's count (backbone and embeddings); plus the two contrastive
projections (1.2M) and the ITM head. Active per token (one expert per layer): 110.5M.
What is modelled and what is not: the MoME layer (shared attention, per-modality FFN experts,
VL-FFN on top), the image [CLS] token as the contrastive image embedding (`pooling='cls'`),
contrastive learning, ITM with global hard negatives, and the stage schedule. NOT modelled:
VLMo's layer-scale (init 0.1; 2 x 768 parameters a layer), its relative position bias in the
image self-attention (732 x 12 a layer; learned absolute positions instead), the query/value-only
biases of its attention (ours also have a key bias), its ITC/ITM poolers' extra dense layers
and its masked-language-model objective (captioning, i.e. prefix-causal next-token prediction
on the fused stack, takes its place). Stages 1 and 2 of VLMo train with masked image modelling
on images alone and masked language modelling on text alone; here every stage trains on
image-text pairs with this framework's losses, so only the freezing schedule is VLMo's.
Optimizer (VLMo's stage 3): AdamW, peak lr 2e-4, weight decay 0.01, b2 0.98, 2.5% warmup
then linear decay; batch 1024.
"""

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "coca_base", os.path.join(os.path.dirname(os.path.abspath(__file__)), "coca_base.py"))
_coca_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_coca_base)

STAGES = ("image", "text", "image_text")
TEXT_SIDE = [r"(^|/)ffn_text/", r"(^|/)ffn_fusion/", r"^token_embed/", r"^text_pos_embed$",
             r"^cls_token$", r"^ln_text/", r"^text_projection/", r"^ln_fused/", r"^vocab_head/"]
SHARED_AND_IMAGE = [r"/attention/", r"/ln_attention/", r"(^|/)ffn_image/"]


def _parse(arg: str) -> dict:
  known = {"stage", "init", "batch", "steps", "runlocal"}
  parsed = {}
  for item in filter(None, arg.split(",")):
    key, _, value = item.partition("=")
    if key not in known:
      raise ValueError(f"experiments/vlmo_base.py: unknown arg {key!r}; known: {sorted(known)}")
    parsed[key] = value if value else True
  if parsed.get("stage", "image_text") not in STAGES:
    raise ValueError(f"experiments/vlmo_base.py: stage={parsed['stage']!r}; use one of {STAGES}")
  return parsed


def mome_config(width, depth, heads, mlp_dim, fusion_layers, arg: str = "", **model_fields):
  """A MoME experiment with this file's recipe; `model_fields` override config.model fields."""
  args = _parse(arg)
  stage = args.get("stage", "image_text")
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      backbone="mome", image_size=224, patch_size=16, embed_dim=768, pooler_heads=heads,
      pooling="cls",
      dtype="bfloat16", temperature_init=0.07, max_logit_scale=100.0, tie_embeddings=True,
      text=dict(vocab_size=30_522, max_len=40),
      mome=dict(depth=depth, width=width, heads=heads, mlp_dim=mlp_dim,
                fusion_layers=fusion_layers)))
  c.model.update(model_fields)
  c.data = ml_collections.ConfigDict(dict(
      name="", train_split="train", eval_split="test", image_size=c.model.image_size,
      tokenizer_vocab=c.model.text.vocab_size))
  c.train = ml_collections.ConfigDict(dict(
      steps=int(args.get("steps", 200_000)), batch_size=int(args.get("batch", 1024)), seed=0,
      log_every=100, microbatches=1))
  c.loss = ml_collections.ConfigDict(dict(
      contrastive_weight=1.0, caption_weight=1.0, label_smoothing=0.0, contrastive="softmax",
      contrastive_impl="gathered", itm_weight=1.0 if stage == "image_text" else 0.0,
      itm_examples=0))
  freeze = {"image": TEXT_SIDE, "text": SHARED_AND_IMAGE, "image_text": []}[stage]
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=2e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
      warmup_fraction=0.025, decay="linear", end_lr_fraction=0.0, clip_norm=0.0,
      freeze_regex=list(freeze)))
  c.init = ml_collections.ConfigDict(dict(source=args.get("init", "")))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=5_000, keep=3, async_save=True))
  # As the CoCa paper configs (experiments/coca_base.py EVALS): retrieval and captioning on the
  # eval split of config.data.name, zero-shot on a labelled dataset you name.
  c.evals = ml_collections.ConfigDict(_coca_base.EVALS)
  if args.get("runlocal"):
    c.train.update(steps=10, log_every=1)
    if "batch" not in args:
      c.train.batch_size = 8
    c.checkpoint.update(every_steps=0)
    _coca_base.shrink_evals(c.evals)
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return mome_config(width=768, depth=12, heads=12, mlp_dim=3072, fusion_layers=2, arg=arg)
