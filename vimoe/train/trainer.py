"""The one trainer for every task: create state, train step, evaluation, checkpoints, metrics, progress.

    train_and_evaluate(config, workdir) -> final evaluation metrics

What the workdir holds (config.json, metrics.jsonl, tensorboard/, orbax checkpoints of the model, optimizer,
data iterator and step, run.lock, config_changes.jsonl), how a rerun resumes from the newest checkpoint that
restores, the one-run-per-workdir flock and the keys a rerun may change (SAFE_TO_CHANGE): docs/workdirs.md.

The loop never waits on the device between steps: the train step is one `jax.jit` over the split (model,
optimizer) state, which it donates, and returns an on-device guard (the first step whose loss or updated
parameters were not finite); the host reads it back only at logging, checkpoint and evaluation steps. A
checkpoint is written only from state that every step so far kept finite and whose parameters give a finite loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import math
import os
import pathlib
import shutil
import socket
import sys
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from vimoe import parallel
from vimoe.models.params import flatten_dict
from vimoe.moe import routers as routers_lib
from vimoe.parallel.distributed import is_main_process
from vimoe.train.optim import create_optimizer, learning_rate_schedule
from vimoe.train.tasks import get_task

# Keys every config has (configs/*.py); checked before anything is built or compiled.
REQUIRED_KEYS = ("task", "seed", "batch_size", "total_steps", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints", "label_smoothing", "optim", "model", "data")

# Config keys a rerun may change in an existing workdir (recorded in config_changes.jsonl); a key ending in "."
# covers the whole block. They change when and how the run is logged, saved, evaluated or laid out on devices,
# or how long it goes on, never the model, the data order, the loss or the optimizer's past updates. total_steps
# (and optim.total_steps, which follows it) also sets the length of the learning-rate schedule: the steps after
# the resume follow the new schedule (docs/workdirs.md). model.remat and microbatches trade memory for compute
# (a resume on a smaller slice): remat computes the same gradients; microbatches the same update, except that
# batch-level balance losses become their microbatches' mean (docs/workdirs.md, 'Gradient accumulation').
SAFE_TO_CHANGE = ("total_steps", "optim.total_steps", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints", "eval_batch_size", "mesh.", "data.num_workers", "data.read_threads",
                  "model.remat", "microbatches")

_ABSENT = "<absent>"

# Keys added to the configs after runs existed, with the value a run made before then used: a config.json without
# one of them compares as if it held that value, so an older workdir still resumes with today's configs.
ADDED_KEY_DEFAULTS = {"microbatches": 1, "model.remat": "none", "model.dtype": "float32",
                      "model.moe.dropless_buffer_factor": None, "init.upcycle_mode": "copy"}


class TrainingDiverged(RuntimeError):
  """The loss or the parameters became NaN or infinite."""


class WorkdirInUse(RuntimeError):
  """Another live run holds the workdir's lock."""


class ConfigMismatch(ValueError):
  """A rerun's config changes keys of the workdir's config.json that may not change."""


class CheckpointSaveFailed(OSError):
  """An asynchronous checkpoint save failed (a full disk, a lost filesystem): the run stops at once."""


