"""Optimizer pieces: layer ids, layer-wise lr decay factors, weight-decay mask, schedule end points."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vimoe.train import optim


def test_layer_ids_follow_beit_numbering():
  depth = 12
  assert optim.layer_id("patch_embed/kernel", depth) == 0
  assert optim.layer_id("pos_embed", depth) == 0
  assert optim.layer_id("cls_token", depth) == 0
  assert optim.layer_id("blocks/0/attn/qkv/kernel", depth) == 1
  assert optim.layer_id("blocks/11/mlp/experts/w_in", depth) == 12
  assert optim.layer_id("norm/scale", depth) == 13
  assert optim.layer_id("head/kernel", depth) == 13


def test_layer_decay_scales_updates_by_hand_computed_factors():
  # depth 2, decay 0.5: factor = 0.5 ** (depth + 1 - layer_id) -> embeddings 0.125, block 0 0.25, block 1 0.5,
  # head 1.0.
  params = {"patch_embed": {"kernel": jnp.ones((2, 2))}, "blocks": {"0": {"w": jnp.ones(3)}, "1": {"w": jnp.ones(3)}},
            "head": {"kernel": jnp.ones((2, 2))}}
  transform = optim.scale_by_layer(0.5, depth=2)
  updates, _ = transform.update(jax.tree.map(jnp.ones_like, params), transform.init(params))
  np.testing.assert_allclose(updates["patch_embed"]["kernel"], 0.125)
  np.testing.assert_allclose(updates["blocks"]["0"]["w"], 0.25)
  np.testing.assert_allclose(updates["blocks"]["1"]["w"], 0.5)
  np.testing.assert_allclose(updates["head"]["kernel"], 1.0)


def test_full_optimizer_applies_decay_mask_and_layer_scales():
  config = ml_collections.ConfigDict(dict(lr=0.1, min_lr_ratio=0.0, warmup_steps=0, total_steps=10,
                                          weight_decay=0.5, b1=0.9, b2=0.999, grad_clip_norm=0.0,
                                          layer_decay=0.5))
  params = {"blocks": {"0": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}}}
  tx = optim.create_optimizer(config, depth=1)
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)  # zero gradient: only weight decay moves the kernel
  updates, _ = tx.update(grads, state, params)
  # Step 1 of cosine from lr 0.1: lr = 0.1. AdamW with zero grads: update = -lr * wd * param = -0.1*0.5*2 = -0.1;
  # block 0 of depth 1 has layer id 1 -> factor 0.5 ** (1 + 1 - 1) = 0.5 -> -0.05. Biases are not decayed.
  np.testing.assert_allclose(updates["blocks"]["0"]["kernel"], -0.05, rtol=1e-6)
  np.testing.assert_allclose(updates["blocks"]["0"]["bias"], 0.0)


@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_warms_up_and_ends_at_min_lr(warmup):
  config = ml_collections.ConfigDict(dict(lr=1.0, min_lr_ratio=0.1, warmup_steps=warmup, total_steps=20))
  schedule = optim.learning_rate_schedule(config)
  if warmup:
    assert float(schedule(0)) == 0.0
    assert float(schedule(warmup)) == pytest.approx(1.0)
  assert float(schedule(20)) == pytest.approx(0.1)
