"""Cloud paths: a run whose workdir is gs://BUCKET/... trains, exports and loads with every file
in the bucket, and nothing touches a gs:// path through os/open (which would write a local
`gs:/...` directory or silently find nothing).

The bucket is a local GCS emulator (gcp-storage-emulator, in this process) that both sides talk
to: etils.epath/gcsfs (our fs layer) via STORAGE_EMULATOR_HOST, and orbax's array writer
(tensorstore's gcs driver) via TENSORSTORE_GCS_HTTP_URL. A guard in the training process
records every os/open call whose path contains 'gs:/'; the test requires none.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

if importlib.util.find_spec("gcsfs") is None:  # Not imported here: see `gcs` for why.
  pytest.skip("gs:// needs gcsfs (pip install -e .[gcs])", allow_module_level=True)
emulator = pytest.importorskip("gcp_storage_emulator.server")

from coca_jax.core import fs
from coca_jax.inference import api  # pylint: disable=g-import-not-at-top
from coca_jax.training import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "coca-test"

# Installed first thing in a process: every os/open call on a path containing 'gs:/' is
# appended to $URL_GUARD_LOG (with the call's name) and refused. Recording, not only raising,
# catches calls whose caller swallows the exception.
GUARD = r'''
import builtins, io, os, traceback
_log, _open = os.environ["URL_GUARD_LOG"], builtins.open
def _guard(name, fn):
  def wrapped(*args, **kwargs):
    for a in args[:2]:
      if isinstance(a, (str, bytes, os.PathLike)) and "gs:/" in str(os.fspath(a)):
        with _open(_log, "a") as f:
          f.write(f"{name}({os.fspath(a)!r}) at " +
                  traceback.format_stack(limit=4)[-2].strip().replace(chr(10), " ") + chr(10))
        raise AssertionError(f"{name} called on the URL {a!r}")
    return fn(*args, **kwargs)
  return wrapped
builtins.open = io.open = _guard("open", _open)
for _name in ("open", "stat", "lstat", "listdir", "scandir", "mkdir", "makedirs", "remove",
              "unlink", "rmdir", "rename", "replace", "access"):
  setattr(os, _name, _guard("os." + _name, getattr(os, _name)))
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _download_with_generation():
  """Real GCS sends the object's generation as the x-goog-generation header of every media
  download; tensorstore (orbax's OCDBT manifest updates) requires it, the emulator omits it.
  Puts it into the emulator's download handler."""
  from gcp_storage_emulator.handlers import objects
  original = getattr(objects.download, "__wrapped__", objects.download)

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]
  download.__wrapped__ = original
  objects.download = download  # `objects.get` with alt=media calls it by this name.
  for _, handlers in emulator.HANDLERS:
    for method, handler in handlers.items():
      if getattr(handler, "__wrapped__", handler) is original:
        handlers[method] = download


def _create_only_uploads():
  """Real GCS refuses an upload with ifGenerationMatch=0 when the object exists (412): the
  workdir LOCK relies on it; the emulator ignores the precondition. Adds it to uploads."""
  from http import HTTPStatus
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  original = getattr(objects.insert, "__wrapped__", objects.insert)

  def insert(request, response, storage, *args, **kwargs):
    name = request.query.get("name", [None])[0]
    if not name and request.query.get("uploadType") == ["multipart"]:
      name = request.data["meta"].get("name")  # Parsed once, cached for `original`.
    if name and request.query.get("ifGenerationMatch") == ["0"]:
      try:
        storage.get_file_obj(request.params["bucket_name"], name)
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
      except NotFound:
        pass
    return original(request, response, storage, *args, **kwargs)
  insert.__wrapped__ = original
  objects.insert = insert  # The server's router also looks it up by this name.
  for _, handlers in emulator.HANDLERS:
    for method, handler in handlers.items():
      if getattr(handler, "__wrapped__", handler) is original:
        handlers[method] = insert


