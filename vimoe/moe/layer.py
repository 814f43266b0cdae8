"""MoeLayer and HierarchicalMoeLayer: thin nnx.Modules that own parameters and call the pure functions.

Axis letters: see vimoe/moe/routing.py. Public contract: docs/design.md, 'MoE layer contract'. The router is a
plug-in (vimoe/moe/routers.py); the hyper-parameters are one `MoeConfig` (vimoe/moe/config.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vimoe.moe import losses as losses_lib
from vimoe.moe import routing
from vimoe.moe import sharding
from vimoe.moe.config import MoeConfig, as_config
from vimoe.moe.experts import Experts
from vimoe.moe.routers import ROUTERS, NoisyTopKRouter, is_dropless, routing_capacity
from vimoe.moe.sharding import run_experts

# Weighted auxiliary losses: name -> the metric it weights (MoeAux.losses holds the non-zero ones).
LOSS_METRICS = (("importance", "importance_weight", "importance_loss"), ("load", "load_weight", "load_loss"),
                ("balance", "balance_weight", "balance_loss"), ("z_loss", "z_loss_weight", "router_z_loss"),
                ("sequence_balance", "sequence_balance_weight", "sequence_balance_loss"))


@struct.dataclass
class MoeAux:
  """What a MoE layer reports besides its output.

  losses: weighted auxiliary losses ready to be added to the task loss (only those with a non-zero weight).
  metrics: unweighted losses and routing statistics (dropped_fraction, expert_load [E], ...).
  """
  losses: dict
  metrics: dict


def sum_aux(named_aux) -> dict:
  """A model's aux from its layers' (name, MoeAux) pairs: {"losses": {loss: sum over layers}, "metrics": {name:
  that layer's metrics}}."""
  losses, metrics = {}, {}
  for name, aux in named_aux:
    metrics[name] = aux.metrics
    for key, value in aux.losses.items():
      losses[key] = losses.get(key, 0.0) + value
  return {"losses": losses, "metrics": metrics}


def weighted_losses(config: MoeConfig, metrics: dict,
                    names=("importance", "load", "balance", "z_loss", "sequence_balance")) -> dict:
  """{name: weight * metric} for the losses `names` whose weight in `config` is > 0."""
  return {name: getattr(config, weight) * metrics[metric] for name, weight, metric in LOSS_METRICS
          if name in names and getattr(config, weight) > 0}


def check_mask(mask, B: int, T: int) -> None:
  if mask is not None and mask.shape != (B, T):
    raise ValueError(f"mask has shape {mask.shape}; expected (batch, tokens) = {(B, T)}")


def group_tokens(x: jax.Array, group_size: int | None, mask: jax.Array | None = None):
  """x [B,T,D] -> (routing groups [G,S,D] of `group_size` tokens (None: one sequence each), mask [G,S] or None)."""
  B, T, D = x.shape
  check_mask(mask, B, T)
  S = T if group_size is None else group_size
  if (B * T) % S:
    raise ValueError(f"group_size={group_size} does not divide the {B * T} tokens of the batch "
                     f"(batch {B} x length {T})")
  G = B * T // S
  return x.reshape(G, S, D), None if mask is None else mask.reshape(G, S)


class MoeLayer(nnx.Module):
  """A mixture-of-experts MLP: y = sum over chosen experts of gate * expert(x) + sum of shared experts(x).

  x [B,T,D] -> (y [B,T,D], MoeAux). See docs/moe.md for every router and dispatch.

      MoeLayer(dim, hidden_dim, MoeConfig(num_experts=8, k=2), rngs=rngs)
      MoeLayer(dim, hidden_dim, 8, 2, capacity_factor=None, rngs=rngs)       # the same, from keyword arguments

  Parameters: `router.*` (the router's own, vimoe/moe/routers.py), `experts` (E stacked MLPs), `shared` (the
  always-on experts, if any). Created under `with jax.set_mesh(mesh):` with an 'expert' axis, the routed experts'
  weights are born sharded over it along E.
  shared_hidden_dim: the shared experts' width (None: hidden_dim, the routed experts').
  expert_kernel_init: initialiser of the routed and shared experts' kernels (None: variance scaling over fan-in).
  A model that puts this layer where it has a dense MLP passes that MLP's initialiser, so that the residual branch
  starts at the dense model's scale (the ViT passes truncated normal, std 0.02).
  """

  def __init__(self, dim: int, hidden_dim: int, config: MoeConfig | int | None = None, k: int | None = None, *,
               param_dtype=jnp.float32, expert_kernel_init=None, shared_hidden_dim: int | None = None,
               rngs: nnx.Rngs, **options):
    config = as_config(config, k, options).validate()
    self.dim, self.hidden_dim, self.config = dim, hidden_dim, config
    self.router = ROUTERS[config.router](dim, config, rngs=rngs)
    experts = lambda n, width, axis: Experts(n, dim, width, activation=config.activation, rngs=rngs,
                                             param_dtype=param_dtype, kernel_init=expert_kernel_init,
                                             expert_axis=axis)
    self.experts = experts(config.num_experts, hidden_dim, sharding.expert_axis_for(config.num_experts))
    self.shared = (experts(config.num_shared_experts, shared_hidden_dim or hidden_dim, None)
                   if config.num_shared_experts else None)

  num_experts = property(lambda self: self.config.num_experts)
  k = property(lambda self: self.config.k)
  num_shared_experts = property(lambda self: self.config.num_shared_experts)
  route_per = property(lambda self: self.config.route_per)
  group_size = property(lambda self: self.config.group_size)
  router_kind = property(lambda self: self.config.router)

  @property
  def experts_per_token(self) -> int:
    """Routed experts whose parameters one routing unit uses (k; all of them for Soft MoE)."""
    return self.router.experts_per_token(self.k)

  # -- grouping ------------------------------------------------------------------------------------------------
  def _units(self, x, router_input, token_ids, mask=None):
    """Routing units: (payload [G,S,U*D], router features [G,S,D] f32, token ids [G,S] or None, U,
    valid [G,S] bool or None). An item (route_per="item") is valid when any of its tokens is."""
    B, T, D = x.shape
    if self.route_per == "item":
      check_mask(mask, B, T)  # (token routing checks it in group_tokens)
      if router_input is None:
        router_input = jnp.mean(x.astype(jnp.float32), axis=1)   # [B,D] the item's mean token
      elif router_input.shape != (B, D):
        raise ValueError(f"router_input has shape {router_input.shape}; expected (batch, dim) = {(B, D)}")
      if self.config.group_size is None:
        items_per_group = B  # all items of the batch form one group (one item per group could never drop)
      else:
        if self.config.group_size % T:
          raise ValueError(f"group_size={self.config.group_size} must be a multiple of the tokens per item T={T} "
                           "when route_per='item'")
        items_per_group = self.config.group_size // T
      if B % items_per_group:
        raise ValueError(f"group_size={self.config.group_size} holds {items_per_group} items, which does not divide "
                         f"the batch of {B} items")
      G = B // items_per_group
      valid = None if mask is None else jnp.any(mask, axis=1).reshape(G, items_per_group)
      return (x.reshape(G, items_per_group, T * D),
              router_input.astype(jnp.float32).reshape(G, items_per_group, D), None, T, valid)
    units, valid = group_tokens(x, self.config.group_size, mask)
    ids = None if token_ids is None else token_ids.reshape(units.shape[:2])
    return units, units.astype(jnp.float32), ids, 1, valid

  def __call__(self, x: jax.Array, *, router_input: jax.Array | None = None, token_ids: jax.Array | None = None,
               mask: jax.Array | None = None, deterministic: bool | None = None):
    """x [B,T,D] -> (y [B,T,D], MoeAux). mask [B,T] bool (optional): True for real tokens. Padding (False) takes
    no expert capacity, changes no other token's output and counts in no metric or loss; its own output is only
    the shared experts'."""
    if x.ndim != 3 or x.shape[-1] != self.dim:
      raise ValueError(f"x has shape {x.shape}; expected [batch, tokens, dim={self.dim}]")
    if router_input is not None and self.route_per != "item":
      raise ValueError("router_input is only used with route_per='item'")
    if self.router.needs_token_ids and token_ids is None:
      raise ValueError(f"router={self.router_kind!r} needs token_ids [batch, tokens] in the call")
    deterministic = self.router.deterministic if deterministic is None else deterministic
    config = self.config
    B, T, D = x.shape
    units, features, ids, tokens_per_unit, valid = self._units(
        x, router_input, token_ids, None if mask is None else jnp.asarray(mask, bool))
    mesh = sharding.current_expert_mesh()
    if mesh is not None and not is_dropless(config.dispatch, config.capacity_factor):
      # Every device routes its own groups (the dropless path has no groups).
      sharding.check_divisible(mesh, units.shape[0], self.num_experts)
      units, features = sharding.constrain_groups(units, mesh), sharding.constrain_groups(features, mesh)
    capacity = self.router.capacity(config, units.shape[1])
    routed, metrics = self.router.route(features, ids=ids, k=self.k, capacity=capacity,
                                        batch_priority=config.batch_priority, deterministic=deterministic,
                                        valid=valid, sequences=B)
    metrics["capacity"] = jnp.asarray(-1 if capacity is None else capacity)  # -1: dropless
    y = self.router.run_experts(self.experts, units, routed, dispatch=config.dispatch, capacity=capacity,
                                tokens_per_unit=tokens_per_unit, block_size=config.block_size,
                                grouped_matmul=config.grouped_matmul,
                                dropless_buffer_factor=config.dropless_buffer_factor)
    y = y.reshape(B, T, D)
    if self.shared is not None:
      y = y + self.shared.apply_all(x)
    return y, MoeAux(losses=weighted_losses(config, metrics), metrics=metrics)

  def first_choice(self, x: jax.Array, *, router_input: jax.Array | None = None,
                   token_ids: jax.Array | None = None) -> jax.Array:
    """The expert each routing unit ranks first, without running the experts (routing analysis, expert maps).

    x [B,T,D] -> int32 [B,T] for route_per="token", [B] for route_per="item". Noisy top-k is read without noise
    (as in evaluation); experts-choose reports the expert with the highest gate for the token. Soft routing has
    no first choice (every slot mixes all tokens) and raises.
    """
    if self.route_per == "item":
      features = (jnp.mean(x.astype(jnp.float32), axis=1) if router_input is None
                  else router_input.astype(jnp.float32))[None]                   # [1,B,D]
    else:
      features = x.astype(jnp.float32)                                           # [B,T,D]
    choice = self.router.first_choice(features, token_ids)
    return choice[0] if self.route_per == "item" else choice


HIERARCHICAL_DEFAULTS = MoeConfig(router="noisy_top_k", capacity_factor=None, dispatch="gather", activation="relu")


class HierarchicalMoeLayer(nnx.Module):
  """Shazeer et al. 2017 appendix B: y = sum_i sum_j Gp(x)_i G_i(x)_j E_ij(x). A primary noisy top-k gate picks
  `k_primary` of `num_groups` groups, a secondary one `k_secondary` of the chosen group's `experts_per_group`
  experts; the flattened choices go through MoeLayer's capacity and dispatch. Parameters, expert layout and the
  appendix B losses: docs/design.md, 'Hierarchical MoE'.
  """

  def __init__(self, dim: int, hidden_dim: int, num_groups: int, experts_per_group: int,
               config: MoeConfig | None = None, *, k_primary: int = 1, k_secondary: int = 1, rngs: nnx.Rngs,
               **options):
    """config (or keyword arguments over HIERARCHICAL_DEFAULTS): capacity_factor, dispatch, group_size,
    activation, importance_weight, load_weight, block_size; its num_experts, k and router are set here."""
    config = dataclasses.replace(config or HIERARCHICAL_DEFAULTS, **options, num_experts=num_groups, k=k_primary,
                                 router="noisy_top_k").validate()
    if not 1 <= k_secondary <= experts_per_group:
      raise ValueError(f"k_secondary={k_secondary!r} must be in [1, experts_per_group={experts_per_group}]")
    if config.balance_weight or config.z_loss_weight or config.num_shared_experts:
      raise ValueError("the hierarchical MoE has the importance and load losses of appendix B and no shared "
                       "experts; set balance_weight, z_loss_weight and num_shared_experts to 0")
    self.config, self.num_groups, self.experts_per_group = config, num_groups, experts_per_group
    self.k_primary, self.k_secondary = k_primary, k_secondary
    self.router = NoisyTopKRouter(dim, config, rngs=rngs)
    self.secondary_kernel = nnx.Param(jnp.zeros((dim, num_groups, experts_per_group)))
    self.secondary_noise_kernel = nnx.Param(jnp.zeros((dim, num_groups, experts_per_group)))
    E = num_groups * experts_per_group
    self.experts = Experts(E, dim, hidden_dim, activation=config.activation, rngs=rngs,
                           expert_axis=sharding.expert_axis_for(E))

  @property
  def experts_per_token(self) -> int:
    return self.k_primary * self.k_secondary

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool | None = None):
    """x [B,T,D] -> (y, MoeAux); mask [B,T] (optional) as in MoeLayer: padding takes no slot, counts nowhere."""
    deterministic = self.router.deterministic if deterministic is None else deterministic
    B, T, D = x.shape
    config = self.config
    units, valid = group_tokens(x, config.group_size, None if mask is None else jnp.asarray(mask, bool))
    G, S = units.shape[:2]
    A, Bx = self.num_groups, self.experts_per_group
    kp, ks = self.k_primary, self.k_secondary
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
    capacity = routing_capacity(config.dispatch, config.capacity_factor, S, E, kp * ks)
    assignment = routing.assign_slots(expert_index, gates, E, capacity, valid=valid)
    y = run_experts(self.experts, units, assignment, dispatch=config.dispatch, capacity=capacity,
                    tokens_per_unit=1, block_size=config.block_size, grouped_matmul=config.grouped_matmul,
                    dropless_buffer_factor=config.dropless_buffer_factor)
    # Appendix B losses.
    metrics = losses_lib.token_choice_metrics(None, None, expert_index, gates, assignment.kept, E, valid)
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
    return y.reshape(B, T, D), MoeAux(losses=weighted_losses(config, metrics), metrics=metrics)
