"""From routing analysis to a smaller ViMoE: routing statistics per expert, MoE blocks merged back into dense MLPs,
rarely used experts dropped. Pure functions of a model, its batches and its parameters ({dotted name: array},
`vimoe.models.params.flat_params` naming); scripts/prune_moe.py reads the workdir and runs the trainer.

Formulas (docs/design.md, 'Pruning: from routing analysis to dense blocks'). For a MoE block with E routed experts,
top-k, S shared experts, over U routing units u with choices (e_uj, g_uj), j < k:
    traffic  t_e = #{(u, j): e_uj = e} / (k U)             (sums to 1 over the experts)
    gate     gbar_e = mean of g_uj over the choices of e     (0 for an expert nobody chose)
    mass     m_e = k t_e gbar_e = (1/U) sum_u sum_j g_uj [e_uj = e],   G = sum_e m_e
Merge into one dense MLP of the same hidden width H (components i: the S shared experts with weight beta_i = 1, the
routed experts with beta_e = m_e; c = S + G):
    fc1, b1 (and the SwiGLU gate) = sum_i beta_i (w_in_i, b_in_i, w_gate_i) / c     (input side: weighted average)
    fc2, b2                       = sum_i beta_i (w_out_i, b_out_i)                 (output side: weighted sum)
It is exact when the components share their input side (as upcycled experts do at step 0): then the block computes
sum_s S_s(h) + sum_e m_e E_e(h), the MoE output with every gate replaced by its mean mass.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Expert parameter -> dense Mlp parameter (the inverse of vimoe/checkpoints/upcycle.py's MLP_TO_EXPERT).
EXPERT_TO_MLP = {"w_in": "fc1.kernel", "b_in": "fc1.bias", "w_out": "fc2.kernel", "b_out": "fc2.bias",
                 "w_gate": "fc_gate.kernel"}
INPUT_SIDE = ("w_in", "b_in", "w_gate")
OUTPUT_SIDE = ("w_out", "b_out")


def block_router_features(vit, images: jax.Array) -> dict:
  """The router features of every MoE block of a ViT (as `Block.__call__` computes them in evaluation):
  {"block{i}": [B, D] (route_per="item": the class token of norm2(x)) or [B, T, D] (route_per="token")}."""
  x = vit.patch_embed(images.astype(vit.dtype))                                    # [B, h, w, D]
  B, h, w, D = x.shape
  x = x.reshape(B, h * w, D)
  x = jnp.concatenate([jnp.broadcast_to(vit.cls_token[...].astype(x.dtype), (B, 1, D)), x], axis=1)
  x = x + vit.position_embedding((h, w)).astype(x.dtype)
  if vit.register_tokens is not None:
    registers = jnp.broadcast_to(vit.register_tokens[...].astype(x.dtype), (B,) + vit.register_tokens.shape[1:])
    x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
  features = {}
  for index, block in enumerate(vit.blocks):
    if block.is_moe:
      branch = block.attn(block.norm1(x))
      if block.ls1 is not None:
        branch = block.ls1(branch)
      hidden = block.norm2(x + branch)
      features[f"block{index}"] = hidden[:, 0] if block.route_per == "item" else hidden
    x, _ = block(x, deterministic=True)
  return features


@nnx.jit
def _gates(vit, images):
  """{"block{i}": (expert_index, gates), each [B, K] or [B, T, K]} of every MoE block, routed as in evaluation."""
  features = block_router_features(vit, images)
  out = {}
  for index, block in enumerate(vit.blocks):
    name = f"block{index}"
    if name in features:
      gating = block.mlp.router.gate(features[name].astype(jnp.float32), block.mlp.k, deterministic=True)
      out[name] = (gating.expert_index, gating.gates)
  return out


def routing_statistics(model, batches, *, max_batches: int | None = None) -> dict:
  """Routes batches ({"image", "label"}; label -1 = padding, left out) through a classification ViMoE and counts,
  per MoE block, every expert's traffic share, mean gate and gate mass (module docstring).

  Token-choice routers only (they expose `gate`); noisy top-k is read without noise. Returns {"block{i}":
  {"traffic": [E], "mean_gate": [E], "mass": [E], "units": U, "k": k}}.
  """
  vit = model.backbone
  blocks = {f"block{i}": block.mlp for i, block in enumerate(vit.blocks) if block.is_moe}
  if not blocks:
    raise ValueError("model.moe.layers gives the model no MoE block: there is no routing to count")
  for name, layer in blocks.items():
    if not hasattr(layer.router, "gate"):
      raise ValueError(f"{name}: router={layer.router_kind!r} is not a token-choice router; routing statistics "
                       "need its gates (top_k, noisy_top_k, ...)")

  sums = {name: {"count": np.zeros(layer.num_experts), "gate": np.zeros(layer.num_experts), "units": 0}
          for name, layer in blocks.items()}
  for batch_index, batch in enumerate(batches):
    if max_batches is not None and batch_index >= max_batches:
      break
    valid = np.asarray(batch["label"]) >= 0                                        # [B]
    for name, (index, gate) in _gates(vit, jnp.asarray(batch["image"])).items():
      index, gate = np.asarray(index), np.asarray(gate, np.float64)                # [B, K] or [B, T, K]
      unit_valid = np.broadcast_to(valid.reshape((-1,) + (1,) * (index.ndim - 1)), index.shape)
      index, gate = index[unit_valid], gate[unit_valid]
      num_experts = len(sums[name]["count"])
      sums[name]["count"] += np.bincount(index, minlength=num_experts)
      sums[name]["gate"] += np.bincount(index, weights=gate, minlength=num_experts)
      sums[name]["units"] += int(unit_valid[..., 0].sum())
  out = {}
  for name, layer in blocks.items():
    count, gate, units = sums[name]["count"], sums[name]["gate"], sums[name]["units"]
    if not units:
      raise ValueError("the batches gave no labelled unit to route")
    out[name] = {"traffic": (count / count.sum()).tolist(),
                 "mean_gate": np.where(count > 0, gate / np.maximum(count, 1), 0.0).tolist(),
                 "mass": (gate / units).tolist(), "units": units, "k": layer.k}
  return out


def block_params(flat: dict, index: int) -> dict:
  """{name under blocks.{index}.mlp.: array} of one block."""
  prefix = f"blocks.{index}.mlp."
  return {name[len(prefix):]: value for name, value in flat.items() if name.startswith(prefix)}


def merge_to_dense(moe_params: dict, mass, *, mode: str = "average") -> dict:
  """A MoE block's parameters ("router.kernel", "experts.w_in" [E, D, H], ..., "shared.w_in" [S, D, H], ...) ->
  dense Mlp parameters ("fc1.kernel" [D, H'], "fc1.bias", "fc2.kernel", "fc2.bias", SwiGLU "fc_gate.*").

  mass [E]: each routed expert's mean gate mass per unit (`routing_statistics`). mode "average": one MLP of width
  H (module docstring); "concat": width (S + 1) H, the shared experts' hidden units next to those of the routed
  experts merged by the same rule (exact for sum_s S_s + G * Ebar, Ebar the mass-weighted average expert).
  """
  if mode not in ("average", "concat"):
    raise ValueError(f"mode={mode!r} is not known; valid: 'average', 'concat'")
  mass = np.asarray(mass, np.float64)
  experts = {name[len("experts."):]: np.asarray(v, np.float64) for name, v in moe_params.items()
             if name.startswith("experts.")}
  shared = {name[len("shared."):]: np.asarray(v, np.float64) for name, v in moe_params.items()
            if name.startswith("shared.")}
  unknown = sorted(set(experts) - set(EXPERT_TO_MLP))
  if unknown:
    raise ValueError(f"expert parameters {unknown} have no dense MLP counterpart (activation 'prelu' cannot be "
                     f"merged into a dense Mlp); valid: {', '.join(EXPERT_TO_MLP)}")
  E = experts["w_in"].shape[0]
  if mass.shape != (E,) or np.any(mass < 0):
    raise ValueError(f"mass has shape {mass.shape} with min {mass.min() if mass.size else None}; expected {E} "
                     "non-negative values, one per routed expert")
  total = float(mass.sum())
  if total <= 0:
    raise ValueError("mass sums to 0: no unit reached any routed expert, nothing to merge")
  S = shared["w_in"].shape[0] if shared else 0
  out = {}
  if mode == "average":
    c = S + total
    for name, value in experts.items():
      summed = np.tensordot(mass, value, axes=1) + (shared[name].sum(0) if S else 0.0)   # sum_i beta_i theta_i
      out[EXPERT_TO_MLP[name]] = summed / c if name in INPUT_SIDE else summed
  else:
    for name, value in experts.items():
      routed = np.tensordot(mass / total, value, axes=1) * (total if name in OUTPUT_SIDE else 1.0)
      if name == "b_out":
        out["fc2.bias"] = routed + (shared[name].sum(0) if S else 0.0)
        continue
      axis = 0 if name == "w_out" else -1           # hidden units: rows of w_out, columns of w_in / b_in / w_gate
      out[EXPERT_TO_MLP[name]] = np.concatenate([shared[name][s] for s in range(S)] + [routed], axis=axis)
  if "w_gate" in experts:
    out["fc_gate.bias"] = np.zeros_like(out["fc1.bias"])  # experts have no gate bias
  return {name: np.asarray(value, np.float32) for name, value in out.items()}


def drop_experts(moe_params: dict, keep) -> dict:
  """The block's parameters with only the routed experts `keep` (indices, kept in this order): their expert
  weights and their router columns; the shared experts are untouched. Nothing is renormalised: the softmax gate of
  a kept expert becomes p_e / (sum of p over the kept experts), see docs/design.md."""
  keep = [int(e) for e in keep]
  out = {}
  for name, value in moe_params.items():
    value = np.asarray(value)
    if name.startswith("experts."):
      out[name] = value[keep]
    elif name.startswith("router."):
      if value.shape[-1] < max(keep, default=0) + 1:
        raise ValueError(f"router.{name} has {value.shape[-1]} columns; cannot keep experts {keep}")
      out[name] = value[..., keep]  # every token-choice router's parameters are [D, E]
    else:
      out[name] = value
  return out


def experts_to_keep(stats: dict, blocks, min_traffic: float) -> tuple[int, dict]:
  """Which routed experts each kept MoE block keeps. An expert survives when its traffic is >= min_traffic; the
  model has one num_experts, so every block keeps the same count n = max over blocks of its survivors (a block with
  fewer survivors also keeps its busiest experts below the threshold). Returns (n, {"block{i}": sorted indices})."""
  if not 0.0 <= min_traffic < 1.0:
    raise ValueError(f"min_traffic={min_traffic!r} must be in [0, 1)")
  blocks = list(blocks)
  if not blocks:
    return 0, {}
  survivors = {name: int(np.sum(np.asarray(stats[name]["traffic"]) >= min_traffic)) for name in blocks}
  count = max(1, max(survivors.values()))
  keep = {}
  for name in blocks:
    order = np.argsort(-np.asarray(stats[name]["traffic"]), kind="stable")[:count]
    keep[name] = sorted(int(e) for e in order)
  return count, keep


def prune_params(flat: dict, stats: dict, *, dense: dict, keep_experts: dict, mode: str = "average") -> dict:
  """A ViMoE's parameters -> the pruned model's: the MoE blocks in `dense` ({"block{i}": mass or None for the
  block's own stats[...]["mass"]}) merged into dense MLPs, the kept MoE blocks restricted to `keep_experts`
  ({"block{i}": indices}); every other parameter as it is."""
  out = {name: value for name, value in flat.items() if not re.match(r"blocks\.\d+\.mlp\.", name)}
  names = {f"block{i}" for i in {int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.mlp\.", n) for n in flat)
                                  if m}}
  for name in sorted(names, key=lambda n: int(n[5:])):
    index = int(name[5:])
    params = block_params(flat, index)
    if name in dense:
      mass = dense[name] if dense[name] is not None else stats[name]["mass"]
      params = merge_to_dense(params, mass, mode=mode)
    elif name in keep_experts:
      params = drop_experts(params, keep_experts[name])
    out.update({f"blocks.{index}.mlp.{key}": value for key, value in params.items()})
  return out
