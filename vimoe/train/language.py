"""Language modelling: the task the one trainer runs for config.task="language_model" (see vimoe/train/tasks.py).

Models (config.model.name): "transformer" | "umoe" -> `vimoe.models.lm.build_lm`, "lstm_moe" ->
`vimoe.models.lstm.build_lstm_lm`. Every model is called as

    logits, aux = model(tokens, deterministic=..., mask=...)   # tokens int32 [B, T] -> logits float32 [B, T, V]
    aux = {"losses": {name: weighted aux loss}, "metrics": {"block{i}": MoE metrics of block i}}

Data: vimoe.data.text batches {"inputs", "targets", "mask"} [B, T]; only tokens with mask 1 count, and the mask
goes to the model in training and evaluation (padding takes no expert capacity and counts in no routing loss).

Training loss: mean next-token cross-entropy over the mask-1 tokens (with config.label_smoothing, usually 0) plus
the model's auxiliary losses. Evaluation sums the negative log-likelihood and the token count over all batches:
  eval/loss            nats per token = sum NLL / tokens
  eval/ppl             exp(eval/loss)
  eval/bits_per_token  eval/loss / ln 2 (bits per byte with the byte tokenizer)
  eval/accuracy        next-token top-1 accuracy
  eval/tokens          tokens evaluated
  eval/block{i}/{expert_load, importance_cv, load_cv, max_mean_load, smooth_load_cv, dropped_fraction}
                       routing statistics of MoE block i, averaged over evaluation batches weighted by their
                       tokens (per-batch CVs, as Shazeer et al. 2017 table 6 reports them per batch)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from vimoe.train.tasks import Task

MODEL_NAMES = ("transformer", "umoe", "lstm_moe")


def token_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-token cross-entropy in nats: logits [B, T, V] float, targets [B, T] int -> [B, T] float32."""
  logits = logits.astype(jnp.float32)
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, labels)


class LanguageModeling(Task):
  """Next-token prediction on text: cross-entropy training, perplexity and routing statistics in evaluation."""

  train_routing_keys = ("importance_cv", "load_cv", "max_mean_load", "dropped_fraction", "bias_range")
  # Averaged over evaluation batches weighted by their tokens.
  eval_routing_keys = ("expert_load", "importance_cv", "load_cv", "max_mean_load", "smooth_load_cv",
                       "dropped_fraction", "bias_range")

  def build_model(self, config, rngs):
    name = config.model.get("name")
    if name not in MODEL_NAMES:
      raise ValueError(f"config.model.name={name!r} is not a language model; valid: {', '.join(MODEL_NAMES)}")
    self._check_vocab(config)
    if name in ("transformer", "umoe"):
      from vimoe.models.lm import build_lm  # pylint: disable=import-outside-toplevel
      model = build_lm(config.model, rngs=rngs)
    elif name == "lstm_moe":
      from vimoe.models.lstm import build_lstm_lm  # pylint: disable=import-outside-toplevel
      model = build_lstm_lm(config.model, rngs=rngs)
    return model

  @staticmethod
  def _check_vocab(config) -> None:
    from vimoe.data.text import vocab_size  # pylint: disable=import-outside-toplevel
    model_vocab, data_vocab = config.model.get("vocab_size"), vocab_size(config.data)
    if model_vocab is not None and model_vocab < data_vocab:
      raise ValueError(f"config.model.vocab_size={model_vocab} is smaller than the {data_vocab} tokens of "
                       f"config.data.tokenizer={config.data.get('tokenizer', 'bytes')!r}; set it to >= {data_vocab}")

  def build_data(self, config, split, *, train, seed, batch_size):
    from vimoe.data.text import build_text_dataset  # pylint: disable=import-outside-toplevel
    return build_text_dataset(config.data, split, batch_size=batch_size, seed=seed, train=train)

  def loss(self, model, batch, config):
    # Padding (mask 0: lm1b's packed rows) takes no expert capacity and counts in no routing loss or statistic.
    logits, aux = model(batch["inputs"], deterministic=False, mask=batch["mask"] > 0)     # [B, T, V]
    mask = batch["mask"].astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    nll = token_cross_entropy(logits, batch["targets"], config.label_smoothing)  # [B, T]
    task_loss = jnp.sum(nll * mask) / tokens
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return self.add_aux_losses(task_loss, aux, {"train/accuracy": jnp.sum(correct * mask) / tokens})

  def eval_batch(self, model, batch):
    """Sums over the mask-1 tokens of a batch (evaluation batches are padded with mask 0)."""
    # Padding (mask 0) takes no expert capacity and counts in no routing statistic.
    logits, aux = model(batch["inputs"], deterministic=True, mask=batch["mask"] > 0)
    mask = batch["mask"].astype(jnp.float32)
    nll = token_cross_entropy(logits, batch["targets"])
    sums = {"tokens": jnp.sum(mask), "nll_sum": jnp.sum(nll * mask),
            "correct": jnp.sum(mask * (jnp.argmax(logits, -1) == batch["targets"]))}
    # Routing statistics of the batch's real tokens: a token-weighted average.
    sums.update(self.routing_sums(aux, sums["tokens"]))
    return sums

  def summarize(self, sums):
    tokens = max(float(sums["tokens"]), 1.0)
    loss = float(sums["nll_sum"]) / tokens
    out = {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 700.0)), "eval/bits_per_token": loss / math.log(2),
           "eval/accuracy": float(sums["correct"]) / tokens, "eval/tokens": float(sums["tokens"])}
    out.update(self.routing_means(sums, tokens))
    return out
