"""MoeLayer outputs against the float64 NumPy loop of moe_reference.py, for every router and dispatch.

Each case runs with no drops (capacity_factor=None) and with drops at a small capacity (the loop implements the
priority rule itself), and einsum must equal gather. Every parameter is random (layer_setup.randomize) so gates,
biases and the activation all matter.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layer_setup import B, D, E, T, build_layer, forward, random_input
from moe_reference import capacity_of, layer_params, moe_reference, reference_metrics
from vimoe import moe

ATOL = RTOL = 2e-5   # float32 layer vs float64 loop on O(1) values with D=8, H=16


def run_layer(layer, x, **call_kwargs):
  y, aux = forward(layer, x, **call_kwargs)
  return np.asarray(y, np.float64), aux


def check_against_reference(layer_kwargs, seed, *, x=None, call_kwargs=None, expect_drops=None,
                            dispatches=("einsum", "gather")):
  """Builds the layer once per dispatch with the same parameters, compares each output with the loop and the
  two dispatches with each other; checks dropped_fraction, capacity and expert_load. Returns the loop's info."""
  call_kwargs = call_kwargs or {}
  x = random_input(seed) if x is None else x
  outputs = {}
  for dispatch in dispatches:
    layer = build_layer(seed, dispatch=dispatch, **layer_kwargs)
    y, aux = run_layer(layer, x, **call_kwargs)
    ref_kwargs = {key: layer_kwargs[key] for key in ("router", "capacity_factor", "group_size", "route_per",
                                                     "normalize_gates", "activation", "batch_priority")
                  if key in layer_kwargs}
    y_ref, info = moe_reference(x, layer_params(layer), num_experts=layer.num_experts, k=layer.k,
                                router_input=call_kwargs.get("router_input"),
                                token_ids=call_kwargs.get("token_ids"), **ref_kwargs)
    np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=RTOL, err_msg=f"dispatch={dispatch}")
    if layer_kwargs.get("router") != "soft":
      metrics = reference_metrics(info, layer_params(layer), num_experts=layer.num_experts, k=layer.k,
                                  router=layer_kwargs.get("router", "top_k"))
      np.testing.assert_allclose(float(aux.metrics["dropped_fraction"]), metrics["dropped_fraction"], atol=1e-6)
      np.testing.assert_allclose(np.asarray(aux.metrics["expert_load"]), metrics["expert_load"], atol=1e-6)
      # Reported capacity: C; without a capacity factor the einsum path uses C = S slots and gather is dropless
      # (reported as -1).
      if info["capacity"] is not None:
        expected_capacity = info["capacity"]
      else:
        expected_capacity = info["units_per_group"] if dispatch == "einsum" else -1
      assert int(aux.metrics["capacity"]) == expected_capacity
      if expect_drops is not None:
        # The case must actually exercise (or avoid) dropping, or the comparison proves less than it claims.
        assert (metrics["dropped_fraction"] > 0) == expect_drops, metrics["dropped_fraction"]
    outputs[dispatch] = y
  if len(outputs) == 2:
    np.testing.assert_allclose(outputs["einsum"], outputs["gather"], atol=1e-5, rtol=1e-5)
  return info


# Every token-choice router and experts_choose, with an activation each so all four are covered.
ROUTER_CASES = {
    "top_k_k2_gelu": dict(router="top_k", k=2, activation="gelu"),
    "top_k_k1_relu": dict(router="top_k", k=1, activation="relu"),
    "noisy_top_k_k2_swiglu": dict(router="noisy_top_k", k=2, activation="swiglu"),
    "prototype_k1_prelu": dict(router="prototype", k=1, activation="prelu"),
}


@pytest.mark.parametrize("name", sorted(ROUTER_CASES))
def test_token_choice_router_without_drops(name):
  check_against_reference(dict(ROUTER_CASES[name], capacity_factor=None), seed=1, expect_drops=False)


@pytest.mark.parametrize("name", sorted(ROUTER_CASES))
def test_token_choice_router_with_drops(name):
  # S=8 tokens per group, E=4: C = ceil(K * 8 * 0.5 / 4) = K, so a popular expert overflows.
  info = check_against_reference(dict(ROUTER_CASES[name], capacity_factor=0.5), seed=2, expect_drops=True)
  assert info["capacity"] == ROUTER_CASES[name]["k"]


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_hash_router(capacity_factor):
  token_ids = np.random.RandomState(3).randint(0, 1000, size=(B, T))
  check_against_reference(dict(router="hash", k=1, activation="relu", capacity_factor=capacity_factor),
                          seed=3, call_kwargs={"token_ids": jnp.asarray(token_ids)},
                          expect_drops=capacity_factor is not None)
  # Hand-checked hash values: id 1 -> 2654435761 mod 2^32 = 2654435761, mod 4 = 1; id 2 -> 5308871522 - 2^32 =
  # 1013904226, mod 4 = 2; id 3 -> 7963307283 - 2^32 = 3668339987, mod 4 = 3; id 4 -> 10617743044 - 2*2^32 =
  # 2027808452, mod 4 = 0. Ids 1..4 land on experts 1, 2, 3, 0: one token each.
  np.testing.assert_array_equal(np.asarray(moe.routing.hash_expert_index(jnp.asarray([[1, 2, 3, 4]]), 4))[0, :, 0],
                                [1, 2, 3, 0])
  layer = build_layer(3, router="hash", k=1, capacity_factor=None, activation="relu")
  _, aux = forward(layer, random_input(3, (1, 4, D)), token_ids=jnp.asarray([[1, 2, 3, 4]]))
  np.testing.assert_allclose(np.asarray(aux.metrics["expert_load"]), [0.25] * 4)


