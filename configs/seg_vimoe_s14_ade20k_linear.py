"""ViMoE-S/14 + linear head on ADE20K: MoE in the last L blocks (default L=1), N=8 experts, top-1, per-TOKEN
routing, one shared expert, upcycled from DINOv2 ViT-S/14. Paper: 51.5 mIoU at L=1 (dense 50.8).

    python scripts/train.py --config configs/seg_vimoe_s14_ade20k_linear.py --workdir runs/seg_vimoe_s14_l1 \
        --config.init.checkpoint=ckpt/dinov2_s14 --config.data.data_dir=/data/ADEChallengeData2016
    python scripts/train.py --config configs/seg_vimoe_s14_ade20k_linear.py:2 --workdir runs/seg_vimoe_s14_l2 ...

Arg: "L" or "L,head" (default "1,linear"), e.g. `:2` for the L=2 variant, `:1,linear4`.

TPU: compiled ahead of time at batch 16 (512 px crops) for v5e:2x2 (4 chips) with --config.model.dtype=bfloat16:
5.2 GiB per chip of 16 GB (docs/benchmarks.md, 'Paper configs on TPU slices'; `scripts/memory_report.py --topology` checks any other).
"""

from configs.ade20k_common import base_config


def get_config(arg=None):
  parts = str(arg).split(",") if arg else []
  last = int(parts[0]) if parts else 1
  head = parts[1] if len(parts) > 1 else "linear"
  return base_config(moe_layers=f"last:{last}", head=head)
