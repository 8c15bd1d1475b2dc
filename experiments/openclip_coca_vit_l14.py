"""open_clip's coca_ViT-L-14 (its model-config JSON, mirrored in coca_jax/interop/open_clip.py), ready
to load its published weights and fine-tune them:

  python -m coca_jax.interop.open_clip import --src open_clip_model.safetensors \
      --model coca_ViT-L-14 --out /tmp/coca_ViT-L-14
  python -m coca_jax.train --config experiments/openclip_coca_vit_l14.py:init=/tmp/coca_ViT-L-14,name=NAME,data_dir=DIR \
      --workdir /tmp/finetune

Args: see coca_jax.interop.open_clip.experiment_config (init=, name=, data_dir=, bpe=, steps=,
batch=, lr=, dtype=, scan, runlocal).
"""

from coca_jax.interop import open_clip


def get_config(arg: str = ""):
  return open_clip.experiment_config("coca_ViT-L-14", arg)
