"""Optimizer: AdamW with warmup + cosine decay, layer-wise learning-rate decay and gradient clipping (optax)."""

from __future__ import annotations

import re
from typing import Callable

import jax
import optax

from vimoe.parallel.partition import path_string


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
  total = int(config.total_steps)
  warmup = min(int(config.warmup_steps), max(total - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total, warmup + 1),
                                            end_value=config.lr * config.min_lr_ratio)


def layer_id(path: str, depth: int) -> int:
  """BEiT-style layer index guessed from a parameter path: 0 for embeddings, i+1 for block i, depth+1 for the final
  norm and head. For a bare pytree; a model states its own (`model.layer_id`, vimoe/models)."""
  match = re.search(r"(^|/)blocks/(\d+)(/|$)", path)
  if match:
    return int(match.group(2)) + 1
  if re.search(r"(patch_embed|cls_token|pos_embed|register_tokens|mask_token|embed)", path):
    return 0
  return depth + 1


def layerwise_lr_scales(tree, decay: float, depth: int, layer_of: Callable[[str], int] | None = None):
  """Multiplier decay ** (depth + 1 - layer id) per parameter (1 everywhere when decay == 1). `layer_of(path)`:
  the model's `layer_id` (default: `layer_id(path, depth)`)."""
  layer_of = layer_of or (lambda path: layer_id(path, depth))
  return jax.tree_util.tree_map_with_path(lambda path, _: decay ** (depth + 1 - layer_of(path_string(path))), tree)


def scale_by_layer(decay: float, depth: int, layer_of: Callable[[str], int] | None = None
                   ) -> optax.GradientTransformation:
  """Layer-wise learning-rate decay (BEiT, Bao et al. 2022): updates of block i scaled by decay**(depth - i).

  The factors are computed from the parameter paths of the updates, so they are constants under jit.
  """
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, layerwise_lr_scales(updates, decay, depth, layer_of)), state

  return optax.GradientTransformation(init, update)


def weight_decay_mask(params):
  """No weight decay on biases, norms, LayerScale, tokens and position embeddings (anything with ndim < 2)."""
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def create_optimizer(config, depth: int | None = None, *, model=None) -> optax.GradientTransformation:
  """config: the `optim` block (lr, min_lr_ratio, warmup_steps, total_steps, weight_decay, b1, b2,
  grad_clip_norm, layer_decay). Layer ids come from `model` (its `depth` and `layer_id(path)`), or, given only
  `depth`, are guessed from parameter names (`layer_id`)."""
  if (model is None) == (depth is None):
    raise ValueError("create_optimizer needs exactly one of depth= or model=")
  schedule = learning_rate_schedule(config)
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                           mask=weight_decay_mask))
  if config.layer_decay != 1.0:
    parts.append(scale_by_layer(config.layer_decay, model.depth if model is not None else depth,
                                model.layer_id if model is not None else None))
  return optax.chain(*parts)
