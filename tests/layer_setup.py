"""Builds small MoeLayers with every parameter set to random values, so routing and biases are non-trivial.

Default initialisation is not enough for the reference tests: routers start near-uniform (top_k) or at zero
(noisy_top_k), and expert biases start at zero, which would hide a missing bias or a wrong gate.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimoe import moe

D, H, E = 8, 16, 4   # model dim, expert hidden dim, experts
B, T = 2, 8          # batch, tokens per item


def randomize(layer, seed: int, router_scale: float = 1.0) -> None:
  """Sets every nnx.Param of `layer` to a seeded random value of a sensible scale."""
  rng = np.random.RandomState(seed)

  def fill(param, scale):
    param[...] = jnp.asarray(scale * rng.randn(*param[...].shape), jnp.float32)

  for name in ("kernel", "noise_kernel"):
    if hasattr(layer.router, name):
      fill(getattr(layer.router, name), router_scale)
  if hasattr(layer.router, "scale"):
    layer.router.scale[...] = jnp.asarray(3.0, jnp.float32)
  for module in (getattr(layer, "experts", None), getattr(layer, "shared", None)):
    if module is None:
      continue
    dim, hidden = module.w_in[...].shape[1:]
    fill(module.w_in, 1 / math.sqrt(dim))
    fill(module.b_in, 0.1)
    fill(module.w_out, 1 / math.sqrt(hidden))
    fill(module.b_out, 0.1)
    if hasattr(module, "w_gate"):
      fill(module.w_gate, 1 / math.sqrt(dim))
    if hasattr(module, "slope"):
      module.slope[...] = jnp.asarray(rng.uniform(0.05, 0.5, module.slope[...].shape), jnp.float32)


def build_layer(seed: int = 0, *, dim: int = D, hidden_dim: int = H, num_experts: int = E, k: int = 1,
                **kwargs):
  layer = moe.MoeLayer(dim, hidden_dim, num_experts, k, rngs=nnx.Rngs(seed), **kwargs)
  randomize(layer, seed + 1)
  return layer


@nnx.jit
def _forward(layer, x, call_kwargs):
  return layer(x, deterministic=True, **call_kwargs)


def forward(layer, x, **call_kwargs):
  """layer(x, deterministic=True, **call_kwargs) under nnx.jit -> (y, aux).

  On CPU one XLA compile per layer configuration is much cheaper than the dozens of small compiles of an eager
  call; layers with the same configuration share the compiled program."""
  return _forward(layer, jnp.asarray(x), call_kwargs)


def random_input(seed: int, shape=(B, T, D)) -> np.ndarray:
  return np.random.RandomState(1000 + seed).randn(*shape).astype(np.float32)
