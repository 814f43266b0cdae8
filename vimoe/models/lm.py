"""Decoder-only language models: a causal Transformer with MoE FFNs in chosen blocks, and UMoE.

Shapes: B batch, T tokens (queries), S key positions (T, or the cache length when decoding), D model dimension,
V vocabulary, E experts, K experts per token, h heads, d head dimension (D / h), dk UMoE query/key dimension,
r UMoE low-rank query rank, L cache length.

**Transformer** (`model.name = "transformer"`; GPT-2 / Llama layout, pre-norm): tokens [B, T] -> embed (+ learned
positions) -> blocks `x = x + attn(norm1(x)); x = x + ffn(norm2(x))` -> final norm -> head (or embed^T) -> [B, T, V].
`attn` is causal multi-head self-attention (RoPE with `positions = "rope"`); `ffn` is a dense MLP (one always-on
`moe.Experts`) or, in the blocks chosen by `moe.layers`, a `moe.MoeLayer(causal=True)`.

**UMoE** (`model.name = "umoe"`; Yang et al. 2025, arXiv 2505.07260): every attention "head" is an FFN expert and
the attention and FFN sub-layers of a block share one pool of experts. Its formulas (router, low-rank queries,
pre- and post-mixing), the causality rules of routing in a decoder, and what this layout refuses: docs/design.md,
'Models built on the layer'. Post-mixing runs every expert on every token (E MLPs per token): for comparison at
small scale only. Routing groups are one sequence each; cached decoding routes one step at a time and never
drops, so with a capacity it can differ from a training-time forward pass that dropped a token.

**Cached decoding.** `cache = model.init_cache(B, L)`; `logits, cache = model.decode(tokens [B, S], cache,
position)` runs S new tokens at positions position..position+S-1 (a prompt, then one token at a time) and returns
the same logits as the full forward pass. Attention reaches back at most `max_length` positions (the context the
model was trained on), so with RoPE a sample may run longer than the training sequences. The standard attention
caches keys and values [B, L, h, d]; UMoE caches its keys [B, L, dk] and the raw hidden states [B, L, D]
(pre-mixing) or every expert's output on them [B, L, E, D] (post-mixing). `generate(model, prompt, n, ...)`
samples with the cache.

Model config keys: docs/models.md, 'Transformer LM and UMoE'.

Call: `logits, aux = model(tokens, deterministic=...)`, tokens int32 [B, T] -> logits float32 [B, T, V];
aux = {"losses": {name: sum over blocks}, "metrics": {"block{i}": FFN MoE metrics, "block{i}_attn": UMoE
attention routing metrics}}; the UMoE attention's losses are named "attn_balance", "attn_z_loss", ...
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimoe import moe
from vimoe.models import params as params_lib
from vimoe.models.config_utils import (DTYPES, as_dict, check_keys, check_remat, choose, parse_moe_layers,
                                       positive_int, remat_block)

NAMES = ("transformer", "umoe")
POSITIONS = ("rope", "learned")
NORMS = ("rmsnorm", "layernorm")
MIXINGS = ("pre", "post")


# The MoE settings an LM config may give (`model.moe.*`, besides `layers`, `hidden_dim` and `shared_hidden_dim`)
# and their defaults.
MOE_FIELDS = ("num_experts", "k", "router", "capacity_factor", "dispatch", "num_shared_experts", "normalize_gates",
              "balance_weight", "importance_weight", "z_loss_weight", "load_weight",
              "score", "routed_scale", "bias_update_rate", "num_groups", "groups_per_token",
              "sequence_balance_weight", "grouped_matmul", "block_size", "dropless_buffer_factor")
MOE_DEFAULTS = moe.MoeConfig(capacity_factor=None, dispatch="gather", causal=True)


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Resolved, validated hyperparameters of a language model (build one with `lm_config(config)`)."""
  name: str
  dim: int
  depth: int
  num_heads: int
  mlp_dim: int
  vocab_size: int = 256
  max_length: int = 1024
  positions: str = "rope"
  rope_base: float = 10000.0
  tie_embeddings: bool = False
  mlp_activation: str = "gelu"
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  dropout: float = 0.0
  dtype: str = "float32"
  remat: str = "none"
  umoe_mixing: str = "pre"
  umoe_attn_k: int = 2
  umoe_query_rank: int = 16
  umoe_key_dim: int = 64
  umoe_attn_shared_expert: bool = True
  moe_layers: tuple[int, ...] = ()
  moe: moe.MoeConfig = MOE_DEFAULTS    # its activation is mlp_activation
  moe_hidden_dim: int | None = None    # model.moe.hidden_dim: the expert width (None: mlp_dim)
  moe_shared_hidden_dim: int | None = None  # model.moe.shared_hidden_dim: the shared experts' (None: expert_dim)

  @property
  def expert_dim(self) -> int:
    return self.moe_hidden_dim or self.mlp_dim

  @property
  def shared_expert_dim(self) -> int:
    return self.moe_shared_hidden_dim or self.expert_dim


