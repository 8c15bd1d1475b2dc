"""The installed `coca-*` commands that run JAX (setup.py's console_scripts point here).

These CLIs re-execute themselves once with mimalloc preloaded (coca_jax/core/runtime.py).
`python -m coca_jax.train` does so before its own imports; an installed script imports the
function it names before calling it, so a script pointing at `coca_jax.train:run` imported the
whole trainer (seconds of imports) and then did it all again after re-executing. Each function
here re-executes first, then imports its CLI module (`coca_jax.<verb>`) and runs it: the same
help, flags and exit codes as `python -m coca_jax.<verb>`.
"""

from __future__ import annotations

import importlib
from typing import Callable

from coca_jax.core import runtime


def _entry(verb: str) -> Callable[[], None]:
  def run() -> None:
    runtime.preload_allocator()
    # heavy: the CLI's imports (JAX, the model), only after the re-execution.
    importlib.import_module(f"coca_jax.{verb}").run()
  run.__name__ = run.__qualname__ = verb
  return run


train = _entry("train")
evaluate = _entry("evaluate")
caption = _entry("caption")
bench = _entry("bench")
index = _entry("index")