@pytest.mark.parametrize("capacity_factor,expect_drops", [(2.0, False), (0.5, True)])
def test_experts_choose(capacity_factor, expect_drops):
  # C = ceil(K * S * cf / E) with K=1, S=8, E=4: cf 2.0 -> C = 4 (16 picks for 8 tokens; with this seed every
  # token is picked by some expert, which expect_drops=False asserts), cf 0.5 -> C = 1 (4 picks for 8 tokens, so
  # at least 4 tokens are picked by no expert).
  check_against_reference(dict(router="experts_choose", k=1, capacity_factor=capacity_factor), seed=4,
                          expect_drops=expect_drops)


@pytest.mark.parametrize("slots_per_expert,activation", [(1, "gelu"), (2, "swiglu")])
def test_soft_router(slots_per_expert, activation):
  check_against_reference(dict(router="soft", k=1, slots_per_expert=slots_per_expert, activation=activation),
                          seed=5, dispatches=("einsum",))


def test_group_spanning_sequences():
  # B=4 sequences of T=4 tokens, groups of 8 tokens: each group holds two sequences; C = ceil(2*8*0.5/4) = 2.
  info = check_against_reference(dict(router="top_k", k=2, group_size=8, capacity_factor=0.5), seed=6,
                                 x=random_input(6, (4, 4, D)), expect_drops=True)
  assert info["capacity"] == 2


def test_group_of_the_whole_batch_without_drops():
  # group_size = B*T = 16: one group over both sequences; the erf GELU of torch nn.GELU.
  check_against_reference(dict(router="top_k", k=1, group_size=16, capacity_factor=None, activation="gelu_exact"),
                          seed=7, expect_drops=False)


def test_normalize_gates():
  # k=2 gates renormalised to sum to 1, at C = ceil(2*8*0.5/4) = 2 so some are dropped after renormalising.
  check_against_reference(dict(router="top_k", k=2, normalize_gates=True, capacity_factor=0.5), seed=8,
                          expect_drops=True)


@pytest.mark.parametrize("k", [1, 2])
def test_batch_priority(k):
  cfg = dict(router="top_k", k=k, capacity_factor=0.5, batch_priority=True)
  info = check_against_reference(cfg, seed=9, expect_drops=True)
  # The case must separate batch priority from positional priority, or it would not test the ordering.
  x = random_input(9)
  layer = build_layer(9, **cfg)
  _, positional = moe_reference(x, layer_params(layer), num_experts=E, k=k, capacity_factor=0.5)
  assert info["kept"] != positional["kept"]


@pytest.mark.parametrize("router,normalize_gates", [("top_k", True), ("noisy_top_k", False)])
def test_batch_priority_orders_by_the_top1_probability(router, normalize_gates):
  """Issue 12, defect 3: at k=1 a renormalised gate (and Shazeer's softmax over the kept logit) is 1.0 for every
  token; the priority must still be the top-1 router probability (V-MoE). Three tokens with top-1 probabilities
  .6/.9/.7 for expert 0 and capacity 1: the .9 token (the second) is kept, not the first."""
  p0 = np.array([0.6, 0.9, 0.7])
  probs = np.stack([p0, (1 - p0) / 2, (1 - p0) / 2], axis=-1)          # [3 tokens, 3 experts]
  x = jnp.asarray(np.log(probs)[None], jnp.float32)                     # [1, 3, D=3]: logits = x @ I = log probs
  layer = moe.MoeLayer(3, 4, 3, 1, router=router, normalize_gates=normalize_gates, batch_priority=True,
                       capacity_factor=1.0, dispatch="gather", rngs=nnx.Rngs(0))     # C = ceil(3 * 1 / 3) = 1
  layer.router.kernel[...] = jnp.eye(3, dtype=jnp.float32)
  y, aux = layer(x, deterministic=True)
  expert0 = np.asarray(layer.experts(jnp.broadcast_to(x[0], (3, 3, 3)))[0])   # expert 0 applied to every token
  np.testing.assert_allclose(np.asarray(y[0, 1]), expert0[1], atol=1e-6)     # gate 1.0
  np.testing.assert_allclose(np.asarray(y[0, [0, 2]]), 0.0, atol=1e-6)       # dropped: no shared expert, zero
  np.testing.assert_allclose(float(aux.metrics["dropped_fraction"]), 2 / 3, atol=1e-6)


