"""The one file-system layer: every read and write coca_jax does on a path a user gives (workdir,
data_dir, tokenizer, export, init source, sweep root, report) goes through here.

A path is either local (`runs/a`, `~/runs/a`, `/abs/runs/a`) or a URL (`gs://bucket/run`,
`s3://...`). `resolve` makes a local path absolute (orbax needs absolute paths) and leaves a URL
exactly as given (never `os.path.abspath`: that would turn `gs://b/run` into `<cwd>/gs:/b/run`).
The operations are etils.epath's (the layer orbax uses too): local paths go to the os, gs:// to
gcsfs (the `gcs` extra: `pip install -e .[gcs]`) or to tf.io.gfile where TensorFlow is installed.
Paths stay plain strings in the rest of the package.

What an object store cannot do, and what we do instead:
- Renaming a directory is a copy of every object, not atomic. `write_directory` writes into a
  temporary directory and renames it on local disks; on a URL it writes in place and the caller
  writes its completion marker (an export's manifest) last, so a reader never takes a half-written
  directory for a finished one.
- Exclusive create (the workdir LOCK) uses GCS's `ifGenerationMatch=0` precondition through
  gcsfs (`create_exclusive`): atomic on real GCS. Other stores, and gs:// through tf.io.gfile
  (epath's choice when TensorFlow is installed; EPATH_USE_TF=false keeps gcsfs), get a
  check-then-write, which two runs starting in the same instant can both pass (a warning says so).
- Writes of one object are atomic on object stores (a reader sees the old or the new object);
  locally `write_text`/`write_bytes` write a temporary file and rename it for the same guarantee.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from typing import IO
import uuid

from absl import logging
from etils import epath


def is_url(path) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...), False for local paths."""
  return "://" in os.fspath(path)


def resolve(path) -> str:
  """A local path made absolute (`~` expanded); a URL unchanged except a trailing '/'."""
  path = os.fspath(path)
  if is_url(path):
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else path
  return os.path.abspath(os.path.expanduser(path))


def as_path(path) -> epath.Path:
  """The epath.Path of `path` (after `resolve`), for libraries that take one (orbax, TFDS)."""
  return epath.Path(resolve(path))


def join(path, *parts: str) -> str:
  """`path/part/...` for local paths and URLs alike (no resolving)."""
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_url(path) else os.path.join(path, *parts)


def dirname(path) -> str:
  path = os.fspath(path)
  return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path)


def basename(path) -> str:
  path = os.fspath(path)
  return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def _fresh(path) -> epath.Path:
  """epath.Path of `path`; for a URL, first drops fsspec's cached listings of it, so objects
  written by another process, or by orbax's own writer (tensorstore), are seen."""
  p = epath.Path(os.fspath(path))
  if is_url(path):
    backend = getattr(p, "_backend", None)
    fs = getattr(backend, "fs", None)
    if fs is not None:
      with contextlib.suppress(Exception):  # A backend without a cache has nothing to drop.
        fs(os.fspath(path)).invalidate_cache()
  return p


def exists(path) -> bool:
  return _fresh(path).exists()


def isdir(path) -> bool:
  return _fresh(path).is_dir()


def isfile(path) -> bool:
  p = _fresh(path)
  return p.exists() and not p.is_dir()


def listdir(path) -> list[str]:
  """Sorted names (not paths) in the directory `path`; [] if it does not exist."""
  p = _fresh(path)
  if not p.is_dir():
    return []
  return sorted(child.name for child in p.iterdir())


def makedirs(path) -> None:
  """Creates `path` and its parents (on object stores directories are implicit: a no-op)."""
  epath.Path(os.fspath(path)).mkdir(parents=True, exist_ok=True)


def open(path, mode: str = "r") -> IO:  # pylint: disable=redefined-builtin
  """Opens a file for 'r', 'rb', 'w', 'wb' or 'a' ('a' on an object store rewrites the object)."""
  if is_url(path) and mode.startswith("a"):
    return _Appender(os.fspath(path), binary="b" in mode)
  return epath.Path(os.fspath(path)).open(mode)


class _Appender:
  """Append mode for object stores, whose objects cannot be appended to: reads the object once,
  then rewrites it whole on each close. Fine for small logs (metrics.jsonl) written a few
  times a minute; each close costs one upload of the whole file."""

  def __init__(self, path: str, binary: bool):
    self.path, self.binary = path, binary
    self.parts = [read_bytes(path) if exists(path) else b""]

  def write(self, data) -> int:
    self.parts.append(data if self.binary else data.encode("utf-8"))
    return len(data)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    write_bytes(self.path, b"".join(self.parts))

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_text(path) -> str:
  return epath.Path(os.fspath(path)).read_text()


def read_bytes(path) -> bytes:
  return epath.Path(os.fspath(path)).read_bytes()


def _umask() -> int:
  """The process's umask, read without changing it where Linux shows it (/proc); elsewhere by
  setting and restoring it."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_bytes(path, data: bytes) -> None:
  """Writes `data` so that a reader sees the old or the new contents, never a part: one object
  upload on a store, a temporary file renamed over `path` locally. Creates parent directories."""
  path = os.fspath(path)
  if is_url(path):
    epath.Path(path).write_bytes(data)
    return
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp")
  try:
    # mkstemp makes the file owner-only (0600); give it the mode open() would (0666 less the
    # umask), so configs and exported bundles stay readable on a shared file system.
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def remove(path) -> None:
  """Removes one file; a missing one is not an error."""
  with contextlib.suppress(FileNotFoundError):
    epath.Path(os.fspath(path)).unlink()


def rmtree(path) -> None:
  """Removes a directory tree; a missing one is not an error."""
  p = _fresh(path)
  if p.exists():
    p.rmtree()


def move(source, target) -> None:
  """Moves a file or directory (on object stores: a copy of every object, then a delete)."""
  epath.Path(os.fspath(source)).rename(os.fspath(target))


def create_exclusive(path, data: bytes) -> bool:
  """Creates `path` holding `data` only if it does not exist yet; False if it does.

  Local: O_CREAT|O_EXCL (atomic). gs:// through gcsfs: an upload with the precondition
  ifGenerationMatch=0 (atomic on GCS). Other stores: check, then write (not atomic; warned)."""
  path = os.fspath(path)
  if not is_url(path):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    return True
  backend = getattr(epath.Path(path), "_backend", None)
  filesystem = backend.fs(path) if hasattr(backend, "fs") else None
  protocols = getattr(filesystem, "protocol", ())
  protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
  if "gs" in protocols or "gcs" in protocols:
    try:
      filesystem.pipe_file(path, data, mode="create")
    except FileExistsError:
      return False
    return True
  logging.warning("%s: this store has no exclusive create here; the lock is checked, then "
                  "written (two runs starting in the same second could both take it)", path)
  if exists(path):
    return False
  write_bytes(path, data)
  return True


def write_directory(out, write) -> str:
  """Calls `write(directory)` to fill a new directory `out` (which must not exist); returns the
  resolved `out`. Locally it writes a temporary sibling and renames it (atomic: `out` appears
  whole or not at all). On a URL it writes `out` in place, since a directory rename there copies
  every object; the writer must then write its completion marker last. On failure the partial
  directory is removed."""
  out = resolve(out)
  if exists(out):
    raise FileExistsError(f"{out} already exists; pick a new directory")
  parent = dirname(out)
  makedirs(parent)
  tmp = out if is_url(out) else join(parent, f".{basename(out)}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    write(tmp)
    if tmp != out:
      os.rename(tmp, out)
  except BaseException:
    with contextlib.suppress(Exception):
      rmtree(tmp)
    raise
  return out
