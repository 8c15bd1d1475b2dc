"""Opening prepared datasets: a split of a TFDS data_dir as a random-access source.

`open_source` opens a dataset built by `coca_jax.data.build` (`builders.py` writes those) or any
TFDS catalog dataset prepared as array_record (`tfds build imagenet2012
--file_format=array_record`, for the evals). Nothing is downloaded at run time: a dataset that
is not prepared, or prepared as tfrecord, raises with the command that fixes it.
"""

from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from coca_jax.core import fs


def local_data_dir(data_dir: str) -> str:
  """`data_dir` made absolute; a URL is refused with the fix: array_record files are written
  and read with local file I/O (the C++ reader takes a file name), so a dataset in a bucket is
  used through a mount of it."""
  if fs.is_url(data_dir):
    raise ValueError(
        f"config.data.data_dir={data_dir!r}: datasets are read with local file I/O, not from "
        "a URL. Mount the bucket (gcsfuse; TPU VMs, GKE and Vertex mount gs://BUCKET at "
        "/gcs/BUCKET) and give the mounted path, or copy the dataset to a local disk")
  return fs.resolve(data_dir)


def _catalog_class(name: str):
  """The TFDS catalog's builder class of `name` (e.g. imagenet2012), or None for a name the
  catalog does not know (a dataset built by `coca_jax.data.build`). Looks the name up in the
  installed tensorflow_datasets only: nothing is downloaded."""
  try:
    return tfds.builder_cls(name.split("/")[0])
  except Exception:  # pylint: disable=broad-except  # DatasetNotFoundError, or a module that fails to import
    return None


def prepare_command(name: str, data_dir: str) -> str:
  """The command that prepares catalog dataset `name` in `data_dir` as array_record, with what
  a dataset that needs manual downloads (ImageNet) asks for first."""
  base = name.split(":")[0]
  command = f"`tfds build {base} --data_dir={data_dir} --file_format=array_record`"
  if getattr(_catalog_class(base), "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    command += (f" (it needs its source files in {os.path.join(data_dir, 'downloads', 'manual')}"
                f" first; `tfds build {base}` prints what to put there)")
  return command


def _not_prepared(name: str, data_dir: str, detail: str | None = None) -> FileNotFoundError:
  """The error for a dataset not (or not completely) on disk, with the command that makes it;
  `detail` says what is wrong (default: it is not there)."""
  base = name.split(":")[0]
  if _catalog_class(base) is not None:
    return FileNotFoundError(
        f"TFDS dataset {name!r} {detail or 'is not prepared'} in data_dir {data_dir!r}; nothing "
        f"is downloaded at run time: prepare it once with {prepare_command(base, data_dir)}, "
        "or point the eval's data_dir at where it is prepared")
  return FileNotFoundError(
      f"dataset {name!r} {detail or 'not found'} in data_dir {data_dir!r} (config.data.name / "
      f"config.data.data_dir); build it with `python -m coca_jax.data.build --format ... "
      f"--name {base} --data_dir {data_dir}`, or for a TFDS catalog dataset check the name "
      "(`tfds.list_builders()`)")


def version_dir(name: str, data_dir: str) -> str:
  """The directory holding the prepared files of `name`: data_dir/NAME[/CONFIG]/VERSION.

  `name` is "name", "name/config", optionally with ":version" (default: the newest version
  on disk that finished: TFDS and `build_atomically` both move a version into place only when
  it is complete, with its dataset_info.json). Raises FileNotFoundError naming the fix.
  """
  base, _, version = name.partition(":")
  root = os.path.join(data_dir, *base.split("/"))
  if not os.path.isdir(root):
    raise _not_prepared(name, data_dir)
  finished = [v for v in os.listdir(root) if _is_version(v) and os.path.isfile(
      os.path.join(root, v, "dataset_info.json"))]
  if version:
    if version not in finished:
      raise _not_prepared(name, data_dir, f"has no finished version {version} (on disk: "
                          f"{sorted(finished) or 'none'})")
    return os.path.join(root, version)
  if not finished:
    configs = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)) and any(
        _is_version(v) for v in os.listdir(os.path.join(root, c))))
    if configs:  # data_dir/NAME/CONFIG/VERSION, e.g. imagenet2012_subset/1pct/5.0.0.
      raise FileNotFoundError(
          f"dataset {name!r} in data_dir {data_dir!r} is prepared per config; name one: "
          f"{', '.join(f'{base}/{c}' for c in configs)}")
    if _catalog_class(base) is None:
      raise FileNotFoundError(
          f"dataset {name!r} in data_dir {data_dir!r} has no finished build (an interrupted "
          f"build?); build it again with `python -m coca_jax.data.build ... --name {base} "
          f"--data_dir {data_dir} --overwrite` (train rebuilds the demo set by itself)")
    raise _not_prepared(name, data_dir, "has no finished version (an interrupted `tfds build`?)")
  newest = max(finished, key=lambda v: tuple(int(x) for x in v.split(".")))
  return os.path.join(root, newest)


