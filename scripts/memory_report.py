"""Per-device memory of a config's train step on a mesh, from shapes only (nothing is allocated).

    python scripts/memory_report.py --config configs/vimoe_s14_in1k.py --mesh-expert 8 [--config.KEY=VALUE ...]
    python scripts/memory_report.py --config configs/lstm_moe4096h_lm1b.py --mesh-expert 8 --no-compile

Runs on `--devices` fake CPU devices (default 8; XLA_FLAGS is set before jax starts). It builds the trainer's
task, model and optimizer under `nnx.eval_shape` (vimoe.train.trainer.build, abstractly), gives every array of
the (model, optimizer) state the sharding the trainer gives it (vimoe.parallel.partition_specs: experts split
over 'expert', the rest replicated), and prints the per-device bytes of the expert parameters, their optimizer
state and the rest. Unless --no-compile, it then lowers and compiles the trainer's train step
(trainer.make_train_step) with ShapeDtypeStruct inputs carrying those shardings and an abstract batch split over
the mesh's batch axes, and prints the compiled executable's per-device argument / output / temp bytes
(`compiled.memory_analysis()`) and the per-device bytes of the state as the executable's input shardings hold
it. Numbers: docs/benchmarks.md, "Paper configs on an 8-device mesh".

With --topology NAME (a TPU slice such as v5e:2x4, v4:2x2x1, v5p:4x4x4, v6e:2x2) the same train step is compiled by
the TPU compiler for that slice, ahead of time, on this machine (no TPU needed; libtpu is: run it with
.venv-tpu/bin/python, built by `make tpu-venv`). The mesh is the config's `mesh` block over the slice's chips
(sizes left None inferred as the trainer infers them; --mesh-expert/--mesh-data override), and the report adds,
per chip: the sum of state, batch and temporaries against the chip's HBM (fits or not, by how much), the
compiler's FLOPs and bytes accessed per step, the bytes of each kind of collective, and a roofline estimate of
the step time and MFU from the chip's published peak bf16 FLOP/s and HBM bandwidth (vimoe/parallel/aot.py cites
them):

    .venv-tpu/bin/python scripts/memory_report.py --config configs/vimoe_s14_in1k.py --topology v5e:2x4 \
        --config.microbatches=4 --config.model.remat=full
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import sys
import time


def _early_args(argv: list[str]) -> None:
  """--devices must reach XLA_FLAGS before jax is imported; --topology needs libtpu loadable next to other
  processes (and no fake CPU devices)."""
  if any(arg == "--topology" or arg.startswith("--topology=") for arg in argv):
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # as vimoe.parallel.aot.enable_concurrent_libtpu
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs eval_shape; the TPU compiler gets the program
    return
  devices = 8
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      devices = int(arg.split("=", 1)[1])
    elif arg == "--devices" and i + 1 < len(argv):
      devices = int(argv[i + 1])
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
  _early_args(sys.argv)
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # configs/ and vimoe/

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position

from vimoe import parallel  # pylint: disable=wrong-import-position
from vimoe.parallel import aot  # pylint: disable=wrong-import-position
from vimoe.parallel.partition import path_string  # pylint: disable=wrong-import-position


def abstract_batch(config, mesh) -> dict:
  """ShapeDtypeStructs of one training batch of `config`, split over the mesh's batch axes."""
  sharding = NamedSharding(mesh, P(parallel.partition_axes(mesh)))
  b, task, data = config.batch_size, config.task, config.data
  if task == "classification":
    size = data.image_size
    shapes = {"image": ((b, size, size, 3), jnp.float32), "label": ((b,), jnp.int32)}
  elif task == "language_model":
    t = data.seq_len
    shapes = {"inputs": ((b, t), jnp.int32), "targets": ((b, t), jnp.int32), "mask": ((b, t), jnp.float32)}
  elif task == "segmentation":
    size = data.get("crop_size") or data.get("canvas_size")
    shapes = {"image": ((b, size, size, 3), jnp.float32), "label": ((b, size, size), jnp.int32)}
  else:
    raise ValueError(f"config.task={task!r}: no abstract batch for it; known: classification, language_model, "
                     f"segmentation")
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for key, (shape, dtype) in shapes.items()}


