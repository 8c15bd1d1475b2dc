r"""Exports a trained model as a self-contained bundle: parameters only (no optimizer state),
the config and the tokenizer.

  python -m coca_jax.export --src DIR --out OUT [--step N] [--dtype bfloat16] \
      [--format orbax|safetensors] [--merge_lora]

DIR is a training workdir, a checkpoints/<step> directory or another bundle (`--workdir` is the
same flag). OUT is a directory holding:
  config.json             the experiment config (`coca_jax.load` and `--config.init.source`
                          rebuild the model from it);
  tokenizer.model, or bpe_simple_vocab_16e6.txt.gz for data.tokenizer_kind='clip_bpe';
  export.json             {"format", "step", "dtype", "source", "params"};
  params/                 (--format orbax) an orbax StandardSave of the params pytree, or
  model.safetensors       (--format safetensors) one flat tensor per parameter, read with any
                          safetensors library (numpy, torch, ...), no JAX needed.
safetensors keys are '/'-joined parameter paths in the UNSCANNED layer layout whatever
scan_layers the model used, e.g. `vision/layer_3/attention/query/kernel` [width, heads, head_dim],
`vision/layer_3/ffn/mlp/wi/kernel` [width, mlp], `token_embed/embedding` [vocab, width],
`vocab_head/kernel` [width, vocab], `logit_scale` [] (log of the contrastive scale).
Dense kernels are [inputs..., outputs...] (x @ kernel), not torch's [out, in].
A LoRA run (`config.optim.lora`) checkpoints its adapters only; `--merge_lora` folds them into
the base its config.init.source names (W + alpha / rank * A @ B) and writes a plain bundle
(its config.json has optim.lora.rank = 0), which loads and fine-tunes like any other.
The bundle is written to a temporary directory beside OUT and renamed into place, so OUT is
either absent or complete. `coca_jax.load(OUT)` reads either format back as float32.
"""

from __future__ import annotations

from absl import app, flags

from coca_jax.core import cli
from coca_jax.core import console
# The library functions behind the CLI (kept importable from here for existing callers).
from coca_jax.inference.bundle import (  # noqa: F401
    FORMAT, SAFETENSORS_FILE, LoraExportError, export, write_bundle)

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The CLI's flags, defined when the CLI runs: `export()` is also a library function, and a
  program that imports this module next to another CLI (train defines --workdir too) must not
  collide."""
  flags.DEFINE_string("workdir", None, "Training workdir, checkpoints/<step> directory or bundle.")
  flags.DEFINE_alias("src", "workdir")
  flags.DEFINE_string("out", None, "Directory to write the bundle to (must not exist).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored parameter dtype.")
  flags.DEFINE_enum("format", "orbax", ["orbax", "safetensors"], "Parameter file format.")
  flags.DEFINE_bool("merge_lora", False, "A LoRA run (config.optim.lora): fold its adapters "
                    "into the base (config.init.source) and write a plain bundle.")


def main(argv) -> None:
  del argv
  console.setup()
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("--src (or --workdir) and --out are required")
  try:
    print(export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                 fmt=FLAGS.format, merge_lora=FLAGS.merge_lora))
  except LoraExportError as e:  # A LoRA run without --merge_lora: the message names the flag.
    raise app.UsageError(str(e)) from None


def run() -> None:
  _define_flags()
  cli.run(main, required=("workdir", "out"))


if __name__ == "__main__":
  run()
