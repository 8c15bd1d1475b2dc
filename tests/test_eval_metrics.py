"""Specs for coca_jax.evaluation.metrics: zero-shot, retrieval (dense and sharded), captioning."""

import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from coca_jax.evaluation import metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Zero-shot classification
# ---------------------------------------------------------------------------------------------


def test_zero_shot_classifier_is_renormalised_mean_of_normalised_prompt_embeddings():
  prompt_vectors = {
      'a cat': np.array([3.0, 0.0, 0.0]),          # norm 3: must be normalised before averaging
      'photo of cat': np.array([0.0, 0.5, 0.0]),
      'a dog': np.array([0.0, 0.0, -2.0]),
      'photo of dog': np.array([0.0, 0.0, -7.0]),
  }
  calls = []

  def text_embed_fn(texts):
    calls.append(list(texts))
    return np.stack([prompt_vectors[t] for t in texts])

  classifier = metrics.zero_shot_classifier(text_embed_fn, ['cat', 'dog'], ['a {}', 'photo of {}'])

  assert classifier.shape == (2, 3) and classifier.dtype == np.float32
  # cat: mean of unit vectors e0 and e1 -> (e0 + e1) / sqrt(2), whatever their original norms.
  np.testing.assert_allclose(classifier[0], [1 / math.sqrt(2), 1 / math.sqrt(2), 0], atol=1e-6)
  np.testing.assert_allclose(classifier[1], [0, 0, -1], atol=1e-6)
  assert calls == [['a cat', 'photo of cat'], ['a dog', 'photo of dog']]


def test_zero_shot_classifier_rejects_template_without_placeholder():
  with pytest.raises(ValueError, match='placeholder'):
    metrics.zero_shot_classifier(lambda texts: np.ones((len(texts), 2)), ['cat'], ['a photo'])


