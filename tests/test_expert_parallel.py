"""Spec: routed experts sharded over the mesh's `expert` axis compute what one device computes.

A tiny CoCa with routed feed-forwards in the image encoder (4 experts, top-2, Batch Priority
Routing over groups of 2 examples, the batch per shard) and both text decoders (4 experts,
top-1) on a (data=2, expert=4) mesh of 8 simulated CPU devices: loss and
gradients equal the single-device values, and the compiled program holds one expert per device
(the expert weights are sharded, not replicated). Runs in a subprocess, as tests/test_sharding.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5
MESH = dict(data=2, expert=4)


def routed_config():
  from test_sharding import tiny_config
  c = tiny_config()
  c.model.vision.experts = dict(num_experts=4, top_k=2, capacity_factor=1.0, every=1,
                                group_size=2)
  c.model.text.experts = dict(num_experts=4, top_k=1, capacity_factor=1.5, every=1)
  return c


def _worker() -> dict:
  import flax.linen as nn
  import jax
  import numpy as np

  from coca_jax.core import config as config_lib
  from coca_jax.core import sharding
  from coca_jax.training import step
  from test_sharding import _max_rel_diff, _mesh_setup

  config = routed_config()
  batch, model, tx, _, grad_fn, on_mesh = _mesh_setup(config)

  mesh, rules, shardings = on_mesh(config, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = step.make_init_fn(model, tx, config, shardings)(jax.random.key(0))
    (ref_loss, ref_metrics), ref_grads = grad_fn(state.params, batch)
  host_params = jax.tree.map(np.asarray, state.params)

  cfg = routed_config()
  cfg.mesh.update(MESH)
  config_lib.validate(cfg, num_devices=8)
  mesh, rules, shardings = on_mesh(cfg, jax.devices())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.device_put(host_params, shardings.params)
    placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    compiled = grad_fn.lower(params, placed).compile()
    (loss, metrics), grads = compiled(params, placed)
  wi_shape = host_params["vision"]["layer_0"]["ffn"]["wi"].shape  # [experts, embed, mlp]
  wi_sharding = shardings.params["vision"]["layer_0"]["ffn"]["wi"]
  hlo = compiled.as_text()
  local = "f32[%d,%d,%d]" % (wi_shape[0] // 4, wi_shape[1], wi_shape[2])
  whole = "f32[%d,%d,%d]" % wi_shape
  entry = hlo[hlo.index("ENTRY"):]
  entry_params = re.findall(r"(f32\[[\d,]+\])\{?[^ ]*\s*parameter\(", entry) or re.findall(
      r"= (f32\[[\d,]+\])[^=]*parameter\(", entry)
  return {
      "loss": _max_rel_diff(loss, ref_loss),
      "grads": _max_rel_diff(grads, ref_grads),
      "router_metrics": _max_rel_diff(
          {k: v for k, v in metrics.items() if k.startswith("router")},
          {k: v for k, v in ref_metrics.items() if k.startswith("router")}),
      "wi_shard_fraction": float(np.prod(wi_sharding.shard_shape(wi_shape)) / np.prod(wi_shape)),
      "hlo_has_local_expert_weights": float(local in entry_params),
      "hlo_has_whole_expert_weights": float(whole in entry_params),
      "hlo_all_to_all": float("all-to-all" in hlo),
  }


@pytest.fixture(scope="module")
def expert_results():
  # No persistent compilation cache: 8-device CPU collectives run from a cached executable
  # have aborted with a participant count of 9 of 8.
  env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") +
      " --xla_force_host_platform_device_count=8 "
         "--xla_backend_optimization_level=0",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO + os.pathsep + os.path.join(REPO, "tests")}
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_expert_parallel_loss_and_gradients_match_single_device(expert_results):
  assert expert_results["loss"] < RTOL
  assert expert_results["grads"] < RTOL
  assert expert_results["router_metrics"] < RTOL


def test_expert_weights_are_sharded_one_expert_per_device(expert_results):
  assert expert_results["wi_shard_fraction"] == pytest.approx(1 / 4)
  # The compiled program's inputs hold one expert's weights per device, never all four.
  assert expert_results["hlo_has_local_expert_weights"] == 1.0
  assert expert_results["hlo_has_whole_expert_weights"] == 0.0


def test_expert_count_must_divide_the_expert_axis():
  from coca_jax.core import config as config_lib
  c = routed_config()
  c.model.vision.experts["num_experts"] = 6
  c.mesh.update(MESH)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(c, num_devices=8)
  assert "config.model.vision.experts.num_experts=6" in str(error.value)
  assert "config.mesh.expert=4" in str(error.value)


def test_batch_priority_groups_must_lie_on_one_batch_shard():
  from coca_jax.core import config as config_lib
  c = routed_config()
  c.mesh.update(MESH)
  c.model.vision.experts["group_size"] = 0  # The whole batch: across the 8 shards.
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.model.vision.experts.group_size=0 must divide the 2 examples "
                           r"per batch shard"):
    config_lib.validate(c, num_devices=8)


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  print(json.dumps(_worker()))
