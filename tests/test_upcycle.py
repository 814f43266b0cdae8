"""Sparse upcycling: experts start as exact copies of the dense MLP, routers stay fresh, and with renormalised
top-k gates (no shared expert, nothing dropped) the ViMoE computes exactly what the dense ViT did."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vimoe import checkpoints
from vimoe.checkpoints.upcycle import upcycle
from vimoe.models import build_vit
from vimoe.models.vit import assign_params, flat_params

DENSE = dict(image_size=16, patch_size=4, dim=32, depth=3, num_heads=2, mlp_dim=48, num_classes=5,
             num_registers=1, layerscale_init=0.5, head_zero_init=False)
MOE_LAYERS = (1, 2)


def moe_config(**moe):
  return dict(DENSE, moe=dict(dict(layers="last:2", num_experts=4, capacity_factor=None, normalize_gates=True),
                              **moe))


@pytest.fixture(scope="module")
def dense():
  """A dense ViT with random values everywhere (biases, norms, LayerScales and head too), built abstractly and
  filled, which skips compiling the initialisers."""
  model = nnx.eval_shape(lambda: build_vit(DENSE))
  rng = np.random.RandomState(0)
  return assign_params(model, {
      name: (float(name.endswith(("scale", "gamma"))) + 0.2 * rng.randn(*value.shape)).astype(np.float32)
      for name, value in flat_params(model).items()})


IMAGES = jnp.asarray(np.random.RandomState(1).randn(4, 16, 16, 3), jnp.float32)
forward = nnx.jit(lambda model, x: model(x, deterministic=True)[0])


@pytest.fixture(scope="module")
def dense_logits(dense):
  return np.asarray(forward(dense, IMAGES))


def upcycling_target(**moe):
  """An abstract ViMoE whose only concrete parameters are its routers, standing in for a freshly initialised one
  (test_vit.py runs the real initialisation); upcycling must fill in everything else."""
  model = nnx.eval_shape(lambda: build_vit(moe_config(**moe)))
  rng = np.random.RandomState(7)
  shapes = {name: value.shape for name, value in flat_params(model).items()}
  routers = {name: 0.2 * rng.randn(*shape) for name, shape in shapes.items() if ".router." in name}
  return assign_params(model, routers, keep=[name for name in shapes if name not in routers])


@pytest.mark.parametrize("moe", [
    dict(k=1, route_per="item", dispatch="einsum"),      # ViMoE classification: top-1 per image
    dict(k=2, route_per="token", dispatch="gather"),
])
def test_upcycled_vimoe_equals_dense(dense, dense_logits, moe):
  model = upcycling_target(**moe)
  routers_before = {i: np.asarray(model.blocks[i].mlp.router.kernel[...]) for i in MOE_LAYERS}
  upcycle(dense, model)
  dense_params, params = flat_params(dense), flat_params(model)
  for i in MOE_LAYERS:
    experts = model.blocks[i].mlp.experts
    for mine, theirs in (("w_in", "fc1.kernel"), ("b_in", "fc1.bias"), ("w_out", "fc2.kernel"), ("b_out", "fc2.bias")):
      for e in range(4):
        np.testing.assert_array_equal(np.asarray(getattr(experts, mine)[e]),
                                      np.asarray(dense_params[f"blocks.{i}.mlp.{theirs}"]))
    # The router keeps its fresh initialisation (the dense model has none to copy).
    np.testing.assert_array_equal(np.asarray(model.blocks[i].mlp.router.kernel[...]), routers_before[i])
    assert np.abs(routers_before[i]).max() > 0
  for name, value in dense_params.items():     # everything outside the MoE MLPs is copied
    if not any(name.startswith(f"blocks.{i}.mlp.") for i in MOE_LAYERS):
      np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(value))
  np.testing.assert_allclose(np.asarray(forward(model, IMAGES)), dense_logits, atol=1e-5, rtol=1e-5)


def test_shared_expert_copies_and_noise(dense, dense_logits, tmp_path):
  model = upcycling_target(k=1, num_shared_experts=1)
  # Through the trainer's path: dense parameters saved in our checkpoint format, then load_pretrained upcycles.
  checkpoints.save_params(str(tmp_path / "dense"), flat_params(dense), {})
  checkpoints.load_pretrained(model, str(tmp_path / "dense"))
  # A shared expert adds one more copy of the MLP: the same as a dense model whose MoE-block MLPs output twice
  # as much (fc2 doubled).
  dense_params = flat_params(dense)
  doubled = dict(dense_params)
  for i in MOE_LAYERS:
    for name in ("fc2.kernel", "fc2.bias"):
      doubled[f"blocks.{i}.mlp.{name}"] = 2 * np.asarray(dense_params[f"blocks.{i}.mlp.{name}"])
  twice = assign_params(nnx.eval_shape(lambda: build_vit(DENSE)), doubled)
  np.testing.assert_allclose(np.asarray(forward(model, IMAGES)), np.asarray(forward(twice, IMAGES)), atol=1e-5)
  assert not np.allclose(np.asarray(forward(twice, IMAGES)), dense_logits, atol=1e-2)

  upcycle(dense, model, noise_std=0.01, rng=jax.random.key(0))
  for i in MOE_LAYERS:
    fc1 = np.asarray(dense_params[f"blocks.{i}.mlp.fc1.kernel"])
    shared, experts = model.blocks[i].mlp.shared, model.blocks[i].mlp.experts
    np.testing.assert_array_equal(np.asarray(shared.w_in[0]), fc1)    # the shared expert stays an exact copy
    np.testing.assert_array_equal(np.asarray(shared.b_out[0]), np.asarray(dense_params[f"blocks.{i}.mlp.fc2.bias"]))
    noise = np.asarray(experts.w_in[...]) - fc1                        # [E, D, H]
    assert 0.009 < noise.std() < 0.011 and abs(noise.mean()) < 1e-3   # N(0, 0.01^2) on the routed experts
    assert not np.allclose(noise[0], noise[1])                          # different noise per expert


def test_mismatched_models_are_refused(dense):
  other = nnx.eval_shape(lambda: build_vit(dict(moe_config(), dim=16)))
  with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.kernel has shape \(32, 96\), the model expects "
                                       r"\(16, 48\)"):
    upcycle(dense, other)
  with pytest.raises(ValueError, match="nothing to upcycle"):
    upcycle(dense, dense)
  with pytest.raises(ValueError, match="mlp_activation differs"):
    upcycle(dense, nnx.eval_shape(lambda: build_vit(dict(moe_config(), mlp_activation="gelu"))))


@pytest.mark.parametrize("num_shared_experts", [0, 1])
def test_what_upcycling_preserves_with_unnormalised_top1_gates(dense, num_shared_experts):
  """The shipped ViMoE settings (k=1, normalize_gates=False): the upcycled MLP branch is (g + S) times the dense
  MLP, g the top-1 router probability of the image (softmax over E of its class token's router logits) and S the
  number of shared experts; docs/moe.md ("Upcycling") states it. Only normalize_gates=True with S=0 is exact."""
  model = upcycling_target(k=1, route_per="item", normalize_gates=False, num_shared_experts=num_shared_experts)
  upcycle(dense, model)
  hidden = np.random.RandomState(3).randn(4, 5, 32).astype(np.float32)            # [B, T, D]
  for i in MOE_LAYERS:
    layer = model.blocks[i].mlp
    y, _ = layer(jnp.asarray(hidden), router_input=jnp.asarray(hidden[:, 0]), deterministic=True)
    dense_mlp = np.asarray(dense.blocks[i].mlp(jnp.asarray(hidden)))             # [B, T, D]
    logits = hidden[:, 0].astype(np.float64) @ np.asarray(layer.router.kernel[...], np.float64)   # [B, E]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    top1 = (probs / probs.sum(-1, keepdims=True)).max(-1)                         # g per image
    np.testing.assert_allclose(np.asarray(y), (top1 + num_shared_experts)[:, None, None] * dense_mlp,
                               atol=1e-4, rtol=1e-4)
    assert (top1 < 0.9).all()                                   # far from 1: the dense function is not preserved
