"""The one trainer: resume after SIGKILL reproduces an uninterrupted run, NaN stops with the step and the last
checkpoint named, config errors name the key before anything compiles, evaluate.py re-evaluates a workdir."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from configs.quickstart import get_config
from vimoe.train import trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--config.model.dim=32", "--config.model.depth=2", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
        "--config.model.image_size=16", "--config.model.patch_size=4", "--config.data.image_size=16",
        "--config.batch_size=16", "--config.eval_batch_size=128", "--config.optim.warmup_steps=2"]


def tiny_config(**overrides):
  config = get_config()
  config.unlock()
  config.model.update(dim=32, depth=2, num_heads=2, mlp_dim=64, image_size=16, patch_size=4)
  config.data.image_size = 16
  config.batch_size, config.eval_batch_size = 16, 128
  config.optim.warmup_steps = 2
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def train_command(workdir, steps):
  return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.py"),
          "--workdir", str(workdir), f"--config.total_steps={steps}", "--config.checkpoint_every=2",
          f"--config.eval_every={steps}", "--config.log_every=1", *TINY]


def read_metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
  steps = 24
  env = dict(os.environ, VIMOE_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
  subprocess.run(train_command(tmp_path / "straight", steps), check=True, env=env, capture_output=True,
                 timeout=600)

  killed = tmp_path / "killed"
  process = subprocess.Popen(train_command(killed, steps), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not (killed / "checkpoints" / "6").is_dir():
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  assert process.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
  saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < steps, saved

  result = subprocess.run(train_command(killed, steps), check=True, env=env, capture_output=True, text=True,
                          timeout=600)
  assert "Resumed from step" in result.stdout + result.stderr
  straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(killed)
  assert [m["step"] for m in resumed] == [m["step"] for m in straight]  # no duplicated or missing lines
  for a, b in zip(straight, resumed):
    assert a.keys() == b.keys()
    for key in a:
      if key != "train/examples_per_sec":
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
  assert "eval/top1" in straight[-1]


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
  # A learning rate of 1e25 without clipping blows the weights up on the first update: the weights after step 1
  # give a NaN loss, so checkpoint 1 is not saved and no checkpoint is named (tests/test_workdir.py checks that a
  # named checkpoint restores to finite weights and a finite evaluation loss).
  config = tiny_config(total_steps=6, checkpoint_every=1, **{"optim.lr": 1e25, "optim.grad_clip_norm": 0.0,
                                                             "optim.warmup_steps": 0})
  with pytest.raises(trainer.TrainingDiverged, match=r"at step 1; stopping. Last good checkpoint: none"):
    trainer.train_and_evaluate(config, tmp_path)
  assert trainer.checkpoint_steps(tmp_path) == []


@pytest.mark.parametrize("key,value,message", [
    ("model.moe.k", 9, r"model\.moe\.k=9"),
    ("model.moe.layers", "7", r"model\.moe\.layers"),
    ("model.moe.router", "nearest", r"router='nearest'"),
    ("optim.lr", -1.0, r"config\.optim\.lr=-1\.0"),
    ("batch_size", 0, r"config\.batch_size=0"),
])
def test_config_errors_name_the_key(key, value, message):
  config = tiny_config(**{key: value})
  with pytest.raises(ValueError, match=message):
    trainer.build(config)


def test_unknown_config_key_is_refused_on_the_command_line(tmp_path):
  result = subprocess.run(train_command(tmp_path, 2)[:-len(TINY)] + ["--config.model.moe.num_expert=4"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "num_expert" in result.stderr


def test_evaluate_script_reproduces_final_metrics(tmp_path, monkeypatch):
  config = tiny_config(total_steps=4, eval_every=4, checkpoint_every=4)
  monkeypatch.chdir(tmp_path.parent)
  final = trainer.train_and_evaluate(config, tmp_path.name)  # a relative workdir, as in the README
  result = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--workdir", tmp_path.name],
                          capture_output=True, text=True, check=True, timeout=300)
  printed = json.loads(result.stdout[result.stdout.index("{"):])
  assert printed["step"] == 4
  assert printed["eval/top1"] == pytest.approx(final["eval/top1"])
  assert printed["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
  lines = read_metrics(tmp_path)
  assert lines[-1]["eval/top1"] == pytest.approx(final["eval/top1"])
  assert all("step" in line for line in lines)
  assert json.loads((tmp_path / "config.json").read_text())["model"]["moe"]["layers"] == "last:2"
