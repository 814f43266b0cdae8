"""Sparse upcycling. mode="copy": experts start as exact copies of the dense MLP, routers stay fresh, and with
renormalised top-k gates (no shared expert, nothing dropped) the ViMoE computes exactly what the dense ViT did.
mode="preserve": every arm (the placement study's, k=2, S=2, gates normalised or not, per token or item, ...)
computes the dense model's logits at step 0 (vimoe/checkpoints/upcycle.py's scaling rule)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vimoe import checkpoints
from vimoe.checkpoints.upcycle import upcycle
from vimoe.models import build_vit
from vimoe.models.vit import assign_params, flat_params, moe_blocks
from vimoe.train.tasks import Classification

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


# -- mode="preserve": every arm computes the dense function at step 0 --------------------------------------------

def random_dense(model_config, seed=0, std=0.2):
  """A dense ViT with random values everywhere, as the `dense` fixture, for another model config."""
  model = nnx.eval_shape(lambda: build_vit(model_config))
  rng = np.random.RandomState(seed)
  return assign_params(model, {
      name: (float(name.endswith(("scale", "gamma"))) + std * rng.randn(*value.shape)).astype(np.float32)
      for name, value in flat_params(model).items()})


def with_random_routers(model_config):
  """An abstract ViMoE whose only concrete parameters are random routers (as `upcycling_target`)."""
  model = nnx.eval_shape(lambda: build_vit(model_config))
  rng = np.random.RandomState(7)
  shapes = {name: value.shape for name, value in flat_params(model).items()}
  routers = {name: 0.2 * rng.randn(*shape) for name, shape in shapes.items() if ".router." in name}
  return assign_params(model, routers, keep=[name for name in shapes if name not in routers])


def study_model_config(layers, shared):
  from configs.study_placement import get_config
  config = get_config()
  config.model.moe.update(layers=layers, num_shared_experts=shared)
  return config


@pytest.fixture(scope="module")
def study_dense(tmp_path_factory):
  """The study's stage-2 model, dense, random (std 0.1: 6 blocks of width 96 stay at logits of order 10), saved
  as a parameter checkpoint for init.checkpoint; and its logits."""
  config = study_model_config("none", 0)
  model = random_dense(config.model, std=0.1)
  path = str(tmp_path_factory.mktemp("study") / "dense")
  checkpoints.save_params(path, flat_params(model), {})
  return path, np.asarray(forward(model, IMAGES))


@pytest.mark.parametrize("L", [1, 2, 3, 6])
@pytest.mark.parametrize("shared", [0, 1])
def test_study_arms_start_at_the_dense_function(study_dense, L, shared):
  """Every arm of configs/study_placement.py (top-1 of 8 per image, gates not renormalised, dropless), upcycled
  through the trainer's load_pretrained with the config's own init.upcycle_mode ("preserve"), gives the dense
  backbone's logits at step 0. The same arms in "copy" mode do not (the confound of docs/results.md)."""
  path, dense_logits = study_dense
  config = study_model_config(f"last:{L}", shared)
  assert config.init.upcycle_mode == "preserve"
  config.init.checkpoint = path
  model = with_random_routers(config.model)
  Classification().load_pretrained(model, config)
  np.testing.assert_allclose(np.asarray(forward(model, IMAGES)), dense_logits, atol=1e-5, rtol=1e-5)
  for i in moe_blocks(model):
    np.testing.assert_array_equal(np.asarray(model.blocks[i].mlp.router.kernel[...]), 0.0)  # uniform router
  config.init.upcycle_mode = "copy"
  copied = with_random_routers(config.model)
  Classification().load_pretrained(copied, config)
  assert np.abs(np.asarray(forward(copied, IMAGES)) - dense_logits).max() > 1e-2


