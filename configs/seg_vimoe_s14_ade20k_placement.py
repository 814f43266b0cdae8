"""ViMoE-S/14 + linear head on ADE20K: MoE in the last L = 1..12 blocks x shared expert off/on (24 runs; N=8,
top-1, routing per token), each upcycled from DINOv2 ViT-S/14 with the recipe of
configs/seg_vimoe_s14_ade20k_linear.py (configs/ade20k_common.py). Paper
(docs/design.md, "Published numbers to compare against"):
dense 50.8 mIoU, ViMoE L=1 51.5.

    python scripts/sweep.py --config configs/seg_vimoe_s14_ade20k_placement.py --workdir runs/seg_placement \
        --print-commands --config.init.checkpoint=ckpt/dinov2_s14 --config.data.data_dir=/data/ADEChallengeData2016
    python scripts/sweep.py --collect runs/seg_placement

Arg: "head" (default "linear"; "linear4" for the multi-layer head).
"""

from configs.ade20k_common import base_config

DEPTH = 12


def get_config(arg=None):
  return base_config(moe_layers="last:1", head=arg or "linear")


def get_sweep(arg=None):
  del arg
  return [{"model.moe.layers": f"last:{last}", "model.moe.num_shared_experts": shared}
          for shared in (1, 0) for last in range(1, DEPTH + 1)]
