"""Shazeer et al. 2017's LSTM-MoE LM: noisy top-k gates and balance losses against hand-worked numbers, the LSTM
against a NumPy loop, the whole forward pass against a NumPy reading of appendix C.1, causality, and the
hierarchical MoE against a NumPy loop over experts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vimoe import moe
from vimoe.models import lstm

LN2 = math.log(2.0)  # softplus(0): the noise std of a zero-initialised W_noise


def materialize(make, seed=0):
  """Builds `make()` without running its JAX initialisers, whose one-off XLA compilations would dominate these small
  tests, and fills every nnx.Param with seeded NumPy values of a fan-in scale (so no gate or bias is trivially 0)."""
  graphdef, params, keys, rest = nnx.split(nnx.eval_shape(make), nnx.Param, nnx.RngKey, ...)
  rng = np.random.RandomState(seed)
  scale = lambda shape: 1 / math.sqrt(shape[-2]) if len(shape) >= 2 else 0.3
  params = jax.tree.map(lambda a: jnp.asarray(scale(a.shape) * rng.randn(*a.shape), a.dtype), params)
  keys = jax.tree.map(lambda a: jax.random.key(rng.randint(2**31)), keys)
  rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest)
  return nnx.merge(graphdef, params, keys, rest)


@nnx.jit(static_argnames="deterministic")
def forward(module, inputs, deterministic=True):
  """Compiled call: one compilation runs much faster than the op-by-op eager call of a whole model."""
  return module(inputs, deterministic=deterministic)


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def normal_cdf(z):
  return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z) / math.sqrt(2.0)))


# A tiny router, D=2, E=4, k=2, two tokens x1 = e1 and x2 = e2, so x W_g is simply the rows of W_g:
W_GATE = np.array([[1.0, 0.5, 0.0, -1.0],
                   [0.0, 1.0, 2.0, 0.0]])
TOKENS = np.eye(2)


def test_noisy_top_k_gates_and_losses_with_fixed_noise_match_hand_worked_numbers():
  # W_noise = 0, so the noise std is softplus(0) = ln 2 = 0.6931 for every expert (eq. 4).
  clean = TOKENS @ W_GATE
  noise_std = np.full((2, 4), LN2)
  noise = np.array([[0.0, 1.0, 0.0, 0.0],
                    [0.0, 0.0, -1.0, 2.0]])
  index, gates, noisy = moe.routing.noisy_top_k_gating(jnp.asarray(clean[None]), jnp.asarray(noise_std[None]),
                                                       jnp.asarray(noise[None]), k=2)
  # H = x W_g + noise * ln2:  token 1: [1, 0.5 + 0.6931, 0, -1] = [1, 1.1931, 0, -1]
  #                           token 2: [0, 1, 2 - 0.6931, 2 * 0.6931] = [0, 1, 1.3069, 1.3863]
  np.testing.assert_allclose(noisy[0], [[1, 1.193147, 0, -1], [0, 1, 1.306853, 1.386294]], atol=1e-5)
  # KeepTopK(H, 2): token 1 keeps experts 1 then 0 (the noise lifted expert 1 over expert 0); token 2 keeps 3, 2.
  np.testing.assert_array_equal(index[0], [[1, 0], [3, 2]])
  # Softmax over the two kept logits = sigmoid of their difference: sigmoid(0.1931) = 0.54814,
  # sigmoid(1.3863 - 1.3069 = 0.0794) = 0.51985.
  np.testing.assert_allclose(gates[0], [[0.548137, 0.451863], [0.519850, 0.480150]], atol=1e-5)
  # Importance (eq. 6) = sum of gates per expert = [0.45186, 0.54814, 0.48015, 0.51985]: mean 0.5, std 0.036812,
  # CV^2 = (0.036812 / 0.5)^2 = 0.0054224 (eq. 7, unweighted).
  dense = np.zeros((2, 4))
  for token in range(2):
    dense[token, np.asarray(index[0, token])] = np.asarray(gates[0, token])
  assert float(moe.losses.importance_loss(jnp.asarray(dense))) == pytest.approx(0.0054224, abs=1e-6)
  # P(x, i) = Phi((x W_g)_i - kth_excluding(H, 2, i)) / ln2) (eq. 9). kth_excluding is the 3rd largest of H for an
  # expert in the top 2, the 2nd largest otherwise:
  #   token 1 (3rd = 0, 2nd = 1):       Phi(1/ln2), Phi(0.5/ln2), Phi(-1/ln2), Phi(-2/ln2)
  #                                     = 0.92545, 0.76465, 0.07455, 0.00195
  #   token 2 (3rd = 1, 2nd = 1.3069):  Phi(-1.3069/ln2), Phi(-0.3069/ln2), Phi(1/ln2), Phi(-1/ln2)
  #                                     = 0.02969, 0.32899, 0.92545, 0.07455
  # (expert 3 of token 2 was chosen only thanks to a large noise draw, so its P is small.)
  probability = moe.routing.shazeer_load_probability(jnp.asarray(clean[None]), jnp.asarray(noise_std[None]), noisy,
                                                     k=2)
  expected = normal_cdf([[1 / LN2, 0.5 / LN2, -1 / LN2, -2 / LN2],
                         [(0 - 2 + LN2) / LN2, (1 - 2 + LN2) / LN2, 1 / LN2, -1 / LN2]])
  np.testing.assert_allclose(expected, [[0.92545, 0.76465, 0.07455, 0.00195],
                                        [0.02969, 0.32899, 0.92545, 0.07455]], atol=1e-5)
  np.testing.assert_allclose(probability[0], expected, atol=1e-5)
  # Load (eq. 10) = [0.95514, 1.09365, 1.0, 0.07651]: CV^2 = 0.27534 (eq. 11, unweighted).
  load_loss = moe.losses.load_loss(probability.reshape(-1, 4))
  assert float(load_loss) == pytest.approx(0.27534, abs=1e-4)


def test_moe_layer_without_noise_gives_hand_worked_gates_losses_and_output():
  layer = materialize(lambda: moe.MoeLayer(2, 3, 4, 2, router="noisy_top_k", causal=True, capacity_factor=None,
                                            dispatch="gather", activation="relu", importance_weight=0.1,
                                            load_weight=0.2, rngs=nnx.Rngs(0)))
  layer.router.kernel[...] = jnp.asarray(W_GATE)
  layer.router.noise_kernel[...] = jnp.zeros((2, 4))
  x = jnp.asarray(TOKENS[None], jnp.float32)                            # [1, 2, 2]
  y, aux = forward(layer, x)
  # Without noise H = x W_g. Token 1 keeps experts 0, 1 with gates sigmoid(+-0.5) = 0.62246, 0.37754; token 2
  # keeps experts 2, 1 with sigmoid(+-1) = 0.73106, 0.26894. Importance = [0.62246, 0.64648, 0.73106, 0]:
  # CV^2 = 0.33984.
  assert float(aux.metrics["importance_loss"]) == pytest.approx(0.339841, abs=1e-5)
  # P(x, i) with H = x W_g: token 1 (2nd = 0.5, 3rd = 0): Phi(1/ln2), Phi(0.5/ln2), Phi(-0.5/ln2), Phi(-1.5/ln2);
  # token 2 (2nd = 1, 3rd = 0): Phi(-1/ln2), Phi(1/ln2), Phi(2/ln2), Phi(-1/ln2).
  # Load = [1.0, 1.69010, 1.23339, 0.08978]: CV^2 = 0.33755.
  assert float(aux.metrics["load_loss"]) == pytest.approx(0.337545, abs=1e-5)
  assert float(aux.losses["importance"]) == pytest.approx(0.1 * 0.339841, abs=1e-6)
  assert float(aux.losses["load"]) == pytest.approx(0.2 * 0.337545, abs=1e-6)
  np.testing.assert_allclose(aux.metrics["expert_load"], [0.25, 0.5, 0.25, 0.0])   # 4 choices: 1, 2, 1, 0
  params = {name: np.asarray(getattr(layer.experts, name)[...], np.float64) for name in ("w_in", "b_in", "w_out",
                                                                                          "b_out")}
  expert = lambda e, v: (np.maximum(v @ params["w_in"][e] + params["b_in"][e], 0) @ params["w_out"][e]
                         + params["b_out"][e])
  gate_a, gate_b = sigmoid(0.5), sigmoid(1.0)
  want = np.stack([gate_a * expert(0, TOKENS[0]) + (1 - gate_a) * expert(1, TOKENS[0]),
                   gate_b * expert(2, TOKENS[1]) + (1 - gate_b) * expert(1, TOKENS[1])])
  np.testing.assert_allclose(y[0], want, atol=1e-5)


def numpy_lstm(x, input_kernel, recurrent_kernel, bias):
  """x [B, T, D] -> h [B, T, H], float64, one time step and one gate at a time."""
  B, T, _ = x.shape
  H = recurrent_kernel.shape[0]
  h, c = np.zeros((B, H)), np.zeros((B, H))
  out = np.zeros((B, T, H))
  for t in range(T):
    z = x[:, t] @ input_kernel + h @ recurrent_kernel + bias
    i, f, g, o = (z[:, n * H:(n + 1) * H] for n in range(4))
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    out[:, t] = h
  return out


def test_lstm_matches_a_numpy_loop():
  layer = materialize(lambda: lstm.LSTM(3, 4, forget_bias=1.0, rngs=nnx.Rngs(0)))
  x = np.random.RandomState(2).randn(2, 7, 3)
  want = numpy_lstm(x, *(np.asarray(p[...], np.float64) for p in (layer.input_kernel, layer.recurrent_kernel,
                                                                     layer.bias)))
  np.testing.assert_allclose(nnx.jit(lambda m, v: m(v))(layer, jnp.asarray(x, jnp.float32)), want, atol=1e-5)


def tiny_model(moe_type="flat", dropout=0.0, **moe_overrides):
  moe_config = {"type": moe_type, "hidden_dim": 12, "num_experts": 6, "k": 2, "num_groups": 3,
                "experts_per_group": 2, "k_primary": 2, "k_secondary": 1, **moe_overrides}
  # Random gate weights (they start at zero, appendix A), so that routing depends on the token.
  return materialize(lambda: lstm.build_lstm_lm({"name": "lstm_moe", "vocab_size": 11, "dim": 8, "dropout": dropout,
                                                 "moe": moe_config}, rngs=nnx.Rngs(params=0, noise=1, dropout=2)))


def test_forward_pass_follows_appendix_c1():
  model = tiny_model()
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (2, 5), 0, 11))
  logits, aux = forward(model, jnp.asarray(tokens, jnp.int32))
  p = lambda v: np.asarray(v[...], np.float64)
  layer = model.blocks[1].moe
  run_lstm = lambda block, v: numpy_lstm(v, p(block.lstm.input_kernel), p(block.lstm.recurrent_kernel),
                                         p(block.lstm.bias))
  h0 = p(model.embed.embedding)[tokens]                                 # [B, T, D]
  h1 = h0 + run_lstm(model.blocks[0], h0)
  moe_out = np.zeros_like(h1)
  for b in range(2):
    for t in range(5):                                                  # every time step, routed alone
      x = h1[b, t]
      logits_e = x @ p(layer.router.kernel)
      top = np.argsort(-logits_e)[:2]
      gates = np.exp(logits_e[top] - logits_e[top].max())
      gates /= gates.sum()
      for gate, e in zip(gates, top):
        hidden = np.maximum(x @ p(layer.experts.w_in)[e] + p(layer.experts.b_in)[e], 0)
        moe_out[b, t] += gate * (hidden @ p(layer.experts.w_out)[e] + p(layer.experts.b_out)[e])
  h2 = h1 + sigmoid(moe_out)
  h3 = h2 + run_lstm(model.blocks[2], h2)
  want = h3 @ p(model.head.kernel) + p(model.head.bias)
  assert logits.shape == (2, 5, 11) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, want, atol=2e-4)
  assert set(aux["metrics"]) == {"block1"} and set(aux["losses"]) == {"importance", "load"}


@pytest.mark.parametrize("moe_type", ["flat", "hierarchical"])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(moe_type):
  model = tiny_model(moe_type, dropout=0.2)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (3, 12), 0, 11)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 3) % 11)
  # Training mode (router noise and dropout on); clones draw the same noise and masks, so only the tokens differ.
  logits_a, _ = forward(nnx.clone(model), tokens, False)
  logits_b, _ = forward(nnx.clone(model), changed, False)
  np.testing.assert_allclose(logits_a[:, :7], logits_b[:, :7], atol=1e-6)
  assert not np.allclose(logits_a[:, 7:], logits_b[:, 7:])


@pytest.mark.parametrize("dispatch", ["gather", "einsum"])
def test_hierarchical_moe_matches_a_numpy_loop_over_experts(dispatch):
  # a = 3 groups of b = 2 experts, 2 groups per token and 2 experts inside each (appendix B, eq. 12).
  layer = materialize(lambda: moe.HierarchicalMoeLayer(8, 12, 3, 2, k_primary=2, k_secondary=2, capacity_factor=None,
                                                        dispatch=dispatch, activation="relu", rngs=nnx.Rngs(0)))
  x = np.random.RandomState(6).randn(2, 6, 8)
  y, aux = forward(layer, jnp.asarray(x, jnp.float32))
  p = lambda v: np.asarray(v[...], np.float64)
  softmax = lambda v: np.exp(v - v.max()) / np.exp(v - v.max()).sum()
  want = np.zeros_like(x)
  counts = np.zeros(6)
  for b in range(2):
    for t in range(6):
      token = x[b, t]
      primary = token @ p(layer.router.kernel)                       # [a]
      groups = np.argsort(-primary)[:2]
      for primary_gate, i in zip(softmax(primary[groups]), groups):
        secondary = token @ p(layer.secondary_kernel)[:, i]           # [b]
        chosen = np.argsort(-secondary)[:2]
        for secondary_gate, j in zip(softmax(secondary[chosen]), chosen):
          e = i * 2 + j                                               # expert (i, j)
          hidden = np.maximum(token @ p(layer.experts.w_in)[e] + p(layer.experts.b_in)[e], 0)
          want[b, t] += primary_gate * secondary_gate * (hidden @ p(layer.experts.w_out)[e]
                                                         + p(layer.experts.b_out)[e])
          counts[e] += 1
  np.testing.assert_allclose(y, want, atol=1e-5)
  np.testing.assert_allclose(aux.metrics["expert_load"], counts / counts.sum(), atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    ({"width": 8}, r"config\.model key\(s\) \['width'\]"),
    ({"moe": {"experts": 4}}, r"config\.model\.moe key\(s\) \['experts'\]"),
    ({"moe": {"type": "tree"}}, r"config\.model\.moe\.type='tree'.*flat, hierarchical"),
    ({"moe": {"num_experts": 4, "k": 5}}, r"config\.model\.moe\.k=5 must be in \[1, num_experts=4\]"),
    ({"moe": {"type": "hierarchical", "num_groups": 4, "k_primary": 6}}, r"config\.model\.moe\.k_primary=6"),
    ({"dropout": 1.0}, r"config\.model\.dropout=1\.0"),
    ({"moe": {"k": 2, "capacity_factor": 1.25}}, r"capacity_factor=1\.25 with 2 experts per token.*not causal"),
    ({"dim": 0}, r"config\.model\.dim=0"),
])
def test_config_errors_name_the_key(overrides, message):
  with pytest.raises(ValueError, match=message):
    lstm.build_lstm_lm({"name": "lstm_moe", "dim": 8, **overrides})


def test_paper_sizes_give_the_papers_expert_parameters():
  config = lstm.lstm_config({"name": "lstm_moe"})           # the defaults are MoE-256 of appendix C.1
  assert (config.dim, config.hidden_dim, config.num_experts, config.k) == (512, 1024, 256, 4)
  per_expert = config.dim * config.hidden_dim * 2            # [512 * 1024] + [1024 * 512] = 1M weights
  assert per_expert == 2 ** 20
  # MoE-256: 272.9M parameters excluding embedding and softmax (table 7): 256 experts, 2 LSTMs, 2 gate matrices.
  lstm_params = 2 * lstm.count_params(nnx.eval_shape(lambda: lstm.LSTM(512, 512, rngs=nnx.Rngs(0))))
  gate_params = 2 * 512 * 256
  assert (256 * per_expert + lstm_params + gate_params) / 1e6 == pytest.approx(272.9, abs=0.3)
