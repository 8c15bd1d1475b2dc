"""A VLMo-style mixture-of-modality-experts (MoME) CoCa: ONE stack of `depth` layers for image
and text. Every layer's self-attention (and its LayerNorm) is shared by both modalities; its
feed-forward is a per-modality expert with its own LayerNorm: `ffn_image` (V-FFN), `ffn_text`
(L-FFN), and in the top `fusion_layers` layers also `ffn_fusion` (VL-FFN). Which expert a token
uses is known statically from where it sits in the sequence (`backbone.Block` segments): no
router, no gather/scatter.

Shapes: image [batch, H, W, 3] (normalised float), text [batch, L] int32 = BOS .. EOS PAD...,
P = (H / patch)^2 image tokens, T = L - 1 text inputs (teacher forcing: inputs text[:, :-1],
labels text[:, 1:]), F = fusion_layers, B = depth - F bottom layers.

Passes over the same parameters:
  image-only  patches, bidirectional, ffn_image in all layers -> attentional pooler ->
              contrastive image embedding.
  text-only   T inputs + a CLS at the END, causal (the CLS sees every non-pad token),
              ffn_text in all layers -> contrastive text embedding from the CLS.
  fused       image tokens then text, prefix-causal (text sees every image token and earlier
              text; image tokens see only image tokens); ffn_image/ffn_text in the bottom B
              layers, ffn_fusion in the top F -> vocab head -> caption loss.
  itm         image tokens, text inputs and CLS, bidirectional, experts as in `fused`; a 2-way
              head on the CLS (VLMo's image-text matching).
Reuse: under the prefix-causal mask the image tokens never see text, so their states in the
fused pass are a function of the image alone: in the bottom B layers they ARE the image-only
pass's states, and in the top F layers they are those states run on through ffn_fusion. The
image-only pass therefore keeps each layer's image keys/values (`encode_image`'s context,
[batch, depth, 2, P, heads, head_dim]); the fused pass runs ONLY the text tokens through the
stack, attending to those keys/values as a prefix. Per example this costs the image-only pass
(P tokens x depth) + the top F layers on P image tokens + T text tokens x depth, instead of
(P + T) x depth again. Decoding (`decode_step`) writes the same prefix into the head of every
layer's KV cache on its first step; each later step costs one text token.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from coca_jax.models.backbone import remat_block
from coca_jax.models.coca import (DTYPES, contrastive_parameters, l2_normalize, patchify,
                                  temperature_scale, text_attention_mask)
from coca_jax.models.layers import (AttentionalPooler, LayerNorm, constrain, dense, embed_init,
                                    with_axes)
from coca_jax.core import schema
from coca_jax.core.tokens import PAD_ID

IMAGE, TEXT, FUSION = EXPERTS = schema.MODALITY_EXPERTS
POOLINGS = schema.MOME_POOLINGS


# The settings the model takes: config.model (backbone='mome') built by `schema.build`.
MoMEConfig = schema.MoME


def compute_dtype(config):
  return DTYPES[config.dtype]


def prefix_causal_mask(text_inputs, prefix_len: int):
  """[batch, 1, T, prefix_len + T]: text input t sees every prefix (image) token and the
  non-pad text inputs <= t."""
  batch = text_inputs.shape[0]
  causal = text_attention_mask(text_inputs)[:, :, :-1, :-1]
  prefix = jnp.ones((batch, 1, text_inputs.shape[1], prefix_len), bool)
  return jnp.concatenate([prefix, causal], axis=-1)


def router_statistics(intermediates, config: MoMEConfig) -> dict[str, dict]:
  """The sown 'intermediates' of a MoME apply -> {name: router statistics}, one entry per routed
  modality expert and modality of the tokens it routed, named after its parameters:
  "layers_<i>/ffn_image", "layers_<i>/ffn_text", "layers_<i>/ffn_fusion/image" and
  "layers_<i>/ffn_fusion/text" (LIMoE's per-modality terms for the expert both modalities
  share). An expert routes once per pass (image-only, text-only, captioning, ...); its entry
  sums the statistics of those calls, i.e. those of every token it routed this step.
  Statistics: see `experts.FeedForward._routed`."""
  found = {}
  for i in range(config.mome.depth):
    for expert in EXPERTS:
      sown = intermediates.get(f"layers_{i}", {}).get(f"ffn_{expert}", {})
      for key, calls in sorted(sown.items()):
        if not key.startswith("router"):
          continue
        name = f"layers_{i}/ffn_{expert}" + ("" if key == "router" else "/" + key[len("router_"):])
        found[name] = jax.tree.map(lambda *a: sum(a), *calls)
  return found


class MoME(nn.Module):
  """The MoME model, with the model-facing interface of `coca.CoCa` (`__call__`, `encode_image`
  -> (embed, context), `encode_text`, `temperature_scale`, `decode_step` with `decode=True`),
  plus `itm_logits`. Layers are unrolled (no scan): each has its own set of experts; with
  `config.remat` each is rematerialised in training (not with `decode`)."""
  config: MoMEConfig
  decode: bool = False
  itm: bool = False  # Build the image-text matching head (config.loss.itm_weight > 0).

  def setup(self):
    c = self.config
    if not 0 <= c.mome.fusion_layers <= c.mome.depth:
      raise ValueError(f"config.model.mome.fusion_layers={c.mome.fusion_layers} must be in "
                       f"[0, depth={c.mome.depth}]")
    if c.pooling not in POOLINGS:
      raise ValueError(f"config.model.pooling={c.pooling!r} is unknown for a MoME; use one of "
                       f"{POOLINGS}")
    dt = compute_dtype(c)
    self.patch_embed = dense(c.mome.width, ("patch", "embed"), dt, "patch_embed")
    self.image_pos_embed = self.param(
        "image_pos_embed", with_axes(embed_init, ("length", "embed")),
        (c.image_tokens, c.mome.width), jnp.float32)
    if c.pooling == "cls":
      self.image_cls_token = self.param("image_cls_token", with_axes(embed_init, ("embed",)),
                                        (c.mome.width,), jnp.float32)
    self.token_embed = nn.Embed(
        c.text.vocab_size, c.mome.width, dtype=dt, param_dtype=jnp.float32,
        embedding_init=with_axes(embed_init, ("vocab", "embed")))
    self.text_pos_embed = self.param(
        "text_pos_embed", with_axes(embed_init, ("length", "embed")),
        (c.text.max_len, c.mome.width), jnp.float32)
    self.cls_token = self.param("cls_token", with_axes(embed_init, ("embed",)), (c.mome.width,),
                                jnp.float32)
    # Decoding caches the image prefix and the text positions of every layer.
    cache_length = c.image_tokens + c.text.max_len - 1
    block = remat_block("none" if self.decode else c.remat)
    self.layers = [block(c.mome.heads, c.mome.mlp_dim, dt, decode=self.decode,
                         cache_length=cache_length, modality_experts=c.mome.layer_experts(i),
                         routed_experts=c.mome.routed_experts(i))
                   for i in range(c.mome.depth)]
    self.ln_image = LayerNorm(dt)
    if c.pooling == "attention":
      self.contrastive_pooler = AttentionalPooler(1, c.pooler_heads, dt)
    self.ln_image_embed = LayerNorm(dt)
    self.image_projection = dense(c.embed_dim, ("embed", "joint"), dt, "image_projection",
                                  use_bias=False)
    self.ln_text = LayerNorm(dt)
    self.text_projection = dense(c.embed_dim, ("embed", "joint"), dt, "text_projection",
                                 use_bias=False)
    self.ln_fused = LayerNorm(dt)
    if not c.tie_embeddings:
      self.vocab_head = dense(c.text.vocab_size, ("embed", "vocab"), dt, "vocab_head")
    if self.itm:
      self.itm_head = dense(2, ("embed", None), dt, "itm_head")
    contrastive_parameters(self, c)

  def _layer(self, i: int, x, mask, segments, prefix_kv=None, return_kv: bool = False,
             token_mask=None, causal_routing: bool = False, routing_length: int = 0):
    """Layer `i` (a `backbone.Block`; see there for the arguments) on x [batch, length, width]
    -> (x', keys/values or None). Every argument goes positionally: with config.remat the
    block is rematerialised and takes its static ones (segments, flags) by position."""
    return self.layers[i](x, mask, None, segments, prefix_kv, return_kv, token_mask,
                          causal_routing, routing_length)

  # -- Inputs --------------------------------------------------------------------------------

  def _image_tokens(self, image):
    """image [batch, H, W, 3] -> embedded image tokens [batch, image_tokens, width] (the
    [CLS] first with pooling='cls', then the patches)."""
    c = self.config
    x = self.patch_embed(patchify(image, c))
    if c.pooling == "cls":
      cls = jnp.broadcast_to(self.image_cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.image_pos_embed.astype(compute_dtype(c))
    return constrain(x, ("batch", "length", "embed"))

  def _text_tokens(self, text, with_cls: bool):
    """text [batch, L] -> embedded inputs text[:, :-1] [batch, T, width] (+ the CLS at the end:
    [batch, T + 1, width])."""
    c = self.config
    if text.shape[1] != c.text.max_len:
      raise ValueError(f"text length {text.shape[1]} != config.model.text.max_len={c.text.max_len}")
    x = self.token_embed(text[:, :-1])
    if with_cls:
      cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([x, cls], axis=1)
    return x + self.text_pos_embed[:x.shape[1]].astype(x.dtype)

  # -- Image ---------------------------------------------------------------------------------

  def encode_image(self, image):
    """image [batch, H, W, 3] -> (image_embed [batch, D] unit norm, context [batch, depth, 2,
    P, heads, head_dim]: each layer's keys and values of the image tokens of a fused
    prefix-causal pass, for `caption_logits` and `decode_step`)."""
    c = self.config
    x = self._image_tokens(image)
    segments = ((IMAGE, x.shape[1]),)
    prefix_kv, entering_fusion = [], x
    for i in range(c.mome.depth):
      if i == c.mome.bottom_layers:
        entering_fusion = x
      x, kv = self._layer(i, x, None, segments, return_kv=True)
      if i < c.mome.bottom_layers:  # Same states, so same keys/values, as in the fused pass.
        prefix_kv.append(kv)
    tokens = self.ln_image(x)
    pooled = tokens[:, 0] if c.pooling == "cls" else self.contrastive_pooler(tokens)[:, 0]
    image_embed = l2_normalize(self.image_projection(self.ln_image_embed(pooled)))
    # The top layers of the fused pass see image tokens through ffn_fusion; they still attend to
    # image tokens only. (Unused outputs, e.g. when only the embedding is wanted, are dropped by
    # XLA's dead-code elimination under jit.)
    y = entering_fusion
    for i in range(c.mome.bottom_layers, c.mome.depth):
      y, kv = self._layer(i, y, None, ((FUSION, y.shape[1], IMAGE),), return_kv=True)
      prefix_kv.append(kv)
    context = jnp.stack([jnp.stack(kv, axis=1) for kv in prefix_kv], axis=1)
    return image_embed, context

  # -- Text ----------------------------------------------------------------------------------

  def encode_text(self, text):
    """text [batch, L] -> text_embed [batch, D] unit norm (CLS at the end, causal, ffn_text)."""
    x = self._text_tokens(text, with_cls=True)
    mask = text_attention_mask(text[:, :-1])
    valid = jnp.concatenate([text[:, :-1] != PAD_ID, jnp.ones((text.shape[0], 1), bool)], axis=1)
    for i in range(self.config.mome.depth):
      x, _ = self._layer(i, x, mask, ((TEXT, x.shape[1]),), token_mask=valid,
                         causal_routing=True)
    return l2_normalize(self.text_projection(self.ln_text(x[:, -1])))

  # -- Fused: captions -----------------------------------------------------------------------

  def caption_logits(self, text, context):
    """Teacher-forced fused pass: text [batch, L] and the image `context` of `encode_image` ->
    float32 logits [batch, T, vocab] for text[:, 1:]. Only the text tokens run the layers."""
    c = self.config
    x = self._text_tokens(text, with_cls=False)
    mask = prefix_causal_mask(text[:, :-1], context.shape[3])
    for i in range(c.mome.depth):
      x, _ = self._layer(i, x, mask, ((c.mome.fused_expert(i, TEXT), x.shape[1], TEXT),),
                         prefix_kv=(context[:, i, 0], context[:, i, 1]),
                         token_mask=text[:, :-1] != PAD_ID, **self._causal_text_routing())
    return self._vocab_logits(x)

  def _causal_text_routing(self) -> dict:
    """Routed experts on the captioning text: slots token-major, capacity from the training
    length T, so decoding a token at a time routes exactly as the teacher-forced pass."""
    return dict(causal_routing=True, routing_length=self.config.text.max_len - 1)

  def _vocab_logits(self, x):
    """[batch, T, width] fused text states -> float32 [batch, T, vocab]."""
    x = self.ln_fused(x)
    logits = self.token_embed.attend(x) if self.config.tie_embeddings else self.vocab_head(x)
    return constrain(logits, ("batch", "length", "vocab")).astype(jnp.float32)

  # -- Fused: image-text matching ------------------------------------------------------------

  def itm_logits(self, image, text):
    """Image-text matching of pairs (image[b], text[b]): one bidirectional fused pass over image
    tokens, text inputs and the CLS; 2-way logits float32 [batch, 2] (index 1 = match) from the
    CLS. Needs the ITM head (config.loss.itm_weight > 0)."""
    c = self.config
    if not self.itm:
      raise ValueError("this MoME has no ITM head; train it with config.loss.itm_weight > 0")
    image_tokens = self._image_tokens(image)
    text_tokens = self._text_tokens(text, with_cls=True)
    x = jnp.concatenate([image_tokens, text_tokens.astype(image_tokens.dtype)], axis=1)
    num_image, num_text = image_tokens.shape[1], text_tokens.shape[1]
    key_valid = jnp.concatenate(
        [jnp.ones((x.shape[0], num_image), bool), text[:, :-1] != PAD_ID,
         jnp.ones((x.shape[0], 1), bool)], axis=1)
    mask = key_valid[:, None, None, :]
    for i in range(c.mome.depth):
      if i < c.mome.bottom_layers:
        segments = ((IMAGE, num_image), (TEXT, num_text))
      else:  # Each modality's tokens routed on their own (as in the other passes).
        segments = ((FUSION, num_image, IMAGE), (FUSION, num_text, TEXT))
      x, _ = self._layer(i, x, mask, segments, token_mask=key_valid)
    return self.itm_head(self.ln_fused(x[:, -1])).astype(jnp.float32)

  # -- Training interface --------------------------------------------------------------------

  def __call__(self, image, text, train: bool = False):
    """Returns dict(image_embed [B,D], text_embed [B,D], caption_logits [B,L-1,V],
    logit_scale scalar (already exp'd and clamped)[, logit_bias])."""
    del train  # No dropout.
    image_embed, context = self.encode_image(image)
    outputs = {"image_embed": image_embed, "text_embed": self.encode_text(text),
               "caption_logits": self.caption_logits(text, context),
               "logit_scale": self.temperature_scale()}
    if self.config.contrastive == "sigmoid":
      outputs["logit_bias"] = self.logit_bias
    if self.itm and self.is_initializing():
      self.itm_logits(image, text)  # Creates the ffn_fusion/ITM parameters the ITM pass uses.
    return outputs

  def temperature_scale(self):
    """The scalar contrastive scale (see `coca.temperature_scale`)."""
    return temperature_scale(self.logit_scale, self.config.max_logit_scale)

  def teacher_forced_logits(self, text, context):
    """Decoder logits [B, L-1, V] for text [B, L] given `encode_image`'s context (the reference
    that cached decoding is compared against)."""
    return self.caption_logits(text, context)

  # -- Decoding (KV cache) -------------------------------------------------------------------

  def decode_step(self, tokens, context):
    """One or more new text tokens with the KV cache (`decode=True` only).

    tokens [batch, n] int32 at the next n text positions; context: `encode_image`'s. The first
    call writes every layer's image keys/values into the head of its cache; later calls only
    read them. Returns float32 logits [batch, n, vocab] for the token after each input.
    """
    if not self.decode:
      raise ValueError("decode_step needs a MoME built with decode=True")
    c = self.config
    start = self.position.value
    x = self.token_embed(tokens)
    pos = jax.lax.dynamic_slice_in_dim(self.text_pos_embed, start, tokens.shape[1], axis=0)
    x = x + pos.astype(x.dtype)
    self.position.value = start + tokens.shape[1]
    for i in range(c.mome.depth):
      x, _ = self._layer(i, x, None, ((c.mome.fused_expert(i, TEXT), x.shape[1], TEXT),),
                         prefix_kv=(context[:, i, 0], context[:, i, 1]),
                         **self._causal_text_routing())
    return self._vocab_logits(x)
