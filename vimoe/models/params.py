"""Parameters by dotted path ("blocks.3.attn.qkv.kernel"): reading, writing and counting them. Used by checkpoint
import, upcycling and the sweeps' parameter counts; works for every model family. `BlockStack`: the layer ids
and backbone a model exposes."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vimoe import moe


def path_name(path) -> str:
  return ".".join(str(part) for part in path)


def flatten_dict(tree: dict, prefix: str = "", *, keep_empty: bool = False) -> dict:
  """Nested dicts -> {dotted key: leaf}. keep_empty: an empty dict is kept as a leaf (else it vanishes)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and (value or not keep_empty):
      flat.update(flatten_dict(value, f"{prefix}{key}.", keep_empty=keep_empty))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
  """{dotted parameter name: array} for every nnx.Param of `model`."""
  return {path_name(path): variable.get_value()
          for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assign_params(model: nnx.Module, params: dict, *, keep: Sequence[str] = ()) -> ViT:
  """Overwrites `model`'s parameters by name, in place; returns the model.

  `params` must name exactly the model's parameters, except names starting with one of `keep` (left as they are,
  e.g. a fresh classification head or MoE router). A `pos_embed` for another patch grid is resampled to this model's
  grid with the model's own interpolation, so the result is what the forward pass would compute at that resolution.
  Raises ValueError naming missing, unexpected and mis-shaped parameters.
  """
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  by_name = {path_name(path): path for path in flat}
  kept = lambda name: any(name == prefix or name.startswith(prefix + ".") for prefix in keep)
  missing = sorted(name for name in by_name if name not in params and not kept(name))
  unexpected = sorted(name for name in params if name not in by_name)
  if missing or unexpected:
    raise ValueError(f"parameter names do not match the model: missing {missing or 'none'}; "
                     f"unexpected {unexpected or 'none'}")
  updates, mismatched = {}, []
  for name, value in sorted(params.items()):
    if kept(name):
      continue
    path = by_name[name]
    target_shape = tuple(flat[path].shape)
    value = jnp.asarray(value)
    if name == "pos_embed" and value.ndim == 3 and value.shape[::2] == target_shape[::2] \
        and value.shape[1] != target_shape[1]:  # another patch grid, same width
      value = model.resample_pos_embed(value)  # the ViT's own interpolation (vimoe/models/posemb.py)
    if tuple(value.shape) != target_shape:
      mismatched.append(f"{name} has shape {tuple(value.shape)}, the model expects {target_shape}")
    updates[path] = value.astype(flat[path].dtype)
  if mismatched:
    raise ValueError(f"{len(mismatched)} parameter shape(s) do not match the model: " + "; ".join(mismatched))
  for path, value in updates.items():
    flat[path] = flat[path].replace(value=value)
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def count_params(model: nnx.Module) -> int:
  """Number of parameters (every nnx.Param; works on an `nnx.eval_shape` model too)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def activated_params(model: nnx.Module) -> int:
  """Parameters used per routing unit (token, or image with route_per="item"): each MoE layer counts only the
  experts a unit visits (k; Soft MoE mixes every expert into every token, so all); routers, shared experts and
  everything else count fully. Embedding rows count in full (as the total, not per token)."""
  total = count_params(model)
  for _, layer in nnx.iter_modules(model):
    if isinstance(layer, (moe.MoeLayer, moe.HierarchicalMoeLayer)):
      per_expert = sum(math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(nnx.state(layer.experts, nnx.Param)))
      total -= (layer.experts.num_experts - layer.experts_per_token) * per_expert
  return total


class BlockStack:
  """What the optimizer and the analysis read from a model whose blocks are `blocks/0` .. `blocks/{depth-1}`:
  `backbone` (the model itself), `depth`, and the BEiT-style `layer_id(path)` (layer-wise lr decay) of the
  parameter at '/'-joined `path`: 0 for the top-level `EMBEDDINGS`, i+1 for block i, depth+1 for the rest
  (final norm, head)."""
  EMBEDDINGS: tuple[str, ...] = ()

  @property
  def backbone(self):
    return self

  @property
  def depth(self) -> int:
    return len(self.blocks)

  def layer_id(self, path: str) -> int:
    parts = path.split("/")
    if parts[0] == "blocks":
      return int(parts[1]) + 1
    return 0 if parts[0] in self.EMBEDDINGS else self.depth + 1
