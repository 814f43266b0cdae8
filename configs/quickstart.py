"""Quickstart: a small ViMoE on the embedded scikit-learn digits (1797 real 8x8 images, upscaled), CPU-sized.

    python scripts/train.py --config configs/quickstart.py --workdir workdirs/quickstart

ViMoE recipe (arXiv 2410.15732) at toy scale: MoE MLPs in the last 2 of 6 blocks (`last:2`), N=8 experts, top-1,
one routing decision per image taken on the class token, and one always-on shared expert. Trained from scratch
(there is no pretrained backbone of this size). The digits hold 8x8 pixels, so 16x16 images in 4x4 patches
(16 patch tokens + class token) lose nothing and keep a step cheap. Target: held-out top-1 >= 0.95 in under 10
minutes on 2 CPU cores (see docs/results.md for the measured run).
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.task = "classification"
  config.seed = 0
  config.batch_size = 64
  config.eval_batch_size = 128
  total_steps = ml_collections.FieldReference(1000)
  config.total_steps = total_steps
  config.log_every = 50
  config.eval_every = 250
  config.checkpoint_every = 250
  config.keep_checkpoints = 2
  config.label_smoothing = 0.0
  config.microbatches = 1  # gradient accumulation: microbatches per step (1: none; docs/workdirs.md)

  config.data = ml_collections.ConfigDict(dict(
      name="digits", image_size=16, augment=True, max_shift=1, num_workers=0,
      mean=(0.5,), std=(0.5,), train_split="train", eval_split="test"))

  config.model = ml_collections.ConfigDict(dict(
      variant=None, image_size=16, patch_size=4, dim=96, depth=6, num_heads=3, mlp_dim=192, num_classes=10,
      num_registers=0, layerscale_init=None, mlp_activation="gelu", classifier="cls", head_zero_init=False,
      drop_path_rate=0.0))
  config.model.dtype = "float32"  # computation dtype ("bfloat16": parameters stay float32)
  config.model.remat = "none"  # rematerialisation of each block: "none" | "full" | "dots" (docs/models.md)
  config.model.moe = ml_collections.ConfigDict(dict(
      layers="last:2", num_experts=8, k=1, router="top_k", capacity_factor=placeholder(float), dispatch="gather",
      group_size=placeholder(int), route_per="item", num_shared_experts=1, normalize_gates=False,
      balance_weight=0.01, importance_weight=0.0, z_loss_weight=0.0))

  # Used when there is more than one device: sizes None are inferred (vimoe.parallel.make_mesh).
  config.mesh = ml_collections.ConfigDict(dict(data=placeholder(int), expert=placeholder(int)))

  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, min_lr_ratio=0.01, warmup_steps=100, weight_decay=0.05, b1=0.9, b2=0.999, grad_clip_norm=1.0,
      layer_decay=1.0))
  config.optim.total_steps = total_steps
  return config
