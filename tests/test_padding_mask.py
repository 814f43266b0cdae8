"""Padding masks: `MoeLayer(x, mask=m)` and the evaluation of the classification and language-model tasks.

Padding takes no expert capacity, does not change any real token's output and counts in no routing metric
(issue 12, defect 4: evaluation routing statistics counted the padding rows of the last batch). Checked against
a NumPy loop over the real tokens, and by putting garbage in the padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from layer_setup import D, E, build_layer, forward

B, T = 4, 8
# Rows 0 and 1 real, row 2 real for its first 3 tokens, row 3 all padding.
MASK = np.zeros((B, T), bool)
MASK[:2] = True
MASK[2, :3] = True


# Per-item routing: an item (image) is real or padding as a whole; rows 0-2 real, row 3 padding.
ITEM_MASK = np.zeros((B, T), bool)
ITEM_MASK[:3] = True


def inputs(seed=0, garbage=None, mask=MASK):
  x = np.random.RandomState(seed).randn(B, T, D).astype(np.float32)
  if garbage is not None:  # replace the padding by large values that would route and fill capacity differently
    x = np.where(mask[..., None], x, garbage * np.random.RandomState(seed + 1).randn(B, T, D)).astype(np.float32)
  return x


LAYERS = {
    "top_k_einsum_capacity": dict(router="top_k", k=2, capacity_factor=0.5, dispatch="einsum", group_size=2 * T),
    "top_k_gather_capacity": dict(router="top_k", k=2, capacity_factor=0.5, dispatch="gather", group_size=2 * T),
    "top_k_dropless": dict(router="top_k", k=2, capacity_factor=None, dispatch="gather"),
    "noisy_top_k": dict(router="noisy_top_k", k=1, capacity_factor=0.5, dispatch="einsum", group_size=2 * T),
    "prototype": dict(router="prototype", k=1, capacity_factor=0.5, dispatch="gather", group_size=2 * T,
                      activation="prelu"),
    "experts_choose": dict(router="experts_choose", k=1, capacity_factor=1.0, dispatch="einsum", group_size=2 * T),
    "soft": dict(router="soft", k=1, capacity_factor=None, dispatch="einsum", slots_per_expert=2),
    "item_top_k_capacity": dict(router="top_k", k=1, capacity_factor=0.5, dispatch="einsum", route_per="item"),
    "hash": dict(router="hash", k=1, capacity_factor=0.5, dispatch="einsum", group_size=2 * T),
}


def run(layer, x, mask=MASK, **kwargs):
  if layer.router_kind == "hash":
    kwargs["token_ids"] = jnp.asarray(np.arange(B * T).reshape(B, T) % 7)
  return forward(layer, x, mask=jnp.asarray(mask), **kwargs)


@pytest.mark.parametrize("name", list(LAYERS))
def test_padding_changes_no_real_output_and_no_metric(name):
  layer = build_layer(3, **LAYERS[name], num_shared_experts=1)
  real = ITEM_MASK if LAYERS[name].get("route_per") == "item" else MASK
  y_a, aux_a = run(layer, inputs(mask=real), real)
  y_b, aux_b = run(layer, inputs(garbage=30.0, mask=real), real)
  np.testing.assert_allclose(np.asarray(y_a)[real], np.asarray(y_b)[real], atol=1e-5)
  for key in aux_a.metrics:
    np.testing.assert_allclose(np.asarray(aux_a.metrics[key]), np.asarray(aux_b.metrics[key]), atol=1e-5,
                               err_msg=key)
  # Not vacuous: without the mask the garbage does reach the metrics.
  ids = {"token_ids": jnp.asarray(np.arange(B * T).reshape(B, T) % 7)} if name == "hash" else {}
  _, aux_c = forward(layer, inputs(mask=real), **ids)
  _, aux_d = forward(layer, inputs(garbage=30.0, mask=real), **ids)
  if name != "hash":  # hash routing ignores the features: only its (unmasked) counts change with padding
    assert any(not np.allclose(np.asarray(aux_c.metrics[key]), np.asarray(aux_d.metrics[key]), atol=1e-5)
               for key in aux_c.metrics)
  else:
    assert not np.allclose(np.asarray(aux_c.metrics["expert_load"]), np.asarray(aux_a.metrics["expert_load"]))


def numpy_top_k_with_capacity(layer, x, k, capacity_factor, group_size):
  """A loop over the real tokens: softmax router, top-k, capacity C = ceil(k S cf / E) per group of S tokens,
  every first choice before any second choice, in position order; padding takes no slot."""
  kernel = np.asarray(layer.router.kernel[...], np.float64)
  flat_x, flat_mask = x.reshape(-1, D).astype(np.float64), MASK.reshape(-1)
  expert_out = np.asarray(layer.experts(jnp.broadcast_to(jnp.asarray(x.reshape(-1, D)), (E, B * T, D))),
                          np.float64)                                                # [E, N, D]
  capacity = math.ceil(k * group_size * capacity_factor / E)
  y = np.zeros_like(flat_x)
  counts, kept_count = np.zeros(E), 0
  for start in range(0, B * T, group_size):
    tokens = [n for n in range(start, start + group_size) if flat_mask[n]]
    logits = flat_x[tokens] @ kernel
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    filled = np.zeros(E, int)
    for rank in range(k):
      for i, n in enumerate(tokens):
        e = order[i, rank]
        counts[e] += 1
        if filled[e] < capacity:
          filled[e] += 1
          kept_count += 1
          y[n] += probs[i, e] * expert_out[e, n]
  real = int(flat_mask.sum())
  return y.reshape(B, T, D), counts / counts.sum(), 1 - kept_count / (k * real)


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_masked_top_k_against_a_numpy_loop(dispatch):
  layer = build_layer(5, router="top_k", k=2, capacity_factor=0.5, dispatch=dispatch, group_size=2 * T)
  x = inputs(garbage=30.0)
  y, aux = run(layer, x)
  y_ref, load_ref, dropped_ref = numpy_top_k_with_capacity(layer, x, 2, 0.5, 2 * T)
  np.testing.assert_allclose(np.asarray(y)[MASK], y_ref[MASK], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(aux.metrics["expert_load"]), load_ref, atol=1e-6)
  np.testing.assert_allclose(float(aux.metrics["dropped_fraction"]), dropped_ref, atol=1e-6)
  assert 0 < dropped_ref < 1                                       # the capacity does bind


# -- the tasks' evaluation ---------------------------------------------------------------------------------------

def _routing_of(aux, prefix):
  return {f"{prefix}/{block}/expert_load": np.asarray(metrics["expert_load"])
          for block, metrics in aux["metrics"].items()}


def test_classification_evaluation_counts_only_real_images():
  from vimoe.models import build_vit
  from vimoe.train.tasks import Classification
  config = dict(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=10,
                head_zero_init=False,
                moe=dict(layers="last:2", num_experts=4, num_shared_experts=1, dispatch="gather",
                         capacity_factor=None))
  model = build_vit(config, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(0)
  # Images that route apart: at initialisation the class token is nearly the same for every image (its own
  # embedding dominates), so zero it and the positions: it then carries the image's attention-pooled patches.
  model.cls_token[...] = jnp.zeros_like(model.cls_token[...])
  model.pos_embed[...] = jnp.zeros_like(model.pos_embed[...])
  for block in model.blocks:
    block.mlp.router.kernel[...] = jnp.asarray(rng.randn(32, 4), jnp.float32)
  images = rng.randn(8, 16, 16, 3).astype(np.float32)
  labels = rng.randint(0, 10, 8).astype(np.int32)
  images[5:] = 0.0                       # the pipeline pads the last batch with zero images of label -1
  labels[5:] = -1
  task = Classification()
  summary = task.summarize(jax.device_get(task.eval_batch(model, {"image": jnp.asarray(images),
                                                                  "label": jnp.asarray(labels)})))
  _, aux_real = model(jnp.asarray(images[:5]), deterministic=True)   # per-image routing, dropless: independent
  _, aux_all = model(jnp.asarray(images), deterministic=True)
  for key, expected in _routing_of(aux_real, "eval").items():
    np.testing.assert_allclose(summary[key], expected, atol=1e-6, err_msg=key)
    assert not np.allclose(np.asarray(aux_all["metrics"][key.split("/")[1]]["expert_load"]), expected)


def test_language_model_evaluation_counts_only_real_tokens():
  from vimoe.models.lm import build_lm
  from vimoe.train.language import LanguageModeling
  config = dict(name="transformer", vocab_size=32, dim=16, depth=2, num_heads=2, mlp_dim=32, max_length=16,
                moe=dict(layers="every:1", num_experts=4, k=2, hidden_dim=16, num_shared_experts=1))
  model = build_lm(config, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(0)
  inputs_ = rng.randint(0, 32, (3, 12)).astype(np.int32)
  mask = np.ones((3, 12), np.float32)
  mask[1, 7:] = 0                      # the last real window ends early
  mask[2] = 0                          # a padding row
  inputs_[2] = 0
  batch = {"inputs": jnp.asarray(inputs_), "targets": jnp.asarray(np.roll(inputs_, -1, 1)),
           "mask": jnp.asarray(mask)}
  task = LanguageModeling()
  summary = task.summarize(jax.device_get(task.eval_batch(model, batch)))
  # Independent: the causal model on the real prefixes alone (each sequence is its own routing group).
  counts = {}
  for row, length in ((0, 12), (1, 7)):
    _, aux = model(jnp.asarray(inputs_[row:row + 1, :length]), deterministic=True)
    for block, metrics in aux["metrics"].items():
      counts[block] = counts.get(block, 0) + np.asarray(metrics["expert_load"]) * length * 2   # k=2 choices
  for block, count in counts.items():
    np.testing.assert_allclose(summary[f"eval/{block}/expert_load"], count / count.sum(), atol=1e-6,
                               err_msg=block)
