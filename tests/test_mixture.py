"""Mixture spec: exact proportions, host-independent global batches, bitwise resume, labels as
text, one source == the one-source pipeline, per-source metrics of the step."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from coca_jax.core import config as config_lib
from coca_jax.data import builders
from coca_jax.data import mixture
from coca_jax.data import pipeline
from coca_jax.data import sources as data_sources
from coca_jax.data.tokenizer import Tokenizer, load_tokenizer
from coca_jax.evaluation import prompts
from coca_jax.training import losses
from coca_jax.training import step as step_lib
from conftest import REPO, random_batch, smoke_config

IMAGE_SIZE = 16
MAX_LEN = 12
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}.", "the number {}."]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A tiny demo build: 30 captioned scenes ("train") and 12 labelled digits ("digits")."""
  root = tmp_path_factory.mktemp("mixture")
  builder = builders.make_builder("demo", "tiny_mix", str(root / "tfds"), num_train=30,
                                  num_test=4, num_digits=12, image_size=24, show_progress=False)
  builder.download_and_prepare()
  source = data_sources.open_source("tiny_mix", str(root / "tfds"), "train", decode_images=False)
  captions = [c.decode() for i in range(len(source)) for c in source[i]["captions"]]
  Tokenizer.train(captions + [t.format(d) for t in TEMPLATES for d in DIGITS],
                  str(root / "sp"), vocab_size=100, model_type="bpe")
  return root


def _config(root, sources, batch_size=8, **evals):
  return config_lib.complete(ml_collections.ConfigDict(dict(
      data=dict(name="tiny_mix", data_dir=str(root / "tfds"), image_size=IMAGE_SIZE,
                tokenizer=str(root / "sp.model"), sources=sources),
      model=dict(text=dict(max_len=MAX_LEN)),
      train=dict(batch_size=batch_size, seed=3),
      evals=dict(zeroshot=dict(evals)))))


SCENES = dict(name="tiny_mix", tag="scenes", weight=3.0)
LABELS = dict(name="tiny_mix", tag="digits", split="digits", weight=1.0, text="labels",
              templates=TEMPLATES, class_names=DIGITS)


def _batches(root, sources, shard_index=0, shard_count=1, batch_size=8, **data):
  config = _config(root, sources, batch_size)
  config.data.update(data)
  return mixture.MixtureBatches(
      pipeline.DataOptions.from_config(config), mixture.sources_of(config),
      shard_index=shard_index, shard_count=shard_count, class_names=prompts.class_names)


def test_realised_proportions_stay_within_one_example_of_the_weights():
  for weights in ([3.0, 1.0], [0.7, 0.2, 0.1], [1.0, 1.0]):
    order = mixture.mixed_order(weights)
    share = np.asarray(weights) / sum(weights)
    counts = np.zeros(len(weights))
    next_position = [0] * len(weights)
    for t in range(4000):
      source, position = order[t]
      # Each source is read in its own order, position after position.
      assert position == next_position[source]
      next_position[source] += 1
      counts[source] += 1
      assert np.abs(counts - (t + 1) * share).max() <= 1.0 + 1e-9, (weights, t)


def test_batches_mix_sources_by_weight_and_say_which(dataset):
  batches = _batches(dataset, [SCENES, LABELS])
  for n in (0, 5):  # Read from grain's closed form directly: the interleave's own rows.
    assert batches.rows(n) == [batches.order[t] for t in range(n * 8, n * 8 + 8)]
  sources = np.concatenate([batches.host_batch(n)["source"] for n in range(6)])
  assert sources.shape == (48, 2) and (sources.sum(axis=1) == 1).all()
  np.testing.assert_array_equal(sources.sum(axis=0), [36, 12])  # 3:1 of 48 rows
  keys = np.concatenate([batches.host_batch(n)["key"] for n in range(6)])
  # The label rows are the "digits" split's examples, each epoch of it complete.
  digits = data_sources.open_source("tiny_mix", str(dataset / "tfds"), "digits",
                                decode_images=False)
  want = sorted(digits[i]["key"].decode() for i in range(len(digits)))
  assert sorted(keys[sources[:, 1] == 1]) == want


@pytest.mark.parametrize("in_memory,crop", [("never", True), ("always", True),
                                             ("always", False)])
