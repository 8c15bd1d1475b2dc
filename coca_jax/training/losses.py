"""Losses. Each returns a scalar and never averages over padding.

Contrastive negatives come from the GLOBAL batch: under `jax.jit` with a batch-sharded input the
[B, B] similarity matrix spans every device's examples (XLA inserts the all-gather), so the
simple ('gathered') form below is already global. At the paper's batch (65,536) that matrix is
17 GB in f32, so `chunked_contrastive_loss` computes the same loss blockwise on a ring: each device
keeps its own image embeddings and the text embeddings travel device to device (`ppermute`), so
one device never holds more than a [local batch, local batch] block of logits. Both forms give
the same loss and gradients (tests/test_losses_scale.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import optax

from coca_jax.core import schema
from coca_jax.core.sharding import BATCH_AXES
from coca_jax.core.tokens import PAD_ID
from coca_jax.data import visual_codebook

CONTRASTIVE_IMPLS = schema.CONTRASTIVE_IMPLS
CONTRASTIVE_KINDS = schema.CONTRASTIVE_KINDS
CONTRASTIVE_REDUCTIONS = schema.CONTRASTIVE_REDUCTIONS


def _combine(i2t, t2i, reduction: str):
  if reduction not in CONTRASTIVE_REDUCTIONS:
    raise ValueError(f"config.loss.contrastive_reduction={reduction!r} is unknown; use one of "
                     f"{CONTRASTIVE_REDUCTIONS}")
  return i2t + t2i if reduction == "sum" else (i2t + t2i) / 2


def softmax_contrastive_loss(image_embed, text_embed, logit_scale, reduction: str = "sum"):
  """Symmetric InfoNCE over the batch: i2t + t2i (reduction 'sum', paper eq. 1) or their mean.

  image_embed, text_embed: [batch, D], L2-normalised; row i of each is a positive pair.
  logit_scale: scalar multiplier (1 / temperature).
  Returns (loss, metrics) with the image->text and text->image halves and in-batch accuracy.
  """
  logits = logit_scale * jnp.einsum("id,td->it", image_embed, text_embed,
                                    preferred_element_type=jnp.float32)
  labels = jnp.arange(logits.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  accuracy = (jnp.argmax(logits, axis=1) == labels).mean()
  t2i_accuracy = (jnp.argmax(logits, axis=0) == labels).mean()
  return _combine(i2t, t2i, reduction), {"contrastive_i2t": i2t, "contrastive_t2i": t2i,
                                        "contrastive_accuracy": accuracy,
                                        "contrastive_t2i_accuracy": t2i_accuracy}


def sigmoid_contrastive_loss(image_embed, text_embed, logit_scale, logit_bias):
  """Pairwise sigmoid loss (SigLIP): every (image, text) pair is an independent binary label.

  Normalised by batch size, as in the SigLIP paper. Returns (loss, metrics).
  """
  logits = logit_scale * jnp.einsum("id,td->it", image_embed, text_embed,
                                    preferred_element_type=jnp.float32) + logit_bias
  labels = 2 * jnp.eye(logits.shape[0]) - 1
  loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]
  return loss, {}


def _ring_contrastive_shard(image_embed, text_embed, logit_scale, logit_bias, *, kind: str,
                            axis_names: tuple[str, ...], num_shards: int, global_batch: int,
                            reduction: str = "sum"):
  """The per-device body of `chunked_contrastive_loss` (runs inside shard_map).

  image_embed, text_embed: this device's [local_batch, D]. Text blocks visit every device once
  around the ring; a visiting block carries its own running column statistics (text->image
  log-sum-exp and max), which arrive back home after the last hop. Each block's logits are
  recomputed in the backward pass (checkpointed body), so memory stays O(local_batch^2).
  Returns (loss, metrics), identical on every device.
  """
  image_embed = image_embed.astype(jnp.float32)
  text_embed = text_embed.astype(jnp.float32)
  perm = [(i, (i + 1) % num_shards) for i in range(num_shards)]
  shift = (lambda x: jax.lax.ppermute(x, axis_names, perm)) if num_shards > 1 else (lambda x: x)
  total = (lambda x: jax.lax.psum(x, axis_names)) if axis_names else (lambda x: x)
  def block_logits(text_block):
    logits = logit_scale * jnp.einsum("id,td->it", image_embed, text_block)
    return logits if logit_bias is None else logits + logit_bias

  if kind == "sigmoid":
    # Only the home block holds positives (its diagonal); every other block is all negatives.
    home = block_logits(text_embed)
    labels = 2 * jnp.eye(home.shape[0]) - 1
    home_sum = -jnp.sum(jax.nn.log_sigmoid(labels * home))

    @jax.checkpoint
    def visit(carry, _):
      text_block, loss_sum = carry
      text_block = shift(text_block)
      loss_sum = loss_sum - jnp.sum(jax.nn.log_sigmoid(-block_logits(text_block)))
      return (text_block, loss_sum), None

    (_, loss_sum), _ = jax.lax.scan(visit, (text_embed, home_sum), None, length=num_shards - 1)
    return total(loss_sum) / global_batch, {}

  home = block_logits(text_embed)
  # The diagonal of the same matmul (not a separate dot product) so that "positive >= max" is
  # exact when the positive is the largest logit.
  positives = jnp.diagonal(home)  # [local_batch]
  row_lse, row_max = jax.nn.logsumexp(home, axis=1), jnp.max(home, axis=1)
  col_lse, col_max = jax.nn.logsumexp(home, axis=0), jnp.max(home, axis=0)

  @jax.checkpoint
  def visit(carry, _):
    text_block, col_lse, col_max, row_lse, row_max = carry
    text_block, col_lse, col_max = shift(text_block), shift(col_lse), shift(col_max)
    logits = block_logits(text_block)
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
    col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(logits, axis=0))
    row_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
    col_max = jnp.maximum(col_max, jnp.max(logits, axis=0))
    return (text_block, col_lse, col_max, row_lse, row_max), None

  carry = (text_embed, col_lse, col_max, row_lse, row_max)
  (_, col_lse, col_max, row_lse, row_max), _ = jax.lax.scan(
      visit, carry, None, length=num_shards - 1)
  # After num_shards - 1 hops a block sits one device short of home: one more hop returns its
  # column statistics to the device that owns those texts.
  col_lse, col_max = shift(col_lse), shift(col_max)
  i2t = total(jnp.sum(row_lse - positives)) / global_batch
  t2i = total(jnp.sum(col_lse - positives)) / global_batch
  # Correct when the positive is the row's (column's) maximum, as argmax would say.
  hits_i2t = jax.lax.stop_gradient(positives >= row_max).astype(jnp.float32)
  hits_t2i = jax.lax.stop_gradient(positives >= col_max).astype(jnp.float32)
  return _combine(i2t, t2i, reduction), {"contrastive_i2t": i2t, "contrastive_t2i": t2i,
                                        "contrastive_accuracy": total(jnp.sum(hits_i2t)) / global_batch,
                                        "contrastive_t2i_accuracy":
                                            total(jnp.sum(hits_t2i)) / global_batch}


def chunked_contrastive_loss(image_embed, text_embed, logit_scale, logit_bias=None, *,
                             kind: str = "softmax", mesh=None, axis_names=BATCH_AXES,
                             reduction: str = "sum"):
  """Memory-bounded contrastive loss over the global batch (ring over the batch mesh axes).

  image_embed, text_embed: [batch, D] L2-normalised, sharded on their batch axis over
  `axis_names`; kind: 'softmax' (same value and gradients as `softmax_contrastive_loss`) or
  'sigmoid' (as `sigmoid_contrastive_loss`, needs `logit_bias`). mesh: the device mesh; default
  the one set by `jax.set_mesh` (no mesh: one device, one block). Returns (loss, metrics).
  """
  if kind not in CONTRASTIVE_KINDS:
    raise ValueError(f"kind={kind!r} is unknown; use one of {CONTRASTIVE_KINDS}")
  if kind == "sigmoid" and logit_bias is None:
    raise ValueError("the sigmoid contrastive loss needs the model's logit_bias")
  global_batch = image_embed.shape[0]
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return _ring_contrastive_shard(image_embed, text_embed, logit_scale, logit_bias, kind=kind,
                                   axis_names=(), num_shards=1, global_batch=global_batch,
                                   reduction=reduction)
  axis_names = tuple(a for a in axis_names if a in mesh.shape)
  num_shards = math.prod(mesh.shape[a] for a in axis_names)
  if global_batch % num_shards:
    raise ValueError(f"global batch {global_batch} is not divisible by the {num_shards} batch "
                     f"shards of the mesh; use a multiple of {num_shards}")
  has_bias = logit_bias is not None

  def body(image_shard, text_shard, scale, bias):
    return _ring_contrastive_shard(
        image_shard, text_shard, scale, bias if has_bias else None, kind=kind,
        axis_names=axis_names, num_shards=num_shards, global_batch=global_batch,
        reduction=reduction)

  bias = logit_bias if has_bias else jnp.zeros((), jnp.float32)
  return jax.shard_map(
      body, mesh=mesh, in_specs=(P(axis_names), P(axis_names), P(), P()),
      out_specs=P())(image_embed, text_embed, logit_scale, bias)


def contrastive_loss(image_embed, text_embed, logit_scale, logit_bias=None, *,
                     kind: str = "softmax", impl: str = "gathered", mesh=None,
                     reduction: str = "sum"):
  """The contrastive term chosen by config.loss.contrastive (`kind`),
  config.loss.contrastive_impl (`impl`) and config.loss.contrastive_reduction (`reduction`,
  softmax only). Returns (loss, metrics)."""
  if impl not in CONTRASTIVE_IMPLS:
    raise ValueError(f"config.loss.contrastive_impl={impl!r} is unknown; use one of "
                     f"{CONTRASTIVE_IMPLS}")
  if kind not in CONTRASTIVE_KINDS:
    raise ValueError(f"config.loss.contrastive={kind!r} is unknown; use one of "
                     f"{CONTRASTIVE_KINDS}")
  if kind == "sigmoid" and logit_bias is None:
    raise ValueError("the sigmoid contrastive loss needs the model's logit_bias; build the model "
                     "with step.build_model(config) so it follows config.loss.contrastive")
  if impl == "chunked":
    return chunked_contrastive_loss(image_embed, text_embed, logit_scale, logit_bias, kind=kind,
                                    mesh=mesh, reduction=reduction)
  if kind == "softmax":
    return softmax_contrastive_loss(image_embed, text_embed, logit_scale, reduction)
  return sigmoid_contrastive_loss(image_embed, text_embed, logit_scale, logit_bias)


def caption_sums(logits, labels, pad_id: int = PAD_ID, label_smoothing: float = 0.0):
  """(cross-entropy summed over non-pad labels, right tokens, counted tokens): the parts a
  batch-wide mean is built from, so microbatches can share one token count.

  logits: [batch, T, vocab] float32; labels: [batch, T] int32 (text[:, 1:]).
  """
  if label_smoothing:
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    per_token = optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, label_smoothing))
  else:  # No [batch, T, vocab] one-hot array: a gather of the label's logit is enough.
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weights = (labels != pad_id).astype(jnp.float32)
  # A token is right when its label's logit is the row's maximum. Not an argmax: XLA:CPU runs
  # that variadic reduce over the vocabulary slowly (docs/performance.md, "Against open_clip");
  # this max is the one the cross-entropy computes anyway. Exact ties would count as right; float logits
  # practically never tie.
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  hits = jnp.sum((label_logit >= jnp.max(logits, axis=-1)) * weights)
  return jnp.sum(per_token * weights), hits, weights.sum()


def caption_row_sums(logits, labels, pad_id: int = PAD_ID, label_smoothing: float = 0.0):
  """Cross-entropy summed over each row's non-pad labels: [batch] (`caption_sums`' total, per
  example; a mixture splits it by source)."""
  if label_smoothing:
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    per_token = optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, label_smoothing))
  else:
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(per_token * (labels != pad_id).astype(jnp.float32), axis=1)


def caption_loss(logits, labels, pad_id: int = 0, label_smoothing: float = 0.0):
  """Next-token cross-entropy averaged over non-pad labels.

  logits: [batch, T, vocab] float32; labels: [batch, T] int32 (text[:, 1:]).
  Returns (loss, metrics) with token accuracy and the number of counted tokens.
  """
  total, hits, tokens = caption_sums(logits, labels, pad_id, label_smoothing)
  count = jnp.maximum(tokens, 1.0)
  return total / count, {"caption_accuracy": hits / count, "caption_tokens": tokens}


def coca_loss(outputs, text, *, contrastive_weight: float = 1.0, caption_weight: float = 2.0,
              label_smoothing: float = 0.0, contrastive: str = "softmax", pad_id: int = PAD_ID,
              contrastive_impl: str = "gathered", mesh=None, contrastive_reduction: str = "sum"):
  """CoCa objective: contrastive_weight * contrastive + caption_weight * caption (paper: 1, 2).

  outputs: the model's dict (image_embed, text_embed, caption_logits, logit_scale[, logit_bias]).
  contrastive_impl: 'gathered' (one [B, B] logits matrix) or 'chunked' (the ring of
  `chunked_contrastive_loss`, over `mesh` or the `jax.set_mesh` one); same values.
  Returns (loss, metrics) with the weighted total and both parts.
  """
  con, con_metrics = contrastive_loss(
      outputs["image_embed"], outputs["text_embed"], outputs["logit_scale"],
      outputs.get("logit_bias"), kind=contrastive, impl=contrastive_impl, mesh=mesh,
      reduction=contrastive_reduction)
  if "caption_logits" not in outputs:  # A model without captioning (MoME with BERT text).
    total = contrastive_weight * con
    return total, {"loss": total, "contrastive_loss": con, "logit_scale": outputs["logit_scale"],
                   **con_metrics}
  cap, cap_metrics = caption_loss(outputs["caption_logits"], text[:, 1:], pad_id, label_smoothing)
  total = contrastive_weight * con + caption_weight * cap
  return total, {"loss": total, "contrastive_loss": con, "caption_loss": cap,
                 "logit_scale": outputs["logit_scale"], **con_metrics, **cap_metrics}


# -- Router (learned expert routing) --------------------------------------------------------

def router_loss_settings(loss_config) -> dict:
  """The router terms' settings from a completed `config.loss` (their defaults: schema.Loss)."""
  return {name: loss_config[name] for name in schema.ROUTER_LOSS_FIELDS}


