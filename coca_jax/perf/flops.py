"""Analytic model FLOPs, parameter counts, and the peak FLOP/s that MFU divides by.

Model FLOPs follow the usual MFU convention: only matrix multiplies count (2 FLOPs per
multiply-add), a training step costs 3x the forward pass (the backward pass does two matmuls per
forward matmul), and rematerialisation is NOT counted (it is overhead, not model work). Attention
counts the full score matrix even when causal, because that is what the kernels compute.

Per example, for `CoCaConfig` c (P patches, T = max_len text positions):
  image tower      patch embed, depth x (QKV/out projections + scores/values + MLP)
  poolers          generative pooler (n_gen_queries over P tokens) and contrastive pooler
                   (cascade: 1 query over the generative tokens; parallel: over P tokens)
  unimodal text    n_uni x block over T-1 tokens + CLS
  multimodal text  n_multi x (block + cross-attention to the pooled image tokens) over T-1 tokens
  vocab head       (T-1) x width x vocab
  contrastive      the [B, B] logits: 2 * B * embed_dim per example (grows with the global batch)
Learned routing (`config.model.<side>.experts`): a routed feed-forward counts the top_k experts
a token runs through plus its router (tokens x width x num_experts), so a sparse model's FLOPs
are those of its active parameters. Not counted, like remat: the dispatch (row gathers, no
FLOPs to speak of), and the capacity slack (experts compute capacity_factor x the routed tokens, empty
slots included). `param_counts` reports total and active parameters.

MoME (config.model.backbone='mome', `MoMEConfig` m: L layers, F fusion layers, width W): each
token runs ONE feed-forward per layer (its modality's expert), so a layer costs what a dense
layer costs. Per example:
  image-only       L x block over P patches (the bottom L-F layers' keys/values are reused
                   by the fused pass, not recomputed), attentional pooler, projection
  fused image      F x block over P patches (the top layers' image states through ffn_fusion)
  text-only        L x block over T-1 tokens + CLS
  fused text       L x block over T-1 tokens whose attention also reads P image keys/values
  vocab head       (T-1) x W x vocab
  itm (if on)      3 pairs per ITM example x L x block over P + T tokens, bidirectional, + head
With learned routing inside a modality expert (`config.model.mome.experts`), each routed layer
of that expert adds, for every token it routes, (top_k - 1) more expert MLPs and the router.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import tempfile
import time

from absl import logging
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from coca_jax.core import pretrained as pretrained_names
from coca_jax.core import schema
from coca_jax.core.schema import Routing
from coca_jax.training import step

TRAIN_MULTIPLIER = 3  # forward + backward (2x forward).

# Dense peak FLOP/s per device (per chip) for bf16 matmuls, from the vendors' spec sheets.
# Matched against `device.device_kind` (lower-cased, substring).
PEAK_FLOPS_BY_DEVICE_KIND = (
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
    ("tpu v2", 45e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
)


# -- Model FLOPs -------------------------------------------------------------------------------


def _attention_flops(q_len: int, kv_len: int, width: int, kv_width: int | None = None) -> int:
  """One multi-head attention: Q/out projections on q_len tokens, K/V projections on kv_len
  context tokens of width kv_width, plus scores (QK^T) and the weighted sum of values."""
  kv_width = width if kv_width is None else kv_width
  projections = 2 * q_len * width * width * 2 + 2 * kv_len * kv_width * width * 2
  scores_and_values = 2 * q_len * kv_len * width * 2
  return projections + scores_and_values


def _mlp_flops(tokens: int, width: int, mlp_dim: int, active_experts: int = 1) -> int:
  return 2 * tokens * width * mlp_dim * 2 * active_experts


def _block_flops(tokens: int, width: int, mlp_dim: int, *, context_tokens: int = 0,
                 context_width: int = 0, active_experts: int = 1) -> int:
  flops = _attention_flops(tokens, tokens, width)
  if context_tokens:
    flops += _attention_flops(tokens, context_tokens, width, context_width)
  return flops + _mlp_flops(tokens, width, mlp_dim, active_experts)


def _stack_flops(depth: int, tokens: int, width: int, mlp_dim: int,
                 experts: Routing | None, layer_offset: int = 0, **block) -> int:
  """A stack's blocks; routed layers run top_k experts per token plus the router."""
  flops = 0
  for i in range(depth):
    routed = experts is not None and experts.routed(layer_offset + i)
    flops += _block_flops(tokens, width, mlp_dim, active_experts=experts.top_k if routed else 1,
                          **block)
    if routed:
      flops += 2 * tokens * width * experts.num_experts
  return flops