def abstract_train_state(config, mesh):
  """(task, graphdef, state) with `state` the (model, optimizer) state as ShapeDtypeStructs carrying the shardings
  the trainer gives them on `mesh` (nothing allocated)."""
  from vimoe.train import trainer  # pylint: disable=import-outside-toplevel
  task = trainer.get_task(config.task)
  with jax.set_mesh(mesh):
    model, optimizer = nnx.eval_shape(lambda: trainer.build(config)[1:])
  graphdef, state = nnx.split((model, optimizer))
  return task, graphdef, parallel.abstract_with_shardings(state, mesh)


def leaf_bytes(leaf, sharding=None) -> tuple[int, int]:
  """(total bytes, bytes per device) of an array of `leaf`'s shape and dtype under `sharding` (default its own)."""
  sharding = sharding if sharding is not None else leaf.sharding
  itemsize = leaf.dtype.itemsize  # RNG keys (key<fry>) included: their dtype knows its size
  return math.prod(leaf.shape) * itemsize, math.prod(sharding.shard_shape(leaf.shape)) * itemsize


def state_bytes(state, shardings=None) -> dict:
  """{(part, kind): [total bytes, bytes per device]}: part 'model' or 'optimizer', kind 'experts' (the arrays the
  rules split over 'expert') or 'other'."""
  sums = {}
  leaves = jax.tree_util.tree_leaves_with_path(state)
  sharding_leaves = ([None] * len(leaves) if shardings is None
                     else jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))
  if len(sharding_leaves) != len(leaves):
    raise ValueError(f"{len(sharding_leaves)} shardings for {len(leaves)} state arrays")
  specs = jax.tree.leaves(parallel.partition_specs(state), is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), sharding, spec in zip(leaves, sharding_leaves, specs):
    part = "model" if path_string(path[:1]) == "0" else "optimizer"
    kind = "experts" if "expert" in jax.tree.leaves(tuple(spec)) else "other"
    total, per_device = leaf_bytes(leaf, sharding)
    entry = sums.setdefault((part, kind), [0, 0])
    entry[0] += total
    entry[1] += per_device
  return sums


def config_num_experts(config) -> int | None:
  """What the 'expert' axis must divide: the experts' stacked leading axis, from the model's shapes (None for a
  dense model); the trainer infers its mesh from the same number."""
  from vimoe.train import trainer  # pylint: disable=import-outside-toplevel
  return trainer.model_expert_count(config)


def report_mesh(config, expert: int | None, data: int | None, devices=None):
  """The mesh to compile on: the flags' sizes, else the config's `mesh` block, with sizes left None inferred from
  the devices and the number of experts (as the trainer infers them)."""
  mesh_config = config.get("mesh") or {}
  if expert is None and data is None:
    expert, data = mesh_config.get("expert"), mesh_config.get("data")
  return parallel.make_mesh(data, expert, mesh_config.get("model", 1) or 1, num_experts=config_num_experts(config),
                            devices=devices)


