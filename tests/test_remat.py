"""model.remat (rematerialisation) and model.dtype="bfloat16" (bf16 compute, float32 parameters) for every model
family: the ViT/ViMoE, the Transformer LM and UMoE, and the LSTM-MoE.

Independent computations: the un-rematerialised model (remat="none") for remat; the float32 model with the same
parameters for bfloat16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

from configs import lm_quickstart, lstm_moe_quickstart, quickstart, umoe_quickstart
from vimoe.models import build_lm, build_lstm_lm, build_vit
from vimoe.models.config_utils import REMAT_POLICIES
from vimoe.train import trainer

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
IMAGES = np.random.default_rng(1).normal(size=(4, 16, 16, 3)).astype(np.float32)


def _model_config(family: str):
  if family == "vit":
    config = quickstart.get_config().model
  elif family == "lstm":
    config = lstm_moe_quickstart.get_config().model
    config.dropout = 0.0
    return config, build_lstm_lm, TOKENS
  else:
    config = (lm_quickstart if family == "lm" else umoe_quickstart).get_config().model
  config.depth = 2
  return config, (build_vit if family == "vit" else build_lm), IMAGES if family == "vit" else TOKENS


FAMILIES = ("vit", "lm", "umoe", "lstm")


def _loss_and_grads(family: str, **overrides):
  config, build, inputs = _model_config(family)
  config.update(overrides)
  model = build(config, rngs=nnx.Rngs(0))

  @nnx.jit
  def loss_and_grads(model, inputs):
    def loss(model):
      outputs, aux = model(inputs, deterministic=False)   # training mode: routing biases, aux losses
      return jnp.mean(jnp.square(outputs)) + sum(aux["losses"].values())
    return nnx.value_and_grad(loss)(model)

  loss, grads = loss_and_grads(model, inputs)
  return float(loss), {jax.tree_util.keystr(path): np.asarray(leaf)
                       for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]}


@pytest.mark.parametrize("family", FAMILIES)
def test_remat_policies_give_the_gradients_of_no_remat(family):
  loss, grads = _loss_and_grads(family, remat="none")
  for remat in ("full", "dots"):
    remat_loss, remat_grads = _loss_and_grads(family, remat=remat)
    assert remat_loss == pytest.approx(loss, rel=1e-6, abs=1e-6), remat
    assert remat_grads.keys() == grads.keys()
    for key, grad in grads.items():
      np.testing.assert_allclose(remat_grads[key], grad, rtol=1e-6, atol=1e-6, err_msg=f"{remat} {key}")


def test_unknown_remat_is_refused_with_the_valid_names():
  for family in FAMILIES:
    config, build, _ = _model_config(family)
    config.remat = "some"
    with pytest.raises(ValueError, match=r"model\.remat='some' is not valid; .*'none', 'full', 'dots'"):
      build(config)


def _saved_residual_bytes(remat: str, moe_layers: str) -> int:
  """Bytes of the residuals the backward pass of the quickstart ViT's loss keeps from its forward pass (what jax
  saves between the two; the compiler may store less, never more: docs/benchmarks.md has the TPU compile)."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=import-outside-toplevel
  config = quickstart.get_config()
  config.batch_size = 16
  config.model.update(depth=4, image_size=32, patch_size=4, remat=remat)   # 65 tokens per image
  config.model.moe.layers = moe_layers
  config.data.image_size = 32
  task, model, _ = trainer.build(config)
  graphdef, state = nnx.split(model)
  batch = {"image": jnp.zeros((16, 32, 32, 3)), "label": jnp.zeros((16,), jnp.int32)}
  loss = lambda params: task.loss(nnx.merge(graphdef, params), batch, config)[0]
  params = nnx.state(model)
  return sum(math.prod(aval.shape) * aval.dtype.itemsize for aval, _ in saved_residuals(loss, params)
             if hasattr(aval, "shape"))


@pytest.mark.parametrize("moe_layers", ["none", "last:2"], ids=["dense", "moe"])
def test_remat_keeps_fewer_residuals_for_the_backward_pass(moe_layers):
  """"full" keeps only each block's input (and what is outside the blocks), "dots" also the matmul outputs: both
  fewer bytes than "none". Compiled for TPU at ViMoE-S/14's paper batch this is 10.8 -> 3.1 GiB of temporaries
  per chip (docs/benchmarks.md); XLA:CPU keeps no remat in an unrolled program, so the CPU compile would not show
  it."""
  none, dots, full = (_saved_residual_bytes(remat, moe_layers) for remat in ("none", "dots", "full"))
  print(f"saved residual bytes: none {none}, dots {dots}, full {full}")
  assert full < dots < none
  assert full < 0.5 * none


