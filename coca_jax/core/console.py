"""What a run prints: our own lines and every warning; third-party INFO logs only with --verbose.

orbax, TFDS and JAX log through absl / Python logging at INFO (CheckpointManagerOptions dumps,
"Unable to initialize backend 'tpu'", per-save throughput lines). Those drown the progress lines,
so by default the absl handler passes an INFO record only when it comes from this package, and
formats it as the bare message; WARNING and above pass from everywhere, with their origin.
"""

from __future__ import annotations

import contextlib
import errno
import logging as py_logging
import os

from absl import logging

# The whole package (this file lives in coca_jax/core/): every module of ours logs INFO.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DISK_FULL_TEXT = "No space left on device"


class _OwnInfoAndWarnings(py_logging.Filter):
  """Also drops other libraries' reports of a full disk: a failed checkpoint save makes each of
  orbax's writer threads log its own traceback (hundreds of lines), and the trainer prints one
  message of its own instead (checkpoint.disk_full_message)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    own = os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)
    if not own and record.levelno >= py_logging.WARNING and _mentions_disk_full(record):
      return False
    return record.levelno >= py_logging.WARNING or own


def _mentions_disk_full(record: py_logging.LogRecord) -> bool:
  if DISK_FULL_TEXT in record.getMessage():
    return True
  error, seen = (record.exc_info[1] if record.exc_info else None), set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if DISK_FULL_TEXT in str(error) or getattr(error, "errno", None) == errno.ENOSPC:
      return True
    error = error.__cause__ or error.__context__
  return False


class _Formatter(py_logging.Formatter):

  def format(self, record: py_logging.LogRecord) -> str:
    message = record.getMessage()
    if record.exc_info:
      message += "\n" + self.formatException(record.exc_info)
    if record.levelno < py_logging.WARNING:
      return message
    return f"{record.levelname} ({record.module}): {message}"


def setup(verbose: bool = False) -> None:
  """Installs the quiet console (idempotent). `verbose=True` keeps absl's own format and every
  library's INFO lines, for debugging checkpointing or data loading."""
  if verbose:
    logging.set_verbosity(logging.INFO)
    return
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoAndWarnings) for f in handler.filters):
    handler.addFilter(_OwnInfoAndWarnings())
  handler.setFormatter(_Formatter())
  # Warnings raised with `warnings.warn` go through the same filter and format.
  py_logging.captureWarnings(True)
  try:  # TFDS draws tqdm bars while it writes a dataset; our own builders report instead.
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
  except ImportError:
    pass


@contextlib.contextmanager
def quiet_stdout(verbose: bool = False):
  """Swallows what libraries print to stdout inside the block (TFDS announces every dataset it
  writes with a bold 'Downloading and preparing dataset Unknown size ...'), unless verbose."""
  if verbose:
    yield
    return
  with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
    yield
