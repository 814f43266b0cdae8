"""Decoder LMs (vimoe/models/lm.py): causality for every router a decoder allows, UMoE attention against a NumPy
multi-head attention, cached decoding against the full forward pass, RoPE against explicit 2x2 rotations, tied
embeddings, and config errors that name the key."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vimoe import moe
from vimoe.models.lm import (UmoeAttention, apply_rope, build_lm, causal_softmax, ffn_macs_per_token, generate,
                             lm_config)

V = 64                                  # vocabulary of the tiny models
TINY = dict(vocab_size=V, dim=16, depth=2, num_heads=2, mlp_dim=32, max_length=32)
MOE = dict(num_experts=4, k=2, hidden_dim=16, num_shared_experts=1, balance_weight=0.01)
UMOE = dict(TINY, name="umoe", umoe_attn_k=2, umoe_key_dim=8, umoe_query_rank=3)


@nnx.jit
def forward(model, tokens):
  return model(tokens, deterministic=True)


def materialize(make_module, seed=0):
  """make_module() with every parameter drawn from a seeded NumPy generator: routers of unit scale (so tokens
  really go to different experts), random biases and norm scales, fan-in-scaled kernels.

  The module is built abstractly (nnx.eval_shape), so none of the dozens of small XLA compiles of an eager
  initialisation run: on CPU they cost more than the tests themselves.
  """
  graphdef, params, rest = nnx.split(nnx.eval_shape(make_module), nnx.Param, ...)
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name, shape = str(path[-1].key if hasattr(path[-1], "key") else path[-1]), leaf.shape
    if name in ("kernel", "noise_kernel") and "router" in jax.tree_util.keystr(path):
      value = rng.randn(*shape)
    elif name == "scale":
      value = 1.0 + 0.1 * rng.randn(*shape)
    elif name == "slope":
      value = np.full(shape, 0.25)
    elif len(shape) >= 2:
      value = rng.randn(*shape) / math.sqrt(shape[-2])
    else:
      value = 0.1 * rng.randn(*shape)
    return jnp.asarray(value, leaf.dtype)

  params = jax.tree_util.tree_map_with_path(fill, params)
  rest = jax.tree.map(lambda leaf: (jax.random.key(seed) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
                                    else jnp.zeros(leaf.shape, leaf.dtype)), rest)
  return nnx.merge(graphdef, params, rest)


def tokens(batch, length, seed=0):
  return np.random.RandomState(seed).randint(0, V, (batch, length)).astype(np.int32)


# -- causality ---------------------------------------------------------------------------------------------------

MODELS = {
    "dense": dict(TINY, name="transformer", positions="learned", tie_embeddings=True),
    "top_k": dict(TINY, name="transformer", max_length=8, moe=dict(MOE, layers="every:1")),   # window 8 < T
    "noisy_top_k": dict(TINY, name="transformer", moe=dict(MOE, layers="every:1", router="noisy_top_k",
                                                           load_weight=0.01, balance_weight=0.0)),
    "hash": dict(TINY, name="transformer", moe=dict(MOE, layers="every:1", router="hash", k=1, balance_weight=0.0)),
    "prototype": dict(TINY, name="transformer", mlp_activation="prelu",
                      moe=dict(MOE, layers="every:1", router="prototype")),
    "einsum_no_drops": dict(TINY, name="transformer", moe=dict(MOE, layers="every:2", dispatch="einsum")),
    # k=1 with a capacity drops tokens, in position order: a later token can never push out an earlier one.
    "einsum_capacity_k1": dict(TINY, name="transformer", moe=dict(MOE, layers="every:1", k=1, dispatch="einsum",
                                                                  capacity_factor=0.5)),
    "gather_capacity_k1": dict(TINY, name="transformer", moe=dict(MOE, layers="every:1", k=1, dispatch="gather",
                                                                  capacity_factor=0.5)),
    "umoe_pre": dict(UMOE, moe=MOE),
    "umoe_post": dict(UMOE, umoe_mixing="post", max_length=8, moe=MOE),
    # With a capacity the UMoE attention (and its FFN) must route one expert per token (issue 12, defect 2).
    "umoe_pre_gather_capacity_k1": dict(UMOE, umoe_attn_k=1,
                                        moe=dict(MOE, k=1, dispatch="gather", capacity_factor=0.5)),
    "umoe_pre_einsum_capacity_k1": dict(UMOE, umoe_attn_k=1,
                                        moe=dict(MOE, k=1, dispatch="einsum", capacity_factor=0.5)),
    "umoe_post_capacity_k1": dict(UMOE, umoe_mixing="post", umoe_attn_k=2,
                                  moe=dict(MOE, k=1, dispatch="einsum", capacity_factor=0.5)),
    "umoe_pre_attn_k1_dropless": dict(UMOE, umoe_attn_k=1, moe=MOE),
}
B, T = 2, 12                             # every forward pass has this shape: one XLA compile per model


@functools.lru_cache(maxsize=None)
def model_named(name):
  """The model of MODELS[name] with random parameters, shared by the tests (compiling is most of their time)."""
  # With k=1 the parameters of seed 0 send every token of block 1 to one expert; seed 2 spreads them.
  return materialize(lambda: build_lm(MODELS[name], rngs=nnx.Rngs(1)), seed=2 if "capacity_k1" in name else 0)


@pytest.mark.parametrize("name", list(MODELS))
def test_changing_a_token_never_changes_earlier_logits(name):
  model = model_named(name)
  changed = 5
  original = tokens(1, T)
  edited = original.copy()
  edited[0, changed] = (original[0, changed] + 7) % V
  logits, aux = forward(model, np.concatenate([original, edited]))                        # [2, T, V]
  np.testing.assert_allclose(logits[1, :changed], logits[0, :changed], atol=1e-5, rtol=0)
  # The edit does reach its own and later positions (the check above is not vacuous).
  assert np.abs(logits[1, changed:] - logits[0, changed:]).max(axis=-1).min() > 1e-4
  if name != "dense":
    dropped = float(aux["metrics"]["block1"]["dropped_fraction"])
    assert dropped > 0.05 if "capacity" in name else abs(dropped) < 1e-6   # the capacity models do drop tokens
    used = np.asarray(aux["metrics"]["block1"]["expert_load"]) > 0
    assert used.sum() >= 2, "routing is trivial: every token went to one expert"
  if name.startswith("umoe"):
    assert set(aux["metrics"]) == {"block0", "block0_attn", "block1", "block1_attn"}
    assert set(aux["losses"]) == {"balance", "attn_balance"}
    attn_dropped = float(aux["metrics"]["block1_attn"]["dropped_fraction"])
    # The pre-mixing attention with a capacity does drop units (post-mixing has no capacity).
    assert attn_dropped > 0.05 if name.startswith("umoe_pre") and "capacity" in name else abs(attn_dropped) < 1e-6


# -- UMoE attention is multi-head attention when its experts are linear --------------------------------------------

def numpy_rope(x, positions, base=10000.0):
  """x [T, d] float64: pair (i, i + d/2) multiplied by the 2x2 rotation matrix of angle p * base^(-2i/d)."""
  T, d = x.shape
  out = np.empty_like(x)
  for t in range(T):
    for i in range(d // 2):
      angle = positions[t] * base ** (-2.0 * i / d)
      rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
      out[t, [i, i + d // 2]] = rotation @ x[t, [i, i + d // 2]]
  return out


def reference_mha(x, w_query, w_key, w_value, b_value, w_out, b_out, base=10000.0):
  """Causal multi-head attention in float64, one sequence: x [T, D]; per head h w_query[h] [D, dk], one shared
  w_key [D, dk] (multi-query), w_value[h] [D, Hv], b_value[h] [Hv]; heads concatenated then projected by
  w_out [h * Hv, D] + b_out [D]."""
  T = x.shape[0]
  positions = np.arange(T)
  keys = numpy_rope(x @ w_key, positions, base)
  heads = []
  for h in range(len(w_query)):
    queries = numpy_rope(x @ w_query[h], positions, base)
    scores = queries @ keys.T / math.sqrt(keys.shape[1])
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads.append(weights @ (x @ w_value[h] + b_value[h]))
  return np.concatenate(heads, axis=-1) @ w_out + b_out


@nnx.jit
def attend(attention, experts, x):
  y, _, metrics, _ = attention(x, experts, positions=jnp.arange(x.shape[1]))
  return y, metrics


@pytest.mark.parametrize("mixing", ["pre", "post"])
@pytest.mark.parametrize("rank", [0, 3])
def test_umoe_attention_with_linear_experts_is_multi_head_attention(mixing, rank):
  D, H, E, dk, T = 8, 6, 4, 6, 7
  make_attention = lambda: UmoeAttention(
      D, H, E, E, key_dim=dk, query_rank=rank, mixing=mixing, shared_expert=True, activation="prelu",
      window=T, rope_base=10000.0, normalize_gates=False, dispatch="gather", capacity_factor=None, balance_weight=0.0,
      importance_weight=0.0, z_loss_weight=0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
  attention = materialize(make_attention, seed=1)
  experts = materialize(lambda: moe.Experts(E, D, H, activation="prelu", rngs=nnx.Rngs(0)), seed=2)
  for module in (experts, attention.shared):
    module.slope[...] = jnp.ones_like(module.slope[...])      # PReLU with slope 1: the experts are linear
  attention.router.kernel[...] = jnp.zeros((D, E))            # uniform router: all E experts, gate 1/E each
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(1, T, D), jnp.float32)
  y, metrics = attend(attention, experts, x)

  f64 = lambda a: np.asarray(a[...], np.float64)
  w_query = [f64(attention.query.kernel) + (f64(attention.query_down)[e] @ f64(attention.query_up)[e] if rank else 0)
             for e in range(E)] + [f64(attention.shared_query.kernel)]
  w_value = [f64(experts.w_in)[e] for e in range(E)] + [f64(attention.shared.w_in)[0]]
  b_value = [f64(experts.b_in)[e] for e in range(E)] + [f64(attention.shared.b_in)[0]]
  gates = [1.0 / E] * E + [1.0]                                # routed heads weighted 1/E, the shared head 1
  w_out = np.concatenate([g * w for g, w in zip(gates, [f64(experts.w_out)[e] for e in range(E)]
                                                + [f64(attention.shared.w_out)[0]])])
  b_out = f64(experts.b_out).mean(0) + f64(attention.shared.b_out)[0]
  expected = reference_mha(np.asarray(x[0], np.float64), w_query, f64(attention.key.kernel), w_value, b_value,
                           w_out, b_out)
  np.testing.assert_allclose(np.asarray(y[0]), expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(metrics["expert_load"], np.full(E, 1.0 / E), atol=1e-7)


# -- cached decoding ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,prompt_length", [("dense", 5), ("top_k", 1), ("umoe_pre", 5), ("umoe_post", 1)])
def test_cached_generation_matches_full_recomputation(name, prompt_length):
  """A prompt of 5 tokens runs as one chunk, then one token per call; a 1-token prompt compiles only the
  one-token step (half the compile time)."""
  model = model_named(name)
  sequence, step_logits = generate(model, tokens(B, prompt_length, seed=3), T - prompt_length,
                                   rng=jax.random.PRNGKey(0), temperature=1.0)
  assert sequence.shape == (B, T) and step_logits.shape == (B, T - prompt_length, V)
  np.testing.assert_array_equal(sequence[:, :prompt_length], tokens(B, prompt_length, seed=3))
  full, _ = forward(model, sequence)
  # Token prompt_length + i was sampled from the logits at position prompt_length + i - 1.
  np.testing.assert_allclose(step_logits, full[:, prompt_length - 1:-1], atol=1e-4, rtol=1e-4)


# -- RoPE --------------------------------------------------------------------------------------------------------

def test_rope_matches_numpy_rotation_and_depends_on_relative_position():
  rng = np.random.RandomState(0)
  T, d = 6, 8
  x = rng.randn(1, T, 2, d).astype(np.float32)                # [B, T, heads, d]
  positions = np.array([0, 1, 2, 5, 11, 40])
  rotated = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions)))
  for head in range(2):
    np.testing.assert_allclose(rotated[0, :, head], numpy_rope(x[0, :, head].astype(np.float64), positions),
                               atol=1e-5)
  # <R_m q, R_n k> depends only on m - n.
  q, k = rng.randn(1, 1, d), rng.randn(1, 1, d)
  dot = lambda m, n: float(np.sum(np.asarray(apply_rope(jnp.asarray(q, jnp.float32), jnp.asarray([m])))
                                  * np.asarray(apply_rope(jnp.asarray(k, jnp.float32), jnp.asarray([n])))))
  assert dot(7, 3) == pytest.approx(dot(4, 0), abs=1e-5)
  assert dot(7, 3) != pytest.approx(dot(5, 0), abs=1e-3)


def test_attention_sees_itself_and_the_window_before_it():
  weights = np.asarray(causal_softmax(jnp.zeros((6, 6)), jnp.arange(6), jnp.arange(6), 3))  # equal scores
  expected = np.array([[1 if 0 <= t - s < 3 else 0 for s in range(6)] for t in range(6)], np.float32)
  np.testing.assert_allclose(weights, expected / expected.sum(1, keepdims=True), atol=1e-7)


# -- tied embeddings ---------------------------------------------------------------------------------------------

def test_tied_embeddings_share_one_parameter():
  tied, untied = model_named("dense"), model_named("top_k")           # tie_embeddings True / False
  assert tied.head is None and untied.head is not None
  vocab_shaped = [leaf for leaf in jax.tree.leaves(nnx.state(tied, nnx.Param)) if V in leaf.shape]
  assert len(vocab_shaped) == 1 and vocab_shaped[0].shape == (V, TINY["dim"])   # only embed.embedding
  inputs = np.arange(B * T, dtype=np.int32).reshape(B, T) % 8            # token ids 0..7
  unused = 9                                                          # a token id that is not in the input
  for model, output_changes in ((tied, True), (untied, False)):
    saved = model.embed.embedding[...]
    before = np.asarray(forward(model, inputs)[0])
    model.embed.embedding[...] = saved.at[unused].add(0.5)
    after = np.asarray(forward(model, inputs)[0])
    model.embed.embedding[...] = saved
    others = np.delete(after - before, unused, axis=-1)
    np.testing.assert_allclose(others, 0.0, atol=1e-6)               # the input path never reads row `unused`
    assert (np.abs(after[..., unused] - before[..., unused]).min() > 1e-4) == output_changes


# -- config errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,fragment", [
    (dict(TINY, name="transformer", moe=dict(layers="last:1", router="experts_choose", capacity_factor=1.0)),
     "model.moe.router='experts_choose' with causal=True"),
    (dict(TINY, name="transformer", moe=dict(layers="last:1", router="soft", dispatch="einsum")),
     "model.moe.router='soft' with causal=True"),
    (dict(TINY, name="transformer", moe=dict(layers="last:1", router="top1")), "model.moe.router='top1' is not valid"),
    (dict(TINY, name="transformer", moe=dict(layers="last:1", k=2, dispatch="einsum", capacity_factor=1.25)),
     "model.moe.capacity_factor=1.25 with k=2 and causal=True"),
    (dict(TINY, name="gpt"), "model.name='gpt' is not valid; choose one of: 'transformer', 'umoe'"),
    (dict(TINY, name="transformer", dropout_rate=0.1), "unknown config key(s) model.dropout_rate"),
    (dict(TINY, name="transformer", moe=dict(layers="every:1", group_size=64)), "model.moe.group_size"),
    (dict(TINY, name="transformer", umoe_mixing="pre"), "model.umoe_mixing only apply to model.name='umoe'"),
    (dict(UMOE, umoe_mixing="mid"), "model.umoe_mixing='mid' is not valid"),
    (dict(UMOE, umoe_attn_k=9), "model.umoe_attn_k=9 must be an integer in [1, model.moe.num_experts=8]"),
    # Issue 12, defect 2: the FFN's k=1 allows a capacity, but the attention's umoe_attn_k=2 does not.
    (dict(UMOE, umoe_attn_k=2, moe=dict(k=1, capacity_factor=0.5, dispatch="gather")),
     "model.moe.capacity_factor=0.5 with model.umoe_attn_k=2"),
    (dict(UMOE, umoe_attn_k=2, moe=dict(k=1, capacity_factor=0.5, dispatch="einsum")),
     "model.moe.capacity_factor=0.5 with model.umoe_attn_k=2"),
    (dict(UMOE, moe=dict(layers="none")), "model.moe.layers='none' selects no block"),
    (dict(TINY, name="transformer", positions="alibi"), "model.positions='alibi' is not valid"),
    (dict(TINY, name="transformer", num_heads=3), "model.num_heads=3 must divide model.dim=16"),
    (dict(TINY, name="transformer", moe=dict(layers=[2])), "model.moe.layers=[2]: block index 2 is out of range"),
    (dict(TINY, name="transformer", moe=dict(layers="last:1", num_experts=4, k=5)),
     "model.moe.k=5 must be an integer in [1, model.moe.num_experts=4]"),
    (dict(name="transformer", dim=16), "model.depth, model.num_heads, model.mlp_dim missing"),
])
def test_config_errors_name_the_key(config, fragment):
  with pytest.raises(ValueError) as error:
    lm_config(config)
  assert fragment in str(error.value), str(error.value)


# -- the quickstart configs --------------------------------------------------------------------------------------

def test_dense_quickstart_differs_from_the_moe_one_only_in_its_ffns():
  from configs import lm_dense_quickstart, lm_quickstart, umoe_base_fineweb, umoe_quickstart
  moe_config, dense_config = lm_quickstart.get_config(), lm_dense_quickstart.get_config()
  moe_rest, dense_rest = moe_config.to_dict(), dense_config.to_dict()
  moe_model, dense_model = moe_rest.pop("model"), dense_rest.pop("model")
  assert moe_rest == dense_rest                               # steps, batch, data, optimizer, seed
  moe_block = moe_model.pop("moe")
  assert moe_model == dense_model and moe_block["layers"] == "every:1"
  moe_lm, dense_lm = lm_config(moe_config.model), lm_config(dense_config.model)
  routers = moe_lm.depth * moe_lm.dim * moe_lm.moe.num_experts
  assert ffn_macs_per_token(moe_lm) - routers == ffn_macs_per_token(dense_lm) == 4 * 2 * 128 * 512
  for module in (umoe_quickstart, umoe_base_fineweb):
    assert lm_config(module.get_config().model).name == "umoe"
