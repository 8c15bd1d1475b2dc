"""TrainState, sharded state creation, and the pure train step.

The state is built abstractly first (`jax.eval_shape`), its shardings derived from the model's
logical axis names, and only then materialised by a jitted init whose `out_shardings` place every
array directly where it lives. Nothing is ever built whole on one device.

Gradient accumulation (`config.train.microbatches` = m > 1) is EXACT: the result equals one step
on the whole batch, contrastive term included. The contrastive loss is not a sum over
microbatches (every example's negatives are the whole global batch), so the step runs in three
phases (the "gradient cache" scheme):
  1. embed: a scan over microbatches computes image and text embeddings only (no gradients);
  2. contrast: the contrastive loss over all B embeddings, and its gradient with respect to each
     embedding and to the logit scale (and bias) - a [B, D] array, small next to activations;
  3. backprop: a scan over microbatches re-runs the full forward pass and backpropagates the
     caption loss plus the cached embedding gradients (a linear surrogate <g, embed>), summing
     parameter gradients.
Cost: one extra forward pass of the image encoder and unimodal decoder per step (about +20% of
a step's FLOPs); memory: activations of one microbatch. Captions are normalised by the token
count of the whole batch, so the caption term is exact too.

With learned routing, the router terms (`losses.router_losses`) are computed per microbatch and
averaged. The local-entropy term is a mean over tokens, so (with equal token counts per
microbatch) it is exact; the balance and global-entropy terms are products / entropies of
batch means, so they are the microbatch average of the per-microbatch values: approximated, the
way MoE trainers compute them per device group anyway. Causal text and `priority='position'`
have capacity per sequence, so their routing is unchanged by the split; Batch Priority Routing
(image tokens) shares capacity over groups of `group_size` examples, and a group is then that
many examples of one microbatch (rows j, j + m, ...), so which image choices are dropped can
differ from the whole batch's (`group_size=1` keeps it exact). Router noise needs
microbatches=1 (config.validate). The logged router metrics (load, dropped fraction, entropy)
are computed from statistics summed over microbatches: those of the whole batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from coca_jax.training import losses

from coca_jax import models

from coca_jax.core import schema
from coca_jax.core import sharding
from coca_jax.training import optim
from coca_jax.models.coca import CoCa, clamp_logit_scale
from coca_jax.core.tokens import PAD_ID


@flax.struct.dataclass
class TrainState:
  """Everything the step updates. A pytree: checkpointed and sharded as one."""
  step: jax.Array
  params: Any
  opt_state: Any


def dummy_batch(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  size = config.model.image_size
  return {
      "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
      "text": jax.ShapeDtypeStruct((batch_size, config.model.text.max_len), jnp.int32),
  }


def batch_shardings(mesh: Mesh) -> dict:
  """Where a training batch lives: {"image" [batch, S, S, 3], "text" [batch, L]}, each split
  over the data-parallel mesh axes along batch. The step's in_shardings and the data pipeline's
  output both use it."""
  return {"image": sharding.batch_sharding(mesh, 4), "text": sharding.batch_sharding(mesh, 2)}


def build_model(config) -> CoCa:
  """The model for a full experiment config (`config.model.backbone`: CoCa towers or MoME). The
  sigmoid contrastive loss needs a learnable logit bias in the model, so the model's
  `contrastive` follows `config.loss.contrastive`; a MoME gets its ITM head when
  `config.loss.itm_weight` > 0."""
  model_config = dataclasses.replace(models.model_config(config.model),
                                     contrastive=config.loss.contrastive)
  return models.build(model_config, itm=config.loss.itm_weight > 0)


def _init_boxed_params(model: CoCa, config, rng):
  batch = dummy_batch(config, 1)
  image = jnp.zeros(batch["image"].shape, batch["image"].dtype)
  text = jnp.zeros(batch["text"].shape, batch["text"].dtype)
  return model.init(rng, image, text)["params"]


def init_params(config, model: CoCa, rng):
  """Freshly initialised parameters of `model` (plain arrays, on the default device): for
  benchmarks and tools that need real weights without an optimizer or a mesh."""
  return jax.jit(lambda r: nn.unbox(_init_boxed_params(model, config, r)))(rng)


def abstract_params(config, model: CoCa | None = None, *, boxed: bool = False):
  """The parameter tree of `model` (default: `build_model(config)`, the full config deciding
  extras such as the sigmoid logit bias) as ShapeDtypeStructs; nothing is allocated. `boxed`
  keeps the nn.Partitioned boxes with their logical axis names (what shardings derive from)."""
  model = build_model(config) if model is None else model
  params = jax.eval_shape(functools.partial(_init_boxed_params, model, config),
                          jax.random.key(0))
  return params if boxed else nn.unbox(params)


def state_shardings(model: CoCa, tx: optax.GradientTransformation, config, mesh: Mesh, rules):
  """(abstract TrainState of ShapeDtypeStructs, TrainState of NamedShardings)."""
  boxed = abstract_params(config, model, boxed=True)
  param_specs = nn.get_partition_spec(boxed)
  params_abstract = nn.unbox(boxed)
  param_shardings = sharding.logical_to_sharding(param_specs, mesh, rules)
  opt_abstract = jax.eval_shape(tx.init, params_abstract)
  opt_shardings = sharding.shardings_like_params(opt_abstract, param_shardings, params_abstract, mesh)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abstract,
                        opt_state=opt_abstract)
  shardings = TrainState(step=sharding.replicated(mesh), params=param_shardings,
                         opt_state=opt_shardings)
  return abstract, shardings


def make_init_fn(model: CoCa, tx: optax.GradientTransformation, config, shardings: TrainState):
  """A jitted rng -> TrainState that materialises each array on its own shards."""
  def init(rng):
    params = nn.unbox(_init_boxed_params(model, config, rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return jax.jit(init, out_shardings=shardings)


def _drop_path_rate(model) -> float:
  """The model's stochastic depth rate (MoME config.model.mome.drop_path_rate; CoCa: 0)."""
  return getattr(getattr(model.config, "mome", None), "drop_path_rate", 0.0)


