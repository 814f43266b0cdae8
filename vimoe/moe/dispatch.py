"""Moving tokens to experts and back (pure functions). Axis letters: see vimoe/moe/routing.py.

Three dispatchers, all taking `expert_fn(x [E, N, M]) -> [E, N, M]` that runs expert e on row block e:
`einsum_moe` (GShard one-hot tensors), `gather_moe` (slot indices, same output) and `dropless_moe` (no capacity,
block-sorted overflow); `ragged_moe` is the dropless computation with grouped matmuls (`lax.ragged_dot`). What each computes and costs: docs/design.md, 'Capacity and dispatch'.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from vimoe.moe.backend import target_platform
from vimoe.moe.experts import expert_mlp
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
  M = x.shape[-1]
  # The contractions run with E and C merged into one slot axis X = E*C: "GSX,GSM->GXM" is a plain batched
  # matmul, which XLA:CPU runs 1.5-2x faster than the same einsum written with separate E and C axes.
  slots_in = jnp.einsum("GSX,GSM->GXM", dispatch.reshape(G, S, E * C).astype(x.dtype), x)          # [G,E*C,M]
  expert_in = constrain_groups(slots_in.reshape(G, E, C, M))                                         # [G,E,C,M]
  expert_in = constrain_experts(expert_in.transpose(1, 0, 2, 3))                                     # [E,G,C,M]
  expert_out = expert_fn(expert_in.reshape(E, G * C, M)).reshape(E, G, C, M)
  expert_out = constrain_experts(expert_out)
  expert_out = constrain_groups(expert_out.transpose(1, 0, 2, 3))                                    # [G,E,C,M]
  return jnp.einsum("GSX,GXM->GSM", combine.reshape(G, S, E * C).astype(x.dtype),
                    expert_out.reshape(G, E * C, M))                                                 # [G,S,M]


def fill_expert_buffers(x: jax.Array, expert_index, slot, kept, num_experts: int, capacity: int):
  """Gathers the tokens of each group into their experts' slots.

  x [G,S,M]; expert_index, slot, kept [G,S,K] -> (buffers [G,E*C,M] with empty slots zero, position [G,S,K]:
  the buffer row of each choice, E*C for dropped ones).
  """
  G, S, M = x.shape
  E, C = num_experts, capacity
  position = jnp.where(kept, expert_index * C + slot, E * C)                                        # [G,S,K]
  token = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :, None], position.shape)
  g = jnp.arange(G)[:, None, None]
  slot_token = jnp.full((G, E * C), S, jnp.int32).at[g, position].set(token, mode="drop")          # [G,E*C]
  x_padded = jnp.concatenate([x, jnp.zeros((G, 1, M), x.dtype)], axis=1)                           # row S = empty
  return jnp.take_along_axis(x_padded, slot_token[..., None], axis=1), position


def combine_from_buffers(expert_out: jax.Array, position: jax.Array, weight: jax.Array) -> jax.Array:
  """expert_out [G,E*C,M], position and weight [G,S,K] -> sum_k weight * expert_out[position] [G,S,M]."""
  G, rows, M = expert_out.shape
  gathered = jnp.take_along_axis(expert_out, jnp.minimum(position, rows - 1).reshape(G, -1)[..., None],
                                 axis=1).reshape(position.shape + (M,))                              # [G,S,K,M]
  return jnp.einsum("GSK,GSKM->GSM", weight.astype(expert_out.dtype), gathered)


def gather_moe(x: jax.Array, assignment: Assignment, num_experts: int, capacity: int,
               expert_fn: ExpertFn) -> jax.Array:
  """x [G,S,M] -> [G,S,M] using slot indices instead of one-hot tensors."""
  G, S, M = x.shape
  E, C = num_experts, capacity
  a = assignment
  buffers, position = fill_expert_buffers(x, a.expert_index, a.slot, a.kept, E, C)                # [G,E*C,M]
  expert_in = buffers.reshape(G, E, C, M).transpose(1, 0, 2, 3).reshape(E, G * C, M)
  expert_out = expert_fn(expert_in).reshape(E, G, C, M).transpose(1, 0, 2, 3).reshape(G, E * C, M)
  return combine_from_buffers(expert_out, position, a.weight)


# Dropless: a balanced batched part plus an overflow block loop.

def _take_expert(params, e):
  return jax.tree.map(lambda w: lax.dynamic_index_in_dim(w, e, keepdims=False), params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def overflow_blocks(block_fn, block_size: int, params, rows, block_expert, num_blocks):
  """Runs `block_fn(params[block_expert[i]], rows[i*B:(i+1)*B])` for the first `num_blocks` blocks.

  params: pytree with a leading E axis; rows [R, M]; block_expert [R/B] int; num_blocks a traced scalar, so
  blocks past it cost nothing. Rows of inactive blocks come back as zeros. The backward pass recomputes each
  block inside `jax.vjp` and adds its weight gradient into the slice of its expert.
  """
  return _overflow_forward(block_fn, block_size, params, rows, block_expert, num_blocks)


def _overflow_forward(block_fn, block_size, params, rows, block_expert, num_blocks):
  def body(i, out):
    block = lax.dynamic_slice_in_dim(rows, i * block_size, block_size)
    result = block_fn(_take_expert(params, block_expert[i]), block)
    return lax.dynamic_update_slice_in_dim(out, result, i * block_size, 0)
  return lax.fori_loop(0, num_blocks, body, jnp.zeros_like(rows))


def _overflow_fwd(block_fn, block_size, params, rows, block_expert, num_blocks):
  out = _overflow_forward(block_fn, block_size, params, rows, block_expert, num_blocks)
  return out, (params, rows, block_expert, num_blocks)


def _overflow_bwd(block_fn, block_size, residuals, d_out):
  params, rows, block_expert, num_blocks = residuals

  def body(i, carry):
    d_rows, d_params = carry
    e = block_expert[i]
    block = lax.dynamic_slice_in_dim(rows, i * block_size, block_size)
    d_block_out = lax.dynamic_slice_in_dim(d_out, i * block_size, block_size)
    _, vjp = jax.vjp(block_fn, _take_expert(params, e), block)
    d_params_e, d_block = vjp(d_block_out)
    d_params = jax.tree.map(
        lambda acc, g: lax.dynamic_update_index_in_dim(acc, lax.dynamic_index_in_dim(acc, e, keepdims=False) + g,
                                                       e, 0), d_params, d_params_e)
    return lax.dynamic_update_slice_in_dim(d_rows, d_block, i * block_size, 0), d_params

  d_rows, d_params = lax.fori_loop(0, num_blocks, body,
                                   (jnp.zeros_like(rows), jax.tree.map(jnp.zeros_like, params)))
  return d_params, d_rows, None, None


overflow_blocks.defvjp(_overflow_fwd, _overflow_bwd)


def default_overflow_block_size(num_assignments: int, num_experts: int) -> int:
  """About the typical overflow of one expert under random routing (sqrt of its mean load), a power of two in
  [8, 128]."""
  typical = math.sqrt(max(num_assignments / num_experts, 1.0))
  return int(min(128, max(8, 2 ** math.floor(math.log2(typical)))))


def dropless_moe(x: jax.Array, expert_index: jax.Array, gates: jax.Array, num_experts: int, params,
                 block_fn: Callable, block_size: int | None = None,
                 base_capacity: int | None = None, valid: jax.Array | None = None) -> jax.Array:
  """No-drop MoE. x [N,M]; expert_index, gates [N,K]; params with leading E; block_fn(params_e, [B,M]) -> [B,M].

  Assignments are ranked within their expert. The first `base_capacity` (default: the mean load A/E) of each
  expert go to a batched [E, C0, M] expert call (the efficient form of the matmul); the rest, the overflow, are
  sorted by expert into blocks of `block_size` rows (each expert's overflow padded to whole blocks) that a loop
  with a dynamic trip count runs. Work: E*C0 + overflow + at most one partial block per overflowing expert, so
  about K x tokens for balanced routing and at most about twice that for any routing, with static shapes.
  `valid` [N,K] bool (optional): False marks an empty row (the expert-parallel receive buffer's padding); it
  takes no rank, is never computed and contributes zero.
  """
  N, K = expert_index.shape
  M = x.shape[-1]
  E = num_experts
  A = N * K                                                            # assignments
  C0 = A // E if base_capacity is None else base_capacity
  B = default_overflow_block_size(A, E) if block_size is None else block_size
  flat_expert = expert_index.reshape(A)
  if valid is not None:
    flat_expert = jnp.where(valid.reshape(A), flat_expert, E)          # empty rows sort last and count for none
  order = jnp.argsort(flat_expert, stable=True)                       # assignments sorted by expert
  counts = jnp.bincount(flat_expert, length=E)
  first_sorted = jnp.cumsum(counts) - counts
  sorted_expert = flat_expert[order]
  rank = jnp.zeros(A, jnp.int32).at[order].set(
      (jnp.arange(A) - first_sorted[sorted_expert]).astype(jnp.int32))  # rank of each assignment in its expert
  overflow = jnp.maximum(counts - C0, 0)
  padded = (overflow + B - 1) // B * B
  segment_start = jnp.cumsum(padded) - padded
  # Static bound on the overflow rows: if anything overflows, some expert holds >= C0 assignments, so at most
  # A - C0 overflow, plus padding of less than one block per expert.
  num_rows = (math.ceil(max(A - C0, 0) / B) + E) * B
  in_buffer = rank < C0
  position = jnp.where(in_buffer, flat_expert * C0 + rank,
                       E * C0 + segment_start[flat_expert] + rank - C0)     # row in [buffers; overflow]
  if valid is not None:
    position = jnp.where(valid.reshape(A), position, E * C0 + num_rows)  # past every row: scattered nowhere
  row_token = jnp.full(E * C0 + num_rows, N, jnp.int32).at[position].set(jnp.arange(A, dtype=jnp.int32) // K,
                                                                         mode="drop")
  x_padded = jnp.concatenate([x, jnp.zeros((1, M), x.dtype)], axis=0)
  rows = x_padded[row_token]                                           # [E*C0 + R, M]
  buffer_out = jax.vmap(block_fn)(params, rows[:E * C0].reshape(E, C0, M)).reshape(E * C0, M)
  block_end = jnp.cumsum(padded)                                       # expert of each overflow block:
  block_expert = jnp.searchsorted(block_end, jnp.arange(num_rows // B) * B, side="right").astype(jnp.int32)
  block_expert = jnp.minimum(block_expert, E - 1)
  overflow_out = overflow_blocks(block_fn, B, params, rows[E * C0:], block_expert,
                                 (jnp.sum(padded) // B).astype(jnp.int32))
  out_rows = jnp.concatenate([buffer_out, overflow_out], axis=0)
  gathered = out_rows[position].reshape(N, K, M)
  if valid is not None:
    gathered = jnp.where(valid[..., None], gathered, 0)
  return jnp.einsum("NK,NKM->NM", gates.astype(x.dtype), gathered)


# Dropless with grouped matmuls: assignments sorted by expert, one grouped matmul per weight matrix.

GROUPED_MATMULS = ("auto", "block_loop", "ragged_dot", "gmm")
_MATRICES = ("w_in", "w_gate", "w_out")
# What "auto" becomes on each platform, and the evidence: docs/benchmarks.md, "Grouped matmul on TPU" (the TPU
# compiler's cost of each method at the paper configs' MoE shapes) and "Dropless local compute" (CPU timings).
# GPU: not measured (no GPU has run vimoe); ragged_dot, jax's portable grouped matmul, until one is.
AUTO_GROUPED_MATMUL = {"cpu": "block_loop", "tpu": "block_loop", "gpu": "ragged_dot"}
GMM_ROW_TILE = 128  # megablox gmm's default m tile: rows are padded to a multiple of it


def resolve_grouped_matmul(grouped_matmul: str) -> str:
  """"auto" -> the method AUTO_GROUPED_MATMUL names for the platform being compiled for (the mesh's, even ahead
  of time: vimoe.moe.backend); other names unchanged."""
  if grouped_matmul not in GROUPED_MATMULS:
    raise ValueError(f"grouped_matmul={grouped_matmul!r} is not valid; choose one of: "
                     f"{', '.join(map(repr, GROUPED_MATMULS))}")
  if grouped_matmul == "auto":
    return AUTO_GROUPED_MATMUL.get(target_platform(), "ragged_dot")
  return grouped_matmul


def grouped_dot(method: str, group_sizes: jax.Array):
  """dot(x [R, D], w [E, D, F]) -> [R, F]: rows sorted by expert, group e = the next group_sizes[e] rows times
  w[e]; rows past sum(group_sizes) are zero.

  "ragged_dot": `lax.ragged_dot` (any platform). "gmm": the megablox Pallas kernel for TPU
  (`jax.experimental.pallas.ops.tpu.megablox.gmm`, with its own backward), rows padded to a multiple of 128; on
  another platform it runs in Pallas interpret mode (slow: for tests)."""
  if method == "ragged_dot":
    return lambda x, w: lax.ragged_dot(x, w.astype(x.dtype), group_sizes)
  if method != "gmm":
    raise ValueError(f"grouped_matmul={method!r} has no grouped dot; choose 'ragged_dot' or 'gmm'")
  from jax.experimental.pallas.ops.tpu import megablox  # pylint: disable=import-outside-toplevel
  interpret = target_platform() != "tpu"

  def dot(x, w):
    rows = x.shape[0]
    # gmm leaves rows past the groups unwritten, in its output and in its backward's input gradient: mask both
    # sides, so those rows are zero as with ragged_dot and their (garbage) gradients never reach x.
    live = (jnp.arange(rows) < jnp.sum(group_sizes))[:, None]
    x = jnp.where(live, x, 0)
    pad = -rows % GMM_ROW_TILE
    padded = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    out = megablox.gmm(padded, w.astype(x.dtype), group_sizes, x.dtype, (GMM_ROW_TILE, 128, 128), None, None,
                       False, interpret)[:rows]
    return jnp.where(live, out, 0)
  return dot


def grouped_expert_mlp(params: dict, rows: jax.Array, group_sizes: jax.Array, row_expert: jax.Array,
                       activation: str, method: str = "ragged_dot") -> jax.Array:
  """rows [R,M] sorted by expert, group_sizes [E], row_expert [R] -> [R,M]: expert e on its group of rows.

  Weight matrices go through `grouped_dot(method)`; biases (and the PReLU slope) are gathered per row. Rows past
  sum(group_sizes) get only the biases' terms (callers ignore them)."""
  per_row = {name: w if name in _MATRICES else w[row_expert] for name, w in params.items()}
  return expert_mlp(per_row, rows, activation, dot=grouped_dot(method, group_sizes))


def ragged_moe(x: jax.Array, expert_index: jax.Array, gates: jax.Array, num_experts: int, params,
               activation: str, valid: jax.Array | None = None, method: str = "ragged_dot") -> jax.Array:
  """No-drop MoE with grouped matmuls (`grouped_dot(method)`: "ragged_dot" or "gmm"); arguments and result as
  `dropless_moe` (activation names the MLP).

  The A = N*K assignments are sorted by expert (empty ones, `valid` False, last), their rows gathered into one
  [A, M] array and run through `grouped_expert_mlp`: every assignment is computed once, no padding, no loop.
  """
  N, K = expert_index.shape
  M = x.shape[-1]
  E = num_experts
  A = N * K
  flat_expert = expert_index.reshape(A)
  if valid is not None:
    flat_expert = jnp.where(valid.reshape(A), flat_expert, E)
  order = jnp.argsort(flat_expert, stable=True)                       # assignments sorted by expert
  group_sizes = jnp.bincount(flat_expert, length=E).astype(jnp.int32)  # (empty rows, index E, count for none)
  sorted_out = grouped_expert_mlp(params, x[order // K], group_sizes, jnp.minimum(flat_expert[order], E - 1),
                                  activation, method)                  # [A, M] in sorted order
  out = jnp.zeros_like(sorted_out).at[order].set(sorted_out).reshape(N, K, M)
  if valid is not None:
    out = jnp.where(valid[..., None], out, 0)
  return jnp.einsum("NK,NKM->NM", gates.astype(x.dtype), out)
