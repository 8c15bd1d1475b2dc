"""What a run needs on disk before its input pipeline starts: the dataset and the tokenizer.

`prepare_data(config, workdir)` builds the demo dataset if it is missing (config.data.build_demo),
trains a SentencePiece tokenizer on the training captions if none is given, or keeps a copy of a
fixed-vocabulary tokenizer (clip_bpe) beside the config; it fills config.data.data_dir and
config.data.tokenizer in place (so the workdir's config.json records exactly what the run used)
and returns the loaded tokenizer, which the caller hands to the pipeline (loaded once per run).
In a multi-process run only process 0 builds and writes; every process waits at a barrier.
"""

from __future__ import annotations

import os

import jax

from coca_jax.core import fs
from coca_jax.core.config import ConfigError
from coca_jax.data import builders
from coca_jax.data import mixture
from coca_jax.data import sources
from coca_jax.data import video
from coca_jax.data import visual_codebook
from coca_jax.data.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer


DEMO_NAME = "digit_scenes"  # The one name config.data.build_demo builds (experiments/demo.py).
# The demo scenes' train captions as a text corpus (`data.build --format text`), for VLMo's
# text-only stage 2 (experiments/demo.py:vlmo,stage=2); config.data.build_demo builds it too.
DEMO_TEXT_NAME = "digit_scene_captions"