def _checkpointed_blocks(family: str, remat: str) -> int:
  """How many jax.checkpoint (remat) regions the gradient's jaxpr holds, with the policy remat names."""
  config, build, inputs = _model_config(family)
  config.remat = remat
  graphdef, state = nnx.split(build(config, rngs=nnx.Rngs(0)))
  loss = lambda state: jnp.mean(nnx.merge(graphdef, state)(inputs, deterministic=False)[0])
  jaxpr = jax.make_jaxpr(jax.grad(loss, allow_int=True))(state).jaxpr
  policy = REMAT_POLICIES[remat]
  return sum(eqn.primitive.name in ("checkpoint", "remat2") and eqn.params["policy"] is policy
             for eqn in jaxpr.eqns)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_is_one_checkpoint_region_with_the_named_policy(family):
  blocks = 3 if family == "lstm" else 2
  assert _checkpointed_blocks(family, "none") == 0
  assert _checkpointed_blocks(family, "full") == blocks
  assert _checkpointed_blocks(family, "dots") == blocks


# bfloat16 compute.

# The dot_generals that stay float32 on purpose, by their operand shapes: the router logits ([..., D] x [D, E]:
# routing decisions and the balance losses read float32 logits; the noisy top-k router also has its noise
# kernel), the routing statistics' dense gates (vimoe/moe/losses.py, einsum "NKE,NK->NE": metrics, not model
# compute) and the ViT's classification head ([B, D] x [D, classes]: float32 logits, negligible cost).
def _kept_float32(family: str, lhs: tuple, rhs: tuple, num_experts: int, num_classes: int) -> bool:
  router_logits = rhs == (lhs[-1], num_experts)
  dense_gates = len(lhs) == 3 and lhs[-1] == num_experts and rhs == lhs[:2]
  vit_head = family == "vit" and rhs[-1:] == (num_classes,) and len(lhs) == 2
  return router_logits or dense_gates or vit_head


def _dot_generals(jaxpr, found: list) -> list:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(tuple(var.aval for var in eqn.invars))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax_core.ClosedJaxpr):
          _dot_generals(sub.jaxpr, found)
        elif isinstance(sub, jax_core.Jaxpr):
          _dot_generals(sub, found)
  return found


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_models_compute_every_matmul_in_bfloat16(family):
  config, build, inputs = _model_config(family)
  config.dtype = "bfloat16"
  model = build(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  forward = lambda state, inputs: nnx.merge(graphdef, state)(inputs, deterministic=False)[0]
  dots = _dot_generals(jax.make_jaxpr(forward)(state, inputs).jaxpr, [])
  num_experts = config.moe.num_experts
  num_classes = config.get("num_classes", 0)
  bf16 = [d for d in dots if all(a.dtype == jnp.bfloat16 for a in d)]
  other = [d for d in dots if d not in bf16]
  wrong = [d for d in other if not _kept_float32(family, d[0].shape, d[1].shape, num_experts, num_classes)]
  assert not wrong, wrong
  assert len(bf16) >= 3 * len(other), (len(bf16), len(other))  # the experts, attention, LSTM, head: bf16


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_keeps_float32_parameters_and_optimizer_moments_and_the_loss(family):
  if family == "vit":
    config = quickstart.get_config()
  elif family == "lstm":
    config = lstm_moe_quickstart.get_config()
  else:
    config = (lm_quickstart if family == "lm" else umoe_quickstart).get_config()
  config.model.dtype = "bfloat16"
  _, model, optimizer = trainer.build(config)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(optimizer))[0]
             if "'mu'" in jax.tree_util.keystr(path) or "'nu'" in jax.tree_util.keystr(path)]
  assert params and moments
  assert all(leaf.dtype == jnp.float32 for leaf in params + moments)

  # The same parameters in float32 and bfloat16 compute: bfloat16 keeps 8 significant bits (relative rounding
  # 2^-8 = 0.4 % per operation), so over a few blocks the loss agrees to 2 %.
  bf16_loss, _ = _loss_and_grads(family, dtype="bfloat16")
  f32_loss, _ = _loss_and_grads(family, dtype="float32")
  assert bf16_loss == pytest.approx(f32_loss, rel=2e-2)
