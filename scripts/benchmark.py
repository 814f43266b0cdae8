"""Benchmarks that print ratios measured in one run (this machine is shared and noisy: compare within a run).

    python scripts/benchmark.py moe [--tokens 4096 --dim 384 --hidden 1536 --experts 8,32,64 --k 1,2]

    python scripts/benchmark.py vit [--batch 16 --image-size 224]

`moe`: forward+backward time of one MoE layer per (dispatch, router, E, k, group size) against a dense MLP of the
same active compute (hidden width k*H), their ratio, the compiled peak memory and tokens/s; the dropless rows
once per local compute (`grouped_matmul`: block_loop, ragged_dot). Results go to docs/benchmarks.md by hand,
with the command and the machine.

    python scripts/benchmark.py moe-mesh [--tokens 2048 --dim 64 --hidden 128 --experts 64 --k 2 --meshes 1x8,2x4]

`moe-mesh`: on 8 fake CPU devices (the script sets XLA_FLAGS itself), per dispatch (einsum and gather with a
capacity, dropless block_loop and ragged_dot, and the dropless path as it was before expert parallelism: the
partitioner left to place it) and mesh, the compiled forward+backward's per-device memory (memory_analysis:
temporaries + arguments) and collective bytes (operand bytes of every all-gather, all-to-all, all-reduce and
reduce-scatter in the compiled HLO).
`vit`: train-step time (forward, backward, AdamW update) of ViMoE-S/14 (MoE in the last 2 blocks, N=8, top-1,
per-image routing, one shared expert) against the dense DINOv2 ViT-S/14, images/s and compiled peak memory.

    python scripts/benchmark.py trainer [--config configs/quickstart.py --steps 60 --window 10 --set model.depth=2]

`trainer`: the trainer loop's time per step (vimoe.train.train_and_evaluate: data loading, the step, the loop's
bookkeeping, as a run does it) against the bare compiled train step on the same batches (pre-loaded on the
device, one `jax.jit` call per step, no Python between calls), both in this process. Times are per window of
`--window` steps (the trainer's: from its own metrics.jsonl, `train/examples_per_sec` of each logging window; the
first window, which compiles, is dropped); ratio = trainer / bare, of the medians.

    .venv-tpu/bin/python scripts/benchmark.py grouped-matmul --topology v5e:2x2

`grouped-matmul`: the dropless layer's local expert compute (every routed row once, forward+backward wrt the
expert weights and the rows, bfloat16) compiled by the TPU compiler for one chip of a slice (ahead of time, no TPU
needed; libtpu: make tpu-venv), per `grouped_matmul` method at the MoE shapes of the paper configs, with the rows a
chip holds at the paper batch on 8 chips: the compiler's FLOPs and bytes accessed, the roofline time they give on
that chip (vimoe/parallel/aot.py) and the per-chip temp + argument bytes. It is the evidence that sets `"auto"`
per backend. The block loop's overflow blocks run in a loop of data-dependent length, which the compiler counts
once: its figures are those of balanced routing (no overflow) plus one block.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

if len(sys.argv) > 1 and sys.argv[1] == "grouped-matmul":  # compile-only for TPU: libtpu next to other processes
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
if len(sys.argv) > 1 and sys.argv[1] == "moe-mesh" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimoe import moe


def time_fn(fn, *args, repeats: int) -> float:
  """Best-of-`repeats` wall time of a compiled call, in milliseconds."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best * 1e3


def time_interleaved(fn_a, args_a, fn_b, args_b, rounds: int) -> tuple[float, float]:
  """Best-of-`rounds` times (ms) of two compiled calls, alternating a, b, a, b, ... so that the machine's load
  swings (this machine is shared) hit both alike."""
  jax.block_until_ready(fn_a(*args_a))
  jax.block_until_ready(fn_b(*args_b))
  best_a = best_b = float("inf")
  for _ in range(rounds):
    for fn, args, which in ((fn_a, args_a, "a"), (fn_b, args_b, "b")):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      elapsed = (time.perf_counter() - start) * 1e3
      if which == "a":
        best_a = min(best_a, elapsed)
      else:
        best_b = min(best_b, elapsed)
  return best_a, best_b


def peak_memory_mb(compiled) -> float:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return float("nan")
  total = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           - analysis.alias_size_in_bytes)
  return total / 2 ** 20


class DenseMlp(nnx.Module):
  def __init__(self, dim, hidden, rngs):
    self.mlp = moe.Experts(1, dim, hidden, rngs=rngs)

  def __call__(self, x):
    return self.mlp(x.reshape(1, -1, x.shape[-1])).reshape(x.shape)