def _routing_extra_flops(m: schema.MoME, tokens: int, expert: str, layers) -> int:
  """Beyond one dense FFN per token: what `tokens` tokens routed through ffn_<expert> in
  `layers` add (top_k - 1 more expert MLPs, and the router)."""
  extra = 0
  for layer in layers:
    experts = dict(m.mome.routed_experts(layer)).get(expert)
    if experts is not None:
      extra += ((experts.top_k - 1) * _mlp_flops(tokens, m.mome.width, m.mome.mlp_dim)
                + 2 * tokens * m.mome.width * experts.num_experts)
  return extra


def _mome_flops_breakdown(config, batch_size: int) -> dict[str, int]:
  """`forward_flops_breakdown` of a MoME (see the module docstring)."""
  m = schema.build(schema.MoME, config.model)
  patches, width, inputs = m.image_tokens, m.mome.width, m.text.max_len - 1
  all_layers, top_layers = range(m.mome.depth), range(m.mome.bottom_layers, m.mome.depth)
  bottom_layers = range(m.mome.bottom_layers)
  routed = functools.partial(_routing_extra_flops, m)
  if m.mome.bert:
    return _vlmo_flops_breakdown(config, m, batch_size)
  text_ffn = _mlp_flops(inputs, width, m.mome.mlp_dim)
  # The fused text tokens' attention: their own Q/K/V/out projections, scores and values over
  # P image keys plus the text keys.
  fused_text_layer = (2 * inputs * width * width * 4 + 2 * inputs * (patches + inputs) * width * 2
                      + text_ffn)
  parts = {
      "patch_embed": 2 * m.num_patches * (m.patch_size ** 2 * 3) * width,
      "image_only": (m.mome.depth * _block_flops(patches, width, m.mome.mlp_dim)
                     + routed(patches, "image", all_layers)),
      "contrastive_pooler": _attention_flops(1, patches, width) if m.pooling == "attention" else 0,
      "image_projection": 2 * width * m.embed_dim,
      "fused_image": (m.mome.fusion_layers * _block_flops(patches, width, m.mome.mlp_dim)
                      + routed(patches, "fusion", top_layers)),
      "text_only": (m.mome.depth * _block_flops(inputs + 1, width, m.mome.mlp_dim)
                    + routed(inputs + 1, "text", all_layers)),
      "text_projection": 2 * width * m.embed_dim,
      "fused_text": (m.mome.depth * fused_text_layer + routed(inputs, "text", bottom_layers)
                     + routed(inputs, "fusion", top_layers)),
      "vocab_head": 2 * inputs * width * m.text.vocab_size,
      "contrastive_logits": 2 * batch_size * m.embed_dim,
  }
  if config.loss.itm_weight > 0:
    share = (config.loss.itm_examples or batch_size) / batch_size
    pair = (m.mome.depth * _block_flops(patches + inputs + 1, width, m.mome.mlp_dim) + 2 * width * 2
            + routed(patches, "image", bottom_layers) + routed(inputs + 1, "text", bottom_layers)
            + routed(patches + inputs + 1, "fusion", top_layers))
    parts["itm"] = int(3 * share * (pair + 2 * m.num_patches * (m.patch_size ** 2 * 3) * width))
  return parts


