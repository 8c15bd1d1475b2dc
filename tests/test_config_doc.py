"""docs/config.md is generated from the config schema and must not drift from it."""

import dataclasses
import inspect
import pathlib
import re
import typing

from coca_jax.core import config as config_lib
from coca_jax.core import config_doc
from coca_jax.core import schema

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_committed_config_reference_equals_the_generators_output():
  assert PAGE.read_text() == config_doc.render(), (
      "docs/config.md is stale: regenerate it with "
      "`python -m coca_jax.core.config_doc > docs/config.md`")


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def test_every_field_of_both_backbones_has_a_row_with_its_schema_comment():
  page = config_doc.render()
  rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines()
          if line.startswith("| `")}
  for backbone in config_doc.BACKBONES:
    for field in _leaves(config_lib.defaults(backbone)):
      assert field in rows, f"{field} ({backbone}) is missing from the config reference"
  # Comments written beside a default reach the page (config._defaults and schema's).
  assert "0 = only at the end of training" in rows["evals.every_steps"]
  assert "LayerNorm on the encoder output" in rows["model.vision.final_norm"]
  assert "**required**" in rows["train.steps"]


def _documented(cls) -> set[str]:
  """The fields of a schema dataclass (or its bases) with a comment on or just above their line,
  or a `name: text` / `a, b: text` line in the docstring of the class that declares them."""
  found = set()
  for klass in cls.__mro__[:-1]:
    lines = inspect.getsource(klass).splitlines()
    for name in vars(klass).get("__annotations__", {}):
      row = next(i for i, line in enumerate(lines) if re.match(rf"\s+{name}:", line))
      doc = re.search(rf"^\s*(\w+, )*{name}(, \w+)*: ", klass.__doc__ or "", re.M)
      if "#" in lines[row] or lines[row - 1].strip().startswith("#") or doc:
        found.add(name)
  return found


def _schema_paths(cls, prefix):
  """(config path, dataclass, field) of every leaf field under a schema dataclass."""
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[field.name]):
      yield from _schema_paths(hints[field.name], f"{prefix}{field.name}.")
    else:
      yield f"{prefix}{field.name}", cls, field.name


def test_every_schema_field_with_a_comment_or_docstring_line_has_a_note():
  """Notes of the fields declared in core/schema.py (model, train, loss, optim, and the
  captioning eval's decoding), and the allowed values of every Literal field."""
  page = config_doc.render()
  notes = {line.split("|")[1].strip().strip("`"): line[:-2].rsplit(" | ", 1)[1]
           for line in page.splitlines() if line.startswith("| `")}
  roots = [("train.", schema.Train), ("loss.", schema.Loss), ("optim.", schema.Optim),
           ("evals.captioning.", schema.Decoding)]
  roots += [("model.", schema.MODELS[b]) for b in config_doc.BACKBONES]
  checked = 0
  for prefix, root in roots:
    for path, cls, name in _schema_paths(root, prefix):
      kind = typing.get_type_hints(cls)[name]
      if typing.get_origin(kind) is typing.Literal:
        for value in schema.allowed(kind):
          assert f"`{value}`" in notes[path], f"{path}: allowed value {value!r} not listed"
      if name in _documented(cls):
        checked += 1
        assert notes[path], f"{path} ({cls.__name__}.{name}) is documented but has no note"
  assert checked > 50  # Routing's docstring alone documents 7 fields in 5 places.
  # Docstring entries, nested groups and a MoME-only path reach their rows.
  assert "(i + 1) % every == 0" in notes["model.mome.experts.image.every"]
  assert "experts each token runs through" in notes["model.vision.experts.top_k"]
  assert "beam search" in notes["evals.captioning.num_beams"]
  assert "Switch Transformer" in notes["loss.router_balance_weight"]
  # Where the backbones differ, each says its own.
  assert "towers: " in notes["model.pooling"] and "`cascade`" in notes["model.pooling"]
  assert "`cls`" in notes["model.pooling"]