def training_rngs(model: CoCa, rng) -> dict:
  """The rngs of one training pass from its own key `rng`: the routers' noise (experts'
  noise_std > 0), and 'dropout' for stochastic depth where the model has it (MoME
  drop_path_rate > 0); {} for None (no noise; an error with stochastic depth)."""
  if rng is None:
    if _drop_path_rate(model):
      raise ValueError("config.model.mome.drop_path_rate > 0 needs an rng for stochastic depth")
    return {}
  rngs = {"router": rng}
  if _drop_path_rate(model):
    rngs["dropout"] = jax.random.fold_in(rng, 1)
  return rngs


def apply_with_router_statistics(model: CoCa, params, image, text, rng=None):
  """The training forward pass -> (outputs, {layer: router statistics}). The statistics come
  from the 'intermediates' collection routed feed-forwards sow into (empty for a dense model).
  `rng`: the pass's key (`training_rngs`: router noise, stochastic depth); None routes without
  noise."""
  outputs, state = model.apply({"params": params}, image, text, train=True,
                               mutable=["intermediates"], rngs=training_rngs(model, rng))
  return outputs, models.router_statistics(state.get("intermediates", {}), model.config)


def add_router_statistics(*parts):
  """{layer: statistics} of several passes -> one dict: a router that several passes run
  through gets the sums of their statistics, one that a single pass touches keeps its own."""
  total = {}
  for part in parts:
    for name, stats in part.items():
      total[name] = jax.tree.map(jnp.add, total[name], stats) if name in total else stats
  return total


def loss_fn(params, model: CoCa, batch, loss_config, rng=None):
  """(loss, metrics) of one batch. `rng` draws the ITM hard negatives (config.loss.itm_weight >
  0, MoME only), the routers' noise (experts' noise_std > 0; None: no noise) and stochastic
  depth (MoME drop_path_rate > 0, which needs it)."""
  pass_rng = None if rng is None else jax.random.fold_in(rng, 1)
  outputs, stats = apply_with_router_statistics(model, params, batch["image"], batch["text"],
                                                pass_rng)
  total, metrics = losses.coca_loss(
      outputs, batch["text"],
      contrastive_weight=loss_config.contrastive_weight,
      caption_weight=loss_config.caption_weight,
      label_smoothing=loss_config.label_smoothing,
      contrastive=loss_config.contrastive,
      contrastive_impl=loss_config.contrastive_impl,
      contrastive_reduction=loss_config.contrastive_reduction)
  itm_weight = loss_config.itm_weight
  if itm_weight > 0:
    itm, itm_metrics, itm_stats = image_text_matching(params, model, batch, outputs, rng,
                                                      loss_config.itm_examples)
    total = total + itm_weight * itm
    metrics = {**metrics, **itm_metrics, "loss": total}
    # Routers the ITM pass also runs through: their statistics cover its tokens too.
    stats = add_router_statistics(stats, itm_stats)
  if stats:
    router, router_metrics = losses.router_losses(stats, **losses.router_loss_settings(loss_config))
    total = total + router
    metrics = {**metrics, **router_metrics, "loss": total}
  return total, metrics


