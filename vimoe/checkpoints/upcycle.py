"""Sparse upcycling: a dense ViT -> a ViMoE that starts from it (Komatsuzaki et al. 2023, arXiv 2212.05055; ViMoE).

In every MoE block, every routed expert and every shared expert starts as a copy of that block's dense MLP
(fc1 -> w_in/b_in, fc2 -> w_out/b_out, fc_gate -> w_gate); routers keep their fresh initialisation; every other
parameter (embeddings, attention, norms, LayerScale, dense MLPs of the other blocks) is copied; the classification
head is copied when the shapes agree and kept fresh otherwise. Optional Gaussian noise on the routed experts'
copies breaks their symmetry (the shared experts stay exact copies: they are always on, nothing to break).

What the upcycled MLP branch computes at step 0 ((1 + S) or (g + S) x the dense MLP, S shared experts, g the
top-1 gate) and what the ViMoE paper's recipe implies: docs/moe.md, "Expert initialisation and upcycling".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vimoe.models import vit as vit_lib

# Dense Mlp parameter -> expert parameter (stacked on a leading expert axis).
MLP_TO_EXPERT = {"fc1.kernel": "w_in", "fc1.bias": "b_in", "fc2.kernel": "w_out", "fc2.bias": "b_out",
                 "fc_gate.kernel": "w_gate"}


def upcycle_params(dense_params: dict, moe_model: vit_lib.ViT, *, noise_std: float = 0.0,
                   rng: jax.Array | None = None) -> vit_lib.ViT:
  """Fills `moe_model` (in place; returned) from dense parameters {name: array} (`vit.flat_params` naming).

  `dense_params` may come from a dense ViT, a DINOv2 import or a parameter checkpoint; a `pos_embed` for another
  grid is resampled. Blocks that are dense in `moe_model` take their MLP as it is.
  """
  if noise_std and rng is None:
    raise ValueError("noise_std > 0 needs rng (a jax.random key) for the expert noise")
  moe_blocks = vit_lib.moe_blocks(moe_model)
  if not moe_blocks:
    raise ValueError("moe_model has no MoE block (model.moe.layers is 'none'): nothing to upcycle; load the dense "
                     "parameters with vit.assign_params instead")
  model_params = vit_lib.flat_params(moe_model)
  params = {name: value for name, value in dense_params.items()
            if not any(name.startswith(f"blocks.{i}.mlp.") for i in moe_blocks)}
  keep = ["head"] if _head_differs(dense_params, model_params) else []
  if keep:
    params = {name: value for name, value in params.items() if not name.startswith("head.")}
  keep += [f"blocks.{i}.mlp.router" for i in moe_blocks]  # fresh routers
  for i in moe_blocks:
    layer = moe_model.blocks[i].mlp
    mlp = {suffix: dense_params.get(f"blocks.{i}.mlp.{suffix}") for suffix in MLP_TO_EXPERT}
    missing = [f"blocks.{i}.mlp.{s}" for s in ("fc1.kernel", "fc1.bias", "fc2.kernel", "fc2.bias") if mlp[s] is None]
    if missing:
      raise ValueError(f"the dense parameters have no MLP for MoE block {i}: missing {missing}")
    gate_bias = dense_params.get(f"blocks.{i}.mlp.fc_gate.bias")
    if gate_bias is not None and np.any(np.asarray(gate_bias) != 0):
      raise ValueError(f"blocks.{i}.mlp.fc_gate.bias is non-zero, but SwiGLU experts have no gate bias "
                       "(vimoe/moe/experts.py); this dense MLP cannot be copied exactly")
    if (mlp["fc_gate.kernel"] is None) != (layer.experts.activation != "swiglu"):
      raise ValueError(f"block {i}: the dense MLP and the experts use different activations "
                       f"(experts: {layer.experts.activation!r}); build both from the same model.mlp_activation")
    for group, count in (("experts", layer.num_experts), ("shared", layer.num_shared_experts)):
      for suffix, expert_name in MLP_TO_EXPERT.items():
        if mlp[suffix] is None or count == 0:
          continue
        weight = jnp.broadcast_to(jnp.asarray(mlp[suffix]), (count,) + tuple(np.shape(mlp[suffix])))  # [E, ...]
        if group == "experts" and noise_std:
          rng, key = jax.random.split(rng)
          weight = weight + noise_std * jax.random.normal(key, weight.shape, weight.dtype)
        params[f"blocks.{i}.mlp.{group}.{expert_name}"] = weight
  return vit_lib.assign_params(moe_model, params, keep=keep)


def upcycle(dense_model: vit_lib.ViT, moe_model: vit_lib.ViT, noise_std: float = 0.0,
            rng: jax.Array | None = None) -> vit_lib.ViT:
  """Copies `dense_model` into `moe_model` (in place; returned): experts and shared experts = the dense MLP of
  their block (+ N(0, noise_std^2) on routed experts), fresh routers, everything else copied.

  The two models must agree everywhere but the MoE blocks; a ValueError names any parameter that does not.
  """
  if vit_lib.moe_blocks(dense_model):
    raise ValueError(f"dense_model has MoE blocks {vit_lib.moe_blocks(dense_model)}; upcycle from a dense model")
  if dense_model.config.mlp_activation != moe_model.config.mlp_activation:
    raise ValueError(f"model.mlp_activation differs: dense {dense_model.config.mlp_activation!r}, MoE "
                     f"{moe_model.config.mlp_activation!r}; experts must compute the dense MLP's function")
  return upcycle_params(vit_lib.flat_params(dense_model), moe_model, noise_std=noise_std, rng=rng)


def _head_differs(dense_params: dict, model_params: dict) -> bool:
  heads = [name for name in model_params if name.startswith("head.")]
  return any(name not in dense_params or np.shape(dense_params[name]) != np.shape(model_params[name])
             for name in heads) or any(name.startswith("head.") and name not in model_params
                                       for name in dense_params)
