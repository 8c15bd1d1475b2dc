"""The package's layering, read from the source (ast): who may import whom.

  core         imports nothing of ours (config schema, errors, constants, fs, sharding).
  models       imports only core (models/kernels is part of models).
  data         never imports models, training, inference or evaluation.
  entry points (the CLIs at the top: train, evaluate, ...) are imported by no library module;
               one CLI may import another (sweep runs report).
and no module imports one of ours inside a function, except an optional heavy dependency whose
import line says so: `# heavy: <why>`. A hidden function-level import is how a cycle creeps back.
"""

import ast
import os

from conftest import REPO

PACKAGE = "coca_jax"
ENTRY_POINTS = {"train", "evaluate", "caption", "export", "sweep", "report", "bench",
                "index", "cli_entry"}
DATA_MAY_NOT_IMPORT = ("models", "training", "inference", "evaluation")


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module of the package."""
  found = {}
  root = os.path.join(REPO, PACKAGE)
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, REPO)[:-len(".py")].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        found[".".join(parts)] = path
  return found


def _imports(module: str, path: str) -> list[tuple[str, int, bool, str]]:
  """(imported module of ours, line, inside a function, the source line) of every import."""
  with open(path) as f:
    source = f.read()
  lines = source.splitlines()
  tree = ast.parse(source)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.Lambda))
      names = []
      if isinstance(child, ast.Import):
        names = [alias.name for alias in child.names]
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:  # Relative: resolve against this module's package.
          anchor = package.split(".")[:len(package.split(".")) - (child.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        # `from coca_jax.x import y`: y is a module or a name in x; either way its layer is x's.
        names = [f"{base}.{alias.name}" for alias in child.names]
      for name in names:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
          found.append((name, child.lineno, in_function, lines[child.lineno - 1]))
      visit(child, inside)

  visit(tree, False)
  return found


def _layer(dotted: str) -> str:
  """The layer of a module of ours or a name in it: coca_jax.<layer>...; '' for the package."""
  parts = dotted.split(".")
  return parts[1] if len(parts) > 1 else ""


def violations(modules: dict, repo: str = REPO) -> list[str]:
  """Every import of `modules` ({dotted name: path}) that breaks a rule, with its fix."""
  problems = []
  for module, path in sorted(modules.items()):
    layer = _layer(module)
    for name, line, in_function, text in _imports(module, path):
      where = f"{os.path.relpath(path, repo)}:{line} imports {name}"
      target = _layer(name)
      if in_function and "# heavy:" not in text:
        problems.append(f"{where} inside a function; import it at the top (fix the cycle), or "
                        "mark an optional heavy dependency with '# heavy: <why>'")
      if layer == "core" and target != "core":
        problems.append(f"{where}: core imports nothing of ours")
      if layer == "models" and target not in ("models", "core"):
        problems.append(f"{where}: models import only core")
      if layer == "data" and target in DATA_MAY_NOT_IMPORT:
        problems.append(f"{where}: data never imports {', '.join(DATA_MAY_NOT_IMPORT)}")
      if target in ENTRY_POINTS and layer not in ENTRY_POINTS:
        problems.append(f"{where}: an entry point; library code must not import the CLIs")
  return problems


def test_the_package_keeps_its_layers():
  problems = violations(_modules())
  assert not problems, f"{len(problems)} layering problem(s):\n  " + "\n  ".join(problems)


def test_the_check_catches_each_kind_of_violation(tmp_path):
  """The rules above are live: a module breaking each one is reported, a marked heavy import is
  not."""
  fake = {
      "core/bad.py": "from coca_jax.models import coca\n",
      "models/bad.py": "from coca_jax.training import losses\n",
      "data/bad.py": "import coca_jax.inference.api\n",
      "evaluation/bad.py": "from coca_jax import train\n",
      "training/bad.py": ("def f():\n  from coca_jax.core import fs\n"
                          "def g():\n  from coca_jax.data import builders  # heavy: TFDS\n"),
  }
  modules = {}
  for rel, source in fake.items():
    path = tmp_path / PACKAGE / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    modules[f"{PACKAGE}.{rel[:-3].replace('/', '.')}"] = str(path)
  text = "\n".join(violations(modules, str(tmp_path)))
  assert "core/bad.py:1 imports coca_jax.models.coca: core imports nothing of ours" in text
  assert "models/bad.py:1 imports coca_jax.training.losses: models import only core" in text
  assert "data/bad.py:1 imports coca_jax.inference.api: data never imports" in text
  assert "evaluation/bad.py:1 imports coca_jax.train: an entry point" in text
  assert "training/bad.py:2 imports coca_jax.core.fs inside a function" in text
  assert "training/bad.py:4" not in text  # Marked heavy: allowed.
