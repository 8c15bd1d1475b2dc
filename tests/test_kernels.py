"""The CPU decoding kernels (coca_jax/kernels): built on first use, exact to float32 rounding."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.models import layers
from coca_jax.models.kernels import cpu

PORTABLE = "coca_jax_tiled_matmul_portable"

needs_kernels = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler on this machine")


def _reference(x, tiles, scale, n):
  """float64 x @ (widened weights * scale) from the tiles, on the host."""
  weights = np.asarray(cpu.untile(tiles, n).astype(jnp.float32), np.float64)
  if scale is not None:
    weights = weights * np.asarray(scale, np.float64)
  return np.asarray(x, np.float64) @ weights


def test_tile_round_trips_and_pads_the_last_block():
  kernel = jnp.arange(3 * 130, dtype=jnp.float32).reshape(3, 130)
  tiles = cpu.tile(kernel)
  assert tiles.shape == (3, 3, cpu.TILE)  # ceil(130 / 64) blocks of [K, 64].
  np.testing.assert_array_equal(tiles[1, 2], kernel[2, 64:128])  # Block 1, row 2: contiguous.
  assert (tiles[2, :, 2:] == 0).all()  # Padding.
  np.testing.assert_array_equal(cpu.untile(tiles, 130), kernel)


@needs_kernels
@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
def test_tiled_matmul_is_the_widened_matmul(build, weights):
  """Every row count (register blocks of 4 and remainders), partial last tiles, and a weight
  large enough to be split over threads; the portable loop (no AVX-512) as well."""
  name = "coca_jax_tiled_matmul"
  if build == "portable":
    cpu.load(("-DCOCA_JAX_PORTABLE",), name=PORTABLE)
    name = PORTABLE
  rng = np.random.default_rng(0)
  for m, k, n in ((1, 24, 20), (2, 40, 130), (5, 24, 64), (9, 7, 3), (3, 512, 600)):
    kernel = jnp.asarray(rng.standard_normal((k, n)) * np.linspace(0.1, 3.0, n), jnp.float32)
    q = layers.quantize_kernel(kernel, 1, weights, tiled=True)
    scale = q.get("kernel_scale")
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    y = jax.jit(lambda x, t, *s: cpu.tiled_matmul(x, t, *(s or (None,)), n, name=name))(
        x, q["kernel_tiles"], *([] if scale is None else [scale]))
    assert y.shape == (m, n) and y.dtype == jnp.float32
    expected = _reference(x, q["kernel_tiles"], scale, n)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-4 * np.sqrt(k))


@needs_kernels
@pytest.mark.parametrize("rows", [2, 40])
def test_tiled_dense_matches_its_xla_fallback(rows, monkeypatch):
  """A Dense reading tiled weights gives what the untiled int8 / bf16 layouts give, through the
  kernel on CPU and through XLA's widened dot when no kernel is built; two-axis inputs too."""
  for weights in layers.DECODE_WEIGHTS:
    for in_dims, x_shape, k_shape in ((1, (rows, 24), (24, 3, 5)), (2, (rows, 3, 8), (3, 8, 70))):
      x = jax.random.normal(jax.random.key(0), x_shape)
      kernel = jax.random.normal(jax.random.key(1), k_shape)
      dense = layers.Dense(k_shape[in_dims:], ("a",) * len(k_shape), in_dims=in_dims)
      bias = {"bias": jnp.full(k_shape[in_dims:], 0.5)}
      plain_params = {"params": {**layers.quantize_kernel(kernel, in_dims, weights), **bias}}
      plain = dense.apply(plain_params, x)
      tiled_params = {"params": {**layers.quantize_kernel(kernel, in_dims, weights, True), **bias}}
      tiled = dense.apply(tiled_params, x)
      assert "kernel" not in tiled_params["params"] and tiled.shape == plain.shape
      # The untiled bf16 layout multiplies bf16-rounded inputs; the tiled one float32 inputs.
      atol = 1e-4 if weights == "int8" else 0.1
      np.testing.assert_allclose(tiled, plain, atol=atol)
      with monkeypatch.context() as patch:
        patch.setattr(cpu, "available", lambda: False)
        fallback = dense.apply(tiled_params, x)
      np.testing.assert_allclose(fallback, tiled, atol=1e-4)


@needs_kernels
def test_build_is_cached_and_a_failed_build_names_its_command(tmp_path, monkeypatch):
  monkeypatch.setenv("COCA_JAX_CACHE", str(tmp_path))
  path = cpu.build()
  assert path.parent == tmp_path / "kernels" and path.suffix == ".so"
  mtime = os.stat(path).st_mtime_ns
  assert cpu.build() == path and os.stat(path).st_mtime_ns == mtime  # Reused, not rebuilt.
  with pytest.raises(RuntimeError, match="-DCOCA_JAX_NOT_CACHED.*failed"):
    cpu.build(cpu.FLAGS + ("-DCOCA_JAX_NOT_CACHED", "--no-such-compiler-flag"))
  assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [path.name]  # No debris.


def test_switch_off_builds_nothing(tmp_path):
  """COCA_JAX_CPU_KERNELS=0: nothing is compiled and the kernels report unavailable (decoding
  weights then keep the untiled layout, test_generate)."""
  import subprocess
  import sys
  code = "from coca_jax.models.kernels import cpu; print(cpu.available())"
  env = dict(os.environ, COCA_JAX_CPU_KERNELS="0", COCA_JAX_CACHE=str(tmp_path))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
  assert not (tmp_path / "kernels").exists()
