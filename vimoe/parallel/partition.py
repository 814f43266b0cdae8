"""The one place that maps parameter paths to PartitionSpecs.

Rules are (regex, PartitionSpec) pairs matched against the '/'-joined path of each array in an nnx.State (or
any pytree: optimizer state paths end in the same parameter path, so Adam moments shard like their parameter).
The first match wins. Model creation (`create_sharded`), optimizer state (`shard_tree`) and checkpoint restore
(`abstract_with_shardings`) all go through `partition_specs`.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

# Routed experts' stacked weights [E, ...] are split over 'expert'; everything else (embeddings, attention,
# routers, shared experts) is replicated. Activations are data-sharded by the MoE layer and the trainer.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)experts/(w_in|w_out|w_gate|b_in|b_out|slope)$", P("expert")),
    (r".*", P()),
)

Rules = Sequence[tuple[str, P]]


def path_string(path) -> str:
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(part for part in parts if part != "value")


def spec_for(path: str, rules: Rules = DEFAULT_RULES) -> P:
  for pattern, spec in rules:
    if re.search(pattern, path):
      return spec
  raise ValueError(f"no partition rule matches parameter path {path!r}; add a catch-all rule (r'.*', P())")


def partition_specs(tree, rules: Rules = DEFAULT_RULES):
  """A pytree of PartitionSpecs with the structure of `tree` (scalars always replicated)."""
  def spec(path, leaf):
    if getattr(leaf, "ndim", 0) == 0:
      return P()
    return spec_for(path_string(path), rules)
  return jax.tree_util.tree_map_with_path(spec, tree)


def named_shardings(tree, mesh, rules: Rules = DEFAULT_RULES):
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(tree, rules),
                      is_leaf=lambda x: isinstance(x, P))


def shard_tree(tree, mesh, rules: Rules = DEFAULT_RULES):
  """Places every array of `tree` on `mesh` as the rules say."""
  return jax.device_put(tree, named_shardings(tree, mesh, rules))


def create_sharded(make_module: Callable[[], nnx.Module], mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Builds the module inside jit with its variables born sharded (no full copy on one device first). Built under
the mesh, so that variables carrying their own sharding metadata (MoE experts) have it in both passes."""
  with jax.set_mesh(mesh):
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_module))
    init = jax.jit(lambda: nnx.state(make_module()), out_shardings=named_shardings(abstract_state, mesh, rules))
    return nnx.merge(graphdef, init())


def abstract_with_shardings(tree, mesh, rules: Rules = DEFAULT_RULES):
  """ShapeDtypeStructs carrying the target shardings: the `target` for an orbax restore onto `mesh`, which may
  differ in shape from the mesh the checkpoint was written on."""
  shardings = named_shardings(tree, mesh, rules)
  return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      tree, shardings)
