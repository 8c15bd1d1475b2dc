"""Specs for video clips (coca_jax.data.video) and the video evals (coca_jax.evaluation.video):
the frame sampler, reading folders of frames and video files with errors that name the file,
the moving-digit clips, and video retrieval / zero-shot equal to a direct numpy computation from
the frame embeddings."""

import json
import os

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from coca_jax.data import preprocess
from coca_jax.data import video as video_data
from coca_jax.evaluation import evaluators
from coca_jax.evaluation import probes
from coca_jax.evaluation import video


# ----------------------------------------------------------------------------------------------
# Frame sampling and reading
# ----------------------------------------------------------------------------------------------


def test_sampler_takes_segment_centres_and_repeats_frames_of_short_clips():
  np.testing.assert_array_equal(video_data.sample_frame_indices(16, 4), [2, 6, 10, 14])
  np.testing.assert_array_equal(video_data.sample_frame_indices(5, 5), np.arange(5))
  # Fewer frames than asked: each kept in order, repeated, the first and last both present.
  np.testing.assert_array_equal(video_data.sample_frame_indices(3, 8), [0, 0, 0, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(video_data.sample_frame_indices(1, 3), [0, 0, 0])
  with pytest.raises(ValueError, match="num_frames=0"):
    video_data.sample_frame_indices(10, 0)
  with pytest.raises(ValueError, match="has 0 frames"):
    video_data.sample_frame_indices(0, 4)


def _write_frames(folder, levels, size=12):
  """One solid grey PNG per level, named frame_<i> (unpadded: natural order matters)."""
  os.makedirs(folder, exist_ok=True)
  for i, level in enumerate(levels):
    Image.fromarray(np.full((size, size + 4, 3), level, np.uint8)).save(
        os.path.join(folder, f"frame_{i}.png"))


def test_frame_folder_is_read_in_natural_order_at_the_sampled_frames(tmp_path):
  folder = str(tmp_path / "clip")
  _write_frames(folder, [10 * i for i in range(12)])  # frame_10 sorts after frame_9.
  (tmp_path / "clip" / "notes.txt").write_text("not a frame")
  frames = video_data.read_clip(folder, num_frames=4, image_size=8)
  assert frames.shape == (4, 8, 8, 3) and frames.dtype == np.uint8
  # Centres of 4 segments of 12 frames: 1, 4, 7, 10.
  np.testing.assert_array_equal(frames[:, 0, 0, 0], [10, 40, 70, 100])


def test_unreadable_clips_name_the_file(tmp_path):
  folder = tmp_path / "clip"
  _write_frames(str(folder), [0, 50, 100])
  (folder / "frame_1.png").write_bytes(b"not a png")
  with pytest.raises(video_data.ClipError, match=r"frame .*frame_1\.png of clip folder"):
    video_data.read_clip(str(folder), num_frames=3, image_size=8)
  (tmp_path / "empty").mkdir()
  with pytest.raises(video_data.ClipError, match=r"empty holds no frames"):
    video_data.read_clip(str(tmp_path / "empty"), 2, 8)
  with pytest.raises(video_data.ClipError, match=r"missing\.mp4 does not exist"):
    video_data.read_clip(str(tmp_path / "missing.mp4"), 2, 8)
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(video_data.ClipError, match=r"notes\.txt is neither"):
    video_data.read_clip(str(tmp_path / "notes.txt"), 2, 8)


def test_video_file_frames_are_decoded_at_the_sampled_indices(tmp_path):
  av = pytest.importorskip("av")
  path = str(tmp_path / "clip.mp4")
  levels = [20 * i + 10 for i in range(10)]
  with av.open(path, "w") as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
    for level in levels:
      frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), level, np.uint8), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  frames = video_data.read_clip(path, num_frames=4, image_size=8)
  assert frames.shape == (4, 8, 8, 3)
  # Frames 1, 3, 6, 8 of 10 (lossy codec: within a few grey levels).
  np.testing.assert_allclose(frames.reshape(4, -1).mean(axis=1),
                             [levels[i] for i in (1, 3, 6, 8)], atol=4)
  broken = tmp_path / "broken.mp4"
  broken.write_bytes(b"\x00" * 64)
  with pytest.raises(video_data.ClipError, match=r"broken\.mp4"):
    video_data.read_clip(str(broken), 2, 8)


