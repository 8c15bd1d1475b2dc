"""Class names and prompt templates of a zero-shot eval (config.evals.zeroshot).

Class names, in label order, come from the first of:
  class_names_file   a text file, one name per line (blank lines and surrounding spaces are
                     ignored), or "open_clip:imagenet": the curated ImageNet-1k names of an
                     installed open_clip_torch, read from its files at run time;
  class_names        a list in the config;
  the dataset        the label feature's ClassLabel names (e.g. cifar10's "airplane", ...).
Prompt templates (each with one "{}" for the name) come from `templates_file` (one per line, or
"open_clip:imagenet": open_clip's 80 ImageNet prompts, "open_clip:imagenet_simple": its short
subset of them), else `templates`. A file replaces the config's list, so a run's saved lists
(the demo's digit names) give way to the file an eval names without being emptied first.

Some catalog datasets label their classes with ids no prompt can use: imagenet2012's ClassLabel
names are WordNet synset ids ("n01440764"). `wordnet_ids` detects them so the eval can ask for
readable names instead of prompting "a photo of a n01440764.".
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Sequence

from coca_jax.core import fs
from coca_jax.data import clip_bpe

OPEN_CLIP_PREFIX = "open_clip:"
# open_clip's module holding its ImageNet names and prompts (plain Python, no torch import).
_OPEN_CLIP_METADATA = "zero_shot_metadata.py"
OPEN_CLIP_NAMES = {"imagenet": "IMAGENET_CLASSNAMES"}
OPEN_CLIP_TEMPLATES = {"imagenet": "OPENAI_IMAGENET_TEMPLATES",
                       "imagenet_simple": "SIMPLE_IMAGENET_TEMPLATES"}
_WORDNET_ID = re.compile(r"^n\d{8}$")


class PromptError(ValueError):
  """Class names or templates cannot be read; the message names the field and the fix."""


def wordnet_ids(names: Sequence[str]) -> bool:
  """Whether the names are WordNet synset ids (n01440764, ...), as imagenet2012 stores them."""
  return bool(names) and all(_WORDNET_ID.match(str(n)) for n in names)


def read_lines(path: str, field: str) -> list[str]:
  """The non-blank lines of `path`, stripped. `field` names the config field in errors."""
  if not fs.exists(path):
    raise PromptError(f"config.evals.zeroshot.{field}={path!r} does not exist; give a text file "
                      "with one entry per line")
  return [line.strip() for line in fs.read_text(path).splitlines() if line.strip()]


def _open_clip_metadata(field: str, spec: str):
  """open_clip's zero_shot_metadata module, loaded from the installed package's file alone
  (its package __init__ imports torch; this file imports nothing)."""
  path = clip_bpe.installed_open_clip_file(_OPEN_CLIP_METADATA)
  if path is None:
    raise PromptError(f"config.evals.zeroshot.{field}={spec!r} reads open_clip's lists from an "
                      "installed open_clip_torch, which this environment lacks: `pip install --no-deps "
                      "open_clip_torch` (its files are read; torch is never imported), or give a "
                      "file instead")
  module_spec = importlib.util.spec_from_file_location("_open_clip_zero_shot_metadata", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def _from_open_clip(field: str, spec: str, table: dict[str, str]):
  key = spec[len(OPEN_CLIP_PREFIX):]
  if key not in table:
    raise PromptError(f"config.evals.zeroshot.{field}={spec!r} is unknown; use one of "
                      f"{', '.join(OPEN_CLIP_PREFIX + k for k in table)}")
  module = _open_clip_metadata(field, spec)
  if not hasattr(module, table[key]):
    raise PromptError(f"config.evals.zeroshot.{field}={spec!r}: the installed open_clip has "
                      f"no {table[key]} in {_OPEN_CLIP_METADATA}")
  return list(getattr(module, table[key]))


def class_names(group, dataset_names: Sequence[str] | None, dataset: str) -> list[str]:
  """The class names of zero-shot `group` in label order (see the module docstring).

  Args:
    group: config.evals.zeroshot.
    dataset_names: the label feature's ClassLabel names, or None when it has none.
    dataset: the dataset's name, for messages.
  Raises:
    PromptError: nothing names the classes, a file is missing, or the dataset's own names are
      WordNet ids.
  """
  spec = group.class_names_file
  if spec.startswith(OPEN_CLIP_PREFIX):
    return [str(n) for n in _from_open_clip("class_names_file", spec, OPEN_CLIP_NAMES)]
  if spec:
    return read_lines(os.path.expanduser(spec), "class_names_file")
  if list(group.class_names):
    return [str(n) for n in group.class_names]
  if dataset_names is None:
    raise PromptError(
        f"config.evals.zeroshot: the label of {dataset!r} has no class names (it is not a "
        "ClassLabel); give config.evals.zeroshot.class_names (in label order) or "
        "class_names_file (one name per line)")
  if wordnet_ids(dataset_names):
    raise PromptError(
        f"config.evals.zeroshot: the class names of {dataset!r} are WordNet ids "
        f"({', '.join(list(dataset_names)[:2])}, ...), not words a prompt can use; give "
        "config.evals.zeroshot.class_names_file=FILE (one readable name per line, in label "
        "order), or class_names_file='open_clip:imagenet' for ImageNet-1k (open_clip's curated "
        "names, read from an installed open_clip_torch)")
  return [str(n) for n in dataset_names]


def templates(group) -> list[str]:
  """The prompt templates of zero-shot `group`: `templates_file`, else `templates`."""
  spec = group.templates_file
  if spec.startswith(OPEN_CLIP_PREFIX):
    # open_clip writes each template as a function of the class name: ask it for "{}".
    return [t("{}") if callable(t) else str(t)
            for t in _from_open_clip("templates_file", spec, OPEN_CLIP_TEMPLATES)]
  if spec:
    return read_lines(os.path.expanduser(spec), "templates_file")
  return [str(t) for t in group.templates]