def router_losses(statistics, *, router_balance_weight: float = 0.01,
                  router_local_entropy_weight: float = 0.0,
                  router_global_entropy_weight: float = 0.0,
                  router_global_entropy_threshold: float | None = None):
  """Auxiliary losses and metrics of learned routers from their sown statistics.

  statistics: {name: stats} per routed feed-forward (e.g. "vision/layer_1"), each the sums a
  router sows over its valid tokens: tokens (n), prob_sum [E] (sum of router probabilities),
  first_choice_count [E], choice_count [E] (all top-k choices, before capacity),
  dropped_count (choices over capacity), entropy_sum (sum of per-token router entropies).

  Per layer, with importance P_e = prob_sum_e / n and first-choice share f_e:
    balance        E * sum_e f_e P_e (Switch Transformer): 1 when balanced, E when one expert
                   takes every token; f_e is a count, so the gradient flows through P_e.
    local entropy  mean over tokens of H(p(token)) (LIMoE, minimised: confident routing).
    global entropy max(0, threshold - H(P)) (LIMoE, i.e. H(P) maximised up to the threshold:
                   every expert used across the batch). In the towers model each routed layer
                   sees one modality, so these are LIMoE's per-modality terms.
  Each term is averaged over layers and weighted. Returns (loss, metrics); metrics name each
  layer: router/<name>/{load_min, load_max} (an expert's share of the choices over the mean
  share), dropped_fraction, entropy (mean token entropy), global_entropy, balance_loss; and
  router_load_min, the smallest load_min of all layers.
  """
  if not statistics:
    return jnp.zeros((), jnp.float32), {}
  balance, local, global_gap, metrics = [], [], [], {}
  for name, s in statistics.items():
    num = s["prob_sum"].shape[-1]
    tokens = jnp.maximum(s["tokens"], 1.0)
    importance = s["prob_sum"] / tokens
    first_share = jax.lax.stop_gradient(s["first_choice_count"] / tokens)
    balance.append(num * jnp.sum(first_share * importance))
    local.append(s["entropy_sum"] / tokens)
    global_entropy = -jnp.sum(importance * jnp.log(jnp.maximum(importance, 1e-9)))
    threshold = (math.log(num) if router_global_entropy_threshold is None
                 else router_global_entropy_threshold)
    global_gap.append(jnp.maximum(0.0, threshold - global_entropy))
    choices = jnp.sum(s["choice_count"])
    share = s["choice_count"] / jnp.maximum(choices / num, 1e-9)
    metrics.update({
        f"router/{name}/load_min": jnp.min(share), f"router/{name}/load_max": jnp.max(share),
        f"router/{name}/dropped_fraction": s["dropped_count"] / jnp.maximum(choices, 1.0),
        f"router/{name}/entropy": local[-1], f"router/{name}/global_entropy": global_entropy,
        f"router/{name}/balance_loss": balance[-1]})
  mean = lambda terms: jnp.mean(jnp.stack(terms))
  metrics["router_load_min"] = jnp.min(jnp.stack(
      [v for k, v in metrics.items() if k.endswith("/load_min")]))  # The most starved expert.
  parts = {"router_balance_loss": mean(balance), "router_local_entropy_loss": mean(local),
           "router_global_entropy_loss": mean(global_gap)}
  total = (router_balance_weight * parts["router_balance_loss"]
           + router_local_entropy_weight * parts["router_local_entropy_loss"]
           + router_global_entropy_weight * parts["router_global_entropy_loss"])
  return total, {"router_loss": total, **parts, **metrics}


