"""Gradients of the MoeLayer against finite differences.

Two checks per case:
* jax.grad of the float32 layer against central differences (float64, eps=1e-5) of the independent NumPy loop of
  moe_reference.py, coordinate by coordinate, for router.kernel and experts.w_in. Every perturbed evaluation
  must route exactly like the unperturbed one (same experts, same kept choices), so the loss is smooth there.
* A float32 directional central difference of the layer itself along a random direction, which exercises the
  hand-written backward pass of the dropless overflow block loop (dispatch.overflow_blocks) against its own forward.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layer_setup import E, build_layer, random_input
from moe_reference import layer_params, moe_reference, reference_metrics

EPS64 = 1e-5


def routing_signature(info):
  return ([tuple(e for e, _ in choices) for choices in info["choices"]], list(info["kept"]))


def reference_loss(params, x, readout, cfg, weights):
  y, info = moe_reference(x, params, num_experts=E, **cfg)
  loss = np.sum(y * readout)
  if weights:
    metrics = reference_metrics(info, params, num_experts=E, k=cfg["k"], router=cfg.get("router", "top_k"))
    names = {"importance_weight": "importance_loss", "balance_weight": "balance_loss",
             "z_loss_weight": "router_z_loss", "load_weight": "load_loss"}
    loss += sum(weight * metrics[names[name]] for name, weight in weights.items())
  return loss, routing_signature(info)


def finite_difference(params, name, coords, x, readout, cfg, weights):
  """Central differences of the float64 loop's loss for params[name] at the given flat coordinates."""
  _, signature = reference_loss(params, x, readout, cfg, weights)
  grads = []
  for flat_index in coords:
    values = []
    for sign in (1, -1):
      perturbed = dict(params)
      perturbed[name] = params[name].copy()
      perturbed[name].flat[flat_index] += sign * EPS64
      loss, perturbed_signature = reference_loss(perturbed, x, readout, cfg, weights)
      assert perturbed_signature == signature, "a routing decision flipped within eps; pick another seed"
      values.append(loss)
    grads.append((values[0] - values[1]) / (2 * EPS64))
  return np.array(grads)


def layer_loss(layer, x, readout):
  y, aux = layer(x, deterministic=True)
  return jnp.sum(y * readout) + sum(aux.losses.values())


# Jitted: one XLA compile per configuration instead of ~100 eager op compiles for the backward pass.
layer_loss_jit = nnx.jit(layer_loss)
layer_grad_jit = nnx.jit(nnx.grad(layer_loss))


