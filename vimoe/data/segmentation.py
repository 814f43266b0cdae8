"""Semantic-segmentation input pipelines (grain, no TensorFlow): digit canvases, ADE20K.

    ds = build_segmentation_dataset(config, "train", batch_size=16, seed=0, train=True)
    batch = next(iter(ds))   # {"image": float32 [b, H, W, 3], "label": int32 [b, H, W]}

Labels are class indices in [0, num_classes); IGNORE_LABEL (-1) marks pixels that no metric or loss counts
(ADE20K's "other", padding). `batch_size` is the GLOBAL batch; each process yields batch_size / process_count rows.

Config keys, splits, order, padding and iterator checkpointing: docs/data.md, 'Semantic segmentation'.
"""

from __future__ import annotations

import math
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from vimoe.data import digits, transforms
from vimoe.data.images import config_values, prefetch_in_workers
from vimoe.data.imagenet import DataNotPreparedError, open_tfds_source

NAMES = ("digit_canvas", "ade20k", "scene_parse150")
IGNORE_LABEL = -1
ADE20K_CLASSES = 150
EVAL_CANVAS_SEED = 20240521  # the held-out canvases never change with config.seed
_DEFAULTS = {
    "digit_canvas": dict(canvas_size=32, digit_size=16, digits_per_canvas=(1, 3), ink_threshold=0.25,
                         num_eval_canvases=500, crop_size=32, mean=(0.5,), std=(0.5,)),
    "ade20k": dict(crop_size=512, mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD),
    "scene_parse150": dict(crop_size=512, mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD),
}
_COMMON = dict(augment=True, num_workers=0, data_dir=None, scale_range=(0.5, 2.0), eval_pad_multiple=32,
               eval_stride=None)
_SPLITS = {"digit_canvas": ("train", "test"), "ade20k": ("train", "validation"),
           "scene_parse150": ("train", "test")}
_ADE_DIRS = {"train": "training", "validation": "validation"}


def resolve_config(config) -> dict[str, Any]:
  """The segmentation data config as a dict with every default filled in; an unknown name or key raises."""
  name = config_values(config, {"name": None})["name"]
  if name not in NAMES:
    raise ValueError(f"data.name={name!r} is not a segmentation dataset; valid: {', '.join(NAMES)}")
  known = set(_COMMON) | set(_DEFAULTS[name]) | {"name", "train_split", "eval_split", "read_threads"}
  keys = config.keys() if hasattr(config, "keys") else []
  unknown = sorted(set(keys) - known)
  if unknown:
    raise ValueError(f"unknown data key(s) {', '.join('data.' + k for k in unknown)} for data.name={name!r}; "
                     f"valid: {', '.join(sorted(known))}")
  cfg = {"name": name, **config_values(config, {**_COMMON, **_DEFAULTS[name]})}
  for key in ("mean", "std"):
    value = np.asarray(cfg[key], np.float32).reshape(-1)
    if value.size not in (1, 3) or (key == "std" and np.any(value <= 0)):
      raise ValueError(f"data.{key}={cfg[key]!r} must be one number or three (per RGB channel)"
                       + (", all positive" if key == "std" else ""))
    cfg[key] = tuple(float(v) for v in np.broadcast_to(value, (3,)))
  positive = ["crop_size", "eval_pad_multiple"] + (["canvas_size", "digit_size", "num_eval_canvases"]
                                                  if name == "digit_canvas" else [])
  for key in positive:
    if not isinstance(cfg[key], (int, np.integer)) or isinstance(cfg[key], bool) or cfg[key] < 1:
      raise ValueError(f"data.{key}={cfg[key]!r} must be a positive integer")
  low, high = cfg["scale_range"]
  if not 0 < low <= high:
    raise ValueError(f"data.scale_range={cfg['scale_range']!r} must be (low, high) with 0 < low <= high")
  if name == "digit_canvas":
    low, high = cfg["digits_per_canvas"]
    if not 1 <= low <= high:
      raise ValueError(f"data.digits_per_canvas={cfg['digits_per_canvas']!r} must be (min, max) with 1 <= min <= max")
    if cfg["digit_size"] > cfg["canvas_size"]:
      raise ValueError(f"data.digit_size={cfg['digit_size']} must be <= data.canvas_size={cfg['canvas_size']}")
    if not 0 < cfg["ink_threshold"] < 1:
      raise ValueError(f"data.ink_threshold={cfg['ink_threshold']!r} must be in (0, 1)")
  return cfg