def test_zero_shot_accuracy_counts_true_class_rank_and_clips_k():
  classifier = np.eye(6, dtype=np.float32)  # scores = image_embeds
  # Row i puts its true class (label) at a chosen rank: 0, 1, 3, 5.
  image_embeds = np.array([
      [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0, rank 0
      [0.1, 0.8, 0.9, 0.2, 0.3, 0.4],  # label 1, rank 1
      [0.9, 0.8, 0.7, 0.1, 0.6, 0.2],  # label 4, rank 3
      [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5, rank 5
  ], dtype=np.float32)
  labels = np.array([0, 1, 4, 5])

  accuracy = metrics.zero_shot_accuracy(image_embeds, classifier, labels, ks=(1, 2, 5, 10))

  assert accuracy == {'top1': 0.25, 'top2': 0.5, 'top5': 0.75, 'top10': 1.0}


def test_zero_shot_accuracy_of_collapsed_embeddings_is_chance_not_perfect():
  # All scores tie; ties go to the lower class index, so only class-0 images are "right".
  image_embeds = np.zeros((8, 4), np.float32)
  classifier = np.zeros((5, 4), np.float32)
  labels = np.array([0, 0, 1, 2, 3, 4, 4, 4])

  accuracy = metrics.zero_shot_accuracy(image_embeds, classifier, labels, ks=(1, 2))

  assert accuracy == {'top1': 2 / 8, 'top2': 3 / 8}


def test_transfer_splits_are_read_whole_with_their_own_prompts():
  """run_evals: each transfer split is classified with its entry of transfer_templates (else the
  group's templates) and read whole (`examples` limits the in-domain split alone)."""
  import ml_collections
  from coca_jax.evaluation import evaluators

  # Images are one-hot class vectors; a prompt embeds to its class's axis only when it names
  # the ink the images were drawn in ("dark"), else to the next class's axis.
  class Embedder:
    def embed_images(self, images):
      return np.eye(3)[images[:, 0, 0, 0]]

    def embed_texts(self, texts):
      return np.stack([np.eye(3)[(int(t[-1]) + (0 if "dark" in t else 1)) % 3] for t in texts])

  class Source:
    def __init__(self, labels):
      self.labels = np.asarray(labels)

    def batches(self, batch_size, limit=None):
      labels = self.labels[:limit]
      self.read = len(labels)
      yield {"image": labels[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3),
             "captions": [["x"]] * len(labels), "label": labels}

  sources = {"digits": Source([0, 1, 2, 0]), "far": Source([0, 1, 2, 2, 1, 0]),
             "near": Source([2, 1, 0])}
  evals = ml_collections.ConfigDict(dict(
      zeroshot=dict(enabled=True, dataset="", split="digits", examples=2,
                    class_names=["0", "1", "2"], templates=["a light {}"], class_names_file="",
                    templates_file="",
                    transfer_splits=["far", "near"], transfer_templates=[["a dark {}"], []]),
      retrieval=dict(enabled=False, split=""), captioning=dict(enabled=False, split="")))
  results = evaluators.run_evals(ml_collections.ConfigDict(dict(evals=evals)), Embedder(),
                                 lambda split, dataset: sources[split])
  assert results["eval/zeroshot_top1"] == 0.0  # Shared prompts: every class off by one.
  assert results["eval/zeroshot_far_top1"] == 1.0  # Its own prompt, all 6 digits read.
  assert results["eval/zeroshot_near_top1"] == 0.0  # [] = the shared prompts.
  assert results["eval/zeroshot_top5"] == results["eval/zeroshot_near_top5"] == 1.0
  assert [sources[s].read for s in ("digits", "far", "near")] == [2, 6, 3]


def test_zero_shot_accuracy_rejects_out_of_range_labels():
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\)'):
    metrics.zero_shot_accuracy(np.ones((2, 4)), np.ones((3, 4)), np.array([0, 3]))


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------

# 3 images, 6 captions, two per image, interleaved: image 0 <- texts 0, 3; 1 <- 1, 4; 2 <- 2, 5.
HAND_TEXT_TO_IMAGE = np.array([0, 1, 2, 0, 1, 2])
HAND_SIMILARITY = np.array([  # [images, texts], no ties within a row or a column
    # best own caption at rank 0 (text 0)
    [0.90, 0.20, 0.30, 0.10, 0.40, 0.45],
    # texts by score: 0, 2, 4, 3, 5, 1 -> own caption 4 at rank 2 (its other caption is last)
    [0.95, 0.10, 0.80, 0.60, 0.70, 0.50],
    # texts by score: 0, 1, 3, 4, 5, 2 -> own caption 5 at rank 4
    [0.85, 0.75, 0.05, 0.65, 0.55, 0.15],
], dtype=np.float32)


def test_retrieval_recall_on_hand_made_similarity_with_two_captions_per_image():
  # image_embeds @ eye.T reproduces the hand-made matrix, text_embeds @ image_embeds.T its transpose.
  recalls = metrics.retrieval_metrics(
      image_embeds=HAND_SIMILARITY, text_embeds=np.eye(6, dtype=np.float32),
      text_to_image=HAND_TEXT_TO_IMAGE, ks=(1, 2, 3, 5))

  # i2t: first own caption at ranks 0, 2, 4.
  assert recalls['i2t_recall@1'] == pytest.approx(1 / 3)
  assert recalls['i2t_recall@2'] == pytest.approx(1 / 3)
  assert recalls['i2t_recall@3'] == pytest.approx(2 / 3)
  assert recalls['i2t_recall@5'] == 1.0
  # t2i: rank of the caption's image in its column: t0 1, t1 2, t2 2, t3 2, t4 0, t5 2.
  assert recalls['t2i_recall@1'] == pytest.approx(1 / 6)
  assert recalls['t2i_recall@2'] == pytest.approx(2 / 6)
  assert recalls['t2i_recall@3'] == 1.0
  assert recalls['t2i_recall@5'] == 1.0  # k > 3 images is clipped to 3


def _brute_force_recalls(similarity, text_to_image, ks):
  """Reference: full stable sort of every row and column, first-hit rank."""
  num_images, num_texts = similarity.shape
  i2t_rank = np.empty(num_images, int)
  for image in range(num_images):
    order = np.argsort(-similarity[image], kind='stable')
    i2t_rank[image] = np.flatnonzero(text_to_image[order] == image)[0]
  t2i_rank = np.empty(num_texts, int)
  for text in range(num_texts):
    order = np.argsort(-similarity[:, text], kind='stable')
    t2i_rank[text] = np.flatnonzero(order == text_to_image[text])[0]
  out = {f'i2t_recall@{k}': float(np.mean(i2t_rank < k)) for k in ks}
  out.update({f't2i_recall@{k}': float(np.mean(t2i_rank < k)) for k in ks})
  return out


def test_retrieval_matches_brute_force_ranking_with_variable_captions_per_image():
  rng = np.random.default_rng(0)
  num_images = 20
  captions_per_image = rng.integers(1, 6, size=num_images)
  text_to_image = rng.permutation(np.repeat(np.arange(num_images), captions_per_image))
  image_embeds = rng.normal(size=(num_images, 8)).astype(np.float32)
  # Captions near their image so recall is neither 0 nor 1.
  text_embeds = image_embeds[text_to_image] + 1.2 * rng.normal(size=(len(text_to_image), 8))
  text_embeds = text_embeds.astype(np.float32)
  ks = (1, 5, 10)

  recalls = metrics.retrieval_metrics(image_embeds, text_embeds, text_to_image, ks=ks,
                                      query_block_size=7)

  expected = _brute_force_recalls(image_embeds @ text_embeds.T, text_to_image, ks)
  assert recalls == pytest.approx(expected)
  assert 0 < recalls['i2t_recall@1'] < 1 and 0 < recalls['t2i_recall@1'] < 1


def test_retrieval_rejects_image_without_caption():
  with pytest.raises(ValueError, match=r'images \[1\]'):
    metrics.retrieval_metrics(np.eye(3), np.eye(3)[:2], np.array([0, 2]))


def test_retrieval_ceiling_counts_identical_captions_on_hand_made_example():
  # Images 0..5; "a 1" is the caption of images 0, 2, 3; image 4 has two captions.
  texts = ['a 1', 'a 2', 'a 1', 'a 1', 'a 3', 'a 2', 'a 4']
  text_to_image = np.array([0, 1, 2, 3, 4, 4, 5])
  ceiling = metrics.retrieval_ceiling(texts, text_to_image, ks=(1, 2, 3))
  # i2t: copy index of each image's best caption: 0, 0, 1, 2, 0 ('a 3'), 0 -> hits at k=1: 4 of 6.
  assert ceiling['i2t_recall@1'] == pytest.approx(4 / 6)
  assert ceiling['i2t_recall@2'] == pytest.approx(5 / 6)
  assert ceiling['i2t_recall@3'] == 1.0
  # t2i: 'a 1' serves 1 / 2 / 3 of its copies at k = 1 / 2 / 3; 'a 2' (images 1, 4) 1 / 2 / 2.
  assert ceiling['t2i_recall@1'] == pytest.approx(4 / 7)
  assert ceiling['t2i_recall@2'] == pytest.approx(6 / 7)
  assert ceiling['t2i_recall@3'] == 1.0


def test_a_perfect_model_reaches_exactly_the_retrieval_ceiling():
  # The best any model can do: identical captions embed identically and each image embeds as
  # its caption. retrieval_metrics on that model must equal the ceiling computed from the
  # strings alone, at every k, and fall below 1 because of the ties.
  rng = np.random.default_rng(3)
  vocabulary = [f'a {colour} {digit}' for colour in ('red', 'blue') for digit in range(4)]
  texts = [vocabulary[i] for i in rng.integers(len(vocabulary), size=40)]
  text_to_image = np.arange(40)
  basis = np.eye(len(vocabulary), dtype=np.float32)
  text_embeds = basis[[vocabulary.index(t) for t in texts]]
  ks = (1, 2, 5, 10)

  measured = metrics.retrieval_metrics(text_embeds, text_embeds, text_to_image, ks=ks)
  ceiling = metrics.retrieval_ceiling(texts, text_to_image, ks=ks)

  assert measured == pytest.approx(ceiling)
  assert ceiling['i2t_recall@1'] == pytest.approx(len(set(texts)) / 40)
  assert ceiling['i2t_recall@1'] < 1


def test_retrieval_ceiling_is_one_without_duplicate_captions():
  texts = [f'caption {i}' for i in range(5)]
  ceiling = metrics.retrieval_ceiling(texts, np.arange(5), ks=(1,))
  assert ceiling == {'i2t_recall@1': 1.0, 't2i_recall@1': 1.0}
  with pytest.raises(ValueError, match='every image'):
    metrics.retrieval_ceiling(['a', 'b'], np.array([0, 2]))


def test_sharded_topk_on_one_device_mesh_equals_dense():
  rng = np.random.default_rng(1)
  queries = rng.normal(size=(9, 4)).astype(np.float32)
  gallery = rng.normal(size=(13, 4)).astype(np.float32)
  mesh = jax.make_mesh((1,), ('data',))

  sharded_scores, sharded_indices = metrics.sharded_topk(queries, gallery, 5, mesh=mesh)
  dense_scores, dense_indices = metrics.dense_topk(queries, gallery, 5)

  np.testing.assert_array_equal(sharded_indices, dense_indices)
  np.testing.assert_allclose(sharded_scores, dense_scores, rtol=1e-6)


_EIGHT_DEVICE_SCRIPT = textwrap.dedent('''
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from coca_jax.evaluation import metrics

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    mesh_1d = jax.make_mesh((8,), ('data',))
    mesh_2d = jax.make_mesh((4, 2), ('data', 'model'))

    def check_topk(queries, gallery, k, **kwargs):
      dense_scores, dense_indices = metrics.dense_topk(queries, np.asarray(gallery), k)
      scores, indices = metrics.sharded_topk(queries, gallery, k, **kwargs)
      assert indices.max() < gallery.shape[0], 'a padding row was returned'
      np.testing.assert_array_equal(indices, dense_indices)
      np.testing.assert_allclose(scores, dense_scores, rtol=1e-5, atol=1e-6)

    queries = rng.normal(size=(11, 6)).astype(np.float32)
    gallery = rng.normal(size=(37, 6)).astype(np.float32)  # 37 rows: not divisible by 8
    check_topk(queries, gallery, 10, mesh=mesh_1d, query_block_size=4)
    check_topk(queries, gallery, 37, mesh=mesh_2d)               # k = whole gallery
    check_topk(queries, gallery[:5], 5, mesh=mesh_1d)            # fewer rows than shards
    check_topk(queries, gallery, 3, mesh=mesh_2d, gallery_axes='model')
    # Ties: duplicated rows must resolve to the lower index exactly as the dense search does.
    tied = np.concatenate([gallery[:6]] * 4)[:23]
    check_topk(queries, tied, 9, mesh=mesh_1d)
    # A gallery already sharded by rows: the mesh and axis come from its sharding.
    presharded = jax.device_put(gallery[:32], NamedSharding(mesh_2d, P('data')))
    check_topk(queries, presharded, 7)
    # A jax.Array on one device with 37 rows: padded on device, then spread over the mesh.
    check_topk(queries, jax.numpy.asarray(gallery), 9, mesh=mesh_1d)

    # retrieval_metrics with mesh= equals the dense version, several captions per image.
    num_images = 13
    text_to_image = rng.permutation(np.repeat(np.arange(num_images),
                                              rng.integers(1, 5, size=num_images)))
    image_embeds = rng.normal(size=(num_images, 6)).astype(np.float32)
    text_embeds = (image_embeds[text_to_image]
                   + rng.normal(size=(len(text_to_image), 6))).astype(np.float32)
    dense = metrics.retrieval_metrics(image_embeds, text_embeds, text_to_image)
    for mesh in (mesh_1d, mesh_2d):
      sharded = metrics.retrieval_metrics(image_embeds, text_embeds, text_to_image, mesh=mesh,
                                          query_block_size=8)
      assert sharded == dense, (sharded, dense)
    print('OK', dense)
''')


def test_sharded_retrieval_equals_dense_on_eight_cpu_devices():
  # A fresh process: this one may already have initialised jax with a single CPU device.
  env = dict(os.environ, XLA_FLAGS=os.environ.get('XLA_FLAGS', '') +
      ' --xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu',
             JAX_ENABLE_COMPILATION_CACHE='false',  # see test_sharding
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]))
  result = subprocess.run([sys.executable, '-c', _EIGHT_DEVICE_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'OK' in result.stdout


# ---------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------


def test_tokenize_caption_lowercases_and_strips_punctuation():
  assert metrics.tokenize_caption('  A red 3, left of a GREEN 7. ') == 'a red 3 left of a green 7'


def test_caption_scores_identical_and_disjoint_captions():
  references = {'a': ['a red 3 left of a blue 7'], 'b': ['two green digits side by side']}

  identical = metrics.caption_scores({'a': 'A red 3 left of a blue 7.',
                                      'b': 'two green digits side by side'}, references)
  disjoint = metrics.caption_scores({'a': 'zebra yak xylophone wombat',
                                     'b': 'vulture urchin tapir seal'}, references)

  assert identical['bleu4'] == pytest.approx(1.0, abs=1e-6)
  # CIDEr-D of a candidate equal to its only reference: cosine 1 at every n-gram order, x10.
  assert identical['cider'] == pytest.approx(10.0, abs=1e-6)
  assert disjoint['bleu4'] == pytest.approx(0.0, abs=1e-6)
  assert disjoint['cider'] == 0.0


def test_bleu4_hand_computed_precisions_and_brevity_penalty():
  # Candidate vs reference "a red 3 left of a blue 7" (8 words, brevity penalty 1):
  # clipped 1..4-gram precisions 7/8, 5/7, 4/6, 3/5 -> BLEU-4 = (1/4) ** (1/4) = 1/sqrt(2).
  # The same pair twice: corpus sums double numerator and denominator alike.
  reference = ['a red 3 left of a blue 7']
  scores = metrics.caption_scores({0: 'a red 3 left of a green 7', 1: 'A red 3 left of a GREEN 7!'},
                                  {0: reference, 1: reference})
  assert scores['bleu4'] == pytest.approx(1 / math.sqrt(2), rel=1e-6)

  # A 6-word prefix: every precision is 1; the closest reference length is 8 (not 12), so the
  # brevity penalty is exp(1 - 8/6).
  references = ['a red 3 left of a blue 7', 'there is a red 3 and to its right a blue 7']
  scores = metrics.caption_scores({0: 'a red 3 left of a', 1: 'a red 3 left of a'},
                                  {0: references, 1: references})
  assert scores['bleu4'] == pytest.approx(math.exp(1 - 8 / 6), rel=1e-6)


def test_cider_is_cider_d_with_clipping_and_length_penalty():
  # Two images, so every n-gram seen in one image's references has idf log(2/1); so has an
  # n-gram never seen (df floored at 1). With equal weights the tf-idf cosine reduces to counts.
  # Image A: candidate adds one word to its reference -> cosines per n = matches/sqrt(|c||r|):
  #   n=1 4/sqrt(5*4), n=2 3/sqrt(4*3), n=3 2/sqrt(3*2), n=4 1/sqrt(2*1); length gap 1 ->
  #   Gaussian penalty exp(-1 / (2 * 6**2)).
  # Image B: "u" repeated 4 times vs one "u" in the reference: clipping caps its tf-idf at the
  #   reference's, cosine (1*1)/(4*2) = 1/8 at n=1 (unclipped it would be 4/8); no n>1 matches.
  predictions = {'A': 'p q r s t', 'B': 'u u u u'}
  references = {'A': ['p q r s'], 'B': ['u v w x']}
  cosines_a = [4 / math.sqrt(20), 3 / math.sqrt(12), 2 / math.sqrt(6), 1 / math.sqrt(2)]
  cider_a = 10 * math.exp(-1 / 72) * sum(cosines_a) / 4
  cider_b = 10 * (1 / 8) / 4

  scores = metrics.caption_scores(predictions, references)

  assert scores['cider'] == pytest.approx((cider_a + cider_b) / 2, rel=1e-9)


def test_caption_scores_validates_ids_and_warns_on_single_image():
  with pytest.raises(ValueError, match='same ids'):
    metrics.caption_scores({'a': 'x'}, {'a': ['x'], 'b': ['y']})
  with pytest.raises(ValueError, match='non-empty list'):
    metrics.caption_scores({'a': 'x'}, {'a': 'x'})
  with pytest.warns(UserWarning, match='single image'):
    scores = metrics.caption_scores({'a': 'a red 3'}, {'a': ['a red 3']})
  assert scores['cider'] == 0.0  # idf log(1) = 0: why a single image is useless for CIDEr