# -- Image-text matching (VLMo) ----------------------------------------------------------------


def hard_negatives(image_embed, text_embed, logit_scale, rng, duplicate_cosine: float = 1 - 1e-4,
                   text=None):
  """One hard negative text per image and one hard negative image per text (VLMo).

  Row i's negative text is drawn with probability softmax(logit_scale * image_i . text_j) over
  the global batch with j = i masked out, and likewise for images; candidates that duplicate
  the positive (cosine >= `duplicate_cosine` to it, e.g. the same caption twice in a batch) are
  masked too, since labelling them "no match" would be wrong. With `text` [B, L] (the batch's
  token ids) a candidate whose caption equals the positive's is masked on both sides: that
  text is the positive's own caption, and that image is described by it, so either pair is a
  match. (Where captions repeat, as the demo's "a red 7" does, the image side matters most:
  the images that share a caption are the most similar to it, so the hard negative image was
  mostly a true match, and ITM learned nothing.) image_embed, text_embed [B, D] unit norm (no
  gradient flows: sampling only); rng: a PRNG key.
  Returns (negative_text [B] int32, negative_image [B] int32 indices into the batch, valid [B]
  bool per kind: (text_valid, image_valid), False where every candidate was masked, e.g. a
  batch of one caption repeated, in which case the index is meaningless and must be ignored).
  """
  image_embed = jax.lax.stop_gradient(image_embed.astype(jnp.float32))
  text_embed = jax.lax.stop_gradient(text_embed.astype(jnp.float32))
  logits = jax.lax.stop_gradient(logit_scale) * (image_embed @ text_embed.T)  # [image, text]
  batch = logits.shape[0]
  not_self = ~jnp.eye(batch, dtype=bool)
  # Candidate text j for image i must differ from text i; candidate image j for text i must
  # differ from image i.
  text_allowed = not_self & ((text_embed @ text_embed.T) < duplicate_cosine)
  image_allowed = not_self & ((image_embed @ image_embed.T) < duplicate_cosine)
  if text is not None:
    same_caption = jnp.all(text[:, None, :] == text[None, :, :], axis=-1)
    text_allowed &= ~same_caption
    image_allowed &= ~same_caption
  rng_text, rng_image = jax.random.split(rng)
  neg_text = jax.random.categorical(rng_text, jnp.where(text_allowed, logits, -jnp.inf), axis=1)
  neg_image = jax.random.categorical(rng_image, jnp.where(image_allowed, logits.T, -jnp.inf),
                                     axis=1)
  return (neg_text.astype(jnp.int32), neg_image.astype(jnp.int32),
          (text_allowed.any(1), image_allowed.any(1)))


