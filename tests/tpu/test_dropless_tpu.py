"""Dropless expert parallelism compiled ahead of time for a TPU v5e:2x4 slice (runs in .venv-tpu, which has libtpu;
no TPU needed): the layer's forward and backward at E=64, k=2, D=512, H=1024, bf16, 2048 tokens per device on
mesh expert=8 moves its rows with ragged-all-to-all, never all-gathers an expert weight, and with a receive
bound of 2 (model.moe.dropless_buffer_factor=2) needs at most 64 MiB of temporaries per device and less memory
in all (arguments + outputs + temporaries) than the worst-case buffer (factor None)."""

import os
import re

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # other compile-only processes may hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from vimoe import moe, parallel  # noqa: E402

BOUNDED = 2.0  # dropless_buffer_factor of the bounded-buffer tests: receive rows = 2 x the local assignments

E, K, D, H, TOKENS_PER_DEVICE, DEVICES = 64, 2, 512, 1024, 2048, 8
MiB = 2**20


def compile_layer(factor):
  """The compiled forward + backward (gradients of parameters and input) of the dropless layer on v5e:2x4."""
  topology = topologies.get_topology_desc(topology_name="v5e:2x4", platform="tpu")
  mesh = parallel.make_mesh(expert=DEVICES, devices=topology.devices)
  make = lambda: moe.MoeLayer(D, H, E, K, dispatch="gather", capacity_factor=None, dropless_buffer_factor=factor,
                              param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  with jax.set_mesh(mesh):
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding), abstract)
    x = jax.ShapeDtypeStruct((DEVICES * TOKENS_PER_DEVICE // 256, 256, D), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(("data", "expert"))))
    loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x)[0].astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(abstract, x).compile()


@pytest.fixture(scope="module")
def compiled():
  return {factor: compile_layer(factor) for factor in (None, BOUNDED)}


def memory(executable):
  stats = executable.memory_analysis()
  return {"temp": stats.temp_size_in_bytes, "argument": stats.argument_size_in_bytes,
          "output": stats.output_size_in_bytes}


def test_bounded_exchange_is_ragged_and_never_gathers_expert_weights(compiled):
  hlo = compiled[BOUNDED].as_text()
  assert re.search(r" ragged-all-to-all(-start)?\(", hlo)
  weight_dims = {f"[{E},{D},{H}]", f"[{E},{H},{D}]"}
  for line in hlo.splitlines():
    if re.search(r"= .* all-gather(-start)?\(", line):
      assert not any(dims in line for dims in weight_dims), line


def test_bounded_buffer_halves_the_temporaries(compiled):
  worst, bounded = memory(compiled[None]), memory(compiled[BOUNDED])
  print({name: {key: f"{value / MiB:.1f} MiB" for key, value in stats.items()}
         for name, stats in (("factor=None", worst), ("factor=2", bounded))})
  assert bounded["temp"] <= 64 * MiB
  assert sum(bounded.values()) < sum(worst.values())
