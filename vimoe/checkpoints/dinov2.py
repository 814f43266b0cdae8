"""DINOv2 weights (PyTorch) -> our ViT, and the model-parameter checkpoint format the trainer initialises from.

Three namings of the same weights are read:
  torch hub (facebookresearch/dinov2 `.pth`):  cls_token, pos_embed, register_tokens, mask_token,
      patch_embed.proj.{weight,bias}, blocks.{i}.norm1, blocks.{i}.attn.qkv, blocks.{i}.attn.proj, blocks.{i}.ls1.gamma,
      blocks.{i}.norm2, blocks.{i}.mlp.fc1/fc2 (or mlp.w12/w3 for SwiGLU), blocks.{i}.ls2.gamma, norm
      (training checkpoints with chunked blocks, blocks.{chunk}.{i}.*, are read too)
  Hugging Face files (`model.safetensors` / `pytorch_model.bin` as on the hub): embeddings.*, encoder.layer.{i}.
      attention.attention.{query,key,value}, attention.output.dense, layer_scale{1,2}.lambda1, mlp.fc1/fc2 or
      mlp.weights_in/weights_out, layernorm  (optionally under a `dinov2.` / `dinov2_with_registers.` prefix)
  Hugging Face in-memory names (transformers >= 5 `state_dict()`): attention.{q,k,v,o}_proj, mlp.{gate,up,down}_proj

Everything is first renamed to the torch-hub naming (`to_hub_names`), then mapped to our parameter names
(`hub_to_vit_params`): torch Linear weights [out, in] are transposed to kernels [in, out], the patch conv weight
OIHW becomes HWIO. `mask_token` (iBOT pre-training only) and HF `classifier.*` heads are not used.

Checkpoint format written by scripts/convert_dinov2.py (and `save_params`): a directory with
  params/             an orbax StandardCheckpointer checkpoint of {"params": nested dict of our parameter names}
  model_config.json   the model config keys (vimoe/models/vit.py) that rebuild the same backbone
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from flax import nnx

from vimoe.models import vit as vit_lib
from vimoe.models.params import flatten_dict

# DINOv2 head counts by width (the .pth files do not store them; Oquab et al. 2023, table 17).
HEADS_BY_DIM = {384: 6, 768: 12, 1024: 16, 1536: 24}
IGNORED = ("mask_token",)


# -- reading files -----------------------------------------------------------------------------------------------

def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads PyTorch weights into {name: float32 numpy array}.

  `path`: a Hugging Face model directory (model.safetensors or pytorch_model.bin inside), a `.safetensors` file,
  or a torch file (`.pth`, `.pt`, `.bin`; a dict wrapped as {"model": ...}, {"state_dict": ...} or
  {"teacher": ...} is unwrapped).
  """
  if os.path.isdir(path):
    candidates = [os.path.join(path, name) for name in ("model.safetensors", "pytorch_model.bin")]
    found = [name for name in candidates if os.path.exists(name)]
    if not found:
      raise FileNotFoundError(f"{path} is a directory without model.safetensors or pytorch_model.bin "
                              f"(it holds: {', '.join(sorted(os.listdir(path))) or 'nothing'})")
    path = found[0]
  if not os.path.exists(path):
    raise FileNotFoundError(f"DINOv2 weights not found: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    state = load_file(path)
  else:
    import torch  # only needed for torch pickles
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "teacher"):
      if isinstance(state, dict) and set(state) == {wrapper}:
        state = state[wrapper]
    state = {name: value.detach().float().numpy() for name, value in state.items()}
  return {name: np.asarray(value, np.float32) for name, value in state.items()}


# -- renaming ------------------------------------------------------------------------------------------------------

_HF_BLOCK_RENAMES = (  # (HF suffix inside encoder.layer.{i}., torch-hub suffix inside blocks.{i}.)
    ("norm1.", "norm1."), ("norm2.", "norm2."),
    ("attention.output.dense.", "attn.proj."), ("attention.o_proj.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
    ("mlp.weights_in.", "mlp.w12."), ("mlp.weights_out.", "mlp.w3."), ("mlp.down_proj.", "mlp.w3."),
)
_HF_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}


def is_hf_naming(state: dict) -> bool:
  return any(name.split(".", 1)[0] in ("embeddings", "encoder", "dinov2", "dinov2_with_registers")
             for name in state)


