"""Gradient accumulation (config.microbatches): one train step over M=4 microbatches equals the one-batch step.

The independent computation is the un-microbatched step (config.microbatches=1) on the same batch, from the same
initial state: parameters, optimizer state, routing biases and the logged metrics must agree to float32 rounding.
Dropout, drop-path and router noise are off (the quickstarts have none), so both steps compute the same function.

Tolerances (float32 rounding only): a gradient entry is a sum over the batch's examples, summed in a different
order (per microbatch, then over microbatches), so it differs by a few ulps of the terms it sums; entries that
cancel to nearly 0 keep that absolute error. We bound it per leaf by GRAD_RTOL * max |gradient of the leaf|
(GRAD_RTOL = 1e-5, ~80 float32 ulps). Adam's first update is lr * g / (|g| + eps) (eps = 1e-8): its derivative
in g is at most 1 / (|g| + eps), so a parameter may move by up to lr * GRAD_RTOL * max|g| / (|g| + eps) -- large
only where |g| is near 0, which is why parameters are compared with that bound and not with a flat tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm_deepseek_quickstart, lm_quickstart, quickstart
from vimoe.train import trainer

GRAD_RTOL = 1e-5
ADAM_EPS = 1e-8       # optax.adamw's default, which vimoe/train/optim.py uses
METRIC_RTOL = 1e-5    # a mean over the batch vs the mean of 4 microbatch means

# Metrics computed over all tokens of one call that are nonlinear in them: the mean over microbatches is not the
# one-batch value (trainer._accumulated_gradients).
NOT_EQUAL_METRICS = ("importance_cv", "load_cv", "max_mean_load")


def _one_step(config, batch, microbatches: int):
  config = config.copy_and_resolve_references()
  config.microbatches = microbatches
  task, model, optimizer = trainer.build(config)
  graphdef, state = nnx.split((model, optimizer))
  step = trainer.make_train_step(task, config, graphdef)
  guard = {"step": jnp.asarray(0, jnp.int32), "first_bad": jnp.asarray(0, jnp.int32),
           "bad_loss": jnp.asarray(0.0, jnp.float32)}
  state, _, metrics = step(state, guard, batch)
  leaves = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]}
  return leaves, jax.device_get(metrics)


def _assert_steps_equal(config, batch):
  whole, whole_metrics = _one_step(config, batch, 1)
  micro, micro_metrics = _one_step(config, batch, 4)
  assert whole.keys() == micro.keys()
  lr = config.optim.lr  # warmup_steps=0: the first step runs at the peak learning rate
  b1 = config.optim.b1
  mu = {key: value for key, value in whole.items() if "['mu']" in key}
  checked = {"params": 0, "moments": 0, "exact": 0}
  for key, expected in whole.items():
    got = micro[key]
    if not np.issubdtype(expected.dtype, np.floating):  # step counts, RNG keys
      np.testing.assert_array_equal(got, expected, err_msg=key)
      checked["exact"] += 1
    elif "['mu']" in key or "['nu']" in key:  # Adam moments: (1 - b1) g and (1 - b2) g^2 after one step
      tolerance = (GRAD_RTOL if "['mu']" in key else 2 * GRAD_RTOL) * np.max(np.abs(expected)) + 1e-30
      np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance, err_msg=key)
      checked["moments"] += 1
    elif key.startswith("[0]"):  # the model: parameters and routing biases
      first_moment = [value for name, value in mu.items() if name.endswith(key[3:])]
      if not first_moment:  # not trained by the optimizer (routing bias): bit-identical sign updates
        np.testing.assert_array_equal(got, expected, err_msg=key)
        checked["exact"] += 1
        continue
      grad = first_moment[0] / (1 - b1)
      bound = lr * GRAD_RTOL * np.max(np.abs(grad)) / (np.abs(grad) + ADAM_EPS) + 1e-7 * np.abs(expected)
      assert np.all(np.abs(got - expected) <= bound), (key, np.max(np.abs(got - expected) - bound))
      checked["params"] += 1
  assert checked["params"] > 10 and checked["moments"] > 10, checked
  assert whole_metrics.keys() == micro_metrics.keys()
  for key, expected in whole_metrics.items():
    if key.split("/")[-1] in NOT_EQUAL_METRICS:
      continue
    np.testing.assert_allclose(micro_metrics[key], expected, rtol=METRIC_RTOL, atol=1e-7, err_msg=key)
  return whole, micro


def _lm_batch(batch_size: int, length: int):
  tokens = np.random.default_rng(0).integers(0, 256, (batch_size, length + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((batch_size, length), np.float32)}


def test_vit_quickstart_four_microbatches_equal_one_batch():
  config = quickstart.get_config()
  config.model.depth = 2
  config.batch_size, config.optim.warmup_steps = 16, 0
  # The Switch balance loss is nonlinear in the whole batch (not equal under microbatching); the z-loss, a mean
  # over routed items, is.
  config.model.moe.balance_weight, config.model.moe.z_loss_weight = 0.0, 1e-3
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  _assert_steps_equal(config, batch)


def test_lm_quickstart_four_microbatches_equal_one_batch():
  config = lm_quickstart.get_config()
  config.model.depth, config.model.max_length = 2, 32
  config.batch_size, config.optim.warmup_steps = 8, 0
  config.model.moe.balance_weight = 0.0  # nonlinear in the whole batch; the z-loss (0.001) stays
  _assert_steps_equal(config, _lm_batch(8, 32))


def test_deepseek_routing_bias_is_updated_once_from_the_whole_batch():
  config = lm_deepseek_quickstart.get_config()  # bias_update_rate 1e-3 and the sequence-wise balance loss
  config.model.depth, config.model.max_length = 2, 32
  config.batch_size, config.optim.warmup_steps = 8, 0
  whole, micro = _assert_steps_equal(config, _lm_batch(8, 32))
  biases = [key for key in whole if "router" in key and "bias" in key]
  assert len(biases) == 2
  for key in biases:
    # One update of +-1e-3 per expert (or 0 at the mean load); four per-microbatch updates could reach 4e-3.
    assert np.max(np.abs(whole[key])) == pytest.approx(1e-3)
    assert set(np.round(np.abs(micro[key]) / 1e-3, 3).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("value", [0, 3, 128])
def test_microbatches_that_do_not_divide_the_batch_are_refused(value):
  config = quickstart.get_config()  # batch_size 64
  config.microbatches = value
  with pytest.raises(ValueError, match=rf"config\.microbatches={value!r} .*divides config\.batch_size=64"):
    trainer.validate_config(config)
