"""Video clips for evaluation: frames sampled from a video file or a folder of frames, with a
caption or a label, and the demo's moving-digit clips.

A clip set is a folder holding one manifest per split, `<split>.jsonl`, a clip a line:

  {"clip": "clips/0001.mp4", "caption": "a dog runs", "label": 3}
  {"clip": "frames/0002", "captions": ["two people talk", "a meeting"]}

`clip` is a path relative to the manifest's folder (or absolute): a video file (decoded with
PyAV: `pip install coca_jax[video]`) or a folder of frames (.png/.jpg/.jpeg/.webp, read in
natural order: frame_2 before frame_10). `caption` / `captions` feed retrieval, `label` (an
integer class in [0, classes)) feeds zero-shot classification and the attentional probe; a split
read for one of them needs it on every line.

Frame sampling (`sample_frame_indices`): N frames at the centres of N equal segments of the clip,
as the CoCa paper samples 16 frames uniformly from a video (arXiv 2205.01917, section 3.3). A clip
with fewer than N frames repeats frames in order, so every clip gives exactly N frames and a batch
of clips stacks. Each frame gets the image evals' geometry (shorter side to the model's size,
then the central square: `preprocess.resize_and_center_crop`).

Everything is deterministic: the same clip gives the same pixels on every read.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Iterator

import numpy as np
from PIL import Image

from coca_jax.data import digit_scenes
from coca_jax.data import preprocess

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")


class ClipError(ValueError):
  """A clip or a manifest line that cannot be read; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Frame sampling and reading
# ----------------------------------------------------------------------------------------------


def sample_frame_indices(num_available: int, num_frames: int) -> np.ndarray:
  """int64 [num_frames]: the frames at the centres of `num_frames` equal segments of a clip of
  `num_available` frames, in order. Fewer available frames than asked: frames repeat (each
  segment still takes the frame under its centre), e.g. 3 of 8 -> 0 0 0 1 1 2 2 2."""
  if num_frames < 1:
    raise ValueError(f"num_frames={num_frames} must be >= 1 (frames sampled per clip)")
  if num_available < 1:
    raise ValueError(f"the clip has {num_available} frames; a clip needs at least one")
  centres = (np.arange(num_frames) + 0.5) * num_available / num_frames
  return np.minimum(np.floor(centres).astype(np.int64), num_available - 1)


def _natural_key(name: str):
  return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: str) -> list[str]:
  """The frame images of a clip folder in natural order; ClipError naming it if none."""
  names = sorted((n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)
                  and not n.startswith(".")), key=_natural_key)
  if not names:
    raise ClipError(f"clip folder {folder} holds no frames ({', '.join(FRAME_EXTENSIONS)} "
                    "files); put one image per frame in it, named in order (frame_0001.png, ...)")
  return [os.path.join(folder, n) for n in names]


def _frame(image: Image.Image, image_size: int, where: str) -> np.ndarray:
  try:
    return preprocess.resize_and_center_crop(image.convert("RGB"), image_size)
  except (OSError, ValueError) as e:
    raise ClipError(f"frame {where} cannot be read: {type(e).__name__}: {e}") from None


def read_frame_folder(folder: str, num_frames: int, image_size: int) -> np.ndarray:
  """uint8 [num_frames, image_size, image_size, 3] sampled from a folder of frames."""
  files = frame_files(folder)
  frames = []
  for index in sample_frame_indices(len(files), num_frames):
    path = files[index]
    try:
      with Image.open(path) as image:
        image.load()
        frames.append(_frame(image, image_size, path))
    except (OSError, Image.DecompressionBombError) as e:
      raise ClipError(f"frame {path} of clip folder {folder} cannot be read: "
                      f"{type(e).__name__}: {e}; replace or remove it") from None
  return np.stack(frames)


def _open_video(path: str):
  try:
    import av  # A heavy, optional dependency: only video files need it.
  except ImportError:
    raise ClipError(f"reading video file {path} needs PyAV: pip install 'coca_jax[video]' (or "
                    "pip install av), or give the clip as a folder of frames") from None
  try:
    return av.open(path)
  except (av.error.FFmpegError, OSError) as e:
    raise ClipError(f"video file {path} cannot be opened: {type(e).__name__}: {e}") from None


