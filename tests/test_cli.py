"""Spec: every command a user types follows one convention. The installed `coca-*` scripts
(setup.py's console_scripts) and `python -m` of every CLI module print their help with -h /
--help and exit 0, listing their own flags (--config, --workdir); a usage mistake is one line
that names the fix, exit code 2, no traceback. Experiment files parse their `:args` one way."""

import json
import os
import re
import subprocess
import sys

import pytest

from coca_jax.core import runtime
from coca_jax.core.config_args import parse_arg
from conftest import REPO

BIN = os.path.dirname(sys.executable)  # `pip install -e .` puts the console scripts beside it.
# CLI module -> flags its --help must list.
MODULES = {
    "coca_jax.train": ("--config", "--workdir", "--dry_run"),
    "coca_jax.evaluate": ("--config", "--workdir", "--step"),
    "coca_jax.caption": ("--model", "--method"),
    "coca_jax.export": ("--workdir", "--out"),
    "coca_jax.sweep": ("--config", "--workdir", "--parallel"),
    "coca_jax.report": ("--workdir", "--out"),
    "coca_jax.bench": ("--config", "--mode"),
    "coca_jax.data.build": ("--format", "--src", "captions.jsonl", "captions.csv"),
    "coca_jax.data.tokenizer": ("train", "show"),
    "coca_jax.interop.open_clip": ("import", "export"),
    "coca_jax.interop.vlmo": ("import", "export"),
    "coca_jax.interop.beit": ("import",),
    "coca_jax.interop.pretrained": ("list", "fetch"),
    "coca_jax.index": ("--model", "--index", "--images"),
}


def _env():
  # This checkout's package, whichever checkout the venv's editable install points at.
  return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
              JAX_PLATFORMS="cpu")


def _run_all(commands: dict) -> dict:
  """{name: argv} -> {name: CompletedProcess}, all started at once (each pays its imports)."""
  procs = {name: subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, argv in commands.items()}
  done = {}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
  return done


def _console_scripts() -> dict[str, tuple[str, str]]:
  """{script: (the entry point setup.py names, as module:function; the CLI module it runs)}.
  The scripts that run JAX start in coca_jax.cli_entry, whose function `verb` runs
  coca_jax.<verb>."""
  text = open(os.path.join(REPO, "setup.py")).read()
  scripts = {}
  for script, module, function in re.findall(r'"(coca-[\w-]+)=([\w.]+):(\w+)"', text):
    cli_module = f"coca_jax.{function}" if module == "coca_jax.cli_entry" else module
    scripts[script] = (f"{module}:{function}", cli_module)
  return scripts


# Third-party libraries the CLI modules import: the process that forks each help run imports
# them once (a fresh Python pays ~3 s for jax alone on a slow CPU, 24 times over).
HEAVY_IMPORTS = ("numpy", "jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint",
                 "ml_collections", "absl.app", "absl.flags", "PIL.Image")


def _forked_runs(commands: dict) -> dict:
  """{name: ("module" | "script" | "entry", target, args)} -> {name: CompletedProcess} of
  `python -m target *args`, of the script file `target *args`, or of the console-script entry
  point `target` (module:function) called as its installed script calls it, each in a child
  forked from one process that imported HEAVY_IMPORTS once (this file run as a script)."""
  # mimalloc preloaded from the start, as the CLIs re-execute themselves to have it: a forked
  # child would otherwise re-execute this whole script.
  preload = os.environ.get("LD_PRELOAD", "")
  env = dict(_env(), LD_PRELOAD=runtime.mimalloc_library() + (":" + preload if preload else ""))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(commands)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  return {name: subprocess.CompletedProcess(commands[name], *results[name]) for name in commands}


