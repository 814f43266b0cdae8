"""The paper configs' train steps on an 8-device mesh with expert=8, compiled from shapes only: each device holds
1/8 of the expert parameters and of their optimizer state (scripts/memory_report.py, shrunk widths)."""

import importlib.util
import math
import re
import pathlib

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("memory_report", ROOT / "scripts" / "memory_report.py")
memory_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_report)


def lstm_4096h():
  from configs import lstm_moe4096h_lm1b
  config = lstm_moe4096h_lm1b.get_config()
  config.batch_size, config.data.seq_len, config.model.dim = 16, 8, 32
  config.model.moe.hidden_dim, config.model.moe.num_groups, config.model.moe.experts_per_group = 16, 8, 4
  # Hierarchical experts [groups, experts_per_group, ...]: the groups are split over 'expert'.
  return config, 8 * 4 * (32 * 16 + 16 * 32 + 16 + 32)


def umoe_base():
  from configs import umoe_base_fineweb
  config = umoe_base_fineweb.get_config()
  config.data.name, config.data.tokenizer = "lm1b", "bytes"  # no FineWeb reader: only the vocabulary check reads it
  config.batch_size, config.data.seq_len = 16, 8
  config.model.update(vocab_size=256, dim=32, depth=2, num_heads=2, mlp_dim=64, max_length=8, umoe_key_dim=16,
                      umoe_query_rank=4, dtype="float32")
  config.model.moe.update(num_experts=16, k=3, hidden_dim=16)
  return config, 2 * 16 * (32 * 16 + 16 * 32 + 16 + 32)  # one expert pool per block, shared by attention and FFN


def vimoe_s14():
  from configs import vimoe_s14_in1k
  config = vimoe_s14_in1k.get_config()
  config.batch_size, config.data.image_size = 16, 28
  config.model.update(variant=None, image_size=28, patch_size=14, dim=32, depth=2, num_heads=2, mlp_dim=64,
                      num_classes=10)
  return config, 2 * 8 * (32 * 64 + 64 * 32 + 64 + 32)  # MoE in the last 2 blocks, 8 experts of width mlp_dim


def _bytes(shape, dtype, sharding):
  itemsize = dtype.itemsize
  return math.prod(shape) * itemsize, math.prod(sharding.shard_shape(shape)) * itemsize


@pytest.mark.parametrize("make", [lstm_4096h, umoe_base, vimoe_s14], ids=["lstm_moe4096h", "umoe_base", "vimoe_s14"])
def test_expert_state_is_one_eighth_per_device_in_the_compiled_step(make):
  config, expert_params = make()
  out = memory_report.report(config, expert=8)
  compiled = out["compiled"]
  state_shardings = compiled.input_shardings[0][0]
  task, graphdef, state = memory_report.abstract_train_state(config, memory_report.parallel.make_mesh(expert=8))
  leaves = jax.tree_util.tree_leaves_with_path(state)
  shardings = jax.tree.leaves(state_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  assert len(shardings) == len(leaves)
  sums = {("model", True): [0, 0], ("model", False): [0, 0], ("optimizer", True): [0, 0],
          ("optimizer", False): [0, 0]}
  for (path, leaf), sharding in zip(leaves, shardings):
    name = "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)
    part = "model" if name.startswith("0/") else "optimizer"
    expert = re.search(r"(^|/)experts/(w_in|w_out|b_in|b_out)(/value)?$", name) is not None
    total, per_device = _bytes(leaf.shape, leaf.dtype, sharding)
    sums[part, expert][0] += total
    sums[part, expert][1] += per_device
  # Expert parameters: as many as the hand count from the config, float32, 1/8 of them on each device.
  assert sums["model", True][0] == 4 * expert_params
  assert sums["model", True][1] * 8 == sums["model", True][0]
  # Adam's two moments of the experts: twice the parameters, split the same way.
  assert sums["optimizer", True][0] == 2 * sums["model", True][0]
  assert sums["optimizer", True][1] * 8 == sums["optimizer", True][0]
  # Everything else is replicated: whole on every device.
  for part in ("model", "optimizer"):
    assert sums[part, False][1] == sums[part, False][0] > 0
  # The executable's argument memory per device is that state, the step guard and the device's rows of the batch.
  state_per_device = sum(per_device for _, per_device in sums.values())
  batch_rows = sum(math.prod(leaf.shape) // 8 * leaf.dtype.itemsize
                   for leaf in jax.tree.leaves(memory_report.abstract_batch(config, memory_report.parallel.make_mesh(
                       expert=8))))
  guard = 3 * 4  # step, first_bad (int32), bad_loss (float32)
  assert compiled.memory_analysis().argument_size_in_bytes == state_per_device + guard + batch_rows
  # And the script's own summary agrees.
  assert out["compiled_state"] == out["state"]
  assert out["state"][("model", "experts")] == sums["model", True]
  np.testing.assert_equal(out["state"][("optimizer", "experts")], sums["optimizer", True])


@pytest.mark.parametrize("make, expert_leading", [(lstm_4096h, 8 * 4), (umoe_base, 16), (vimoe_s14, 8)],
                         ids=["lstm_moe4096h", "umoe_base", "vimoe_s14"])
def test_trainer_mesh_splits_experts_when_the_config_leaves_sizes_open(make, expert_leading):
  """The trainer's own mesh for a config whose mesh block leaves both sizes None (all three do): the 'expert' axis
  is the largest divisor of the 8 devices and of the experts' stacked leading axis (for the hierarchical LSTM-MoE
  its 8 groups x 4 experts, stored flat), read from the model's shapes. The LSTM-MoE configs have no
  model.moe.layers key, and the mesh used to give them expert=1: every expert on every device."""
  from vimoe.train import trainer
  config, _ = make()
  assert config.mesh.data is None and config.mesh.expert is None
  assert trainer.model_expert_count(config) == expert_leading
  mesh = trainer.build_mesh(config)
  assert dict(mesh.shape) == {"data": 1, "expert": 8}