def read_video_file(path: str, num_frames: int, image_size: int) -> np.ndarray:
  """uint8 [num_frames, image_size, image_size, 3] sampled from a video file (its first video
  stream). The frames are counted by decoding (a container's frame count is often missing or
  wrong), then decoded again keeping the sampled ones."""
  import av  # pylint: disable=import-outside-toplevel  # _open_video checked it is installed.

  def decoded():
    container = _open_video(path)
    with container:
      if not container.streams.video:
        raise ClipError(f"video file {path} has no video stream")
      try:
        yield from container.decode(video=0)
      except av.error.FFmpegError as e:
        raise ClipError(f"video file {path} cannot be decoded: {type(e).__name__}: {e}") from None

  count = sum(1 for _ in decoded())
  if count == 0:
    raise ClipError(f"video file {path} has no decodable frames")
  wanted = sample_frame_indices(count, num_frames)
  frames, stream = {}, decoded()
  try:
    for index, frame in enumerate(stream):
      if index in wanted:
        frames[index] = _frame(frame.to_image(), image_size, f"{index} of {path}")
      if index >= wanted[-1]:
        break
  finally:
    stream.close()  # Closes the container now, not when the generator is collected.
  return np.stack([frames[i] for i in wanted])


def read_clip(path: str, num_frames: int, image_size: int) -> np.ndarray:
  """uint8 [num_frames, image_size, image_size, 3] of a clip: a folder of frames or a video."""
  if os.path.isdir(path):
    return read_frame_folder(path, num_frames, image_size)
  if not os.path.exists(path):
    raise ClipError(f"clip {path} does not exist; give a video file or a folder of frames")
  if not path.lower().endswith(VIDEO_EXTENSIONS):
    raise ClipError(f"clip {path} is neither a folder of frames nor a video file "
                    f"({', '.join(VIDEO_EXTENSIONS)})")
  return read_video_file(path, num_frames, image_size)


# ----------------------------------------------------------------------------------------------
# Clip sets: manifests of clips with captions and labels
# ----------------------------------------------------------------------------------------------


def manifest_path(clip_dir: str, split: str) -> str:
  return os.path.join(clip_dir, f"{split}.jsonl")


class ClipSource:
  """The clips of one split of a clip set (`clip_dir/<split>.jsonl`), read in manifest order.

  `batches(batch_size, limit)` yields dict(frames=uint8 [B, num_frames, S, S, 3],
  captions=B lists of str, label=int64 [B] when every line has one, key=B clip paths)."""

  def __init__(self, clip_dir: str, split: str, num_frames: int, image_size: int):
    self.clip_dir, self.split = clip_dir, split
    self.num_frames, self.image_size = num_frames, image_size
    self.name = clip_dir
    path = manifest_path(clip_dir, split)
    if not os.path.exists(path):
      present = sorted(n[:-len(".jsonl")] for n in os.listdir(clip_dir)
                       if n.endswith(".jsonl")) if os.path.isdir(clip_dir) else []
      raise ClipError(f"clip set {clip_dir} has no manifest {os.path.basename(path)} for split "
                      f"{split!r} (its splits: {', '.join(present) or 'none'}); write one "
                      '{"clip": ..., "caption": ..., "label": ...} line per clip')
    self.clips: list[str] = []
    self.captions: list[list[str]] = []
    labels = []
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{number}"
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ClipError(f"{where} is not a JSON object: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("clip"), str):
          raise ClipError(f'{where} needs a "clip" path (a video file or a folder of frames)')
        captions = row.get("captions", [row["caption"]] if "caption" in row else [])
        if isinstance(captions, str) or not all(isinstance(c, str) and c.strip()
                                                for c in captions):
          raise ClipError(f'{where}: "captions" must be a list of non-empty strings')
        label = row.get("label")
        if label is not None and (not isinstance(label, int) or label < 0):
          raise ClipError(f'{where}: "label"={label!r} must be an integer class >= 0')
        self.clips.append(os.path.join(clip_dir, row["clip"]))
        self.captions.append([" ".join(c.split()) for c in captions])
        labels.append(label)
    self.labels = (np.asarray(labels, np.int64)
                   if labels and all(x is not None for x in labels) else None)
    self.manifest = path

  def __len__(self) -> int:
    return len(self.clips)

  def require(self, what: str) -> None:
    """ClipError naming the manifest when its lines lack `what` ("captions" or "label")."""
    if what == "label" and self.labels is None:
      raise ClipError(f'{self.manifest}: zero-shot and probe evals need a "label" on every line')
    if what == "captions" and not all(self.captions):
      missing = self.captions.index([]) + 1
      raise ClipError(f'{self.manifest}: retrieval needs a "caption" on every line (clip '
                      f"{missing} has none)")

  def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict]:
    count = len(self) if limit is None else min(limit, len(self))
    for start in range(0, count, batch_size):
      stop = min(start + batch_size, count)
      batch = {"frames": np.stack([read_clip(p, self.num_frames, self.image_size)
                                   for p in self.clips[start:stop]]),
               "captions": self.captions[start:stop], "key": self.clips[start:stop]}
      if self.labels is not None:
        batch["label"] = self.labels[start:stop]
      yield batch


# ----------------------------------------------------------------------------------------------
# The demo's moving digits
# ----------------------------------------------------------------------------------------------

