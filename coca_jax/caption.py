r"""Captions images with a trained model.

  python -m coca_jax.caption --model PATH IMAGE_OR_FOLDER... [--method beam --num_beams 4]
      [--method sample --temperature 0.8 --top_p 0.9 --num_candidates 8] [--json]
      [--decode_weights int8|bfloat16]

PATH: a training workdir, a checkpoints/<step> directory, an export bundle, or a published
name (`python -m coca_jax.interop.pretrained list`; downloaded and converted once). Folders are
expanded to their image files. Prints "path<TAB>caption" per image (or one JSON object per line
with --json: path, caption, score). A file that cannot be read is skipped with a message naming
it on stderr; the exit code is then 1 (after the other images are captioned).
"""

from __future__ import annotations

from coca_jax.core import runtime

if __name__ == "__main__":  # Before JAX starts (python -m); see coca_jax/core/runtime.py.
  runtime.preload_allocator()

import json
import sys

from absl import app, flags

from coca_jax.core import cli
from coca_jax.core import console
from coca_jax.inference import api
from coca_jax.inference import generate as gen
from coca_jax.interop import pretrained

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Workdir, checkpoint step directory, export bundle or "
                    "published name (open_clip:coca_ViT-B-32/laion2b_s13b_b90k).")
flags.DEFINE_enum("method", "greedy", list(gen.METHODS), "Decoding method.")
flags.DEFINE_integer("num_beams", 4, "Beams (method=beam).")
flags.DEFINE_float("length_penalty", 0.6, "Beam ranking: log p / length**length_penalty.")
flags.DEFINE_integer("max_new_tokens", None, "Most generated tokens incl. EOS (default max).")
flags.DEFINE_integer("min_len", 0, "No EOS before this many tokens.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0 = off).")
flags.DEFINE_integer("num_candidates", 1,
                     "method=sample: draw N captions, keep the best image-text match.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 32, "Images per compiled batch.")
flags.DEFINE_enum("decode_weights", None, ["int8", "bfloat16"],
                  "Decoder weights format while captioning (default float32; int8/bfloat16 "
                  "stream fewer bytes per token, float32 accumulation).")
flags.DEFINE_bool("json", False, "One JSON object per line instead of TSV.")


def main(argv) -> None:
  console.setup()
  inputs = argv[1:]
  if not FLAGS.model or not inputs:
    raise app.UsageError("usage: python -m coca_jax.caption --model PATH IMAGE_OR_FOLDER...")
  files = api.image_files(inputs)
  if not files:
    raise app.UsageError(f"no image files ({', '.join(api.IMAGE_SUFFIXES)}) in {inputs}")
  decoding = gen.Decoding(
      method=FLAGS.method, num_beams=FLAGS.num_beams, length_penalty=FLAGS.length_penalty,
      max_new_tokens=FLAGS.max_new_tokens, min_len=FLAGS.min_len, temperature=FLAGS.temperature,
      top_k=FLAGS.top_k, top_p=FLAGS.top_p, num_candidates=FLAGS.num_candidates)
  model = api.load(pretrained.ensure_or_exit(FLAGS.model), batch_size=min(FLAGS.batch_size, len(files)),
                   decode_weights=FLAGS.decode_weights)
  images, readable, failed = [], [], []
  for path in files:
    try:
      images.append(api.read_image(path, model.image_size))
      readable.append(path)
    except api.ImageFileError as e:
      failed.append(path)
      print(f"skipped: {e}", file=sys.stderr)
  if readable:
    out = model.caption_tokens(images, decoding, seed=FLAGS.seed)
    captions = gen.decode_texts(model.tokenizer, out["tokens"])
    for path, caption, score in zip(readable, captions, out["scores"]):
      if FLAGS.json:
        print(json.dumps({"path": path, "caption": caption, "score": float(score)}))
      else:
        print(f"{path}\t{caption}")
  if failed:
    print(f"error: {len(failed)} of {len(files)} images could not be read (listed above)",
          file=sys.stderr)
    sys.exit(1)


def run() -> None:
  runtime.preload_allocator()  # Console scripts.
  cli.run(main, required=("model",))


if __name__ == "__main__":
  run()
