"""The MoeLayer's public surface: parameter shapes, shared experts, argument errors, training noise, jit and
bf16."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layer_setup import B, D, E, H, T, build_layer, forward, random_input
from moe_reference import layer_params, moe_reference, reference_metrics
from vimoe import moe


def test_parameter_shapes_follow_the_contract():
  layer = moe.MoeLayer(D, H, E, 2, num_shared_experts=2, activation="swiglu", rngs=nnx.Rngs(0))
  assert layer.router.kernel[...].shape == (D, E)
  assert layer.experts.w_in[...].shape == (E, D, H)
  assert layer.experts.b_in[...].shape == (E, H)
  assert layer.experts.w_out[...].shape == (E, H, D)
  assert layer.experts.b_out[...].shape == (E, D)
  assert layer.experts.w_gate[...].shape == (E, D, H)
  assert layer.shared.w_in[...].shape == (2, D, H)
  assert layer.shared.w_out[...].shape == (2, H, D)
  prelu = moe.MoeLayer(D, H, E, 1, router="noisy_top_k", activation="prelu", rngs=nnx.Rngs(0))
  assert prelu.experts.slope[...].shape == (E, H)
  assert prelu.router.noise_kernel[...].shape == (D, E)
  # Shazeer 2017: both gating matrices start at zero.
  assert not np.any(np.asarray(prelu.router.kernel[...])) and not np.any(np.asarray(prelu.router.noise_kernel[...]))
  soft = moe.MoeLayer(D, H, E, 1, router="soft", slots_per_expert=3, rngs=nnx.Rngs(0))
  assert soft.router.kernel[...].shape == (D, E, 3)
  assert not hasattr(moe.MoeLayer(D, H, E, 1, router="hash", rngs=nnx.Rngs(0)).router, "kernel")


# -- shared experts -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_shared,activation", [(1, "gelu"), (2, "relu")])
def test_shared_experts_alone(num_shared, activation):
  # Routed experts zeroed at the output: y is the shared MLPs alone, sum_s (act(x W_in_s + b_in_s) W_out_s + b_out_s).
  layer = build_layer(40, k=2, num_shared_experts=num_shared, activation=activation)
  layer.experts.w_out[...] = jnp.zeros_like(layer.experts.w_out[...])
  layer.experts.b_out[...] = jnp.zeros_like(layer.experts.b_out[...])
  x = random_input(40)
  y, _ = forward(layer, x)
  shared = {name: np.asarray(getattr(layer.shared, name)[...], np.float64)
            for name in ("w_in", "b_in", "w_out", "b_out")}
  expected = np.zeros(x.shape)
  for b in range(B):
    for t in range(T):
      for s in range(num_shared):
        pre = x[b, t] @ shared["w_in"][s] + shared["b_in"][s]
        hidden = (0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
                  if activation == "gelu" else np.maximum(pre, 0))
        expected[b, t] += hidden @ shared["w_out"][s] + shared["b_out"][s]
  np.testing.assert_allclose(np.asarray(y), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_shared_experts_added_to_routed_output(dispatch):
  layer = build_layer(41, k=2, num_shared_experts=2, capacity_factor=0.5, dispatch=dispatch, activation="prelu")
  x = random_input(41)
  y, _ = forward(layer, x)
  y_ref, info = moe_reference(x, layer_params(layer), num_experts=E, k=2, capacity_factor=0.5, activation="prelu")
  assert 0 < np.mean(info["kept"]) < 1
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=2e-5)


# -- argument errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,pattern", [
    (dict(k=5), r"k=5 .*num_experts=4"),
    (dict(k=0), r"k=0"),
    (dict(capacity_factor=0.0), r"capacity_factor=0\.0"),
    (dict(capacity_factor=-1.25), r"capacity_factor=-1\.25"),
    (dict(router="bogus"), r"router='bogus'.*'top_k'"),
    (dict(dispatch="scatter"), r"dispatch='scatter'.*'einsum'.*'gather'"),
    (dict(activation="tanh"), r"activation='tanh'.*gelu"),
    (dict(route_per="sentence"), r"route_per='sentence'"),
    (dict(router="experts_choose", causal=True), r"router='experts_choose' with causal=True"),
    (dict(router="soft", causal=True), r"router='soft' with causal=True"),
    (dict(batch_priority=True, causal=True), r"batch_priority=True with causal=True"),
    (dict(router="hash", k=2), r"k=2 with router='hash'"),
    (dict(router="soft", dispatch="gather"), r"dispatch='gather' with router='soft'"),
    (dict(router="experts_choose", capacity_factor=None), r"capacity_factor=None with router='experts_choose'"),
    (dict(load_weight=0.1), r"load_weight=0\.1 with router='top_k'"),
    (dict(balance_weight=-1.0), r"balance_weight=-1\.0"),
    (dict(group_size=0), r"group_size=0"),
])
def test_bad_arguments_name_the_argument_and_value(kwargs, pattern):
  kwargs = dict(kwargs)
  k = kwargs.pop("k", 1)
  with pytest.raises(ValueError, match=pattern):
    moe.MoeLayer(D, H, E, k, rngs=nnx.Rngs(0), **kwargs)


def test_bad_call_arguments():
  layer = moe.MoeLayer(D, H, E, 1, group_size=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=re.escape("group_size=5 does not divide the 16 tokens")):
    layer(jnp.zeros((B, T, D)))
  with pytest.raises(ValueError, match=re.escape("dim=8")):
    moe.MoeLayer(D, H, E, 1, rngs=nnx.Rngs(0))(jnp.zeros((B, T, D + 1)))
  with pytest.raises(ValueError, match="token_ids"):
    moe.MoeLayer(D, H, E, 1, router="hash", rngs=nnx.Rngs(0))(jnp.zeros((B, T, D)))
  item = moe.MoeLayer(D, H, E, 1, route_per="item", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=re.escape("router_input has shape (2, 3)")):
    item(jnp.zeros((B, T, D)), router_input=jnp.zeros((B, 3)))
  with pytest.raises(ValueError, match="router_input is only used with route_per='item'"):
    moe.MoeLayer(D, H, E, 1, rngs=nnx.Rngs(0))(jnp.zeros((B, T, D)), router_input=jnp.zeros((B, D)))
  with pytest.raises(ValueError, match=re.escape("k_secondary=3")):
    moe.HierarchicalMoeLayer(D, H, 2, 2, k_secondary=3, rngs=nnx.Rngs(0))


# -- noisy top-k in training and evaluation ---------------------------------------------------------------------

def test_noisy_top_k_noise_only_in_training():
  # Zero gating matrices (the initial state): every clean logit is 0. Without noise the tie goes to the lowest
  # index (lax.top_k), so every token picks expert 0. With noise N(0,1) * softplus(0) all experts are symmetric,
  # so each gets ~1/4 of the 256 tokens (binomial std sqrt(256 * 1/4 * 3/4) / 256 = 0.027; we allow 0.1).
  layer = moe.MoeLayer(D, H, E, 1, router="noisy_top_k", capacity_factor=None, rngs=nnx.Rngs(0))
  x = jnp.asarray(random_input(42, (4, 64, D)))
  train_forward = nnx.jit(lambda model, x: model(x, deterministic=False))
  _, aux = forward(layer, x)
  np.testing.assert_allclose(np.asarray(aux.metrics["expert_load"]), [1, 0, 0, 0])
  _, aux = train_forward(layer, x)
  np.testing.assert_allclose(np.asarray(aux.metrics["expert_load"]), [0.25] * 4, atol=0.1)
  # The noise is fresh on each training call (the layer's RNG stream advances, also under nnx.jit).
  y1, _ = train_forward(layer, x)
  y2, _ = train_forward(layer, x)
  assert not np.allclose(np.asarray(y1), np.asarray(y2))


def test_noisy_top_k_noise_scale_is_softplus_of_noise_logits():
  # Every token is x = e_0 + e_1; Wg has a single 1 at (0, expert 0) and Wnoise is 1 on row 1, so the clean logits
  # are [1, 0, 0, 0] and every expert's noise std is softplus(1) = ln(1 + e) = 1.313262 (Shazeer eq. 4).
  # Expert 0 is the top-1 when 1 + s z_0 > s z_j for j = 1, 2, 3, with z ~ N(0, 1):
  #   P = integral phi(z) Phi(z + 1/s)^3 dz, computed below by the trapezoid rule.
  # 4096 tokens: binomial std sqrt(P (1 - P) / 4096) < 0.008; allowed 0.03. A std of ln 2 (softplus(0), the
  # noise kernel ignored) would give 0.686 and a std of 1 would give 0.552, both far outside that.
  layer = moe.MoeLayer(D, H, E, 1, router="noisy_top_k", capacity_factor=None, rngs=nnx.Rngs(1))
  kernel = np.zeros((D, E), np.float32)
  kernel[0, 0] = 1.0
  noise_kernel = np.zeros((D, E), np.float32)
  noise_kernel[1, :] = 1.0
  layer.router.kernel[...] = jnp.asarray(kernel)
  layer.router.noise_kernel[...] = jnp.asarray(noise_kernel)
  x = np.zeros((64, 64, D), np.float32)
  x[..., 0] = x[..., 1] = 1.0
  _, aux = nnx.jit(lambda model, x: model(x, deterministic=False))(layer, jnp.asarray(x))
  std = np.log1p(np.e)
  z = np.linspace(-10, 10, 20001)
  phi = np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi)
  cdf = 0.5 * (1 + np.vectorize(math.erf)((z + 1 / std) / np.sqrt(2)))
  p_expert0 = np.trapezoid(phi * cdf ** 3, z)
  assert 0.47 < p_expert0 < 0.48   # 0.4759: sanity of the integral itself
  load = np.asarray(aux.metrics["expert_load"])
  np.testing.assert_allclose(load[0], p_expert0, atol=0.03)
  np.testing.assert_allclose(load[1:], (1 - p_expert0) / 3, atol=0.03)   # the other three are symmetric


def test_eval_mode_turns_noise_off():
  layer = build_layer(43, router="noisy_top_k", k=2, capacity_factor=None)
  x = random_input(43)
  y_ref, _ = moe_reference(x, layer_params(layer), num_experts=E, k=2, router="noisy_top_k")
  default_forward = nnx.jit(lambda model, x: model(x))
  y_train, _ = default_forward(layer, jnp.asarray(x))   # default: training, noise on (noise_kernel is random)
  assert np.abs(np.asarray(y_train) - y_ref).max() > 1e-2
  layer.eval()
  y_eval, _ = default_forward(layer, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y_eval), y_ref, atol=2e-5, rtol=2e-5)


# -- jit and bf16 -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch,capacity_factor", [("einsum", 0.5), ("gather", 0.5), ("gather", None)])
def test_layer_under_nnx_jit(dispatch, capacity_factor):
  layer = build_layer(44, k=2, dispatch=dispatch, capacity_factor=capacity_factor, num_shared_experts=1)
  x = random_input(44)

  @nnx.jit
  def jitted(model, x):
    y, aux = model(x)
    return y, aux.metrics

  y, metrics = jitted(layer, jnp.asarray(x))
  y_ref, info = moe_reference(x, layer_params(layer), num_experts=E, k=2, capacity_factor=capacity_factor)
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["dropped_fraction"]), 1 - np.mean(info["kept"]), atol=1e-7)


def test_jit_train_step_updates_parameters_by_the_gradient():
  # One SGD step inside nnx.jit (gradient and in-place update): the update must be visible on the layer outside
  # jit, new kernel = old kernel - lr * grad. (test_gradients.py checks jitted gradients against finite
  # differences.)
  layer = build_layer(45, k=2, capacity_factor=1.25, dispatch="gather", balance_weight=0.1)
  x = jnp.asarray(random_input(45))

  def loss_fn(model):
    y, aux = model(x)
    return jnp.mean(y ** 2) + sum(aux.losses.values())

  @nnx.jit
  def step(model):
    grads = nnx.grad(loss_fn)(model)
    model.router.kernel[...] = model.router.kernel[...] - 0.5 * grads.router.kernel[...]
    return grads.router.kernel[...]

  before = np.asarray(layer.router.kernel[...])
  grad = np.asarray(step(layer))
  assert np.abs(grad).max() > 1e-4
  np.testing.assert_allclose(np.asarray(layer.router.kernel[...]), before - 0.5 * grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dispatch,capacity_factor", [("einsum", 0.5), ("gather", None)])
def test_bf16_input(dispatch, capacity_factor):
  layer = build_layer(46, k=2, dispatch=dispatch, capacity_factor=capacity_factor, num_shared_experts=1,
                      balance_weight=0.1, z_loss_weight=0.1, importance_weight=0.1)
  x_bf16 = jnp.asarray(random_input(46), jnp.bfloat16)
  x_rounded = np.asarray(x_bf16.astype(jnp.float32), np.float64)   # the exact values the layer sees
  y, aux = forward(layer, x_bf16)
  assert y.dtype == jnp.bfloat16
  y_ref, info = moe_reference(x_rounded, layer_params(layer), num_experts=E, k=2, capacity_factor=capacity_factor)
  # Experts run in bf16 (8-bit mantissa, relative rounding 2^-8 = 0.004 per operation, a few dozen operations
  # per output): the error stays within 3% of the output scale.
  scale = np.abs(y_ref).max()
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), y_ref, atol=0.03 * scale)
  y32, _ = forward(layer, jnp.asarray(x_rounded, jnp.float32))
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), np.asarray(y32), atol=0.03 * scale)
  # Routing math stays float32: the router statistics match the float64 loop to float32 precision, which a bf16
  # softmax (relative error ~4e-3) could not.
  expected = reference_metrics(info, layer_params(layer), num_experts=E, k=2, router="top_k")
  for name in ("importance_loss", "balance_loss", "router_z_loss", "dropped_fraction", "expert_load"):
    assert aux.metrics[name].dtype == jnp.float32, name
    np.testing.assert_allclose(np.asarray(aux.metrics[name]), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for name, loss in aux.losses.items():
    assert loss.dtype == jnp.float32, name


def test_router_functions_compute_in_float32():
  logits = jnp.asarray([[[2.0, 1.0, 0.5, -1.0]]], jnp.bfloat16)
  expert_index, gates, probs = moe.routing.top_k_gating(logits, 2, False)
  assert gates.dtype == jnp.float32 and probs.dtype == jnp.float32
  # softmax([2, 1, 0.5, -1]) computed in float64: exp = [7.389056, 2.718282, 1.648721, 0.367879], sum 12.123938
  # -> [0.609460, 0.224208, 0.135989, 0.030343]; the top 2 are experts 0 and 1.
  np.testing.assert_array_equal(np.asarray(expert_index)[0, 0], [0, 1])
  np.testing.assert_allclose(np.asarray(gates)[0, 0], [0.609460, 0.224208], rtol=1e-5)
  proto = moe.routing.prototype_logits(jnp.ones((1, 1, 4), jnp.bfloat16), jnp.zeros((4, 2), jnp.bfloat16))
  # -||1 - 0||^2 / (2 sqrt(4)) = -4 / 4 = -1 for both prototypes.
  assert proto.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(proto), -1.0)


def test_graphdef_is_hashable_so_plain_jax_jit_can_take_it_as_static():
  layer = moe.MoeLayer(8, 16, 4, 2, balance_weight=0.1, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  hash(graphdef)
  x = jnp.ones((2, 8, 8))
  y = jax.jit(lambda g, s, x: nnx.merge(g, s)(x)[0], static_argnums=0)(graphdef, state, x)
  np.testing.assert_allclose(y, layer(x)[0], rtol=1e-6, atol=1e-6)
  hierarchical = moe.HierarchicalMoeLayer(8, 16, 2, 2, importance_weight=0.1, rngs=nnx.Rngs(0))
  hash(nnx.split(hierarchical)[0])