def itm_sums(logits, labels, weights):
  """(weighted 2-way cross-entropy summed over pairs, weighted right pairs). logits [N, 2]
  float32, labels [N] int (1 = match), weights [N] float (0 drops a pair)."""
  per_pair = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return (jnp.sum(per_pair * weights),
          jnp.sum((jnp.argmax(logits, -1) == labels) * weights))


def itm_loss(logits, labels, weights):
  """Weighted 2-way cross-entropy (see `itm_sums`). Returns (loss, metrics: itm_accuracy)."""
  total, hits = itm_sums(logits, labels, weights)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  return total / count, {"itm_accuracy": hits / count}


def mlm_mask(text, rng, *, probability: float, mask_id: int, vocab_size: int,
             special_ids=()):
  """BERT's masking for masked language modelling, as VLMo's data collator does it
  (transformers' DataCollatorForLanguageModeling): every token except padding and
  `special_ids` is picked with `probability`; a picked token is replaced by `mask_id` with
  probability 0.8, by a uniformly random id of the vocabulary with 0.1, and kept with 0.1.
  Deterministic in `rng`.

  text [batch, L] int32 -> (inputs [batch, L] int32, labels [batch, L] int32: the original
  token where picked, PAD_ID elsewhere, so `caption_sums(logits, labels)` scores the picked
  positions only; a picked token is never padding).
  """
  pick_rng, mask_rng, random_rng, id_rng = jax.random.split(rng, 4)
  eligible = text != PAD_ID
  for special in special_ids:
    eligible &= text != special
  picked = jax.random.bernoulli(pick_rng, probability, text.shape) & eligible
  masked = picked & jax.random.bernoulli(mask_rng, 0.8, text.shape)
  # Half of the remaining 20%: 10% of the picked tokens.
  randomised = picked & ~masked & jax.random.bernoulli(random_rng, 0.5, text.shape)
  random_ids = jax.random.randint(id_rng, text.shape, 0, vocab_size, dtype=text.dtype)
  inputs = jnp.where(masked, jnp.asarray(mask_id, text.dtype),
                     jnp.where(randomised, random_ids, text))
  return inputs, jnp.where(picked, text, jnp.asarray(PAD_ID, text.dtype))


