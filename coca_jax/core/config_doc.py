r"""Writes the config reference (docs/config.md) from the schema itself, so it cannot drift.

  python -m coca_jax.core.config_doc > docs/config.md

Every field comes from `config.defaults(backbone)` for both backbones; its note is the comment
written beside (or just above) the field where its default is declared: in `config._defaults`,
or for the fields declared in `schema` (model, train, loss, optim, and the captioning eval's
decoding) in their dataclass, else the field's `name: text` entry in that class's docstring. A
`Literal` field's note ends with its allowed values. tests/test_config_doc.py fails when the
committed page differs from this module's output.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing

from coca_jax.core import config as config_lib
from coca_jax.core import schema

BACKBONES = ("towers", "mome")

_GROUP_NOTES = {
    "model": "The architecture. `backbone` picks the family: `towers` (CoCa) or `mome` (VLMo-style "
             "modality experts); the two have different fields (docs/models.md).",
    "data": "The dataset (built by `python -m coca_jax.data.build`, docs/data.md) and tokenizer.",
    "train": "Steps, global batch, microbatches (exact accumulation), non-finite policy.",
    "loss": "Weights of the loss terms (docs/training.md).",
    "optim": "Optimizer and learning-rate schedule.",
    "mesh": "Device mesh sizes per axis (-1 = the rest); `dcn_<axis>` splits an axis across "
            "slices (docs/performance.md).",
    "checkpoint": "Orbax checkpoints in `DIR/checkpoints/<step>`.",
    "evals": "Periodic and final evaluations (docs/evaluation.md).",
    "init": "Warm start from another run, checkpoint or bundle (parameters only).",
    "profile": "A `jax.profiler` trace of a few steps into `DIR/profile`.",
}


def _source_comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
  """(trailing, block): the comment at the end of each code line, and the comment lines that
  stand directly above each code line, joined."""
  lines = source.splitlines()
  trailing, own_line = {}, {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      row, col = tok.start
      text = tok.string.lstrip("#").strip()
      (trailing if lines[row - 1][:col].strip() else own_line)[row] = text
  block = {}
  for row in range(1, len(lines) + 1):
    if row in own_line or not lines[row - 1].strip():
      continue
    above, r = [], row - 1
    while r in own_line:
      above.insert(0, own_line[r])
      r -= 1
    if above:
      block[row] = " ".join(above)
  return trailing, block


def _attach(starts: list[tuple[int, int, object]], trailing, block) -> dict:
  """Maps each key (given with its start line and column) to its comment: the trailing comment
  of its line if it is the last key starting there, else the block above if it is the first."""
  by_line: dict[int, list] = {}
  for line, col, key in starts:
    by_line.setdefault(line, []).append((col, key))
  notes = {}
  for line, keys in by_line.items():
    keys.sort(key=lambda k: k[0])
    if line in block:
      notes[keys[0][1]] = block[line]
    if line in trailing:
      last = keys[-1][1]
      notes[last] = (notes[last] + " " if last in notes else "") + trailing[line]
  return notes


def _schema_notes() -> tuple[dict, dict]:
  """Notes from the comments of `config._defaults`: ({path: note}, {group path: [base notes]}).
  A path is a tuple of keys. Local dicts (`common`, `eval_group`, ...) are followed to where the
  returned tree uses them, so a note lands on every field built from the commented line."""
  try:
    source = inspect.getsource(config_lib)
  except (OSError, TypeError):
    return {}, {}
  func = next((n for n in ast.walk(ast.parse(source))
               if isinstance(n, ast.FunctionDef) and n.name == "_defaults"), None)
  if func is None:
    return {}, {}
  starts, uses, assigned = [], {}, {}  # uses: variable -> paths it is placed at.

  def visit(node, path):
    if isinstance(node, ast.Name):
      uses.setdefault(node.id, []).append(path)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
      for arg in node.args:
        visit(arg, path)
      for kw in node.keywords:
        if kw.arg:
          starts.append((kw.lineno, kw.col_offset, path + (kw.arg,)))
          visit(kw.value, path + (kw.arg,))
        else:  # `**decoding`: its keys land in this dict.
          visit(kw.value, path)
    elif isinstance(node, ast.Dict):
      for k, v in zip(node.keys, node.values):
        if isinstance(k, ast.Constant) and isinstance(k.value, str):
          starts.append((k.lineno, k.col_offset, path + (k.value,)))
          visit(v, path + (k.value,))

  for stmt in ast.walk(func):
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(
        stmt.targets[0], ast.Name):
      assigned[stmt.lineno] = stmt.targets[0].id
      visit(stmt.value, ("*" + stmt.targets[0].id,))
    elif isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Subscript) and (
        isinstance(stmt.targets[0].value, ast.Name)
        and isinstance(stmt.targets[0].slice, ast.Constant)):  # `decoding["key"] = value`
      target = stmt.targets[0]
      starts.append((stmt.lineno, stmt.col_offset, ("*" + target.value.id, target.slice.value)))
    elif isinstance(stmt, ast.Return):
      visit(stmt.value, ())

  def concrete(path, seen=()):
    """The real paths of a path that starts at a local variable ("*name", ...)."""
    if not path or not path[0].startswith("*"):
      return [path]
    name = path[0][1:]
    if name in seen:
      return []
    return [c + path[1:] for use in uses.get(name, []) for c in concrete(use, seen + (name,))]

  trailing, block = _source_comments(source)
  raw = _attach(starts, trailing, {k: v for k, v in block.items() if k not in assigned})
  notes = {}
  for path, note in raw.items():
    for real in concrete(path):
      notes[real] = note
  bases = {}
  for line, name in assigned.items():  # A comment above `name = dict(...)` describes that dict.
    if line in block:
      for real in concrete(("*" + name,)):
        bases.setdefault(real, []).append(block[line])
  return notes, bases


# A docstring entry documenting fields: "name: text" or "a, b: text", continued by indented lines.
_DOC_ENTRY = re.compile(r"^(\w+(?:, \w+)*): (.*)")


def _docstring_notes(cls) -> dict[str, str]:
  """{field: text} of the `name: text` entries of `cls`'s own docstring."""
  notes, names = {}, []
  for line in inspect.cleandoc(vars(cls).get("__doc__") or "").splitlines():
    match = _DOC_ENTRY.match(line)
    if match:
      names = match[1].split(", ")
      notes.update(dict.fromkeys(names, match[2]))
    elif names and line.startswith(" "):
      for name in names:
        notes[name] += " " + line.strip()
    else:
      names = []
  return notes


