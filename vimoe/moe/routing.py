"""Routers as pure functions: router logits in, a token-major expert assignment out.

Axis glossary, used by every einsum string and shape comment in `vimoe.moe`:
  G  groups: routing (and capacity) is decided independently per group
  S  tokens (or items, with route_per="item") per group
  E  experts
  C  expert capacity: buffer slots per expert per group
  K  experts chosen per token (top-k); K = E for experts-choose routing
  P  slots per expert (Soft MoE)
  D  model dimension (M in the payload of a routed item)
  H  expert hidden dimension

Every token-choice router produces `(expert_index [G,S,K], gates [G,S,K])`; `assign_slots` turns that into an
`Assignment` by giving each (token, choice) a slot in its expert's buffer and dropping what does not fit.
Experts-choose routing builds its `Assignment` directly. Soft MoE has no discrete assignment (see `soft_routing`).
All routing math runs in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Assignment:
  """Where each (token, choice) goes.

  expert_index [G,S,K] int32: the expert of each choice.
  slot         [G,S,K] int32: position in that expert's buffer (valid only where `kept`).
  weight       [G,S,K] f32:   combine weight, zero where the choice was dropped.
  kept         [G,S,K] bool:  the choice fitted within the capacity.
  """
  expert_index: jax.Array
  slot: jax.Array
  weight: jax.Array
  kept: jax.Array


def expert_capacity(tokens_per_group: int, num_experts: int, k: int, capacity_factor: float | None) -> int:
  """C = ceil(K * S * capacity_factor / E) (GShard), at least 1 and at most S.

  With `capacity_factor=None` C = S: a token picks K distinct experts, so no expert can be asked for more than S
  slots in a group and nothing is ever dropped.
  """
  if capacity_factor is None:
    return tokens_per_group
  capacity = math.ceil(k * tokens_per_group * capacity_factor / num_experts)
  return max(1, min(capacity, tokens_per_group))


def top_k_gating(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax router. logits [G,S,E] -> (expert_index [G,S,K], gates [G,S,K], probs [G,S,E]).

  `gates` are the softmax probabilities of the chosen experts, so with k=1 the gate is the Switch-style
  ungated top-1 probability and carries gradient to the router. `normalize` renormalises them to sum to 1.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  gates, expert_index = jax.lax.top_k(probs, k)
  if normalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return expert_index.astype(jnp.int32), gates, probs


def group_limited_mask(choice: jax.Array, num_groups: int, groups_per_token: int, k: int) -> jax.Array:
  """Group-limited routing (DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2): choice scores [..., E] -> bool [..., E],
  True for the experts of each token's `groups_per_token` best groups. Experts form `num_groups` contiguous
  groups of E / num_groups.

  Group score rule: a group's score is the sum of its top ceil(k / groups_per_token) choice scores (at most the
  E / num_groups it holds): the number of experts a token would take from each of its groups if it spread its k
  choices evenly over them. DeepSeek-V3 routes k=8 over 4 groups per token and sums each group's top 2, which is
  this rule's ceil(8 / 4) = 2 (MaxText's moe.py hard-codes that 2).
  """
  E = choice.shape[-1]
  per_group = E // num_groups
  top_per_group = min(-(-k // groups_per_token), per_group)                                      # ceil(k / Kg)
  grouped = choice.reshape(choice.shape[:-1] + (num_groups, per_group))
  group_score = jnp.sum(jax.lax.top_k(grouped, top_per_group)[0], axis=-1)                      # [..., groups]
  _, best = jax.lax.top_k(group_score, groups_per_token)                                         # [..., Kg]
  allowed = jnp.any(jax.nn.one_hot(best, num_groups, dtype=jnp.bool_), axis=-2)                  # [..., groups]
  return jnp.repeat(allowed, per_group, axis=-1)


def affinity_gating(logits: jax.Array, k: int, *, score: str, normalize: bool, routed_scale: float = 1.0,
                    bias: jax.Array | None = None, num_groups: int = 1, groups_per_token: int = 1):
  """DeepSeek-style top-k: logits [G,S,E] -> (expert_index [G,S,K], gates [G,S,K], scores [G,S,E]).

  scores s = softmax(logits) or sigmoid(logits). Experts are chosen by s + bias ([E], auxiliary-loss-free
  balancing; None: s alone), among the experts of the `groups_per_token` best of `num_groups` groups
  (`group_limited_mask`: a group scores the sum of its top ceil(k / groups_per_token)). The gates are the
  unbiased s of the chosen experts, divided by their sum when `normalize`, times `routed_scale`. With
  score="softmax" and the other settings off this is `top_k_gating`.
  """
  logits = logits.astype(jnp.float32)
  scores = jax.nn.softmax(logits, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits)
  choice = scores if bias is None else scores + bias.astype(jnp.float32)
  if num_groups > 1:
    choice = jnp.where(group_limited_mask(choice, num_groups, groups_per_token, k), choice, -jnp.inf)
  _, expert_index = jax.lax.top_k(choice, k)
  gates = jnp.take_along_axis(scores, expert_index, axis=-1)
  if normalize:  # (sigmoid scores can all underflow to 0: no 0/0)
    gates = gates / jnp.maximum(jnp.sum(gates, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  if routed_scale != 1.0:
    gates = gates * routed_scale
  return expert_index.astype(jnp.int32), gates, scores


def noisy_top_k_gating(clean_logits: jax.Array, noise_std: jax.Array, noise: jax.Array | None, k: int):
  """Shazeer et al. 2017, eqs. 3-5: H = x Wg + N(0,1) * softplus(x Wnoise); G = softmax(KeepTopK(H, k)).

  clean_logits, noise_std [G,S,E] (noise_std = softplus(x Wnoise)); `noise` [G,S,E] standard normal samples, or
  None at evaluation time (no noise). Returns (expert_index [G,S,K], gates [G,S,K], noisy_logits [G,S,E]).
  The gates always sum to 1 over the K kept experts (softmax after KeepTopK).
  """
  noisy = clean_logits if noise is None else clean_logits + noise * noise_std
  top_values, expert_index = jax.lax.top_k(noisy, k)
  gates = jax.nn.softmax(top_values, axis=-1)
  return expert_index.astype(jnp.int32), gates, noisy


def shazeer_load_probability(clean_logits, noise_std, noisy_logits, k: int) -> jax.Array:
  """P(x, i) of Shazeer 2017 eq. 9: the probability that expert i stays in the top k under a new noise draw.

  P(x,i) = Phi(((x Wg)_i - kth_excluding(H(x), k, i)) / softplus((x Wnoise)_i)), where kth_excluding is the k-th
  largest entry of H(x) with entry i left out: the (k+1)-th largest of H if i is among the top k, the k-th
  largest otherwise. Shapes [G,S,E] -> [G,S,E].
  """
  num_experts = noisy_logits.shape[-1]
  if k >= num_experts:  # every expert is always selected
    return jnp.ones_like(noisy_logits)
  top_values, _ = jax.lax.top_k(noisy_logits, k + 1)
  kth, kth_plus_one = top_values[..., k - 1:k], top_values[..., k:k + 1]
  in_top_k = noisy_logits >= kth
  threshold = jnp.where(in_top_k, kth_plus_one, kth)
  return jax.scipy.stats.norm.cdf((clean_logits - threshold) / noise_std)


def prototype_logits(x: jax.Array, prototypes: jax.Array) -> jax.Array:
  """Voronoi routing (MoMLP, arXiv 2402.03460): logits = -||x - p_e||^2 / (2 sqrt(D)).

  x [G,S,D], prototypes [D,E] (one column per expert) -> [G,S,E]. The arg-max is the nearest prototype; the
  1/sqrt(D) temperature keeps the softmax gate from saturating so prototypes still receive gradient.
  """
  x = x.astype(jnp.float32)
  prototypes = prototypes.astype(jnp.float32)
  sq_dist = (jnp.sum(x * x, -1, keepdims=True) - 2 * x @ prototypes + jnp.sum(prototypes ** 2, 0))
  return -0.5 * sq_dist / math.sqrt(x.shape[-1])


def hash_expert_index(token_ids: jax.Array, num_experts: int) -> jax.Array:
  """Hash routing (Roller et al. 2021): a fixed expert per token id. [G,S] int -> [G,S,1] int32.

  Knuth's multiplicative hash (2654435761 mod 2^32) spreads consecutive ids over experts.
  """
  ids = token_ids.astype(jnp.uint32)
  hashed = ids * jnp.uint32(2654435761)
  return (hashed % jnp.uint32(num_experts)).astype(jnp.int32)[..., None]


def assign_slots(expert_index: jax.Array, gates: jax.Array, num_experts: int, capacity: int | None,
                 priority: jax.Array | None = None, valid: jax.Array | None = None) -> Assignment:
  """Token-choice slot assignment with a capacity (GShard / V-MoE).

  Priority: all first choices before any second choice; within a choice rank, by position in the group, or, with
  `priority` [G,S] given (Batch Priority Routing, Riquelme et al. 2021), by descending priority.
  A choice whose slot index is >= capacity is dropped. `capacity=None` keeps everything.
  `valid` [G,S] bool (optional): padding tokens (False) take no slot and are never kept.
  """
  G, S, K = expert_index.shape
  if priority is not None:
    order = jnp.argsort(-priority, axis=1, stable=True)       # [G,S] token at each priority rank
    inverse = jnp.argsort(order, axis=1)                       # [G,S] priority rank of each token
    ranked = jnp.take_along_axis(expert_index, order[..., None], axis=1)
  else:
    ranked = expert_index
  one_hot = jax.nn.one_hot(ranked, num_experts, dtype=jnp.int32)        # [G,S,K,E]
  if valid is not None:                                                  # padding occupies no slot
    ranked_valid = valid if priority is None else jnp.take_along_axis(valid, order, axis=1)
    one_hot = one_hot * ranked_valid[:, :, None, None].astype(jnp.int32)
  choice_major = one_hot.transpose(0, 2, 1, 3).reshape(G, K * S, num_experts)
  position = jnp.cumsum(choice_major, axis=1) - 1                        # slot if this row goes to that expert
  slot = jnp.sum(position * choice_major, axis=-1)                       # [G,K*S]
  slot = slot.reshape(G, K, S).transpose(0, 2, 1)                        # [G,S,K]
  if priority is not None:
    slot = jnp.take_along_axis(slot, inverse[..., None], axis=1)
  kept = jnp.ones_like(slot, bool) if capacity is None else slot < capacity
  if valid is not None:
    kept = kept & valid[..., None]
  return Assignment(expert_index=expert_index, slot=slot.astype(jnp.int32),
                    weight=jnp.where(kept, gates, 0.0), kept=kept)


def experts_choose_assignment(probs: jax.Array, capacity: int, valid: jax.Array | None = None) -> Assignment:
  """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens of the group by gate.

  probs [G,S,E] -> token-major Assignment with K = E (choice e of a token is expert e; kept if e picked it).
  Sees every token of the group, so it is for encoders only. `valid` [G,S] (optional): padding tokens rank
  below every real token and are never kept.
  """
  G, S, E = probs.shape
  ranking = probs if valid is None else jnp.where(valid[..., None], probs, -1.0)
  _, token_index = jax.lax.top_k(ranking.transpose(0, 2, 1), capacity)   # [G,E,C]
  g = jnp.arange(G)[:, None, None]
  e = jnp.arange(E)[None, :, None]
  c = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), token_index.shape)
  slot = jnp.full((G, E, S), capacity, jnp.int32).at[g, e, token_index].set(c).transpose(0, 2, 1)  # [G,S,E]
  kept = slot < capacity
  if valid is not None:
    kept = kept & valid[..., None]
  expert_index = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (G, S, E))
  return Assignment(expert_index=expert_index, slot=slot, weight=jnp.where(kept, probs, 0.0), kept=kept)


def soft_routing(x: jax.Array, slot_embeddings: jax.Array, scale: jax.Array,
                 valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Soft MoE (Puigcerver et al. 2023). x [G,S,D], slot_embeddings [D,E,P], scale scalar.

  logits = (l2norm(x) . l2norm(phi)) * scale; dispatch = softmax over the S tokens of each slot; combine =
  softmax over all E*P slots of each token. Returns (dispatch [G,S,E,P], combine [G,S,E,P]). `valid` [G,S]
  (optional): padding tokens get no dispatch weight, so no slot mixes them in.
  """
  x = x.astype(jnp.float32)
  x_norm = x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)
  phi = slot_embeddings.astype(jnp.float32)
  phi_norm = phi * jax.lax.rsqrt(jnp.sum(phi * phi, 0, keepdims=True) + 1e-6)
  logits = jnp.einsum("GSD,DEP->GSEP", x_norm, phi_norm) * scale
  G, S, E, P = logits.shape
  dispatch = jax.nn.softmax(logits if valid is None else jnp.where(valid[..., None, None], logits, -1e9),
                            axis=1)
  combine = jax.nn.softmax(logits.reshape(G, S, E * P), axis=-1).reshape(G, S, E, P)
  return dispatch, combine
