"""Real multi-process runs: 2 processes x 4 CPU devices forming one jax cluster over localhost, against 1 process
with 8 devices (scripts/multiprocess_check.py), and the data-iterator checkpoint across process counts."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from vimoe import data
from vimoe.train import trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def digits(**overrides):
  return {"name": "digits", "image_size": 16, "augment": True, "max_shift": 1, **overrides}


def test_iterator_state_written_by_two_processes_restores_in_one(tmp_path):
  """Both processes of a 2-process run save the same state (a step count); one process continues from it with the
  global batches an uninterrupted one-process iterator gives."""
  for p in range(2):
    iterator = iter(data.build_image_dataset(digits(), "train", batch_size=16, seed=1, train=True, process_index=p,
                                             process_count=2))
    for _ in range(5):
      next(iterator)
    (tmp_path / f"process_{p}-of-2.json").write_text(json.dumps(iterator.get_state()))
  dataset = data.build_image_dataset(digits(), "train", batch_size=16, seed=1, train=True)
  restored = trainer.DataIteratorHandler().restore(tmp_path, args=trainer.DataIteratorRestore(iter(dataset)))
  uninterrupted = iter(dataset)
  expected = [next(uninterrupted) for _ in range(8)][5:]
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_iterator_states_that_differ_between_processes_are_refused(tmp_path):
  for p, steps in enumerate((5, 6)):
    (tmp_path / f"process_{p}-of-2.json").write_text(json.dumps({"next_index": steps}))
  dataset = data.build_image_dataset(digits(), "train", batch_size=16, seed=1, train=True)
  with pytest.raises(ValueError, match=r"process_0-of-1\.json.*do not all hold the same state"):
    trainer.DataIteratorHandler().restore(tmp_path, args=trainer.DataIteratorRestore(iter(dataset)))


def test_two_processes_train_as_one_and_resume_in_one(tmp_path):
  """scripts/multiprocess_check.py: the 2-process run logs the 1-process run's metrics, process 1 writes only its
  checkpoint shards, and a 2-process checkpoint resumes in 1 process to the same metrics."""
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  result = subprocess.run([sys.executable, str(ROOT / "scripts" / "multiprocess_check.py"), "--workdir",
                           str(tmp_path / "check"), "--steps", "4", "--timeout", "400"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1300)
  print(result.stdout[-4000:], result.stderr[-4000:])
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  assert "OK: 2 processes = 1 process" in result.stdout
