"""An independent float64 NumPy model of vimoe.moe.MoeLayer, written as plain loops over tokens.

It imports nothing from vimoe: every rule (grouping, top-k, capacity with its priority order, experts-choose,
Soft MoE, hash routing, the expert MLPs and the auxiliary losses) is re-derived here from docs/design.md
("MoE layer contract", "Routers", "Capacity and dispatch", "Auxiliary losses and metrics"),
so a test that compares the library with it compares two separate implementations.

Parameters come in as a dict of NumPy arrays (see `layer_params`); shapes follow docs/design.md,
"MoE layer contract".
"""

from __future__ import annotations

import math

import numpy as np


def layer_params(layer) -> dict:
  """Reads a MoeLayer's parameters into float64 NumPy arrays (the only place that touches the layer)."""
  params = {}
  for name in ("kernel", "noise_kernel", "scale"):
    if hasattr(layer.router, name):
      params[f"router.{name}"] = np.asarray(getattr(layer.router, name)[...], np.float64)
  for prefix in ("experts", "shared"):
    module = getattr(layer, prefix)
    if module is None:
      continue
    for name in ("w_in", "b_in", "w_out", "b_out", "w_gate", "slope"):
      if hasattr(module, name):
        params[f"{prefix}.{name}"] = np.asarray(getattr(module, name)[...], np.float64)
  return params


# -- elementwise helpers ---------------------------------------------------------------------------------------

def gelu_tanh(v):
  return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


def gelu_erf(v):
  return 0.5 * v * (1.0 + np.vectorize(math.erf)(v / math.sqrt(2.0)))


def silu(v):
  return v / (1.0 + np.exp(-v))


def softmax(v):
  v = np.asarray(v, np.float64)
  z = np.exp(v - v.max())
  return z / z.sum()


def logsumexp(v):
  v = np.asarray(v, np.float64)
  return v.max() + math.log(np.exp(v - v.max()).sum())


def normal_cdf(z):
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def softplus(v):
  return np.log1p(np.exp(v))


def population_cv(values):
  values = np.asarray(values, np.float64)
  return values.std() / values.mean()


def top_indices(values, k):
  """Indices of the k largest entries, largest first (ties: lower index first, like lax.top_k)."""
  return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


# -- experts ---------------------------------------------------------------------------------------------------

def expert(params, prefix, e, token, activation):
  """One expert MLP on one token [D] -> [D]."""
  pre = token @ params[f"{prefix}.w_in"][e] + params[f"{prefix}.b_in"][e]
  if activation == "gelu":
    hidden = gelu_tanh(pre)
  elif activation == "gelu_exact":
    hidden = gelu_erf(pre)
  elif activation == "relu":
    hidden = np.maximum(pre, 0.0)
  elif activation == "prelu":
    hidden = np.where(pre >= 0, pre, params[f"{prefix}.slope"][e] * pre)
  elif activation == "swiglu":
    hidden = silu(token @ params[f"{prefix}.w_gate"][e]) * pre
  else:
    raise AssertionError(activation)
  return hidden @ params[f"{prefix}.w_out"][e] + params[f"{prefix}.b_out"][e]


def shared_output(params, token, activation):
  if "shared.w_in" not in params:
    return np.zeros_like(token)
  return sum(expert(params, "shared", s, token, activation) for s in range(params["shared.w_in"].shape[0]))


# -- routers: one unit's features [D] -> ordered list of (expert, gate) -----------------------------------------

def router_logits(params, router, feature):
  if router == "prototype":
    prototypes = params["router.kernel"]                      # [D,E], one prototype per column
    D = feature.shape[0]
    return np.array([-np.sum((feature - prototypes[:, e]) ** 2) / (2 * math.sqrt(D))
                     for e in range(prototypes.shape[1])])
  return feature @ params["router.kernel"]


def token_choices(params, router, feature, k, normalize_gates, token_id=None, num_experts=None):
  if router == "hash":
    return [((int(token_id) * 2654435761) % 2 ** 32 % num_experts, 1.0)]
  logits = router_logits(params, router, feature)
  if router == "noisy_top_k":  # deterministic: H = x Wg, gates = softmax over the k kept entries
    chosen = top_indices(logits, k)
    gates = softmax(logits[chosen])
    return list(zip(chosen, gates))
  probs = softmax(logits)
  chosen = top_indices(probs, k)
  gates = probs[chosen]
  if normalize_gates:
    gates = gates / gates.sum()
  return list(zip(chosen, gates))


