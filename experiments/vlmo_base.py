"""VLMo-Base (Bao et al. 2022, "VLMo: Unified Vision-Language Pre-Training with
Mixture-of-Modality-Experts") as the official code builds it (microsoft/unilm, vlmo/:
`vlmo_base_patch16` and vlmo/config.py): a MoME of 12 layers, width 768, 12 heads, MLP 3072,
the VL-FFN in the top 2 layers (vlffn_start_layer_index 10); 224px images in 16px patches (196
patches + [CLS]); BERT's uncased WordPiece vocabulary (30,522) and its text encoder
(bidirectional, [CLS] first, token types); 40 text positions. The architecture options
(config.model.mome: text_encoder='bert', token_types, layer_scale 0.1, relative_position,
key_bias False, shared_final_norm, itm_pooler, drop_path_rate 0.1, activation 'gelu',
vl_contrastive, mlm_head) come from `coca_jax.interop.vlmo.model_group`; with them the model's
outputs equal the official module's (tests/test_vlmo.py, docs/vlmo.md) and VLMo's checkpoints
load (`python -m coca_jax.interop.vlmo import`).

  python -m coca_jax.interop.beit import --src BEIT_FILE --out W1          # stage 1
  python -m coca_jax.data.build --format text --src 'corpus/*.txt' --name wiki_books \
      --data_dir ~/tfds
  python -m coca_jax.train --config experiments/vlmo_base.py:stage=2,init=W1,vocab=VOCAB \
      --config.data.name=wiki_books --config.data.data_dir=~/tfds --workdir W2
  python -m coca_jax.train --config experiments/vlmo_base.py:stage=3,init=W2,vocab=VOCAB \
      --config.data.name=NAME --config.data.data_dir=DIR --workdir W3
  python -m coca_jax.train --config experiments/vlmo_base.py:vocab=VOCAB --dry_run
VOCAB is bert-base-uncased's vocab.txt (config.data.tokenizer; tokenizer_kind 'wordpiece').
Stage 3's dataset is an image-caption one built with `python -m coca_jax.data.build`.

Args (comma-separated after ':'):
  stage=S   VLMo's stagewise pretraining (vlmo/config.py, run.py):
              1  BEiT's masked image modelling. VLMo does not train it: it starts from BEiT's
                 weights, which `coca_jax.interop.beit import` brings in; get_config refuses
                 stage=1 and names that command.
              2  text-only MLM (task_textmlm_base): config.data.text_only, texts of 196 tokens,
                 no VL-FFN (fusion_layers 0), no ITC or ITM; every parameter frozen
                 (`optim.freeze_regex` = STAGE2_FROZEN: no update, no optimizer state) except
                 those run.py trains: the text embeddings (word, position, type, LayerNorm), the
                 modality type embeddings, each layer's L-FFN and its LayerNorm, the MLM head,
                 the relative position table and the final norm.
              3  (default) image-text ITC + ITM + MLM (task_mlm_itm_itc_base), everything
                 trains: loss = 0.5 x ITC + 0.5 x ITC on the VL-FFN features (each the mean of
                 i2t and t2i, its own scale) + ITM on global hard negatives + 0.25 x MLM on the
                 fused pass (vlmo/objectives.py). From stage 2: the VL-FFN starts fresh and
                 the 196 text positions are cut to 40, as VLMo does.
  init=DIR  start from the parameters of a previous stage's workdir, checkpoint step or bundle
            (`config.init.source`; the optimizer starts fresh).
  vocab=F   BERT's WordPiece vocabulary file (config.data.tokenizer).
  batch=N, steps=N, runlocal  as in experiments/coca_base.py.

Parameters (stage 3): 202,445,470, exactly the official module's with ITC + ITM + MLM
(tests/test_vlmo.py). The paper's 175M counts the backbone and embeddings; the official module
adds an untied MLM decoder (23.4M: VLMo does not tie it to the word embeddings), the
second pair of ITC projections, the pooler, and BERT's text position table, which VLMo keeps but
never adds (its positions are the relative position bias).

Where this config still differs from the paper's and the official code's training (point by
point; docs/vlmo.md):
  - MLM masking: BERT's token-level 80/10/10 masking at VLMo's rate 0.15, drawn in the step
    from its rng; VLMo's stage 2 and 3 configs mask whole words (transformers'
    DataCollatorForWholeWordMask), which needs the WordPiece continuation marks the step does
    not see.
  - Stage 1 is imported (BEiT), not trained here. BEiT's masked image modelling exists
    (config.loss.mim_weight; experiments/demo.py:vlmo,stage=1 trains it), but its codes are a
    k-means stand-in for BEiT's dVAE tokens, and it has not been run at this scale.
  - Stage 2 data: VLMo trains on English Wikipedia + BookCorpus; give your corpus with
    `data.build --format text`. Stage 2's model holds the ITC projections and the pooler
    (frozen, no optimizer state), which VLMo's stage-2 module does not build.
  - Stochastic depth: one draw per example per residual branch; in the fused pass's bottom
    layers VLMo draws the text and the image halves separately.
  - Data: VLMo's RandAugment and its [-1, 1] pixel normalisation (mean = std = 0.5) are not
    this pipeline's (CLIP's mean/std, random resized crop).
  - Optimizer: AdamW, peak lr 2e-4, weight decay 0.01, b2 0.98, 10% warmup (vlmo/config.py's
    warmup_steps=0.1) then linear decay; batch 1024; VLMo trains in fp16 with its
    LayerNorm/bias/position parameters exempt from weight decay (this project's
    `no_decay_regex` default covers biases and norms).
"""

