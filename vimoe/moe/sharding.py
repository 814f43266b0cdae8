"""Expert parallelism inside the MoE layer, driven by the ambient mesh (`with jax.set_mesh(mesh):`).

The MoE math reads the mesh through `jax.sharding` only, so `vimoe.moe` never imports `vimoe.parallel`
(which builds meshes and partition rules on top of this). `run_experts` is the one entry point from the layer:
it runs the experts on one device, or expert-parallel under a mesh. The layouts (groups over ('data', 'expert'),
expert buffers and weights over 'expert') and the all-to-all of each dispatch: docs/design.md, 'Sharding'.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vimoe.moe import dispatch as dispatch_lib
from vimoe.moe.backend import target_platform
from vimoe.moe.config import MoeConfig
from vimoe.moe.dispatch import combine_from_buffers, fill_expert_buffers
from vimoe.moe.experts import Experts, expert_mlp, stacked_expert_mlp
from vimoe.moe.routing import Assignment

DATA_AXIS = "data"
EXPERT_AXIS = "expert"


def current_expert_mesh():
  """The mesh set with `jax.set_mesh` if it has an 'expert' axis, else None (single-device semantics)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or EXPERT_AXIS not in mesh.axis_names:
    return None
  return mesh


def expert_axis_for(num_experts: int) -> str | None:
  """The axis to create stacked expert weights [E, ...] on now: 'expert' when the ambient mesh has an 'expert'
  axis that divides E, else None (replicated; the layer's call-time check explains a mismatch)."""
  mesh = current_expert_mesh()
  if mesh is None or num_experts % mesh.shape[EXPERT_AXIS]:
    return None
  return EXPERT_AXIS


def token_axes(mesh) -> tuple[str, ...]:
  """The mesh axes that routing groups are split over."""
  return tuple(axis for axis in (DATA_AXIS, EXPERT_AXIS) if axis in mesh.axis_names)


def data_axis_or_none(mesh):
  return DATA_AXIS if DATA_AXIS in mesh.axis_names else None


def check_divisible(mesh, num_groups: int, num_experts: int) -> None:
  groups_split = 1
  for axis in token_axes(mesh):
    groups_split *= mesh.shape[axis]
  if num_groups % groups_split:
    raise ValueError(f"the batch forms {num_groups} routing groups, which cannot be split over the "
                     f"{groups_split} devices of mesh axes {token_axes(mesh)}; choose group_size (or the batch "
                     "size) so the number of groups is a multiple of that")
  if num_experts % mesh.shape[EXPERT_AXIS]:
    raise ValueError(f"num_experts={num_experts} is not divisible by the mesh's 'expert' axis of size "
                     f"{mesh.shape[EXPERT_AXIS]}")


def constrain_groups(x: jax.Array, mesh) -> jax.Array:
  """[G, ...] with G split over ('data', 'expert')."""
  return jax.lax.with_sharding_constraint(x, P(token_axes(mesh)))


def constrain_expert_buffers(t: jax.Array, mesh) -> jax.Array:
  """[E, G, C, M] with E on 'expert' and G on 'data'."""
  return jax.lax.with_sharding_constraint(t, P(EXPERT_AXIS, data_axis_or_none(mesh)))


