"""Scale-out: meshes, partition rules, sharded creation and restore targets, multi-host start-up.

The expert-parallel dispatch itself lives with the MoE math (vimoe/moe/sharding.py) and switches on when a mesh
with an 'expert' axis is set: `with jax.set_mesh(mesh): y, aux = layer(x)`.
"""

from vimoe.moe.sharding import DATA_AXIS, EXPERT_AXIS
from vimoe.moe.sharding import token_axes as partition_axes
from vimoe.parallel.distributed import initialize, is_main_process, per_process_batch_size
from vimoe.parallel.mesh import make_mesh, mesh_from_config, mesh_summary
from vimoe.parallel.partition import (DEFAULT_RULES, abstract_with_shardings, create_sharded, named_shardings,
                                      partition_specs, shard_tree, spec_for)

__all__ = [
    "DATA_AXIS", "DEFAULT_RULES", "EXPERT_AXIS", "abstract_with_shardings", "create_sharded", "initialize",
    "is_main_process", "make_mesh", "mesh_from_config", "mesh_summary", "named_shardings", "partition_axes", "partition_specs",
    "per_process_batch_size", "shard_tree", "spec_for",
]