@functools.lru_cache(maxsize=None)
def _class_notes(cls) -> dict[str, str]:
  """{field: note} of a schema dataclass: the comment beside or above the field in the class that
  declares it (a subclass's before its base's), else the field's entry in that class's docstring."""
  fields, notes = {f.name for f in dataclasses.fields(cls)}, {}
  for klass in cls.__mro__:
    if not dataclasses.is_dataclass(klass):
      continue
    try:
      source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
      continue
    body = ast.parse(source).body[0].body
    starts = [(n.lineno, n.col_offset, n.target.id) for n in body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    own = {**_docstring_notes(klass), **_attach(starts, *_source_comments(source))}
    for name, note in own.items():
      if name in fields:
        notes.setdefault(name, note)
  return notes


@functools.lru_cache(maxsize=None)
def _alias_notes() -> dict:
  """{Literal alias: note} from the comment beside or above each `Name = Literal[...]` of schema."""
  source = inspect.getsource(schema)
  starts = [(n.lineno, n.col_offset, n.targets[0].id) for n in ast.parse(source).body
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)]
  notes = _attach(starts, *_source_comments(source))
  return {getattr(schema, name): note for name, note in notes.items()
          if typing.get_origin(getattr(schema, name)) is typing.Literal}


def _schema_field(backbone: str, path: tuple):
  """(dataclass, field name) that declares a config path, or None. As in `config._defaults`:
  model, train, loss and optim are schema dataclasses, evals.captioning holds Decoding's and
  evals.probe is Probe."""
  roots = {"model": schema.MODELS[backbone], "train": schema.Train, "loss": schema.Loss,
           "optim": schema.Optim}
  if path[:2] == ("evals", "captioning"):
    cls, keys = schema.Decoding, path[2:]
  elif path[:2] == ("evals", "probe"):
    cls, keys = schema.Probe, path[2:]
  else:
    cls, keys = roots.get(path[0]), path[1:]
  for key in keys[:-1]:
    cls = typing.get_type_hints(cls).get(key) if cls else None
  if not (keys and dataclasses.is_dataclass(cls)
          and keys[-1] in {f.name for f in dataclasses.fields(cls)}):
    return None
  return cls, keys[-1]