def report(config, expert: int | None, data: int | None = None, compile_step: bool = True,
           topology: str | None = None) -> dict:
  """The numbers the script prints, as a dict (bytes per device unless 'total' is in the key). With `topology`
  (e.g. 'v5e:2x4') the step is compiled for that TPU slice and the dict also holds the chip, peak bytes,
  FLOPs, collectives and the roofline."""
  from vimoe.train import trainer  # pylint: disable=import-outside-toplevel
  devices = chip = None
  if topology is not None:
    aot.check_topology_name(topology)
    chip = aot.chip_for(topology)
    devices = aot.get_topology(topology).devices
  elif expert is None and data is None:
    expert = 8  # the CPU report's default: 8 fake devices, all on 'expert'
  mesh = report_mesh(config, expert, data, devices)
  start = time.perf_counter()
  task, graphdef, state = abstract_train_state(config, mesh)
  out = {"mesh": parallel.mesh_summary(mesh), "num_experts": config_num_experts(config),
         "state": state_bytes(state), "eval_shape_s": time.perf_counter() - start, "topology": topology,
         "chip": chip, "microbatches": config.get("microbatches", 1), "remat": config.model.get("remat", "none"),
         "dtype": config.model.get("dtype", "float32"), "batch_size": config.batch_size}
  if not compile_step:
    return out
  guard = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
                       jax.eval_shape(lambda: trainer._initial_guard(0)))  # pylint: disable=protected-access
  batch = abstract_batch(config, mesh)
  step = trainer.make_train_step(task, config, graphdef)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(state, guard, batch).compile()
  out["compile_s"] = time.perf_counter() - start
  out["compiled_state"] = state_bytes(state, compiled.input_shardings[0][0])
  memory = compiled.memory_analysis()
  out["argument"], out["output"] = memory.argument_size_in_bytes, memory.output_size_in_bytes
  out["alias"], out["temp"] = memory.alias_size_in_bytes, memory.temp_size_in_bytes
  out["peak"] = aot.peak_bytes(memory)
  out["batch_per_device"] = sum(leaf_bytes(leaf)[1] for leaf in jax.tree.leaves(batch))
  out["guard"] = sum(leaf_bytes(leaf)[1] for leaf in jax.tree.leaves(guard))
  out["flops"], out["bytes_accessed"] = _cost(compiled)
  microbatches = config.get("microbatches", 1)
  if microbatches > 1:
    # The compiler's cost analysis counts a loop body once, not once per trip, so the microbatched step's own
    # figures hold one microbatch's forward and backward. Per step: the cost of the step on one microbatch
    # (compiled on its own) times their number, which counts the optimizer update `microbatches` times
    # instead of once (a few FLOPs per parameter: small next to the forward and backward).
    single = config.copy_and_resolve_references()
    single.batch_size, single.microbatches = config.batch_size // microbatches, 1
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      one = trainer.make_train_step(task, single, graphdef).lower(state, guard, abstract_batch(single, mesh)).compile()
    out["compile_s"] += time.perf_counter() - start
    flops, bytes_accessed = _cost(one)
    out["flops"], out["bytes_accessed"] = flops * microbatches, bytes_accessed * microbatches
  out["collectives"] = aot.collective_bytes(compiled.as_text())
  if chip is not None:
    out["roofline"] = aot.roofline(out["flops"], out["bytes_accessed"], chip)
  out["compiled"] = compiled
  return out