from coca_jax.core import recipes
from coca_jax.core.config_args import parse_arg
from coca_jax.interop import vlmo

WHERE = "experiments/vlmo_base.py"
STAGES = ("1", "2", "3")
# The shared recipe: coca_jax/core/recipes.py (`mome`; experiments/mome_coca_base.py uses it too).

# Stage 2 (vlmo/run.py with textmlm): every parameter frozen except the text side run.py trains
# (recipes.VLMO_STAGE2_FROZEN; experiments/demo.py:vlmo freezes the same).
STAGE2_FROZEN = recipes.VLMO_STAGE2_FROZEN


def get_config(arg: str = ""):
  args = parse_arg(arg, WHERE, **dict(recipes.MOME_ARGS, stage="3"), vocab="")
  if args.stage not in STAGES:
    raise ValueError(f"{WHERE}: stage={args.stage!r}; use one of {', '.join(STAGES)} (VLMo's "
                     "stagewise pretraining; the file's docstring describes each)")
  if args.stage == "1":
    raise ValueError(
        f"{WHERE}: stage=1 is BEiT's masked image modelling, which VLMo does not train itself: "
        "it starts from BEiT's weights. Import them (python -m coca_jax.interop.beit import "
        "--src BEIT_FILE --out W1), then train stage=2,init=W1")
  # The recipe's own `stage` names its freezing; the stages here set theirs below.
  recipe_arg = ",".join(part for part in arg.split(",") if not part.strip().startswith("stage="))
  c = recipes.mome(width=768, depth=12, heads=12, mlp_dim=3072, fusion_layers=2,
                   arg=recipe_arg, where=WHERE, extra_args=dict(vocab=""))
  c.data.update(tokenizer_kind="wordpiece", tokenizer=args.vocab)
  c.optim.update(warmup_fraction=0.1, freeze_regex=[])
  c.evals.captioning.enabled = False  # No captioner; retrieval and zero-shot evaluate it.
  if args.stage == "2":
    # vlmo/config.py task_textmlm_base: text-only MLM on 196-token texts, the VL-FFN absent
    # (multiway_transformer sets vlffn_start_layer_index = depth), no ITC or ITM heads.
    c.model = vlmo.model_group("vlmo_base_patch16", dtype="bfloat16", vl_contrastive=False,
                               max_len=196)
    c.model.mome.fusion_layers = 0
    c.loss.update(contrastive_weight=0.0, caption_weight=0.0, itm_weight=0.0, mlm_weight=1.0)
    c.data.text_only = True  # A text corpus (data.build --format text) or a dataset's captions.
    c.optim.freeze_regex = list(STAGE2_FROZEN)
    c.evals.update(every_steps=0)  # Text only: no image-text evals.
    c.evals.retrieval.enabled = False
    c.evals.zeroshot.enabled = False
  else:
    # vlmo/config.py task_mlm_itm_itc_base: ITC (both pairs, each the mean of i2t and t2i,
    # averaged), ITM on global hard negatives, 0.25 x MLM on the fused pass; nothing frozen.
    c.model = vlmo.model_group("vlmo_base_patch16", dtype="bfloat16")
    c.loss.update(contrastive_weight=0.5, vl_contrastive_weight=0.5, caption_weight=0.0,
                  contrastive_reduction="mean", itm_weight=1.0, mlm_weight=0.25)
  return c
