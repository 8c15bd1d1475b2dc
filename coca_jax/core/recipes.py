"""Recipes several experiment files build on, importable by any config file (yours too):

  from coca_jax.core import recipes
  def get_config(arg=""):
    c = recipes.coca_paper("large", arg)        # experiments/coca_large.py
    c.train.steps = 100_000
    return c

`coca_paper(size, arg)`: the CoCa paper's model sizes (Table 1) and pretraining recipe
(experiments/coca_base.py documents its args); `mome(..., arg)`: the VLMo-style MoME recipe
(experiments/vlmo_base.py documents its args). Both parse their `:args` with
`config_args.parse_arg`, so an unknown arg names the file and the known ones.
"""

from __future__ import annotations

import ml_collections

from coca_jax.core.config_args import given, parse_arg

# Table 1 of the CoCa paper: (vision width, depth, mlp; text width, n_uni, n_multi, mlp; heads).
PAPER_SIZES = {
    "base": dict(vision=dict(width=768, depth=12, heads=12, mlp_dim=3072),
                 text=dict(width=768, heads=12, mlp_dim=3072, n_uni=12, n_multi=12),
                 embed_dim=768, pooler_heads=12),
    "large": dict(vision=dict(width=1024, depth=24, heads=16, mlp_dim=4096),
                  text=dict(width=1024, heads=16, mlp_dim=4096, n_uni=12, n_multi=12),
                  embed_dim=1024, pooler_heads=16),
    "2b": dict(vision=dict(width=1408, depth=40, heads=16, mlp_dim=6144),
               text=dict(width=1408, heads=16, mlp_dim=5632, n_uni=18, n_multi=18),
               embed_dim=1408, pooler_heads=16, tie_embeddings=True),
}
PAPER_PARAMS = {"base": 383e6, "large": 787e6, "2b": 2.1e9}
PAPER_FILES = {"base": "experiments/coca_base.py", "large": "experiments/coca_large.py",
               "2b": "experiments/coca_2b.py"}
VOCAB_SIZE = 64_000
# Evals every 10k steps and at the end (coca_jax/evaluation/evaluators.py): image-text retrieval
# and greedy captioning on the eval split of config.data.name, and zero-shot classification
# once you name a labelled dataset (the `imagenet` arg, or any prepared TFDS dataset: its
# ClassLabel names are the class names unless a file gives them, one per line in label order),
# e.g.
#   --config.evals.zeroshot.dataset=cifar100 --config.evals.zeroshot.split=test \
#   --config.evals.zeroshot.data_dir=~/tensorflow_datasets
#   [--config.evals.zeroshot.class_names_file=names.txt]
# Any group is switched off with --config.evals.<group>.enabled=False.
EVALS = dict(
    every_steps=10_000, batch_size=256,
    zeroshot=dict(dataset="", split="", examples=50_000, class_names=[],
                  templates=["a photo of a {}.", "a picture of a {}.", "an image of a {}."]),
    retrieval=dict(split="test", examples=5_000),
    captioning=dict(split="test", examples=5_000, batch_size=256, method="greedy"))

# Zero-shot ImageNet-1k (the CoCa paper's 86.3%, open_clip coca_ViT-L-14's 75.6%): the 50,000
# validation images of TFDS's imagenet2012, whose label names are WordNet ids, so the names and
# prompts are open_clip's (read from an installed open_clip_torch; never copied here).
IMAGENET_ZEROSHOT = dict(dataset="imagenet2012", split="validation", examples=0,
                         class_names_file="open_clip:imagenet", templates_file="open_clip:imagenet")


def pretraining_layout(c: ml_collections.ConfigDict) -> None:
  """Sets what every pretraining recipe shares: parameters and optimizer state fully sharded
  across every chip, the batch over the same chips (config.mesh); a checkpoint every 5,000
  steps, the newest 3 kept, saved in the background (config.checkpoint)."""
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=5_000, keep=3, async_save=True))


def vlmo_optim(warmup_fraction: float, freeze_regex=()) -> ml_collections.ConfigDict:
  """VLMo's AdamW recipe (peak 2e-4, betas 0.9/0.98, weight decay 0.01, linear decay to 0) with
  the stage's warmup share and frozen parameters."""
  return ml_collections.ConfigDict(dict(
      name="adamw", lr=2e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
      warmup_fraction=warmup_fraction, decay="linear", end_lr_fraction=0.0, clip_norm=0.0,
      freeze_regex=list(freeze_regex)))