class Preempted(RuntimeError):
  """The run was asked to stop (SIGTERM, SIGINT, SIGUSR1; on several processes jax's preemption notice): it
  finished its step, saved a checkpoint of it and released the workdir. Rerunning the command resumes there."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"preempted at step {step} ({reason}); saved checkpoint {step}")
    self.step = step


# Exit codes of scripts/train.py (docs/workdirs.md, 'Exit codes'): what a requeue script does next.
EXIT_CODES = {
    "Preempted": 75,         # EX_TEMPFAIL: requeue; the rerun resumes from the saved step
    "WorkdirInUse": 75,      # another live run holds the workdir: retry later
    "ConfigMismatch": 78,    # EX_CONFIG: the command's config differs from the run's; do not retry as is
    "TrainingDiverged": 65,  # EX_DATAERR: retrying replays the same steps; change the config
    "OSError": 74,           # EX_IOERR (disk full, unwritable workdir): retry once the cause is fixed
}


class PreemptionWatch:
  """Turns the signals a scheduler sends before it kills a job into a request to stop after the current step.

  One process: SIGTERM (SLURM, Kubernetes, TPU maintenance), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
  `--signal=USR1@SECONDS`) set a flag, which the loop reads after every step; a second SIGINT interrupts at once.
  Several processes: jax's preemption service owns SIGTERM (it tells every process and agrees on one step, so all
  save the same checkpoint), read through orbax's `CheckpointManager.reached_preemption(step)`; the other two
  signals are left alone, since a signal to one process alone cannot stop all of them at the same step."""

  SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

  def __init__(self):
    self.reason = None
    self._previous = {}

  def __enter__(self):
    import signal  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
      return self  # handlers can only be set from the main thread; several processes: jax's service
    for name in self.SIGNALS:
      number = getattr(signal, name)
      self._previous[number] = signal.signal(number, self._handle)
    return self

  def _handle(self, number, frame):
    import signal  # pylint: disable=import-outside-toplevel
    del frame
    if self.reason is not None and number == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.reason = signal.Signals(number).name

  def requested(self, step: int, manager) -> str | None:
    """The reason to stop after `step`, or None."""
    if self.reason is None and jax.process_count() > 1 and manager.reached_preemption(step):
      self.reason = "preemption notice"
    return self.reason

  def __exit__(self, *exc):
    import signal  # pylint: disable=import-outside-toplevel
    for number, previous in self._previous.items():
      signal.signal(number, previous)
    self._previous = {}


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
  microbatches = config.get("microbatches", 1)
  if (not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1
      or config.batch_size % microbatches):
    divisors = [d for d in range(1, config.batch_size + 1) if config.batch_size % d == 0]
    raise ValueError(f"config.microbatches={microbatches!r} must be a positive integer that divides "
                     f"config.batch_size={config.batch_size} (with a mesh, the batch of each device): valid "
                     f"{divisors}; 1 = no gradient accumulation")


# The workdir: path checks, the lock, the config on record.

def check_workdir(workdir: pathlib.Path) -> None:
  """Refuses a workdir that is a file or cannot be written, before anything is built."""
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory; pass a directory (it is created "
                             f"if missing)")
  existing = workdir
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise NotADirectoryError(f"--workdir {workdir}: {existing} is a file, so the workdir cannot be created")
  for path in (existing, existing / "checkpoints"):
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(f"--workdir {workdir}: {path} is not writable by this user; pick another workdir or "
                            f"fix its permissions")


def _agree(ok: bool, what: str) -> None:
  """Several processes: every process learns whether process 0 succeeded at `what` (and stops if not)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  if not bool(multihost_utils.broadcast_one_to_all(np.asarray(ok))) and ok:
    raise RuntimeError(f"the coordinating process (0) failed to {what}; see its log")


