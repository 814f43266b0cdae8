"""MoeConfig (one place for the MoE hyper-parameters), the router registry, token-choice metrics as a pure function,
and what a model states about itself (backbone, layer ids)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vimoe import moe
from vimoe.models import build_lm, build_lstm_lm, build_vit, params
from vimoe.models.segmentation import build_segmenter
from vimoe.moe.losses import token_choice_metrics
from vimoe.train import optim

D, H, E = 8, 16, 4


# -- MoeConfig ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,prefix,message", [
    (dict(router="top2"), "", "router='top2' is not valid; choose one of: 'top_k', 'noisy_top_k'"),
    (dict(num_experts=0), "model.moe.", "model.moe.num_experts=0 must be a positive integer"),
    (dict(num_experts=4, k=5), "model.moe.", "model.moe.k=5 must be an integer in [1, model.moe.num_experts=4]"),
    (dict(k=5, router="soft"), "", None),                     # Soft MoE ignores k
    (dict(dispatch="scatter"), "m.", "m.dispatch='scatter' is not valid; choose one of: 'einsum', 'gather'"),
    (dict(router="hash", k=2), "", "k=2 with router='hash'"),
    (dict(router="soft", dispatch="gather"), "", "dispatch='gather' with router='soft'"),
    (dict(router="top_k", batch_priority=True, causal=True), "", "batch_priority=True with causal=True"),
    (dict(router="soft", batch_priority=True), "", "batch_priority=True with router='soft': only token-choice "
                                                   "routers (top_k, noisy_top_k, prototype, hash)"),
    (dict(router="experts_choose", causal=True), "x.", "x.router='experts_choose' with causal=True"),
    (dict(k=2, causal=True), "", "capacity_factor=1.25 with k=2 and causal=True"),
    (dict(z_loss_weight=-0.5), "", "z_loss_weight=-0.5 must be >= 0"),
    (dict(load_weight=0.1, router="prototype"), "", "load_weight=0.1 with router='prototype'"),
    (dict(activation="tanh"), "", "activation='tanh' is not known"),
])
def test_validation_names_the_key_its_value_and_what_is_valid(fields, prefix, message):
  config = moe.MoeConfig(**fields)
  if message is None:
    assert config.validate(prefix) is config
    return
  with pytest.raises(ValueError) as error:
    config.validate(prefix)
  assert str(error.value).startswith(message), str(error.value)


def test_from_dict_none_means_the_default_except_where_none_is_a_setting():
  defaults = moe.MoeConfig(num_experts=16, capacity_factor=2.0, group_size=32, route_per="item")
  given = ml_collections.ConfigDict(dict(num_experts=None, k=2, capacity_factor=None, group_size=None,
                                         route_per=None))
  config = moe.MoeConfig.from_dict(given.to_dict(), defaults=defaults, causal=False)
  assert (config.num_experts, config.k, config.route_per) == (16, 2, "item")   # None -> the default
  assert config.capacity_factor is None and config.group_size is None          # None is a setting here
  with pytest.raises(ValueError, match=r"^model\.moe\.k=9 must be an integer"):
    moe.MoeConfig.from_dict({"k": 9}, prefix="model.moe.")
  assert moe.MoeConfig.from_dict({"k": 9}, validate=False).k == 9              # unused settings: not checked


def test_layer_from_config_equals_layer_from_keywords():
  config = moe.MoeConfig(num_experts=E, k=2, capacity_factor=1.0, num_shared_experts=1, balance_weight=0.01)
  by_config = moe.MoeLayer(D, H, config, rngs=nnx.Rngs(3))
  by_keywords = moe.MoeLayer(D, H, E, 2, capacity_factor=1.0, num_shared_experts=1, balance_weight=0.01,
                             rngs=nnx.Rngs(3))
  assert by_keywords.config == config
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, D)), jnp.float32)
  (y1, aux1), (y2, aux2) = by_config(x), by_keywords(x)
  np.testing.assert_array_equal(y1, y2)
  assert set(aux1.losses) == {"balance"}
  with pytest.raises(TypeError, match="not both"):
    moe.MoeLayer(D, H, config, k=2, rngs=nnx.Rngs(0))


# -- the router registry -----------------------------------------------------------------------------------------

class LastExpertRouter(moe.TokenChoiceRouter):
  """A toy router with no parameters: every token goes to the last expert with gate 0.5."""
  name = "last_expert"

  def gate(self, features, k, *, ids=None, deterministic=True, valid=None):
    expert_index = jnp.full(features.shape[:-1] + (1,), self.num_experts - 1, jnp.int32)
    gates = jnp.full(expert_index.shape, 0.5, jnp.float32)
    return moe.Gating(expert_index, gates, None, None, gates[..., 0], {})


@pytest.fixture
def toy_router():
  moe.register_router(LastExpertRouter)
  yield LastExpertRouter.name
  del moe.ROUTERS[LastExpertRouter.name]


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_a_registered_router_is_used_with_no_other_change(toy_router, dispatch):
  layer = moe.MoeLayer(D, H, E, 1, router=toy_router, dispatch=dispatch, capacity_factor=None, rngs=nnx.Rngs(0))
  assert not nnx.state(layer.router, nnx.Param)                  # the toy router owns no parameters
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, D)), jnp.float32)
  y, aux = layer(x)
  p = {name: np.asarray(getattr(layer.experts, name)[...], np.float64)[E - 1]
       for name in ("w_in", "b_in", "w_out", "b_out")}
  hidden = np.asarray(jax.nn.gelu(jnp.asarray(np.asarray(x, np.float64) @ p["w_in"] + p["b_in"])), np.float64)
  np.testing.assert_allclose(y, 0.5 * (hidden @ p["w_out"] + p["b_out"]), atol=1e-5)
  np.testing.assert_allclose(aux.metrics["expert_load"], [0, 0, 0, 1])
  np.testing.assert_array_equal(layer.first_choice(x), np.full((2, 5), E - 1))
  moe.MoeConfig(router=toy_router, causal=True).validate()       # token choice sees no other token: causal
  with pytest.raises(ValueError, match="only token-choice routers \\(top_k, noisy_top_k, prototype, hash, "
                                       "last_expert\\)"):
    moe.MoeConfig(router="soft", batch_priority=True).validate()


def test_unregistered_router_is_refused_with_the_registered_names():
  with pytest.raises(ValueError, match=r"router='last_expert' is not valid; choose one of: 'top_k'"):
    moe.MoeLayer(D, H, E, 1, router="last_expert", rngs=nnx.Rngs(0))


# -- token-choice metrics ----------------------------------------------------------------------------------------

def test_token_choice_metrics_by_hand():
  # 4 tokens, 2 experts, k=1: first choices 0, 0, 1, 0 with gates .6 .7 .8 .9; the last token was dropped.
  expert_index = jnp.asarray([[0], [0], [1], [0]], jnp.int32)
  gates = jnp.asarray([[.6], [.7], [.8], [.9]], jnp.float32)
  kept = jnp.asarray([[True], [True], [True], [False]])
  probs = jnp.asarray([[.6, .4], [.7, .3], [.2, .8], [.9, .1]], jnp.float32)
  m = token_choice_metrics(probs, None, expert_index, gates, kept, 2)
  # dropped 1 of 4; importance [2.2, .8]: CV = .7 / 1.5; loads [3, 1]: shares .75/.25, CV .5, max/mean 1.5;
  # balance 2 * (f . P) with f = [.75, .25], P = [.6, .4] -> 1.1. No logits, so no z-loss entry.
  np.testing.assert_allclose(m["dropped_fraction"], 0.25, rtol=1e-6)
  np.testing.assert_allclose(m["importance_cv"], 0.7 / 1.5, rtol=1e-5)
  np.testing.assert_allclose(m["importance_loss"], (0.7 / 1.5) ** 2, rtol=1e-5)
  np.testing.assert_allclose(m["expert_load"], [0.75, 0.25], rtol=1e-6)
  np.testing.assert_allclose([m["load_cv"], m["max_mean_load"]], [0.5, 1.5], rtol=1e-6)
  np.testing.assert_allclose(m["balance_loss"], 1.1, rtol=1e-6)
  assert "router_z_loss" not in m
  # The last token is padding: it counts nowhere. Kept 3 of 3; loads [2, 1]; f = [2/3, 1/3], P = [.5, .5] -> 1.0.
  m = token_choice_metrics(probs, None, expert_index, gates, kept, 2, valid=jnp.asarray([1, 1, 1, 0], bool))
  np.testing.assert_allclose(m["dropped_fraction"], 0.0, atol=1e-7)
  np.testing.assert_allclose(m["expert_load"], [2 / 3, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(m["balance_loss"], 1.0, rtol=1e-6)


# -- what a model states about itself ------------------------------------------------------------------------------

VIT = dict(image_size=8, patch_size=4, dim=16, depth=2, num_heads=2, mlp_dim=32, num_classes=3, num_registers=1,
           moe=dict(layers="last:1", num_experts=2))
LM = dict(name="transformer", dim=16, depth=2, num_heads=2, mlp_dim=32, positions="learned", max_length=16,
          moe=dict(layers="last:1", num_experts=2))


@pytest.mark.parametrize("build", [
    lambda: build_vit(VIT),
    lambda: build_lm(LM),
    lambda: build_lstm_lm(dict(name="lstm_moe", dim=8, moe=dict(num_experts=4, k=2, hidden_dim=8))),
    lambda: build_segmenter(dict(VIT, num_classes=3, head=dict(kind="segmenter", dim=8, num_heads=2, mlp_dim=8))),
])
def test_model_layer_ids_match_the_optimizer_names_and_backbone(build):
  model = nnx.eval_shape(build)
  depth = model.depth
  for path in (params.path_name(p).replace(".", "/") for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))):
    assert model.layer_id(path) == optim.layer_id(path, depth), path
  backbone = model.backbone
  assert backbone is model or backbone is model.backbone
  assert hasattr(backbone, "blocks") and backbone.depth == depth


def test_create_optimizer_from_the_model_equals_the_depth_path():
  model = build_vit(VIT, rngs=nnx.Rngs(0))
  config = ml_collections.ConfigDict(dict(lr=0.1, min_lr_ratio=0.0, warmup_steps=0, total_steps=10,
                                          weight_decay=0.0, b1=0.9, b2=0.999, grad_clip_norm=0.0, layer_decay=0.5))
  state = nnx.state(model, nnx.Param)
  grads = jax.tree.map(jnp.ones_like, state)
  by_depth = optim.create_optimizer(config, model.depth)
  by_model = optim.create_optimizer(config, model=model)
  u1, _ = by_depth.update(grads, by_depth.init(state), state)
  u2, _ = by_model.update(grads, by_model.init(state), state)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)
  assert dataclasses.is_dataclass(model.config.moe) and model.config.moe.route_per == "item"