# The paper's pretraining mixture (arXiv 2205.01917, sec. 4.1): JFT-3B with its label names as
# the texts, and ALIGN's noisy alt-texts, "about 5 epochs of JFT and 10 of ALIGN" over 500k steps
# at batch 65,536 (32.8B examples seen). With JFT-3B's ~3.0B images and ALIGN's ~1.8B pairs that
# is 5 x 3.0B = 15B labelled and 10 x 1.8B = 18B alt-text examples (33B: the 32.8B seen, to 1%),
# so each global batch is 15:18 = 5:6 labels to alt-texts (~45% / ~55%). The weights derive from
# those counts; the paper does not state a per-batch ratio.
PAPER_MIXTURE_WEIGHTS = {"labels": 5.0, "alt_text": 6.0}
# Labels as text: the paper pairs each JFT image with its label names (a "a photo of" style
# prefix, issue 26); a multi-label image joins its names.
PAPER_LABEL_TEMPLATES = ["a photo of a {}."]


def paper_mixture(spec: str, where: str, label_names: str = "") -> list[dict]:
  """config.data.sources of `mixture=labels:NAME+alt_text:NAME` (either part alone too): each
  NAME a prepared TFDS dataset read from its "train" split, weighted as PAPER_MIXTURE_WEIGHTS.
  `label_names`: the labels' class names file (one per line, or "open_clip:imagenet"); "" = the
  label feature's ClassLabel names."""
  sources = []
  for part in filter(None, (p.strip() for p in spec.split("+"))):
    kind, _, name = part.partition(":")
    if kind not in PAPER_MIXTURE_WEIGHTS or not name:
      raise ValueError(f"{where}: mixture part {part!r} must be labels:NAME or alt_text:NAME "
                       "(NAME a prepared TFDS dataset), e.g. "
                       "mixture=labels:imagenet21k+alt_text:my_alt_text")
    if any(s["tag"] == kind for s in sources):
      raise ValueError(f"{where}: mixture={spec!r} names {kind} twice")
    source = dict(name=name, tag=kind, weight=PAPER_MIXTURE_WEIGHTS[kind], split="train")
    if kind == "labels":
      source.update(text="labels", templates=list(PAPER_LABEL_TEMPLATES),
                    class_names_file=label_names)
    sources.append(source)
  return sources