class WorkdirLock:
  """`workdir/run.lock`, held with flock by one process; it records host, pid and start time.

  The kernel drops an flock when its process exits for any reason (kill -9, preemption, OOM), so a lock file
  left behind by a dead run does not block the next one: only a live holder does.
  """

  def __init__(self, workdir: pathlib.Path):
    self.path = pathlib.Path(workdir) / "run.lock"
    self.fd = None

  def _holder(self) -> str:
    try:
      info = json.loads(self.path.read_text())
      holder = f"host {info['host']}, pid {info['pid']}, started {info['started']}"
      if info.get("slurm_job_id"):
        holder += f", SLURM job {info['slurm_job_id']}"
      return holder + f" ({info.get('command', '?')})"
    except (OSError, ValueError, KeyError):
      return "a process that has not yet written its host and pid"

  def acquire(self) -> "WorkdirLock":
    import fcntl
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        holder = self._holder()
        raise WorkdirInUse(
            f"workdir {self.path.parent} is in use by a live run: {holder}. One run per workdir: wait for it to "
            f"finish, stop it (kill it on that host; its lock goes with it), or pass another --workdir. "
            f"(Lock: {self.path}; it is released when its process exits, however it exits.)") from None
      except OSError as error:  # a filesystem without flock (some network filesystems)
        os.close(fd)
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          raise
        print(f"Warning: {self.path.parent}'s filesystem does not support flock ({error}); running without the "
              f"one-run-per-workdir lock: do not start two runs on this workdir", file=sys.stderr, flush=True)
        return self
      try:  # the holder we raced with may have unlinked the file between our open and flock: lock the new one
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      info = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
      os.ftruncate(fd, 0)
      os.write(fd, (json.dumps(info) + "\n").encode())
      os.fsync(fd)
      self.fd = fd
      return self

  def release(self) -> None:
    if self.fd is not None:
      with contextlib.suppress(OSError):
        os.unlink(self.path)
      os.close(self.fd)
      self.fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _config_record(config) -> dict:
  """The config as config.json holds it (JSON types: tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def config_changes(saved: dict, new: dict) -> dict:
  """{dotted key: (saved value, new value)} for every key that differs (absent keys as '<absent>', except keys of
  ADDED_KEY_DEFAULTS, which a saved config without them held at their default)."""
  old_flat, new_flat = flatten_dict(saved, keep_empty=True), flatten_dict(new, keep_empty=True)
  for flat in (old_flat, new_flat):
    for key, default in ADDED_KEY_DEFAULTS.items():
      parent = key.rpartition(".")[0]
      if key not in flat and (not parent or any(k.startswith(parent + ".") for k in flat)):
        flat[key] = default
  return {key: (old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT))
          for key in sorted(old_flat.keys() | new_flat.keys())
          if old_flat.get(key, _ABSENT) != new_flat.get(key, _ABSENT)}


def _safe_to_change(key: str) -> bool:
  return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SAFE_TO_CHANGE)


def reconcile_config(config, workdir: pathlib.Path) -> dict:
  """Compares `config` with the workdir's config.json when the workdir holds a run to resume.

  Returns the allowed changes ({key: (old, new)}, empty for a fresh workdir); raises ConfigMismatch, naming
  every other changed key with its old and new value, before anything is written.
  """
  path = workdir / "config.json"
  steps = checkpoint_steps(workdir)
  if not steps:
    return {}  # nothing to resume: the run starts at step 0 with this config
  if not path.exists():
    raise ConfigMismatch(
        f"{workdir} holds checkpoints (steps {steps}) but no config.json, the record of the config they were made "
        f"with, so this command's config cannot be checked against them. Restore {path} (a copy, or the command "
        f"that made the run), move {workdir / 'checkpoints'} away to start again here, or use another --workdir")
  try:
    saved = json.loads(path.read_text())
  except ValueError as error:
    raise ConfigMismatch(f"{path} is not valid JSON ({error}); it is the record of the run in {workdir}: restore "
                         f"it, or start the new run in another --workdir") from None
  changes = config_changes(saved, _config_record(config))
  refused = {key: change for key, change in changes.items() if not _safe_to_change(key)}
  if refused:
    listing = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
    raise ConfigMismatch(
        f"{workdir} holds a run whose config ({path}) differs from this one in key(s) that may not change on "
        f"resume (saved -> new):\n{listing}\nRerun with the saved values to resume, or use another --workdir for "
        f"a new run. Keys that may change on resume: {', '.join(SAFE_TO_CHANGE)} (docs/workdirs.md).")
  return changes


# Metrics.

class MetricWriter:
  """metrics.jsonl + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.enabled = is_main_process()
    self.path = workdir / "metrics.jsonl"
    self.tensorboard = None
    if not self.enabled:
      return
    if self.path.exists():
      self._keep_until(resume_step)
    elif resume_step:
      print(f"Warning: resuming from step {resume_step}, but {self.path} is missing: its lines up to step "
            f"{resume_step} are lost (the TensorBoard events under {workdir / 'tensorboard'} still hold them)",
            file=sys.stderr, flush=True)
    from tensorboardX import SummaryWriter
    events = workdir / "tensorboard"
    # Events of steps after the one we resume from (a run killed after its last checkpoint, or one whose
    # checkpoints were deleted) will be written again: purge_step tells TensorBoard to drop the old ones, so the
    # event stream agrees with metrics.jsonl.
    earlier = events.is_dir() and any(events.glob("events.out.tfevents.*"))
    self.tensorboard = SummaryWriter(str(events), purge_step=resume_step + 1 if earlier else None)

  def _keep_until(self, resume_step: int) -> None:
    """Drops lines from after the checkpoint we resume from (they will be redone) and a torn last line (a crash
    or a full disk mid-write); every complete line up to `resume_step` is kept. Rewritten atomically."""
    text = self.path.read_text()
    lines = text.split("\n")
    kept = []
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        step = record["step"]
      except (ValueError, KeyError, TypeError) as error:
        if number == len(lines):  # no newline after it: a write that did not finish
          print(f"{self.path}: dropped a torn last line (a write that did not finish): {line[:80]!r}",
                file=sys.stderr, flush=True)
          continue
        raise ValueError(f"{self.path} line {number} is not a metrics record ({error}): {line[:80]!r}; every line "
                         f"must be a JSON object with 'step'. Fix or remove that line and rerun") from None
      if step <= resume_step:
        kept.append(line)
    new_text = "".join(line + "\n" for line in kept)
    if new_text != text:
      temporary = self.path.with_name(self.path.name + ".tmp")
      temporary.write_text(new_text)
      os.replace(temporary, self.path)

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


# Checkpoints.

