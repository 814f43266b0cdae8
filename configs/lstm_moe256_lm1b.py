"""Shazeer et al. 2017's MoE-256 language model on One Billion Word (lm1b), the model of their tables 6 and 7.

    python scripts/train.py --config configs/lstm_moe256_lm1b.py --workdir runs/lstm_moe256 \
        --config.data.data_dir=$TFDS_DATA_DIR
    python scripts/train.py --config configs/lstm_moe256_lm1b.py:/path/lm1b_32k.model --workdir runs/lstm_moe256_spm

Paper sizes (arXiv 1701.06538, appendix C.1; vimoe/models/lstm.py): embedding, LSTM units and MoE input/output
512; 256 experts, each a ReLU MLP 512 -> 1024 -> 512 (1M parameters); noisy top-k gating with k=4;
w_importance = w_load = 0.1; DropProb 0.1 after every layer but the softmax. Table 7: 35.7 test perplexity after
10 epochs, 272.9M parameters outside embedding and softmax (table 6 at w_importance = w_load = 0.1: 35.6).
This config has 273.3M: vimoe's experts carry biases (1536 per expert, 0.4M in all), the paper counts none.

What differs from the paper, and why:
  * Tokens. The paper predicts words of lm1b's 793k-word vocabulary with an importance-sampled softmax, and its
    perplexity is per word. Here the default is UTF-8 bytes (no vocabulary file needed; eval/ppl is per byte and
    not comparable: per-word perplexity = exp(eval/loss * bytes per word), about 5.7 bytes per lm1b word counting
    the space and the end-of-sentence symbol). Arg: the path of a trained SentencePiece model switches to
    subword tokens (set --config.model.vocab_size to its size if it is not 32000).
  * Batches. The paper's batches hold ~300k words (16 GPUs) and train 10 epochs in 27k steps. Here: 256 rows of
    256 tokens (65k tokens) for 100k steps, on one accelerator or a ('data', 'expert') mesh.
  * Schedule. The paper warms Adam up linearly for 1000 steps, then decays the rate as 1/sqrt(step); the trainer's
    schedule is warmup + cosine (vimoe/train/optim.py), so this uses 1000 warmup steps and a cosine decay.
  * Evaluation reads lm1b "test" (the paper's held-out set; lm1b has no validation split).

lm1b must be prepared once in the ArrayRecord format (the error message gives the `tfds build` command).

TPU: compiled ahead of time at batch 256 x 256 for v5e:2x2 (4 chips, expert=4) with --config.model.dtype=bfloat16:
3.7 GiB per chip of 16 GB (2.6 GiB on v5e:2x4) (docs/benchmarks.md, 'Paper configs on TPU slices';
`scripts/memory_report.py --topology` checks any other).
"""

import ml_collections
from ml_collections.config_dict import placeholder


def base_config(*, moe: dict, dropout: float, arg=None):
  """The recipe shared by the flat (MoE-256) and hierarchical (MoE-4096-h) lm1b configs."""
  config = ml_collections.ConfigDict()
  config.task = "language_model"
  config.seed = 0
  config.batch_size = 256
  config.eval_batch_size = 256
  total_steps = ml_collections.FieldReference(100_000)
  config.total_steps = total_steps
  config.log_every = 100
  config.eval_every = 10_000
  config.checkpoint_every = 2_000
  config.keep_checkpoints = 3
  config.label_smoothing = 0.0
  config.microbatches = 1  # gradient accumulation: microbatches per step (1: none; docs/workdirs.md)

  spm_model = str(arg) if arg else None
  config.data = ml_collections.ConfigDict(dict(
      name="lm1b", seq_len=256, tokenizer="sentencepiece" if spm_model else "bytes",
      spm_model=spm_model if spm_model else placeholder(str),
      data_dir=placeholder(str), train_split="train", eval_split="test", max_eval_batches=placeholder(int),
      num_workers=0))

  config.model = ml_collections.ConfigDict(dict(
      name="lstm_moe", vocab_size=32_000 if spm_model else 256, dim=512, dropout=dropout, forget_bias=1.0))
  config.model.dtype = "float32"  # computation dtype ("bfloat16": parameters stay float32)
  config.model.remat = "none"  # rematerialisation of each block: "none" | "full" | "dots" (docs/models.md)
  config.model.moe = ml_collections.ConfigDict(dict(
      hidden_dim=1024, importance_weight=0.1, load_weight=0.1, capacity_factor=placeholder(float), dispatch="gather",
      group_size=placeholder(int), grouped_matmul="auto", dropless_buffer_factor=placeholder(float), **moe))

  # Sizes None are inferred (vimoe.parallel.make_mesh) when there is more than one device.
  config.mesh = ml_collections.ConfigDict(dict(data=placeholder(int), expert=placeholder(int)))

  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, min_lr_ratio=0.01, warmup_steps=1000, weight_decay=0.0, b1=0.9, b2=0.999, grad_clip_norm=1.0,
      layer_decay=1.0))
  config.optim.total_steps = total_steps
  return config


def get_config(arg=None):
  return base_config(moe=dict(type="flat", num_experts=256, k=4), dropout=0.1, arg=arg)
