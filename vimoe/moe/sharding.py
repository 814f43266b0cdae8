"""Expert parallelism inside the MoE layer, driven by the ambient mesh (`with jax.set_mesh(mesh):`).

The MoE math reads the mesh through `jax.sharding` only, so `vimoe.moe` never imports `vimoe.parallel`
(which builds meshes and partition rules on top of this). `run_experts` is the one entry point from the layer:
it runs the experts on one device, or expert-parallel under a mesh. The layouts (groups over ('data', 'expert'),
expert buffers and weights over 'expert') and the all-to-all of each dispatch: docs/design.md, 'Sharding'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vimoe.moe import dispatch as dispatch_lib
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
  if grouped_matmul == "ragged_dot":
    return dispatch_lib.ragged_moe(x, expert_index, gates, num_experts, params, activation, valid)
  return dispatch_lib.dropless_moe(x, expert_index, gates, num_experts, params,
                                   lambda p, xb: expert_mlp(p, xb, activation), block_size, base_capacity, valid)


def sharded_dropless_moe(x: jax.Array, expert_index: jax.Array, gates: jax.Array, num_experts: int, params: dict,
                         activation: str, grouped_matmul: str, block_size: int | None, mesh) -> jax.Array:
  """Dropless expert parallelism: x [N,D], expert_index and gates [N,K] -> [N,D], inside `jax.shard_map`.

  Rows are split over all devices ('data', 'expert') (when N does not divide, e.g. one evaluation image, rows
  of gate 0 pad it and are cut off after), expert weights stay on their 'expert' shard (never gathered; the
  transpose of shard_map sums their gradients over 'data'). On each device, with n = the 'expert'
  axis size, E_l = E / n local experts and A_l = N_l * K local assignments:

  1. the assignments are sorted by expert, hence by destination device (expert e lives on device e // E_l) and
     by local expert within it; an all-to-all of the [n, E_l] per-expert counts tells every device what it gets;
  2. the rows go out in a padded all-to-all whose buffer holds A_l rows per destination: the worst case (all of
     a device's assignments to one device), so no row is ever dropped, at the price of send and receive buffers
     of n * A_l rows each (n times the rows actually moved; the exchange moves that many bytes too, since XLA:CPU
     has no `ragged_all_to_all`);
  3. the local experts run on the received rows, sorted by local expert (`local_dropless` with the empty rows
     marked: the block loop computes only real rows, with base capacity A_l / E_l, the balanced load);
  4. the inverse all-to-all brings each result back to its row, for the gate-weighted sum.
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
                               grouped_matmul, block_size, mesh)
    return out[:N]
  check_divisible(mesh, N, E)
  n = mesh.shape[EXPERT_AXIS]
  E_local = E // n
  rows_spec = P(token_axes(mesh))
  experts_spec = jax.tree.map(lambda _: P(EXPERT_AXIS), params)

  other_axes = tuple(axis for axis in token_axes(mesh) if axis != EXPERT_AXIS)

  def local(x, expert_index, gates, params):
    if other_axes:  # the weights meet rows that differ over 'data'; pcast's transpose sums their gradients there
      params = jax.tree.map(lambda w: jax.lax.pcast(w, other_axes, to="varying"), params)
    N_local = x.shape[0]
    A = N_local * K
    cap = A                                                                # rows per destination: worst case
    flat_expert = expert_index.reshape(A)
    order = jnp.argsort(flat_expert, stable=True)                         # by expert = by (destination, local)
    expert_counts = jnp.bincount(flat_expert, length=E).astype(jnp.int32)  # [E]
    dest_counts = expert_counts.reshape(n, E_local).sum(1)
    dest = flat_expert[order] // E_local
    rank = jnp.arange(A, dtype=jnp.int32) - (jnp.cumsum(dest_counts) - dest_counts)[dest]
    position = jnp.zeros(A, jnp.int32).at[order].set(dest * cap + rank)  # send-buffer row of each assignment
    send_token = jnp.full(n * cap, N_local, jnp.int32).at[position].set(jnp.arange(A, dtype=jnp.int32) // K)
    send = jnp.concatenate([x, jnp.zeros((1, M), x.dtype)], axis=0)[send_token]                # [n*cap, M]
    received = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)   # [n*cap, M], source-major
    received_counts = jax.lax.all_to_all(expert_counts.reshape(n, E_local), EXPERT_AXIS, 0, 0,
                                         tiled=True)                       # [n sources, E_l]
    ends = jnp.cumsum(received_counts, axis=1)                             # [n, E_l]
    q = jnp.arange(cap, dtype=jnp.int32)
    row_expert = jax.vmap(lambda e: jnp.searchsorted(e, q, side="right"))(ends).reshape(n * cap, 1)
    row_valid = (q[None, :] < ends[:, -1:]).reshape(n * cap, 1)
    ones = jnp.ones((n * cap, 1), x.dtype)
    out = local_dropless(received, jnp.minimum(row_expert, E_local - 1), ones, E_local, params, activation,
                         grouped_matmul, block_size or dispatch_lib.default_overflow_block_size(A, E_local),
                         A // E_local, row_valid)
    back = jax.lax.all_to_all(out, EXPERT_AXIS, 0, 0, tiled=True)         # [n*cap, M], destination-major
    return jnp.einsum("NK,NKM->NM", gates.astype(x.dtype), back[position].reshape(N_local, K, M))

  return jax.shard_map(local, mesh=mesh, in_specs=(rows_spec, rows_spec, rows_spec, experts_spec),
                       out_specs=rows_spec)(x, expert_index, gates, params)


def run_experts(experts: Experts, units: jax.Array, assignment: Assignment, *, dispatch: str,
                capacity: int | None, tokens_per_unit: int, block_size: int | None, grouped_matmul: str = "auto"):
  """Send units [G,S,U*D] (U tokens per routed unit) to `experts` as `assignment` says -> [G,S,U*D].

  Under a mesh with an 'expert' axis (`with jax.set_mesh(mesh):`), groups (dropless: token rows) are split over
  ('data', 'expert') and expert buffers over 'expert'; without one, everything runs on one device.
  grouped_matmul: the dropless path's local compute (`MoeConfig.grouped_matmul`).
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
                                 method, block_size, mesh)
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
