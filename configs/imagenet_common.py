"""The ImageNet-1k fine-tuning recipe shared by the vit_/vimoe_/vmoe_ configs (each config states what differs).

Fine-tuning from DINOv2 follows the usual BEiT/DINOv2 end-to-end recipe: AdamW, batch 1024, peak lr 5e-4 at batch
1024 (scaled linearly with the batch), layer-wise lr decay 0.75 (S) or 0.65 (B), 5 warmup epochs, cosine decay,
label smoothing 0.1, weight decay 0.05, drop-path 0.1, random-resized crop + flip at 224 px. The ViMoE paper (arXiv 2410.15732) does not print every hyper-parameter; where it is silent these are the
standard values, and the numbers to compare with are in docs/design.md, "Published numbers to compare against"
(dense S/14 83.1, ViMoE L=2 + shared expert 84.2 top-1).
"""

import ml_collections
from ml_collections.config_dict import placeholder

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def base_config(*, variant: str, epochs: int, batch_size: int = 1024, lr: float = 5e-4, layer_decay: float = 0.75,
                warmup_epochs: int = 5, moe_layers: str = "none", num_experts: int = 8, k: int = 1,
                num_shared_experts: int = 1, route_per: str = "item", capacity_factor=None,
                dispatch: str = "gather", init_checkpoint=None, drop_path_rate: float = 0.1,
                weight_decay: float = 0.05, label_smoothing: float = 0.1, layerscale_init=1e-5):
  steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch_size
  config = ml_collections.ConfigDict()
  config.task = "classification"
  config.seed = 0
  config.batch_size = batch_size
  config.eval_batch_size = 500
  total_steps = ml_collections.FieldReference(epochs * steps_per_epoch)
  config.total_steps = total_steps
  config.log_every = 100
  config.eval_every = steps_per_epoch
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.label_smoothing = label_smoothing
  config.microbatches = 1  # gradient accumulation: microbatches per step (1: none; docs/workdirs.md)
  config.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", image_size=224, data_dir=ml_collections.config_dict.placeholder(str), augment=True,
      num_workers=8, read_threads=16, train_split="train", eval_split="validation"))
  config.model = ml_collections.ConfigDict(dict(
      variant=variant, image_size=224, num_classes=1000, num_registers=0, layerscale_init=layerscale_init,
      classifier="cls", head_zero_init=True, drop_path_rate=drop_path_rate))
  config.model.dtype = "float32"  # computation dtype ("bfloat16": parameters stay float32)
  config.model.remat = "none"  # rematerialisation of each block: "none" | "full" | "dots" (docs/models.md)
  config.model.moe = ml_collections.ConfigDict(dict(
      layers=moe_layers, num_experts=num_experts, k=k, router="top_k",
      capacity_factor=placeholder(float) if capacity_factor is None else capacity_factor,
      dispatch=dispatch, group_size=placeholder(int), route_per=route_per, num_shared_experts=num_shared_experts,
      normalize_gates=False, balance_weight=0.01, importance_weight=0.0, z_loss_weight=0.0,
      # Dropless expert parallelism on accelerators (docs/benchmarks.md, 'Paper configs on TPU slices'):
      grouped_matmul="auto", dropless_buffer_factor=placeholder(float)))
  config.init = ml_collections.ConfigDict(dict(
      checkpoint=init_checkpoint if init_checkpoint is not None else ml_collections.config_dict.placeholder(str),
      noise_std=0.0))
  config.optim = ml_collections.ConfigDict(dict(
      lr=lr * batch_size / 1024, min_lr_ratio=0.01, warmup_steps=warmup_epochs * steps_per_epoch,
      weight_decay=weight_decay, b1=0.9, b2=0.999, grad_clip_norm=1.0, layer_decay=layer_decay))
  config.optim.total_steps = total_steps
  config.mesh = ml_collections.ConfigDict(dict(data=placeholder(int), expert=placeholder(int)))
  return config
