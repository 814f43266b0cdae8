"""How well can a patch-level segmenter do on the digit canvases? An oracle for the linear head's resolution.

    python scripts/seg_patch_oracle.py --config configs/seg_quickstart.py

The DINOv2 linear head predicts one logit vector per patch and upsamples the logits bilinearly. This script gives
every patch the best information it could have, the histogram of the true labels of its pixels, upsamples those
histograms the same way, takes the argmax per pixel and scores the held-out canvases. The gap between this number
and a trained model's mIoU is what classification errors cost; the gap to 1 is what the patch resolution costs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vimoe.data import segmentation as seg_data  # noqa: E402
from vimoe.train.segmentation import segmentation_metrics  # noqa: E402

def oracle_miou(labels: np.ndarray, patch: int, num_classes: int) -> dict:
  """Score the patch-histogram oracle on integer label maps [B, H, W] (H, W multiples of `patch`)."""
  B, H, W = labels.shape
  if H % patch or W % patch:
    raise ValueError(f"label maps of {H}x{W} pixels are not a whole number of {patch}x{patch} patches")
  onehot = np.eye(num_classes, dtype=np.float32)[labels]
  histograms = onehot.reshape(B, H // patch, patch, W // patch, patch, num_classes).mean(axis=(2, 4))
  upsampled = jax.image.resize(histograms, (B, H, W, num_classes), "bilinear")
  prediction = np.asarray(upsampled).argmax(-1)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels.ravel(), prediction.ravel()), 1)
  return segmentation_metrics(confusion)


def main(argv):
  del argv
  config = flags.FLAGS.config
  if config.data.name != "digit_canvas":
    raise ValueError(f"data.name={config.data.name!r}: this oracle is for the embedded digit canvases only")
  count = seg_data.num_examples(config.data, config.data.eval_split)
  batch = next(iter(seg_data.build_segmentation_dataset(config.data, config.data.eval_split, batch_size=count,
                                                        seed=0, train=False)))
  metrics = oracle_miou(np.asarray(batch["label"]), config.model.patch_size, config.model.num_classes)
  print(f"patch-histogram oracle on {count} held-out canvases: mIoU {metrics['miou']:.3f}, "
        f"pixel accuracy {metrics['pixel_accuracy']:.3f}")
  print("IoU per class:", np.round(metrics["iou_per_class"], 3).tolist())

if __name__ == "__main__":
  # Flags are defined here, not at import, so tests can import oracle_miou next to other scripts' flags.
  config_flags.DEFINE_config_file("config", None, "A segmentation config on digit canvases.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
