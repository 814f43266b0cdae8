"""The embedded default dataset: scikit-learn's 1797 handwritten digits (8x8 grey, 10 classes), no download.

Fixed split, identical on every machine because it uses no random numbers: within each class, in the order
`sklearn.datasets.load_digits()` returns them, every fifth example (rank 4, 9, 14, ... within its class) is test.
That gives **train 1442, test 355** (19.8%; per class 34-36 test examples).

Images are upscaled once, bilinearly, from 8x8 to `image_size` (pixel values 0..16 divided by 16 to [0, 1]), kept
grey in memory, and turned into normalised RGB per example.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from vimoe.data import transforms

NUM_CLASSES = 10
SPLITS = ("train", "test")
TEST_EVERY = 5  # every fifth example of each class is test
MAX_PIXEL = 16.0  # load_digits pixel values are 0..16


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  return digits.images.astype(np.float32), digits.target.astype(np.int32)  # [1797, 8, 8] in 0..16, [1797]


def split_indices(split: str) -> np.ndarray:
  """Indices into `load_digits()` of `split` ("train" or "test"), ascending."""
  if split not in SPLITS:
    raise ValueError(f"digits split={split!r} is unknown; valid splits: {', '.join(SPLITS)}")
  _, labels = _load()
  rank_in_class = np.zeros(len(labels), np.int64)
  for label in range(NUM_CLASSES):
    members = np.flatnonzero(labels == label)
    rank_in_class[members] = np.arange(len(members))
  is_test = rank_in_class % TEST_EVERY == TEST_EVERY - 1
  return np.flatnonzero(is_test if split == "test" else ~is_test)


def num_examples(split: str) -> int:
  return len(split_indices(split))


@functools.lru_cache(maxsize=2)
def native_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images [N, 8, 8] float32 in [0, 1], labels [N] int32) of `split` ("train" 1442, "test" 355), in the order of
  `split_indices(split)`."""
  images, labels = _load()
  indices = split_indices(split)
  return images[indices] / np.float32(MAX_PIXEL), labels[indices]


@functools.lru_cache(maxsize=4)
def load_split(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(grey images [N, image_size, image_size] float32 in [0, 1], labels [N] int32) of `split`."""
  images, labels = native_split(split)
  return transforms.bilinear_resize(images, image_size, image_size), labels


class DigitsSource:
  """Random-access source of {"image": grey [H, W] float32 in [0, 1], "label": int32} for grain."""

  def __init__(self, split: str, image_size: int):
    self._images, self._labels = load_split(split, image_size)

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self._images[index], "label": self._labels[index]}


def _to_example(image: np.ndarray, label, mean, std) -> dict[str, np.ndarray]:
  return {"image": transforms.normalize(transforms.to_rgb(image), mean, std), "label": np.int32(label)}


class DigitsEval(grain.transforms.Map):
  """Grey [H, W] in [0, 1] -> normalised RGB [H, W, 3] float32."""

  def __init__(self, mean, std):
    self.mean, self.std = mean, std

  def map(self, element):
    return _to_example(element["image"], element["label"], self.mean, self.std)


class DigitsTrain(grain.transforms.RandomMap):
  """A random shift by up to `max_shift` pixels (zero background), then as `DigitsEval`."""

  def __init__(self, mean, std, max_shift: int):
    self.mean, self.std, self.max_shift = mean, std, max_shift

  def random_map(self, element, rng: np.random.Generator):
    image = transforms.random_shift(element["image"], self.max_shift, rng)
    return _to_example(image, element["label"], self.mean, self.std)
