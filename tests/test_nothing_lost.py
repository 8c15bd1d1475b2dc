"""Nothing we did not create is deleted, and bad input fails or is skipped with a clear word.

A build may remove, without --overwrite, only its own half-built temporary directory (marked
when we made it); a source can never overlap the dataset folder; the demo's auto-build builds
only the demo's name.
"""

import io
import json
import os

import numpy as np
from PIL import Image
import pytest

from coca_jax.core.config import ConfigError
from coca_jax.data import build as build_cli
from coca_jax.data import builders
from coca_jax.data import prepare


def _png(seed=0, size=(8, 8)) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _photos(folder, n=2):
  folder.mkdir(parents=True)
  for i in range(n):
    (folder / f"{i}.png").write_bytes(_png(i))
  (folder / "captions.jsonl").write_text("".join(
      json.dumps({"image": f"{i}.png", "caption": f"photo {i}"}) + "\n" for i in range(n)))
  return folder


def _snapshot(folder):
  return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(folder) for f in files}


def test_a_source_inside_the_target_is_refused_and_kept(tmp_path, capsys):
  # --src DIR/photos --name photos --data_dir DIR: the target DIR/photos IS the source.
  src = _photos(tmp_path / "photos")
  before = _snapshot(src)
  argv = ["--format", "folder", "--src", str(src), "--name", "photos",
          "--data_dir", str(tmp_path), "--no_progress"]
  for extra in ([], ["--overwrite"]):  # --overwrite never deletes the source either.
    assert build_cli.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert "overlap" in err and str(src) in err and "--data_dir" in err, err
    assert _snapshot(src) == before
  # The target inside the source: --src DIR --data_dir DIR/tfds.
  assert build_cli.main(["--format", "folder", "--src", str(src), "--name", "x",
                         "--data_dir", str(src / "tfds"), "--no_progress"]) == 2
  assert "the dataset folder lies inside the source" in capsys.readouterr().err
  assert _snapshot(src) == before


def test_a_glob_source_is_checked_by_what_it_matches(tmp_path):
  # Shards beside the target are fine (the glob's stem folder holds the target, its matches do
  # not); shards inside the target are refused, as a folder source would be.
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "00000.tar").write_bytes(b"")
  builders._check_target("x", str(tmp_path / "tfds"),
                         {"src": str(tmp_path / "*" / "00000.tar")}, overwrite=False)
  inside = tmp_path / "tfds" / "x" / "shards"
  inside.mkdir(parents=True)
  (inside / "00000.tar").write_bytes(b"")
  with pytest.raises(ValueError, match="the source lies inside the dataset folder"):
    builders._check_target("x", str(tmp_path / "tfds"),
                           {"src": str(tmp_path / "tfds" / "x" / "*" / "*.tar")}, overwrite=True)


def test_a_foreign_finished_build_survives_a_build_of_its_name(tmp_path, capsys):
  data_dir = tmp_path / "tfds"
  mnist = data_dir / "mnist" / "3.0.1"  # A TFDS build of another version: not ours.
  mnist.mkdir(parents=True)
  (mnist / "dataset_info.json").write_text("{}")
  (mnist / "mnist-train.array_record-00000-of-00001").write_bytes(b"records")
  before = _snapshot(data_dir / "mnist")
  src = _photos(tmp_path / "photos")
  argv = ["--format", "folder", "--src", str(src), "--name", "mnist",
          "--data_dir", str(data_dir), "--no_progress"]
  assert build_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert str(data_dir / "mnist") in err and "--overwrite" in err and "--name" in err, err
  assert _snapshot(data_dir / "mnist") == before
  # --overwrite replaces it, and only once the new build has finished.
  assert build_cli.main(argv + ["--overwrite"]) == 0
  assert builders.is_built("mnist", str(data_dir)) and not (data_dir / "mnist" / "3.0.1").exists()


def test_an_overwrite_that_fails_keeps_the_old_build(tmp_path):
  data_dir = tmp_path / "tfds"
  src = _photos(tmp_path / "photos")
  builders.build_atomically("folder", "mine", str(data_dir), src=str(src), show_progress=False)
  before = _snapshot(data_dir / "mine")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "captions.jsonl").write_text("")
  with pytest.raises(builders.EmptyBuildError):
    build_cli.build("folder", "mine", str(data_dir), overwrite=True, src=str(empty),
                    show_progress=False)
  assert _snapshot(data_dir / "mine") == before


