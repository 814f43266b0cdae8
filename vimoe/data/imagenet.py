"""ImageNet-1k (ILSVRC 2012) from `tfds.data_source('imagenet2012')`: ArrayRecord files read without TensorFlow.

The data source returns examples {"image": uint8 [H, W, 3] (already JPEG-decoded by tfds with OpenCV or PIL),
"label": int64 scalar, "file_name": str}. Splits: "train" (1,281,167), "validation" (50,000), and tfds slices of
them such as "train[:99%]" or "validation[:1000]"; "test" has no labels.

Preparing the data once (reading it later needs no TensorFlow) is described by `PREPARE_INSTRUCTIONS`.
"""

from __future__ import annotations

import os

import grain
import numpy as np

from vimoe.data import transforms

NAME = "imagenet2012"
NUM_CLASSES = 1000
class DataNotPreparedError(FileNotFoundError):
  """The tfds dataset is not on disk (in the ArrayRecord format) under the data dir."""


def default_data_dir() -> str:
  """Where tfds looks without a data_dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return os.fspath(tfds.core.constants.get_default_data_dir())


def tfds_manual_download_instructions() -> str:
  """tfds' own text (imagenet2012 `Builder.MANUAL_DOWNLOAD_INSTRUCTIONS`), read from the installed package."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds.builder_cls(NAME).MANUAL_DOWNLOAD_INSTRUCTIONS


def prepare_instructions(data_dir: str) -> str:
  manual_dir = os.path.join(data_dir, "downloads", "manual")
  return (
      f"To prepare ImageNet-1k for vimoe (once; the two archives are about 145 GB):\n"
      f"  1. Register at https://image-net.org/download-images and download ILSVRC2012_img_train.tar and\n"
      f"     ILSVRC2012_img_val.tar into the tfds manual dir {manual_dir}/ (do not extract them).\n"
      f"     tfds' own instructions (imagenet2012 MANUAL_DOWNLOAD_INSTRUCTIONS):\n"
      + "".join(f"       {line.strip()}\n" for line in tfds_manual_download_instructions().strip().splitlines())
      + f"  2. Build it in the ArrayRecord format, which tfds.data_source needs. This one step needs TensorFlow\n"
      f"     (`pip install tensorflow`: the `tfds` command and the imagenet2012 builder import it); reading does not:\n"
      f"       tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record\n"
      f"  3. Point the config at it: data_dir={data_dir!r} (or set TFDS_DATA_DIR).")


def open_tfds_source(name: str, split: str, data_dir: str | None, instructions):
  """The random-access tfds data source (ArrayRecord) of dataset `name`, `split`; `DataNotPreparedError` with
  `instructions(data_dir)` (how to prepare it) when it is missing."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            builder_kwargs={"file_format": "array_record"})
  except (KeyError, FileNotFoundError, NotImplementedError, ValueError, AssertionError) as error:
    # tfds raises KeyError ("splits is empty") when nothing was built, NotImplementedError / ValueError when only
    # another file format (tfrecord) was built or the split name does not exist.
    data_dir = data_dir or default_data_dir()
    raise DataNotPreparedError(
        f"Cannot open tfds dataset {name!r} split {split!r} in ArrayRecord format under data_dir={data_dir!r}: "
        f"{type(error).__name__}: {error}\n{instructions(data_dir)}") from error


def open_source(split: str, data_dir: str | None):
  """The random-access tfds data source of `split`; `DataNotPreparedError` with instructions when it is missing."""
  return open_tfds_source(NAME, split, data_dir, prepare_instructions)


def num_examples(split: str, data_dir: str | None) -> int:
  return len(open_source(split, data_dir))


class _Options:
  """Shared transform settings (plain attributes so the transforms pickle into grain worker processes)."""

  def __init__(self, image_size: int, mean, std, interpolation: str):
    self.image_size, self.mean, self.std, self.interpolation = image_size, mean, std, interpolation

  def finish(self, image: np.ndarray, label) -> dict[str, np.ndarray]:
    return {"image": transforms.normalize(image, self.mean, self.std, scale=255.0), "label": np.int32(label)}


class ImagenetEval(grain.transforms.Map, _Options):
  """Shorter side to image_size / crop_fraction (224 -> 256), central image_size square, normalise."""

  def __init__(self, image_size: int, mean, std, interpolation: str = "bicubic", crop_fraction: float = 0.875):
    _Options.__init__(self, image_size, mean, std, interpolation)
    self.crop_fraction = crop_fraction

  def map(self, element):
    image = transforms.to_rgb(element["image"])
    image = transforms.center_crop_eval(image, self.image_size, self.crop_fraction, self.interpolation)
    return self.finish(image, element["label"])


class ImagenetTrain(grain.transforms.RandomMap, _Options):
  """Random-resized crop (area `scale`, aspect `ratio`) to image_size, horizontal flip, normalise."""

  def __init__(self, image_size: int, mean, std, interpolation: str = "bicubic", scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3)):
    _Options.__init__(self, image_size, mean, std, interpolation)
    self.scale, self.ratio = tuple(scale), tuple(ratio)

  def random_map(self, element, rng: np.random.Generator):
    image = transforms.to_rgb(element["image"])
    image = transforms.random_resized_crop(image, self.image_size, rng, self.scale, self.ratio, self.interpolation)
    image = transforms.random_flip_left_right(image, rng)
    return self.finish(image, element["label"])
