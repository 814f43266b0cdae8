"""The MoE core: one MoeConfig, routers (a registry of plug-ins), dispatch, auxiliary losses, expert MLPs and the
MoeLayer. No model code here.

    from vimoe import moe
    layer = moe.MoeLayer(D, H, moe.MoeConfig(num_experts=E, k=K), rngs=nnx.Rngs(0))   # or MoeLayer(D, H, E, K, ...)
    y, aux = layer(x)        # x [B, T, D]; aux.losses, aux.metrics

A new router: subclass `moe.Router` (or `moe.TokenChoiceRouter`) in vimoe/moe/routers.py, decorate it with
`@moe.register_router`, and test it; `MoeConfig(router=its name)` then selects it everywhere.
"""

from vimoe.moe import dispatch, losses, routing
from vimoe.moe.config import DISPATCHES, ROUTE_PER, MoeConfig, as_config
from vimoe.moe.experts import ACTIVATIONS, Experts, expert_mlp, stacked_expert_mlp
from vimoe.moe.layer import HierarchicalMoeLayer, MoeAux, MoeLayer, sum_aux, weighted_losses
from vimoe.moe.routers import (ROUTERS, Gating, Router, TokenChoiceRouter, is_dropless, register_router,
                               routing_capacity)
from vimoe.moe.routing import Assignment, expert_capacity
from vimoe.moe.sharding import run_experts

__all__ = [
    "ACTIVATIONS", "Assignment", "DISPATCHES", "as_config", "Experts", "Gating", "HierarchicalMoeLayer", "MoeAux", "MoeConfig",
    "MoeLayer", "ROUTE_PER", "ROUTERS", "Router", "TokenChoiceRouter", "dispatch", "expert_capacity", "expert_mlp",
    "is_dropless", "losses", "register_router", "routing", "routing_capacity", "run_experts", "stacked_expert_mlp", "sum_aux", "weighted_losses",
]
