"""Pruning a ViMoE (vimoe/analysis/prune.py, scripts/prune_moe.py): the merge against the documented formula in
NumPy, exactness of a merged block whose routing is constant, dropping experts nobody routes to, routing statistics
against a NumPy recount, and the written checkpoint loading through config.init.checkpoint."""

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vimoe import moe
from vimoe.analysis import prune
from vimoe.checkpoints import save_params
from vimoe.models import vit as vit_lib


def random_block(rng, E=3, S=1, D=4, H=5, swiglu=False):
  params = {}
  for group, count in (("experts", E), ("shared", S)):
    if not count:
      continue
    params[f"{group}.w_in"] = rng.normal(size=(count, D, H))
    params[f"{group}.b_in"] = rng.normal(size=(count, H))
    params[f"{group}.w_out"] = rng.normal(size=(count, H, D))
    params[f"{group}.b_out"] = rng.normal(size=(count, D))
    if swiglu:
      params[f"{group}.w_gate"] = rng.normal(size=(count, D, H))
  params["router.kernel"] = rng.normal(size=(D, E))
  return params


def numpy_mlp(x, w_in, b_in, w_out, b_out):
  """A ReLU MLP in NumPy (the merge's exactness does not depend on the activation)."""
  return np.maximum(x @ w_in + b_in, 0) @ w_out + b_out