def mlm_positions_bound(length: int, probability: float, tail: float = 1e-6) -> int:
  """How many positions per row the MLM head scores (the training step gathers each row's
  picked positions into this many slots): the smallest k with P(more than k of `length` tokens
  picked) < `tail` under `mlm_mask`'s rule (each token picked with `probability`, so at most a
  Binomial(length, probability) count; padding and special tokens only lower it). A row with
  more is still scored exactly: the step then falls back to every position. `length` when no
  smaller k qualifies."""
  if not 0.0 <= probability < 1.0:
    return length
  below = 0.0  # P(count <= k)
  for k in range(length + 1):
    below += math.comb(length, k) * probability ** k * (1.0 - probability) ** (length - k)
    if 1.0 - below < tail:
      return k
  return length


def mlm_sums(head, tokens, labels, bound: int | None = None):
  """(cross-entropy summed over the picked tokens, right predictions) of masked language
  modelling: `head` maps text tokens [batch, K, width] to float32 logits [batch, K, vocab];
  tokens [batch, L, width]; labels [batch, L] (`mlm_mask`'s: PAD_ID where not picked).

  `bound` < L (`mlm_positions_bound`): the head scores only `bound` positions per row, each
  row's picked ones first (in order) and unpicked ones after them, which count nothing, so the
  sums are those of every position (up to float rounding); a [batch, L, vocab] head on all
  positions would spend most of its work on tokens the loss ignores. A batch with a row of
  more than `bound` picked tokens is scored on every position instead (`lax.cond`: one branch
  runs), so no picked token is ever dropped."""
  def score(tokens, labels):
    total, hits, _ = caption_sums(head(tokens), labels)
    return total, hits
  length = labels.shape[1]
  if bound is None or bound >= length:
    return score(tokens, labels)
  picked = labels != PAD_ID
  # A stable sort of "not picked" puts each row's picked positions first, in their order.
  order = jnp.argsort((~picked).astype(jnp.int32), axis=1, stable=True)[:, :bound]

  def gathered():
    return score(jnp.take_along_axis(tokens, order[..., None], axis=1),
                 jnp.take_along_axis(labels, order, axis=1))
  overflow = jnp.max(jnp.sum(picked.astype(jnp.int32), axis=1)) > bound
  return jax.lax.cond(overflow, lambda: score(tokens, labels), gathered)


