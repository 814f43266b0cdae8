"""A batch that does not divide over the mesh's batch axes is refused (issue 13, item 7): it used to be replicated
on every device, the same numbers at 8x the compute. Batches of one evaluation image stay replicated (ADE20K)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.quickstart import get_config
from vimoe.train import trainer


def mesh_config(**overrides):
  config = get_config()
  config.model.update(dim=32, depth=2, num_heads=2, mlp_dim=64)
  config.update(batch_size=16, eval_batch_size=128, total_steps=2, log_every=1, eval_every=2, checkpoint_every=2)
  config.mesh.update(data=2, expert=4)
  config.update(overrides)
  return config


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size"])
def test_batch_that_does_not_divide_over_the_devices_is_refused_before_building(tmp_path, monkeypatch, key):
  def no_build(*args, **kwargs):
    raise AssertionError("the model was built before the batch size was checked")
  monkeypatch.setattr(trainer, "build", no_build)
  with pytest.raises(ValueError, match=rf"config\.{key}=12 does not divide over the 8 devices.*"
                                       r"Valid sizes: multiples of 8 \(8, 16, 24, 32, \.\.\.\)"):
    trainer.train_and_evaluate(mesh_config(**{key: 12}), tmp_path)


def test_training_batch_is_never_replicated_and_one_evaluation_image_is():
  config = mesh_config()
  mesh = trainer.build_mesh(config)
  batch = {"image": np.zeros((12, 16, 16, 1), np.float32), "label": np.zeros((12,), np.int32)}
  with pytest.raises(ValueError, match=r"training batch of 12 rows .* 8 devices"):
    trainer._place(batch, mesh, train=True)
  one = {key: value[:1] for key, value in batch.items()}
  placed = trainer._place(one, mesh)  # evaluation: replicated on every device
  assert placed["image"].sharding.is_fully_replicated


def test_donated_step_keeps_the_experts_sharded():
  """Two steps of the trainer's jitted, donating step: experts and their Adam moments stay on 'expert'."""
  config = mesh_config()
  mesh = trainer.build_mesh(config)
  task, model, optimizer = trainer.build(config, mesh)
  graphdef, state = nnx.split((model, optimizer))
  step = trainer.make_train_step(task, config, graphdef)
  data = iter(task.build_data(config, "train", train=True, seed=0, batch_size=16))
  guard = trainer._initial_guard(0)
  with trainer._mesh_scope(mesh):
    for _ in range(2):
      state, guard, _ = step(state, guard, trainer._place(next(data), mesh, train=True))
  assert int(guard["step"]) == 2 and int(guard["first_bad"]) == 0
  specs = {jax.tree_util.keystr(path): leaf.sharding.spec for path, leaf in jax.tree_util.tree_leaves_with_path(state)
           if "w_in" in jax.tree_util.keystr(path) and "experts" in jax.tree_util.keystr(path)}
  assert len(specs) >= 3 and all(spec == P("expert") for spec in specs.values()), specs  # param, mu, nu
