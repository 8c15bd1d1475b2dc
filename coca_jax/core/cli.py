"""One command-line convention for the absl CLIs (train, evaluate, caption, export, sweep, report,
bench), whether started as `python -m coca_jax.X` or as the installed `coca-X` script:

- `-h` and `--help` print the module's docstring and its own flags (`--config` and `--workdir`
  included), and exit 0; `--helpfull` lists every flag of every module as absl does.
- A usage mistake is one line naming the fix, exit code 2, no traceback: an unknown flag (one
  that names a config field, e.g. `--steps 100`, points to `--config.train.steps=100`), a bad
  flag value, a missing required flag, a --config file that does not exist, or a path given to
  the command that does not exist.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys

from absl import app, flags

from coca_jax.core import config as config_lib

USAGE_EXIT_CODE = 2
HELP = ("-h", "--help", "-help", "--helpshort", "-helpshort", "-?")


def calling_module_name(depth: int = 2) -> str:
  """The name absl files the flags of the module `depth` frames up under: its sys.argv[0] when
  it runs as __main__ (python -m), else its import name (a console script imports it)."""
  name = sys._getframe(depth).f_globals.get("__name__", "")  # pylint: disable=protected-access
  return sys.argv[0] if name == "__main__" else name


_program = [os.path.basename(sys.argv[0]) if sys.argv else "coca_jax"]


def fail(message: str) -> None:
  """Prints `message` as one usage error line and exits with USAGE_EXIT_CODE."""
  print(f"{_program[0]}: error: {message}", file=sys.stderr)
  sys.exit(USAGE_EXIT_CODE)


def _flag_part(argv: list[str]) -> list[str]:
  return argv[:argv.index("--")] if "--" in argv else argv


def config_field_hint(name: str, value: str | None = None) -> str:
  """'; did you mean --config.train.steps=100?' when `name` is a field of the config schema (the
  train group first); empty otherwise."""
  matches = []
  for backbone in ("towers", "mome"):
    stack = [("", config_lib.defaults(backbone))]
    while stack:
      prefix, group = stack.pop()
      for key, default in group.items():
        if isinstance(default, dict):
          stack.append((f"{prefix}{key}.", default))
        elif key == name and f"{prefix}{key}" not in matches:
          matches.append(f"{prefix}{key}")
  if not matches:
    return ""
  matches.sort(key=lambda path: (not path.startswith("train."), path.count("."), path))
  shown = f"--config.{matches[0]}={value if value is not None else 'VALUE'}"
  others = f" (or {', '.join('--config.' + m for m in matches[1:])})" if len(matches) > 1 else ""
  return f"; config fields are set with --config.GROUP.FIELD: did you mean {shown}{others}?"


def _unknown_flag_message(error: flags.UnrecognizedFlagError, argv: list[str]) -> str:
  name = error.flagname
  value = None
  for i, arg in enumerate(argv):
    if arg.lstrip("-").partition("=")[0] == name and arg.startswith("-"):
      if "=" in arg:
        value = arg.partition("=")[2]
      elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
        value = argv[i + 1]
      break
  hint = config_field_hint(name, value)
  if not hint:
    close = [f"--{c}" for c in difflib.get_close_matches(name, list(flags.FLAGS), n=1)]
    hint = f"; did you mean {' or '.join(close)}?" if close else " (see --help)"
  return f"unknown flag --{name}{hint}"


def print_help(module_name: str, doc: str | None) -> None:
  """The command's docstring and its own flags (those it defines and its key flags)."""
  if doc:
    print(doc.rstrip() + "\n")
  text = flags.FLAGS.module_help(module_name)
  lines = text.strip("\n").splitlines()
  if lines and lines[0].rstrip().endswith(":"):  # absl's "<module path>:" heading.
    lines = lines[1:]
  print("flags:\n" + "\n".join(lines))
  print("\n-h/--help: this text; --helpfull: the flags of every module (absl, JAX, ...).")


