"""Shazeer et al. 2017's LSTM language model with a sparsely-gated MoE between two LSTM layers (arXiv 1701.06538).

Layout, as in the paper's appendix C.1 ("8-million-operations-per-timestep models"): five layers,

    word embedding -> LSTM -> MoE -> LSTM -> softmax

with one width D for the embedding, the LSTM units and the MoE input/output (512 in the paper). "For every layer
other than the softmax, we apply dropout to the layer output ... After dropout, the output of the previous layer is
added to the layer output", and "the output of the MoE layer is passed through a sigmoid function before dropout":

    h0 = dropout(embed(tokens))                          [B, T, D]
    h1 = h0 + dropout(LSTM_1(h0))                        [B, T, D]
    h2 = h1 + dropout(sigmoid(MoE(h1)))                  [B, T, D]   MoE on all B*T time steps at once
    h3 = h2 + dropout(LSTM_2(h2))                        [B, T, D]
    logits = h3 W_softmax + b                            [B, T, V]

The MoE: ReLU expert MLPs D -> hidden_dim -> D (512 -> 1024 -> 512 in the paper), noisy top-k gating with k=4
(flat: MoE-4/32/256) or the hierarchical MoE with k=2 at each level (MoE-256-h .. MoE-4096-h: 16 groups),
importance and load losses weighted 0.1; gate weights start at zero (appendix A). Its formulas:
docs/design.md, 'Routers', 'Hierarchical MoE' and 'Models built on the layer'.

Not reproduced: the paper's importance-sampled softmax over an 800k-word vocabulary (ours is a full softmax over a
small byte or SentencePiece vocabulary), the output-projected LSTMs of the larger C.2 models, and the paper's
batches of ~300k words. vimoe's experts carry biases (1536 parameters per paper-size expert, which the paper's
counts leave out). Each sequence starts from a zero LSTM state (training windows are independent).

The LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000) is written out with
`jax.lax.scan`: gates z = x W_x + h W_h + b split as (i, f, g, o);
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g),    h_t = sigmoid(o) * tanh(c_t).
The forget-gate bias starts at `forget_bias` (1.0, Jozefowicz et al. 2015) and is trained.

Parameters: `embed.embedding` [V, D]; `blocks[0]` and `blocks[2]` are `LstmBlock`s (`lstm.input_kernel` [D, 4D],
`lstm.recurrent_kernel` [D, 4D], `lstm.bias` [4D]); `blocks[1]` is the `MoeBlock` (`moe`: the MoE layer);
`head.kernel` [D, V], `head.bias` [V]. Layer-wise lr decay counts the three blocks (vimoe/train/optim.py).

Call: `logits, aux = model(tokens, deterministic=...)` with tokens int32 [B, T]; logits float32 [B, T, V];
aux = {"losses": {"importance": ..., "load": ...} (weighted, only non-zero weights),
       "metrics": {"block1": metrics of the MoE layer}} -- the key is the MoE's index in `model.blocks`.

Model config keys: docs/models.md, 'LSTM-MoE'.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vimoe import moe as moe_lib
from vimoe.models import params as params_lib
from vimoe.models.config_utils import DTYPES, as_dict, check_remat, choose, positive_int, remat_block
from vimoe.models.params import activated_params, count_params  # noqa: F401  (the model's API)

MOE_TYPES = ("flat", "hierarchical")
MODEL_KEYS = ("name", "vocab_size", "dim", "dropout", "forget_bias", "dtype", "remat", "moe")
# model.moe keys: the LSTM-MoE's own (-> LstmMoeConfig field) and those of the MoeConfig (MOE_FIELDS).
MOE_EXTRAS = {"type": "moe_type", "hidden_dim": "hidden_dim", "num_groups": "num_groups",
              "experts_per_group": "experts_per_group", "k_primary": "k_primary", "k_secondary": "k_secondary"}
MOE_FIELDS = ("num_experts", "k", "importance_weight", "load_weight", "capacity_factor", "dispatch", "group_size",
              "grouped_matmul", "dropless_buffer_factor")
MOE_KEYS = ("type", "hidden_dim", "num_experts", "k", "num_groups", "experts_per_group", "k_primary", "k_secondary",
            "importance_weight", "load_weight", "capacity_factor", "dispatch", "group_size", "grouped_matmul",
            "dropless_buffer_factor")
# The paper's MoE (flat MoE-256 of appendix C.1): ReLU experts, noisy top-4 of 256, both losses weighted 0.1.
MOE_DEFAULTS = moe_lib.MoeConfig(num_experts=256, k=4, router="noisy_top_k", capacity_factor=None,
                                 dispatch="gather", activation="relu", causal=True, importance_weight=0.1,
                                 load_weight=0.1)


@dataclasses.dataclass(frozen=True)
class LstmMoeConfig:
  """Resolved sizes of the LSTM-MoE language model (keys in the module docstring)."""
  vocab_size: int = 256
  dim: int = 512
  dropout: float = 0.1
  forget_bias: float = 1.0
  dtype: str = "float32"     # computation dtype; parameters stay float32, the LSTM cell state float32
  remat: str = "none"        # what the backward pass keeps of each block (config_utils.REMAT_POLICIES)
  moe_type: str = "flat"
  hidden_dim: int = 1024
  num_groups: int = 16
  experts_per_group: int = 256
  k_primary: int = 2
  k_secondary: int = 2
  moe: moe_lib.MoeConfig = MOE_DEFAULTS   # num_experts and k are the flat MoE's

  num_experts = property(lambda self: self.moe.num_experts)
  k = property(lambda self: self.moe.k)

  @property
  def experts_per_token(self) -> int:
    return self.k if self.moe_type == "flat" else self.k_primary * self.k_secondary


def lstm_config(config) -> LstmMoeConfig:
  """Validates a model config (ConfigDict or dict) and resolves the defaults."""
  values = as_dict(config)
  unknown = [key for key in values if key not in MODEL_KEYS]
  if unknown:
    raise ValueError(f"config.model key(s) {unknown} are not LSTM-MoE keys; valid: {', '.join(MODEL_KEYS)}")
  if values.get("name", "lstm_moe") not in ("lstm_moe", None):
    raise ValueError(f"config.model.name={values['name']!r}: build_lstm_lm builds name='lstm_moe'")
  moe_values = as_dict(values.get("moe"))
  unknown = [key for key in moe_values if key not in MOE_KEYS]
  if unknown:
    raise ValueError(f"config.model.moe key(s) {unknown} are not LSTM-MoE keys; valid: {', '.join(MOE_KEYS)}")
  fields = {key: values[key] for key in ("vocab_size", "dim", "dropout", "forget_bias", "dtype", "remat")
            if values.get(key) is not None}
  fields.update({field: moe_values[key] for key, field in MOE_EXTRAS.items() if moe_values.get(key) is not None})
  moe_config = moe_lib.MoeConfig.from_dict({key: moe_values[key] for key in MOE_FIELDS if key in moe_values},
                                           defaults=MOE_DEFAULTS, validate=False)
  resolved = LstmMoeConfig(**fields, moe=moe_config)
  for key in ("vocab_size", "dim", "hidden_dim"):
    positive_int(getattr(resolved, key), f"config.model.{'moe.' if key == 'hidden_dim' else ''}{key}")
  choose("config.model.dtype", resolved.dtype, tuple(DTYPES))
  check_remat(resolved.remat, "config.model.remat")
  if not 0 <= resolved.dropout < 1:
    raise ValueError(f"config.model.dropout={resolved.dropout!r} must be in [0, 1)")
  if resolved.moe_type not in MOE_TYPES:
    raise ValueError(f"config.model.moe.type={resolved.moe_type!r} is unknown; valid: {', '.join(MOE_TYPES)}")
  if resolved.moe_type == "flat":
    if not 1 <= resolved.k <= resolved.num_experts:
      raise ValueError(f"config.model.moe.k={resolved.k!r} must be in [1, num_experts={resolved.num_experts}]")
  else:
    if not 1 <= resolved.k_primary <= resolved.num_groups:
      raise ValueError(f"config.model.moe.k_primary={resolved.k_primary!r} must be in "
                       f"[1, num_groups={resolved.num_groups}]")
    if not 1 <= resolved.k_secondary <= resolved.experts_per_group:
      raise ValueError(f"config.model.moe.k_secondary={resolved.k_secondary!r} must be in "
                       f"[1, experts_per_group={resolved.experts_per_group}]")
  capacity_factor = moe_config.capacity_factor
  if capacity_factor is not None and resolved.experts_per_token > 1:
    # Token-choice capacity serves every first choice of the group before any second choice, so a later token's
    # first choice can push out an earlier token's second choice: the earlier output would depend on the future.
    raise ValueError(f"config.model.moe.capacity_factor={capacity_factor!r} with "
                     f"{resolved.experts_per_token} experts per token: in a language model a capacity would let "
                     "later tokens drop earlier tokens' second choices (not causal); use capacity_factor=None "
                     "(no token is dropped) or one expert per token")
  if resolved.moe_type == "flat":  # the hierarchical layer checks its own settings
    moe_config.validate("config.model.moe.")
  return resolved


# LSTM


def lstm_scan(input_projection: jax.Array, recurrent_kernel: jax.Array) -> jax.Array:
  """Runs the LSTM recurrence from a zero state.

  input_projection [B, T, 4H] = x W_x + b (computed for all steps at once); recurrent_kernel [H, 4H], gates in the
  order (i, f, g, o). Returns the hidden states h [B, T, H]. The matmuls run in input_projection's dtype (the
  compute dtype); the gates and the cell state are float32, so a bfloat16 model does not round its memory.
  """
  B, _, four_h = input_projection.shape
  H = four_h // 4
  dtype = input_projection.dtype
  recurrent_kernel = recurrent_kernel.astype(dtype)

  def step(carry, projected):                  # projected [B, 4H]: one time step
    cell, hidden = carry
    z = (projected + hidden @ recurrent_kernel).astype(jnp.float32)   # [B, 4H]
    i, f, g, o = jnp.split(z, 4, axis=-1)
    cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
    hidden = (jax.nn.sigmoid(o) * jnp.tanh(cell)).astype(dtype)
    return (cell, hidden), hidden

  zeros = jnp.zeros((B, H), jnp.float32)
  _, hiddens = jax.lax.scan(step, (zeros, zeros.astype(dtype)), jnp.swapaxes(input_projection, 0, 1))  # [T, B, H]
  return jnp.swapaxes(hiddens, 0, 1)


class LSTM(nnx.Module):
  """One LSTM layer over a whole sequence: x [B, T, D] -> h [B, T, H]."""

  def __init__(self, in_dim: int, hidden_dim: int, *, forget_bias: float = 1.0, dtype=jnp.float32,
               rngs: nnx.Rngs):
    H = hidden_dim
    self.dtype = dtype  # computation dtype (parameters are float32)
    self.input_kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (in_dim, 4 * H)))
    # One orthogonal [H, H] block per gate keeps the recurrence well conditioned at the start.
    blocks = [nnx.initializers.orthogonal()(rngs.params(), (H, H)) for _ in range(4)]
    self.recurrent_kernel = nnx.Param(jnp.concatenate(blocks, axis=1))
    self.bias = nnx.Param(jnp.zeros((4 * H,)).at[H:2 * H].set(forget_bias))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    projected = x @ self.input_kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)  # [B, T, 4H]: all steps
    return lstm_scan(projected, self.recurrent_kernel[...])


# Blocks and model


def _dropout(rate: float, rngs: nnx.Rngs):
  return nnx.Dropout(rate, rngs=rngs) if rate > 0 else None


def _apply_dropout(dropout, x, deterministic: bool):
  return x if dropout is None else dropout(x, deterministic=deterministic)


class LstmBlock(nnx.Module):
  """x + dropout(LSTM(x))."""

  def __init__(self, config: LstmMoeConfig, *, rngs: nnx.Rngs):
    self.lstm = LSTM(config.dim, config.dim, forget_bias=config.forget_bias, dtype=DTYPES[config.dtype], rngs=rngs)
    self.dropout = _dropout(config.dropout, rngs)

  def __call__(self, x, *, deterministic: bool, mask=None):
    del mask  # the LSTM is causal: padding at the end of a sequence never reaches real tokens
    return x + _apply_dropout(self.dropout, self.lstm(x), deterministic), None


def build_moe_layer(config: LstmMoeConfig, *, rngs: nnx.Rngs):
  """The paper's MoE: ReLU experts D -> hidden_dim -> D, noisy top-k gating, flat or hierarchical."""
  if config.moe_type == "flat":
    return moe_lib.MoeLayer(config.dim, config.hidden_dim, config.moe, rngs=rngs)
  return moe_lib.HierarchicalMoeLayer(config.dim, config.hidden_dim, config.num_groups, config.experts_per_group,
                                      config.moe, k_primary=config.k_primary, k_secondary=config.k_secondary,
                                      rngs=rngs)


