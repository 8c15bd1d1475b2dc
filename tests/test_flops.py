"""Spec: analytic FLOPs match what XLA compiles; parameter counts match the CoCa paper.

The analytic count is what MFU divides by, so it must agree with XLA's own count of the
compiled computation (`cost_analysis()`, which also counts elementwise work: a few % above the
matmul-only model FLOPs), and the paper configs must have Table 1's sizes.
"""

from __future__ import annotations

import os

import jax
import pytest

from coca_jax.core import config as config_lib
from coca_jax.perf import flops
from coca_jax.training import step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_config(**model):
  config = config_lib.load_config(os.path.join(REPO, "experiments", "demo.py"))
  # Unscanned: XLA's cost analysis counts a while loop's body once, not once per layer.
  config.model.update(scan_layers=False, **model)
  return config


@pytest.fixture(scope="module")
def xla_vs_analytic():
  """(XLA forward FLOPs, XLA train FLOPs, analytic forward FLOPs) for 8 demo-sized examples."""
  config, batch_size = _demo_config(), 8
  model = step.build_model(config)
  params = step.abstract_params(config)
  batch = step.dummy_batch(config, batch_size)

  def forward(p, image, text):
    out = model.apply({"params": p}, image, text)
    # Uses every output so nothing is dead code; the [B, B] logits are the contrastive matmul.
    return out["caption_logits"].sum() + (out["image_embed"] @ out["text_embed"].T).sum()

  args = (params, batch["image"], batch["text"])
  xla_forward = flops.compiled_flops(jax.jit(forward).lower(*args).compile())
  xla_train = flops.compiled_flops(jax.jit(jax.grad(forward)).lower(*args).compile())
  analytic = flops.model_flops_per_example(config, batch_size, train=False) * batch_size
  return xla_forward, xla_train, analytic


def test_forward_flops_match_xla_cost_analysis(xla_vs_analytic):
  xla_forward, _, analytic = xla_vs_analytic
  assert xla_forward is not None
  # XLA also counts layer norms, softmax, GELU and adds: slightly above the matmul count.
  assert 1.0 <= xla_forward / analytic < 1.06


def test_train_flops_are_three_forwards(xla_vs_analytic):
  _, xla_train, analytic = xla_vs_analytic
  assert 0.97 <= xla_train / (3 * analytic) < 1.06


@pytest.mark.parametrize("name,paper_params", [
    ("coca_base", 383e6), ("coca_large", 787e6), ("coca_2b", 2.1e9)])
def test_paper_configs_have_table1_parameter_counts(name, paper_params):
  config = config_lib.load_config(os.path.join(REPO, "experiments", f"{name}.py"))
  counts = flops.param_counts(config)
  assert abs(counts["total"] / paper_params - 1) < 0.03, counts["total"]
  assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
  # Table 1's image encoders: 86M / 303M / 1B (patch embedding and positions included).
  vision = counts["vision"] + counts["patch_embed"] + counts["image_pos_embed"]
  expected_vision = {"coca_base": 86e6, "coca_large": 303e6, "coca_2b": 1.0e9}[name]
  assert abs(vision / expected_vision - 1) < 0.03


def test_paper_configs_use_the_paper_recipe():
  config = config_lib.load_config(os.path.join(REPO, "experiments", "coca_2b.py"))
  m = config.model
  assert (m.image_size, m.patch_size, m.n_gen_queries) == (288, 18, 256)
  assert config.train.batch_size == 65_536 and config.train.steps == 500_000
  o = config.optim
  assert (o.name, o.b1, o.b2, o.weight_decay, o.lr, o.warmup_fraction, o.decay) == (
      "adafactor", 0.9, 0.999, 0.01, 8e-4, 0.02, "linear")
  assert (config.loss.contrastive_weight, config.loss.caption_weight) == (1.0, 2.0)
  config_lib.validate(config, num_devices=2048)


def test_contrastive_flops_grow_with_global_batch_only():
  config = _demo_config()
  small = flops.forward_flops_breakdown(config, batch_size=128)
  large = flops.forward_flops_breakdown(config, batch_size=1024)
  assert large["contrastive_logits"] == 8 * small["contrastive_logits"]
  assert {k: v for k, v in large.items() if k != "contrastive_logits"} == {
      k: v for k, v in small.items() if k != "contrastive_logits"}


