"""Dropless expert parallelism on 8 fake CPU devices: the sharded layer equals the single-device one (outputs and
gradients, balanced and heavily imbalanced routing), and its compiled HLO exchanges tokens with all-to-all and
never all-gathers an expert weight."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vimoe import moe, parallel

D, H, E = 16, 32, 8
B, T = 8, 16           # 128 token rows: 16 per device, batch item b on device b (rows split over data x expert)
WEIGHT_SHAPES = {(E, D, H), (E, H, D)}


def make_layer(k, grouped_matmul, route_per):
  return moe.MoeLayer(D, H, E, k, dispatch="gather", capacity_factor=None, grouped_matmul=grouped_matmul,
                      route_per=route_per, group_size=None, rngs=nnx.Rngs(0))


def inputs():
  kx, kr = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.normal(kx, (B, T, D))
  mask = jnp.ones((B, T), bool).at[3, 10:].set(False).at[6].set(False)   # padding tokens and a padding item
  # Imbalanced: feature 0 is large for items 0-5, so (with the router kernel below) their first choice is expert 0;
  # item 0, all of device 0's rows, sends everything to expert 0.
  x_skewed = x.at[:6, :, 0].set(3.0 + jnp.abs(x[:6, :, 0]))
  return x, x_skewed, mask, jax.random.normal(kr, (B, T, D))


def skewed_kernel(kernel):
  return kernel.at[0, 0].add(10.0)


def loss_and_grads(graphdef, target, mask):
  def loss(state, x):
    y, _ = nnx.merge(graphdef, state)(x, mask=mask)
    return jnp.sum(y * target)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def assert_close(got, want):
  (loss, (grad_state, grad_x)), (ref_loss, (ref_grad_state, ref_grad_x)) = got, want
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_x, ref_grad_x, rtol=1e-5, atol=1e-5)
  leaves = dict(jax.tree_util.tree_leaves_with_path(grad_state))
  for path, ref_leaf in jax.tree_util.tree_leaves_with_path(ref_grad_state):
    np.testing.assert_allclose(leaves[path], ref_leaf, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def collective_lines(hlo, op):
  """HLO instructions `%name = <result type> op(...)` of a collective (the result type may be a tuple)."""
  return [line for line in hlo.splitlines() if re.search(rf"= .* {op}(-start)?\(", line)]


def result_shapes(line, op):
  result_type = re.search(rf"= (.*?) {op}(-start)?\(", line).group(1)
  return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", result_type)]


# Each case compiles once on its mesh and runs balanced and imbalanced routing through the same executable; the
# four cases cover both meshes, k = 1 and 2, both local computes and both routing units.
@pytest.mark.parametrize("mesh_shape,k,grouped_matmul,route_per", [
    ((2, 4), 2, "block_loop", "token"), ((2, 4), 1, "ragged_dot", "item"),
    ((1, 8), 2, "ragged_dot", "token"), ((1, 8), 1, "block_loop", "item")])
def test_dropless_mesh_matches_single_device(mesh_shape, k, grouped_matmul, route_per):
  x, x_skewed, mask, target = inputs()
  reference = make_layer(k, grouped_matmul, route_per)
  graphdef, ref_state = nnx.split(reference)
  ref_skewed = jax.tree.map(lambda v: v, ref_state)
  ref_skewed["router"]["kernel"].set_value(skewed_kernel(ref_state["router"]["kernel"][...]))
  step = loss_and_grads(graphdef, target, mask)

  # The imbalanced case is imbalanced: most first choices are expert 0, all of item 0's (device 0's rows).
  first = np.asarray(nnx.merge(graphdef, ref_skewed).first_choice(x_skewed)).reshape(B, -1)
  assert np.mean(first == 0) >= 0.7 and np.all(first[0] == 0)
  assert np.mean(np.asarray(nnx.merge(graphdef, ref_state).first_choice(x)) == 0) < 0.4   # balanced stays so

  mesh = parallel.make_mesh(*mesh_shape, num_experts=E)
  layer = parallel.create_sharded(lambda: make_layer(k, grouped_matmul, route_per), mesh)
  assert layer.experts.w_in[...].sharding.spec == P("expert")
  _, state = nnx.split(layer)
  skewed = jax.tree.map(lambda v: v, state)
  kernel = state["router"]["kernel"][...]
  skewed["router"]["kernel"].set_value(jax.device_put(skewed_kernel(kernel), kernel.sharding))
  with jax.set_mesh(mesh):
    compiled = step.lower(state, x).compile()
  hlo = compiled.as_text()
  for s, inp, ref_s in ((state, x, ref_state), (skewed, x_skewed, ref_skewed)):
    assert_close(compiled(s, inp), step(ref_s, inp))

  # Tokens travel by all-to-all; no all-gather touches a whole [E, ...] expert weight.
  assert collective_lines(hlo, "all-to-all")
  for line in collective_lines(hlo, "all-gather"):
    for shape in result_shapes(line, "all-gather"):
      assert shape not in WEIGHT_SHAPES and np.prod(shape) < E * D * H, line


def test_rows_that_do_not_divide_over_the_devices_are_padded():
  """12 token rows on 8 devices (as one evaluation image): padded with rows of gate 0, same output as one device."""
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 12, D))
  graphdef, ref_state = nnx.split(make_layer(2, "block_loop", "token"))
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  want = forward(ref_state, x)
  mesh = parallel.make_mesh(2, 4, num_experts=E)
  _, state = nnx.split(parallel.create_sharded(lambda: make_layer(2, "block_loop", "token"), mesh))
  with jax.set_mesh(mesh):
    got = forward(state, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