def num_classes(config) -> int:
  """11 for digit canvases (background + 10 digits), 150 for ADE20K (tfds scene_parse150: the red channel's
  category range, also read as 150 so that configs are interchangeable)."""
  return digits.NUM_CLASSES + 1 if resolve_config(config)["name"] == "digit_canvas" else ADE20K_CLASSES


def _check_split(name: str, split: str) -> None:
  base = split.split("[", 1)[0]
  if base not in _SPLITS[name]:
    raise ValueError(f"{name} split={split!r} is unknown; valid: {', '.join(_SPLITS[name])}")


# Digit canvases

def compose_canvas(pool_images: np.ndarray, pool_labels: np.ndarray, rng: np.random.Generator, *, canvas_size: int,
                   digits_per_canvas: tuple[int, int], ink_threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """A canvas of `canvas_size`^2 grey pixels with 1..n digits from the pool at random, non-overlapping places.

  pool_images [N, s, s] in [0, 1] (already at the digit size), pool_labels [N]. Returns (grey [H, W] float32,
  label [H, W] int32) with label = digit + 1 where the digit's ink exceeds `ink_threshold`, else 0 (background).
  Placement: up to 20 random tries per digit to find a free square; a digit that does not fit is left out.
  """
  size = pool_images.shape[-1]
  canvas = np.zeros((canvas_size, canvas_size), np.float32)
  label = np.zeros((canvas_size, canvas_size), np.int32)
  occupied = np.zeros((canvas_size, canvas_size), bool)
  wanted = int(rng.integers(digits_per_canvas[0], digits_per_canvas[1] + 1))
  placed = 0
  for _ in range(wanted * 20):
    if placed == wanted:
      break
    top, left = rng.integers(0, canvas_size - size + 1, size=2)
    window = (slice(top, top + size), slice(left, left + size))
    if occupied[window].any():
      continue
    index = int(rng.integers(len(pool_labels)))
    digit = pool_images[index]
    canvas[window] = digit
    label[window] = np.where(digit > ink_threshold, pool_labels[index] + 1, 0)
    occupied[window] = True
    placed += 1
  return canvas, label


class _CanvasMaker:
  """Shared settings of the canvas transforms (plain attributes: they pickle into grain workers)."""

  def __init__(self, cfg: dict[str, Any], split: str):
    self.split, self.digit_size, self.canvas_size = split, cfg["digit_size"], cfg["canvas_size"]
    self.digits_per_canvas = tuple(cfg["digits_per_canvas"])
    self.ink_threshold, self.mean, self.std = cfg["ink_threshold"], cfg["mean"], cfg["std"]

  def make(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    pool_images, pool_labels = digits.load_split(self.split, self.digit_size)
    grey, label = compose_canvas(pool_images, pool_labels, rng, canvas_size=self.canvas_size,
                                 digits_per_canvas=self.digits_per_canvas, ink_threshold=self.ink_threshold)
    return {"image": transforms.normalize(transforms.to_rgb(grey), self.mean, self.std), "label": label}


class CanvasTrain(grain.transforms.RandomMap, _CanvasMaker):
  """Element (an index) -> a freshly drawn training canvas."""

  def random_map(self, element, rng: np.random.Generator):
    del element
    return self.make(rng)


class CanvasEval(grain.transforms.Map, _CanvasMaker):
  """Element i -> the i-th fixed evaluation canvas (seeded by EVAL_CANVAS_SEED and i only)."""

  def map(self, element):
    return self.make(np.random.default_rng([EVAL_CANVAS_SEED, int(element)]))


# ADE20K

def ade20k_prepare_instructions(data_dir: str | None) -> str:
  return (
      "ADE20K (SceneParse150, 150 classes) is read from the extracted ADEChallengeData2016 directory:\n"
      "  1. Download http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip (923 MB).\n"
      "  2. unzip ADEChallengeData2016.zip -d /data   (gives /data/ADEChallengeData2016/{images,annotations}/...)\n"
      "  3. Point the config at it: --config.data.data_dir=/data/ADEChallengeData2016\n"
      f"(data.data_dir is now {data_dir!r}.) Alternatively data.name='scene_parse150' reads the tfds build, which\n"
      "carries the instance-track annotations (see vimoe/data/segmentation.py).")


def scene_parse150_prepare_instructions(data_dir: str) -> str:
  return (
      "To prepare tfds 'scene_parse150' (once; needs TensorFlow for the build step only):\n"
      f"  pip install tensorflow && tfds build scene_parse150 --data_dir={data_dir} --file_format=array_record\n"
      f"Then set data.data_dir={data_dir!r} (or TFDS_DATA_DIR). For the 150-class benchmark use data.name='ade20k'.")


class AdeDirectorySource:
  """Random access to ADEChallengeData2016/{images,annotations}/<split>/ as {"image": uint8 [H,W,3],
  "annotation": uint8 [H,W]} (file names sorted, so the order is the same everywhere)."""

  def __init__(self, data_dir: str | None, split: str):
    if split not in _ADE_DIRS:
      raise ValueError(f"ade20k split={split!r} is unknown; valid: {', '.join(_ADE_DIRS)}")
    if not data_dir:
      raise DataNotPreparedError(f"data.data_dir is not set.\n{ade20k_prepare_instructions(data_dir)}")
    image_dir = os.path.join(data_dir, "images", _ADE_DIRS[split])
    self.annotation_dir = os.path.join(data_dir, "annotations", _ADE_DIRS[split])
    if not os.path.isdir(image_dir) or not os.path.isdir(self.annotation_dir):
      raise DataNotPreparedError(f"{image_dir} or {self.annotation_dir} does not exist.\n"
                                 f"{ade20k_prepare_instructions(data_dir)}")
    self.image_dir = image_dir
    self.names = sorted(name[:-4] for name in os.listdir(image_dir) if name.endswith(".jpg"))

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    name = self.names[index]
    image = np.asarray(Image.open(os.path.join(self.image_dir, name + ".jpg")).convert("RGB"))
    annotation = np.asarray(Image.open(os.path.join(self.annotation_dir, name + ".png")))
    return {"image": image, "annotation": annotation}


def open_scene_parse150(split: str, data_dir: str | None):
  return open_tfds_source("scene_parse150", split, data_dir, scene_parse150_prepare_instructions)


def annotation_to_label(annotation: np.ndarray, height: int, width: int) -> np.ndarray:
  """An ADE20K annotation -> int32 [height, width] labels: class c in 1..150 -> c - 1; 0 ("other") and anything
  above 150 -> -1 (ignored).

  3-channel annotations (the tfds build) use the red channel. A size that differs from the image's (the tfds mock
  data) is fixed by a nearest-neighbour resize, which never invents a class.
  """
  if annotation.ndim == 3:
    annotation = annotation[..., 0]
  if annotation.shape != (height, width):
    annotation = np.asarray(Image.fromarray(annotation).resize((width, height), Image.Resampling.NEAREST))
  label = annotation.astype(np.int32) - 1
  return np.where(label < ADE20K_CLASSES, label, IGNORE_LABEL)  # values above 150 are not classes: ignored


def _resize_pair(image, label, height, width):
  image = transforms.resize(image, height, width, "bilinear")
  label = np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))
  return image, label


