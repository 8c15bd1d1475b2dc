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

VLMo as published (`text_encoder='bert'` and the options beside it; docs/vlmo.md): the text is
BERT's, text [batch, L] = [CLS] .. [SEP] PAD..., all of it the input (no shift), embedded as BERT
does (word + token type 0 (+ position), LayerNorm, dropout), bidirectional with a key-padding
mask; the contrastive embeddings come from the first token ([CLS]) after the final norm; the
fused pass is text THEN image tokens, bidirectional, with the ITM pooler (dense + tanh) on the
text [CLS] and an MLM head on the text positions. There is no captioning and no decoding.
`vl_contrastive` adds VLMo's second pair of contrastive embeddings from the top `fusion_layers`
run through ffn_fusion on each modality alone. The parity test (tests/test_vlmo.py) holds
every pass to the official code's outputs.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from coca_jax.core import schema
from coca_jax.core.tokens import PAD_ID
from coca_jax.models.backbone import remat_block
from coca_jax.models.coca import (DTYPES, contrastive_parameters, l2_normalize, patchify,
                                  temperature_scale, text_attention_mask)
from coca_jax.models.layers import (ACTIVATIONS, AttentionalPooler, LayerNorm, constrain, dense,
                                    embed_init, with_axes)

IMAGE, TEXT, FUSION = EXPERTS = schema.MODALITY_EXPERTS
POOLINGS = schema.MOME_POOLINGS
BERT_NORM_EPS = 1e-12  # BERT's embedding and MLM-head LayerNorms (VLMo keeps them).


# The settings the model takes: config.model (backbone='mome') built by `schema.build`.
MoMEConfig = schema.MoME


def compute_dtype(config):
  return DTYPES[config.dtype]


def relative_position_rows(grid: int, relative_text_length: int) -> tuple[int, int]:
  """(image rows, all rows) of VLMo's relative position table for a grid x grid patch image:
  the image rows are (2 grid - 1)^2 patch offsets and 3 [CLS] entries; after them come 2
  text<->image entries and 2 * relative_text_length text rows (offsets, then 3 [CLS] entries
  at the end), numbered as the official `build_relative_position_embed` does."""
  image_rows = (2 * grid - 1) ** 2 + 3
  return image_rows, image_rows + 2 * relative_text_length + 2


@functools.lru_cache(maxsize=None)
def relative_position_index(kind: str, grid: int, text_len: int,
                            relative_text_length: int) -> np.ndarray:
  """The static row of VLMo's relative position table for every (query, key) pair of a pass:
  kind 'image' [P+1, P+1] ([CLS] then patches), 'text' [L, L] ([CLS] first), 'fused'
  [L + P+1, L + P+1] (text then image). Built on the host once per shape (a trace-time
  constant): patches by 2-D offset, text by 1-D offset, [CLS] rows/columns and text<->image
  pairs by their own entries, as the official code numbers them."""
  image_rows, all_rows = relative_position_rows(grid, relative_text_length)
  coords = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")).reshape(2, -1)
  offsets = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (grid - 1)
  image = np.zeros((grid * grid + 1,) * 2, np.int64)
  image[1:, 1:] = offsets[..., 0] * (2 * grid - 1) + offsets[..., 1]
  image[0, :] = image_rows - 3
  image[:, 0] = image_rows - 2
  image[0, 0] = image_rows - 1
  if kind == "image":
    return image
  if text_len > relative_text_length:
    raise ValueError(f"text length {text_len} exceeds the relative position table's "
                     f"relative_text_length={relative_text_length}")
  ids = np.arange(text_len - 1)
  text = np.zeros((text_len, text_len), np.int64)
  text[1:, 1:] = (ids[None, :] - ids[:, None]) - (2 - relative_text_length) + image_rows + 2
  text[0, :] = all_rows - 3
  text[:, 0] = all_rows - 2
  text[0, 0] = all_rows - 1
  if kind == "text":
    return text
  if kind != "fused":
    raise ValueError(f"relative position kind {kind!r} is unknown; use image, text or fused")
  num_image = image.shape[0]
  top = np.concatenate([text, np.full((text_len, num_image), image_rows)], axis=1)
  bottom = np.concatenate([np.full((num_image, text_len), image_rows + 1), image], axis=1)
  return np.concatenate([top, bottom], axis=0)


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


