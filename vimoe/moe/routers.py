"""Routers as plug-ins: each router is one small nnx.Module, registered by name in `ROUTERS`.

A router owns its parameters (under the layer's `router.*`, e.g. `router.kernel`) and answers four questions:
  route(features, ...)  -> (Assignment, metrics): which expert slot every (unit, choice) goes to, and its statistics
  priority               the order in which units take capacity under batch priority routing (token-choice only)
  first_choice(features) -> the expert each unit ranks first (routing analysis), without running the experts
  check_config(config)   the rules of `MoeConfig` that are this router's own (e.g. hash needs k=1)
and a few class attributes that the generic validation and the layer read (`uses_k`, `sees_other_tokens`, ...).

Adding a router: subclass `Router` (or `TokenChoiceRouter`, which only needs `gate`), decorate it with
`@register_router`, and add its tests. Nothing else names routers. The math stays in vimoe/moe/routing.py.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vimoe.moe import losses as losses_lib
from vimoe.moe import routing
from vimoe.moe import sharding
from vimoe.moe.config import MoeConfig

ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
  """Class decorator: makes `cls` available as MoeConfig(router=cls.name)."""
  ROUTERS[cls.name] = cls
  return cls


class Gating(NamedTuple):
  """What a token-choice router decides for units [G,S]: expert_index, gates [G,S,K]; probs, logits [G,S,E] (or
  None: no balance or z-loss metric); priority [G,S] (batch priority order); extra metrics."""
  expert_index: jax.Array
  gates: jax.Array
  probs: jax.Array | None
  logits: jax.Array | None
  priority: jax.Array
  metrics: dict


class Router(nnx.Module):
  """Base class. `features` are float32 [G,S,D]; `ids` token ids [G,S] or None; `valid` [G,S] bool or None."""
  name: ClassVar[str]
  uses_k: ClassVar[bool] = True              # False: k is ignored (Soft MoE)
  sees_other_tokens: ClassVar[bool] = False  # the decision for one unit depends on others of its group
  has_priority: ClassVar[bool] = False       # batch priority routing applies
  has_load_loss: ClassVar[bool] = False      # Shazeer's load loss (needs router noise)
  learns_routing: ClassVar[bool] = True      # False: nothing to balance (no importance, balance or z-loss)
  needs_token_ids: ClassVar[bool] = False
  affinity_routing: ClassVar[bool] = False   # accepts the DeepSeek-style settings (score, bias, groups, ...)

  def __init__(self, dim: int, config: MoeConfig, *, rngs: nnx.Rngs):
    del dim, rngs
    self.num_experts, self.normalize_gates = config.num_experts, config.normalize_gates
    self.sequence_balance = config.sequence_balance_weight > 0
    self.deterministic = False

  @classmethod
  def check_config(cls, config: MoeConfig) -> None:
    """Raises a ValueError (key first) for settings this router cannot honour."""

  def experts_per_token(self, k: int) -> int:
    """Experts whose parameters one unit uses (activated-parameter counts)."""
    return k

  def capacity(self, config: MoeConfig, tokens_per_group: int) -> int | None:
    """Slots per expert per group (None: the dropless path); reported as the 'capacity' metric."""
    return routing_capacity(config.dispatch, config.capacity_factor, tokens_per_group, self.num_experts, config.k)

  def logits(self, features: jax.Array) -> jax.Array:
    return features @ self.kernel[...]

  def first_choice(self, features: jax.Array, ids: jax.Array | None) -> jax.Array:
    """The expert each unit ranks first [G,S] int32: the arg-max of the router logits."""
    del ids
    return jnp.argmax(self.logits(features), axis=-1).astype(jnp.int32)

  def route(self, features, *, ids, k: int, capacity, batch_priority: bool, deterministic: bool, valid,
            sequences: int | None = None):
    """-> (what `run_experts` needs: an Assignment for discrete routers, metrics). `sequences`: how many
    sequences (batch rows) the G*S units come from, in order (None: one per group), for per-sequence losses."""
    raise NotImplementedError

  def run_experts(self, experts, units, routed, **dispatch_args):
    """units [G,S,M] -> [G,S,M], the experts' combined outputs (vimoe/moe/sharding.py, `run_experts`)."""
    return sharding.run_experts(experts, units, routed, **dispatch_args)


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