@pytest.mark.parametrize("moe", [
    dict(k=2, route_per="token", normalize_gates=False),
    dict(k=2, route_per="token", normalize_gates=True),
    dict(k=2, route_per="token", normalize_gates=False, num_shared_experts=2),
    dict(k=2, route_per="token", normalize_gates=True, num_shared_experts=2),
    dict(k=1, route_per="item", normalize_gates=True, num_shared_experts=1),
    dict(k=2, route_per="item", normalize_gates=False, num_shared_experts=1, dispatch="einsum"),
    dict(k=2, route_per="token", normalize_gates=False, num_shared_experts=1, score="sigmoid", routed_scale=2.5),
    dict(k=2, route_per="token", normalize_gates=True, num_shared_experts=1, score="sigmoid", routed_scale=2.5,
         num_groups=2, groups_per_token=1, bias_update_rate=0.001),
    dict(k=2, route_per="token", num_shared_experts=1, router="noisy_top_k"),
    dict(k=1, route_per="token", normalize_gates=False, router="prototype"),
])
def test_preserve_mode_keeps_the_dense_function(dense, dense_logits, moe):
  """k = 1, 2; S = 0, 1, 2 shared experts; gates normalised or not; per token or per item; softmax or sigmoid
  scores with routed_scale; group-limited with a routing bias; noisy top-k; prototype routing: the logits at step
  0 are the dense model's."""
  moe = dict(dict(dispatch="gather"), **moe)
  if "bias_update_rate" in moe or moe.get("router") == "noisy_top_k":
    model = build_vit(moe_config(**moe))   # a routing bias or noise state is no Param: build it for real
  else:
    model = upcycling_target(**moe)
  upcycle(dense, model, mode="preserve")
  np.testing.assert_allclose(np.asarray(forward(model, IMAGES)), dense_logits, atol=1e-5, rtol=1e-5)


def test_preserve_scaling_rule(dense):
  """The rule by hand: 4 experts, S shared, b = 1/(1+S), a = 1/((1+S) G); the router is zeroed only when the
  gates are not normalised (G = k/E for softmax: a = E / ((1+S) k))."""
  dense_params = flat_params(dense)
  cases = [(dict(k=1, normalize_gates=False, num_shared_experts=1), 4 / 2, 1 / 2, True),
           (dict(k=2, normalize_gates=False, num_shared_experts=0), 4 / 2, None, True),
           (dict(k=2, normalize_gates=True, num_shared_experts=2), 1 / 3, 1 / 3, False),
           (dict(k=2, normalize_gates=False, num_shared_experts=1, score="sigmoid"), 1 / 2, 1 / 2, True)]
  for moe, a, b, zero_router in cases:
    model = upcycling_target(**moe)
    router_before = np.asarray(model.blocks[1].mlp.router.kernel[...])
    upcycle(dense, model, mode="preserve")
    layer = model.blocks[1].mlp
    fc2 = np.asarray(dense_params["blocks.1.mlp.fc2.kernel"])
    np.testing.assert_allclose(np.asarray(layer.experts.w_out[...]), np.broadcast_to(a * fc2, (4,) + fc2.shape),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.experts.b_out[2]), a * np.asarray(
        dense_params["blocks.1.mlp.fc2.bias"]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(layer.experts.w_in[3]), np.asarray(
        dense_params["blocks.1.mlp.fc1.kernel"]))                       # the input side is an exact copy
    if b is not None:
      np.testing.assert_allclose(np.asarray(layer.shared.w_out[0]), b * fc2, rtol=1e-6)
    router = np.asarray(layer.router.kernel[...])
    if zero_router:
      np.testing.assert_array_equal(router, 0.0)
    else:
      np.testing.assert_array_equal(router, router_before)


def test_preserve_with_expert_noise_differs_by_the_noise_only(dense, dense_logits):
  model = upcycling_target(k=1, route_per="item", normalize_gates=False, num_shared_experts=1)
  upcycle(dense, model, mode="preserve", noise_std=1e-3, rng=jax.random.key(0))
  difference = np.abs(np.asarray(forward(model, IMAGES)) - dense_logits).max()
  assert 1e-5 < difference < 0.1 * np.abs(dense_logits).max()


