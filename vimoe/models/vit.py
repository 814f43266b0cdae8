"""Vision Transformer with DINOv2's architecture, and ViMoE: the same ViT with MoE MLPs in chosen blocks.

ViT: Dosovitskiy et al. 2021 (arXiv 2010.11929). DINOv2: Oquab et al. 2023 (arXiv 2304.07193), with registers:
Darcet et al. 2024 (arXiv 2309.16588). V-MoE: Riquelme et al. 2021 (arXiv 2106.05974). ViMoE: Han et al. 2024
(arXiv 2410.15732): MoE in the last L blocks, routing per image on the class token, optional shared expert.

Shapes: B batch, H x W image, p patch size, h x w = H/p x W/p patch grid, N = h*w patch tokens, R registers,
T = 1 + R + N tokens, D model dimension.

    images [B, H, W, 3] --patch conv--> [B, h, w, D] -> [B, N, D] -> prepend class token, add positions
      -> insert registers after the class token [B, T, D] -> blocks -> final LayerNorm -> head

A block is pre-norm with LayerScale on both residual branches (DINOv2):
    x = x + ls1 * attn(norm1(x));   x = x + ls2 * mlp(norm2(x))
where `mlp` is a dense MLP or, in the blocks chosen by `moe.layers`, a `vimoe.moe.MoeLayer`.

Model config keys: docs/models.md, 'ViT and ViMoE'.

Call: `logits, aux = model(images, deterministic=...)` with images float [B, H, W, 3] (normalised);
aux = {"losses": {name: sum over MoE blocks}, "metrics": {"block{i}": MoeAux.metrics of block i}}.
`model.features(images)` -> final-norm tokens [B, 1 + R + N, D] (class, registers, patches).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimoe import moe
from vimoe.models import params as params_lib
from vimoe.models.config_utils import (DTYPES, as_dict, check_keys, check_remat, choose, parse_moe_layers,
                                       positive_int, remat_block)
from vimoe.models.params import activated_params, assign_params, count_params, flat_params  # noqa: F401  (API)
from vimoe.models.posemb import resample_pos_embed, resize_class_and_grid

# name -> sizes (and architecture defaults) of the known variants.
_DINOV2 = dict(layerscale_init=1e-5)
VARIANTS: dict[str, dict[str, Any]] = {
    # DINOv2 (Oquab et al. 2023, table 17); g/14 uses a SwiGLU MLP whose hidden width is 2/3 of 4*1536, i.e. 4096.
    "S/14": dict(dim=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=14, **_DINOV2),
    "B/14": dict(dim=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=14, **_DINOV2),
    "L/14": dict(dim=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14, **_DINOV2),
    "g/14": dict(dim=1536, depth=40, num_heads=24, mlp_dim=4096, patch_size=14, mlp_activation="swiglu",
                 **_DINOV2),
    # ViT (Dosovitskiy et al. 2021, table 1; Ti and S from Touvron et al. 2021) and V-MoE sizes.
    "Ti/16": dict(dim=192, depth=12, num_heads=3, mlp_dim=768, patch_size=16),
    "S/16": dict(dim=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16),
    "S/32": dict(dim=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=32),
    "B/16": dict(dim=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16),
    "B/32": dict(dim=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=32),
    "L/16": dict(dim=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=16),
}
SIZE_KEYS = ("dim", "depth", "num_heads", "mlp_dim", "patch_size")
MLP_ACTIVATIONS = ("gelu_exact", "gelu", "relu", "swiglu")
CLASSIFIERS = ("cls", "cls+mean")
POSEMB_INTERPOLATIONS = ("bicubic", "bicubic_antialias")


# The MoE settings a ViT config may give (`model.moe.*`, besides `layers`) and their ViT defaults.
MOE_FIELDS = ("num_experts", "k", "router", "capacity_factor", "dispatch", "group_size", "route_per",
              "num_shared_experts", "normalize_gates", "balance_weight", "importance_weight", "z_loss_weight",
              "load_weight", "batch_priority", "slots_per_expert",
              "score", "routed_scale", "bias_update_rate", "num_groups", "groups_per_token",
              "sequence_balance_weight", "grouped_matmul", "dropless_buffer_factor")
MOE_DEFAULTS = moe.MoeConfig(route_per="item", activation="gelu_exact")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Resolved, validated hyperparameters of a ViT (build one with `vit_config(config)`)."""
  image_size: tuple[int, int]
  patch_size: int
  dim: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_classes: int = 1000
  num_registers: int = 0
  layerscale_init: float | None = None
  mlp_activation: str = "gelu_exact"
  classifier: str = "cls"
  head_zero_init: bool = True
  drop_path_rate: float = 0.0
  posemb_interpolation: str = "bicubic"
  posemb_interpolation_offset: float = 0.0
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"
  remat: str = "none"
  moe_layers: tuple[int, ...] = ()
  moe: moe.MoeConfig = MOE_DEFAULTS  # its activation is mlp_activation

  @property
  def grid(self) -> tuple[int, int]:
    """Patch grid (h, w) of the stored position embeddings."""
    return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size


