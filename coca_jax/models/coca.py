"""CoCa: a ViT image encoder, attentional poolers, and a text decoder split into a unimodal part
(contrastive text embedding from a CLS token appended at the end) and a multimodal part
(cross-attends to the image, predicts the next token).

Shapes: image [batch, H, W, 3] (normalised float), text [batch, L] int32 = BOS .. EOS PAD...
The decoder reads text[:, :-1] (teacher forcing); caption labels are text[:, 1:].
"""

from __future__ import annotations

import dataclasses
import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from coca_jax.core import schema
from coca_jax.core.tokens import PAD_ID
from coca_jax.models.backbone import Stack, unscanned_params
from coca_jax.models.layers import AttentionalPooler, LayerNorm, constrain, dense, embed_init, with_axes

POOLINGS = schema.TOWERS_POOLINGS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# The settings the model takes: config.model (backbone='towers') built by `schema.build`.
CoCaConfig = schema.CoCa


def compute_dtype(config):
  """The activations' dtype of a model config (its `dtype` name)."""
  return DTYPES[config.dtype]


def text_attention_mask(text_inputs, cls_mask: str = "correct"):
  """[batch, T+1] causal mask for T text inputs plus the CLS at the end.

  Every position sees itself and earlier non-pad positions; so the CLS (last) sees every non-pad
  token and itself. Pads only trail, so no real token ever loses a key to the pad mask.
  cls_mask='open_clip_legacy' reproduces the mask open_clip's published CoCa weights were
  trained with: the key-validity row shifted right by one (key 0 always valid, key j valid iff
  input j-1 is not a pad), so the CLS also sees the first pad and does not see itself unless
  the text fills the context. Real tokens see the same keys either way.
  Returns bool [batch, 1, T+1, T+1].
  """
  batch, length = text_inputs.shape
  valid, always = text_inputs != PAD_ID, jnp.ones((batch, 1), bool)
  if cls_mask == "correct":
    key_valid = jnp.concatenate([valid, always], axis=1)  # CLS is always valid.
  elif cls_mask == "open_clip_legacy":
    key_valid = jnp.concatenate([always, valid], axis=1)
  else:
    raise ValueError(f"config.model.text.cls_mask={cls_mask!r} is unknown; use 'correct' or "
                     "'open_clip_legacy'")
  causal = jnp.tril(jnp.ones((length + 1, length + 1), bool))
  return jnp.logical_and(causal[None, None], key_valid[:, None, None, :])


def patchify(image, config):
  """image [batch, S, S, 3] -> patches [batch, (S / p)^2, p * p * 3] in compute_dtype(config),
  row-major (p = config.patch_size); S must be config.image_size."""
  if image.shape[1:3] != (config.image_size, config.image_size):
    raise ValueError(f"image shape {image.shape} does not match config.model.image_size="
                     f"{config.image_size}")
  return einops.rearrange(image.astype(compute_dtype(config)), "b (h p) (w q) c -> b (h w) (p q c)",
                          p=config.patch_size, q=config.patch_size)


def temperature_scale(logit_scale, max_logit_scale: float):
  """The contrastive temperature scale exp(logit_scale) capped at max_logit_scale (a scalar),
  with a straight-through gradient: past the cap the forward value is the cap but the gradient
  is that of the uncapped scale, so the parameter can always come back (`clamp_logit_scale` keeps
  it at the cap after updates). The one formula the models, training and inference share."""
  capped = jnp.minimum(logit_scale, math.log(max_logit_scale))
  return jnp.exp(logit_scale + jax.lax.stop_gradient(capped - logit_scale))


def contrastive_parameters(module: nn.Module, config) -> None:
  """Creates `module.logit_scale` (and `module.logit_bias` for the sigmoid loss) in a model's
  `setup`. SigLIP's initialisation (scale 10, bias -10) keeps the many negatives from swamping
  the few positives at the start; softmax uses the paper's temperature (config.temperature_init).
  With `module.decode` it also creates the `position` cache variable: the next text position to
  be written, living beside the KV cache."""
  sigmoid = config.contrastive == "sigmoid"
  scale_init = math.log(10.0 if sigmoid else 1.0 / config.temperature_init)
  module.logit_scale = module.param(
      "logit_scale", nn.initializers.constant(scale_init), (), jnp.float32)
  if sigmoid:
    module.logit_bias = module.param("logit_bias", nn.initializers.constant(-10.0), (),
                                     jnp.float32)
  if module.decode:
    module.position = module.variable("cache", "position", lambda: jnp.array(0, jnp.int32))


