"""The dropless path's local compute: grouped matmuls (`ragged_moe`, lax.ragged_dot) against the block loop
(`dropless_moe`) and a NumPy loop over tokens and their choices (tests/moe_reference.py's expert MLP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_reference as ref
from vimoe import moe
from vimoe.moe import dispatch

N, K, E, D, H = 40, 2, 6, 8, 12


def expert_params(activation, seed=0):
  experts = moe.Experts(E, D, H, activation=activation, rngs=nnx.Rngs(seed))
  params = experts.params_dict()
  # Non-zero biases and slopes, different per expert, so that gathering them per row is checked.
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(params))
  return {name: w if name.startswith("w_") else w + 0.3 * jax.random.normal(key, w.shape)
          for (name, w), key in zip(params.items(), keys)}


def routing(seed, skewed):
  """expert_index [N,K] (distinct per row; skewed: most rows choose expert 0 first) and gates [N,K]."""
  rng = np.random.default_rng(seed)
  index = np.stack([rng.permutation(E)[:K] for _ in range(N)])
  if skewed:
    for row in range(int(0.8 * N)):
      index[row] = [0] + [e for e in index[row] if e != 0][:K - 1]
  return jnp.asarray(index, jnp.int32), jnp.asarray(rng.uniform(0.1, 1.0, (N, K)), jnp.float32)


def numpy_loop(x, index, gates, params, activation, valid=None):
  p = {f"experts.{name}": np.asarray(w, np.float64) for name, w in params.items()}
  y = np.zeros((N, D))
  for n in range(N):
    for j in range(K):
      if valid is None or valid[n, j]:
        y[n] += float(gates[n, j]) * ref.expert(p, "experts", int(index[n, j]), np.asarray(x[n], np.float64),
                                                activation)
  return y


@pytest.mark.parametrize("activation", ["gelu", "swiglu", "prelu"])
@pytest.mark.parametrize("skewed", [False, True])
def test_ragged_dot_matches_block_loop_and_numpy(activation, skewed):
  params = expert_params(activation)
  index, gates = routing(0, skewed)
  x = jax.random.normal(jax.random.PRNGKey(2), (N, D))
  block_fn = lambda p, xb: moe.expert_mlp(p, xb, activation)
  ragged = dispatch.ragged_moe(x, index, gates, E, params, activation)
  loop = dispatch.dropless_moe(x, index, gates, E, params, block_fn, block_size=4)
  expected = numpy_loop(x, index, gates, params, activation)
  np.testing.assert_allclose(ragged, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loop, expected, rtol=1e-5, atol=1e-5)

  # Gradients with respect to the input, the gates and every weight agree between the two.
  loss = lambda f: lambda x, g, p: jnp.sum(jnp.sin(f(x, g, p)))
  grad_ragged = jax.grad(loss(lambda x, g, p: dispatch.ragged_moe(x, index, g, E, p, activation)),
                         argnums=(0, 1, 2))(x, gates, params)
  grad_loop = jax.grad(loss(lambda x, g, p: dispatch.dropless_moe(x, index, g, E, p, block_fn, 4)),
                       argnums=(0, 1, 2))(x, gates, params)
  for path, a in jax.tree_util.tree_leaves_with_path(grad_ragged):
    b = dict(jax.tree_util.tree_leaves_with_path(grad_loop))[path]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("grouped_matmul", ["block_loop", "ragged_dot"])
def test_empty_rows_contribute_nothing(grouped_matmul):
  """`valid` False (the expert-parallel receive buffer's padding) is skipped: the same as the loop without it."""
  params = expert_params("gelu")
  index, gates = routing(3, skewed=True)
  x = jax.random.normal(jax.random.PRNGKey(4), (N, D))
  valid = np.random.default_rng(5).uniform(size=(N, K)) < 0.6
  if grouped_matmul == "ragged_dot":
    out = dispatch.ragged_moe(x, index, gates, E, params, "gelu", jnp.asarray(valid))
  else:
    out = dispatch.dropless_moe(x, index, gates, E, params, lambda p, xb: moe.expert_mlp(p, xb, "gelu"), 4,
                                base_capacity=3, valid=jnp.asarray(valid))
  np.testing.assert_allclose(out, numpy_loop(x, index, gates, params, "gelu", valid), rtol=1e-5, atol=1e-5)


def test_layer_grouped_matmul_choice():
  """A dropless layer gives the same output with either local compute; "auto" on CPU is the block loop, bit for
  bit; an unknown name is refused with the key, the value and the choices."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, D))
  outputs = {}
  for name in ("auto", "block_loop", "ragged_dot"):
    layer = moe.MoeLayer(D, H, E, K, dispatch="gather", capacity_factor=None, grouped_matmul=name,
                         rngs=nnx.Rngs(0))
    outputs[name] = np.asarray(layer(x)[0])
  assert jax.default_backend() == "cpu"
  np.testing.assert_array_equal(outputs["auto"], outputs["block_loop"])
  np.testing.assert_allclose(outputs["ragged_dot"], outputs["block_loop"], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="grouped_matmul='grouped'.*'auto', 'block_loop', 'ragged_dot', 'gmm'"):
    moe.MoeConfig(grouped_matmul="grouped").validate()


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_megablox_gmm_matches_numpy_in_interpret_mode(activation):
  """grouped_matmul="gmm" (megablox's Pallas kernel, TPU; on CPU it runs in Pallas interpret mode): outputs equal
  the NumPy loop, with empty rows skipped and N*K rows that are not a multiple of its 128-row tile; gradients
  equal ragged_dot's."""
  pytest.importorskip("jax.experimental.pallas.ops.tpu.megablox")
  params = expert_params(activation)
  index, gates = routing(6, skewed=True)
  x = jax.random.normal(jax.random.PRNGKey(7), (N, D))
  valid = np.random.default_rng(8).uniform(size=(N, K)) < 0.7
  out = dispatch.ragged_moe(x, index, gates, E, params, activation, jnp.asarray(valid), method="gmm")
  np.testing.assert_allclose(out, numpy_loop(x, index, gates, params, activation, valid), rtol=1e-5, atol=1e-5)
  loss = lambda method: lambda x, p: jnp.sum(jnp.sin(dispatch.ragged_moe(x, index, gates, E, p, activation,
                                                                          jnp.asarray(valid), method=method)))
  grad_gmm = jax.grad(loss("gmm"), argnums=(0, 1))(x, params)
  grad_ragged = jax.grad(loss("ragged_dot"), argnums=(0, 1))(x, params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad_gmm), jax.tree.leaves(grad_ragged)):
    assert np.all(np.isfinite(a)), jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
