"""Sweeps: a killed sweep continues without redoing finished points and resumes the half-finished one, a failing
point does not stop the others; --print-commands lines parse back (through a shell and ml_collections' config
flags) to the same configs; --collect gives the hand-computed table from hand-written workdirs."""

import csv
import json
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from vimoe.train import sweep

ROOT = pathlib.Path(__file__).resolve().parent.parent

TINY_SWEEP = '''
from configs.quickstart import get_config as quickstart_config


def get_config(arg=None):
  config = quickstart_config()
  config.model.update(dim=32, depth=2, num_heads=2, mlp_dim=64)
  config.batch_size, config.eval_batch_size = 16, 128
  config.total_steps = 8
  config.optim.warmup_steps = 2
  config.log_every, config.checkpoint_every, config.eval_every = 1, 2, 8
  return config


def get_sweep(arg=None):
  return [{"model.moe.layers": "last:1", "seed": 0},
          {"model.moe.layers": "last:1", "model.moe.k": 99},  # invalid (k > 8 experts): fails, the sweep goes on
          {"model.moe.layers": "last:2", "seed": 1}]
'''

# Values a shell or a flag parser could mangle: spaces, quotes, brackets, '%', a tuple, a bool, a float, and a
# list of blocks written as a string.
AWKWARD_SWEEP = '''
from configs.quickstart import get_config as quickstart_config


def get_config(arg=None):
  config = quickstart_config()
  config.total_steps = int(arg)
  return config


def get_sweep(arg=None):
  return [{"data.train_split": "train[:50%] it's \\"quoted\\"", "optim.lr": 0.003, "seed": 3},
          {"data.mean": (0.4,), "model.head_zero_init": True, "model.moe.balance_weight": 1e-3},
          {"model.moe.layers": "3,5", "optim.total_steps": 11}]
'''


def sweep_command(config, root, *extra):
  return [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--config", str(config), "--workdir", str(root),
          *extra]


