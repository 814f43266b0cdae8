"""ViT / ViMoE: config parsing and errors, parameter counts worked out by hand, shapes, and a NumPy reference of a
tiny ViMoE forward pass (class-token routing per image, or per token)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from vimoe.models import activated_params, build_vit, count_params, parse_moe_layers, vit_config
from vimoe.models.vit import assign_params, flat_params

# -- MoE placement -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,depth,expected", [
    ("none", 12, ()), (None, 12, ()), ("last:0", 12, ()),
    ("last:2", 12, (10, 11)),                     # ViMoE L=2: l=1 is the last block
    ("last:12", 12, tuple(range(12))),
    ("every:2", 12, (1, 3, 5, 7, 9, 11)),         # V-MoE "every other layer"
    ("every:5", 12, (1, 6, 11)),                  # counted back from the last block
    ("every:1", 3, (0, 1, 2)),
    ([5, 0], 12, (0, 5)), ((3,), 4, (3,)), ("3,7", 12, (3, 7)),
])
def test_parse_moe_layers(spec, depth, expected):
  assert parse_moe_layers(spec, depth) == expected


@pytest.mark.parametrize("spec,fragment", [
    ("last:13", "out of range for depth 12"), ("every:0", "out of range"), ([12], "block index 12 is out of range"),
    ([-1], "out of range"), ("first:2", "not understood"), ([1, 1], "twice"), ([1.5], "integers"),
])
def test_parse_moe_layers_errors_name_the_key(spec, fragment):
  with pytest.raises(ValueError, match="moe.layers") as error:
    parse_moe_layers(spec, 12)
  assert fragment in str(error.value) and "valid:" in str(error.value)


# -- config validation (before anything is built) ----------------------------------------------------------------

TINY = dict(image_size=16, patch_size=4, dim=32, depth=3, num_heads=2, mlp_dim=64, num_classes=5)


@pytest.mark.parametrize("config,fragment", [
    (dict(variant="S/15"), "model.variant='S/15' is not known; valid: S/14"),
    (dict(TINY, moe=dict(layers="last:1", num_experts=4, k=5)), "model.moe.k=5 must be an integer in [1, "
                                                                "model.moe.num_experts=4]"),
    (dict(TINY, moe=dict(layers=[3])), "model.moe.layers=[3]: block index 3 is out of range for depth 3"),
    (dict(TINY, moe=dict(layers="last:1", num_expert=4)), "unknown config key(s) model.moe.num_expert"),
    (dict(TINY, moe=dict(layers="last:1", router="top1")), "model.moe.router='top1' is not valid"),
    (dict(TINY, dropout=0.1), "unknown config key(s) model.dropout"),
    (dict(variant="S/14", dim=512), "model.dim=512 conflicts with model.variant='S/14'"),
    (dict(TINY, num_heads=3), "model.num_heads=3 must divide model.dim=32"),
    (dict(TINY, mlp_activation="tanh"), "model.mlp_activation='tanh' is not valid"),
    (dict(image_size=16), "model.dim, model.depth, model.num_heads, model.mlp_dim, model.patch_size missing"),
])
def test_config_errors_name_the_key(config, fragment):
  with pytest.raises(ValueError) as error:
    build_vit(config)
  assert fragment in str(error.value)


def test_variant_sizes():
  config = vit_config(dict(variant="B/32"))
  assert (config.dim, config.depth, config.num_heads, config.mlp_dim, config.patch_size) == (768, 12, 12, 3072, 32)
  assert config.layerscale_init is None
  giant = vit_config(dict(variant="g/14"))
  assert (giant.dim, giant.depth, giant.num_heads, giant.mlp_dim, giant.mlp_activation) == (
      1536, 40, 24, 4096, "swiglu")
  assert giant.layerscale_init == 1e-5


# -- parameter counts (abstract models: nothing is allocated) ----------------------------------------------------


def abstract(config):
  return nnx.eval_shape(lambda: build_vit(config))


def test_dinov2_small_parameter_count():
  # DINOv2 ViT-S/14 as released (518 px, 37x37 position grid), backbone without head:
  #   patch conv 14*14*3*384 + 384 = 226,176; class token 384; positions (1 + 37*37) * 384 = 526,080;
  #   per block: 2 norms 1,536 + qkv 384*1152 + 1152 = 443,520 + proj 147,840 + fc1 591,360 + fc2 590,208
  #   + 2 LayerScales 768 = 1,775,232, times 12 = 21,302,784; final norm 768
  #   => 22,056,192, plus the 384-wide mask token (iBOT pre-training only, not kept here) = 22,056,576, the
  #   count of the torch-hub dinov2_vits14 model.
  model = abstract(dict(variant="S/14", image_size=518, num_classes=0))
  assert count_params(model) == 22_056_576 - 384


@pytest.mark.parametrize("variant,expected", [
    # ViT-S/16 at 224 px with a 1000-way head, no LayerScale: 295,296 (patch conv) + 384 + 197*384 + 12 *
    # 1,774,464 + 768 + 385,000 (head) = 22,050,664; ViT-B/16 likewise 86,567,656 (timm's vit_*_patch16_224).
    ("S/16", 22_050_664), ("B/16", 86_567_656),
])
def test_vit_parameter_counts(variant, expected):
  assert count_params(abstract(dict(variant=variant, image_size=224, num_classes=1000))) == expected


def test_activated_params_count_k_of_n_routed_experts():
  config = dict(TINY, num_registers=2, moe=dict(layers="last:2", num_experts=4, k=2, num_shared_experts=1))
  model = abstract(config)
  D, H, E, K, C, N = 32, 64, 4, 2, 5, 16
  block = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D)             # norms, qkv, proj (no LayerScale)
  mlp = D * H + H + H * D + D                                        # one MLP / one expert
  embeddings = 4 * 4 * 3 * D + D + D + 2 * D + (1 + N) * D           # patch conv, class, registers, positions
  total = embeddings + 3 * block + 1 * mlp + 2 * ((E + 1) * mlp + D * E) + 2 * D + (D * C + C)
  assert count_params(model) == total
  assert activated_params(model) == total - 2 * (E - K) * mlp        # router and shared expert count fully


# -- shapes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,num_tokens,out_dim", [
    (TINY, 1 + 16, 5),
    (dict(TINY, num_registers=3, classifier="cls+mean"), 1 + 3 + 16, 5),
    (dict(TINY, mlp_activation="swiglu", layerscale_init=1e-5, num_classes=0), 1 + 16, 32),
    (dict(TINY, image_size=(16, 24), moe=dict(layers="every:2", route_per="token", num_shared_experts=1)),
     1 + 24, 5),
    (dict(image_size=32, patch_size=8, dim=64, depth=4, num_heads=4, mlp_dim=128, num_classes=10,
          moe=dict(layers="last:2", num_experts=8)), 1 + 16, 10),
])
def test_output_shapes(config, num_tokens, out_dim):
  H, W = vit_config(config).image_size

  def run():
    model = build_vit(config)
    images = jnp.zeros((2, H, W, 3))
    return model(images), model.features(images), model.features(jnp.zeros((2, H + 8, W, 3)))

  (logits, aux), tokens, bigger = nnx.eval_shape(run)
  assert logits.shape == (2, out_dim)
  assert tokens.shape == (2, num_tokens, vit_config(config).dim)
  p = vit_config(config).patch_size
  assert bigger.shape[1] == num_tokens + (8 // p) * (W // p)
  moe_layers = vit_config(config).moe_layers
  assert sorted(aux["metrics"]) == sorted(f"block{i}" for i in moe_layers)


def test_position_embedding_interpolation():
  model = random_model(dict(TINY, depth=1, num_classes=0))
  stored = np.asarray(model.pos_embed[...])                          # [1, 1 + 4*4, D]
  assert np.array_equal(np.asarray(model.position_embedding((4, 4))), stored)
  resized = np.asarray(model.position_embedding((6, 3)))
  assert resized.shape == (1, 1 + 6 * 3, 32)
  np.testing.assert_array_equal(resized[:, 0], stored[:, 0])         # the class position is kept
  # Bicubic weights sum to one: a constant grid stays constant.
  assign_params(model, dict(flat_params(model), pos_embed=np.full((1, 17, 32), 0.25, np.float32)))
  np.testing.assert_allclose(np.asarray(model.position_embedding((7, 5))), 0.25, atol=1e-6)


# -- a tiny ViMoE against NumPy ----------------------------------------------------------------------------------

MOE_CONFIG = dict(image_size=(8, 12), patch_size=4, dim=16, depth=3, num_heads=2, mlp_dim=24, num_classes=3,
                  num_registers=1, layerscale_init=0.5, classifier="cls+mean", head_zero_init=False,
                  moe=dict(layers="last:2", num_experts=3, k=2, capacity_factor=None, num_shared_experts=1,
                           balance_weight=0.01, z_loss_weight=0.001))


def random_model(config, seed=0):
  """A model with random values in every parameter (biases, norms and LayerScales included, so no mistake can
  hide behind a zero or a one). Built abstractly and then filled, which skips compiling the initialisers."""
  model = abstract(config)
  rng = np.random.RandomState(seed)
  params = {name: (float(name.endswith(("scale", "gamma"))) + 0.2 * rng.randn(*value.shape)).astype(np.float32)
            for name, value in flat_params(model).items()}
  return assign_params(model, params)


@pytest.fixture(scope="module", params=["item", "token"])
def moe_model(request):
  config = dict(MOE_CONFIG, moe=dict(MOE_CONFIG["moe"], route_per=request.param))
  return random_model(config, seed=1), request.param


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _mlp(p, x):
  return _gelu(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]


def numpy_vimoe(params, images, *, route_per, num_heads, moe_layers, k, registers):
  """The forward pass written out from the papers, on float64 NumPy arrays."""
  P = {name: np.asarray(value, np.float64) for name, value in params.items()}
  B, Hi, Wi, _ = images.shape
  kernel = P["patch_embed.kernel"]                                    # [p, p, 3, D]
  p, D = kernel.shape[0], kernel.shape[-1]
  patches = images.reshape(B, Hi // p, p, Wi // p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, -1, p * p * 3)
  x = patches @ kernel.reshape(-1, D) + P["patch_embed.bias"]         # [B, N, D], row-major grid
  x = np.concatenate([np.repeat(P["cls_token"], B, 0), x], 1) + P["pos_embed"]
  x = np.concatenate([x[:, :1], np.repeat(P["register_tokens"], B, 0), x[:, 1:]], 1)
  T, heads, hd = x.shape[1], num_heads, D // num_heads
  for i in range(len([n for n in P if n.endswith(".norm1.scale")])):
    b = lambda name: P[f"blocks.{i}.{name}"]
    h = _layer_norm(x, b("norm1.scale"), b("norm1.bias"))
    qkv = (h @ b("attn.qkv.kernel") + b("attn.qkv.bias")).reshape(B, T, 3, heads, hd)
    q, key, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = np.einsum("bqhd,bkhd->bhqk", q, key) / np.sqrt(hd)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", attn, v).reshape(B, T, D)
    x = x + b("ls1.gamma") * (out @ b("attn.proj.kernel") + b("attn.proj.bias"))
    h = _layer_norm(x, b("norm2.scale"), b("norm2.bias"))
    if i in moe_layers:
      experts = {name: b(f"mlp.experts.{name}") for name in ("w_in", "b_in", "w_out", "b_out")}
      shared = {name: b(f"mlp.shared.{name}")[0] for name in ("w_in", "b_in", "w_out", "b_out")}
      y = np.zeros_like(h)
      for batch in range(B):
        for t in range(T):
          # route_per="item": the image's class token decides for all its tokens (ViMoE classification).
          router_in = h[batch, 0] if route_per == "item" else h[batch, t]
          logits = router_in @ b("mlp.router.kernel")
          probs = np.exp(logits - logits.max())
          probs /= probs.sum()
          for e in np.argsort(-probs)[:k]:                           # top-k, gates not renormalised
            y[batch, t] += probs[e] * _mlp({n: w[e] for n, w in experts.items()}, h[batch, t])
      y += _mlp(shared, h)                                            # the always-on shared expert
    else:
      y = _mlp({"w_in": b("mlp.fc1.kernel"), "b_in": b("mlp.fc1.bias"), "w_out": b("mlp.fc2.kernel"),
                "b_out": b("mlp.fc2.bias")}, h)
    x = x + b("ls2.gamma") * y
  tokens = _layer_norm(x, P["norm.scale"], P["norm.bias"])
  pooled = np.concatenate([tokens[:, 0], tokens[:, 1 + registers:].mean(1)], -1)   # cls + mean patch token
  return pooled @ P["head.kernel"] + P["head.bias"], tokens


def test_vimoe_matches_numpy_reference(moe_model):
  model, route_per = moe_model
  images = np.random.RandomState(2).randn(4, 8, 12, 3).astype(np.float32)
  forward = nnx.jit(lambda m, x: (m(x, deterministic=True), m.features(x)))
  (logits, aux), tokens = forward(model, jnp.asarray(images))
  want_logits, want_tokens = numpy_vimoe(flat_params(model), images.astype(np.float64), route_per=route_per,
                                         num_heads=2, moe_layers=(1, 2), k=2, registers=1)
  np.testing.assert_allclose(np.asarray(tokens), want_tokens, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=2e-4, rtol=1e-4)


def test_aux_losses_and_metrics_from_moe_blocks(moe_model):
  model, _ = moe_model
  step = nnx.jit(lambda m, x: m(x, deterministic=False))
  logits, aux = step(model, jnp.ones((4, 8, 12, 3)))
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  assert sorted(aux["metrics"]) == ["block1", "block2"]
  assert sorted(aux["losses"]) == ["balance", "z_loss"]
  # Losses are the weighted metrics summed over the MoE blocks.
  for name, metric, weight in (("balance", "balance_loss", 0.01), ("z_loss", "router_z_loss", 0.001)):
    summed = sum(float(aux["metrics"][f"block{i}"][metric]) for i in (1, 2))
    np.testing.assert_allclose(float(aux["losses"][name]), weight * summed, rtol=1e-5)
  assert aux["metrics"]["block1"]["expert_load"].shape == (3,)


def test_initialisation_and_stochastic_depth():
  config = dict(TINY, depth=2, layerscale_init=1e-5, drop_path_rate=0.5,
                moe=dict(layers="last:1", num_experts=4, num_shared_experts=1))
  model = build_vit(config, rngs=nnx.Rngs(params=0, dropout=1))     # the real initialisers, once in this file
  params = {name: np.asarray(value) for name, value in flat_params(model).items()}
  assert not params["head.kernel"].any() and not params["head.bias"].any()       # zero head for fine-tuning
  assert np.all(params["blocks.0.ls1.gamma"] == np.float32(1e-5))
  assert not params["blocks.0.mlp.fc1.bias"].any() and np.all(params["norm.scale"] == 1)
  assert 0.015 < params["pos_embed"].std() < 0.025 and 0.015 < params["blocks.0.attn.qkv.kernel"].std() < 0.025
  experts = params["blocks.1.mlp.experts.w_in"]                      # [E, D, H]
  # Experts are initialised like the dense MLP they replace (truncated normal 0.02: std 0.02 * 0.88 = 0.0176).
  assert not np.allclose(experts[0], experts[1]) and 0.015 < experts.std() < 0.02
  images = jnp.asarray(np.random.RandomState(0).randn(8, 16, 16, 3), jnp.float32)
  encode = nnx.jit(lambda m, x, deterministic: m.encode(x, deterministic=deterministic),
                   static_argnames="deterministic")
  eval_a, aux = encode(model, images, True)
  eval_b, _ = encode(model, images, True)
  train, _ = encode(model, images, False)
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  assert not np.allclose(np.asarray(train), np.asarray(eval_a))      # stochastic depth only when training
  assert sorted(aux["metrics"]) == ["block1"] and aux["losses"] == {}  # no loss weight set


@pytest.mark.parametrize("activation", ["gelu_exact", "swiglu"])
def test_experts_start_at_the_dense_mlp_scale(activation):
  """Issue 12, defect 1: at initialisation every routed and shared expert's output has the scale of the dense MLP
  it replaces (before the fix the experts used fan-in scaling: ~30x the dense branch at D=96)."""
  config = dict(image_size=16, patch_size=4, dim=96, depth=2, num_heads=3, mlp_dim=192, num_classes=10,
                mlp_activation=activation,
                moe=dict(layers="last:1", num_experts=8, num_shared_experts=1, dispatch="gather",
                         capacity_factor=None))
  model = build_vit(config, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(0).randn(256, 96), jnp.float32)   # LayerNorm output: unit variance
  rms = lambda y: float(np.sqrt(np.mean(np.square(np.asarray(y)))))
  dense = rms(model.blocks[0].mlp(x))
  # Independent scale: y = act(x W1) W2 with W ~ N(0, s^2), |x|^2 = D: E[y^2] = H s^2 E[act(h)^2],
  # h ~ N(0, D s^2), s = 0.02 * 0.8796 (std of a normal truncated at 2 sigma); checked by Monte Carlo below.
  s = 0.02 * 0.8796
  h = np.random.RandomState(1).randn(200_000) * np.sqrt(96) * s
  if activation == "gelu_exact":
    act_sq = np.mean((0.5 * h * (1 + erf(h / np.sqrt(2)))) ** 2)
  else:  # silu(gate) * h with an independent gate
    g = np.random.RandomState(2).randn(200_000) * np.sqrt(96) * s
    act_sq = np.mean((g / (1 + np.exp(-g)) * h) ** 2)
  expected = np.sqrt(192 * s * s * act_sq)
  assert 0.8 < dense / expected < 1.25, (dense, expected)
  layer = model.blocks[1].mlp
  routed = layer.experts(jnp.broadcast_to(x, (8, 256, 96)))                       # [E, N, D], expert e on x
  for e in range(8):
    assert 0.75 < rms(routed[e]) / dense < 1.33, (e, rms(routed[e]), dense)
  assert 0.75 < rms(layer.shared.apply_all(x)) / dense < 1.33


def test_dense_model_has_empty_aux():
  _, aux = nnx.eval_shape(lambda: build_vit(TINY)(jnp.zeros((2, 16, 16, 3))))
  assert aux == {"losses": {}, "metrics": {}}