def test_routed_layers_count_only_active_experts_and_params():
  dense = _demo_config()
  base = flops.forward_flops_breakdown(dense)
  routed_config = _demo_config()
  # 8 experts, top-2, in every other text layer (text layers 1 and 3 of 2 + 2).
  routed_config.model.text.experts = dict(num_experts=8, top_k=2, capacity_factor=1.0, every=2)
  routed = flops.forward_flops_breakdown(routed_config)
  t, w, mlp = dense.model.text.max_len, dense.model.text.width, dense.model.text.mlp_dim
  assert dense.model.text.n_uni == dense.model.text.n_multi == 2
  # One routed layer per decoder: one more expert's MLP per token, plus the router.
  assert routed["unimodal_decoder"] - base["unimodal_decoder"] == 4 * t * w * mlp + 2 * t * w * 8
  assert (routed["multimodal_decoder"] - base["multimodal_decoder"]
          == 4 * (t - 1) * w * mlp + 2 * (t - 1) * w * 8)
  assert routed["image_encoder"] == base["image_encoder"]
  # Parameters: 7 more experts in each of the 2 routed layers; a token uses 2 of 8.
  counts, dense_counts = flops.param_counts(routed_config), flops.param_counts(dense)
  expert = 2 * w * mlp + mlp + w
  router = w * 8
  assert counts["total"] - dense_counts["total"] == 2 * (7 * expert + router)
  assert counts["total"] - counts["active"] == 2 * 6 * expert
  assert "active" not in dense_counts


def test_mfu_arithmetic_and_cpu_peak():
  peak = flops.measure_cpu_peak_flops(size=256, repeats=2)
  assert 1e8 < peak < 1e14
  metrics = flops.throughput_metrics(flops_per_example=1e9, examples_per_second=100.0,
                                     num_devices=4, peak_per_device=1e11)
  assert metrics["model_tflops_per_sec_per_device"] == pytest.approx(0.025)
  assert metrics["mfu"] == pytest.approx(0.25)


def test_cpu_peak_is_measured_once_per_machine_and_setup(tmp_path, monkeypatch):
  """Every CPU training run divides by the matmul peak: it is measured once per key (CPU, cores,
  devices, jax/jaxlib, XLA_FLAGS) and read back from the cache after; a file that is corrupt or
  holds another key is measured again, never trusted."""
  monkeypatch.setenv("COCA_JAX_CACHE", str(tmp_path))
  measured = []

  def measure(size, dtype, repeats):
    measured.append(size)
    return 1e11 * len(measured)

  monkeypatch.setattr(flops, "measure_cpu_peak_flops", measure)
  assert flops.cached_cpu_peak_flops() == 1e11
  path = flops.peak_cache_path(flops.peak_cache_key())
  assert path.startswith(str(tmp_path)) and os.path.exists(path)
  assert flops.cached_cpu_peak_flops() == 1e11 and len(measured) == 1  # read, not measured
  assert flops.peak_flops_per_device(jax.devices("cpu")[0]) == 1e11
  assert [p.name for p in tmp_path.joinpath("peak_flops").iterdir()] == [os.path.basename(path)]
  # Another setup (XLA_FLAGS here) is another key: measured, beside the first.
  xla_flags = os.environ.get("XLA_FLAGS", "")
  monkeypatch.setenv("XLA_FLAGS", xla_flags + " --xla_cpu_use_thunk_runtime=true")
  assert flops.cached_cpu_peak_flops() == 2e11 and len(measured) == 2
  assert len(list(tmp_path.joinpath("peak_flops").iterdir())) == 2
  monkeypatch.setenv("XLA_FLAGS", xla_flags)
  assert flops.cached_cpu_peak_flops() == 1e11 and len(measured) == 2
  # A corrupt file and one holding another key (a copied cache) are measured again.
  with open(path, "w") as f:
    f.write('{"key": {"cpu": "x"')
  assert flops.cached_cpu_peak_flops() == 3e11
  with open(path, "w") as f:
    f.write('{"key": {"cpu": "another"}, "flops": 5e11}')
  assert flops.cached_cpu_peak_flops() == 4e11
  assert flops.cached_cpu_peak_flops() == 4e11 and len(measured) == 4