def compiled_fwd_bwd(module, call, x, r):
  """(compiled fwd+bwd function of (state, x, r), state, compiled peak memory in MB)."""
  graphdef, state = nnx.split(module)
  step = jax.jit(lambda s, x, r: jax.grad(
      lambda s, x: jnp.sum(call(nnx.merge(graphdef, s), x) * r), argnums=(0, 1))(s, x))
  compiled = step.lower(state, x, r).compile()
  return compiled, state, peak_memory_mb(compiled)


def bench_moe(args):
  T, D, H = args.tokens, args.dim, args.hidden
  seq = args.seq_len
  x = jax.random.normal(jax.random.PRNGKey(0), (T // seq, seq, D))
  r = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  rows = []
  dense = {}
  for k in args.k:
    dense[k] = compiled_fwd_bwd(DenseMlp(D, k * H, nnx.Rngs(0)), lambda m, x: m(x), x, r)
    print(f"# dense MLP hidden {k}x{H}: {dense[k][2]:.0f} MB compiled peak", flush=True)

  configs = []
  for E in args.experts:
    for k in args.k:
      for grouped_matmul in args.grouped_matmul:
        configs.append(("gather", args.router, E, k, None, None, grouped_matmul))          # dropless
      for group in args.group_sizes:
        configs.append(("einsum", args.router, E, k, group, args.capacity_factor, "auto"))
      configs.append(("gather", args.router, E, k, args.group_sizes[0], args.capacity_factor, "auto"))
  header = ("| dispatch | router | E | k | group | cf | C | MoE ms | dense ms | ratio | peak MB | tokens/s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
  print(header, flush=True)
  for dispatch, router, E, k, group, cf, grouped_matmul in configs:
    layer = moe.MoeLayer(D, H, E, k, router=router, dispatch=dispatch, capacity_factor=cf, group_size=group,
                         grouped_matmul=grouped_matmul, rngs=nnx.Rngs(0))
    _, aux = layer(x)
    step, state, mem = compiled_fwd_bwd(layer, lambda m, x: m(x)[0], x, r)
    dense_step, dense_state, _ = dense[k]
    ms, dense_ms = time_interleaved(step, (state, x, r), dense_step, (dense_state, x, r), args.repeats)
    capacity = int(aux.metrics["capacity"])
    row = (f"| {dispatch}{f' dropless {grouped_matmul}' if cf is None else ''} | {router} | {E} | {k} | {group or '-'} | "
           f"{cf or '-'} | {capacity if capacity >= 0 else '-'} | {ms:.1f} | {dense_ms:.1f} | "
           f"{ms / dense_ms:.2f} | {mem:.0f} | {T / ms * 1e3:,.0f} |")
    rows.append(row)
    print(row, flush=True)
  return rows


COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter")
DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "s8": 1, "u8": 1, "pred": 1}


def type_bytes(hlo_type: str) -> int:
  """Bytes of an HLO result type such as `f32[8,16]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", hlo_type):
    total += DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def collective_bytes(hlo: str) -> dict:
  """{op: summed operand bytes} over the collectives of a compiled HLO module's text (async `-start` forms
  counted once, `-done` not)."""
  instruction = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(?:,|$)")
  sizes, totals = {}, dict.fromkeys(COLLECTIVES, 0)
  for line in hlo.splitlines():
    match = instruction.match(line)
    if not match:
      continue
    name, result_type, op, operands = match.groups()
    sizes[name] = type_bytes(result_type)
    op = op.removesuffix("-start")
    if op in totals:
      totals[op] += sum(sizes.get(operand, 0) for operand in re.findall(r"%([\w.\-]+)", operands))
  return totals


def bench_moe_mesh(args):
  """Per-device memory and collective bytes of the MoE layer's compiled forward+backward on fake-device meshes."""
  from unittest import mock
  from vimoe import parallel
  if jax.device_count() < 8:
    raise SystemExit(f"moe-mesh needs 8 devices, found {jax.device_count()}; run it as its own process "
                     "(the script sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax)")
  T, D, H, E, k = args.tokens, args.dim, args.hidden, args.experts, args.k
  x = jax.random.normal(jax.random.PRNGKey(0), (T // args.seq_len, args.seq_len, D))
  r = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  cases = [("einsum cf 1.25", dict(dispatch="einsum", capacity_factor=1.25), False),
           ("gather cf 1.25", dict(dispatch="gather", capacity_factor=1.25), False),
           ("dropless before EP (weights placed by the partitioner)",
            dict(dispatch="gather", capacity_factor=None, grouped_matmul="block_loop"), True),
           ("dropless block_loop", dict(dispatch="gather", capacity_factor=None, grouped_matmul="block_loop"), False),
           ("dropless ragged_dot", dict(dispatch="gather", capacity_factor=None, grouped_matmul="ragged_dot"), False)]
  print(f"# E={E}, k={k}, D={D}, H={H}, {T} tokens ({T // args.seq_len} x {args.seq_len}), group = sequence, "
        "forward+backward wrt parameters and input, float32; MiB per device")
  print("| mesh (data x expert) | dispatch | temp MiB | argument MiB | temp + argument MiB | all-gather MiB | "
        "all-to-all MiB | all-reduce MiB | reduce-scatter MiB | collectives MiB |\n|---|---|---|---|---|---|---|---|---|---|")
  for data, expert in args.meshes:
    mesh = parallel.make_mesh(data, expert, num_experts=E)
    for name, options, before in cases:
      layer = parallel.create_sharded(lambda: moe.MoeLayer(D, H, E, k, rngs=nnx.Rngs(0), **options), mesh)
      graphdef, state = nnx.split(layer)
      step = jax.jit(lambda s, x, r: jax.grad(
          lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x)[0] * r), argnums=(0, 1))(s, x))
      # "before": the layer as it ran before dropless expert parallelism, i.e. run_experts not told of the mesh.
      patch = mock.patch.object(moe.sharding, "current_expert_mesh", lambda: None) if before else mock.MagicMock()
      with jax.set_mesh(mesh), patch:
        compiled = step.lower(state, x, r).compile()
      memory = compiled.memory_analysis()
      totals = collective_bytes(compiled.as_text())
      mib = lambda b: f"{b / 2 ** 20:.2f}"
      print(f"| {data}x{expert} | {name} | {mib(memory.temp_size_in_bytes)} | {mib(memory.argument_size_in_bytes)} | "
            f"{mib(memory.temp_size_in_bytes + memory.argument_size_in_bytes)} | "
            + " | ".join(mib(totals[op]) for op in COLLECTIVES) + f" | {mib(sum(totals.values()))} |", flush=True)


# The paper configs' MoE shapes: (name, D, H, E, k, activation, rows per chip at the paper batch on 8 chips).
PAPER_MOE_SHAPES = (
    ("ViMoE-S/14 (1024 x 257 tokens)", 384, 1536, 8, 1, "gelu", 1024 * 257 // 8),
    ("ViMoE-B/14 (1024 x 257 tokens)", 768, 3072, 8, 1, "gelu", 1024 * 257 // 8),
    ("LSTM MoE-256 (256 x 256 tokens)", 512, 1024, 256, 4, "relu", 256 * 256 // 8),
    ("UMoE base FFN (one 16k-token microbatch)", 768, 192, 128, 15, "gelu", 16384),
)


def bench_grouped_matmul(args):
  """The TPU compiler's cost of each grouped_matmul method at the paper configs' MoE shapes (one chip's rows)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from vimoe import parallel
  from vimoe.moe import sharding as moe_sharding
  from vimoe.parallel import aot
  topology = aot.get_topology(args.topology)
  chips = len(topology.devices)
  mesh = parallel.make_mesh(data=chips, expert=1, devices=topology.devices)
  print(f"# {args.topology} ({aot.chip_for(args.topology).name}), compiled ahead of time; per chip: the chip's rows, "
        "all E experts local; forward+backward, bfloat16 rows and weights")
  chip = aot.chip_for(args.topology)
  print("| shape | rows x k | grouped_matmul | GFLOP | GiB accessed | roofline ms | temp + argument MiB | "
        "compile s |\n|---|---|---|---|---|---|---|---|")
  for name, D, H, E, k, activation, rows in PAPER_MOE_SHAPES:
    if args.shapes and not any(s.lower() in name.lower() for s in args.shapes):
      continue
    params = {"w_in": (E, D, H), "b_in": (E, H), "w_out": (E, H, D), "b_out": (E, D)}
    struct = lambda shape, spec: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    abstract_params = {key: struct(shape, P()) for key, shape in params.items()}
    x = struct((rows * chips, D), P("data"))
    index = jax.ShapeDtypeStruct((rows * chips, k), jnp.int32, sharding=NamedSharding(mesh, P("data")))
    gates = struct((rows * chips, k), P("data"))
    for method in args.methods:
      def local(params, x, index, gates, method=method):
        def loss(params, x):
          y = moe_sharding.local_dropless(x, index, gates, E, params, activation, method, None)
          return jnp.sum(y.astype(jnp.float32) ** 2)
        grads = jax.grad(loss, argnums=(0, 1))(params, x)
        return jax.tree.map(lambda g: jax.lax.psum(g, "data"), grads[0]), grads[1]
      spec = {key: P() for key in params}
      step = jax.shard_map(local, mesh=mesh, in_specs=(spec, P("data"), P("data"), P("data")),
                           out_specs=(spec, P("data")), check_vma=False)
      start = time.perf_counter()
      try:
        compiled = jax.jit(step).lower(abstract_params, x, index, gates).compile()
      except Exception as error:  # a method that does not lower here: say so in the table
        print(f"| {name} | {rows} x {k} | {method} | does not compile: {str(error).splitlines()[0][:90]} | | | | |",
              flush=True)
        continue
      seconds = time.perf_counter() - start
      cost = compiled.cost_analysis()
      memory = compiled.memory_analysis()
      print(f"| {name} | {rows} x {k} | {method} | {cost.get('flops', 0) / 1e9:.1f} | "
            f"{cost.get('bytes accessed', 0) / 2**30:.2f} | "
            f"{aot.roofline(cost.get('flops', 0), cost.get('bytes accessed', 0), chip)['step_s'] * 1e3:.2f} | "
            f"{(memory.temp_size_in_bytes + memory.argument_size_in_bytes) / 2**20:.1f} | {seconds:.0f} |",
            flush=True)


def bench_vit(args):
  import pathlib
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  import optax
  from configs import vimoe_s14_in1k, vit_s14_in1k
  from vimoe.models import build_vit, vit as vit_lib

  images = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.image_size, args.image_size, 3))
  labels = jnp.arange(args.batch) % 1000
  print("| model | params (M) | activated (M) | step ms | ratio | images/s | peak MB |\n|---|---|---|---|---|---|---|")
  results = {}
  for name, module in (("dense ViT-S/14", vit_s14_in1k), ("ViMoE-S/14 L=2 N=8 k=1 +shared", vimoe_s14_in1k)):
    config = module.get_config().model
    config.image_size = args.image_size
    model = build_vit(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

    def loss_fn(m):
      logits, aux = m(images, deterministic=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() + sum(aux["losses"].values())

    @nnx.jit
    def step(m, opt):
      loss, grads = nnx.value_and_grad(loss_fn)(m)
      opt.update(m, grads)
      return loss

    graphdef, state = nnx.split((model, optimizer))
    compiled = jax.jit(lambda s: step(*nnx.merge(graphdef, s))).lower(state).compile()
    ms = time_fn(step, model, optimizer, repeats=args.repeats)
    results[name] = ms
    base = next(iter(results.values()))
    print(f"| {name} | {vit_lib.count_params(model) / 1e6:.1f} | {vit_lib.activated_params(model) / 1e6:.1f} | "
          f"{ms:.0f} | {ms / base:.3f} | {args.batch / ms * 1e3:.1f} | {peak_memory_mb(compiled):.0f} |", flush=True)


def bench_trainer(args):
  import json
  import pathlib
  import statistics
  import tempfile
  from ml_collections import config_flags
  from absl import flags as absl_flags
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  os.environ["VIMOE_NO_PROGRESS"] = "1"  # no progress bar: the loop itself is measured
  from vimoe.train import trainer

  # The config exactly as scripts/train.py would see it with the same --config.KEY=VALUE overrides.
  windows = 1 + args.steps // args.window
  total = windows * args.window
  overrides = [f"--config.{item}" for item in args.set] + [
      f"--config.total_steps={total}", f"--config.log_every={args.window}", f"--config.eval_every={total}",
      f"--config.checkpoint_every={total}"]
  argv = ["benchmark", f"--config={args.config}", *overrides]
  flag_values = absl_flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  print(f"# {args.config} {' '.join(overrides)}: batch {config.batch_size}, {total} steps "
        f"({windows} windows of {args.window}, the first dropped)", flush=True)

  # The bare step: the same task loss and optimizer update, jitted over the split (model, optimizer) state with
  # the state donated, on the batches the trainer's data pipeline yields (loaded and placed beforehand).
  task, model, optimizer = trainer.build(config)
  data = iter(task.build_data(config, config.data.train_split, train=True, seed=config.seed,
                              batch_size=config.batch_size))
  batches = [jax.device_put(next(data)) for _ in range(total)]
  graphdef, state = nnx.split((model, optimizer))

  def bare_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    grad_fn = nnx.value_and_grad(lambda m: task.loss(m, batch, config), argnums=nnx.DiffState(0, optimizer.wrt),
                                 has_aux=True)
    (_, metrics), grads = grad_fn(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), metrics["train/loss"]

  bare_step = jax.jit(bare_step, donate_argnums=0)

  def time_bare(state):
    per_step = []
    for w in range(windows):
      start = time.perf_counter()
      for batch in batches[w * args.window:(w + 1) * args.window]:
        state, loss = bare_step(state, batch)
      jax.block_until_ready((state, loss))
      per_step.append((time.perf_counter() - start) / args.window * 1e3)
    return state, per_step[1:]

  state, bare_before = time_bare(state)
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train_and_evaluate(config, workdir)
    lines = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  trained = [config.batch_size / line["train/examples_per_sec"] * 1e3 for line in lines
             if "train/examples_per_sec" in line][1:]
  state, bare_after = time_bare(state)
  bare = bare_before + bare_after
  med = statistics.median
  print("| trainer ms/step (median, min) | bare step ms/step (median, min) | ratio (medians) | ratio (minima) |\n"
        "|---|---|---|---|")
  print(f"| {med(trained):.1f}, {min(trained):.1f} | {med(bare):.1f}, {min(bare):.1f} | "
        f"{med(trained) / med(bare):.3f} | {min(trained) / min(bare):.3f} |", flush=True)
  return med(trained) / med(bare)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="what", required=True)
  p = sub.add_parser("moe", help="MoE layer vs dense MLP of the same active compute")
  ints = lambda s: [int(v) for v in s.split(",")]
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (the default routing group)")
  p.add_argument("--dim", type=int, default=384)
  p.add_argument("--hidden", type=int, default=1536)
  p.add_argument("--experts", type=ints, default=[8, 32, 64])
  p.add_argument("--k", type=ints, default=[1, 2])
  p.add_argument("--group-sizes", type=ints, default=[256, 1024])
  p.add_argument("--capacity-factor", type=float, default=1.25)
  p.add_argument("--router", default="top_k", choices=moe.ROUTERS)
  p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (best of)")
  p.add_argument("--grouped-matmul", type=lambda s: s.split(","), default=["block_loop", "ragged_dot"],
                 help="the dropless rows' local computes (MoeConfig.grouped_matmul)")
  p = sub.add_parser("moe-mesh", help="per-device memory and collective bytes of the MoE layer on 8 fake devices")
  p.add_argument("--tokens", type=int, default=2048)
  p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (the routing group)")
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--k", type=int, default=2)
  p.add_argument("--meshes", type=lambda s: [tuple(int(v) for v in m.split("x")) for m in s.split(",")],
                 default=[(1, 8), (2, 4)], help="data x expert shapes")
  p = sub.add_parser("grouped-matmul", help="TPU compiler's cost of each grouped_matmul method (needs libtpu)")
  p.add_argument("--topology", default="v5e:2x2", help="TPU slice to compile for (one chip's share is reported)")
  p.add_argument("--methods", type=lambda s: s.split(","), default=["block_loop", "ragged_dot", "gmm"],
                 help="grouped_matmul methods (MoeConfig.grouped_matmul)")
  p.add_argument("--shapes", type=lambda s: s.split(","), default=[],
                 help="only the paper shapes whose name contains one of these (default: all)")
  p = sub.add_parser("vit", help="ViMoE-S/14 vs dense ViT-S/14 train step")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--repeats", type=int, default=3)
  p = sub.add_parser("trainer", help="the trainer loop's time per step vs the bare compiled step")
  p.add_argument("--config", default="configs/quickstart.py")
  p.add_argument("--steps", type=int, default=60, help="timed steps (after one compiling window)")
  p.add_argument("--window", type=int, default=10, help="steps per timing window (the trainer's log_every)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override, as --config.KEY=VALUE of scripts/train.py (repeatable)")
  args = parser.parse_args(argv)
  print(f"# {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, {len(jax.devices())} device(s)")
  print("# command: python " + " ".join(sys.argv))
  if args.what == "moe":
    bench_moe(args)
  elif args.what == "moe-mesh":
    bench_moe_mesh(args)
  elif args.what == "grouped-matmul":
    bench_grouped_matmul(args)
  elif args.what == "vit":
    bench_vit(args)
  elif args.what == "trainer":
    bench_trainer(args)


if __name__ == "__main__":
  main()
