"""UMoE base-size language model on FineWeb-Edu (arXiv 2505.07260, "UMoE: Unifying Attention and FFN with Shared
Experts"). A target configuration for accelerators: it does not run here (see "Data" below).

    python scripts/train.py --config configs/umoe_base_fineweb.py --workdir runs/umoe_base \
        --config.data.spm_model=/path/to/tokenizer.model

Sizes follow the authors' released base config (github.com/ysngki/UMoE, model_libs/configs/
small-vanilla-UMoE-1024): hidden size D=768, 12 blocks, every block a UMoE block with a pool of 128 experts of
width 192; attention: 3 routed experts + 1 shared expert per token, per-expert query x W_q + x A_i B_i of rank
16, query/key width 192, values are the raw hidden states (pre-mixing); FFN: the same pool, its own router,
15 routed experts + 1 shared FFN expert (active FFN width 16 x 192 = 3072 = 4 D); sequences of 1024 tokens,
vocabulary 32,000 (a SentencePiece model), untied embeddings, RMSNorm, RoPE (base 10000), aux balance weight
0.001. Differences from the released code, by design of vimoe: RoPE rotates all 192 query/key channels (the
released code rotates 64 and leaves 128 unrotated), experts are `act(x W_in + b_in) W_out + b_out` with GELU
(theirs: SiLU, no biases), the balance loss is Switch's per-batch loss (theirs: per sequence). Optimizer as the
authors' training command: AdamW, lr 4e-4, global batch 1024 sequences (about 1M tokens), 50,000 steps; warmup
and decay are ours (2,000 warmup steps, cosine to 10%). Parameters: 542M in all (embeddings and head 49M; per
block 41M, of which the expert pool is 37.9M = 128 x 0.30M); per block each token runs 20 expert MLPs (3 + 1
in attention, 15 + 1 in the FFN), 73M expert multiply-adds per token over the 12 blocks.

Data: FineWeb-Edu (HuggingFace `HuggingFaceFW/fineweb-edu`, the paper trains on its "sample-100BT" subset).
`vimoe.data.text` reads only "shakespeare" and "lm1b" today, so `config.data.name` below names the dataset this
config is meant for and the run stops at the data config check until a reader exists. To prepare it: download
the parquet files of the subset with the `datasets` or `huggingface_hub` client (about 300 GB of text), train or
fetch a 32k SentencePiece model and pass its path as `config.data.spm_model`, tokenize the `text` column with
one end-of-text token after each document, and hold out a slice of documents (e.g. 0.1%) as "validation".

TPU: the 1M-token batch was compiled ahead of time for v5e:2x4 (8 chips, expert=8) with --config.microbatches=16
--config.model.remat=full --config.model.moe.dropless_buffer_factor=2.0 (bfloat16 as set here): 7.9 GiB per chip
of 16 GB (docs/benchmarks.md, 'Paper configs on TPU slices'; `scripts/memory_report.py --topology` checks any
other). Without microbatches and with the worst-case dropless buffer (factor None) the XLA:CPU compile asked for
3.6 TB of temporaries per device; 16 microbatches with factor None were not compiled.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.task = "language_model"
  config.seed = 0
  config.batch_size = 1024
  config.eval_batch_size = 256
  total_steps = ml_collections.FieldReference(50_000)
  config.total_steps = total_steps
  config.log_every = 100
  config.eval_every = 2_500
  config.checkpoint_every = 2_500
  config.keep_checkpoints = 2
  config.label_smoothing = 0.0
  config.microbatches = 1  # gradient accumulation: microbatches per step (1: none; docs/workdirs.md)

  config.data = ml_collections.ConfigDict(dict(
      name="HuggingFaceFW/fineweb-edu", seq_len=1024, tokenizer="sentencepiece",
      spm_model=ml_collections.config_dict.placeholder(str), train_split="train", eval_split="validation",
      max_eval_batches=50, num_workers=8))

  config.model = ml_collections.ConfigDict(dict(
      name="umoe", vocab_size=32_000, dim=768, depth=12, num_heads=4, mlp_dim=3072, max_length=1024,
      positions="rope", rope_base=10_000.0, tie_embeddings=False, mlp_activation="gelu", norm="rmsnorm",
      norm_eps=1e-6, dropout=0.0, dtype="bfloat16", umoe_mixing="pre", umoe_attn_k=3, umoe_query_rank=16,
      umoe_key_dim=192, umoe_attn_shared_expert=True))
  config.model.remat = "none"  # rematerialisation of each block: "none" | "full" | "dots" (docs/models.md)
  config.model.moe = ml_collections.ConfigDict(dict(
      layers="every:1", num_experts=128, k=15, hidden_dim=192, router="top_k",
      capacity_factor=ml_collections.config_dict.placeholder(float), dispatch="gather", num_shared_experts=1,
      normalize_gates=False, balance_weight=0.001, z_loss_weight=0.0, importance_weight=0.0, load_weight=0.0,
      grouped_matmul="auto", dropless_buffer_factor=ml_collections.config_dict.placeholder(float)))

  # Experts split over 'expert', batches over ('data', 'expert'); sizes None are inferred from the devices.
  config.mesh = ml_collections.ConfigDict(dict(data=placeholder(int), expert=placeholder(int)))

  config.optim = ml_collections.ConfigDict(dict(
      lr=4e-4, min_lr_ratio=0.1, warmup_steps=2_000, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip_norm=1.0,
      layer_decay=1.0))
  config.optim.total_steps = total_steps
  return config