@pytest.mark.parametrize("shared,swiglu", [(1, False), (0, False), (2, True)])
def test_average_merge_is_the_documented_formula(shared, swiglu):
  rng = np.random.default_rng(0)
  block = random_block(rng, E=3, S=shared, swiglu=swiglu)
  mass = np.array([0.5, 0.0, 0.2])
  merged = prune.merge_to_dense(block, mass)
  # By hand: components = shared experts (weight 1 each) and routed experts (weight m_e); c = S + sum m.
  weights, thetas = [], []
  for s in range(shared):
    weights.append(1.0)
    thetas.append({k[len("shared."):]: v[s] for k, v in block.items() if k.startswith("shared.")})
  for e in range(3):
    weights.append(mass[e])
    thetas.append({k[len("experts."):]: v[e] for k, v in block.items() if k.startswith("experts.")})
  c = shared + 0.7
  expected = {"fc1.kernel": 0, "fc1.bias": 0, "fc2.kernel": 0, "fc2.bias": 0}
  for beta, theta in zip(weights, thetas):
    expected["fc1.kernel"] = expected["fc1.kernel"] + beta * theta["w_in"] / c
    expected["fc1.bias"] = expected["fc1.bias"] + beta * theta["b_in"] / c
    expected["fc2.kernel"] = expected["fc2.kernel"] + beta * theta["w_out"]
    expected["fc2.bias"] = expected["fc2.bias"] + beta * theta["b_out"]
    if swiglu:
      expected["fc_gate.kernel"] = expected.get("fc_gate.kernel", 0) + beta * theta["w_gate"] / c
  if swiglu:
    expected["fc_gate.bias"] = np.zeros(5)
  assert sorted(merged) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(merged[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


def test_merges_are_exact_when_the_input_sides_agree():
  """Upcycled experts share w_in / b_in: then the average merge computes sum_s S_s(h) + sum_e m_e E_e(h) exactly;
  the concat merge computes sum_s S_s(h) + G * Ebar(h) for any experts."""
  rng = np.random.default_rng(1)
  block = random_block(rng, E=3, S=1)
  for name in ("w_in", "b_in"):
    block[f"experts.{name}"] = np.broadcast_to(block[f"shared.{name}"], block[f"experts.{name}"].shape).copy()
  mass = np.array([0.3, 0.1, 0.4])
  x = rng.normal(size=(6, 4))
  relu = lambda p: numpy_mlp(x, p["fc1.kernel"], p["fc1.bias"], p["fc2.kernel"], p["fc2.bias"])
  expert = lambda group, i: numpy_mlp(x, *(block[f"{group}.{n}"][i] for n in ("w_in", "b_in", "w_out", "b_out")))
  target = expert("shared", 0) + sum(mass[e] * expert("experts", e) for e in range(3))
  np.testing.assert_allclose(relu(prune.merge_to_dense(block, mass)), target, rtol=1e-5, atol=1e-5)
  # concat with any experts: shared hidden units next to the mass-averaged expert's, its output scaled by G.
  block = random_block(rng, E=3, S=1)
  wide = prune.merge_to_dense(block, mass, mode="concat")
  assert wide["fc1.kernel"].shape == (4, 10) and wide["fc2.kernel"].shape == (10, 4)
  average = {n: sum(mass[e] / 0.8 * block[f"experts.{n}"][e] for e in range(3))
             for n in ("w_in", "b_in", "w_out", "b_out")}
  target = expert("shared", 0) + 0.8 * numpy_mlp(x, *(average[n] for n in ("w_in", "b_in", "w_out", "b_out")))
  np.testing.assert_allclose(relu(wide), target, rtol=1e-5, atol=1e-5)


logits_of = nnx.jit(lambda model, images: model(images)[0])  # one compilation instead of an eager op-by-op pass
moe_output = nnx.jit(lambda layer, x: layer(x)[0])


def tiny_model_config(shared=1, layers="last:2", num_experts=4, normalize=False):
  return ml_collections.ConfigDict(dict(
      variant=None, image_size=8, patch_size=4, dim=16, depth=2, num_heads=2, mlp_dim=32, num_classes=5,
      mlp_activation="gelu", head_zero_init=False,
      moe=dict(layers=layers, num_experts=num_experts, k=1, router="top_k", dispatch="gather", capacity_factor=None,
               route_per="item", num_shared_experts=shared, normalize_gates=normalize)))


def softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def test_constant_routing_block_becomes_an_exact_dense_block(shared=1):
  """Block 0 routes every image to expert 0 with gate g = 1/E (a zero router: equal logits, ties to the first);
  its merged dense MLP (the shared expert sharing the experts' input side, as upcycled) gives the same logits.
  (Without a shared expert the merge is g * E_0 exactly: test_average_merge_is_the_documented_formula[0-False].)"""
  model = vit_lib.build_vit(tiny_model_config(shared), rngs=nnx.Rngs(3))
  flat = vit_lib.flat_params(model)
  flat["blocks.0.mlp.router.kernel"] = jnp.zeros_like(flat["blocks.0.mlp.router.kernel"])
  if shared:
    for name in ("w_in", "b_in"):
      flat[f"blocks.0.mlp.shared.{name}"] = flat[f"blocks.0.mlp.experts.{name}"][:1]
  vit_lib.assign_params(model, flat)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(12, 8, 8, 3)), jnp.float32)
  stats = prune.routing_statistics(model, [{"image": images, "label": np.arange(12) % 5}])
  np.testing.assert_allclose(stats["block0"]["traffic"], [1, 0, 0, 0])
  np.testing.assert_allclose(stats["block0"]["mean_gate"], [0.25, 0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(stats["block0"]["mass"], [0.25, 0, 0, 0], rtol=1e-6)
  pruned_flat = prune.prune_params(flat, stats, dense={"block0": None}, keep_experts={"block1": [0, 1, 2, 3]})
  pruned = vit_lib.build_vit(tiny_model_config(shared, layers="last:1"), rngs=nnx.Rngs(4))
  vit_lib.assign_params(pruned, pruned_flat)
  assert not pruned.blocks[0].is_moe and pruned.blocks[1].is_moe
  np.testing.assert_allclose(logits_of(pruned, images), logits_of(model, images), rtol=1e-5, atol=1e-5)


def test_routing_statistics_against_a_numpy_recount():
  model = vit_lib.build_vit(tiny_model_config(1), rngs=nnx.Rngs(5))
  images = jnp.asarray(np.random.default_rng(1).normal(size=(20, 8, 8, 3)), jnp.float32)
  labels = np.arange(20) % 5
  labels[-3:] = -1  # padding rows count nowhere
  stats = prune.routing_statistics(model, [{"image": images, "label": labels}])
  features = prune.block_router_features(model, images)
  routing = nnx.jit(lambda m, x: m.encode(x, return_routing=True)[1]["routing"])(model, images)
  for index in (0, 1):
    name = f"block{index}"
    probs = softmax(np.asarray(features[name], np.float64) @ np.asarray(model.blocks[index].mlp.router.kernel[...]))
    choice = probs.argmax(-1)
    np.testing.assert_array_equal(choice, np.asarray(routing[name]))  # the features are the model's own
    choice, gate = choice[:17], probs[:17].max(-1)
    counts = np.array([np.sum(choice == e) for e in range(4)])
    np.testing.assert_allclose(stats[name]["traffic"], counts / 17)
    np.testing.assert_allclose(stats[name]["mass"], [gate[choice == e].sum() / 17 for e in range(4)], rtol=1e-5)
    assert stats[name]["units"] == 17


@pytest.mark.parametrize("normalize", [True, False])
def test_dropping_an_unused_expert(normalize):
  """Expert 3's router column is the mean of columns 0 and 1, so it never wins the arg-max. Dropping it (its
  router column too) leaves every output unchanged with renormalised top-1 gates; with raw softmax gates the
  routed part grows by 1 / (1 - p_3), the softmax mass the removed column had (docs/design.md)."""
  rng = np.random.default_rng(2)
  config = moe.MoeConfig(num_experts=4, k=1, router="top_k", dispatch="gather", capacity_factor=None,
                         route_per="token", normalize_gates=normalize, activation="gelu")
  layer = moe.MoeLayer(8, 16, config, rngs=nnx.Rngs(0))
  flat = vit_lib.flat_params(layer)
  kernel = np.asarray(flat["router.kernel"]) * 50
  kernel[:, 3] = (kernel[:, 0] + kernel[:, 1]) / 2
  flat["router.kernel"] = kernel
  vit_lib.assign_params(layer, flat)
  x = jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32)
  stats_choice = softmax(np.asarray(x, np.float64) @ kernel).argmax(-1)
  assert not np.any(stats_choice == 3)
  count, keep = prune.experts_to_keep({"block0": {"traffic": np.bincount(stats_choice.ravel(), minlength=4) / 20}},
                                      ["block0"], min_traffic=1e-9)
  assert count == 3 and keep["block0"] == [0, 1, 2]
  smaller = moe.MoeLayer(8, 16, dataclasses.replace(config, num_experts=3), rngs=nnx.Rngs(1))
  vit_lib.assign_params(smaller, prune.drop_experts(flat, keep["block0"]))
  before, after = np.asarray(moe_output(layer, x)), np.asarray(moe_output(smaller, x))
  if normalize:
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
  else:
    p3 = softmax(np.asarray(x, np.float64) @ kernel)[..., 3:4]
    np.testing.assert_allclose(after, before / (1 - p3), rtol=1e-4, atol=1e-5)
    assert np.max(p3) > 1e-3  # the case is not trivially the same


def test_written_checkpoint_loads_through_init_checkpoint(tmp_path):
  """What the trainer does with config.init.checkpoint (task.load_pretrained) on the pruned model's config, and on
  the full ViMoE (its MoE blocks are copied, not upcycled again)."""
  from vimoe.train.tasks import Classification
  full = vit_lib.build_vit(tiny_model_config(1), rngs=nnx.Rngs(6))
  flat = vit_lib.flat_params(full)
  images = jnp.asarray(np.random.default_rng(3).normal(size=(10, 8, 8, 3)), jnp.float32)
  stats = prune.routing_statistics(full, [{"image": images, "label": np.arange(10) % 5}])
  count, keep = prune.experts_to_keep(stats, ["block1"], min_traffic=0.0)
  pruned_flat = prune.prune_params(flat, stats, dense={"block0": None}, keep_experts=keep)
  for name, params, model_config in (("pruned", pruned_flat, tiny_model_config(1, "last:1", count)),
                                     ("full", flat, tiny_model_config(1))):
    save_params(str(tmp_path / name), params, model_config.to_dict())
    config = ml_collections.ConfigDict(dict(seed=0, model=model_config,
                                            init=dict(checkpoint=str(tmp_path / name), noise_std=0.0)))
    model = vit_lib.build_vit(model_config, rngs=nnx.Rngs(7))
    Classification().load_pretrained(model, config)
    loaded = vit_lib.flat_params(model)
    assert sorted(loaded) == sorted(params)
    for key, value in params.items():
      np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value, np.float32), err_msg=key)
  np.testing.assert_allclose(logits_of(model, images), logits_of(full, images), rtol=1e-6, atol=1e-6)
