"""The config schema, declared once: nested frozen dataclasses that mirror the config tree.

`config.model.vision.width` is `CoCa.vision.width` here, `config.model.mome.experts.text` is
`MoME.mome.experts.text` (a `Routing`), `config.train.nonfinite` is `Train.nonfinite`, and so on.
Everything else is derived from these declarations:
  * `core.config.defaults(backbone)`: each field's default (`defaults_of`; a field with no
    default is REQUIRED: the experiment must set it);
  * validation of every enumeration (a `Literal` field) and scalar type (`problems_of`);
  * the hashable settings the model code takes: `build(CoCa, config.model)` (the models read
    `cfg.text.width`, `cfg.mome.experts.image.top_k`, ...).
Adding a field is one line in its dataclass: `name: type = default`.

This module imports nothing of ours but core, so every layer can use it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Literal

from coca_jax.core import tokens

Backbone = Literal["towers", "mome"]
Dtype = Literal["float32", "bfloat16"]
# Activation rematerialisation policies (models/backbone.py maps each name to a JAX policy).
Remat = Literal["none", "full", "dots", "minimal", "dots_attention"]
# The MLP non-linearity (models/layers.py maps each name to a function).
Activation = Literal["gelu_tanh", "gelu", "quick_gelu"]
Contrastive = Literal["softmax", "sigmoid"]
ContrastiveImpl = Literal["gathered", "chunked"]
# How the softmax loss combines its image->text and text->image terms: 'sum' is the CoCa paper's
# eq. 1 (so with loss weights 1:2 the contrastive term has the paper's weight); 'mean' halves it,
# the CLIP / open_clip convention (their configs set it).
ContrastiveReduction = Literal["sum", "mean"]
TowersPooling = Literal["cascade", "parallel", "open_clip"]
MoMEPooling = Literal["attention", "cls"]
DecodingMethod = Literal["greedy", "beam", "sample"]
RoutingPriority = Literal["batch", "position"]  # Non-causal tokens (models/experts.py).
Nonfinite = Literal["halt", "skip"]
TokenizerKind = Literal["sentencepiece", "clip_bpe", "wordpiece"]
# A MoME's text pass: 'causal' (MoME-CoCa: CLS at the end, captioning) or 'bert' (VLMo's BERT
# text encoder; models/mome.py).
TextEncoder = Literal["causal", "bert"]
OptimizerName = Literal["adamw", "adafactor"]
DecayName = Literal["cosine", "linear", "constant"]


def allowed(literal) -> tuple:
  """The allowed values of a Literal alias, e.g. allowed(Contrastive) == ("softmax", "sigmoid")."""
  return typing.get_args(literal)


BACKBONES = allowed(Backbone)
REMAT_NAMES = allowed(Remat)
ACTIVATION_NAMES = allowed(Activation)
CONTRASTIVE_KINDS = allowed(Contrastive)
CONTRASTIVE_IMPLS = allowed(ContrastiveImpl)
CONTRASTIVE_REDUCTIONS = allowed(ContrastiveReduction)
TOWERS_POOLINGS = allowed(TowersPooling)
MOME_POOLINGS = allowed(MoMEPooling)
DECODING_METHODS = allowed(DecodingMethod)
NONFINITE_POLICIES = allowed(Nonfinite)
TOKENIZER_KINDS = allowed(TokenizerKind)

_frozen = dataclasses.dataclass(frozen=True, kw_only=True)
_group = lambda cls: dataclasses.field(default_factory=cls)  # A nested group's default.

# Default of the weight decay exclusion: biases, norms, embeddings, poolers' queries, the
# contrastive scale and bias (the usual "no decay on 1-D and embedding parameters").
DEFAULT_NO_DECAY = (r"(^|/)(bias|scale|ln_[^/]*|[^/]*pos_embed|token_embed|cls_token|queries|"
                    r"logit_scale|logit_bias)(/|$)")


# -- Model -------------------------------------------------------------------------------------


@_frozen
class Routing:
  """Learned routing of one feed-forward stack (`config.model.<side>.experts`; MoME:
  `config.model.mome.experts.<image|text|fusion>`).

  num_experts: experts per routed feed-forward (1 = every layer dense).
  top_k: experts each token runs through.
  capacity_factor: each expert takes ceil(top_k * tokens * capacity_factor / num_experts)
    tokens of a routing group (a sequence for causal text, `group_size` examples for image
    tokens); the rest skip it.
  every: layer i (0-based, counted over the side's whole stack) is routed when
    (i + 1) % every == 0: 1 = every layer, 2 = layers 1, 3, 5, ... (V-MoE's "every other").
  priority: non-causal tokens: 'batch' (Batch Priority Routing) or 'position' (see
    models/experts.py). Causal text always routes by position.
  group_size: examples per BPR group (0 = the whole batch of the call); a batch it does not
    divide routes in groups of gcd(group_size, batch).
  noise_std: std of the Gaussian noise on the router logits in training (0 = none).
  """
  num_experts: int = 1
  top_k: int = 1
  capacity_factor: float = 1.0
  every: int = 1
  priority: RoutingPriority = "batch"
  group_size: int = 0
  noise_std: float = 0.0

  @property
  def enabled(self) -> bool:
    return self.num_experts > 1

  def routed(self, layer: int) -> bool:
    return self.num_experts > 1 and (layer + 1) % self.every == 0

  def ffn_kwargs(self, layer: int) -> dict:
    """`experts.FeedForward` settings of layer `layer`: routed, or {} (dense)."""
    if not self.routed(layer):
      return {}
    return dict(num_experts=self.num_experts, routing="topk", top_k=self.top_k,
                capacity_factor=self.capacity_factor, priority=self.priority,
                group_size=self.group_size, noise_std=self.noise_std)


@_frozen
class _Model:
  """Fields every backbone shares (config.model.*)."""
  backbone: Backbone = "towers"
  image_size: int
  patch_size: int
  embed_dim: int
  dtype: Dtype = "float32"
  temperature_init: float = 0.07
  max_logit_scale: float = 100.0
  # 'sigmoid' (SigLIP) adds a learnable logit bias (init -10) and starts the scale at 10.
  # Follows config.loss.contrastive when the model is built (step.build_model).
  contrastive: Contrastive = "softmax"
  # Share the token embedding with the vocab head (CoCa-2B's 2.1B count implies it; see
  # experiments/coca_2b.py). Base/Large (383M / 787M) match Table 1 only with an untied head.
  tie_embeddings: bool = False
  pooler_heads: int = 8
  # Activation rematerialisation of every layer in training; decoding never remats.
  remat: Remat = "none"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@_frozen
class Vision:
  """config.model.vision: the CoCa image encoder (a ViT)."""
  width: int
  depth: int
  heads: int
  mlp_dim: int
  class_token: bool = False  # ViT class token in front (pos-embed over grid + 1 tokens).
  ln_pre: bool = False  # LayerNorm on the embedded patches before the encoder layers.
  final_norm: bool = True  # LayerNorm on the encoder output before the poolers.
  patch_bias: bool = True
  experts: Routing = _group(Routing)


@_frozen
class Text:
  """config.model.text: the CoCa text decoders (unimodal n_uni layers, multimodal n_multi)."""
  vocab_size: int
  max_len: int
  width: int
  heads: int
  mlp_dim: int
  n_uni: int
  n_multi: int
  multimodal_layout: Literal["coca", "open_clip"] = "coca"  # See backbone.Block.layout.
  cls_mask: Literal["correct", "open_clip_legacy"] = "correct"  # See text_attention_mask.
  vocab_bias: bool = True
  # Special ids the decoder starts from and stops at (ours: core/tokens.py; CLIP BPE: sot
  # 49406, eot 49407). PAD is tokens.PAD_ID in both.
  bos_id: int = tokens.BOS_ID
  eos_id: int = tokens.EOS_ID
  # Routed text layers: `every` counts text layers across both decoders.
  experts: Routing = _group(Routing)


@_frozen
class CoCa(_Model):
  """config.model with backbone='towers': CoCa's image encoder and text decoders. The options
  where open_clip's CoCa differs from ours are set by experiments/openclip_*.py."""
  pooling: TowersPooling = "cascade"
  n_gen_queries: int = 256
  scan_layers: bool = True
  activation: Activation = "gelu_tanh"
  norm_eps: float = 1e-6
  pooler_width: int = 0  # Width of the pooler queries/outputs; 0 = vision width.
  vision: Vision
  text: Text

  @property
  def image_tokens(self) -> int:
    """Encoder tokens: the patches, plus the class token if any."""
    return self.num_patches + int(self.vision.class_token)


@_frozen
class MoMEText:
  """config.model.text of a MoME: the vocabulary and text length (the stack is `mome`)."""
  vocab_size: int
  max_len: int
  bos_id: int = tokens.BOS_ID
  eos_id: int = tokens.EOS_ID


@_frozen
class MoMEExperts:
  """config.model.mome.experts: learned routing inside each modality expert (`every` counts the
  layers of the shared stack; ffn_fusion lives in the top fusion_layers)."""
  image: Routing = _group(Routing)
  text: Routing = _group(Routing)
  fusion: Routing = _group(Routing)


MODALITY_EXPERTS = tuple(f.name for f in dataclasses.fields(MoMEExperts))  # image, text, fusion


@_frozen
class MoMEStack:
  """config.model.mome: the one shared stack of a MoME; the top `fusion_layers` also hold the
  vision-language expert. The fields from `text_encoder` on select VLMo's architecture as
  published (docs/vlmo.md); their defaults are MoME-CoCa's."""
  width: int
  depth: int
  heads: int
  mlp_dim: int
  fusion_layers: int
  experts: MoMEExperts = _group(MoMEExperts)
  # 'causal': CLS at the end, captioning. 'bert': VLMo's text encoder; needs pooling='cls'.
  text_encoder: TextEncoder = "causal"
  token_types: bool = False  # VLMo's modality type embeddings (text 0, image 1), 'bert' only.
  layer_scale: float = 0.0  # Residual layer scale init (VLMo 0.1); 0 = none.
  # VLMo's relative position bias: one table [rows, depth * heads] for every layer and pass
  # (image, text, fused); then no absolute image positions and BERT's text positions are kept
  # but unused, as in the official code. 'bert' only.
  relative_position: bool = False
  relative_text_length: int = 196  # The text length the table's text rows are sized for.
  key_bias: bool = True  # False: q/v-only attention biases (VLMo).
  shared_final_norm: bool = False  # One final LayerNorm for every pass ('bert' only).
  itm_pooler: bool = False  # ITM through dense + tanh on the first token (VLMo's pooler).
  drop_path_rate: float = 0.0  # Stochastic depth, 0 .. rate over the layers; training only.
  activation: Activation = "gelu_tanh"  # FFN non-linearity; VLMo: 'gelu'.
  vl_contrastive: bool = False  # VLMo's second ITC on VL-FFN features ('bert' only).
  mlm_head: bool = False  # VLMo's (BERT's) MLM head ('bert' only).
  # BEiT's masked image modelling ('bert' only; config.loss.mim_weight): the visual codebook's
  # size, a learned image [MASK] embedding and a linear head from the image-only pass's final
  # states to a code per patch; 0 = none.
  mim_vocab: int = 0

  @property
  def bert(self) -> bool:
    return self.text_encoder == "bert"

  @property
  def bottom_layers(self) -> int:
    return self.depth - self.fusion_layers

  def layer_experts(self, layer: int) -> tuple[str, ...]:
    """The modality experts (feed-forwards) of `layer`: image and text, and fusion on top."""
    return MODALITY_EXPERTS if layer >= self.bottom_layers else MODALITY_EXPERTS[:2]

  def routed_experts(self, layer: int) -> tuple[tuple[str, Routing], ...]:
    """((expert name, its routing), ...) of the modality experts of `layer` that are routed."""
    return tuple((name, getattr(self.experts, name)) for name in self.layer_experts(layer)
                 if getattr(self.experts, name).routed(layer))

  def fused_expert(self, layer: int, modality: str) -> str:
    """The expert a token of `modality` uses at `layer` of a fused image+text sequence."""
    return "fusion" if layer >= self.bottom_layers else modality


@_frozen
class MoME(_Model):
  """config.model with backbone='mome' (a VLMo-style mixture of modality experts)."""
  backbone: Backbone = "mome"
  # The contrastive image embedding: 'attention' (an attentional pooler over the image tokens,
  # as in CoCa) or 'cls' (a learned [CLS] token prepended to the patches, as in VLMo).
  pooling: MoMEPooling = "attention"
  text: MoMEText
  mome: MoMEStack

  @property
  def image_tokens(self) -> int:
    """Image tokens of every pass: the patches, and the [CLS] first with pooling='cls'."""
    return self.num_patches + (self.pooling == "cls")


MODELS = {"towers": CoCa, "mome": MoME}


# -- Other groups ------------------------------------------------------------------------------


@_frozen
class Decoding:
  """How to decode (inference.generate; config.evals.captioning has these fields, with
  max_new_tokens 0 for None). `generate` compiles once per (method, num_beams, num_candidates,
  batch shape); the other fields are traced.

  method: 'greedy' | 'beam' | 'sample'.
  max_new_tokens: most generated tokens, EOS included; None = max_len - 1 (the most the decoder
    was trained on).
  min_len: EOS is forbidden until this many tokens have been generated.
  num_beams, length_penalty: beam search; a finished beam ranks by
    sum(log p) / length**length_penalty (0 = raw log-probability, 1 = mean per token).
  temperature, top_k, top_p: sampling; top_k=0 and top_p=1.0 switch the filters off.
  num_candidates: with method='sample', draw this many captions per image and keep the one whose
    text embedding best matches the image embedding (contrastive re-ranking).
  """
  method: DecodingMethod = "greedy"
  max_new_tokens: int | None = None
  min_len: int = 0
  num_beams: int = 4
  length_penalty: float = 0.6
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_candidates: int = 1


@_frozen
class Probe:
  """config.evals.probe: frozen-encoder probes (evaluation/probes.py, docs/evaluation.md,
  "Frozen-encoder probes"). Both train on `train_split` and report top-1 on `split`, read like
  the zero-shot eval reads its split (ours or a TFDS catalog dataset); the image encoder stays
  frozen, its features computed once per model and split and cached.

  attentional: the CoCa paper's probe: a new attentional pooler (one query) with a LayerNorm and
    a linear head, trained with AdamW on the encoder's output tokens -> eval/probe_attn_top1.
  linear: L2-regularised least squares on the pooled image embedding (standardised features,
    one-hot targets in {-1, 1}, closed form) -> eval/probe_linear_top1; the regularisation is
    the one of `linear_l2` that scores best on a held-out `linear_holdout` of train_split
    (eval/probe_linear_l2), refit on the whole of it.
  linear_l2: per-example L2 weights tried (the fit minimises mean squared error + l2 * |W|^2;
    sklearn's alpha = l2 * examples).
  linear_holdout: the fraction of train_split held out (a seeded draw) to choose linear_l2.
  seed: draws the held-out part, the attentional probe's initialisation and its batch order.
  attn_heads: the probe pooler's heads; 0 = config.model.pooler_heads.
  attn_epochs, attn_batch_size, attn_lr, attn_weight_decay: the probe's AdamW run (warmup 5% of
    the steps, then cosine decay to 0); batches in a fixed order drawn from `seed`.
  cache_dir: also keep the features in this directory (local or a URL; one folder per
    fingerprint of the model's parameters, so later runs of the same model and step reuse them);
    "" = in memory only, for the current parameters.
  """
  enabled: bool = True
  dataset: str = ""  # "" = config.data.name; or a TFDS catalog dataset (as zero-shot reads it).
  split: str = ""  # The split top-1 is reported on; "" = probes off.
  examples: int = 0  # 0 = the whole split.
  data_dir: str = ""  # "" = config.data.data_dir.
  image_feature: str = "image"
  label_feature: str = "label"
  train_split: str = ""  # Labelled split the probes train on (never `split`).
  train_examples: int = 0  # 0 = the whole train_split.
  attentional: bool = True
  linear: bool = True
  seed: int = 0
  linear_l2: list = dataclasses.field(
      default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
  linear_holdout: float = 0.2
  attn_heads: int = 0
  attn_epochs: int = 20
  attn_batch_size: int = 256
  attn_lr: float = 3e-3
  attn_weight_decay: float = 1e-4
  cache_dir: str = ""


@_frozen
class Train:
  """config.train."""
  steps: int
  batch_size: int
  seed: int = 0
  log_every: int = 100
  microbatches: int = 1
  # halt: stop at the first NaN/inf loss or gradient; skip: discard that update and go on.
  nonfinite: Nonfinite = "halt"
  max_consecutive_skips: int = 10


@_frozen
class Loss:
  """config.loss."""
  contrastive_weight: float = 1.0
  caption_weight: float = 2.0
  label_smoothing: float = 0.0
  contrastive: Contrastive = "softmax"
  contrastive_impl: ContrastiveImpl = "gathered"
  contrastive_reduction: ContrastiveReduction = "sum"
  itm_weight: float = 0.0  # Image-text matching (MoME); 0 = off.
  itm_examples: int = 0  # Examples per batch that get ITM pairs; 0 = the whole batch.
  # VLMo's second ITC, on the VL-FFN features with its own logit scale (needs
  # config.model.mome.vl_contrastive); 0 = off. VLMo: 0.5 and contrastive_weight 0.5.
  vl_contrastive_weight: float = 0.0
  # Masked language modelling (VLMo; needs config.model.mome.mlm_head): on the fused pass for
  # image-text batches, on the text-only pass for text-only ones; 0 = off. BERT's masking: each
  # token but padding and `mlm_special_ids` is picked with `mlm_probability`; a picked token
  # becomes `mlm_mask_id` (80%), a random id (10%) or stays (10%).
  mlm_weight: float = 0.0
  mlm_probability: float = 0.15  # vlmo/config.py mlm_prob.
  mlm_mask_id: int = 103  # bert-base-uncased's [MASK].
  # Never picked (besides padding): bert-base-uncased's [UNK], [CLS], [SEP], [MASK].
  mlm_special_ids: list = dataclasses.field(default_factory=lambda: [100, 101, 102, 103])
  # Masked image modelling (BEiT, VLMo's stage 1; needs config.model.mome.mim_vocab): per
  # image, blocks of at least `mim_min_block` patches (aspect ratio 0.3-3.3) are masked until
  # round(mim_mask_ratio x patches) are; the image-only pass sees a learned [MASK] embedding
  # there and predicts each masked patch's code: the entry of the codebook `mim_codebook` (.npy
  # [mim_vocab, 12]) nearest to the patch's mean colours over 2x2 cells
  # (data/visual_codebook.py; "" = fitted by k-means on the train images into
  # WORKDIR/visual_codebook.npy when the run starts). Cross-entropy on the masked patches only;
  # 0 = off. BEiT: ratio 0.4, blocks of 16 of 196 patches, codes from DALL-E's dVAE (8,192).
  mim_weight: float = 0.0
  mim_mask_ratio: float = 0.4
  mim_min_block: int = 16
  mim_codebook: str = ""
  # Auxiliary losses of learned routing (training.losses.router_losses). Switch Transformer's
  # balance weight is 0.01; LIMoE's entropy terms are off unless asked for. The global-entropy
  # threshold is in nats; None = log(num_experts), i.e. the term acts whenever the mean routing
  # distribution is less than uniform.
  router_balance_weight: float = 0.01
  router_local_entropy_weight: float = 0.0
  router_global_entropy_weight: float = 0.0
  router_global_entropy_threshold: float | None = None


ROUTER_LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(Loss) if f.name.startswith("router_"))


# LoRA's default targets: the attention projections (query, key, value, out; self- and
# cross-attention) and the feed-forward matrices (wi, wo: dense MLPs, routed experts and MoME's
# modality experts), in every tower.
DEFAULT_LORA_TARGETS = r"(attention/(query|key|value|out)|(^|/)(wi|wo))(/kernel)?$"


@_frozen
class Lora:
  """config.optim.lora: low-rank adapters on frozen Dense kernels (training/lora.py).

  rank: the adapters' rank r (0 = off: every parameter is trained).
  alpha: the adapters' scale is alpha / rank: W + alpha / rank * A @ B.
  targets: regex over '/'-joined parameter paths (the scanned layout, e.g.
    'vision/layers/attention/query/kernel'); each matching Dense kernel gets an adapter. A
    regex that matches no kernel is an error.
  unfrozen_regex: parameters trained in full beside the adapters ('' = none), e.g.
    'logit_scale' or '(^|/)bias$'. Every other parameter stays as config.init.source has it.
  """
  rank: int = 0
  alpha: float = 16.0
  targets: str = DEFAULT_LORA_TARGETS
  unfrozen_regex: str = ""

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@_frozen
class Optim:
  """config.optim."""
  name: OptimizerName = "adamw"
  lr: float
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 0.0  # 0 = the optimizer's own: adamw 1e-8, adafactor 1e-30.
  weight_decay: float = 0.0
  warmup_steps: int = 0
  warmup_fraction: float = 0.0
  decay: DecayName = "cosine"
  end_lr_fraction: float = 0.0
  clip_norm: float = 0.0
  freeze_regex: list = dataclasses.field(default_factory=list)
  no_decay_regex: str = DEFAULT_NO_DECAY
  lora: Lora = _group(Lora)


# -- Data mixtures -----------------------------------------------------------------------------

SourceText = Literal["captions", "labels"]
SOURCE_TEXTS = allowed(SourceText)


@_frozen
class Source:
  """One entry of config.data.sources (a list of dicts; [] = the one dataset config.data.name).

  Each source is a prepared TFDS dataset read in its own epoch order; each global batch takes
  `weight` / (sum of weights) of its rows from it (coca_jax/data/mixture.py). `text` says where
  an example's text comes from: "captions" (our builders' captions feature, one picked per
  epoch), or "labels": a template applied to the class name(s) of the label feature (names from
  `class_names_file` (one per line, or "open_clip:imagenet"), else `class_names`, else the
  ClassLabel's own names; a multi-label example joins its names with `label_join`)."""
  name: str  # The TFDS dataset (built with coca_jax.data.build, or a catalog one).
  weight: float  # Relative share of each global batch.
  tag: str = ""  # The name in logged metrics (loss/<tag>, examples/<tag>); "" = name.
  data_dir: str = ""  # "" = config.data.data_dir.
  split: str = "train"
  text: SourceText = "captions"
  image_feature: str = "image"
  captions_feature: str = "captions"
  label_feature: str = "label"
  # Labels as text: each example's text is one of `templates` ("{}" = the class name), drawn
  # per (seed, step, slot); [] = ["a photo of a {}."].
  templates: list = dataclasses.field(default_factory=list)
  class_names: list = dataclasses.field(default_factory=list)
  class_names_file: str = ""
  label_join: str = ", "


# -- Derived: defaults, validation, building ----------------------------------------------------


class _Required:
  """Marks a field with no default (the experiment config must set it)."""

  def __repr__(self):
    return "REQUIRED"

  def __deepcopy__(self, memo):  # One marker: `is REQUIRED` holds in copies of the schema.
    return self


REQUIRED = _Required()


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def _is_group(tp) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def defaults_of(cls) -> dict:
  """{field: default} of a schema dataclass, nested dataclasses as nested dicts, REQUIRED for a
  field with no default. (None is never a group default.)"""
  hints, out = _hints(cls), {}
  for f in dataclasses.fields(cls):
    if _is_group(hints[f.name]):
      out[f.name] = defaults_of(hints[f.name])
    elif f.default is not dataclasses.MISSING:
      out[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      out[f.name] = f.default_factory()
    else:
      out[f.name] = REQUIRED
  return out


def _describe(tp) -> str:
  names = {int: "an integer", float: "a number", bool: "True or False", str: "a string"}
  return names.get(tp, getattr(tp, "__name__", str(tp)))


def _type_ok(tp, value) -> bool | None:
  """Whether `value` fits the scalar type `tp`; None where the type is not checked here."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    results = [_type_ok(arg, value) for arg in typing.get_args(tp)]
    return None if None in results else any(results)
  if tp is type(None):
    return value is None
  if tp is bool:
    return isinstance(value, bool)
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if tp is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if tp is str:
    return isinstance(value, str)
  return None


def problems_of(cls, group, prefix: str) -> list[str]:
  """The problems of `group` (a completed config group, e.g. config.model) against `cls`: a
  value outside its Literal's allowed values, or of the wrong scalar type. Unknown and missing
  keys are `config.unknown_keys`'s job."""
  problems, hints = [], _hints(cls)
  for f in dataclasses.fields(cls):
    if not (hasattr(group, "items") and f.name in group):
      continue
    tp, value, path = hints[f.name], group[f.name], f"config.{prefix}{f.name}"
    if _is_group(tp):
      if hasattr(value, "items"):
        problems += problems_of(tp, value, f"{prefix}{f.name}.")
    elif typing.get_origin(tp) is Literal:
      if value not in typing.get_args(tp):
        problems.append(f"{path}={value!r} is unknown; use one of "
                        f"{', '.join(map(str, typing.get_args(tp)))}")
    elif _type_ok(tp, value) is False:
      problems.append(f"{path}={value!r} must be {_describe(tp)}")
  return problems


def build(cls, group, **changes):
  """The frozen `cls` instance for a config group (a ConfigDict or dict, e.g. config.model):
  nested dataclass fields from their sub-groups, fields the group lacks at their defaults, keys
  `cls` does not declare ignored (`config.unknown_keys` reports them). Lists become tuples so
  that the result is hashable (a jit static argument). `changes` replace top-level fields."""
  hints, kwargs = _hints(cls), {}
  given = group if hasattr(group, "items") else {}
  for f in dataclasses.fields(cls):
    if f.name in changes:
      kwargs[f.name] = changes[f.name]
    elif _is_group(hints[f.name]):
      kwargs[f.name] = build(hints[f.name], given.get(f.name) or {})
    elif f.name in given:
      value = given[f.name]
      kwargs[f.name] = tuple(value) if isinstance(value, list) else value
  try:
    return cls(**kwargs)
  except TypeError as e:  # A required field left out.
    raise ValueError(f"{cls.__name__} settings are incomplete ({e}); every field without a "
                     "default must be set") from None


def build_model(model):
  """The model settings (`CoCa` or `MoME`) of config.model, for its backbone."""
  backbone = model.get("backbone", "towers") if hasattr(model, "get") else "towers"
  if backbone not in MODELS:
    raise ValueError(f"config.model.backbone={backbone!r} is unknown; use one of "
                     f"{', '.join(map(repr, BACKBONES))}")
  return build(MODELS[backbone], model)