def _serve_forked_runs(commands: dict) -> dict:
  """The forking side of `_forked_runs`: each child runs its module or script file as __main__
  with its own argv, its stdout and stderr going to files, and exits with its exit code."""
  import importlib
  import runpy
  import tempfile
  import traceback
  for name in HEAVY_IMPORTS:
    importlib.import_module(name)
  results = {}
  for name, (kind, target, args) in commands.items():
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
      pid = os.fork()
      if pid == 0:  # The child: never returns.
        code = 1
        try:
          os.dup2(out.fileno(), 1)
          os.dup2(err.fileno(), 2)
          sys.argv = [target, *args]
          if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
          elif kind == "entry":  # What pip's script does: sys.exit(function()).
            module, function = target.split(":")
            sys.exit(getattr(importlib.import_module(module), function)())
          else:
            runpy.run_path(target, run_name="__main__")
          code = 0
        except SystemExit as e:  # As the interpreter treats an uncaught SystemExit.
          if e.code is None or isinstance(e.code, int):
            code = e.code or 0
          else:
            print(e.code, file=sys.stderr)
        except BaseException:  # pylint: disable=broad-except
          traceback.print_exc()
        finally:
          sys.stdout.flush()
          sys.stderr.flush()
          os._exit(code)
      _, status = os.waitpid(pid, 0)
      out.seek(0)
      err.seek(0)
      results[name] = (os.waitstatus_to_exitcode(status), out.read().decode(),
                       err.read().decode())
  return results


def test_every_console_script_and_cli_module_shows_its_help():
  scripts = _console_scripts()
  assert len(scripts) >= 9 and {m for _, m in scripts.values()} <= set(MODULES), scripts
  missing = [s for s in scripts if not os.path.exists(os.path.join(BIN, s))]
  assert not missing, f"{missing} not installed in {BIN}: run `pip install -e .`"
  # The installed scripts' own code (pip writes `from module import run; sys.exit(run())`) and
  # every module's `python -m` path, run with --help / -h; one script also as its own process
  # (its #! line names this venv's python).
  # setup.py's entry points are called too, as the script pip writes from them calls them
  # (an installed script is only rewritten by the next `pip install -e .`).
  commands = {f"script {s}": ("script", os.path.join(BIN, s), ["--help"]) for s in scripts}
  commands.update({f"entry {s}": ("entry", e, ["--help"]) for s, (e, _) in scripts.items()})
  commands.update({f"-m {m}": ("module", m, ["-h"]) for m in MODULES})
  results = _forked_runs(commands)
  results["exec coca-train"] = _run_all({"": [os.path.join(BIN, "coca-train"), "--help"]})[""]
  assert len(results) == 2 * len(scripts) + len(MODULES) + 1
  for name, result in results.items():
    script = name.split()[1]
    module = scripts[script][1] if name.startswith(("script", "entry", "exec")) else script
    assert result.returncode == 0, (name, result.stderr[-2000:])
    for flag in MODULES[module]:
      assert flag in result.stdout, (name, flag, result.stdout[-3000:])
    assert "Traceback" not in result.stderr, (name, result.stderr[-2000:])


def test_console_scripts_import_no_cli_before_the_allocator_is_in_place():
  """An installed `coca-train` imports its entry point, then re-executes with mimalloc: the
  entry point's module must not import JAX or the CLI (seconds, paid twice otherwise)."""
  probe = ("import sys, coca_jax.cli_entry; "
           "print(sorted(m for m in sys.modules if m in ('jax', 'numpy') or m in "
           "('coca_jax.train', 'coca_jax.evaluate', 'coca_jax.caption', 'coca_jax.bench', "
           "'coca_jax.index')))")
  result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]", result.stdout