# -- Masked image modelling (BEiT) -------------------------------------------------------------

# Tries per image of `block_mask`: at the demo's 6 x 6 patches with blocks of 4 it reaches its
# count in almost every image; each try costs a [grid, grid] comparison.
BLOCK_MASK_TRIES = 64


def block_mask(rng, batch: int, grid: int, count: int, min_block: int,
               max_aspect: float = 1 / 0.3, tries: int = BLOCK_MASK_TRIES):
  """BEiT's blockwise masking: per image of a grid x grid patch grid, rectangles are drawn until
  `count` patches are masked: area uniform in [min_block, max(min_block, still to mask)],
  aspect ratio log-uniform in [1 / max_aspect, max_aspect], position uniform; a block is kept
  when it fits inside the grid (BEiT: strictly narrower and shorter than it) and adds between 1
  and the still-to-mask number of new patches. BEiT lets the last block shrink below
  min_block; here no block does, so a masked patch always has a masked neighbour. `tries`
  draws per image (BEiT stops after 10 failures in a row); an image can end a few patches
  short. Deterministic in `rng`. Returns bool [batch, grid * grid] (row-major, as `patchify`)."""
  log_aspect = math.log(max_aspect)
  cells = jnp.arange(grid)

  def one(key):
    def attempt(_, carry):
      mask, key = carry
      key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
      left_to_mask = count - jnp.sum(mask)
      area = jax.random.uniform(k_area, (), minval=min_block,
                                maxval=jnp.maximum(min_block, left_to_mask))
      aspect = jnp.exp(jax.random.uniform(k_aspect, (), minval=-log_aspect, maxval=log_aspect))
      h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
      w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
      top = jax.random.randint(k_top, (), 0, jnp.maximum(grid - h + 1, 1))
      left = jax.random.randint(k_left, (), 0, jnp.maximum(grid - w + 1, 1))
      block = (((cells[:, None] >= top) & (cells[:, None] < top + h))
               & ((cells[None, :] >= left) & (cells[None, :] < left + w)))
      new = jnp.sum(block & ~mask)
      keep = (h < grid) & (w < grid) & (new > 0) & (new <= left_to_mask)
      return jnp.where(keep, mask | block, mask), key

    mask, _ = jax.lax.fori_loop(0, tries, attempt, (jnp.zeros((grid, grid), bool), key))
    return mask.reshape(-1)

  return jax.vmap(one)(jax.random.split(rng, batch))


def visual_codes(patches, codebook, patch: int, cells: int):
  """Each patch's visual code (data/visual_codebook.py): the index of the codeword nearest
  (Euclidean) to its feature, each channel's mean over cells x cells cells, as the codebook was
  fitted. patches [batch, P, patch * patch * 3] float (`patchify`'s layout), codebook
  [K, cells * cells * 3] -> int32 [batch, P] (the MIM targets)."""
  features = visual_codebook.patch_features(patches.astype(jnp.float32), patch, cells)
  distances = (-2.0 * jnp.einsum("bpd,kd->bpk", features, codebook)
               + jnp.sum(codebook ** 2, axis=-1))  # |patch|^2 is the same for every code.
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def mim_sums(logits, targets, mask):
  """(cross-entropy summed over the masked patches, right predictions there): logits
  [batch, P, K] float32, targets [batch, P] int, mask [batch, P] bool. Unmasked patches count
  nothing (BEiT scores the masked positions only)."""
  per_patch = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  weights = mask.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  hits = jnp.sum((target_logit >= jnp.max(logits, axis=-1)) * weights)
  return jnp.sum(per_patch * weights), hits
