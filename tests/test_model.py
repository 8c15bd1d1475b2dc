"""Model specs: causality, the CLS mask, padding, pooler variants, remat and dtype settings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.models.coca import CoCa, text_attention_mask
from coca_jax.training import step as step_lib
from conftest import random_batch, smoke_config


@pytest.fixture(scope="module")
def apply_fn(tiny_model):
  return jax.jit(lambda p, image, text: tiny_model.apply({"params": p}, image, text))


def test_changing_a_later_token_never_changes_earlier_outputs(tiny_config, tiny_params, apply_fn):
  batch = random_batch(tiny_config, 2, num_pads=(0,))
  base = apply_fn(tiny_params, batch["image"], batch["text"])["caption_logits"]
  length = batch["text"].shape[1]
  for t in (1, 5, length - 3):
    changed = batch["text"].at[:, t + 1].set((batch["text"][:, t + 1] + 7) % 60 + 4)
    out = apply_fn(tiny_params, batch["image"], changed)["caption_logits"]
    # Logits at input positions <= t predict tokens <= t+1 and must not see token t+1's value.
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5)
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-5)


def test_cls_mask_sees_every_non_pad_token_and_itself_only():
  text_inputs = jnp.array([[2, 9, 9, 9, 0, 0], [2, 9, 9, 9, 9, 9]])
  mask = np.asarray(text_attention_mask(text_inputs))[:, 0]
  assert mask.shape == (2, 7, 7)
  np.testing.assert_array_equal(mask[0, -1], [1, 1, 1, 1, 0, 0, 1])
  np.testing.assert_array_equal(mask[1, -1], [1, 1, 1, 1, 1, 1, 1])
  # Real tokens are plain causal.
  np.testing.assert_array_equal(mask[1, :-1, :-1], np.tril(np.ones((6, 6))))


def test_text_embedding_depends_on_the_last_real_token(tiny_config, tiny_params, apply_fn):
  """The CLS must see the final non-pad input token (the classic off-by-one misses it)."""
  batch = random_batch(tiny_config, 3, num_pads=(4,))
  text = batch["text"]
  last_input = text.shape[1] - 1 - 4  # the EOS: last non-pad token of the inputs text[:, :-1]
  assert int(text[0, last_input]) != 0 and int(text[0, last_input + 1]) == 0
  changed = text.at[:, last_input].set((text[:, last_input] + 5) % 60 + 4)
  base = apply_fn(tiny_params, batch["image"], text)["text_embed"]
  out = apply_fn(tiny_params, batch["image"], changed)["text_embed"]
  assert np.abs(np.asarray(out - base)).max() > 1e-4


def test_pad_positions_do_not_leak(tiny_config, tiny_params, apply_fn):
  """Changing the PAD embedding moves no text embedding and no logit at a real position."""
  batch = random_batch(tiny_config, 3, num_pads=(0, 3, 7))
  base = apply_fn(tiny_params, batch["image"], batch["text"])
  params = jax.tree.map(lambda x: x, tiny_params)
  params["token_embed"]["embedding"] = params["token_embed"]["embedding"].at[0].add(3.0)
  out = apply_fn(params, batch["image"], batch["text"])
  np.testing.assert_allclose(out["text_embed"], base["text_embed"], atol=1e-5)
  real = np.asarray(batch["text"][:, :-1] != 0)
  np.testing.assert_allclose(np.asarray(out["caption_logits"])[real],
                             np.asarray(base["caption_logits"])[real], atol=1e-4)


@pytest.mark.parametrize("pooling,context_tokens", [("cascade", 4), ("parallel", 4),
                                                    ("open_clip", 3)])
def test_pooler_variants_shapes(pooling, context_tokens):
  config = smoke_config()
  config.model.pooling = pooling
  model = step_lib.build_model(config)
  size, d = config.model.image_size, config.model.embed_dim
  image = jnp.ones((2, size, size, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), image,
                          jnp.zeros((2, config.model.text.max_len), jnp.int32))["params"]
  assert ("contrastive_pooler" in params) == (pooling != "open_clip")
  embed, context = jax.eval_shape(
      lambda p: model.apply({"params": p}, image, method=CoCa.encode_image), nn.unbox(params))
  assert embed.shape == (2, d)
  assert context.shape == (2, context_tokens, config.model.vision.width)


def test_embeddings_are_unit_norm_and_logit_scale_starts_at_paper_value(
    tiny_config, tiny_params, apply_fn):
  batch = random_batch(tiny_config, 2)
  out = apply_fn(tiny_params, batch["image"], batch["text"])
  np.testing.assert_allclose(np.linalg.norm(out["image_embed"], axis=-1), 1.0, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(out["text_embed"], axis=-1), 1.0, atol=1e-4)
  np.testing.assert_allclose(float(out["logit_scale"]), 1 / 0.07, rtol=1e-5)


def test_logit_scale_is_clamped(tiny_config, tiny_params, apply_fn):
  batch = random_batch(tiny_config, 2)
  params = {**tiny_params, "logit_scale": jnp.array(10.0)}  # exp(10) > 100
  out = apply_fn(params, batch["image"], batch["text"])
  assert float(out["logit_scale"]) == pytest.approx(tiny_config.model.max_logit_scale)


def test_remat_changes_memory_not_math(tiny_config, tiny_params):
  batch = random_batch(tiny_config, 2)

  def loss_and_grads(remat):
    config = smoke_config()
    config.model.remat = remat
    model = step_lib.build_model(config)
    fn = lambda p: step_lib.loss_fn(p, model, batch, config.loss)[0]
    return jax.jit(jax.value_and_grad(fn))(tiny_params)

  loss, grads = loss_and_grads("none")
  loss_r, grads_r = loss_and_grads("full")
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_r, grads)


def test_bfloat16_compute_keeps_float32_params():
  config = smoke_config()
  config.model.dtype = "bfloat16"
  model = step_lib.build_model(config)
  batch = random_batch(config, 2)
  variables = jax.jit(model.init)(jax.random.key(0), batch["image"], batch["text"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
  out = jax.jit(model.apply)(variables, batch["image"], batch["text"])
  assert out["caption_logits"].dtype == jnp.float32
  assert np.isfinite(np.asarray(out["caption_logits"])).all()


def test_scanned_stack_compiles_once_for_any_depth():
  """With scan the program holds one block body: it does not grow with depth (unrolled does)."""
  def program_size(depth, scan):
    config = smoke_config()
    config.model.vision.depth = depth
    config.model.scan_layers = scan
    model = step_lib.build_model(config)
    batch = random_batch(config, 1)
    params = jax.eval_shape(model.init, jax.random.key(0), batch["image"], batch["text"])
    return len(jax.jit(model.apply).lower(params, batch["image"], batch["text"]).as_text())

  assert program_size(8, scan=True) == program_size(2, scan=True)
  assert program_size(8, scan=False) > 1.5 * program_size(2, scan=False)
def test_logit_scale_gradient_survives_past_the_cap(tiny_config, tiny_params, tiny_model):
  """Past the cap the forward value is capped but the gradient is not zero (straight-through),
  and a train step's update clamps the parameter back to log(cap)."""
  from coca_jax.models.coca import clamp_logit_scale
  from coca_jax.training import losses
  batch = random_batch(tiny_config, 4)
  def loss(p):
    out = tiny_model.apply({"params": p}, batch["image"], batch["text"])
    return losses.softmax_contrastive_loss(out["image_embed"], out["text_embed"],
                                           out["logit_scale"])[0]
  above = {**tiny_params, "logit_scale": jnp.array(6.0)}  # exp(6) = 403 > 100.
  grad = jax.grad(loss)(above)["logit_scale"]
  assert abs(float(grad)) > 1e-3
  clamped = clamp_logit_scale(above, tiny_config.model.max_logit_scale)
  assert float(clamped["logit_scale"]) == pytest.approx(np.log(100.0))
  np.testing.assert_allclose(float(loss(above)), float(loss(clamped)), rtol=1e-6)


