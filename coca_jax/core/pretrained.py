"""Published checkpoints by name: the registry and where each one lives in the local cache.

  coca_jax.list_pretrained()
  # -> ['open_clip:coca_ViT-B-32/laion2b_s13b_b90k', ..., 'vlmo:vlmo_base_patch16_224', ...]

A name is `<family>:<what>`; the family picks the converter (`coca_jax/interop/open_clip.py`,
`interop/vlmo.py`). Where a name is accepted (`coca_jax.load`, `--config.init.source`,
`caption --model`, `evaluate --workdir`, `index build --model`) it stands for the bundle it is
converted to once, under `$COCA_JAX_CACHE/bundles/<family>/<what>` (default
`~/.cache/coca_jax`). Downloading and converting live in `coca_jax/interop/pretrained.py`;
this module only knows names and paths, so every layer can tell a name from a path.

Weights on the Hugging Face hub go through `huggingface_hub`'s own cache (`HF_HUB_CACHE` /
`HF_HOME`); a file that is not on the hub (VLMo's GitHub releases) is read from
`$COCA_JAX_CACHE/downloads/<file>`, where the user puts it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os

CACHE_ENV = "COCA_JAX_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "coca_jax")
FAMILIES = ("open_clip", "vlmo")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
BERT_VOCAB = ("google-bert/bert-base-uncased", "vocab.txt")
VLMO_RELEASE = "https://github.com/wenhui0924/vlmo_ckpts/releases/download/vlmo/"


class UnknownPretrainedError(FileNotFoundError):
  """A `family:` name that is not registered (like a path that is not there); the message lists
  the registered ones."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One published checkpoint.

  name          `<family>:<what>`, as `coca_jax.load` takes it.
  architecture  the converter's model: an open_clip model-config name or JSON path
                (interop/open_clip.py MODEL_CONFIGS), or a VLMo architecture name or dict
                (interop/vlmo.py MODEL_CONFIGS).
  files         weight file names, preferred first: the first one the source has is used.
  repo_id       the Hugging Face hub repo holding `files`; "" when they are not on the hub.
  url           where the file is published when it is not on the hub (download it by hand).
  sha256        {file: hex digest} where the publisher gives one.
  tokenizer     a local tokenizer file ("" = the family's: open_clip's CLIP BPE merges,
                BERT's vocab.txt from `tokenizer_hub`).
  tokenizer_hub (repo, file) of the tokenizer on the hub, or ().
  about         one line for listings.
  """
  name: str
  architecture: str | dict
  files: tuple[str, ...]
  repo_id: str = ""
  url: str = ""
  sha256: dict = dataclasses.field(default_factory=dict)
  tokenizer: str = ""
  tokenizer_hub: tuple[str, ...] = ()
  about: str = ""

  @property
  def family(self) -> str:
    return self.name.split(":", 1)[0]


def _open_clip(arch: str, tag: str, repo: str, about: str) -> Checkpoint:
  # open_clip's pretrained.py lists these as `hf_hub='laion/<repo>/'` (its default file name)
  # and publishes no hash for them; the hub's own sha256 of each file is checked on download.
  return Checkpoint(f"open_clip:{arch}/{tag}", arch, OPEN_CLIP_FILES, repo_id=repo, about=about)


def _vlmo(file_stem: str, arch: str, about: str) -> Checkpoint:
  # The official README (microsoft/unilm vlmo/README.md) links GitHub release assets, not hub
  # repos, and gives no hashes.
  return Checkpoint(f"vlmo:{file_stem}", arch, (f"{file_stem}.pt",),
                    url=f"{VLMO_RELEASE}{file_stem}.pt", tokenizer_hub=BERT_VOCAB, about=about)


REGISTRY: dict[str, Checkpoint] = {c.name: c for c in (
    _open_clip("coca_ViT-B-32", "laion2b_s13b_b90k", "laion/CoCa-ViT-B-32-laion2B-s13B-b90k",
               "open_clip CoCa ViT-B/32, LAION-2B, 13B samples seen"),
    _open_clip("coca_ViT-B-32", "mscoco_finetuned_laion2b_s13b_b90k",
               "laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k",
               "the same, fine-tuned on MS-COCO captions"),
    _open_clip("coca_ViT-L-14", "laion2b_s13b_b90k", "laion/CoCa-ViT-L-14-laion2B-s13B-b90k",
               "open_clip CoCa ViT-L/14, LAION-2B, 13B samples seen"),
    _open_clip("coca_ViT-L-14", "mscoco_finetuned_laion2b_s13b_b90k",
               "laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k",
               "the same, fine-tuned on MS-COCO captions"),
    _vlmo("vlmo_base_patch16_224", "vlmo_base_patch16",
          "VLMo-Base (175M), pre-trained on COCO, VG, SBU and GCC at 224px"),
    _vlmo("vlmo_large_patch16_224", "vlmo_large_patch16",
          "VLMo-Large (562M), pre-trained on COCO, VG, SBU and GCC at 224px"),
)}


def register(checkpoint: Checkpoint) -> None:
  """Adds (or replaces) a name, e.g. a private mirror or a fine-tuned release."""
  if checkpoint.family not in FAMILIES:
    raise ValueError(f"{checkpoint.name!r}: the family before ':' must be one of {FAMILIES}")
  REGISTRY[checkpoint.name] = checkpoint


def list_pretrained() -> list[str]:
  """Every registered name, sorted."""
  return sorted(REGISTRY)


def _normalise(name: str) -> str:
  # open_clip accepts its tags in any case and with '-' for '_' (its `_clean_tag`).
  family, _, rest = name.partition(":")
  if family == "open_clip" and "/" in rest:
    arch, _, tag = rest.partition("/")
    return f"{family}:{arch}/{tag.lower().replace('-', '_')}"
  return name


def is_name(source) -> bool:
  """Whether `source` is meant as a registered name (`family:...`) rather than a path. An
  existing local path always wins."""
  source = os.fspath(source)
  family, colon, _ = source.partition(":")
  return bool(colon) and family in FAMILIES and not os.path.exists(source)


def lookup(name: str) -> Checkpoint:
  """The registered checkpoint `name`; UnknownPretrainedError listing the known ones."""
  found = REGISTRY.get(_normalise(name))
  if found is None:
    close = difflib.get_close_matches(name, list_pretrained(), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownPretrainedError(
        f"{name!r} is not a published checkpoint we know; {hint}known names: "
        + ", ".join(list_pretrained()) + ". A local path works too (a workdir, checkpoint or "
        "bundle)")
  return found


def cache_root() -> str:
  """$COCA_JAX_CACHE, or ~/.cache/coca_jax (absolute)."""
  return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


def bundle_dir(name: str) -> str:
  """Where the bundle converted from `name` lives (whether or not it exists yet)."""
  family, _, what = lookup(name).name.partition(":")
  return os.path.join(cache_root(), "bundles", family, *what.split("/"))


def downloads_dir() -> str:
  """Where files that are not on the hub are put by hand."""
  return os.path.join(cache_root(), "downloads")
