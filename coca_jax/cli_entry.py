"""The installed `coca-*` commands that run JAX (setup.py's console_scripts point here).

These CLIs re-execute themselves once with mimalloc preloaded (coca_jax/core/runtime.py).
`python -m coca_jax.train` does so before its own imports; an installed script imports the
function it names before calling it, so a script pointing at `coca_jax.train:run` imported the
whole trainer (seconds of imports) and then did it all again after re-executing. Each function
here re-executes first, then imports its CLI module and runs it: the same help, flags and exit
codes as `python -m coca_jax.<verb>`.
"""

from __future__ import annotations

from coca_jax.core import runtime


def train() -> None:
  runtime.preload_allocator()
  from coca_jax import train as cli  # heavy: the trainer's imports, after the re-execution
  cli.run()


def evaluate() -> None:
  runtime.preload_allocator()
  from coca_jax import evaluate as cli  # heavy: the evaluator's imports, after the re-execution
  cli.run()


def caption() -> None:
  runtime.preload_allocator()
  from coca_jax import caption as cli  # heavy: the model's imports, after the re-execution
  cli.run()


def bench() -> None:
  runtime.preload_allocator()
  from coca_jax import bench as cli  # heavy: the trainer's imports, after the re-execution
  cli.run()


def index() -> None:
  runtime.preload_allocator()
  from coca_jax import index as cli  # heavy: the model's imports, after the re-execution
  cli.run()
