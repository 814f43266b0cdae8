"""Semantic segmentation task: per-pixel cross-entropy; mIoU and pixel accuracy from a confusion matrix.

Evaluation accumulates one K x K confusion matrix (rows: true class, columns: predicted) over the whole split.
It is computed inside the jitted evaluation step on global arrays, so with a mesh XLA sums it over devices and
hosts; the trainer then sums the per-batch matrices. From the total:

  IoU_c = C[c,c] / (sum_j C[c,j] + sum_i C[i,c] - C[c,c])    over classes with a non-empty union
  mIoU  = mean of IoU_c over those classes;  pixel accuracy = trace(C) / sum(C)

(the ADE20K benchmark's definitions; pixels labelled -1, "other" and padding, count nowhere). Evaluation images
larger than data.crop_size are segmented by a sliding window (crop data.crop_size, stride data.eval_stride,
default 2/3 of the crop: 341 for 512, as mmsegmentation's ADE20K configs).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vimoe.train.tasks import Task, load_vit_weights


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """int32 [K, K]: entry (t, p) counts pixels of true class t predicted as p. Labels < 0 are skipped."""
  valid = labels >= 0
  index = jnp.where(valid, labels * num_classes + predictions, 0).reshape(-1)
  counts = jnp.bincount(index, weights=valid.reshape(-1).astype(jnp.float32), length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> dict:
  """mIoU, pixel accuracy and per-class IoU (NaN where a class is in neither labels nor predictions)."""
  confusion = np.asarray(confusion, np.float64)
  true_positive = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - true_positive
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, true_positive / union, np.nan)
  total = confusion.sum()
  return {"miou": float(np.nanmean(iou)) if np.any(union > 0) else 0.0,
          "pixel_accuracy": float(true_positive.sum() / total) if total else 0.0,
          "iou_per_class": iou}


def eval_window(config) -> tuple[int, int]:
  crop = int(config.data.get("crop_size") or 0)
  stride = config.data.get("eval_stride") or max(1, (2 * crop) // 3)
  return crop, int(stride)


class Segmentation(Task):
  """The task of vimoe.models.segmentation.Segmenter (see vimoe/train/tasks.py)."""

  def build_model(self, config, rngs):
    from vimoe.models.segmentation import build_segmenter
    self.config = config  # the evaluation window (data.crop_size, data.eval_stride) is read in eval_batch
    return build_segmenter(config.model, rngs=rngs)

  def load_pretrained(self, model, config):
    """The backbone from DINOv2 weights (see Classification.load_pretrained); MoE blocks are upcycled."""
    load_vit_weights(model.backbone, config)

  def build_data(self, config, split, *, train, seed, batch_size):
    from vimoe.data.segmentation import build_segmentation_dataset
    return build_segmentation_dataset(config.data, split, batch_size=batch_size, seed=seed, train=train)

  def trainable(self, config):
    """What the optimizer updates: everything, or only the head when the backbone is frozen (linear probing)."""
    if config.model.get("head", {}).get("freeze_backbone", False):
      return nnx.All(nnx.Param, nnx.PathContains("head"))
    return nnx.Param

  def loss(self, model, batch, config):
    logits, aux = model(batch["image"], deterministic=False)           # [B, H, W, K]
    labels = batch["label"]
    valid = (labels >= 0).astype(jnp.float32)
    pixel_loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    task_loss = jnp.sum(valid * pixel_loss) / jnp.maximum(jnp.sum(valid), 1.0)
    frozen = config.model.get("head", {}).get("freeze_backbone", False)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return self.add_aux_losses(  # a frozen backbone's router is not trained
        task_loss, aux, {"train/pixel_accuracy": jnp.sum(valid * correct) / jnp.maximum(jnp.sum(valid), 1.0)},
        aux_losses={} if frozen else None)

  def predict(self, model, images, config, mask=None):
    """Logits [B, H, W, K] for evaluation: one pass, or a sliding window when the image exceeds the crop.
    mask [B] (optional): the real images (padding rows take no expert capacity and count in no statistic)."""
    from vimoe.models.segmentation import sliding_window_logits
    crop, stride = eval_window(config)
    if crop and (images.shape[1] > crop or images.shape[2] > crop):
      return sliding_window_logits(lambda window: model(window, deterministic=True, mask=mask), images, crop,
                                   stride)
    return model(images, deterministic=True, mask=mask)

  def eval_batch(self, model, batch):
    labels = batch["label"]
    # Evaluation batches end with padding rows whose every pixel is ignored: they are left out of the routing.
    logits, aux = self.predict(model, batch["image"], self.config, mask=jnp.any(labels >= 0, axis=(1, 2)))
    num_classes = logits.shape[-1]
    valid = (labels >= 0).astype(jnp.float32)
    sums = {"confusion": confusion_matrix(jnp.argmax(logits, -1), labels, num_classes),
            "pixels": jnp.sum(valid),
            "loss_sum": jnp.sum(valid * optax.softmax_cross_entropy_with_integer_labels(
                logits, jnp.maximum(labels, 0)))}
    # Routing statistics per image with any labelled pixel (padding images excluded), summed into an average.
    images = jnp.sum(jnp.any(labels >= 0, axis=(1, 2)).astype(jnp.float32))
    sums["images"] = images
    sums.update(self.routing_sums(aux, images))
    return sums

  def summarize(self, sums):
    scores = segmentation_metrics(sums["confusion"])
    pixels = max(float(sums["pixels"]), 1.0)
    out = {"eval/miou": scores["miou"], "eval/pixel_accuracy": scores["pixel_accuracy"],
           "eval/loss": float(sums["loss_sum"]) / pixels,
           "eval/iou_per_class": [None if np.isnan(v) else float(v) for v in scores["iou_per_class"]]}
    out.update(self.routing_means(sums, max(float(sums["images"]), 1.0)))
    return out

  def after_evaluation(self, model, config, workdir: pathlib.Path, step: int, metrics: dict) -> None:
    """Writes per_class_iou.json and, for a ViMoE backbone with token routing, expert_maps.png (the first-choice
    expert of every patch of a few evaluation images, next to the image, its labels and the prediction)."""
    per_class = {"step": step, "miou": metrics["eval/miou"], "iou_per_class": metrics["eval/iou_per_class"]}
    (workdir / "per_class_iou.json").write_text(json.dumps(per_class, indent=1) + "\n")
    if not model.backbone.config.moe_layers:
      return
    from vimoe.analysis.expert_maps import save_expert_maps
    from vimoe.data.segmentation import resolve_config
    data_cfg = resolve_config(config.data)
    batch = next(iter(self.build_data(config, config.data.eval_split, train=False, seed=config.seed,
                                      batch_size=config.get("eval_batch_size", config.batch_size))))
    count = min(config.get("expert_map_images", 4), batch["image"].shape[0])
    images = jnp.asarray(batch["image"][:count])
    crop, _ = eval_window(config)
    if crop and (images.shape[1] > crop or images.shape[2] > crop):
      images = images[:, :crop, :crop]  # one window: the expert map shows what one forward pass routes
    logits, aux = nnx.jit(lambda m, x: m(x, deterministic=True, return_routing=True))(model, images)
    save_expert_maps(workdir / "expert_maps.png", images=np.asarray(images),
                     labels=np.asarray(batch["label"][:count, :images.shape[1], :images.shape[2]]),
                     predictions=np.asarray(jnp.argmax(logits, -1)),
                     expert_maps={k: np.asarray(v) for k, v in aux["expert_maps"].items()},
                     num_experts=model.backbone.config.moe.num_experts,
                     mean=data_cfg["mean"], std=data_cfg["std"],
                     title=f"first-choice expert per patch, step {step}")