class TokenChoiceRouter(Router):
  """Every unit picks K experts (`gate`); slots go first choices first, by position or by `priority`."""
  has_priority = True

  def gate(self, features: jax.Array, k: int, *, ids=None, deterministic: bool = True, valid=None) -> Gating:
    raise NotImplementedError

  def first_choice(self, features, ids):
    """The first of a unit's choices (routers with logits: their arg-max, as Router does)."""
    return self.gate(features, 1, ids=ids).expert_index[..., 0]

  def route(self, features, *, ids, k, capacity, batch_priority, deterministic, valid, sequences=None):
    g = self.gate(features, k, ids=ids, deterministic=deterministic, valid=valid)
    assignment = routing.assign_slots(g.expert_index, g.gates, self.num_experts, capacity,
                                      g.priority if batch_priority else None, valid)
    metrics = losses_lib.token_choice_metrics(g.probs, g.logits, g.expert_index, g.gates, assignment.kept,
                                              self.num_experts, valid)
    metrics.update(g.metrics)
    if self.sequence_balance:
      metrics["sequence_balance_loss"] = sequence_balance_metric(g, valid, sequences)
    return assignment, metrics


def sequence_balance_metric(g: Gating, valid, sequences: int | None) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss of a gating over units [G,S] that come from `sequences` rows."""
  G, S, K = g.expert_index.shape
  B = G if sequences is None else sequences
  per_row = lambda t: t.reshape((B, G * S // B) + t.shape[2:])
  return losses_lib.sequence_balance_loss(per_row(g.probs), per_row(g.expert_index),
                                          None if valid is None else per_row(valid))


class RouterBias(nnx.Variable):
  """The per-expert routing bias of auxiliary-loss-free balancing [E]: not an nnx.Param, so it gets no gradient
  and the optimizer never touches it; it is saved in checkpoints with the rest of the model state."""


class PendingLoad(nnx.Variable):
  """The summed expert loads [E] of training calls whose bias update is deferred (gradient accumulation: one
  update from the whole batch's load, as one big batch makes it). It exists only between `defer_bias_updates`
  and `apply_deferred_bias_updates`, inside one train step: never in a checkpoint."""


def _bias_routers(model: nnx.Module) -> list:
  return [node for _, node in nnx.iter_graph(model)
          if isinstance(node, TopKRouter) and node.bias is not None]


def defer_bias_updates(model: nnx.Module) -> None:
  """From now on the training calls of `model`'s bias routers only add their loads to a PendingLoad."""
  for router in _bias_routers(model):
    router.pending_load = nnx.data(PendingLoad(jnp.zeros((router.num_experts,), jnp.float32)))


def apply_deferred_bias_updates(model: nnx.Module) -> None:
  """One bias update per router from the loads summed since `defer_bias_updates`; back to updating per call."""
  for router in _bias_routers(model):
    router.apply_bias_update(router.pending_load[...])
    router.pending_load = None


@register_router
class TopKRouter(TokenChoiceRouter):
  """Softmax top-k (Switch, GShard, V-MoE): `kernel` [D,E]. Batch priority orders by top-1 router probability (a
  renormalised k=1 gate is 1 for every token).

  DeepSeek-style routing (docs/design.md): sigmoid scores, routed_scale, group-limited choice and, with
  bias_update_rate > 0, `bias` [E] (a RouterBias) added to the scores that choose experts and updated after every
  training call (deterministic=False) by bias_update_rate * sign(mean load - load) from the call's loads."""
  name = "top_k"
  affinity_routing = True

  def __init__(self, dim, config, *, rngs):
    super().__init__(dim, config, rngs=rngs)
    self.kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (dim, config.num_experts)))
    self._init_affinity(config)

  def _init_affinity(self, config: MoeConfig) -> None:
    self.score, self.routed_scale = config.score, config.routed_scale
    self.num_groups, self.groups_per_token = config.num_groups, config.groups_per_token
    self.bias_update_rate = config.bias_update_rate
    self.bias = RouterBias(jnp.zeros((config.num_experts,), jnp.float32)) if config.bias_update_rate > 0 else None
    self.pending_load = None  # a PendingLoad while updates are deferred (defer_bias_updates)
    # Every setting off: the softmax top-k exactly as before they existed.
    self.plain = (config.score == "softmax" and config.routed_scale == 1.0 and self.bias is None
                  and config.num_groups == 1)

  def first_choice(self, features, ids):
    if self.plain:
      return Router.first_choice(self, features, ids)
    return TokenChoiceRouter.first_choice(self, features, ids)  # the bias and the groups change the choice

  def gate(self, features, k, *, ids=None, deterministic=True, valid=None):
    logits = self.logits(features)
    if self.plain:
      expert_index, gates, probs = routing.top_k_gating(logits, k, self.normalize_gates)
      return Gating(expert_index, gates, probs, logits, jnp.max(probs, -1), {})
    bias = None if self.bias is None else self.bias[...]
    expert_index, gates, scores = routing.affinity_gating(
        logits, k, score=self.score, normalize=self.normalize_gates, routed_scale=self.routed_scale, bias=bias,
        num_groups=self.num_groups, groups_per_token=self.groups_per_token)
    # The balance metrics and losses read normalised affinities s / sum(s) (softmax: already normalised).
    probs = (scores if self.score == "softmax"
             else scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny))
    metrics = {}
    if self.bias is not None:
      metrics["bias_range"] = jnp.max(bias) - jnp.min(bias)
      if not deterministic:
        self.update_bias(expert_index, valid)
    return Gating(expert_index, gates, probs, logits, jnp.max(scores, -1), metrics)

  def update_bias(self, expert_index: jax.Array, valid: jax.Array | None) -> None:
    """bias += rate * sign(mean load - load): load_e = the call's (valid) choices of expert e, all groups
    together (under a mesh, a global sum, so every replica makes the same update). No gradient flows. While
    updates are deferred (defer_bias_updates), the load is only added to `pending_load`."""
    one_hot = jax.nn.one_hot(expert_index, self.num_experts, dtype=jnp.float32)               # [G,S,K,E]
    if valid is not None:
      one_hot = one_hot * valid[..., None, None].astype(jnp.float32)
    load = jax.lax.stop_gradient(jnp.sum(one_hot, axis=tuple(range(one_hot.ndim - 1))))       # [E]
    if self.pending_load is not None:
      self.pending_load[...] = self.pending_load[...] + load
    else:
      self.apply_bias_update(load)

  def apply_bias_update(self, load: jax.Array) -> None:
    """bias += rate * sign(mean load - load) for a load [E] (counts of choices)."""
    self.bias[...] = self.bias[...] + self.bias_update_rate * jnp.sign(jnp.mean(load) - load)


