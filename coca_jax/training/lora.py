"""LoRA: low-rank adapters on frozen Dense kernels (`config.optim.lora`; docs/training.md, "LoRA").

The base parameters stay as they are, in their own tree; the adapters are a second, small tree,
and a parameter transform builds the weights the model runs with:

  W' = W + alpha / rank * A @ B      A: [*batch, *in, r], B: [*batch, r, *out]

for each adapted kernel W [*batch, *in, *out] (batch: a scanned stack's `layers` axis, routed
experts' `expert` axis; in/out: the axes the Dense layer contracts and produces, e.g. a query
kernel [embed | heads, kv] or an attention output [heads, kv | embed]). B starts at zero, so
the adapted model starts equal to its base. The model code does not change: it receives W'.

What the optimizer updates (TrainState.params under LoRA) is the `trainable` tree
  {"adapters": {<path of W>...: {"lora_a": A, "lora_b": B}},
   "unfrozen": {<path>...: value}}      (config.optim.lora.unfrozen_regex; often empty)
so the optimizer state and the checkpoints hold only these. Each adapter carries its kernel's
logical axis names (the rank axis unsharded), so it shards like its base kernel.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from coca_jax.core import config as config_lib
from coca_jax.core import schema

ADAPTERS, UNFROZEN = "adapters", "unfrozen"
LORA_A, LORA_B = "lora_a", "lora_b"
# Leaves that are Dense-like weights: Dense kernels, and the routed experts' wi/wo.
WEIGHT_LEAVES = ("kernel", "wi", "wo")
# Leading axes that index stacked copies of a kernel (each copy gets its own adapter).
STACK_AXES = ("layers", "expert")


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted kernel: its shape split into stacked copies, inputs and outputs."""
  shape: tuple[int, ...]
  names: tuple[str | None, ...]
  stack: int  # leading stacked axes
  inputs: int  # contracted axes after them; the rest are outputs

  @property
  def in_shape(self):
    return self.shape[self.stack:self.stack + self.inputs]

  @property
  def out_shape(self):
    return self.shape[self.stack + self.inputs:]

  def a_shape(self, rank):
    return (*self.shape[:self.stack], *self.in_shape, rank)

  def b_shape(self, rank):
    return (*self.shape[:self.stack], rank, *self.out_shape)

  def a_names(self):
    return (*self.names[:self.stack + self.inputs], None)

  def b_names(self):
    return (*self.names[:self.stack], None, *self.names[self.stack + self.inputs:])


def lora_settings(config) -> schema.Lora:
  """The frozen `schema.Lora` of a config (or of its optim group)."""
  optim = config.optim if "optim" in config else config
  return schema.build(schema.Lora, optim.get("lora") or {})


def enabled(config) -> bool:
  return lora_settings(config).enabled


def _split(names: tuple) -> tuple[int, int] | None:
  """(stacked axes, input axes) of a weight with logical axis names `names`, or None when it
  is not a matrix. The outputs are the last axis, or (heads, kv) for a query/key/value kernel;
  everything between the stacked axes and the outputs is contracted."""
  stack = 0
  while stack < len(names) and names[stack] in STACK_AXES:
    stack += 1
  out = 2 if tuple(names[-2:]) == ("heads", "kv") else 1
  inputs = len(names) - stack - out
  return (stack, inputs) if inputs >= 1 else None


def targets(boxed_params, lora: schema.Lora) -> dict[tuple, Target]:
  """{path tuple: Target} of the kernels `lora.targets` matches in `boxed_params` (abstract
  params with their nn.Partitioned boxes). A regex that matches no weight is a ConfigError
  naming the field and a few of the weights it could match."""
  pattern = re.compile(lora.targets)
  found, candidates = {}, []
  flat = traverse_util.flatten_dict(boxed_params)
  for path, leaf in flat.items():
    names = getattr(leaf, "names", None)
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    if path[-1] not in WEIGHT_LEAVES or names is None or len(names) != len(value.shape):
      continue
    split = _split(tuple(names))
    if split is None:
      continue
    joined = "/".join(path)
    candidates.append(joined)
    if pattern.search(joined):
      found[path] = Target(tuple(value.shape), tuple(names), *split)
  if not found:
    raise config_lib.ConfigError(
        f"config.optim.lora.targets={lora.targets!r} matches no Dense kernel of this model; "
        f"the kernels are paths such as {', '.join(candidates[:4])} (the default adapts "
        f"attention and MLP kernels: {schema.DEFAULT_LORA_TARGETS!r})")
  return found


