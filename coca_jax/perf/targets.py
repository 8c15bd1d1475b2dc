r"""Accelerators to compile for without having them: `coca_jax.bench --mode compile --target T`.

XLA's compilers run on the host. Given a description of the target (what the runtime would
otherwise read from the hardware), they compile the sharded train step as they would on it,
minus autotuning, so the memory figures are that compiler's own, not a CPU stand-in's.

GPUs, `--target h100` or `h200` (`--devices N`: N of them on one host). `hlo_cost` also
estimates the step's time from the compiled module. Needs the CUDA plugin matching the
installed jaxlib, and cuDNN (no GPU, no driver):

  pip install "jax-cuda13-plugin==$(python -c 'import jaxlib; print(jaxlib.__version__)')" \
      "nvidia-cudnn-cu13>=9.12,<10"

TPU slices, `--target v5e:4x4` (a generation and its chip grid as Cloud TPU names topologies:
v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB; v4 and v5p chips run as one megacore device). Memory
only: the roofline rates are measured for GPUs. Needs libtpu (no TPU):

  pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"

Each GPU target names the device description and the roofline rates of `hlo_cost.Device`:
bandwidth and the matmul / fused-attention rates this model's shapes reached on a real device
(docs/performance.md, "One H200: a profile of the step"), not the spec sheet's.
"""

from __future__ import annotations

import math
import os

from coca_jax.perf.hlo_cost import Device

_GPU_MEMORY_H100, _GPU_MEMORY_H200 = 84_929_347_584, 150_754_820_096  # Bytes, as reported.

# compute capability 9.0 (Hopper), 132 SMs; the fields the GPU compiler reads.
_HOPPER = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 12 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{name}"
"""

# Rates from the H200 profile of the batch-256 step (docs/performance.md, "Estimating a GPU step
# without the GPU"): what its GEMMs, cuDNN attention and device copies reached. The H100 has
# the same SMs and clock: its rates are the H200's with bandwidth scaled by the spec ratio
# (3.35 / 4.8 TB/s), not measured. Collectives: NVLink 4's 450 GB/s per direction (spec).
GPU_TARGETS = {
    "h200": (_HOPPER.format(bandwidth=4_800_000_000_000, memory=_GPU_MEMORY_H200,
                            name="NVIDIA H200"),
             Device("NVIDIA H200", 4.3e12, 650e12, 150e12, 450e9)),
    "h100": (_HOPPER.format(bandwidth=3_352_320_000_000, memory=_GPU_MEMORY_H100,
                            name="NVIDIA H100 80GB HBM3"),
             Device("NVIDIA H100 80GB HBM3", 4.3e12 * 3.35 / 4.8, 650e12, 150e12, 450e9)),
}

# Without autotuning, XLA cannot always pick tile sizes for its Triton GEMMs (it fails to
# compile some of this model's dots), so target compiles use cuBLAS for every matmul, which on
# the H200 ran this model's steps as fast (docs/performance.md).
GPU_TARGET_XLA_FLAGS = "--xla_gpu_enable_triton_gemm=false"


TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")
_MEGACORE = ("v4", "v5p")  # Two TensorCores per chip, one JAX device.


def _tpu_grid(target: str) -> tuple[str, tuple[int, ...]] | None:
  """'v5e:4x4' -> ('v5e', (4, 4)); None if `target` is not a TPU topology name."""
  generation, _, grid = target.partition(":")
  if generation not in TPU_GENERATIONS or not grid:
    return None
  try:
    dims = tuple(int(d) for d in grid.split("x"))
  except ValueError:
    return None
  want = 3 if generation in _MEGACORE else 2
  return (generation, dims) if len(dims) == want and min(dims) > 0 else None


def is_tpu(target: str) -> bool:
  return _tpu_grid(target) is not None


def prepare(target: str) -> None:
  """Before JAX starts: CPU as the host platform, and what the target's compiler needs."""
  if target not in GPU_TARGETS and not is_tpu(target):
    raise ValueError(f"--target={target!r} is unknown; use one of {sorted(GPU_TARGETS)} or a "
                     "TPU slice such as v5e:4x4, v6e:16x16, v4:2x2x4 or v5p:4x4x4")
  import jax
  jax.config.update("jax_platforms", "cpu")  # No accelerator here: don't start its client.
  if is_tpu(target):
    generation, dims = _tpu_grid(target)
    chips = math.prod(dims)
    accelerator = {"v4": f"v4-{2 * chips}", "v5p": f"v5p-{2 * chips}",
                   "v5e": f"v5litepod-{chips}", "v6e": f"v6e-{chips}"}[generation]
    # libtpu would otherwise look for this host's TPU (metadata server, worker names).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_enable_triton_gemm" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {GPU_TARGET_XLA_FLAGS}".strip()


class TargetError(RuntimeError):
  """A --target this host cannot compile for as asked; the message names the fix."""


def devices(target: str, count: int | None = None) -> list:
  """The target's devices, to build a mesh and compile for: `count` GPUs on one host (default
  1), or every chip of a TPU slice (`count`, if given, must match)."""
  from jax.experimental import topologies
  grid = _tpu_grid(target)
  try:
    if grid is not None:
      generation, _ = grid
      topology = topologies.get_topology_desc(
          platform="tpu", topology_name=target, chips_per_host_bounds=(2, 2, 1), num_slices=1,
          chip_config_name="megacore" if generation in _MEGACORE else "default")
    else:
      description, _ = GPU_TARGETS[target]
      topology = topologies.get_topology_desc(platform="cuda", target_config=description,
                                              topology=f"1x1x{count or 1}")
  except (RuntimeError, NotImplementedError) as error:  # What JAX raises without the plugin.
    install = ('"jax[tpu]==<your jax version>"' if grid is not None else
               '"jax-cuda13-plugin==<your jaxlib version>" "nvidia-cudnn-cu13>=9.12,<10"')
    raise TargetError(f"--target={target}: cannot describe this device here ({error}). If "
                       f"its compiler is missing: pip install {install} (no accelerator "
                       "needed)") from error
  found = list(topology.devices)
  if grid is not None and count and count != len(found):
    raise ValueError(f"--devices={count} but the TPU slice {target} has {len(found)} devices; "
                     "drop --devices or name the slice you mean")
  return found


# Memory of one device (TPU: per chip, the HBM the compiler may plan into is a little less).
_TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_GPU_MEMORY = {"h100": _GPU_MEMORY_H100, "h200": _GPU_MEMORY_H200}


def device_memory_bytes(target: str) -> int:
  grid = _tpu_grid(target)
  return _TPU_HBM_GIB[grid[0]] * 2**30 if grid is not None else _GPU_MEMORY[target]


def roofline_device(target: str) -> Device:
  return GPU_TARGETS[target][1]


def for_device_kind(device_kind: str) -> str | None:
  """The GPU target whose rates describe a real device of this kind ('NVIDIA H200' -> 'h200'),
  so a run on the device can print the estimate beside its measurement; None for others."""
  kind = device_kind.lower()
  return next((name for name in GPU_TARGETS if name in kind), None)
