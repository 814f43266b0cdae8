"""Preemption: SIGTERM, SIGINT or SIGUSR1 during a run finish the step, save a checkpoint of it, release the
workdir and exit 75 with one line naming the step; the rerun resumes from exactly that step, and metrics.jsonl and
the TensorBoard events keep every step once. Exit codes of the other known stops (docs/workdirs.md)."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from vimoe.train import trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--config.model.dim=32", "--config.model.depth=2", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
        "--config.batch_size=16", "--config.eval_batch_size=128", "--config.optim.warmup_steps=2"]


def command(workdir, steps, *extra):
  return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.py"),
          "--workdir", str(workdir), f"--config.total_steps={steps}", "--config.checkpoint_every=1000",
          "--config.eval_every=1000", "--config.log_every=1", *TINY, *extra]


def logged_steps(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
  return [record["step"] for record in records if "train/loss" in record]  # training lines (not evaluation's)


def preempt(workdir, env, signum, after_steps=4):
  """Starts a long run, sends `signum` once it has logged `after_steps` steps; returns (step it saved, output)."""
  process = subprocess.Popen(command(workdir, 3000), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  deadline = time.time() + 300
  while time.time() < deadline and len(logged_steps(workdir)) < after_steps and process.poll() is None:
    time.sleep(0.05)
  process.send_signal(signum)
  out, err = process.communicate(timeout=120)
  assert process.returncode == trainer.EXIT_CODES["Preempted"] == 75, (process.returncode, out[-2000:], err[-3000:])
  lines = [line for line in out.splitlines() if "preempted at step" in line]
  assert len(lines) == 1, out[-2000:]
  step = int(lines[0].split("preempted at step ")[1].split()[0])
  assert f"({signal.Signals(signum).name}); saved checkpoint {step}" in lines[0]
  assert "Traceback" not in err, err[-3000:]
  return step, out


def test_sigterm_saves_the_current_step_and_the_rerun_resumes_there(tmp_path, subprocess_env):
  workdir = tmp_path / "run"
  step, _ = preempt(workdir, subprocess_env, signal.SIGTERM)
  assert step >= 4 and step not in (1000, 3000)  # a step that no regular checkpoint would have saved
  assert trainer.checkpoint_steps(workdir) == [step]
  assert not list((workdir / "checkpoints").glob("*tmp*")), "an unfinished save was left behind"
  assert not (workdir / "run.lock").exists()
  assert logged_steps(workdir) == list(range(1, step + 1))  # nothing lost, nothing beyond the saved step

  # Resume: extending total_steps is allowed; the run goes on from the saved step, no step logged twice.
  result = subprocess.run(command(workdir, step + 3), env=subprocess_env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from step {step} " in result.stdout
  assert logged_steps(workdir)[:step + 3] == list(range(1, step + 4))
  # The TensorBoard events hold every training step once.
  assert tensorboard_steps(workdir) == list(range(1, step + 4))

  # A changed config is refused with its own exit code and one line.
  result = subprocess.run(command(workdir, step + 3, "--config.seed=5"), env=subprocess_env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == trainer.EXIT_CODES["ConfigMismatch"] == 78
  assert "Traceback" not in result.stderr and "ConfigMismatch" in result.stderr


def tensorboard_steps(workdir, tag="train/loss"):
  """The steps TensorBoard shows for `tag` (its own reader, which drops events a restarted run purged)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  events = event_accumulator.EventAccumulator(str(pathlib.Path(workdir) / "tensorboard"))
  events.Reload()
  return [event.step for event in events.Scalars(tag)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1], ids=["SIGINT", "SIGUSR1"])
def test_sigint_and_sigusr1_stop_the_same_way(tmp_path, subprocess_env, signum):
  workdir = tmp_path / "run"
  step, _ = preempt(workdir, subprocess_env, signum, after_steps=2)
  assert trainer.checkpoint_steps(workdir) == [step]
  assert not (workdir / "run.lock").exists()
  if signum != signal.SIGINT:
    return
  # Checkpoints deleted: the rerun starts at step 0 in the same workdir; metrics.jsonl and TensorBoard both hold
  # the new run's steps once (the old events of steps 1..step are purged, not shown twice).
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(workdir / "checkpoints")
  result = subprocess.run(command(workdir, 2), env=subprocess_env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert logged_steps(workdir) == [1, 2] and tensorboard_steps(workdir) == [1, 2]


def test_exit_codes_are_distinct_for_retry_and_give_up():
  retry = {trainer.EXIT_CODES[name] for name in ("Preempted", "WorkdirInUse", "OSError")}
  give_up = {trainer.EXIT_CODES[name] for name in ("ConfigMismatch", "TrainingDiverged")}
  assert not retry & give_up and 0 not in retry | give_up and 1 not in retry | give_up


def test_help_exits_zero():
  result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0 and "--workdir" in result.stdout + result.stderr


def test_a_failed_save_stops_the_run_at_once_in_one_line(tmp_path, subprocess_env):
  """A full disk during a checkpoint save (a 12 MB tmpfs; the checkpoints of this model are about 8 MB): the run
  stops within a few steps of the failed save, exit 74, with one line naming the cause and the newest complete
  checkpoint, not one checkpoint later in hundreds of lines."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  try:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.py"),
         "--workdir", str(disk / "run"), "--config.model.depth=2", "--config.total_steps=60",
         "--config.checkpoint_every=10", "--config.log_every=1", "--config.eval_every=60"],
        env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == trainer.EXIT_CODES["OSError"] == 74, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    # One line of ours, the last one (orbax's background thread logs its own traceback of the failure above it).
    assert len(lines) == 1 and result.stderr.strip().splitlines()[-1] == lines[0], result.stderr[-3000:]
    assert "CheckpointSaveFailed: saving checkpoint 20 failed" in lines[0] and "No space left" in lines[0]
    saved = trainer.checkpoint_steps(disk / "run")
    assert saved == [10] and f"{disk / 'run' / 'checkpoints' / '10'} (step 10)" in lines[0]
    stopped = int(lines[0].split("stopped at step ")[1].split(".")[0])
    assert 20 <= stopped < 30, stopped  # soon after the failed save, before the next one
  finally:
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)