# The demo's clip splits: name -> (scans they draw from, most digits per clip).
DEMO_CLIP_SPLITS = {"train_digits": ("train", 1), "digits": ("test", 1), "scenes": ("test", 2)}


def make_moving_digits(split: str, num: int, seed: int, num_frames: int = 16,
                       image_size: int = 48, max_digits: int = 2, grid: int = 8) -> dict:
  """Clips of 1..max_digits digit scans (digit_scenes' glyphs, colours and captions) moving in
  straight lines over a dark canvas, each within its own horizontal slot, so the reading order
  and the caption ("a red 3 left of a blue 7") hold in every frame. Each digit goes from a
  random start to a random end at constant speed; with grid > 0 its positions are rounded to
  multiples of `grid` (the demo model reads glyphs on its 8-px patches).

  Returns:
    dict(frames=uint8 [num, num_frames, S, S, 3], caption=list[str], label=int32 [num] (the
         first digit; the class of a one-digit clip)).
  """
  scans, labels = digit_scenes._scans(split)  # pylint: disable=protected-access
  rng = np.random.default_rng([seed, 10 + max_digits, 0 if split == "train" else 1])
  glyph_size = digit_scenes._glyph_size(image_size, 2, grid)  # pylint: disable=protected-access
  clips, captions, firsts = [], [], []
  for _ in range(num):
    count = int(rng.integers(1, max_digits + 1))
    slot_width = image_size // count
    background = rng.uniform(0, 30, size=(image_size, image_size, 3)).astype(np.float32)
    frames = np.repeat(background[None], num_frames, axis=0)
    drawn = []
    for slot in range(count):
      index = rng.integers(len(labels))
      colour_name = digit_scenes._INK_ON_DARK[  # pylint: disable=protected-access
          rng.integers(len(digit_scenes._INK_ON_DARK))]  # pylint: disable=protected-access
      colour = np.asarray(digit_scenes.COLOURS[colour_name], np.float32) * rng.uniform(0.8, 1.0)
      alpha = digit_scenes._glyph(scans[index], glyph_size)[..., None]  # pylint: disable=protected-access
      x_range = (slot * slot_width, max(slot * slot_width, (slot + 1) * slot_width - glyph_size))
      y_range = (0, image_size - glyph_size)
      start = rng.uniform(*x_range), rng.uniform(*y_range)
      end = rng.uniform(*x_range), rng.uniform(*y_range)
      for t in range(num_frames):
        step = t / max(1, num_frames - 1)
        x, y = (a + (b - a) * step for a, b in zip(start, end))
        if grid:
          x = min(max(round(x / grid) * grid, x_range[0]), x_range[1])
          y = min(round(y / grid) * grid, y_range[1])
        digit_scenes._paint(frames[t], int(x), int(y), alpha, colour)  # pylint: disable=protected-access
      drawn.append((colour_name, int(labels[index])))
    clips.append(np.clip(frames, 0, 255).astype(np.uint8))
    captions.append(" left of ".join(f"a {c} {d}" for c, d in drawn))
    firsts.append(drawn[0][1])
  return {"frames": np.stack(clips) if clips else
          np.zeros((0, num_frames, image_size, image_size, 3), np.uint8),
          "caption": captions, "label": np.asarray(firsts, np.int32)}


def build_demo_clips(clip_dir: str, num_clips: int = 200, num_frames: int = 16,
                     image_size: int = 48, grid: int = 8, seed: int = 0) -> None:
  """Writes the demo's moving-digit clip set (`DEMO_CLIP_SPLITS`, num_clips each) as folders of
  PNG frames with a manifest per split, the format users give their own clips in. Written to a
  temporary folder and renamed, so an interrupted build never looks finished. The temporary
  folder is new (a unique name beside clip_dir): nothing that is already there is removed."""
  clip_dir = clip_dir.rstrip("/")
  parent = os.path.dirname(clip_dir) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(clip_dir) + ".building-", dir=parent)
  for split, (scans, max_digits) in DEMO_CLIP_SPLITS.items():
    data = make_moving_digits(scans, num_clips, seed, num_frames, image_size, max_digits, grid)
    lines = []
    for i in range(num_clips):
      folder = os.path.join(split, f"{i:05d}")
      os.makedirs(os.path.join(tmp, folder))  # New: tmp is empty.
      for t, frame in enumerate(data["frames"][i]):
        Image.fromarray(frame).save(os.path.join(tmp, folder, f"frame_{t:03d}.png"))
      row = {"clip": folder, "caption": data["caption"][i]}
      if max_digits == 1:
        row["label"] = int(data["label"][i])
      lines.append(json.dumps(row))
    with open(manifest_path(tmp, split), "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  os.rename(tmp, clip_dir)
