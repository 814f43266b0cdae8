"""`MoeConfig`: every hyper-parameter of a MoE layer, declared, defaulted and validated in one place.

    config = MoeConfig(num_experts=8, k=2, capacity_factor=1.25)
    layer = MoeLayer(dim, hidden_dim, config, rngs=nnx.Rngs(0))

A model config block (ml_collections `model.moe`, or a dict) becomes a `MoeConfig` in `MoeConfig.from_dict`, and
only there. Errors name the key (with the model's prefix, e.g. "model.moe."), its value and what is valid. What a
router allows (k, capacity, causal use, which losses) is asked of the router itself (vimoe/moe/routers.py).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from vimoe.moe.dispatch import GROUPED_MATMULS
from vimoe.moe.experts import check_activation

DISPATCHES = ("einsum", "gather")
ROUTE_PER = ("token", "item")
SCORES = ("softmax", "sigmoid")
LOSS_WEIGHTS = ("load_weight", "importance_weight", "balance_weight", "z_loss_weight", "sequence_balance_weight")
# DeepSeek-style routing settings (docs/design.md, 'DeepSeek-style routing') and their off values; only routers
# with `affinity_routing` accept other values.
AFFINITY_DEFAULTS = (("score", "softmax"), ("routed_scale", 1.0), ("bias_update_rate", 0.0), ("num_groups", 1),
                     ("groups_per_token", 1), ("sequence_balance_weight", 0.0))
# Keys whose value None is itself a setting; for every other key None means "the default".
NONE_IS_A_VALUE = ("capacity_factor", "group_size", "block_size", "dropless_buffer_factor")


def choose(key: str, value, valid) -> None:
  """Raises a ValueError naming `key`, `value` and the valid choices unless `value in valid`."""
  if value not in valid:
    raise ValueError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(repr, valid))}")


def is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Arguments of a `MoeLayer` (see its docstring and docs/design.md, 'MoE layer contract').

  num_experts, k: experts and experts per token (Soft MoE ignores k). router: a name in `vimoe.moe.ROUTERS`.
  capacity_factor: C = ceil(k * S * capacity_factor / E) slots per expert and group; None never drops.
  dispatch: "einsum" (one-hot tensors) or "gather" (indices; with capacity_factor=None the dropless path).
  group_size: tokens per routing group (None: one item's tokens; with route_per="item", the whole batch).
  route_per: "token", or "item" (one decision per item, from `router_input` or the item's mean token).
  num_shared_experts: always-on experts added to the routed output. normalize_gates: top-k gates sum to 1.
  activation: the experts' activation (vimoe.moe.ACTIVATIONS).
  batch_priority: order capacity by top-1 router probability instead of position (BPR, Riquelme et al. 2021).
  causal: the layer sits in a decoder; routers that see other tokens are refused.
  slots_per_expert: P for router="soft".
  importance_weight, load_weight: Shazeer 2017 losses (load only for noisy_top_k); balance_weight: Switch/GShard
    balance loss; z_loss_weight: router z-loss.
  block_size: rows per overflow block of the dropless path (None: about sqrt of the mean load per expert).
  grouped_matmul: how the dropless path runs its experts: "block_loop" (balanced batch + overflow blocks),
    "ragged_dot" (`lax.ragged_dot`, one grouped matmul per weight), "gmm" (megablox's Pallas grouped matmul,
    TPU) or "auto" (per platform, from measurements: vimoe.moe.dispatch.AUTO_GROUPED_MATMUL).
  dropless_buffer_factor: the dropless path under a mesh with an 'expert' axis of size n: each device receives at
    most ceil(factor * A_l) token rows, A_l its local assignments (tokens x k; a balanced router sends A_l on
    average); None: n * A_l, the exact worst case, which never drops. Rows past the bound raise an error from the
    device naming this key (vimoe/moe/sharding.py, `sharded_dropless_moe`). Default None: dropless stays exact
    whatever the routing (early training and per-item routing can send one device several times its share). 2.0
    bounds the buffer (and the expert compute over it) to 2/n of the worst case (1/4 at n = 8): a device's
    experts then need more than twice their fair share of a step's assignments to overflow it. On CPU the padded
    exchange bounds each (source, destination) pair to R / n rows, a stricter test than the per-device total.
  DeepSeek-style routing (docs/design.md, 'DeepSeek-style routing'; top_k and prototype routers only):
  score: the expert affinities s, "softmax" or "sigmoid" (the K gates are the chosen s, renormalised when
    normalize_gates). routed_scale: multiplies the routed gates (both scores).
  bias_update_rate: gamma of auxiliary-loss-free balancing; > 0 adds the per-expert bias `router.bias` to the
    scores that choose experts, updated after every training call by gamma * sign(mean load - load).
  num_groups, groups_per_token: group-limited routing; experts form num_groups contiguous groups and each token
    chooses among the experts of its groups_per_token best groups.
  sequence_balance_weight: DeepSeek-V3's sequence-wise balance loss.
  """
  num_experts: int = 8
  k: int = 1
  router: str = "top_k"
  capacity_factor: float | None = 1.25
  dispatch: str = "einsum"
  group_size: int | None = None
  route_per: str = "token"
  num_shared_experts: int = 0
  normalize_gates: bool = False
  activation: str = "gelu"
  batch_priority: bool = False
  causal: bool = False
  slots_per_expert: int = 1
  importance_weight: float = 0.0
  load_weight: float = 0.0
  balance_weight: float = 0.0
  z_loss_weight: float = 0.0
  block_size: int | None = None
  grouped_matmul: str = "auto"
  dropless_buffer_factor: float | None = None
  score: str = "softmax"
  routed_scale: float = 1.0
  bias_update_rate: float = 0.0
  num_groups: int = 1
  groups_per_token: int = 1
  sequence_balance_weight: float = 0.0

  @classmethod
  def from_dict(cls, given: Mapping | None, *, defaults: MoeConfig | None = None, prefix: str = "",
                validate: bool = True, **fixed) -> MoeConfig:
    """A config block {key: value} over `defaults`; None means the default except for NONE_IS_A_VALUE keys.

    `fixed` are values the model sets itself (e.g. causal=True in a decoder). Validated unless validate=False
    (a model whose config selects no MoE block leaves its unused MoE settings unchecked).
    """
    values = {key: value for key, value in dict(given or {}).items()
              if value is not None or key in NONE_IS_A_VALUE}
    config = dataclasses.replace(defaults or cls(), **values, **fixed)
    if validate:
      config.validate(prefix)
    return config

  def validate(self, prefix: str = "") -> MoeConfig:
    """Raises a ValueError that starts with the key (after `prefix`), its value and what is valid."""
    try:
      self._check(prefix)
    except ValueError as error:
      raise ValueError(f"{prefix}{error}") from None
    return self

  def _check(self, prefix: str) -> None:
    from vimoe.moe.routers import ROUTERS  # pylint: disable=import-outside-toplevel  (routers import this module)
    choose("router", self.router, ROUTERS)
    choose("dispatch", self.dispatch, DISPATCHES)
    choose("route_per", self.route_per, ROUTE_PER)
    choose("grouped_matmul", self.grouped_matmul, GROUPED_MATMULS)
    check_activation(self.activation)
    router = ROUTERS[self.router]
    E, k = self.num_experts, self.k
    if not is_int(E) or E < 1:
      raise ValueError(f"num_experts={E!r} must be a positive integer")
    if router.uses_k and (not is_int(k) or not 1 <= k <= E):
      raise ValueError(f"k={k!r} must be an integer in [1, {prefix}num_experts={E}]")
    if self.capacity_factor is not None and not self.capacity_factor > 0:
      raise ValueError(f"capacity_factor={self.capacity_factor!r} must be > 0, or None for no token dropping")
    if self.group_size is not None and (not is_int(self.group_size) or self.group_size < 1):
      raise ValueError(f"group_size={self.group_size!r} must be a positive integer or None (one group per item)")
    factor = self.dropless_buffer_factor
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float, np.number))
                               or not factor >= 1):
      raise ValueError(f"dropless_buffer_factor={factor!r} must be a number >= 1 (receive rows per device = factor x "
                       "local assignments; 1 holds exactly a balanced load) or None (the worst case, never drops)")
    if self.num_shared_experts < 0:
      raise ValueError(f"num_shared_experts={self.num_shared_experts!r} must be >= 0")
    router.check_config(self)
    if self.causal:
      causal_routers = ", ".join(name for name, r in ROUTERS.items() if not r.sees_other_tokens)
      if router.sees_other_tokens:
        raise ValueError(f"router={self.router!r} with causal=True: this router looks at every token of the group, "
                         f"including future ones; use one of {causal_routers}")
      if self.batch_priority:
        raise ValueError("batch_priority=True with causal=True: ordering tokens by gate lets future tokens take "
                         "capacity from earlier ones; use batch_priority=False")
      if self.capacity_factor is not None and k > 1:
        # Capacity serves every first choice of a group before any second choice, so a later token's first choice
        # can push out an earlier token's second choice: the earlier token's output would depend on the future.
        raise ValueError(f"capacity_factor={self.capacity_factor!r} with k={k} and causal=True: later tokens could "
                         "drop earlier tokens' second choices (not causal); use capacity_factor=None (dropless) "
                         "or k=1")
    if self.batch_priority and not router.has_priority:
      with_priority = ", ".join(name for name, r in ROUTERS.items() if r.has_priority)
      raise ValueError(f"batch_priority=True with router={self.router!r}: only token-choice routers "
                       f"({with_priority}) have a priority order")
    for name in LOSS_WEIGHTS:
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
    if self.load_weight > 0 and not router.has_load_loss:
      raise ValueError(f"load_weight={self.load_weight!r} with router={self.router!r}: Shazeer's load loss needs "
                       "the noise of router='noisy_top_k'; use balance_weight for other routers")
    if not router.learns_routing and (self.importance_weight or self.balance_weight or self.z_loss_weight):
      raise ValueError(f"router={self.router!r} has no learned discrete routing to balance; set importance_weight, "
                       "balance_weight and z_loss_weight to 0")
    self._check_affinity_routing(prefix, router, ROUTERS)

  def _check_affinity_routing(self, prefix: str, router, routers) -> None:
    """The DeepSeek-style settings: values, and only for routers with `affinity_routing`."""
    choose("score", self.score, SCORES)
    if not self.routed_scale > 0:
      raise ValueError(f"routed_scale={self.routed_scale!r} must be > 0")
    if not self.bias_update_rate >= 0:
      raise ValueError(f"bias_update_rate={self.bias_update_rate!r} must be >= 0 (0: no routing bias)")
    G, Kg, E = self.num_groups, self.groups_per_token, self.num_experts
    if not is_int(G) or not 1 <= G <= E:
      raise ValueError(f"num_groups={G!r} must be an integer in [1, {prefix}num_experts={E}]")
    if E % G:
      raise ValueError(f"num_groups={G} does not divide {prefix}num_experts={E}; expert groups must be equal")
    if not is_int(Kg) or not 1 <= Kg <= G:
      raise ValueError(f"groups_per_token={Kg!r} must be an integer in [1, {prefix}num_groups={G}]")
    if router.uses_k and self.k > Kg * (E // G):
      raise ValueError(f"groups_per_token={Kg} with {prefix}num_groups={G} leaves {Kg * (E // G)} experts per "
                       f"token to choose from, fewer than {prefix}k={self.k}; raise groups_per_token or lower k")
    if not router.affinity_routing:
      accepting = ", ".join(repr(name) for name, r in routers.items() if r.affinity_routing)
      for key, off in AFFINITY_DEFAULTS:
        if getattr(self, key) != off:
          raise ValueError(f"{key}={getattr(self, key)!r} with {prefix}router={self.router!r}: DeepSeek-style "
                           f"routing is for routers {accepting}; use {key}={off!r}")


def as_config(config: MoeConfig | int | None, k: int | None, options: dict) -> MoeConfig:
  """A MoeConfig from either a MoeConfig or the keyword-argument convenience (num_experts, k, **fields)."""
  if isinstance(config, MoeConfig):
    if k is not None or options:
      raise TypeError(f"pass a MoeConfig or keyword arguments, not both (got k={k!r} and {sorted(options)})")
    return config
  if config is not None:
    options["num_experts"] = config
  if k is not None:
    options["k"] = k
  return MoeConfig(**options)