def sync(name: str) -> None:
  """A barrier across the processes of a multi-process run (a no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def build_caption_corpus(data_dir: str) -> None:
  """The demo scenes' train captions (every caption of every scene, in order) written to
  DATA_DIR/digit_scene_captions.txt, a text a line, then built from that file as any text corpus
  is (`python -m coca_jax.data.build --format text`) into the dataset DEMO_TEXT_NAME."""
  source = sources.open_source(DEMO_NAME, data_dir, "train", decode_images=False)
  path = os.path.join(sources.local_data_dir(data_dir), f"{DEMO_TEXT_NAME}.txt")
  with open(path, "w", encoding="utf-8") as f:
    for i in range(len(source)):
      for caption in source[i]["captions"]:
        f.write((caption.decode() if isinstance(caption, bytes) else str(caption)) + "\n")
  builders.build_atomically("text", DEMO_TEXT_NAME, data_dir, src=path, show_progress=False)


def prepare_data(config, workdir: str, class_names=None) -> Tokenizer:
  """Builds the demo dataset if it is missing and trains the tokenizer if none is given.

  `config` is a completed config (`coca_jax.core.config.complete`). Fills config.data.data_dir /
  config.data.tokenizer in place and returns the tokenizer, checked against config.model.text
  (vocab_size, bos_id, eos_id). A mixture's tokenizer is trained on the texts of all its
  sources (`mixture.tokenizer_texts`; `class_names` resolves a label source's class names, as
  for `mixture.make_mixture_iterator`).
  """
  data = config.data
  if not data.name:
    raise ConfigError(
        "config.data.name is empty: name the dataset to train on, built with `python -m "
        "coca_jax.data.build --format folder|webdataset --src SRC --name NAME --data_dir DIR`, "
        "and pass --config.data.name=NAME --config.data.data_dir=DIR")
  if not data.data_dir:
    # array_record files are read with local file I/O: with a gs:// workdir the demo data goes
    # to TFDS's own default directory on this machine instead.
    data.data_dir = (os.path.expanduser(os.path.join("~", "tensorflow_datasets"))
                     if fs.is_url(workdir) else fs.join(workdir, "tensorflow_datasets"))
  if data.build_demo:
    # The auto-build makes the demo set under its own name only: any other name could be a
    # dataset of the user's (built or being copied in) that the demo must not be mistaken for.
    if data.name not in (DEMO_NAME, DEMO_TEXT_NAME):
      raise ConfigError(
          f"config.data.build_demo=True builds the demo set, named {DEMO_NAME!r} (or its "
          f"captions as a text corpus, {DEMO_TEXT_NAME!r}), but config.data.name={data.name!r}: "
          f"set --config.data.name={DEMO_NAME} for the demo, or --config.data.build_demo=False "
          f"to train on {data.name!r} (built with `python -m coca_jax.data.build`)")
    # Only process 0 looks and builds; every process syncs (another process could see the
    # directory process 0 is still writing and skip the barrier).
    if jax.process_index() == 0 and not builders.is_built(DEMO_NAME, data.data_dir):
      builders.build_atomically("demo", DEMO_NAME, data.data_dir,
                                **dict(data.build_demo_options))
    sync("demo dataset built")
    # A dataset of this name built with other options (a smoke run's, or `coca_jax.data.build
    # --format demo` defaults) would otherwise be trained on silently.
    differences = builders.check_built_options(DEMO_NAME, data.data_dir, "demo",
                                               dict(data.build_demo_options))
    if differences:
      raise ConfigError(
          f"dataset {DEMO_NAME!r} in {data.data_dir} was built with other "
          f"config.data.build_demo_options than this run's ({'; '.join(differences)}): give "
          f"this run its own --config.data.data_dir, or remove "
          f"{os.path.join(data.data_dir, DEMO_NAME)} to build it again")
    if data.name == DEMO_TEXT_NAME:
      if jax.process_index() == 0 and not builders.is_built(DEMO_TEXT_NAME, data.data_dir):
        build_caption_corpus(data.data_dir)
      sync("demo text corpus built")
  clips = config.get("evals", {}).get("video")
  if clips and clips.enabled and clips.build_demo and clips.dir:
    # The demo's moving-digit clips (config.evals.video), built once like its other splits.
    clip_dir = os.path.join(data.data_dir, clips.dir)
    if jax.process_index() == 0 and not os.path.isdir(clip_dir):
      video.build_demo_clips(clip_dir, **dict(clips.build_demo_options))
    sync("demo clips built")
  _prepare_codebook(config, workdir)
  kind = data.tokenizer_kind
  if kind in ("clip_bpe", "wordpiece"):  # Fixed: keep a copy beside the config, train nothing.
    tokenizer = load_tokenizer(data.tokenizer, kind)
    data.tokenizer = fs.join(workdir, TOKENIZER_FILES[kind])
    if jax.process_index() == 0 and not fs.exists(data.tokenizer):
      fs.write_bytes(data.tokenizer, tokenizer.model_proto)
    sync("tokenizer copied")
  if not data.tokenizer:
    path = fs.join(workdir, "tokenizer.model")
    if not fs.exists(path) and jax.process_index() == 0:
      if data.get("sources"):
        captions = mixture.tokenizer_texts(config, class_names)
      else:
        source = sources.open_source(data.name, data.data_dir, data.train_split,
                                      decode_images=False)
        captions = [c.decode() if isinstance(c, bytes) else str(c)
                    for i in range(len(source)) for c in source[i]["captions"]]
      vocab = data.tokenizer_vocab or config.model.text.vocab_size  # 0: the model's.
      Tokenizer.train(captions, path[:-len(".model")], vocab_size=vocab,
                      model_type=data.tokenizer_type)
    sync("tokenizer trained")
    data.tokenizer = path
  tokenizer = load_tokenizer(data.tokenizer, kind)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise ConfigError(
        f"config.model.text.vocab_size={config.model.text.vocab_size} is smaller than the "
        f"tokenizer's {tokenizer.vocab_size} pieces ({data.tokenizer}); set it to at least "
        f"{tokenizer.vocab_size}")
  specials = (config.model.text.bos_id, config.model.text.eos_id)
  if specials != (tokenizer.bos_id, tokenizer.eos_id):
    raise ConfigError(
        f"config.model.text (bos_id, eos_id)={specials} but the {kind} tokenizer's are "
        f"{(tokenizer.bos_id, tokenizer.eos_id)}; set them to the tokenizer's")
  return tokenizer


def _prepare_codebook(config, workdir: str) -> None:
  """Masked image modelling (config.loss.mim_weight > 0) without a codebook: fits one on the
  train images into WORKDIR/visual_codebook.npy (`visual_codebook`; once, process 0) and
  records its path in config.loss.mim_codebook, as the tokenizer's is recorded."""
  loss = config.get("loss", {})
  if not loss.get("mim_weight") or loss.get("mim_codebook"):
    return
  path = fs.join(workdir, visual_codebook.CODEBOOK_FILE)
  if fs.is_url(path):
    raise ConfigError(f"config.loss.mim_codebook is '' and the workdir {workdir} is not local: "
                      "fit the codebook in a local run and pass its path")
  if jax.process_index() == 0 and not os.path.exists(path):
    data, model = config.data, config.model
    visual_codebook.fit_on_dataset(data.name, data.data_dir, data.train_split, path,
                                   size=model.mome.mim_vocab, patch=model.patch_size,
                                   image_size=data.image_size, seed=config.train.seed)
  sync("visual codebook fitted")
  loss.mim_codebook = path
