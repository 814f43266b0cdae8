"""Dense DINOv2 ViT-S/14 + linear head on ADE20K: the baseline of ViMoE's segmentation table (50.8 mIoU).

    python scripts/convert_dinov2.py --input dinov2_vits14.pth --output ckpt/dinov2_s14
    python scripts/train.py --config configs/seg_vit_s14_ade20k_linear.py --workdir runs/seg_vit_s14 \
        --config.init.checkpoint=ckpt/dinov2_s14 --config.data.data_dir=/data/ADEChallengeData2016

Arg: the head, "linear" (default) | "linear4" (last 4 blocks) | "segmenter" (mask transformer).
"""

from configs.ade20k_common import base_config


def get_config(arg=None):
  return base_config(moe_layers="none", head=arg or "linear")