def _vlmo_flops_breakdown(config, m: schema.MoME, batch_size: int) -> dict[str, int]:
  """A MoME with the BERT text encoder (VLMo): image-only over the [CLS] and P patches and
  text-only over all L positions, each L x block; with vl_contrastive the top F layers again on
  each modality through ffn_fusion; ITM: 3 pairs per ITM example of the fused pass over L + P
  + 1 tokens, the pooler and the head; MLM (loss.mlm_weight > 0): one more fused pass over the
  masked text and the image, and the MLM head (dense W x W, vocabulary) on the tokens it is
  there for, mlm_probability x L of them (the step pads them to a bound, slack not counted);
  an image-only batch (data.image_only, masked image modelling): the image-only pass and the
  MIM head alone."""
  image, text, width = m.image_tokens, m.text.max_len, m.mome.width
  all_layers, top_layers = range(m.mome.depth), range(m.mome.bottom_layers, m.mome.depth)
  routed = functools.partial(_routing_extra_flops, m)
  parts = {
      "patch_embed": 2 * m.num_patches * (m.patch_size ** 2 * 3) * width,
      "image_only": (m.mome.depth * _block_flops(image, width, m.mome.mlp_dim)
                     + routed(image, "image", all_layers)),
      "image_projection": 2 * width * m.embed_dim,
      "text_only": (m.mome.depth * _block_flops(text, width, m.mome.mlp_dim)
                    + routed(text, "text", all_layers)),
      "text_projection": 2 * width * m.embed_dim,
      "contrastive_logits": 2 * batch_size * m.embed_dim,
  }
  if m.mome.vl_contrastive:
    parts["vl_contrastive"] = (
        m.mome.fusion_layers * (_block_flops(image, width, m.mome.mlp_dim)
                           + _block_flops(text, width, m.mome.mlp_dim))
        + routed(image, "fusion", top_layers) + routed(text, "fusion", top_layers)
        + 2 * 2 * width * m.embed_dim + 2 * batch_size * m.embed_dim)
  if config.loss.itm_weight > 0:
    share = (config.loss.itm_examples or batch_size) / batch_size
    bottom_layers = range(m.mome.bottom_layers)
    pair = (m.mome.depth * _block_flops(image + text, width, m.mome.mlp_dim) + 2 * width * width
            + 2 * width * 2 + routed(image, "image", bottom_layers)
            + routed(text, "text", bottom_layers) + routed(image + text, "fusion", top_layers))
    parts["itm"] = int(3 * share * (pair + parts["patch_embed"]))
  if config.get("data", {}).get("image_only", False):
    # Stage 1 (masked image modelling): the masked image's image-only pass and the MIM head
    # on every patch are the step's only work.
    return {"mim": (parts["patch_embed"] + parts["image_only"]
                    + 2 * m.num_patches * width * m.mome.mim_vocab)}
  if config.loss.get("mlm_weight", 0.0) > 0:
    picked = config.loss.get("mlm_probability", schema.Loss.mlm_probability) * text
    head = int(picked * (2 * width * width + 2 * width * m.text.vocab_size))
    if config.get("data", {}).get("text_only", False):
      # Stage 2: the masked text's text-only pass is the step's only pass.
      return {"mlm": parts["text_only"] + head}
    bottom_layers = range(m.mome.bottom_layers)
    parts["mlm"] = (m.mome.depth * _block_flops(image + text, width, m.mome.mlp_dim)
                    + routed(image, "image", bottom_layers) + routed(text, "text", bottom_layers)
                    + routed(image + text, "fusion", top_layers) + parts["patch_embed"] + head)
  return parts


