r"""CoCa-Large (787M) as in the paper (Table 1), with the paper's pretraining recipe.

Same recipe and args as experiments/coca_base.py (read its docstring); only the model size differs.

  python -m coca_jax.train --config experiments/coca_large.py --dry_run      # sizes, FLOPs
  launch/tpu_pod.sh --tpu NAME --zone ZONE --config experiments/coca_large.py \
      --workdir gs://BUCKET/coca_large [-- --config.data.name=YOUR_TFDS_DATASET ...]
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "coca_base", os.path.join(os.path.dirname(os.path.abspath(__file__)), "coca_base.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg: str = ""):
  return _base.paper_config("large", arg)
