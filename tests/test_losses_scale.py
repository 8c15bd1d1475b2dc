"""Spec: the large-batch machinery changes how the loss is computed, never what it is.

- The chunked (ring) contrastive loss equals the gathered one, value and gradients, softmax and
  sigmoid (on one device here; on 8-device meshes in tests/test_sharding.py and below).
- Gradient accumulation over microbatches equals one big-batch step, contrastive term included
  (negatives still span the whole batch).
- The sigmoid loss option gives the model a learnable logit bias initialised as SigLIP does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.training import losses
from coca_jax.training import step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from test_sharding import _max_rel_diff, tiny_batch, tiny_config  # noqa: E402


def _embeddings(batch=12, dim=8, seed=0):
  """Unit-norm pairs with real alignment (text = image + noise), so losses are not trivial."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  image = unit(jax.random.normal(k1, (batch, dim)))
  text = unit(2 * image + jax.random.normal(k2, (batch, dim)))
  return image, text


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_chunked_loss_and_gradients_equal_gathered_on_one_device(kind):
  image, text = _embeddings()
  scale, bias = jnp.float32(10.0), jnp.float32(-2.0)
  loss = lambda impl: lambda i, t, s, b: losses.contrastive_loss(
      i, t, s, b if kind == "sigmoid" else None, kind=kind, impl=impl)[0]
  grad = lambda impl: jax.value_and_grad(loss(impl), argnums=(0, 1, 2, 3))(image, text, scale, bias)
  (gathered, g_grads), (chunked, c_grads) = grad("gathered"), grad("chunked")
  assert float(chunked) == pytest.approx(float(gathered), rel=1e-6)
  assert _max_rel_diff(c_grads, g_grads) < 1e-5


def test_chunked_loss_on_8_device_ring_equals_gathered():
  # The ring needs several devices: run in a subprocess with 8 simulated CPU devices, on the
  # 3 mesh shapes, for both losses, comparing value and gradients with the gathered form.
  code = f"""
import json, sys
sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
import jax, jax.numpy as jnp, ml_collections
from coca_jax.training import losses
from coca_jax.core import sharding
from test_losses_scale import _embeddings
from test_sharding import _max_rel_diff
image, text = _embeddings(batch=32)
scale, bias = jnp.float32(10.0), jnp.float32(-2.0)
out = {{}}
for kind in ("softmax", "sigmoid"):
  def loss(impl):
    return lambda i, t, s, b: losses.contrastive_loss(
        i, t, s, b if kind == "sigmoid" else None, kind=kind, impl=impl)[0]
  ref, ref_grads = jax.value_and_grad(loss("gathered"), argnums=(0, 1, 2, 3))(image, text, scale, bias)
  for sizes in (dict(data=8), dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2)):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(sizes))
    with jax.set_mesh(mesh):
      put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, 2))
      value, grads = jax.jit(jax.value_and_grad(loss("chunked"), argnums=(0, 1, 2, 3)))(
          put(image), put(text), scale, bias)
    out[kind + str(sizes)] = [_max_rel_diff(value, ref), _max_rel_diff(grads, ref_grads)]
# Accuracies: low-dimensional embeddings so that some pairs are misranked (accuracy < 1); the
# ring's i2t and t2i hits must equal the gathered ones on every mesh shape.
image, text = _embeddings(batch=32, dim=3, seed=1)
accuracy = lambda impl: lambda i, t: {{k: v for k, v in losses.contrastive_loss(
    i, t, scale, None, kind="softmax", impl=impl)[1].items() if "accuracy" in k}}
ref = accuracy("gathered")(image, text)
out["reference_accuracy"] = {{k: float(v) for k, v in ref.items()}}
for sizes in (dict(data=8), dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2)):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(sizes))
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, 2))
    got = jax.jit(accuracy("chunked"))(put(image), put(text))
  out["accuracy" + str(sizes)] = {{k: float(v) for k, v in got.items()}}
print(json.dumps(out))
"""
  # No persistent compilation cache: 8-device CPU collectives run from a cached executable
  # have aborted with a participant count of 9 of 8.
  env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") +
      " --xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  reference = results.pop("reference_accuracy")
  accuracies = {k: results.pop(k) for k in list(results) if k.startswith("accuracy")}
  assert len(results) == 6 and len(accuracies) == 3
  for name, (value_diff, grad_diff) in results.items():
    assert value_diff < 1e-6, name
    assert grad_diff < 1e-5, name
  assert set(reference) == {"contrastive_accuracy", "contrastive_t2i_accuracy"}
  assert all(0.0 < v < 1.0 for v in reference.values()), reference  # not trivially all right
  for name, got in accuracies.items():
    assert got == pytest.approx(reference, abs=1e-6), name


