"""Tasks: what a task supplies to the one trainer (model, data, loss, evaluation metrics).

A task is a `Task` subclass. It defines
  build_model(config, rngs) -> nnx.Module            (model(inputs, deterministic=..., mask=None) -> (outputs,
                                                     aux dict); evaluation, and training where batches hold
                                                     padding (LM), pass the padding mask)
  build_data(config, split, *, train, seed, batch_size) -> grain iterable of dict batches
  loss(model, batch, config) -> (scalar loss, dict of scalar metrics)      (training, under grad)
  eval_batch(model, batch) -> dict of summed statistics                   (summed over batches)
  summarize(sums) -> dict of 'eval/...' metrics
and may override the defaults of
  trainable(config) -> the nnx filter of what the optimizer updates (default every nnx.Param)
  load_pretrained(model, config) -> initialise from config.init.checkpoint (default: refused)
  after_evaluation(model, config, workdir, step, metrics) -> extra files after an evaluation (default: none)

The model's aux dict is {"losses": {name: weighted aux loss}, "metrics": {"block{i}": MoE metrics of block i}};
`Task` turns it into training metrics (`add_aux_losses`) and evaluation averages (`routing_sums`, `routing_means`).
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def moe_summary(aux: dict, prefix: str) -> dict:
  """Flattens per-block MoE metrics (scalars and per-expert vectors) into '{prefix}/blockN/key' entries."""
  out = {}
  for block, metrics in aux.get("metrics", {}).items():
    for key, value in metrics.items():
      out[f"{prefix}/{block}/{key}"] = value
  return out


class Task:
  """What every task shares: aux losses, routing statistics and the defaults of the optional methods."""

  # Routing statistics (names of MoE metrics) reported in training metrics, and averaged over evaluation.
  train_routing_keys = ("dropped_fraction", "bias_range")
  eval_routing_keys = ("dropped_fraction", "expert_load", "load_cv", "importance_cv", "bias_range")

  def trainable(self, config):
    """What the optimizer updates (a task may freeze parts, e.g. a linear probe on a frozen backbone)."""
    del config
    return nnx.Param

  def load_pretrained(self, model, config):
    del model
    raise ValueError(f"config.init.checkpoint={config.init.checkpoint!r}: the {config.task} task has no "
                     "pretrained weights to import; remove config.init.checkpoint (training starts from scratch)")

  def after_evaluation(self, model, config, workdir, step: int, metrics: dict) -> None:
    """Called on the coordinating process after each evaluation (per-class tables, pictures); nothing by default."""

  def add_aux_losses(self, task_loss, aux: dict, metrics: dict, *, aux_losses: dict | None = None):
    """(task_loss + the model's aux losses, {"train/loss", "train/task_loss", **metrics, "train/aux/NAME",
    "train/blockN/KEY" for KEY in train_routing_keys}). `aux_losses` replaces aux["losses"] (e.g. {} when the
    routers are frozen)."""
    aux_losses = aux.get("losses", {}) if aux_losses is None else aux_losses
    total = task_loss + sum(aux_losses.values())
    out = {"train/loss": total, "train/task_loss": task_loss, **metrics}
    out.update({f"train/aux/{name}": value for name, value in aux_losses.items()})
    out.update({key: value for key, value in moe_summary(aux, "train").items()
                if key.split("/")[-1] in self.train_routing_keys})
    return total, out

  def routing_sums(self, aux: dict, weight) -> dict:
    """{'moe/blockN/KEY': value x weight} for KEY in eval_routing_keys: summed over batches, then divided by the
    total weight (`routing_means`), they become an average weighted by what each batch counts."""
    return {key: value * weight for key, value in moe_summary(aux, "moe").items()
            if key.split("/")[-1] in self.eval_routing_keys}

  def routing_means(self, sums: dict, total) -> dict:
    """{'eval/blockN/KEY': sum / total} of the summed routing statistics (lists for per-expert vectors)."""
    out = {}
    for key, value in sums.items():
      if key.startswith("moe/"):
        value = np.asarray(value) / total
        out["eval/" + key[len("moe/"):]] = value.tolist() if value.ndim else float(value)
    return out


def load_vit_weights(vit, config) -> None:
  """config.init.checkpoint into a ViT: converted DINOv2 weights (scripts/convert_dinov2.py), an HF directory or
  a .pth file; a ViMoE model is upcycled by init.upcycle_mode (default "copy": every expert a copy of the dense
  MLP; "preserve": scaled so that step 0 computes the dense function, vimoe/checkpoints/upcycle.py), plus
  init.noise_std noise on the routed experts."""
  from vimoe.checkpoints import load_pretrained, upcycle
  mode = config.init.get("upcycle_mode", "copy")
  upcycle.check_mode(mode)  # a bad value is refused even where nothing is upcycled (a dense arm of a sweep)
  load_pretrained(vit, config.init.checkpoint, noise_std=config.init.get("noise_std", 0.0),
                  rng=jax.random.PRNGKey(config.seed), mode=mode)


class Classification(Task):
  """Image classification: softmax cross-entropy with label smoothing; top-1 / top-5 accuracy."""

  def build_model(self, config, rngs):
    from vimoe.models import build_vit  # models never import train; train imports models lazily here
    return build_vit(config.model, rngs=rngs)

  def load_pretrained(self, model, config):
    load_vit_weights(model, config)

  def build_data(self, config, split, *, train, seed, batch_size):
    from vimoe.data import build_image_dataset
    return build_image_dataset(config.data, split, batch_size=batch_size, seed=seed, train=train)

  def loss(self, model, batch, config):
    logits, aux = model(batch["image"], deterministic=False)
    num_classes = logits.shape[-1]
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), config.label_smoothing)
    task_loss = jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), labels))
    return self.add_aux_losses(task_loss, aux, {"train/top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"])})

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
    # Routing statistics of the batch's real rows: an average over real images.
    sums.update(self.routing_sums(aux, sums["count"]))
    return sums

  def summarize(self, sums):
    count = max(float(sums["count"]), 1.0)
    out = {"eval/top1": float(sums["correct_top1"]) / count, "eval/top5": float(sums["correct_top5"]) / count,
           "eval/loss": float(sums["loss_sum"]) / count}
    out.update(self.routing_means(sums, count))
    return out


# config.task -> "module:Class". Imported on use, so a task's dependencies load only when it is trained.
TASKS = {
    "classification": "vimoe.train.tasks:Classification",
    "segmentation": "vimoe.train.segmentation:Segmentation",
    "language_model": "vimoe.train.language:LanguageModeling",
}


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"config.task={name!r} is not known; valid: {', '.join(TASKS)}")
  module_name, class_name = TASKS[name].split(":")
  return getattr(importlib.import_module(module_name), class_name)()