def test_usage_mistakes_are_one_line_naming_the_fix_exit_2(tmp_path):
  python = [sys.executable, "-m"]
  nowhere = str(tmp_path / "nowhere")
  cases = {
      # (argv, what the one line must say)
      "config field as a flag": (python + ["coca_jax.train", "--config", "experiments/demo.py",
                                           "--workdir", nowhere, "--steps", "100"],
                                 "--config.train.steps=100"),
      "config field with =": (python + ["coca_jax.sweep", "--config", "experiments/demo.py",
                                        "--workdir", nowhere, "--batch_size=8"],
                              "--config.train.batch_size=8"),
      "missing config file": (python + ["coca_jax.train", "--config", "experiments/nope.py",
                                        "--workdir", nowhere],
                              "--config experiments/nope.py: no such file"),
      "missing workdir": (python + ["coca_jax.evaluate", "--workdir", nowhere], nowhere),
      "missing flag": (python + ["coca_jax.export", "--src", nowhere], "missing --out"),
      "bad caption model": (python + ["coca_jax.caption", "--model", nowhere,
                                      os.path.join(REPO, "setup.py")], nowhere),
      "unknown published name": (python + ["coca_jax.caption", "--model",
                                           "open_clip:coca_ViT-B-32/laion2b",
                                           os.path.join(REPO, "setup.py")],
                                 "did you mean 'open_clip:coca_ViT-B-32/laion2b_s13b_b90k'"),
      "missing tokenizer input": (python + ["coca_jax.data.tokenizer", "train",
                                            "--captions_file", nowhere, "--output", nowhere],
                                  nowhere),
      "missing open_clip source": (python + ["coca_jax.interop.open_clip", "export", "--src",
                                             nowhere, "--out", nowhere + ".safetensors"],
                                   nowhere),
      "missing data source": (python + ["coca_jax.data.build", "--format", "folder", "--src",
                                        nowhere, "--name", "x", "--data_dir", nowhere],
                              "--src " + nowhere),
  }
  commands = {name: ("module", argv[2], argv[3:]) for name, (argv, _) in cases.items()}
  # The same mistake through the installed `coca-train`'s entry point.
  commands["coca-train entry"] = ("entry", "coca_jax.cli_entry:train",
                                  commands["config field as a flag"][2])
  results = _forked_runs(commands)
  for name, result in results.items():
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (name, result.stderr[-2000:])
    fix = cases[name if name in cases else "config field as a flag"][1]
    assert len(lines) == 1 and fix in lines[0], (name, result.stderr[-2000:])
    assert not os.path.exists(nowhere), name  # Nothing was created.


def test_parse_arg_types_args_from_their_defaults_and_names_unknown_ones():
  defaults = dict(batch=64, lr=1e-3, name="", runlocal=False, imagenet=None)
  args = parse_arg("batch=8,lr=3e-4,name=pets,runlocal", "experiments/x.py", **defaults)
  assert (args.batch, args.lr, args.name, args.runlocal, args.imagenet) == (
      8, 3e-4, "pets", True, None)
  assert isinstance(args.batch, int) and isinstance(args.lr, float)
  assert parse_arg("imagenet", **defaults).imagenet is True
  assert parse_arg("imagenet=/data", **defaults).imagenet == "/data"
  assert parse_arg("runlocal=false", **defaults).runlocal is False
  assert parse_arg("", **defaults).batch == 64
  for arg, message in (("batchsize=8", "experiments/x.py: unknown arg 'batchsize'; did you mean "
                        "'batch'? (known: batch, imagenet, lr, name, runlocal)"),
                       ("batch=eight", "batch='eight' is not an integer"),
                       ("batch", "arg 'batch' needs a value"),
                       ("runlocal=maybe", "is not a switch value")):
    with pytest.raises(ValueError, match=re.escape(message)):
      parse_arg(arg, "experiments/x.py", **defaults)


@pytest.mark.parametrize("spec,error", [
    ("coca_large.py:bach=8", "experiments/coca_large.py: unknown arg 'bach'; did you mean 'batch'"),
    ("vlmo_base.py:stage=txt", "stage='txt'; use one of"),
    ("mome_coca_base.py:steps=x", "experiments/mome_coca_base.py: steps='x' is not an integer"),
    ("openclip_coca.py:modl=x", "experiments/openclip_coca.py: unknown arg 'modl'"),
    ("demo.py:smoke,mini", "use one of the args 'mini' or 'smoke'"),
])
def test_experiment_files_report_bad_args_by_file_and_name(spec, error):
  from coca_jax.core import config as config_lib
  with pytest.raises(ValueError, match=re.escape(error)):
    config_lib.load_config(os.path.join(REPO, "experiments", spec))


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  print(json.dumps(_serve_forked_runs(json.loads(sys.argv[1]))))
