"""Evaluation metrics for image-text models: zero-shot classification, retrieval, captioning.

Everything here works on embeddings and strings only (no model import), so the `evaluate` CLI and
the train loop's periodic evals can share it. Embeddings are expected L2-normalised, so a dot
product is the cosine similarity the model was trained with.

Tie-breaking, everywhere: when two candidates score the same, the one with the lower index ranks
first (the rule of `jax.lax.top_k`). A collapsed model whose embeddings are all equal therefore
scores at chance level, never at 100%.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
import re
import warnings

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

# ----------------------------------------------------------------------------------------------
# Zero-shot classification
# ----------------------------------------------------------------------------------------------


def _l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
  norm = np.linalg.norm(x, axis=axis, keepdims=True)
  # A zero vector stays zero instead of becoming NaN; it then ties with everything.
  return x / np.maximum(norm, 1e-12)


def zero_shot_classifier(
    text_embed_fn: Callable[[list[str]], np.ndarray],
    class_names: Sequence[str],
    templates: Sequence[str],
) -> np.ndarray:
  """Classifier weights from class names and prompt templates (prompt ensembling).

  For each class, every `template.format(name)` is embedded, each embedding L2-normalised, the
  embeddings averaged, and the mean renormalised: the class's weight vector is the unit direction
  of its averaged prompts.

  Args:
    text_embed_fn: list of N strings -> text embeddings [N, embed] (e.g. the model's text tower
      after tokenisation). Called once per class with len(templates) strings.
    class_names: C class names.
    templates: prompt templates with one `{}` placeholder, e.g. "a photo of the number {}.".

  Returns:
    float32 [C, embed], rows of unit norm.
  """
  if not class_names:
    raise ValueError('zero_shot_classifier: class_names is empty; pass at least one class name.')
  if not templates:
    raise ValueError('zero_shot_classifier: templates is empty; pass at least one template, '
                     'e.g. ["{}"].')
  for template in templates:
    if '{}' not in template:
      raise ValueError(f'zero_shot_classifier: template {template!r} has no "{{}}" placeholder '
                       'for the class name; add one.')
  class_weights = []
  for name in class_names:
    prompts = [template.format(name) for template in templates]
    prompt_embeds = np.asarray(text_embed_fn(prompts), dtype=np.float32)
    if prompt_embeds.ndim != 2 or prompt_embeds.shape[0] != len(prompts):
      raise ValueError(f'zero_shot_classifier: text_embed_fn returned shape {prompt_embeds.shape}'
                       f' for {len(prompts)} prompts; it must return [num_prompts, embed].')
    class_weights.append(_l2_normalize(_l2_normalize(prompt_embeds).mean(axis=0)))
  return np.stack(class_weights).astype(np.float32)


class NonFiniteEmbeddings(ValueError):
  """Embeddings with NaN/inf entries: every comparison with NaN is False, so ranks would come
  out 0 and every metric perfect. Raised instead of scoring them."""


def check_finite(name: str, array: np.ndarray) -> None:
  """Raises NonFiniteEmbeddings naming `name` and how many rows hold NaN/inf."""
  array = np.asarray(array)
  if not np.isfinite(array).all():
    rows = int((~np.isfinite(array.reshape(array.shape[0], -1))).any(axis=1).sum()) \
        if array.ndim else 1
    raise NonFiniteEmbeddings(
        f"{name} has non-finite values (NaN/inf) in {rows} of {len(array) if array.ndim else 1} "
        "rows: the model's parameters are probably non-finite (a diverged run); metrics of "
        "such embeddings would be meaningless")


def _rank_of_true_class(scores: np.ndarray, true_index: np.ndarray) -> np.ndarray:
  """Zero-based rank of each row's true column under (score desc, index asc) ordering.

  Args:
    scores: [N, C] scores.
    true_index: int [N] the correct column per row.

  Returns:
    int [N]; rank 0 means the true column is the top-1 prediction.
  """
  true_scores = np.take_along_axis(scores, true_index[:, None], axis=1)
  column = np.arange(scores.shape[1])[None, :]
  beats_true = (scores > true_scores) | ((scores == true_scores) & (column < true_index[:, None]))
  return beats_true.sum(axis=1)


def zero_shot_top_k(embed_texts: Callable, image_embeds: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str], templates: Sequence[str],
                    what: str) -> dict[str, float]:
  """`zero_shot_accuracy` of the prompt-ensembled classifier (`zero_shot_classifier`); NaN
  figures, with an error logged naming `what`, when an image or text embedding is not finite
  (a diverged model's eval is reported, not raised)."""
  try:
    classifier = zero_shot_classifier(embed_texts, class_names, templates)
    return zero_shot_accuracy(image_embeds, classifier, labels)
  except NonFiniteEmbeddings as e:
    logging.error("%s reported as NaN: %s", what, e)
    return {"top1": float("nan"), "top5": float("nan")}


def zero_shot_accuracy(
    image_embeds: np.ndarray,
    classifier: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
  """Top-k accuracy of a zero-shot classifier.

  Args:
    image_embeds: [N, embed] image embeddings.
    classifier: [C, embed] class weights from `zero_shot_classifier`.
    labels: int [N] true class per image, in [0, C).
    ks: which top-k accuracies to report; k larger than C is clipped to C (accuracy 1.0).

  Returns:
    {'top{k}': fraction of images whose true class is among the k highest-scoring classes}.
    The key uses the requested k, e.g. 'top5' even with 3 classes.
  """
  image_embeds = np.asarray(image_embeds, dtype=np.float32)
  classifier = np.asarray(classifier, dtype=np.float32)
  labels = np.asarray(labels)
  num_classes = classifier.shape[0]
  if labels.shape != (image_embeds.shape[0],):
    raise ValueError(f'zero_shot_accuracy: labels has shape {labels.shape} but image_embeds has '
                     f'{image_embeds.shape[0]} rows; pass one label per image.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'zero_shot_accuracy: labels must lie in [0, {num_classes}) (the classifier '
                     f'has {num_classes} classes); got range [{labels.min()}, {labels.max()}].')
  check_finite('zero_shot_accuracy: image_embeds', image_embeds)
  check_finite('zero_shot_accuracy: classifier', classifier)
  scores = image_embeds @ classifier.T  # [N, C]
  rank = _rank_of_true_class(scores, labels.astype(np.int64))
  return {f'top{k}': float(np.mean(rank < min(k, num_classes))) for k in ks}


# ----------------------------------------------------------------------------------------------
# Top-k search: dense on one device, or sharded over a mesh for galleries that do not fit one
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('k',))
def _dense_topk_block(queries: jax.Array, gallery: jax.Array, k: int):
  similarity = jnp.dot(queries, gallery.T, preferred_element_type=jnp.float32)
  return jax.lax.top_k(similarity, k)


def _blocks(num_queries: int, block_size: int):
  for start in range(0, num_queries, block_size):
    yield start, min(start + block_size, num_queries)


def _pad_rows(x: np.ndarray, num_rows: int) -> np.ndarray:
  if x.shape[0] == num_rows:
    return x
  return np.concatenate([x, np.zeros((num_rows - x.shape[0],) + x.shape[1:], x.dtype)])


def dense_topk(queries: np.ndarray, gallery: np.ndarray, k: int,
               query_block_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery items per query by dot product, on one device.

  Args:
    queries: [Nq, embed].
    gallery: [Ng, embed].
    k: number of results per query; must be <= Ng.
    query_block_size: queries scored per device call, bounding memory to
      [query_block_size, Ng] similarities. The last block is zero-padded to the same size so
      only one program is compiled.

  Returns:
    (scores float32 [Nq, k], indices int32 [Nq, k]), best first; equal scores keep index order.
  """
  queries, gallery = np.asarray(queries), np.asarray(gallery)
  _check_topk_args(queries, gallery, k)
  gallery = jax.device_put(gallery)  # once, not once per query block
  block_size = min(query_block_size, queries.shape[0])
  scores, indices = [], []
  for start, stop in _blocks(queries.shape[0], block_size):
    block = _pad_rows(queries[start:stop], block_size)
    block_scores, block_indices = _dense_topk_block(block, gallery, k)
    scores.append(np.asarray(block_scores)[:stop - start])
    indices.append(np.asarray(block_indices)[:stop - start])
  return np.concatenate(scores), np.concatenate(indices)


def _check_topk_args(queries, gallery, k: int) -> None:
  if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
    raise ValueError(f'top-k search needs queries [Nq, embed] and gallery [Ng, embed] with the '
                     f'same embed; got {queries.shape} and {gallery.shape}.')
  if not 1 <= k <= gallery.shape[0]:
    raise ValueError(f'top-k search: k={k} must be in [1, {gallery.shape[0]}] (the gallery '
                     'size); clip k to the gallery size.')


@functools.partial(jax.jit, static_argnames=('k', 'num_gallery', 'mesh', 'gallery_axes'))
def _sharded_topk_block(queries, gallery, gallery_index, *, k, num_gallery, mesh, gallery_axes):
  """queries [Nq, D] replicated; gallery [Ng_padded, D] and gallery_index [Ng_padded] sharded."""
  num_shards = int(np.prod([mesh.shape[axis] for axis in gallery_axes]))
  local_k = min(k, gallery.shape[0] // num_shards)

  def per_shard(queries, gallery_shard, index_shard):
    similarity = jnp.dot(queries, gallery_shard.T, preferred_element_type=jnp.float32)
    # Padding rows (index >= num_gallery) can never win: -inf loses to every real score.
    similarity = jnp.where(index_shard[None, :] < num_gallery, similarity, -jnp.inf)
    local_scores, local_positions = jax.lax.top_k(similarity, local_k)  # [Nq, local_k]
    local_indices = index_shard[local_positions]
    # Gather every shard's candidates (shard order = ascending global index, so equal scores
    # still resolve to the lower index), then keep the best k of all of them.
    all_scores = jax.lax.all_gather(local_scores, gallery_axes, axis=1, tiled=True)
    all_indices = jax.lax.all_gather(local_indices, gallery_axes, axis=1, tiled=True)
    merged_scores, merged_positions = jax.lax.top_k(all_scores, k)
    return merged_scores, jnp.take_along_axis(all_indices, merged_positions, axis=1)

  return jax.shard_map(
      per_shard, mesh=mesh,
      in_specs=(P(), P(gallery_axes), P(gallery_axes)),
      out_specs=(P(), P()),
      # all_gather makes the candidates, hence the merged top-k, identical on every shard, but
      # the replication checker counts all_gather's output as varying; the check is off for that.
      check_vma=False,
  )(queries, gallery, gallery_index)


def sharded_topk(
    queries: np.ndarray | jax.Array,
    gallery: np.ndarray | jax.Array,
    k: int,
    mesh: Mesh | None = None,
    gallery_axes: str | Sequence[str] | None = None,
    query_block_size: int = 1024,
    num_gallery: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery items per query, with the gallery sharded over devices.

  Each device scores the (replicated) queries against its slice of the gallery and keeps its
  local top-k; the per-shard candidates are all-gathered (k per shard, not the whole gallery)
  and merged into the global top-k. Device memory per call is [query_block_size, Ng / shards]
  similarities plus the gallery slice. The gallery is zero-padded to a multiple of the shard
  count; padded rows score -inf and are never returned.

  Args:
    queries: [Nq, embed], replicated to every device.
    gallery: [Ng, embed]; numpy, or a jax.Array (e.g. already sharded by rows).
    k: results per query, 1 <= k <= Ng.
    mesh: the device mesh. If None, taken from `gallery.sharding` (a NamedSharding).
    gallery_axes: mesh axis name(s) the gallery rows are split over. If None: the axes of
      `gallery.sharding`'s row spec when the gallery carries one, else every mesh axis.
    query_block_size: queries per device call (the last block is padded to this size).
    num_gallery: how many leading rows of `gallery` are real (default: all). A caller that keeps
      a gallery on the devices between calls pads it to a multiple of the shard count once and
      passes its true size here; the rows after it are never returned.

  Returns:
    (scores float32 [Nq, k], indices int32 [Nq, k] into the gallery), best first; identical to
    `dense_topk`, ties included (lower index first).
  """
  gallery_sharding = getattr(gallery, 'sharding', None)
  if mesh is None:
    if not isinstance(gallery_sharding, NamedSharding):
      raise ValueError('sharded_topk: pass mesh=, or a gallery jax.Array with a NamedSharding '
                       'to take the mesh from.')
    mesh = gallery_sharding.mesh
  if gallery_axes is None:
    row_spec = None
    if isinstance(gallery_sharding, NamedSharding) and gallery_sharding.mesh == mesh:
      row_spec = gallery_sharding.spec[0] if gallery_sharding.spec else None
    gallery_axes = row_spec if row_spec is not None else tuple(mesh.axis_names)
  gallery_axes = (gallery_axes,) if isinstance(gallery_axes, str) else tuple(gallery_axes)
  for axis in gallery_axes:
    if axis not in mesh.axis_names:
      raise ValueError(f'sharded_topk: gallery_axes names {axis!r}, which is not an axis of the '
                       f'mesh {tuple(mesh.axis_names)}; pick from those.')
  num_rows = gallery.shape[0]
  num_gallery = num_rows if num_gallery is None else num_gallery
  if not 0 <= num_gallery <= num_rows:
    raise ValueError(f'sharded_topk: num_gallery={num_gallery} must be in [0, {num_rows}] (the '
                     'gallery rows given).')
  _check_topk_args(queries, jax.ShapeDtypeStruct((num_gallery, *gallery.shape[1:]),
                                                 gallery.dtype), k)

  num_shards = int(np.prod([mesh.shape[axis] for axis in gallery_axes]))
  padded_size = -(-num_rows // num_shards) * num_shards
  row_sharding = NamedSharding(mesh, P(gallery_axes))
  gallery_index = jax.device_put(np.arange(padded_size, dtype=np.int32), row_sharding)
  # Pad where the gallery lives, so a big gallery is never gathered onto one device: numpy on
  # the host (device_put then sends each device only its slice), a jax.Array in a jitted pad
  # whose output is already row-sharded.
  pad_widths = ((0, padded_size - num_rows), (0, 0))
  if isinstance(gallery, jax.Array) and padded_size != num_rows:
    gallery = jax.jit(lambda g: jnp.pad(g, pad_widths), out_shardings=row_sharding)(gallery)
  elif not isinstance(gallery, jax.Array):
    gallery = np.pad(np.asarray(gallery), pad_widths)
  gallery = jax.device_put(gallery, row_sharding)  # a no-op when already laid out so

  queries = np.asarray(queries)
  block_size = min(query_block_size, queries.shape[0])
  replicated = NamedSharding(mesh, P())
  scores, indices = [], []
  for start, stop in _blocks(queries.shape[0], block_size):
    block = jax.device_put(_pad_rows(queries[start:stop], block_size), replicated)
    block_scores, block_indices = _sharded_topk_block(
        block, gallery, gallery_index, k=k, num_gallery=num_gallery, mesh=mesh,
        gallery_axes=gallery_axes)
    scores.append(np.asarray(block_scores)[:stop - start])
    indices.append(np.asarray(block_indices)[:stop - start])
  return np.concatenate(scores), np.concatenate(indices)


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------


def retrieval_metrics(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    mesh: Mesh | None = None,
    gallery_axes: str | Sequence[str] | None = None,
    query_block_size: int = 1024,
) -> dict[str, float]:
  """Image->text and text->image recall@k, with any number of captions per image (COCO style).

  Args:
    image_embeds: [Ni, embed] one row per image.
    text_embeds: [Nt, embed] one row per caption.
    text_to_image: int [Nt], the image each caption describes, in [0, Ni). Every image needs at
      least one caption.
    ks: recall cut-offs; a k larger than the gallery is clipped to it (recall 1.0).
    mesh: if given, each gallery (texts for i2t, images for t2i) is sharded over
      `gallery_axes` of this mesh and searched with `sharded_topk`; else `dense_topk`.
    gallery_axes: mesh axes for the gallery rows (default: all mesh axes).
    query_block_size: queries per device call.

  Returns:
    {'i2t_recall@k': fraction of images with ANY of their captions among their top-k texts,
     't2i_recall@k': fraction of captions whose image is among their top-k images}.
  """
  image_embeds = np.asarray(image_embeds, dtype=np.float32)
  text_embeds = np.asarray(text_embeds, dtype=np.float32)
  text_to_image = np.asarray(text_to_image)
  num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
  if text_to_image.shape != (num_texts,):
    raise ValueError(f'retrieval_metrics: text_to_image has shape {text_to_image.shape} but there'
                     f' are {num_texts} text embeddings; pass one image index per caption.')
  check_finite('retrieval_metrics: image_embeds', image_embeds)
  check_finite('retrieval_metrics: text_embeds', text_embeds)
  if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
    raise ValueError(f'retrieval_metrics: text_to_image values must lie in [0, {num_images}) '
                     f'(the number of images); got [{text_to_image.min()}, '
                     f'{text_to_image.max()}].')
  captions_per_image = np.bincount(text_to_image, minlength=num_images)
  if np.any(captions_per_image == 0):
    missing = np.flatnonzero(captions_per_image == 0)[:5].tolist()
    raise ValueError(f'retrieval_metrics: images {missing}... have no caption in text_to_image, '
                     'so image->text recall could never hit them; drop those images.')

  if mesh is None:
    search = functools.partial(dense_topk, query_block_size=query_block_size)
  else:
    search = functools.partial(sharded_topk, mesh=mesh, gallery_axes=gallery_axes,
                               query_block_size=query_block_size)

  # Image -> text: a hit at k if any of the image's captions is among its k best texts.
  _, top_texts = search(image_embeds, text_embeds, min(max(ks), num_texts))
  i2t_match = text_to_image[top_texts] == np.arange(num_images)[:, None]  # [Ni, k]
  # Text -> image: a hit at k if the caption's own image is among its k best images.
  _, top_images = search(text_embeds, image_embeds, min(max(ks), num_images))
  t2i_match = top_images == text_to_image[:, None]  # [Nt, k]

  metrics = {}
  for k in ks:
    metrics[f'i2t_recall@{k}'] = float(np.mean(i2t_match[:, :k].any(axis=1)))
  for k in ks:
    metrics[f't2i_recall@{k}'] = float(np.mean(t2i_match[:, :k].any(axis=1)))
  return metrics


def retrieval_ceiling(
    texts: Sequence[str],
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
  """The highest recall@k any model can reach when several captions are the same string.

  A model embeds identical strings identically, so they tie in every ranking, and ties go to
  the lower index (this module's rule). Image->text: an image whose caption is the j-th copy
  (0-based, in index order) of its string ranks it j-th at best, a hit at k only if j < k; its
  best caption counts. Text->image: identical captions are one query with one ranking; its k
  best images can serve at most the copies whose images are among them, so a group scores at
  most the k largest per-image counts. E.g. 1,000 scenes with 503 distinct captions cap
  image->text and text->image R@1 at 0.503 however good the model: "chance 0.001" undersells
  the task, and a recall is read against it, not against 1.

  Args:
    texts: Nt caption strings, compared exactly.
    text_to_image: int [Nt], the image each caption describes; every image in
      [0, max + 1) needs at least one caption.
    ks: recall cut-offs, as in `retrieval_metrics`.

  Returns:
    {'i2t_recall@k': ceiling, 't2i_recall@k': ceiling}, the keys of `retrieval_metrics`.
  """
  text_to_image = np.asarray(text_to_image)
  if text_to_image.shape != (len(texts),):
    raise ValueError(f'retrieval_ceiling: text_to_image has shape {text_to_image.shape} but there '
                     f'are {len(texts)} texts; pass one image index per caption.')
  if not len(texts):
    raise ValueError('retrieval_ceiling: no texts; pass at least one caption.')
  num_images = int(text_to_image.max()) + 1
  if text_to_image.min() < 0 or np.any(np.bincount(text_to_image, minlength=num_images) == 0):
    raise ValueError('retrieval_ceiling: text_to_image must cover every image 0..N-1 with at '
                     'least one caption, as retrieval_metrics requires.')
  copies: dict[str, list[int]] = {}
  for index, text in enumerate(texts):
    copies.setdefault(text, []).append(index)
  position = np.empty(len(texts), np.int64)  # Which copy of its string each caption is.
  t2i_hits = {k: 0 for k in ks}
  for members in copies.values():
    position[members] = np.arange(len(members))
    per_image = np.sort(np.bincount(text_to_image[members]))[::-1]
    for k in ks:
      t2i_hits[k] += int(per_image[:k].sum())
  best_position = np.full(num_images, len(texts), np.int64)
  np.minimum.at(best_position, text_to_image, position)
  ceiling = {f'i2t_recall@{k}': float(np.mean(best_position < k)) for k in ks}
  ceiling.update({f't2i_recall@{k}': t2i_hits[k] / len(texts) for k in ks})
  return ceiling


# ----------------------------------------------------------------------------------------------
# Captioning: BLEU-4 and CIDEr-D via pycocoevalcap's scorers
# ----------------------------------------------------------------------------------------------


def tokenize_caption(text: str) -> str:
  """Lowercases, turns every punctuation character into a space, and collapses whitespace.

  Stands in for the COCO toolkit's PTB tokenizer, which needs Java. The difference from PTB is
  small but real (e.g. PTB splits "don't" into "do n't"; here it becomes "don t"), so scores are
  close to, not identical with, published COCO numbers.
  """
  return ' '.join(re.sub(r'[^\w\s]', ' ', text.lower()).split())


def caption_scores(
    predictions: Mapping[object, str],
    references: Mapping[object, Sequence[str]],
) -> dict[str, float]:
  """Corpus BLEU-4 and CIDEr-D of predicted captions against reference captions.

  Scoring uses pycocoevalcap (the COCO caption toolkit): `Bleu(4)` gives corpus-level BLEU-4
  (clipped n-gram precisions summed over the corpus, brevity penalty against the closest
  reference length); its `Cider` class is CIDEr-D (tf-idf n-gram cosine for n=1..4 with the
  candidate's counts clipped to the reference's, a Gaussian length penalty with sigma=6, x10).
  Document frequencies come from the references of THIS corpus, so CIDEr is only meaningful over
  many images: with a single image every idf is log(1) = 0 and CIDEr is 0.

  Args:
    predictions: id -> predicted caption.
    references: id -> list of reference captions (at least one); same ids as predictions.

  Returns:
    {'bleu4': float in [0, 1], 'cider': CIDEr-D, at most 10 per image}. Papers quote both x100
    (a CIDEr of 1.436 here is reported as "143.6").
  """
  # pycocoevalcap is imported lazily: it is a 100 MB wheel only captioning evals need.
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider

  if set(predictions) != set(references):
    missing = sorted(map(str, set(references) - set(predictions)))[:5]
    extra = sorted(map(str, set(predictions) - set(references)))[:5]
    raise ValueError('caption_scores: predictions and references must have the same ids; '
                     f'ids without a prediction: {missing}, ids without references: {extra}.')
  if not predictions:
    raise ValueError('caption_scores: no predictions to score.')
  for image_id, refs in references.items():
    if isinstance(refs, str) or len(refs) == 0:
      raise ValueError(f'caption_scores: references[{image_id!r}] must be a non-empty list of '
                       f'strings; got {refs!r}.')
  if len(predictions) == 1:
    warnings.warn('caption_scores: CIDEr over a single image is always 0 (idf = log 1); score '
                  'a corpus of images.', stacklevel=2)

  ids = list(predictions)
  tokenized_predictions = {i: [tokenize_caption(predictions[i])] for i in ids}
  tokenized_references = {i: [tokenize_caption(r) for r in references[i]] for i in ids}
  bleu_by_order, _ = Bleu(4).compute_score(tokenized_references, tokenized_predictions, verbose=0)
  cider, _ = Cider().compute_score(tokenized_references, tokenized_predictions)
  return {'bleu4': float(bleu_by_order[3]), 'cider': float(cider)}