class DataIteratorHandler(grain.checkpoint.CheckpointHandler):
  """grain's iterator handler (one `process_I-of-N.json` per process), which also restores a checkpoint written by
  another number of processes when all its processes saved the same state. They do with the data pipelines here
  (vimoe/data): every process yields its block of the same global batch, so its iterator state counts steps only,
  and a run written by 2 processes resumes in 1 (tests/test_multiprocess.py)."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    own = pathlib.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
      return super().restore(directory, item=item)
    files = sorted(pathlib.Path(directory).glob("process_*-of-*.json"))
    states = {path.read_text() for path in files}
    if not files:
      raise ValueError(f"{directory} holds no data-iterator state (no process_*-of-*.json)")
    if len(states) != 1:
      raise ValueError(f"{directory} holds no data-iterator state for process {jax.process_index()} of "
                       f"{jax.process_count()} ({own.name}), and its files {[path.name for path in files]} do not all "
                       f"hold the same state, so it cannot resume with another process count; resume with the "
                       f"process count that wrote it")
    state = states.pop()
    item.set_state(json.loads(state) if isinstance(item, grain.DatasetIterator) else state.encode())
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  item: Any


def _checkpoint_manager(workdir: pathlib.Path, config, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(workdir / "checkpoints", options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "data": DataIteratorHandler()})


# Everything in the model but RNG keys (re-derived from the seed; the RNG counters are saved, so a resumed run
# draws the same random numbers as an uninterrupted one).
_SAVED = nnx.Not(nnx.RngKey)


def _train_state(model, optimizer):
  return {"model": nnx.state(model, _SAVED), "optimizer": nnx.state(optimizer, _SAVED)}


def _short(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _set_aside(workdir: pathlib.Path, step: int, reason: str) -> pathlib.Path:
  """Moves checkpoints/STEP to checkpoints_damaged/STEP (kept for inspection, out of orbax's way)."""
  damaged = workdir / "checkpoints_damaged"
  damaged.mkdir(exist_ok=True)
  destination, n = damaged / str(step), 1
  while destination.exists():
    destination, n = damaged / f"{step}-{n}", n + 1
  shutil.move(str(workdir / "checkpoints" / str(step)), str(destination))
  (destination / "WHY_SET_ASIDE.txt").write_text(reason + "\n")
  return destination


def _restore_newest_good(workdir, config, model, optimizer, train_data):
  """Restores the newest checkpoint that restores. Newer ones that fail are moved to checkpoints_damaged/ (only
  once an older one has restored, so that a failure that is not damage, e.g. code that changed the model, moves
  nothing). Returns (manager, step, train iterator); step 0 when there is no checkpoint."""
  manager = _checkpoint_manager(workdir, config)
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    train_iter = iter(train_data)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_train_state(model, optimizer)),
          data=DataIteratorRestore(train_iter)))
    except Exception as error:  # pylint: disable=broad-except  (any damage: TensorStore, JSON, pytree errors)
      failures.append((step, _short(error)))
      print(f"Checkpoint {step} does not restore ({_short(error)}); trying the one before", file=sys.stderr,
            flush=True)
      continue
    nnx.update(model, restored.state["model"])
    nnx.update(optimizer, restored.state["optimizer"])
    if failures:
      manager.close()
      if is_main_process():
        for bad_step, reason in failures:
          where = _set_aside(workdir, bad_step, reason)
          print(f"Skipped checkpoint {bad_step} ({reason}); moved to {where}", file=sys.stderr, flush=True)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("vimoe_checkpoints_set_aside")
      manager = _checkpoint_manager(workdir, config)
    print(f"Resumed from step {step} ({manager.directory / str(step)})", flush=True)
    return manager, step, train_iter
  if failures:
    manager.close()
    listing = "\n".join(f"  step {step}: {reason}" for step, reason in failures)
    raise RuntimeError(f"no checkpoint under {workdir / 'checkpoints'} restores:\n{listing}\nNothing was moved or "
                       f"written. If they are damaged, move them out of checkpoints/ to start again from step 0; if "
                       f"the code changed the model, run the code that wrote them (docs/workdirs.md)")
  return manager, 0, iter(train_data)


# Model, mesh, batches.