def test_manifest_problems_name_the_line(tmp_path):
  path = tmp_path / "test.jsonl"
  for line, message in [('{"clip": "a"', r"test\.jsonl:1 is not a JSON object"),
                        ('{"caption": "x"}', r'test\.jsonl:1 needs a "clip" path'),
                        ('{"clip": "a", "label": -1}', r'"label"=-1 must be an integer'),
                        ('{"clip": "a", "captions": "x"}', r'"captions" must be a list')]:
    path.write_text(line + "\n")
    with pytest.raises(video_data.ClipError, match=message):
      video_data.ClipSource(str(tmp_path), "test", 2, 8)
  path.write_text('{"clip": "a", "caption": "x"}\n')
  source = video_data.ClipSource(str(tmp_path), "test", 2, 8)
  with pytest.raises(video_data.ClipError, match=r'need a "label" on every line'):
    source.require("label")
  with pytest.raises(video_data.ClipError, match=r"no manifest train\.jsonl .* splits: test"):
    video_data.ClipSource(str(tmp_path), "train", 2, 8)


# ----------------------------------------------------------------------------------------------
# Moving digits
# ----------------------------------------------------------------------------------------------


def test_moving_digit_clips_are_deterministic_and_move(tmp_path):
  kwargs = dict(num_frames=5, image_size=32, max_digits=2, grid=8)
  clips = video_data.make_moving_digits("test", 6, seed=3, **kwargs)
  again = video_data.make_moving_digits("test", 6, seed=3, **kwargs)
  np.testing.assert_array_equal(clips["frames"], again["frames"])
  assert clips["frames"].shape == (6, 5, 32, 32, 3) and clips["caption"] == again["caption"]
  assert any(not np.array_equal(c[0], c[-1]) for c in clips["frames"])  # Digits move.
  for caption, first in zip(clips["caption"], clips["label"]):
    assert caption.startswith("a ") and caption.split(" left of ")[0].endswith(str(first))
  (tmp_path / "clips.building").mkdir()  # Someone else's folder: the build must not touch it.
  (tmp_path / "clips.building" / "keep.txt").write_text("mine")
  video_data.build_demo_clips(str(tmp_path / "clips"), num_clips=3, num_frames=4,
                              image_size=32, seed=0)
  assert sorted(os.listdir(tmp_path)) == ["clips", "clips.building"]
  assert (tmp_path / "clips.building" / "keep.txt").read_text() == "mine"
  digits = video_data.ClipSource(str(tmp_path / "clips"), "digits", 2, 32)
  scenes = video_data.ClipSource(str(tmp_path / "clips"), "scenes", 2, 32)
  assert len(digits) == len(scenes) == 3 and digits.labels is not None
  assert scenes.labels is None  # Two-digit clips have no single class.
  batch = next(digits.batches(8))
  assert batch["frames"].shape == (3, 2, 32, 32, 3)
  assert [caps[0][-1] for caps in batch["captions"]] == [str(x) for x in batch["label"]]


# ----------------------------------------------------------------------------------------------
# Evals equal a direct computation from the frame embeddings
# ----------------------------------------------------------------------------------------------


class _WordTokenizer:
  """Each word its own id (tiny vocabulary), BOS/EOS/PAD as the model expects."""

  def tokenize(self, texts, max_len):
    out = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      ids = [4 + sum(map(ord, w)) % 40 for w in text.split()][:max_len - 2]
      out[row, :len(ids) + 2] = [2, *ids, 3]
    return out


_CAPTIONS = [["a red 3"], ["a blue 7", "a green 1 left of a red 2"], ["a white 4"],
             ["a yellow 9"], ["a red 5 left of a blue 0"]]
