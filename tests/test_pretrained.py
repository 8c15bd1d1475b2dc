"""Published checkpoints by name (`coca_jax.load("open_clip:...")`), offline: a Hugging Face hub
cache is laid out in tmp_path the way `huggingface_hub` writes it (blobs named by their sha256,
a snapshot of symlinks, refs/main) holding the tiny open_clip CoCa fixture under a name the test
registers, with HF_HUB_OFFLINE=1."""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

import coca_jax
from coca_jax.core import config as config_lib
from coca_jax.core import pretrained as names
from coca_jax.inference import api
from coca_jax.interop import open_clip
from coca_jax.interop import pretrained
from coca_jax.training import step
from coca_jax.training import warm_start
from conftest import REPO

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TINY_JSON = os.path.join(DATA, "open_clip_tiny_coca.json")
STATE = os.path.join(DATA, "open_clip_tiny_coca.safetensors")
BPE = os.path.join(DATA, "clip_bpe_tiny.txt.gz")
NAME = "open_clip:tiny_coca/test_s1"
REPO_ID = "test-org/tiny-coca"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(hub: str, repo_id: str, filename: str, content: bytes, blob_name: str = ""):
  """huggingface_hub's cache layout for one file of `repo_id` at refs/main."""
  repo = os.path.join(hub, "models--" + repo_id.replace("/", "--"))
  blob_name = blob_name or hashlib.sha256(content).hexdigest()
  os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
  os.makedirs(os.path.join(repo, "snapshots", COMMIT), exist_ok=True)
  os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
  with open(os.path.join(repo, "blobs", blob_name), "wb") as f:
    f.write(content)
  os.symlink(os.path.join("..", "..", "blobs", blob_name),
             os.path.join(repo, "snapshots", COMMIT, filename))
  with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(COMMIT)


@pytest.fixture
def offline(tmp_path, monkeypatch):
  """An empty hub cache and coca_jax cache, offline, with NAME registered."""
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv(names.CACHE_ENV, str(tmp_path / "coca_cache"))
  monkeypatch.setitem(names.REGISTRY, NAME, names.Checkpoint(
      NAME, TINY_JSON, names.OPEN_CLIP_FILES, repo_id=REPO_ID, tokenizer=BPE, about="test"))
  return tmp_path


@pytest.fixture
def cached(offline):
  with open(STATE, "rb") as f:
    fill_hub_cache(str(offline / "hub"), REPO_ID, "open_clip_model.safetensors", f.read())
  return offline


