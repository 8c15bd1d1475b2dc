"""Evals on TFDS catalog datasets (what imagenet2012, cifar10 or coco_captions are to a user):
a dataset registered with TFDS and prepared by TFDS itself as array_record, read by its
features with no TensorFlow, in the train loop's periodic evals and the `evaluate` CLI.

The dataset below is a real `tfds.core.GeneratorBasedBuilder` (registered in TFDS's catalog
like the shipped ones, ClassLabel features, nested captions like coco_captions), prepared
offline with `file_format="array_record"`: TFDS writes that without TensorFlow. (It cannot
write tfrecord without TensorFlow, so the tfrecord case is a prepared copy whose
dataset_info.json and shard names say tfrecord: the metadata is what the check reads.)
"""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from coca_jax import export
from coca_jax.core import config as config_lib
from coca_jax.data import pipeline, preprocess, sources
from coca_jax.evaluation import evaluators, metrics, prompts
from coca_jax.inference import api
from conftest import smoke_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "coca_jax_test_shapes"
CLASS_NAMES = ["circle", "square", "triangle", "star", "moon"]
SYNSETS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
# Skewed on purpose: a model that predicts one class for every image scores differently under
# a rotation of the names, so the accuracy checks below see a wrong label -> name mapping.
LABELS = [0] * 14 + [1] * 10 + [2] * 7 + [3] * 5 + [4] * 4


def shapes():
  """The 40 examples: distinct 8x8 RGB images (a class colour plus noise), labels, captions."""
  rng = np.random.default_rng(0)
  colours = rng.integers(0, 256, (len(CLASS_NAMES), 3))
  images, captions = [], []
  for index, label in enumerate(LABELS):
    noise = rng.integers(-40, 41, (8, 8, 3))
    images.append(np.clip(colours[label] + noise, 0, 255).astype(np.uint8))
    captions.append([f"shape number {index}", f"a {CLASS_NAMES[label]}"])
  return images, np.asarray(LABELS), captions