def image_text_matching(params, model, batch, outputs, rng, examples: int = 0):
  """VLMo's ITM term: the positive pairs, each image with a hard negative text and each text
  with a hard negative image (sampled from the global-batch contrastive similarities, see
  `losses.hard_negatives`): 3 pairs per example through the bidirectional fused pass.
  `examples` > 0 (config.loss.itm_examples) runs ITM on that many examples only, every
  (B / examples)-th row so each device keeps an equal share; their negatives still come from
  the whole batch. Returns (loss, metrics: itm_loss, itm_accuracy, router statistics of the
  pass: see `models.router_statistics`)."""
  if rng is None:
    raise ValueError("config.loss.itm_weight > 0 needs an rng for the hard negatives")
  image, text = batch["image"], batch["text"]
  neg_text, neg_image, (text_ok, image_ok) = losses.hard_negatives(
      outputs["image_embed"], outputs["text_embed"], outputs["logit_scale"], rng)
  if examples:
    if image.shape[0] % examples:
      raise ValueError(f"config.loss.itm_examples={examples} must divide the batch "
                       f"{image.shape[0]}")
    rows = jnp.arange(examples) * (image.shape[0] // examples)
    image, text = image[rows], text[rows]
    neg_text, neg_image = neg_text[rows], neg_image[rows]
    text_ok, image_ok = text_ok[rows], image_ok[rows]
  images = jnp.concatenate([image, image, batch["image"][neg_image]], axis=0)
  texts = jnp.concatenate([text, batch["text"][neg_text], text], axis=0)
  batch_size = image.shape[0]
  labels = jnp.concatenate([jnp.ones((batch_size,), jnp.int32),
                            jnp.zeros((2 * batch_size,), jnp.int32)])
  weights = jnp.concatenate([jnp.ones((batch_size,)), text_ok, image_ok]).astype(jnp.float32)
  # The pass's router noise and stochastic depth from their own stream: fold 1 of `rng` is the
  # main pass's.
  logits, state = model.apply({"params": params}, images, texts, train=True,
                              method="itm_logits", mutable=["intermediates"],
                              rngs=training_rngs(model, jax.random.fold_in(rng, 2)))
  loss, metrics = losses.itm_loss(logits, labels, weights)
  stats = models.router_statistics(state.get("intermediates", {}), model.config)
  return loss, {"itm_loss": loss, **metrics}, stats


def _contrastive(image_embed, text_embed, logit_scale, logit_bias, loss_config):
  kind = loss_config.contrastive
  return losses.contrastive_loss(
      image_embed, text_embed, logit_scale, logit_bias if kind == "sigmoid" else None,
      kind=kind, impl=loss_config.contrastive_impl,
      reduction=loss_config.contrastive_reduction)


def split_microbatches(batch, microbatches: int):
  """{name: [B, ...]} -> {name: [microbatches, B / microbatches, ...]}.

  Microbatch j takes rows j, j + m, j + 2m, ...: with the batch split in contiguous blocks over
  devices (and each device's block divisible by m) every device contributes its own rows to
  every microbatch, so no example moves between devices.
  """
  def split(x):
    per = x.shape[0] // microbatches
    x = jnp.swapaxes(x.reshape(per, microbatches, *x.shape[1:]), 0, 1)
    if not jax.sharding.get_abstract_mesh().empty:
      x = jax.lax.with_sharding_constraint(x, P(None, sharding.BATCH_AXES))
    return x
  return jax.tree.map(split, batch)


def merge_microbatches(x):
  """Inverse of `split_microbatches` for one array: [m, B/m, ...] -> [B, ...] in batch order."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def accumulated_loss_and_grads(params, model: CoCa, batch, loss_config, microbatches: int):
  """((loss, metrics), grads) equal to `jax.value_and_grad(loss_fn)` on the whole batch,
  with activation memory of one microbatch (see the module docstring for the three phases)."""
  text = batch["text"]
  if text.shape[0] % microbatches:
    raise ValueError(f"batch {text.shape[0]} is not divisible by config.train.microbatches="
                     f"{microbatches}")
  micro = split_microbatches(batch, microbatches)
  con_weight, cap_weight = loss_config.contrastive_weight, loss_config.caption_weight
  smoothing = loss_config.label_smoothing
  variables = {"params": params}

  # 1. Embeddings of every example, one microbatch at a time.
  def embed(_, mb):
    image_embed, _ = model.apply(variables, mb["image"], method="encode_image")
    return None, (image_embed, model.apply(variables, mb["text"], method="encode_text"))
  _, (image_embed, text_embed) = jax.lax.scan(embed, None, micro)
  image_embed, text_embed = merge_microbatches(image_embed), merge_microbatches(text_embed)

  # 2. The global contrastive loss and its gradient w.r.t. the embeddings and temperature.
  scale_and_bias = lambda p: (model.apply({"params": p}, method="temperature_scale"),
                              p.get("logit_bias", jnp.zeros((), jnp.float32)))
  scale, bias = scale_and_bias(params)
  con_fn = lambda i, t, s, b: _contrastive(i, t, s, b, loss_config)
  (con, con_metrics), con_grads = jax.value_and_grad(con_fn, argnums=(0, 1, 2, 3), has_aux=True)(
      image_embed, text_embed, scale, bias)
  g_image, g_text, g_scale, g_bias = con_grads
  cached = split_microbatches({"image": g_image, "text": g_text}, microbatches)

  # 3. Backprop per microbatch: caption loss (normalised by the WHOLE batch's token count) plus
  # the linear surrogate whose gradient is the cached contrastive gradient.
  total_tokens = jnp.maximum(jnp.sum((text[:, 1:] != PAD_ID).astype(jnp.float32)), 1.0)

  def surrogate(p, mb, g_i, g_t):
    outputs, stats = apply_with_router_statistics(model, p, mb["image"], mb["text"])
    cap, cap_metrics = losses.caption_loss(outputs["caption_logits"], mb["text"][:, 1:],
                                           label_smoothing=smoothing)
    tokens = cap_metrics["caption_tokens"]
    cap_share = cap * jnp.maximum(tokens, 1.0) / total_tokens
    s, b = scale_and_bias(p)
    linear = (jnp.sum(g_i * outputs["image_embed"]) + jnp.sum(g_t * outputs["text_embed"])
              + (g_scale * s + g_bias * b) / microbatches)
    acc_share = cap_metrics["caption_accuracy"] * jnp.maximum(tokens, 1.0) / total_tokens
    # Router terms per microbatch, averaged (see the module docstring).
    router, _ = losses.router_losses(stats, **router_settings)
    router_share = router / microbatches
    return (con_weight * linear + cap_weight * cap_share + router_share,
            (cap_share, acc_share, router_share, stats))

  def backprop(grads, xs):
    mb, g_i, g_t = xs
    (_, (cap_share, acc_share, router_share, stats)), g = jax.value_and_grad(
        surrogate, has_aux=True)(params, mb, g_i, g_t)
    return jax.tree.map(jnp.add, grads, g), (cap_share, acc_share, router_share, stats)

  router_settings = losses.router_loss_settings(loss_config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (cap_shares, acc_shares, router_shares, stats) = jax.lax.scan(
      backprop, zeros, (micro, cached["image"], cached["text"]))
  cap = jnp.sum(cap_shares)
  total = con_weight * con + cap_weight * cap
  metrics = {"contrastive_loss": con, "caption_loss": cap,
             "logit_scale": scale, **con_metrics, "caption_accuracy": jnp.sum(acc_shares),
             "caption_tokens": jnp.sum((text[:, 1:] != PAD_ID).astype(jnp.float32))}
  if stats:
    # Metrics from the statistics summed over microbatches: those of the whole batch.
    _, router_metrics = losses.router_losses(jax.tree.map(lambda a: jnp.sum(a, axis=0), stats),
                                             **router_settings)
    router = jnp.sum(router_shares)
    total = total + router
    metrics.update({**router_metrics, "router_loss": router})
  metrics["loss"] = total
  return (total, metrics), grads


NONFINITE_POLICIES = schema.NONFINITE_POLICIES


def all_finite(tree) -> jax.Array:
  """One bool: every floating-point leaf of `tree` is free of NaN/inf. One fused reduction per
  leaf and an and over the leaves; integer leaves (step counters) cannot be non-finite."""
  flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return functools.reduce(jnp.logical_and, flags, jnp.bool_(True))


def guard_nonfinite(state: TrainState, new_state: TrainState, metrics: dict,
                    policy: str) -> tuple[TrainState, dict]:
  """Adds metrics["nonfinite"] (int32 0/1): the loss or the gradient norm is NaN/inf, or the
  update left a NaN/inf in the new parameters or optimizer state, i.e. in what a checkpoint
  of `new_state` would hold. With policy "skip", returns the old state unchanged (bit for bit,
  step counter included) when it is set. The flag is computed inside the step, so the host
  learns of it with the metrics it reads anyway, one step late; what to do then (halt, or
  count the skip) is the train loop's job.

  A state can be finite and still broken (weights of 1e29 after a huge learning rate give NaN
  in the next forward pass): that shows as the NEXT step's flag, which the train loop uses to
  mark a checkpoint known-good (see train.NonFiniteWatch)."""
  finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            & all_finite((new_state.params, new_state.opt_state)))
  if policy == "skip":
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  elif policy != "halt":
    raise ValueError(f"config.train.nonfinite={policy!r} is unknown; use one of "
                     f"{NONFINITE_POLICIES}")
  return new_state, {**metrics, "nonfinite": (~finite).astype(jnp.int32)}


def train_step(state: TrainState, batch, *, model: CoCa, tx: optax.GradientTransformation,
               loss_config, schedule: Callable, rules, microbatches: int = 1,
               seed: int = 0, nonfinite: str = "halt") -> tuple[TrainState, dict]:
  """One optimizer update. Pure: (state, batch) -> (new state, metrics). Randomness (ITM hard
  negatives) comes from (seed, state.step), so a resumed run draws what it would have drawn.
  `nonfinite`: see `guard_nonfinite`."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  with nn.logical_axis_rules(rules):
    if microbatches > 1:
      if loss_config.itm_weight > 0:
        raise ValueError("config.loss.itm_weight > 0 needs config.train.microbatches=1")
      (_, metrics), grads = accumulated_loss_and_grads(
          state.params, model, batch, loss_config, microbatches)
    else:
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      (_, metrics), grads = grad_fn(state.params, model, batch, loss_config, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = clamp_logit_scale(optax.apply_updates(state.params, updates),
                             model.config.max_logit_scale)
  metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(state.params),
             "learning_rate": schedule(state.step)}
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  return guard_nonfinite(state, new_state, metrics, nonfinite)


# XLA:CPU removes jax.checkpoint's optimization barriers ('cse_barrier_expander') before it
# eliminates common subexpressions and schedules, so the recomputation of an unscanned
# rematerialised layer is merged back into the forward pass or scheduled beside it: remat then
# costs FLOPs and saves no memory (docs/performance.md, "MoME stacks by remat policy", measures
# it). The GPU and TPU compilers need no such option; a scanned stack has no barriers
# (its remat runs with prevent_cse off), and without remat the option changes nothing.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def compiler_options(mesh: Mesh) -> dict | None:
  """XLA options for a step compiled for `mesh`'s devices (see CPU_COMPILER_OPTIONS)."""
  return dict(CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


def make_train_step(model, tx, config, schedule, mesh: Mesh, shardings: TrainState, rules):
  """The train step jitted with explicit in/out shardings; the old state is donated."""
  microbatches = int(config.train.microbatches)
  if microbatches < 1:
    raise ValueError(f"config.train.microbatches={microbatches} must be at least 1")
  problem = sharding.batch_split_problem(config.train.batch_size, sharding.batch_shards(mesh),
                                         microbatches, mesh.shape)
  if problem:
    raise ValueError(problem)
  step = functools.partial(train_step, model=model, tx=tx, loss_config=config.loss,
                           schedule=schedule, rules=rules, microbatches=microbatches,
                           seed=int(config.train.seed),
                           nonfinite=config.train.nonfinite)
  return jax.jit(step, in_shardings=(shardings, batch_shardings(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,),
                 compiler_options=compiler_options(mesh))


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything built from a config before any array exists (config -> mesh, model, optimizer,
  abstract state), keeping the config it was built from. The train loop, the benchmark and the
  tests all start from here."""
  config: Any
  mesh: Mesh
  rules: tuple
  model: CoCa
  tx: optax.GradientTransformation
  schedule: Callable
  abstract_state: TrainState
  state_shardings: TrainState

  @property
  def sharded_abstract_state(self) -> TrainState:
    """The abstract state with each leaf carrying its sharding (ahead-of-time `lower` target)."""
    return sharding.with_shardings(self.abstract_state, self.state_shardings)

  def init_state(self, seed: int | None = None) -> TrainState:
    """The initial state, each array materialised on its own shards (seed: config.train.seed)."""
    seed = self.config.train.seed if seed is None else seed
    return make_init_fn(self.model, self.tx, self.config, self.state_shardings)(
        jax.random.key(seed))

  def train_step(self):
    """The jitted train step (see `make_train_step`)."""
    return make_train_step(self.model, self.tx, self.config, self.schedule, self.mesh,
                           self.state_shardings, self.rules)


def setup(config, devices=None) -> TrainSetup:
  """Builds mesh, logical-axis rules, model, optimizer and the abstract sharded state."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_axis_rules(config)
  model = build_model(config)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  abstract, shardings = state_shardings(model, tx, config, mesh, rules)
  return TrainSetup(config, mesh, rules, model, tx, schedule, abstract, shardings)