def test_one_source_is_the_one_source_pipeline_bit_for_bit(dataset, in_memory, crop):
  config = _config(dataset, [dict(name="tiny_mix", weight=1.0)], batch_size=6)
  config.data.in_memory = in_memory  # decoded per row, or from the decoded copy
  config.data.random_resized_crop = crop
  options = pipeline.DataOptions.from_config(config)
  loader = iter(pipeline.make_host_loader(options, shard_index=0, shard_count=1))
  batches = mixture.MixtureBatches(options, mixture.sources_of(config))
  assert (batches.readers[0].decoded is not None) == (in_memory == "always")
  for n in range(7):  # past the end of the first epoch (30 records, 6 per batch)
    want, got = next(loader), batches.host_batch(n)
    for key in ("image", "text", "key"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"batch {n} {key}")


def test_hosts_read_their_rows_of_the_same_global_batches(dataset):
  whole = _batches(dataset, [SCENES, LABELS])
  halves = [_batches(dataset, [SCENES, LABELS], shard_index=p, shard_count=2) for p in (0, 1)]
  for n in (0, 1, 5):
    want = whole.host_batch(n)
    got = [h.host_batch(n) for h in halves]
    for key in ("image", "text", "source", "key"):
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key],
                                    err_msg=f"batch {n} {key}")


def test_resume_mid_mixture_gives_the_next_batches(dataset):
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  shardings = {"image": data, "text": data}  # "source" is split as "text" is
  batch_size = 4 * jax.device_count()
  config = _config(dataset, [SCENES, LABELS], batch_size)
  run = mixture.make_mixture_iterator(config, shardings, class_names=prompts.class_names)
  uninterrupted = [next(run) for _ in range(5)]
  saved = run.sampler
  assert {"global_batch_size", "seed", "num_records"} <= set(vars(saved))
  run.close()
  resumed = mixture.make_mixture_iterator(config, shardings, class_names=prompts.class_names)
  next(resumed)  # moved elsewhere first: the restore must rewind it
  resumed.set_position(2)  # what a checkpoint restore does (pipeline.PositionHandler)
  for want in uninterrupted[2:]:
    got = next(resumed)
    assert set(got) == {"image", "text", "source"}
    for key in got:
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
  resumed.close()


def test_label_texts_are_the_templates_applied_to_the_class_names(dataset):
  batches = _batches(dataset, [LABELS])
  reader = batches.readers[0]
  used = set()
  tokenizer = load_tokenizer(str(dataset / "sp.model"), "sentencepiece")
  for n in range(6):
    texts = batches.host_texts(n)
    for (_, position), text in zip(batches.rows(n), texts):
      metadata = reader.order[position]
      label = int(reader.data[metadata.record_key]["label"])
      # The template is drawn from the example's own generator, first.
      template = TEMPLATES[int(metadata.rng.integers(len(TEMPLATES)))]
      assert text == template.format(DIGITS[label])
      used.add(template)
    np.testing.assert_array_equal(batches.host_batch(n)["text"],
                                  tokenizer.tokenize(texts, MAX_LEN))
  assert used == set(TEMPLATES)
  # Read from the decoded copy (above) or decoded per row: the same batches.
  assert batches.readers[0].decoded is not None
  streamed = _batches(dataset, [LABELS], in_memory="never")
  for n in range(3):
    want, got = batches.host_batch(n), streamed.host_batch(n)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  # A multi-label example joins its names; one template is used as it is.
  single = _batches(dataset, [dict(LABELS, templates=["a photo of a {}."],
                                   label_join=" and ")]).readers[0]
  rng = np.random.default_rng(0)
  assert single.label_text(np.array([1, 3]), rng) == "a photo of a one and three."


def test_a_mixture_tokenizer_learns_the_texts_of_every_source(dataset):
  # A mixture run without a tokenizer trains one on what it will train on: each caption of the
  # caption sources and each labelled example's text (templates taken in turn).
  config = _config(dataset, [SCENES, LABELS])
  texts = mixture.tokenizer_texts(config, prompts.class_names)
  scenes = data_sources.open_source("tiny_mix", str(dataset / "tfds"), "train",
                                    decode_images=False)
  digits = data_sources.open_source("tiny_mix", str(dataset / "tfds"), "digits",
                                    decode_images=False)
  captions = [c.decode() for i in range(len(scenes)) for c in scenes[i]["captions"]]
  labelled = [TEMPLATES[i % 2].format(DIGITS[int(digits[i]["label"])])
              for i in range(len(digits))]
  assert texts == captions + labelled
  with pytest.raises(ValueError, match=r"sources\[1\].*class name"):
    mixture.tokenizer_texts(_config(dataset, [SCENES, dict(LABELS, class_names=DIGITS[:2])]),
                            prompts.class_names)