def capacity_of(tokens_per_group, num_experts, k, capacity_factor):
  if capacity_factor is None:
    return None
  return max(1, min(math.ceil(k * tokens_per_group * capacity_factor / num_experts), tokens_per_group))


# -- the layer -------------------------------------------------------------------------------------------------

def moe_reference(x, params, *, num_experts, k, router="top_k", capacity_factor=None, group_size=None,
                  route_per="token", normalize_gates=False, activation="gelu", batch_priority=False,
                  router_input=None, token_ids=None):
  """x [B,T,D] -> (y [B,T,D], info dict). Loops over groups, then over tokens in priority order.

  info: capacity (None: no limit); units_per_group (S); kept, one bool per (unit, choice) in group order (for
  experts_choose one per unit: picked by some expert); counts [E] of pre-capacity assignments; and per unit:
  choices [(expert, gate), ...] in rank order, features, logits, probs, dense_gates [E].
  """
  assert router != "soft" or route_per == "token"
  x = np.asarray(x, np.float64)
  B, T, D = x.shape
  E = num_experts
  y = np.zeros_like(x)
  info = {"kept": [], "counts": np.zeros(E), "choices": [], "features": [], "probs": [], "logits": [],
          "dense_gates": []}

  # Routing units: (feature [D], list of (b, t) tokens carried, token id).
  if route_per == "item":
    features = x.mean(axis=1) if router_input is None else np.asarray(router_input, np.float64)
    units = [(features[b], [(b, t) for t in range(T)], None) for b in range(B)]
    per_group = B if group_size is None else group_size // T
  else:
    flat = [(b, t) for b in range(B) for t in range(T)]
    units = [(x[b, t], [(b, t)], None if token_ids is None else np.asarray(token_ids)[b, t]) for b, t in flat]
    per_group = T if group_size is None else group_size
  assert len(units) % per_group == 0
  groups = [units[i:i + per_group] for i in range(0, len(units), per_group)]
  capacity = capacity_of(per_group, E, k, capacity_factor)
  info["capacity"] = capacity
  info["units_per_group"] = per_group

  for group in groups:
    if router == "soft":
      _soft_group(x, params, group, y, activation)
      continue
    if router == "experts_choose":
      _experts_choose_group(x, params, group, y, capacity, activation, info)
      continue
    choices = [token_choices(params, router, feature, k, normalize_gates, token_id, E)
               for feature, _, token_id in group]
    if router != "hash":
      for feature, _, _ in group:
        info["features"].append(feature)
        info["logits"].append(router_logits(params, router, feature))
        info["probs"].append(softmax(info["logits"][-1]))
    for unit_choices in choices:
      dense = np.zeros(E)
      for e, gate in unit_choices:
        info["counts"][e] += 1
        dense[e] += gate
      info["dense_gates"].append(dense)
    info["choices"].extend(choices)
    # Priority: every first choice (in token order, or by descending top-1 gate with batch priority) before any
    # second choice. A choice is kept while its expert has fewer than C earlier kept choices in this group.
    order = list(range(len(group)))
    if batch_priority:
      # V-MoE's priority: the top-1 router probability max_e softmax(logits)_e, whatever the gate normalisation
      # (a renormalised k=1 gate is always 1). Hash routing has no probabilities: position order.
      top1 = [1.0 if router == "hash" else softmax(router_logits(params, router, feature)).max()
              for feature, _, _ in group]
      order = sorted(order, key=lambda u: -top1[u])   # Python's sort is stable
    filled = np.zeros(E, int)
    kept = np.zeros((len(group), len(choices[0])), bool)
    for rank in range(len(choices[0])):
      for u in order:
        e, _ = choices[u][rank]
        if capacity is None or filled[e] < capacity:
          filled[e] += 1
          kept[u, rank] = True
    info["kept"].extend(kept.ravel().tolist())
    for u, (_, tokens, _) in enumerate(group):
      for rank, (e, gate) in enumerate(choices[u]):
        if kept[u, rank]:
          for b, t in tokens:
            y[b, t] += gate * expert(params, "experts", e, x[b, t], activation)

  for b in range(B):
    for t in range(T):
      y[b, t] += shared_output(params, x[b, t], activation)
  return y, info