def test_bf16_vocab_logits_are_accumulated_and_returned_in_float32():
  config = smoke_config()
  config.model.dtype = "bfloat16"
  model = step_lib.build_model(config)
  batch = random_batch(config, 2)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["image"], batch["text"]))["params"]
  logits = np.asarray(model.apply({"params": params}, batch["image"], batch["text"])["caption_logits"])
  assert logits.dtype == np.float32
  # Logits rounded to bf16 would all be bf16-representable; f32 outputs almost never are.
  rounded = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(logits != rounded) > 0.9


def test_attention_kernel_choice_and_its_override(monkeypatch):
  """auto picks cuDNN's fused kernel only for half precision on a GPU; the environment forces
  either; a typo names the variable and the choices; XLA and the selector agree on CPU."""
  from coca_jax.models import layers
  monkeypatch.delenv(layers.ATTENTION_ENV, raising=False)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.attention_implementation(jnp.bfloat16) == "cudnn"
  assert layers.attention_implementation(jnp.float32) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert layers.attention_implementation(jnp.bfloat16) == "xla"
  monkeypatch.setenv(layers.ATTENTION_ENV, "cudnn")
  assert layers.attention_implementation(jnp.float32) == "cudnn"
  monkeypatch.setenv(layers.ATTENTION_ENV, "flash")
  with pytest.raises(ValueError, match="COCA_JAX_ATTENTION='flash'.*auto, xla or cudnn"):
    layers.attention_implementation(jnp.float32)
  monkeypatch.setenv(layers.ATTENTION_ENV, "auto")
  q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 4, 8))
  mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
  np.testing.assert_array_equal(layers.dot_product_attention(q, k, v, mask),
                                jax.nn.dot_product_attention(q, k, v, mask=mask))