def _schema_note(backbone: str, path: tuple) -> str:
  """The schema note of a config path ("" if it has none), with a Literal's allowed values."""
  found = _schema_field(backbone, path)
  if found is None:
    return ""
  cls, name = found
  kind = typing.get_type_hints(cls)[name]
  # A Literal field without a note of its own takes its alias's comment (what the names pick).
  parts = [_class_notes(cls).get(name) or _alias_notes().get(kind, "")]
  if typing.get_origin(kind) is typing.Literal:
    parts.append("Allowed: " + ", ".join(f"`{v}`" for v in schema.allowed(kind)) + ".")
  return " ".join(p for p in parts if p)


def _format(value) -> str:
  if value is config_lib.REQUIRED:
    return "**required**"
  text = repr(tuple(value) if isinstance(value, tuple) else value)
  return "`" + text.replace("|", "\\|") + "`"


def _leaves(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_leaves(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _groups(tree: dict, prefix: tuple = ()) -> list[tuple]:
  out = []
  for key, value in tree.items():
    if isinstance(value, dict):
      out.append(prefix + (key,))
      out.extend(_groups(value, prefix + (key,)))
  return out


def render() -> str:
  """The markdown page: a table per top-level group, one row per field."""
  trees = {b: config_lib.defaults(b) for b in BACKBONES}
  leaves = {b: _leaves(trees[b]) for b in BACKBONES}
  notes, bases = _schema_notes()

  def schema_note(path):
    # Each backbone's own dataclass; where both have the field, a note says whose it is.
    own = {b: _schema_note(b, path) if path in leaves[b] or path in groups[b] else ""
           for b in BACKBONES}
    if own["towers"] == own["mome"]:
      return own["towers"]
    both = all(path in leaves[b] or path in groups[b] for b in BACKBONES)
    return " ".join(f"{b}: {n}" if both else n for b, n in own.items() if n)

  def note_of(path):
    return " ".join(n for n in (schema_note(path), notes.get(path, "")) if n).replace("|", "\\|")

  groups = {b: _groups(trees[b]) for b in BACKBONES}
  group_notes = {}
  for backbone in BACKBONES:
    for group in groups[backbone]:
      parts = [notes.get(group, ""), schema_note(group)] + bases.get(group, [])
      text = " ".join(p for p in parts if p)
      if text:
        group_notes.setdefault(group, text.replace("|", "\\|"))

  out = ["# Config reference", "",
         "<!-- Generated by `python -m coca_jax.core.config_doc > docs/config.md`; do not edit. -->",
         "",
         "Every field of an experiment config and its default. An experiment file "
         "(`experiments/*.py`, `get_config(arg)`) sets what differs; every CLI takes "
         "`--config FILE.py[:args]` and overrides any field with `--config.group.field=value` "
         "(a list as a quoted Python literal: `--config.evals.zeroshot.class_names=\"['cat', "
         "'dog']\"`). **required** fields have no default. Unknown keys are refused with the "
         "closest known one, and `validate` checks fields that must agree (image sizes, "
         "vocabulary vs tokenizer, batch vs devices and microbatches) before anything is built.",
         "",
         "The `model` group differs by `model.backbone`: a field with a dash in one column does "
         "not exist for that backbone.", ""]
  order = list(trees["towers"]) + [g for g in trees["mome"] if g not in trees["towers"]]
  for group in order:
    out += [f"## `{group}`", ""]
    if group in _GROUP_NOTES:
      out += [_GROUP_NOTES[group], ""]
    paths = [p for p in leaves["towers"] if p[0] == group]
    paths += [p for p in leaves["mome"] if p[0] == group and p not in leaves["towers"]]
    split = any(leaves["towers"].get(p, KeyError) != leaves["mome"].get(p, KeyError)
                for p in paths)
    if split:
      out += ["| field | default (towers) | default (mome) | note |", "|---|---|---|---|"]
    else:
      out += ["| field | default | note |", "|---|---|---|"]
    shown_groups = set()
    for path in paths:
      for depth in range(2, len(path)):
        sub = path[:depth]
        if sub not in shown_groups and sub in group_notes:
          shown_groups.add(sub)
          blank = "| | " if split else "| "
          out.append(f"| `{'.'.join(sub)}.*` {blank}| {group_notes[sub]} |")
      cells = [f"`{'.'.join(path)}`"]
      for backbone in (BACKBONES if split else BACKBONES[:1]):
        value = leaves[backbone].get(path, KeyError)
        cells.append("-" if value is KeyError else _format(value))
      out.append("| " + " | ".join(cells + [note_of(path)]) + " |")
    out.append("")
  return "\n".join(out)


def main() -> None:
  sys.stdout.write(render())


if __name__ == "__main__":
  main()
