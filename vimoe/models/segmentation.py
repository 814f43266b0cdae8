"""Semantic segmentation on a ViT / ViMoE backbone: decoder heads, the model, sliding-window inference.

    model = build_segmenter(config.model, rngs=nnx.Rngs(0))
    logits, aux = model(images, deterministic=False)    # images [B, H, W, 3] -> logits [B, H, W, K] float32

The backbone is `vimoe.models.vit.ViT` without its classification head; with MoE blocks it should route per token
(`model.moe.route_per="token"`), as ViMoE does for segmentation. Heads (`model.head.kind`):

  linear     DINOv2's linear evaluation head: batch norm + 1x1 classifier on the last block's patch tokens
             (after the final norm), logits bilinearly upsampled to the image.
  linear4    its multi-layer variant: the patch tokens of the last 4 blocks (each final-normed), concatenated on
             channels (4D), then batch norm + 1x1 classifier.
  segmenter  Segmenter's mask transformer (Strudel et al. 2021, sec. 3.2): patch tokens projected to `dim`, joined
             by K learned class tokens, `depth` Transformer layers, then masks = <l2norm(patch), l2norm(class)>
             per patch and class, layer-normed over classes.

Images whose sides are not multiples of the patch size are zero-padded equally on both sides (DINOv2's
CenterPadding) and the logits cropped back. `model.head.freeze_backbone=True` stops gradients at the backbone's
features (the task then also leaves the backbone out of the optimizer: linear probing).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimoe.models import vit as vit_lib
from vimoe.models.config_utils import as_dict, check_keys, positive_int

HEADS = ("linear", "linear4", "segmenter")
HEAD_KEYS = ("kind", "freeze_backbone", "dim", "depth", "num_heads", "mlp_dim", "dropout")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  kind: str = "linear"
  freeze_backbone: bool = False
  dim: int = 384        # segmenter only: decoder width, layers, heads, MLP width
  depth: int = 2
  num_heads: int = 6
  mlp_dim: int = 1536
  dropout: float = 0.0  # linear heads: dropout on the features before the classifier (DINOv2 uses 0.1)


def head_config(config, prefix: str = "model.head.") -> HeadConfig:
  given = as_dict(config)
  check_keys(given, HEAD_KEYS, prefix)
  head = HeadConfig(**{k: v for k, v in given.items() if v is not None})
  if head.kind not in HEADS:
    raise ValueError(f"{prefix}kind={head.kind!r} is not known; valid: {', '.join(HEADS)}")
  for key in ("dim", "depth", "num_heads", "mlp_dim"):
    positive_int(getattr(head, key), prefix + key)
  if head.dim % head.num_heads:
    raise ValueError(f"{prefix}num_heads={head.num_heads} must divide {prefix}dim={head.dim}")
  if not 0 <= head.dropout < 1:
    raise ValueError(f"{prefix}dropout={head.dropout!r} must be in [0, 1)")
  return head


class LinearHead(nnx.Module):
  """Batch norm + 1x1 classifier: features [B, h, w, C] -> logits [B, h, w, K] (DINOv2's BNHead)."""

  def __init__(self, in_dim: int, num_classes: int, *, dropout: float = 0.0, rngs: nnx.Rngs):
    # torch BatchNorm2d momentum 0.1 == flax momentum 0.9 (weight of the old running average).
    self.norm = nnx.BatchNorm(in_dim, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.classifier = nnx.Linear(in_dim, num_classes, kernel_init=jax.nn.initializers.normal(0.01), rngs=rngs)

  def __call__(self, features: jax.Array, *, deterministic: bool) -> jax.Array:
    x = self.norm(features.astype(jnp.float32), use_running_average=deterministic)
    if self.dropout is not None:
      x = self.dropout(x, deterministic=deterministic)
    return self.classifier(x)


class _DecoderLayer(nnx.Module):
  """Pre-norm Transformer layer (the ViT's attention and MLP)."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.attn = vit_lib.Attention(dim, num_heads, dtype=jnp.float32, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.mlp = vit_lib.Mlp(dim, mlp_dim, "gelu_exact", dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class MaskTransformerHead(nnx.Module):
  """Segmenter's mask transformer: features [B, h, w, C] -> mask logits [B, h, w, K]."""

  def __init__(self, in_dim: int, num_classes: int, *, dim: int, depth: int, num_heads: int, mlp_dim: int,
               rngs: nnx.Rngs):
    self.proj_in = nnx.Linear(in_dim, dim, rngs=rngs)
    # Not named "*embed*" or "blocks": the layer-wise lr decay reads those names as backbone layers.
    self.class_tokens = nnx.Param(0.02 * jax.random.truncated_normal(rngs.params(), -2, 2, (1, num_classes, dim)))
    self.layers = nnx.List([_DecoderLayer(dim, num_heads, mlp_dim, rngs=rngs) for _ in range(depth)])
    self.decoder_norm = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.proj_patch = nnx.Param(dim ** -0.5 * jax.random.normal(rngs.params(), (dim, dim)))
    self.proj_classes = nnx.Param(dim ** -0.5 * jax.random.normal(rngs.params(), (dim, dim)))
    self.mask_norm = nnx.LayerNorm(num_classes, epsilon=1e-6, rngs=rngs)

  def __call__(self, features: jax.Array, *, deterministic: bool) -> jax.Array:
    del deterministic
    B, h, w, _ = features.shape
    K = self.class_tokens.shape[1]
    x = self.proj_in(features.reshape(B, h * w, -1).astype(jnp.float32))                  # [B, N, d]
    x = jnp.concatenate([x, jnp.broadcast_to(self.class_tokens[...], (B, K, x.shape[-1]))], axis=1)  # [B, N+K, d]
    for layer in self.layers:
      x = layer(x)
    x = self.decoder_norm(x)
    patches = x[:, :h * w] @ self.proj_patch[...]                                          # [B, N, d]
    classes = x[:, h * w:] @ self.proj_classes[...]                                        # [B, K, d]
    l2 = lambda t: t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    masks = jnp.einsum("BNd,BKd->BNK", l2(patches), l2(classes))                          # [B, N, K]
    return self.mask_norm(masks).reshape(B, h, w, K)


def center_padding(size: int, multiple: int) -> tuple[int, int]:
  """(before, after) zero padding that makes `size` a multiple of `multiple`, split as DINOv2 does."""
  total = -size % multiple
  return total // 2, total - total // 2


class Segmenter(nnx.Module):
  """ViT / ViMoE backbone + decoder head. Build with `build_segmenter(config)`."""

  def __init__(self, backbone_config: vit_lib.ViTConfig, head: HeadConfig, num_classes: int, *, rngs: nnx.Rngs):
    self.backbone = vit_lib.ViT(backbone_config, rngs=rngs)
    self.head_config = head
    self.num_classes = num_classes
    D = backbone_config.dim
    if head.kind == "linear":
      self.head = LinearHead(D, num_classes, dropout=head.dropout, rngs=rngs)
    elif head.kind == "linear4":
      self.head = LinearHead(4 * D, num_classes, dropout=head.dropout, rngs=rngs)
    else:
      self.head = MaskTransformerHead(D, num_classes, dim=head.dim, depth=head.depth, num_heads=head.num_heads,
                                      mlp_dim=head.mlp_dim, rngs=rngs)

  # `backbone` (the ViT) is an attribute. Layer ids for layer-wise lr decay: the backbone's, the head last.
  @property
  def depth(self) -> int:
    return self.backbone.depth

  def layer_id(self, path: str) -> int:
    backbone, _, rest = path.partition("/")
    return self.backbone.layer_id(rest) if backbone == "backbone" else self.depth + 1

  @property
  def feature_layers(self) -> tuple[int, ...]:
    depth = len(self.backbone.blocks)
    return tuple(range(depth - 4, depth)) if self.head_config.kind == "linear4" else (depth - 1,)

  def _grid(self, tokens: jax.Array, h: int, w: int) -> jax.Array:
    """Final-norm tokens [B, 1 + R + N, D] -> patch features [B, h, w, D]."""
    patches = tokens[:, 1 + self.backbone.config.num_registers:]
    return patches.reshape(patches.shape[0], h, w, patches.shape[-1])

  def __call__(self, images: jax.Array, *, deterministic: bool = True, return_routing: bool = False,
               mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """images [B, H, W, 3] -> (logits [B, H, W, K] float32, aux). With return_routing, aux["expert_maps"] holds
    each MoE block's first-choice expert per patch, [B, h, w] int32 (token routing). mask [B] bool (optional):
    real images (evaluation batches are padded); padding takes no expert capacity and counts in no routing
    statistic (vimoe.models.vit.VisionTransformer.encode)."""
    B, H, W, _ = images.shape
    p = self.backbone.config.patch_size
    (top, bottom), (left, right) = center_padding(H, p), center_padding(W, p)
    padded = jnp.pad(images, ((0, 0), (top, bottom), (left, right), (0, 0)))
    h, w = padded.shape[1] // p, padded.shape[2] // p
    _, aux = self.backbone.encode(padded, deterministic=deterministic, return_layers=self.feature_layers,
                                  return_routing=return_routing, mask=mask)
    features = jnp.concatenate([self._grid(t, h, w) for t in aux.pop("layers")], axis=-1)  # [B, h, w, D or 4D]
    if self.head_config.freeze_backbone:
      features = jax.lax.stop_gradient(features)
    logits = self.head(features, deterministic=deterministic).astype(jnp.float32)           # [B, h, w, K]
    logits = jax.image.resize(logits, (B, padded.shape[1], padded.shape[2], self.num_classes), "bilinear")
    logits = logits[:, top:top + H, left:left + W]                                          # [B, H, W, K]
    if return_routing:
      routing = aux.pop("routing")
      maps = {}
      for name, choice in routing.items():
        if choice.ndim == 2:  # per token: drop the class token and registers
          maps[name] = choice[:, 1 + self.backbone.config.num_registers:].reshape(B, h, w)
        else:                 # per image: one expert for every patch
          maps[name] = jnp.broadcast_to(choice[:, None, None], (B, h, w))
      aux["expert_maps"] = maps
    return logits, aux


def build_segmenter(config, *, rngs: nnx.Rngs | None = None) -> Segmenter:
  """config: the ViT keys of vimoe.models.vit (num_classes = the segmentation classes) plus `head`."""
  given = as_dict(config)
  head = head_config(given.pop("head", None))
  num_classes = given.get("num_classes")
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"model.num_classes={num_classes!r} must be a positive integer (segmentation classes)")
  backbone = vit_lib.vit_config({**given, "num_classes": 0})
  if head.kind == "linear4" and backbone.depth < 4:
    raise ValueError(f"model.head.kind='linear4' needs at least 4 blocks; model.depth={backbone.depth}")
  return Segmenter(backbone, head, int(num_classes), rngs=rngs if rngs is not None else nnx.Rngs(0))


# Sliding-window inference (mmsegmentation's "slide" mode)

def window_starts(size: int, crop: int, stride: int) -> list[int]:
  """Start offsets of windows of `crop` every `stride` along a side of `size`, the last flush with the end."""
  if stride < 1 or crop < 1:
    raise ValueError(f"crop={crop} and stride={stride} must be positive")
  if size <= crop:
    return [0]
  count = math.ceil((size - crop) / stride) + 1
  return [min(i * stride, size - crop) for i in range(count)]


def sliding_window_logits(apply_fn: Callable[[jax.Array], tuple[jax.Array, dict]], images: jax.Array,
                          crop: int | Sequence[int], stride: int | Sequence[int]) -> tuple[jax.Array, dict]:
  """Average of `apply_fn` over overlapping crops: images [B, H, W, 3] -> (logits [B, H, W, K], aux).

  Every pixel's logits are the mean over exactly the windows that contain it (summed logits / window count).
  apply_fn(window [B, ch, cw, 3]) -> (logits [B, ch, cw, K], aux); the aux metrics are averaged over windows.
  """
  crop_h, crop_w = (crop, crop) if isinstance(crop, int) else tuple(crop)
  stride_h, stride_w = (stride, stride) if isinstance(stride, int) else tuple(stride)
  B, H, W, _ = images.shape
  total = counts = None
  auxes = []
  for top in window_starts(H, crop_h, stride_h):
    for left in window_starts(W, crop_w, stride_w):
      window = images[:, top:top + crop_h, left:left + crop_w]
      logits, aux = apply_fn(window)
      auxes.append(aux)
      if total is None:
        total = jnp.zeros((B, H, W, logits.shape[-1]), jnp.float32)
        counts = jnp.zeros((H, W), jnp.float32)
      wh, ww = window.shape[1], window.shape[2]
      total = total.at[:, top:top + wh, left:left + ww].add(logits.astype(jnp.float32))
      counts = counts.at[top:top + wh, left:left + ww].add(1.0)
  aux = jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *auxes)
  return total / counts[None, :, :, None], aux