CASES = {
    # einsum with C = S (no drops), k=2, and the Switch balance / z / importance losses in the loss.
    "einsum": dict(layer=dict(router="top_k", k=2, capacity_factor=None, dispatch="einsum"),
                   weights=dict(importance_weight=0.5, balance_weight=0.3, z_loss_weight=0.01)),
    # gather at C = ceil(2*8*0.5/4) = 2: some choices are dropped and must get no gradient.
    "gather_capacity": dict(layer=dict(router="top_k", k=2, capacity_factor=0.5, dispatch="gather"), weights={}),
    # dropless gather: balanced batched share plus the overflow block loop with its custom VJP; blocks of 2 rows so
    # the overflow of an expert spans several blocks.
    "dropless": dict(layer=dict(router="top_k", k=2, capacity_factor=None, dispatch="gather", block_size=2,
                                activation="swiglu"), weights={}),
    # top-1 without renormalisation: the gate is the softmax probability and must carry gradient to the router.
    "top1": dict(layer=dict(router="top_k", k=1, capacity_factor=None, dispatch="gather", normalize_gates=False),
                 weights={}),
    # noisy top-k (evaluation mode) with Shazeer's importance and load losses: the load loss reaches
    # noise_kernel through softplus(x Wnoise) in the normal CDF.
    "noisy_top_k": dict(layer=dict(router="noisy_top_k", k=2, capacity_factor=0.5, dispatch="einsum",
                                   activation="prelu"),
                        weights=dict(importance_weight=0.5, load_weight=0.5)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_matches_finite_differences(name):
  case = CASES[name]
  seed = 30
  layer = build_layer(seed, **case["layer"], **case["weights"])
  x = random_input(seed)
  readout = np.random.RandomState(seed).randn(*x.shape)
  cfg = {key: value for key, value in case["layer"].items() if key not in ("dispatch", "block_size")}

  grads = layer_grad_jit(layer, jnp.asarray(x), jnp.asarray(readout, jnp.float32))
  params = layer_params(layer)
  _, info = moe_reference(x, params, num_experts=E, **cfg)
  if name == "gather_capacity":
    assert not all(info["kept"]), "the case must drop some choices"
  if name == "dropless":
    # More than the mean load A/E on some expert, so rows go beyond the balanced part into several blocks.
    assert info["counts"].max() > info["counts"].mean() + 2, info["counts"]
  checks = [("router.kernel", grads.router.kernel[...], np.arange(params["router.kernel"].size)),
            # 40 of the 512 w_in entries, spread over all experts.
            ("experts.w_in", grads.experts.w_in[...],
             np.random.RandomState(seed).choice(params["experts.w_in"].size, 40, replace=False))]
  if "noise_kernel" in dir(layer.router):
    checks.append(("router.noise_kernel", grads.router.noise_kernel[...],
                   np.arange(params["router.noise_kernel"].size)))
  for param_name, grad, coords in checks:
    expected = finite_difference(params, param_name, coords, x, readout, cfg, case["weights"])
    actual = np.asarray(grad, np.float64).ravel()[coords]
    scale = np.abs(expected).max()
    assert scale > 1e-3, f"{param_name}: the finite-difference gradient vanishes; the check would be empty"
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale, err_msg=param_name)

  # Float32 directional difference of the layer itself along a random direction in (router.kernel, w_in).
  rng = np.random.RandomState(seed + 1)
  direction = {"kernel": rng.randn(*params["router.kernel"].shape), "w_in": rng.randn(*params["experts.w_in"].shape)}
  norm = np.sqrt(sum(np.sum(v ** 2) for v in direction.values()))
  direction = {key: value / norm for key, value in direction.items()}   # unit step, so eps32 is the step length
  directional = (np.sum(np.asarray(grads.router.kernel[...], np.float64) * direction["kernel"])
                 + np.sum(np.asarray(grads.experts.w_in[...], np.float64) * direction["w_in"]))
  eps32 = 1e-2
  losses = []
  for sign in (1, -1):
    shifted = build_layer(seed, **case["layer"], **case["weights"])
    shifted.router.kernel[...] = jnp.asarray(params["router.kernel"] + sign * eps32 * direction["kernel"],
                                             jnp.float32)
    shifted.experts.w_in[...] = jnp.asarray(params["experts.w_in"] + sign * eps32 * direction["w_in"], jnp.float32)
    moved = dict(params, **{"router.kernel": params["router.kernel"] + sign * eps32 * direction["kernel"],
                            "experts.w_in": params["experts.w_in"] + sign * eps32 * direction["w_in"]})
    assert reference_loss(moved, x, readout, cfg, case["weights"])[1] == reference_loss(
        params, x, readout, cfg, case["weights"])[1], "routing flipped along the direction; pick another seed"
    losses.append(float(layer_loss_jit(shifted, jnp.asarray(x), jnp.asarray(readout, jnp.float32))))
  # The float32 loss (size ~10) rounds at ~1e-6; over 2*eps32 that is ~1e-4; truncation is O(eps32^2) ~ 1e-4.
  np.testing.assert_allclose((losses[0] - losses[1]) / (2 * eps32), directional, rtol=2e-3, atol=1e-3)


def test_top1_gate_carries_gradient_to_router():
  # k=1, normalize_gates=False: y = p_top(x) * expert(x), so d y / d kernel != 0. (With normalize_gates=True the
  # gate would be exactly 1 and the router would learn nothing from the task loss.)
  x = jnp.asarray(random_input(31))
  readout = jnp.asarray(np.random.RandomState(31).randn(*x.shape), jnp.float32)
  layer = build_layer(31, router="top_k", k=1, capacity_factor=1.25)
  grads = layer_grad_jit(layer, x, readout)
  assert float(jnp.linalg.norm(grads.router.kernel[...])) > 1e-2
  normalized = build_layer(31, router="top_k", k=1, capacity_factor=1.25, normalize_gates=True)
  grads = layer_grad_jit(normalized, x, readout)
  np.testing.assert_allclose(np.asarray(grads.router.kernel[...]), 0.0, atol=1e-6)
