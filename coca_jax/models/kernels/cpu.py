"""Narrow-weight matmuls for cached decoding on CPU (`tiled_matmul.cc`), built on first use.

A cached decoding step multiplies a few rows (batch x beams) by every decoder matrix: its time
is the time to read the weights. `tiled_matmul` reads int8 (per-output-column float32 scales)
or bfloat16 weights in place and widens them in registers, float32 accumulation, so an int8
decoder streams a quarter of the float32 bytes. The weights are stored as "tiles"
([ceil(N / 64), K, 64], `tile`), each 64-column block of a [K, N] matrix one contiguous run.

The C++ source is compiled once per machine with the host compiler (`$CXX`, else `c++` / `g++`;
`-O3 -march=native`) into a cache directory (`$COCA_JAX_CACHE`, else `$XDG_CACHE_HOME/coca_jax`,
else `~/.cache/coca_jax`), keyed by the source, compiler, flags, jaxlib version and CPU flags,
and registered with XLA as an FFI custom call. `available()` says whether that worked; where it
did not (no compiler, `COCA_JAX_CPU_KERNELS=0`), `generate.decoder_params` keeps the portable
layout that XLA widens itself (same results, slower on CPU); the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
from pathlib import Path
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib

TILE = 64  # Columns per tile; fixed by the kernel.
SOURCE = Path(__file__).with_name("tiled_matmul.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
ENV_SWITCH = "COCA_JAX_CPU_KERNELS"  # "0": never build or use the kernels.
_TARGETS = {"int8": "CocaJaxTiledMatmulInt8", "bfloat16": "CocaJaxTiledMatmulBf16"}


def tile(kernel) -> jax.Array:
  """kernel [K, N] -> tiles [ceil(N / 64), K, 64]: 64-column blocks, each contiguous (padded)."""
  k, n = kernel.shape
  padded = jnp.pad(kernel, ((0, 0), (0, -n % TILE)))
  return padded.reshape(k, -1, TILE).transpose(1, 0, 2)


def untile(tiles, n: int) -> jax.Array:
  """tiles [ceil(N / 64), K, 64] -> kernel [K, N] (the inverse of `tile`)."""
  blocks, k, _ = tiles.shape
  return tiles.transpose(1, 0, 2).reshape(k, blocks * TILE)[:, :n]


def tiled_matmul(x, tiles, scale, n: int, name: str = "coca_jax_tiled_matmul") -> jax.Array:
  """x float32 [M, K] @ (tiles [ceil(N/64), K, 64] int8 * scale [N], or bfloat16 with scale None)
  -> float32 [M, N], through the compiled kernel (CPU only; check `available()` first)."""
  weights = "int8" if tiles.dtype == jnp.int8 else "bfloat16"
  if (weights == "int8") != (scale is not None) or tiles.dtype not in (jnp.int8, jnp.bfloat16):
    raise ValueError(f"tiled_matmul: int8 tiles take a scale [N], bfloat16 tiles none; got "
                     f"{tiles.dtype} tiles and scale={None if scale is None else scale.shape}")
  out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
  operands = (x.astype(jnp.float32), tiles) + (() if scale is None else (scale,))
  return jax.ffi.ffi_call(f"{name}_{weights}", out)(*operands)


@functools.cache
def available() -> bool:
  """Whether the kernels are built and registered in this process (built on the first call)."""
  if os.environ.get(ENV_SWITCH, "1") == "0":
    logging.info("CPU decoding kernels off (%s=0): narrow decoding weights are widened by XLA",
                 ENV_SWITCH)
    return False
  try:
    load()
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    logging.warning("CPU decoding kernels unavailable (%s); narrow decoding weights are widened "
                    "by XLA instead (same results, slower). Set %s=0 to skip the build.",
                    e, ENV_SWITCH)
    return False
  return True


@functools.cache
def load(extra_flags: tuple[str, ...] = (), name: str = "coca_jax_tiled_matmul") -> ctypes.CDLL:
  """Builds (or finds in the cache) the kernel library and registers its targets as
  `{name}_int8` and `{name}_bfloat16` for the CPU platform. `extra_flags` (e.g.
  ("-DCOCA_JAX_PORTABLE",) for the portable loop) build a separate library."""
  library = ctypes.cdll.LoadLibrary(str(build(FLAGS + tuple(extra_flags))))
  for weights, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f"{name}_{weights}", jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  return library


def build(flags: tuple[str, ...] = FLAGS) -> Path:
  """Compiles SOURCE with `flags` unless the cache holds it; -> the shared library's path."""
  compiler = _compiler()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           check=True).stdout
  key = hashlib.sha256("\0".join(
      [SOURCE.read_text(), compiler, version, *flags, jaxlib.__version__, platform.machine(),
       _cpu_flags()]).encode()).hexdigest()[:16]
  target = _cache_dir() / f"tiled_matmul-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: concurrent processes never load a half-written file.
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = Path(tmp) / target.name
    command = [compiler, *flags, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")
    os.replace(partial, target)
  logging.info("built CPU decoding kernels: %s", target)
  return target


def _compiler() -> str:
  for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if candidate and shutil.which(candidate):
      return shutil.which(candidate)
  raise RuntimeError("no C++ compiler found (set $CXX or install g++)")


def _cache_dir() -> Path:
  if os.environ.get("COCA_JAX_CACHE"):
    return Path(os.environ["COCA_JAX_CACHE"]) / "kernels"
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "coca_jax" / "kernels"


def _cpu_flags() -> str:
  """The CPU's feature flags: a library built with -march=native is only reused on a CPU that
  has the same (a shared home directory may serve several machine types)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor()
