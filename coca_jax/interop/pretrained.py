r"""Published checkpoints by name: download once, convert once, then load like any bundle.

  python -m coca_jax.interop.pretrained list
  python -m coca_jax.interop.pretrained fetch open_clip:coca_ViT-B-32/laion2b_s13b_b90k

  import coca_jax
  model = coca_jax.load("open_clip:coca_ViT-L-14/mscoco_finetuned_laion2b_s13b_b90k")

`fetch(name)`:
  1. downloads the weights through `huggingface_hub` (its cache: HF_HUB_CACHE / HF_HOME; an
     interrupted download resumes; HF_HUB_OFFLINE=1 reads the cache only) and checks each
     file's sha256 against the one the hub publishes for it (its LFS hash) and against the
     registry's where the publisher gives one. A file that is not on the hub (VLMo's releases)
     is read from `$COCA_JAX_CACHE/downloads/`, where the user puts it;
  2. converts it with the family's importer (`interop/open_clip.py`, `interop/vlmo.py`) into a
     bundle at `core.pretrained.bundle_dir(name)`, written to a temporary sibling and renamed,
     so a killed conversion never leaves a half bundle (a leftover `.NAME.tmp-*` directory
     beside it may be deleted);
  3. later calls find the bundle and neither download nor convert again.
Without the network (or with HF_HUB_OFFLINE=1) and an empty cache, one PretrainedUnavailable
error names the cache and the command that pre-downloads the file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys

from coca_jax import __version__
from coca_jax.core import cli
from coca_jax.core import fs
from coca_jax.core import pretrained as names
from coca_jax.data import clip_bpe
from coca_jax.interop import open_clip
from coca_jax.interop import vlmo
from coca_jax.training import warm_start

SHA256 = re.compile(r"[0-9a-f]{64}")


class PretrainedUnavailable(FileNotFoundError):
  """A file of a published checkpoint that is neither cached nor downloadable now."""


class ChecksumError(ValueError):
  """A downloaded file whose sha256 is not the published one."""


def hub_cache_dir() -> str:
  """huggingface_hub's cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
  explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
  if explicit:
    return os.path.abspath(os.path.expanduser(explicit))
  home = os.environ.get("HF_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
  return os.path.abspath(os.path.join(os.path.expanduser(home), "hub"))


def hub_offline() -> bool:
  """HF_HUB_OFFLINE as the environment says now (huggingface_hub reads it once at import)."""
  return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def verify(path: str, expected: str = "") -> None:
  """Checks the file at `path` against `expected` (a published sha256) and, for a file in the
  hub cache, against the sha256 the hub published for it: the cache names each large file's
  blob by that hash. Raises ChecksumError naming the file and what to do."""
  blob = os.path.basename(os.path.realpath(path))
  hub_hash = blob if SHA256.fullmatch(blob) else ""
  if not expected and not hub_hash:
    return
  actual = file_sha256(path)
  for want, who in ((expected, "its publisher gives"), (hub_hash, "the hub publishes")):
    if want and actual != want.lower():
      raise ChecksumError(
          f"{path} has sha256 {actual} but {who} {want}: the file is damaged or not the "
          f"published one; delete {os.path.realpath(path)} and fetch again")


def _pre_download_hint(repo_id: str, files: tuple[str, ...]) -> str:
  first = f"`hf download {repo_id} {files[0]}`"
  rest = "".join(f" (or {f}, if the repo has no {files[0]})" for f in files[1:])
  return (f"pre-download it where there is network with {first}{rest} (older huggingface_hub: "
          "`huggingface-cli download ...`) into that cache (set HF_HUB_CACHE there, or copy the "
          "cache over), then run with HF_HUB_OFFLINE=1")


def hub_file(repo_id: str, files: tuple[str, ...], checkpoint: names.Checkpoint,
             expected: dict | None = None) -> str:
  """The local path of the first of `files` that `repo_id` has, downloaded into the hub cache
  (or found there), checked (`verify`)."""
  import huggingface_hub  # heavy: only fetching needs it (and its HTTP stack).
  from huggingface_hub import errors as hub_errors  # heavy: as above.
  cache, offline, absent = hub_cache_dir(), hub_offline(), []
  unreachable = False
  for filename in files:
    try:
      path = huggingface_hub.hf_hub_download(
          repo_id, filename, cache_dir=cache, local_files_only=offline or unreachable,
          library_name="coca_jax", library_version=__version__)
    except hub_errors.LocalEntryNotFoundError:  # Not cached, and offline or no network.
      # Once the hub did not answer, the other files are only looked up in the cache.
      unreachable = not offline
      continue
    except hub_errors.EntryNotFoundError:  # The repo does not have this one; try the next.
      absent.append(filename)
      continue
    except (hub_errors.RepositoryNotFoundError, hub_errors.HfHubHTTPError, OSError) as e:
      raise PretrainedUnavailable(
          f"{checkpoint.name}: downloading {filename} of {repo_id} failed "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Hub cache: "
          f"{cache}; " + _pre_download_hint(repo_id, files)) from e
    verify(path, (expected or {}).get(filename, ""))
    return path
  if absent and len(absent) == len(files):
    raise PretrainedUnavailable(f"{checkpoint.name}: {repo_id} has none of {list(files)}")
  why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
  raise PretrainedUnavailable(
      f"{checkpoint.name} is not in the hub cache {cache} (looked for {', '.join(files)} of "
      f"{repo_id}) and {why}; " + _pre_download_hint(repo_id, files)
      + f". Converted bundles go to {names.cache_root()} (${names.CACHE_ENV})")


def by_hand_file(checkpoint: names.Checkpoint) -> str:
  """A file that is not on the hub, put by the user into `names.downloads_dir()`."""
  path = os.path.join(names.downloads_dir(), checkpoint.files[0])
  if not os.path.exists(path):
    raise PretrainedUnavailable(
        f"{checkpoint.name}: {checkpoint.files[0]} is not on the Hugging Face hub; download it "
        f"once and put it at {path}, e.g. `mkdir -p {names.downloads_dir()} && curl -L -o "
        f"{path} {checkpoint.url}` ({names.CACHE_ENV} moves the cache)")
  verify(path, checkpoint.sha256.get(checkpoint.files[0], ""))
  return path


def weights_file(checkpoint: names.Checkpoint) -> str:
  if checkpoint.repo_id:
    return hub_file(checkpoint.repo_id, checkpoint.files, checkpoint, checkpoint.sha256)
  return by_hand_file(checkpoint)


def tokenizer_file(checkpoint: names.Checkpoint) -> str:
  """The tokenizer file the converter reads: the registry's, one from the hub, or for the CLIP
  BPE the one in downloads/ or inside an installed open_clip."""
  if checkpoint.tokenizer:
    return checkpoint.tokenizer
  if checkpoint.tokenizer_hub:
    repo, filename = checkpoint.tokenizer_hub
    return hub_file(repo, (filename,), checkpoint)
  beside = os.path.join(names.downloads_dir(), clip_bpe.VOCAB_FILE)
  found = beside if os.path.exists(beside) else clip_bpe.installed_vocab_file()
  if not found:
    raise PretrainedUnavailable(
        f"{checkpoint.name}: its tokenizer is open_clip's {clip_bpe.VOCAB_FILE}, which is not "
        f"on the hub beside the weights; `pip install open_clip_torch` (the file is read from "
        f"the package, torch is not imported) or put the file at {beside}")
  return found


def convert(checkpoint: names.Checkpoint, weights: str, tokenizer: str, out: str) -> str:
  """The family's importer: `weights` -> a bundle at `out` (atomic; see the module doc)."""
  if checkpoint.family == "open_clip":
    return open_clip.import_bundle(weights, checkpoint.architecture, out, bpe=tokenizer)
  return vlmo.import_bundle(weights, checkpoint.architecture, out, tokenizer)


def fetch(name: str) -> str:
  """The local bundle of published checkpoint `name`: downloaded and converted on first use,
  found in `$COCA_JAX_CACHE` afterwards."""
  checkpoint = names.lookup(name)
  out = names.bundle_dir(checkpoint.name)
  manifest = fs.join(out, warm_start.EXPORT_MANIFEST)
  if fs.exists(manifest):
    return out
  # The tokenizer first: a missing one is found out before gigabytes of weights come down.
  tokenizer = tokenizer_file(checkpoint)
  weights = weights_file(checkpoint)
  print(f"Converting {checkpoint.name} ({weights}) into {out} (once)", file=sys.stderr)
  try:
    return convert(checkpoint, weights, tokenizer, out)
  except OSError:
    if fs.exists(manifest):  # Another process converted it first (the rename raced).
      return out
    raise


def ensure(source: str) -> str:
  """`source` unchanged unless it is a published name; then the name, after `fetch` made its
  bundle (so `warm_start.resolve` finds it). Paths pass through untouched."""
  if names.is_name(source):
    fetch(source)
  return source


# What fetching a published name can raise with a message that names the fix.
FETCH_ERRORS = (ChecksumError, ImportError, open_clip.ConversionError, vlmo.ConversionError)


def ensure_or_exit(source: str) -> str:
  """`ensure` for a command line: a name that cannot be fetched (offline and not cached, a
  file that is not the published one, ...) ends the command with one error line, exit 2."""
  with cli.usage_errors(also=FETCH_ERRORS):
    return ensure(source)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m coca_jax.interop.pretrained",
                                   description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("list", help="every published checkpoint name")
  get = commands.add_parser("fetch", help="download and convert NAME; print its bundle path")
  get.add_argument("name")
  args = parser.parse_args(argv)
  with cli.usage_errors(parser.prog, also=FETCH_ERRORS):
    if args.command == "list":
      for name in names.list_pretrained():
        checkpoint = names.REGISTRY[name]
        where = checkpoint.repo_id or checkpoint.url
        print(f"{name}\t{where}\t{checkpoint.about}")
    else:
      print(fetch(args.name))


if __name__ == "__main__":
  main()
