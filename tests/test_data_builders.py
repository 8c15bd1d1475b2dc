"""Builder spec: each format round-trips pixels and captions; bad input is counted, never fatal."""

import glob
import io
import json
import os
import tarfile
import tempfile

import numpy as np
from PIL import Image
import pytest

from coca_jax.data import build as build_cli
from coca_jax.data import builders
from coca_jax.data import sources


def _rgb(seed: int, size=(16, 12)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _encode(array_or_image, fmt="PNG") -> bytes:
  image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(
      array_or_image)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def _read_split(name, data_dir, split):
  source = sources.open_source(name, data_dir, split)
  return {ex["key"].decode(): ex for ex in (source[i] for i in range(len(source)))}


def _build(fmt, name, data_dir, **options):
  builder = builders.make_builder(fmt, name, str(data_dir), show_progress=False, **options)
  builder.download_and_prepare()
  return builder.report


def test_folder_jsonl_round_trip_with_several_captions(tmp_path):
  src = tmp_path / "photos"
  (src / "sub").mkdir(parents=True)
  images = {f"sub/img{i}.png": _rgb(i, size=(16 + i, 12)) for i in range(5)}
  for rel, pixels in images.items():
    (src / rel).write_bytes(_encode(pixels))
  lines = [{"image": rel, "caption": f"photo number {i}"} for i, rel in enumerate(images)]
  lines.append({"image": "sub/img0.png", "caption": "  the first   photo  "})  # 2nd caption
  lines.append({"image": "sub/img1.png", "captions": ["one", "uno"]})
  (src / "captions.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")

  report = _build("folder", "my_photos", tmp_path / "tfds", src=str(src))

  assert report["train"].written == 5 and not report["train"].skipped
  examples = _read_split("my_photos", tmp_path / "tfds", "train")
  assert set(examples) == set(images)
  for rel, pixels in images.items():
    np.testing.assert_array_equal(examples[rel]["image"], pixels)
  assert [c.decode() for c in examples["sub/img0.png"]["captions"]] == [
      "photo number 0", "the first photo"]
  assert [c.decode() for c in examples["sub/img1.png"]["captions"]] == [
      "photo number 1", "one", "uno"]


def test_making_a_builder_leaves_no_temporary_directory(tmp_path):
  """TFDS makes a temporary directory (for bucket metadata) when a builder is created for a
  dataset not yet built; thousands of empty /tmp/tmp*tfds accumulated before this was contained."""
  pattern = os.path.join(tempfile.gettempdir(), "*tfds*")
  before = set(glob.glob(pattern))
  builders.make_builder("demo", "leftover_check", str(tmp_path / "tfds"), num_train=4, num_test=4)
  assert set(glob.glob(pattern)) == before


def test_folder_csv_and_eval_holdout_partition(tmp_path):
  src = tmp_path / "photos"
  src.mkdir()
  rows = ["image,caption"]
  for i in range(40):
    (src / f"{i}.png").write_bytes(_encode(_rgb(i, size=(8, 8))))
    rows.append(f'{i}.png,"a photo, number {i}"')
  (src / "captions.csv").write_text("\n".join(rows) + "\n")

  report = _build("folder", "csv_photos", tmp_path / "tfds", src=str(src), eval_fraction=0.25)

  train = _read_split("csv_photos", tmp_path / "tfds", "train")
  test = _read_split("csv_photos", tmp_path / "tfds", "test")
  assert set(train).isdisjoint(test) and len(train) + len(test) == 40
  assert 0 < len(test) < 20  # about a quarter, chosen by key hash
  assert report["train"].written == len(train) and report["test"].written == len(test)
  merged = {**train, **test}
  for i in range(40):
    assert [c.decode() for c in merged[f"{i}.png"]["captions"]] == [f"a photo, number {i}"]
    np.testing.assert_array_equal(merged[f"{i}.png"]["image"], _rgb(i, size=(8, 8)))


def test_an_eval_holdout_that_took_nothing_says_so(tmp_path):
  # A small folder with a small --eval_fraction can leave the eval split empty: nothing was
  # skipped, so the error names the fraction and the fix instead of "every input was skipped".
  src = tmp_path / "photos"
  src.mkdir()
  names = [f"{i}.png" for i in range(200) if not builders._in_eval_holdout(f"{i}.png", 0.05)][:3]
  for i, name in enumerate(names):
    (src / name).write_bytes(_encode(_rgb(i, size=(8, 8))))
  (src / "captions.jsonl").write_text("".join(
      json.dumps({"image": name, "caption": f"photo {name}"}) + "\n" for name in names))
  with pytest.raises(builders.EmptyBuildError) as error:
    builders.build_atomically("folder", "small", str(tmp_path / "tfds"), src=str(src),
                              eval_fraction=0.05, show_progress=False)
  message = str(error.value)
  assert "--eval_fraction 0.05" in message and "took none of these 3" in message, message
  assert "--eval_src" in message and "every input was skipped" not in message


def test_demo_data_built_with_other_options_is_refused_not_reused(tmp_path):
  from coca_jax.core.config import ConfigError
  from coca_jax.data import prepare
  from conftest import smoke_config
  options = dict(num_train=8, num_test=4, num_digits=4, image_size=32, grid=8, num_transfer=4,
                 show_progress=False)
  data_dir = str(tmp_path / "tfds")
  builders.build_atomically("demo", "digit_scenes", data_dir, **options)
  config = smoke_config()
  config.data.update(data_dir=data_dir, build_demo_options=options)
  prepare.prepare_data(config, str(tmp_path / "run"))  # The same options: used as built.
  # A build recorded before an option existed agrees with that option at its default.
  record = os.path.join(data_dir, "digit_scenes", builders.VERSION, builders.BUILD_OPTIONS_FILE)
  with open(record) as f:
    recorded = json.load(f)
  del recorded["options"]["num_train_digits"]
  with open(record, "w") as f:
    json.dump(recorded, f)
  assert not builders.check_built_options("digit_scenes", data_dir, "demo", options)
  assert builders.check_built_options("digit_scenes", data_dir, "demo",
                                      dict(options, num_train_digits=4)) == [
      "num_train_digits: built 0, asked 4"]
  config = smoke_config()
  config.data.update(data_dir=data_dir, build_demo_options=dict(options, num_train=16))
  with pytest.raises(ConfigError, match=r"num_train: built 8, asked 16.*own "
                                        r"--config.data.data_dir"):
    prepare.prepare_data(config, str(tmp_path / "run2"))
  config.data.name = ""
  with pytest.raises(ConfigError, match="config.data.name is empty"):
    prepare.prepare_data(config, str(tmp_path / "run3"))


def _write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_webdataset_round_trip_png_and_jpeg(tmp_path):
  shards = tmp_path / "shards"
  shards.mkdir()
  expected = {}
  for shard in range(2):
    members = []
    for i in range(3):
      key = f"{shard:04d}{i:05d}"
      pixels = _rgb(10 * shard + i)
      fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
      data = _encode(pixels, fmt)
      members += [(f"{key}.{ext}", data), (f"{key}.txt", f"caption {key}".encode()),
                  (f"{key}.json", b"{}")]
      # Stored bytes are the originals, so decoding them must give exactly what we decode here.
      expected[f"{shard:05d}.tar/{key}"] = (np.asarray(Image.open(io.BytesIO(data))), f"caption {key}")
    _write_tar(shards / f"{shard:05d}.tar", members)

  report = _build("webdataset", "laion_like", tmp_path / "tfds", src=str(shards))

  assert report["train"].written == 6 and not report["train"].skipped
  examples = _read_split("laion_like", tmp_path / "tfds", "train")
  assert set(examples) == set(expected)
  for key, (pixels, caption) in expected.items():
    np.testing.assert_array_equal(examples[key]["image"], pixels)
    assert [c.decode() for c in examples[key]["captions"]] == [caption]


def test_demo_matches_digit_scenes(tmp_path):
  from coca_jax.data import digit_scenes

  report = _build("demo", "digits_demo", tmp_path / "tfds", num_train=6, num_test=3,
                  num_digits=4, image_size=24, seed=5, grid=4)
  assert {s: r.written for s, r in report.items()} == {"train": 6, "test": 3, "digits": 4}
  scenes = digit_scenes.make_scenes("train", 6, 5, image_size=24, grid=4)
  train = _read_split("digits_demo", tmp_path / "tfds", "train")
  for index in range(6):
    example = train[f"train/{index:06d}"]
    np.testing.assert_array_equal(example["image"], scenes["image"][index])
    assert [c.decode() for c in example["captions"]] == scenes["captions"][index]
    assert example["label"] == -1
  singles = digit_scenes.make_single_digits("test", 4, 5, image_size=24, grid=4)
  digits = _read_split("digits_demo", tmp_path / "tfds", "digits")
  assert [digits[f"digits/{i:06d}"]["label"] for i in range(4)] == singles["label"].tolist()


def test_folder_bad_inputs_are_counted_or_converted(tmp_path):
  src = tmp_path / "messy"
  src.mkdir()
  good = _rgb(0, size=(10, 10))
  (src / "good.png").write_bytes(_encode(good))
  (src / "garbage.jpg").write_bytes(b"this is not an image")
  (src / "truncated.png").write_bytes(_encode(_rgb(1, size=(64, 64)))[:200])
  gray = np.arange(100, dtype=np.uint8).reshape(10, 10)
  (src / "gray.png").write_bytes(_encode(Image.fromarray(gray, "L")))
  rgba = np.zeros((10, 10, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[..., 3] = 0  # fully transparent: must come out white, not red
  rgba[:5, :, 3] = 255  # top half opaque red
  (src / "rgba.png").write_bytes(_encode(Image.fromarray(rgba, "RGBA")))
  deep = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)
  (src / "deep.png").write_bytes(_encode(Image.fromarray(deep)))  # 16-bit grayscale
  for name in ("empty_cap.png", "nonutf8.png", "also_good.png"):
    (src / name).write_bytes(_encode(good))
  lines = [
      b'{"image": "good.png", "caption": "a good one"}',
      b'{"image": "garbage.jpg", "caption": "not an image"}',
      b'{"image": "truncated.png", "caption": "cut short"}',
      b'{"image": "missing.png", "caption": "no such file"}',
      b'{"image": "gray.png", "caption": "gray"}',
      b'{"image": "rgba.png", "caption": "transparent"}',
      b'{"image": "deep.png", "caption": "sixteen bits"}',
      b'{"image": "empty_cap.png", "caption": "   "}',
      b'{"image": "nonutf8.png", "caption": "caf\xe9"}',
      b'{"image": "also_good.png", "caption": ""}',  # dropped; its second caption survives
      b'{"image": "also_good.png", "caption": "second try"}',
      b'{"image": "good.png" "caption": broken json',
  ]
  (src / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")

  report = _build("folder", "messy", tmp_path / "tfds", src=str(src))["train"]

  assert report.written == 5  # good, gray, rgba, deep, also_good
  assert dict(report.skipped) == {
      "unreadable image": 2, "missing image file": 1, "empty caption": 1,
      "non-UTF-8 caption": 1, "malformed captions line": 1}
  assert dict(report.dropped_captions) == {"empty caption": 1}
  assert sum(report.converted.values()) == 3
  examples = _read_split("messy", tmp_path / "tfds", "train")
  np.testing.assert_array_equal(examples["gray.png"]["image"], np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(examples["rgba.png"]["image"][:5], np.broadcast_to(
      np.array([200, 0, 0], np.uint8), (5, 10, 3)))
  assert (examples["rgba.png"]["image"][5:] == 255).all()
  np.testing.assert_array_equal(examples["deep.png"]["image"][..., 0],
                                np.round(deep / 257.0).astype(np.uint8))
  assert [c.decode() for c in examples["also_good.png"]["captions"]] == ["second try"]


def test_webdataset_bad_samples_and_truncated_shard(tmp_path):
  shards = tmp_path / "shards"
  shards.mkdir()
  png = _encode(_rgb(3))
  _write_tar(shards / "00000.tar", [
      ("a.jpg", _encode(_rgb(1), "JPEG")), ("a.txt", b"fine"),
      ("b.jpg", png), ("b.json", b"{}"),  # no caption
      ("c.txt", b"no image"),
      ("d.png", png), ("d.txt", b"\xff\xfe bad bytes"),
      ("e.png", b"\x89PNG corrupt"), ("e.txt", b"corrupt image"),
      ("f.png", _encode(Image.fromarray(_rgb(4)).convert("P"))), ("f.txt", b"palette"),
  ])
  _write_tar(shards / "00001.tar", [("g.png", png), ("g.txt", b"in a damaged shard"),
                                    ("h.png", _encode(_rgb(5, size=(128, 128)))),
                                    ("h.txt", b"cut in half")])
  whole = (shards / "00001.tar").read_bytes()
  (shards / "00001.tar").write_bytes(whole[:len(whole) // 2])

  report = _build("webdataset", "messy_tars", tmp_path / "tfds", src=str(shards))["train"]

  assert report.written == 3  # a, f (converted from palette), g (before the damage)
  assert report.skipped["missing caption (.txt) in sample"] == 1
  assert report.skipped["missing image in sample"] == 1
  assert report.skipped["non-UTF-8 caption"] == 1
  assert report.skipped["unreadable image"] == 1
  assert report.skipped["corrupt or truncated tar shard"] == 1
  assert report.skipped["sample lost in corrupt tar shard"] == 1  # h, cut mid-image
  assert sum(report.skipped.values()) == 6
  assert report.converted == {"P to RGB": 1}
  assert set(_read_split("messy_tars", tmp_path / "tfds", "train")) == {
      "00000.tar/a", "00000.tar/f", "00001.tar/g"}


def test_cli_builds_reports_and_refuses_to_overwrite(tmp_path, capsys):
  src = tmp_path / "photos"
  src.mkdir()
  (src / "x.png").write_bytes(_encode(_rgb(0)))
  (src / "y.png").write_bytes(b"broken")
  (src / "captions.jsonl").write_text(
      '{"image": "x.png", "caption": "an x"}\n{"image": "y.png", "caption": "a y"}\n')
  argv = ["--format", "folder", "--src", str(src), "--name", "cli_photos",
          "--data_dir", str(tmp_path / "tfds"), "--no_progress"]

  assert build_cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "train: 1 examples written" in out and "unreadable image" in out and "y.png" in out
  assert ".building-" not in out  # TFDS's "prepared to <our temporary directory>" is not shown.
  saved = json.loads((tmp_path / "tfds" / "cli_photos" / "1.0.0" / "build_report.json").read_text())
  assert saved["train"]["written"] == 1 and saved["train"]["skipped"] == {"unreadable image": 1}

  assert build_cli.main(argv) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert build_cli.main(argv + ["--overwrite"]) == 0


def test_names_and_missing_sources_fail_clearly(tmp_path):
  with pytest.raises(ValueError, match="lower_snake_case"):
    builders.make_builder("folder", "My-Data", str(tmp_path), src=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="captions.jsonl"):
    _build("folder", "empty_folder", tmp_path / "tfds", src=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="coca_jax.data.build"):
    sources.open_source("never_built", str(tmp_path / "tfds"), "train")


def _fits_an_aligned_box(image, glyph, grid):
  """Whether every inked pixel lies in one glyph x glyph box whose corner is on the grid."""
  ys, xs = np.nonzero(image.max(-1) > 60)  # The background noise stays below 30.
  y0, x0 = ys.min() // grid * grid, xs.min() // grid * grid
  return ys.max() < y0 + glyph and xs.max() < x0 + glyph


def test_demo_grid_puts_digits_on_whole_patches():
  from coca_jax.data import digit_scenes

  aligned = digit_scenes.make_single_digits("train", 40, 0, image_size=48, grid=8)
  assert all(_fits_an_aligned_box(image, 16, 8) for image in aligned["image"])
  # Free placement (19-px glyphs here) does land off the grid: the check can fail.
  free = digit_scenes.make_single_digits("train", 40, 0, image_size=48, grid=0)
  assert not all(_fits_an_aligned_box(image, 19, 8) for image in free["image"])
