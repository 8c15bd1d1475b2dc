"""VLMo's objectives and stages: BERT's MLM masking, the MLM loss against the official module's
(committed fixtures, tests/data/make_vlmo_fixtures.py), both ITC terms with VLMo's reduction, and
the parameters each stage of experiments/vlmo_base.py trains against vlmo/run.py's list."""

import copy
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from coca_jax.core import config as config_lib
from coca_jax.data import build as build_cli
from coca_jax.data import pipeline
from coca_jax.core.tokens import PAD_ID
from coca_jax.interop import vlmo
from coca_jax.training import losses
from coca_jax.training import optim
from coca_jax.training import step as step_lib
from coca_jax.training import warm_start
from test_vlmo import OUT, TOL, _state, _tiny_config, _tiny_model, _tiny_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny fixture's special ids: [CLS]=2, [SEP]=3, [MASK]=4 (and [UNK]=1).
TINY_MLM = dict(mlm_mask_id=4, mlm_special_ids=[1, 2, 3, 4])
# vlmo/run.py, text-only MLM (stage 2): only parameters whose official name holds one of these
# train.
RUN_PY_TRAINABLE = ("text_embeddings", "token_type_embeddings", "mlp_text", "norm2_text",
                    "mlm_score", "relative_position_bias_table", "transformer.norm")


# -- MLM masking ---------------------------------------------------------------------------------


def test_mlm_masking_is_berts_80_10_10_and_never_touches_specials():
  rng = np.random.default_rng(0)
  text = rng.integers(5, 1000, (512, 64)).astype(np.int32)
  text[:, 0], text[:, 40] = 2, 3  # [CLS] .. [SEP]
  text[:, 41:] = PAD_ID
  text[::7, 10] = 1  # some [UNK]
  text = jnp.asarray(text)
  mask = lambda key: losses.mlm_mask(text, jax.random.key(key), probability=0.15, mask_id=4,
                                     vocab_size=1000, special_ids=(1, 2, 3, 4))
  inputs, labels = mask(0)
  picked = np.asarray(labels != PAD_ID)
  eligible = np.asarray((text != PAD_ID) & (text > 4))
  assert not (picked & ~eligible).any()  # Never padding, [CLS], [SEP], [UNK].
  np.testing.assert_array_equal(np.asarray(labels)[picked], np.asarray(text)[picked])
  assert abs(picked.sum() / eligible.sum() - 0.15) < 0.01
  inputs, text_np = np.asarray(inputs), np.asarray(text)
  masked = picked & (inputs == 4)
  changed = picked & (inputs != 4) & (inputs != text_np)
  np.testing.assert_array_equal(inputs[~picked], text_np[~picked])  # Unpicked tokens stay.
  # 80% [MASK], 10% a random id (1 in 1000 random draws hits the original), 10% kept.
  assert abs(masked.sum() / picked.sum() - 0.8) < 0.02
  assert abs(changed.sum() / picked.sum() - 0.1) < 0.015
  again, _ = mask(0)
  other, _ = mask(1)
  np.testing.assert_array_equal(np.asarray(again), inputs)  # Deterministic in the step rng.
  assert (np.asarray(other) != inputs).any()


# -- MLM loss and both ITC terms against the official module -------------------------------------


@pytest.fixture(scope="module")
def stage3():
  """The tiny official module's weights under VLMo's stage-3 losses (no drop-path: the
  fixture's outputs are deterministic)."""
  config = _tiny_config()
  config.model.mome.drop_path_rate = 0.0
  config.loss.update(TINY_MLM)
  config_lib.validate(config)
  model = step_lib.build_model(config)
  return config, model, vlmo.import_params(_state(), config)


def _official_rows():
  labels = OUT["mlm_labels"]
  return {"inputs": jnp.asarray(OUT["mlm_text"]),
          "labels": jnp.asarray(np.where(labels < 0, PAD_ID, labels))}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "text_only"])
