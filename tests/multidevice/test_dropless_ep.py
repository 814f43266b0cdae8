"""Dropless expert parallelism on 8 fake CPU devices: the sharded layer equals the single-device one (outputs and
gradients, balanced and heavily imbalanced routing), and its compiled HLO exchanges tokens with all-to-all and
never all-gathers an expert weight. The bounded receive buffer (model.moe.dropless_buffer_factor): a bound that
just fits equals one device, one row less raises naming the key, for the CPU's padded exchange and for the ragged
plan (the offsets TPU/GPU give `lax.ragged_all_to_all`, run through its CPU emulation); a bound of 2
compiles to less temporary memory than the worst case."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vimoe import moe, parallel
from vimoe.moe import sharding

BOUNDED = 2.0  # dropless_buffer_factor of the bounded-buffer tests: receive rows = 2 x the local assignments

D, H, E = 16, 32, 8
B, T = 8, 16           # 128 token rows: 16 per device, batch item b on device b (rows split over data x expert)
WEIGHT_SHAPES = {(E, D, H), (E, H, D)}


def make_layer(k, grouped_matmul, route_per, buffer_factor=None):
  """buffer_factor None: the worst-case receive buffer, exact for any routing."""
  return moe.MoeLayer(D, H, E, k, dispatch="gather", capacity_factor=None, grouped_matmul=grouped_matmul,
                      route_per=route_per, group_size=None, dropless_buffer_factor=buffer_factor,
                      rngs=nnx.Rngs(0))


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
# four cases cover both meshes, k = 1 and 2, both local computes and both routing units, with the worst-case
# buffer (dropless_buffer_factor=None); two of them run the ragged plan (its CPU emulation).
@pytest.mark.parametrize("mesh_shape,k,grouped_matmul,route_per,exchange", [
    ((2, 4), 2, "block_loop", "token", "padded"), ((2, 4), 1, "ragged_dot", "item", "emulated_ragged"),
    ((1, 8), 2, "ragged_dot", "token", "padded"), ((1, 8), 1, "block_loop", "item", "emulated_ragged")])
def test_dropless_mesh_matches_single_device(mesh_shape, k, grouped_matmul, route_per, exchange, monkeypatch):
  monkeypatch.setattr(sharding, "dropless_exchange", lambda mesh: exchange)
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


def traffic(layer_state, graphdef, x, k, mesh_shape):
  """NumPy: the rows each device sends to each device of its 'expert' row, [data, n sources, n destinations], from
  the router's logits (top-k by argsort); device r holds batch item r (16 rows), r = data * n + expert."""
  logits = np.asarray(x.reshape(B * T, D) @ np.asarray(layer_state["router"]["kernel"][...]))
  choices = np.argsort(-logits, axis=1, kind="stable")[:, :k].reshape(B, T * k)   # [device, its assignments]
  data, n = mesh_shape
  counts = np.zeros((data, n, n), int)
  for r in range(B):
    for expert in choices[r]:
      counts[r // n, r % n, expert // (E // n)] += 1
  return counts


@pytest.mark.parametrize("exchange", ["padded", "emulated_ragged"])
def test_buffer_bound_that_fits_is_exact_and_one_row_less_raises(exchange, monkeypatch):
  """The imbalanced routing with the tightest bound that holds it equals one device (outputs and gradients); with
  one row less per buffer the step raises, naming the key. Ragged plan: a device receives at most R rows in all;
  padded: at most R / n from each device."""
  monkeypatch.setattr(sharding, "dropless_exchange", lambda mesh: exchange)
  k, mesh_shape = 2, (2, 4)
  _, x_skewed, mask, target = inputs()
  graphdef, ref_state = nnx.split(make_layer(k, "block_loop", "token"))
  ref_state["router"]["kernel"].set_value(skewed_kernel(ref_state["router"]["kernel"][...]))
  step = loss_and_grads(graphdef, target, mask)
  want = step(ref_state, x_skewed)
  counts = traffic(ref_state, graphdef, x_skewed, k, mesh_shape)
  n, A = mesh_shape[1], T * k                      # A = 32 local assignments: factors r / 32 are exact in binary
  needed = counts.sum(1).max() if exchange == "emulated_ragged" else counts.max() * n
  assert needed > 2 * A                            # more than a bound of 2 holds: the bound is what is tested
  mesh = parallel.make_mesh(*mesh_shape, num_experts=E)
  # (The exact run goes last: its effects token replaces the failed run's, which would otherwise re-raise at exit.)
  for rows, fits in ((needed - (1 if exchange == "emulated_ragged" else n), False), (needed, True)):
    layer = parallel.create_sharded(lambda: make_layer(k, "block_loop", "token", float(rows) / A), mesh)
    bounded_graphdef, state = nnx.split(layer)    # (the graphdef holds the config, hence the bound)
    kernel = state["router"]["kernel"][...]
    state["router"]["kernel"].set_value(jax.device_put(skewed_kernel(kernel), kernel.sharding))
    bounded_step = loss_and_grads(bounded_graphdef, target, mask)
    with jax.set_mesh(mesh):
      if fits:
        assert_close(bounded_step(state, x_skewed), want)
      else:
        with pytest.raises(Exception, match=r"model\.moe\.dropless_buffer_factor=" + re.escape(repr(float(rows) / A))):
          jax.block_until_ready(bounded_step(state, x_skewed))


def test_bounded_buffer_compiles_to_less_temporary_memory_than_the_worst_case():
  """E=64, k=2, D=128, H=256, 2048 tokens per device on 8 devices: a bound of 2 x the local assignments (
  instead of 8 x) needs at most half the worst case's temporaries, forward and backward (compiled, not run)."""
  tokens, dim, hidden, experts, k = 8 * 2048, 128, 256, 64, 2
  mesh = parallel.make_mesh(1, 8, num_experts=experts)
  temp = {}
  for factor in (None, BOUNDED):
    make = lambda: moe.MoeLayer(dim, hidden, experts, k, dispatch="gather", capacity_factor=None,
                                dropless_buffer_factor=factor, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
      graphdef, abstract = nnx.split(nnx.eval_shape(make))
      abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding), abstract)
      x = jax.ShapeDtypeStruct((tokens // 256, 256, dim), jnp.float32,
                               sharding=jax.sharding.NamedSharding(mesh, P(("data", "expert"))))
      loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x)[0] ** 2)
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(abstract, x).compile()
    temp[factor] = compiled.memory_analysis().temp_size_in_bytes
  print({factor: f"{size / 2**20:.1f} MiB" for factor, size in temp.items()})
  assert temp[BOUNDED] <= 0.5 * temp[None]


@pytest.mark.parametrize("value", [0.5, 0, "2", True])
def test_buffer_factor_below_a_balanced_load_or_not_a_number_is_refused(value):
  with pytest.raises(ValueError, match=r"^model\.moe\.dropless_buffer_factor=" + re.escape(repr(value)) + " must be"):
    moe.MoeConfig.from_dict({"dropless_buffer_factor": value}, prefix="model.moe.")
  assert moe.MoeConfig.from_dict({"dropless_buffer_factor": None}).dropless_buffer_factor is None   # None: a value