def clamp_logit_scale(params, max_logit_scale: float):
  """params with logit_scale clamped to log(max_logit_scale) (applied after each update, as
  open_clip does), so the parameter never drifts past the cap where the loss cannot move it."""
  if "logit_scale" not in params:
    return params
  return {**params, "logit_scale": jnp.minimum(params["logit_scale"],
                                               math.log(max_logit_scale))}


def l2_normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def unscanned_layers(config: CoCaConfig, params) -> tuple[CoCaConfig, dict]:
  """(config, params) of the same model with unscanned layer stacks (`scan_layers=False`), the
  layout KV-cached decoding needs (see `Stack`). Slices each stacked parameter once."""
  if not config.scan_layers:
    return config, params
  params = dict(nn.meta.unbox(params))
  depths = {"vision": config.vision.depth, "unimodal": config.text.n_uni,
            "multimodal": config.text.n_multi}
  for name, depth in depths.items():
    params[name] = unscanned_params(params[name], depth)
  return dataclasses.replace(config, scan_layers=False), params


def router_statistics(intermediates, config: CoCaConfig) -> dict[str, dict]:
  """The sown 'intermediates' of a CoCa apply -> {"<stack>/layer_<i>": router statistics}, one
  entry per routed feed-forward (stack: vision, unimodal, multimodal; i counts within the
  stack), whether the stacks were scanned or not. Statistics: see `experts.FeedForward._routed`."""
  if not intermediates:  # A dense model sows nothing.
    return {}
  found = {}
  depths = {"vision": config.vision.depth, "unimodal": config.text.n_uni,
            "multimodal": config.text.n_multi}
  for stack_name, depth in depths.items():
    if stack_name not in intermediates:
      continue
    for layer_name, layer in unscanned_params(intermediates[stack_name], depth).items():
      stats = layer.get("ffn", {}).get("router")
      if stats is not None:
        found[f"{stack_name}/{layer_name}"] = stats[0]  # sow keeps a tuple of values.
  return dict(sorted(found.items(), key=lambda kv: (kv[0].split("/")[0],
                                                    int(kv[0].rsplit("_", 1)[1]))))


