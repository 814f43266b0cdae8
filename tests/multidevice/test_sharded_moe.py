"""Expert parallelism on 8 fake CPU devices: sharded == single device, all-to-all in the HLO, training on a mesh,
and checkpoints that move between mesh shapes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vimoe import moe, parallel

D, H, E, K = 16, 32, 8, 2
B, T = 8, 32  # 8 groups of 32 tokens: one group per device on both meshes


def make_layer(dispatch, capacity_factor=1.0):
  return moe.MoeLayer(D, H, E, K, dispatch=dispatch, capacity_factor=capacity_factor, num_shared_experts=1,
                      balance_weight=0.01, rngs=nnx.Rngs(0))


def loss_fn(layer, x, target):
  y, aux = layer(x)
  return jnp.mean((y - target) ** 2) + sum(aux.losses.values()), y


def inputs():
  kx, kt = jax.random.split(jax.random.PRNGKey(1))
  return jax.random.normal(kx, (B, T, D)), jax.random.normal(kt, (B, T, D))


@pytest.mark.parametrize("dispatch,capacity_factor", [("einsum", 1.0), ("gather", 1.0), ("einsum", None)])
@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)])
def test_sharded_layer_matches_single_device(dispatch, capacity_factor, mesh_shape):
  x, target = inputs()
  reference = make_layer(dispatch, capacity_factor)
  (ref_loss, ref_y), ref_grads = nnx.value_and_grad(loss_fn, has_aux=True)(reference, x, target)
  # The reference must exercise drops, or capacity handling would be untested on the mesh.
  if capacity_factor is not None:
    assert float(reference(x)[1].metrics["dropped_fraction"]) > 0

  mesh = parallel.make_mesh(*mesh_shape, num_experts=E)
  layer = parallel.create_sharded(lambda: make_layer(dispatch, capacity_factor), mesh)
  assert layer.experts.w_in[...].sharding.spec == P("expert")
  with jax.set_mesh(mesh):
    (loss, y), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(layer, x, target)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  ref_leaves = jax.tree_util.tree_leaves_with_path(nnx.state(ref_grads))
  leaves = dict(jax.tree_util.tree_leaves_with_path(nnx.state(grads)))
  for path, ref_leaf in ref_leaves:
    np.testing.assert_allclose(leaves[path], ref_leaf, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_compiled_dispatch_contains_all_to_all(dispatch):
  x, _ = inputs()
  mesh = parallel.make_mesh(2, 4, num_experts=E)
  layer = parallel.create_sharded(lambda: make_layer(dispatch), mesh)
  graphdef, state = nnx.split(layer)
  for path, value in jax.tree_util.tree_leaves_with_path(state):
    name = parallel.partition.path_string(path)
    if re.search(r"^experts/", name):
      assert "expert" in value.sharding.spec[0:1], name
    else:
      assert all(axis is None for axis in value.sharding.spec), name
  with jax.set_mesh(mesh):
    hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(state, x).compile().as_text()
  assert re.search(r"\ball-to-all\b", hlo)


def test_train_step_on_mesh_lowers_loss():
  mesh = parallel.make_mesh(2, 4, num_experts=E)
  x, target = inputs()
  with jax.set_mesh(mesh):
    layer = parallel.create_sharded(lambda: make_layer("einsum"), mesh)
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer, x, target):
      (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(layer, x, target)
      optimizer.update(layer, grads)
      return loss

    losses = [float(step(layer, optimizer, x, target)) for _ in range(15)]
  assert losses[-1] < 0.8 * losses[0], losses
  assert layer.experts.w_in[...].sharding.spec == P("expert")


def test_checkpoint_moves_between_mesh_shapes(tmp_path):
  mesh_a = parallel.make_mesh(2, 4, num_experts=E)
  layer = parallel.create_sharded(lambda: make_layer("einsum"), mesh_a)
  state = nnx.state(layer, nnx.Param)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()

  mesh_b = parallel.make_mesh(4, 2, num_experts=E)
  target = parallel.abstract_with_shardings(nnx.state(nnx.eval_shape(lambda: make_layer("einsum")), nnx.Param),
                                            mesh_b)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = manager.restore(3, args=ocp.args.StandardRestore(target))
  saved = dict(jax.tree_util.tree_leaves_with_path(state))
  for path, value in jax.tree_util.tree_leaves_with_path(restored):
    np.testing.assert_array_equal(np.asarray(value), np.asarray(saved[path]))
    assert value.sharding.mesh.shape == mesh_b.shape
  assert restored["experts"]["w_in"][...].sharding.spec == P("expert")


def test_mesh_errors_name_the_problem():
  with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
    parallel.make_mesh(2, 4, num_experts=6)
  with pytest.raises(ValueError, match="does not match the 8"):
    parallel.make_mesh(3, 2)
  mesh = parallel.make_mesh(num_experts=E)
  assert dict(mesh.shape) == {"data": 1, "expert": 8}
  mesh = parallel.make_mesh(expert=2)
  assert dict(mesh.shape) == {"data": 4, "expert": 2}
  layer = make_layer("einsum")
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="routing groups"):
    layer(jnp.zeros((2, T, D)))