# Config parsing and validation: every error names the key, the value and what is valid.

SIZE_KEYS = ("dim", "depth", "num_heads", "mlp_dim")
UMOE_KEYS = ("umoe_mixing", "umoe_attn_k", "umoe_query_rank", "umoe_key_dim", "umoe_attn_shared_expert")
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(LMConfig)
                   if f.name not in ("moe_layers", "moe_hidden_dim", "moe_shared_hidden_dim"))
MOE_KEYS = ("layers", "hidden_dim", "shared_hidden_dim") + MOE_FIELDS


def lm_config(config, prefix: str = "model.") -> LMConfig:
  """Validates a model config (see the module docstring) and resolves it into an `LMConfig`.

  Raises ValueError naming the key (with `prefix`), its value and what is valid; nothing is built or compiled.
  """
  given = as_dict(config)
  check_keys(given, MODEL_KEYS, prefix)
  moe_given = as_dict(given.pop("moe", None))
  check_keys(moe_given, MOE_KEYS, prefix + "moe.")
  name = given.get("name")
  choose(prefix + "name", name, NAMES)
  if name != "umoe":
    stray = [key for key in UMOE_KEYS if given.get(key) is not None]
    if stray:
      raise ValueError(f"{', '.join(prefix + k for k in stray)} only apply to {prefix}name='umoe' (got "
                       f"{prefix}name={name!r}); remove them")
  missing = [key for key in SIZE_KEYS if given.get(key) is None]
  if missing:
    raise ValueError(f"{', '.join(prefix + k for k in missing)} missing: the model sizes must be given")
  resolved = {key: value for key, value in given.items() if value is not None}
  for key in SIZE_KEYS + ("vocab_size", "max_length"):
    if key in resolved:
      resolved[key] = positive_int(resolved[key], prefix + key)
  if resolved["dim"] % resolved["num_heads"]:
    raise ValueError(f"{prefix}num_heads={resolved['num_heads']} must divide {prefix}dim={resolved['dim']}")
  for key, valid in (("positions", POSITIONS), ("norm", NORMS), ("dtype", tuple(DTYPES)),
                     ("mlp_activation", moe.ACTIVATIONS), ("umoe_mixing", MIXINGS)):
    if key in resolved:
      choose(prefix + key, resolved[key], valid)
  if "remat" in resolved:
    check_remat(resolved["remat"], prefix + "remat")
  rope = resolved.get("positions", "rope") == "rope"
  if rope and (resolved["dim"] // resolved["num_heads"]) % 2:
    raise ValueError(f"{prefix}dim / {prefix}num_heads = {resolved['dim'] // resolved['num_heads']} must be even "
                     f"with {prefix}positions='rope' (RoPE rotates pairs of channels)")
  for key in ("rope_base", "norm_eps"):
    if key in resolved and not resolved[key] > 0:
      raise ValueError(f"{prefix}{key}={resolved[key]!r} must be > 0")
  if not 0.0 <= resolved.get("dropout", 0.0) < 1.0:
    raise ValueError(f"{prefix}dropout={resolved['dropout']!r} must be in [0, 1)")
  for key in ("tie_embeddings", "umoe_attn_shared_expert"):
    if key in resolved and not isinstance(resolved[key], (bool, np.bool_)):
      raise ValueError(f"{prefix}{key}={resolved[key]!r} must be True or False")

  depth = resolved["depth"]
  default_layers = "every:1" if name == "umoe" else "none"
  layers = moe_given.pop("layers", None)
  moe_layers = parse_moe_layers(default_layers if layers is None else layers, depth, key=prefix + "moe.layers")
  if name == "umoe" and not moe_layers:
    raise ValueError(f"{prefix}moe.layers={layers!r} selects no block, but {prefix}name='umoe' needs UMoE blocks; "
                     f"use e.g. 'every:1' (every block), or {prefix}name='transformer' for a dense model")
  hidden_dim = moe_given.pop("hidden_dim", None)
  shared_hidden_dim = moe_given.pop("shared_hidden_dim", None)
  # causal=True refuses routers that see future tokens.
  moe_config = moe.MoeConfig.from_dict(moe_given, defaults=MOE_DEFAULTS, prefix=prefix + "moe.",
                                       validate=bool(moe_layers),
                                       activation=resolved.get("mlp_activation", MOE_DEFAULTS.activation))
  if moe_layers and hidden_dim is not None:
    positive_int(hidden_dim, prefix + "moe.hidden_dim")
  if moe_layers and shared_hidden_dim is not None:
    positive_int(shared_hidden_dim, prefix + "moe.shared_hidden_dim")
  if name == "umoe":
    E = moe_config.num_experts
    attn_k = resolved.get("umoe_attn_k", 2)
    if not isinstance(attn_k, (int, np.integer)) or not 1 <= attn_k <= E:
      raise ValueError(f"{prefix}umoe_attn_k={attn_k!r} must be an integer in [1, {prefix}moe.num_experts={E}]")
    choosable = moe_config.groups_per_token * (E // moe_config.num_groups)
    if attn_k > choosable:
      raise ValueError(f"{prefix}umoe_attn_k={attn_k} is more than the {choosable} experts a token may choose "
                       f"from with {prefix}moe.num_groups={moe_config.num_groups} and {prefix}moe.groups_per_token="
                       f"{moe_config.groups_per_token}; raise groups_per_token or lower umoe_attn_k")
    mixing = resolved.get("umoe_mixing", "pre")
    if mixing == "pre" and attn_k > 1 and moe_config.capacity_factor is not None:
      # The attention's routed units are served all first choices before any second choice (as in MoeLayer),
      # so a later token's first choice could push out an earlier token's second choice: not causal.
      raise ValueError(f"{prefix}moe.capacity_factor={moe_config.capacity_factor!r} with {prefix}umoe_attn_k="
                       f"{attn_k} (UMoE pre-mixing attention in a decoder): later tokens could drop earlier tokens' "
                       f"second choices (not causal); use {prefix}moe.capacity_factor=None (dropless) or "
                       f"{prefix}umoe_attn_k=1")
    rank = resolved.get("umoe_query_rank", 16)
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 0:
      raise ValueError(f"{prefix}umoe_query_rank={rank!r} must be an integer >= 0 (0: no per-expert query term)")
    key_dim = positive_int(resolved.get("umoe_key_dim", 64), prefix + "umoe_key_dim")
    if rope and key_dim % 2:
      raise ValueError(f"{prefix}umoe_key_dim={key_dim} must be even with {prefix}positions='rope'")
  return LMConfig(moe_layers=moe_layers, moe=moe_config, moe_hidden_dim=hidden_dim,
                  moe_shared_hidden_dim=shared_hidden_dim, **resolved)


# Positions and attention weights (pure functions)

def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding. x [B, T, ..., d] (any head axes between T and d), positions [T] int.

  Channel pairs (x_i, x_{i+d/2}), i < d/2, are rotated by the angle positions[t] * base^(-2i/d); computed in
  float32, returned in x's dtype.
  """
  d = x.shape[-1]
  inverse_frequency = base ** (-2.0 * jnp.arange(d // 2, dtype=jnp.float32) / d)           # [d/2]
  angles = positions.astype(jnp.float32)[:, None] * inverse_frequency                       # [T, d/2]
  angles = angles.reshape(angles.shape[:1] + (1,) * (x.ndim - 3) + angles.shape[1:])       # [T, 1.., d/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1).astype(x.dtype)


def causal_softmax(scores: jax.Array, query_positions: jax.Array, key_positions: jax.Array, window: int
                   ) -> jax.Array:
  """scores [..., T, S] -> attention weights [..., T, S] (float32); key s is visible to query t iff
  query_positions[t] - window < key_positions[s] <= query_positions[t]."""
  offset = query_positions[:, None] - key_positions[None, :]                                # [T, S]
  visible = (offset >= 0) & (offset < window)
  scores = jnp.where(visible, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


def _write_cache(buffer: jax.Array, new: jax.Array, start) -> jax.Array:
  """Writes new [B, T, ...] into buffer [B, L, ...] at positions start..start+T-1."""
  index = (0, start) + (0,) * (buffer.ndim - 2)
  return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), index)


# Modules

_init = jax.nn.initializers.normal(0.02)  # GPT-2 initialisation for embeddings and projections


def _norm(config: LMConfig, rngs: nnx.Rngs) -> nnx.Module:
  norm = nnx.RMSNorm if config.norm == "rmsnorm" else nnx.LayerNorm
  return norm(config.dim, epsilon=config.norm_eps, dtype=DTYPES[config.dtype], rngs=rngs)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention; `qkv.kernel` [D, 3D] with output columns ordered (q|k|v, head, d)."""

  def __init__(self, dim: int, num_heads: int, *, window: int, rope_base: float | None, dtype, out_init,
               rngs: nnx.Rngs):
    self.num_heads, self.window, self.rope_base = num_heads, window, rope_base
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, kernel_init=_init, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, use_bias=False, kernel_init=out_init, dtype=dtype, rngs=rngs)

  def init_cache(self, batch_size: int, length: int, dtype) -> dict:
    head_dim = self.qkv.in_features // self.num_heads
    shape = (batch_size, length, self.num_heads, head_dim)
    return {"keys": jnp.zeros(shape, dtype), "values": jnp.zeros(shape, dtype)}

  def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None):
    """x [B, T, D] at positions [T] -> (y [B, T, D], cache). With a cache, attends to every cached position."""
    B, T, D = x.shape
    h = self.num_heads
    qkv = self.qkv(x).reshape(B, T, 3, h, D // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                                      # [B, T, h, d]
    if self.rope_base is not None:
      q, k = apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base)
    key_positions = positions
    if cache is not None:
      k, v = _write_cache(cache["keys"], k, positions[0]), _write_cache(cache["values"], v, positions[0])
      cache = {"keys": k, "values": v}                                                      # [B, L, h, d]
      key_positions = jnp.arange(k.shape[1])
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D // h)                       # [B, h, T, S]
    weights = causal_softmax(scores, positions, key_positions, self.window).astype(v.dtype)
    out = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, D)
    return self.proj(out), cache