class MLMHead(nn.Module):
  """BERT's masked-language-model head, as VLMo uses it: dense + GELU (exact) + LayerNorm
  (eps 1e-12), then a vocabulary decoder with a bias. [.., width] -> float32 [.., vocab].
  VLMo does not tie the decoder to the word embeddings (its `MLMHead` is built without a
  weight), so neither does this."""
  vocab_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = dense(x.shape[-1], ("embed", None), self.dtype, "transform")(x)
    h = LayerNorm(self.dtype, BERT_NORM_EPS, name="ln")(ACTIVATIONS["gelu"](h))
    logits = dense(self.vocab_size, ("embed", "vocab"), self.dtype, "decoder",
                   out_dtype=jnp.float32)(h)
    return constrain(logits, ("batch", "length", "vocab"))


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
    if c.mome.bert:
      self._setup_bert()
      return
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
    self.layers = self._build_layers(cache_length)
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
      if c.mome.itm_pooler:
        self.itm_pooler = dense(c.mome.width, ("embed", None), dt, "itm_pooler")
      self.itm_head = dense(2, ("embed", None), dt, "itm_head")
    contrastive_parameters(self, c)

  def _build_layers(self, cache_length: int = 0):
    c = self.config
    block = remat_block("none" if self.decode else c.remat)
    # Stochastic depth grows linearly from 0 at the bottom layer to drop_path_rate at the top.
    rates = np.linspace(0.0, c.mome.drop_path_rate, c.mome.depth)
    return [block(c.mome.heads, c.mome.mlp_dim, compute_dtype(c), decode=self.decode,
                  cache_length=cache_length, modality_experts=c.mome.layer_experts(i),
                  routed_experts=c.mome.routed_experts(i), activation=c.mome.activation,
                  layer_scale=c.mome.layer_scale, drop_path=float(rates[i]), key_bias=c.mome.key_bias)
            for i in range(c.mome.depth)]

  def _setup_bert(self):
    """VLMo's parameters (module docstring; names in interop/vlmo.py's table)."""
    c = self.config
    dt = compute_dtype(c)
    if c.pooling != "cls":
      raise ValueError("config.model.mome.text_encoder='bert' (VLMo) pools the image [CLS] "
                       "token; set config.model.pooling='cls'")
    self.patch_embed = dense(c.mome.width, ("patch", "embed"), dt, "patch_embed")
    self.image_cls_token = self.param("image_cls_token", with_axes(embed_init, ("embed",)),
                                      (c.mome.width,), jnp.float32)
    if not c.mome.relative_position:
      self.image_pos_embed = self.param(
          "image_pos_embed", with_axes(embed_init, ("length", "embed")),
          (c.image_tokens, c.mome.width), jnp.float32)
    self.token_embed = nn.Embed(
        c.text.vocab_size, c.mome.width, dtype=dt, param_dtype=jnp.float32,
        embedding_init=with_axes(embed_init, ("vocab", "embed")))
    # BERT's embeddings: positions (added only without the relative position bias, as BERT's
    # position_embedding_type does), its own 2 token types (type 0 is used), LayerNorm.
    self.text_pos_embed = self.param(
        "text_pos_embed", with_axes(embed_init, ("length", "embed")), (c.text.max_len, c.mome.width),
        jnp.float32)
    self.text_type_embed = self.param("text_type_embed", with_axes(embed_init, (None, "embed")),
                                      (2, c.mome.width), jnp.float32)
    self.ln_text_embed = LayerNorm(dt, BERT_NORM_EPS)
    if c.mome.token_types:
      self.token_type_embed = self.param(
          "token_type_embed", with_axes(embed_init, (None, "embed")), (2, c.mome.width), jnp.float32)
    if c.mome.relative_position:
      _, rows = relative_position_rows(c.image_size // c.patch_size, c.mome.relative_text_length)
      self.relative_position_bias = self.param(
          "relative_position_bias", with_axes(nn.initializers.zeros_init(), (None, None)),
          (rows, c.mome.depth * c.mome.heads), jnp.float32)
    self.layers = self._build_layers()
    if c.mome.shared_final_norm:
      self.final_norm = LayerNorm(dt)
    else:
      self.ln_image, self.ln_text, self.ln_fused = LayerNorm(dt), LayerNorm(dt), LayerNorm(dt)
    self.image_projection = dense(c.embed_dim, ("embed", "joint"), dt, "image_projection",
                                  use_bias=False)
    self.text_projection = dense(c.embed_dim, ("embed", "joint"), dt, "text_projection",
                                 use_bias=False)
    if c.mome.vl_contrastive:
      self.image_vl_projection = dense(c.embed_dim, ("embed", "joint"), dt,
                                       "image_vl_projection", use_bias=False)
      self.text_vl_projection = dense(c.embed_dim, ("embed", "joint"), dt,
                                      "text_vl_projection", use_bias=False)
      self.logit_vl_scale = self.param(
          "logit_vl_scale", nn.initializers.constant(float(np.log(1.0 / c.temperature_init))),
          (), jnp.float32)
    if c.mome.itm_pooler:  # VLMo's module always has its pooler (it feeds only the ITM head).
      self.itm_pooler = dense(c.mome.width, ("embed", None), dt, "itm_pooler")
    if self.itm:
      self.itm_head = dense(2, ("embed", None), dt, "itm_head")
    if c.mome.mlm_head:
      self.mlm = MLMHead(c.text.vocab_size, dt)
    if c.mome.mim_vocab:
      # BEiT's masked image modelling: the [MASK] embedding that replaces a masked patch's, and
      # the linear head from a patch's final state to its visual code.
      self.image_mask_token = self.param("image_mask_token", with_axes(embed_init, ("embed",)),
                                         (c.mome.width,), jnp.float32)
      self.mim_head = dense(c.mome.mim_vocab, ("embed", None), dt, "mim_head",
                            out_dtype=jnp.float32)
    contrastive_parameters(self, c)

  def _layer(self, i: int, x, mask, segments, prefix_kv=None, return_kv: bool = False,
             token_mask=None, causal_routing: bool = False, routing_length: int = 0,
             attention_bias=None, deterministic: bool = True, query_rows: int = 0):
    """Layer `i` (a `backbone.Block`; see there for the arguments) on x [batch, length, width]
    -> (x', keys/values or None). Every argument goes positionally: with config.remat the
    block is rematerialised and takes its static ones (segments, flags) by position."""
    return self.layers[i](x, mask, None, segments, prefix_kv, return_kv, token_mask,
                          causal_routing, routing_length, attention_bias, deterministic,
                          query_rows)

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
    prefix-causal pass, for `caption_logits` and `decode_step`). With the BERT text encoder
    the context is None (no captioning)."""
    c = self.config
    if c.mome.bert:
      return self._bert_image(image, rows=1)["image_embed"], None
    x = self._image_tokens(image)
    segments = ((IMAGE, x.shape[1]),)
    prefix_kv, entering_fusion = [], x
    for i in range(c.mome.depth):
      if i == c.mome.bottom_layers:
        entering_fusion = x
      x, kv = self._layer(i, x, None, segments, return_kv=True)
      if i < c.mome.bottom_layers:  # Same states, so same keys/values, as in the fused pass.
        prefix_kv.append(kv)
    image_embed = self._image_embed(self.ln_image(x))
    # The top layers of the fused pass see image tokens through ffn_fusion; they still attend to
    # image tokens only. (Unused outputs, e.g. when only the embedding is wanted, are dropped by
    # XLA's dead-code elimination under jit.)
    y = entering_fusion
    for i in range(c.mome.bottom_layers, c.mome.depth):
      y, kv = self._layer(i, y, None, ((FUSION, y.shape[1], IMAGE),), return_kv=True)
      prefix_kv.append(kv)
    context = jnp.stack([jnp.stack(kv, axis=1) for kv in prefix_kv], axis=1)
    return image_embed, context

  def image_features(self, image):
    """image [batch, H, W, 3] -> (image_embed [batch, D] unit norm, the image-only pass's
    final-normed tokens [batch, image_tokens, width]: what the contrastive pooler (or [CLS])
    reads; the frozen-encoder probes train their own pooler on them (evaluation/probes.py))."""
    c = self.config
    if c.mome.bert:
      out = self._bert_image(image)
      return out["image_embed"], out["tokens"]
    x = self._image_tokens(image)
    segments = ((IMAGE, x.shape[1]),)
    for i in range(c.mome.depth):
      x, _ = self._layer(i, x, None, segments)
    tokens = self.ln_image(x)
    return self._image_embed(tokens), tokens

  def _image_embed(self, tokens):
    """The image-only pass's final-normed tokens -> image_embed [batch, D] unit norm."""
    c = self.config
    pooled = tokens[:, 0] if c.pooling == "cls" else self.contrastive_pooler(tokens)[:, 0]
    return l2_normalize(self.image_projection(self.ln_image_embed(pooled)))

  # -- Text ----------------------------------------------------------------------------------

  def encode_text(self, text):
    """text [batch, L] -> text_embed [batch, D] unit norm (CLS at the end, causal, ffn_text;
    with the BERT text encoder, [CLS] first and bidirectional)."""
    if self.config.mome.bert:
      return self._bert_text(text, rows=1)["text_embed"]
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
    self._no_captioning("caption_logits")
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

  def itm_logits(self, image, text, train: bool = False):
    """Image-text matching of pairs (image[b], text[b]): one bidirectional fused pass over image
    tokens, text inputs and the CLS; 2-way logits float32 [batch, 2] (index 1 = match) from the
    CLS (through the pooler with config.model.mome.itm_pooler). With the BERT text encoder:
    VLMo's fused pass (text then image; `fused_features`). Needs the ITM head
    (config.loss.itm_weight > 0)."""
    c = self.config
    if not self.itm:
      raise ValueError("this MoME has no ITM head; train it with config.loss.itm_weight > 0")
    if c.mome.bert:
      # The pooler reads the [CLS] alone: the last layer computes no other row.
      pooled = self.fused_features(image, text, train, rows=1)["pooled"]
      return self.itm_head(pooled).astype(jnp.float32)
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
    return self.itm_head(self._itm_pool(self.ln_fused(x[:, -1]))).astype(jnp.float32)

  def _itm_pool(self, cls):
    """The fused [CLS] state -> the ITM head's input (VLMo's pooler: dense + tanh)."""
    return jnp.tanh(self.itm_pooler(cls)) if self.config.mome.itm_pooler else cls

  # -- VLMo (text_encoder='bert') --------------------------------------------------------------

  def _no_captioning(self, what: str):
    if self.config.mome.bert:
      raise ValueError(f"{what}: a MoME with config.model.mome.text_encoder='bert' (VLMo) has no "
                       "causal text path, so no captioning or decoding; use "
                       "text_encoder='causal' for a captioner")

  def _norm(self, which: str):
    """The final LayerNorm of a pass ('image', 'text', 'fused'): the one shared norm, or the
    pass's own."""
    if self.config.mome.shared_final_norm:
      return self.final_norm
    return {"image": self.ln_image, "text": self.ln_text, "fused": self.ln_fused}[which]

  def _deterministic(self, train: bool) -> bool:
    return not train or (not self.config.mome.drop_path_rate)

  def _bert_text_tokens(self, text, train: bool):
    """text [batch, L] -> BERT's embeddings [batch, L, width] (+ VLMo's text type)."""
    c = self.config
    if text.shape[1] != c.text.max_len:
      raise ValueError(f"text length {text.shape[1]} != config.model.text.max_len={c.text.max_len}")
    x = self.token_embed(text) + self.text_type_embed[0].astype(compute_dtype(c))
    if not c.mome.relative_position:
      x = x + self.text_pos_embed.astype(x.dtype)
    x = self.ln_text_embed(x)
    if not self._deterministic(train):  # BERT's embedding dropout, at VLMo's drop_path_rate.
      keep = 1.0 - c.mome.drop_path_rate
      kept = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
      x = jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
    if c.mome.token_types:
      x = x + self.token_type_embed[0].astype(x.dtype)
    return constrain(x, ("batch", "length", "embed"))

  def _bert_image_tokens(self, image, mask=None):
    """image [batch, H, W, 3] -> [batch, P + 1, width]: the [CLS] then the patches (+ absolute
    positions without the relative bias) (+ VLMo's image type). `mask` [batch, P] bool: those
    patches' embeddings replaced by the [MASK] embedding (BEiT; `mim_logits`)."""
    c = self.config
    x = self.patch_embed(patchify(image, c))
    if mask is not None:
      x = jnp.where(mask[..., None], self.image_mask_token.astype(x.dtype), x)
    cls = jnp.broadcast_to(self.image_cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    if not c.mome.relative_position:
      x = x + self.image_pos_embed.astype(x.dtype)
    if c.mome.token_types:
      x = x + self.token_type_embed[1].astype(x.dtype)
    return constrain(x, ("batch", "length", "embed"))

  def _position_bias(self, kind: str):
    """Per layer, VLMo's relative position bias of a pass: float32 [depth, heads, length,
    length] gathered from the one table by a static index (None without it)."""
    c = self.config
    if not c.mome.relative_position:
      return None
    index = relative_position_index(kind, c.image_size // c.patch_size, c.text.max_len,
                                    c.mome.relative_text_length)
    bias = self.relative_position_bias[index]  # [length, length, depth * heads]
    return bias.reshape(*index.shape, c.mome.depth, c.mome.heads).transpose(2, 3, 0, 1)

  def _bert_stack(self, x, mask, segments, top_segments, bias, train: bool, token_mask=None,
                  with_vl: bool = False, rows: int = 0):
    """The stack -> (final states, and with `with_vl` (one modality's tokens) the states
    entering the top layers run through them with ffn_fusion instead: VLMo's VL-FFN features;
    else None). `segments` are the bottom layers', `top_segments` the top layers'. `rows` > 0:
    the caller reads only the first `rows` final states, so the last layer computes only those
    (`_last_layer`); 0: all."""
    c = self.config
    deterministic = self._deterministic(train)
    layer_bias = lambda i: None if bias is None else bias[i]
    entering_fusion = x
    last = c.mome.depth - 1
    for i in range(last):
      if i == c.mome.bottom_layers:
        entering_fusion = x
      x, _ = self._layer(i, x, mask, segments if i < c.mome.bottom_layers else top_segments,
                         token_mask=token_mask, attention_bias=layer_bias(i),
                         deterministic=deterministic)
    if last == c.mome.bottom_layers:
      entering_fusion = x
    x = self._last_layer(x, mask, segments if last < c.mome.bottom_layers else top_segments,
                         token_mask, layer_bias(last), deterministic, rows)
    if not with_vl:
      return x, None
    vl = x if c.mome.bottom_layers == c.mome.depth else entering_fusion
    modality = segments[0][0]
    for i in range(c.mome.bottom_layers, last):
      vl, _ = self._layer(i, vl, mask, ((FUSION, vl.shape[1], modality),),
                          token_mask=token_mask, attention_bias=layer_bias(i),
                          deterministic=deterministic)
    if c.mome.bottom_layers < c.mome.depth:
      vl = self._last_layer(vl, mask, ((FUSION, vl.shape[1], modality),), token_mask,
                            layer_bias(last), deterministic, rows)
    return x, vl

  def _last_layer(self, x, mask, segments, token_mask, bias, deterministic: bool, rows: int):
    """The top layer on x [batch, length, width] -> its first `rows` output rows (all with 0).
    Only those rows query and run the feed-forward: the others' outputs would be discarded
    (the [CLS] alone makes the contrastive and ITM features; MLM reads the text rows), and
    every token's key and value is still computed, so the kept rows equal the full layer's.
    A learned-routed expert in the layer computes every row: its capacity depends on them."""
    last = self.config.mome.depth - 1
    if not rows or rows >= x.shape[1] or self.config.mome.routed_experts(last):
      x, _ = self._layer(last, x, mask, segments, token_mask=token_mask, attention_bias=bias,
                         deterministic=deterministic)
      return x[:, :rows] if rows else x
    kept, left = [], rows
    for name, length, *modality in segments:  # The segments of the first `rows` tokens.
      if left:
        kept.append((name, min(length, left), *modality))
        left -= min(length, left)
    x, _ = self._layer(last, x, mask, tuple(kept),
                       token_mask=None if token_mask is None else token_mask[:, :rows],
                       attention_bias=bias, deterministic=deterministic, query_rows=rows)
    return x

  def _bert_image(self, image, train: bool = False, rows: int = 0) -> dict:
    """The image-only pass (ffn_image in every layer): image_embed [batch, D] unit norm from the
    [CLS] after the final norm, tokens [batch, P + 1, width] (final-normed; the first `rows`
    only with `rows` > 0, see `_bert_stack`)[, image_vl_embed]."""
    x = self._bert_image_tokens(image)
    segments = ((IMAGE, x.shape[1]),)
    x, vl = self._bert_stack(x, None, segments, segments, self._position_bias("image"), train,
                             with_vl=self.config.mome.vl_contrastive, rows=rows)
    tokens = self._norm("image")(x)
    out = {"image_embed": l2_normalize(self.image_projection(tokens[:, 0])), "tokens": tokens}
    if self.config.mome.vl_contrastive:
      out["image_vl_embed"] = l2_normalize(self.image_vl_projection(self._norm("image")(vl)[:, 0]))
    return out

  def _bert_text(self, text, train: bool = False, rows: int = 0) -> dict:
    """The text-only pass (ffn_text in every layer, bidirectional, key-padding mask):
    text_embed [batch, D] unit norm from [CLS], tokens [batch, L, width] (final-normed; the
    first `rows` only with `rows` > 0)[, text_vl_embed]."""
    x = self._bert_text_tokens(text, train)
    valid = text != PAD_ID
    segments = ((TEXT, x.shape[1]),)
    x, vl = self._bert_stack(x, valid[:, None, None, :], segments, segments,
                             self._position_bias("text"), train, token_mask=valid,
                             with_vl=self.config.mome.vl_contrastive, rows=rows)
    tokens = self._norm("text")(x)
    out = {"text_embed": l2_normalize(self.text_projection(tokens[:, 0])), "tokens": tokens}
    if self.config.mome.vl_contrastive:
      out["text_vl_embed"] = l2_normalize(self.text_vl_projection(self._norm("text")(vl)[:, 0]))
    return out

  def fused_features(self, image, text, train: bool = False, rows: int = 0) -> dict:
    """VLMo's fused pass (text_encoder='bert'): text [batch, L] then image tokens, bidirectional
    with a key-padding mask; ffn_text / ffn_image in the bottom layers, ffn_fusion on top.
    Returns text_tokens [batch, L, width] and image_tokens [batch, P + 1, width] after the
    final norm, and pooled [batch, width]: the text [CLS] through the ITM pooler
    (config.model.mome.itm_pooler; as it is without one). `rows` > 0: only the first `rows`
    tokens' final states are computed (`_bert_stack`): text_tokens holds min(rows, L) of
    them, image_tokens the rest."""
    c = self.config
    if not c.mome.bert:
      raise ValueError("fused_features is VLMo's fused pass: set "
                       "config.model.mome.text_encoder='bert'")
    text_tokens = self._bert_text_tokens(text, train)
    image_tokens = self._bert_image_tokens(image).astype(text_tokens.dtype)
    num_text, num_image = text_tokens.shape[1], image_tokens.shape[1]
    x = jnp.concatenate([text_tokens, image_tokens], axis=1)
    valid = jnp.concatenate([text != PAD_ID, jnp.ones((x.shape[0], num_image), bool)], axis=1)
    bottom = ((TEXT, num_text), (IMAGE, num_image))
    top = ((FUSION, num_text, TEXT), (FUSION, num_image, IMAGE))
    x, _ = self._bert_stack(x, valid[:, None, None, :], bottom, top,
                            self._position_bias("fused"), train, token_mask=valid, rows=rows)
    x = self._norm("fused")(x)
    pooled = self._itm_pool(x[:, 0])
    return {"text_tokens": x[:, :num_text], "image_tokens": x[:, num_text:], "pooled": pooled}

  def mlm_logits(self, text, positions=None, image=None, train: bool = False):
    """VLMo's MLM logits float32 [batch, K, vocab] at `positions` [batch, K] int32 of text
    [batch, L] (None: every position, K = L): from the text-only pass (`image` None; VLMo's
    stage 2) or the fused pass with `image` (stage 3). Gathering the masked positions first
    keeps the [.., vocab] head off the unmasked ones."""
    tokens = self.mlm_tokens(text, image, train)
    if positions is not None:
      tokens = jnp.take_along_axis(tokens, positions[..., None], axis=1)
    return self.mlm_head(tokens)

  def mlm_tokens(self, text, image=None, train: bool = False):
    """The text tokens [batch, L, width] the MLM head reads (see `mlm_logits`): the training step
    runs the pass once and then picks which positions the head scores."""
    if not self.config.mome.mlm_head:
      raise ValueError("this MoME has no MLM head; set config.model.mome.mlm_head=True (with "
                       "text_encoder='bert')")
    if image is None:
      return self._bert_text(text, train)["tokens"]
    # MLM reads the text rows only: the last layer computes none of the image rows.
    return self.fused_features(image, text, train, rows=text.shape[1])["text_tokens"]

  def mlm_head(self, tokens):
    """The MLM head on text tokens [.., width] -> float32 logits [.., vocab]."""
    return self.mlm(tokens)

  def mim_logits(self, image, mask, train: bool = False):
    """BEiT's masked image modelling: image [batch, H, W, 3] with the patches where mask
    [batch, P] bool is True replaced by the [MASK] embedding, through the image-only pass
    (ffn_image in every layer, bidirectional); float32 logits [batch, P, mim_vocab] over the
    visual codes from each patch's final state (after the final norm). Needs
    config.model.mome.mim_vocab > 0."""
    c = self.config
    if not (c.mome.bert and c.mome.mim_vocab):
      raise ValueError("this MoME has no masked image modelling head; set "
                       "config.model.mome.mim_vocab > 0 (with text_encoder='bert')")
    x = self._bert_image_tokens(image, mask)
    segments = ((IMAGE, x.shape[1]),)
    x, _ = self._bert_stack(x, None, segments, segments, self._position_bias("image"), train)
    return self.mim_head(self._norm("image")(x)[:, 1:])

  def vl_temperature_scale(self):
    """The second contrastive scale (VL-FFN features; see `temperature_scale`)."""
    return temperature_scale(self.logit_vl_scale, self.config.max_logit_scale)

  def _bert_call(self, image, text, train: bool) -> dict:
    c = self.config
    # The embeddings read the [CLS] rows alone: the last layers compute no other row.
    image_out, text_out = self._bert_image(image, train, 1), self._bert_text(text, train, 1)
    outputs = {"image_embed": image_out["image_embed"], "text_embed": text_out["text_embed"],
               "logit_scale": self.temperature_scale()}
    if c.contrastive == "sigmoid":
      outputs["logit_bias"] = self.logit_bias
    if c.mome.vl_contrastive:
      outputs.update(image_vl_embed=image_out["image_vl_embed"],
                     text_vl_embed=text_out["text_vl_embed"],
                     logit_vl_scale=self.vl_temperature_scale())
    if self.is_initializing():  # Creates the parameters only the fused pass and heads use.
      if self.itm:
        self.itm_logits(image, text)
      else:
        self.fused_features(image, text)
      if c.mome.mlm_head:
        self.mlm_logits(text, jnp.zeros((text.shape[0], 1), jnp.int32))
      if c.mome.mim_vocab:
        self.mim_logits(image, jnp.zeros((image.shape[0], c.num_patches), bool))
    return outputs

  # -- Training interface --------------------------------------------------------------------

  def __call__(self, image, text, train: bool = False):
    """Returns dict(image_embed [B,D], text_embed [B,D], caption_logits [B,L-1,V],
    logit_scale scalar (already exp'd and clamped)[, logit_bias]). With the BERT text encoder
    (VLMo) no caption_logits; with vl_contrastive also image_vl_embed, text_vl_embed and
    logit_vl_scale. `train`: stochastic depth and BERT's embedding dropout (needs a 'dropout'
    rng when config.model.mome.drop_path_rate > 0); the causal model has neither."""
    if self.config.mome.bert:
      return self._bert_call(image, text, train)
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
    self._no_captioning("decode_step")
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
