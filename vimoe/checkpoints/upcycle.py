"""Sparse upcycling: a dense ViT -> a ViMoE that starts from it (Komatsuzaki et al. 2023, arXiv 2212.05055; ViMoE).

In every MoE block, every routed expert and every shared expert starts from that block's dense MLP
(fc1 -> w_in/b_in, fc2 -> w_out/b_out, fc_gate -> w_gate); every other parameter (embeddings, attention, norms,
LayerScale, dense MLPs of the other blocks) is copied; the classification head is copied when the shapes agree and
kept fresh otherwise. Optional Gaussian noise N(0, noise_std^2) on the routed experts' parameters breaks their
symmetry (the shared experts get none: they are always on, nothing to break). Two modes (`mode=`, the config key
`init.upcycle_mode`):

"copy" (the ViMoE paper's recipe, arXiv 2410.15732): every expert and shared expert is an exact copy of the MLP and
the routers keep their fresh initialisation. At step 0 the MLP branch is (G(x) + S) x the dense MLP, G(x) the sum
of the token's (image's) routed gates and S the number of shared experts: with unnormalised top-1 of 8, about
1.13x (S=1) or 0.13x (S=0); the dense function is kept only when G = 1 and S = 0.

"preserve" (function-preserving): at step 0 every upcycled model computes exactly the dense model's function
(nothing dropped; with noise_std > 0 it differs only by the noise). With f the dense MLP, scaling an expert's
output layer (w_out, b_out) by a scales its output by a, so with the routed experts scaled by a and the shared
experts by b the branch is

    y(x) = a * G(x) * f(x) + S * b * f(x),      and  a * G + S * b = 1  must hold for every x.

That needs a gate sum G that is the same for every token:
  * normalize_gates=True (top_k, prototype): the routed gates sum to 1, times routed_scale: G = routed_scale.
    The router keeps its fresh initialisation.
  * noisy_top_k: softmax over the kept logits, G = 1 with or without the router noise.
  * normalize_gates=False (top_k, prototype with softmax scores): G(x) = routed_scale * sum of the chosen scores
    depends on the token, so the router kernel is set to zero: every score is 1/E (softmax; prototype logits are
    then all -||x||^2 / (2 sqrt(D))) or 1/2 (sigmoid), G = routed_scale * k / E or routed_scale * k / 2.
Rule: b = 1 / (1 + S) and a = 1 / ((1 + S) G): the routed branch and each shared expert carry an equal 1/(1 + S)
share of the dense MLP. The study's setting (top-1 of 8, unnormalised softmax, zero router, G = 1/8) gives a = 8
for S = 0 and a = 4, b = 1/2 for S = 1; normalised gates give a = b = 1/(1 + S). Experts-choose, soft and
hash routing have no token-independent gate sum (or no exact per-token form) and are refused.

What a zero router does. jax.lax.top_k breaks ties by the lowest index, so at step 0 every token (image) goes to
experts 0..k-1 (and, group-limited, groups 0..): exact only when nothing is dropped, so a capacity that cannot
hold every token (capacity_factor * k < E) is refused. It still learns. With identical experts (noise 0) the
task loss reaches the router only through G: dL/dz_j = a c(x) dG/dz_j with c(x) = <dL/dy, f(x)>; for softmax
dG/dz_j = routed_scale * p_j (1[j in K] - sum_{e in K} p_e) = routed_scale (1[j in K] - k/E) / E at the uniform
point, non-zero for k < E (for sigmoid, routed_scale / 4 on the chosen experts). The kernel's gradient
sum_x x a c(x) dG/dz is rank one: the first update moves experts 0..k-1 together against the others by the sign
of x . v (v = sum_x a c(x) x), so tokens split between experts 0..k-1 and experts k..2k-1; experts within one
side are told apart once the experts differ, which starts at the first update (only the chosen experts get
gradient). The balance loss E sum_e f_e P_e adds a rank-one push away from the collapsed experts along the mean
feature. With k = E (softmax) G = 1 whatever the router, and the task gradient to the router is zero.
With normalised gates (G constant) and identical experts the task gradient to the router is zero at step 0 in
both modes; it appears once the experts differ (after the first update, or with expert noise).

The price of exactness with unnormalised gates: a = E / ((1 + S) k) amplifies the routed experts, so as the
router sharpens (g -> 1) the routed branch can grow to a x the dense MLP (8x at S=0, 4x at S=1 for top-1 of 8),
where copy mode grows to 1x (2x with the shared expert). docs/moe.md, "Expert initialisation and upcycling".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vimoe.models import vit as vit_lib
from vimoe.moe.config import MoeConfig

# Dense Mlp parameter -> expert parameter (stacked on a leading expert axis).
MLP_TO_EXPERT = {"fc1.kernel": "w_in", "fc1.bias": "b_in", "fc2.kernel": "w_out", "fc2.bias": "b_out",
                 "fc_gate.kernel": "w_gate"}
OUTPUT_LAYER = ("fc2.kernel", "fc2.bias")  # linear in the expert's output: scaling it scales the expert
UPCYCLE_MODES = ("copy", "preserve")


@dataclasses.dataclass(frozen=True)
class UpcycleScaling:
  """How one MoE block is upcycled: routed experts' output layer x `routed`, shared experts' x `shared`, and
  whether the router kernel is set to zero (`zero_router`). `gate_sum`: G, the routed gates' sum at step 0
  (None: it depends on the token, copy mode)."""
  routed: float = 1.0
  shared: float = 1.0
  zero_router: bool = False
  gate_sum: float | None = None


def check_mode(mode: str) -> None:
  if mode not in UPCYCLE_MODES:
    raise ValueError(f"init.upcycle_mode={mode!r} is not a mode; valid: 'preserve' (step 0 computes the dense "
                     "model's function) or 'copy' (every expert an exact copy of the dense MLP)")


def upcycle_scaling(config: MoeConfig, mode: str) -> UpcycleScaling:
  """The scaling rule of the module docstring for a MoE layer's config: copy -> all 1; preserve -> b = 1/(1+S),
  a = 1/((1+S) G). Raises ValueError for an unknown mode or a router whose step-0 function cannot be kept."""
  check_mode(mode)
  if mode == "copy":
    return UpcycleScaling()
  router, S, E, k = config.router, config.num_shared_experts, config.num_experts, config.k
  zero_router = False
  if router == "noisy_top_k":
    gate_sum = 1.0                                   # softmax over the k kept logits
  elif router in ("top_k", "prototype") and config.normalize_gates:
    gate_sum = config.routed_scale                   # renormalised to 1, then x routed_scale
  elif router in ("top_k", "prototype") and (router == "top_k" or config.score == "softmax"):
    zero_router = True                               # every score 1/E (softmax) or 1/2 (sigmoid)
    gate_sum = config.routed_scale * k * (1.0 / E if config.score == "softmax" else 0.5)
    if config.capacity_factor is not None and config.capacity_factor * k < E:
      raise ValueError(
          f"init.upcycle_mode='preserve' with model.moe.normalize_gates=False sets the router to zero, so every "
          f"token ties onto experts 0..{k - 1} at step 0 and model.moe.capacity_factor={config.capacity_factor} "
          f"drops most of them; use capacity_factor=None (dropless), at least num_experts / k = {E / k}, or "
          "normalize_gates=True")
  else:
    raise ValueError(
        f"init.upcycle_mode='preserve' cannot keep the dense function with model.moe.router={router!r}"
        + (" and score='sigmoid' without normalize_gates (zero prototypes do not give equal sigmoid scores)"
           if router == "prototype" else "") + "; valid: router 'top_k', 'noisy_top_k' or 'prototype' "
        "(normalize_gates=True, or softmax scores), or init.upcycle_mode='copy'")
  return UpcycleScaling(routed=1.0 / ((1 + S) * gate_sum), shared=1.0 / (1 + S), zero_router=zero_router,
                        gate_sum=gate_sum)


def upcycle_params(dense_params: dict, moe_model: vit_lib.ViT, *, noise_std: float = 0.0,
                   rng: jax.Array | None = None, mode: str = "copy") -> vit_lib.ViT:
  """Fills `moe_model` (in place; returned) from dense parameters {name: array} (`vit.flat_params` naming).

  `dense_params` may come from a dense ViT, a DINOv2 import or a parameter checkpoint; a `pos_embed` for another
  grid is resampled. Blocks that are dense in `moe_model` take their MLP as it is. `mode`: "copy" or "preserve"
  (the module docstring); the noise is added after the preserve scaling.
  """
  check_mode(mode)
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
  for i in moe_blocks:
    layer = moe_model.blocks[i].mlp
    scaling = upcycle_scaling(layer.config, mode)
    router = f"blocks.{i}.mlp.router"
    if scaling.zero_router:
      params.update({name: np.zeros(np.shape(value), value.dtype) for name, value in model_params.items()
                     if name.startswith(router + ".")})
    else:
      keep.append(router)  # fresh router
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
    for group, count, scale in (("experts", layer.num_experts, scaling.routed),
                                ("shared", layer.num_shared_experts, scaling.shared)):
      for suffix, expert_name in MLP_TO_EXPERT.items():
        if mlp[suffix] is None or count == 0:
          continue
        weight = jnp.broadcast_to(jnp.asarray(mlp[suffix]), (count,) + tuple(np.shape(mlp[suffix])))  # [E, ...]
        if suffix in OUTPUT_LAYER and scale != 1.0:
          weight = weight * jnp.asarray(scale, weight.dtype)
        if group == "experts" and noise_std:
          rng, key = jax.random.split(rng)
          weight = weight + noise_std * jax.random.normal(key, weight.shape, weight.dtype)
        params[f"blocks.{i}.mlp.{group}.{expert_name}"] = weight
  return vit_lib.assign_params(moe_model, params, keep=keep)


def upcycle(dense_model: vit_lib.ViT, moe_model: vit_lib.ViT, noise_std: float = 0.0,
            rng: jax.Array | None = None, mode: str = "copy") -> vit_lib.ViT:
  """Copies `dense_model` into `moe_model` (in place; returned): experts and shared experts = the dense MLP of
  their block (mode="preserve": output layers scaled, routers zeroed where the rule needs it; see the module
  docstring) + N(0, noise_std^2) on routed experts, fresh routers, everything else copied.

  The two models must agree everywhere but the MoE blocks; a ValueError names any parameter that does not.
  """
  if vit_lib.moe_blocks(dense_model):
    raise ValueError(f"dense_model has MoE blocks {vit_lib.moe_blocks(dense_model)}; upcycle from a dense model")
  if dense_model.config.mlp_activation != moe_model.config.mlp_activation:
    raise ValueError(f"model.mlp_activation differs: dense {dense_model.config.mlp_activation!r}, MoE "
                     f"{moe_model.config.mlp_activation!r}; experts must compute the dense MLP's function")
  return upcycle_params(vit_lib.flat_params(dense_model), moe_model, noise_std=noise_std, rng=rng,
                        mode=mode)


def _head_differs(dense_params: dict, model_params: dict) -> bool:
  heads = [name for name in model_params if name.startswith("head.")]
  return any(name not in dense_params or np.shape(dense_params[name]) != np.shape(model_params[name])
             for name in heads) or any(name.startswith("head.") and name not in model_params
                                       for name in dense_params)
