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

from configs.lm_quickstart import get_config as lm_quickstart_config


def get_config(arg=None):
  config = lm_quickstart_config(arg)
  config.model.name = "umoe"
  config.model.update(dict(umoe_mixing="pre", umoe_attn_k=2, umoe_query_rank=8, umoe_key_dim=64,
                           umoe_attn_shared_expert=True))
  return config
