"""Expert maps: which expert each patch of an image went to, drawn over the image (segmentation routing).

Users look at these to see whether experts specialise by region, texture or class. One row per image: the image,
its labels, the prediction, then one panel per MoE block with every patch coloured by its first-choice expert
(nearest-neighbour upsampled to pixels, blended over the grey image).
"""

from __future__ import annotations

import pathlib

import numpy as np


def _discrete_colors(count: int) -> np.ndarray:
  """[count, 3] RGB in [0, 1]: tab10/tab20 for up to 20 entries, an HSV wheel beyond."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  if count <= 10:
    return np.asarray(matplotlib.colormaps["tab10"].colors[:count])
  if count <= 20:
    return np.asarray(matplotlib.colormaps["tab20"].colors[:count])
  return matplotlib.colormaps["hsv"](np.linspace(0, 1, count, endpoint=False))[:, :3]


def colorize_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int [H, W] class indices (-1 ignored) -> RGB [H, W, 3]; ignored pixels black."""
  palette = np.concatenate([np.zeros((1, 3)), _discrete_colors(max(num_classes, 1))], axis=0)
  return palette[np.clip(labels, -1, num_classes - 1) + 1]


def upsample_nearest(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """[h, w] -> [height, width]: each cell becomes its block of pixels (height, width multiples or not)."""
  rows = (np.arange(height) * grid.shape[0]) // height
  cols = (np.arange(width) * grid.shape[1]) // width
  return grid[rows][:, cols]


def save_expert_maps(path, *, images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                     expert_maps: dict[str, np.ndarray], num_experts: int, mean=(0.5,) * 3, std=(0.5,) * 3,
                     num_classes: int | None = None, title: str = "", alpha: float = 0.6) -> pathlib.Path:
  """Writes the PNG and returns its path.

  images [n, H, W, 3] normalised as in the pipeline ((pixel - mean) / std), labels / predictions [n, H, W],
  expert_maps {"block{i}": [n, h, w] first-choice expert per patch}.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel

  n, H, W, _ = images.shape
  num_classes = num_classes or int(max(labels.max(), predictions.max())) + 1
  pixels = np.clip(images * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
  grey = pixels.mean(-1, keepdims=True)
  expert_colors = _discrete_colors(num_experts)
  blocks = sorted(expert_maps, key=lambda name: int("".join(c for c in name if c.isdigit()) or 0))
  columns = 3 + len(blocks)
  fig, axes = plt.subplots(n, columns, figsize=(2.2 * columns, 2.2 * n + 0.6), squeeze=False)
  for row in range(n):
    panels = [("image", pixels[row]), ("labels", colorize_labels(labels[row], num_classes)),
              ("prediction", colorize_labels(predictions[row], num_classes))]
    for name in blocks:
      experts = upsample_nearest(expert_maps[name][row], H, W)
      panels.append((f"{name} experts", (1 - alpha) * grey[row] + alpha * expert_colors[experts]))
    for column, (name, picture) in enumerate(panels):
      axis = axes[row, column]
      axis.imshow(picture, interpolation="nearest")
      axis.set_xticks([])
      axis.set_yticks([])
      if row == 0:
        axis.set_title(name, fontsize=9)
  handles = [Patch(color=expert_colors[e], label=f"expert {e}") for e in range(num_experts)]
  fig.legend(handles=handles, loc="lower center", ncol=min(num_experts, 8), fontsize=8, frameon=False)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.06, 1, 0.97))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
