"""Workdirs that cannot be corrupted (issue 13): one run per workdir (a lock a dead process does not hold),
config.json is the truth on resume, checkpoints are only written from finite state, a damaged newest checkpoint
falls back to the one before, a torn metrics line is repaired, and path mistakes are reported before anything is
built."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from configs.quickstart import get_config
from vimoe.train import trainer

from test_trainer import ROOT, TINY, read_metrics, tiny_config


def without_speed(lines):
  return [{k: v for k, v in line.items() if k != "train/examples_per_sec"} for line in lines]


# ---------------------------------------------------------------------------------------------------------------
# 1. One run per workdir.

def test_second_run_refuses_while_a_run_is_live_and_a_killed_run_does_not_block(tmp_path, subprocess_env):
  workdir = tmp_path / "w"
  # A real run that stays in its loop (no checkpoint: the workdir holds nothing to resume when it is killed).
  holder = subprocess.Popen(
      [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.py"),
       "--workdir", str(workdir), "--config.total_steps=100000", "--config.checkpoint_every=100000",
       "--config.eval_every=100000", "--config.log_every=1", *TINY],
      env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
      assert holder.poll() is None, holder.stderr.read().decode()[-3000:]
      time.sleep(0.1)
    assert (workdir / "metrics.jsonl").exists()
    config_before = (workdir / "config.json").read_text()
    with pytest.raises(Exception, match=rf"in use by a live run: host {socket.gethostname()}, pid {holder.pid}\b"):
      trainer.train_and_evaluate(tiny_config(total_steps=2), workdir)
    assert (workdir / "config.json").read_text() == config_before  # the refused run wrote nothing
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  assert (workdir / "run.lock").exists()  # left behind by the killed run: it must not block the next one
  trainer.train_and_evaluate(tiny_config(total_steps=2, log_every=1, eval_every=2, checkpoint_every=2), workdir)
  assert [line["step"] for line in read_metrics(workdir)] == [1, 2, 2]  # the killed run's lines are gone
  assert not (workdir / "run.lock").exists()


def test_only_the_coordinating_process_takes_the_lock(tmp_path, monkeypatch):
  with trainer.WorkdirLock(tmp_path):  # held by "another run"
    monkeypatch.setattr(trainer, "is_main_process", lambda: False)
    assert trainer._take_lock(tmp_path) is None  # process 1 of a multi-host run: no lock, no refusal
    monkeypatch.setattr(trainer, "is_main_process", lambda: True)
    with pytest.raises(trainer.WorkdirInUse, match=rf"pid {os.getpid()}\b"):
      trainer._take_lock(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 2. The workdir's config is the truth; 5. a torn metrics line.

def test_resume_refuses_config_changes_names_them_and_records_allowed_ones(tmp_path):
  base = dict(total_steps=2, log_every=1, eval_every=2, checkpoint_every=2)
  trainer.train_and_evaluate(tiny_config(**base), tmp_path)
  saved_config, saved_metrics = (tmp_path / "config.json").read_text(), (tmp_path / "metrics.jsonl").read_text()

  with pytest.raises(trainer.ConfigMismatch, match=r"model\.moe\.num_experts: 8 -> 4"):
    trainer.train_and_evaluate(tiny_config(**base, **{"model.moe.num_experts": 4}), tmp_path)
  with pytest.raises(trainer.ConfigMismatch) as refused:
    trainer.train_and_evaluate(tiny_config(**base, **{"model.moe.k": 2, "model.moe.balance_weight": 0.5}), tmp_path)
  assert "model.moe.k: 1 -> 2" in str(refused.value)
  assert "model.moe.balance_weight: 0.01 -> 0.5" in str(refused.value)
  assert "eval_every" in str(refused.value)  # it says what may change
  assert (tmp_path / "config.json").read_text() == saved_config
  assert (tmp_path / "metrics.jsonl").read_text() == saved_metrics
  config, task, model, step = trainer.load_for_evaluation(tmp_path)  # the untouched run still evaluates
  assert step == 2 and config.model.moe.num_experts == 8

  # A crash mid-write left a torn last line; then a longer run (an allowed change) resumes and repairs it.
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 3, "train/lo')
  trainer.train_and_evaluate(tiny_config(**{**base, "total_steps": 4, "eval_every": 4}), tmp_path)
  assert [line["step"] for line in read_metrics(tmp_path)] == [1, 2, 2, 3, 4, 4]
  assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 4
  changes = [json.loads(line) for line in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
  assert changes[0]["resumed_from_step"] == 2
  assert changes[0]["changes"] == {"total_steps": {"old": 2, "new": 4}, "optim.total_steps": {"old": 2, "new": 4},
                                   "eval_every": {"old": 2, "new": 4}}


def test_metric_writer_keeps_complete_lines_drops_a_torn_one_and_names_a_corrupt_middle_line(tmp_path):
  lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (1, 2, 3, 4)]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(line + "\n" for line in lines) + '{"step": 5, "tr')
  trainer.MetricWriter(tmp_path, resume_step=4).close()
  assert path.read_text() == "".join(line + "\n" for line in lines)
  path.write_text("".join(line + "\n" for line in lines) + '{"step": 5, "tr')
  trainer.MetricWriter(tmp_path, resume_step=2).close()
  assert path.read_text() == "".join(line + "\n" for line in lines[:2])
  path.write_text(lines[0] + "\n" + "garbage\n" + lines[1] + "\n")
  with pytest.raises(ValueError, match=r"metrics\.jsonl line 2"):
    trainer.MetricWriter(tmp_path, resume_step=4)
  assert path.read_text() == lines[0] + "\n" + "garbage\n" + lines[1] + "\n"  # nothing lost


# ---------------------------------------------------------------------------------------------------------------
# 3. "Last good checkpoint" is good.

def diverging_config(**overrides):
  # The reproduction: quickstart at depth 2 with a learning rate of 1e6.
  config = get_config()
  config.model.depth = 2
  config.update(total_steps=30, eval_every=30, checkpoint_every=2, log_every=1)
  config.optim.update(lr=1e6, warmup_steps=1)
  config.update(overrides)
  return config


def test_divergence_names_the_first_bad_step_and_a_checkpoint_that_is_finite(tmp_path):
  with pytest.raises(trainer.TrainingDiverged) as stopped:
    trainer.train_and_evaluate(diverging_config(), tmp_path / "every_step")
  message = str(stopped.value)
  bad = int(message.split(" at step ")[1].split(";")[0])
  named = int(message.split("(step ")[1].split(")")[0])
  lines = read_metrics(tmp_path / "every_step")
  assert [line["step"] for line in lines] == list(range(1, bad))  # every step before the bad one was logged...
  assert all(np.isfinite(line["train/loss"]) for line in lines)   # ...and finite
  assert named < bad
  config, task, model, step = trainer.load_for_evaluation(tmp_path / "every_step", named)
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert np.isfinite(trainer.evaluate(task, model, config)["eval/loss"])

  # Without a read-back per step (logging and checkpoints every 7 steps) the same first bad step is named.
  with pytest.raises(trainer.TrainingDiverged, match=rf" at step {bad}; stopping"):
    trainer.train_and_evaluate(diverging_config(log_every=7, checkpoint_every=7), tmp_path / "every_7")


# ---------------------------------------------------------------------------------------------------------------
# 4. A damaged newest checkpoint falls back to the one before.

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("finished")
  trainer.train_and_evaluate(tiny_config(total_steps=4, log_every=1, eval_every=4, checkpoint_every=2), workdir)
  return workdir


def truncate_largest_state_file(step_dir):
  largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with largest.open("r+b") as f:
    f.truncate(largest.stat().st_size // 2)


def garbage_iterator_json(step_dir):
  (next((step_dir / "data").glob("*.json"))).write_text('{"next_index": 4')


def remove_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("damage", [truncate_largest_state_file, garbage_iterator_json, remove_metadata])
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    finished_run, tmp_path, capfd, damage):
  workdir = tmp_path / "w"
  shutil.copytree(finished_run, workdir)
  damage(workdir / "checkpoints" / "4")
  trainer.train_and_evaluate(tiny_config(total_steps=4, log_every=1, eval_every=4, checkpoint_every=2), workdir)
  err = capfd.readouterr().err
  assert "Skipped checkpoint 4 (" in err and "checkpoints_damaged/4" in err
  assert (workdir / "checkpoints_damaged" / "4" / "WHY_SET_ASIDE.txt").exists()
  assert trainer.checkpoint_steps(workdir) == [2, 4]  # step 4 saved again
  # Steps 3 and 4 redone from checkpoint 2 give exactly the uninterrupted run's numbers.
  assert without_speed(read_metrics(workdir)) == without_speed(read_metrics(finished_run))


def test_when_no_checkpoint_restores_nothing_is_moved_and_the_error_lists_each(finished_run, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(finished_run, workdir)
  for step in (2, 4):
    remove_metadata(workdir / "checkpoints" / str(step))
  with pytest.raises(RuntimeError, match=r"(?s)no checkpoint .* restores.*step 4: .*step 2: "):
    trainer.train_and_evaluate(tiny_config(total_steps=4, log_every=1, eval_every=4, checkpoint_every=2), workdir)
  assert trainer.checkpoint_steps(workdir) == [2, 4] and not (workdir / "checkpoints_damaged").exists()


# ---------------------------------------------------------------------------------------------------------------
# 8. Small ones: evaluate.py reads only, --step lists the steps, path problems first, a quiet log.

def test_load_for_evaluation_creates_nothing_and_lists_available_steps(finished_run, tmp_path):
  only_config = tmp_path / "only_config"
  only_config.mkdir()
  shutil.copy(finished_run / "config.json", only_config / "config.json")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    trainer.load_for_evaluation(only_config)
  assert sorted(p.name for p in only_config.iterdir()) == ["config.json"]
  with pytest.raises(ValueError, match=r"step=99.*available steps: \[2, 4\]"):
    trainer.load_for_evaluation(finished_run, 99)
  result = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--workdir", str(finished_run),
                           "--step", "99"], capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "available steps: [2, 4]" in result.stderr
  assert "Traceback" not in result.stderr


def test_path_problems_are_reported_before_the_model_is_built(tmp_path, monkeypatch):
  def no_build(*args, **kwargs):
    raise AssertionError("the model was built before the workdir was checked")
  monkeypatch.setattr(trainer, "build", no_build)
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(NotADirectoryError, match=r"a_file is a file"):
    trainer.train_and_evaluate(tiny_config(), a_file)
  with pytest.raises(NotADirectoryError, match=r"a_file is a file"):
    trainer.train_and_evaluate(tiny_config(), a_file / "run")
  if os.geteuid() != 0:  # root may write anywhere
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    with pytest.raises(PermissionError, match="not writable"):
      trainer.train_and_evaluate(tiny_config(), read_only / "run")


def test_progress_bar_in_a_log_file_is_not_redrawn_every_step(tmp_path, subprocess_env):
  env = {k: v for k, v in subprocess_env.items() if k != "VIMOE_NO_PROGRESS"}
  start = time.time()
  result = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.py"),
       "--workdir", str(tmp_path), "--config.total_steps=200", "--config.checkpoint_every=200",
       "--config.eval_every=200", "--config.log_every=10", *TINY],
      env=env, capture_output=True, timeout=600, check=True)  # bytes: text mode would turn "\r" into "\n"
  elapsed = time.time() - start
  redraws = result.stderr.count(b"\r")
  # The first draw, the evaluation line's clear and redraw, the final draw (5 carriage returns), plus at most one
  # redraw per 30 s of the run. (Before: one redraw per 0.1 s, 53 for these 200 steps in 26 s.)
  assert redraws <= 6 + 2 * elapsed / 30, (redraws, elapsed, result.stderr[-2000:].decode())


def test_keys_added_after_a_run_was_made_compare_as_their_defaults():
  """A config.json written before config.microbatches / model.remat / model.dtype /
  model.moe.dropless_buffer_factor / init.upcycle_mode existed resumes with a config holding their defaults, and
  is refused (named) when one of them takes another value."""
  saved = {"seed": 0, "batch_size": 64, "model": {"depth": 2, "moe": {"k": 1}}, "init": {"checkpoint": None}}
  new = {"seed": 0, "batch_size": 64, "microbatches": 1,
         "model": {"depth": 2, "remat": "none", "dtype": "float32", "moe": {"k": 1, "dropless_buffer_factor": None}},
         "init": {"checkpoint": None, "upcycle_mode": "copy"}}
  assert trainer.config_changes(saved, new) == {}
  changed = json.loads(json.dumps(new))
  changed["microbatches"], changed["model"]["remat"], changed["init"]["upcycle_mode"] = 4, "full", "preserve"
  assert trainer.config_changes(saved, changed) == {"microbatches": (1, 4), "model.remat": ("none", "full"),
                                                    "init.upcycle_mode": ("copy", "preserve")}
  # A key no default is known for still differs from its absence.
  changed = dict(new, new_key=3)
  assert trainer.config_changes(saved, changed) == {"new_key": ("<absent>", 3)}


def test_checkpoints_without_config_json_are_refused(tmp_path):
  """Deleting config.json must not turn the resume check off: with checkpoints present and no record of how they
  were made, a rerun is refused (naming the steps and what to do) instead of resuming under whatever config it
  was given."""
  (tmp_path / "checkpoints" / "30").mkdir(parents=True)
  with pytest.raises(trainer.ConfigMismatch, match=r"checkpoints \(steps \[30\]\) but no config\.json"):
    trainer.reconcile_config(get_config(), tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # nothing written
