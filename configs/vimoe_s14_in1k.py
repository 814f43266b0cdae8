"""ViMoE-S/14, the paper's headline model (arXiv 2410.15732): DINOv2 ViT-S/14 with MoE MLPs in the last L=2
blocks, N=8 experts, top-1, one routing decision per image (on the class token), one shared expert; upcycled from
DINOv2 (every expert and the shared expert start as the dense MLP). Paper: 84.2 top-1, 24.4M activated
parameters, 6.74 GFLOPs vs 6.14 dense (docs/design.md, "Published numbers to compare against").

    python scripts/train.py --config configs/vimoe_s14_in1k.py --workdir runs/vimoe_s14 \
        --config.init.checkpoint=ckpt/dinov2_s14 --config.data.data_dir=$TFDS_DATA_DIR

Arg: "epochs" or "epochs,L" (default 30,2), e.g. configs/vimoe_s14_in1k.py:30,12 for all 12 blocks MoE.

TPU: compiled ahead of time at batch 1024 for v5e:2x2 (4 chips) with --config.model.dtype=bfloat16
--config.model.remat=full: 5.5 GiB per chip of 16 GB; on v5e:2x4 3.7 GiB with remat, 11.3 GiB without (docs/benchmarks.md, 'Paper configs on TPU slices'; `scripts/memory_report.py --topology` checks any other).
"""

from configs.imagenet_common import base_config


def get_config(arg=None):
  epochs, last = 30, 2
  if arg:
    parts = [int(v) for v in str(arg).split(",")]
    epochs = parts[0]
    last = parts[1] if len(parts) > 1 else last
  return base_config(variant="S/14", epochs=epochs, moe_layers=f"last:{last}", num_experts=8, k=1,
                     num_shared_experts=1, route_per="item")