def pad_to(image: np.ndarray, label: np.ndarray, height: int, width: int):
  """Pad at the bottom/right: image with 0, label with IGNORE_LABEL."""
  pad_h, pad_w = height - image.shape[0], width - image.shape[1]
  image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
  label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_LABEL)
  return image, label


class _AdeOptions:
  def __init__(self, cfg: dict[str, Any]):
    self.crop_size, self.scale_range = cfg["crop_size"], tuple(cfg["scale_range"])
    self.mean, self.std, self.eval_pad_multiple = cfg["mean"], cfg["std"], cfg["eval_pad_multiple"]

  def read(self, element):
    image = transforms.to_rgb(np.asarray(element["image"]))
    return image, annotation_to_label(np.asarray(element["annotation"]), image.shape[0], image.shape[1])

  def finish(self, image, label):
    return {"image": transforms.normalize(image, self.mean, self.std, scale=255.0),
            "label": label.astype(np.int32)}


class AdeTrain(grain.transforms.RandomMap, _AdeOptions):
  """Random rescale (mmseg's (4c, c) scale times r ~ U(scale_range)), random crop c x c, flip."""

  def random_map(self, element, rng: np.random.Generator):
    image, label = self.read(element)
    c = self.crop_size
    ratio = rng.uniform(*self.scale_range)
    height, width = image.shape[:2]
    scale = min(4 * c * ratio / max(height, width), c * ratio / min(height, width))
    new_h, new_w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    image, label = _resize_label_safe(image, label, new_h, new_w)
    top = int(rng.integers(0, max(new_h - c, 0) + 1))
    left = int(rng.integers(0, max(new_w - c, 0) + 1))
    image, label = image[top:top + c, left:left + c], label[top:top + c, left:left + c]
    image, label = pad_to(image, label, c, c)
    if rng.random() < 0.5:
      image, label = image[:, ::-1], label[:, ::-1]
    return self.finish(np.ascontiguousarray(image), np.ascontiguousarray(label))


