"""Converts DINOv2 PyTorch weights into a vimoe parameter checkpoint the trainer initialises from.

    python scripts/convert_dinov2.py WEIGHTS --output DIR [--image_size 224] [--num_heads 6]
    python scripts/convert_dinov2.py --input WEIGHTS --output DIR

WEIGHTS: a Hugging Face DINOv2 directory (model.safetensors or pytorch_model.bin, config.json) or a torch-hub
`.pth` state dict (e.g. dinov2_vits14_pretrain.pth). DIR gets `params/` (orbax) and `model_config.json`
(vimoe/checkpoints/dinov2.py). `--image_size` resamples the position grid once, here, to the fine-tuning
resolution (what the model would otherwise interpolate at every step). Initialise a model from it with
`vimoe.checkpoints.load_pretrained(model, DIR)`, which upcycles it when the model has MoE blocks.
"""

from __future__ import annotations

import argparse
import sys

from flax import nnx

from vimoe.checkpoints import dinov2
from vimoe.models import vit as vit_lib


def convert(weights: str, output: str, *, image_size: int | None = None, num_heads: int | None = None) -> dict:
  """Reads, renames, checks against an (abstract) model of the inferred config and writes; returns the config."""
  params = dinov2.to_vit_params(dinov2.read_state_dict(weights))
  config = dinov2.infer_model_config(params, num_heads=num_heads, hf_config=dinov2._hf_config(weights))
  config["num_classes"] = 0  # backbone only; the trainer adds its own head
  if image_size is not None:
    config["image_size"] = image_size
  # An abstract model (no memory, no random init) checks names and shapes and resamples the position grid.
  model = nnx.eval_shape(lambda: vit_lib.build_vit(config))
  vit_lib.assign_params(model, params)
  dinov2.save_params(output, vit_lib.flat_params(model), config)
  return config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("weights", nargs="?", help="HF DINOv2 directory or a torch-hub .pth / .safetensors / .bin file")
  parser.add_argument("--input", help="the same as the positional WEIGHTS")
  parser.add_argument("--output", required=True, help="directory to write the checkpoint to")
  parser.add_argument("--image_size", type=int, default=None, help="resample positions for this resolution")
  parser.add_argument("--num_heads", type=int, default=None, help="attention heads (default: from config.json "
                      "or the DINOv2 table)")
  args = parser.parse_args(argv)
  weights = args.input or args.weights
  if weights is None or (args.input and args.weights):
    parser.error("give the DINOv2 weights once: as WEIGHTS or as --input")
  config = convert(weights, args.output, image_size=args.image_size, num_heads=args.num_heads)
  print(f"wrote {args.output}: " + ", ".join(f"{k}={v}" for k, v in sorted(config.items())))
  return 0


if __name__ == "__main__":
  sys.exit(main())