def coca_paper(size: str, arg: str = "") -> ml_collections.ConfigDict:
  """The paper's recipe at `size` in PAPER_SIZES; `arg` as in experiments/coca_base.py."""
  args = parse_arg(arg, PAPER_FILES[size], batch=65_536, steps=500_000, dtype="bfloat16",
                   remat="dots", runlocal=False, b32=False, imagenet=None, mixture="",
                   label_names="")
  named = given(arg)
  s = PAPER_SIZES[size]
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      image_size=288, patch_size=18, embed_dim=s["embed_dim"], pooling="cascade",
      n_gen_queries=256, pooler_heads=s["pooler_heads"], dtype=args.dtype,
      remat=args.remat, scan_layers=True, temperature_init=0.07,
      max_logit_scale=100.0, tie_embeddings=s.get("tie_embeddings", False),
      vision=dict(s["vision"]),
      text=dict(vocab_size=VOCAB_SIZE, max_len=64, **s["text"]),
  ))
  # Your image-text data, built by `python -m coca_jax.data.build` (--config.data.name=NAME
  # --config.data.data_dir=DIR); a SentencePiece tokenizer of VOCAB_SIZE pieces is trained on
  # its train captions unless --config.data.tokenizer names one.
  c.data = ml_collections.ConfigDict(dict(
      name="", train_split="train", eval_split="test", image_size=288,
      tokenizer_vocab=VOCAB_SIZE))
  if args.mixture:
    c.data.sources = paper_mixture(args.mixture, PAPER_FILES[size], args.label_names)
    # The alt-text set is the run's own dataset: its captions train the tokenizer, its "test"
    # split is the retrieval and captioning eval.
    c.data.name = next((s["name"] for s in c.data.sources if s["tag"] == "alt_text"), "")
  c.train = ml_collections.ConfigDict(dict(
      steps=args.steps, batch_size=args.batch, seed=0,
      log_every=100, microbatches=1, nonfinite="halt", max_consecutive_skips=10))
  c.loss = ml_collections.ConfigDict(dict(
      contrastive_weight=1.0, caption_weight=2.0, label_smoothing=0.0, contrastive="softmax",
      contrastive_reduction="sum",  # i2t + t2i, the paper's eq. 1.
      contrastive_impl="chunked"))  # Memory-bounded logits: the [B, B] matrix never exists whole.
  c.optim = ml_collections.ConfigDict(dict(
      name="adafactor", lr=8e-4, b1=0.9, b2=0.999, eps=1e-30, weight_decay=0.01,
      warmup_fraction=0.02, decay="linear", end_lr_fraction=0.0, clip_norm=0.0,
      freeze_regex=[]))
  pretraining_layout(c)
  c.evals = ml_collections.ConfigDict(EVALS)
  if args.imagenet:
    data_dir = args.imagenet if isinstance(args.imagenet, str) else ""
    c.evals.zeroshot.update(IMAGENET_ZEROSHOT, data_dir=data_dir)
  if args.b32:
    c.model.update(image_size=224, patch_size=32, embed_dim=512, pooling="open_clip",
                   n_gen_queries=256, pooler_heads=8,
                   dtype=args.dtype if "dtype" in named else "float32",
                   remat=args.remat if "remat" in named else "none", tie_embeddings=False,
                   # 12 layers compile in ~30 s unscanned, and the CPU step is faster without
                   # the scan's stacking of per-layer activations.
                   scan_layers=False)
    c.model.vision.update(width=768, depth=12, heads=12, mlp_dim=3072)
    c.model.text.update(vocab_size=49_408, max_len=76, width=512, heads=8, mlp_dim=2048,
                        n_uni=12, n_multi=12)
    c.data.update(image_size=224, tokenizer_vocab=49_408)
    c.loss.contrastive_impl = "gathered"
    c.mesh.update(data=-1, fsdp=1)
    if "batch" not in named:
      c.train.batch_size = 16
  if args.runlocal:
    c.train.update(steps=10, log_every=1)
    if "batch" not in named:
      c.train.batch_size = 8
    c.checkpoint.update(every_steps=0)
    shrink_evals(c.evals)
  return c


def shrink_evals(evals: ml_collections.ConfigDict) -> None:
  """runlocal: the evals only at the end, on a few examples."""
  evals.every_steps = 0
  evals.zeroshot.examples = evals.retrieval.examples = 64
  evals.captioning.update(examples=8, batch_size=8)


# VLMo's stagewise pretraining as parameter freezing (`optim.freeze_regex`).
MOME_STAGES = ("image", "text", "image_text")
# MoME-CoCa's text side (causal text) and VLMo's (BERT text, `interop.vlmo.model_group`).
TEXT_SIDE = [r"(^|/)ffn_text/", r"(^|/)ffn_fusion/", r"^token_embed/", r"^text_pos_embed$",
             r"^cls_token$", r"^ln_text/", r"^text_projection/", r"^ln_fused/", r"^vocab_head/",
             r"^text_type_embed$", r"^ln_text_embed/", r"^text_vl_projection/", r"^mlm/"]
SHARED_AND_IMAGE = [r"/attention/", r"/ln_attention/", r"(^|/)ffn_image/"]


# VLMo's stage 1 trained here (experiments/demo.py:vlmo,stage=1: BEiT's masked image modelling):
# everything frozen but what a BEiT has (the patch embedding, the image [CLS] and [MASK], the
# shared attention and its norms, the layer scales, the V-FFNs, the relative position table,
# the final norm) and the MIM head. The token type embedding stays too: BEiT has none (the BEiT
# importer zeroes VLMo's image type; stage 2 trains it).
VLMO_STAGE1_FROZEN = [r"^token_embed/", r"^text_(pos|type)_embed$", r"^ln_text_embed/",
                      r"^token_type_embed$", r"/ffn_text/", r"/ffn_fusion/",
                      r"^(image|text)(_vl)?_projection/", r"^logit_(vl_)?scale$", r"^logit_bias$",
                      r"^itm_pooler/", r"^itm_head/", r"^mlm/"]