def unfrozen_paths(params, lora: schema.Lora) -> list[tuple]:
  """Paths of the parameters `lora.unfrozen_regex` trains in full ('' = none)."""
  if not lora.unfrozen_regex:
    return []
  pattern = re.compile(lora.unfrozen_regex)
  return [p for p in traverse_util.flatten_dict(params) if pattern.search("/".join(p))]


def _unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat) if flat else {}


def abstract_trainable(found: dict[tuple, Target], base_abstract, lora: schema.Lora):
  """(trainable ShapeDtypeStructs, their logical PartitionSpecs) for `found` (see `targets`)
  and the unfrozen parameters of `base_abstract` (boxed, for their axis names)."""
  shapes, specs = {}, {}
  for path, t in found.items():
    for leaf, shape, names in ((LORA_A, t.a_shape(lora.rank), t.a_names()),
                               (LORA_B, t.b_shape(lora.rank), t.b_names())):
      shapes[(ADAPTERS, *path, leaf)] = jax.ShapeDtypeStruct(shape, jnp.float32)
      specs[(ADAPTERS, *path, leaf)] = P(*names)
  flat_base = traverse_util.flatten_dict(base_abstract)
  for path in unfrozen_paths(nn.unbox(base_abstract), lora):
    leaf = flat_base[path]
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    shapes[(UNFROZEN, *path)] = jax.ShapeDtypeStruct(value.shape, value.dtype)
    names = getattr(leaf, "names", None)
    specs[(UNFROZEN, *path)] = P(*names) if names else P()
  return _unflatten(shapes), _unflatten(specs)


def init_trainable(found: dict[tuple, Target], base, lora: schema.Lora, rng):
  """The trainable tree at the start: A random (scaled by its fan-in, like a Dense kernel), B
  zero (so W' = W), unfrozen parameters copied from `base`."""
  flat = {}
  for i, (path, t) in enumerate(sorted(found.items())):
    fan_in = math.prod(t.in_shape)
    a = jax.random.normal(jax.random.fold_in(rng, i), t.a_shape(lora.rank), jnp.float32)
    flat[(ADAPTERS, *path, LORA_A)] = a / math.sqrt(fan_in)
    flat[(ADAPTERS, *path, LORA_B)] = jnp.zeros(t.b_shape(lora.rank), jnp.float32)
  flat_base = traverse_util.flatten_dict(base)
  for path in unfrozen_paths(base, lora):
    flat[(UNFROZEN, *path)] = flat_base[path]
  return _unflatten(flat)


def delta(a, b, kernel_shape) -> jax.Array:
  """A @ B in the kernel's layout: A [*stack, *in, r], B [*stack, r, *out] -> [*stack, *in,
  *out] (the stacked axes are a batch of independent products)."""
  rank = a.shape[-1]
  stack = b.ndim - 1 - (len(kernel_shape) - (a.ndim - 1))
  lead = a.shape[:stack]
  a2 = a.reshape(*lead, -1, rank)
  b2 = b.reshape(*lead, rank, -1)
  return jnp.matmul(a2, b2).reshape(kernel_shape)


def apply(base, trainable, scale: float):
  """The parameters the model runs with: `base` with each adapted kernel W replaced by
  W + scale * A @ B and each unfrozen parameter by its trained value. Differentiable in
  `trainable`; `base` is only read."""
  flat = dict(traverse_util.flatten_dict(base))
  adapters = traverse_util.flatten_dict(trainable.get(ADAPTERS, {}))
  for path in {p[:-1] for p in adapters}:
    w = flat[path]
    d = delta(adapters[(*path, LORA_A)], adapters[(*path, LORA_B)], w.shape)
    flat[path] = (w + scale * d).astype(w.dtype)
  for path, value in traverse_util.flatten_dict(trainable.get(UNFROZEN, {})).items():
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


def counts(trainable) -> dict:
  """{adapters, unfrozen}: how many values each part holds (for the log and docs)."""
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  return {ADAPTERS: size(trainable.get(ADAPTERS, {})), UNFROZEN: size(trainable.get(UNFROZEN, {}))}