class CoCa(nn.Module):
  """The CoCa model. `decode=True` builds it for KV-cached decoding (`decode_step`); that needs
  `scan_layers=False` (`unscanned_layers` converts a scanned model's config and parameters)."""
  config: CoCaConfig
  decode: bool = False

  def setup(self):
    c = self.config
    if c.pooling not in POOLINGS:
      raise ValueError(f"config.model.pooling={c.pooling!r} is unknown; use one of {POOLINGS}")
    dt = compute_dtype(c)
    eps = c.norm_eps
    stack = lambda depth, heads, mlp, **kw: Stack(
        depth=depth, num_heads=heads, mlp_dim=mlp, dtype=dt, scan=c.scan_layers,
        remat="none" if self.decode else c.remat, activation=c.activation, norm_eps=eps, **kw)
    # Image tower.
    self.patch_embed = dense(c.vision.width, ("patch", "embed"), dt, "patch_embed",
                             use_bias=c.vision.patch_bias)
    if c.vision.class_token:
      self.image_cls_token = self.param("image_cls_token", with_axes(embed_init, ("embed",)),
                                        (c.vision.width,), jnp.float32)
    self.image_pos_embed = self.param(
        "image_pos_embed", with_axes(embed_init, ("length", "embed")),
        (c.image_tokens, c.vision.width), jnp.float32)
    if c.vision.ln_pre:
      self.ln_pre = LayerNorm(dt, eps)
    self.vision = stack(c.vision.depth, c.vision.heads, c.vision.mlp_dim, experts=c.vision.experts)
    if c.vision.final_norm:
      self.ln_vision = LayerNorm(dt, eps)
    n_queries = c.n_gen_queries
    self.generative_pooler = AttentionalPooler(n_queries, c.pooler_heads, dt, c.pooler_width, eps)
    if c.pooling != "open_clip":
      self.contrastive_pooler = AttentionalPooler(1, c.pooler_heads, dt, c.pooler_width, eps)
    # open_clip pooling normalises all pooled tokens with one LayerNorm (ln_image_embed).
    self.ln_image_embed = LayerNorm(dt, eps)
    if c.pooling != "open_clip":
      self.ln_image_context = LayerNorm(dt, eps)
    self.image_projection = dense(c.embed_dim, ("embed", "joint"), dt, "image_projection",
                                  use_bias=False)
    # Text tower.
    self.token_embed = nn.Embed(
        c.text.vocab_size, c.text.width, dtype=dt, param_dtype=jnp.float32,
        embedding_init=with_axes(embed_init, ("vocab", "embed")))
    self.text_pos_embed = self.param(
        "text_pos_embed", with_axes(embed_init, ("length", "embed")),
        (c.text.max_len, c.text.width), jnp.float32)
    self.cls_token = self.param("cls_token", with_axes(embed_init, ("embed",)),
                                (c.text.width,), jnp.float32)
    cache_length = c.text.max_len - 1
    # Routed text layers are causal (token-major slots); their capacity comes from the training
    # length (T-1 inputs + CLS, and T-1) so decoding a token at a time routes as training does.
    # `every` counts text layers across both decoders.
    text_routing = lambda offset, length: dict(experts=c.text.experts, layer_offset=offset,
                                               causal=True, capacity_length=length)
    self.unimodal = stack(c.text.n_uni, c.text.heads, c.text.mlp_dim, decode=self.decode,
                          cache_length=cache_length, **text_routing(0, c.text.max_len))
    self.ln_text_embed = LayerNorm(dt, eps)
    self.text_projection = dense(c.embed_dim, ("embed", "joint"), dt, "text_projection",
                                 use_bias=False)
    self.multimodal = stack(c.text.n_multi, c.text.heads, c.text.mlp_dim, cross_attention=True,
                            decode=self.decode, cache_length=cache_length,
                            layout=c.text.multimodal_layout,
                            **text_routing(c.text.n_uni, c.text.max_len - 1))
    self.ln_decoder = LayerNorm(dt, eps)
    if not c.tie_embeddings:
      self.vocab_head = dense(c.text.vocab_size, ("embed", "vocab"), dt, "vocab_head",
                              use_bias=c.text.vocab_bias, out_dtype=jnp.float32)
    contrastive_parameters(self, c)

  # -- Image ---------------------------------------------------------------------------------

  def encode_image(self, image):
    """image [batch, H, W, 3] -> (image_embed [batch, D] unit norm,
    decoder context [batch, context_tokens, pooler width (vision width unless pooler_width)])."""
    return self._pool_image(self._vision_tokens(image))

  def image_features(self, image):
    """image [batch, H, W, 3] -> (image_embed [batch, D] unit norm, the image encoder's output
    tokens [batch, image_tokens, vision width]: what the poolers read; the frozen-encoder
    probes train their own pooler on them (evaluation/probes.py))."""
    tokens = self._vision_tokens(image)
    return self._pool_image(tokens)[0], tokens

  def _vision_tokens(self, image):
    """image [batch, H, W, 3] -> the ViT's output tokens [batch, image_tokens, vision width]."""
    c = self.config
    x = self.patch_embed(patchify(image, c))
    if c.vision.class_token:
      cls = jnp.broadcast_to(self.image_cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.image_pos_embed.astype(compute_dtype(c))
    if c.vision.ln_pre:
      x = self.ln_pre(x)
    x = constrain(x, ("batch", "length", "embed"))
    tokens = self.vision(x)
    if c.vision.final_norm:
      tokens = self.ln_vision(tokens)
    return tokens

  def _pool_image(self, tokens):
    """Encoder tokens -> (image_embed, decoder context) as `encode_image` returns them."""
    c = self.config
    generative = self.generative_pooler(tokens)
    if c.pooling == "cascade":
      contrastive = self.contrastive_pooler(generative)[:, 0]
    elif c.pooling == "parallel":
      contrastive = self.contrastive_pooler(tokens)[:, 0]
    else:  # open_clip: query 0 is the contrastive token, the rest feed the decoder.
      pooled = self.ln_image_embed(generative)
      return l2_normalize(self.image_projection(pooled[:, 0])), pooled[:, 1:]
    image_embed = l2_normalize(self.image_projection(self.ln_image_embed(contrastive)))
    return image_embed, self.ln_image_context(generative)

  # -- Text ----------------------------------------------------------------------------------

  def _unimodal(self, text):
    """text [batch, L] -> (token states [batch, L-1, width], text_embed [batch, D])."""
    c = self.config
    if text.shape[1] != c.text.max_len:
      raise ValueError(f"text length {text.shape[1]} != config.model.text.max_len={c.text.max_len}")
    inputs = text[:, :-1]
    x = self.token_embed(inputs)
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([x, cls], axis=1) + self.text_pos_embed.astype(x.dtype)
    x = self.unimodal(x, mask=text_attention_mask(inputs, c.text.cls_mask))
    text_embed = l2_normalize(self.text_projection(self.ln_text_embed(x[:, -1])))
    return x[:, :-1], text_embed

  def encode_text(self, text):
    """text [batch, L] -> text_embed [batch, D] unit norm."""
    return self._unimodal(text)[1]

  def caption_logits(self, token_states, text_inputs, context):
    """Multimodal decoder: [batch, T, width] states -> float32 logits [batch, T, vocab]."""
    mask = text_attention_mask(text_inputs, self.config.text.cls_mask)[:, :, :-1, :-1]
    x = self.multimodal(token_states, mask=mask, context=context)
    logits = self._vocab_logits(self.ln_decoder(x))
    return constrain(logits, ("batch", "length", "vocab")).astype(jnp.float32)

  def _vocab_logits(self, x):
    """[batch, T, width] -> float32 [batch, T, vocab]: operands in the compute dtype, float32
    accumulation and output (a 64k-way softmax over bf16-rounded logits loses resolution)."""
    if self.config.tie_embeddings:
      table = self.token_embed.embedding.astype(x.dtype)
      return jnp.einsum("btw,vw->btv", x, table, preferred_element_type=jnp.float32)
    return self.vocab_head(x)

  def __call__(self, image, text, train: bool = False):
    """Returns dict(image_embed [B,D], text_embed [B,D], caption_logits [B,L-1,V],
    logit_scale scalar (already exp'd and clamped))."""
    del train  # No dropout: CoCa pretraining uses none.
    image_embed, context = self.encode_image(image)
    token_states, text_embed = self._unimodal(text)
    logits = self.caption_logits(token_states, text[:, :-1], context)
    outputs = {"image_embed": image_embed, "text_embed": text_embed, "caption_logits": logits,
               "logit_scale": self.temperature_scale()}
    if self.config.contrastive == "sigmoid":
      outputs["logit_bias"] = self.logit_bias
    return outputs

  def temperature_scale(self):
    """The scalar contrastive scale (see the module-level `temperature_scale`)."""
    return temperature_scale(self.logit_scale, self.config.max_logit_scale)

  def teacher_forced_logits(self, text, context):
    """Decoder logits [B, L-1, V] for text [B, L] given `encode_image`'s context (the reference
    that cached decoding is compared against)."""
    states, _ = self._unimodal(text)
    return self.caption_logits(states, text[:, :-1], context)

  # -- Decoding (KV cache) -------------------------------------------------------------------

  def decode_step(self, tokens, context):
    """One or more new tokens with the KV cache (`decode=True` only).

    tokens [batch, T] int32 at the next T positions; context [batch, Q, pooler width].
    Returns float32 logits [batch, T, vocab] for the token after each input.
    """
    if not self.decode:
      raise ValueError("decode_step needs a CoCa built with decode=True")
    start = self.position.value
    x = self.token_embed(tokens)
    pos = jax.lax.dynamic_slice_in_dim(self.text_pos_embed, start, tokens.shape[1], axis=0)
    x = x + pos.astype(x.dtype)
    self.position.value = start + tokens.shape[1]
    x = self.unimodal(x)
    x = self.multimodal(x, context=context)
    return self._vocab_logits(self.ln_decoder(x)).astype(jnp.float32)
