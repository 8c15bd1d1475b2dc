"""coca_jax: pretrain and serve CoCa-style image-text models in JAX/Flax.

  model = coca_jax.load("/path/to/workdir")       # or a checkpoint step dir, or an export
  model.embed_images(images); model.embed_texts(["a red 3"]); model.caption(images)
"""

__version__ = "0.1.0"


def load(path, **kwargs):
  """Loads a trained model for inference; see `coca_jax.inference.api.load`."""
  # Imported on use so `import coca_jax` stays light for the data and config tools.
  from coca_jax.inference.api import load as _load  # heavy: JAX, orbax and the models.
  return _load(path, **kwargs)