def test_mlm_loss_equals_the_official_cross_entropy(stage3, fused):
  """objectives.compute_mlm (fused pass, stage 3) and compute_textonly_mlm (stage 2): the mean
  cross-entropy over the collator's labelled positions, from the official module's weights."""
  _, model, params = stage3
  batch = {"image": jnp.asarray(OUT["image"]), "text": jnp.asarray(OUT["text"])}
  if not fused:
    batch.pop("image")
  total, sums, _ = step_lib._mlm_sums(params, model, {}, batch, _official_rows(), batch)
  count = int(np.sum(OUT["mlm_labels"] >= 0))
  official = OUT["fused_mlm_loss" if fused else "text_mlm_loss"]
  np.testing.assert_allclose(total / count, official, **TOL)
  logits = OUT["fused_mlm_logits" if fused else "text_mlm_logits"]
  where = OUT["mlm_labels"] >= 0
  right = np.sum(np.argmax(logits, -1)[where] == OUT["mlm_labels"][where])
  assert float(sums["mlm_accuracy"]) == right


def _mlm_rows(picks, length, vocab, logits, rng):
  """MLM labels [len(picks), length]: row r has picks[r] picked positions, half labelled with
  the row's top logit (right predictions) and half with a random id; PAD_ID elsewhere."""
  labels = np.full((len(picks), length), PAD_ID, np.int32)
  for row, n in enumerate(picks):
    where = rng.choice(length, n, replace=False)
    right = np.argmax(logits[row, where], -1)
    labels[row, where] = np.where(rng.random(n) < 0.5, right, rng.integers(1, vocab, n))
  return jnp.asarray(labels)


