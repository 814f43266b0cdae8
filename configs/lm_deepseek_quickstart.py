"""LM quickstart with DeepSeek-style routing (DeepSeekMoE + DeepSeek-V3): configs/lm_quickstart.py with
fine-grained routed experts, sigmoid affinities and auxiliary-loss-free balancing.

    python scripts/train.py --config configs/lm_deepseek_quickstart.py --workdir workdirs/lm_deepseek

Everything but model.moe is configs/lm_quickstart.py's (data, optimizer, steps, model size). Per block:
  routed experts  E=64 of width 32, top-8 (fine-grained segmentation, DeepSeekMoE): 8 x 32 = 256 active hidden units
                  and 64 x 32 = 2048 in all, the same as lm_quickstart's top-2 of 16 experts of width 128;
  shared experts  2 of width 128 (model.moe.shared_hidden_dim), as in lm_quickstart;
so the FFN multiply-adds per token and the expert parameters equal lm_quickstart's (the router is 128x64 instead
of 128x16). Routing (docs/design.md, 'DeepSeek-style routing'): score="sigmoid" affinities, gates = the chosen
affinities renormalised to sum to 1 (routed_scale 1); balancing by the per-expert routing bias, updated by
bias_update_rate=1e-3 (DeepSeek-V3's gamma) after every step, with no Switch balance loss and no router z-loss
(DeepSeek-V3 uses neither); a small sequence-wise balance loss, sequence_balance_weight=1e-4 (DeepSeek-V3's
alpha; 0 turns it off). Dropless gather dispatch, so the model stays exactly causal.
Group-limited routing is off (num_groups=1); --config.model.moe.num_groups=4 --config.model.moe.groups_per_token=2
restricts each token to the experts of its 2 best groups of 16 (DeepSeek-V3 uses it to bound communication; on
one device it only narrows the choice).
"""


import ml_collections

from configs.lm_quickstart import get_config as lm_quickstart_config


def get_config(arg=None):
  config = lm_quickstart_config(arg)
  config.model.moe = ml_collections.ConfigDict(dict(
      layers="every:1", num_experts=64, k=8, hidden_dim=32, shared_hidden_dim=128, router="top_k",
      capacity_factor=ml_collections.config_dict.placeholder(float), dispatch="gather", num_shared_experts=2,
      normalize_gates=True, score="sigmoid", routed_scale=1.0, bias_update_rate=1e-3, num_groups=1,
      groups_per_token=1, sequence_balance_weight=1e-4, balance_weight=0.0, z_loss_weight=0.0,
      importance_weight=0.0, load_weight=0.0))
  return config