class UmoeAttention(nnx.Module):
  """UMoE attention over an expert pool it does not own (the block's FFN `MoeLayer.experts`); formulas:
  docs/design.md, 'Models built on the layer'.

  Parameters: `router.kernel` [D, E]; `query.kernel` [D, dk] (W_q); `query_down` [E, D, r] and `query_up`
  [E, r, dk] (A_i, B_i; absent when r = 0); `key.kernel` [D, dk] (W_k); with the shared expert
  `shared_query.kernel` [D, dk] and `shared` (one `moe.Experts`).
  """

  def __init__(self, dim: int, hidden_dim: int, config: moe.MoeConfig | int, k: int, *, key_dim: int,
               query_rank: int, mixing: str, shared_expert: bool, window: int, rope_base: float | None, dtype,
               rngs: nnx.Rngs, **options):
    """config: the block's MoE settings (num_experts, normalize_gates, dispatch, capacity_factor, the loss weights,
    activation), or num_experts and those settings as keyword `options`; k: experts per token (umoe_attn_k)."""
    config = moe.as_config(config, None, options)
    num_experts = config.num_experts
    self.config, self.num_experts, self.k, self.key_dim, self.mixing = config, num_experts, k, key_dim, mixing
    self.window, self.rope_base = window, rope_base
    self.router = moe.ROUTERS["top_k"](dim, config, rngs=rngs)
    self.query = nnx.Linear(dim, key_dim, use_bias=False, kernel_init=_init, dtype=dtype, rngs=rngs)
    self.key = nnx.Linear(dim, key_dim, use_bias=False, kernel_init=_init, dtype=dtype, rngs=rngs)
    if query_rank:
      self.query_down = nnx.Param(jax.random.normal(rngs.params(), (num_experts, dim, query_rank))
                                  / math.sqrt(dim))
      self.query_up = nnx.Param(_init(rngs.params(), (num_experts, query_rank, key_dim)))
    else:
      self.query_down = self.query_up = None
    if shared_expert:
      self.shared_query = nnx.Linear(dim, key_dim, use_bias=False, kernel_init=_init, dtype=dtype, rngs=rngs)
      self.shared = moe.Experts(1, dim, hidden_dim, activation=config.activation, rngs=rngs)
    else:
      self.shared_query = self.shared = None

  def init_cache(self, batch_size: int, length: int, dim: int, dtype) -> dict:
    cache = {"keys": jnp.zeros((batch_size, length, self.key_dim), dtype)}
    if self.mixing == "pre":
      cache["values"] = jnp.zeros((batch_size, length, dim), dtype)                         # raw hidden states
    else:
      cache["values"] = jnp.zeros((batch_size, length, self.num_experts, dim), dtype)       # E_i(X) for every i
      if self.shared is not None:
        cache["shared_values"] = jnp.zeros((batch_size, length, dim), dtype)               # E_sh(X)
    return cache

  def _queries(self, x: jax.Array, expert_index: jax.Array) -> jax.Array:
    """x [B, T, D], chosen experts [B, T, K] -> queries [B, T, K (+1 shared), dk]."""
    B, T, _ = x.shape
    q = jnp.broadcast_to(self.query(x)[:, :, None], (B, T, self.k, self.key_dim))           # x W_q
    if self.query_down is not None:
      low = jnp.einsum("btd,edr->bter", x, self.query_down[...].astype(x.dtype))             # [B, T, E, r]
      per_expert = jnp.einsum("bter,erk->btek", low, self.query_up[...].astype(x.dtype))   # [B, T, E, dk]
      q = q + jnp.take_along_axis(per_expert, expert_index[..., None], axis=2)              # + x A_i B_i
    if self.shared_query is not None:
      q = jnp.concatenate([q, self.shared_query(x)[:, :, None]], axis=2)                   # [B, T, K+1, dk]
    return q

  def __call__(self, x: jax.Array, experts: moe.Experts, *, positions: jax.Array, cache: dict | None = None,
               mask: jax.Array | None = None, deterministic: bool = True):
    """x = norm1(hidden) [B, T, D] at positions [T] -> (y [B, T, D], losses, metrics, cache). mask [B, T]
    (optional): real tokens; padding takes no expert capacity and counts in no routing statistic. With
    deterministic=False a DeepSeek-style routing bias is updated (vimoe/moe/routers.py, TopKRouter)."""
    B, T, D = x.shape
    E, K = self.num_experts, self.k
    valid = None if mask is None else jnp.asarray(mask, bool)
    gating = self.router.gate(x.astype(jnp.float32), K, deterministic=deterministic, valid=valid)
    expert_index, gates, probs, logits = gating[:4]                                         # [B, T, K], [B, T, E]
    q = self._queries(x, expert_index)                                                     # [B, T, K(+1), dk]
    keys = self.key(x)                                                                      # [B, T, dk]
    if self.rope_base is not None:
      q, keys = apply_rope(q, positions, self.rope_base), apply_rope(keys, positions, self.rope_base)
    if self.mixing == "pre":
      values = {"values": x}
    else:  # every expert (and the shared one) on every token: E_i(X) [B, T, E, D]
      flat = jnp.broadcast_to(x.reshape(1, B * T, D), (E, B * T, D))
      values = {"values": experts(flat).reshape(E, B, T, D).transpose(1, 2, 0, 3)}
      if self.shared is not None:
        values["shared_values"] = self.shared.apply_all(x)
    values["keys"] = keys
    key_positions = positions
    if cache is not None:
      values = {name: _write_cache(cache[name], values[name], positions[0]) for name in cache}
      cache = values
      key_positions = jnp.arange(values["keys"].shape[1])
    scores = jnp.einsum("btkc,bsc->bkts", q, values["keys"]) / math.sqrt(self.key_dim)     # [B, K(+1), T, S]
    weights = causal_softmax(scores, positions, key_positions, self.window)

    if self.mixing == "pre":
      hidden = values["values"]
      mixed = jnp.einsum("bkts,bsd->bktd", weights.astype(hidden.dtype), hidden)            # a_i X [B, K(+1), T, D]
      # Each (token, choice) is one routed unit with one expert; choice-major order gives all first choices
      # priority over second choices when a capacity applies (as in MoeLayer).
      units = mixed[:, :K].reshape(B, K * T, D)
      unit_index = expert_index.transpose(0, 2, 1).reshape(B, K * T, 1)
      unit_gates = gates.transpose(0, 2, 1).reshape(B, K * T, 1)
      capacity = moe.routing_capacity(self.config.dispatch, self.config.capacity_factor, K * T, E, 1)
      unit_valid = None if mask is None else jnp.tile(jnp.asarray(mask, bool), (1, K))      # [B, K*T] choice-major
      assignment = moe.routing.assign_slots(unit_index, unit_gates, E, capacity, valid=unit_valid)
      routed = moe.run_experts(experts, units, assignment, dispatch=self.config.dispatch, capacity=capacity,
                               tokens_per_unit=1, block_size=self.config.block_size,
                               grouped_matmul=self.config.grouped_matmul,
                               dropless_buffer_factor=self.config.dropless_buffer_factor)   # p_i E_i(a_i X)
      y = routed.reshape(B, K, T, D).sum(axis=1)
      kept = assignment.kept.reshape(B, K, T).transpose(0, 2, 1)
      if self.shared is not None:
        y = y + self.shared.apply_all(mixed[:, K])
    else:
      # Gate-weighted attention per expert: W[t, e, s] = sum_j p_j [I_tj = e] a_j[t, s].
      choice = jax.nn.one_hot(expert_index, E, dtype=jnp.float32) * gates[..., None]          # [B, T, K, E]
      mixing = jnp.einsum("btke,bkts->btes", choice, weights[:, :K])                        # [B, T, E, S]
      y = jnp.einsum("btes,bsed->btd", mixing.astype(x.dtype), values["values"])             # sum p_i a_i E_i(X)
      kept = jnp.ones(expert_index.shape, bool)
      if self.shared is not None:
        y = y + jnp.einsum("bts,bsd->btd", weights[:, K].astype(x.dtype), values["shared_values"])
      capacity = None
    metrics = moe.losses.token_choice_metrics(probs, logits, expert_index, gates, kept, E, valid)
    metrics["capacity"] = jnp.asarray(-1 if capacity is None else capacity)
    metrics.update(gating.metrics)
    if self.router.sequence_balance:
      metrics["sequence_balance_loss"] = moe.routers.sequence_balance_metric(gating, valid, B)
    # The attention's own losses (its top-k router has no load loss), named "attn_balance", ...
    weighted = moe.weighted_losses(self.config, metrics, names=("importance", "balance", "z_loss",
                                                                "sequence_balance"))
    losses = {"attn_" + name: value for name, value in weighted.items()}
    return y, losses, metrics, cache


