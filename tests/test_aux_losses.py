"""Auxiliary losses on tiny hand-made gate matrices (expected values derived in the comments), the layer's
aux.metrics / aux.losses against the NumPy loop, and HierarchicalMoeLayer against a NumPy double sum."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layer_setup import D, E, H, build_layer, forward, random_input
from moe_reference import (expert, layer_params, moe_reference, normal_cdf, population_cv, reference_metrics,
                           softmax, softplus, top_indices)
from vimoe import moe


Phi = normal_cdf   # Shazeer's notation: the standard normal CDF, 0.5 * (1 + erf(z / sqrt 2))


# -- pure losses, by hand --------------------------------------------------------------------------------------

def test_coefficient_of_variation_uses_population_std():
  # [1, 2, 3]: mean 2, population variance ((1-2)^2 + 0 + (3-2)^2) / 3 = 2/3, CV = sqrt(2/3) / 2 = 0.408248.
  # (The sample std, ddof=1, would give CV = 1/2.)
  cv = moe.losses.coefficient_of_variation(jnp.asarray([1.0, 2.0, 3.0]))
  np.testing.assert_allclose(float(cv), math.sqrt(2 / 3) / 2, rtol=1e-6)
  # Equal values: CV 0.
  assert float(moe.losses.coefficient_of_variation(jnp.asarray([0.7, 0.7, 0.7, 0.7]))) == pytest.approx(0, abs=1e-7)


def test_importance_loss_by_hand():
  # 4 tokens x 3 experts, gates zero where an expert was not chosen.
  # Importance = column sums = [0.6+0.9+0+0.2, 0.4+0+0.7+0, 0+0.1+0.3+0.8] = [17/10, 11/10, 12/10], mean 4/3.
  # Deviations from the mean: [11/30, -7/30, -4/30]; population variance (121 + 49 + 16) / 900 / 3 = 31/450.
  # CV^2 = variance / mean^2 = (31/450) / (16/9) = 31/800 = 0.03875.
  dense_gates = jnp.asarray([[0.6, 0.4, 0.0],
                             [0.9, 0.0, 0.1],
                             [0.0, 0.7, 0.3],
                             [0.2, 0.0, 0.8]])
  np.testing.assert_allclose(float(moe.losses.importance_loss(dense_gates)), 31 / 800, rtol=1e-5)


def test_importance_loss_of_one_hot_routing():
  # Tokens on experts 0, 0, 1, 2 with gate 1: Importance = [2, 1, 1], mean 4/3, variance (4/9 + 1/9 + 1/9)/3
  # = 2/9, CV^2 = (2/9) / (16/9) = 1/8.
  dense_gates = jnp.asarray(np.eye(3)[[0, 0, 1, 2]])
  np.testing.assert_allclose(float(moe.losses.importance_loss(dense_gates)), 1 / 8, rtol=1e-6)


def test_switch_balance_loss_by_hand():
  # Router probabilities of 4 tokens over 3 experts; first choices (arg-max) 0, 1, 0, 2.
  # f = fraction of first choices = [2/4, 1/4, 1/4]
  # P = mean probability = [(0.7+0.1+0.5+0.2)/4, (0.2+0.6+0.3+0.2)/4, (0.1+0.3+0.2+0.6)/4] = [0.375, 0.325, 0.3]
  # loss = E * sum f*P = 3 * (0.5*0.375 + 0.25*0.325 + 0.25*0.3) = 3 * 0.34375 = 1.03125
  probs = jnp.asarray([[0.7, 0.2, 0.1],
                       [0.1, 0.6, 0.3],
                       [0.5, 0.3, 0.2],
                       [0.2, 0.2, 0.6]])
  top1 = jnp.asarray([0, 1, 0, 2])
  np.testing.assert_allclose(float(moe.losses.switch_balance_loss(probs, top1)), 1.03125, rtol=1e-6)
  # Uniform routing: f = P = 1/E, loss = E * E * (1/E)^2 = 1.
  uniform = jnp.full((4, 4), 0.25)
  np.testing.assert_allclose(float(moe.losses.switch_balance_loss(uniform, jnp.asarray([0, 1, 2, 3]))), 1.0,
                             rtol=1e-6)


def test_router_z_loss_by_hand():
  # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4 = 2 ln 2.
  # z-loss = mean((ln 2)^2, (2 ln 2)^2) = 2.5 (ln 2)^2 = 1.2011325.
  logits = jnp.asarray([[0.0, 0.0], [math.log(3.0), 0.0]])
  np.testing.assert_allclose(float(moe.losses.router_z_loss(logits)), 2.5 * math.log(2) ** 2, rtol=1e-6)


def test_shazeer_load_probability_and_loss_k1():
  # E=3, k=1. P(x,i) = Phi((clean_i - kth_excluding(H, 1, i)) / std_i) (Shazeer 2017 eq. 9); for k=1
  # kth_excluding(H, 1, i) is the largest entry of H other than H_i.
  # Token A: H = [2, 1, 0]; excluding 0 the max is 1, excluding 1 or 2 it is 2.
  #   P(A,0) = Phi((1.5 - 1) / 1) = Phi(0.5) = 0.691462
  #   P(A,1) = Phi((1.0 - 2) / 0.5) = Phi(-2) = 0.022750
  #   P(A,2) = Phi((0.5 - 2) / 2) = Phi(-0.75) = 0.226627
  # Token B: H = [0, 3, 1]; excluding 1 the max is 1, excluding 0 or 2 it is 3.
  #   P(B,0) = Phi((0 - 3) / 1) = Phi(-3) = 0.001350
  #   P(B,1) = Phi((2 - 1) / 1) = Phi(1) = 0.841345
  #   P(B,2) = Phi((1.5 - 3) / 0.5) = Phi(-3) = 0.001350
  # Load = [0.692812, 0.864095, 0.227977] (eq. 10); load loss = CV(Load)^2 = 0.204047 (eq. 11).
  clean = jnp.asarray([[1.5, 1.0, 0.5], [0.0, 2.0, 1.5]])
  noisy = jnp.asarray([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
  std = jnp.asarray([[1.0, 0.5, 2.0], [1.0, 1.0, 0.5]])
  expected = np.array([[Phi(0.5), Phi(-2.0), Phi(-0.75)],
                       [Phi(-3.0), Phi(1.0), Phi(-3.0)]])
  p = moe.routing.shazeer_load_probability(clean, std, noisy, 1)
  np.testing.assert_allclose(np.asarray(p), expected, rtol=1e-5, atol=1e-7)
  load = expected.sum(0)
  cv2 = (load.std() / load.mean()) ** 2
  np.testing.assert_allclose(cv2, 0.204047, rtol=1e-5)   # the derivation above, to 6 digits
  np.testing.assert_allclose(float(moe.losses.load_loss(p)), cv2, rtol=1e-5)


def test_shazeer_load_probability_k2():
  # E=4, k=2, H = [3, 1, 2, 0]: the top 2 are experts 0 and 2.
  # For i in the top 2, kth_excluding is the 3rd largest of H (= 1); otherwise the 2nd largest (= 2).
  #   P0 = Phi((2.5 - 1) / 1) = Phi(1.5),  P1 = Phi((1.5 - 2) / 0.5) = Phi(-1),
  #   P2 = Phi((2.0 - 1) / 2) = Phi(0.5),  P3 = Phi((-0.5 - 2) / 1) = Phi(-2.5)
  clean = jnp.asarray([[2.5, 1.5, 2.0, -0.5]])
  noisy = jnp.asarray([[3.0, 1.0, 2.0, 0.0]])
  std = jnp.asarray([[1.0, 0.5, 2.0, 1.0]])
  p = moe.routing.shazeer_load_probability(clean, std, noisy, 2)
  np.testing.assert_allclose(np.asarray(p)[0], [Phi(1.5), Phi(-1.0), Phi(0.5), Phi(-2.5)], rtol=1e-5, atol=1e-7)
  # k = E: every expert is always kept, P = 1.
  np.testing.assert_allclose(np.asarray(moe.routing.shazeer_load_probability(clean, std, noisy, 4)), 1.0)


# -- the layer's metrics and weighted losses ---------------------------------------------------------------------

@pytest.mark.parametrize("router,k", [("top_k", 2), ("noisy_top_k", 2), ("noisy_top_k", 1), ("prototype", 1)])
def test_layer_metrics_against_loop(router, k):
  weights = dict(importance_weight=0.1, balance_weight=0.01, z_loss_weight=0.001)
  if router == "noisy_top_k":
    weights["load_weight"] = 0.2
  layer = build_layer(20, router=router, k=k, capacity_factor=0.5, **weights)
  x = random_input(20)
  _, aux = forward(layer, x)
  _, info = moe_reference(x, layer_params(layer), num_experts=E, k=k, router=router, capacity_factor=0.5)
  expected = reference_metrics(info, layer_params(layer), num_experts=E, k=k, router=router)
  assert expected["dropped_fraction"] > 0
  for name, value in expected.items():
    np.testing.assert_allclose(np.asarray(aux.metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
  # CV metrics: importance_cv^2 is the importance loss; load_cv and max/mean of the pre-capacity counts.
  np.testing.assert_allclose(float(aux.metrics["importance_cv"]) ** 2, expected["importance_loss"], rtol=1e-5)
  np.testing.assert_allclose(float(aux.metrics["load_cv"]), population_cv(info["counts"]), rtol=1e-5)
  np.testing.assert_allclose(float(aux.metrics["max_mean_load"]), info["counts"].max() / info["counts"].mean(),
                             rtol=1e-6)
  # aux.losses = weight * unweighted metric, one entry per non-zero weight.
  names = {"importance": "importance_loss", "balance": "balance_loss", "z_loss": "router_z_loss",
           "load": "load_loss"}
  assert set(aux.losses) == {name for name in names if weights.get(f"{name}_weight", 0) > 0}
  for name, loss in aux.losses.items():
    np.testing.assert_allclose(float(loss), weights[f"{name}_weight"] * expected[names[name]], rtol=1e-5,
                               atol=1e-8, err_msg=name)


def test_zero_weights_give_no_losses():
  layer = build_layer(21, router="top_k", k=1)
  _, aux = forward(layer, random_input(21))
  assert aux.losses == {}


def test_experts_choose_metrics():
  # cf 0.5, K=1, S=8, E=4 -> C = 1: each expert picks its single most probable token, so 4 picks cover at most
  # 4 of 8 tokens: dropped_fraction = (tokens picked by nobody) / 8 >= 1/2. Each expert takes exactly C tokens,
  # so the load is uniform.
  layer = build_layer(22, router="experts_choose", k=1, capacity_factor=0.5)
  x = random_input(22)
  _, aux = forward(layer, x)
  _, info = moe_reference(x, layer_params(layer), num_experts=E, k=1, router="experts_choose", capacity_factor=0.5)
  expected = reference_metrics(info, layer_params(layer), num_experts=E, k=1, router="experts_choose")
  assert expected["dropped_fraction"] >= 0.5
  np.testing.assert_allclose(float(aux.metrics["dropped_fraction"]), expected["dropped_fraction"], atol=1e-7)
  np.testing.assert_allclose(np.asarray(aux.metrics["expert_load"]), [0.25] * 4, atol=1e-7)
  np.testing.assert_allclose(float(aux.metrics["router_z_loss"]),
                             np.mean([np.log(np.exp(row).sum()) ** 2 for row in info["logits"]]), rtol=1e-5)


# -- hierarchical MoE --------------------------------------------------------------------------------------------

def hierarchical_reference(x, params, num_groups, experts_per_group, kp, ks, activation):
  """y = sum_i sum_j Gp(x)_i G_i(x)_j E_ij(x) (Shazeer 2017 appendix B), deterministic gates, no drops.
  Also Importance_H_ij = sum_x Gp_i G_ij and Load_H_ij = Load_p(X)_i Load_i(X^(i))_j / |X^(i)|."""
  x = np.asarray(x, np.float64)
  B, T, _ = x.shape
  A, Bx = num_groups, experts_per_group
  y = np.zeros_like(x)
  importance = np.zeros((A, Bx))
  primary_load = np.zeros(A)
  secondary_load = np.zeros((A, Bx))
  group_members = np.zeros(A)

  def load_probability(clean, std, k):
    if k == len(clean):
      return np.ones(len(clean))
    return np.array([normal_cdf((clean[i] - np.sort(np.delete(clean, i))[::-1][k - 1]) / std[i])
                     for i in range(len(clean))])

  for b in range(B):
    for t in range(T):
      token = x[b, t]
      primary = token @ params["router.kernel"]
      chosen = top_indices(primary, kp)
      primary_gates = softmax(primary[chosen])
      primary_load += load_probability(primary, softplus(token @ params["router.noise_kernel"]), kp)
      for i, gate_i in zip(chosen, primary_gates):
        secondary = token @ params["secondary_kernel"][:, i, :]
        picked = top_indices(secondary, ks)
        group_members[i] += 1
        secondary_load[i] += load_probability(
            secondary, softplus(token @ params["secondary_noise_kernel"][:, i, :]), ks)
        for j, gate_j in zip(picked, softmax(secondary[picked])):
          y[b, t] += gate_i * gate_j * expert(params, "experts", i * Bx + j, token, activation)
          importance[i, j] += gate_i * gate_j
  load = primary_load[:, None] * secondary_load / np.maximum(group_members, 1)[:, None]
  return y, importance.ravel(), load.ravel()


@pytest.mark.parametrize("dispatch,kp,ks", [("gather", 2, 2), ("einsum", 1, 2)])
def test_hierarchical_moe_against_double_sum(dispatch, kp, ks):
  A, Bx = 3, 2   # 3 groups of 2 experts
  layer = moe.HierarchicalMoeLayer(D, H, A, Bx, k_primary=kp, k_secondary=ks, dispatch=dispatch,
                                   capacity_factor=None, importance_weight=0.1, load_weight=0.1,
                                   rngs=nnx.Rngs(0))
  rng = np.random.RandomState(23)
  for param in (layer.router.kernel, layer.router.noise_kernel, layer.secondary_kernel,
                layer.secondary_noise_kernel):
    param[...] = jnp.asarray(rng.randn(*param[...].shape), jnp.float32)
  for name in ("w_in", "b_in", "w_out", "b_out"):
    param = getattr(layer.experts, name)
    param[...] = jnp.asarray(0.3 * rng.randn(*param[...].shape), jnp.float32)
  params = {"router.kernel": layer.router.kernel[...], "router.noise_kernel": layer.router.noise_kernel[...],
            "secondary_kernel": layer.secondary_kernel[...],
            "secondary_noise_kernel": layer.secondary_noise_kernel[...],
            **{f"experts.{n}": getattr(layer.experts, n)[...] for n in ("w_in", "b_in", "w_out", "b_out")}}
  params = {name: np.asarray(value, np.float64) for name, value in params.items()}
  x = random_input(23)
  y, aux = nnx.jit(lambda m, x: m(x, deterministic=True))(layer, jnp.asarray(x))
  y_ref, importance, load = hierarchical_reference(x, params, A, Bx, kp, ks, "relu")
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(float(aux.metrics["importance_loss"]), population_cv(importance) ** 2, rtol=1e-4)
  np.testing.assert_allclose(float(aux.metrics["load_loss"]), population_cv(load) ** 2, rtol=1e-4)
  np.testing.assert_allclose(float(aux.losses["importance"]), 0.1 * population_cv(importance) ** 2, rtol=1e-4)
  assert float(aux.metrics["dropped_fraction"]) == 0.0
