"""Caption generation with a KV cache: greedy, beam search, sampling (temperature, top-k,
nucleus), min/max length, EOS handling, and contrastive re-ranking of sampled candidates.

Every method is one jitted function: the image is encoded once, the BOS step fills the
self-attention cache and projects the image context for cross-attention once, then a
`lax.while_loop` runs ONE decoder step per new token (`CoCa.decode_step` on a `[batch, 1]`
input; the decoder's layers are unscanned, each updating its own cache in place) and stops as
soon as every caption has ended. `recompute_greedy` is the same greedy search re-running the
decoder over the whole (padded) prefix each token: the reference that tests and benchmarks
compare the cache against.

Token layout of the result (the training "text" layout): `tokens [batch, max_len]` int32 =
BOS, generated tokens..., EOS, PAD... A caption that hits the length limit has no EOS.

Lengths count generated tokens including the EOS; `min_len` forbids EOS before that many
non-EOS tokens; `max_new_tokens` (default and at most `max_len - 1`: the decoder's cache holds
`max_len - 1` positions) caps the generated tokens including EOS.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from coca_jax import models
from coca_jax.core import schema
from coca_jax.core.tokens import BOS_ID, EOS_ID, PAD_ID
from coca_jax.models import layers
from coca_jax.models.coca import CoCa, CoCaConfig
from coca_jax.models.kernels import cpu as cpu_kernels

METHODS = schema.DECODING_METHODS
NEG_INF = -1e30  # Finite, so `0 * NEG_INF` and `NEG_INF - NEG_INF` never produce NaN.


# Knobs passed to the compiled decoder as traced scalars: changing them never recompiles.
TRACED_FIELDS = ("max_new_tokens", "min_len", "length_penalty", "temperature", "top_k", "top_p")


class Decoding(schema.Decoding):
  """How to decode: the fields of `schema.Decoding` (see there), with their checks."""

  def validate(self, max_len: int) -> "Decoding":
    """Returns self with max_new_tokens resolved; raises ValueError naming the bad field."""
    if self.method not in METHODS:
      raise ValueError(f"decoding method={self.method!r} is unknown; use one of {METHODS}")
    limit = max_len - 1
    max_new = limit if self.max_new_tokens is None else self.max_new_tokens
    if not 1 <= max_new <= limit:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be in [1, {limit}] "
                       f"(config.model.text.max_len={max_len} minus the BOS)")
    if not 0 <= self.min_len <= max_new:
      raise ValueError(f"min_len={self.min_len} must be in [0, max_new_tokens={max_new}]")
    if self.num_beams < 1:
      raise ValueError(f"num_beams={self.num_beams} must be >= 1")
    if self.temperature <= 0:
      raise ValueError(f"temperature={self.temperature} must be > 0 (use method='greedy' for "
                       "the argmax)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
    if self.num_candidates < 1:
      raise ValueError(f"num_candidates={self.num_candidates} must be >= 1")
    if self.num_candidates > 1 and self.method != "sample":
      raise ValueError(f"num_candidates={self.num_candidates} re-ranks sampled captions; use "
                       "method='sample' (greedy and beam search give one candidate)")
    return dataclasses.replace(self, max_new_tokens=max_new)

  def split(self) -> tuple["Decoding", dict]:
    """(the static part with traced fields at their defaults, {field: jnp scalar})."""
    default = type(self)()
    static = dataclasses.replace(self, **{f: getattr(default, f) for f in TRACED_FIELDS})
    dtypes = dict(max_new_tokens=jnp.int32, min_len=jnp.int32, top_k=jnp.int32)
    knobs = {f: jnp.asarray(getattr(self, f), dtypes.get(f, jnp.float32)) for f in TRACED_FIELDS}
    return static, knobs


# ---------------------------------------------------------------------------------------------
# Pieces shared by the decoders
# ---------------------------------------------------------------------------------------------


def _decoder(model: CoCa, params, prepared=None) -> tuple[CoCa, dict]:
  """The KV-cached decoder of `model` and its parameters. Its layers are unscanned, each with its
  own cache buffers updated in place (see `Stack`); a scanned model's stacked parameters are
  sliced here, once per call, outside the token loop. `prepared`: the decoder's parameters from
  `decoder_params` (already unscanned, maybe quantized), used instead of slicing `params`."""
  if prepared is not None:
    config = model.config
    if getattr(config, "scan_layers", False):  # MoME never scans.
      config = dataclasses.replace(config, scan_layers=False)
    return models.build(config, decode=True), prepared
  config, params = models.unscanned_layers(model.config, params)
  return models.build(config, decode=True), params


def decoder_params(model: CoCa, params, weights: str | None = None) -> dict:
  """The parameters cached decoding reads, prepared once (pass them to `generate` as
  `decoder_params`): layer stacks unscanned; with `weights` ('int8' | 'bfloat16', see
  `layers.quantize_kernel`) every Dense kernel stored in that format, which `Dense` then
  multiplies with float32 accumulation. A cached step streams all decoder weights per token, so
  narrower weights are faster where the matmul reads them in place: on CPU the kernels of
  `coca_jax.models.kernels.cpu` do (the weights are then stored tiled for them;
  docs/performance.md, "Decoding weights"); elsewhere XLA widens them first.
  Embedding tables (the token lookup; the vocab head when tied to it) and routed experts'
  weights stay float32. weights=None: float32, as trained."""
  if weights is not None and weights not in layers.DECODE_WEIGHTS:
    raise ValueError(f"decode_weights={weights!r} is unknown; use one of "
                     f"{layers.DECODE_WEIGHTS} or None (float32)")
  _, unscanned = models.unscanned_layers(model.config, params)
  if weights is None:
    return unscanned
  tiled = jax.default_backend() == "cpu" and cpu_kernels.available()
  return jax.jit(functools.partial(_quantize_kernels, weights=weights, tiled=tiled))(unscanned)


def _quantize_kernels(tree, weights: str, tiled: bool):
  """Every Dense (a dict holding a 'kernel' matrix) in `tree` -> its `quantize_kernel` entries.
  An attention output projection ('out', [heads, kv, embed]) contracts two axes; the rest one."""
  out = {}
  for name, sub in tree.items():
    if isinstance(sub, Mapping) and "kernel" in sub and jnp.ndim(sub["kernel"]) >= 2:
      in_dims = 2 if name == "out" and jnp.ndim(sub["kernel"]) == 3 else 1
      rest = {key: value for key, value in sub.items() if key != "kernel"}
      out[name] = {**rest, **layers.quantize_kernel(sub["kernel"], in_dims, weights, tiled)}
    elif isinstance(sub, Mapping):
      out[name] = _quantize_kernels(sub, weights, tiled)
    else:
      out[name] = sub
  return out


def _first_step(decoder: CoCa, params, context):
  """BOS through the decoder: fills the cache (and the cross-attention K/V). -> (logits [B,V], cache)."""
  bos = jnp.full((context.shape[0], 1), decoder.config.text.bos_id, jnp.int32)
  logits, variables = decoder.apply(
      {"params": params}, bos, context, method="decode_step", mutable=["cache"])
  return logits[:, 0], variables["cache"]


def _next_step(decoder: CoCa, params, cache, tokens, context):
  """tokens [B] -> (logits [B, V] for the token after them, updated cache)."""
  logits, variables = decoder.apply(
      {"params": params, "cache": cache}, tokens[:, None], context, method="decode_step",
      mutable=["cache"])
  return logits[:, 0], variables["cache"]


def allowed_logits(logits, num_generated, min_len, bos_id: int = BOS_ID, eos_id: int = EOS_ID):
  """Masks tokens that may not come next: BOS and PAD never; EOS before `min_len` tokens.

  logits [B, V] float32; num_generated: scalar, tokens generated before this one.
  """
  vocab = jnp.arange(logits.shape[-1])
  banned = (vocab == bos_id) | (vocab == PAD_ID)
  banned = banned | ((vocab == eos_id) & (num_generated < min_len))
  return jnp.where(banned[None], NEG_INF, logits)


def filter_logits(logits, top_k=0, top_p=1.0):
  """Keeps the top_k largest logits (0 = all) and the smallest set of most likely tokens whose
  probability reaches top_p (nucleus; 1.0 = all); the rest become NEG_INF.

  logits [B, V] (already temperature-scaled); top_k, top_p may be traced scalars.
  """
  vocab = logits.shape[-1]
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
  in_top_k = jnp.arange(vocab)[None] < k
  probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, NEG_INF), axis=-1)
  # Mass strictly before each sorted token: a token is kept while that is still below top_p, so
  # the most likely token always stays.
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))
  threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, NEG_INF, logits)


def _finish(tokens, eos_id: int = EOS_ID):
  """Lengths [B] (generated tokens incl. EOS) from tokens [B, L]."""
  generated = tokens[:, 1:]
  is_eos = generated == eos_id
  has_eos = jnp.any(is_eos, axis=-1)
  first_eos = jnp.argmax(is_eos, axis=-1)
  no_eos_len = jnp.sum(generated != PAD_ID, axis=-1)
  return jnp.where(has_eos, first_eos + 1, no_eos_len).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Greedy and sampling: one candidate per row
# ---------------------------------------------------------------------------------------------


def _sample_loop(model: CoCa, params, context, rng, d: Decoding, return_logits: bool,
                 prepared=None):
  """Greedy (rng None) or sampling from the cache. -> dict(tokens [B, L], lengths [B],
  scores [B] = sum of the chosen tokens' log-probabilities under the unfiltered model,
  [logits [B, max_len - 1, V] raw step logits])."""
  batch, max_len = context.shape[0], model.config.text.max_len
  bos_id, eos_id = model.config.text.bos_id, model.config.text.eos_id
  max_new = d.max_new_tokens
  decoder, decoder_params = _decoder(model, params, prepared)
  logits, cache = _first_step(decoder, decoder_params, context)
  vocab = logits.shape[-1]
  tokens = jnp.full((batch, max_len), PAD_ID, jnp.int32).at[:, 0].set(bos_id)
  state = dict(i=jnp.array(0, jnp.int32), tokens=tokens, logits=logits, cache=cache,
               done=jnp.zeros((batch,), bool), scores=jnp.zeros((batch,), jnp.float32))
  if return_logits:
    state["all_logits"] = jnp.zeros((batch, max_len - 1, vocab), jnp.float32)

  def pick(logits, i):
    logits = allowed_logits(logits, i, d.min_len, bos_id, eos_id)
    if rng is None:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = filter_logits(logits / d.temperature, d.top_k, d.top_p)
    return jax.random.categorical(jax.random.fold_in(rng, i), scaled).astype(jnp.int32)

  def cond(s):
    return (s["i"] < max_new) & ~jnp.all(s["done"])

  def body(s):
    i = s["i"]
    next_token = pick(s["logits"], i)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(s["logits"]), next_token[:, None], 1)[:, 0]
    next_token = jnp.where(s["done"], PAD_ID, next_token)
    out = dict(s)
    if return_logits:
      out["all_logits"] = s["all_logits"].at[:, i].set(s["logits"])
    out["scores"] = s["scores"] + jnp.where(s["done"], 0.0, logprob)
    out["tokens"] = jax.lax.dynamic_update_slice(s["tokens"], next_token[:, None], (0, i + 1))
    out["done"] = s["done"] | (next_token == eos_id)
    out["i"] = i + 1
    # Skip the decoder step whose logits nobody would read (the loop is about to end).
    more = (i + 1 < max_new) & ~jnp.all(out["done"])
    out["logits"], out["cache"] = jax.lax.cond(
        more, lambda: _next_step(decoder, decoder_params, s["cache"], next_token, context),
        lambda: (s["logits"], s["cache"]))
    return out

  s = jax.lax.while_loop(cond, body, state)
  result = dict(tokens=s["tokens"], lengths=_finish(s["tokens"], eos_id), scores=s["scores"])
  if return_logits:
    result["logits"] = s["all_logits"]
  return result


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------


def cache_batch_axes(model: CoCa, params, context, prepared=None) -> Any:
  """For each cache leaf, the axis that indexes the batch (None for per-layer counters).

  Found by comparing the cache's shapes at two batch sizes, so it holds for any cache layout.
  Abstract: nothing is computed.
  """
  decoder, decoder_params = _decoder(model, params, prepared)
  shapes = [jax.eval_shape(lambda c: _first_step(decoder, decoder_params, c)[1],
                           jax.ShapeDtypeStruct((n, *context.shape[1:]), context.dtype))
            for n in (1, 2)]

  def axis(a, b):
    diff = [k for k, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return diff[0] if diff else None

  return jax.tree.map(axis, *shapes)


def _gather_cache(cache, axes, index):
  """Reorders every batched cache leaf along its batch axis: new row r = old row index[r]."""
  return jax.tree.map(lambda leaf, ax: leaf if ax is None else jnp.take(leaf, index, axis=ax),
                      cache, axes)


def _length_norm(scores, lengths, alpha: float):
  return scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** alpha


def _beam_search(model: CoCa, params, context, d: Decoding, prepared=None):
  """Beam search with a length penalty. -> dict(tokens [B, L], lengths [B], scores [B] (the
  length-normalised log-probability of the chosen beam))."""
  batch, max_len = context.shape[0], model.config.text.max_len
  bos_id, eos_id = model.config.text.bos_id, model.config.text.eos_id
  beams, max_new, alpha = d.num_beams, d.max_new_tokens, d.length_penalty
  axes = cache_batch_axes(model, params, context, prepared)
  decoder, decoder_params = _decoder(model, params, prepared)
  # Every beam starts as a copy of the BOS state; only beam 0 is live at first so the K copies
  # do not fill the first top-k with the same token.
  logits, cache = _first_step(decoder, decoder_params, context)
  rows = jnp.repeat(jnp.arange(batch), beams)
  cache = _gather_cache(cache, axes, rows)
  logits = logits[rows]
  ctx = context[rows]
  tokens = jnp.full((batch, beams, max_len), PAD_ID, jnp.int32).at[:, :, 0].set(bos_id)
  alive_scores = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (beams - 1), jnp.float32), (batch, 1))
  state = dict(
      i=jnp.array(0, jnp.int32), logits=logits, cache=cache, alive=tokens,
      alive_scores=alive_scores,
      finished=tokens, finished_scores=jnp.full((batch, beams), NEG_INF, jnp.float32),
      finished_norm=jnp.full((batch, beams), NEG_INF, jnp.float32))

  def cond(s):
    # Stop when no live beam can still beat the worst kept finished one: log-probabilities only
    # fall, so a live beam's best possible normalised score is its score now over the largest
    # length penalty it could reach.
    best_alive = s["alive_scores"][:, 0] / jnp.power(max_new.astype(jnp.float32),
                                                     jnp.maximum(alpha, 0.0))
    worst_finished = s["finished_norm"][:, -1]
    can_improve = jnp.any(best_alive > worst_finished)
    return (s["i"] < max_new) & can_improve

  def body(s):
    i = s["i"]
    vocab = s["logits"].shape[-1]
    logprobs = jax.nn.log_softmax(s["logits"])
    logprobs = allowed_logits(logprobs, i, d.min_len, bos_id, eos_id).reshape(batch, beams, vocab)
    candidates = (s["alive_scores"][:, :, None] + logprobs).reshape(batch, beams * vocab)
    # 2K candidates always hold K that do not end (at most K of them can be EOS: one per beam).
    top_scores, top_index = jax.lax.top_k(candidates, 2 * beams)
    parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    parent_tokens = jnp.take_along_axis(s["alive"], parent[:, :, None], axis=1)
    new_tokens = parent_tokens.at[:, :, i + 1].set(token)
    is_eos = token == eos_id
    # Live beams: the best K candidates that did not end.
    live_scores = jnp.where(is_eos, NEG_INF, top_scores)
    live_scores, live_pick = jax.lax.top_k(live_scores, beams)
    alive = jnp.take_along_axis(new_tokens, live_pick[:, :, None], axis=1)
    alive_parent = jnp.take_along_axis(parent, live_pick, axis=1)
    alive_token = jnp.take_along_axis(token, live_pick, axis=1)
    # Finished: merge the candidates that ended with the finished pool, keep the best K.
    # A caption may end only from the top K candidates (so one beam is exactly greedy search);
    # candidates grown from the NEG_INF placeholder beams of the first step are not real.
    ended = is_eos & (jnp.arange(2 * beams) < beams)[None] & (top_scores > NEG_INF / 2)
    ended_scores = jnp.where(ended, top_scores, NEG_INF)
    ended_norm = jnp.where(ended, _length_norm(top_scores, i + 1, alpha), NEG_INF)
    pool_tokens = jnp.concatenate([s["finished"], new_tokens], axis=1)
    pool_scores = jnp.concatenate([s["finished_scores"], ended_scores], axis=1)
    pool_norm = jnp.concatenate([s["finished_norm"], ended_norm], axis=1)
    finished_norm, keep = jax.lax.top_k(pool_norm, beams)
    out = dict(
        i=i + 1, alive=alive, alive_scores=live_scores,
        finished=jnp.take_along_axis(pool_tokens, keep[:, :, None], axis=1),
        finished_scores=jnp.take_along_axis(pool_scores, keep, axis=1),
        finished_norm=finished_norm)
    flat_parent = (jnp.arange(batch)[:, None] * beams + alive_parent).reshape(-1)
    cache = _gather_cache(s["cache"], axes, flat_parent)
    out["logits"], out["cache"] = jax.lax.cond(
        i + 1 < max_new,
        lambda: _next_step(decoder, decoder_params, cache, alive_token.reshape(-1), ctx),
        lambda: (s["logits"], cache))
    return out

  s = jax.lax.while_loop(cond, body, state)
  # Beams still live at the length limit are complete (truncated) captions: they compete with
  # the finished ones. Before the limit the loop only stops once none of them can win.
  at_limit = s["i"] >= max_new
  alive_norm = _length_norm(s["alive_scores"], s["i"], alpha)
  alive_norm = jnp.where(at_limit & (s["alive_scores"] > NEG_INF / 2), alive_norm, NEG_INF)
  pool_tokens = jnp.concatenate([s["finished"], s["alive"]], axis=1)
  pool_norm = jnp.concatenate([s["finished_norm"], alive_norm], axis=1)
  best = jnp.argmax(pool_norm, axis=1)
  best_tokens = jnp.take_along_axis(pool_tokens, best[:, None, None], axis=1)[:, 0]
  best_scores = jnp.take_along_axis(pool_norm, best[:, None], axis=1)[:, 0]
  return dict(tokens=best_tokens, lengths=_finish(best_tokens, eos_id), scores=best_scores)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def ensure_eos(tokens, eos_id: int = EOS_ID):
  """tokens [B, L] (BOS, generated..., [EOS], PAD...) -> the same captions, each ending in an
  EOS that the text tower reads. The text tower reads tokens[:, :-1], so a caption without EOS
  gets one right after its last token, or at position L-2 (replacing its last token) when it
  filled the whole sequence: the layout the tokenizer gives a caption of L-3 pieces. Without it,
  re-ranking would embed truncated captions without the EOS every training text had."""
  batch, length = tokens.shape
  body = tokens[:, 1:]
  has_eos = jnp.any(body == eos_id, axis=-1)
  end = jnp.minimum(jnp.sum(body != PAD_ID, axis=-1) + 1, length - 2)  # Where EOS goes.
  positions = jnp.arange(length)[None]
  fixed = jnp.where(positions == end[:, None], eos_id,
                    jnp.where(positions > end[:, None], PAD_ID, tokens))
  return jnp.where(has_eos[:, None], tokens, fixed)


def _rerank(model: CoCa, params, image_embed, result, num_candidates: int):
  """Keeps, per image, the candidate whose text embedding is most similar to the image's.
  result leaves are [B * N, ...] with the N candidates of image b at rows b*N .. b*N+N-1."""
  text_embed = model.apply({"params": params},
                           ensure_eos(result["tokens"], model.config.text.eos_id),
                           method="encode_text")
  batch = image_embed.shape[0]
  similarity = jnp.einsum("bd,bnd->bn", image_embed,
                          text_embed.reshape(batch, num_candidates, -1))
  best = jnp.argmax(similarity, axis=-1)
  rows = jnp.arange(batch) * num_candidates + best
  out = {k: v[rows] for k, v in result.items()}
  out["similarity"] = jnp.max(similarity, axis=-1)
  return out


def _generate(model: CoCa, params, images, d: Decoding, rng, return_logits: bool,
              prepared=None) -> dict:
  """The traced decoder (d validated; its TRACED_FIELDS may be tracers; `prepared`: see
  `decoder_params`)."""
  image_embed, context = model.apply({"params": params}, images, method="encode_image")
  if d.num_candidates > 1:
    rows = jnp.repeat(jnp.arange(images.shape[0]), d.num_candidates)
    context = context[rows]
  if d.method == "beam":
    result = _beam_search(model, params, context, d, prepared)
  else:
    result = _sample_loop(model, params, context, rng if d.method == "sample" else None, d,
                          return_logits, prepared)
  if d.num_candidates > 1:
    result = _rerank(model, params, image_embed, result, d.num_candidates)
  return result


@functools.lru_cache(maxsize=64)
def _compiled_generate(config: CoCaConfig, static: Decoding, return_logits: bool):
  model = models.build(config)

  def run(params, images, knobs, rng, prepared):
    return _generate(model, params, images, dataclasses.replace(static, **knobs), rng,
                     return_logits, prepared)
  return jax.jit(run)


def generate(model: CoCa, params, images, decoding: Decoding = Decoding(), rng=None,
             return_logits: bool = False, decoder_params=None) -> dict:
  """Captions (as tokens) for normalised images float32 [B, H, W, 3]. Jitted: compiles once per
  (model config, method, num_beams, num_candidates, batch shape); other Decoding fields are
  traced, so changing temperature or lengths does not recompile.

  Returns dict(tokens int32 [B, max_len] (BOS .. EOS PAD), lengths int32 [B] (generated tokens
  incl. EOS), scores float32 [B] (greedy/sample: sum of the tokens' log-probabilities; beam: that
  sum / length**length_penalty); with num_candidates > 1 also similarity [B] (image-text cosine of
  the kept caption); with return_logits (greedy/sample) logits float32 [B, max_len-1, V], the raw
  logits of each step, valid for the first `lengths` steps).

  `decoder_params` (from `decoder_params(model, params, weights)`): the decoder's parameters
  prepared once, e.g. int8 decoding weights; None: sliced from `params` inside each call. The
  image encoder and contrastive re-ranking always use `params`.
  """
  d = decoding.validate(model.config.text.max_len)
  if d.method == "sample" and rng is None:
    raise ValueError("method='sample' needs rng=jax.random.key(seed)")
  if d.method == "beam" and return_logits:
    raise ValueError("return_logits is only available for greedy and sampling")
  static, knobs = d.split()
  return _compiled_generate(model.config, static, return_logits)(
      params, images, knobs, rng if d.method == "sample" else None, decoder_params)


# ---------------------------------------------------------------------------------------------
# Reference: greedy decoding that recomputes the whole prefix every token (no cache)
# ---------------------------------------------------------------------------------------------


def recompute_greedy(model: CoCa, params, images, max_new_tokens: int | None = None,
                     min_len: int = 0, return_logits: bool = False) -> dict:
  """Greedy decoding WITHOUT a cache: each token re-runs both text decoders over the full
  padded text [B, max_len] (the causal mask makes the padding irrelevant). Same result layout
  as `generate`; jitted. The reference for tests and the baseline for benchmarks."""
  d = Decoding(max_new_tokens=max_new_tokens, min_len=min_len).validate(model.config.text.max_len)
  return _compiled_recompute(model.config, return_logits)(
      params, images, jnp.int32(d.max_new_tokens), jnp.int32(d.min_len))


@functools.lru_cache(maxsize=8)
def _compiled_recompute(config: CoCaConfig, return_logits: bool):
  return jax.jit(functools.partial(_recompute_greedy, models.build(config),
                                   return_logits=return_logits))


def _recompute_greedy(model: CoCa, params, images, max_new_tokens, min_len, return_logits):
  d = Decoding(max_new_tokens=max_new_tokens, min_len=min_len)
  _, context = model.apply({"params": params}, images, method="encode_image")
  batch, max_len = images.shape[0], model.config.text.max_len
  bos_id, eos_id = model.config.text.bos_id, model.config.text.eos_id
  tokens = jnp.full((batch, max_len), PAD_ID, jnp.int32).at[:, 0].set(bos_id)
  vocab = model.config.text.vocab_size
  state = dict(i=jnp.array(0, jnp.int32), tokens=tokens, done=jnp.zeros((batch,), bool),
               scores=jnp.zeros((batch,), jnp.float32),
               all_logits=jnp.zeros((batch, max_len - 1, vocab), jnp.float32))

  def body(s):
    i = s["i"]
    all_step_logits = model.apply({"params": params}, s["tokens"], context,
                                  method="teacher_forced_logits")
    logits = jax.lax.dynamic_index_in_dim(all_step_logits, i, axis=1, keepdims=False)
    next_token = jnp.argmax(allowed_logits(logits, i, d.min_len, bos_id, eos_id),
                            axis=-1).astype(jnp.int32)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), next_token[:, None], 1)[:, 0]
    next_token = jnp.where(s["done"], PAD_ID, next_token)
    return dict(
        i=i + 1,
        tokens=jax.lax.dynamic_update_slice(s["tokens"], next_token[:, None], (0, i + 1)),
        done=s["done"] | (next_token == eos_id),
        scores=s["scores"] + jnp.where(s["done"], 0.0, logprob),
        all_logits=s["all_logits"].at[:, i].set(logits))

  s = jax.lax.while_loop(lambda s: (s["i"] < d.max_new_tokens) & ~jnp.all(s["done"]), body, state)
  result = dict(tokens=s["tokens"], lengths=_finish(s["tokens"], eos_id), scores=s["scores"])
  if return_logits:
    result["logits"] = s["all_logits"]
  return result


def decode_texts(tokenizer, tokens) -> list[str]:
  """tokens [B, L] -> B strings (the tokenizer drops BOS/PAD and stops at EOS)."""
  return [tokenizer.decode(row) for row in np.asarray(tokens)]
