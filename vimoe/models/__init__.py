"""Models: ViT / ViMoE (vit.py).

    from vimoe.models import build_vit
    model = build_vit(config.model, rngs=nnx.Rngs(0))
    logits, aux = model(images, deterministic=False)   # images [B, H, W, 3]
"""

from vimoe.models.vit import (VARIANTS, MoeConfig, ViT, ViTConfig, activated_params, assign_params,
                              bicubic_resize_matrix, build_vit, count_params, flat_params, moe_blocks,
                              parse_moe_layers, resize_position_grid, vit_config)

__all__ = [
    "VARIANTS", "MoeConfig", "ViT", "ViTConfig", "activated_params", "assign_params", "bicubic_resize_matrix",
    "build_vit", "count_params", "flat_params", "moe_blocks", "parse_moe_layers", "resize_position_grid",
    "vit_config",
]
