"""ViMoE placement study (issue 12), stage 1: the pretrained dense backbone, the project's stand-in for DINOv2.

    python scripts/run_study.py --workdir workdirs/study          # both stages and the report (resumable)
    # stage 1 alone (run_study.py does this, then exports the weights to WORKDIR/pretrain/params_export):
    python scripts/train.py --config configs/study_pretrain.py --workdir workdirs/study/pretrain

The ViMoE paper fine-tunes a pretrained DINOv2 and upcycles its MLPs into the experts and the shared expert; the
earlier CPU placement study (configs/quickstart_placement.py) trained from scratch instead. Here the backbone is
pretrained by supervised training on a related task: ONE scikit-learn digit, at its native 8x8 pixels, in the left
or the right half of the 16x16 canvas, labelled with the digit AND its slot (vimoe.data.digit_pairs, task="slots",
label 10 x slot + digit, 20 classes; 2 x 1442 training canvases per epoch, shift augmentation of 1 pixel;
evaluated on the 355 held-out digits in both slots, 710 canvases). Stage 2 (configs/study_placement.py) reads two
digits at once (100 classes), so the backbone has learnt what and where a digit is but not the pair task, and its
head is replaced by a fresh 100-class head. (A slot-invariant 10-class pretraining, task="single", was tried first:
its backbone fine-tuned to the pairs at 0.397 after 300 steps; this one reaches 0.71-0.80 after 400.)

Model: the quickstart ViT (configs/quickstart.py), dense: 6 blocks, dim 96, 3 heads, MLP 192, 16x16 input in 4x4
patches (16 patch tokens + class token; each digit fills its own 2x2 patches). Training: 1500 steps of batch 64
(about 33 epochs of the 2884 canvases), AdamW lr 1e-3, 100 warmup steps, cosine. Measured in the study run of
docs/results.md: 0.970 held-out top-1 (710 canvases) in 2 min 59 s on 2 CPU cores.

Arg (after ':'), comma-separated: "steps=N" (training steps), "tiny" (a 2-block, dim-32 model and a handful of
steps: the tests' smoke run, not a result).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.quickstart import get_config as quickstart_config

TOTAL_STEPS = 1500
BATCH_SIZE = 64
TINY_MODEL = dict(dim=32, depth=2, num_heads=2, mlp_dim=64)
TINY_STEPS = 8
TINY_BATCH = 16


def parse_arg(arg) -> dict:
  """'tiny,steps=300,seeds=4' -> {"tiny": True, "steps": 300, "seeds": 4}; None or '' -> {}. Unknown words raise."""
  out = {}
  for word in str(arg or "").split(","):
    word = word.strip()
    if not word:
      continue
    if word == "tiny":
      out["tiny"] = True
      continue
    key, separator, value = word.partition("=")
    if not separator or key not in ("steps", "seeds"):
      raise ValueError(f"config arg word {word!r} is not understood; valid: 'tiny', 'steps=N', 'seeds=N'")
    out[key] = int(value)
    if out[key] < 1:
      raise ValueError(f"config arg {word!r}: {key} must be a positive integer")
  return out


def apply_tiny(config) -> None:
  """The tests' smoke size (both stages must agree on the model): 2 blocks of dim 32, batch 16."""
  config.model.update(TINY_MODEL)
  config.batch_size = TINY_BATCH
  config.eval_batch_size = 100


def get_config(arg=None):
  args = parse_arg(arg)
  steps = args.get("steps", TINY_STEPS if args.get("tiny") else TOTAL_STEPS)
  config = quickstart_config()
  config.batch_size = BATCH_SIZE
  config.eval_batch_size = 355  # 710 test canvases = 2 batches, no padding
  config.total_steps = steps  # a FieldReference: optim.total_steps follows
  config.optim.warmup_steps = max(1, min(100, steps // 10))
  config.log_every = max(1, min(100, steps // 4))
  config.eval_every = steps
  config.checkpoint_every = max(1, min(500, steps // 2))
  config.keep_checkpoints = 1

  config.data = ml_collections.ConfigDict(dict(
      name="digit_pairs", task="slots", test_per_class=100, image_size=16, augment=True, max_shift=1,
      num_workers=0, mean=(0.5,), std=(0.5,), train_split="train", eval_split="test"))
  config.model.num_classes = 20
  config.model.moe.layers = "none"  # dense: stage 2 upcycles its MLPs
  config.init = ml_collections.ConfigDict(dict(checkpoint=placeholder(str), noise_std=0.0))
  if args.get("tiny"):
    apply_tiny(config)
  return config