def test_a_label_text_that_would_be_cut_or_read_as_another_class_fails_at_the_start(dataset):
  tokenizer = load_tokenizer(str(dataset / "sp.model"), "sentencepiece")
  # Words the tokenizer never saw fall apart into many pieces: the text overflows max_len and
  # would lose the class name, so every class would read the same.
  long = "a blurry photograph of the handwritten digit {}."
  count = len(tokenizer.encode(long.format("zero"))) + 2
  assert count > MAX_LEN
  with pytest.raises(ValueError) as error:
    _batches(dataset, [SCENES, dict(LABELS, templates=[TEMPLATES[0], long])])
  message = str(error.value)
  for part in ("config.data.sources[1] (tag 'digits')", repr(long), "class 0 'zero'",
               f"takes {count} tokens", f"config.model.text.max_len={MAX_LEN}",
               "a shorter template", "config.data.tokenizer_vocab"):
    assert part in message, (part, message)
  # Two class names the tokenizer reads alike (characters it has no piece for: both unknown).
  names = ["\u00f8", "\u00e6", *DIGITS[2:]]
  assert tokenizer.encode(names[0]) == tokenizer.encode(names[1])
  with pytest.raises(ValueError, match=r"the classes 0 '\u00f8' and 1 '\u00e6' give the same "
                     r"token ids"):
    _batches(dataset, [dict(LABELS, class_names=names)])


def test_caption_sources_report_how_many_captions_max_len_cuts(dataset):
  tokenizer = load_tokenizer(str(dataset / "sp.model"), "sentencepiece")
  batches = _batches(dataset, [SCENES, LABELS])
  for max_len in (6, MAX_LEN):
    counts = mixture.report_truncated_captions(batches.readers, tokenizer, max_len)
    captions = batches.readers[0].captions
    before = tokenizer.num_truncated
    tokenizer.tokenize(captions, max_len)  # What training does to each of them.
    assert counts == {"scenes": (tokenizer.num_truncated - before, len(captions))}
  assert counts["scenes"][0] == 0 < mixture.report_truncated_captions(
      batches.readers, tokenizer, 6)["scenes"][0]


def test_a_label_source_that_is_a_zero_shot_split_warns(dataset):
  overlapping = _config(dataset, [SCENES, LABELS], split="digits")
  (message,) = mixture.zero_shot_overlaps(overlapping)
  assert "sources[1]" in message and "'digits'" in message and "tiny_mix" in message
  assert not mixture.zero_shot_overlaps(_config(dataset, [SCENES, LABELS], split="test"))
  assert not mixture.zero_shot_overlaps(_config(dataset, [SCENES], split="digits"))


def test_config_names_a_bad_source_field():
  config = smoke_config()
  config.data.sources = [dict(name="tiny_mix", weigth=1.0),
                         dict(name="tiny_mix", weight=-1.0, text="label")]
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  text = str(e.value)
  assert "config.data.sources[0].weigth is not a source field (did you mean weight?)" in text
  assert "config.data.sources[0].weight is required" in text
  assert "config.data.sources[1].weight=-1.0 must be > 0" in text
  assert "config.data.sources[1].text='label' is unknown" in text


def test_per_source_metrics_are_each_sources_own_caption_loss():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(6, 5, 11)), jnp.float32)
  text = rng.integers(3, 11, size=(6, 6)).astype(np.int32)
  text[:, 4:] = 0  # pads, more in some rows
  text[1, 2:] = 0
  source = np.eye(2, dtype=np.int32)[[0, 1, 1, 0, 1, 1]]
  batch = {"text": jnp.asarray(text), "source": jnp.asarray(source)}
  plan = step_lib._caption_plan(batch, None, None)
  _, sums, _ = step_lib._caption_sums(None, None, {"caption_logits": logits}, batch, {}, batch,
                                      label_smoothing=0.0)
  metrics = {**{k: v / plan["count"] for k, v in sums.items()}, **plan["metrics"]}
  metrics = step_lib.source_metrics(metrics, batch, ("scenes", "digits"))
  for column, name in enumerate(("scenes", "digits")):
    rows = source[:, column] == 1
    want, _ = losses.caption_loss(logits[rows], jnp.asarray(text[rows, 1:]))
    np.testing.assert_allclose(metrics[f"loss/{name}"], want, rtol=1e-6)
    assert metrics[f"examples/{name}"] == rows.sum()
  assert "source_caption_sums" not in metrics