@register_router
class NoisyTopKRouter(TokenChoiceRouter):
  """Shazeer et al. 2017 eqs. 3-5: `kernel`, `noise_kernel` [D,E], both zero-initialised (appendix A). Reports the
  load loss (eqs. 8-11) and orders batch priority by the top-1 probability of the noisy logits."""
  name = "noisy_top_k"
  has_load_loss = True
  first_choice = Router.first_choice   # read without noise, as in evaluation

  def __init__(self, dim, config, *, rngs):
    super().__init__(dim, config, rngs=rngs)
    self.kernel = nnx.Param(jnp.zeros((dim, config.num_experts)))
    self.noise_kernel = nnx.Param(jnp.zeros((dim, config.num_experts)))
    self.noise_rngs = rngs.fork()

  def noisy_logits(self, x: jax.Array, deterministic: bool):
    """Shazeer 2017 eq. 4 pieces: (clean logits, noise std, standard-normal noise or None), each [..., E]."""
    clean = x @ self.kernel[...]
    noise_std = jax.nn.softplus(x @ self.noise_kernel[...])
    noise = None if deterministic else jax.random.normal(self.noise_rngs.noise(), clean.shape)
    return clean, noise_std, noise

  def gate(self, features, k, *, ids=None, deterministic=True, valid=None):
    clean, noise_std, noise = self.noisy_logits(features, deterministic)
    expert_index, gates, noisy = routing.noisy_top_k_gating(clean, noise_std, noise, k)
    load_probability = routing.shazeer_load_probability(clean, noise_std, noisy, k)
    if valid is not None:
      load_probability = load_probability * valid[..., None]
    load_probability = load_probability.reshape(-1, self.num_experts)
    metrics = {"load_loss": losses_lib.load_loss(load_probability),
               "smooth_load_cv": losses_lib.coefficient_of_variation(jnp.sum(load_probability, 0))}
    return Gating(expert_index, gates, jax.nn.softmax(clean, -1), clean, jnp.max(jax.nn.softmax(noisy, -1), -1),
                  metrics)


@register_router
class ExpertsChooseRouter(Router):
  """Expert-choice routing (Zhou et al. 2022): `kernel` [D,E]; each expert takes its top-C units of the group."""
  name = "experts_choose"
  sees_other_tokens = True

  def __init__(self, dim, config, *, rngs):
    super().__init__(dim, config, rngs=rngs)
    self.kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (dim, config.num_experts)))

  @classmethod
  def check_config(cls, config):
    if config.capacity_factor is None:
      raise ValueError("capacity_factor=None with router='experts_choose': each expert takes its top-C tokens, "
                       "so a capacity factor (> 0) is required")

  def route(self, features, *, ids, k, capacity, batch_priority, deterministic, valid, sequences=None):
    E = self.num_experts
    logits = self.logits(features)
    probs = jax.nn.softmax(logits, -1)
    assignment = routing.experts_choose_assignment(probs, capacity, valid)
    chosen_by_any = jnp.any(assignment.kept, axis=-1)
    counts = jnp.sum(assignment.kept.astype(jnp.float32), axis=(0, 1))
    dense_gates = assignment.weight.reshape(-1, E)
    flat_valid = None if valid is None else valid.reshape(-1)
    metrics = {"dropped_fraction": 1.0 - losses_lib.masked_mean(chosen_by_any.reshape(-1).astype(jnp.float32),
                                                                flat_valid),
               "importance_cv": losses_lib.coefficient_of_variation(jnp.sum(dense_gates, 0)),
               "importance_loss": losses_lib.importance_loss(dense_gates),
               "router_z_loss": losses_lib.router_z_loss(logits.reshape(-1, E), flat_valid),
               "balance_loss": losses_lib.switch_balance_loss(probs.reshape(-1, E),
                                                              jnp.argmax(probs, -1).reshape(-1), flat_valid),
               **losses_lib.load_metrics(counts)}
    return assignment, metrics


