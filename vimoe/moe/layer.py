"""MoeLayer and HierarchicalMoeLayer: thin nnx.Modules that own parameters and call the pure functions.

Axis letters: see vimoe/moe/routing.py. Public contract: ../DESIGN.md section 3 (shared/DESIGN.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vimoe.moe import dispatch as dispatch_lib
from vimoe.moe import losses as losses_lib
from vimoe.moe import routing
from vimoe.moe import sharding
from vimoe.moe.experts import Experts, check_activation, expert_mlp

ROUTERS = ("top_k", "noisy_top_k", "experts_choose", "soft", "prototype", "hash")
DISPATCHES = ("einsum", "gather")
ROUTE_PER = ("token", "item")
TOKEN_CHOICE_ROUTERS = ("top_k", "noisy_top_k", "prototype", "hash")
# Routers whose decision for one token depends on other tokens of the group (later ones included).
SEES_OTHER_TOKENS = ("experts_choose", "soft")


@struct.dataclass
class MoeAux:
  """What a MoE layer reports besides its output.

  losses: weighted auxiliary losses ready to be added to the task loss (only those with a non-zero weight).
  metrics: unweighted losses and routing statistics (dropped_fraction, expert_load [E], ...).
  """
  losses: dict
  metrics: dict


def _choose(name: str, value, valid) -> None:
  if value not in valid:
    raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(repr, valid))}")


def validate_moe_args(*, num_experts, k, router, capacity_factor, dispatch, route_per, num_shared_experts,
                      activation, batch_priority, causal, group_size, load_weight, importance_weight,
                      balance_weight, z_loss_weight) -> None:
  """Raises a ValueError that names the argument, its value and what is valid."""
  _choose("router", router, ROUTERS)
  _choose("dispatch", dispatch, DISPATCHES)
  _choose("route_per", route_per, ROUTE_PER)
  check_activation(activation)
  if not isinstance(num_experts, int) or num_experts < 1:
    raise ValueError(f"num_experts={num_experts!r} must be a positive integer")
  if router != "soft" and (not isinstance(k, int) or not 1 <= k <= num_experts):
    raise ValueError(f"k={k!r} must be an integer in [1, num_experts={num_experts}]")
  if capacity_factor is not None and not capacity_factor > 0:
    raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0, or None for no token dropping")
  if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
    raise ValueError(f"group_size={group_size!r} must be a positive integer or None (one group per item)")
  if num_shared_experts < 0:
    raise ValueError(f"num_shared_experts={num_shared_experts!r} must be >= 0")
  if router == "hash" and k != 1:
    raise ValueError(f"k={k!r} with router='hash': hash routing assigns exactly one expert per token; use k=1")
  if router == "hash" and route_per == "item":
    raise ValueError("route_per='item' with router='hash': hash routing needs token ids; use route_per='token'")
  if router == "experts_choose" and capacity_factor is None:
    raise ValueError("capacity_factor=None with router='experts_choose': each expert takes its top-C tokens, "
                     "so a capacity factor (> 0) is required")
  if causal:
    if router in SEES_OTHER_TOKENS:
      raise ValueError(f"router={router!r} with causal=True: this router looks at every token of the group, "
                       f"including future ones; use one of {', '.join(TOKEN_CHOICE_ROUTERS)}")
    if batch_priority:
      raise ValueError("batch_priority=True with causal=True: ordering tokens by gate lets future tokens take "
                       "capacity from earlier ones; use batch_priority=False")
    if capacity_factor is not None and k > 1:
      # Capacity serves every first choice of a group before any second choice, so a later token's first choice can
      # push out an earlier token's second choice: the earlier token's output would depend on the future.
      raise ValueError(f"capacity_factor={capacity_factor!r} with k={k} and causal=True: later tokens could drop "
                       "earlier tokens' second choices (not causal); use capacity_factor=None (dropless) or k=1")
  if batch_priority and router not in TOKEN_CHOICE_ROUTERS:
    raise ValueError(f"batch_priority=True with router={router!r}: only token-choice routers "
                     f"({', '.join(TOKEN_CHOICE_ROUTERS)}) have a priority order")
  for name, value in (("load_weight", load_weight), ("importance_weight", importance_weight),
                      ("balance_weight", balance_weight), ("z_loss_weight", z_loss_weight)):
    if value < 0:
      raise ValueError(f"{name}={value!r} must be >= 0")
  if load_weight > 0 and router != "noisy_top_k":
    raise ValueError(f"load_weight={load_weight!r} with router={router!r}: Shazeer's load loss needs the noise "
                     "of router='noisy_top_k'; use balance_weight for other routers")
  if router == "soft" and dispatch != "einsum":
    raise ValueError(f"dispatch={dispatch!r} with router='soft': Soft MoE mixes every token into every slot, "
                     "which only the einsum dispatch expresses; use dispatch='einsum'")
  if router == "soft" and (importance_weight or balance_weight or z_loss_weight):
    raise ValueError("router='soft' has no discrete routing to balance; set importance_weight, balance_weight "
                     "and z_loss_weight to 0")
  if router == "hash" and (importance_weight or balance_weight or z_loss_weight):
    raise ValueError("router='hash' has no learned router; set importance_weight, balance_weight and "
                     "z_loss_weight to 0")


class Router(nnx.Module):
  """Router parameters. `kernel` [D,E] for top_k, noisy_top_k, experts_choose and prototype (prototypes as
  columns); `noise_kernel` [D,E] for noisy_top_k (both zero-initialised, Shazeer 2017); `kernel` [D,E,P] and
  `scale` for soft; nothing for hash."""

  def __init__(self, dim: int, num_experts: int, kind: str, *, slots_per_expert: int = 1, rngs: nnx.Rngs):
    self.kind = kind
    self.deterministic = False
    if kind in ("top_k", "experts_choose"):
      self.kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (dim, num_experts)))
    elif kind == "noisy_top_k":
      self.kernel = nnx.Param(jnp.zeros((dim, num_experts)))
      self.noise_kernel = nnx.Param(jnp.zeros((dim, num_experts)))
      self.noise_rngs = rngs.fork()
    elif kind == "prototype":
      self.kernel = nnx.Param(jax.random.normal(rngs.params(), (dim, num_experts)))
    elif kind == "soft":
      self.kernel = nnx.Param(jax.random.normal(rngs.params(), (dim, num_experts, slots_per_expert))
                              / math.sqrt(dim))
      self.scale = nnx.Param(jnp.ones(()))

  def noisy_logits(self, x: jax.Array, deterministic: bool):
    """Shazeer 2017 eq. 4 pieces: (clean logits, noise std, standard-normal noise or None), each [..., E]."""
    clean = x @ self.kernel[...]
    noise_std = jax.nn.softplus(x @ self.noise_kernel[...])
    noise = None if deterministic else jax.random.normal(self.noise_rngs.noise(), clean.shape)
    return clean, noise_std, noise


def token_choice_metrics(probs, logits, expert_index, gates, kept, num_experts, valid=None):
  """Metrics shared by every token-choice router. Shapes flattened to N = G*S tokens; `valid` (optional, the
  shape of `gates` without K) marks the real tokens: padding counts in no metric."""
  E = num_experts
  K = expert_index.shape[-1]
  one_hot = jax.nn.one_hot(expert_index.reshape(-1, K), E, dtype=jnp.float32)  # [N,K,E]
  dense_gates = jnp.einsum("NKE,NK->NE", one_hot, gates.reshape(-1, K).astype(jnp.float32))
  flat_valid = None if valid is None else valid.reshape(-1)
  if flat_valid is None:
    dropped = 1.0 - jnp.mean(kept.astype(jnp.float32))
  else:
    weight = flat_valid.astype(jnp.float32)
    one_hot, dense_gates = one_hot * weight[:, None, None], dense_gates * weight[:, None]
    kept_real = jnp.sum(kept.reshape(-1, K).astype(jnp.float32) * weight[:, None])
    dropped = 1.0 - kept_real / jnp.maximum(K * jnp.sum(weight), 1.0)
  metrics = {
      "dropped_fraction": dropped,
      "importance_cv": losses_lib.coefficient_of_variation(jnp.sum(dense_gates, 0)),
      "importance_loss": losses_lib.importance_loss(dense_gates),
      **losses_lib.load_metrics(jnp.sum(one_hot, axis=(0, 1))),
  }
  if probs is not None:
    metrics["balance_loss"] = losses_lib.switch_balance_loss(probs.reshape(-1, E),
                                                             expert_index.reshape(-1, K)[:, 0], flat_valid)
  if logits is not None:
    metrics["router_z_loss"] = losses_lib.router_z_loss(logits.reshape(-1, E), flat_valid)
  return metrics


def is_dropless(dispatch: str, capacity_factor: float | None) -> bool:
  """Gather dispatch without a capacity factor: the block-sorted path, with no capacity and no routing groups."""
  return capacity_factor is None and dispatch == "gather"


def routing_capacity(dispatch: str, capacity_factor: float | None, tokens_per_group: int, num_experts: int,
                     k: int) -> int | None:
  """Slots per expert per group, or None for the dropless path.

  Einsum dispatch always needs a capacity: with capacity_factor=None it is S, so nothing is dropped.
  """
  if is_dropless(dispatch, capacity_factor):
    return None
  return routing.expert_capacity(tokens_per_group, num_experts, k, capacity_factor)


def run_experts(experts: Experts, units: jax.Array, assignment: routing.Assignment, *, dispatch: str,
                capacity: int | None, tokens_per_unit: int, block_size: int | None):
  """Send units [G,S,U*D] (U tokens per routed unit) to `experts` as `assignment` says -> [G,S,U*D].

  Under a mesh with an 'expert' axis (`with jax.set_mesh(mesh):`), groups are split over ('data', 'expert') and
  expert buffers over 'expert' (vimoe/moe/sharding.py); without one, everything runs on one device.
  """
  G, S, payload = units.shape
  E = experts.num_experts
  D = payload // tokens_per_unit
  mesh = sharding.current_expert_mesh()

  def expert_fn(t):  # [E, N, U*D] -> [E, N, U*D], the MLP applied per token
    return experts(t.reshape(E, -1, D)).reshape(t.shape)

  if capacity is None and dispatch == "gather":
    # Dropless: expand item decisions to their tokens, balanced batched share + overflow blocks. Under a mesh the
    # partitioner runs it with the expert weights gathered (no expert parallelism for this path).
    index = jnp.repeat(assignment.expert_index.reshape(G * S, -1), tokens_per_unit, axis=0)
    gates = jnp.repeat(assignment.weight.reshape(G * S, -1), tokens_per_unit, axis=0)
    out = dispatch_lib.dropless_moe(units.reshape(-1, D), index, gates, E, experts.params_dict(),
                                    lambda p, xb: expert_mlp(p, xb, experts.activation), block_size)
    return out.reshape(G, S, payload)
  slots = S if capacity is None else capacity
  if mesh is not None:
    sharding.check_divisible(mesh, G, E)
    units = sharding.constrain_groups(units, mesh)
  if dispatch == "einsum":
    dispatch_tensor, combine = dispatch_lib.einsum_dispatch_tensors(assignment, E, slots)
    if mesh is None:
      out = dispatch_lib.einsum_moe(units, dispatch_tensor, combine, expert_fn)
    else:
      groups = lambda t: sharding.constrain_groups(t, mesh)
      dispatch_tensor, combine = groups(dispatch_tensor), groups(combine)
      out = dispatch_lib.einsum_moe(units, dispatch_tensor, combine, expert_fn, groups,
                                    lambda t: sharding.constrain_expert_buffers(t, mesh))
  elif mesh is not None:
    out = sharding.sharded_gather_moe(units, assignment, E, slots, experts.params_dict(), experts.activation,
                                      tokens_per_unit, mesh)
  else:
    out = dispatch_lib.gather_moe(units, assignment, E, slots, expert_fn)
  return out if mesh is None else sharding.constrain_groups(out, mesh)


class MoeLayer(nnx.Module):
  """A mixture-of-experts MLP: y = sum over chosen experts of gate * expert(x) + sum of shared experts(x).

  x [B,T,D] -> (y [B,T,D], MoeAux). See docs/moe.md for every router and dispatch.

  Args beyond DESIGN.md section 3:
    batch_priority: order capacity by top-1 gate instead of position (BPR, Riquelme et al. 2021).
    causal: the layer sits in a decoder; routers that see other tokens are refused.
    slots_per_expert: P for router="soft".
    importance_weight, load_weight: Shazeer 2017 losses (load only for noisy_top_k).
    balance_weight: Switch/GShard balance loss; z_loss_weight: router z-loss.
    block_size: rows per overflow block of the dropless path (None: about sqrt of the mean load per expert).
    expert_kernel_init: initialiser of the routed and shared experts' kernels (None: variance scaling over
      fan-in). A model that puts this layer where it has a dense MLP passes that MLP's initialiser, so that the
      residual branch starts at the dense model's scale (the ViT passes truncated normal, std 0.02).
  """

  def __init__(self, dim: int, hidden_dim: int, num_experts: int, k: int = 1, *, router: str = "top_k",
               capacity_factor: float | None = 1.25, dispatch: str = "einsum", group_size: int | None = None,
               route_per: str = "token", num_shared_experts: int = 0, normalize_gates: bool = False,
               activation: str = "gelu", batch_priority: bool = False, causal: bool = False,
               slots_per_expert: int = 1, importance_weight: float = 0.0, load_weight: float = 0.0,
               balance_weight: float = 0.0, z_loss_weight: float = 0.0, block_size: int | None = None,
               param_dtype=jnp.float32, expert_kernel_init=None, rngs: nnx.Rngs):
    validate_moe_args(num_experts=num_experts, k=k, router=router, capacity_factor=capacity_factor,
                      dispatch=dispatch, route_per=route_per, num_shared_experts=num_shared_experts,
                      activation=activation, batch_priority=batch_priority, causal=causal, group_size=group_size,
                      load_weight=load_weight, importance_weight=importance_weight,
                      balance_weight=balance_weight, z_loss_weight=z_loss_weight)
    self.dim, self.hidden_dim, self.num_experts, self.k = dim, hidden_dim, num_experts, k
    self.router_kind, self.capacity_factor, self.dispatch = router, capacity_factor, dispatch
    self.group_size, self.route_per, self.normalize_gates = group_size, route_per, normalize_gates
    self.batch_priority, self.causal, self.block_size = batch_priority, causal, block_size
    # A tuple, not a dict: module attributes end up in the (hashable) GraphDef.
    self.loss_weights = (("importance", importance_weight), ("load", load_weight), ("balance", balance_weight),
                         ("z_loss", z_loss_weight))
    self.router = Router(dim, num_experts, router, slots_per_expert=slots_per_expert, rngs=rngs)
    self.experts = Experts(num_experts, dim, hidden_dim, activation=activation, rngs=rngs,
                           param_dtype=param_dtype, kernel_init=expert_kernel_init)
    self.num_shared_experts = num_shared_experts
    self.shared = (Experts(num_shared_experts, dim, hidden_dim, activation=activation, rngs=rngs,
                           param_dtype=param_dtype, kernel_init=expert_kernel_init)
                   if num_shared_experts else None)

  # -- grouping ------------------------------------------------------------------------------------------------
  def _units(self, x, router_input, token_ids, mask=None):
    """Routing units: (payload [G,S,U*D], router features [G,S,D] f32, token ids [G,S] or None, U,
    valid [G,S] bool or None). An item (route_per="item") is valid when any of its tokens is."""
    B, T, D = x.shape
    if mask is not None and mask.shape != (B, T):
      raise ValueError(f"mask has shape {mask.shape}; expected (batch, tokens) = {(B, T)}")
    if self.route_per == "item":
      if router_input is None:
        router_input = jnp.mean(x.astype(jnp.float32), axis=1)   # [B,D] the item's mean token
      elif router_input.shape != (B, D):
        raise ValueError(f"router_input has shape {router_input.shape}; expected (batch, dim) = {(B, D)}")
      if self.group_size is None:
        items_per_group = B  # all items of the batch form one group (one item per group could never drop)
      else:
        if self.group_size % T:
          raise ValueError(f"group_size={self.group_size} must be a multiple of the tokens per item T={T} "
                           "when route_per='item'")
        items_per_group = self.group_size // T
      if B % items_per_group:
        raise ValueError(f"group_size={self.group_size} holds {items_per_group} items, which does not divide "
                         f"the batch of {B} items")
      G = B // items_per_group
      valid = None if mask is None else jnp.any(mask, axis=1).reshape(G, items_per_group)
      return (x.reshape(G, items_per_group, T * D),
              router_input.astype(jnp.float32).reshape(G, items_per_group, D), None, T, valid)
    S = T if self.group_size is None else self.group_size
    if (B * T) % S:
      raise ValueError(f"group_size={self.group_size} does not divide the {B * T} tokens of the batch "
                       f"(batch {B} x length {T})")
    G = B * T // S
    ids = None if token_ids is None else token_ids.reshape(G, S)
    valid = None if mask is None else mask.reshape(G, S)
    return x.reshape(G, S, D), x.astype(jnp.float32).reshape(G, S, D), ids, 1, valid

  def __call__(self, x: jax.Array, *, router_input: jax.Array | None = None, token_ids: jax.Array | None = None,
               mask: jax.Array | None = None, deterministic: bool | None = None):
    """x [B,T,D] -> (y [B,T,D], MoeAux). mask [B,T] bool (optional): True for real tokens. Padding (False) takes
    no expert capacity, changes no other token's output and counts in no metric or loss; its own output is only
    the shared experts'."""
    if x.ndim != 3 or x.shape[-1] != self.dim:
      raise ValueError(f"x has shape {x.shape}; expected [batch, tokens, dim={self.dim}]")
    if router_input is not None and self.route_per != "item":
      raise ValueError("router_input is only used with route_per='item'")
    if self.router_kind == "hash" and token_ids is None:
      raise ValueError("router='hash' needs token_ids [batch, tokens] in the call")
    deterministic = self.router.deterministic if deterministic is None else deterministic
    B, T, D = x.shape
    units, features, ids, tokens_per_unit, valid = self._units(
        x, router_input, token_ids, None if mask is None else jnp.asarray(mask, bool))
    mesh = sharding.current_expert_mesh()
    if mesh is not None and not is_dropless(self.dispatch, self.capacity_factor):
      # Every device routes its own groups (the dropless path has no groups).
      sharding.check_divisible(mesh, units.shape[0], self.num_experts)
      units, features = sharding.constrain_groups(units, mesh), sharding.constrain_groups(features, mesh)
    E = self.num_experts

    if self.router_kind == "soft":
      dispatch_weights, combine = routing.soft_routing(features, self.router.kernel[...], self.router.scale[...],
                                                       valid)
      P = dispatch_weights.shape[-1]
      expert_in = jnp.einsum("GSEP,GSM->EGPM", dispatch_weights.astype(x.dtype), units)
      expert_out = self.experts(expert_in.reshape(E, -1, D)).reshape(expert_in.shape)
      y = jnp.einsum("GSEP,EGPM->GSM", combine.astype(x.dtype), expert_out)
      mass = jnp.sum(combine if valid is None else combine * valid[..., None, None], axis=(0, 1, 3))
      metrics = {"dropped_fraction": jnp.zeros(()), **losses_lib.load_metrics(mass),
                 "capacity": jnp.asarray(P)}
      losses = {}
    else:
      y, losses, metrics = self._routed(units, features, ids, tokens_per_unit, deterministic, valid)
    y = y.reshape(B, T, D)
    if self.shared is not None:
      y = y + self.shared.apply_all(x)
    return y, MoeAux(losses=losses, metrics=metrics)

  def first_choice(self, x: jax.Array, *, router_input: jax.Array | None = None,
                   token_ids: jax.Array | None = None) -> jax.Array:
    """The expert each routing unit ranks first, without running the experts (routing analysis, expert maps).

    x [B,T,D] -> int32 [B,T] for route_per="token", [B] for route_per="item". Noisy top-k is read without noise
    (as in evaluation); experts-choose reports the expert with the highest gate for the token. Soft routing has
    no first choice (every slot mixes all tokens) and raises.
    """
    if self.router_kind == "soft":
      raise ValueError("router='soft' has no first-choice expert: every slot is a mixture of all tokens")
    B, T, D = x.shape
    if self.route_per == "item":
      features = (jnp.mean(x.astype(jnp.float32), axis=1) if router_input is None
                  else router_input.astype(jnp.float32))[None]                   # [1,B,D]
    else:
      features = x.astype(jnp.float32)                                           # [B,T,D]
    if self.router_kind == "hash":
      if token_ids is None:
        raise ValueError("router='hash' needs token_ids [batch, tokens]")
      return routing.hash_expert_index(token_ids, self.num_experts)[..., 0]
    kernel = self.router.kernel[...]
    logits = (routing.prototype_logits(features, kernel) if self.router_kind == "prototype"
              else features @ kernel)                                            # [., ., E]
    choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return choice[0] if self.route_per == "item" else choice

  def _routed(self, units, features, ids, tokens_per_unit, deterministic, valid=None):
    G, S, _ = units.shape
    E, K = self.num_experts, self.k
    kind = self.router_kind
    probs = logits = None
    extra_metrics = {}
    capacity = routing_capacity(self.dispatch, self.capacity_factor, S, E, K)

    if kind == "experts_choose":
      logits = features @ self.router.kernel[...]
      probs = jax.nn.softmax(logits, -1)
      assignment = routing.experts_choose_assignment(probs, capacity, valid)
      chosen_by_any = jnp.any(assignment.kept, axis=-1)
      counts = jnp.sum(assignment.kept.astype(jnp.float32), axis=(0, 1))
      dense_gates = assignment.weight.reshape(-1, E)
      flat_valid = None if valid is None else valid.reshape(-1)
      metrics = {"dropped_fraction": 1.0 - losses_lib.masked_mean(chosen_by_any.reshape(-1).astype(
                     jnp.float32), flat_valid),
                 "importance_cv": losses_lib.coefficient_of_variation(jnp.sum(dense_gates, 0)),
                 "importance_loss": losses_lib.importance_loss(dense_gates),
                 "router_z_loss": losses_lib.router_z_loss(logits.reshape(-1, E), flat_valid),
                 "balance_loss": losses_lib.switch_balance_loss(probs.reshape(-1, E),
                                                                jnp.argmax(probs, -1).reshape(-1), flat_valid),
                 **losses_lib.load_metrics(counts)}
    else:
      # Batch Priority Routing orders tokens by their top-1 router probability (V-MoE), not by the gate: a
      # renormalised k=1 gate (or Shazeer's softmax over the kept logits) is 1 for every token.
      if kind == "top_k":
        logits = features @ self.router.kernel[...]
        expert_index, gates, probs = routing.top_k_gating(logits, K, self.normalize_gates)
        top1_probability = jnp.max(probs, -1)
      elif kind == "prototype":
        logits = routing.prototype_logits(features, self.router.kernel[...])
        expert_index, gates, probs = routing.top_k_gating(logits, K, self.normalize_gates)
        top1_probability = jnp.max(probs, -1)
      elif kind == "noisy_top_k":
        clean, noise_std, noise = self.router.noisy_logits(features, deterministic)
        expert_index, gates, noisy = routing.noisy_top_k_gating(clean, noise_std, noise, K)
        load_probability = routing.shazeer_load_probability(clean, noise_std, noisy, K)
        logits, probs = clean, jax.nn.softmax(clean, -1)
        top1_probability = jnp.max(jax.nn.softmax(noisy, -1), -1)
        if valid is not None:
          load_probability = load_probability * valid[..., None]
        extra_metrics["load_loss"] = losses_lib.load_loss(load_probability.reshape(-1, E))
        extra_metrics["smooth_load_cv"] = losses_lib.coefficient_of_variation(
            jnp.sum(load_probability.reshape(-1, E), 0))
      else:  # hash
        expert_index = routing.hash_expert_index(ids, E)
        gates = jnp.ones(expert_index.shape, jnp.float32)
        top1_probability = gates[..., 0]                          # no router: ties, so position order
      priority = top1_probability if self.batch_priority else None
      assignment = routing.assign_slots(expert_index, gates, E, capacity, priority, valid)
      metrics = token_choice_metrics(probs, logits, expert_index, gates, assignment.kept, E, valid)
      metrics.update(extra_metrics)

    metrics["capacity"] = jnp.asarray(-1 if capacity is None else capacity)  # -1: dropless
    y = run_experts(self.experts, units, assignment, dispatch=self.dispatch, capacity=capacity,
                    tokens_per_unit=tokens_per_unit, block_size=self.block_size)
    metric_of_loss = {"importance": "importance_loss", "load": "load_loss", "balance": "balance_loss",
                      "z_loss": "router_z_loss"}
    losses = {name: weight * metrics[metric_of_loss[name]]
              for name, weight in self.loss_weights if weight > 0}
    return y, losses, metrics


