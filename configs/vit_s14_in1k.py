"""Dense DINOv2 ViT-S/14 fine-tuned on ImageNet-1k: the baseline of the ViMoE paper (83.1 top-1;
docs/design.md, "Published numbers to compare against").

    python scripts/convert_dinov2.py --input dinov2_vits14.pth --output ckpt/dinov2_s14
    python scripts/train.py --config configs/vit_s14_in1k.py --workdir runs/vit_s14 \
        --config.init.checkpoint=ckpt/dinov2_s14 --config.data.data_dir=$TFDS_DATA_DIR

Arg: epochs (default 30).
"""

from configs.imagenet_common import base_config


def get_config(arg=None):
  return base_config(variant="S/14", epochs=int(arg or 30), moe_layers="none")
