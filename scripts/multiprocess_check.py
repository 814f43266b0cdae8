"""Checks a real multi-process run: 2 processes x 4 CPU devices, one jax cluster over localhost, against 1 x 8.

    python scripts/multiprocess_check.py --workdir /tmp/mpcheck [--steps 4] [--override=--config.KEY=VALUE ...]

Three runs of `scripts/train.py --config configs/quickstart.py` (shrunk by the overrides below), each with a
mesh over 8 devices:
  one       1 process, XLA_FLAGS=--xla_force_host_platform_device_count=8, no jax.distributed;
  two       2 processes, 4 fake CPU devices each, started as a multi-host launch would start them:
              JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i (i = 0, 1), which
              vimoe.parallel.initialize() passes to jax.distributed.initialize (CPU collectives: gloo, jax's
              default); checkpoints at steps/2 and steps;
  resumed   a copy of `two`'s workdir without its last checkpoint, continued by 1 process with 8 devices.
It then checks that
  1. `two` logs the metrics of `one` at every logged step (float32 tolerance: the cross-process all-reduce adds
     the same numbers in another order than the in-process one);
  2. only process 0 writes config.json, metrics.jsonl, tensorboard/ and run.lock: every file process 1 opens for
     writing (or creates, moves, deletes) in the workdir is one of orbax's under checkpoints/ (seen by a Python
     audit hook in each process);
  3. both processes saved the same data-iterator state (it counts steps), and `resumed` logs the metrics of `one`.
Exit status 0 when all hold. tests/test_multiprocess.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN = ROOT / "scripts" / "train.py"
# A 2-block ViMoE (both blocks MoE, 8 experts), routed with capacity 1 in groups of 8 images (136 tokens), one
# group per device: which images expert capacity drops depends on the order of the rows in the batch, so a process
# split that reordered the global batch would change the metrics.
SHRINK = ("--config.model.depth=2", "--config.model.dim=32", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
          "--config.model.moe.capacity_factor=1.0", "--config.model.moe.group_size=136")
RTOL, ATOL = 1e-5, 1e-6
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_CHANGE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "shutil.move")


def _worker(audit_log: str, train_args: list[str]) -> None:
  """Runs scripts/train.py in this process, appending every path it writes to `audit_log` (one per line)."""
  log = open(audit_log, "a", buffering=1)  # opened before the hook: not recorded

  def record(path):
    if isinstance(path, (str, bytes, os.PathLike)):
      log.write(os.path.abspath(os.fsdecode(path)) + "\n")

  def hook(event, args):
    if event == "open":
      path, mode, flags = args
      if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS):
        record(path)
    elif event in _CHANGE_EVENTS:
      record(args[0])
      if event in ("os.rename", "shutil.move"):
        record(args[1])

  sys.addaudithook(hook)
  import runpy  # pylint: disable=import-outside-toplevel
  sys.argv = [str(TRAIN)] + train_args
  runpy.run_path(str(TRAIN), run_name="__main__")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, cache: pathlib.Path, **extra) -> dict:
  env = {key: value for key, value in os.environ.items() if not key.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC",
                                                                                "JAX_PROCESS_ID"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             VIMOE_NO_PROGRESS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
  return env


def _launch(workdir: pathlib.Path, audit: pathlib.Path, train_args: list[str], env: dict, log: pathlib.Path):
  command = [sys.executable, __file__, "--worker", str(audit), "--", "--workdir", str(workdir)] + train_args
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                          start_new_session=True)


def _wait(processes, logs, timeout: float, what: str) -> None:
  deadline = time.monotonic() + timeout
  try:
    for process in processes:
      process.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    for process in processes:
      if process.poll() is None:
        os.killpg(process.pid, 9)  # its own session: the process and anything it started
    raise RuntimeError(f"{what} did not finish within {timeout:.0f} s (a hung collective?); logs: "
                       + ", ".join(map(str, logs))) from None
  for process, log in zip(processes, logs):
    if process.returncode:
      raise RuntimeError(f"{what} failed (exit {process.returncode}); last lines of {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-25:]))


def run_one(root: pathlib.Path, name: str, train_args, timeout: float) -> pathlib.Path:
  workdir, log = root / name, root / f"{name}.log"
  _wait([_launch(workdir, root / f"{name}.writes", train_args, _env(8, root / "jax_cache"), log)], [log], timeout,
        f"the 1-process run '{name}'")
  return workdir


def run_two(root: pathlib.Path, train_args, timeout: float) -> pathlib.Path:
  workdir, port = root / "two", free_port()
  processes, logs = [], []
  for i in range(2):
    env = _env(4, root / "jax_cache", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    logs.append(root / f"two.process{i}.log")
    processes.append(_launch(workdir, root / f"two.process{i}.writes", train_args, env, logs[-1]))
  _wait(processes, logs, timeout, "the 2-process run")
  return workdir


def load_metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def compare_metrics(reference: list[dict], other: list[dict], what: str) -> tuple[list[str], float]:
  """Problems found and the largest relative difference of any logged value (throughput excepted)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  problems, largest = [], 0.0
  if [r["step"] for r in reference] != [r["step"] for r in other]:
    return [f"{what}: logged steps {[r['step'] for r in other]} != {[r['step'] for r in reference]}"], float("inf")
  for ref, got in zip(reference, other):
    if set(ref) != set(got):
      problems.append(f"{what} step {ref['step']}: keys differ: {sorted(set(ref) ^ set(got))}")
      continue
    for key in ref:
      if key in ("step", "train/examples_per_sec"):
        continue
      a, b = np.asarray(ref[key], np.float64), np.asarray(got[key], np.float64)
      largest = max(largest, float(np.max(np.abs(a - b) / np.maximum(np.abs(a), ATOL))))
      if a.shape != b.shape or not np.allclose(b, a, rtol=RTOL, atol=ATOL):
        problems.append(f"{what} step {ref['step']} {key}: {got[key]} != {ref[key]} (1-process run)")
  return problems, largest


