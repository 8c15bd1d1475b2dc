"""Process-level setup for the command-line programs: the memory allocator.

XLA:CPU allocates each step's scratch buffer (hundreds of MB for the demo's train step, GBs for
larger models) with `malloc`. glibc serves blocks that large with a fresh `mmap` and returns
them with `munmap`, so every step page-faults its whole scratch buffer in again and a large
share of the step's CPU time goes to the kernel. mimalloc keeps freed memory mapped and reuses
it (docs/performance.md, "Allocator", measures the difference with
benchmarks/bench_allocator.py). An allocator can only be swapped before the process
starts, so the training, evaluation, captioning and benchmark CLIs re-execute themselves once
with mimalloc preloaded (`LD_PRELOAD`), from the `cmeel-mimalloc` wheel this package depends on.

`COCA_JAX_ALLOCATOR=system` turns this off (e.g. to compare, or under a profiler that preloads
its own allocator). Library use (`import coca_jax`) never re-executes anything.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

ENV_CHOICE = "COCA_JAX_ALLOCATOR"  # 'mimalloc' (default) | 'system'
_ENV_DONE = "COCA_JAX_ALLOCATOR_ACTIVE"  # Set on the re-executed process: never loop.
CHOICES = ("mimalloc", "system")


def mimalloc_library() -> str | None:
  """Path of the mimalloc shared library shipped by the `cmeel-mimalloc` wheel, or None."""
  try:
    files = importlib.metadata.files("cmeel-mimalloc") or []
  except importlib.metadata.PackageNotFoundError:
    return None
  candidates = sorted((f for f in files if f.name.startswith("libmimalloc.so")),
                      key=lambda f: len(f.name))
  for f in candidates:
    path = str(f.locate())
    if os.path.exists(path):
      return path
  return None


def preload_allocator(argv: list[str] | None = None) -> None:
  """Re-executes this process with mimalloc preloaded, unless it is already, the user chose
  the system allocator, or this is not Linux. Call it first thing in a CLI's entry point.

  `argv`: the command line to re-run (default: the interpreter's original one, `-m` included).
  Returns only when nothing is to be done (or the library is missing: then it warns once).
  """
  choice = os.environ.get(ENV_CHOICE, "mimalloc")
  if choice not in CHOICES:
    raise ValueError(f"{ENV_CHOICE}={choice!r} is unknown; use one of {CHOICES}")
  if choice == "system" or os.environ.get(_ENV_DONE) or not sys.platform.startswith("linux"):
    return
  library = mimalloc_library()
  if library is None:
    print(f"coca_jax: mimalloc not found (pip install cmeel-mimalloc); using the system "
          f"allocator, which page-faults XLA's scratch memory every step. Set {ENV_CHOICE}=system "
          "to silence this.", file=sys.stderr)
    return
  preload = os.environ.get("LD_PRELOAD", "")
  if "libmimalloc" in preload:
    return
  env = dict(os.environ)
  env["LD_PRELOAD"] = library + (":" + preload if preload else "")
  env[_ENV_DONE] = "1"
  argv = list(argv if argv is not None else sys.orig_argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)
