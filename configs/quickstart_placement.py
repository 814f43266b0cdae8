"""Where to put the MoE layers, at toy scale: the digits quickstart (configs/quickstart.py) swept over
L = 1..6 MoE blocks (the last L of 6) x shared expert off/on x 2 seeds = 24 points, the CPU-sized version of
the ViMoE paper's figure 2 (arXiv 2410.15732).

    python scripts/sweep.py --config configs/quickstart_placement.py --workdir workdirs/placement
    python scripts/sweep.py --collect workdirs/placement

Each point trains for fewer steps of a smaller batch than the quickstart (400 steps of 32 images, about 9 epochs;
warmup scaled down with the steps) so the sweep fits in under 45 minutes on 2 CPU cores (21 min 58 s measured on
2 free cores). A toy for trying the sweep and routing tools: 2 seeds on 355 test images cannot resolve the paper's
effects; the study in the paper's regime is scripts/run_study.py (docs/results.md). Arg: "steps" (default
TOTAL_STEPS).
"""

from configs.quickstart import get_config as quickstart_config

DEPTH = 6
TOTAL_STEPS = 400
BATCH_SIZE = 32  # half the quickstart's: a step costs half the CPU time (measured 91 vs 213 ms at L=1)
SEEDS = (0, 1)


def get_config(arg=None):
  steps = int(arg) if arg else TOTAL_STEPS
  config = quickstart_config()
  config.batch_size = BATCH_SIZE
  config.total_steps = steps  # a FieldReference: optim.total_steps follows
  config.optim.warmup_steps = max(1, steps // 10)
  config.log_every = 100
  config.eval_every = steps  # one evaluation, at the end
  config.checkpoint_every = 200
  config.keep_checkpoints = 1
  return config


def get_sweep(arg=None):
  # Seeds outermost: a sweep cut short still covers every (L, shared) pair with seed 0.
  del arg
  return [{"model.moe.layers": f"last:{last}", "model.moe.num_shared_experts": shared, "seed": seed}
          for seed in SEEDS for last in range(1, DEPTH + 1) for shared in (0, 1)]