def forward_flops_breakdown(config, batch_size: int | None = None) -> dict[str, int]:
  """Forward-pass matmul FLOPs per example, by part. `config` is the experiment ConfigDict;
  `batch_size` (default config.train.batch_size) is the GLOBAL batch the contrastive logits span."""
  batch_size = int(batch_size or config.train.batch_size)
  if config.model.backbone == "mome":
    return _mome_flops_breakdown(config, batch_size)
  c = schema.build(schema.CoCa, config.model)
  patches, wv = c.image_tokens, c.vision.width  # Patches (+ the class token, if any).
  pw = c.pooler_width or wv  # open_clip's pooler works at embed_dim, reading wv-wide tokens.
  parts: dict[str, int] = {}
  parts["patch_embed"] = 2 * c.num_patches * (c.patch_size ** 2 * 3) * wv
  parts["image_encoder"] = _stack_flops(c.vision.depth, patches, wv, c.vision.mlp_dim,
                                        c.vision.experts)
  parts["generative_pooler"] = _attention_flops(c.n_gen_queries, patches, pw, wv)
  if c.pooling == "cascade":
    parts["contrastive_pooler"] = _attention_flops(1, c.n_gen_queries, pw)
  elif c.pooling == "parallel":
    parts["contrastive_pooler"] = _attention_flops(1, patches, pw, wv)
  else:
    parts["contrastive_pooler"] = 0
  context_tokens = c.n_gen_queries - (1 if c.pooling == "open_clip" else 0)
  parts["image_projection"] = 2 * pw * c.embed_dim
  wt, inputs = c.text.width, c.text.max_len - 1
  parts["unimodal_decoder"] = _stack_flops(c.text.n_uni, inputs + 1, wt, c.text.mlp_dim,
                                           c.text.experts)
  parts["text_projection"] = 2 * wt * c.embed_dim
  parts["multimodal_decoder"] = _stack_flops(
      c.text.n_multi, inputs, wt, c.text.mlp_dim, c.text.experts, layer_offset=c.text.n_uni,
      context_tokens=context_tokens, context_width=pw)
  if c.text.multimodal_layout == "open_clip":  # A second (dense) MLP, after cross-attention.
    parts["multimodal_decoder"] += c.text.n_multi * _mlp_flops(inputs, wt, c.text.mlp_dim)
  parts["vocab_head"] = 2 * inputs * wt * c.text.vocab_size
  parts["contrastive_logits"] = 2 * batch_size * c.embed_dim
  return parts


def model_flops_per_example(config, batch_size: int | None = None, train: bool = True) -> int:
  """Model FLOPs to process one example: forward only, or a full train step (3x forward)."""
  forward = sum(forward_flops_breakdown(config, batch_size).values())
  return forward * (TRAIN_MULTIPLIER if train else 1)


# -- Parameter counts --------------------------------------------------------------------------


EXPERT_WEIGHTS = ("wi", "bi", "wo", "bo")


def _inactive_expert_weights(tree, experts: Routing | None, under: str | None = None) -> int:
  """Expert weights of `tree` a token does not run through: (num_experts - top_k) / num_experts
  of each routed expert weight (leaves named EXPERT_WEIGHTS, below a key `under` if given)."""
  if experts is None:
    return 0
  inactive = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[-1] in EXPERT_WEIGHTS and (under is None or under in keys):
      inactive += int(np.prod(leaf.shape)) * (experts.num_experts - experts.top_k) // (
          experts.num_experts)
  return inactive


def param_counts(config) -> dict[str, int]:
  """{'total': N, <top-level module>: n, ...}, e.g. vision, unimodal, multimodal, token_embed.
  With learned routing, or a MoME, also 'active': the parameters one token runs through (top_k
  of each routed layer's num_experts experts; for a MoME the shared weights plus ONE feed-forward
  expert per layer, whose layers are summed as 'layers'; everything else counts whole)."""
  params = step.abstract_params(config)
  size = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
  counts: dict[str, int] = {name: size(subtree) for name, subtree in params.items()}
  inactive = 0
  if config.model.backbone == "mome":
    m = schema.build(schema.MoME, config.model)
    layers = [name for name in counts if name.startswith("layers_")]
    counts["layers"] = sum(counts.pop(name) for name in layers)
    for name in layers:
      routed = dict(m.mome.routed_experts(int(name.split("_")[1])))
      ffns = {key[len("ffn_"):]: tree for key, tree in params[name].items()
              if key.startswith("ffn_")}
      # A token runs one modality expert; inside a routed one, top_k of its num_experts.
      active = [size(tree) - _inactive_expert_weights(tree, routed.get(expert))
                for expert, tree in ffns.items()]
      inactive += sum(size(tree) for tree in ffns.values()) - max(active)
  else:
    c = schema.build(schema.CoCa, config.model)
    side_experts = {"vision": c.vision.experts, "unimodal": c.text.experts,
                    "multimodal": c.text.experts}
    for name, subtree in params.items():
      experts = side_experts.get(name)
      if experts is not None:
        inactive += _inactive_expert_weights(subtree, experts, under="ffn")
  counts = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
  total = sum(counts.values())
  return {"total": total, **({"active": total - inactive} if inactive else {}), **counts}