def test_only_our_marked_temporary_directories_are_removed(tmp_path):
  data_dir = tmp_path / "tfds"
  dead_pid = 2 ** 22 + 12345  # Above the default pid_max: no such process.
  host = builders.socket.gethostname()
  ours = data_dir / f".building-mine-{host}-{dead_pid}"
  theirs = data_dir / f".building-mine-{host}-{dead_pid + 1}"
  builders._make_building_dir(str(ours))  # pylint: disable=protected-access
  theirs.mkdir(parents=True)
  (theirs / "keep.txt").write_text("not yours")
  builders.build_atomically("folder", "mine", str(data_dir), show_progress=False,
                            src=str(_photos(tmp_path / "photos")))
  assert not ours.exists() and (theirs / "keep.txt").read_text() == "not yours"


def test_the_demo_auto_build_refuses_a_name_that_is_not_the_demos(tmp_path):
  # train --config experiments/demo.py --config.data.name=coco_captions --config.data.data_dir=D
  from conftest import smoke_config
  data_dir = tmp_path / "tfds"
  theirs = data_dir / "coco_captions" / "2017" / "1.1.0"
  theirs.mkdir(parents=True)
  (theirs / "dataset_info.json").write_text("{}")
  before = _snapshot(data_dir)
  config = smoke_config()
  config.data.update(name="coco_captions", data_dir=str(data_dir))
  with pytest.raises(ConfigError, match=r"config.data.name='coco_captions'.*build_demo=False"):
    prepare.prepare_data(config, str(tmp_path / "run"))
  assert _snapshot(data_dir) == before
  # Under the demo's own name, something that is not our build is not replaced either.
  (data_dir / "digit_scenes").mkdir()
  (data_dir / "digit_scenes" / "notes.txt").write_text("mine")
  config = smoke_config()
  config.data.update(data_dir=str(data_dir))
  with pytest.raises(FileExistsError, match="digit_scenes.*--overwrite"):
    prepare.prepare_data(config, str(tmp_path / "run"))
  assert (data_dir / "digit_scenes" / "notes.txt").read_text() == "mine"


def test_a_caption_row_naming_a_fifo_is_skipped_and_counted(tmp_path):
  src = _photos(tmp_path / "photos")
  os.mkfifo(src / "pipe.png")  # Reading it would block forever.
  with open(src / "captions.jsonl", "a") as f:
    f.write(json.dumps({"image": "pipe.png", "caption": "a pipe"}) + "\n")
  _, report = builders.build_atomically("folder", "fifo", str(tmp_path / "tfds"),
                                        src=str(src), show_progress=False)
  assert report["train"].written == 2
  assert report["train"].skipped == {"not a regular file": 1}
  assert "pipe.png" in report["train"].skipped_examples["not a regular file"][0]


def test_a_folder_without_captions_says_so(tmp_path, capsys):
  src = tmp_path / "photos"
  src.mkdir()
  (src / "0.png").write_bytes(_png())
  assert build_cli.main(["--format", "folder", "--src", str(src), "--name", "nocaps",
                         "--data_dir", str(tmp_path / "tfds"), "--no_progress"]) == 2
  err = capsys.readouterr().err
  assert "no captions.jsonl or captions.csv" in err and "source is empty" not in err, err


# -- Small ones: each bad input names the field, file or text, and the fix. ----------------------