def _cost(compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per device of a compiled program, from the compiler's cost analysis."""
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def summary_row(out: dict) -> dict:
  """The JSON-able numbers of a report (what --output writes)."""
  row = {key: value for key, value in out.items() if key not in ("compiled", "state", "compiled_state", "chip")}
  row["state"] = {f"{part}/{kind}": per_device for (part, kind), (_, per_device) in out["state"].items()}
  if out.get("chip") is not None:
    row["chip"] = out["chip"].name
    row["hbm"] = out["chip"].hbm_bytes
    row["fits"] = out["peak"] <= out["chip"].hbm_bytes if "peak" in out else None
  return row


def _gib(n: int) -> str:
  return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def print_report(out: dict) -> None:
  where = f"TPU slice {out['topology']} ({out['chip'].name}), " if out.get("topology") else ""
  print(f"{where}mesh {out['mesh']}, {out['num_experts']} experts, batch {out['batch_size']} in "
        f"{out['microbatches']} microbatch(es), remat {out['remat']}, compute {out['dtype']}; per device (total "
        f"over the mesh in brackets):")
  for (part, kind), (total, per_device) in sorted(out["state"].items()):
    label = {"model": "params", "optimizer": "optimizer state"}[part]
    name = f"{'expert' if kind == 'experts' else 'other'} {label}"
    print(f"  {name:24s} {_gib(per_device):>13s}  ({_gib(total)}, 1/{total / max(per_device, 1):.2f} per device)")
  print(f"  (eval_shape: {out['eval_shape_s']:.1f} s)")
  if "compiled" not in out:
    print("  compiled step: not compiled (--no-compile)")
    return
  if out["compiled_state"] != out["state"]:
    print(f"  WARNING: the executable's input shardings give other per-device state bytes: {out['compiled_state']}")
  print(f"  compiled train step ({out['compile_s']:.1f} s): argument {_gib(out['argument'])} (state + batch "
        f"{_gib(out['batch_per_device'])}), output {_gib(out['output'])}, aliased {_gib(out['alias'])}, "
        f"temp {_gib(out['temp'])}")
  target = f"the {out['topology']} compiler's" if out.get("topology") else "XLA:CPU's"
  print(f"  peak per device (argument + output - aliased + temp + code): {_gib(out['peak'])}")
  print(f"  per step ({target} cost analysis): {out['flops'] / 1e12:.3f} TFLOP, "
        f"{_gib(out['bytes_accessed'])} accessed per device")
  if out["collectives"]:
    print("  collectives per device (result bytes; ops in loops counted once): " + ", ".join(
        f"{op} {entry['count']}x {_gib(entry['bytes'])}" for op, entry in sorted(out["collectives"].items())))
  else:
    print("  collectives: none")
  chip = out.get("chip")
  if chip is None:
    return
  margin = chip.hbm_bytes - out["peak"]
  verdict = (f"FITS in {chip.name}'s {_gib(chip.hbm_bytes)} HBM ({_gib(margin)} to spare)" if margin >= 0 else
             f"DOES NOT FIT in {chip.name}'s {_gib(chip.hbm_bytes)} HBM: {_gib(-margin)} over "
             f"({out['peak'] / chip.hbm_bytes:.2f}x)")
  print(f"  {verdict}")
  r = out["roofline"]
  print(f"  roofline ({chip.source}): compute {r['compute_s'] * 1e3:.2f} ms, HBM {r['memory_s'] * 1e3:.2f} ms "
        f"-> step >= {r['step_s'] * 1e3:.2f} ms ({r['bound']}-bound), MFU <= {r['mfu']:.2f}; collectives and "
        f"overheads not included")


def main(argv) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  try:
    out = report(_CONFIG.value, f.mesh_expert, f.mesh_data, not f.no_compile, f.topology)
  except (ValueError, RuntimeError) as error:  # bad topology or mesh, no libtpu: the message names it
    sys.exit(f"memory_report.py: {error}")
  print_report(out)
  if f.output:
    pathlib.Path(f.output).write_text(json.dumps(summary_row(out), indent=2, default=str) + "\n")
    print(f"wrote {f.output}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally :ARG).",
                                            lock_config=False)
  flags.DEFINE_integer("mesh_expert", None, "Size of the mesh's 'expert' axis (default: 8 on CPU; with --topology "
                       "the config's mesh block, inferred).")
  flags.DEFINE_integer("mesh_data", None, "Size of the 'data' axis (default: the devices left).")
  flags.DEFINE_integer("devices", 8, "Fake CPU devices (set before jax starts; ignored with --topology).")
  flags.DEFINE_bool("no_compile", False, "Only the eval_shape numbers (parameter and optimizer bytes).")
  flags.DEFINE_string("topology", None, "Compile for this TPU slice instead of CPU, e.g. " +
                      ", ".join(aot.EXAMPLE_TOPOLOGIES) + " (needs libtpu: .venv-tpu/bin/python).")
  flags.DEFINE_string("output", None, "Also write the numbers to this JSON file.")
  flags.mark_flags_as_required(["config"])
  sys.argv = [{"--mesh-expert": "--mesh_expert", "--mesh-data": "--mesh_data", "--no-compile": "--no_compile"}.get(
      arg.split("=", 1)[0], arg.split("=", 1)[0]) + arg[len(arg.split("=", 1)[0]):] for arg in sys.argv]
  app.run(main)