# -- Peak FLOP/s and MFU -----------------------------------------------------------------------


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  """Spec-sheet dense bf16 peak FLOP/s of one accelerator, or None if unknown (e.g. CPU)."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for key, peak in PEAK_FLOPS_BY_DEVICE_KIND:
    if key in kind:
      return peak
  return None


@functools.lru_cache(maxsize=None)
def measure_cpu_peak_flops(size: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
  """Measured matmul FLOP/s of this process's first device: best of `repeats` jitted
  [size, size] @ [size, size] products. The CPU denominator for MFU (no spec sheet applies:
  the number depends on cores, SIMD width and XLA's threading)."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("model name", "Model", "Hardware")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def peak_cache_key(size: int = 2048, dtype: str = "float32", repeats: int = 5) -> dict:
  """What a measured matmul peak depends on: the CPU model, the cores this process may use,
  the devices JAX made of them, the jax/jaxlib build and XLA_FLAGS (e.g. the optimisation level
  or a forced device count), and the measurement itself."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    cores = os.cpu_count()
  device = jax.devices()[0]
  return {"cpu": _cpu_model(), "cores": cores, "platform": device.platform,
          "device_kind": device.device_kind, "local_devices": jax.local_device_count(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "size": size, "dtype": dtype,
          "repeats": repeats}


def peak_cache_path(key: dict) -> str:
  """$COCA_JAX_CACHE/peak_flops/<hash of the key>.json (default ~/.cache/coca_jax)."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
  return os.path.join(pretrained_names.cache_root(), "peak_flops", f"{digest}.json")


def cached_cpu_peak_flops(size: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
  """`measure_cpu_peak_flops`, measured once per machine and setup (`peak_cache_key`) and
  kept on disk (`peak_cache_path`): every training run on CPU needs it, and measuring costs a
  few CPU-seconds per run (more on a busy machine). A file that does not parse or holds another
  key is ignored and measured again; delete it to measure again (e.g. if the machine was busy
  the first time: MFU would then read high). A cache that cannot be written only costs the
  measurement."""
  key = peak_cache_key(size, dtype, repeats)
  path = peak_cache_path(key)
  try:
    with open(path) as f:
      stored = json.load(f)
    if (isinstance(stored, dict) and stored.get("key") == key
        and isinstance(stored.get("flops"), float) and math.isfinite(stored["flops"])
        and stored["flops"] > 0):
      return stored["flops"]
  except (OSError, ValueError):
    pass
  peak = float(measure_cpu_peak_flops(size, dtype, repeats))
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written whole to a temporary file, then renamed: a concurrent reader sees the old file,
    # none, or the new one, never a partial one.
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
    try:
      with os.fdopen(fd, "w") as f:
        json.dump({"key": key, "flops": peak}, f)
      os.replace(partial, path)
    except BaseException:
      os.unlink(partial)
      raise
  except OSError as e:
    logging.warning("could not keep the measured CPU matmul peak in %s (%s); measuring it "
                    "again next run", path, e)
  return peak


def peak_flops_per_device(device: jax.Device | None = None, *, fresh: bool = False) -> float:
  """The MFU denominator: the spec-sheet peak, or on CPU (or an unknown chip) a measured one,
  kept on disk per machine (`cached_cpu_peak_flops`); `fresh` measures it in this process now
  (a benchmark's ratio of step to peak then shares the machine's load of the moment)."""
  device = device or jax.devices()[0]
  peak = device_peak_flops(device)
  if peak is not None:
    return peak
  return measure_cpu_peak_flops() if fresh else cached_cpu_peak_flops()


def throughput_metrics(flops_per_example: float, examples_per_second: float, num_devices: int,
                       peak_per_device: float) -> dict[str, float]:
  """{'model_tflops_per_sec_per_device', 'mfu'} for a measured throughput."""
  per_device = flops_per_example * examples_per_second / num_devices
  return {"model_tflops_per_sec_per_device": per_device / 1e12,
          "mfu": per_device / peak_per_device}


def compiled_flops(compiled) -> float | None:
  """FLOPs XLA reports for a compiled executable (per device), or None if unavailable."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  return float(analysis.get("flops", 0.0))