def _experts_choose_group(x, params, group, y, capacity, activation, info):
  """Each expert takes the `capacity` units of the group with the highest router probability."""
  logits = np.array([feature @ params["router.kernel"] for feature, _, _ in group])   # [S,E]
  probs = np.array([softmax(row) for row in logits])
  info["logits"].extend(logits)
  info["probs"].extend(probs)
  S, E = probs.shape
  picked_by_any = np.zeros(S, bool)
  for e in range(E):
    for s in top_indices(probs[:, e], capacity):
      picked_by_any[s] = True
      info["counts"][e] += 1
      for b, t in group[s][1]:
        y[b, t] += probs[s, e] * expert(params, "experts", e, x[b, t], activation)
  info["kept"].extend(picked_by_any.tolist())


def _soft_group(x, params, group, y, activation):
  """Soft MoE: slot (e,p) takes a softmax-over-tokens mixture of the group's tokens; each token's output is a
  softmax-over-all-slots mixture of the slot outputs."""
  phi = params["router.kernel"]                                        # [D,E,P]
  D, E, P = phi.shape
  tokens = [x[b, t] for _, carried, _ in group for b, t in carried]
  where = [(b, t) for _, carried, _ in group for b, t in carried]
  logits = np.zeros((len(tokens), E, P))
  for s, token in enumerate(tokens):
    for e in range(E):
      for p in range(P):
        logits[s, e, p] = (token / np.linalg.norm(token)) @ (phi[:, e, p] / np.linalg.norm(phi[:, e, p]))
  logits *= params["router.scale"]
  slot_out = np.zeros((E, P, D))
  for e in range(E):
    for p in range(P):
      weights = softmax(logits[:, e, p])                               # over the tokens of the group
      slot_in = sum(w * token for w, token in zip(weights, tokens))
      slot_out[e, p] = expert(params, "experts", e, slot_in, activation)
  for s, (b, t) in enumerate(where):
    combine = softmax(logits[s].ravel()).reshape(E, P)                 # over all E*P slots
    y[b, t] += np.einsum("ep,epd->d", combine, slot_out)


# -- auxiliary losses and metrics ------------------------------------------------------------------------------

def reference_metrics(info, params, *, num_experts, k, router):
  """The aux.metrics of docs/design.md, "Auxiliary losses and metrics", from the loop's bookkeeping (token-choice
  and experts_choose)."""
  E = num_experts
  metrics = {"dropped_fraction": 1.0 - np.mean(info["kept"]),
             "expert_load": info["counts"] / info["counts"].sum()}
  if router in ("hash", "soft", "experts_choose"):
    return metrics
  importance = np.sum(info["dense_gates"], axis=0)                      # Shazeer eq. 6
  metrics["importance_loss"] = population_cv(importance) ** 2
  probs = np.array(info["probs"])
  first_choice = np.array([choices[0][0] for choices in info["choices"]])
  fraction = np.array([np.mean(first_choice == e) for e in range(E)])
  metrics["balance_loss"] = E * np.sum(fraction * probs.mean(axis=0))  # Switch eq. 4
  metrics["router_z_loss"] = np.mean([logsumexp(row) ** 2 for row in info["logits"]])
  if router == "noisy_top_k":  # deterministic call: H(x) = x Wg
    load = np.zeros(E)
    for feature in info["features"]:
      clean = feature @ params["router.kernel"]
      std = softplus(feature @ params["router.noise_kernel"])
      for i in range(E):
        if k == E:  # every expert is always kept
          load[i] += 1.0
          continue
        kth_excluding = np.sort(np.delete(clean, i))[::-1][k - 1]              # Shazeer eq. 9
        load[i] += normal_cdf((clean[i] - kth_excluding) / std[i])
    metrics["load_loss"] = population_cv(load) ** 2                          # eq. 10-11
  return metrics