def test_odd_lengths_reach_cudnn_padded_to_even_with_unchanged_results(monkeypatch):
  """cuDNN's fused attention needs even query and key lengths and a mask as long as both; odd
  lengths (the 63-position shifted caption, the pooler's single query, [CLS] + 196 patches) are
  padded, the padded key masked and the padded query dropped, and a key mask is expanded.
  Checked with XLA standing in for cuDNN (none here): the kernel only ever sees even lengths
  and full-size masks, and every real position gets what unpadded attention gives."""
  from coca_jax.models import layers
  seen = []

  def stand_in(query, key, value, mask):
    seen.append((query.shape[1], key.shape[1]))
    # cuDNN's bias (from the mask) may broadcast over batch and heads, never over positions.
    assert mask is None or mask.shape[2:] == (query.shape[1], key.shape[1]), mask.shape
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")

  monkeypatch.setattr(layers, "_cudnn_attention", stand_in)
  monkeypatch.setattr(layers, "attention_implementation", lambda dtype: "cudnn")
  rng = jax.random.split(jax.random.key(0), 4)
  causal = lambda n: jnp.tril(jnp.ones((n, n), bool))[None, None]
  for q_len, kv_len, mask in (
      (7, 7, causal(7)),                                                 # self, causal
      (7, 8, None),                                                      # cross, odd queries
      (1, 9, None),                                                      # one query, odd keys
      (6, 9, jax.random.bernoulli(rng[3], 0.7, (2, 1, 1, 9)).at[..., 0].set(True)),  # key mask
      (4, 6, jax.random.bernoulli(rng[3], 0.7, (2, 1, 1, 6)).at[..., 0].set(True)),  # even
  ):
    q = jax.random.normal(rng[0], (2, q_len, 3, 8))
    k, v = jax.random.normal(rng[1], (2, 2, kv_len, 3, 8))
    seen.clear()
    out = layers.dot_product_attention(q, k, v, mask)
    assert seen and all(a % 2 == 0 and b % 2 == 0 for a, b in seen)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, atol=1e-6, rtol=1e-6)


def test_target_platform_follows_the_mesh():
  """The attention kernel is chosen for the platform being compiled for: the mesh's devices
  where a mesh is set (a GPU mesh may be compiled on a CPU host), else the default backend."""
  from coca_jax.models import layers
  assert layers.target_platform() == jax.default_backend()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  with jax.set_mesh(mesh):
    assert layers.target_platform() == jax.devices()[0].platform


def test_remat_policy_names_and_the_attention_saving_policy():
  """Every remat name the config accepts builds a policy; dots_attention saves what dots saves
  plus cuDNN's fused-attention forward outputs, and nothing else (e.g. not elementwise ops)."""
  from types import SimpleNamespace
  from coca_jax.core import config as config_lib
  from coca_jax.core import schema
  from coca_jax.models import layers
  from coca_jax.models.backbone import REMAT_POLICIES
  assert set(REMAT_POLICIES) == set(config_lib.REMAT_NAMES) == set(schema.REMAT_NAMES)
  assert set(layers.ACTIVATIONS) == set(schema.ACTIVATION_NAMES)  # Each name maps to a function.
  policy = REMAT_POLICIES["dots_attention"]
  for name in ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper"):
    assert policy(SimpleNamespace(name=name)) is True
  assert policy(jax.lax.exp_p, jnp.ones(3)) is False
  assert policy(jax.lax.dot_general_p, jnp.ones((2, 3)), jnp.ones((3, 4)),
                dimension_numbers=(((1,), (0,)), ((), ())), precision=None,
                preferred_element_type=None) is True
  config = smoke_config()
  config.model.remat = "dot"
  with pytest.raises(Exception, match="remat='dot' is unknown; use one of none, full, dots"):
    config_lib.validate(config)
