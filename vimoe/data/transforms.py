"""Per-image transforms in NumPy/PIL: resizing, crops, flips, normalisation. No jax, no TensorFlow.

Images are [H, W, C] arrays (uint8 straight from the decoder, or float32 in [0, 1]); every function returns a new
array. The random ones take a `np.random.Generator` (grain hands one to each element of a `random_map`), so a
pipeline is deterministic per seed.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of 1-D bilinear resampling with half-pixel centres and clamped edges.

  Output pixel i samples the input at x = (i + 0.5) * in_size / out_size - 0.5 (the convention of
  `jax.image.resize` and PIL); for upsampling this equals `jax.image.resize(..., "bilinear")`.
  """
  x = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
  x = np.clip(x, 0, in_size - 1)
  left = np.floor(x).astype(np.int64)
  right = np.minimum(left + 1, in_size - 1)
  frac = x - left
  weights = np.zeros((out_size, in_size), np.float64)
  weights[np.arange(out_size), left] += 1 - frac
  weights[np.arange(out_size), right] += frac
  return weights


def bilinear_resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a stack of grey images [N, h, w] -> [N, height, width] (float32)."""
  rows = bilinear_resize_matrix(images.shape[1], height)  # [height, h]
  cols = bilinear_resize_matrix(images.shape[2], width)   # [width, w]
  return np.einsum("Hh,nhw,Ww->nHW", rows, images.astype(np.float64), cols).astype(np.float32)


def normalize(image: np.ndarray, mean, std, *, scale: float = 1.0) -> np.ndarray:
  """float32 `(image / scale - mean) / std`, per channel (the last axis)."""
  image = image.astype(np.float32) / np.float32(scale)
  return (image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def to_rgb(image: np.ndarray) -> np.ndarray:
  """[H, W] or [H, W, 1] -> [H, W, 3] by repeating the grey channel; [H, W, 3] passes through."""
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.shape[-1] != 3:
    raise ValueError(f"expected a grey or RGB image, got shape {image.shape}")
  return image


def random_shift(image: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
  """Shift an [H, W, ...] image by up to `max_shift` pixels along each axis, filling with zeros (background)."""
  if max_shift <= 0:
    return image
  height, width = image.shape[:2]
  pad = [(max_shift, max_shift), (max_shift, max_shift)] + [(0, 0)] * (image.ndim - 2)
  padded = np.pad(image, pad)
  top, left = rng.integers(0, 2 * max_shift + 1, size=2)
  return padded[top:top + height, left:left + width]


def resize(image: np.ndarray, height: int, width: int, interpolation: str = "bicubic",
           box: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """Resize a uint8 [H, W, 3] image (or its `box` = (left, top, right, bottom) region) to [height, width, 3].

  PIL filters antialias when downsampling, like torchvision's PIL path that DINOv2's transforms use.
  """
  out = Image.fromarray(image).resize((width, height), INTERPOLATIONS[interpolation], box=box)
  return np.asarray(out)


def resize_shorter_side(image: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
  """Resize so the shorter side is `size`, keeping the aspect (torchvision `Resize(int)`: long side truncated)."""
  height, width = image.shape[:2]
  if height <= width:
    new_height, new_width = size, int(size * width / height)
  else:
    new_height, new_width = int(size * height / width), size
  if (new_height, new_width) == (height, width):
    return image
  return resize(image, new_height, new_width, interpolation)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central [size, size] window; offsets rounded like torchvision's `CenterCrop`."""
  height, width = image.shape[:2]
  if height < size or width < size:
    raise ValueError(f"center_crop of {size} needs an image at least that large, got {height}x{width}")
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return image[top:top + size, left:left + size]


def eval_resize_size(image_size: int, crop_fraction: float) -> int:
  """Shorter side before the evaluation center crop: floor(image_size / crop_fraction) (timm); 224 -> 256."""
  return int(math.floor(image_size / crop_fraction + 1e-9))


def center_crop_eval(image: np.ndarray, image_size: int, crop_fraction: float = 0.875,
                     interpolation: str = "bicubic") -> np.ndarray:
  """Evaluation view: shorter side to image_size / crop_fraction, then the central image_size square (uint8)."""
  image = resize_shorter_side(image, eval_resize_size(image_size, crop_fraction), interpolation)
  return center_crop(image, image_size)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, crop_height, crop_width) of an Inception-style crop (torchvision `RandomResizedCrop.get_params`).

  Up to 10 tries of area fraction ~ U(scale) and aspect ~ logU(ratio); if none fits, the central crop with the
  aspect clamped into `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_width = int(round(math.sqrt(target_area * aspect)))
    crop_height = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return top, left, crop_height, crop_width
  in_ratio = width / height
  if in_ratio < min(ratio):
    crop_width, crop_height = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    crop_height, crop_width = height, int(round(height * max(ratio)))
  else:
    crop_height, crop_width = height, width
  return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def random_resized_crop(image: np.ndarray, image_size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), interpolation: str = "bicubic") -> np.ndarray:
  """Training view: a random crop (see `random_resized_crop_box`) resized to [image_size, image_size] (uint8)."""
  top, left, crop_height, crop_width = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
  return resize(image, image_size, image_size, interpolation, box=(left, top, left + crop_width, top + crop_height))


def random_flip_left_right(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirror the width axis with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image