@pytest.fixture(scope="module")
def gcs():
  """A GCS emulator on localhost with one bucket; this process's env points gcsfs and
  tensorstore at it. Yields the environment a subprocess needs."""
  _download_with_generation()
  _create_only_uploads()
  port = _free_port()
  server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  # gcsfs asks a bucket's layout (zonal / hierarchical) from the Storage Control API, which
  # the emulator lacks: each failed lookup waits for credentials, so it is turned off (read
  # when gcsfs is imported, hence no import before this fixture).
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "unused", "GOOGLE_CLOUD_PROJECT": "test",
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()


def _run_guarded(module, args, env, cwd, log):
  code = (GUARD + "\nimport runpy, sys\n"
          f"sys.argv = [{module!r}] + {list(args)!r}\n"
          f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
  full_env = {**os.environ, **env, "URL_GUARD_LOG": log, "PYTHONPATH": REPO,
              "COCA_JAX_ALLOCATOR": "system", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def gs_run(gcs, tmp_path_factory):
  """Trains the smoke demo with --workdir gs://BUCKET/run (demo data and HOME local)."""
  tmp = tmp_path_factory.mktemp("cloud")
  log = str(tmp / "guard.log")
  open(log, "w").close()
  workdir = f"gs://{BUCKET}/run"
  result = _run_guarded("coca_jax.train", [
      "--config", os.path.join(REPO, "experiments", "demo.py") + ":smoke",
      "--workdir", workdir], {**gcs, "HOME": str(tmp / "home")}, cwd=str(tmp), log=log)
  assert result.returncode == 0, result.stderr[-4000:]
  with open(log) as f:
    return dict(workdir=workdir, tmp=tmp, guard=f.read(), stderr=result.stderr)


def test_train_writes_every_workdir_file_to_the_bucket(gs_run):
  assert gs_run["guard"] == "", "os/open called on a gs:// path:\n" + gs_run["guard"]
  # A path mangled by os.path.abspath would have created <cwd>/gs:/... locally.
  assert not os.path.exists(gs_run["tmp"] / "gs:"), os.listdir(gs_run["tmp"])
  workdir = gs_run["workdir"]
  # LOCK released; known_good.json names the newest checkpoint a clean step ran from.
  assert fs.listdir(workdir) == sorted(["checkpoints", "config.json", "known_good.json",
                                        "metrics.jsonl", "tensorboard", "tokenizer.model"])
  assert checkpoint.step_dirs(workdir) == ([3, 6], [])
  assert checkpoint.unreadable_reason(workdir, 6) is None
  records = [json.loads(line) for line in fs.read_text(fs.join(workdir, "metrics.jsonl"))
             .splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
  assert any(name.startswith("events.out.tfevents")
             for name in fs.listdir(fs.join(workdir, "tensorboard")))
  config = checkpoint.read_config(workdir)
  assert config.data.tokenizer == fs.join(workdir, "tokenizer.model")
  # The demo data cannot live in the bucket (local array_record I/O): it went to ~/.
  assert config.data.data_dir == str(gs_run["tmp"] / "home" / "tensorflow_datasets")


def test_export_and_load_round_trip_through_the_bucket(gs_run, monkeypatch):
  import coca_jax
  from coca_jax import export
  calls = []
  for name in ("stat", "listdir", "makedirs", "mkdir", "rename", "replace", "remove", "open"):
    original = getattr(os, name)
    def guarded(*args, _name=name, _original=original, **kwargs):
      if args and isinstance(args[0], (str, os.PathLike)) and "gs:/" in os.fspath(args[0]):
        calls.append(f"os.{_name}({args[0]!r})")
      return _original(*args, **kwargs)
    monkeypatch.setattr(os, name, guarded)
  out = f"gs://{BUCKET}/exported"
  assert export.export(gs_run["workdir"], out) == out
  with pytest.raises(FileExistsError, match="already exists"):
    export.export(gs_run["workdir"], out)
  assert sorted(fs.listdir(out)) == sorted(["config.json", api.EXPORT_MANIFEST, "params",
                                            "tokenizer.model"])
  from_export = coca_jax.load(out, batch_size=4)
  from_workdir = coca_jax.load(gs_run["workdir"], batch_size=4)
  assert from_export.step == from_workdir.step == 6
  texts = ["a zero", "two and three"]
  np.testing.assert_allclose(from_export.embed_texts(texts), from_workdir.embed_texts(texts),
                             atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, from_export.params, from_workdir.params)
  assert not calls, calls


def test_workdir_lock_in_the_bucket_refuses_a_second_writer(gcs):
  workdir = f"gs://{BUCKET}/locked"
  # The primitive: a create-only upload (ifGenerationMatch=0) succeeds once.
  marker = fs.join(workdir, "created-once")
  assert fs.create_exclusive(marker, b"first")
  assert not fs.create_exclusive(marker, b"second")
  assert fs.read_text(marker) == "first"
  first = checkpoint.WorkdirLock(workdir).acquire()
  lock_path = fs.join(workdir, checkpoint.LOCK_FILE)
  assert json.loads(fs.read_text(lock_path))["pid"] == os.getpid()
  # Another host holds it: refused, naming the lock object.
  fs.write_text(lock_path, json.dumps({"pid": 1, "host": "elsewhere", "started": "t"}))
  with pytest.raises(checkpoint.CheckpointError, match=f"{lock_path}"):
    checkpoint.WorkdirLock(workdir).acquire()
  first.release()  # Not ours any more: left alone.
  assert fs.exists(lock_path)
  fs.remove(lock_path)
  second = checkpoint.WorkdirLock(workdir).acquire()
  second.release()
  assert not fs.exists(lock_path)


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert fs.resolve("gs://b/run/") == "gs://b/run"
  assert fs.resolve("s3://b/x") == "s3://b/x"
  assert fs.resolve("runs/a") == str(tmp_path / "runs" / "a")
  assert fs.resolve("~/a") == os.path.join(os.path.expanduser("~"), "a")
  assert fs.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
  assert fs.dirname("gs://b/run/x/") == "gs://b/run"


def test_a_url_data_dir_is_refused_with_the_fix():
  from coca_jax.data import sources
  with pytest.raises(ValueError, match=r"config.data.data_dir='gs://b/tfds'.*gcsfuse"):
    sources.open_source("digit_scenes", "gs://b/tfds", "train")


def test_local_writes_are_whole_or_absent(tmp_path):
  path = tmp_path / "sub" / "config.json"
  fs.write_text(path, "old")
  assert fs.read_text(path) == "old"
  fs.write_text(path, "new")
  assert fs.read_text(path) == "new"
  assert os.listdir(tmp_path / "sub") == ["config.json"]  # No temporary file left behind.
  # The mode open() gives (0666 less the umask), not the temporary file's owner-only 0600:
  # configs and exported bundles are read by others on a shared file system.
  old_mask = os.umask(0o022)
  try:
    fs.write_text(path, "shared")
    assert os.stat(path).st_mode & 0o777 == 0o644
    os.umask(0o077)
    fs.write_text(path, "private")
    assert os.stat(path).st_mode & 0o777 == 0o600
  finally:
    os.umask(old_mask)
  assert fs.create_exclusive(tmp_path / "LOCK", b"1")
  assert not fs.create_exclusive(tmp_path / "LOCK", b"2")
  assert fs.read_text(tmp_path / "LOCK") == "1"


def test_report_renders_into_the_bucket(gs_run):
  from coca_jax import report
  out = report.write_report(gs_run["workdir"])
  assert out == fs.join(gs_run["workdir"], "report.md")
  text = fs.read_text(out)
  pngs = [name for name in fs.listdir(gs_run["workdir"]) if name.endswith(".png")]
  assert pngs and all(f"]({name})" in text for name in pngs), (pngs, text)
  assert fs.read_bytes(fs.join(gs_run["workdir"], pngs[0]))[:8] == b"\x89PNG\r\n\x1a\n"
