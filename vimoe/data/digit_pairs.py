"""Two-digit numbers 00-99 made of scikit-learn digits (100 classes), and its one-digit pretraining variant.

Config keys, splits, order, padding and iterator checkpointing: docs/data.md, 'Digit pairs'.
"""

from __future__ import annotations

import functools

import numpy as np

from vimoe.data import digits

TASKS = ("pairs", "slots", "single")
NUM_CLASSES = {"pairs": 100, "slots": 20, "single": 10}
CANVAS = 16       # the canvas side; the only image_size these tasks support
DIGIT = 8         # sklearn digits are 8x8
TOP = 4           # digits occupy rows TOP .. TOP + DIGIT - 1
TEST_PER_CLASS = 100
TEST_SEED = 12    # ViMoE placement study, issue 12
MAX_TEST_PER_CLASS = 34 * 34  # the smallest n_a x n_b: more distinct pairs than that do not exist for every class


def compose(left: np.ndarray | None, right: np.ndarray | None) -> np.ndarray:
  """A [16, 16] float32 canvas with the 8x8 `left` and `right` digits in their slots (None: blank slot)."""
  canvas = np.zeros((CANVAS, CANVAS), np.float32)
  for slot, image in enumerate((left, right)):
    if image is not None:
      canvas[TOP:TOP + DIGIT, slot * DIGIT:(slot + 1) * DIGIT] = image
  return canvas


def held_out_pairs(per_class: int = TEST_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
  """(left, right) positions into `digits.native_split("test")` of the fixed test pairs, class-major: rows
  c * per_class .. (c + 1) * per_class - 1 are class c = 10 * tens + units (see the module docstring)."""
  if not 1 <= per_class <= MAX_TEST_PER_CLASS:
    raise ValueError(f"test_per_class={per_class} must be in [1, {MAX_TEST_PER_CLASS}] (distinct held-out pairs per "
                     f"class)")
  _, labels = digits.native_split("test")
  members = [np.flatnonzero(labels == digit) for digit in range(digits.NUM_CLASSES)]
  rng = np.random.RandomState(TEST_SEED)  # legacy generator: numpy keeps its stream fixed
  left, right = [], []
  for label in range(NUM_CLASSES["pairs"]):
    tens, units = members[label // 10], members[label % 10]
    chosen = rng.choice(len(tens) * len(units), per_class, replace=False)
    left.append(tens[chosen // len(units)])
    right.append(units[chosen % len(units)])
  return np.concatenate(left), np.concatenate(right)


@functools.lru_cache(maxsize=4)
def _test_canvases(task: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
  images, labels = digits.native_split("test")
  if task == "pairs":
    left, right = held_out_pairs(per_class)
    canvases = np.stack([compose(images[i], images[j]) for i, j in zip(left, right)])
    return canvases, (10 * labels[left] + labels[right]).astype(np.int32)
  canvases = np.stack([compose(*((image, None) if slot == 0 else (None, image)))
                       for image in images for slot in (0, 1)])
  slot_offset = np.tile([0, 10], len(labels)) if task == "slots" else 0
  return canvases, (np.repeat(labels, 2) + slot_offset).astype(np.int32)


def check_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f"digit_pairs task={task!r} is unknown; valid: {', '.join(TASKS)}")
  return task


def num_examples(task: str, split: str, per_class: int = TEST_PER_CLASS) -> int:
  check_task(task)
  if split not in digits.SPLITS:
    raise ValueError(f"digit_pairs split={split!r} is unknown; valid splits: {', '.join(digits.SPLITS)}")
  if split == "test":
    return NUM_CLASSES["pairs"] * per_class if task == "pairs" else 2 * digits.num_examples("test")
  n = digits.num_examples("train")
  return n * n if task == "pairs" else 2 * n


class DigitPairsSource:
  """Random-access source of {"image": grey [16, 16] float32 in [0, 1], "label": int32} for grain.

  Training canvases are composed when read (train pairs: index i = left * n + right over the n training digits;
  slots and single: index i = 2 * digit + slot); test canvases are built once and cached."""

  def __init__(self, task: str, split: str, per_class: int = TEST_PER_CLASS):
    self.task, self.split = check_task(task), split
    self._length = num_examples(task, split, per_class)
    if split == "test":
      self._images, self._labels = _test_canvases(task, per_class)
    else:
      self._digits, self._digit_labels = digits.native_split("train")

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._length:
      raise IndexError(f"index {index} outside [0, {self._length})")
    if self.split == "test":
      return {"image": self._images[index], "label": self._labels[index]}
    if self.task == "pairs":
      left, right = divmod(index, len(self._digits))
      label = 10 * self._digit_labels[left] + self._digit_labels[right]
      return {"image": compose(self._digits[left], self._digits[right]), "label": np.int32(label)}
    digit, slot = divmod(index, 2)
    image = self._digits[digit]
    canvas = compose(image, None) if slot == 0 else compose(None, image)
    label = self._digit_labels[digit] + (10 * slot if self.task == "slots" else 0)
    return {"image": canvas, "label": np.int32(label)}
