r"""Quality of the decoding-weights option on a trained demo model: greedy captions of its
held-out test scenes with int8 / bfloat16 decoder weights against float32.

  python benchmarks/check_decode_weights.py --workdir /tmp/coca_demo [--num 1000]

The workdir is a run of `experiments/demo.py` (its config.json names the scene options); the test
scenes are redrawn exactly as its dataset builder drew them (same seed, split, size, grid), so
they are the run's own held-out set. Prints one JSON object: per format the fraction of captions
identical to float32, BLEU-4 and CIDEr-D against the references, and the CIDEr change relative
to float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coca_jax.data import digit_scenes  # noqa: E402
from coca_jax.evaluation import metrics  # noqa: E402
from coca_jax.inference import api  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num", type=int, default=0, help="Test scenes (0: the run's num_test).")
  parser.add_argument("--batch_size", type=int, default=250)
  args = parser.parse_args()

  exact = api.load(args.workdir, batch_size=args.batch_size)
  options = exact.config.data.build_demo_options
  num = args.num or options.num_test
  scenes = digit_scenes.make_scenes("test", num, options.seed, image_size=options.image_size,
                                    grid=options.grid)
  references = {i: list(refs) for i, refs in enumerate(scenes["captions"])}
  result = {"workdir": args.workdir, "step": exact.step, "scenes": num}
  captions = {"float32": exact.caption(scenes["image"])}
  for weights in ("int8", "bfloat16"):
    narrow = api.load(args.workdir, batch_size=args.batch_size, decode_weights=weights)
    captions[weights] = narrow.caption(scenes["image"])
  for weights, predicted in captions.items():
    scores = metrics.caption_scores(dict(enumerate(predicted)), references)
    result[weights] = {
        "identical_to_float32": sum(a == b for a, b in zip(predicted, captions["float32"])) / num,
        "bleu4": round(scores["bleu4"], 4), "cider": round(scores["cider"], 4)}
  for weights in ("int8", "bfloat16"):
    result[weights]["cider_change"] = round(
        result[weights]["cider"] / result["float32"]["cider"] - 1, 5)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