def model_expert_count(config) -> int | None:
  """What the 'expert' mesh axis must divide, read from the model's shapes (built abstractly, nothing allocated):
  the gcd of the leading axes of the arrays the partition rules split over 'expert' (routed experts; the groups
  of a hierarchical MoE). None for a model without such arrays."""
  task = get_task(config.task)
  model = nnx.eval_shape(lambda: task.build_model(config, nnx.Rngs(params=0, noise=1, dropout=2)))
  state = nnx.state(model, nnx.Param)
  specs = jax.tree.leaves(parallel.partition_specs(state), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  sizes = [leaf.shape[0] for leaf, spec in zip(jax.tree.leaves(state), specs) if len(spec) and spec[0] == "expert"]
  return math.gcd(*sizes) if sizes else None


def build_mesh(config, devices=None):
  """The ('data', 'expert') mesh from config.mesh when there is more than one device (or `devices` are given),
  else None. Sizes the config leaves None are inferred from the devices and `model_expert_count`."""
  if (devices is None and jax.device_count() == 1) or config.get("mesh") is None:
    return None
  return parallel.mesh_from_config(config.mesh, num_experts=model_expert_count(config), devices=devices)


def build(config, mesh=None):
  """Task, model and optimizer for `config` (no data, no checkpoint). With a mesh, parameters and optimizer state
  are created sharded by the partition rules (experts on 'expert', the rest replicated)."""
  validate_config(config)
  task = get_task(config.task)
  make_model = lambda: task.build_model(config, nnx.Rngs(params=config.seed, noise=config.seed + 1,
                                                        dropout=config.seed + 2))
  trainable = task.trainable(config)  # what the optimizer updates (a linear probe freezes the backbone)
  if mesh is None:
    model = make_model()
    optimizer = nnx.Optimizer(model, create_optimizer(config.optim, model=model), wrt=trainable)
    return task, model, optimizer
  with jax.set_mesh(mesh):
    model = parallel.create_sharded(make_model, mesh)
    optimizer = nnx.Optimizer(model, create_optimizer(config.optim, model=model), wrt=trainable)
    nnx.update(optimizer, parallel.shard_tree(nnx.state(optimizer), mesh))
  return task, model, optimizer


def _mesh_scope(mesh):
  """`with jax.set_mesh(mesh)` (MoE layers then shard experts), or nothing on one device."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _batch_shards(mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in parallel.partition_axes(mesh))


def check_batch_sizes(config, mesh) -> None:
  """Training batches must split evenly over the mesh's batch axes (a batch that does not would be replicated on
  every device: the same numbers at devices x the compute). Evaluation batches too, except batches of one
  (ADE20K's images of their own sizes), which are evaluated replicated."""
  if mesh is None:
    return
  shards = _batch_shards(mesh)
  axes = parallel.partition_axes(mesh)
  valid = ", ".join(str(shards * i) for i in range(1, 5)) + ", ..."
  for key in ("batch_size", "eval_batch_size"):
    size = config.get(key) or config.batch_size
    if size % shards and not (key == "eval_batch_size" and size == jax.process_count()):
      raise ValueError(f"config.{key}={size} does not divide over the {shards} devices of the mesh's batch axes "
                       f"{axes} ({parallel.mesh_summary(mesh)}): every device would compute the whole batch. "
                       f"Valid sizes: multiples of {shards} ({valid})")


def _place(batch, mesh, train: bool = False):
  """This process's rows of the global batch -> global arrays split over ('data', 'expert') on the batch axis.

  A training batch must divide over those devices. An evaluation batch that does not (ADE20K: one image of its
  own size per step) is replicated: every device evaluates the whole batch (one process only)."""
  if mesh is None:
    return batch
  axes = parallel.partition_axes(mesh)
  spec = jax.sharding.PartitionSpec(axes)
  rows = len(jax.tree.leaves(batch)[0])
  shards = _batch_shards(mesh)
  if (rows * jax.process_count()) % shards:
    if train or jax.process_count() > 1:
      raise ValueError(f"a {'training ' if train else ''}batch of {rows} rows per process "
                       f"({jax.process_count()} process(es)) cannot be split over the {shards} devices of the "
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


# The train step.

def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def _microbatches(batch, microbatches: int):
  """batch leaves [B, ...] -> [M, B/M, ...]: microbatch m holds rows m*b..(m+1)*b-1 of every device's block of
  b*M rows (with no mesh, of the whole batch), so routing groups that lie inside one microbatch stay intact and
  every device computes every microbatch."""
  mesh = jax.sharding.get_abstract_mesh()
  shards = 1 if mesh.empty else math.prod(mesh.shape[axis] for axis in parallel.partition_axes(mesh))
  rows = len(jax.tree.leaves(batch)[0])
  if rows % (shards * microbatches):
    raise ValueError(f"config.microbatches={microbatches} does not divide the {rows // shards} rows that each of "
                     f"the {shards} devices of the mesh's batch axes holds (batch of {rows}); use a divisor of "
                     f"{rows // shards}")
  per_micro = rows // (shards * microbatches)

  def split(x):
    x = x.reshape((shards, microbatches, per_micro) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((microbatches, shards * per_micro) + x.shape[3:])

  return jax.tree.map(split, batch)


def _accumulated_gradients(task, config, model, wrt, batch):
  """(grads, metrics) of the loss on `batch` as config.microbatches sequential microbatches (`jax.lax.scan`, so
  memory does not grow with their number): gradients summed in float32 and divided by M, metrics averaged over
  the microbatches. The model's other state (RNG counters, ...) carries from one microbatch to the next; the
  routing biases (aux-loss-free balancing) are updated once, from the whole batch's loads.

  What equals the one-batch step (up to float32 rounding), given equal-weight microbatches: every per-example or
  per-token mean (classification and segmentation losses, an LM loss without padding), and of the MoE
  aux losses those that are means over tokens, items or sequences: router z-loss and DeepSeek's sequence-wise
  balance loss; also `dropped_fraction` and `bias_range`, and the bias update. Routing itself is unchanged when
  routing groups lie inside one microbatch and nothing is dropped for lack of capacity, or groups keep their
  members. Not equal: losses computed over the whole call's tokens that are nonlinear in them -- Switch balance
  loss E * sum_e f_e P_e, importance and load losses CV(sum)^2 -- here each is the mean of the microbatches'
  values; a padded LM batch weighs each microbatch equally, not by its real tokens."""
  microbatches = config.get("microbatches", 1)
  routers_lib.defer_bias_updates(model)
  model_def, model_state = nnx.split(model)

  def accumulate(carry, micro_batch):
    grad_sum, model_state = carry
    micro_model = nnx.merge(model_def, model_state)
    grad_fn = nnx.value_and_grad(lambda m: task.loss(m, micro_batch, config), argnums=nnx.DiffState(0, wrt),
                                 has_aux=True)
    (_, metrics), grads = grad_fn(micro_model)
    grad_sum = jax.tree.map(lambda total, grad: total + grad.astype(jnp.float32), grad_sum, grads)
    return (grad_sum, nnx.state(micro_model)), metrics

  params = nnx.state(model, wrt)
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (grad_sum, model_state), metrics = jax.lax.scan(accumulate, (zeros, model_state),
                                                  _microbatches(batch, microbatches))
  nnx.update(model, model_state)
  routers_lib.apply_deferred_bias_updates(model)
  grads = jax.tree.map(lambda total, p: (total / microbatches).astype(p.dtype), grad_sum, params)
  return grads, jax.tree.map(lambda value: jnp.mean(value, axis=0), metrics)


def make_train_step(task, config, graphdef):
  """A pure, jitted step over (state, guard, batch) -> (state, guard, metrics), donating state and guard.

  `state` is nnx.split((model, optimizer))'s state. `guard` holds on the device the step count, the first step
  whose loss or updated parameters were not finite (0: none yet) and that step's loss, so the host need not read
  anything back per step. The math is the one of nnx.jit over (model, optimizer); the guard only adds outputs.
  config.microbatches = M > 1: gradient accumulation over M microbatches of the batch, then one optimizer
  update (`_accumulated_gradients` says what equals the one-batch step)."""
  microbatches = config.get("microbatches", 1)

  def step(state, guard, batch):
    model, optimizer = nnx.merge(graphdef, state)
    if microbatches == 1:
      grad_fn = nnx.value_and_grad(lambda m: task.loss(m, batch, config),
                                   argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True)
      (_, metrics), grads = grad_fn(model)
    else:
      grads, metrics = _accumulated_gradients(task, config, model, optimizer.wrt, batch)
    optimizer.update(model, grads)
    loss = metrics["train/loss"]
    finite = jnp.isfinite(loss) & _all_finite(nnx.state(model, nnx.Param))
    number = guard["step"] + 1
    first = (guard["first_bad"] == 0) & ~finite
    guard = {"step": number, "first_bad": jnp.where(first, number, guard["first_bad"]),
             "bad_loss": jnp.where(first, loss.astype(jnp.float32), guard["bad_loss"])}
    return nnx.state((model, optimizer)), guard, metrics

  return jax.jit(step, donate_argnums=(0, 1))


def make_loss_probe(task, config, graphdef):
  """loss of the state's parameters on a batch (a forward pass; the state, RNG counters included, is left as it
  is). Run before each checkpoint: a checkpoint is saved only if its parameters give a finite loss."""

  def probe(state, batch):
    model, _ = nnx.merge(graphdef, state)
    return task.loss(model, batch, config)[0]

  return jax.jit(probe)


def _initial_guard(step: int) -> dict:
  return {"step": jnp.asarray(step, jnp.int32), "first_bad": jnp.asarray(0, jnp.int32),
          "bad_loss": jnp.asarray(0.0, jnp.float32)}


class SaveWatch:
  """Surfaces a failed background save as soon as it has finished, not at the next save (orbax reports an async
  save's error only when waited on): after each save, every step asks whether it is done (cheap), and the first
  step after it finishes waits on it, which raises CheckpointSaveFailed naming the cause and the newest complete
  checkpoint on disk."""

  def __init__(self, manager, workdir: pathlib.Path):
    self.manager, self.workdir, self.pending = manager, workdir, None

  def saved(self, step: int) -> None:
    self.pending = step

  def check(self, step: int, wait: bool = False) -> None:
    if self.pending is None or (not wait and self.manager.is_saving_in_progress()):
      return
    saving, self.pending = self.pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except  (whatever the writer raised: ENOSPC, ...)
      steps = checkpoint_steps(self.workdir)
      newest = f"{self.workdir / 'checkpoints' / str(steps[-1])} (step {steps[-1]})" if steps else "none"
      text = " ".join(str(error).split())
      cause = text if len(text) <= 300 else f"{text[:120]} ... {text[-170:]}"  # the OS error is at the end
      raise CheckpointSaveFailed(f"saving checkpoint {saving} failed ({type(error).__name__}: {cause}); stopped at "
                                 f"step {step}. Newest complete checkpoint: {newest}") from None


def _last_good(manager) -> str:
  last = manager.latest_step()
  return f"{manager.directory / str(last)} (step {last})" if last is not None else "none (no checkpoint yet)"


def _check_guard(guard, manager) -> None:
  first_bad, bad_loss = (v.item() for v in jax.device_get((guard["first_bad"], guard["bad_loss"])))
  if first_bad:
    what = (f"loss is {bad_loss}" if not math.isfinite(bad_loss)
            else f"the update made the parameters non-finite (loss {bad_loss:.6g})")
    raise TrainingDiverged(f"{what} at step {first_bad}; stopping. Last good checkpoint: {_last_good(manager)}")


def _progress(config, start_step):
  """The progress bar: redrawn at most every 30 s when stderr is not a terminal (a SLURM or nohup log)."""
  tty = sys.stderr.isatty()
  disable = not is_main_process() or os.environ.get("VIMOE_NO_PROGRESS") == "1"
  interval = dict(mininterval=0.1) if tty else dict(mininterval=30.0, maxinterval=60.0)
  return tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step", disable=disable,
              dynamic_ncols=tty, **interval), tty


def train_and_evaluate(config, workdir) -> dict:
  workdir = pathlib.Path(workdir).absolute()  # orbax refuses relative checkpoint paths
  check_workdir(workdir)
  validate_config(config)
  lock = _take_lock(workdir)
  try:
    return _train_and_evaluate(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _take_lock(workdir: pathlib.Path) -> WorkdirLock | None:
  """The workdir's lock, taken by the coordinating process only (the others get None); every process stops if
  it cannot be taken."""
  if not is_main_process():
    _agree(True, "take the workdir lock")
    return None
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    lock = WorkdirLock(workdir).acquire()
  except Exception:
    _agree(False, "take the workdir lock")
    raise
  _agree(True, "take the workdir lock")
  return lock


def _train_and_evaluate(config, workdir: pathlib.Path) -> dict:
  changes = reconcile_config(config, workdir)  # raises before anything is written
  mesh = build_mesh(config)
  check_batch_sizes(config, mesh)
  task, model, optimizer = build(config, mesh)
  if mesh is not None and is_main_process():
    print(f"Mesh: {parallel.mesh_summary(mesh)}", flush=True)

  train_data = task.build_data(config, config.data.train_split, train=True, seed=config.seed,
                               batch_size=config.batch_size)
  manager, start_step, train_iter = _restore_newest_good(workdir, config, model, optimizer, train_data)
  if not start_step and config.get("init") and config.init.get("checkpoint"):
    task.load_pretrained(model, config)
    print(f"Initialised from {config.init.checkpoint}", flush=True)
  if is_main_process():
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    if changes and start_step:
      record = {"resumed_from_step": start_step, "time": datetime.datetime.now().astimezone().isoformat(
          timespec="seconds"), "changes": {key: {"old": old, "new": new} for key, (old, new) in changes.items()}}
      with (workdir / "config_changes.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
      print("Config changes on resume (recorded in config_changes.jsonl): " +
            ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()), flush=True)

  graphdef, state = nnx.split((model, optimizer))
  train_step = make_train_step(task, config, graphdef)
  probe = make_loss_probe(task, config, graphdef)
  guard = _initial_guard(start_step)
  eval_step = nnx.jit(lambda m, b: task.eval_batch(m, b))
  schedule = learning_rate_schedule(config.optim)
  writer = MetricWriter(workdir, start_step)
  final = {}
  progress, tty = _progress(config, start_step)
  window_start, window_examples = time.perf_counter(), 0

  def save_checkpoint(step, batch):
    """Checkpoint `step` (async), unless its parameters give a non-finite loss on the step's batch."""
    with _mesh_scope(mesh):
      loss = float(probe(state, batch))
    if not math.isfinite(loss):
      raise TrainingDiverged(
          f"loss is {loss} with the parameters after step {step} (checkpoint {step} not saved) at step "
          f"{step}; stopping. Last good checkpoint: {_last_good(manager)}")
    nnx.update((model, optimizer), state)
    saves.check(step, wait=True)  # the previous save, if still running, must not fail unseen under this one
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_train_state(model, optimizer)),
                                               data=DataIteratorSave(train_iter)))
    saves.saved(step)

  saves = SaveWatch(manager, workdir)
  watch = PreemptionWatch().__enter__()
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      batch = _place(next(train_iter), mesh, train=True)
      with _mesh_scope(mesh):
        state, guard, metrics = train_step(state, guard, batch)
      window_examples += config.batch_size
      progress.update(1)
      log = step % config.log_every == 0 or step == config.total_steps
      save = step % config.checkpoint_every == 0 or step == config.total_steps
      evaluation = step % config.eval_every == 0 or step == config.total_steps
      stop = watch.requested(step, manager)
      saves.check(step)
      if not (log or save or evaluation or stop):
        continue
      _check_guard(guard, manager)  # the one read-back of the guard: only at these steps
      if log:
        metrics = dict(jax.device_get(metrics))
        elapsed = time.perf_counter() - window_start
        metrics["train/lr"] = float(schedule(step - 1))
        metrics["train/examples_per_sec"] = window_examples / max(elapsed, 1e-9)
        progress.set_postfix(loss=f"{float(metrics['train/loss']):.4f}",
                             ex_s=f"{metrics['train/examples_per_sec']:.0f}", refresh=tty)
        writer.write(step, metrics)
        window_start, window_examples = time.perf_counter(), 0
      if save:
        save_checkpoint(step, batch)
      if evaluation:
        nnx.update((model, optimizer), state)
        final = evaluate(task, model, config, eval_step, mesh)
        writer.write(step, final)
        progress.write(f"step {step}: {headline(final)}")
        if is_main_process():  # per-class tables, pictures
          task.after_evaluation(model, config, workdir, step, final)
        state = nnx.state((model, optimizer))  # whatever evaluation changed in the model carries on, as before
      if stop:
        if not save:
          save_checkpoint(step, batch)
        saves.check(step, wait=True)
        if manager.latest_step() != step:
          raise RuntimeError(f"stopping at step {step} ({stop}), but checkpoint {step} was not written; last good "
                             f"checkpoint: {_last_good(manager)}")
        raise Preempted(step, stop)
    nnx.update((model, optimizer), state)
  except CheckpointSaveFailed:
    watch.__exit__()
    progress.close()
    writer.close()  # the manager's failed save would only raise again (and hang nothing): leave it
    raise
  finally:
    if not isinstance(sys.exc_info()[1], CheckpointSaveFailed):
      watch.__exit__()
      progress.close()
      saves.check(config.total_steps, wait=True)
      manager.close()
      writer.close()
  if not final:  # resumed a finished run: evaluate the final state again
    final = evaluate(task, model, config, eval_step, mesh)
  return final


