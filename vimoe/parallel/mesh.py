"""Device meshes for expert parallelism: axes ('data', 'expert'), optionally 'model'.

Current jax makes `jax.make_mesh` axes Explicit by default, under which `with_sharding_constraint` (used by the
MoE dispatch) fails; every mesh here uses Auto axes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh


def _largest_divisor(n: int, limit: int) -> int:
  return max(d for d in range(1, n + 1) if n % d == 0 and limit % d == 0)


def make_mesh(data: int | None = None, expert: int | None = None, model: int = 1, *,
              num_experts: int | None = None, devices=None) -> Mesh:
  """A ('data', 'expert'[, 'model']) mesh over `devices` (default: all devices of all processes).

  Sizes left as None are inferred: with neither given, the expert axis is the largest size that divides both the
  device count and `num_experts` (1 without `num_experts`) and the data axis takes the rest.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if model < 1 or n % model:
    raise ValueError(f"mesh model={model} must be a positive divisor of the {n} devices")
  rest = n // model
  if expert is None and data is None:
    expert = _largest_divisor(rest, num_experts) if num_experts else 1
  if expert is None:
    if data < 1 or rest % data:
      raise ValueError(f"mesh data={data} must divide the {rest} devices left after model={model}")
    expert = rest // data
  if data is None:
    if expert < 1 or rest % expert:
      raise ValueError(f"mesh expert={expert} must divide the {rest} devices left after model={model}")
    data = rest // expert
  if data * expert * model != n:
    raise ValueError(f"mesh data={data} x expert={expert} x model={model} = {data * expert * model} "
                     f"does not match the {n} available devices")
  if num_experts is not None and num_experts % expert:
    raise ValueError(f"num_experts={num_experts} is not divisible by the mesh's expert axis size {expert}; "
                     f"valid expert axis sizes: {[d for d in range(1, n + 1) if num_experts % d == 0 and n % d == 0]}")
  shape, names = (data, expert), ("data", "expert")
  if model > 1:
    shape, names = shape + (model,), names + ("model",)
  return Mesh(np.asarray(devices).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


def mesh_from_config(config, num_experts: int | None = None, devices=None) -> Mesh:
  """Builds the mesh from a config block with optional keys `data`, `expert`, `model` (None = infer) over
  `devices` (default: all)."""
  get = (lambda key, default: config.get(key, default)) if hasattr(config, "get") else (
      lambda key, default: getattr(config, key, default))
  return make_mesh(get("data", None), get("expert", None), get("model", 1) or 1, num_experts=num_experts,
                   devices=devices)


def mesh_summary(mesh: Mesh) -> str:
  return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({math.prod(mesh.shape.values())} devices)"
