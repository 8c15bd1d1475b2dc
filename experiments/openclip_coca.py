r"""open_clip's CoCa models (coca_ViT-B-32, coca_ViT-L-14: their model-config JSONs, mirrored in
coca_jax/interop/open_clip.py MODEL_CONFIGS), ready to load the published weights and fine-tune
them. Parameter counts equal open_clip's (253,560,065 and 638,450,177).

  python -m coca_jax.interop.open_clip import --src open_clip_model.safetensors \
      --model coca_ViT-B-32 --out /tmp/coca_ViT-B-32
  python -m coca_jax.train \
      --config experiments/openclip_coca.py:model=coca_ViT-B-32,init=/tmp/coca_ViT-B-32,name=NAME,data_dir=DIR \
      --workdir /tmp/finetune

Args: model= (a MODEL_CONFIGS name or an open_clip model-config JSON path; default
coca_ViT-B-32), then those of coca_jax.interop.open_clip.experiment_config (init=, name=,
data_dir=, bpe=, steps=, batch=, lr=, dtype=, remat=, unrolled, runlocal; layers are scanned
with remat='dots' unless `unrolled`).
"""

from coca_jax.interop import open_clip

DEFAULT_MODEL = "coca_ViT-B-32"


def get_config(arg: str = ""):
  items = [item for item in arg.split(",") if item]
  models = [item.partition("=")[2] for item in items if item.startswith("model=")]
  rest = ",".join(item for item in items if not item.startswith("model="))
  return open_clip.experiment_config(models[-1] if models else DEFAULT_MODEL, rest)