class Block(nnx.Module):
  """Pre-norm decoder block. kind "dense": attention + dense MLP; "moe": attention + MoeLayer; "umoe": UMoE
  attention + MoeLayer sharing one expert pool."""

  def __init__(self, config: LMConfig, kind: str, *, rngs: nnx.Rngs):
    D, dtype = config.dim, DTYPES[config.dtype]
    self.kind = kind
    rope_base = config.rope_base if config.positions == "rope" else None
    out_init = jax.nn.initializers.normal(0.02 / math.sqrt(2 * config.depth))  # GPT-2 residual scaling
    self.norm1 = _norm(config, rngs)
    if kind == "umoe":
      self.attn = UmoeAttention(
          D, config.expert_dim, config.moe, config.umoe_attn_k, key_dim=config.umoe_key_dim,
          query_rank=config.umoe_query_rank, mixing=config.umoe_mixing,
          shared_expert=config.umoe_attn_shared_expert, window=config.max_length, rope_base=rope_base,
          dtype=dtype, rngs=rngs)
    else:
      self.attn = CausalSelfAttention(D, config.num_heads, window=config.max_length, rope_base=rope_base,
                                      dtype=dtype, out_init=out_init, rngs=rngs)
    self.norm2 = _norm(config, rngs)
    if kind == "dense":
      # One always-on expert: the same MLP code and initialisation as the MoE experts.
      self.mlp = moe.Experts(1, D, config.mlp_dim, activation=config.mlp_activation, rngs=rngs)
    else:
      self.mlp = moe.MoeLayer(D, config.expert_dim, config.moe, shared_hidden_dim=config.shared_expert_dim,
                              rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None

  def _residual(self, branch: jax.Array, deterministic: bool) -> jax.Array:
    return branch if self.dropout is None else self.dropout(branch, deterministic=deterministic)

  def __call__(self, x: jax.Array, *, positions: jax.Array, token_ids: jax.Array, deterministic: bool,
               cache: dict | None = None, mask: jax.Array | None = None):
    """x [B, T, D] -> (x [B, T, D], {"ffn": MoeAux | None, "attn": MoeAux | None}, cache).
    mask [B, T] (optional): real tokens; padding takes no expert capacity and counts in no routing statistic."""
    hidden = self.norm1(x)
    aux = {"ffn": None, "attn": None}
    if self.kind == "umoe":
      out, losses, metrics, cache = self.attn(hidden, self.mlp.experts, positions=positions, cache=cache,
                                              mask=mask, deterministic=deterministic)
      aux["attn"] = moe.MoeAux(losses=losses, metrics=metrics)
    else:
      out, cache = self.attn(hidden, positions, cache)
    x = x + self._residual(out, deterministic)
    hidden = self.norm2(x)                                                                   # [B, T, D]
    if self.kind == "dense":
      out = self.mlp.apply_all(hidden)
    else:
      ids = token_ids if self.mlp.router.needs_token_ids else None
      out, aux["ffn"] = self.mlp(hidden, token_ids=ids, mask=mask, deterministic=deterministic)
    return x + self._residual(out, deterministic), aux, cache


class LanguageModel(params_lib.BlockStack, nnx.Module):
  """Causal Transformer LM / UMoE. Build with `build_lm(config)`; `LanguageModel(lm_config(config), rngs=...)` is
  the same. Parameters: `embed.embedding` [V, D], `pos_embed` [max_length, D] (learned positions), `blocks`,
  `norm`, `head.kernel` [D, V] (absent with tied embeddings)."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    D, dtype = config.dim, DTYPES[config.dtype]
    self.dtype = dtype
    self.embed = nnx.Embed(config.vocab_size, D, embedding_init=_init, dtype=dtype, rngs=rngs)
    self.pos_embed = (nnx.Param(_init(rngs.params(), (config.max_length, D))) if config.positions == "learned"
                      else None)
    routed_kind = "umoe" if config.name == "umoe" else "moe"
    self.blocks = nnx.List([Block(config, routed_kind if i in config.moe_layers else "dense", rngs=rngs)
                            for i in range(config.depth)])
    self.norm = _norm(config, rngs)
    self.head = (None if config.tie_embeddings
                 else nnx.Linear(D, config.vocab_size, use_bias=False, kernel_init=_init, dtype=dtype, rngs=rngs))
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None

  EMBEDDINGS = ("embed", "pos_embed")  # layer 0 for layer-wise lr decay (params_lib.BlockStack)

  def _run(self, tokens: jax.Array, positions: jax.Array, *, deterministic: bool, cache: list | None,
           mask: jax.Array | None = None):
    if tokens.ndim != 2:
      raise ValueError(f"tokens have shape {tokens.shape}; expected int [batch, length]")
    x = self.embed(tokens)                                                                   # [B, T, D]
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
    if self.dropout is not None:
      x = self.dropout(x, deterministic=deterministic)
    named_aux, new_cache = [], []
    # model.remat: what the backward pass keeps of each block (config_utils.REMAT_POLICIES); decoding has none.
    run_block = remat_block(
        lambda block, x, positions, tokens, block_cache, mask: block(
            x, positions=positions, token_ids=tokens, deterministic=deterministic, cache=block_cache, mask=mask),
        self.config.remat if cache is None else "none")
    for index, block in enumerate(self.blocks):
      x, block_aux, block_cache = run_block(block, x, positions, tokens, None if cache is None else cache[index],
                                            mask)
      new_cache.append(block_cache)
      named_aux += [(f"block{index}{suffix}", block_aux[part]) for part, suffix in (("ffn", ""), ("attn", "_attn"))
                    if block_aux[part] is not None]
    x = self.norm(x)
    logits = self.embed.attend(x) if self.head is None else self.head(x)                    # [B, T, V]
    return logits.astype(jnp.float32), moe.sum_aux(named_aux), new_cache

  def __call__(self, tokens: jax.Array, *, deterministic: bool = True,
               mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """tokens int [B, T] -> (logits float32 [B, T, V], aux). Pass deterministic=False when training (dropout,
    router noise). mask [B, T] (optional): real tokens; padding takes no expert capacity and counts in no
    routing statistic or loss."""
    T = tokens.shape[-1]
    if self.pos_embed is not None and T > self.config.max_length:
      raise ValueError(f"sequence of {T} tokens is longer than model.max_length={self.config.max_length} "
                       "(the learned position table)")
    logits, aux, _ = self._run(tokens, jnp.arange(T), deterministic=deterministic, cache=None, mask=mask)
    return logits, aux

  def init_cache(self, batch_size: int, max_length: int | None = None) -> list[dict]:
    """Zero key/value caches for `batch_size` sequences of up to `max_length` tokens (default model.max_length;
    with RoPE it may be longer: attention still sees the last model.max_length positions): a list with one dict
    of arrays per block."""
    length = self.config.max_length if max_length is None else max_length
    if self.pos_embed is not None and length > self.config.max_length:
      raise ValueError(f"max_length={length} exceeds model.max_length={self.config.max_length} (learned positions)")
    caches = []
    for block in self.blocks:
      if block.kind == "umoe":
        caches.append(block.attn.init_cache(batch_size, length, self.config.dim, self.dtype))
      else:
        caches.append(block.attn.init_cache(batch_size, length, self.dtype))
    return caches

  def decode(self, tokens: jax.Array, cache: list[dict], position) -> tuple[jax.Array, list[dict]]:
    """Runs tokens int [B, S] at positions position..position+S-1 against the cache (which must hold the
    earlier positions) -> (logits float32 [B, S, V], updated cache). `position` may be a traced int scalar; the
    caller keeps position + S <= the cache length (writes past the end are clamped by XLA)."""
    positions = position + jnp.arange(tokens.shape[-1])
    logits, _, cache = self._run(tokens, positions, deterministic=True, cache=cache)
    return logits, cache


def build_lm(config, *, rngs: nnx.Rngs | None = None) -> LanguageModel:
  """Builds a Transformer LM or UMoE from a model config (keys in the module docstring); validates it first."""
  return LanguageModel(lm_config(config), rngs=rngs if rngs is not None else nnx.Rngs(0))


# Sampling with the cache

def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float = 1.0, top_k: int | None = None):
  """logits [B, V] -> token ids [B]: greedy when temperature == 0, else softmax(logits / temperature) restricted
  to the top_k most likely tokens (all when None)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@nnx.jit
def _decode_step(model: LanguageModel, tokens: jax.Array, cache: list[dict], position: jax.Array):
  return model.decode(tokens, cache, position)


def generate(model: LanguageModel, prompt, num_tokens: int, *, rng: jax.Array, temperature: float = 1.0,
             top_k: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Samples `num_tokens` tokens after `prompt` int [B, P] with the KV cache.

  Returns (tokens int32 [B, P + num_tokens], step_logits float32 [B, num_tokens, V]): the logits each new token
  was sampled from. The prompt runs in one decode call, then one call per token (two compilations).
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  B, P = prompt.shape
  if P < 1:
    raise ValueError("prompt must hold at least one token")
  if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
    raise ValueError(f"top_k={top_k!r} must be in [1, vocab_size={model.config.vocab_size}]")
  if temperature < 0:
    raise ValueError(f"temperature={temperature!r} must be >= 0 (0: greedy)")
  cache = model.init_cache(B, P + num_tokens)
  logits, cache = _decode_step(model, prompt, cache, jnp.asarray(0, jnp.int32))
  next_logits = logits[:, -1]
  tokens, step_logits = [prompt], []
  for step in range(num_tokens):
    rng, key = jax.random.split(rng)
    token = sample_logits(next_logits, key, temperature=temperature, top_k=top_k)          # [B]
    tokens.append(token[:, None])
    step_logits.append(next_logits)
    if step + 1 < num_tokens:
      logits, cache = _decode_step(model, token[:, None], cache, jnp.asarray(P + step, jnp.int32))
      next_logits = logits[:, -1]
  return jnp.concatenate(tokens, axis=1), jnp.stack(step_logits, axis=1) if step_logits else \
      jnp.zeros((B, 0, model.config.vocab_size), jnp.float32)


def ffn_macs_per_token(config: LMConfig) -> int:
  """Multiply-adds per token of the MLP and expert computations of one forward pass, summed over blocks (the part
  MoE changes; attention and embeddings are left out): an MLP of width H costs 2*D*H (3*D*H for swiglu), a router
  D*E. Used to give a dense baseline the same active compute as an MoE model."""
  per_width = (3 if config.mlp_activation == "swiglu" else 2) * config.dim
  total = 0
  for index in range(config.depth):
    if index not in config.moe_layers:
      total += per_width * config.mlp_dim
      continue
    m = config.moe
    active, routers = m.k, 1
    if config.name == "umoe":
      active += int(config.umoe_attn_shared_expert)
      active += config.umoe_attn_k if config.umoe_mixing == "pre" else m.num_experts
      routers += 1
    total += (per_width * (config.expert_dim * active + config.shared_expert_dim * m.num_shared_experts)
              + routers * config.dim * m.num_experts)
  return total