# VLMo's stage 2 (vlmo/run.py with textmlm): every parameter is frozen except those whose
# official name holds text_embeddings, token_type_embeddings, mlp_text, norm2_text, mlm_score,
# relative_position_bias_table or transformer.norm. In our names (interop/vlmo.py's table) the
# frozen ones are these (tests/test_vlmo_objectives.py checks the list against run.py's).
VLMO_STAGE2_FROZEN = [r"^patch_embed/", r"^image_cls_token$", r"^image_pos_embed$",
                      r"/ln_attention/", r"/attention/", r"/layer_scale_(attention|ffn)$",
                      r"/ffn_image/", r"/ffn_fusion/", r"^(image|text)(_vl)?_projection/",
                      r"^logit_(vl_)?scale$", r"^logit_bias$", r"^itm_pooler/", r"^itm_head/"]


# The args of `mome` (experiments/vlmo_base.py documents them) and their defaults.
MOME_ARGS = dict(stage="image_text", init="", batch=1024, steps=200_000, runlocal=False)


def mome(width, depth, heads, mlp_dim, fusion_layers, arg: str = "",
         where: str = "experiments/vlmo_base.py", extra_args: dict | None = None,
         **model_fields) -> ml_collections.ConfigDict:
  """A MoME experiment with VLMo's recipe (experiments/vlmo_base.py documents `arg`);
  `model_fields` override config.model fields. `extra_args`: more known args (name: default)
  that the calling file reads itself (`parse_arg(arg, where, **MOME_ARGS, **extra_args)`)."""
  args = parse_arg(arg, where, **MOME_ARGS, **(extra_args or {}))
  if args.stage not in MOME_STAGES:
    raise ValueError(f"{where}: stage={args.stage!r}; use one of {MOME_STAGES}")
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
      steps=args.steps, batch_size=args.batch, seed=0, log_every=100, microbatches=1))
  c.loss = ml_collections.ConfigDict(dict(
      contrastive_weight=1.0, caption_weight=1.0, label_smoothing=0.0, contrastive="softmax",
      contrastive_impl="gathered", itm_weight=1.0 if args.stage == "image_text" else 0.0,
      itm_examples=0))
  freeze = {"image": TEXT_SIDE, "text": SHARED_AND_IMAGE, "image_text": []}[args.stage]
  c.optim = vlmo_optim(warmup_fraction=0.025, freeze_regex=freeze)
  c.init = ml_collections.ConfigDict(dict(source=args.init))
  pretraining_layout(c)
  # As the CoCa paper configs (EVALS): retrieval and captioning on the eval split of
  # config.data.name, zero-shot on a labelled dataset you name.
  c.evals = ml_collections.ConfigDict(EVALS)
  if args.runlocal:
    c.train.update(steps=10, log_every=1)
    if "batch" not in given(arg):
      c.train.batch_size = 8
    c.checkpoint.update(every_steps=0)
    shrink_evals(c.evals)
  return c


def finetune(c: ml_collections.ConfigDict, *, source: str, steps: int, batch: int, lr: float,
             eval_every: int, runlocal: bool) -> ml_collections.ConfigDict:
  """Adds an AdamW fine-tuning recipe (train, optim, mesh, checkpoint, evals: retrieval and
  greedy captioning on the "test" split, init from `source`) to `c`, which holds the model, data
  and loss groups; `runlocal`: 10 steps of batch 8, small evals. Shared by
  experiments/finetune_captions.py and experiments/openclip_coca.py."""
  c.train = ml_collections.ConfigDict(dict(steps=steps, batch_size=batch, seed=0, log_every=50,
                                           microbatches=1))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=lr, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, warmup_fraction=0.05,
      decay="cosine", end_lr_fraction=0.0, clip_norm=1.0, freeze_regex=[]))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2, async_save=True))
  c.evals = ml_collections.ConfigDict(dict(
      every_steps=eval_every, batch_size=64,
      retrieval=dict(split="test", examples=1_000),
      captioning=dict(enabled=True, split="test", examples=500, batch_size=64, method="greedy")))
  c.init = ml_collections.ConfigDict(dict(source=source, include_regex="", exclude_regex="",
                                          reinit_regex=""))
  if runlocal:
    c.train.update(steps=10, batch_size=8, log_every=1)
    c.checkpoint.every_steps = 0
    c.evals.every_steps = 0
    c.evals.retrieval.examples = 64
    c.evals.captioning.update(examples=8, batch_size=8)
  return c
