"""ViMoE-B/14: DINOv2 ViT-B/14 with MoE in the last 2 blocks, N=8, top-1, per-image routing, one shared expert,
upcycled from DINOv2-B. Layer decay 0.65 as usual for B-size fine-tuning. (The paper reports S/14, see
docs/design.md, "Published numbers to compare against"; this is the next size up, for users with more compute.)

    python scripts/train.py --config configs/vimoe_b14_in1k.py --workdir runs/vimoe_b14 \
        --config.init.checkpoint=ckpt/dinov2_b14 --config.data.data_dir=$TFDS_DATA_DIR

Arg: epochs (default 30).

TPU: compiled ahead of time at batch 1024 for v5e:2x4 (8 chips) with --config.model.dtype=bfloat16
--config.model.remat=full: 6.7 GiB per chip of 16 GB (docs/benchmarks.md, 'Paper configs on TPU slices'; `scripts/memory_report.py --topology` checks any other).
"""

from configs.imagenet_common import base_config


def get_config(arg=None):
  return base_config(variant="B/14", epochs=int(arg or 30), layer_decay=0.65, moe_layers="last:2",
                     num_experts=8, k=1, num_shared_experts=1, route_per="item", drop_path_rate=0.2)
