"""Quickstart language model: Shazeer et al. 2017's LSTM-MoE on the embedded Shakespeare corpus, bytes, CPU-sized.

    python scripts/train.py --config configs/lstm_moe_quickstart.py --workdir workdirs/lstm_moe_quickstart

The paper's layout (vimoe/models/lstm.py: embedding -> LSTM -> MoE -> LSTM -> softmax, residuals, sigmoid on the
MoE output) at toy scale: width 128 instead of 512, 16 ReLU experts of hidden width 256 instead of 256 experts of
1024, k=4 as in the paper's flat MoE, w_importance = w_load = 0.1 as in the paper. Byte-level tokens (vocabulary
256), windows of 128 bytes. Shakespeare is split by play (vimoe/data/text.py); evaluation reads the first 16
batches of the validation plays (Macbeth, The Tempest) so that an evaluation stays a few seconds.

Measured (600 steps, seeds 0, 1, 2; docs/results.md): eval/ppl 6.481 ± 0.095 per byte (6.399, 6.586, 6.459; next-byte
accuracy 0.44-0.45) on the first 131,072 validation bytes, routing balanced (evaluation load CV 0.02-0.06); 3-6
minutes per run on 2 CPU cores shared with other jobs.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.task = "language_model"
  config.seed = 0
  config.batch_size = 32
  config.eval_batch_size = 64
  total_steps = ml_collections.FieldReference(600)
  config.total_steps = total_steps
  config.log_every = 50
  config.eval_every = 200
  config.checkpoint_every = 200
  config.keep_checkpoints = 2
  config.label_smoothing = 0.0
  config.microbatches = 1  # gradient accumulation: microbatches per step (1: none; docs/workdirs.md)

  config.data = ml_collections.ConfigDict(dict(
      name="shakespeare", seq_len=128, tokenizer="bytes", spm_model=placeholder(str), data_dir=placeholder(str), train_split="train",
      eval_split="validation", max_eval_batches=16, num_workers=0))

  config.model = ml_collections.ConfigDict(dict(
      name="lstm_moe", vocab_size=256, dim=128, dropout=0.1, forget_bias=1.0))
  config.model.dtype = "float32"  # computation dtype ("bfloat16": parameters stay float32)
  config.model.remat = "none"  # rematerialisation of each block: "none" | "full" | "dots" (docs/models.md)
  config.model.moe = ml_collections.ConfigDict(dict(
      type="flat", num_experts=16, k=4, hidden_dim=256, importance_weight=0.1, load_weight=0.1,
      capacity_factor=placeholder(float), dispatch="gather", group_size=placeholder(int)))

  # Used when there is more than one device: sizes None are inferred (vimoe.parallel.make_mesh).
  config.mesh = ml_collections.ConfigDict(dict(data=placeholder(int), expert=placeholder(int)))

  config.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, min_lr_ratio=0.05, warmup_steps=50, weight_decay=0.0, b1=0.9, b2=0.999, grad_clip_norm=1.0,
      layer_decay=1.0))
  config.optim.total_steps = total_steps
  return config
