"""Pretrained weights: DINOv2 import (dinov2.py) and dense -> MoE sparse upcycling (upcycle.py).

    from vimoe import checkpoints
    checkpoints.load_pretrained(model, "dinov2_s14/")   # a converted checkpoint, an HF dir or a .pth file
"""

from __future__ import annotations

import os

import jax

from vimoe.checkpoints import dinov2, upcycle
from vimoe.checkpoints.dinov2 import load_dinov2, read_state_dict, restore_params, save_params, to_vit_params
from vimoe.checkpoints.upcycle import upcycle_params
from vimoe.models import vit as vit_lib


def load_pretrained(model: vit_lib.ViT, path: str, *, noise_std: float = 0.0,
                    rng: jax.Array | None = None, mode: str = "copy") -> vit_lib.ViT:
  """Initialises `model` (in place; returned) from dense pretrained weights at `path`.

  `path`: a directory written by scripts/convert_dinov2.py (or `dinov2.save_params`), a Hugging Face DINOv2
  directory, or a DINOv2 `.pth` / `.safetensors` / `.bin` file. A dense model takes the weights as they are;
  a ViMoE model is upcycled (`mode`: "copy", experts = copies of the dense MLPs, fresh routers; "preserve", the
  same scaled so that step 0 computes the dense function; see upcycle.py), unless the
  checkpoint already holds a router and experts for every MoE block of the model (an exported ViMoE run, a model
  pruned by scripts/prune_moe.py): then it is copied as it is, as a dense one is. The model's own
  head is kept unless the checkpoint has one of the same shape; a different position grid is resampled. A vimoe
  training workdir is not read directly: vimoe.train.workdir.export_workdir turns its checkpoint into a parameter
  checkpoint.
  """
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "model_config.json")):
    params, _ = restore_params(path)
  elif os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
    raise ValueError(f"{path} is a training workdir, not a parameter checkpoint: export its weights first with "
                     f"vimoe.train.workdir.export_workdir({path!r}, DIR) and pass DIR")
  else:
    params = to_vit_params(read_state_dict(path))
  if vit_lib.moe_blocks(model) and not _holds_moe_blocks(params, model):
    return upcycle_params(params, model, noise_std=noise_std, rng=rng, mode=mode)
  model_params = vit_lib.flat_params(model)
  head_fits = all(name in params and params[name].shape == model_params[name].shape
                  for name in model_params if name.startswith("head."))
  if not head_fits:  # no head in the checkpoint, or one for other classes: keep the model's fresh head
    params = {name: value for name, value in params.items() if not name.startswith("head.")}
  return vit_lib.assign_params(model, params, keep=() if head_fits else ("head",))


def _holds_moe_blocks(params: dict, model: vit_lib.ViT) -> bool:
  """Whether `params` has the routed experts and router of every MoE block of `model` (not a dense MLP there)."""
  return all(f"blocks.{i}.mlp.experts.w_in" in params and any(name.startswith(f"blocks.{i}.mlp.router.")
                                                              for name in params)
             for i in vit_lib.moe_blocks(model))


__all__ = ["dinov2", "load_dinov2", "load_pretrained", "read_state_dict", "restore_params", "save_params",
           "to_vit_params", "upcycle", "upcycle_params"]