def test_copy_mode_is_todays_recipe(dense):
  """mode="copy" (the default and the paper configs'): exact copies, fresh routers, nothing scaled."""
  explicit, default = upcycling_target(k=1, num_shared_experts=1), upcycling_target(k=1, num_shared_experts=1)
  upcycle(dense, explicit, mode="copy")
  upcycle(dense, default)
  for name, value in flat_params(default).items():
    np.testing.assert_array_equal(np.asarray(flat_params(explicit)[name]), np.asarray(value))
  fc2 = np.asarray(flat_params(dense)["blocks.2.mlp.fc2.kernel"])
  np.testing.assert_array_equal(np.asarray(explicit.blocks[2].mlp.experts.w_out[1]), fc2)
  np.testing.assert_array_equal(np.asarray(explicit.blocks[2].mlp.shared.w_out[0]), fc2)
  from configs.vimoe_s14_in1k import get_config
  assert get_config().init.get("upcycle_mode", "copy") == "copy"


def test_bad_modes_and_unpreservable_routers_are_refused(dense, tmp_path):
  with pytest.raises(ValueError, match=r"init.upcycle_mode='presrve' is not a mode; valid: 'preserve' .* 'copy'"):
    upcycle(dense, upcycling_target(k=1), mode="presrve")
  config = study_model_config("none", 0)
  config.init.update(checkpoint=str(tmp_path), upcycle_mode="Preserve")
  with pytest.raises(ValueError, match=r"init.upcycle_mode='Preserve'"):   # refused for a dense arm too
    Classification().load_pretrained(None, config)
  with pytest.raises(ValueError, match=r"capacity_factor=1.25 drops"):
    upcycle(dense, upcycling_target(k=1, normalize_gates=False, capacity_factor=1.25), mode="preserve")
  with pytest.raises(ValueError, match=r"router='experts_choose'"):
    upcycle(dense, upcycling_target(k=1, router="experts_choose", capacity_factor=1.0, route_per="token"),
            mode="preserve")


def test_a_zero_router_still_learns():
  """Identical experts f (ReLU, so f is computed here in NumPy), routed output layer x a = E/k, zero router,
  k=2 of E=8, loss L = sum(y * T). By the module docstring dL/dW = sum_x x a <T(x), f(x)> u^T with
  u_j = (1[j in {0, 1}] - k/E) / E (ties go to experts 0 and 1): non-zero and rank one. With normalised gates
  the task gradient to a (random) router is zero: G = 1 whatever the router."""
  from vimoe import moe as moe_lib
  E, k, D, H = 8, 2, 6, 10
  rng = np.random.RandomState(0)
  w_in, b_in = rng.randn(D, H).astype(np.float32), rng.randn(H).astype(np.float32)
  w_out, b_out = rng.randn(H, D).astype(np.float32), rng.randn(D).astype(np.float32)
  x = rng.randn(2, 5, D).astype(np.float32)
  target = rng.randn(2, 5, D).astype(np.float32)
  f = np.maximum(x @ w_in + b_in, 0) @ w_out + b_out                               # [B, T, D]

  def router_gradient(normalize, a, router):
    layer = moe_lib.MoeLayer(D, H, num_experts=E, k=k, capacity_factor=None, dispatch="gather",
                             route_per="token", normalize_gates=normalize, activation="relu", rngs=nnx.Rngs(0))
    for name, value in (("w_in", w_in), ("b_in", b_in), ("w_out", a * w_out), ("b_out", a * b_out)):
      getattr(layer.experts, name)[...] = jnp.broadcast_to(jnp.asarray(value), (E,) + value.shape)
    layer.router.kernel[...] = jnp.asarray(router)
    y, _ = layer(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), f, rtol=1e-4, atol=1e-4)           # step 0: the dense MLP
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x))[0] * target))(layer)
    return np.asarray(grads["router"]["kernel"][...])

  gradient = router_gradient(False, E / k, np.zeros((D, E), np.float32))
  u = (np.isin(np.arange(E), [0, 1]) - k / E) / E                                  # [E]
  c = (E / k) * np.sum(target * f, -1)                                             # [B, T]: a <T, f>
  expected = np.einsum("btd,bt->d", x, c)[:, None] * u[None, :]                    # [D, E]
  np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-4)
  assert np.abs(gradient).max() > 1e-2 and np.linalg.matrix_rank(gradient, tol=1e-4) == 1
  normalised = router_gradient(True, 1.0, 0.5 * rng.randn(D, E).astype(np.float32))
  np.testing.assert_allclose(normalised, 0.0, atol=1e-4)