class CocaJaxTestShapes(tfds.core.GeneratorBasedBuilder):
  """A catalog dataset: registered with TFDS (`tfds.builder_cls(NAME)` finds it)."""

  VERSION = tfds.core.Version("2.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        "synset": tfds.features.ClassLabel(names=SYNSETS),  # imagenet2012's kind of names
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    for index, (image, label, texts) in enumerate(zip(*shapes())):
      png = io.BytesIO()
      Image.fromarray(image).save(png, format="PNG")
      yield index, {"image": png.getvalue(), "label": int(label), "synset": int(label),
                    "captions": [{"id": 100 * index + k, "text": t} for k, t in enumerate(texts)]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  CocaJaxTestShapes(data_dir=root, file_format="array_record").download_and_prepare()
  assert "tensorflow" not in sys.modules  # Prepared and read without TensorFlow.
  return root


def _zeroshot(config, data_dir, **fields):
  config.evals.zeroshot.update(dict(dataset=NAME, data_dir=data_dir, split="validation",
                                    examples=0, class_names=[], transfer_splits=[],
                                    transfer_templates=[]), **fields)
  config.evals.retrieval.enabled = config.evals.captioning.enabled = False
  return config


def _problems(config):
  with pytest.raises(config_lib.ConfigError) as err:
    evaluators.check_evals(config)
  return str(err.value)


def test_catalog_split_reads_every_example_with_its_label_and_captions(data_dir):
  assert tfds.builder_cls(NAME) is CocaJaxTestShapes  # In the catalog, like imagenet2012.
  source = pipeline.make_eval_source(
      smoke_config(), "validation", NAME, data_dir=data_dir,
      features=pipeline.EvalFeatures(captions="captions/text"))
  assert len(source) == 40 and source.class_names == CLASS_NAMES
  images, labels, captions = shapes()
  expected = {preprocess.resize_and_center_crop(Image.fromarray(image), 32).tobytes():
              (int(label), texts) for image, label, texts in zip(images, labels, captions)}
  read = {}
  for batch in source.batches(16):
    for image, label, texts in zip(batch["image"], batch["label"], batch["captions"]):
      read[image.tobytes()] = (int(label), texts)
  assert read == expected  # All 40, each with its own label and both nested captions.


def test_class_names_come_from_the_label_a_file_or_the_config(data_dir, tmp_path):
  config = _zeroshot(smoke_config(), data_dir)
  evaluators.check_evals(config)  # The ClassLabel names, in label order.
  source = evaluators._eval_source(config)("validation", config.evals.zeroshot)
  assert prompts.class_names(config.evals.zeroshot, source.class_names, NAME) == CLASS_NAMES
  names_file = tmp_path / "names.txt"
  names_file.write_text("\n".join(["ring", "box", "wedge", "spark", "crescent"]) + "\n\n")
  # A file replaces a list (lists cannot be set on the command line; file names can).
  config.evals.zeroshot.update(class_names=["a", "b"], class_names_file=str(names_file))
  evaluators.check_evals(config)
  assert prompts.class_names(config.evals.zeroshot, source.class_names, NAME) == [
      "ring", "box", "wedge", "spark", "crescent"]
  templates_file = tmp_path / "templates.txt"
  templates_file.write_text("a photo of a {}.\n  a drawing of a {}  \n")
  config.evals.zeroshot.templates_file = str(templates_file)
  evaluators.check_evals(config)
  assert prompts.templates(config.evals.zeroshot) == ["a photo of a {}.", "a drawing of a {}"]


def test_catalog_eval_errors_name_the_fix(data_dir, tmp_path):
  # Names in a file, one short of the label's 5 classes.
  names_file = tmp_path / "names.txt"
  names_file.write_text("a\nb\nc\nd\n")
  message = _problems(_zeroshot(smoke_config(), data_dir, class_names_file=str(names_file)))
  assert ("config.evals.zeroshot.class_names_file gives 4 class names, but the label 'label' "
          f"of {NAME} has 5 classes") in message
  assert "in label order" in message
  # WordNet ids as the label's names (imagenet2012's): the error says how to give real names.
  message = _problems(_zeroshot(smoke_config(), data_dir, label_feature="synset"))
  assert "WordNet ids (n01440764, n01443537, ...)" in message
  assert "class_names_file=FILE" in message and "open_clip:imagenet" in message
  # Not prepared: the exact tfds command, with the data_dir.
  empty = str(tmp_path / "empty_tfds")
  message = _problems(_zeroshot(smoke_config(), empty))
  assert f"TFDS dataset '{NAME}' is not prepared in data_dir '{empty}'" in message
  assert f"`tfds build {NAME} --data_dir={empty} --file_format=array_record`" in message
  # Prepared as tfrecord (TFDS's default): rebuild or convert, both commands given.
  tfrecord = tmp_path / "tfrecord_tfds"
  shutil.copytree(os.path.join(data_dir, NAME), tfrecord / NAME)
  version = tfrecord / NAME / "2.0.0"
  info = json.loads((version / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  (version / "dataset_info.json").write_text(json.dumps(info))
  for shard in version.glob("*.array_record-*"):
    shard.rename(version / shard.name.replace(".array_record-", ".tfrecord-"))
  message = _problems(_zeroshot(smoke_config(), str(tfrecord)))
  assert f"dataset '{NAME}' in data_dir '{tfrecord}' is prepared as tfrecord" in message
  assert (f"`tfds build {NAME} --data_dir={tfrecord} --file_format=array_record --overwrite`"
          in message)
  assert f"tfds convert_format --dataset_version_dir={version}" in message
  # A feature that is not there.
  message = _problems(_zeroshot(smoke_config(), data_dir, label_feature="class"))
  assert "config.evals.zeroshot.label_feature='class'" in message
  assert "(its features: captions, image, label, synset)" in message


def test_open_clip_names_and_templates_are_read_from_the_installed_package(
    data_dir, tmp_path, monkeypatch):
  """open_clip's ImageNet lists are read from its installed files at run time (not copied
  here), without importing the package (its __init__ imports torch). A stand-in package with
  the same module layout and a 5-class list checks the mechanism."""
  config = _zeroshot(smoke_config(), data_dir, label_feature="synset", templates=[],
                     class_names_file="open_clip:imagenet", templates_file="open_clip:imagenet")
  if prompts.clip_bpe.installed_open_clip_file("zero_shot_metadata.py") is None:
    assert "pip install --no-deps open_clip_torch" in _problems(config)
  package = tmp_path / "site" / "open_clip"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("raise ImportError('torch is not installed')\n")
  (package / "zero_shot_metadata.py").write_text(
      "OPENAI_IMAGENET_TEMPLATES = (\n    lambda c: f'a bad photo of a {c}.',\n"
      "    lambda c: f'a {c} in a video game.',\n)\n"
      "SIMPLE_IMAGENET_TEMPLATES = (lambda c: f'itap of a {c}.',)\n"
      f"IMAGENET_CLASSNAMES = {tuple(CLASS_NAMES[::-1])!r}\n")
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  evaluators.check_evals(config)  # 5 names for the 5 synsets, each template with one '{}'.
  group = config.evals.zeroshot
  assert prompts.class_names(group, SYNSETS, NAME) == CLASS_NAMES[::-1]
  assert prompts.templates(group) == ["a bad photo of a {}.", "a {} in a video game."]
  group.templates_file = "open_clip:imagenet_simple"
  assert prompts.templates(group) == ["itap of a {}."]
  group.templates_file = "open_clip:cifar"
  assert "use one of open_clip:imagenet, open_clip:imagenet_simple" in _problems(config)
  assert "open_clip" not in sys.modules  # Read from its files; the package never imported.


# ---- The train loop's periodic evals and the evaluate CLI, on the smoke model ---------------

def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A smoke run whose periodic (every 3 steps) and final evals read the catalog dataset:
  zero-shot on its label with the ClassLabel names, retrieval on its nested captions."""
  root = tmp_path_factory.mktemp("catalog")
  config_file = root / "catalog_config.py"  # An experiment file, as a user writes one.
  config_file.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(REPO, 'experiments')!r})\n"
      "import demo\n\n"
      "def get_config():\n"
      "  c = demo.get_config('smoke')\n"
      "  c.evals.every_steps = 3\n"
      f"  c.evals.zeroshot.update(dataset={NAME!r}, data_dir={data_dir!r}, split='validation',\n"
      "                          examples=0, class_names=[], transfer_splits=[])\n"
      f"  c.evals.retrieval.update(dataset={NAME!r}, data_dir={data_dir!r}, split='validation',\n"
      "                           captions_feature='captions/text')\n"
      "  c.evals.captioning.enabled = False\n"
      "  return c\n")
  workdir = str(root / "run")
  _run("coca_jax.train", "--config", str(config_file), "--workdir", workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [record for record in map(json.loads, f) if "eval/zeroshot_top1" in record]
  return workdir, evals


def _eval_batch_size(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)["evals"]["batch_size"]


@pytest.fixture(scope="module")
def embedder(trained):
  """The final model's embedder, batched as the evals batch (the same compiled shapes)."""
  model = api.load(trained[0], batch_size=_eval_batch_size(trained[0]))
  return model.config, model.embedder


def _direct_top1(embedder, names, stored_order_limit=None):
  """Top-1 computed here from the run's embedder: the 40 images as generated (resized as the
  eval does), class weights = the unit mean of each name's unit prompt embeddings."""
  config, embedder = embedder
  images, labels, _ = shapes()
  pixels = np.stack([preprocess.resize_and_center_crop(Image.fromarray(i), 32) for i in images])
  if stored_order_limit:  # The first examples as stored (TFDS shuffles them when it writes).
    stored = sources.open_source(NAME, config.evals.zeroshot.data_dir, "validation")
    position = {image.tobytes(): i for i, image in enumerate(images)}
    order = [position[stored[i]["image"].tobytes()] for i in range(stored_order_limit)]
    pixels, labels = pixels[order], labels[order]
  image_embeds = embedder.embed_images(pixels)
  weights = []
  for name in names:
    prompt_embeds = embedder.embed_texts([t.format(name) for t in config.evals.zeroshot.templates])
    mean = (prompt_embeds / np.linalg.norm(prompt_embeds, axis=1, keepdims=True)).mean(0)
    weights.append(mean / np.linalg.norm(mean))
  predictions = np.argmax(image_embeds @ np.stack(weights).T, axis=1)
  return float(np.mean(predictions == labels))


def test_train_loop_evals_read_the_catalog_dataset(trained, embedder):
  _, evals = trained
  assert [record["step"] for record in evals] == [3, 6]  # Periodic, then final.
  # The final eval's top-1 is the one computed here from the step-6 parameters.
  assert evals[-1]["eval/zeroshot_top1"] == pytest.approx(_direct_top1(embedder, CLASS_NAMES),
                                                          abs=1e-9)
  # Retrieval read both nested captions of all 40 images: its ceiling is that of those texts.
  _, _, captions = shapes()
  texts = [t for pair in captions for t in pair]
  ceiling = metrics.retrieval_ceiling(texts, np.repeat(np.arange(40), 2))
  for key, value in ceiling.items():
    assert evals[-1][f"eval/{key}_ceiling"] == pytest.approx(value)
  assert ceiling["t2i_recall@1"] < 1.0  # The shared class captions tie: a real ceiling.


def test_evaluate_cli_runs_the_catalog_eval_with_a_names_file_and_a_limit(trained, embedder,
                                                                          tmp_path):
  workdir, _ = trained
  rotated = CLASS_NAMES[1:] + CLASS_NAMES[:1]
  names_file = tmp_path / "names.txt"
  names_file.write_text("\n".join(rotated) + "\n")
  out = tmp_path / "evals.json"
  _run("coca_jax.evaluate", "--workdir", workdir, "--out", str(out),
       "--config.evals.retrieval.enabled=False",
       f"--config.evals.zeroshot.class_names_file={names_file}")
  whole = json.loads(out.read_text())
  direct, direct_rotated = _direct_top1(embedder, CLASS_NAMES), _direct_top1(embedder, rotated)
  print(f"top-1 {direct:.3f}, with the names rotated {direct_rotated:.3f}")
  assert direct_rotated != direct  # The check below would see names in the wrong order.
  assert whole["eval/zeroshot_top1"] == pytest.approx(direct_rotated, abs=1e-9)
  assert set(whole) == {"step", "eval/zeroshot_top1", "eval/zeroshot_top5", "eval/seconds"}
  # `examples` limits the eval to the first stored examples (a TFDS slice works as well); the
  # names given on the command line this time (a tuple literal is taken for a list field).
  _run("coca_jax.evaluate", "--workdir", workdir, "--out", str(out),
       "--config.evals.retrieval.enabled=False", "--config.evals.zeroshot.examples=12",
       f"--config.evals.zeroshot.class_names={tuple(rotated)!r}")
  first_12 = _direct_top1(embedder, rotated, stored_order_limit=12)
  assert first_12 != direct_rotated  # k / 12 is never 14 / 40: a whole-set read would show.
  assert json.loads(out.read_text())["eval/zeroshot_top1"] == pytest.approx(first_12, abs=1e-9)


def test_loaded_model_and_export_bundle_run_the_catalog_eval(trained, embedder, data_dir,
                                                              tmp_path):
  workdir, _ = trained
  bundle = export.export(workdir, str(tmp_path / "bundle"))
  model = api.load(bundle, batch_size=_eval_batch_size(workdir))
  rotated = CLASS_NAMES[1:] + CLASS_NAMES[:1]
  results = model.zero_shot_eval(NAME, "validation", data_dir=data_dir, class_names=rotated)
  assert results["eval/zeroshot_top1"] == pytest.approx(_direct_top1(embedder, rotated),
                                                        abs=1e-9)
  with pytest.raises(config_lib.ConfigError, match="gives 4 class names, but the label"):
    model.zero_shot_eval(NAME, "validation", data_dir=data_dir, class_names=rotated[:4])
  with pytest.raises(TypeError, match=r"\['class_name'\]"):
    model.zero_shot_eval(NAME, "validation", data_dir=data_dir, class_name=rotated)


def test_paper_config_imagenet_arg_names_the_real_catalog_entry(tmp_path):
  """`coca_base.py:imagenet=D` evaluates TFDS's own imagenet2012; not prepared in D, the error
  is the tfds command, with ImageNet's manual download step (no network is touched)."""
  data_dir = str(tmp_path / "tfds")
  config = config_lib.load_config(os.path.join(REPO, "experiments", "coca_base.py") +
                                  f":imagenet={data_dir}")
  group = config.evals.zeroshot
  assert (group.dataset, group.split, group.data_dir) == ("imagenet2012", "validation", data_dir)
  assert group.class_names_file == group.templates_file == "open_clip:imagenet"
  config.evals.retrieval.enabled = config.evals.captioning.enabled = False
  message = _problems(config)
  assert (f"`tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record` (it "
          f"needs its source files in {data_dir}/downloads/manual first") in message


def test_a_dataset_prepared_per_config_is_named_with_its_config(data_dir, tmp_path):
  """TFDS puts a dataset with configs in data_dir/NAME/CONFIG/VERSION (imagenet2012_subset/1pct):
  "NAME/CONFIG" opens it; "NAME" alone says which configs there are."""
  shutil.copytree(os.path.join(data_dir, NAME, "2.0.0"), tmp_path / NAME / "small" / "2.0.0")
  source = sources.open_source(f"{NAME}/small", str(tmp_path), "validation[:5]")
  assert len(source) == 5
  with pytest.raises(FileNotFoundError, match=f"prepared per config; name one: {NAME}/small"):
    sources.open_source(NAME, str(tmp_path), "validation")