def test_paper_configs_take_the_papers_mixture():
  config = config_lib.load_config(os.path.join(REPO, "experiments", "coca_2b.py")
                                  + ":mixture=labels:jft+alt_text:align")
  labels, alt_text = config.data.sources
  assert (labels["name"], labels["text"], alt_text["name"]) == ("jft", "labels", "align")
  # ~5 epochs of JFT-3B (3.0B) and ~10 of ALIGN (1.8B): 15B : 18B examples.
  assert labels["weight"] / alt_text["weight"] == pytest.approx(15 / 18)
  assert config.data.name == "align"
  config_lib.validate(config)
  with pytest.raises(ValueError, match="labels:NAME or alt_text:NAME"):
    config_lib.load_config(os.path.join(REPO, "experiments", "coca_base.py")
                           + ":mixture=jft:x")


def test_per_source_metrics_are_exact_under_gradient_accumulation(tiny_model, tiny_params,
                                                                  tiny_config):
  batch = random_batch(tiny_config, 8)
  plain = dict(batch)
  batch["source"] = jnp.asarray(np.eye(2, dtype=np.int32)[[0, 1, 0, 0, 1, 0, 1, 0]])
  loss_config = tiny_config.loss

  @jax.jit
  def all_three(p):
    without = step_lib.loss_fn(p, tiny_model, plain, loss_config)
    whole = step_lib.loss_fn(p, tiny_model, batch, loss_config)
    (_, micro), _ = step_lib.accumulated_loss_and_grads(p, tiny_model, batch, loss_config, 2)
    return without, whole, micro

  (loss0, m0), (loss1, m1), m2 = all_three(tiny_params)
  assert float(loss1) == float(loss0)  # the source column changes no loss
  names = ("a", "b")
  m1, m2 = (step_lib.source_metrics(m, batch, names) for m in (m1, m2))
  for key in ("loss/a", "loss/b", "examples/a", "examples/b"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
  assert (float(m1["examples/a"]), float(m1["examples/b"])) == (5.0, 3.0)


def test_the_demo_label_texts_and_transfer_prompts_keep_their_digit():
  # The mixture demo's labelled digits teach only through the digit in their text: a template
  # tokenised past config.model.text.max_len is cut before it ("a photo of the digit {}." was:
  # 18 pieces with the demo's 64). The tokenizer is trained as the demo's run trains it, on
  # the captions and the label texts (a sample, in the demo's 4:1 proportion of 20,000 scenes
  # to 5,000 labelled digits; the same words, so the same pieces).
  from coca_jax.data import digit_scenes  # heavy: pulls in scikit-learn.

  config = config_lib.load_config(os.path.join(REPO, "experiments", "demo.py") + ":mixture")
  labels = config.data.sources[1]
  options = config.data.build_demo_options
  assert options.num_train == 4 * options.num_train_digits
  captions = digit_scenes.make_scenes("train", 400, seed=0, grid=8)["caption"]
  names, templates = labels["class_names"], labels["templates"]
  label_texts = [templates[i % len(templates)].format(names[i % len(names)]) for i in range(100)]
  tokenizer = Tokenizer.train(captions + label_texts, vocab_size=config.data.tokenizer_vocab,
                              model_type=config.data.tokenizer_type)
  max_len = config.model.text.max_len
  used = list(labels["templates"]) + [t for split in config.evals.zeroshot.transfer_templates
                                      for t in split]
  assert len(config.evals.zeroshot.transfer_templates) == len(config.evals.zeroshot.transfer_splits)
  for template in used:
    for name in names:
      text = template.format(name)
      assert len(tokenizer.encode(text)) + 2 <= max_len, (text, tokenizer.encode(text))  # BOS, EOS
      row = tokenizer.tokenize([text], max_len)[0]
      assert tokenizer.decode(row.tolist()).strip() == text
