"""Tasks: what a task supplies to the one trainer (model, data, loss, evaluation metrics).

A task is a small object with
  build_model(config, rngs) -> nnx.Module            (model(inputs, deterministic=..., mask=None) -> (outputs,
                                                     aux dict); evaluation passes the padding mask)
  build_data(config, split, *, train, seed, batch_size) -> grain iterable of dict batches
  loss(model, batch, config) -> (scalar loss, dict of scalar metrics)      (training, under grad)
  eval_batch(model, batch) -> dict of summed statistics                   (summed over batches)
  summarize(sums) -> dict of 'eval/...' metrics
  depth(model) -> number of blocks (for layer-wise learning-rate decay)
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax


def moe_summary(aux: dict, prefix: str) -> dict:
  """Flattens per-block MoE metrics (scalars and per-expert vectors) into '{prefix}/blockN/key' entries."""
  out = {}
  for block, metrics in aux.get("metrics", {}).items():
    for key, value in metrics.items():
      out[f"{prefix}/{block}/{key}"] = value
  return out


class Classification:
  """Image classification: softmax cross-entropy with label smoothing; top-1 / top-5 accuracy."""

  def build_model(self, config, rngs):
    from vimoe.models import build_vit  # models never import train; train imports models lazily here
    return build_vit(config.model, rngs=rngs)

  def load_pretrained(self, model, config):
    """config.init.checkpoint: converted DINOv2 weights (scripts/convert_dinov2.py), an HF directory or a .pth
    file; a ViMoE model is upcycled (every expert a copy of the dense MLP, plus init.noise_std noise)."""
    from vimoe.checkpoints import load_pretrained
    load_pretrained(model, config.init.checkpoint, noise_std=config.init.get("noise_std", 0.0),
                    rng=jax.random.PRNGKey(config.seed))

  def build_data(self, config, split, *, train, seed, batch_size):
    from vimoe.data import build_image_dataset
    return build_image_dataset(config.data, split, batch_size=batch_size, seed=seed, train=train)

  def depth(self, model):
    return len(model.blocks)

  def loss(self, model, batch, config):
    logits, aux = model(batch["image"], deterministic=False)
    num_classes = logits.shape[-1]
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), config.label_smoothing)
    task_loss = jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), labels))
    aux_losses = aux.get("losses", {})
    total = task_loss + sum(aux_losses.values())
    metrics = {"train/loss": total, "train/task_loss": task_loss,
               "train/top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    metrics.update({f"train/aux/{name}": value for name, value in aux_losses.items()})
    for key, value in moe_summary(aux, "train").items():
      if key.endswith("dropped_fraction"):
        metrics[key] = value
    return total, metrics

  def eval_batch(self, model, batch):
    """Sums over the valid rows of a batch (evaluation batches are padded with label -1)."""
    labels = batch["label"]
    # Padding rows take no expert capacity and count in no routing statistic.
    logits, aux = model(batch["image"], deterministic=True, mask=labels >= 0)
    valid = (labels >= 0).astype(jnp.float32)
    safe_labels = jnp.maximum(labels, 0)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    sums = {"count": jnp.sum(valid),
            "correct_top1": jnp.sum(valid * (jnp.argmax(logits, -1) == labels)),
            "correct_top5": jnp.sum(valid * jnp.any(top5 == labels[:, None], axis=-1)),
            "loss_sum": jnp.sum(valid * optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), safe_labels))}
    # Routing statistics of the batch's real rows, weighted by their number so the sum over batches becomes an
    # average over real images.
    for key, value in moe_summary(aux, "moe").items():
      if key.split("/")[-1] in ("dropped_fraction", "expert_load", "load_cv", "importance_cv"):
        sums[key] = value * sums["count"]
    return sums

  def summarize(self, sums):
    count = max(float(sums["count"]), 1.0)
    out = {"eval/top1": float(sums["correct_top1"]) / count, "eval/top5": float(sums["correct_top5"]) / count,
           "eval/loss": float(sums["loss_sum"]) / count}
    for key, value in sums.items():
      if key.startswith("moe/"):
        value = np.asarray(value) / count
        out["eval/" + key[len("moe/"):]] = value.tolist() if value.ndim else float(value)
    return out


# config.task -> "module:Class". Imported on use, so a task's dependencies load only when it is trained.
TASKS = {
    "classification": "vimoe.train.tasks:Classification",
    "segmentation": "vimoe.train.segmentation:Segmentation",
    "language_model": "vimoe.train.language:LanguageModeling",
}


def get_task(name: str):
  if name not in TASKS:
    raise ValueError(f"config.task={name!r} is not known; valid: {', '.join(TASKS)}")
  module_name, class_name = TASKS[name].split(":")
  return getattr(importlib.import_module(module_name), class_name)()