class MoeBlock(nnx.Module):
  """x + dropout(sigmoid(MoE(x))), the MoE applied to every time step of every sequence at once."""

  def __init__(self, config: LstmMoeConfig, *, rngs: nnx.Rngs):
    self.moe = build_moe_layer(config, rngs=rngs)
    self.dropout = _dropout(config.dropout, rngs)

  def __call__(self, x, *, deterministic: bool, mask=None):
    y, aux = self.moe(x, mask=mask, deterministic=deterministic)          # [B, T, D]
    return x + _apply_dropout(self.dropout, jax.nn.sigmoid(y), deterministic), aux


class LstmMoeLM(params_lib.BlockStack, nnx.Module):
  """embedding -> LSTM -> MoE -> LSTM -> softmax, residual connections around the three middle layers."""

  def __init__(self, config: LstmMoeConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = DTYPES[config.dtype]
    self.embed = nnx.Embed(config.vocab_size, config.dim, dtype=dtype, rngs=rngs)
    self.embed_dropout = _dropout(config.dropout, rngs)
    self.blocks = nnx.List([LstmBlock(config, rngs=rngs), MoeBlock(config, rngs=rngs), LstmBlock(config, rngs=rngs)])
    self.head = nnx.Linear(config.dim, config.vocab_size, kernel_init=nnx.initializers.lecun_normal(), dtype=dtype,
                           rngs=rngs)

  EMBEDDINGS = ("embed",)  # layer 0 for layer-wise lr decay (params_lib.BlockStack)

  def __call__(self, tokens: jax.Array, *, deterministic: bool = True,
               mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """tokens int32 [B, T] -> (logits float32 [B, T, V], aux). deterministic=False when training (dropout, router
    noise). mask [B, T] (optional): real tokens; padding takes no expert capacity and counts in no routing
    statistic or loss."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens have shape {tokens.shape}; expected [batch, time] integer ids")
    x = _apply_dropout(self.embed_dropout, self.embed(tokens), deterministic)   # [B, T, D]
    named_aux = []
    run_block = remat_block(lambda block, x, mask: block(x, deterministic=deterministic, mask=mask),
                            self.config.remat)
    for index, block in enumerate(self.blocks):
      x, block_aux = run_block(block, x, mask)
      if block_aux is not None:
        named_aux.append((f"block{index}", block_aux))
    logits = self.head(x)                                                        # [B, T, V]
    return logits.astype(jnp.float32), moe_lib.sum_aux(named_aux)


def build_lstm_lm(config, *, rngs: nnx.Rngs | None = None) -> LstmMoeLM:
  """Builds the LSTM-MoE language model from a model config (keys in the module docstring); validates it first."""
  return LstmMoeLM(lstm_config(config), rngs=rngs if rngs is not None else nnx.Rngs(0))