def test_a_wrong_typed_field_in_a_bundle_config_names_field_and_file(tmp_path):
  from coca_jax.core import config as config_lib
  from coca_jax.inference import api
  from conftest import smoke_config
  bundle = tmp_path / "bundle"
  bundle.mkdir()
  saved = smoke_config().to_dict()
  saved["model"]["embed_dim"] = "32"  # Quoted by hand: JAX failed on it with no field named.
  (bundle / "config.json").write_text(json.dumps(saved))
  (bundle / api.EXPORT_MANIFEST).write_text(json.dumps({"params": "params"}))
  with pytest.raises(config_lib.ConfigError) as error:
    api.load(str(bundle))
  message = str(error.value)
  assert "config.model.embed_dim='32'" in message and "an integer" in message, message
  assert str(bundle / "config.json") in message
  # validate reports it too, instead of failing on `<` between str and int.
  config = smoke_config()
  with config.model.ignore_type():
    config.model.temperature_init = "0.07"
  with pytest.raises(config_lib.ConfigError, match=r"config.model.temperature_init='0.07'"):
    config_lib.validate(config)


def test_an_image_without_pixels_is_a_clear_error(tmp_path):
  import types
  from coca_jax.data import preprocess
  from coca_jax.inference import api
  model = types.SimpleNamespace(image_size=32)  # All `pixels_at_model_size` reads of the model.
  with pytest.raises(ValueError, match=r"image 1 has shape \(0, 0, 3\): it has no pixels"):
    api.Model.pixels_at_model_size(model, [np.zeros((8, 8, 3), np.uint8),
                                      np.zeros((0, 0, 3), np.uint8)])
  with pytest.raises(ValueError, match="0x5: it has no pixels"):
    preprocess.resize_and_center_crop(Image.new("RGB", (0, 5)), 32)


def test_a_lone_surrogate_in_a_text_is_named(tmp_path):
  from coca_jax.data.clip_bpe import ClipBpeTokenizer
  from coca_jax.data.tokenizer import Tokenizer
  sp = Tokenizer.train([f"a red {i} and a blue {i + 1}" for i in range(200)], vocab_size=40)
  bpe = ClipBpeTokenizer.load(os.path.join(os.path.dirname(__file__), "data",
                                           "clip_bpe_tiny.txt.gz"))
  for tokenizer in (sp, bpe):
    with pytest.raises(ValueError, match=r"text 1 .*not valid Unicode.*position 4"):
      tokenizer.tokenize(["fine", "bad \ud800 text"], 8)
    with pytest.raises(ValueError, match="text 0 .*surrogate"):
      tokenizer.encode("x\udcff")
    with pytest.raises(TypeError, match="text 0 is a bytes"):
      tokenizer.tokenize([b"bytes"], 8)


def test_a_damaged_safetensors_file_is_named(tmp_path):
  from coca_jax.interop import open_clip
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file"):
    open_clip.read_state_dict(str(path))


def test_metrics_jsonl_is_strict_json_and_reads_back(tmp_path):
  from coca_jax import report
  from coca_jax.training import metrics_log as metrics
  writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "mfu": 0.5})
  writer.write({"step": 2, "loss": 1.5, "grad_norm": float("-inf")})

  def refuse(constant):
    raise ValueError(f"bare {constant} is not JSON")
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  strict = [json.loads(line, parse_constant=refuse) for line in lines]
  assert strict[0]["loss"] == "NaN" and strict[0]["grad_norm"] == "Infinity"
  assert strict[1]["grad_norm"] == "-Infinity"
  records, bad = metrics.read_metrics(str(tmp_path))
  assert bad == 0 and np.isnan(records[0]["loss"]) and records[0]["grad_norm"] == float("inf")
  assert records[1]["grad_norm"] == float("-inf") and records[1]["loss"] == 1.5
  assert "final loss 1.5000" in report.summary(str(tmp_path), [])


def test_torch_load_is_refused_below_torch_2_6(tmp_path, monkeypatch):
  import sys
  import types
  from coca_jax.interop import open_clip
  path = tmp_path / "model.pt"
  path.write_bytes(b"a pickle we must not unpickle")
  loads = []
  fake = types.SimpleNamespace(__version__="2.5.1+cu121", load=lambda *a, **k: loads.append(a))
  monkeypatch.setitem(sys.modules, "torch", fake)
  with pytest.raises(ImportError, match=r"torch >= 2.6 \(installed: 2.5.1\+cu121\).*CVE"):
    open_clip.read_state_dict(str(path))
  assert not loads
  fake.__version__ = "2.6.0"
  fake.load = lambda *a, **k: {}
  assert open_clip.read_state_dict(str(path)) == {}
