"""coca_jax: pretrain and serve CoCa-style image-text models in JAX/Flax.

  model = coca_jax.load("/path/to/workdir")       # or a checkpoint step dir, or an export
  model = coca_jax.load("open_clip:coca_ViT-L-14/mscoco_finetuned_laion2b_s13b_b90k")
  model.embed_images(images); model.embed_texts(["a red 3"]); model.caption(images)
  coca_jax.list_pretrained()                      # the published names load() accepts
"""

from coca_jax.core.pretrained import list_pretrained

__version__ = "0.1.0"
__all__ = ["load", "list_pretrained"]


def load(path, **kwargs):
  """Loads a trained model for inference; see `coca_jax.inference.api.load`. `path` may also
  be a published name (`list_pretrained()`): downloaded and converted on first use, into
  $COCA_JAX_CACHE (default ~/.cache/coca_jax); see `coca_jax.interop.pretrained`."""
  # Imported on use so `import coca_jax` stays light for the data and config tools.
  from coca_jax.inference.api import load as _load  # heavy: JAX, orbax and the models.
  from coca_jax.interop.pretrained import ensure  # heavy: the converters import the models.
  return _load(ensure(path), **kwargs)

