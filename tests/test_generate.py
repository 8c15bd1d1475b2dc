"""Specs for caption decoding (coca_jax/inference/generate.py) on a tiny random CoCa."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.core import schema
from coca_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from coca_jax.inference import generate as gen
from coca_jax.models.coca import CoCa, CoCaConfig


def tiny_config(vocab_size=32, max_len=8, scan_layers=True) -> CoCaConfig:
  return schema.CoCa(
      image_size=16, patch_size=8, embed_dim=16, n_gen_queries=4, pooler_heads=2,
      scan_layers=scan_layers, vision=schema.Vision(width=32, depth=1, heads=2, mlp_dim=64),
      text=schema.Text(vocab_size=vocab_size, max_len=max_len, width=32, heads=2, mlp_dim=64,
                       n_uni=1, n_multi=2))


def init(config: CoCaConfig, seed=0, logit_gain=4.0):
  """A random model whose next-token distributions are peaked (gain on the vocab head) so that
  decoding decisions are well separated, like a trained model's."""
  model = CoCa(config)
  images = jax.random.normal(jax.random.key(seed + 1), (3, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.key(seed), images[:1],
                               jnp.zeros((1, config.text.max_len), jnp.int32))["params"]
  params = nn.unbox(params)
  params["vocab_head"]["kernel"] = params["vocab_head"]["kernel"] * logit_gain
  return model, params, images


@pytest.fixture(scope="module")
def tiny():
  return init(tiny_config())


def teacher_forced_logits(model, params, images, tokens):
  return jax.jit(model.apply)({"params": params}, images, tokens)["caption_logits"]


@functools.partial(jax.jit, static_argnums=0)
def sequence_logprob(model, params, images, tokens):
  """Sum of log p(token) over the generated tokens (through the first EOS)."""
  logp = jax.nn.log_softmax(teacher_forced_logits(model, params, images, tokens))
  targets = tokens[:, 1:]
  picked = jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(targets != PAD_ID, picked, 0.0), axis=-1)


