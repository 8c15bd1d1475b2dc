"""docs/config.md is generated from the config schema and must not drift from it."""

import pathlib

from coca_jax.core import config as config_lib
from coca_jax.core import config_doc

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
  # Comments written beside a default reach the page (config._defaults and CoCaConfig's).
  assert "0 = only at the end of training" in rows["evals.every_steps"]
  assert "LayerNorm on the encoder output" in rows["model.vision.final_norm"]
  assert "**required**" in rows["train.steps"]