# Config parsing and validation: every error names the key, the value and what is valid.

MODEL_KEYS = ("name", "variant", "image_size", "patch_size", "dim", "depth", "num_heads", "mlp_dim", "num_classes",
              "num_registers", "layerscale_init", "mlp_activation", "classifier", "head_zero_init",
              "drop_path_rate", "posemb_interpolation", "posemb_interpolation_offset", "layer_norm_eps", "dtype",
              "remat", "moe")
MOE_KEYS = ("layers",) + MOE_FIELDS


def vit_config(config, prefix: str = "model.") -> ViTConfig:
  """Validates a model config (see the module docstring) and resolves it into a `ViTConfig`.

  Raises ValueError naming the key (with `prefix`), its value and what is valid; nothing is built or compiled.
  """
  given = as_dict(config)
  check_keys(given, MODEL_KEYS, prefix)
  moe_given = as_dict(given.pop("moe", None))
  check_keys(moe_given, MOE_KEYS, prefix + "moe.")
  given.pop("name", None)
  variant = given.pop("variant", None)
  resolved: dict[str, Any] = {}
  if variant is not None:
    if variant not in VARIANTS:
      raise ValueError(f"{prefix}variant={variant!r} is not known; valid: {', '.join(VARIANTS)} "
                       "(or None with explicit dim, depth, num_heads, mlp_dim, patch_size)")
    resolved.update(VARIANTS[variant])
  for key, value in given.items():
    if value is None and key not in ("layerscale_init",):
      continue  # None means "the default / the variant's value"
    if variant is not None and key in SIZE_KEYS and value != VARIANTS[variant][key]:
      raise ValueError(f"{prefix}{key}={value!r} conflicts with {prefix}variant={variant!r} "
                       f"({key}={VARIANTS[variant][key]}); set {prefix}variant=None to give sizes explicitly")
    resolved[key] = value
  missing = [key for key in SIZE_KEYS if key not in resolved]
  if missing:
    raise ValueError(f"{', '.join(prefix + k for k in missing)} missing: give {prefix}variant (one of "
                     f"{', '.join(VARIANTS)}) or explicit sizes")
  for key in SIZE_KEYS:
    positive_int(resolved[key], prefix + key)
  if resolved["dim"] % resolved["num_heads"]:
    raise ValueError(f"{prefix}num_heads={resolved['num_heads']} must divide {prefix}dim={resolved['dim']}")
  image_size = resolved.get("image_size", 224)
  image_size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
  if len(image_size) != 2 or any(not isinstance(s, (int, np.integer)) or s < resolved["patch_size"]
                                 for s in image_size):
    raise ValueError(f"{prefix}image_size={resolved.get('image_size')!r} must be an int or (height, width), each "
                     f">= {prefix}patch_size={resolved['patch_size']}")
  resolved["image_size"] = tuple(int(s) for s in image_size)
  num_classes = resolved.get("num_classes", 1000)
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
    raise ValueError(f"{prefix}num_classes={num_classes!r} must be an integer >= 0 (0: no head)")
  num_registers = resolved.get("num_registers", 0)
  if not isinstance(num_registers, (int, np.integer)) or num_registers < 0:
    raise ValueError(f"{prefix}num_registers={num_registers!r} must be an integer >= 0")
  for key, valid in (("mlp_activation", MLP_ACTIVATIONS), ("classifier", CLASSIFIERS),
                     ("posemb_interpolation", POSEMB_INTERPOLATIONS), ("dtype", tuple(DTYPES))):
    if key in resolved:
      choose(prefix + key, resolved[key], valid)
  if "remat" in resolved:
    check_remat(resolved["remat"], prefix + "remat")
  if not 0.0 <= resolved.get("drop_path_rate", 0.0) < 1.0:
    raise ValueError(f"{prefix}drop_path_rate={resolved['drop_path_rate']!r} must be in [0, 1)")
  if not 0.0 <= resolved.get("posemb_interpolation_offset", 0.0) < 1.0:
    raise ValueError(f"{prefix}posemb_interpolation_offset={resolved['posemb_interpolation_offset']!r} must be "
                     "in [0, 1) (0.0: HF, 0.1: original DINOv2)")

  depth = resolved["depth"]
  moe_layers = parse_moe_layers(moe_given.pop("layers", "none"), depth, key=prefix + "moe.layers")
  moe_config = moe.MoeConfig.from_dict(moe_given, defaults=MOE_DEFAULTS, prefix=prefix + "moe.",
                                   validate=bool(moe_layers),
                                   activation=resolved.get("mlp_activation", MOE_DEFAULTS.activation))
  return ViTConfig(moe_layers=moe_layers, moe=moe_config, **resolved)


