r"""Writes the config reference (docs/config.md) from the schema itself, so it cannot drift.

  python -m coca_jax.core.config_doc > docs/config.md

Every field comes from `config.defaults(backbone)` for both backbones; its note is the comment
written beside (or just above) the field where its default is declared: in `config._defaults`,
or for model and decoding fields in the dataclass that holds the default. tests/test_config_doc.py
fails when the committed page differs from this module's output.
"""

from __future__ import annotations

import ast
import inspect
import io
import pathlib
import sys
import textwrap
import tokenize

from coca_jax.core import config as config_lib

BACKBONES = ("towers", "mome")

# Dataclasses whose fields carry the model and decoding defaults (config._defaults reads them),
# as (file under coca_jax/, class). Their source is parsed, not imported (core imports nothing
# above it), and a class that moved only loses its notes: the page still renders.
_FIELD_CLASSES = (("models/coca.py", "CoCaConfig"), ("models/mome.py", "MoMEConfig"),
                  ("models/experts.py", "RoutedExperts"), ("inference/generate.py", "Decoding"))
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]

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


def _field_notes() -> dict[str, dict[str, str]]:
  """{class name: {field: note}} from the comments beside the fields of `_FIELD_CLASSES`."""
  found = {}
  for file_name, class_name in _FIELD_CLASSES:
    try:
      module_source = (_PACKAGE_DIR / file_name).read_text()
    except OSError:
      continue
    node = next((n for n in ast.walk(ast.parse(module_source))
                 if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if node is None:
      continue
    source = textwrap.dedent(ast.get_source_segment(module_source, node, padded=True))
    tree = ast.parse(source)
    starts = [(n.lineno, n.col_offset, n.target.id) for n in ast.walk(tree)
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    trailing, block = _source_comments(source)
    found[class_name] = _attach(starts, trailing, block)
  return found


def _model_note(fields: dict, path: tuple, cls: str) -> str:
  """The dataclass comment of a model or decoding field (`model.vision.final_norm` is
  CoCaConfig's `vision_final_norm`; `...experts.top_k` is RoutedExperts' `top_k`)."""
  leaf = path[-1]
  if path[0] == "evals":
    return fields.get("Decoding", {}).get(leaf, "") if path[1] == "captioning" else ""
  if "experts" in path[:-1]:
    return fields.get("RoutedExperts", {}).get(leaf, "")
  names = [f"{path[-2]}_{leaf}", leaf] if len(path) > 2 else [leaf]
  return next((fields.get(cls, {})[n] for n in names if n in fields.get(cls, {})), "")


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
  fields = _field_notes()

  def note_of(path):
    text = notes.get(path, "")
    if not text and path[0] in ("model", "evals"):
      # Each backbone's own dataclass; where both have the field, a note says whose it is.
      own = {b: _model_note(fields, path, cls) if path in leaves[b] else ""
             for b, cls in zip(BACKBONES, ("CoCaConfig", "MoMEConfig"))}
      both = all(path in leaves[b] for b in BACKBONES)
      if own["towers"] == own["mome"]:
        text = own["towers"]
      else:
        text = " ".join(f"{b}: {n}" if both else n for b, n in own.items() if n)
    return text.replace("|", "\\|")

  group_notes = {}
  for backbone in BACKBONES:
    for group in _groups(trees[backbone]):
      parts = [notes.get(group, "")] + bases.get(group, [])
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
