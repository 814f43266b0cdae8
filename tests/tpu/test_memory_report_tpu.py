"""scripts/memory_report.py --topology: the trainer's train step of a shrunk config compiled by the TPU compiler for
a v5e:2x2 slice (4 chips), checked against hand counts: the argument bytes are the state each chip holds plus its
rows of the batch, the peak is what the memory analysis adds up to, the chip and its HBM are the published ones,
the dropless expert-parallel step exchanges rows with all-to-all and never gathers an expert weight, and the
compiler's FLOPs of a dense step are at least the matmul FLOPs worked out from the shapes."""

import importlib.util
import math
import pathlib
import subprocess
import sys

import jax
import pytest

from vimoe.parallel import aot

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("memory_report", ROOT / "scripts" / "memory_report.py")
memory_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_report)

TOPOLOGY = "v5e:2x2"
# Widths that are multiples of 128 (the TPU's tile), 32x32 images in 8x8 patches: 16 patches + the class token.
D, MLP, DEPTH, T, BATCH, CLASSES, IMAGE, PATCH = 128, 512, 2, 17, 16, 10, 32, 8
PATCH_IN = PATCH * PATCH * 3


def shrunk_quickstart(moe=True):
  from configs import quickstart
  config = quickstart.get_config()
  config.batch_size = BATCH
  config.data.image_size = IMAGE
  config.model.update(dim=D, depth=DEPTH, num_heads=2, mlp_dim=MLP, image_size=IMAGE, patch_size=PATCH)
  if not moe:
    config.model.moe.layers = "none"
  return config


@pytest.fixture(scope="module")
def moe_report():
  return memory_report.report(shrunk_quickstart(), expert=None, data=None, topology=TOPOLOGY)


def test_the_step_is_compiled_for_the_slice_with_the_config_mesh(moe_report):
  out = moe_report
  assert out["chip"] is aot.CHIPS["v5e"] and out["chip"].hbm_bytes == 16 * 10**9
  # The config's mesh block leaves both sizes None: expert = the largest divisor of 4 chips and 8 experts.
  assert out["mesh"].startswith("data=1 x expert=4 (4 devices)")
  devices = out["compiled"].input_shardings[0][0]
  kinds = {d.device_kind for leaf in jax.tree.leaves(devices, is_leaf=lambda x: hasattr(x, "device_set"))
           for d in leaf.device_set}
  assert kinds == {"TPU v5 lite"}


def test_argument_bytes_are_the_state_per_chip_plus_its_batch_rows(moe_report):
  out = moe_report
  state = sum(per_device for _, per_device in out["state"].values())
  # This chip's rows of the batch: 16 images of 32x32x3 float32 and 16 int32 labels over 4 chips.
  batch = BATCH // 4 * (IMAGE * IMAGE * 3 * 4 + 4)
  assert out["batch_per_device"] == batch
  # The TPU lays arrays out in tiles, so small arrays (biases, norms, the step guard) take padded space: the
  # argument holds at least the logical bytes, and with these 128-aligned widths less than 5 % more (1.4 % seen).
  logical = state + batch + out["guard"]
  assert logical <= out["argument"] <= 1.05 * logical
  assert out["peak"] == out["argument"] + out["output"] - out["alias"] + out["temp"] + \
      out["compiled"].memory_analysis().generated_code_size_in_bytes
  assert memory_report.summary_row(out)["fits"] is True


def test_dropless_experts_exchange_rows_and_never_gather_weights(moe_report):
  out = moe_report
  assert out["collectives"].get("all-to-all", {}).get("count", 0) + \
      out["collectives"].get("ragged-all-to-all", {}).get("count", 0) > 0
  hlo = out["compiled"].as_text()
  expert_shapes = {f"[8,{D},{MLP}]", f"[8,{MLP},{D}]"}  # the whole stacked expert weights
  gathers = [line for line in hlo.splitlines() if "all-gather" in line and "=" in line]
  assert not [line for line in gathers if any(shape in line.split("all-gather")[0] for shape in expert_shapes)]


def test_dense_step_flops_are_at_least_the_matmul_flops():
  out = memory_report.report(shrunk_quickstart(moe=False), expert=None, data=None, topology=TOPOLOGY)
  # Per image, forward: patch embedding, per block qkv + proj + 2 MLP matmuls on T tokens, attention scores and
  # values (2 T^2 D), and the head on the class token; backward twice that (activations and weights).
  per_block = 2 * T * (D * 3 * D + D * D + 2 * D * MLP) + 2 * 2 * T * T * D
  forward = 2 * 16 * PATCH_IN * D + DEPTH * per_block + 2 * D * CLASSES
  images_per_chip = BATCH // 4
  matmul = 3 * forward * images_per_chip
  assert out["flops"] >= matmul
  assert out["flops"] < 3 * matmul, (out["flops"], matmul)  # the rest (norms, softmax, AdamW) is smaller here
  assert out["roofline"]["step_s"] == pytest.approx(max(out["flops"] / 197e12, out["bytes_accessed"] / 819e9))


def test_cli_prints_the_verdict_and_writes_json(tmp_path):
  output = tmp_path / "report.json"
  result = subprocess.run([sys.executable, str(ROOT / "scripts" / "memory_report.py"), "--config",
                           str(ROOT / "configs" / "quickstart.py"), "--topology", TOPOLOGY, "--config.model.depth=2",
                           "--config.batch_size=16", "--output", str(output)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "FITS in TPU v5e" in result.stdout and "roofline" in result.stdout
  import json
  row = json.loads(output.read_text())
  assert row["topology"] == TOPOLOGY and row["fits"] is True and row["chip"] == "TPU v5e"
  assert math.isclose(row["roofline"]["step_s"], max(row["flops"] / 197e12, row["bytes_accessed"] / 819e9))
