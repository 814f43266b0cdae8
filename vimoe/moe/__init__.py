"""The MoE core: routers, dispatch, auxiliary losses, expert MLPs and the MoeLayer. No model code here.

    from vimoe import moe
    layer = moe.MoeLayer(dim=D, hidden_dim=H, num_experts=E, k=K, rngs=nnx.Rngs(0))
    y, aux = layer(x)        # x [B, T, D]; aux.losses, aux.metrics
"""

from vimoe.moe import dispatch, losses, routing
from vimoe.moe.experts import ACTIVATIONS, Experts, expert_mlp, stacked_expert_mlp
from vimoe.moe.layer import (DISPATCHES, ROUTE_PER, ROUTERS, HierarchicalMoeLayer, MoeAux, MoeLayer, Router,
                             run_experts, validate_moe_args)
from vimoe.moe.routing import Assignment, expert_capacity

__all__ = [
    "ACTIVATIONS", "Assignment", "DISPATCHES", "Experts", "HierarchicalMoeLayer", "MoeAux", "MoeLayer",
    "ROUTE_PER", "ROUTERS", "Router", "dispatch", "expert_capacity", "expert_mlp", "losses", "routing",
    "run_experts", "stacked_expert_mlp", "validate_moe_args",
]