class HierarchicalMoeLayer(nnx.Module):
  """Shazeer et al. 2017 appendix B: y = sum_i sum_j Gp(x)_i G_i(x)_j E_ij(x).

  A primary noisy top-k gate picks `k_primary` of `num_groups` groups; inside each chosen group a secondary noisy
  top-k gate picks `k_secondary` of its `experts_per_group` experts. Expert (i, j) is stored at index
  i * experts_per_group + j of `experts`, so the flattened choice list (K = k_primary * k_secondary, gate
  Gp_i * G_ij) goes through the same dispatch as MoeLayer.

  Parameters: `router.kernel`, `router.noise_kernel` [D, num_groups]; `secondary_kernel`,
  `secondary_noise_kernel` [D, num_groups, experts_per_group]; `experts` with E = num_groups * experts_per_group.
  Losses (appendix B): Importance_H(X)_ij = sum_x Gp(x)_i G_i(x)_j and
  Load_H(X)_ij = Load_p(X)_i * Load_i(X^(i))_j / |X^(i)|, X^(i) the tokens with Gp(x)_i > 0.
  """

  def __init__(self, dim: int, hidden_dim: int, num_groups: int, experts_per_group: int, *, k_primary: int = 1,
               k_secondary: int = 1, capacity_factor: float | None = None, dispatch: str = "gather",
               group_size: int | None = None, activation: str = "relu", importance_weight: float = 0.0,
               load_weight: float = 0.0, block_size: int | None = None, rngs: nnx.Rngs):
    validate_moe_args(num_experts=num_groups, k=k_primary, router="noisy_top_k", capacity_factor=capacity_factor,
                      dispatch=dispatch, route_per="token", num_shared_experts=0, activation=activation,
                      batch_priority=False, causal=False, group_size=group_size, load_weight=load_weight,
                      importance_weight=importance_weight, balance_weight=0.0, z_loss_weight=0.0)
    if not 1 <= k_secondary <= experts_per_group:
      raise ValueError(f"k_secondary={k_secondary!r} must be in [1, experts_per_group={experts_per_group}]")
    self.num_groups, self.experts_per_group = num_groups, experts_per_group
    self.k_primary, self.k_secondary = k_primary, k_secondary
    self.capacity_factor, self.dispatch, self.group_size, self.block_size = (capacity_factor, dispatch,
                                                                             group_size, block_size)
    self.loss_weights = (("importance", importance_weight), ("load", load_weight))
    self.router = Router(dim, num_groups, "noisy_top_k", rngs=rngs)
    self.secondary_kernel = nnx.Param(jnp.zeros((dim, num_groups, experts_per_group)))
    self.secondary_noise_kernel = nnx.Param(jnp.zeros((dim, num_groups, experts_per_group)))
    self.experts = Experts(num_groups * experts_per_group, dim, hidden_dim, activation=activation, rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool | None = None):
    """x [B,T,D] -> (y, MoeAux); mask [B,T] (optional) as in MoeLayer: padding takes no slot, counts nowhere."""
    deterministic = self.router.deterministic if deterministic is None else deterministic
    B, T, D = x.shape
    S = T if self.group_size is None else self.group_size
    if (B * T) % S:
      raise ValueError(f"group_size={self.group_size} does not divide the {B * T} tokens of the batch")
    G = B * T // S
    if mask is not None and mask.shape != (B, T):
      raise ValueError(f"mask has shape {mask.shape}; expected (batch, tokens) = {(B, T)}")
    valid = None if mask is None else jnp.asarray(mask, bool).reshape(G, S)
    A, Bx = self.num_groups, self.experts_per_group
    kp, ks = self.k_primary, self.k_secondary
    units = x.reshape(G, S, D)
    features = units.astype(jnp.float32)
    # Primary gate over groups.
    clean, noise_std, noise = self.router.noisy_logits(features, deterministic)
    primary_index, primary_gates, primary_noisy = routing.noisy_top_k_gating(clean, noise_std, noise, kp)
    primary_load = routing.shazeer_load_probability(clean, noise_std, primary_noisy, kp)      # [G,S,A]
    # Secondary gates, evaluated for every group, then the chosen groups are picked out.
    clean2 = jnp.einsum("GSD,DAB->GSAB", features, self.secondary_kernel[...])
    std2 = jax.nn.softplus(jnp.einsum("GSD,DAB->GSAB", features, self.secondary_noise_kernel[...]))
    noise2 = None if deterministic else jax.random.normal(self.router.noise_rngs.noise(), clean2.shape)
    secondary_index, secondary_gates, noisy2 = routing.noisy_top_k_gating(clean2, std2, noise2, ks)  # [G,S,A,ks]
    secondary_load = routing.shazeer_load_probability(clean2, std2, noisy2, ks)               # [G,S,A,Bx]
    pick = lambda t: jnp.take_along_axis(t, primary_index[..., None], axis=2)                # [G,S,kp,ks]
    expert_index = (primary_index[..., None] * Bx + pick(secondary_index)).reshape(G, S, kp * ks)
    gates = (primary_gates[..., None] * pick(secondary_gates)).reshape(G, S, kp * ks)
    E = A * Bx
    capacity = routing_capacity(self.dispatch, self.capacity_factor, S, E, kp * ks)
    assignment = routing.assign_slots(expert_index, gates, E, capacity, valid=valid)
    y = run_experts(self.experts, units, assignment, dispatch=self.dispatch, capacity=capacity,
                    tokens_per_unit=1, block_size=self.block_size)
    # Appendix B losses.
    metrics = token_choice_metrics(None, None, expert_index, gates, assignment.kept, E, valid)
    if valid is not None:  # padding adds nothing to importance or load
      primary_gates = primary_gates * valid[..., None]
      primary_load = primary_load * valid[..., None]
    primary_dense = jnp.sum(jax.nn.one_hot(primary_index, A) * primary_gates[..., None], axis=-2)      # [G,S,A]
    secondary_dense = jnp.sum(jax.nn.one_hot(secondary_index, Bx) * secondary_gates[..., None], axis=-2)  # [G,S,A,Bx]
    importance = jnp.einsum("GSA,GSAB->AB", primary_dense, secondary_dense).reshape(E)
    in_group = (primary_dense > 0).astype(jnp.float32)                                                # [G,S,A]
    load = (jnp.sum(primary_load, axis=(0, 1))[:, None]
            * jnp.einsum("GSA,GSAB->AB", in_group, secondary_load)
            / jnp.maximum(jnp.sum(in_group, axis=(0, 1)), 1.0)[:, None]).reshape(E)
    metrics["importance_loss"] = losses_lib.coefficient_of_variation(importance) ** 2
    metrics["load_loss"] = losses_lib.coefficient_of_variation(load) ** 2
    metrics["capacity"] = jnp.asarray(-1 if capacity is None else capacity)
    losses = {name: weight * metrics[f"{name}_loss"] for name, weight in self.loss_weights if weight > 0}
    return y.reshape(B, T, D), MoeAux(losses=losses, metrics=metrics)
