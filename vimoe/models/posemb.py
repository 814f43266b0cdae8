"""Position-embedding resampling, exactly as torch.nn.functional.interpolate(mode="bicubic", align_corners=False)
(DINOv2's `interpolate_pos_encoding`), so weights trained at one resolution run at another as in the original."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a (torch: a=-0.75 plain, a=-0.5 antialiased)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_resize_matrix(in_size: int, out_size: int, *, antialias: bool = False, offset: float = 0.0
                          ) -> np.ndarray:
  """[out_size, in_size] matrix R with resized = R @ signal, matching torch bicubic, align_corners=False.

  `offset` > 0 reproduces torch called with scale_factor=(out_size + offset) / in_size instead of a size, as the
  original DINOv2 code does; the output size is the same, the sampling positions move slightly.
  """
  inverse_scale = in_size / (out_size + offset)  # input pixels per output pixel
  matrix = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    if not antialias:
      # Sample at source coordinate s (pixel centres), 4 taps, indices clamped at the border.
      source = inverse_scale * (i + 0.5) - 0.5
      first = math.floor(source)
      taps = np.arange(first - 1, first + 3)
      weights = _cubic(taps - source, -0.75)
      np.add.at(matrix[i], np.clip(taps, 0, in_size - 1), weights)
    else:
      # PIL-style: the kernel is stretched by the downscale factor and renormalised inside the image.
      support = 2.0 * max(inverse_scale, 1.0)
      stretch = 1.0 / max(inverse_scale, 1.0)
      centre = inverse_scale * (i + 0.5)
      low = max(int(centre - support + 0.5), 0)
      high = min(int(centre + support + 0.5), in_size)
      taps = np.arange(low, high)
      weights = _cubic((taps - centre + 0.5) * stretch, -0.5)
      matrix[i, taps] = weights / weights.sum()
  return matrix


def resize_position_grid(grid: jax.Array, new_hw: tuple[int, int], *, antialias: bool = False,
                         offset: float = 0.0) -> jax.Array:
  """grid [h, w, D] -> [h', w', D] by separable bicubic interpolation (computed in float32)."""
  h, w, _ = grid.shape
  rows = jnp.asarray(bicubic_resize_matrix(h, new_hw[0], antialias=antialias, offset=offset), jnp.float32)
  cols = jnp.asarray(bicubic_resize_matrix(w, new_hw[1], antialias=antialias, offset=offset), jnp.float32)
  return jnp.einsum("ih,jw,hwD->ijD", rows, cols, grid.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)  # [h', w', D]


def resample_pos_embed(pos: jax.Array, grid_hw: tuple[int, int], *, antialias: bool = False,
                       offset: float = 0.0) -> jax.Array:
  """[1, 1 + n*n, D] (a square grid, as DINOv2 stores it) -> [1, 1 + h*w, D]; the class position is kept."""
  num_patches = pos.shape[1] - 1
  side = math.isqrt(num_patches)
  if pos.ndim != 3 or side * side != num_patches:
    raise ValueError(f"parameter pos_embed has shape {tuple(pos.shape)}: expected [1, 1 + n*n, D] to resample "
                     f"to the {grid_hw} patch grid")
  return resize_class_and_grid(pos, (side, side), grid_hw, antialias=antialias, offset=offset)


def resize_class_and_grid(pos: jax.Array, grid_hw: tuple[int, int], new_hw: tuple[int, int], *,
                          antialias: bool = False, offset: float = 0.0) -> jax.Array:
  """[1, 1 + h*w, D] (class position, then the row-major h x w grid) -> [1, 1 + h'*w', D]."""
  grid = resize_position_grid(pos[0, 1:].reshape(grid_hw[0], grid_hw[1], -1), new_hw, antialias=antialias,
                              offset=offset)                                                 # [h', w', D]
  return jnp.concatenate([pos[:, :1], grid.reshape(1, -1, grid.shape[-1]).astype(pos.dtype)], axis=1)
