"""Config helpers shared by the model families: every error names the key, its value and what is valid."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimoe.moe.config import choose

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# `model.remat`: what the backward pass of each block keeps from the forward pass (every model family).
#   "none": everything (no rematerialisation; the default, today's step);
#   "full": only the block's inputs: the whole block is recomputed in the backward pass (`nnx.remat`);
#   "dots": the outputs of matmuls without batch dimensions (the dense projections); the rest, including the
#           experts' batched matmuls and attention, is recomputed.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}

__all__ = ["DTYPES", "REMAT_POLICIES", "as_dict", "check_keys", "check_remat", "choose", "parse_moe_layers",
           "positive_int", "remat_block"]


def check_remat(value, key: str = "model.remat") -> str:
  """The one check of `model.remat` (raises naming the key, the value and the valid ones)."""
  choose(key, value, tuple(REMAT_POLICIES))
  return value


def remat_block(block_call: Callable, remat: str) -> Callable:
  """`block_call(module, *arrays)` as the backward pass should see it under `model.remat=remat`: unchanged for
  "none", else an `nnx.remat` whose policy (REMAT_POLICIES) says what is kept. Python flags (deterministic, ...)
  must be closed over by `block_call`, not passed."""
  if remat == "none":
    return block_call
  return nnx.remat(block_call, policy=REMAT_POLICIES[remat])


def as_dict(config) -> dict:
  """An ml_collections.ConfigDict, a dict or None as a plain dict (one level)."""
  if config is None:
    return {}
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    return config.to_dict()
  return dict(config)


def check_keys(given, valid: Sequence[str], prefix: str) -> None:
  unknown = sorted(set(given) - set(valid))
  if unknown:
    raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                     f"valid keys: {', '.join(valid)}")


def positive_int(value, key: str) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{key}={value!r} must be a positive integer")
  return int(value)


def parse_moe_layers(spec, depth: int, key: str = "model.moe.layers") -> tuple[int, ...]:
  """Which blocks (0-based) are MoE blocks.

  "none" / None / ""  -> ()
  "last:L"            -> the last L blocks (ViMoE counts l=1 as the last block), L in [0, depth]
  "every:n"           -> every n-th block counted back from the last: depth-1, depth-1-n, ... (V-MoE's "every
                         other layer" is every:2 = blocks 1, 3, ..., depth-1), n in [1, depth]
  [i, j, ...] / "i,j" -> explicit 0-based indices in [0, depth-1], no repeats
  """
  valid = f"valid: 'none', 'last:L' (0 <= L <= {depth}), 'every:n' (1 <= n <= {depth}), or a list of block " \
          f"indices in [0, {depth - 1}]"
  if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
    return ()
  if isinstance(spec, str):
    text = spec.strip()
    match = re.fullmatch(r"(last|every):\s*(-?\d+)", text)
    if match:
      kind, number = match.group(1), int(match.group(2))
      if kind == "last":
        if not 0 <= number <= depth:
          raise ValueError(f"{key}={spec!r}: L={number} is out of range for depth {depth}; {valid}")
        return tuple(range(depth - number, depth))
      if not 1 <= number <= depth:
        raise ValueError(f"{key}={spec!r}: n={number} is out of range for depth {depth}; {valid}")
      return tuple(sorted(range(depth - 1, -1, -number)))
    if not re.fullmatch(r"-?\d+(\s*,\s*-?\d+)*", text):
      raise ValueError(f"{key}={spec!r} is not understood; {valid}")
    indices = [int(part) for part in text.split(",")]
  elif isinstance(spec, (list, tuple)):
    indices = list(spec)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in indices):
      raise ValueError(f"{key}={spec!r}: block indices must be integers; {valid}")
  else:
    raise ValueError(f"{key}={spec!r} has type {type(spec).__name__}; {valid}")
  for index in indices:
    if not 0 <= index < depth:
      raise ValueError(f"{key}={spec!r}: block index {index} is out of range for depth {depth}; {valid}")
  if len(set(indices)) != len(indices):
    raise ValueError(f"{key}={spec!r} names a block twice; {valid}")
  return tuple(sorted(int(i) for i in indices))
