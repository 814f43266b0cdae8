"""LM quickstart, dense baseline: configs/lm_quickstart.py with a dense MLP in every block instead of the MoE layer.

    python scripts/train.py --config configs/lm_dense_quickstart.py --workdir workdirs/lm_dense

Same data, steps, batch, optimizer, seed and model width (D=128, 4 blocks, 128-byte sequences) as the MoE
quickstart. The MLP width 512 equals the MoE model's active expert width (2 shared + 2 routed experts of width
128 per token), so both run the same FFN multiply-adds per token, 4 x 2 x 128 x 512 = 524,288 (the MoE adds its
128 x 16 routers, 1.6%); tests/test_lm.py checks that the two configs differ in nothing else. Measured numbers
in docs/results.md.
"""

import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.task = "language_model"
  config.seed = 0
  config.batch_size = 16
  config.eval_batch_size = 64
  total_steps = ml_collections.FieldReference(1000)
  config.total_steps = total_steps
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.label_smoothing = 0.0

  # The validation split (Macbeth and The Tempest, 201,868 bytes) is evaluated in full.
  config.data = ml_collections.ConfigDict(dict(
      name="shakespeare", seq_len=128, tokenizer="bytes", train_split="train", eval_split="validation",
      max_eval_batches=ml_collections.config_dict.placeholder(int), num_workers=0))

  config.model = ml_collections.ConfigDict(dict(
      name="transformer", vocab_size=256, dim=128, depth=4, num_heads=4, mlp_dim=512, max_length=128,
      positions="rope", tie_embeddings=False, mlp_activation="gelu", norm="rmsnorm", dropout=0.0,
      dtype="float32"))

  config.mesh = ml_collections.ConfigDict(dict(data=None, expert=None))

  config.optim = ml_collections.ConfigDict(dict(
      lr=2e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip_norm=1.0,
      layer_decay=1.0))
  config.optim.total_steps = total_steps
  return config
