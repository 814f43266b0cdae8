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
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import sys
import time


def _early_args(argv: list[str]) -> None:
  """--devices must reach XLA_FLAGS before jax is imported."""
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


def report(config, expert: int, data: int | None = None, compile_step: bool = True) -> dict:
  """The numbers the script prints, as a dict (bytes per device unless 'total' is in the key)."""
  from vimoe.train import trainer  # pylint: disable=import-outside-toplevel
  moe = config.model.get("moe")
  num_experts = None
  if moe is not None:
    num_experts = moe.get("num_experts") or moe.get("num_groups", 0) * moe.get("experts_per_group", 0) or None
  mesh = parallel.make_mesh(data, expert)
  start = time.perf_counter()
  task, graphdef, state = abstract_train_state(config, mesh)
  out = {"mesh": parallel.mesh_summary(mesh), "num_experts": num_experts,
         "state": state_bytes(state), "eval_shape_s": time.perf_counter() - start}
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
  out["batch_per_device"] = sum(leaf_bytes(leaf)[1] for leaf in jax.tree.leaves(batch))
  out["guard"] = sum(leaf_bytes(leaf)[1] for leaf in jax.tree.leaves(guard))
  out["compiled"] = compiled
  return out


def _gib(n: int) -> str:
  return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def print_report(out: dict) -> None:
  print(f"mesh {out['mesh']}, {out['num_experts']} experts; per device (total over the mesh in brackets):")
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


def main(argv) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  print_report(report(_CONFIG.value, flags.FLAGS.mesh_expert, flags.FLAGS.mesh_data, not flags.FLAGS.no_compile))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally :ARG).",
                                            lock_config=False)
  flags.DEFINE_integer("mesh_expert", 8, "Size of the mesh's 'expert' axis.")
  flags.DEFINE_integer("mesh_data", None, "Size of the 'data' axis (default: the devices left).")
  flags.DEFINE_integer("devices", 8, "Fake CPU devices (set before jax starts).")
  flags.DEFINE_bool("no_compile", False, "Only the eval_shape numbers (parameter and optimizer bytes).")
  flags.mark_flags_as_required(["config"])
  sys.argv = [{"--mesh-expert": "--mesh_expert", "--mesh-data": "--mesh_data", "--no-compile": "--no_compile"}.get(
      arg.split("=", 1)[0], arg.split("=", 1)[0]) + arg[len(arg.split("=", 1)[0]):] for arg in sys.argv]
  app.run(main)