# Modules

_linear_init = jax.nn.initializers.truncated_normal(0.02)  # DINOv2 / timm ViT initialisation


class Attention(nnx.Module):
  """Multi-head self-attention; `qkv.kernel` [D, 3D] with output columns ordered (q|k|v, head, head_dim)."""

  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=_linear_init, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, kernel_init=_linear_init, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    B, T, D = x.shape
    qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # [B, T, 3, heads, D/heads]
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # softmax(q k^T / sqrt(d)) v
    return self.proj(out.reshape(B, T, D))


class Mlp(nnx.Module):
  """Dense MLP: fc2(act(fc1(x))); "swiglu": fc2(silu(fc_gate(x)) * fc1(x)) (DINOv2 g/14, Shazeer 2020)."""

  def __init__(self, dim: int, hidden_dim: int, activation: str, *, dtype, rngs: nnx.Rngs):
    self.activation = activation
    self.fc1 = nnx.Linear(dim, hidden_dim, kernel_init=_linear_init, dtype=dtype, rngs=rngs)
    self.fc_gate = (nnx.Linear(dim, hidden_dim, kernel_init=_linear_init, dtype=dtype, rngs=rngs)
                    if activation == "swiglu" else None)
    self.fc2 = nnx.Linear(hidden_dim, dim, kernel_init=_linear_init, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = self.fc1(x)  # [..., H]
    if self.activation == "gelu_exact":
      hidden = jax.nn.gelu(hidden, approximate=False)
    elif self.activation == "gelu":
      hidden = jax.nn.gelu(hidden, approximate=True)
    elif self.activation == "relu":
      hidden = jax.nn.relu(hidden)
    else:  # swiglu
      hidden = jax.nn.silu(self.fc_gate(x)) * hidden
    return self.fc2(hidden)


class LayerScale(nnx.Module):
  """Per-channel residual-branch scale (Touvron et al. 2021, CaiT), `gamma` [D]."""

  def __init__(self, dim: int, init_value: float):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm Transformer block; the MLP is a `moe.MoeLayer` when `is_moe`."""

  def __init__(self, config: ViTConfig, *, is_moe: bool, drop_path_rate: float, rngs: nnx.Rngs):
    D, dtype = config.dim, DTYPES[config.dtype]
    layer_norm = lambda: nnx.LayerNorm(D, epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False,
                                       rngs=rngs)
    self.is_moe = is_moe
    self.route_per = config.moe.route_per
    self.norm1 = layer_norm()
    self.attn = Attention(D, config.num_heads, dtype=dtype, rngs=rngs)
    self.ls1 = LayerScale(D, config.layerscale_init) if config.layerscale_init is not None else None
    self.norm2 = layer_norm()
    if is_moe:
      self.mlp = moe.MoeLayer(D, config.mlp_dim, config.moe, expert_kernel_init=_linear_init, rngs=rngs)
    else:
      self.mlp = Mlp(D, config.mlp_dim, config.mlp_activation, dtype=dtype, rngs=rngs)
    self.ls2 = LayerScale(D, config.layerscale_init) if config.layerscale_init is not None else None
    # Stochastic depth: dropout with one mask value per example (broadcast over tokens and channels).
    self.drop_path = (nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2), rngs=rngs)
                      if drop_path_rate > 0 else None)

  def _residual(self, branch: jax.Array, scale: LayerScale | None, deterministic: bool) -> jax.Array:
    if scale is not None:
      branch = scale(branch)
    if self.drop_path is not None:
      branch = self.drop_path(branch, deterministic=deterministic)
    return branch

  def __call__(self, x: jax.Array, *, deterministic: bool, return_routing: bool = False,
               mask: jax.Array | None = None):
    """x [B, T, D] -> (x, MoeAux or None), plus the first-choice experts ([B, T] or [B]) if return_routing.
    mask [B, T] (optional): real tokens; padding takes no expert capacity and counts in no routing statistic."""
    x = x + self._residual(self.attn(self.norm1(x)), self.ls1, deterministic)
    hidden = self.norm2(x)  # [B, T, D]
    aux = choice = None
    if self.is_moe:
      # ViMoE classification: one routing decision per image, on the class token's features [B, D].
      router_input = hidden[:, 0] if self.route_per == "item" else None
      if return_routing:
        choice = self.mlp.first_choice(hidden, router_input=router_input)
      hidden, aux = self.mlp(hidden, router_input=router_input, mask=mask, deterministic=deterministic)
    else:
      hidden = self.mlp(hidden)
    x = x + self._residual(hidden, self.ls2, deterministic)
    return (x, aux, choice) if return_routing else (x, aux)


class ViT(params_lib.BlockStack, nnx.Module):
  """ViT / ViMoE. Build with `build_vit(config)`; `ViT(vit_config(config), rngs=...)` is the same."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.config = config
    D, p, dtype = config.dim, config.patch_size, DTYPES[config.dtype]
    self.dtype = dtype
    self.patch_embed = nnx.Conv(3, D, (p, p), strides=(p, p), padding="VALID", dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, D)))
    self.register_tokens = (nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, config.num_registers, D)))
                            if config.num_registers else None)
    h, w = config.grid
    self.pos_embed = nnx.Param(_linear_init(rngs.params(), (1, 1 + h * w, D)))  # class position, then row-major grid
    rates = np.linspace(0.0, config.drop_path_rate, config.depth) if config.depth > 1 else [config.drop_path_rate]
    self.blocks = nnx.List([Block(config, is_moe=i in config.moe_layers, drop_path_rate=float(rates[i]), rngs=rngs)
                            for i in range(config.depth)])
    self.norm = nnx.LayerNorm(D, epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False, rngs=rngs)
    head_in = D if config.classifier == "cls" else 2 * D
    head_init = jax.nn.initializers.zeros if config.head_zero_init else _linear_init
    self.head = (nnx.Linear(head_in, config.num_classes, kernel_init=head_init, rngs=rngs)
                 if config.num_classes else None)

  def position_embedding(self, grid_hw: tuple[int, int]) -> jax.Array:
    """Position embeddings for a patch grid (h, w): [1, 1 + h*w, D]. The class position is kept; the patch grid
    is bicubically interpolated when it differs from the stored one (DINOv2 `interpolate_pos_encoding`)."""
    pos = self.pos_embed[...]
    if tuple(grid_hw) == self.config.grid:
      return pos
    return resize_class_and_grid(pos, self.config.grid, grid_hw, **self._interpolation)

  @property
  def _interpolation(self) -> dict:
    return dict(antialias=self.config.posemb_interpolation == "bicubic_antialias",
                offset=self.config.posemb_interpolation_offset)

  def resample_pos_embed(self, pos: jax.Array) -> jax.Array:
    """A stored square-grid pos_embed [1, 1 + n*n, D] (DINOv2) resampled to this model's grid, as the forward
    pass would at that resolution (`assign_params` uses it)."""
    return resample_pos_embed(pos, self.config.grid, **self._interpolation)

  EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "register_tokens")  # layer 0 (params_lib.BlockStack)

  def encode(self, images: jax.Array, *, deterministic: bool = True, return_layers: Sequence[int] = (),
             return_routing: bool = False, mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """images [B, H, W, 3] -> (final-norm tokens [B, 1 + R + N, D], aux).

    return_layers: block indices whose outputs, passed through the final norm (DINOv2's
      `get_intermediate_layers(norm=True)`), are returned in aux["layers"] (a list, same order).
    return_routing: aux["routing"]["block{i}"] = first-choice expert of every token [B, T] (route_per="token") or
      image [B] (route_per="item") in each MoE block; T counts the class token and registers first.
    mask: [B] bool, True for real images (evaluation batches are padded): padding images take no expert capacity
      and count in no routing statistic or loss.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images have shape {images.shape}; expected [batch, height, width, 3] (NHWC)")
    p = self.config.patch_size
    if images.shape[1] < p or images.shape[2] < p:
      raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} pixels are smaller than one {p}x{p} patch")
    x = self.patch_embed(images.astype(self.dtype))  # [B, h, w, D]
    B, h, w, D = x.shape
    x = x.reshape(B, h * w, D)                                                    # [B, N, D]
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (B, 1, D)), x], axis=1)
    x = x + self.position_embedding((h, w)).astype(x.dtype)                        # [B, 1 + N, D]
    if self.register_tokens is not None:  # registers carry no position (Darcet et al. 2024)
      registers = jnp.broadcast_to(self.register_tokens[...].astype(x.dtype), (B,) + self.register_tokens.shape[1:])
      x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)                # [B, 1 + R + N, D]
    depth = len(self.blocks)
    wanted = [index % depth if -depth <= index < depth else index for index in return_layers]
    if any(not 0 <= index < depth for index in wanted):
      raise ValueError(f"return_layers={tuple(return_layers)} must be block indices in [-{depth}, {depth - 1}]")
    named_aux, routing_choice, outputs = [], {}, {}
    token_mask = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool)[:, None], x.shape[:2])
    # model.remat: what the backward pass keeps of each block (config_utils.REMAT_POLICIES).
    run_block = remat_block(lambda block, x, mask: block(x, deterministic=deterministic,
                                                         return_routing=return_routing, mask=mask),
                            self.config.remat)
    for index, block in enumerate(self.blocks):
      if return_routing:
        x, block_aux, choice = run_block(block, x, token_mask)
        if choice is not None:
          routing_choice[f"block{index}"] = choice
      else:
        x, block_aux = run_block(block, x, token_mask)
      if block_aux is not None:
        named_aux.append((f"block{index}", block_aux))
      if index in wanted:
        outputs[index] = x
    aux = moe.sum_aux(named_aux)
    if wanted:
      aux["layers"] = [self.norm(outputs[index]) for index in wanted]
    if return_routing:
      aux["routing"] = routing_choice
    return self.norm(x), aux

  def features(self, images: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """Final-norm token features [B, 1 + R + N, D]: class token, registers, patch tokens (row-major grid)."""
    return self.encode(images, deterministic=deterministic)[0]

  def __call__(self, images: jax.Array, *, deterministic: bool = True,
               mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """images [B, H, W, 3] -> (logits [B, num_classes] float32, aux). Pass deterministic=False when training
    (stochastic depth, router noise). With num_classes=0 the pooled features [B, D or 2D] are returned.
    mask [B] (optional): real images; padding is left out of the routing (see `encode`)."""
    tokens, aux = self.encode(images, deterministic=deterministic, mask=mask)
    pooled = tokens[:, 0]                                                          # [B, D]
    if self.config.classifier == "cls+mean":
      patches = tokens[:, 1 + self.config.num_registers:]
      pooled = jnp.concatenate([pooled, jnp.mean(patches, axis=1)], axis=-1)       # [B, 2D]
    out = self.head(pooled) if self.head is not None else pooled
    return out.astype(jnp.float32), aux


def build_vit(config, *, rngs: nnx.Rngs | None = None) -> ViT:
  """Builds a ViT/ViMoE from a model config (keys in the module docstring); validates it first."""
  return ViT(vit_config(config), rngs=rngs if rngs is not None else nnx.Rngs(0))


def moe_blocks(model: ViT) -> tuple[int, ...]:
  return tuple(i for i, block in enumerate(model.blocks) if block.is_moe)
