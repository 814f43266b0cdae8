"""Expert MLPs with stacked weights.

Axis letters (see vimoe/moe/routing.py for the full glossary): E experts, N rows (tokens or slots) per expert,
D model dimension, H hidden dimension.

Each expert is `out = act(x @ w_in + b_in) @ w_out + b_out`; for "swiglu" the hidden activation is
`silu(x @ w_gate) * (x @ w_in + b_in)` (Shazeer 2020, "GLU variants"); for "prelu" the negative slope is a learned
parameter per expert and hidden unit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# "gelu" is the tanh approximation (jax.nn.gelu default); "gelu_exact" is the erf form of torch nn.GELU, which
# DINOv2 uses, so experts upcycled from a DINOv2 MLP compute exactly what the dense MLP did.
ACTIVATIONS = ("gelu", "gelu_exact", "relu", "prelu", "swiglu")

# Default expert kernel initialiser. Expert weights are [E, fan_in, fan_out]: the fan-in axis is -2, the leading
# axis is the expert (batch) axis. A model that hosts MoE layers in place of its own dense MLPs passes the dense
# MLP's initialiser instead (`kernel_init=`), so that replacing an MLP by experts does not change the initial
# scale of the residual branch (the ViT does: truncated normal, std 0.02).
default_kernel_init = jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


def check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r} is not known; valid: {', '.join(ACTIVATIONS)}")


def _matmul(x, w):
  return x @ w.astype(x.dtype)


def expert_mlp(params: dict, x: jax.Array, activation: str, dot=_matmul) -> jax.Array:
  """One expert (no leading E axis on `params`): x [N, D] -> [N, D].

  `dot(x, w)` multiplies by a weight matrix; the grouped form (vimoe/moe/dispatch.py, `grouped_expert_mlp`)
  passes a `ragged_dot` and biases gathered per row ([N, H], [N, D]), which broadcast like the per-expert ones."""
  pre = dot(x, params["w_in"]) + params["b_in"].astype(x.dtype)  # [N, H]
  if activation == "gelu":
    hidden = jax.nn.gelu(pre)
  elif activation == "gelu_exact":
    hidden = jax.nn.gelu(pre, approximate=False)
  elif activation == "relu":
    hidden = jax.nn.relu(pre)
  elif activation == "prelu":
    hidden = jnp.where(pre >= 0, pre, params["slope"].astype(x.dtype) * pre)
  elif activation == "swiglu":
    hidden = jax.nn.silu(dot(x, params["w_gate"])) * pre
  else:
    check_activation(activation)
  return dot(hidden, params["w_out"]) + params["b_out"].astype(x.dtype)  # [N, D]


def stacked_expert_mlp(params: dict, x: jax.Array, activation: str) -> jax.Array:
  """All experts at once: params with leading E axis, x [E, N, D] -> [E, N, D] (a batched matmul)."""
  return jax.vmap(lambda p, xe: expert_mlp(p, xe, activation))(params, x)


class Experts(nnx.Module):
  """`num_experts` MLPs whose weights are stacked on a leading expert axis.

  Parameters: `w_in` [E, D, H], `b_in` [E, H], `w_out` [E, H, D], `b_out` [E, D]; plus `w_gate` [E, D, H] for
  "swiglu" and `slope` [E, H] for "prelu". `kernel_init` (a `jax.nn.initializers` function, called with the
  stacked [E, fan_in, fan_out] shape) initialises w_in, w_out and w_gate; biases start at zero.
  `expert_axis` (a mesh axis name, e.g. 'expert'): every weight is created sharded on it along E (`out_sharding`
  metadata; needs the mesh set with `jax.set_mesh`).
  """

  def __init__(self, num_experts: int, dim: int, hidden_dim: int, *, activation: str = "gelu",
               rngs: nnx.Rngs, param_dtype=jnp.float32, kernel_init=None, expert_axis: str | None = None):
    check_activation(activation)
    self.num_experts, self.dim, self.hidden_dim, self.activation = num_experts, dim, hidden_dim, activation
    E, D, H = num_experts, dim, hidden_dim
    init = default_kernel_init if kernel_init is None else kernel_init
    metadata = {} if expert_axis is None else {"out_sharding": (expert_axis,)}
    param = lambda value: nnx.Param(value, **metadata)
    self.w_in = param(init(rngs.params(), (E, D, H), param_dtype))
    self.b_in = param(jnp.zeros((E, H), param_dtype))
    self.w_out = param(init(rngs.params(), (E, H, D), param_dtype))
    self.b_out = param(jnp.zeros((E, D), param_dtype))
    if activation == "swiglu":
      self.w_gate = param(init(rngs.params(), (E, D, H), param_dtype))
    if activation == "prelu":
      self.slope = param(jnp.full((E, H), 0.25, param_dtype))  # He et al. 2015 initial slope

  def params_dict(self) -> dict:
    names = ["w_in", "b_in", "w_out", "b_out"]
    names += ["w_gate"] if self.activation == "swiglu" else []
    names += ["slope"] if self.activation == "prelu" else []
    return {name: getattr(self, name)[...] for name in names}

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [E, N, D] -> [E, N, D]: expert e applied to row block e."""
    return stacked_expert_mlp(self.params_dict(), x, self.activation)

  def apply_all(self, x: jax.Array) -> jax.Array:
    """Every expert on the same tokens, summed: x [..., D] -> [..., D] (used for always-on shared experts)."""
    flat = x.reshape(-1, x.shape[-1])
    out = stacked_expert_mlp(self.params_dict(), jnp.broadcast_to(flat, (self.num_experts,) + flat.shape),
                             self.activation)
    return out.sum(0).reshape(x.shape)
