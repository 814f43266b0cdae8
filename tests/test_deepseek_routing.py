"""DeepSeek-style routing (docs/design.md, 'DeepSeek-style routing'): sigmoid affinities and routed_scale,
group-limited choice, the auxiliary-loss-free routing bias and its update, the sequence-wise balance loss, masks,
and the bias through the optimizer and a trainer checkpoint. Checked against NumPy loops and hand-worked numbers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vimoe import moe

D, E = 8, 8


def router(**options):
  config = moe.MoeConfig(**{"num_experts": E, "k": 2, **options}).validate()
  return moe.ROUTERS[config.router](D, config, rngs=nnx.Rngs(0))


def features(seed=0, shape=(2, 6)):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape, D).astype(np.float32))


def numpy_choice(logits, k, *, score, normalize, scale=1.0, bias=None, num_groups=1, groups_per_token=1):
  """One token at a time: (expert indices in order of choice, gates)."""
  logits = np.asarray(logits, np.float64)
  indices, gates = [], []
  for row in logits.reshape(-1, logits.shape[-1]):
    s = np.exp(row - row.max()) / np.sum(np.exp(row - row.max())) if score == "softmax" else 1 / (1 + np.exp(-row))
    choice = s + (0 if bias is None else np.asarray(bias, np.float64))
    size = len(row) // num_groups
    top = math.ceil(k / groups_per_token)  # the group score rule: the sum of a group's top ceil(k / Kg)
    group_score = [sum(sorted(choice[g * size:(g + 1) * size])[-top:]) for g in range(num_groups)]
    best_groups = sorted(range(num_groups), key=lambda g: -group_score[g])[:groups_per_token]
    allowed = [e for e in range(len(row)) if e // size in best_groups]
    chosen = sorted(allowed, key=lambda e: -choice[e])[:k]
    g = s[chosen] / (np.sum(s[chosen]) if normalize else 1.0) * scale
    indices.append(chosen)
    gates.append(g)
  shape = logits.shape[:-1] + (k,)
  return np.asarray(indices).reshape(shape), np.asarray(gates).reshape(shape)


@pytest.mark.parametrize("score,normalize,scale", [("sigmoid", True, 1.0), ("sigmoid", True, 2.5),
                                                   ("sigmoid", False, 1.0), ("softmax", True, 2.5)])
def test_gates_against_numpy(score, normalize, scale):
  r = router(score=score, normalize_gates=normalize, routed_scale=scale)
  x = features()
  g = r.gate(x, 3)
  index, gates = numpy_choice(x @ r.kernel[...], 3, score=score, normalize=normalize, scale=scale)
  np.testing.assert_array_equal(np.asarray(g.expert_index), index)
  np.testing.assert_allclose(np.asarray(g.gates), gates, rtol=1e-5)
  if normalize:  # not vacuous: the gates sum to routed_scale
    np.testing.assert_allclose(np.asarray(g.gates).sum(-1), scale, rtol=1e-5)


@pytest.mark.parametrize("num_experts,num_groups,groups_per_token,k", [(8, 4, 2, 3), (8, 4, 1, 2), (4, 4, 2, 2)])
def test_group_limited_choice_against_numpy_loop(num_experts, num_groups, groups_per_token, k):
  r = router(num_experts=num_experts, k=k, score="sigmoid", normalize_gates=True, bias_update_rate=0.1,
             num_groups=num_groups, groups_per_token=groups_per_token)
  r.kernel[...] = jnp.asarray(np.random.RandomState(1).randn(D, num_experts), jnp.float32)
  bias = np.random.RandomState(2).uniform(-0.3, 0.3, num_experts).astype(np.float32)
  r.bias[...] = jnp.asarray(bias)
  x = features(3, (4, 16))
  g = r.gate(x, k)
  index, gates = numpy_choice(x @ r.kernel[...], k, score="sigmoid", normalize=True, bias=bias,
                              num_groups=num_groups, groups_per_token=groups_per_token)
  np.testing.assert_array_equal(np.asarray(g.expert_index), index)
  np.testing.assert_allclose(np.asarray(g.gates), gates, rtol=1e-5)
  # Not vacuous: without groups (or without the bias) some token chooses differently. (Groups of one expert never
  # restrict: the best groups_per_token >= k groups hold the k best experts.)
  free, _ = numpy_choice(x @ r.kernel[...], k, score="sigmoid", normalize=True, bias=bias)
  unbiased, _ = numpy_choice(x @ r.kernel[...], k, score="sigmoid", normalize=True, num_groups=num_groups,
                             groups_per_token=groups_per_token)
  assert (free != index).any() or num_experts == num_groups
  assert (unbiased != index).any()


def test_group_score_sums_the_top_ceil_k_over_groups_per_token_by_hand():
  """One token, 2 groups of 4: group 0 = [0.9, 0.9, 0, 0] and group 1 = [0.6] * 4 (choice scores). Summing the
  top 2 (k=4, Kg=2: ceil(4/2) = 2) group 0 scores 1.8 > 1.2 and wins; summing the top 4 (k=4, Kg=1) group 1
  scores 2.4 > 1.8 and wins."""
  choice = jnp.asarray([[0.9, 0.9, 0.0, 0.0, 0.6, 0.6, 0.6, 0.6]])
  top2 = moe.routing.group_limited_mask(choice, 2, 1, 2)   # k=2, Kg=1: top 2
  top4 = moe.routing.group_limited_mask(choice, 2, 1, 4)   # k=4, Kg=1: top 4
  np.testing.assert_array_equal(np.asarray(top2[0]), [True] * 4 + [False] * 4)
  np.testing.assert_array_equal(np.asarray(top4[0]), [False] * 4 + [True] * 4)


@pytest.mark.parametrize("groups_per_token,top", [(2, 4), (4, 2)])
def test_group_choice_for_k8_against_numpy_loop(groups_per_token, top):
  """k=8 of 64 experts in 8 groups of 8. groups_per_token=4 is DeepSeek-V3's setting: its groups score their top
  2 (ceil(8/4)); groups_per_token=2 scores the top 4 (ceil(8/2)). The NumPy loop picks the groups by the sum of
  each group's `top` largest scores, written out here rather than through numpy_choice's rule."""
  num_experts, num_groups, k = 64, 8, 8
  r = router(num_experts=num_experts, k=k, score="sigmoid", normalize_gates=True, num_groups=num_groups,
             groups_per_token=groups_per_token)
  r.kernel[...] = jnp.asarray(np.random.RandomState(5).randn(D, num_experts), jnp.float32)
  x = features(6, (4, 32))
  g = r.gate(x, k)
  scores = 1 / (1 + np.exp(-np.asarray(x @ r.kernel[...], np.float64))).reshape(-1, num_experts)   # [T, E]
  size = num_experts // num_groups

  def groups_by(sum_of_top, row):
    group_score = [np.sort(row[j * size:(j + 1) * size])[::-1][:sum_of_top].sum() for j in range(num_groups)]
    return set(np.argsort(group_score)[::-1][:groups_per_token].tolist())

  chosen_groups = [set((np.asarray(row) // size).tolist()) for row in np.asarray(g.expert_index).reshape(-1, k)]
  differs = 0
  for row, got in zip(scores, chosen_groups):
    expected = groups_by(top, row)
    assert got <= expected, (got, expected)          # every chosen expert lies in one of the expected groups
    chosen = sorted([e for e in range(num_experts) if e // size in expected], key=lambda e: -row[e])[:k]
    assert got == {e // size for e in chosen}
    differs += groups_by(2 if top == 4 else 4, row) != expected
  np.testing.assert_array_equal(np.asarray(g.expert_index), numpy_choice(
      x @ r.kernel[...], k, score="sigmoid", normalize=True, num_groups=num_groups,
      groups_per_token=groups_per_token)[0])
  assert differs > 0   # not vacuous: the other sum (top 2 vs top 4) picks other groups for some token


def one_hot_layer(num_experts=4, k=1, rate=0.25, **options):
  """A layer whose router kernel is 10 x identity: a one-hot feature e chooses expert e (then the next best)."""
  layer = moe.MoeLayer(num_experts, 8, moe.MoeConfig(num_experts=num_experts, k=k, score="sigmoid",
                                                    normalize_gates=True, bias_update_rate=rate,
                                                    capacity_factor=None, dispatch="gather", **options),
                       rngs=nnx.Rngs(0))
  layer.router.kernel[...] = 10.0 * jnp.eye(num_experts)
  return layer


def test_bias_update_from_a_known_load():
  layer = one_hot_layer(rate=0.2)
  # Tokens choose experts 0, 0, 0, 1, 1, 2 (and 0 for the masked last token): loads [3, 2, 1, 0], mean 1.5, so
  # the bias moves by 0.2 * sign(1.5 - load) = [-0.2, -0.2, +0.2, +0.2]. With that bias the choices stay (a token
  # of expert e scores sigmoid(10) = 0.99995 there, at most 0.5 + 0.2 elsewhere), so the second call repeats it.
  choices = [0, 0, 0, 1, 1, 2, 0]
  x = jax.nn.one_hot(jnp.asarray([choices]), 4)
  mask = jnp.asarray([[True] * 6 + [False]])
  layer(x, mask=mask, deterministic=True)
  np.testing.assert_array_equal(np.asarray(layer.router.bias[...]), 0.0)  # evaluation: no update
  _, aux = layer(x, mask=mask, deterministic=False)
  np.testing.assert_allclose(np.asarray(layer.router.bias[...]), [-0.2, -0.2, 0.2, 0.2])
  assert float(aux.metrics["bias_range"]) == 0.0          # the bias this call routed with
  _, aux = layer(x, mask=mask, deterministic=False)
  assert float(aux.metrics["bias_range"]) == pytest.approx(0.4)
  np.testing.assert_allclose(np.asarray(layer.router.bias[...]), [-0.4, -0.4, 0.4, 0.4], rtol=1e-6)


def test_bias_changes_choices_but_not_gates():
  layer = one_hot_layer(k=2, rate=0.1)
  x = jax.nn.one_hot(jnp.asarray([[0, 1]]), 4) + 0.05 * jnp.asarray([[[0, 0, 1.0, 0], [0, 0, 0, 1.0]]])
  layer.router.bias[...] = jnp.asarray([0.0, 0.0, 0.0, 2.0])   # expert 3 always wins the choice
  g = layer.router.gate(x.astype(jnp.float32), 2)
  s = 1 / (1 + np.exp(-10.0 * np.asarray(x[0])))
  np.testing.assert_array_equal(np.asarray(g.expert_index[0]), [[3, 0], [3, 1]])
  expected = np.stack([s[0, [3, 0]] / s[0, [3, 0]].sum(), s[1, [3, 1]] / s[1, [3, 1]].sum()])
  np.testing.assert_allclose(np.asarray(g.gates[0]), expected, rtol=1e-5)


def test_sequence_balance_loss_by_hand():
  # E=2, K=1. Sequence 0 (3 real tokens): s' = [.75,.25], [.4,.6], [.9,.1] -> choices 0, 1, 0;
  #   f = E/(K T) * counts = 2/3 * [2, 1] = [4/3, 2/3]; P = [2.05, 0.95] / 3; f.P = (8.2 + 1.9) / 9 = 10.1/9.
  # Sequence 1 (1 real token, 1 padding): s' = [.2,.8] -> choice 1; f = 2 * [0, 1]; P = [.2, .8]; f.P = 1.6.
  # Sequence 2 (all padding) is skipped. Mean over sequences: (10.1/9 + 1.6) / 2 = 24.5/18.
  affinities = jnp.asarray([[[.75, .25], [.4, .6], [.9, .1]], [[.2, .8], [.9, .1], [.5, .5]],
                            [[.3, .7], [.3, .7], [.3, .7]]])
  index = jnp.argmax(affinities, -1)[..., None]
  valid = jnp.asarray([[True, True, True], [True, False, False], [False, False, False]])
  loss = moe.losses.sequence_balance_loss(affinities, index, valid)
  assert float(loss) == pytest.approx(24.5 / 18, rel=1e-6)


def numpy_sequence_loss(logits, index, valid, k):
  s = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  s = s / s.sum(-1, keepdims=True)
  per_sequence = []
  for b in range(s.shape[0]):
    rows = [t for t in range(s.shape[1]) if valid[b, t]]
    f = np.zeros(s.shape[-1])
    P = np.zeros(s.shape[-1])
    for t in rows:
      for e in index[b, t]:
        f[e] += s.shape[-1] / (k * len(rows))
      P += s[b, t] / len(rows)
    per_sequence.append(np.dot(f, P))
  return np.mean(per_sequence)


def test_sequence_balance_loss_in_the_layer():
  layer = moe.MoeLayer(D, 8, moe.MoeConfig(num_experts=E, k=2, score="sigmoid", normalize_gates=True,
                                           sequence_balance_weight=0.01, capacity_factor=None, dispatch="gather",
                                           group_size=4), rngs=nnx.Rngs(0))  # groups are not sequences
  layer.router.kernel[...] = jnp.asarray(np.random.RandomState(4).randn(D, E), jnp.float32)
  x = features(5, (3, 8))
  mask = np.ones((3, 8), bool)
  mask[1, 5:] = False
  _, aux = layer(x, mask=jnp.asarray(mask))
  logits = np.asarray(x @ layer.router.kernel[...])
  index, _ = numpy_choice(logits, 2, score="sigmoid", normalize=True)
  expected = numpy_sequence_loss(logits, index, mask, 2)
  assert float(aux.metrics["sequence_balance_loss"]) == pytest.approx(expected, rel=1e-5)
  assert float(aux.losses["sequence_balance"]) == pytest.approx(0.01 * expected, rel=1e-5)


MASK_LAYERS = {  # every router, with the DeepSeek-style settings where it accepts them
    "top_k": dict(k=2, capacity_factor=0.5, dispatch="einsum", group_size=8, score="sigmoid",
                  normalize_gates=True, bias_update_rate=0.1, num_groups=2, groups_per_token=1,
                  sequence_balance_weight=0.1),
    "prototype": dict(k=1, capacity_factor=0.5, dispatch="gather", group_size=8, score="sigmoid",
                      bias_update_rate=0.1, sequence_balance_weight=0.1),
    "noisy_top_k": dict(k=1, capacity_factor=0.5, dispatch="einsum", group_size=8),
    "experts_choose": dict(k=1, capacity_factor=1.0, dispatch="einsum", group_size=8),
    "soft": dict(k=1, capacity_factor=None, dispatch="einsum"),
    "hash": dict(k=1, capacity_factor=0.5, dispatch="einsum", group_size=8),
}


def test_mask_layers_cover_every_router():
  assert set(MASK_LAYERS) == set(moe.ROUTERS)


@pytest.mark.parametrize("name", sorted(MASK_LAYERS))
def test_masked_tokens_change_nothing(name):
  """A masked token with any content: no other output, metric, loss or bias changes, and it takes no slot."""
  mask = np.ones((2, 8), bool)
  mask[0, 2] = mask[1, 7] = False
  ids = {"token_ids": jnp.asarray(np.arange(16).reshape(2, 8) % 5)} if name == "hash" else {}
  results = []
  for garbage in (0.0, 30.0, -30.0):
    layer = moe.MoeLayer(D, 8, moe.MoeConfig(num_experts=4, router=name, **MASK_LAYERS[name]), rngs=nnx.Rngs(0))
    x = np.asarray(features(6, (2, 8)))
    x = np.where(mask[..., None], x, garbage * np.asarray(features(7, (2, 8)))).astype(np.float32)
    y, aux = layer(jnp.asarray(x), mask=jnp.asarray(mask), deterministic=False, **ids)
    bias = getattr(layer.router, "bias", None)
    results.append((np.asarray(y)[mask], aux, None if bias is None else np.asarray(bias[...])))
    units, feats, unit_ids, _, valid = layer._units(jnp.asarray(x), None, ids.get("token_ids"),
                                                    jnp.asarray(mask))
    routed, _ = layer.router.route(feats, ids=unit_ids, k=layer.k, capacity=layer.router.capacity(
        layer.config, units.shape[1]), batch_priority=False, deterministic=True, valid=valid)
    if name == "soft":   # no slot mixes the masked token in
      assert float(jnp.max(jnp.abs(routed[0].reshape(16, -1)[~mask.reshape(-1)]))) == 0.0
    else:                # the masked token holds no slot
      assert not bool(jnp.any(routed.kept.reshape(16, -1)[~mask.reshape(-1)]))
  (y0, aux0, bias0), *others = results
  for y, aux, bias in others:
    np.testing.assert_allclose(y, y0, atol=1e-5)
    for key in aux0.metrics:
      np.testing.assert_allclose(np.asarray(aux.metrics[key]), np.asarray(aux0.metrics[key]), atol=1e-5,
                                 err_msg=key)
    for key in aux0.losses:
      np.testing.assert_allclose(np.asarray(aux.losses[key]), np.asarray(aux0.losses[key]), atol=1e-6,
                                 err_msg=key)
    if bias0 is not None:
      np.testing.assert_array_equal(bias, bias0)
      assert np.abs(bias0).max() > 0  # not vacuous: the call did update the bias


def test_optimizer_never_changes_the_bias():
  layer = one_hot_layer(k=1, rate=0.25)
  x = jax.nn.one_hot(jnp.asarray([[0, 0, 0, 1, 1, 2]]), 4)
  layer.router.bias[...] = jnp.asarray([0.5, 0.0, 0.0, 0.0])    # weight decay would shrink it, if it were a Param
  optimizer = nnx.Optimizer(layer, optax.adamw(0.1, weight_decay=0.5), wrt=nnx.Param)

  @nnx.jit
  def step(layer, optimizer):
    def loss(m):
      y, aux = m(x, deterministic=False)
      return jnp.sum(y ** 2) + jnp.sum(m.router.bias[...] ** 2)  # a loss that depends on the bias
    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.Param))(layer)
    optimizer.update(layer, grads)
    return value

  step(layer, optimizer)
  # Choices with bias [.5, 0, 0, 0] (1 + 0.5 beats sigmoid(10) = 0.99995): every token takes expert 0 -> loads
  # [6, 0, 0, 0], mean 1.5: bias += 0.25 * [-1, 1, 1, 1].
  np.testing.assert_allclose(np.asarray(layer.router.bias[...]), [0.25, 0.25, 0.25, 0.25])
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(optimizer))]
  assert not any("bias" in p and "router" in p for p in paths), paths
  assert any("router" in p and "kernel" in p for p in paths)   # the router kernel is trained


@pytest.mark.parametrize("options,message", [
    (dict(num_experts=6, num_groups=4), r"num_groups=4 does not divide .*num_experts=6"),
    (dict(num_experts=8, k=3, num_groups=4, groups_per_token=1), r"groups_per_token=1 .*k=3"),
    (dict(router="experts_choose", score="sigmoid"), r"score='sigmoid' with router='experts_choose'"),
    (dict(router="noisy_top_k", bias_update_rate=0.1), r"bias_update_rate=0\.1 with router='noisy_top_k'"),
    (dict(router="soft", sequence_balance_weight=0.1), r"sequence_balance_weight=0\.1 with router='soft'"),
    (dict(score="tanh"), r"score='tanh'"),
    (dict(routed_scale=0.0), r"routed_scale=0\.0"),
    (dict(groups_per_token=2), r"groups_per_token=2 .*num_groups=1"),
])
def test_config_errors_name_the_keys(options, message):
  with pytest.raises(ValueError, match=message):
    moe.MoeConfig(**options).validate()


def test_trainer_checkpoint_keeps_the_bias(tmp_path):
  """The trainer's step updates the bias (it reaches the saved state), the checkpoint holds it, and a resumed run
  routes with the restored bias: its first logged bias_range is the range of the checkpoint it resumed from."""
  import json
  from configs.lm_deepseek_quickstart import get_config
  from vimoe.train import trainer

  def config(steps):
    c = get_config()
    c.unlock()
    c.model.update(dim=16, depth=1, num_heads=2, mlp_dim=32, max_length=16)
    c.model.moe.update(num_experts=8, k=2, hidden_dim=8, shared_hidden_dim=16, num_groups=2, groups_per_token=1)
    c.data.update(seq_len=16, max_eval_batches=1)
    c.update(batch_size=4, eval_batch_size=4, total_steps=steps, log_every=1, eval_every=100, checkpoint_every=2)
    c.optim.warmup_steps = 1
    return c

  trainer.train_and_evaluate(config(2), tmp_path)
  trainer.train_and_evaluate(config(4), tmp_path)   # resumes from checkpoint 2
  bias = {}
  for step in (2, 4):
    _, _, model, _ = trainer.load_for_evaluation(tmp_path, step)
    bias[step] = np.asarray(model.blocks[0].mlp.router.bias[...])
  # Each step adds 1e-3 * sign(mean load - load): multiples of 1e-3, at most 1e-3 per step, not all zero.
  for step, b in bias.items():
    np.testing.assert_allclose(b / 1e-3, np.round(b / 1e-3), atol=1e-3)
    assert 0 < np.abs(b).max() <= step * 1e-3 + 1e-9
  assert not np.array_equal(bias[2], bias[4])
  records = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
  logged = {record["step"]: record for record in records if "train/block0/bias_range" in record}
  assert logged[3]["train/block0/bias_range"] == pytest.approx(np.ptp(bias[2]), abs=1e-7)
  assert logged[1]["train/block0/bias_range"] == 0.0


def test_language_model_training_leaves_padding_out():
  """The training loss (aux losses and routing metrics included) ignores what the padding tokens hold."""
  import ml_collections
  from vimoe.models.lm import build_lm
  from vimoe.train.language import LanguageModeling
  model = build_lm(dict(name="transformer", vocab_size=32, dim=16, depth=1, num_heads=2, mlp_dim=32, max_length=16,
                        moe=dict(layers="every:1", num_experts=4, k=2, hidden_dim=16, balance_weight=0.01,
                                 score="sigmoid", normalize_gates=True, sequence_balance_weight=0.01)),
                   rngs=nnx.Rngs(0))
  mask = np.ones((2, 12), np.float32)
  mask[1, 5:] = 0                       # targets from position 5 on are padding: inputs 6.. are padding tokens
  outs = []
  for seed in (0, 1):
    tokens = np.random.RandomState(2).randint(0, 32, (2, 12))
    tokens[1, 6:] = np.random.RandomState(seed).randint(0, 32, 6)   # what the padding holds
    batch = {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
             "mask": jnp.asarray(mask)}
    outs.append(LanguageModeling().loss(model, batch, ml_collections.ConfigDict({"label_smoothing": 0.0}))[1])
  assert "train/aux/balance" in outs[0] and "train/aux/sequence_balance" in outs[0]
  for key in outs[0]:
    np.testing.assert_allclose(np.asarray(outs[1][key]), np.asarray(outs[0][key]), rtol=1e-6, err_msg=key)


def test_segmentation_evaluation_leaves_padding_images_out():
  """Padding images (every pixel ignored) take no expert capacity: the real images' predictions and the routing
  statistics do not depend on what the padding holds."""
  from configs.seg_quickstart import get_config
  from vimoe.models.segmentation import build_segmenter
  from vimoe.train.segmentation import Segmentation
  config = get_config()
  config.model.update(dim=16, depth=2, num_heads=2, mlp_dim=32, image_size=16)
  config.model.moe.update(layers="every:1", num_experts=4, k=1, capacity_factor=0.5, route_per="item")
  config.data.crop_size = 16
  task = Segmentation()
  task.config = config
  model = build_segmenter(config.model, rngs=nnx.Rngs(0))
  labels = np.random.RandomState(0).randint(0, config.model.num_classes, (4, 16, 16)).astype(np.int32)
  labels[0] = -1                 # a padding row, first: without the mask it would take capacity from the real ones
  sums = []
  for garbage in (0.0, 5.0, -5.0):
    images = np.random.RandomState(1).randn(4, 16, 16, 3).astype(np.float32)
    images[0] = garbage * np.random.RandomState(2).randn(16, 16, 3)
    sums.append(jax.device_get(task.eval_batch(model, {"image": jnp.asarray(images), "label": jnp.asarray(labels)})))
  for other in sums[1:]:
    for key in sums[0]:
      np.testing.assert_allclose(np.asarray(other[key]), np.asarray(sums[0][key]), rtol=1e-5, atol=1e-6,
                                 err_msg=key)
  # With zero router kernels every image ties and picks expert 0, which has C = ceil(1 x 4 x 0.5 / 4) = 1 slot:
  # unmasked, the padding row (position 0) would take it from the first real image. The padded batch must give
  # what the 3 real images give alone (C = ceil(1 x 3 x 0.5 / 4) = 1 too).
  for path, value in nnx.iter_graph(model):
    if path and path[-1] == "kernel" and "router" in path:
      value[...] = jnp.zeros_like(value[...])
  images = np.random.RandomState(1).randn(4, 16, 16, 3).astype(np.float32)
  padded = jax.device_get(task.eval_batch(model, {"image": jnp.asarray(images), "label": jnp.asarray(labels)}))
  alone = jax.device_get(task.eval_batch(model, {"image": jnp.asarray(images[1:]),
                                                 "label": jnp.asarray(labels[1:])}))
  np.testing.assert_array_equal(np.asarray(padded["confusion"]), np.asarray(alone["confusion"]))