def sharded_gather_moe(x: jax.Array, assignment: Assignment, num_experts: int, capacity: int, params: dict,
                       activation: str, tokens_per_unit: int, mesh) -> jax.Array:
  """Gather dispatch with explicit all-to-all: x [G,S,U*D] -> [G,S,U*D].

  Each device gathers its groups' tokens into [E, G_local, C, M] buffers, an all-to-all over 'expert' sends
  expert e's buffers to the device holding expert e ([E_local, G_local * n_expert, C, M]), the local experts
  run, and the inverse all-to-all brings results home for the weighted combine.
  """
  E, C = num_experts, capacity
  groups = P(token_axes(mesh))
  experts_spec = jax.tree.map(lambda _: P(EXPERT_AXIS), params)

  def local(x, expert_index, slot, weight, kept, params):
    G, S, M = x.shape
    buffers, position = fill_expert_buffers(x, expert_index, slot, kept, E, C)                   # [G,E*C,M]
    buffers = buffers.reshape(G, E, C, M).transpose(1, 0, 2, 3)                                  # [E,G,C,M]
    buffers = jax.lax.all_to_all(buffers, EXPERT_AXIS, 0, 1, tiled=True)                         # [E_l,G*n,C,M]
    E_local, G_all = buffers.shape[:2]
    rows = buffers.reshape(E_local, G_all * C * tokens_per_unit, M // tokens_per_unit)
    out = stacked_expert_mlp(params, rows, activation).reshape(E_local, G_all, C, M)
    out = jax.lax.all_to_all(out, EXPERT_AXIS, 1, 0, tiled=True)                                 # [E,G,C,M]
    return combine_from_buffers(out.transpose(1, 0, 2, 3).reshape(G, E * C, M), position, weight)

  a = assignment
  return jax.shard_map(local, mesh=mesh, in_specs=(groups, groups, groups, groups, groups, experts_spec),
                       out_specs=groups)(x, a.expert_index, a.slot, a.weight, a.kept, params)


def local_dropless(x, expert_index, gates, num_experts: int, params: dict, activation: str, grouped_matmul: str,
                   block_size: int | None, base_capacity: int | None = None, valid=None) -> jax.Array:
  """The dropless computation on one device: x [N,M], expert_index and gates [N,K] -> [N,M], with the block loop
  (`dispatch.dropless_moe`) or grouped matmuls (`dispatch.ragged_moe`), `grouped_matmul` resolved already."""
  if grouped_matmul in ("ragged_dot", "gmm"):
    return dispatch_lib.ragged_moe(x, expert_index, gates, num_experts, params, activation, valid, grouped_matmul)
  return dispatch_lib.dropless_moe(x, expert_index, gates, num_experts, params,
                                   lambda p, xb: expert_mlp(p, xb, activation), block_size, base_capacity, valid)


# The dropless exchange. Each device sends its rows to the devices holding their experts; `counts` [n, n] is the
# exchange's traffic matrix over the 'expert' axis (counts[s, d]: rows device s sends to device d), which every
# device holds (an all-gather of the per-expert counts). The receive buffer holds `receive_rows` rows per device.
DROPLESS_EXCHANGES = ("ragged", "padded", "emulated_ragged")


def dropless_exchange(mesh) -> str:
  """How the dropless rows move for the platform the mesh compiles for: "ragged" (`lax.ragged_all_to_all`) on
  TPU/GPU, "padded" (`lax.all_to_all` of per-destination buffers) on CPU, which has no ragged_all_to_all.
  "emulated_ragged" (tests) runs the ragged plan through `emulated_ragged_all_to_all` on CPU."""
  return "padded" if target_platform(mesh) == "cpu" else "ragged"  # the mesh's platform, even ahead of time


def dropless_receive_rows(num_assignments: int, expert_devices: int, factor: float | None) -> int:
  """Receive-buffer rows per device: ceil(factor * A_l), at most the worst case n * A_l (factor None)."""
  worst = expert_devices * num_assignments
  return worst if factor is None else min(worst, math.ceil(factor * num_assignments))


def exclusive_cumsum(x: jax.Array, axis: int) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def ragged_exchange_plan(counts: jax.Array, me: jax.Array, receive_rows: int) -> dict:
  """Offsets and sizes of the ragged exchange for device `me`, from the traffic matrix counts [n, n].

  Device s's rows for device d land in d's buffer after those of devices s' < d (source-major, no gaps), at
  start[s, d] = sum_{s' < s} counts[s', d]; rows past `receive_rows` are cut (the last sources' tails) and count
  as overflow. Returns int32 arrays [n]: the forward `lax.ragged_all_to_all` arguments (input_offsets, send_sizes,
  output_offsets, recv_sizes; the send buffer is sorted by destination), the return exchange's
  (back_input_offsets, back_send_sizes, back_output_offsets, back_recv_sizes), and for the receive side
  received_offsets, received_sizes (where each source's rows sit in this device's buffer) and overflow (rows
  that device `me` could not take, a scalar).
  """
  start = exclusive_cumsum(counts, 0)                                         # [n src, n dst] in dst's buffer
  delivered = jnp.clip(receive_rows - start, 0, counts)                       # [n, n] rows that fit
  start = jnp.minimum(start, receive_rows)                                    # (offsets of empty slices in range)
  send_start = exclusive_cumsum(counts, 1)                                    # [n src, n dst] in src's send buffer
  int32 = lambda t: t.astype(jnp.int32)
  return dict(input_offsets=int32(send_start[me]), send_sizes=int32(delivered[me]),
              output_offsets=int32(start[me]), recv_sizes=int32(delivered[:, me]),
              back_input_offsets=int32(start[:, me]), back_send_sizes=int32(delivered[:, me]),
              back_output_offsets=int32(send_start[:, me]), back_recv_sizes=int32(delivered[me]),
              received_offsets=int32(start[:, me]), received_sizes=int32(delivered[:, me]),
              overflow=int32(jnp.sum(counts[:, me]) - jnp.sum(delivered[:, me])))


def padded_exchange_plan(counts: jax.Array, me: jax.Array, receive_rows: int) -> dict:
  """The padded all-to-all's layout: `receive_rows // n` rows per (source, destination) pair, so rows past that
  in any pair are cut (the overflow of sender `me`). Returns per_pair (static int) and int32 arrays [n]:
  send_sizes, received_offsets, received_sizes; overflow a scalar."""
  n = counts.shape[0]
  per_pair = receive_rows // n
  delivered = jnp.minimum(counts, per_pair)
  return dict(per_pair=per_pair, send_sizes=delivered[me].astype(jnp.int32),
              received_offsets=jnp.arange(n, dtype=jnp.int32) * per_pair,
              received_sizes=delivered[:, me].astype(jnp.int32),
              overflow=jnp.sum(counts[me] - delivered[me]).astype(jnp.int32))


def received_row_experts(received_offsets, received_sizes, expert_counts, rows: int):
  """The local expert of each row of a receive buffer: source s's rows sit at received_offsets[s] (sizes
  received_sizes[s], non-decreasing offsets, no overlaps), sorted by local expert with expert_counts [n, E_l]
  (a cut chunk keeps its first rows). -> (row_expert [rows] int32, row_valid [rows] bool; False for empty rows)."""
  n, E_local = expert_counts.shape
  begin = received_offsets[:, None]
  within = received_sizes[:, None]
  segment_start = (begin + jnp.minimum(exclusive_cumsum(expert_counts, 1), within)).reshape(n * E_local)
  segment_end = (begin + jnp.minimum(jnp.cumsum(expert_counts, 1), within)).reshape(n * E_local)
  q = jnp.arange(rows, dtype=jnp.int32)
  segment = jnp.maximum(jnp.searchsorted(segment_start, q, side="right") - 1, 0)   # last segment starting <= q
  return (segment % E_local).astype(jnp.int32), q < segment_end[segment]


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
  """`lax.ragged_all_to_all` (one slice per device) computed with a padded `lax.all_to_all`, for CPU tests: the
  same offsets and sizes, the semantics of its docstring, at the worst case's memory (operand rows per pair)."""
  rows, M = operand.shape
  i = jnp.arange(rows, dtype=jnp.int32)
  take = jnp.minimum(input_offsets[:, None] + i, rows - 1)                          # [n, rows]
  slices = jnp.where((i < send_sizes[:, None])[..., None], operand[take], 0)         # [n, rows, M]
  slices = jax.lax.all_to_all(slices, axis_name, 0, 0, tiled=True)                   # [n sources, rows, M]
  offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)          # where each source writes here
  target = jnp.where(i < recv_sizes[:, None], offsets[:, None] + i, output.shape[0])  # outside: not written
  return output.at[target.reshape(-1)].set(slices.reshape(-1, M), mode="drop")


