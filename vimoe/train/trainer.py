"""The one trainer for every task: create state, train step, evaluation, checkpoints, metrics, progress.

    train_and_evaluate(config, workdir) -> final evaluation metrics

The workdir gets `config.json` (the resolved config), `metrics.jsonl` (one JSON object per line, always with
`step`), TensorBoard event files under `tensorboard/`, and orbax checkpoints under `checkpoints/` holding the
model, the optimizer, the data iterator and the step. Running the same command again resumes from the latest
checkpoint; orbax writes each checkpoint to a temporary directory and renames it when complete, so a killed run
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from vimoe import parallel
from vimoe.parallel.distributed import is_main_process
from vimoe.train.optim import create_optimizer, learning_rate_schedule
from vimoe.train.tasks import get_task

# Keys every config has (configs/*.py); checked before anything is built or compiled.
REQUIRED_KEYS = ("task", "seed", "batch_size", "total_steps", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints", "label_smoothing", "optim", "model", "data")


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


def validate_config(config) -> None:
  missing = [key for key in REQUIRED_KEYS if key not in config]
  if missing:
    raise ValueError(f"config is missing key(s) {missing}; every config needs {list(REQUIRED_KEYS)}")
  for key in ("batch_size", "total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f"config.{key}={config[key]!r} must be a positive integer")
  if not 0 <= config.label_smoothing < 1:
    raise ValueError(f"config.label_smoothing={config.label_smoothing!r} must be in [0, 1)")
  optim = config.optim
  if not optim.lr > 0:
    raise ValueError(f"config.optim.lr={optim.lr!r} must be > 0")
  if not 0 < optim.layer_decay <= 1:
    raise ValueError(f"config.optim.layer_decay={optim.layer_decay!r} must be in (0, 1]")
  if optim.total_steps != config.total_steps:
    raise ValueError(f"config.optim.total_steps={optim.total_steps!r} differs from config.total_steps="
                     f"{config.total_steps!r}; set both (configs use a FieldReference so they follow each other)")


class MetricWriter:
  """metrics.jsonl + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.enabled = is_main_process()
    self.path = workdir / "metrics.jsonl"
    self.tensorboard = None
    if not self.enabled:
      return
    if self.path.exists():  # drop lines from after the checkpoint we resume from: they will be redone
      lines = [line for line in self.path.read_text().splitlines()
               if line.strip() and json.loads(line)["step"] <= resume_step]
      self.path.write_text("".join(line + "\n" for line in lines))
    from tensorboardX import SummaryWriter
    self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    for key, value in metrics.items():
      value = np.asarray(value)
      record[key] = value.tolist() if value.ndim else float(value)
      if value.ndim == 0:
        self.tensorboard.add_scalar(key, float(value), step)
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    self.tensorboard.flush()

  def close(self):
    if self.tensorboard is not None:
      self.tensorboard.close()


def _checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(workdir / "checkpoints", options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "data": grain.checkpoint.CheckpointHandler()})


# Everything in the model but RNG keys (re-derived from the seed; the RNG counters are saved, so a resumed run
# draws the same random numbers as an uninterrupted one).
_SAVED = nnx.Not(nnx.RngKey)


def _train_state(model, optimizer):
  return {"model": nnx.state(model, _SAVED), "optimizer": nnx.state(optimizer, _SAVED)}


def build_mesh(config):
  """The ('data', 'expert') mesh from config.mesh when there is more than one device, else None."""
  if jax.device_count() == 1 or config.get("mesh") is None:
    return None
  moe_config = config.model.get("moe") if "model" in config else None
  num_experts = moe_config.num_experts if moe_config is not None and moe_config.get("layers", "none") != "none" \
      else None
  return parallel.mesh_from_config(config.mesh, num_experts=num_experts)


def build(config, mesh=None):
  """Task, model and optimizer for `config` (no data, no checkpoint). With a mesh, parameters and optimizer state
  are created sharded by the partition rules (experts on 'expert', the rest replicated)."""
  validate_config(config)
  task = get_task(config.task)
  make_model = lambda: task.build_model(config, nnx.Rngs(params=config.seed, noise=config.seed + 1,
                                                        dropout=config.seed + 2))
  # What the optimizer updates (a task may freeze parts, e.g. a linear probe on a frozen backbone).
  trainable = task.trainable(config) if hasattr(task, "trainable") else nnx.Param
  if mesh is None:
    model = make_model()
    optimizer = nnx.Optimizer(model, create_optimizer(config.optim, task.depth(model)), wrt=trainable)
    return task, model, optimizer
  with jax.set_mesh(mesh):
    model = parallel.create_sharded(make_model, mesh)
    optimizer = nnx.Optimizer(model, create_optimizer(config.optim, task.depth(model)), wrt=trainable)
    nnx.update(optimizer, parallel.shard_tree(nnx.state(optimizer), mesh))
  return task, model, optimizer


