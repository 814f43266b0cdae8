"""Auxiliary load-balancing losses and routing metrics (pure functions).

Shapes use the glossary of vimoe/moe/routing.py, with N = G*S routed tokens flattened.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def coefficient_of_variation(values: jax.Array, eps: float = 1e-10) -> jax.Array:
  """CV = std / mean over the last axis (population std, ddof=0)."""
  return jnp.std(values, axis=-1) / (jnp.mean(values, axis=-1) + eps)


def importance_loss(dense_gates: jax.Array) -> jax.Array:
  """Shazeer 2017 eq. 6-7 (unweighted): CV(Importance)^2 with Importance_e = sum over tokens of G(x)_e.

  dense_gates [N,E]: the gate of each expert (zero where not selected).
  """
  return coefficient_of_variation(jnp.sum(dense_gates, axis=0)) ** 2


def load_loss(load_probability: jax.Array) -> jax.Array:
  """Shazeer 2017 eq. 10-11 (unweighted): CV(Load)^2 with Load_e = sum over tokens of P(x, e) (normal CDF)."""
  return coefficient_of_variation(jnp.sum(load_probability, axis=0)) ** 2


def masked_mean(values: jax.Array, valid: jax.Array | None) -> jax.Array:
  """Mean over the leading token axis N, counting only tokens with valid [N] True (all when valid is None)."""
  if valid is None:
    return jnp.mean(values, axis=0)
  weight = valid.astype(jnp.float32).reshape((-1,) + (1,) * (values.ndim - 1))
  return jnp.sum(values * weight, axis=0) / jnp.maximum(jnp.sum(weight), 1.0)


def switch_balance_loss(probs: jax.Array, top1_index: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Switch / GShard balance loss: E * sum_e f_e * P_e.

  probs [N,E] router probabilities; top1_index [N] first choice. f_e = fraction of tokens whose first choice is e,
  P_e = mean router probability of e. Equals 1 when routing is uniform. valid [N] (optional): tokens to count
  (padding excluded).
  """
  num_experts = probs.shape[-1]
  fraction = masked_mean(jax.nn.one_hot(top1_index, num_experts, dtype=jnp.float32), valid)
  mean_prob = masked_mean(probs, valid)
  return num_experts * jnp.sum(fraction * mean_prob)


def sequence_balance_loss(affinities: jax.Array, expert_index: jax.Array, valid: jax.Array | None = None
                          ) -> jax.Array:
  """DeepSeek-V3 sequence-wise balance loss (unweighted), averaged over sequences.

  affinities [B,T,E] normalised affinities s' (each row sums to 1); expert_index [B,T,K] the chosen experts;
  valid [B,T] (optional) the real tokens. Per sequence of T real tokens: f_e = E / (K T) * #{t: e chosen by t},
  P_e = mean over t of s'_e, loss = sum_e f_e P_e (1 when uniform); sequences without real tokens are skipped.
  """
  B, T, E = affinities.shape
  K = expert_index.shape[-1]
  weight = jnp.ones((B, T), jnp.float32) if valid is None else valid.astype(jnp.float32)
  tokens = jnp.sum(weight, axis=1)                                                              # [B]
  chosen = jnp.einsum("BTKE,BT->BE", jax.nn.one_hot(expert_index, E, dtype=jnp.float32), weight)
  per_token = 1.0 / jnp.maximum(tokens, 1.0)[:, None]
  fraction = E / K * chosen * per_token
  mean_affinity = jnp.einsum("BTE,BT->BE", affinities.astype(jnp.float32), weight) * per_token
  per_sequence = jnp.sum(fraction * mean_affinity, axis=-1)
  has_tokens = (tokens > 0).astype(jnp.float32)
  return jnp.sum(per_sequence * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)


def router_z_loss(logits: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits [N,E]; valid [N] as above."""
  return masked_mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2, valid)


def load_metrics(expert_counts: jax.Array) -> dict:
  """Metrics of a per-expert load vector [E] (counts or soft counts)."""
  total = jnp.maximum(jnp.sum(expert_counts), 1e-10)
  return {
      "expert_load": expert_counts / total,
      "load_cv": coefficient_of_variation(expert_counts),
      "max_mean_load": jnp.max(expert_counts) / jnp.maximum(jnp.mean(expert_counts), 1e-10),
  }


def token_choice_metrics(probs, logits, expert_index, gates, kept, num_experts, valid=None):
  """Routing statistics of a token-choice assignment (top-k, noisy top-k, prototype, hash, UMoE attention).

  probs, logits [.., E] (or None: no balance or z-loss entry); expert_index, gates, kept [.., K]; the leading
  axes are flattened to N tokens. `valid` (optional, the shape of `gates` without K) marks the real tokens:
  padding counts in no metric."""
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
      "importance_cv": coefficient_of_variation(jnp.sum(dense_gates, 0)),
      "importance_loss": importance_loss(dense_gates),
      **load_metrics(jnp.sum(one_hot, axis=(0, 1))),
  }
  if probs is not None:
    metrics["balance_loss"] = switch_balance_loss(probs.reshape(-1, E),
                                                             expert_index.reshape(-1, K)[:, 0], flat_valid)
  if logits is not None:
    metrics["router_z_loss"] = router_z_loss(logits.reshape(-1, E), flat_valid)
  return metrics