_LENGTHS = [3, 4, 6, 2, 5]  # Frames per clip: shorter and longer than the 3 sampled.


@pytest.fixture(scope="module")
def clip_set(tmp_path_factory, tiny_config):
  root = tmp_path_factory.mktemp("clips")
  rng = np.random.default_rng(0)
  size = tiny_config.model.image_size
  lines = []
  for i, (captions, length) in enumerate(zip(_CAPTIONS, _LENGTHS)):
    folder = root / "frames" / str(i)
    folder.mkdir(parents=True)
    for t in range(length):
      Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(
          folder / f"{t:02d}.png")
    lines.append(json.dumps({"clip": f"frames/{i}", "captions": captions, "label": i % 3}))
  (root / "test.jsonl").write_text("\n".join(lines) + "\n")
  return str(root)


def _by_hand(model, params, clip_dir, num_frames, size):
  """(video embeddings [N, D], text embeddings, text -> video) computed directly: each clip's
  frames through encode_image, mean, normalise; captions through encode_text."""
  frames = np.stack([video_data.read_clip(os.path.join(clip_dir, "frames", str(i)), num_frames,
                                          size) for i in range(len(_CAPTIONS))])
  embeds = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                       method="encode_image")[0])(
      params, preprocess.normalize_images(frames.reshape(-1, size, size, 3))))
  mean = embeds.reshape(len(_CAPTIONS), num_frames, -1).mean(axis=1)
  videos = mean / np.linalg.norm(mean, axis=1, keepdims=True)
  return videos, np.asarray([i for i, caps in enumerate(_CAPTIONS) for _ in caps])


def _embed_texts(model, params, texts):
  tokens = _WordTokenizer().tokenize(texts, model.config.text.max_len)
  return np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t, method="encode_text"))(
      params, tokens))


def _config(clip_dir, **video_fields):
  off = dict(enabled=False, split="")
  return ml_collections.ConfigDict(dict(
      data=dict(data_dir=os.path.dirname(clip_dir)),
      evals=dict(zeroshot=off, retrieval=off, captioning=off, probe=off, video=dict(dict(
          enabled=True, dir=os.path.basename(clip_dir), zeroshot_split="", retrieval_split="",
          probe_split="", probe_train_split="", num_frames=3, examples=0,
          class_names=["0", "1", "2"], templates=["a {}", "the {} here"], probe_steps=2,
          probe_lr=1e-3, probe_batch_size=4, probe_seed=0, build_demo=False), **video_fields))))


def test_video_retrieval_and_zeroshot_equal_numpy_from_frame_embeddings(
    clip_set, tiny_model, tiny_params, tiny_config):
  size = tiny_config.model.image_size
  embedder = evaluators.Embedder(tiny_model, tiny_params, _WordTokenizer(), batch_size=8)
  config = _config(clip_set, zeroshot_split="test", retrieval_split="test")
  results = evaluators.run_evals(config, embedder)

  videos, text_to_video = _by_hand(tiny_model, tiny_params, clip_set, 3, size)
  names, templates = ["0", "1", "2"], ["a {}", "the {} here"]
  prompts = [t.format(n) for n in names for t in templates]
  all_texts = _embed_texts(tiny_model, tiny_params,
                           [c for caps in _CAPTIONS for c in caps] + prompts)
  texts, prompt_embeds = all_texts[:-len(prompts)], all_texts[-len(prompts):]
  scores = videos @ texts.T  # Cosine: both unit norm.
  for k in (1, 5, 10):
    t2v = np.mean([np.argsort(-scores[:, t], kind="stable")[:k].tolist().count(v) > 0
                   for t, v in enumerate(text_to_video)])
    v2t = np.mean([np.isin(np.argsort(-scores[v], kind="stable")[:k],
                           np.flatnonzero(text_to_video == v)).any() for v in range(len(videos))])
    assert results[f"eval/video_t2v_recall@{k}"] == pytest.approx(t2v)
    assert results[f"eval/video_v2t_recall@{k}"] == pytest.approx(v2t)
  assert 0 < results["eval/video_t2v_recall@1"] < 1  # Neither trivial nor impossible here.

  per_class = prompt_embeds.reshape(len(names), len(templates), -1)
  per_class = (per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)).mean(axis=1)
  classes = per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)
  predicted = np.argmax(videos @ classes.T, axis=1)
  labels = np.arange(len(_CAPTIONS)) % 3
  assert results["eval/video_zeroshot_top1"] == pytest.approx(np.mean(predicted == labels))
  assert "eval/video_probe_top1" not in results  # probe_split "" = off.


