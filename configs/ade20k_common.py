"""The ADE20K semantic-segmentation recipe shared by the seg_*_ade20k_* configs (each states what differs).

ViMoE (arXiv 2410.15732) evaluates segmentation with a linear decoder on a DINOv2 ViT-S/14 backbone, the MoE
blocks routing per token; paper: dense 50.8 mIoU, ViMoE L=1 51.5
(docs/design.md, "Published numbers to compare against"). Where the paper is silent we
use mmsegmentation's ADE20K schedule that DINOv2's linear evaluation follows: 40k iterations of batch 16,
512x512 crops after a random 0.5-2.0 rescale of the (2048, 512) scale and a flip, AdamW with linear warmup
(1500 iterations) then decay, evaluation by a 512 sliding window with stride 341 at the original resolution.
The backbone is fine-tuned (the MoE layers must learn to route; a frozen upcycled ViMoE equals the dense model)
with layer-wise lr decay 0.9; `--config.model.head.freeze_backbone=True` gives DINOv2's linear probe instead.

Data: `data.name="ade20k"` reads the extracted ADEChallengeData2016 (150 classes, see vimoe/data/segmentation.py
for the two-line preparation); `data.name="scene_parse150"` reads the tfds build, whose annotations come from the
instance track and are not comparable. Weights: `scripts/convert_dinov2.py` (README, "ImageNet reproduction").
"""

import ml_collections
from ml_collections.config_dict import placeholder

ADE20K_CLASSES = 150


def base_config(*, moe_layers: str = "none", head: str = "linear", steps: int = 40_000, batch_size: int = 16,
                lr: float = 1e-4, layer_decay: float = 0.9, num_experts: int = 8, k: int = 1,
                num_shared_experts: int = 1, variant: str = "S/14"):
  config = ml_collections.ConfigDict()
  config.task = "segmentation"
  config.seed = 0
  config.batch_size = batch_size
  config.eval_batch_size = 1  # images keep their own sizes: one per process (set to the process count)
  total_steps = ml_collections.FieldReference(steps)
  config.total_steps = total_steps
  config.log_every = 50
  config.eval_every = 4000
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.label_smoothing = 0.0
  config.microbatches = 1  # gradient accumulation: microbatches per step (1: none; docs/workdirs.md)
  config.expert_map_images = 4
  config.data = ml_collections.ConfigDict(dict(
      name="ade20k", data_dir=ml_collections.config_dict.placeholder(str), crop_size=512, eval_stride=341,
      scale_range=(0.5, 2.0), eval_pad_multiple=32, augment=True, num_workers=8,
      train_split="train", eval_split="validation"))
  # image_size 518 = DINOv2's 37x37 position grid; 512 crops are centre-padded to 518 (37 patches of 14).
  config.model = ml_collections.ConfigDict(dict(
      variant=variant, image_size=518, num_classes=ADE20K_CLASSES, num_registers=0, layerscale_init=1e-5,
      drop_path_rate=0.1))
  config.model.dtype = "float32"  # computation dtype ("bfloat16": parameters stay float32)
  config.model.remat = "none"  # rematerialisation of each block: "none" | "full" | "dots" (docs/models.md)
  config.model.moe = ml_collections.ConfigDict(dict(
      layers=moe_layers, num_experts=num_experts, k=k, router="top_k", capacity_factor=placeholder(float),
      dispatch="gather", group_size=placeholder(int), route_per="token", num_shared_experts=num_shared_experts,
      normalize_gates=False, balance_weight=0.01, importance_weight=0.0, z_loss_weight=0.0,
      # Dropless expert parallelism on accelerators (docs/benchmarks.md, 'Paper configs on TPU slices'):
      grouped_matmul="auto", dropless_buffer_factor=placeholder(float)))
  config.model.head = ml_collections.ConfigDict(dict(kind=head, freeze_backbone=False, dropout=0.1))
  config.init = ml_collections.ConfigDict(dict(checkpoint=ml_collections.config_dict.placeholder(str),
                                               noise_std=0.0))
  config.optim = ml_collections.ConfigDict(dict(
      lr=lr, min_lr_ratio=0.0, warmup_steps=1500, weight_decay=0.05, b1=0.9, b2=0.999, grad_clip_norm=1.0,
      layer_decay=layer_decay))
  config.optim.total_steps = total_steps
  config.mesh = ml_collections.ConfigDict(dict(data=placeholder(int), expert=placeholder(int)))
  return config
