"""V-MoE S/32 (Riquelme et al. 2021, arXiv 2106.05974) trained from scratch on ILSVRC2012: E=8 experts, K=2,
MoE in the last 2 blocks, token routing with capacity factor 1.25 (einsum dispatch in groups, as V-MoE), no
shared expert. Reference: 76.8 top-1 (docs/design.md, "Published numbers to compare against").
From-scratch recipe: 300 epochs, batch 4096, AdamW peak
lr 3e-3 (scaled by batch/4096 here via base lr 7.5e-4 per 1024), 10k warmup steps ~ 32 epochs, weight decay 0.1,
no layer decay.

    python scripts/train.py --config configs/vmoe_s32_in1k.py --workdir runs/vmoe_s32 \
        --config.data.data_dir=$TFDS_DATA_DIR

Arg: epochs (default 300).
"""

from configs.imagenet_common import base_config


def get_config(arg=None):
  config = base_config(variant="S/32", epochs=int(arg or 300), batch_size=4096, lr=7.5e-4, layer_decay=1.0,
                       warmup_epochs=32, moe_layers="last:2", num_experts=8, k=2, num_shared_experts=0,
                       route_per="token", capacity_factor=1.25, dispatch="einsum", drop_path_rate=0.0,
                       weight_decay=0.1, label_smoothing=0.0, layerscale_init=None)
  config.model.moe.group_size = 512  # tokens per routing group (V-MoE routes groups spanning images)
  config.model.head_zero_init = False
  return config