def written_in(root: pathlib.Path, audit: pathlib.Path, workdir: pathlib.Path) -> set[str]:
  """Paths (relative to workdir) that the audited process wrote inside it."""
  if not audit.exists():
    return set()
  inside = set()
  for line in audit.read_text().splitlines():
    path = pathlib.Path(line)
    if path == workdir or workdir in path.parents:
      inside.add(str(path.relative_to(workdir)))
  return inside


def check(root: pathlib.Path, steps: int, overrides: list[str], timeout: float) -> list[str]:
  if steps < 2 or steps % 2:
    raise ValueError(f"--steps={steps} must be an even number >= 2 (the 2-process run saves at steps/2)")
  if root.exists():
    shutil.rmtree(root)
  root.mkdir(parents=True)
  train_args = ["--config", str(ROOT / "configs" / "quickstart.py"), f"--config.total_steps={steps}",
                f"--config.log_every={steps // 2}", f"--config.checkpoint_every={steps // 2}",
                f"--config.eval_every={steps}", *SHRINK, *overrides]
  timings = {}
  start = time.monotonic()
  one = run_one(root, "one", train_args, timeout)
  timings["one"], start = time.monotonic() - start, time.monotonic()
  two = run_two(root, train_args, timeout)
  timings["two"], start = time.monotonic() - start, time.monotonic()
  resumed = root / "resumed"
  shutil.copytree(two, resumed)
  shutil.rmtree(resumed / "checkpoints" / str(steps))
  run_one(root, "resumed", train_args, timeout)
  timings["resumed"] = time.monotonic() - start

  problems = []
  reference = load_metrics(one)
  # 1. The 2-process run is the 1-process run.
  found, largest_two = compare_metrics(reference, load_metrics(two), "2-process run")
  problems += found
  # 2. Process 1 writes only orbax's files under checkpoints/; process 0 writes the run's records.
  by_process1 = written_in(root, root / "two.process1.writes", two)
  by_process0 = written_in(root, root / "two.process0.writes", two)
  strays = sorted(path for path in by_process1 if path != "checkpoints" and not path.startswith("checkpoints/"))
  if strays:
    problems.append(f"process 1 wrote outside checkpoints/: {strays}")
  for record in ("config.json", "metrics.jsonl", "run.lock"):
    if record not in by_process0:
      problems.append(f"the audit saw process 0 write no {record} (it writes {sorted(by_process0)[:10]}...)")
  if not any(path.startswith("tensorboard/") for path in by_process0):
    problems.append("the audit saw process 0 write nothing under tensorboard/")
  if sorted(p.name for p in two.iterdir()) != sorted(p.name for p in one.iterdir()):
    problems.append(f"the 2-process workdir holds {sorted(p.name for p in two.iterdir())}, the 1-process one "
                    f"{sorted(p.name for p in one.iterdir())}")
  # 3. Same data-iterator state on both processes; the 1-process continuation is the 1-process run.
  data = two / "checkpoints" / str(steps // 2) / "data"
  states = {path.name: path.read_text() for path in sorted(data.glob("process_*-of-*.json"))}
  if sorted(states) != ["process_0-of-2.json", "process_1-of-2.json"] or len(set(states.values())) != 1:
    problems.append(f"data-iterator states of the 2-process checkpoint differ or are missing: {states}")
  log = (root / "resumed.log").read_text()
  if f"Resumed from step {steps // 2}" not in log:
    problems.append(f"the 1-process continuation did not resume from step {steps // 2}; see {root / 'resumed.log'}")
  found, largest_resumed = compare_metrics(reference, load_metrics(resumed), "2 -> 1 process resumed run")
  problems += found

  final = {key: value for key, value in reference[-1].items() if key.count("/") == 1 and key.startswith("eval/")
           and isinstance(value, float)}
  print(f"final evaluation (1 process): {final}")
  print(f"largest relative difference to the 1-process run: 2 processes {largest_two:.2e}, "
        f"2 -> 1 resumed {largest_resumed:.2e} (tolerance rtol={RTOL})")
  print(f"process 1 wrote in the workdir: {sorted(by_process1)}")
  print("wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
  return problems


def main() -> None:
  if len(sys.argv) > 2 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[4:])  # --worker AUDIT_LOG -- TRAIN_ARGS...
    return
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, type=pathlib.Path, help="scratch directory (emptied first)")
  parser.add_argument("--steps", type=int, default=4, help="training steps (even; checkpoints at steps/2)")
  parser.add_argument("--override", action="append", default=[],
                      help="extra --config.KEY=VALUE for train.py (repeatable), e.g. --override=--config.seed=1")
  parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
  args = parser.parse_args()
  problems = check(args.workdir.absolute(), args.steps, args.override, args.timeout)
  if problems:
    print("FAILED:\n  " + "\n  ".join(problems))
    sys.exit(1)
  print("OK: 2 processes = 1 process; only process 0 writes the run's records; 2 -> 1 process resume continues "
        "the same run")


if __name__ == "__main__":
  main()
