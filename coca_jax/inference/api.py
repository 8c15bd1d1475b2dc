"""Using a trained model from Python.

  import coca_jax
  model = coca_jax.load("/path/to/workdir")          # or .../checkpoints/<step>, or an export
  image_embeds = model.embed_images(["cat.jpg", ...])  # or uint8 [N, H, W, 3]; -> [N, D]
  text_embeds = model.embed_texts(["a red 3", ...])    # -> [N, D]
  model.caption(images, method="beam", num_beams=4)    # -> list of str
  model.zero_shot(images, ["zero", "one"], ["a photo of a {}."])
  model.zero_shot_eval("imagenet2012", "validation", data_dir="~/tensorflow_datasets",
                       class_names_file="open_clip:imagenet", templates_file="open_clip:imagenet")
  model.itm_score(images, ["a red 3", ...])           # MoME with ITM: P(match) [N, M]

Embeddings are L2-normalised numpy float32 [N, D]. Inputs are processed in fixed-size batches
(the last one padded), so each function compiles once per batch size.

Images: file paths, or arrays [H, W, 3] / [N, H, W, 3] that are either uint8 in [0, 255] or
float in [0, 1] (a float image embeds like its uint8 equivalent x * 255). Anything else (other
dtypes, floats outside [0, 1], NaN) is rejected with the accepted ranges in the message; errors
about a file name the file.

What `load` accepts:
  * a training workdir: DIR/config.json, DIR/tokenizer.model, DIR/checkpoints/<step>/state
    (the latest step unless `step=` is given);
  * one checkpoint step directory DIR/checkpoints/<step> (config and tokenizer from DIR);
  * an exported bundle (`python -m coca_jax.export`): OUT/export.json, OUT/config.json,
    OUT/tokenizer.model, OUT/params;
  * a published name (`coca_jax.list_pretrained()`) already converted into the cache
    (`coca_jax.load(name)` downloads and converts it first; `coca_jax/interop/pretrained.py`).
Only the parameters are read; the optimizer state in a training checkpoint is skipped.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from coca_jax.core import config as config_lib
from coca_jax.core import fs
from coca_jax.data import preprocess
from coca_jax.data.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer
from coca_jax.evaluation import evaluators, metrics
from coca_jax.inference import generate as gen
from coca_jax.models.coca import CoCa, temperature_scale
from coca_jax.training import checkpoint
from coca_jax.training import step as step_lib
from coca_jax.training import warm_start

# Finding and reading a source is shared with warm starts (one rule for both).
EXPORT_MANIFEST = warm_start.EXPORT_MANIFEST
EXPORT_PARAMS = warm_start.EXPORT_PARAMS
resolve = warm_start.resolve
load_params = warm_start.load_params
restore_params_from_state = warm_start.restore_params_from_state
restore_exported_params = warm_start.restore_exported_params
read_safetensors_params = warm_start.read_safetensors_params
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def model_and_abstract_params(config):
  """(the module `config` builds, its parameter ShapeDtypeStructs; nothing allocated)."""
  model = step_lib.build_model(config)
  return model, step_lib.abstract_params(config, model)


def _find_tokenizer(root: str, config):
  kind = config.data.tokenizer_kind
  beside = fs.join(root, TOKENIZER_FILES.get(kind, "tokenizer.model"))
  configured = config.data.tokenizer
  for candidate in (beside, configured):
    if candidate and fs.exists(candidate):
      return load_tokenizer(candidate, kind)
  raise FileNotFoundError(f"no tokenizer: neither {beside} nor config.data.tokenizer="
                          f"{configured!r} exists; copy the run's {fs.basename(beside)} "
                          "beside config.json")


def read_checked_config(root: str):
  """The completed config.json of `root`, its field types checked: a field of the wrong type (a
  hand-edited bundle) is an error naming the field and the file, not a TypeError from JAX."""
  config = checkpoint.read_config(root)
  # Types only: the full `validate` also checks the machine the run trained on (its
  # config.init.source, its tokenizer path), which a copied bundle need not have.
  problems = config_lib.type_problems(config)
  if problems:
    raise config_lib.ConfigError(
        f"{fs.join(root, 'config.json')}: " + "; ".join(problems) + ". Fix the value in that "
        "file (a number without quotes, true/false for a flag)")
  return config


def load(path: str, *, step: int | None = None, batch_size: int = 64,
         decode_weights: str | None = None) -> "Model":
  """Loads a trained CoCa from a workdir, a checkpoint step directory or an export bundle.

  `step` picks a checkpoint of a workdir (default: the latest); `batch_size` is the fixed batch
  every call is padded to (one compilation per function). `decode_weights` ('int8' |
  'bfloat16' | None = float32): the format of the decoder weights that captioning streams each
  token (`generate.decoder_params`); embeddings and the image tower stay float32.
  """
  found = resolve(path, step)
  config = read_checked_config(found["root"])
  tokenizer = _find_tokenizer(found["root"], config)
  model, params = load_params(found, config)
  loaded = Model(model, params, tokenizer, config, batch_size=batch_size, step=found["step"],
                 decode_weights=decode_weights)
  # Where exactly these weights came from (a workdir pinned to the step read), so that what
  # records the model (a search index) can load the same weights again later.
  loaded.path = (fs.join(checkpoint.checkpoint_dir(found["root"]), str(found["step"]))
                 if found["kind"] == "workdir" else found["path"])
  return loaded


class ImageFileError(ValueError):
  """An image file that cannot be read or decoded; the message names the file."""


def read_image(path: str, size: int) -> np.ndarray:
  """An image file -> uint8 [size, size, 3]: shorter side to `size`, center crop (evaluation
  geometry of training). Raises ImageFileError naming the file."""
  try:
    return preprocess.decode_train_image(fs.read_bytes(path), size, None)
  except Exception as e:  # pylint: disable=broad-except  # Pillow raises many types on bad data
    raise ImageFileError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e


def as_pixels(image, what: str = "image") -> np.ndarray:
  """Checks one image array [H, W, 3] against the input contract; returns it as float32 pixel
  values in [0, 255] (uint8 as is, float in [0, 1] times 255)."""
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"{what} has shape {array.shape}: expected [H, W, 3] (RGB), a batch "
                     "[N, H, W, 3], or a file path")
  if not array.shape[0] or not array.shape[1]:
    raise ValueError(f"{what} has shape {array.shape}: it has no pixels (height and width "
                     "must be at least 1)")
  if array.dtype == np.uint8:
    return array.astype(np.float32)
  if np.issubdtype(array.dtype, np.floating):
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if not np.isfinite(array).all() or low < 0.0 or high > 1.0:
      raise ValueError(f"{what} is {array.dtype} with values in [{low}, {high}]: float images "
                       "must lie in [0, 1] (uint8 images in [0, 255]); divide by 255 or cast "
                       "to uint8")
    return array.astype(np.float32) * 255.0
  raise ValueError(f"{what} has dtype {array.dtype}: images must be uint8 in [0, 255] or float "
                   "in [0, 1]")


def _names_image_file(text: str) -> bool:
  """Whether a string given where texts or image paths are accepted is an image file (an
  existing local file, or a URL ending in an image suffix)."""
  if fs.is_url(text):
    return text.lower().endswith(IMAGE_SUFFIXES)
  return os.path.exists(text)


def image_files(paths_or_folders: Sequence[str]) -> list[str]:
  """Expands folders (sorted, non-recursive) to their image files; keeps files as given."""
  files = []
  for p in paths_or_folders:
    if fs.isdir(p):
      files += [fs.join(p, f) for f in fs.listdir(p) if f.lower().endswith(IMAGE_SUFFIXES)]
    elif fs.exists(p):
      files.append(p)
    else:
      raise FileNotFoundError(f"image {p!r} does not exist")
  return files


class Model:
  """A loaded model (CoCa towers or MoME) with its tokenizer. Attributes: module (CoCa or
  MoME), params, tokenizer, config, image_size, step (checkpoint step or None), decode_weights
  and decoder_params (what captioning decodes with; see `load`), path (what `load` read: the
  export, or the checkpoint step directory; None for a Model built in memory)."""

  def __init__(self, module: CoCa, params, tokenizer: Tokenizer, config, *, batch_size: int = 64,
               step: int | None = None, decode_weights: str | None = None):
    self.module, self.params, self.tokenizer, self.config = module, params, tokenizer, config
    self.image_size = module.config.image_size
    self.batch_size = batch_size
    self.step = step
    self.path = None
    self.decode_weights = decode_weights
    # Prepared once: the unscanned (and maybe quantized) decoder every caption call streams.
    self.decoder_params = gen.decoder_params(module, params, decode_weights)
    self.embedder = evaluators.Embedder(module, params, tokenizer, batch_size=batch_size)
    self._itm_fn = None

  # -- Inputs ------------------------------------------------------------------------------------

  def pixels_at_model_size(self, images) -> np.ndarray:
    """File paths, or arrays (uint8 in [0, 255] or float in [0, 1]; [N,H,W,3] or a list of
    [H,W,3]) of any size -> float32 pixel values in [0, 255], [N, S, S, 3], at the model's image
    size (shorter side resized, center crop; images of another size are resized in 8 bits).
    float32, not uint8: a float image already at the model's size keeps its exact values (uint8
    inputs stay exact integers)."""
    if isinstance(images, (str, os.PathLike)):
      images = [images]
    if isinstance(images, np.ndarray) and images.ndim != 4 and images.dtype != object:
      raise ValueError(f"images of shape {images.shape}: expected [N, H, W, 3], a list of "
                       "[H, W, 3] arrays, or file paths")
    out = []
    for index, image in enumerate(images):
      if isinstance(image, (str, os.PathLike)):
        out.append(read_image(os.fspath(image), self.image_size).astype(np.float32))
        continue
      pixels = as_pixels(image, f"image {index}")
      if pixels.shape[:2] != (self.image_size, self.image_size):
        resized = preprocess.resize_and_center_crop(
            Image.fromarray(np.round(pixels).astype(np.uint8)), self.image_size)
        pixels = np.asarray(resized, np.float32)
      out.append(pixels)
    if not out:
      return np.zeros((0, self.image_size, self.image_size, 3), np.float32)
    return np.stack(out)

  # -- Embeddings --------------------------------------------------------------------------------

  def embed_images(self, images) -> np.ndarray:
    """Paths, uint8 [0, 255] or float [0, 1] images -> L2-normalised float32 [N, D]."""
    return self.embedder.embed_images(self.pixels_at_model_size(images))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Strings -> L2-normalised float32 [N, D]."""
    if isinstance(texts, str):
      texts = [texts]
    return self.embedder.embed_texts(list(texts))

  # -- Captions ----------------------------------------------------------------------------------

  def caption_tokens(self, images, decoding: gen.Decoding | None = None, seed: int = 0,
                     **decoding_fields) -> dict:
    """Like `caption` but returns generate's arrays (tokens [N, L], lengths, scores), numpy."""
    decoding = decoding or gen.Decoding(**decoding_fields)
    images = preprocess.normalize_images(self.pixels_at_model_size(images))
    rng = jax.random.key(seed) if decoding.method == "sample" else None
    results = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      step_rng = None if rng is None else jax.random.fold_in(rng, start)
      out = gen.generate(self.module, self.params,
                         jnp.asarray(evaluators.pad_rows(chunk, self.batch_size)), decoding,
                         step_rng, decoder_params=self.decoder_params)
      results.append({k: np.asarray(v)[:len(chunk)] for k, v in out.items()})
    if not results:
      return {"tokens": np.zeros((0, self.module.config.text.max_len), np.int32)}
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}

  def caption(self, images, decoding: gen.Decoding | None = None, seed: int = 0,
              **decoding_fields) -> list[str]:
    """Captions for paths or uint8 images. Keyword arguments are `generate.Decoding` fields:
    method ('greedy' | 'beam' | 'sample'), max_new_tokens, min_len, num_beams, length_penalty,
    temperature, top_k, top_p, num_candidates (contrastive re-ranking of samples)."""
    tokens = self.caption_tokens(images, decoding, seed, **decoding_fields)["tokens"]
    return gen.decode_texts(self.tokenizer, tokens)

  # -- Zero-shot and retrieval -------------------------------------------------------------------

  def zero_shot_classifier(self, class_names: Sequence[str],
                           templates: Sequence[str] = ("{}",)) -> np.ndarray:
    """[C, D] class embeddings: each class's prompts embedded, averaged, re-normalised."""
    return metrics.zero_shot_classifier(self.embed_texts, list(class_names), list(templates))

  def zero_shot(self, images, class_names: Sequence[str],
                templates: Sequence[str] = ("{}",)) -> dict:
    """Classifies images among `class_names` (prompts from `templates`, '{}' = the name).

    Returns dict(labels int [N] (index of the predicted class), names list[str], probs float32
    [N, C] (softmax of the model's scaled cosine similarities)).
    """
    classifier = self.zero_shot_classifier(class_names, templates)
    logits = self.logit_scale * self.embed_images(images) @ classifier.T
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    labels = probs.argmax(-1)
    return {"labels": labels, "names": [class_names[i] for i in labels], "probs": probs}

  def zero_shot_eval(self, dataset: str, split: str, *, data_dir: str = "", examples: int = 0,
                     **fields) -> dict:
    """Zero-shot top-1 / top-5 on a prepared labelled split, the eval `coca_jax.evaluate` runs:
    a dataset built by `coca_jax.data.build`, or a TFDS catalog dataset prepared as array_record
    (`tfds build imagenet2012 --file_format=array_record`; nothing is downloaded).

    Args:
      dataset, split: e.g. "imagenet2012", "validation" (a slice such as "validation[:1000]"
        works too).
      data_dir: where it is prepared ("" = the run's config.data.data_dir).
      examples: read the first N examples (0 = the whole split).
      **fields: any other config.evals.zeroshot field: class_names, class_names_file (e.g.
        "open_clip:imagenet"), templates, templates_file, label_feature, image_feature. Names
        default to the label's ClassLabel names, templates to the run's own.
    Returns:
      {"eval/zeroshot_top1": float, "eval/zeroshot_top5": float}.
    Raises:
      config.ConfigError naming each problem (not prepared, wrong count of names, ...).
    """
    config = config_lib.complete(self.config)
    group = config.evals.zeroshot
    unknown = sorted(set(fields) - set(group))
    if unknown:
      raise TypeError(f"zero_shot_eval got {unknown}, which config.evals.zeroshot does not have "
                      f"(its fields: {', '.join(sorted(group))})")
    group.update(enabled=True, dataset=dataset, split=split, data_dir=data_dir,
                 examples=examples, transfer_splits=[], transfer_templates=[], **fields)
    config.evals.retrieval.enabled = config.evals.captioning.enabled = False
    evaluators.check_evals(config)
    return evaluators.run_evals(config, self.embedder)

  def similarity(self, images, texts: Sequence[str]) -> np.ndarray:
    """Cosine similarities [num_images, num_texts]."""
    return self.embed_images(images) @ self.embed_texts(texts).T

  def retrieve(self, queries, gallery, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Top-k search. queries/gallery: lists of strings (texts) or images (paths / uint8), in
    either direction. Returns (indices int [Q, k] into gallery, cosine scores [Q, k])."""
    embed = lambda xs: (self.embed_texts(xs) if len(xs) and isinstance(xs[0], str)
                        and not _names_image_file(xs[0]) else self.embed_images(xs))
    scores = embed(queries) @ embed(gallery).T
    k = min(k, scores.shape[1])
    index = np.argsort(-scores, axis=1)[:, :k]
    return index, np.take_along_axis(scores, index, axis=1)

  # -- Image-text matching (MoME trained with config.loss.itm_weight > 0) ---------------------

  def itm_score(self, images, texts: Sequence[str]) -> np.ndarray:
    """Probability that each image matches each text, float32 [num_images, num_texts], from
    the ITM head on the bidirectional fused pass (one pass per pair: use it to re-rank a short
    list, e.g. the top candidates of `retrieve` or of sampled captions)."""
    if not getattr(self.module, "itm", False):
      raise ValueError("this model has no image-text matching head: itm_score needs a MoME "
                       "(config.model.backbone='mome') trained with config.loss.itm_weight > 0")
    if isinstance(texts, str):
      texts = [texts]
    images = preprocess.normalize_images(self.pixels_at_model_size(images))
    tokens = self.tokenizer.tokenize(list(texts), self.module.config.text.max_len)
    num_images, num_texts = len(images), len(tokens)
    pair_image = np.repeat(np.arange(num_images), num_texts)
    pair_text = np.tile(np.arange(num_texts), num_images)
    if self._itm_fn is None:
      self._itm_fn = jax.jit(lambda p, i, t: jax.nn.softmax(self.module.apply(
          {"params": p}, i, t, method="itm_logits"), axis=-1)[:, 1])
    scores = []
    for start in range(0, len(pair_image), self.batch_size):
      rows = slice(start, start + self.batch_size)
      chunk_image, chunk_text = images[pair_image[rows]], tokens[pair_text[rows]]
      out = self._itm_fn(self.params,
                         jnp.asarray(evaluators.pad_rows(chunk_image, self.batch_size)),
                         jnp.asarray(evaluators.pad_rows(chunk_text, self.batch_size,
                                                         repeat_first=True)))
      scores.append(np.asarray(out)[:len(chunk_image)])
    flat = np.concatenate(scores) if scores else np.zeros((0,), np.float32)
    return flat.reshape(num_images, num_texts)

  @property
  def logit_scale(self) -> float:
    return float(temperature_scale(self.params["logit_scale"], self.module.config.max_logit_scale))
