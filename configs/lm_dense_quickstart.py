"""LM quickstart, dense baseline: configs/lm_quickstart.py with a dense MLP in every block instead of the MoE layer.

    python scripts/train.py --config configs/lm_dense_quickstart.py --workdir workdirs/lm_dense

Same data, steps, batch, optimizer, seed and model width (D=128, 4 blocks, 128-byte sequences) as the MoE
quickstart. The MLP width 512 equals the MoE model's active expert width (2 shared + 2 routed experts of width
128 per token), so both run the same FFN multiply-adds per token, 4 x 2 x 128 x 512 = 524,288 (the MoE adds its
128 x 16 routers, 1.6%); tests/test_lm.py checks that the two configs differ in nothing else. Measured numbers
in docs/results.md.
"""

from configs.lm_quickstart import get_config as lm_quickstart_config


def get_config(arg=None):
  config = lm_quickstart_config(arg)
  del config.model["moe"]  # a dense MLP of width model.mlp_dim = 512 in every block
  return config
