"""ViMoE-S/14 + linear head on ADE20K with MoE in the last L=2 blocks (same as seg_vimoe_s14_ade20k_linear.py:2).

    python scripts/train.py --config configs/seg_vimoe_s14_ade20k_linear_l2.py --workdir runs/seg_vimoe_s14_l2 \
        --config.init.checkpoint=ckpt/dinov2_s14 --config.data.data_dir=/data/ADEChallengeData2016
"""

from configs.ade20k_common import base_config


def get_config(arg=None):
  return base_config(moe_layers="last:2", head=arg or "linear")
