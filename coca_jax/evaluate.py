r"""Runs the configured evaluations of a trained model and writes the results as JSON.

  python -m coca_jax.evaluate --workdir DIR [--step N] [--out results.json] \
      [--config.evals.captioning.enabled=True --config.evals.captioning.method=beam ...]
  python -m coca_jax.evaluate --workdir DIR --config experiments/demo.py [--config.evals...]

Without --config the run's own DIR/config.json is used (its data paths, model and `evals`), and
`--config.<field>=value` overrides any field of it. With --config FILE[:args] the evals and data
settings come from that file; the model always comes from the checkpoint's config.json.
--workdir may also be a checkpoint step directory, an export bundle or a published name
(`python -m coca_jax.interop.pretrained list`; downloaded and converted once). Any eval may read
a TFDS catalog dataset prepared as array_record, e.g. ImageNet zero-shot (docs/evaluation.md,
"Zero-shot on ImageNet / other TFDS datasets"):

  python -m coca_jax.evaluate --workdir DIR --config.evals.zeroshot.dataset=imagenet2012 \
      --config.evals.zeroshot.split=validation --config.evals.zeroshot.data_dir=~/tensorflow_datasets \
      --config.evals.zeroshot.class_names_file=open_clip:imagenet ...

List fields take a quoted Python list: --config.evals.zeroshot.transfer_splits='[]' empties the
demo's transfer splits, --config.evals.zeroshot.class_names="['cat', 'dog']" names classes.
"""

from __future__ import annotations

from coca_jax.core import runtime

if __name__ == "__main__":  # Before JAX starts (python -m); see coca_jax/core/runtime.py.
  runtime.preload_allocator()

import json
import sys

from absl import flags
from ml_collections import config_flags

from coca_jax.core import cli
from coca_jax.core import config as config_lib
from coca_jax.core import console
from coca_jax.core import fs
from coca_jax.evaluation import evaluators
from coca_jax.inference import api
from coca_jax.interop import pretrained
from coca_jax.training import checkpoint

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir, checkpoints/<step> dir, export, or "
                    "published name.")
flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest).")
flags.DEFINE_string("out", None, "Write the results JSON here (always printed to stdout).")


def _flag_value(argv, name):
  for i, arg in enumerate(argv):
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
  return None


def define_config_flag(argv) -> None:
  """--config is a file if one is given, else the workdir's config.json (overridable)."""
  if _flag_value(argv, "config"):
    config_lib.define_config_flag("config", "Config file[:args] for evals/data.")
    return
  workdir = _flag_value(argv, "workdir")
  if not workdir:  # --help, or a missing --workdir that absl reports as a usage error.
    config_lib.define_config_flag("config", "Config file[:args] for evals/data.")
    return
  root = api.resolve(pretrained.ensure_or_exit(workdir))["root"]
  config = with_eval_defaults(checkpoint.read_config(root))
  config_lib.check_overrides(config, config_lib.override_keys(argv))  # Typos: did you mean.
  config_flags.DEFINE_config_dict("config", config, "The run's config.", lock_config=False)


def with_eval_defaults(config):
  """A run that did not caption gets a disabled captioning group on its eval split, so it can be
  switched on from the command line (--config.evals.captioning.enabled=True)."""
  if not config.evals.captioning.split:
    config.evals.captioning.update(enabled=False, split=config.data.eval_split, examples=1000,
                                   batch_size=64)
  return config


def evaluate(model: api.Model, config) -> dict:
  """Runs config.evals on `model`; data from config.data. Returns {metric: value}."""
  embedder = evaluators.Embedder(model.module, model.params, model.tokenizer,
                                 batch_size=config.evals.batch_size)
  return evaluators.evaluate(config, embedder)


def main(argv) -> None:
  del argv
  console.setup()
  try:  # Every eval split opened and checked before the model is read.
    evaluators.check_evals(FLAGS.config)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  model = api.load(pretrained.ensure_or_exit(FLAGS.workdir), step=FLAGS.step)
  results = {"step": model.step, **evaluate(model, FLAGS.config)}
  text = json.dumps(results, indent=2, sort_keys=True)
  print(text)
  if FLAGS.out:
    fs.write_text(fs.resolve(FLAGS.out), text + "\n")


def run() -> None:
  runtime.preload_allocator()  # Console scripts.
  cli.run(main, define=define_config_flag, required=("workdir",))


if __name__ == "__main__":
  run()
