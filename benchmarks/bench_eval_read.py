"""How fast an eval reads a TFDS catalog-style dataset: images/s of `EvalSource.batches`
(array_record read, JPEG decode, shorter side resized, center crop) on ImageNet-sized photos.

  python benchmarks/bench_eval_read.py [--num 400] [--sizes 224,288]

Prepares (once, in a temporary data_dir) a registered TFDS builder of `--num` 500x375 JPEGs
(quality 90, smooth random content: ImageNet's typical size) with a 1,000-class ClassLabel,
as `tfds build --file_format=array_record` would, then reads the split 3 times per image size
and prints the rates and their median.
"""

import argparse
import io
import tempfile
import time

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from coca_jax.core import config as config_lib
from coca_jax.data import pipeline

NAME = "coca_jax_bench_photos"


def make_builder(num: int):
  class CocaJaxBenchPhotos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    name = NAME

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=1000)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for index in range(num):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        photo = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
        encoded = io.BytesIO()
        photo.save(encoded, format="JPEG", quality=90)
        yield index, {"image": encoded.getvalue(), "label": index % 1000}
  return CocaJaxBenchPhotos


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num", type=int, default=400)
  parser.add_argument("--sizes", default="224,288")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as data_dir:
    make_builder(args.num)(data_dir=data_dir, file_format="array_record").download_and_prepare()
    config = config_lib.load_config("experiments/demo.py:smoke")
    for size in map(int, args.sizes.split(",")):
      config.data.image_size = size
      source = pipeline.make_eval_source(config, "validation", NAME, data_dir=data_dir)
      rates = []
      for _ in range(3):
        start, count = time.perf_counter(), 0
        for batch in source.batches(64):
          count += len(batch["image"])
        rates.append(count / (time.perf_counter() - start))
      print(f"{size} px: {', '.join(f'{r:.0f}' for r in rates)} images/s, median "
            f"{sorted(rates)[1]:.0f}")


if __name__ == "__main__":
  main()