@register_router
class SoftRouter(Router):
  """Soft MoE (Puigcerver et al. 2023): `kernel` [D,E,P] slot embeddings and `scale`. Every slot mixes every token
  of the group, so there is no discrete assignment: `route` returns (dispatch, combine) weights [G,S,E,P] and
  `run_experts` mixes, runs and combines (einsum only). Every expert counts as active for every token."""
  name = "soft"
  uses_k = False
  sees_other_tokens = True
  learns_routing = False

  def __init__(self, dim, config, *, rngs):
    super().__init__(dim, config, rngs=rngs)
    P = config.slots_per_expert
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (dim, config.num_experts, P)) / math.sqrt(dim))
    self.scale = nnx.Param(jnp.ones(()))

  @classmethod
  def check_config(cls, config):
    if config.dispatch != "einsum":
      raise ValueError(f"dispatch={config.dispatch!r} with router='soft': Soft MoE mixes every token into every "
                       "slot, which only the einsum dispatch expresses; use dispatch='einsum'")

  def experts_per_token(self, k):
    return self.num_experts

  def capacity(self, config, tokens_per_group):
    return config.slots_per_expert

  def first_choice(self, features, ids):
    raise ValueError("router='soft' has no first-choice expert: every slot is a mixture of all tokens")

  def route(self, features, *, ids, k, capacity, batch_priority, deterministic, valid, sequences=None):
    weights = routing.soft_routing(features, self.kernel[...], self.scale[...], valid)
    combine = weights[1]
    mass = jnp.sum(combine if valid is None else combine * valid[..., None, None], axis=(0, 1, 3))
    return weights, {"dropped_fraction": jnp.zeros(()), **losses_lib.load_metrics(mass)}

  def run_experts(self, experts, units, routed, **unused):
    """units [G,S,M] -> [G,S,M]: slots = dispatch-weighted sums of tokens, experts on slots, combine-weighted sum."""
    del unused
    dispatch_weights, combine = routed
    E, D = experts.num_experts, experts.dim
    expert_in = jnp.einsum("GSEP,GSM->EGPM", dispatch_weights.astype(units.dtype), units)
    expert_out = experts(expert_in.reshape(E, -1, D)).reshape(expert_in.shape)
    return jnp.einsum("GSEP,EGPM->GSM", combine.astype(units.dtype), expert_out)


@register_router
class PrototypeRouter(TopKRouter):
  """Voronoi routing (MoMLP): `kernel` [D,E] holds one prototype per column, N(0, 1) initialised."""
  name = "prototype"

  def __init__(self, dim, config, *, rngs):  # pylint: disable=super-init-not-called
    Router.__init__(self, dim, config, rngs=rngs)
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (dim, config.num_experts)))
    self._init_affinity(config)

  def logits(self, features):
    return routing.prototype_logits(features, self.kernel[...])


@register_router
class HashRouter(TokenChoiceRouter):
  """Hash routing (Roller et al. 2021): a fixed expert per token id, gate 1; no parameters. Batch priority has
  nothing to order by (ties), so position order stays."""
  name = "hash"
  needs_token_ids = True
  learns_routing = False

  @classmethod
  def check_config(cls, config):
    if config.k != 1:
      raise ValueError(f"k={config.k!r} with router='hash': hash routing assigns exactly one expert per token; "
                       "use k=1")
    if config.route_per == "item":
      raise ValueError("route_per='item' with router='hash': hash routing needs token ids; use route_per='token'")

  def first_choice(self, features, ids):
    if ids is None:
      raise ValueError("router='hash' needs token_ids [batch, tokens]")
    return routing.hash_expert_index(ids, self.num_experts)[..., 0]

  def gate(self, features, k, *, ids=None, deterministic=True, valid=None):
    expert_index = routing.hash_expert_index(ids, self.num_experts)
    gates = jnp.ones(expert_index.shape, jnp.float32)
    return Gating(expert_index, gates, None, None, gates[..., 0], {})