def test_cached_greedy_equals_full_recomputation(tiny):
  model, params, images = tiny
  cached = gen.generate(model, params, images, gen.Decoding(), return_logits=True)
  recomputed = gen.recompute_greedy(model, params, images, return_logits=True)
  np.testing.assert_array_equal(cached["tokens"], recomputed["tokens"])
  np.testing.assert_array_equal(cached["lengths"], recomputed["lengths"])
  # Logits of every step a caption was still running (after its EOS a row only feeds PAD).
  forced = teacher_forced_logits(model, params, images, cached["tokens"])
  for row, length in enumerate(np.asarray(cached["lengths"])):
    np.testing.assert_allclose(cached["logits"][row, :length], recomputed["logits"][row, :length],
                               atol=1e-5, rtol=1e-5)
    # And against one teacher-forced forward pass over the generated caption.
    np.testing.assert_allclose(cached["logits"][row, :length], forced[row, :length],
                               atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(cached["scores"],
                             sequence_logprob(model, params, images, cached["tokens"]), atol=1e-4)


def test_eos_min_len_and_padding(tiny):
  model, params, images = tiny
  # Make EOS the runaway favourite: without min_len every caption would be empty.
  params = jax.tree.map(lambda x: x, params)
  params["vocab_head"]["bias"] = params["vocab_head"]["bias"].at[EOS_ID].add(100.0)
  for min_len in (0, 3):
    out = gen.generate(model, params, images, gen.Decoding(min_len=min_len))
    tokens = np.asarray(out["tokens"])
    assert (tokens[:, 0] == BOS_ID).all()
    assert (tokens[:, 1:min_len + 1] != EOS_ID).all()
    assert (tokens[:, 1:min_len + 1] > EOS_ID).all()  # Never PAD/BOS/UNK-as-special mid-caption.
    assert (tokens[:, min_len + 1] == EOS_ID).all()
    assert (tokens[:, min_len + 2:] == PAD_ID).all()
    np.testing.assert_array_equal(out["lengths"], min_len + 1)


def test_max_new_tokens_caps_length(tiny):
  model, params, images = tiny
  params = jax.tree.map(lambda x: x, params)
  params["vocab_head"]["bias"] = params["vocab_head"]["bias"].at[EOS_ID].add(-100.0)  # Never ends.
  out = gen.generate(model, params, images, gen.Decoding(max_new_tokens=4))
  tokens = np.asarray(out["tokens"])
  assert (tokens[:, 1:5] > EOS_ID).all() and (tokens[:, 5:] == PAD_ID).all()
  np.testing.assert_array_equal(out["lengths"], 4)
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.Decoding(max_new_tokens=8).validate(max_len=8)


def test_beam_search_with_one_beam_equals_greedy():
  model, params, images = init(tiny_config(), seed=3)
  greedy = gen.generate(model, params, images, gen.Decoding())
  beam = gen.generate(model, params, images,
                      gen.Decoding(method="beam", num_beams=1, length_penalty=0.0))
  np.testing.assert_array_equal(beam["tokens"], greedy["tokens"])
  np.testing.assert_allclose(beam["scores"], greedy["scores"], atol=1e-5)


def test_beam_search_is_exact_when_beams_cover_every_prefix():
  """With 4 ordinary tokens, 3 new tokens and 80 beams nothing is ever pruned, so beam search
  must return the best caption over ALL captions (brute force) — which also checks that the
  cache is reordered correctly when beams swap parents (here with unscanned layers)."""
  config = tiny_config(vocab_size=8, max_len=4, scan_layers=False)
  model, params, images = init(config, seed=5, logit_gain=2.0)
  alpha = 0.7
  beam = gen.generate(model, params, images,
                      gen.Decoding(method="beam", num_beams=80, length_penalty=alpha))
  words = list(range(4, 8))
  captions = []
  for length in (1, 2, 3):  # Generated tokens; the last is EOS unless the limit (3) is hit.
    for body in itertools.product(words, repeat=length - 1):
      captions.append(list(body) + [EOS_ID])
    if length == 3:
      captions += [list(body) for body in itertools.product(words, repeat=3)]
  texts = np.full((len(captions), 4), PAD_ID, np.int32)
  texts[:, 0] = BOS_ID
  for row, caption in enumerate(captions):
    texts[row, 1:len(caption) + 1] = caption
  lengths = np.asarray([len(c) for c in captions])
  for b in range(images.shape[0]):
    repeated = jnp.repeat(images[b:b + 1], len(captions), axis=0)
    normalised = sequence_logprob(model, params, repeated, jnp.asarray(texts)) / lengths ** alpha
    best = int(jnp.argmax(normalised))
    np.testing.assert_array_equal(beam["tokens"][b], texts[best])
    np.testing.assert_allclose(beam["scores"][b], normalised[best], atol=1e-4)


def test_beam_scores_match_teacher_forcing(tiny):
  model, params, images = tiny
  alpha = 0.6
  beam = gen.generate(model, params, images,
                      gen.Decoding(method="beam", num_beams=4, length_penalty=alpha))
  logprob = sequence_logprob(model, params, images, beam["tokens"])
  np.testing.assert_allclose(beam["scores"], logprob / beam["lengths"] ** alpha, atol=1e-4)
  greedy = gen.generate(model, params, images, gen.Decoding())
  greedy_norm = greedy["scores"] / greedy["lengths"] ** alpha
  # Beam search keeps greedy's path among its candidates unless better ones push it out.
  assert (np.asarray(beam["scores"]) >= np.asarray(greedy_norm) - 1e-5).all()


def test_filter_logits_top_k_and_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda x: np.asarray(x[0] > gen.NEG_INF / 2)
  np.testing.assert_array_equal(kept(gen.filter_logits(logits, top_k=2)), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(gen.filter_logits(logits, top_p=0.5)), [1, 0, 0, 0])
  np.testing.assert_array_equal(kept(gen.filter_logits(logits, top_p=0.75)), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(gen.filter_logits(logits, top_p=0.81)), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(gen.filter_logits(logits)), [1, 1, 1, 1])


def test_sampling_respects_filters_and_is_reproducible(tiny):
  model, params, images = tiny
  sample = lambda d, seed: gen.generate(model, params, images, d, jax.random.key(seed),
                                        return_logits=True)
  greedy = gen.generate(model, params, images, gen.Decoding())
  # top_k=1 (and a vanishing temperature) leave only the argmax.
  for d in (gen.Decoding(method="sample", top_k=1), gen.Decoding(method="sample", top_p=1e-6)):
    np.testing.assert_array_equal(sample(d, 0)["tokens"], greedy["tokens"])
  d = gen.Decoding(method="sample", top_k=3, temperature=2.0)
  first, again, other = sample(d, 0), sample(d, 0), sample(d, 1)
  np.testing.assert_array_equal(first["tokens"], again["tokens"])
  assert not np.array_equal(first["tokens"], other["tokens"])
  logits = np.asarray(first["logits"])
  tokens = np.asarray(first["tokens"])
  for row, length in enumerate(np.asarray(first["lengths"])):
    for step in range(length):
      top3 = np.argsort(np.asarray(gen.allowed_logits(logits[row:row + 1, step], step, 0))[0])[-3:]
      assert tokens[row, step + 1] in top3


def test_contrastive_reranking_keeps_best_matching_candidate(tiny):
  model, params, images = tiny
  n = 4
  d = gen.Decoding(method="sample", temperature=1.5, num_candidates=n)
  rng = jax.random.key(7)
  reranked = gen.generate(model, params, images, d, rng)
  # The same rng over the images repeated n times draws exactly the candidates.
  repeated = jnp.repeat(images, n, axis=0)
  one = gen.Decoding(method="sample", temperature=1.5)
  candidates = gen.generate(model, params, repeated, one, rng)
  image_embed = model.apply({"params": params}, images, method=CoCa.encode_image)[0]
  text_embed = model.apply({"params": params}, gen.ensure_eos(candidates["tokens"]),
                           method=CoCa.encode_text)
  similarity = np.einsum("bd,bnd->bn", image_embed, np.asarray(text_embed).reshape(3, n, -1))
  assert len({tuple(t) for t in np.asarray(candidates["tokens"])}) > 3  # Real choices to make.
  best = similarity.argmax(-1)
  expected = np.asarray(candidates["tokens"]).reshape(3, n, -1)[np.arange(3), best]
  np.testing.assert_array_equal(reranked["tokens"], expected)
  np.testing.assert_allclose(reranked["similarity"], similarity.max(-1), atol=1e-5)


def test_decoding_validation_names_the_field():
  with pytest.raises(ValueError, match="method"):
    gen.Decoding(method="nucleus").validate(8)
  with pytest.raises(ValueError, match="min_len"):
    gen.Decoding(min_len=9).validate(8)
  with pytest.raises(ValueError, match="num_candidates"):
    gen.Decoding(num_candidates=2).validate(8)
  with pytest.raises(ValueError, match="top_p"):
    gen.Decoding(method="sample", top_p=0.0).validate(8)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_decoding_cache_is_per_layer_and_heads_major(scan_layers):
  """Scanned or not, every layer keeps its own cache buffers [batch, heads, length, kv] (the
  attention dots' layout, so a step updates them in place and never transposes them), and
  cache_batch_axes finds their batch axis; counters are not per row."""
  config = tiny_config(scan_layers=scan_layers)
  model, params, images = init(config)
  context = jax.ShapeDtypeStruct((3, 4, 32), jnp.float32)
  decoder, decoder_params = gen._decoder(model, params)
  cache = jax.eval_shape(lambda c: gen._first_step(decoder, decoder_params, c)[1], context)
  axes = gen.cache_batch_axes(model, params, context)
  found = {}  # Leaf name -> [(shape, batch axis) of each layer's leaf]
  for (path, leaf), ax in zip(jax.tree_util.tree_leaves_with_path(cache),
                              jax.tree.leaves(axes, is_leaf=lambda x: x is None)):
    found.setdefault(jax.tree_util.keystr(path).split("'")[-2], []).append((leaf.shape, ax))
  heads, head_dim = config.text.heads, config.text.width // config.text.heads
  layers = config.text.n_uni + config.text.n_multi
  assert found["cached_key"] == found["cached_value"] == (
      [((3, heads, config.text.max_len - 1, head_dim), 0)] * layers)
  assert found["cross_key"] == found["cross_value"] == (
      [((3, heads, 4, head_dim), 0)] * config.text.n_multi)
  assert found["cache_index"] == [((), None)] * layers and found["position"] == [((), None)]


def test_scanned_decoder_is_refused_with_the_fix():
  model, params, _ = init(tiny_config(scan_layers=True))
  context = jnp.zeros((3, 4, 32))
  with pytest.raises(ValueError, match="scan_layers=False"):
    CoCa(model.config, decode=True).apply({"params": params}, jnp.zeros((3, 1), jnp.int32),
                                          context, method=CoCa.decode_step, mutable=["cache"])


def test_ensure_eos_puts_eos_where_the_text_tower_reads_it(tiny):
  model, params, _ = tiny
  length = model.config.text.max_len  # 8: the text tower reads positions 0..6.
  tokens = jnp.asarray([
      [BOS_ID, 5, 6, 7, 8, 9, 10, 11],          # Filled the whole sequence, no EOS.
      [BOS_ID, 5, 6, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],  # Stopped by max_new_tokens.
      [BOS_ID, 5, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],  # Already ended: unchanged.
  ], jnp.int32)
  fixed = np.asarray(gen.ensure_eos(tokens))
  np.testing.assert_array_equal(fixed[0], [BOS_ID, 5, 6, 7, 8, 9, EOS_ID, PAD_ID])
  np.testing.assert_array_equal(fixed[1], [BOS_ID, 5, 6, EOS_ID, 0, 0, 0, 0])
  np.testing.assert_array_equal(fixed[2], np.asarray(tokens[2]))
  assert (fixed[:, :length - 1] == EOS_ID).any(axis=1).all()
  # The text tower's embedding of a truncated caption is that of the same caption cut to
  # L-3 tokens with EOS: the layout every training text of that length had.
  embed = lambda t: np.asarray(model.apply({"params": params}, jnp.asarray(t),
                                           method=CoCa.encode_text))
  np.testing.assert_allclose(embed(fixed[:1]), embed([[BOS_ID, 5, 6, 7, 8, 9, EOS_ID, PAD_ID]]),
                             atol=1e-6)
  assert not np.allclose(embed(fixed[:1]), embed(tokens[:1]), atol=1e-4)


@pytest.mark.parametrize("rows", [2, 40])  # A decoding step's rows, and the context's.
def test_int8_dense_matches_float32_within_its_rounding(rows):
  """Per-output-channel int8: each output is off by at most the rounding of its weights
  (|x| . scale / 2), including the two-axis attention output kernel."""
  from coca_jax.models import layers
  for in_dims, x_shape, k_shape in ((1, (rows, 24), (24, 3, 5)), (2, (rows, 3, 8), (3, 8, 20))):
    x = jax.random.normal(jax.random.key(0), x_shape)
    kernel = jax.random.normal(jax.random.key(1), k_shape) * jnp.linspace(0.1, 3.0, k_shape[-1])
    q = layers.quantize_kernel(kernel, in_dims, "int8")
    assert q["kernel"].dtype == jnp.int8 and q["kernel_scale"].shape == k_shape[in_dims:]
    dense = layers.Dense(k_shape[in_dims:], ("a",) * len(k_shape), in_dims=in_dims)
    exact = dense.apply({"params": {"kernel": kernel, "bias": jnp.zeros(k_shape[in_dims:])}}, x)
    int8 = dense.apply({"params": {**q, "bias": jnp.zeros(k_shape[in_dims:])}}, x)
    assert int8.shape == exact.shape and int8.dtype == jnp.float32
    bound = jnp.einsum("...i,o->...o", jnp.abs(x).reshape(rows, -1),
                       q["kernel_scale"].reshape(-1) / 2).reshape(exact.shape)
    assert (jnp.abs(int8 - exact) <= bound + 1e-5).all()
    assert not jnp.allclose(int8, exact, atol=1e-6)  # It really is quantized.


@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
@pytest.mark.parametrize("kernels", [True, False])
def test_decoding_weights_keep_greedy_and_beam_captions(tiny, weights, kernels, monkeypatch):
  """Both layouts: tiled for the CPU kernels (where they build), and the untiled one XLA widens."""
  from coca_jax.models.kernels import cpu
  if kernels and not cpu.available():
    pytest.skip("no C++ compiler on this machine")
  monkeypatch.setattr(cpu, "available", lambda: kernels)
  model, params, images = tiny
  prepared = gen.decoder_params(model, params, weights)
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(prepared)}
  assert jnp.dtype(weights) in dtypes, dtypes
  names = {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(prepared)[0]}
  assert ("kernel_tiles" in names) == kernels, names
  for decoding in (gen.Decoding(), gen.Decoding(method="beam", num_beams=2)):
    exact = gen.generate(model, params, images, decoding)
    narrow = gen.generate(model, params, images, decoding, decoder_params=prepared)
    np.testing.assert_array_equal(narrow["tokens"], exact["tokens"])
    np.testing.assert_allclose(narrow["scores"], exact["scores"], atol=0.05)
  with pytest.raises(ValueError, match="decode_weights='int4' is unknown"):
    gen.decoder_params(model, params, "int4")
