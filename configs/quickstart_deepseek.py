"""The digits ViMoE quickstart (configs/quickstart.py) with DeepSeek-style routing instead of softmax top-k plus the
Switch balance loss: the routing comparison of docs/results.md ('DeepSeek-style routing', issue 16).

    python scripts/train.py --config configs/quickstart_deepseek.py --workdir workdirs/qs_deepseek
    python scripts/train.py --config configs/quickstart_deepseek.py --workdir workdirs/qs_deepseek_token \
        --config.model.moe.route_per=token

Everything but the router settings is the quickstart's (data, model, optimizer, steps; one shared expert, MoE in the
last 2 blocks, dropless). The router (docs/design.md, 'DeepSeek-style routing'): top-2 of 8 experts chosen on
sigmoid affinities plus the auxiliary-loss-free bias (updated by 1e-3, DeepSeek-V3's gamma, after every step), gates
the two chosen affinities renormalised to sum to 1, and no balance loss. The sequence-wise loss is off: with one
routing decision per image (route_per="item") a "sequence" would be a single unit. Top-2 because with top-1 a
renormalised sigmoid gate is always 1 and the router would get no gradient. The baseline of the comparison is
configs/quickstart.py with --config.model.moe.k=2 (softmax top-2, gates not renormalised, balance loss 0.01).
"""

from configs.quickstart import get_config as quickstart_config


def get_config(arg=None):
  config = quickstart_config(arg)
  config.model.moe.update(dict(k=2, score="sigmoid", normalize_gates=True, routed_scale=1.0,
                               bias_update_rate=1e-3, balance_weight=0.0, sequence_balance_weight=0.0))
  return config
