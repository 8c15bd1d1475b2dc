"""The CLIs run under mimalloc (XLA:CPU's per-step scratch memory is then reused, not
page-faulted in again every step; see coca_jax/core/runtime.py), unless the user opts out."""

import os
import subprocess
import sys

import pytest

from coca_jax.core import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("from coca_jax.core import runtime; runtime.preload_allocator(); "
         "print('libmimalloc' in open('/proc/self/maps').read())")

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux")


def _probe(**env):
  base = {k: v for k, v in os.environ.items()
          if k not in ("LD_PRELOAD", runtime.ENV_CHOICE, runtime._ENV_DONE)}  # pylint: disable=protected-access
  result = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout.strip()


def test_mimalloc_ships_with_the_package():
  path = runtime.mimalloc_library()
  assert path is not None and os.path.exists(path)


@linux_only
def test_cli_entry_reexecutes_once_with_mimalloc():
  assert _probe() == "True"


@linux_only
def test_system_allocator_on_request_and_bad_choice_named():
  assert _probe(**{runtime.ENV_CHOICE: "system"}) == "False"
  base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  result = subprocess.run([sys.executable, "-c", PROBE],
                          env={**base, runtime.ENV_CHOICE: "tcmalloc"}, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode != 0 and runtime.ENV_CHOICE in result.stderr
