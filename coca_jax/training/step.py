"""TrainState, sharded state creation, and the pure train step.

The state is built abstractly first (`jax.eval_shape`), its shardings derived from the model's
logical axis names, and only then materialised by a jitted init whose `out_shardings` place every
array directly where it lives. Nothing is ever built whole on one device.

Gradient accumulation (`config.train.microbatches` = m > 1) is EXACT: the result equals one step
on the whole batch, contrastive term included. The contrastive loss is not a sum over
microbatches (every example's negatives are the whole global batch), so the step runs in three
phases (the "gradient cache" scheme):
  1. embed: a scan over microbatches computes image and text embeddings only (no gradients);
  2. contrast: the contrastive loss over all B embeddings, and its gradient with respect to each
     embedding and to the logit scale (and bias) - a [B, D] array, small next to activations;
  3. backprop: a scan over microbatches re-runs the full forward pass and backpropagates the
     caption loss plus the cached embedding gradients (a linear surrogate <g, embed>), summing
     parameter gradients.
The loss is one list of weighted terms (`loss_terms`) that both steps iterate. Terms that are
sums over examples (caption, ITM, MLM) draw what they need from the whole batch once, between
phases 1 and 3 (the token count; ITM's hard negatives, sampled from the global-batch
similarities of the phase-1 embeddings with the step's rng; MLM's masks, drawn with it), and
each microbatch adds its sum divided by that whole-batch count, so they are exact too. The
contrastive terms (VLMo has a second one, on its VL-FFN features) are the phase-2 kind. A
text-only batch (config.data.text_only: no "image") has only the terms that need no image
(MLM), an image-only one (config.data.image_only: no "text") only those that need no text
(masked image modelling); both skip phases 1 and 2.
Cost: one extra forward pass of the image encoder and unimodal decoder per step (about +20% of
a step's FLOPs); memory: activations of one microbatch. Captions are normalised by the token
count of the whole batch, so the caption term is exact too.

With learned routing, the router terms (`losses.router_losses`) are computed per microbatch and
averaged. The local-entropy term is a mean over tokens, so (with equal token counts per
microbatch) it is exact; the balance and global-entropy terms are products / entropies of
batch means, so they are the microbatch average of the per-microbatch values: approximated, the
way MoE trainers compute them per device group anyway. Causal text and `priority='position'`
have capacity per sequence, so their routing is unchanged by the split; Batch Priority Routing
(image tokens) shares capacity over groups of `group_size` examples, and a group is then that
many examples of one microbatch (rows j, j + m, ...), so which image choices are dropped can
differ from the whole batch's (`group_size=1` keeps it exact). Router noise needs
microbatches=1 (config.validate). The logged router metrics (load, dropped fraction, entropy)
are computed from statistics summed over microbatches: those of the whole batch.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import optax

from coca_jax import models
from coca_jax.core import schema
from coca_jax.core import sharding
from coca_jax.core.tokens import PAD_ID
from coca_jax.data import visual_codebook
from coca_jax.models.coca import CoCa, clamp_logit_scale
from coca_jax.training import lora as lora_lib
from coca_jax.training import losses
from coca_jax.training import optim


@flax.struct.dataclass
class TrainState:
  """Everything the step updates. A pytree: checkpointed and sharded as one. Under LoRA
  (`config.optim.lora`), `params` is the trainable tree of `training/lora.py` (adapters and
  unfrozen parameters); the frozen base is the step's separate, read-only argument."""
  step: jax.Array
  params: Any
  opt_state: Any


def dummy_batch(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch's shapes (no "image" with config.data.text_only)."""
  size = config.model.image_size
  batch = {
      "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
      "text": jax.ShapeDtypeStruct((batch_size, config.model.text.max_len), jnp.int32),
  }
  if _text_only(config):
    del batch["image"]
  if _image_only(config):
    del batch["text"]
  sources = source_names(config)
  if sources:  # A mixture's batches say which source each row came from (data/mixture.py).
    batch["source"] = jax.ShapeDtypeStruct((batch_size, len(sources)), jnp.int32)
  return batch


def source_names(config) -> tuple[str, ...]:
  """The logged names of config.data.sources (each `tag`, else `name`); () = one dataset."""
  return tuple(s.get("tag") or s["name"] for s in config.data.get("sources", ()) or ())


def _text_only(config) -> bool:
  return bool(config.get("data", {}).get("text_only", False))


def _image_only(config) -> bool:
  return bool(config.get("data", {}).get("image_only", False))


def batch_shardings(mesh: Mesh, text_only: bool = False, image_only: bool = False) -> dict:
  """Where a training batch lives: {"image" [batch, S, S, 3], "text" [batch, L]} ("text" alone
  with `text_only`, config.data.text_only; "image" alone with `image_only`), each split over
  the data-parallel mesh axes along batch. The step's in_shardings and the data pipeline's
  output both use it."""
  if text_only:
    return {"text": sharding.batch_sharding(mesh, 2)}
  if image_only:
    return {"image": sharding.batch_sharding(mesh, 4)}
  return {"image": sharding.batch_sharding(mesh, 4), "text": sharding.batch_sharding(mesh, 2)}


def build_model(config) -> CoCa:
  """The model for a full experiment config (`config.model.backbone`: CoCa towers or MoME). The
  sigmoid contrastive loss needs a learnable logit bias in the model, so the model's
  `contrastive` follows `config.loss.contrastive`; a MoME gets its ITM head when
  `config.loss.itm_weight` > 0."""
  model_config = dataclasses.replace(models.model_config(config.model),
                                     contrastive=config.loss.contrastive)
  return models.build(model_config, itm=config.loss.itm_weight > 0)


def _init_boxed_params(model: CoCa, config, rng):
  # Every parameter, the image side's too, even where training reads texts only (stage 2).
  size = config.model.image_size
  image = jnp.zeros((1, size, size, 3), jnp.float32)
  text = jnp.zeros((1, config.model.text.max_len), jnp.int32)
  return model.init(rng, image, text)["params"]


def init_params(config, model: CoCa, rng):
  """Freshly initialised parameters of `model` (plain arrays, on the default device): for
  benchmarks and tools that need real weights without an optimizer or a mesh."""
  return jax.jit(lambda r: nn.unbox(_init_boxed_params(model, config, r)))(rng)


def abstract_params(config, model: CoCa | None = None, *, boxed: bool = False):
  """The parameter tree of `model` (default: `build_model(config)`, the full config deciding
  extras such as the sigmoid logit bias) as ShapeDtypeStructs; nothing is allocated. `boxed`
  keeps the nn.Partitioned boxes with their logical axis names (what shardings derive from)."""
  model = build_model(config) if model is None else model
  params = jax.eval_shape(functools.partial(_init_boxed_params, model, config),
                          jax.random.key(0))
  return params if boxed else nn.unbox(params)


@dataclasses.dataclass(frozen=True)
class LoraParts:
  """What a LoRA run (config.optim.lora) adds to its setup: the settings, the adapted kernels
  (`lora.targets`), and the frozen base parameters' abstract tree and shardings."""
  settings: schema.Lora
  targets: dict
  base_abstract: Any
  base_shardings: Any


def lora_parts(config, model: CoCa, mesh: Mesh, rules) -> LoraParts | None:
  """The LoRA parts of `config` on `mesh` (None when config.optim.lora.rank is 0)."""
  settings = lora_lib.lora_settings(config)
  if not settings.enabled:
    return None
  boxed = abstract_params(config, model, boxed=True)
  return LoraParts(settings, lora_lib.targets(boxed, settings), nn.unbox(boxed),
                   sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules))


