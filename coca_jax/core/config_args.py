"""The `:args` of `--config experiments/FILE.py:args`, parsed one way for every experiment file.

  def get_config(arg: str = ""):
    args = parse_arg(arg, "experiments/coca_base.py", batch=65_536, dtype="bfloat16",
                     runlocal=False, imagenet=None)
    # "batch=4096,runlocal" -> args.batch == 4096 (an int), args.runlocal is True.

Each keyword names an arg and its default; the default's type is the arg's type: `name=VALUE`
is converted to it (int, float, str), a bool arg is switched on by its bare name (`runlocal`) or
set with `name=true|false`. A default of None takes a string, or True when the name is given
bare (`imagenet` vs `imagenet=DIR`). An unknown name, a missing or unconvertible value fails with
a ValueError naming the file, the arg and the known args (what `--config` reports).
"""

from __future__ import annotations

import difflib

import ml_collections

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _convert(where: str, key: str, value: str | None, default):
  if isinstance(default, bool):
    if value is None or value.lower() in _TRUE:
      return True
    if value.lower() in _FALSE:
      return False
    raise ValueError(f"{where}: {key}={value!r} is not a switch value; write `{key}` to turn it "
                     f"on or {key}=false")
  if default is None:
    return True if value is None else value
  if value is None:
    raise ValueError(f"{where}: arg {key!r} needs a value, e.g. {key}={default!r}")
  try:
    return type(default)(float(value)) if isinstance(default, int) and "e" in value.lower() \
        else type(default)(value)
  except ValueError:
    kind = {"int": "an integer", "float": "a number"}.get(type(default).__name__, "valid")
    raise ValueError(f"{where}: {key}={value!r} is not {kind} (default {default!r})") from None


def parse_arg(arg: str, where: str = "config", **defaults) -> ml_collections.ConfigDict:
  """`arg` ("k=v,flag,...") over `defaults` (see the module docstring): a ConfigDict holding
  every known arg, typed. `where` names the experiment file in error messages."""
  args = dict(defaults)
  for item in filter(None, (part.strip() for part in (arg or "").split(","))):
    key, eq, value = item.partition("=")
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"{where}: unknown arg {key!r}{hint} (known: "
                       f"{', '.join(sorted(defaults))})")
    args[key] = _convert(where, key, value if eq else None, defaults[key])
  return ml_collections.ConfigDict(args)


def given(arg: str) -> set[str]:
  """The names set in `arg`: lets a recipe tell a default from the same value given."""
  return {item.partition("=")[0].strip() for item in (arg or "").split(",") if item.strip()}
