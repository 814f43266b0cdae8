"""UMoE quickstart: attention and FFN sharing one pool of experts (arXiv 2505.07260), Shakespeare bytes, CPU-sized.

    python scripts/train.py --config configs/umoe_quickstart.py --workdir workdirs/umoe
    python scripts/train.py --config configs/umoe_quickstart.py --workdir workdirs/umoe_post \
        --config.model.umoe_mixing=post

Same data, steps, optimizer and model width as configs/lm_quickstart.py (D=128, 4 blocks, 128-byte sequences),
and the same FFN: 2 shared + 2 of E=16 routed experts of width 128 (gates renormalised), dropless gather
dispatch. Every block is a UMoE block (vimoe/models/lm.py): its attention routes each token to 2 experts of the
same pool plus an attention shared expert; each expert mixes the block's hidden states with its own query
(x W_q + x A_i B_i, rank 8, query/key width 64, RoPE) and runs on the mixture (pre-mixing). The FFN uses the
same 16 experts with its own router. Balance loss 0.01 and router z-loss 0.001 on both routers. Measured numbers
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

  config.data = ml_collections.ConfigDict(dict(
      name="shakespeare", seq_len=128, tokenizer="bytes", train_split="train", eval_split="validation",
      max_eval_batches=ml_collections.config_dict.placeholder(int), num_workers=0))

  config.model = ml_collections.ConfigDict(dict(
      name="umoe", vocab_size=256, dim=128, depth=4, num_heads=4, mlp_dim=512, max_length=128, positions="rope",
      tie_embeddings=False, mlp_activation="gelu", norm="rmsnorm", dropout=0.0, dtype="float32",
      umoe_mixing="pre", umoe_attn_k=2, umoe_query_rank=8, umoe_key_dim=64, umoe_attn_shared_expert=True))
  config.model.moe = ml_collections.ConfigDict(dict(
      layers="every:1", num_experts=16, k=2, hidden_dim=128, router="top_k",
      capacity_factor=ml_collections.config_dict.placeholder(float), dispatch="gather", num_shared_experts=2,
      normalize_gates=True, balance_weight=0.01, z_loss_weight=0.001, importance_weight=0.0, load_weight=0.0))

  config.mesh = ml_collections.ConfigDict(dict(data=None, expert=None))

  config.optim = ml_collections.ConfigDict(dict(
      lr=2e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip_norm=1.0,
      layer_decay=1.0))
  config.optim.total_steps = total_steps
  return config