def test_load_by_name_equals_the_converted_bundle_and_converts_once(cached, monkeypatch):
  model = coca_jax.load(NAME, batch_size=2)
  bundle = names.bundle_dir(NAME)
  assert bundle.startswith(str(cached / "coca_cache")) and model.path == bundle
  direct = api.load(open_clip.import_bundle(STATE, TINY_JSON, str(cached / "direct"), bpe=BPE),
                    batch_size=2)
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(direct.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(model.params) == jax.tree.structure(direct.params)
  assert model.config.model.to_dict() == direct.config.model.to_dict()
  assert model.tokenizer.model_proto == direct.tokenizer.model_proto

  # Found again: neither downloaded nor converted, and the bundle is the same files.
  stamp = os.stat(os.path.join(bundle, warm_start.EXPORT_MANIFEST)).st_mtime_ns
  fail = lambda *a, **k: pytest.fail("a converted name was downloaded or converted again")
  monkeypatch.setattr(pretrained, "convert", fail)
  monkeypatch.setattr(pretrained, "weights_file", fail)
  assert pretrained.fetch(NAME) == bundle
  assert os.stat(os.path.join(bundle, warm_start.EXPORT_MANIFEST)).st_mtime_ns == stamp
  # The same name is a warm-start source and what the CLIs resolve (`warm_start.resolve`).
  assert warm_start.resolve(NAME)["root"] == bundle
  assert warm_start.resolve(NAME.replace("test_s1", "TEST-s1"))["root"] == bundle  # open_clip tags


def test_unknown_names_list_the_known_ones(offline):
  with pytest.raises(names.UnknownPretrainedError) as e:
    coca_jax.load("open_clip:coca_ViT-B-32/laion2b_s13b_b90")
  message = str(e.value)
  assert "did you mean 'open_clip:coca_ViT-B-32/laion2b_s13b_b90k'" in message
  for known in coca_jax.list_pretrained():
    assert known in message
  assert NAME in coca_jax.list_pretrained()
  assert {"open_clip:coca_ViT-L-14/mscoco_finetuned_laion2b_s13b_b90k",
          "vlmo:vlmo_base_patch16_224"} <= set(coca_jax.list_pretrained())
  # A config naming an unknown checkpoint fails validation with the same list.
  config = config_lib.complete(open_clip.base_config(TINY_JSON, BPE))
  config.train.update(steps=1, batch_size=2)
  config.optim.lr = 1e-4
  config.init.source = "vlmo:vlmo_huge"
  with pytest.raises(config_lib.ConfigError, match="known names: .*vlmo:vlmo_base_patch16_224"):
    config_lib.validate(config)


def test_offline_with_an_empty_cache_names_the_cache_and_the_pre_download(offline):
  with pytest.raises(pretrained.PretrainedUnavailable) as e:
    coca_jax.load(NAME)
  message = str(e.value)
  assert str(offline / "hub") in message and "HF_HUB_OFFLINE" in message
  assert f"hf download {REPO_ID} open_clip_model.safetensors" in message
  assert not os.path.exists(names.bundle_dir(NAME))
  # Not fetched yet: the low-level resolver (warm starts) says what fetches it.
  with pytest.raises(FileNotFoundError, match="interop.pretrained fetch"):
    warm_start.resolve(NAME)


def test_a_file_that_is_not_the_published_one_is_refused(offline, capsys):
  with open(STATE, "rb") as f:
    content = f.read()
  # The hub names each large file's blob by its sha256; this blob's content differs from it.
  fill_hub_cache(str(offline / "hub"), REPO_ID, "open_clip_model.safetensors", content[:-1]
                 + b" ", blob_name=hashlib.sha256(content).hexdigest())
  with pytest.raises(pretrained.ChecksumError, match="the hub publishes"):
    pretrained.fetch(NAME)
  assert not os.path.exists(names.bundle_dir(NAME))
  # The commands that take a name (caption, evaluate, index) end with that one line, exit 2.
  with pytest.raises(SystemExit) as exit_:
    pretrained.ensure_or_exit(NAME)
  assert exit_.value.code == 2
  assert "the hub publishes" in capsys.readouterr().err


def test_an_interrupted_conversion_leaves_no_bundle(cached, monkeypatch):
  original = open_clip.bundle.write_bundle

  def interrupted(*args, **kwargs):
    def interrupt(*a, **k):
      raise KeyboardInterrupt  # As Ctrl-C would, while the bundle's files are written.
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(open_clip.bundle.fs, "write_text", interrupt)
      return original(*args, **kwargs)

  monkeypatch.setattr(open_clip.bundle, "write_bundle", interrupted)
  with pytest.raises(KeyboardInterrupt):
    pretrained.fetch(NAME)
  assert not os.path.exists(names.bundle_dir(NAME))
  with pytest.raises(FileNotFoundError, match="not downloaded and converted yet"):
    warm_start.resolve(NAME)
  monkeypatch.setattr(open_clip.bundle, "write_bundle", original)
  assert pretrained.fetch(NAME) == names.bundle_dir(NAME)  # The next try converts it whole.


def test_a_name_is_a_fine_tuning_source(cached):
  """`init=NAME` in the fine-tuning experiment: the run builds the published model and starts
  from its weights, exactly as from the bundle (config.init.source keeps the name)."""
  config = config_lib.load_config(
      os.path.join(REPO, "experiments", "finetune_captions.py") + f":init={NAME},runlocal")
  assert config.init.source == NAME
  fresh = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), step.abstract_params(config))
  params, report = warm_start.warm_start_params(config, fresh)
  assert report["copied"] and not report["missing_in_source"] and not report["reinitialised"]
  expected = open_clip.import_params(open_clip.read_state_dict(STATE), config)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_that_is_not_on_the_hub_is_read_from_the_downloads_folder(offline,
                                                                             monkeypatch):
  """VLMo's releases are GitHub assets: the error says where to put the file and from where; put
  there, it converts (its BERT vocabulary still comes through the hub cache)."""
  info = json.load(open(os.path.join(DATA, "vlmo_tiny.json")))["tiny"]
  name, url = "vlmo:tiny_test", "https://example.invalid/releases/vlmo_tiny.safetensors"
  arch = dict(image_size=info["image_size"], patch_size=info["patch_size"], width=info["width"],
              depth=info["depth"], heads=info["heads"], mlp_dim=4 * info["width"],
              vlffn_start=info["vlffn_start"])
  monkeypatch.setitem(names.REGISTRY, name, names.Checkpoint(
      name, arch, ("vlmo_tiny.safetensors",), url=url,
      tokenizer_hub=("test-org/bert", "vocab.txt")))
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  words += [f"w{i}" for i in range(info["vocab_size"] - len(words))]
  fill_hub_cache(str(offline / "hub"), "test-org/bert", "vocab.txt",
                 ("\n".join(words) + "\n").encode())
  target = os.path.join(names.downloads_dir(), "vlmo_tiny.safetensors")
  with pytest.raises(pretrained.PretrainedUnavailable) as e:
    pretrained.fetch(name)
  assert f"curl -L -o {target} {url}" in str(e.value)
  os.makedirs(names.downloads_dir())
  shutil.copy(os.path.join(DATA, "vlmo_tiny.safetensors"), target)
  bundle = pretrained.fetch(name)
  found = warm_start.resolve(name)
  assert found["root"] == bundle == names.bundle_dir(name)
  manifest = json.load(open(os.path.join(bundle, warm_start.EXPORT_MANIFEST)))
  assert manifest["source"] == target
  assert warm_start.checkpoint.read_config(bundle).model.backbone == "mome"