def test_chunked_accuracy_metrics_match_gathered():
  image, text = _embeddings(batch=16, dim=4)  # Low dimension: some pairs are misranked.
  _, gathered = losses.softmax_contrastive_loss(image, text, 10.0)
  _, chunked = losses.chunked_contrastive_loss(image, text, 10.0)
  assert 0.0 < float(gathered["contrastive_accuracy"]) < 1.0
  for name in ("contrastive_accuracy", "contrastive_t2i_accuracy", "contrastive_i2t"):
    assert float(chunked[name]) == pytest.approx(float(gathered[name]), rel=1e-6), name


def test_unknown_contrastive_impl_names_the_field():
  image, text = _embeddings()
  with pytest.raises(ValueError, match="contrastive_impl"):
    losses.contrastive_loss(image, text, 1.0, impl="ring")


@pytest.fixture(scope="module")
def sigmoid_model():
  config = tiny_config(contrastive="sigmoid")
  model = step.build_model(config)
  batch = tiny_batch(config)
  params = jax.jit(model.init)(jax.random.key(0), batch["image"][:2], batch["text"][:2])["params"]
  return config, model, batch, params


def test_sigmoid_option_adds_logit_bias_with_siglip_init(sigmoid_model):
  config, model, batch, params = sigmoid_model
  assert float(params["logit_bias"]) == -10.0
  assert float(jnp.exp(params["logit_scale"])) == pytest.approx(10.0)
  softmax_params = jax.eval_shape(step.build_model(tiny_config()).init, jax.random.key(0),
                                  batch["image"][:2], batch["text"][:2])["params"]
  assert "logit_bias" not in softmax_params


def test_gradient_accumulation_equals_big_batch(sigmoid_model):
  # Sigmoid loss (exercises the logit-bias gradient) and 4 microbatches of 4 examples; the
  # big-batch reference has the same 16 examples as negatives for every example.
  config, model, batch, params = sigmoid_model
  params = dict(params, logit_bias=jnp.float32(-3.0))  # Away from init: a non-trivial bias grad.
  big_batch = lambda p: jax.value_and_grad(step.loss_fn, has_aux=True)(p, model, batch, config.loss)
  (big, big_metrics), big_grads = jax.jit(big_batch)(params)
  (acc, acc_metrics), acc_grads = jax.jit(
      lambda p: step.accumulated_loss_and_grads(p, model, batch, config.loss, 4))(params)
  assert float(acc) == pytest.approx(float(big), rel=1e-6)
  for name in ("contrastive_loss", "caption_loss", "caption_accuracy", "caption_tokens"):
    assert float(acc_metrics[name]) == pytest.approx(float(big_metrics[name]), rel=1e-5), name
  assert _max_rel_diff(acc_grads, big_grads) < 2e-5
  assert float(jnp.abs(acc_grads["logit_bias"])) > 1e-3


def test_microbatches_split_keeps_rows_on_their_device():
  # Row r of device d's block lands in microbatch r % m: every device feeds every microbatch.
  x = np.arange(16)
  micro = step.split_microbatches({"x": x}, 4)["x"]
  assert micro.shape == (4, 4)
  assert micro[1].tolist() == [1, 5, 9, 13]
  assert step.merge_microbatches(micro).tolist() == x.tolist()
