"""A MoeLayer built inside `with jax.set_mesh(mesh):` carries its partitioning: the routed experts' weights are born
sharded over 'expert' along E (router and shared experts replicated), and the layer computes what the same layer
built without a mesh computes."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from vimoe import moe

D, H, E = 16, 32, 4
B, T = 8, 8   # 8 groups (one per item): one per device of the (2, 4) mesh


def auto_mesh():
  return jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)


@pytest.mark.parametrize("dispatch,activation", [("einsum", "gelu"), ("gather", "swiglu")])
def test_layer_created_under_a_mesh_is_born_expert_sharded(dispatch, activation):
  config = moe.MoeConfig(num_experts=E, k=2, capacity_factor=1.0, dispatch=dispatch, num_shared_experts=1,
                         activation=activation, balance_weight=0.01)
  mesh = auto_mesh()
  with jax.set_mesh(mesh):
    layer = moe.MoeLayer(D, H, config, rngs=nnx.Rngs(0))
  names = ("w_in", "b_in", "w_out", "b_out") + (("w_gate",) if activation == "swiglu" else ())
  for name in names:
    value = getattr(layer.experts, name)[...]
    assert value.sharding.spec[0] == "expert", (name, value.sharding)
    assert value.addressable_shards[0].data.shape[0] == E // 4          # one expert per 'expert' device
  assert layer.shared.w_in[...].sharding.is_fully_replicated
  assert layer.router.kernel[...].sharding.is_fully_replicated

  reference = moe.MoeLayer(D, H, config, rngs=nnx.Rngs(0))             # no mesh: one device, same seed
  assert reference.experts.w_in[...].sharding.is_fully_replicated
  for name in names:
    np.testing.assert_array_equal(getattr(layer.experts, name)[...], getattr(reference.experts, name)[...])
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
  y_ref, aux_ref = reference(x)
  with jax.set_mesh(mesh):
    y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux.losses["balance"], aux_ref.losses["balance"], rtol=1e-5)


def test_layer_without_a_divisible_expert_axis_stays_replicated():
  with jax.set_mesh(auto_mesh()):
    layer = moe.MoeLayer(D, H, 6, 1, rngs=nnx.Rngs(0))                # 6 experts do not split over 4 devices
  assert layer.experts.w_in[...].sharding.is_fully_replicated
  assert layer.experts.w_in[...].shape == (6, D, H)


def test_sharded_layer_checkpoints_its_partition_spec():
  with jax.set_mesh(auto_mesh()):
    layer = moe.MoeLayer(D, H, E, 1, rngs=nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
  assert specs["experts"]["w_in"].get_value() == P("expert")
  assert layer.experts.w_out[...].shape == (E, H, D)