def _resize_label_safe(image, label, height, width):
  """Resize image (bilinear) and label (nearest); labels go through uint8 (0..255, IGNORE as 255) for PIL."""
  label_u8 = np.where(label < 0, 255, label).astype(np.uint8)
  image, label_u8 = _resize_pair(image, label_u8, height, width)
  return image, np.where(label_u8 == 255, IGNORE_LABEL, label_u8.astype(np.int32))


class AdeEval(grain.transforms.Map, _AdeOptions):
  """Original resolution, padded to a multiple of eval_pad_multiple (>= crop_size) with ignored pixels."""

  def map(self, element):
    image, label = self.read(element)
    m, c = self.eval_pad_multiple, self.crop_size
    height = max(c, math.ceil(image.shape[0] / m) * m)
    width = max(c, math.ceil(image.shape[1] / m) * m)
    image, label = pad_to(image, label, height, width)
    return self.finish(image, label)


# The pipeline

def num_examples(config, split: str) -> int:
  cfg = resolve_config(config)
  _check_split(cfg["name"], split)
  if cfg["name"] == "digit_canvas":
    return cfg["num_eval_canvases"] if split == "test" else digits.num_examples("train")
  return len(_open(cfg, split))


def _open(cfg, split):
  if cfg["name"] == "ade20k":
    return AdeDirectorySource(cfg["data_dir"], split)
  return open_scene_parse150(split, cfg["data_dir"])


def build_segmentation_dataset(config, split: str, *, batch_size: int, seed: int, train: bool,
                               num_epochs: int | None = None, process_index: int | None = None,
                               process_count: int | None = None) -> grain.IterDataset:
  """A grain IterDataset of {"image": float32 [b, H, W, 3], "label": int32 [b, H, W]} (see the module docstring).

  Training: shuffled, augmented, repeated (`num_epochs`, None = forever), last partial batch dropped. Evaluation:
  one ordered pass; every process yields the same number of full batches, the end padded with all-ignored rows.
  ADE20K evaluation images keep their own sizes, so their batch must hold one image per process.
  """
  from vimoe.data.images import check_loader_args, shard_batches  # pylint: disable=import-outside-toplevel
  cfg = resolve_config(config)
  _check_split(cfg["name"], split)
  process_index, process_count, local_batch = check_loader_args(batch_size, seed, num_epochs, process_index,
                                                                process_count)
  if cfg["name"] == "digit_canvas":
    length = cfg["num_eval_canvases"] if not train else digits.num_examples(split)
    source = list(range(length))
    transform = CanvasTrain(cfg, split) if train else CanvasEval(cfg, split)
    pad_shape = (cfg["canvas_size"],) * 2
  else:
    if not train and local_batch != 1:
      raise ValueError(f"{cfg['name']} evaluates images at their own sizes, one per process: eval batch size "
                       f"{batch_size} must equal the process count {process_count} (set eval_batch_size)")
    source = _open(cfg, split)
    transform = AdeTrain(cfg) if train and cfg["augment"] else AdeEval(cfg)
    if train and not cfg["augment"]:
      raise ValueError(f"data.augment=False is not supported for {cfg['name']} training: images differ in size "
                       "and need the random crop to batch")
    pad_shape = (cfg["crop_size"],) * 2
  pad = {"image": np.zeros(pad_shape + (3,), np.float32), "label": np.full(pad_shape, IGNORE_LABEL, np.int32)}
  ds = shard_batches(grain.MapDataset.source(source).seed(seed), transform, train=train, split=split,
                     process_index=process_index, process_count=process_count, local_batch=local_batch,
                     num_epochs=num_epochs, pad_element=pad)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if cfg["name"] == "digit_canvas" else 8,
                                                 prefetch_buffer_size=0 if cfg["name"] == "digit_canvas" else 8))
  return prefetch_in_workers(iter_ds, cfg["num_workers"])