def overflow_message(overflow_rows, receive_rows: int, num_assignments: int, factor, expert_devices: int) -> str:
  return (f"dropless expert parallelism: {int(overflow_rows)} token rows (all devices) did not fit a buffer of "
          f"{receive_rows} received rows (model.moe.dropless_buffer_factor={factor!r} x {num_assignments} local "
          f"assignments) and were not computed; raise model.moe.dropless_buffer_factor, or set it to None for the "
          f"exact worst case ({expert_devices} x {num_assignments} rows), which never drops")


def raise_on_overflow(overflow_rows: jax.Array, message) -> None:
  """Raises (from the device, at run time) when overflow_rows > 0; `message(rows)` says what to change."""
  def report(rows):
    raise ValueError(message(rows))
  jax.lax.cond(overflow_rows > 0, lambda: jax.debug.callback(report, overflow_rows), lambda: None)


def sharded_dropless_moe(x: jax.Array, expert_index: jax.Array, gates: jax.Array, num_experts: int, params: dict,
                         activation: str, grouped_matmul: str, block_size: int | None, mesh,
                         buffer_factor: float | None = MoeConfig.dropless_buffer_factor,
                         exchange: str | None = None) -> jax.Array:
  """Dropless expert parallelism: x [N,D], expert_index and gates [N,K] -> [N,D], inside `jax.shard_map`.

  Rows are split over all devices ('data', 'expert') (when N does not divide, e.g. one evaluation image, rows
  of gate 0 pad it and are cut off after), expert weights stay on their 'expert' shard (never gathered; the
  transpose of shard_map sums their gradients over 'data'). On each device, with n = the 'expert'
  axis size, E_l = E / n local experts and A_l = N_l * K local assignments:

  1. the assignments are sorted by expert, hence by destination device (expert e lives on device e // E_l) and
     by local expert within it; an all-gather of the [E] per-expert counts gives every device the traffic matrix;
  2. the rows move into a receive buffer of R = ceil(buffer_factor * A_l) rows per device (None: n * A_l, the
     worst case of all n devices sending everything to one), with `exchange` (default `dropless_exchange`):
     "ragged": `lax.ragged_all_to_all` from a send buffer of the A_l sorted rows, no padding, each source's rows
       after the previous source's (`ragged_exchange_plan`); a device receiving more than R rows overflows;
     "padded" (CPU): `lax.all_to_all` of R / n rows per destination; a pair with more than R / n rows overflows;
     "emulated_ragged": the ragged plan through `emulated_ragged_all_to_all` (tests on CPU);
     overflowing rows are not computed (they contribute zero) and the step raises from the device, naming
     model.moe.dropless_buffer_factor;
  3. the local experts run on the R received rows, sorted by local expert within each source (`local_dropless`
     with the empty rows marked: the block loop computes only real rows, with base capacity A_l / E_l, the
     balanced load);
  4. the inverse exchange brings each result back to its row, for the gate-weighted sum.
  """
  E, (N, K), M = num_experts, expert_index.shape, x.shape[-1]
  devices = 1
  for axis in token_axes(mesh):
    devices *= mesh.shape[axis]
  pad = -N % devices
  if pad:  # e.g. one evaluation image: rows of gate 0 (expert 0, zero input) fill the split, then are cut off
    out = sharded_dropless_moe(jnp.concatenate([x, jnp.zeros((pad, M), x.dtype)]),
                               jnp.concatenate([expert_index, jnp.zeros((pad, K), expert_index.dtype)]),
                               jnp.concatenate([gates, jnp.zeros((pad, K), gates.dtype)]), E, params, activation,
                               grouped_matmul, block_size, mesh, buffer_factor, exchange)
    return out[:N]
  check_divisible(mesh, N, E)
  exchange = dropless_exchange(mesh) if exchange is None else exchange
  if exchange not in DROPLESS_EXCHANGES:
    raise ValueError(f"exchange={exchange!r} is not valid; choose one of: {', '.join(map(repr, DROPLESS_EXCHANGES))}")
  n = mesh.shape[EXPERT_AXIS]
  E_local = E // n
  rows_spec = P(token_axes(mesh))
  experts_spec = jax.tree.map(lambda _: P(EXPERT_AXIS), params)
  other_axes = tuple(axis for axis in token_axes(mesh) if axis != EXPERT_AXIS)
  ragged = {"ragged": jax.lax.ragged_all_to_all, "emulated_ragged": emulated_ragged_all_to_all}.get(exchange)

  def local(x, expert_index, gates, params):
    if other_axes:  # the weights meet rows that differ over 'data'; pcast's transpose sums their gradients there
      params = jax.tree.map(lambda w: jax.lax.pcast(w, other_axes, to="varying"), params)
    N_local = x.shape[0]
    A = N_local * K
    R = dropless_receive_rows(A, n, buffer_factor)
    flat_expert = expert_index.reshape(A)
    order = jnp.argsort(flat_expert, stable=True)                         # by expert = by (destination, local)
    sorted_index = jnp.zeros(A, jnp.int32).at[order].set(jnp.arange(A, dtype=jnp.int32))  # of each assignment
    expert_counts = jnp.bincount(flat_expert, length=E).astype(jnp.int32)  # [E]
    all_counts = jax.lax.all_gather(expert_counts, EXPERT_AXIS)            # [n sources, E]
    counts = all_counts.reshape(n, n, E_local).sum(2)                      # [n sources, n destinations]
    me = jax.lax.axis_index(EXPERT_AXIS)
    received_counts = jax.lax.dynamic_slice_in_dim(all_counts, me * E_local, E_local, axis=1)  # [n, E_l]
    if ragged is not None:
      plan = ragged_exchange_plan(counts, me, R)
      send = x[order // K]                                                 # [A, M] sorted by destination
      received = ragged(send, jnp.zeros((R, M), x.dtype), plan["input_offsets"], plan["send_sizes"],
                        plan["output_offsets"], plan["recv_sizes"], axis_name=EXPERT_AXIS)   # [R, M]
    else:
      plan = padded_exchange_plan(counts, me, R)
      per_pair = plan["per_pair"]
      dest = flat_expert[order] // E_local
      rank = jnp.arange(A, dtype=jnp.int32) - exclusive_cumsum(counts[me], 0)[dest]   # within its destination
      slot = jnp.where(rank < per_pair, dest * per_pair + rank, n * per_pair)         # n * per_pair: cut
      send_token = jnp.full(n * per_pair, N_local, jnp.int32).at[slot].set(order // K, mode="drop")
      send = jnp.concatenate([x, jnp.zeros((1, M), x.dtype)], axis=0)[send_token]     # [n*per_pair, M]
      received = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)             # source-major
    if buffer_factor is not None:  # the worst case (None) cannot overflow: no check, no extra collective
      # Every device raises together (one raising alone would leave the others waiting in the next collective).
      raise_on_overflow(jax.lax.psum(plan["overflow"], token_axes(mesh)),
                        lambda rows: overflow_message(rows, R, A, buffer_factor, n))
    rows = received.shape[0]
    row_expert, row_valid = received_row_experts(plan["received_offsets"], plan["received_sizes"],
                                                 received_counts, rows)
    out = local_dropless(received, row_expert[:, None], jnp.ones((rows, 1), x.dtype), E_local, params, activation,
                         grouped_matmul, block_size or dispatch_lib.default_overflow_block_size(A, E_local),
                         A // E_local, row_valid[:, None])                 # [rows, M]
    if ragged is not None:
      back = ragged(out, jnp.zeros((A, M), x.dtype), plan["back_input_offsets"], plan["back_send_sizes"],
                    plan["back_output_offsets"], plan["back_recv_sizes"], axis_name=EXPERT_AXIS)  # [A, M] sorted
      # cut rows were never sent back: they stay zero
      per_assignment = back[sorted_index]
    else:
      back = jax.lax.all_to_all(out, EXPERT_AXIS, 0, 0, tiled=True)      # [n*per_pair, M], destination-major
      back = jnp.concatenate([back, jnp.zeros((1, M), x.dtype)], axis=0)  # row n*per_pair: cut rows get zero
      per_assignment = back[slot[sorted_index]]
    return jnp.einsum("NK,NKM->NM", gates.astype(x.dtype), per_assignment.reshape(N_local, K, M))

  return jax.shard_map(local, mesh=mesh, in_specs=(rows_spec, rows_spec, rows_spec, experts_spec),
                       out_specs=rows_spec)(x, expert_index, gates, params)


def run_experts(experts: Experts, units: jax.Array, assignment: Assignment, *, dispatch: str,
                capacity: int | None, tokens_per_unit: int, block_size: int | None, grouped_matmul: str = "auto",
                dropless_buffer_factor: float | None = MoeConfig.dropless_buffer_factor):
  """Send units [G,S,U*D] (U tokens per routed unit) to `experts` as `assignment` says -> [G,S,U*D].

  Under a mesh with an 'expert' axis (`with jax.set_mesh(mesh):`), groups (dropless: token rows) are split over
  ('data', 'expert') and expert buffers over 'expert'; without one, everything runs on one device.
  grouped_matmul: the dropless path's local compute (`MoeConfig.grouped_matmul`); dropless_buffer_factor: its
  receive bound under a mesh (`MoeConfig.dropless_buffer_factor`).
  """
  G, S, payload = units.shape
  E = experts.num_experts
  D = payload // tokens_per_unit
  mesh = current_expert_mesh()

  def expert_fn(t):  # [E, N, U*D] -> [E, N, U*D], the MLP applied per token
    return experts(t.reshape(E, -1, D)).reshape(t.shape)

  if capacity is None and dispatch == "gather":
    # Dropless: expand item decisions to their tokens; block loop or grouped matmuls, expert-parallel on a mesh.
    index = jnp.repeat(assignment.expert_index.reshape(G * S, -1), tokens_per_unit, axis=0)
    gates = jnp.repeat(assignment.weight.reshape(G * S, -1), tokens_per_unit, axis=0)
    method = dispatch_lib.resolve_grouped_matmul(grouped_matmul)
    if mesh is None:
      out = local_dropless(units.reshape(-1, D), index, gates, E, experts.params_dict(), experts.activation, method,
                           block_size)
    else:
      out = sharded_dropless_moe(units.reshape(-1, D), index, gates, E, experts.params_dict(), experts.activation,
                                 method, block_size, mesh, dropless_buffer_factor)
    return out.reshape(G, S, payload)
  slots = S if capacity is None else capacity
  if mesh is not None:
    check_divisible(mesh, G, E)
    units = constrain_groups(units, mesh)
  if dispatch == "einsum":
    dispatch_tensor, combine = dispatch_lib.einsum_dispatch_tensors(assignment, E, slots)
    if mesh is None:
      out = dispatch_lib.einsum_moe(units, dispatch_tensor, combine, expert_fn)
    else:
      groups = lambda t: constrain_groups(t, mesh)
      dispatch_tensor, combine = groups(dispatch_tensor), groups(combine)
      out = dispatch_lib.einsum_moe(units, dispatch_tensor, combine, expert_fn, groups,
                                    lambda t: constrain_expert_buffers(t, mesh))
  elif mesh is not None:
    out = sharded_gather_moe(units, assignment, E, slots, experts.params_dict(), experts.activation,
                             tokens_per_unit, mesh)
  else:
    out = dispatch_lib.gather_moe(units, assignment, E, slots, expert_fn)
  return out if mesh is None else constrain_groups(out, mesh)