def _is_version(entry: str) -> bool:
  parts = entry.split(".")
  return len(parts) == 3 and all(p.isdigit() for p in parts)


def check_array_record(name: str, data_dir: str, path: str) -> None:
  """Raises ValueError with the fix when the prepared files at `path` are not array_record
  (TFDS's default, tfrecord, needs TensorFlow to read, and random access needs array_record)."""
  with open(os.path.join(path, "dataset_info.json")) as f:
    file_format = json.load(f).get("fileFormat") or "tfrecord"  # Absent: TFDS's default.
  if file_format != "array_record":
    base = name.split(":")[0]
    raise ValueError(
        f"dataset {name!r} in data_dir {data_dir!r} is prepared as {file_format} ({path}); "
        "coca_jax reads array_record (random access, no TensorFlow). Prepare it again with "
        f"`tfds build {base} --data_dir={data_dir} --file_format=array_record --overwrite`, or "
        f"convert these files where TensorFlow is installed: `tfds convert_format "
        f"--dataset_version_dir={path} --out_file_format=array_record`")


def open_source(name: str, data_dir: str, split: str, decode_images: bool = True,
                image_feature: str = "image"):
  """Random-access source of a prepared split (a grain-compatible `ArrayRecordDataSource`): a
  dataset built by `coca_jax.data.build`, or any TFDS catalog dataset prepared as array_record
  (`tfds build NAME --file_format=array_record`). Nothing is downloaded; a dataset that is not
  prepared, or prepared as tfrecord, raises with the command that fixes it.

  Args:
    name: dataset name as built ("name", "name/config"); ":1.0.0" picks a version (default:
      the newest on disk).
    data_dir: the TFDS data_dir it was prepared in.
    split: split name, or a TFDS slice like "train[:90%]".
    decode_images: False keeps `image_feature` as encoded bytes (the pipeline decodes it
      itself, which is faster: JPEG draft decoding, and no full-size array for a crop).
    image_feature: the image feature's name ("a/b" for a nested one).
  """
  data_dir = local_data_dir(data_dir)
  path = version_dir(name, data_dir)
  check_array_record(name, data_dir, path)
  builder = tfds.builder_from_directory(path)
  decoders = None
  if not decode_images and isinstance(feature_spec(builder.info.features, image_feature),
                                      tfds.features.Image):
    decoders = tfds.decode.SkipDecoding()
    for part in reversed(image_feature.split("/")):
      decoders = {part: decoders}
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except (ValueError, KeyError) as e:
    splits = ", ".join(sorted(builder.info.splits))
    raise ValueError(f"cannot open split {split!r} of dataset {name!r} in {data_dir!r} (its "
                     f"splits: {splits}): {e}") from e


def feature_spec(features, path: str):
  """The TFDS feature at `path` ("a/b" = nested, through Sequences such as coco_captions'
  captions) of a FeaturesDict, or None when it has no such feature."""
  node = features
  for part in path.split("/"):
    if isinstance(node, tfds.features.Sequence):
      node = node.feature
    if not hasattr(node, "keys") or part not in node.keys():
      return None
    node = node[part]
  return node