def headline(metrics: dict) -> dict:
  """The top-level scalar metrics ('eval/top1', 'eval/loss', ...), rounded for printing."""
  return {key: round(value, 4) for key, value in metrics.items()
          if isinstance(value, float) and key.count("/") == 1}


def checkpoint_steps(workdir) -> list[int]:
  """The steps of the complete checkpoints under workdir/checkpoints (orbax's temporary directories excluded)."""
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def load_for_evaluation(workdir, step: int | None = None):
  """Rebuilds the model from workdir/config.json and restores a checkpoint (the latest by default). Reads only:
  nothing is created in the workdir."""
  import ml_collections
  workdir = pathlib.Path(workdir).absolute()
  if not workdir.is_dir():
    raise NotADirectoryError(f"--workdir {workdir} is not a directory: is it a training workdir?")
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} not found: is {workdir} a training workdir?")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {workdir / 'checkpoints'}")
  if step is not None and step not in steps:
    raise ValueError(f"step={step}: there is no checkpoint of step {step} under {workdir / 'checkpoints'}; "
                     f"available steps: {steps}")
  task, model, optimizer = build(config)
  with _checkpoint_manager(workdir, config, read_only=True) as manager:
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_train_state(model, optimizer))))
  nnx.update(model, restored.state["model"])
  return config, task, model, step
