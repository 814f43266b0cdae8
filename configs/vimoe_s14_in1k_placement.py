"""ViMoE-S/14 on ImageNet-1k: which blocks to make MoE (the paper's figure 2, arXiv 2410.15732): MoE in the last
L = 1..12 blocks x shared expert off/on x N = 4, 8, 16 experts (top-1, routing per image), 72 runs, each upcycled
from DINOv2 ViT-S/14 with the recipe of configs/vimoe_s14_in1k.py (configs/imagenet_common.py).

    python scripts/sweep.py --config configs/vimoe_s14_in1k_placement.py --workdir runs/in1k_placement \
        --print-commands --config.init.checkpoint=ckpt/dinov2_s14 --config.data.data_dir=$TFDS_DATA_DIR
    # ... submit each printed line to the scheduler, then:
    python scripts/sweep.py --collect runs/in1k_placement

Arg: "epochs" (default 30). Paper (docs/design.md, "Published numbers to compare against"):
with the shared expert accuracy stays near 84.2-84.3 for any L;
without it, it falls to about 83.6 at L=12; the good configurations have routing degree D = N^L near 32..64.
"""

from configs.imagenet_common import base_config

DEPTH = 12
NUM_EXPERTS = (4, 8, 16)


def get_config(arg=None):
  epochs = int(arg) if arg else 30
  return base_config(variant="S/14", epochs=epochs, moe_layers="last:2", num_experts=8, k=1, num_shared_experts=1,
                     route_per="item")


def get_sweep(arg=None):
  del arg
  return [{"model.moe.layers": f"last:{last}", "model.moe.num_shared_experts": shared,
           "model.moe.num_experts": experts}
          for experts in NUM_EXPERTS for shared in (1, 0) for last in range(1, DEPTH + 1)]
