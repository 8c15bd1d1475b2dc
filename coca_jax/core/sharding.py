"""The one place that maps logical axis names to mesh axes.

Mesh axes: data (pure data parallel), fsdp (data parallel with parameters and optimizer state
sharded), tensor (Megatron-style: heads / mlp / vocab split), expert (expert parallel).
Model code only names logical axes; `LOGICAL_AXIS_RULES` below decides where they live.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# (logical axis, mesh axes). Within one array a mesh axis is used at most once, first rule wins:
# activations [batch, length, embed] put batch on (data, fsdp) so `embed` stays whole there, while
# parameters [embed, mlp] are split over fsdp (embed) and tensor (mlp).
# Routed experts' dispatched buffers [expert_batch, expert, capacity, embed] keep the batch on
# (data, fsdp) and put experts on `expert`: the constraint makes XLA move each token from its
# batch shard to its expert's device (an all-to-all over `expert`) and back.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("expert_batch", ("data", "fsdp")),
    ("expert", "expert"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("queries", None),
    ("patch", None),
    ("joint", None),
    ("layers", None),
)


class MeshConfigError(ValueError):
  pass


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves `config.mesh` sizes (one may be -1 = the rest) to a full {axis: size} dict."""
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  unknown = [axis for axis, size in sizes.items() if size == -1]
  if len(unknown) > 1:
    raise MeshConfigError(f"config.mesh: only one axis may be -1, got {unknown}")
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise MeshConfigError(f"config.mesh.{axis}={size} must be a positive size or -1")
  known = math.prod(size for size in sizes.values() if size != -1)
  if unknown:
    if num_devices % known:
      raise MeshConfigError(
          f"config.mesh: fixed axes multiply to {known}, which does not divide the "
          f"{num_devices} devices; choose sizes whose product divides {num_devices}")
    sizes[unknown[0]] = num_devices // known
  elif known != num_devices:
    raise MeshConfigError(
        f"config.mesh sizes {sizes} multiply to {known} but there are {num_devices} devices; "
        f"set one axis to -1 (e.g. --config.mesh.data=-1) or make the product {num_devices}")
  return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the device mesh from `config.mesh`.

  With `config.mesh.dcn_<axis>` > 1 (multi-slice), the axis is split into an inter-slice (DCN)
  part and an intra-slice (ICI) part via `mesh_utils.create_hybrid_device_mesh`.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  dcn = tuple(int(mesh_config.get(f"dcn_{axis}", 1)) for axis in MESH_AXES)
  if math.prod(dcn) > 1:
    for axis, size, d in zip(MESH_AXES, shape, dcn):
      if size % d:
        raise MeshConfigError(f"config.mesh.{axis}={size} is not divisible by "
                              f"config.mesh.dcn_{axis}={d}")
    ici = tuple(size // d for size, d in zip(shape, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      # Topology-aware placement is unavailable for this device kind: plain order is fine.
      grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_axis_rules(config=None) -> tuple[tuple[str, Any], ...]:
  """The rules table; `config.mesh.rules` (list of (logical, mesh axes)) may override entries."""
  overrides = dict(config.mesh.get("rules", ()) or ()) if config is not None else {}
  rules = [(name, overrides.pop(name, axes)) for name, axes in LOGICAL_AXIS_RULES]
  return tuple(rules + list(overrides.items()))


def logical_to_sharding(logical_tree, mesh: Mesh, rules) -> Any:
  """Logical PartitionSpecs (pytree) -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis split over every data-parallel mesh axis; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs of `abstract` (any pytree of arrays or ShapeDtypeStructs) that carry
  `shardings` (a matching pytree of Shardings, or one Sharding for every leaf): the target an
  orbax restore or an ahead-of-time `lower` places each array on."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def batch_split_problem(batch_size: int, shards: int, microbatches: int = 1,
                        mesh_shape=None) -> str | None:
  """Why config.train.batch_size cannot be split evenly over `shards` batch shards, each shard's
  rows again into `microbatches` (None when it can): the one rule and message that config
  validation and the train step share. `mesh_shape` (a dict) only names the mesh in the message."""
  per = shards * max(microbatches, 1)
  if batch_size % per == 0:
    return None
  mesh = f" {dict(mesh_shape)}" if mesh_shape is not None else ""
  split = f" x {microbatches} microbatches" if per != shards else ""
  return (f"config.train.batch_size={batch_size} is not divisible by the {shards} batch shards "
          f"of the mesh{mesh}{split}; use a multiple of {per}")


def batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_key(path) -> tuple:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shardings_like_params(tree, params_shardings, params_shapes, mesh: Mesh):
  """Shardings for an optimizer-state-like tree: a leaf whose key path ends with a parameter's
  path and has that parameter's shape gets the parameter's sharding; anything else (step counts,
  Adafactor's factored row/column moments) is replicated."""
  by_path = {}
  for (path, sharding), (_, shape) in zip(
      jax.tree_util.tree_flatten_with_path(params_shardings)[0],
      jax.tree_util.tree_flatten_with_path(params_shapes)[0]):
    by_path[_path_key(path)] = (sharding, shape.shape)

  def leaf_sharding(path, leaf):
    key = _path_key(path)
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is not None and tuple(hit[1]) == tuple(leaf.shape):
        return hit[0]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)