def test_clip_tokens_are_the_tokens_the_image_poolers_read(clip_set, tiny_model, tiny_params,
                                                           tiny_config):
  """The probe's input: each frame's encoder output tokens from the model's `image_features`
  (the ones the image probe reads), frames concatenated in order. The model's own generative
  pooler applied to them gives encode_image's decoder context."""
  size = tiny_config.model.image_size
  embedder = evaluators.Embedder(tiny_model, tiny_params, _WordTokenizer(), batch_size=8)
  source = video_data.ClipSource(clip_set, "test", 3, size)
  tokens, labels = video.clip_tokens(embedder, source, limit=2)
  per_frame = tiny_config.model.image_size ** 2 // tiny_config.model.patch_size ** 2
  width = tiny_config.model.vision.width
  assert tokens.shape == (2, 3 * per_frame, width)
  np.testing.assert_array_equal(labels, [0, 1])
  frames = preprocess.normalize_images(video_data.read_clip(source.clips[1], 3, size))
  frame_tokens, context, pooled = jax.jit(lambda p, x, t: tiny_model.apply(
      {"params": p}, x, t, method=lambda m, x, t: (
          m.image_features(x)[1], m.encode_image(x)[1],
          m.ln_image_context(m.generative_pooler(t)))))(
              tiny_params, frames, tokens[1].reshape(3, per_frame, width))
  np.testing.assert_allclose(tokens[1], np.asarray(frame_tokens).reshape(3 * per_frame, width),
                             atol=2e-5)
  np.testing.assert_allclose(np.asarray(pooled), np.asarray(context), atol=2e-5)


def test_video_probe_is_the_image_probe_run_as_the_video_fields_say(clip_set, tiny_model,
                                                                    tiny_params, tiny_config):
  """eval/video_probe_top1 is `probes.train_attentional_probe` over each clip's frame tokens,
  run for probe_steps steps of probe_batch_size clips at probe_lr from probe_seed (heads: the
  image probe's), scored with `probes.predict`; the same config gives the same figure."""
  embedder = evaluators.Embedder(tiny_model, tiny_params, _WordTokenizer(), batch_size=8)
  config = _config(clip_set, probe_split="test", probe_train_split="test", probe_steps=3,
                   probe_lr=1e-2, probe_batch_size=2, probe_seed=1)
  results = video.run_video_evals(config, embedder)
  assert video.run_video_evals(config, embedder) == results  # Deterministic.
  settings = video.probe_settings(config, tiny_model)
  assert (settings.steps, settings.batch_size, settings.lr, settings.seed) == (3, 2, 1e-2, 1)
  assert settings.heads == tiny_config.model.pooler_heads  # config.evals.probe.attn_heads 0.
  tokens, labels = video.clip_tokens(embedder, video_data.ClipSource(
      clip_set, "test", 3, tiny_config.model.image_size))
  params, losses = probes.train_attentional_probe(tokens, labels, 3, settings)
  assert len(losses) == 3
  assert results["eval/video_probe_top1"] == np.mean(probes.predict(params, tokens) == labels)


def test_video_config_problems_are_reported_before_training(clip_set):
  config = _config(clip_set, zeroshot_split="nope", probe_split="test", templates=["a video"])
  problems = "\n".join(video.check_video_evals(config))
  assert "config.evals.video.zeroshot_split='nope'" in problems and "nope.jsonl" in problems
  assert "probe_train_split is empty" in problems
  assert "config.evals.video.templates=['a video']" in problems
