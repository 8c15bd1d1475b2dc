r"""CoCa (2.1B) as in the paper (Table 1), with the paper's pretraining recipe.

Same recipe and args as experiments/coca_base.py (read its docstring); only the model size differs.

  python -m coca_jax.train --config experiments/coca_2b.py --dry_run      # sizes, FLOPs
  launch/tpu_pod.sh --tpu NAME --zone ZONE --config experiments/coca_2b.py \
      --workdir gs://BUCKET/coca_2b [-- --config.data.name=YOUR_TFDS_DATASET ...]
"""

from coca_jax.core import recipes


def get_config(arg: str = ""):
  return recipes.coca_paper("2b", arg)
