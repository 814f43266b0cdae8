"""Moving tokens to experts and back (pure functions). Axis letters: see vimoe/moe/routing.py.

Three dispatchers, all taking `expert_fn(x [E, N, M]) -> [E, N, M]` that runs expert e on row block e:

* `einsum_moe`: GShard / V-MoE one-hot dispatch. Builds dispatch and combine tensors [G,S,E,C] and moves tokens
  with two einsums. Costs about S/H of the expert matmuls per einsum (keep groups in the hundreds of tokens), and
  is the form the SPMD partitioner turns into all-to-all when G and E are sharded.
* `gather_moe`: the same computation with slot indices: a gather builds the [E, G, C, M] expert buffers and a
  gather + weighted sum brings results back. Same output as `einsum_moe` for the same assignment and capacity.
* `dropless_moe`: no capacity. Assignments are sorted by expert into blocks of `block_size` rows (each expert's
  segment padded to a whole number of blocks, MegaBlocks-style) and a grouped matmul runs only the blocks that
  hold tokens, so the work stays near K x tokens whatever the imbalance, with static shapes.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from vimoe.moe.routing import Assignment

ExpertFn = Callable[[jax.Array], jax.Array]


def einsum_dispatch_tensors(assignment: Assignment, num_experts: int, capacity: int, dtype=jnp.float32):
  """One-hot dispatch mask and combine weights, both [G,S,E,C]."""
  expert_one_hot = jax.nn.one_hot(assignment.expert_index, num_experts, dtype=dtype)   # [G,S,K,E]
  slot_one_hot = jax.nn.one_hot(jnp.where(assignment.kept, assignment.slot, capacity), capacity,
                                dtype=dtype)                                             # [G,S,K,C]; dropped -> 0
  dispatch = jnp.einsum("GSKE,GSKC->GSEC", expert_one_hot, slot_one_hot)
  combine = jnp.einsum("GSKE,GSKC->GSEC", expert_one_hot * assignment.weight[..., None].astype(dtype),
                       slot_one_hot)
  return dispatch, combine


def _identity(t):
  return t


def einsum_moe(x: jax.Array, dispatch: jax.Array, combine: jax.Array, expert_fn: ExpertFn,
               constrain_groups: Callable[[jax.Array], jax.Array] = _identity,
               constrain_experts: Callable[[jax.Array], jax.Array] = _identity) -> jax.Array:
  """x [G,S,M], dispatch/combine [G,S,E,C] -> [G,S,M].

  The dispatch einsum produces [G,E,C,M] in the tokens' own layout (local on every device); the transpose to
  [E,G,C,M] is the layout change that, under a mesh, `constrain_groups` (G over ('data','expert')) and
  `constrain_experts` (E over 'expert', G over 'data') turn into an all-to-all; the way back mirrors it.
  """
  G, S, E, C = dispatch.shape
  expert_in = constrain_groups(jnp.einsum("GSEC,GSM->GECM", dispatch.astype(x.dtype), x))          # [G,E,C,M]
  expert_in = constrain_experts(expert_in.transpose(1, 0, 2, 3))                                     # [E,G,C,M]
  expert_out = expert_fn(expert_in.reshape(E, G * C, -1)).reshape(E, G, C, -1)
  expert_out = constrain_experts(expert_out)
  expert_out = constrain_groups(expert_out.transpose(1, 0, 2, 3))                                    # [G,E,C,M]
  return jnp.einsum("GSEC,GECM->GSM", combine.astype(x.dtype), expert_out)                          # [G,S,M]


def gather_moe(x: jax.Array, assignment: Assignment, num_experts: int, capacity: int,
               expert_fn: ExpertFn) -> jax.Array:
  """x [G,S,M] -> [G,S,M] using slot indices instead of one-hot tensors."""
  G, S, M = x.shape
  E, C = num_experts, capacity
  # Buffer position of each (token, choice); dropped choices point past the end and are ignored.
  position = jnp.where(assignment.kept, assignment.expert_index * C + assignment.slot, E * C)   # [G,S,K]
  token = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :, None], position.shape)
  g = jnp.arange(G)[:, None, None]
  slot_token = jnp.full((G, E * C), S, jnp.int32).at[g, position].set(token, mode="drop")      # [G,E*C]
  x_padded = jnp.concatenate([x, jnp.zeros((G, 1, M), x.dtype)], axis=1)                       # row S = empty
  expert_in = jnp.take_along_axis(x_padded, slot_token[..., None], axis=1)                     # [G,E*C,M]
  expert_in = expert_in.reshape(G, E, C, M).transpose(1, 0, 2, 3).reshape(E, G * C, M)
  expert_out = expert_fn(expert_in).reshape(E, G, C, M).transpose(1, 0, 2, 3).reshape(G, E * C, M)
  gathered = jnp.take_along_axis(expert_out, jnp.minimum(position, E * C - 1).reshape(G, -1)[..., None],
                                 axis=1).reshape(position.shape + (M,))                        # [G,S,K,M]
  return jnp.einsum("GSK,GSKM->GSM", assignment.weight.astype(x.dtype), gathered)


# ----------------------------------------------------------------------------------------------------------
# Dropless: block-sorted grouped matmul.

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def grouped_blocks(block_fn, block_size: int, params, rows, block_start, block_count):
  """Runs `block_fn(params_e, rows[b:b+block_size])` on each of expert e's `block_count[e]` blocks.

  params: pytree with a leading E axis; rows [R, M] sorted by expert; block_start [E] first row of each expert's
  segment; block_count [E] number of blocks in it (a traced value: empty blocks cost nothing). Rows outside every
  segment come back as zeros. The backward pass recomputes each block's forward inside `jax.vjp`.
  """
  return _grouped_forward(block_fn, block_size, params, rows, block_start, block_count)


def _grouped_forward(block_fn, block_size, params, rows, block_start, block_count):
  def per_expert(out, inputs):
    params_e, start, count = inputs

    def body(i, out):
      offset = start + i * block_size
      block = lax.dynamic_slice_in_dim(rows, offset, block_size)
      return lax.dynamic_update_slice_in_dim(out, block_fn(params_e, block), offset, 0)

    return lax.fori_loop(0, count, body, out), None

  out, _ = lax.scan(per_expert, jnp.zeros_like(rows), (params, block_start, block_count))
  return out


def _grouped_fwd(block_fn, block_size, params, rows, block_start, block_count):
  out = _grouped_forward(block_fn, block_size, params, rows, block_start, block_count)
  return out, (params, rows, block_start, block_count)


def _grouped_bwd(block_fn, block_size, residuals, d_out):
  params, rows, block_start, block_count = residuals

  def per_expert(d_rows, inputs):
    params_e, start, count = inputs

    def body(i, carry):
      d_rows, d_params_e = carry
      offset = start + i * block_size
      block = lax.dynamic_slice_in_dim(rows, offset, block_size)
      d_block_out = lax.dynamic_slice_in_dim(d_out, offset, block_size)
      _, vjp = jax.vjp(block_fn, params_e, block)
      d_params_block, d_block = vjp(d_block_out)
      d_params_e = jax.tree.map(jnp.add, d_params_e, d_params_block)
      return lax.dynamic_update_slice_in_dim(d_rows, d_block, offset, 0), d_params_e

    zeros = jax.tree.map(jnp.zeros_like, params_e)
    return lax.fori_loop(0, count, body, (d_rows, zeros))

  d_rows, d_params = lax.scan(per_expert, jnp.zeros_like(rows), (params, block_start, block_count))
  return d_params, d_rows, None, None


grouped_blocks.defvjp(_grouped_fwd, _grouped_bwd)


def default_block_size(num_assignments: int, num_experts: int) -> int:
  """A power of two near half the mean rows per expert, in [16, 256]: big enough for efficient matmuls, small
  enough that the half-empty last block of each expert wastes little."""
  mean_rows = max(1, num_assignments // num_experts)
  return int(min(256, max(16, 2 ** math.floor(math.log2(max(mean_rows // 2, 1))))))


def dropless_moe(x: jax.Array, expert_index: jax.Array, gates: jax.Array, num_experts: int, params,
                 block_fn: Callable, block_size: int | None = None) -> jax.Array:
  """No-drop MoE. x [N,M]; expert_index, gates [N,K]; params with leading E; block_fn(params_e, [B,M]) -> [B,M]."""
  N, K = expert_index.shape
  M = x.shape[-1]
  E = num_experts
  A = N * K                                                        # assignments
  if block_size is None:
    block_size = default_block_size(A, E)
  flat_expert = expert_index.reshape(A)
  order = jnp.argsort(flat_expert, stable=True)                   # assignments sorted by expert
  counts = jnp.bincount(flat_expert, length=E)
  padded = (counts + block_size - 1) // block_size * block_size   # each segment a whole number of blocks
  segment_start = jnp.cumsum(padded) - padded
  first_sorted = jnp.cumsum(counts) - counts
  sorted_expert = flat_expert[order]
  row_sorted = segment_start[sorted_expert] + jnp.arange(A) - first_sorted[sorted_expert]
  row = jnp.zeros(A, jnp.int32).at[order].set(row_sorted.astype(jnp.int32))          # row of each assignment
  num_rows = (math.ceil(A / block_size) + E) * block_size         # static bound on sum(padded)
  row_token = jnp.full(num_rows, N, jnp.int32).at[row].set(jnp.arange(A, dtype=jnp.int32) // K)
  x_padded = jnp.concatenate([x, jnp.zeros((1, M), x.dtype)], axis=0)
  rows = x_padded[row_token]                                       # [R,M]
  out_rows = grouped_blocks(block_fn, block_size, params, rows, segment_start.astype(jnp.int32),
                            (padded // block_size).astype(jnp.int32))
  gathered = out_rows[row].reshape(N, K, M)
  return jnp.einsum("NK,NKM->NM", gates.astype(x.dtype), gathered)
