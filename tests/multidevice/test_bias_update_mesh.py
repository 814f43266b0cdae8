"""The routing bias update of DeepSeek-style routing on 8 fake CPU devices: the loads are global sums over every
device's groups, so the (replicated) bias gets the same update as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vimoe import moe, parallel

D, H, E = 16, 32, 8
B, T = 8, 32


def make_layer(dispatch):
  layer = moe.MoeLayer(D, H, moe.MoeConfig(num_experts=E, k=2, score="sigmoid", normalize_gates=True,
                                           bias_update_rate=0.01, num_groups=4, groups_per_token=2,
                                           sequence_balance_weight=0.01, capacity_factor=1.0, dispatch=dispatch,
                                           group_size=T), rngs=nnx.Rngs(0))
  layer.router.kernel[...] = jnp.asarray(np.random.RandomState(0).randn(D, E), jnp.float32)
  return layer


def train_call(layer, x, mask):
  y, aux = layer(x, mask=mask, deterministic=False)
  return y, aux.losses["sequence_balance"]


@pytest.mark.parametrize("mesh_shape,dispatch", [((2, 4), "einsum"), ((1, 8), "gather")])
def test_bias_update_on_a_mesh_matches_one_device(mesh_shape, dispatch):
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
  mask = jnp.asarray(np.random.RandomState(2).rand(B, T) > 0.2)
  reference = make_layer(dispatch)
  ref_y, ref_loss = train_call(reference, x, mask)
  ref_y2, _ = train_call(reference, x, mask)                 # routes with the updated bias
  ref_bias = np.asarray(reference.router.bias[...])
  assert np.abs(ref_bias).max() > 0

  mesh = parallel.make_mesh(*mesh_shape, num_experts=E)
  layer = parallel.create_sharded(lambda: make_layer(dispatch), mesh)
  layer.router.kernel[...] = reference.router.kernel[...]
  with jax.set_mesh(mesh):
    step = nnx.jit(train_call)
    y, loss = step(layer, x, mask)
    y2, _ = step(layer, x, mask)
  np.testing.assert_allclose(np.asarray(layer.router.bias[...]), ref_bias, atol=1e-7)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y2, ref_y2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