def _mesh_scope(mesh):
  """`with jax.set_mesh(mesh)` (MoE layers then shard experts), or nothing on one device."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _place(batch, mesh):
  """This process's rows of the global batch -> global arrays split over ('data', 'expert') on the batch axis."""
  if mesh is None:
    return batch
  axes = parallel.partition_axes(mesh)
  spec = jax.sharding.PartitionSpec(axes)
  rows = len(jax.tree.leaves(batch)[0])
  shards = math.prod(mesh.shape[axis] for axis in axes)
  if (rows * jax.process_count()) % shards:
    # E.g. ADE20K evaluation: one image of its own size per step. One process: every device gets the whole
    # batch (replicated). Several processes would each hold another image, which cannot be replicated.
    if jax.process_count() > 1:
      raise ValueError(f"a batch of {rows} rows per process cannot be split over the {shards} devices of the "
                       f"mesh's batch axes {axes}; use a batch size divisible by {shards}")
    spec = jax.sharding.PartitionSpec()
  sharding = jax.sharding.NamedSharding(mesh, spec)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def evaluate(task, model, config, eval_step=None, mesh=None) -> dict:
  """One pass over the evaluation split; statistics summed over batches, then summarised by the task."""
  data = task.build_data(config, config.data.eval_split, train=False, seed=config.seed,
                         batch_size=config.get("eval_batch_size", config.batch_size))
  eval_step = eval_step or nnx.jit(lambda m, b: task.eval_batch(m, b))
  sums = None
  for batch in data:
    with _mesh_scope(mesh):
      out = jax.device_get(eval_step(model, _place(batch, mesh)))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  return task.summarize(sums)


def train_and_evaluate(config, workdir) -> dict:
  workdir = pathlib.Path(workdir).absolute()  # orbax refuses relative checkpoint paths
  validate_config(config)
  mesh = build_mesh(config)
  task, model, optimizer = build(config, mesh)
  if mesh is not None and is_main_process():
    print(f"Mesh: {parallel.mesh_summary(mesh)}", flush=True)
  workdir.mkdir(parents=True, exist_ok=True)
  if is_main_process():
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

  train_data = task.build_data(config, config.data.train_split, train=True, seed=config.seed,
                               batch_size=config.batch_size)
  train_iter = iter(train_data)
  manager = _checkpoint_manager(workdir, config)
  start_step = manager.latest_step() or 0
  if start_step:
    restored = manager.restore(start_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_train_state(model, optimizer)),
        data=grain.checkpoint.CheckpointRestore(train_iter)))
    nnx.update(model, restored.state["model"])
    nnx.update(optimizer, restored.state["optimizer"])
    print(f"Resumed from step {start_step} ({manager.directory / str(start_step)})", flush=True)
  elif config.get("init") and config.init.get("checkpoint"):
    task.load_pretrained(model, config)
    print(f"Initialised from {config.init.checkpoint}", flush=True)

  @nnx.jit
  def train_step(model, optimizer, batch):
    grad_fn = nnx.value_and_grad(lambda m: task.loss(m, batch, config), argnums=nnx.DiffState(0, optimizer.wrt),
                                 has_aux=True)
    (_, metrics), grads = grad_fn(model)
    optimizer.update(model, grads)
    return metrics

  eval_step = nnx.jit(lambda m, b: task.eval_batch(m, b))
  schedule = learning_rate_schedule(config.optim)
  writer = MetricWriter(workdir, start_step)
  final = {}
  progress = tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step",
                  disable=not is_main_process() or os.environ.get("VIMOE_NO_PROGRESS") == "1", dynamic_ncols=True)
  window_start, window_examples = time.perf_counter(), 0
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      batch = _place(next(train_iter), mesh)
      with _mesh_scope(mesh):
        metrics = train_step(model, optimizer, batch)
      loss = float(metrics["train/loss"])
      if not math.isfinite(loss):
        last = manager.latest_step()
        where = f"{manager.directory / str(last)} (step {last})" if last is not None else "none (no checkpoint yet)"
        raise TrainingDiverged(f"loss is {loss} at step {step}; stopping. Last good checkpoint: {where}")
      window_examples += config.batch_size
      progress.update(1)
      if step % config.log_every == 0 or step == config.total_steps:
        elapsed = time.perf_counter() - window_start
        metrics = dict(jax.device_get(metrics))
        metrics["train/lr"] = float(schedule(step - 1))
        metrics["train/examples_per_sec"] = window_examples / max(elapsed, 1e-9)
        progress.set_postfix(loss=f"{loss:.4f}", ex_s=f"{metrics['train/examples_per_sec']:.0f}")
        writer.write(step, metrics)
        window_start, window_examples = time.perf_counter(), 0
      if step % config.checkpoint_every == 0 or step == config.total_steps:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_train_state(model, optimizer)),
                                                   data=grain.checkpoint.CheckpointSave(train_iter)))
      if step % config.eval_every == 0 or step == config.total_steps:
        final = evaluate(task, model, config, eval_step, mesh)
        writer.write(step, final)
        progress.write(f"step {step}: {headline(final)}")
        if hasattr(task, "after_evaluation") and is_main_process():  # per-class tables, pictures
          task.after_evaluation(model, config, workdir, step, final)
  finally:
    progress.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
  if not final:  # resumed a finished run: evaluate the final state again
    final = evaluate(task, model, config, eval_step, mesh)
  return final


def headline(metrics: dict) -> dict:
  """The top-level scalar metrics ('eval/top1', 'eval/loss', ...), rounded for printing."""
  return {key: round(value, 4) for key, value in metrics.items()
          if isinstance(value, float) and key.count("/") == 1}


def load_for_evaluation(workdir, step: int | None = None):
  """Rebuilds the model from workdir/config.json and restores a checkpoint (the latest by default)."""
  import ml_collections
  workdir = pathlib.Path(workdir).absolute()
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} not found: is {workdir} a training workdir?")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  task, model, optimizer = build(config)
  with _checkpoint_manager(workdir, config) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {workdir / 'checkpoints'}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_train_state(model, optimizer))))
  nnx.update(model, restored.state["model"])
  return config, task, model, step