def to_hub_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames Hugging Face DINOv2 weights to the torch-hub naming (hub-named input is returned, chunks flattened).

  Separate HF query/key/value (or q/k/v_proj) become one `attn.qkv` [3D, D]; HF gate/up projections become one
  `mlp.w12` [2H, D] (gate rows first, as DINOv2's SwiGLUFFNFused splits it). Unknown names are kept as they are,
  so `hub_to_vit_params` can report them.
  """
  if not is_hf_naming(state):
    # Training checkpoints group blocks in chunks: blocks.{chunk}.{i}.* with the global index i.
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", name): value for name, value in state.items()}
  out, pending = {}, {}
  for name, value in state.items():
    name = re.sub(r"^(dinov2|dinov2_with_registers)\.", "", name)
    if name.startswith("classifier."):
      continue  # HF linear-probe head: not part of the backbone
    if name in _HF_TOP_RENAMES:
      out[_HF_TOP_RENAMES[name]] = value
      continue
    match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", name)
    if not match:
      out[name] = value
      continue
    block, rest = f"blocks.{match.group(1)}.", match.group(2)
    fused = re.fullmatch(r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)", rest)
    gated = re.fullmatch(r"mlp\.(gate|up)_proj\.(weight|bias)", rest)
    if fused:
      part = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}[fused.group(1) or fused.group(2)]
      pending.setdefault(block + "attn.qkv." + fused.group(3), {})[part] = value
    elif gated:
      pending.setdefault(block + "mlp.w12." + gated.group(2), {})[0 if gated.group(1) == "gate" else 1] = value
    else:
      for hf_suffix, hub_suffix in _HF_BLOCK_RENAMES:
        if rest.startswith(hf_suffix):
          out[block + hub_suffix + rest[len(hf_suffix):]] = value
          break
      else:
        out[name] = value
  for name, parts in pending.items():
    expected = 3 if ".attn.qkv." in name else 2
    if len(parts) != expected:
      raise ValueError(f"{name}: found {len(parts)} of the {expected} Hugging Face pieces it is built from")
    out[name] = np.concatenate([parts[i] for i in range(expected)], axis=0)
  return out


def hub_to_vit_params(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Torch-hub-named DINOv2 weights -> {our parameter name: array}. Raises ValueError naming unknown keys."""
  out, unknown = {}, []
  linear = lambda w: np.ascontiguousarray(w.T)  # torch Linear [out, in] -> kernel [in, out]
  for name, value in state.items():
    if name in IGNORED:
      continue
    if name in ("cls_token", "pos_embed", "register_tokens"):
      out[name] = value
    elif name == "patch_embed.proj.weight":
      out["patch_embed.kernel"] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    elif name == "patch_embed.proj.bias":
      out["patch_embed.bias"] = value
    elif name in ("norm.weight", "norm.bias"):
      out["norm." + ("scale" if name.endswith("weight") else "bias")] = value
    else:
      match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
      rest = match.group(2) if match else ""
      block = f"blocks.{match.group(1)}." if match else ""
      if re.fullmatch(r"norm[12]\.(weight|bias)", rest):
        out[block + rest.replace("weight", "scale")] = value
      elif rest in ("ls1.gamma", "ls2.gamma"):
        out[block + rest] = value
      elif re.fullmatch(r"(attn\.(qkv|proj)|mlp\.(fc1|fc2|w3))\.(weight|bias)", rest):
        layer, kind = rest.rsplit(".", 1)
        layer = layer.replace("mlp.w3", "mlp.fc2")
        out[f"{block}{layer}." + ("kernel" if kind == "weight" else "bias")] = (
            linear(value) if kind == "weight" else value)
      elif rest in ("mlp.w12.weight", "mlp.w12.bias"):
        gate, up = np.split(value, 2, axis=0)  # DINOv2 SwiGLUFFNFused: x1, x2 = w12(x).chunk(2); silu(x1) * x2
        kind = "kernel" if rest.endswith("weight") else "bias"
        out[f"{block}mlp.fc_gate.{kind}"] = linear(gate) if kind == "kernel" else gate
        out[f"{block}mlp.fc1.{kind}"] = linear(up) if kind == "kernel" else up
      else:
        unknown.append(name)
  if unknown:
    raise ValueError(f"unexpected keys in the DINOv2 weights (not a DINOv2 ViT?): {sorted(unknown)}")
  return out


def to_vit_params(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Any of the three namings -> {our parameter name: array}."""
  return hub_to_vit_params(to_hub_names(state))


# -- model config ------------------------------------------------------------------------------------------------

def infer_model_config(params: dict[str, np.ndarray], *, num_heads: int | None = None,
                       hf_config: dict | None = None) -> dict:
  """Model config keys (vimoe/models/vit.py) of the backbone these (our-named) parameters belong to.

  Heads are not stored in the weights: taken from `num_heads`, else the HF config.json, else the DINOv2 table.
  The image size is the one of the stored position grid (518 px = 37 x 14 for the released models).
  """
  if "patch_embed.kernel" not in params or "pos_embed" not in params:
    raise ValueError("the weights have no patch_embed / pos_embed: not a DINOv2 ViT")
  patch, _, _, dim = params["patch_embed.kernel"].shape
  depth = 1 + max(int(name.split(".")[1]) for name in params if name.startswith("blocks."))
  side = int(round((params["pos_embed"].shape[1] - 1) ** 0.5))
  if num_heads is None and hf_config:
    num_heads = hf_config.get("num_attention_heads")
  if num_heads is None:
    if dim not in HEADS_BY_DIM:
      raise ValueError(f"cannot tell the number of attention heads of a width-{dim} model; pass num_heads")
    num_heads = HEADS_BY_DIM[dim]
  swiglu = "blocks.0.mlp.fc_gate.kernel" in params
  config = dict(variant=None, image_size=side * patch, patch_size=int(patch), dim=int(dim), depth=depth,
                num_heads=int(num_heads), mlp_dim=int(params["blocks.0.mlp.fc1.kernel"].shape[1]),
                num_registers=int(params["register_tokens"].shape[1]) if "register_tokens" in params else 0,
                layerscale_init=1.0 if "blocks.0.ls1.gamma" in params else None,
                mlp_activation="swiglu" if swiglu else "gelu_exact",
                layer_norm_eps=float((hf_config or {}).get("layer_norm_eps", 1e-6)))
  if config["num_registers"]:  # DINOv2-reg resizes positions with antialiasing (hub code and HF)
    config["posemb_interpolation"] = "bicubic_antialias"
  if hf_config and hf_config.get("hidden_act", "gelu") not in ("gelu", "silu", "swiglu"):
    raise ValueError(f"hidden_act={hf_config['hidden_act']!r} in config.json: only DINOv2's exact GELU is supported")
  return config


def _hf_config(path: str) -> dict | None:
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config_file = os.path.join(directory, "config.json")
  if os.path.exists(config_file):
    with open(config_file) as f:
      return json.load(f)
  return None


def load_dinov2(path: str, model: vit_lib.ViT | None = None, *, num_heads: int | None = None,
                **config_overrides) -> vit_lib.ViT:
  """DINOv2 weights at `path` (see `read_state_dict`) -> a dense ViT holding them.

  With `model`, its parameters are overwritten (its head, if any, is kept; a different position grid is
  resampled); else a model is built from the weights' own config updated by `config_overrides` (e.g.
  image_size=224, num_classes=1000). Raises ValueError naming missing / unexpected / mis-shaped parameters.
  """
  params = to_vit_params(read_state_dict(path))
  if model is not None:
    return vit_lib.assign_params(model, params, keep=("head",))
  config = infer_model_config(params, num_heads=num_heads, hf_config=_hf_config(path))
  config.update(config_overrides)
  # When the weights fill the whole model (no head, no random state), skip the random initialisers: build an
  # abstract model and give it the weights.
  model = nnx.eval_shape(lambda: vit_lib.build_vit(config))
  if not any(name.startswith("head.") for name in vit_lib.flat_params(model)):
    vit_lib.assign_params(model, params)
    if all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(model))):
      return model
  return vit_lib.assign_params(vit_lib.build_vit(config), params, keep=("head",))


# -- our checkpoint format ---------------------------------------------------------------------------------------

def _nest(flat: dict) -> dict:
  nested: dict = {}
  for name, value in flat.items():
    node = nested
    *parents, leaf = name.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return nested


def save_params(directory: str, params: dict, model_config: dict) -> None:
  """Writes {parameter name: array} with orbax (`directory/params`) and the model config as JSON."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"),
                    {"params": _nest({name: np.asarray(value) for name, value in params.items()})}, force=True)
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, "model_config.json"), "w") as f:
    json.dump(model_config, f, indent=2, sort_keys=True)


def restore_params(directory: str) -> tuple[dict[str, np.ndarray], dict]:
  """Reads what `save_params` wrote: ({parameter name: array}, model config)."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  for needed in ("params", "model_config.json"):
    if not os.path.exists(os.path.join(directory, needed)):
      raise FileNotFoundError(f"{directory} is not a vimoe parameter checkpoint: {needed} is missing "
                              "(write one with scripts/convert_dinov2.py)")
  restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
  with open(os.path.join(directory, "model_config.json")) as f:
    model_config = json.load(f)
  return {name: np.asarray(value) for name, value in flatten_dict(restored["params"]).items()}, model_config