@pytest.mark.parametrize("router", ["top_k", "prototype"])
def test_batch_priority_with_normalized_gates_against_the_loop(router):
  # k=1, renormalised gates (all 1.0), capacity C = ceil(1*8*0.5/4) = 1: the loop orders by top-1 probability.
  cfg = dict(router=router, k=1, capacity_factor=0.5, batch_priority=True, normalize_gates=True)
  info = check_against_reference(cfg, seed=12, expect_drops=True)
  x = random_input(12)
  _, positional = moe_reference(x, layer_params(build_layer(12, **cfg)), num_experts=E, k=1, router=router,
                                capacity_factor=0.5, normalize_gates=True)
  assert info["kept"] != positional["kept"]


@pytest.mark.parametrize("capacity_factor,use_router_input,expect_drops", [(None, False, False), (0.5, True, True)])
def test_route_per_item(capacity_factor, use_router_input, expect_drops):
  # 4 items of 4 tokens, all items in one group (S=4 items); k=2, cf 0.5 -> C = ceil(2*4*0.5/4) = 1.
  # Routed on the item's mean token, or on a given router_input [B, D].
  x = random_input(10, (4, 4, D))
  call = {"router_input": jnp.asarray(np.random.RandomState(10).randn(4, D), jnp.float32)} if use_router_input \
      else {}
  check_against_reference(dict(router="top_k", k=2, route_per="item", capacity_factor=capacity_factor), seed=10,
                          x=x, call_kwargs=call, expect_drops=expect_drops)


def test_route_per_item_in_groups_of_items():
  # group_size=8 tokens = 2 items per group, 2 groups; k=1, cf 0.5 -> C = ceil(1*2*0.5/4) = 1.
  x = random_input(11, (4, 4, D))
  check_against_reference(dict(router="noisy_top_k", k=1, route_per="item", group_size=8, capacity_factor=0.5,
                               activation="prelu"), seed=11, x=x)


@pytest.mark.parametrize("block_size", [None, 4])
def test_dropless_gather_with_heavy_imbalance(block_size):
  # A shared offset along dimension 0 plus a large router weight on (0, expert 0) sends most tokens to expert 0:
  # it gets far more than its A/E share of the assignments, so the dropless path must run its extra rows in
  # several blocks (block_size=4: at least 4), while other experts get few or none.
  x = random_input(12, (4, 8, D))
  x[..., 0] = np.abs(x[..., 0]) + 2.0
  layer_kwargs = dict(router="top_k", k=2, capacity_factor=None, block_size=block_size)
  for dispatch in ("gather", "einsum"):
    layer = build_layer(12, dispatch=dispatch, **layer_kwargs)
    kernel = np.array(layer.router.kernel[...])
    kernel[0, 0] = 6.0
    layer.router.kernel[...] = jnp.asarray(kernel)
    y, aux = run_layer(layer, x)
    y_ref, info = moe_reference(x, layer_params(layer), num_experts=E, k=2)
    assert info["counts"][0] >= 28, info["counts"]     # at least 28 of the 32 tokens have expert 0 in their top 2
    np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=RTOL)
    assert float(aux.metrics["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(np.asarray(aux.metrics["expert_load"]), info["counts"] / 64, atol=1e-6)


def test_capacity_formula():
  # ceil(K*S*cf/E) clipped to [1, S]: (S=8,E=4,K=2,cf=1.25) -> ceil(5) = 5; (S=8,E=4,K=1,cf=0.1) -> ceil(0.2) = 1;
  # (S=8,E=2,K=2,cf=4) -> ceil(32) = 32 clipped to 8; (S=10,E=4,K=1,cf=1.0) -> ceil(2.5) = 3; cf None -> S.
  assert moe.expert_capacity(8, 4, 2, 1.25) == 5
  assert moe.expert_capacity(8, 4, 1, 0.1) == 1
  assert moe.expert_capacity(8, 2, 2, 4.0) == 8
  assert moe.expert_capacity(10, 4, 1, 1.0) == 3
  assert moe.expert_capacity(10, 4, 1, None) == 10
  for args in [(8, 4, 2, 1.25), (8, 4, 1, 0.1), (8, 2, 2, 4.0), (10, 4, 1, 1.0), (16, 4, 3, 0.3)]:
    assert moe.expert_capacity(*args) == capacity_of(*args)
