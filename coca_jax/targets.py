"""GPUs to compile for without having one: `coca_jax.bench --mode compile --target h200`.

XLA's GPU compiler runs on the host; given a description of the device (what the CUDA plugin
would otherwise read from the driver) it compiles the sharded train step exactly as it would
on that GPU, minus autotuning (default kernel choices). So the memory figures are the GPU
compiler's own, and `hlo_cost` can estimate the step's time from the compiled module, on a
laptop. Needs the CUDA plugin matching the installed jaxlib and cuDNN (no GPU, no driver):

  pip install "jax-cuda13-plugin==$(python -c 'import jaxlib; print(jaxlib.__version__)')" \
      "nvidia-cudnn-cu13>=9.12,<10"

Each target names the device description and the roofline rates of `hlo_cost.Device`:
bandwidth and the matmul / fused-attention rates this model's shapes reached on a real device
(docs/scale.md, "One H200, 2026-11-28"), not the spec sheet's.
"""

from __future__ import annotations

import os

from coca_jax.hlo_cost import Device

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

# Rates measured on one H200 (batch-256 profile: cuBLAS + Triton GEMMs at 650 TFLOP/s of model
# FLOPs, cuDNN attention at 150 by hlo_cost's count, device copies at ~4.3 TB/s). The H100 has
# the same SMs and clock: its rates are the H200's with bandwidth scaled by the spec ratio
# (3.35 / 4.8 TB/s), not measured. Collectives: NVLink 4's 450 GB/s per direction (spec).
TARGETS = {
    "h200": (_HOPPER.format(bandwidth=4_800_000_000_000, memory=150_754_820_096,
                            name="NVIDIA H200"),
             Device("NVIDIA H200", 4.3e12, 650e12, 150e12, 450e9)),
    "h100": (_HOPPER.format(bandwidth=3_352_320_000_000, memory=84_929_347_584,
                            name="NVIDIA H100 80GB HBM3"),
             Device("NVIDIA H100 80GB HBM3", 4.3e12 * 3.35 / 4.8, 650e12, 150e12, 450e9)),
}

# Without autotuning, XLA cannot always pick tile sizes for its Triton GEMMs (it fails to
# compile some of this model's dots), so target compiles use cuBLAS for every matmul, which on
# the H200 ran the batch-128 and batch-256 steps as fast (docs/scale.md).
TARGET_XLA_FLAGS = "--xla_gpu_enable_triton_gemm=false"


def prepare(target: str) -> None:
  """Before JAX starts: CPU as the host platform, the target compile's XLA flags."""
  if target not in TARGETS:
    raise ValueError(f"--target={target!r} is unknown; use one of {sorted(TARGETS)}")
  import jax
  jax.config.update("jax_platforms", "cpu")  # No GPU here: don't start the CUDA client.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_enable_triton_gemm" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {TARGET_XLA_FLAGS}".strip()


def devices(target: str, count: int = 1) -> list:
  """`count` devices of `target` (one host), to build a mesh and compile for."""
  from jax.experimental import topologies
  description, _ = TARGETS[target]
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=description,
                                            topology=f"1x1x{count}")
  except Exception as error:  # No plugin (RuntimeError/NotImplementedError), or a mismatch.
    raise RuntimeError(
        f"--target={target}: cannot describe a CUDA device here ({error}). Install the CUDA "
        "plugin for this jaxlib and cuDNN: pip install \"jax-cuda13-plugin==<your jaxlib "
        "version>\" \"nvidia-cudnn-cu13>=9.12,<10\" (no GPU or driver needed)") from error
  return list(topology.devices)


def roofline_device(target: str) -> Device:
  return TARGETS[target][1]


def for_device_kind(device_kind: str) -> str | None:
  """The target whose rates describe a real device of this kind ('NVIDIA H200' -> 'h200'), so
  a run on the device can print the estimate beside its measurement; None for others."""
  kind = device_kind.lower()
  return next((name for name in TARGETS if name in kind), None)