def state_shardings(model: CoCa, tx: optax.GradientTransformation, config, mesh: Mesh, rules):
  """(abstract TrainState of ShapeDtypeStructs, TrainState of NamedShardings). Under LoRA the
  params are the trainable tree, each adapter carrying its kernel's logical axes."""
  boxed = abstract_params(config, model, boxed=True)
  settings = lora_lib.lora_settings(config)
  if settings.enabled:
    params_abstract, param_specs = lora_lib.abstract_trainable(
        lora_lib.targets(boxed, settings), boxed, settings)
  else:
    param_specs = nn.get_partition_spec(boxed)
    params_abstract = nn.unbox(boxed)
  param_shardings = sharding.logical_to_sharding(param_specs, mesh, rules)
  opt_abstract = jax.eval_shape(tx.init, params_abstract)
  opt_shardings = sharding.shardings_like_params(opt_abstract, param_shardings, params_abstract, mesh)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abstract,
                        opt_state=opt_abstract)
  shardings = TrainState(step=sharding.replicated(mesh), params=param_shardings,
                         opt_state=opt_shardings)
  return abstract, shardings


def make_init_fn(model: CoCa, tx: optax.GradientTransformation, config, shardings: TrainState,
                 lora: LoraParts | None = None):
  """A jitted rng -> TrainState that materialises each array on its own shards. Under LoRA it
  is (rng, base) -> TrainState: fresh adapters, unfrozen parameters copied from `base`."""
  if lora is not None:
    def init_adapters(rng, base):
      params = lora_lib.init_trainable(lora.targets, base, lora.settings, rng)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    return jax.jit(init_adapters, out_shardings=shardings)

  def init(rng):
    params = nn.unbox(_init_boxed_params(model, config, rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return jax.jit(init, out_shardings=shardings)


def _drop_path_rate(model) -> float:
  """The model's stochastic depth rate (MoME config.model.mome.drop_path_rate; CoCa: 0)."""
  return getattr(getattr(model.config, "mome", None), "drop_path_rate", 0.0)


def training_rngs(model: CoCa, rng) -> dict:
  """The rngs of one training pass from its own key `rng`: the routers' noise (experts'
  noise_std > 0), and 'dropout' for stochastic depth where the model has it (MoME
  drop_path_rate > 0); {} for None (no noise; an error with stochastic depth)."""
  if rng is None:
    if _drop_path_rate(model):
      raise ValueError("config.model.mome.drop_path_rate > 0 needs an rng for stochastic depth")
    return {}
  rngs = {"router": rng}
  if _drop_path_rate(model):
    rngs["dropout"] = jax.random.fold_in(rng, 1)
  return rngs


def apply_with_router_statistics(model: CoCa, params, image, text, rng=None):
  """The training forward pass -> (outputs, {layer: router statistics}). The statistics come
  from the 'intermediates' collection routed feed-forwards sow into (empty for a dense model).
  `rng`: the pass's key (`training_rngs`: router noise, stochastic depth); None routes without
  noise."""
  outputs, state = model.apply({"params": params}, image, text, train=True,
                               mutable=["intermediates"], rngs=training_rngs(model, rng))
  return outputs, models.router_statistics(state.get("intermediates", {}), model.config)


# ----------------------------------------------------------------------------------------------
# The loss: one list of weighted terms, iterated by the plain and the accumulated step.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossTerm:
  """One weighted term of the training loss; its metric is `<name>_loss`.

  Most terms are a sum over examples divided by a count that does not depend on the parameters
  (caption tokens, ITM pairs). Such a term has
    prepare(batch, embeds, rng) -> plan: run once on the WHOLE batch, without gradients, before
      any backward pass: plan["count"] (the denominator), plan["metrics"] (whole-batch values
      logged as they are) and plan["rows"] ({name: [N, ...]} per-example data, N divisible
      by the microbatches, split among them the way the batch is);
    fn(params, model, outputs, microbatch, rows, batch) -> (sum, {metric: sum}, router
      statistics of any extra forward pass);
  so a microbatch's share is its sum over the whole batch's count, and the shares add up to the
  plain step's term exactly. The contrastive term (`over_embeddings`) is the other kind: every
  example's negatives are the whole batch, so it is a function of all the embeddings,
  fn(image_embed, text_embed, logit_scale, logit_bias) -> (loss, metrics) of the model outputs
  named by `embeddings` (VLMo's second ITC takes the VL-FFN pair and its own scale), whose
  gradient with respect to the embeddings the accumulated step caches (module docstring).
  A new term is one more entry of `loss_terms` (masked language modelling: prepare draws the
  masks, fn scores them). `text_only`: the term also scores text-only batches (no "image";
  VLMo's stage 2), where the terms without it are left out; `image_only` likewise for
  image-only batches (no "text"; masked image modelling, VLMo's stage 1 at demo scale).
  """
  name: str
  weight: float
  fn: Callable
  prepare: Callable | None = None
  over_embeddings: bool = False
  embeddings: tuple[str, str, str, str] = ("image_embed", "text_embed", "logit_scale",
                                           "logit_bias")
  text_only: bool = False
  image_only: bool = False


def loss_terms(loss_config, vocab_size: int = 0, model_config=None) -> list[LossTerm]:
  """The weighted terms `config.loss` asks for. Contrastive and caption are always computed
  (their metrics are logged even at weight 0); ITM, VLMo's second ITC, MLM and MIM only when
  their weight is positive (MLM draws its random replacements from `vocab_size` ids; MIM
  needs `model_config`, the model's schema config: its patches and codebook size)."""
  terms = [
      LossTerm("contrastive", loss_config.contrastive_weight,
               functools.partial(_contrastive, loss_config=loss_config), over_embeddings=True),
      LossTerm("caption", loss_config.caption_weight,
               functools.partial(_caption_sums, label_smoothing=loss_config.label_smoothing),
               prepare=_caption_plan),
  ]
  if loss_config.itm_weight > 0:
    terms.append(LossTerm("itm", loss_config.itm_weight, _itm_sums,
                          prepare=functools.partial(_itm_plan,
                                                    examples=loss_config.itm_examples)))
  if loss_config.vl_contrastive_weight > 0:
    # VLMo's second ITC: the same loss on the VL-FFN features, with their own scale.
    terms.append(LossTerm("vl_contrastive", loss_config.vl_contrastive_weight,
                          functools.partial(_contrastive, loss_config=loss_config,
                                            prefix="vl_contrastive"),
                          over_embeddings=True,
                          embeddings=("image_vl_embed", "text_vl_embed", "logit_vl_scale",
                                      "logit_bias")))
  if loss_config.mlm_weight > 0:
    terms.append(LossTerm("mlm", loss_config.mlm_weight,
                          functools.partial(_mlm_sums, probability=loss_config.mlm_probability),
                          prepare=functools.partial(_mlm_plan, loss_config=loss_config,
                                                    vocab_size=vocab_size),
                          text_only=True))
  if loss_config.mim_weight > 0:
    if model_config is None:
      raise ValueError("config.loss.mim_weight > 0 needs the model's config (patches, codebook)")
    codebook = visual_codebook.load(loss_config.mim_codebook, model_config.mome.mim_vocab,
                                    model_config.patch_size)
    terms.append(LossTerm("mim", loss_config.mim_weight, _mim_sums,
                          prepare=functools.partial(_mim_plan, loss_config=loss_config,
                                                    codebook=codebook,
                                                    patch_size=model_config.patch_size),
                          image_only=True))
  return terms


def _mim_plan(batch, embeds, rng, *, loss_config, codebook, patch_size: int):
  """BEiT's masks and targets for the whole batch, drawn once from the step's rng (as MLM's):
  each image's blockwise mask (`losses.block_mask`: round(mim_mask_ratio x patches) patches in
  blocks of at least mim_min_block) and every patch's visual code (`losses.visual_codes`: the
  fitted codebook's entry nearest to its coarse colours, from the unmasked pixels); the count is
  the batch's masked patches."""
  del embeds
  if rng is None:
    raise ValueError("config.loss.mim_weight > 0 needs an rng for the masks")
  image = batch["image"].astype(jnp.float32)
  size, grid = image.shape[0], image.shape[1] // patch_size
  patches = image.reshape(size, grid, patch_size, grid, patch_size, image.shape[-1])
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(size, grid * grid, -1)
  targets = losses.visual_codes(patches, jnp.asarray(codebook), patch_size,
                                visual_codebook.CELLS)
  count = round(loss_config.mim_mask_ratio * grid * grid)
  mask = losses.block_mask(jax.random.fold_in(rng, 4), size, grid, count,
                           loss_config.mim_min_block)
  masked = jnp.sum(mask.astype(jnp.float32))
  return {"count": jnp.maximum(masked, 1.0), "metrics": {"mim_patches": masked},
          "rows": {"mask": mask, "targets": targets}}


def _mim_sums(params, model, outputs, microbatch, rows, batch, rng=None):
  """MIM of this microbatch's images: the masked image through the image-only pass, the
  cross-entropy of each masked patch's code and the right predictions, summed."""
  del outputs, batch
  logits, state = model.apply({"params": params}, microbatch["image"], rows["mask"],
                              train=True, method="mim_logits", mutable=["intermediates"],
                              rngs=training_rngs(model, rng))
  total, hits = losses.mim_sums(logits, rows["targets"], rows["mask"])
  return total, {"mim_accuracy": hits}, models.router_statistics(
      state.get("intermediates", {}), model.config)


def _contrastive(image_embed, text_embed, logit_scale, logit_bias, loss_config,
                 prefix: str = "contrastive"):
  kind = loss_config.contrastive
  value, metrics = losses.contrastive_loss(
      image_embed, text_embed, logit_scale, logit_bias if kind == "sigmoid" else None,
      kind=kind, impl=loss_config.contrastive_impl,
      reduction=loss_config.contrastive_reduction)
  return value, {k.replace("contrastive", prefix, 1): v for k, v in metrics.items()}


def _mlm_plan(batch, embeds, rng, *, loss_config, vocab_size: int):
  """BERT's masks for the whole batch (`losses.mlm_mask`), drawn once from the step's rng so
  every microbatch scores its own rows of one draw; the count is the batch's picked tokens."""
  del embeds
  if rng is None:
    raise ValueError("config.loss.mlm_weight > 0 needs an rng for the masks")
  text = batch["text"]
  inputs, labels = losses.mlm_mask(
      text, jax.random.fold_in(rng, 3), probability=loss_config.mlm_probability,
      mask_id=loss_config.mlm_mask_id, vocab_size=vocab_size,
      special_ids=tuple(loss_config.mlm_special_ids))
  picked = jnp.sum((labels != PAD_ID).astype(jnp.float32))
  return {"count": jnp.maximum(picked, 1.0), "metrics": {"mlm_tokens": picked},
          "rows": {"inputs": inputs, "labels": labels}}


def _mlm_sums(params, model, outputs, microbatch, rows, batch, rng=None, *,
              probability: float | None = None):
  """MLM of this microbatch's rows: the masked text through the fused pass with its images
  (VLMo's stage 3), or the text-only pass for a text-only batch (stage 2); cross-entropy and
  right predictions summed over the picked tokens. `probability` (config.loss.mlm_probability):
  the vocabulary head scores only `losses.mlm_positions_bound` positions per row, the picked
  ones (`losses.mlm_sums`; same sums); None scores every position."""
  del outputs, batch
  tokens, state = model.apply({"params": params}, rows["inputs"], microbatch.get("image"),
                              train=True, method="mlm_tokens", mutable=["intermediates"],
                              rngs=training_rngs(model, rng))
  labels = rows["labels"]
  bound = None if probability is None else losses.mlm_positions_bound(labels.shape[1],
                                                                      probability)
  total, hits = losses.mlm_sums(
      lambda t: model.apply({"params": params}, t, method="mlm_head"), tokens, labels, bound)
  return total, {"mlm_accuracy": hits}, models.router_statistics(
      state.get("intermediates", {}), model.config)


def _caption_plan(batch, embeds, rng):
  del embeds, rng
  tokens = jnp.sum((batch["text"][:, 1:] != PAD_ID).astype(jnp.float32))
  return {"count": jnp.maximum(tokens, 1.0), "metrics": {"caption_tokens": tokens}, "rows": {}}


def _caption_sums(params, model, outputs, microbatch, rows, batch, rng=None, *,
                  label_smoothing):
  del params, model, rows, batch, rng
  total, hits, _ = losses.caption_sums(outputs["caption_logits"], microbatch["text"][:, 1:],
                                       label_smoothing=label_smoothing)
  metrics = {"caption_accuracy": hits}
  if "source" in microbatch:  # A mixture: each source's sum, [sources] (see `source_metrics`).
    rows = losses.caption_row_sums(outputs["caption_logits"], microbatch["text"][:, 1:],
                                   label_smoothing=label_smoothing)
    metrics["source_caption_sums"] = rows @ microbatch["source"].astype(jnp.float32)
  return total, metrics, {}


def _itm_plan(batch, embeds, rng, examples: int = 0):
  """VLMo's ITM pairs, drawn once for the whole batch: per example row i, the positive (i, i),
  a hard negative text (i, t_i) and a hard negative image (m_i, i), sampled from the GLOBAL-batch
  contrastive similarities (`losses.hard_negatives`). Drawing them here, once, from the whole
  batch's embeddings is what makes the accumulated step equal the plain one: each microbatch
  then scores the pairs of its own rows. `examples` > 0 (config.loss.itm_examples) keeps the
  pairs of every (B / examples)-th row only, so each device keeps an equal share (under
  microbatches, `examples` must split into them too); their negatives still come from the
  whole batch."""
  if rng is None:
    raise ValueError("config.loss.itm_weight > 0 needs an rng for the hard negatives")
  batch_size = batch["image"].shape[0]
  neg_text, neg_image, (text_ok, image_ok) = losses.hard_negatives(
      embeds["image_embed"], embeds["text_embed"], embeds["logit_scale"], rng,
      text=batch["text"])
  rows = jnp.arange(batch_size, dtype=jnp.int32)
  if examples:
    if batch_size % examples:
      raise ValueError(f"config.loss.itm_examples={examples} must divide the batch {batch_size}")
    rows = rows[::batch_size // examples]
  # [E, 3]: the positive, the negative text and the negative image of each kept row.
  images = jnp.stack([rows, rows, neg_image[rows]], axis=1)
  texts = jnp.stack([rows, neg_text[rows], rows], axis=1)
  labels = jnp.broadcast_to(jnp.array([1, 0, 0], jnp.int32), images.shape)
  weights = jnp.stack([jnp.ones(rows.shape), text_ok[rows], image_ok[rows]],
                      axis=1).astype(jnp.float32)
  return {"count": jnp.maximum(jnp.sum(weights), 1.0), "metrics": {},
          "rows": {"image": images, "text": texts, "label": labels, "weight": weights}}


def _itm_sums(params, model, outputs, microbatch, rows, batch, rng=None):
  """The ITM pairs of this microbatch's share of the rows through the bidirectional fused pass,
  images and texts gathered from the whole batch. `rng`: the pass's own key (router noise,
  stochastic depth; see `training_rngs`)."""
  del outputs, microbatch
  logits, state = model.apply({"params": params}, batch["image"][rows["image"].reshape(-1)],
                              batch["text"][rows["text"].reshape(-1)], train=True,
                              method="itm_logits", mutable=["intermediates"],
                              rngs=training_rngs(model, rng))
  total, hits = losses.itm_sums(logits, rows["label"].reshape(-1), rows["weight"].reshape(-1))
  return total, {"itm_accuracy": hits}, models.router_statistics(state.get("intermediates", {}),
                                                                  model.config)


def _add_statistics(a: dict, b: dict) -> dict:
  """Router statistics of two passes through the same routers: summed per router."""
  return {**a, **{name: jax.tree.map(jnp.add, a[name], s) if name in a else s
                  for name, s in b.items()}}


def model_loss_terms(model: CoCa, loss_config, text_only: bool = False,
                     image_only: bool = False) -> list[LossTerm]:
  """`loss_terms` that `model` can compute: a MoME with the BERT text encoder (VLMo) has no
  captioner, so no caption term (the config refuses a caption weight for it). `text_only`: the
  terms of a batch without images (VLMo's stage 2: MLM on the text-only pass); `image_only`:
  of a batch without texts (masked image modelling, VLMo's stage 1 at demo scale)."""
  mome = getattr(model.config, "mome", None)
  captions = not (mome is not None and mome.bert)
  terms = [t for t in loss_terms(loss_config, model.config.text.vocab_size, model.config)
           if captions or t.name != "caption"]
  if text_only:
    terms = [t for t in terms if t.text_only]
    if not terms:
      raise ValueError("a text-only batch (no 'image') has nothing to train: set "
                       "config.loss.mlm_weight > 0 (VLMo's stage 2) or train on image-text data")
  if image_only:
    terms = [t for t in terms if t.image_only]
    if not terms:
      raise ValueError("an image-only batch (no 'text') has nothing to train: set "
                       "config.loss.mim_weight > 0 or train on image-text data")
  return terms


# The per-example [B, D] outputs a contrastive term can read (the rest are scalars).
EXAMPLE_EMBEDDINGS = ("image_embed", "text_embed", "image_vl_embed", "text_vl_embed")


def _embeddings(outputs) -> dict:
  """The model outputs the contrastive terms read (`LossTerm.embeddings`): the embedding pairs
  [B, D] and the scalars; a softmax model's logit bias is a zero."""
  keys = EXAMPLE_EMBEDDINGS + ("logit_scale", "logit_vl_scale")
  return {"logit_bias": outputs.get("logit_bias", jnp.zeros((), jnp.float32)),
          **{k: outputs[k] for k in keys if k in outputs}}


def _pass_rng(rng, name: str):
  """The key of a term's own forward pass (stochastic depth, router noise): one stream per
  term, so the ITM and MLM passes of a step draw independent drop masks."""
  if rng is None:
    return None
  return jax.random.fold_in(jax.random.fold_in(rng, 2), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def loss_fn(params, model: CoCa, batch, loss_config, rng=None):
  """(loss, metrics) of one batch: the weighted `loss_terms` plus the router terms. `rng` draws
  the ITM hard negatives (config.loss.itm_weight > 0, MoME only) and, each pass from its own
  stream, the routers' noise (experts' noise_std > 0) and stochastic depth (MoME
  drop_path_rate > 0). The config refuses both with microbatches, so the accumulated step runs
  without them."""
  pass_rng = None if rng is None else jax.random.fold_in(rng, 1)
  text_only, image_only = "image" not in batch, "text" not in batch
  if text_only or image_only:
    # VLMo's stage 2 (MLM) or BEiT's stage 1 (MIM): only those terms run, each its own pass.
    outputs, stats, embeds, metrics = {}, {}, {}, {}
  else:
    outputs, stats = apply_with_router_statistics(model, params, batch["image"], batch["text"],
                                                  pass_rng)
    embeds = _embeddings(outputs)
    metrics = {"logit_scale": outputs["logit_scale"]}
  total = 0.0
  for term in model_loss_terms(model, loss_config, text_only, image_only):
    if term.over_embeddings:
      value, term_metrics = term.fn(*(embeds[k] for k in term.embeddings))
    else:
      plan = term.prepare(batch, jax.lax.stop_gradient(embeds), rng)
      value, sums, term_stats = term.fn(params, model, outputs, batch, plan["rows"], batch,
                                        _pass_rng(rng, term.name))
      value = value / plan["count"]
      term_metrics = {**{k: v / plan["count"] for k, v in sums.items()}, **plan["metrics"]}
      stats = _add_statistics(stats, term_stats)
    total = total + term.weight * value
    metrics.update({f"{term.name}_loss": value, **term_metrics})
  if stats:
    router, router_metrics = losses.router_losses(stats, **losses.router_loss_settings(loss_config))
    total = total + router
    metrics.update(router_metrics)
  metrics["loss"] = total
  return total, metrics


def split_microbatches(batch, microbatches: int):
  """{name: [B, ...]} -> {name: [microbatches, B / microbatches, ...]}.

  Microbatch j takes rows j, j + m, j + 2m, ...: with the batch split in contiguous blocks over
  devices (and each device's block divisible by m) every device contributes its own rows to
  every microbatch, so no example moves between devices.
  """
  def split(x):
    per = x.shape[0] // microbatches
    x = jnp.swapaxes(x.reshape(per, microbatches, *x.shape[1:]), 0, 1)
    if not jax.sharding.get_abstract_mesh().empty:
      x = jax.lax.with_sharding_constraint(x, P(None, sharding.BATCH_AXES))
    return x
  return jax.tree.map(split, batch)


def merge_microbatches(x):
  """Inverse of `split_microbatches` for one array: [m, B/m, ...] -> [B, ...] in batch order."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def accumulated_loss_and_grads(params, model: CoCa, batch, loss_config, microbatches: int,
                               rng=None):
  """((loss, metrics), grads) equal to `jax.value_and_grad(loss_fn)` on the whole batch, with
  activation memory of one microbatch (see the module docstring for the three phases). The same
  `loss_terms` as `loss_fn`; a term's per-example plan (ITM pairs) is drawn once on the whole
  batch between phases 1 and 3, so `rng` draws the same negatives as in `loss_fn`."""
  text = batch["text"]
  if text.shape[0] % microbatches:
    raise ValueError(f"batch {text.shape[0]} is not divisible by config.train.microbatches="
                     f"{microbatches}")
  micro = split_microbatches(batch, microbatches)
  text_only, image_only = "image" not in batch, "text" not in batch
  terms = model_loss_terms(model, loss_config, text_only, image_only)
  single = text_only or image_only  # One modality: no image-text pass, no contrastive term.
  global_terms = [t for t in terms if t.over_embeddings]
  summed_terms = [t for t in terms if not t.over_embeddings]
  variables = {"params": params}
  read = {k for t in global_terms for k in t.embeddings}
  example_keys = [k for k in EXAMPLE_EMBEDDINGS if k in read]

  # 1. Embeddings of every example, one microbatch at a time.
  def embed(_, mb):
    if "image_vl_embed" in read:  # VLMo's VL-FFN pair comes with the full forward pass.
      outputs = model.apply(variables, mb["image"], mb["text"])
      return None, {k: outputs[k] for k in example_keys}
    image_embed, _ = model.apply(variables, mb["image"], method="encode_image")
    return None, {"image_embed": image_embed,
                  "text_embed": model.apply(variables, mb["text"], method="encode_text")}
  embeds = {}
  if global_terms:
    _, embeds = jax.lax.scan(embed, None, micro)
    embeds = {k: merge_microbatches(v) for k, v in embeds.items()}

  # 2. Whole-batch work: the contrastive losses with their gradients w.r.t. the embeddings and
  # temperatures, and each summed term's plan (its count, its sampled pairs).
  if not single:
    embeds["logit_scale"] = model.apply(variables, method="temperature_scale")
    embeds["logit_bias"] = params.get("logit_bias", jnp.zeros((), jnp.float32))
    if "logit_vl_scale" in read:
      embeds["logit_vl_scale"] = model.apply(variables, method="vl_temperature_scale")

  def embedding_terms(e):
    values = {t.name: t.fn(*(e[k] for k in t.embeddings)) for t in global_terms}
    return sum(t.weight * values[t.name][0] for t in global_terms), values
  global_values, g = {}, {}
  if global_terms:
    (_, global_values), g = jax.value_and_grad(embedding_terms, has_aux=True)(embeds)
  embeds = jax.lax.stop_gradient(embeds)
  plans = {t.name: t.prepare(batch, embeds, rng) for t in summed_terms}
  cached = split_microbatches({k: g[k] for k in example_keys}, microbatches)
  g_scalars = {k: v for k, v in g.items() if k not in example_keys}
  rows = split_microbatches({name: plan["rows"] for name, plan in plans.items()}, microbatches)

  # 3. Backprop per microbatch: each summed term's share (its sum over the WHOLE batch's
  # count), the linear surrogate whose gradient is the cached contrastive gradient, and the
  # router terms of this microbatch's passes.
  def surrogate(p, mb, mb_cached, mb_rows):
    total, stats, outputs = 0.0, {}, {}
    if not single:
      outputs, stats = apply_with_router_statistics(model, p, mb["image"], mb["text"])
      e = _embeddings(outputs)
      total = (sum(jnp.sum(mb_cached[k] * e[k]) for k in example_keys)
               + sum(g_scalars[k] * e[k] for k in g_scalars) / microbatches)
    shares = {}
    for term in summed_terms:
      value, sums, term_stats = term.fn(p, model, outputs, mb, mb_rows[term.name], batch)
      count = plans[term.name]["count"]
      shares[term.name] = (value / count, {k: v / count for k, v in sums.items()})
      total = total + term.weight * shares[term.name][0]
      stats = _add_statistics(stats, term_stats)
    # Router terms per microbatch, averaged (see the module docstring).
    router, _ = losses.router_losses(stats, **losses.router_loss_settings(loss_config))
    return total + router / microbatches, (shares, router / microbatches, stats)

  def backprop(grads, xs):
    mb, mb_cached, mb_rows = xs
    (_, aux), g = jax.value_and_grad(surrogate, has_aux=True)(params, mb, mb_cached, mb_rows)
    return jax.tree.map(jnp.add, grads, g), aux

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (shares, router_shares, stats) = jax.lax.scan(backprop, zeros, (micro, cached, rows))

  # The terms and metrics of the whole batch, named as `loss_fn` names them.
  total, metrics = 0.0, ({} if single else {"logit_scale": embeds["logit_scale"]})
  for term in terms:
    if term.over_embeddings:
      value, term_metrics = global_values[term.name]
    else:
      value = jnp.sum(shares[term.name][0])
      # Over the microbatch axis: a per-source metric stays a [sources] vector.
      term_metrics = {**jax.tree.map(lambda a: jnp.sum(a, axis=0), shares[term.name][1]),
                      **plans[term.name]["metrics"]}
    total = total + term.weight * value
    metrics.update({f"{term.name}_loss": value, **term_metrics})
  if stats:
    # Metrics from the statistics summed over microbatches: those of the whole batch.
    _, router_metrics = losses.router_losses(jax.tree.map(lambda a: jnp.sum(a, axis=0), stats),
                                             **losses.router_loss_settings(loss_config))
    router = jnp.sum(router_shares)
    total = total + router
    metrics.update({**router_metrics, "router_loss": router})
  metrics["loss"] = total
  return (total, metrics), grads


NONFINITE_POLICIES = schema.NONFINITE_POLICIES


def all_finite(tree) -> jax.Array:
  """One bool: every floating-point leaf of `tree` is free of NaN/inf. One fused reduction per
  leaf and an and over the leaves; integer leaves (step counters) cannot be non-finite."""
  flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return functools.reduce(jnp.logical_and, flags, jnp.bool_(True))


def guard_nonfinite(state: TrainState, new_state: TrainState, metrics: dict,
                    policy: str) -> tuple[TrainState, dict]:
  """Adds metrics["nonfinite"] (int32 0/1): the loss or the gradient norm is NaN/inf, or the
  update left a NaN/inf in the new parameters or optimizer state, i.e. in what a checkpoint
  of `new_state` would hold. With policy "skip", returns the old state unchanged (bit for bit,
  step counter included) when it is set. The flag is computed inside the step, so the host
  learns of it with the metrics it reads anyway, one step late; what to do then (halt, or
  count the skip) is the train loop's job.

  A state can be finite and still broken (weights of 1e29 after a huge learning rate give NaN
  in the next forward pass): that shows as the NEXT step's flag, which the train loop uses to
  mark a checkpoint known-good (see train.NonFiniteWatch)."""
  finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            & all_finite((new_state.params, new_state.opt_state)))
  if policy == "skip":
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  elif policy != "halt":
    raise ValueError(f"config.train.nonfinite={policy!r} is unknown; use one of "
                     f"{NONFINITE_POLICIES}")
  return new_state, {**metrics, "nonfinite": (~finite).astype(jnp.int32)}


def source_metrics(metrics: dict, batch, names: tuple[str, ...]) -> dict:
  """A mixture's per-source metrics (batch["source"]: one-hot [B, sources]): examples/<name>
  (rows of the global batch from each source) and loss/<name>, the captioning loss over that
  source's rows alone (its summed cross-entropy over its own token count). Only the caption
  term is split: the contrastive loss of a row depends on every other row of the batch (its
  negatives), so a per-source contrastive loss is not defined."""
  metrics = dict(metrics)
  onehot = batch["source"].astype(jnp.float32)
  examples = jnp.sum(onehot, axis=0)
  sums = metrics.pop("source_caption_sums", None)
  if sums is not None:
    # The term's metrics are divided by the whole batch's token count: undo it, then divide by
    # each source's own count.
    row_tokens = jnp.sum((batch["text"][:, 1:] != PAD_ID).astype(jnp.float32), axis=1)
    tokens = row_tokens @ onehot
    sums = sums * jnp.maximum(metrics["caption_tokens"], 1.0)
    for i, name in enumerate(names):
      metrics[f"loss/{name}"] = sums[i] / jnp.maximum(tokens[i], 1.0)
  for i, name in enumerate(names):
    metrics[f"examples/{name}"] = examples[i]
  return metrics


def train_step(state: TrainState, batch, base=None, *, model: CoCa,
               tx: optax.GradientTransformation, loss_config, schedule: Callable, rules,
               microbatches: int = 1, seed: int = 0, nonfinite: str = "halt",
               lora_scale: float = 1.0,
               source_names: tuple[str, ...] = ()) -> tuple[TrainState, dict]:
  """One optimizer update. Pure: (state, batch) -> (new state, metrics). Randomness (ITM hard
  negatives) comes from (seed, state.step), so a resumed run draws what it would have drawn.
  `nonfinite`: see `guard_nonfinite`. `base`: under LoRA, the frozen base parameters; the model
  then runs with `lora.apply(base, state.params, lora_scale)` and only state.params (adapters,
  unfrozen parameters) get gradients and updates. `source_names`: a mixture's sources, in the
  order of batch["source"]'s columns (`source_metrics`)."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  to_params = ((lambda p: p) if base is None
               else (lambda p: lora_lib.apply(base, p, lora_scale)))
  with nn.logical_axis_rules(rules):
    if microbatches > 1:
      # The accumulated step differentiates the model's parameters; the chain rule through
      # the LoRA transform (its VJP) turns those gradients into the adapters'.
      params, pullback = jax.vjp(to_params, state.params)
      (_, metrics), model_grads = accumulated_loss_and_grads(
          params, model, batch, loss_config, microbatches, rng)
      grads, = pullback(model_grads)
    else:
      grad_fn = jax.value_and_grad(lambda p, *args: loss_fn(to_params(p), *args), has_aux=True)
      (_, metrics), grads = grad_fn(state.params, model, batch, loss_config, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if base is None:
    params = clamp_logit_scale(params, model.config.max_logit_scale)
  elif lora_lib.UNFROZEN in params:  # A trained logit_scale lives among the unfrozen.
    params = {**params, lora_lib.UNFROZEN: clamp_logit_scale(params[lora_lib.UNFROZEN],
                                                             model.config.max_logit_scale)}
  if "source" in batch:
    metrics = source_metrics(metrics, batch, source_names)
  metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(state.params),
             "learning_rate": schedule(state.step)}
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  return guard_nonfinite(state, new_state, metrics, nonfinite)


# XLA:CPU removes jax.checkpoint's optimization barriers ('cse_barrier_expander') before it
# eliminates common subexpressions and schedules, so the recomputation of an unscanned
# rematerialised layer is merged back into the forward pass or scheduled beside it: remat then
# costs FLOPs and saves no memory (docs/performance.md, "MoME stacks by remat policy", measures
# it). The GPU and TPU compilers need no such option; a scanned stack has no barriers
# (its remat runs with prevent_cse off), and without remat the option changes nothing.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def compiler_options(mesh: Mesh) -> dict | None:
  """XLA options for a step compiled for `mesh`'s devices (see CPU_COMPILER_OPTIONS)."""
  return dict(CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


def make_train_step(model, tx, config, schedule, mesh: Mesh, shardings: TrainState, rules,
                    lora: LoraParts | None = None):
  """The train step jitted with explicit in/out shardings; the old state is donated. Under
  LoRA it is (state, batch, base) -> (state, metrics), the base read, never donated."""
  microbatches = int(config.train.microbatches)
  if microbatches < 1:
    raise ValueError(f"config.train.microbatches={microbatches} must be at least 1")
  problem = sharding.batch_split_problem(config.train.batch_size, sharding.batch_shards(mesh),
                                         microbatches, mesh.shape)
  if problem:
    raise ValueError(problem)
  step = functools.partial(train_step, model=model, tx=tx, loss_config=config.loss,
                           schedule=schedule, rules=rules, microbatches=microbatches,
                           seed=int(config.train.seed),
                           nonfinite=config.train.nonfinite,
                           lora_scale=lora.settings.scale if lora is not None else 1.0,
                           source_names=source_names(config))
  batch_in = batch_shardings(mesh, _text_only(config), _image_only(config))
  if source_names(config):
    batch_in["source"] = sharding.batch_sharding(mesh, 2)
  in_shardings = (shardings, batch_in)
  if lora is not None:
    in_shardings += (lora.base_shardings,)
  return jax.jit(step, in_shardings=in_shardings,
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,),
                 compiler_options=compiler_options(mesh))


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything built from a config before any array exists (config -> mesh, model, optimizer,
  abstract state), keeping the config it was built from. The train loop, the benchmark and the
  tests all start from here."""
  config: Any
  mesh: Mesh
  rules: tuple
  model: CoCa
  tx: optax.GradientTransformation
  schedule: Callable
  abstract_state: TrainState
  state_shardings: TrainState
  lora: LoraParts | None = None

  @property
  def sharded_abstract_state(self) -> TrainState:
    """The abstract state with each leaf carrying its sharding (ahead-of-time `lower` target)."""
    return sharding.with_shardings(self.abstract_state, self.state_shardings)

  @property
  def sharded_abstract_base(self):
    """Under LoRA, the frozen base's abstract tree with its shardings (None otherwise)."""
    if self.lora is None:
      return None
    return sharding.with_shardings(self.lora.base_abstract, self.lora.base_shardings)

  def init_state(self, seed: int | None = None, base=None) -> TrainState:
    """The initial state, each array materialised on its own shards (seed: config.train.seed).
    Under LoRA, `base` (default: `init_base(seed)`) gives the unfrozen parameters' start."""
    seed = self.config.train.seed if seed is None else seed
    init = make_init_fn(self.model, self.tx, self.config, self.state_shardings, self.lora)
    if self.lora is None:
      return init(jax.random.key(seed))
    return init(jax.random.key(seed), self.init_base(seed) if base is None else base)

  def init_base(self, seed: int = 0):
    """Freshly initialised base parameters on the base's shards (LoRA only; a real run reads
    its base from config.init.source, `warm_start.lora_base`)."""
    return jax.jit(lambda r: nn.unbox(_init_boxed_params(self.model, self.config, r)),
                   out_shardings=self.lora.base_shardings)(jax.random.key(seed))

  def model_params(self, state: TrainState, base=None):
    """The parameters the model runs with: `state.params`, or under LoRA the base with the
    adapters applied (what evals and exports use)."""
    if self.lora is None:
      return state.params
    return jax.jit(functools.partial(lora_lib.apply, scale=self.lora.settings.scale))(
        base, state.params)

  def step_args(self, base=None) -> tuple:
    """The train step's arguments after (state, batch): (base,) under LoRA, else ()."""
    return () if self.lora is None else (base,)

  def train_step(self):
    """The jitted train step (see `make_train_step`)."""
    return make_train_step(self.model, self.tx, self.config, self.schedule, self.mesh,
                           self.state_shardings, self.rules, self.lora)


def setup(config, devices=None) -> TrainSetup:
  """Builds mesh, logical-axis rules, model, optimizer and the abstract sharded state."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_axis_rules(config)
  model = build_model(config)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  abstract, shardings = state_shardings(model, tx, config, mesh, rules)
  return TrainSetup(config, mesh, rules, model, tx, schedule, abstract, shardings,
                    lora_parts(config, model, mesh, rules))


def _tree_bytes(tree) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def state_part_bytes(built: TrainSetup) -> dict:
  """Bytes of the train state's parts, from the abstract state (nothing allocated or compiled):
  the trained parameters, their optimizer state, and under LoRA the frozen base (read, never
  updated or checkpointed)."""
  abstract = built.abstract_state
  report = {"trained_param_bytes": _tree_bytes(abstract.params),
            "optimizer_state_bytes": _tree_bytes(abstract.opt_state)}
  if built.lora is not None:
    report["frozen_param_bytes"] = _tree_bytes(built.lora.base_abstract)
  return report