@pytest.mark.parametrize("over_bound", [False, True], ids=["gathered", "row_over_bound"])
def test_mlm_head_on_picked_positions_equals_every_position(over_bound):
  """The step runs MLM's vocabulary head on `mlm_positions_bound` slots per row, each row's
  picked tokens first: the summed loss, the right predictions and the gradients equal those of
  the head on every position. A row with more picked tokens than the bound (rare under the
  masking rule, but possible) loses none: the batch is then scored on every position."""
  rng = np.random.default_rng(0)
  batch, length, width, vocab = 3, 40, 8, 50
  bound = losses.mlm_positions_bound(length, 0.15)
  assert 6 < bound < length  # 15% of 40 is 6 on average.
  tokens = jnp.asarray(rng.standard_normal((batch, length, width)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((width, vocab)), jnp.float32)
  no_pad = jnp.zeros((vocab,)).at[PAD_ID].set(-1e3)  # No right prediction is the padding id.
  head = lambda kernel, t: t @ kernel + no_pad
  picks = [5, bound + 3 if over_bound else bound, 0]
  labels = _mlm_rows(picks, length, vocab, np.asarray(head(kernel, tokens)), rng)
  assert list(np.sum(np.asarray(labels) != PAD_ID, 1)) == picks

  def sums(kernel, tokens, bound):
    total, hits = losses.mlm_sums(lambda t: head(kernel, t), tokens, labels, bound)
    return total, hits
  grad = jax.jit(jax.value_and_grad(sums, argnums=(0, 1), has_aux=True), static_argnums=2)
  (total, hits), grads = grad(kernel, tokens, bound)
  (every_total, every_hits), every_grads = grad(kernel, tokens, None)
  assert float(every_hits) >= 3  # Some right predictions to count.
  assert float(hits) == float(every_hits)
  np.testing.assert_allclose(total, every_total, rtol=1e-6)
  for a, b in zip(grads, every_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mlm_positions_bound_follows_the_masking_rate():
  """The bound is the binomial tail of the masking rule: at VLMo's 15% a 40-token text (stage 3)
  is scored on 19 slots, a 196-token one (stage 2) on 55; it never exceeds the length."""
  assert losses.mlm_positions_bound(40, 0.15) == 19
  assert losses.mlm_positions_bound(196, 0.15) == 55
  assert losses.mlm_positions_bound(8, 0.5) == 8
  assert losses.mlm_positions_bound(8, 1.0) == 8


def test_mlm_step_sums_equal_the_all_positions_sums(stage3):
  """The training step's MLM term (head on the picked positions) against the head on every
  position, through the tiny official model's fused pass: same loss, same accuracy."""
  _, model, params = stage3
  batch = {"image": jnp.asarray(OUT["image"]), "text": jnp.asarray(OUT["text"])}
  rows = _official_rows()
  total, sums, _ = step_lib._mlm_sums(params, model, {}, batch, rows, batch, probability=0.15)
  every_total, every_sums, _ = step_lib._mlm_sums(params, model, {}, batch, rows, batch)
  np.testing.assert_allclose(total, every_total, rtol=1e-6)
  assert float(sums["mlm_accuracy"]) == float(every_sums["mlm_accuracy"])


def test_vlmo_loss_is_its_weighted_terms(stage3):
  """Stage 3: 0.5 x ITC + 0.5 x ITC on the VL-FFN features (each its own scale, the mean of i2t
  and t2i, as vlmo/objectives.py's compute_itc) + ITM + 0.25 x MLM, with mlm_accuracy logged."""
  config, model, params = stage3
  batch = {"image": jnp.asarray(OUT["image"]), "text": jnp.asarray(OUT["text"])}
  loss_config = copy.deepcopy(config.loss)
  loss_config.mlm_probability = 0.5  # Some of the 16 fixture tokens get picked.
  loss, metrics = jax.jit(lambda p, b: step_lib.loss_fn(p, model, b, loss_config,
                                                        jax.random.key(0)))(params, batch)

  def itc(image, text, scale):
    logits = scale * image @ text.T
    ce = lambda x: -np.mean(np.diag(jax.nn.log_softmax(x, axis=1)))
    return (ce(logits) + ce(logits.T)) / 2
  np.testing.assert_allclose(metrics["contrastive_loss"],
                             itc(OUT["image_embed"], OUT["text_embed"], OUT["logit_scale"]),
                             **TOL)
  np.testing.assert_allclose(metrics["vl_contrastive_loss"],
                             itc(OUT["image_vl_embed"], OUT["text_vl_embed"],
                                 OUT["logit_vl_scale"]), **TOL)
  expected = (0.5 * metrics["contrastive_loss"] + 0.5 * metrics["vl_contrastive_loss"]
              + metrics["itm_loss"] + 0.25 * metrics["mlm_loss"])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert metrics["mlm_tokens"] >= 1 and 0 <= metrics["mlm_accuracy"] <= 1


# -- Stages --------------------------------------------------------------------------------------


def _stage_config(stage: str):
  """experiments/vlmo_base.py at `stage`, its model shrunk to the tiny official one."""
  config = config_lib.load_config(os.path.join(REPO, "experiments", f"vlmo_base.py:stage={stage}"))
  config.model = vlmo.model_group(_tiny_model(), vl_contrastive=stage != "2", drop_path_rate=0.0,
                                  **_tiny_text())
  if stage == "2":
    config.model.mome.fusion_layers = 0  # As the stage-2 config (VLMo: no VL-FFN).
  config.loss.update(TINY_MLM)
  config.data.update(image_size=config.model.image_size, tokenizer_vocab=0)
  config_lib.validate(config)
  return config


def _trainable(config, params) -> set[str]:
  frozen = [re.compile(p) for p in config.optim.freeze_regex]
  return {path for path in jax.tree.leaves(optim.param_paths(params))
          if not any(f.search(path) for f in frozen)}


def test_stage1_is_beits_weights_not_a_training_run():
  with pytest.raises(ValueError, match="interop.beit import"):
    config_lib.load_config(os.path.join(REPO, "experiments", "vlmo_base.py:stage=1"))


def test_stage3_trains_every_parameter():
  config = _stage_config("3")
  params = step_lib.abstract_params(config)
  assert _trainable(config, params) == set(jax.tree.leaves(optim.param_paths(params)))
  assert config.loss.mlm_weight == 0.25 and config.loss.vl_contrastive_weight == 0.5


def test_stage2_trains_exactly_what_run_py_trains_and_a_step_moves_only_those():
  config = _stage_config("2")
  model = step_lib.build_model(config)
  params = step_lib.init_params(config, model, jax.random.key(0))
  ours = _trainable(config, params)
  # run.py's rule on the official names of our parameters (interop.vlmo's one-to-one table).
  official = {path for path, key, _ in vlmo._entries(model)
              if any(name in key for name in RUN_PY_TRAINABLE)}
  assert ours == official
  assert {p.split("/")[0] for p in ours} == {
      "token_embed", "text_pos_embed", "text_type_embed", "ln_text_embed", "token_type_embed",
      "relative_position_bias", "final_norm", "mlm", *(f"layers_{i}" for i in range(4))}
  assert all("ffn_text" in p for p in ours if p.startswith("layers_"))

  # One optimizer step on a text-only batch (stage 2's data): only those leaves move, and the
  # frozen ones hold no optimizer state.
  config.optim.warmup_fraction = 0.0  # A first step with a learning rate.
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  opt_state = tx.init(params)
  state_size = sum(x.size for x in jax.tree.leaves(opt_state))
  trainable_size = sum(x.size for path, x in zip(jax.tree.leaves(optim.param_paths(params)),
                                                  jax.tree.leaves(params)) if path in ours)
  assert state_size < 2 * trainable_size + 16  # Adam's two moments of the trained leaves only.
  batch = {"text": jnp.asarray(OUT["text"])}
  config.loss.mlm_probability = 0.5  # Some of the 16 fixture tokens get picked.

  @jax.jit
  def step(params, opt_state):
    (_, metrics), grads = jax.value_and_grad(step_lib.loss_fn, has_aux=True)(
        params, model, batch, config.loss, jax.random.key(3))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), metrics
  new, metrics = step(params, opt_state)
  assert set(metrics) == {"mlm_loss", "mlm_accuracy", "mlm_tokens", "loss"}
  assert metrics["mlm_tokens"] >= 1
  moved = {path for path, a, b in zip(jax.tree.leaves(optim.param_paths(params)),
                                      jax.tree.leaves(params), jax.tree.leaves(new))
           if not np.array_equal(a, b)}
  # Every trained leaf the text-only pass reaches moves (the unused BERT positions and the
  # image token type get no gradient); nothing else does.
  assert moved <= ours
  assert ours - moved <= {"text_pos_embed", "token_type_embed"}


# -- Stage 2's text corpus -----------------------------------------------------------------------


def test_text_build_makes_a_text_only_dataset_the_pipeline_trains_on(tmp_path, capsys):
  src = tmp_path / "corpus"
  src.mkdir()
  (src / "a.txt").write_bytes(b"a dog runs on the sand\n\nthe cat sat\n\xff\xfe bad bytes\n")
  (src / "b.jsonl").write_text('{"text": "a red cat"}\n{"caption": "the dog sat on sand"}\n'
                               'not json\n{"image": "x.jpg"}\n{"text": "   "}\n')
  data_dir = tmp_path / "tfds"
  assert build_cli.main(["--format", "text", "--src", str(src / "*"), "--name", "corpus",
                         "--data_dir", str(data_dir), "--no_progress"]) == 0
  report = capsys.readouterr().out
  assert "train: 4 examples written" in report
  # Each bad line is counted and named by file and line.
  assert "2  malformed text line" in report and "b.jsonl:3" in report and "b.jsonl:4" in report
  assert "non-UTF-8 caption" in report and "a.txt:4" in report
  assert "empty caption" in report and "b.jsonl:5" in report

  def options(text_only):
    return pipeline.DataOptions.from_config(config_lib.complete(ml_collections.ConfigDict(dict(
        data=dict(name="corpus", data_dir=str(data_dir), image_size=8, text_only=text_only,
                  tokenizer=os.path.join(os.path.dirname(__file__), "data",
                                         "bert_vocab_tiny.txt"), tokenizer_kind="wordpiece"),
        model=dict(text=dict(max_len=8)), train=dict(batch_size=2, seed=0)))))
  batch = next(iter(pipeline.make_host_loader(options(True), shard_index=0, shard_count=1)))
  assert set(batch) == {"text", "key"} and batch["text"].shape == (2, 8)
  assert (batch["text"][:, 0] == 101).all()  # [CLS] ... of bert's vocabulary.
  with pytest.raises(ValueError, match="config.data.text_only=True"):
    pipeline.make_host_loader(options(False), shard_index=0, shard_count=1)


def test_stage3_starts_from_stage2s_longer_text_positions():
  """Stage 2 trains 196 text positions, stage 3 uses 40: the warm start keeps the first rows,
  as VLMo's stage 3 truncates them."""
  source = {"text_pos_embed": np.arange(40.0).reshape(10, 4), "mlm/decoder/bias": np.ones(3)}
  fresh = {"text_pos_embed": np.zeros((8, 4), np.float32), "mlm/decoder/bias": np.zeros(3),
           "layers_0/ffn_fusion/mlp/wi/bias": np.zeros(2)}  # VL-FFN: new in stage 3.
  out, report = warm_start.merge(source, fresh, None, None)
  np.testing.assert_array_equal(out["text_pos_embed"], source["text_pos_embed"][:8])
  assert report["missing_in_source"] == ["layers_0/ffn_fusion/mlp/wi/bias"]


def test_accumulated_mlm_step_equals_the_whole_batch_step():
  """MLM under gradient accumulation (a text-only batch in 2 microbatches): the masks are drawn
  once for the whole batch, each microbatch divides by the whole batch's count of picked
  tokens, so loss, metrics and gradients equal the one-batch step's."""
  config = _stage_config("2")
  config.loss.mlm_probability = 0.5
  model = step_lib.build_model(config)
  params = step_lib.init_params(config, model, jax.random.key(0))
  batch = {"text": jnp.asarray(np.concatenate([OUT["text"], OUT["text"][::-1]]))}
  rng = jax.random.key(5)

  @jax.jit
  def both(p):
    plain = jax.value_and_grad(step_lib.loss_fn, has_aux=True)(p, model, batch, config.loss, rng)
    return plain, step_lib.accumulated_loss_and_grads(p, model, batch, config.loss, 2, rng)
  ((loss, metrics), grads), ((acc_loss, acc_metrics), acc_grads) = both(params)
  assert metrics["mlm_tokens"] >= 2
  np.testing.assert_allclose(acc_loss, loss, rtol=1e-6)
  for key in ("mlm_loss", "mlm_accuracy", "mlm_tokens"):
    np.testing.assert_allclose(acc_metrics[key], metrics[key], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-6)


# -- ITM hard negatives ----------------------------------------------------------------------------


def test_itm_negatives_never_share_the_positives_caption():
  """Where captions repeat (the demo's "a red 7"), a negative text equal to the positive's
  caption, or a negative image that caption describes, would be a match labelled "no"."""
  rng = np.random.default_rng(0)
  batch, dim = 12, 8
  captions = np.array([[2, 5 + i % 3, 3, 0] for i in range(batch)], np.int32)  # 3 captions.
  # Embeddings that make the same-caption rows the most similar: what hard negative sampling
  # would pick first.
  centres = rng.standard_normal((3, dim))
  image = centres[np.arange(batch) % 3] + 0.05 * rng.standard_normal((batch, dim))
  text = centres[np.arange(batch) % 3] + 0.05 * rng.standard_normal((batch, dim))
  image, text = (jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), jnp.float32)
                 for x in (image, text))
  caption_of = np.arange(batch) % 3
  for seed in range(20):
    neg_text, neg_image, (text_ok, image_ok) = losses.hard_negatives(
        image, text, 100.0, jax.random.key(seed), text=jnp.asarray(captions))
    assert np.all(text_ok) and np.all(image_ok)
    assert np.all(caption_of[np.asarray(neg_text)] != caption_of)
    assert np.all(caption_of[np.asarray(neg_image)] != caption_of)
  # Without the captions the same embeddings pick same-caption rows (the defect this fixes).
  neg_text, neg_image, _ = losses.hard_negatives(image, text, 100.0, jax.random.key(0))
  assert np.mean(caption_of[np.asarray(neg_image)] == caption_of) > 0.5
