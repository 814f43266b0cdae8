"""Shazeer et al. 2017's MoE-4096-h language model on One Billion Word: a hierarchical MoE of 16 groups of 256
experts (4096 experts, 4.3B parameters in the MoE), k=2 at each level, so each token still visits 4 experts.

    python scripts/train.py --config configs/lstm_moe4096h_lm1b.py --workdir runs/lstm_moe4096h \
        --config.data.data_dir=$TFDS_DATA_DIR

Paper (arXiv 1701.06538, appendix B and C.1, table 7): 34.1 test perplexity after 10 epochs, 4303.4M parameters
outside embedding and softmax, DropProb 0.2; the first-level branching factor 16 matched the paper's 16 GPUs.
This config has 4309.7M: the same plus the experts' biases (1536 per expert, 6.3M in all).
Everything else (and what differs from the paper) is as in configs/lstm_moe256_lm1b.py.

Memory: the experts hold 4096 x 1M = 4.3B float32 parameters (17 GB), 52 GB with Adam's two moments; on one
device that needs an 80 GB+ accelerator. On a mesh the experts are split over the 'expert' axis.
TPU: compiled ahead of time at batch 256 x 256 for v5e:2x4 (8 chips, expert=8) with --config.model.dtype=bfloat16:
6.1 GiB of state and 11.9 GiB at the step's peak per chip of 16 GB (docs/benchmarks.md, 'Paper configs on TPU slices'; `scripts/memory_report.py --topology` checks any other).
"""

from configs.lstm_moe256_lm1b import base_config


def get_config(arg=None):
  return base_config(moe=dict(type="hierarchical", num_groups=16, experts_per_group=256, k_primary=2,
                              k_secondary=2), dropout=0.2, arg=arg)