def test_killed_sweep_continues_without_redoing_finished_points(tmp_path, subprocess_env):
  config = tmp_path / "tiny_sweep.py"
  config.write_text(TINY_SWEEP)
  root = tmp_path / "sweep"
  first, bad, half = "layers=last_1,seed=0", "layers=last_1,k=99", "layers=last_2,seed=1"
  env = subprocess_env
  process = subprocess.Popen(sweep_command(config, root), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 400
  while time.time() < deadline and not (root / half / "checkpoints" / "2").is_dir():
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  assert process.wait(timeout=60) == -signal.SIGKILL, "the sweep finished before it could be killed"

  module = sweep.load_config_module(config)
  points = dict(zip([first, bad, half], sweep.sweep_points(module)))
  point_config = lambda name: sweep.point_config(module, None, points[name])
  assert sweep.is_finished(root / first, point_config(first))
  assert not sweep.is_finished(root / half, point_config(half)), "the third point finished before the kill"
  finished_metrics = (root / first / "metrics.jsonl").read_bytes()
  finished_mtime = (root / first / "metrics.jsonl").stat().st_mtime_ns
  finished_checkpoints = sorted(path.name for path in (root / first / "checkpoints").iterdir())

  result = subprocess.run(sweep_command(config, root), env=env, capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 1, output[-3000:]  # the invalid point failed again
  assert f"[1/3] {first}: finished before, skipped" in output
  assert f"[2/3] {bad}: FAILED" in output and "model.moe.k=99" in output
  assert f"[3/3] {half}: eval/top1=" in output and "Resumed from step" in output
  assert "sweep: 1 trained, 1 finished before, 1 failed" in output
  assert (root / first / "metrics.jsonl").read_bytes() == finished_metrics
  assert (root / first / "metrics.jsonl").stat().st_mtime_ns == finished_mtime
  assert sorted(path.name for path in (root / first / "checkpoints").iterdir()) == finished_checkpoints
  assert sweep.is_finished(root / half, point_config(half))
  steps = [record["step"] for record in sweep.read_metrics(root / half) if "train/loss" in record]
  assert steps == list(range(1, 9))  # every step once: none lost or repeated by the resume
  assert json.loads((root / half / "config.json").read_text())["model"]["moe"]["layers"] == "last:2"


def test_print_commands_parse_back_to_the_same_configs(tmp_path, subprocess_env):
  config = tmp_path / "awkward_sweep.py"
  config.write_text(AWKWARD_SWEEP)
  root = tmp_path / "runs dir"  # a space in the workdir too
  result = subprocess.run(sweep_command(f"{config}:9", root, "--print-commands", "--config.total_steps=7",
                                        "--config.model.moe.num_experts=4"),
                          env=subprocess_env, capture_output=True, text=True, timeout=300,
                          check=True)
  lines = result.stdout.strip().splitlines()
  module = sweep.load_config_module(config)
  points = sweep.sweep_points(module, "9")
  assert len(lines) == len(points) == 3
  for line, point in zip(lines, points):
    words = shlex.split(line)  # what a shell hands to python
    assert words[:4] == ["python", "scripts/train.py", "--config", f"{config}:9"]
    # Parse the rest exactly as scripts/train.py does.
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                    sys_argv=words[1:])  # the override flags are found in sys_argv
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    flag_values(words[1:])
    expected = sweep.point_config(module, "9", point, {"total_steps": 7, "model.moe.num_experts": 4})
    assert flag_values.config.to_dict() == expected.to_dict()
    assert flag_values.workdir == str(root / sweep.point_name(point))
    for key, value in point.items():  # and the values are the sweep's, not just equal to each other
      node = flag_values.config
      for part in key.split("."):
        node = node[part]
      assert node == value, key
  assert "train[:50%] it's \"quoted\"" in shlex.split(lines[0])[-3]
  assert shlex.split(lines[2])[-1] == "--config.optim.total_steps=11"
  # A key that is None in get_config cannot be set by a config flag: refused with the key named.
  with pytest.raises(ValueError, match=r"sweep key 'model.layerscale_init' is None in get_config"):
    sweep.train_commands(f"{config}:9", root, [{"model.layerscale_init": 1e-5}], base_config=module.get_config(9))
  # A typed placeholder (capacity_factor in the quickstart config) can be set.
  command, = sweep.train_commands(f"{config}:9", root, [{"model.moe.capacity_factor": 1.5}],
                                  base_config=module.get_config(9))
  assert shlex.split(command)[-1] == "--config.model.moe.capacity_factor=1.5"


def write_point(root, name, overrides, evaluations):
  """A hand-written point workdir: config.json from the placement config with `overrides`, and metrics.jsonl with
  a training line and {step: top-1} evaluation lines."""
  module = sweep.load_config_module(ROOT / "configs" / "quickstart_placement.py")
  config = sweep.point_config(module, None, overrides)
  workdir = root / name
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  lines = [{"step": 100, "train/loss": 1.5}] + [{"step": step, "eval/top1": value, "eval/loss": 0.3}
                                                for step, value in evaluations.items()]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_collect_hand_written_workdirs(tmp_path):
  root = tmp_path / "placement"
  point = lambda last, shared, seed: {"model.moe.layers": f"last:{last}", "model.moe.num_shared_experts": shared,
                                      "seed": seed}
  write_point(root, "a", point(1, 0, 0), {200: 0.5, 400: 0.90})
  write_point(root, "b", point(1, 0, 1), {400: 0.94})
  write_point(root, "c", point(2, 1, 0), {400: 0.95})
  write_point(root, "d", point(2, 1, 1), {400: 0.98})
  write_point(root, "e", point(2, 1, 2), {200: 0.50})  # unfinished: its last evaluation is at step 200 of 400
  results = sweep.write_results(root)
  assert results["swept"] == ["model.moe.layers", "model.moe.num_shared_experts", "seed"]

  # Parameters by hand for the quickstart ViT (dim D=96, MLP H=192, 6 blocks, 8 experts, top-1):
  #   dense: patch conv 4*4*3*96+96 = 4704, class token 96, positions 17*96 = 1632, per block 2 norms 384 +
  #   qkv 96*288+288 = 27936 + projection 96*96+96 = 9312 + MLP (D*H + H + H*D + D = 37152) = 74784, x6 = 448704,
  #   final norm 192, head 96*10+10 = 970  ->  456298.
  #   An MoE block adds 7 more experts (7*37152 = 260064), the router 96*8 = 768, and 37152 per shared expert;
  #   activated parameters leave out the 7 unused experts of each MoE block.
  dense, expert = 456298, 37152
  total = lambda last, shared: dense + last * (7 * expert + 768 + shared * expert)
  activated = lambda last, shared: total(last, shared) - last * 7 * expert
  assert (total(1, 0), activated(1, 0)) == (717130, 457066)
  assert (total(2, 1), activated(2, 1)) == (1052266, 532138)

  with (root / "results.csv").open() as f:
    rows = {row["point"]: row for row in csv.DictReader(f)}
  assert sorted(rows) == ["a", "b", "c", "d", "e"]
  assert rows["a"]["value"] == "0.9" and rows["a"]["step"] == "400" and rows["a"]["finished"] == "True"
  assert rows["e"]["value"] == "0.5" and rows["e"]["step"] == "200" and rows["e"]["finished"] == "False"
  assert rows["a"]["model.moe.layers"] == "last:1" and rows["d"]["seed"] == "1"
  assert rows["b"]["routing_degree"] == "8" and rows["c"]["routing_degree"] == "64"  # 8^1, 8^2
  assert rows["b"]["total_params"] == str(total(1, 0)) and rows["b"]["activated_params"] == str(activated(1, 0))
  assert rows["d"]["total_params"] == str(total(2, 1)) and rows["d"]["activated_params"] == str(activated(2, 1))

  # Means and sample standard deviations (ddof=1) over the finished seeds, by hand:
  #   last:1, no shared expert: (0.90 + 0.94) / 2 = 0.92, std = sqrt(2 * 0.02^2 / 1) = 0.028284
  #   last:2, shared expert:    (0.95 + 0.98) / 2 = 0.965, std = sqrt(2 * 0.015^2 / 1) = 0.021213
  groups = {group["model.moe.layers"]: group for group in results["groups"]}
  assert groups["last:1"]["mean"] == pytest.approx(0.92)
  assert groups["last:1"]["std"] == pytest.approx(0.028284, abs=1e-6)
  assert groups["last:2"]["mean"] == pytest.approx(0.965)
  assert groups["last:2"]["std"] == pytest.approx(0.021213, abs=1e-6)
  markdown = (root / "results.md").read_text()
  assert "| last:1 | 0 | 1 | 8^1 = 8 | 2 | 0.9200 ± 0.0283 | 0.9000, 0.9400 | 0.457M | 0.717M |" in markdown
  assert "| last:2 | 1 | 2 | 8^2 = 64 | 2 | 0.9650 ± 0.0212 | 0.9500, 0.9800 | 0.532M | 1.052M |" in markdown
  assert "Not finished (left out of the means): e" in markdown
  assert (root / "placement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_point_names_and_bad_sweeps():
  assert sweep.point_name({"model.moe.layers": "last:3", "model.moe.num_shared_experts": 0, "seed": 1}) == \
      "layers=last_3,shared=0,seed=1"
  assert sweep.point_name({}) == "base"
  long_name = sweep.point_name({"data.train_split": "x" * 300})
  assert len(long_name) == 200 and long_name.startswith("train_split=xxx") and long_name != sweep.point_name(
      {"data.train_split": "x" * 301})
  # Two keys with the same last component are named in full; sequences are joined with '+'.
  assert sweep.point_name({"data.image_size": 16, "model.image_size": 32, "data.mean": (0.5, 0.4)}) == \
      "data.image_size=16,model.image_size=32,mean=0.5+0.4"
  module = sweep.load_config_module(ROOT / "configs" / "quickstart_placement.py")
  with pytest.raises(KeyError, match=r"sweep key 'model.moe.num_expert': model.moe has no 'num_expert'; valid: "):
    sweep.point_config(module, None, {"model.moe.num_expert": 4})
  assert len(sweep.sweep_points(module)) == 24