@contextlib.contextmanager
def usage_errors(prog: str | None = None, also: tuple[type[Exception], ...] = ()):
  """Turns a missing file (and the exception types in `also`, whose messages name their fix)
  into a one-line usage error (exit 2) instead of a traceback. `prog`: the command's name in
  that line (argparse CLIs pass parser.prog)."""
  if prog:
    _program[0] = prog
  try:
    yield
  except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
    fail(str(e) if not e.filename or str(e.filename) in str(e.args[-1]) else
         f"{e.filename}: {e.strerror}")
  except also as e:  # pylint: disable=catching-non-exception
    fail(str(e))


def run(main, *, required: tuple[str, ...] = (), define=None) -> None:
  """`app.run(main)` with the convention above. `define(argv)`, if given, defines the flags
  that depend on the command line first (evaluate's --config); `required` flags must be given.
  Call it from the CLI module (its flags and docstring are found from the caller)."""
  caller = sys._getframe(1).f_globals  # pylint: disable=protected-access
  module_name, doc = calling_module_name(2), caller.get("__doc__")
  spec = caller.get("__spec__")
  if caller.get("__name__") == "__main__" and spec is not None:
    _program[0] = f"python -m {spec.name}"
  argv = list(sys.argv)
  if any(arg in HELP for arg in _flag_part(argv[1:])):
    if define is not None:
      with usage_errors():
        define([argv[0]])  # The flags as for a bare command: nothing read from disk.
    print_help(module_name, doc)
    sys.exit(0)
  if define is not None:
    with usage_errors():
      try:
        define(argv)
      except config_lib.ConfigError as e:
        fail(str(e))
  if required:
    flags.mark_flags_as_required(list(required))

  def parse(args):
    try:
      return flags.FLAGS(args)
    except flags.UnrecognizedFlagError as e:
      fail(_unknown_flag_message(e, _flag_part(args)))
    except flags.Error as e:
      message = str(e)
      if "must have a value other than None" in message:
        missing = sorted({name for name in required if flags.FLAGS[name].value is None})
        if missing:
          message = f"missing {', '.join('--' + n for n in missing)} (see --help)"
      fail(message)
    except FileNotFoundError as e:  # --config FILE that is not there (config.load_config).
      fail(str(e))

  def guarded_main(args):
    with usage_errors():
      try:
        return main(args)
      except app.UsageError as e:
        fail(str(e))

  app.run(guarded_main, argv=argv, flags_parser=parse)


def conversion_parser(prog: str, description: str, *, imports: str, src_help: str,
                      exports: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
  """The command line every checkpoint converter (`coca_jax.interop.*`) shares: `import` (a
  foreign checkpoint -> a coca_jax bundle: --src, --out, --dtype) and `export` (a coca_jax
  model -> a foreign .safetensors: --src, --out, --step). Returns (the parser, the `import`
  subparser) so the converter adds what its format needs (--model, a vocabulary)."""
  parser = argparse.ArgumentParser(prog=prog, description=description)
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help=imports)
  imp.add_argument("--src", required=True, help=src_help)
  imp.add_argument("--out", required=True, help="bundle directory to create")
  imp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  exp = commands.add_parser("export", help=exports)
  exp.add_argument("--src", required=True, help="workdir, checkpoints/<step> or bundle")
  exp.add_argument("--out", required=True, help="FILE.safetensors to write")
  exp.add_argument("--step", type=int, default=None)
  return parser, imp


def run_conversion(parser: argparse.ArgumentParser, argv, *, import_bundle, export_state_dict,
                   errors: tuple[type[Exception], ...] = ()) -> None:
  """Runs a `conversion_parser` command line: `import_bundle(args)` or
  `export_state_dict(src, out, step)`, printing what it returns (the path written); a bad path
  or one of `errors` is a one-line usage error (exit 2)."""
  args = parser.parse_args(argv)
  with usage_errors(parser.prog, also=errors):
    if args.command == "import":
      print(import_bundle(args))
    else:
      print(export_state_dict(args.src, args.out, args.step))
