"""Shared fixtures: the tiny (smoke) demo config, a model built from it, and its parameters.

Everything here is session-scoped so each shape compiles once for the whole suite.
"""

import os
import tempfile

# One persistent XLA compilation cache for the whole suite: the xdist workers and every CLI run
# the tests start (they inherit this environment) compile the same smoke-config programs again
# and again; a cache hit loads the executable instead (a smoke train run: ~4x fewer CPU-seconds).
# A size limit turns on JAX's file lock, so concurrent writers and readers never see a partial
# entry. Set JAX_COMPILATION_CACHE_DIR yourself to move it; an empty value turns it off.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"coca_jax_tests_xla_{os.getuid()}"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
# Unoptimised CPU code generation (here and in the CLI runs the tests start, which inherit
# XLA_FLAGS): the smoke train step compiles ~2.5x faster and runs no slower at the suite's tiny
# shapes. Set xla_backend_optimization_level in XLA_FLAGS yourself to test another level. The
# multi-device CPU collectives wait for every device's thread; on 2 busy cores one can be late
# by more than XLA's default 40 s, which then aborts the process: wait 10 minutes instead.
_TEST_XLA_FLAGS = {"xla_backend_optimization_level": "0",
                   "xla_cpu_collective_call_terminate_timeout_seconds": "600"}
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")] + [f"--{name}={value}" for name, value in
                                         _TEST_XLA_FLAGS.items()
                                         if name not in os.environ.get("XLA_FLAGS", "")]).strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position  # after the cache settings
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.core import config as config_lib
from coca_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config():
  """A fresh copy of experiments/demo.py:smoke (tests may mutate it)."""
  return config_lib.load_config(os.path.join(REPO, "experiments", "demo.py") + ":smoke")


@pytest.fixture(scope="session")
def tiny_config():
  return smoke_config()


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
  return step_lib.build_model(tiny_config)


@pytest.fixture(scope="session")
def tiny_params(tiny_model, tiny_config):
  image = jnp.zeros((1, tiny_config.model.image_size, tiny_config.model.image_size, 3))
  text = jnp.zeros((1, tiny_config.model.text.max_len), jnp.int32)
  variables = jax.jit(tiny_model.init)(jax.random.key(0), image, text)
  import flax.linen as nn
  return nn.unbox(variables)["params"]


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
  """Flags that point a `demo.py:smoke` run at the smoke demo dataset and tokenizer, built once
  per test process (each smoke run would otherwise build both into its own workdir: ~2.4
  CPU-seconds a run). For tests whose property is not the building itself: the runs of a test
  of building, of a workdir's contents or of a fresh clone keep their own."""
  from coca_jax.data import prepare  # Only the tests that share the data pay its imports.
  root = str(tmp_path_factory.mktemp("smoke_data"))
  config = config_lib.complete(smoke_config())
  prepare.prepare_data(config, root)
  return [f"--config.data.data_dir={config.data.data_dir}",
          f"--config.data.tokenizer={config.data.tokenizer}"]


def random_batch(config, batch_size, seed=0, num_pads=(0, 3, 7)):
  """Images ~N(0,1) and texts BOS w.. EOS PAD.. with varying pad counts (never a pad in the middle)."""
  rng = np.random.default_rng(seed)
  size, length = config.model.image_size, config.model.text.max_len
  vocab = config.model.text.vocab_size
  text = np.zeros((batch_size, length), np.int32)
  for row in range(batch_size):
    pads = num_pads[row % len(num_pads)]
    words = rng.integers(4, vocab, length - 2 - pads)
    seq = [2, *words, 3]
    text[row, :len(seq)] = seq
  image = rng.standard_normal((batch_size, size, size, 3)).astype(np.float32)
  return {"image": jnp.asarray(image), "text": jnp.asarray(text)}


def loss_and_grads_without_and_with_balance_loss(model, params, batch):
  """((loss, metrics), grads) of `step.loss_fn` with the smoke config's loss at
  router_balance_weight 0 and 1, in one jitted call: their difference is what the router
  balance term adds to the loss and to each router's gradient."""
  configs = []
  for weight in (0.0, 1.0):
    loss_config = smoke_config().loss
    loss_config.router_balance_weight = weight
    configs.append(loss_config)

  @jax.jit
  def both(p):
    grad = lambda c: jax.value_and_grad(step_lib.loss_fn, has_aux=True)(p, model, batch, c)
    return grad(configs[0]), grad(configs[1])

  return both(params)


# Files whose tests start the longest subprocess runs (the 2-process trainings, the 8-device
# sharding checks, the kill-and-resume runs, ...), slowest first. They run first: `pytest -n 2`
# hands whole files to the workers in collection order (pyproject.toml's --dist loadfile), so
# a slow file collected last would keep one worker busy while the other idles at the end.
# Order within a file is kept; files not listed follow in their usual order.
SLOW_FILES_FIRST = ("test_multihost.py", "test_safety.py", "test_sharding.py",
                    "test_preemption.py", "test_sweep.py", "test_train.py", "test_experts.py",
                    "test_expert_parallel.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the rest
