"""Properties of routing and dispatch on random inputs (hypothesis).

Shapes stay in a small fixed set so each example reuses compiled ops; the varying parts are the values, k, the
capacity factor and the priority mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from layer_setup import E, build_layer, forward, random_input
from vimoe import moe

G, S = 2, 8
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
CAPACITY_FACTORS = [None, 0.1, 0.25, 0.5, 1.0, 1.25, 2.0]

logits_strategy = hnp.arrays(np.float32, (G, S, E), elements=st.floats(-4, 4, width=32))


def greedy_kept(expert_index, priority, capacity):
  """The priority rule as a loop: choice rank first, then token order (or descending priority, stable)."""
  groups, tokens, k = expert_index.shape
  kept = np.zeros(expert_index.shape, bool)
  for g in range(groups):
    order = range(tokens) if priority is None else sorted(range(tokens), key=lambda s: -priority[g, s])
    filled = np.zeros(E, int)
    for rank in range(k):
      for s in order:
        e = expert_index[g, s, rank]
        if capacity is None or filled[e] < capacity:
          filled[e] += 1
          kept[g, s, rank] = True
  return kept


@PROPERTY_SETTINGS
@given(logits=logits_strategy, k=st.integers(1, 3), capacity_factor=st.sampled_from(CAPACITY_FACTORS),
       batch_priority=st.booleans(), normalize=st.booleans())
def test_assign_slots_respects_capacity_and_k(logits, k, capacity_factor, batch_priority, normalize):
  expert_index, gates, probs = moe.routing.top_k_gating(jnp.asarray(logits), k, normalize)
  capacity = None if capacity_factor is None else moe.expert_capacity(S, E, k, capacity_factor)
  priority = gates[..., 0] if batch_priority else None
  assignment = moe.routing.assign_slots(expert_index, gates, E, capacity, priority)
  index = np.asarray(assignment.expert_index)
  kept = np.asarray(assignment.kept)
  slot = np.asarray(assignment.slot)
  weight = np.asarray(assignment.weight)
  gates = np.asarray(gates)

  assert index.shape == (G, S, k) and kept.shape == (G, S, k)
  for g in range(G):
    for e in range(E):
      mine = kept[g] & (index[g] == e)
      # No expert receives more than C tokens per group, and the kept ones occupy distinct slots 0..n-1.
      if capacity is not None:
        assert mine.sum() <= capacity
      assert sorted(slot[g][mine].tolist()) == list(range(mine.sum()))
    for s in range(S):
      # A token goes to at most k distinct experts.
      assert len(set(index[g, s].tolist())) == k
      assert kept[g, s].sum() <= k
  # Combine weights: non-negative, the gate where kept, zero where dropped.
  assert (weight >= 0).all()
  np.testing.assert_array_equal(weight, np.where(kept, gates, 0.0))
  if capacity_factor is None:
    assert kept.all()
  # Which choices survive is exactly the greedy priority rule.
  np.testing.assert_array_equal(kept, greedy_kept(index, None if priority is None else np.asarray(priority),
                                                  capacity))


@PROPERTY_SETTINGS
@given(logits=logits_strategy, capacity_factor=st.sampled_from([0.25, 0.5, 1.0, 2.0]))
def test_experts_choose_takes_exactly_capacity_tokens(logits, capacity_factor):
  probs = np.asarray(jnp.exp(logits) / jnp.sum(jnp.exp(logits), -1, keepdims=True))
  capacity = moe.expert_capacity(S, E, 1, capacity_factor)
  assignment = moe.routing.experts_choose_assignment(jnp.asarray(probs), capacity)
  kept = np.asarray(assignment.kept)                       # [G,S,E]
  weight = np.asarray(assignment.weight)
  for g in range(G):
    for e in range(E):
      assert kept[g, :, e].sum() == capacity
      # The picked tokens are C of the most probable for that expert: none left out has a higher probability.
      if capacity < S:
        assert probs[g, kept[g, :, e], e].min() >= probs[g, ~kept[g, :, e], e].max()
  assert (weight >= 0).all()
  np.testing.assert_allclose(weight, np.where(kept, probs, 0.0), rtol=1e-6)


def _linear_expert(p, rows):
  return rows @ p["w"] + p["c"]


@functools.partial(jax.jit, static_argnums=4)
def _dropless(x, expert_index, gates, params, block_size):
  return moe.dispatch.dropless_moe(x, expert_index, gates, E, params, _linear_expert, block_size)


@PROPERTY_SETTINGS
@given(data=st.data(), block_size=st.sampled_from([1, 4, 16]), skew=st.sampled_from([0.0, 0.9]))
def test_dropless_moe_matches_loop(data, block_size, skew):
  # N=12 tokens, K=2, E=4 linear "experts" x @ W_e + c_e; expert 0 gets most choices when skew is 0.9.
  N, K, M = 12, 2, 3
  seed = data.draw(st.integers(0, 2 ** 16))
  rng = np.random.RandomState(seed)
  expert_index = np.array([rng.choice(E, K, replace=False, p=np.array([skew] + [(1 - skew) / 3] * 3)
                                      if skew else None) for _ in range(N)])
  gates = rng.rand(N, K).astype(np.float32)
  x = rng.randn(N, M).astype(np.float32)
  params = {"w": rng.randn(E, M, M).astype(np.float32), "c": rng.randn(E, M).astype(np.float32)}
  out = _dropless(jnp.asarray(x), jnp.asarray(expert_index, jnp.int32), jnp.asarray(gates),
                  {k: jnp.asarray(v) for k, v in params.items()}, block_size)
  expected = np.zeros((N, M))
  for n in range(N):
    for j in range(K):
      e = expert_index[n, j]
      expected[n] += gates[n, j] * (x[n] @ params["w"][e] + params["c"][e])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(dispatch=st.sampled_from(["einsum", "gather"]), k=st.integers(1, 2), seed=st.integers(0, 1000),
       skew=st.floats(0.0, 8.0))
def test_layer_without_capacity_drops_nothing(dispatch, k, seed, skew):
  # Any routing, however unbalanced (skew pushes tokens toward expert 0), keeps every choice when
  # capacity_factor=None. (Every router is also checked at capacity_factor=None in test_routing_reference.py.)
  layer = build_layer(seed % 5, router="top_k", k=k, capacity_factor=None, dispatch=dispatch)
  kernel = np.array(layer.router.kernel[...])
  kernel[0, 0] += skew
  layer.router.kernel[...] = jnp.asarray(kernel)
  x = random_input(seed)
  x[..., 0] = np.abs(x[..., 0])
  _, aux = forward(layer, x)
  assert float(aux.metrics["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(float(jnp.sum(aux.metrics["expert_load"])), 1.0, rtol=1e-6)
  # einsum without a capacity factor uses C = S slots; gather goes dropless and reports -1.
  assert int(aux.metrics["capacity"]) == (x.shape[1] if dispatch == "einsum" else -1)
