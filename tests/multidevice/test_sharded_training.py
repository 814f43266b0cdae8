"""The trainer on 8 fake devices: experts sharded over 'expert', optimizer state sharded like its parameters,
batches split over ('data', 'expert'), the same losses as the same run on one device, and a rerun resumes onto
the mesh."""

import json

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.quickstart import get_config
from vimoe.train import trainer


def mesh_config(total_steps):
  config = get_config()
  config.unlock()
  config.model.update(dim=32, depth=2, num_heads=2, mlp_dim=64)
  # Token routing with capacity and einsum dispatch: the expert-parallel path with all-to-all.
  config.model.moe.update(route_per="token", dispatch="einsum", capacity_factor=1.25, group_size=17)
  config.update(batch_size=16, eval_batch_size=128, total_steps=total_steps, log_every=1,
                eval_every=total_steps, checkpoint_every=4)
  config.optim.update(warmup_steps=2, total_steps=total_steps)
  config.mesh.update(data=2, expert=4)
  return config


def test_trainer_shards_experts_and_resumes_on_the_mesh(tmp_path):
  config = mesh_config(8)
  mesh = trainer.build_mesh(config)
  assert dict(mesh.shape) == {"data": 2, "expert": 4}
  _, model, optimizer = trainer.build(config, mesh)
  assert model.blocks[1].mlp.experts.w_in[...].sharding.spec == P("expert")
  assert model.blocks[1].mlp.router.kernel[...].sharding.spec == P()
  moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(optimizer))
             if "experts" in jax.tree_util.keystr(path) and "w_in" in jax.tree_util.keystr(path)]
  assert moments and all(m.sharding.spec == P("expert") for m in moments)

  final = trainer.train_and_evaluate(config, tmp_path)
  single = mesh_config(8)
  single.mesh = None  # the same run on one device
  single_final = trainer.train_and_evaluate(single, tmp_path / "single")
  read = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
  losses = [line["train/loss"] for line in read(tmp_path) if "train/loss" in line]
  single_losses = [line["train/loss"] for line in read(tmp_path / "single") if "train/loss" in line]
  assert len(losses) == 8
  np.testing.assert_allclose(losses, single_losses, rtol=1e-4)
  assert final["eval/top1"] == single_final["eval/top1"]
  np.testing.assert_allclose(final["eval/loss"], single_final["eval/loss"], rtol=1e-4)
  # A longer run in the same workdir resumes from step 8 on the mesh and continues.
  longer = mesh_config(12)
  trainer.train_and_evaluate(longer, tmp_path)
  steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert max(steps) == 12 and steps.count(8) == 2  # step 8: one train line and one eval line



def test_segmentation_confusion_is_summed_over_devices_and_batch_of_one_is_replicated():
  """mIoU's confusion matrix from a batch split over 8 devices equals the one-device matrix, and a batch of one
  image (ADE20K evaluation) is evaluated replicated on the mesh."""
  from configs.seg_quickstart import get_config as seg_config
  config = seg_config()
  config.model.update(dim=32, depth=2, num_heads=2, mlp_dim=64, image_size=36)
  config.data.update(canvas_size=36, digit_size=12, crop_size=36, num_eval_canvases=8)
  config.mesh.update(data=2, expert=4)
  mesh = trainer.build_mesh(config)
  task, model, _ = trainer.build(config, mesh)
  batch = next(iter(task.build_data(config, "test", train=False, seed=0, batch_size=8)))
  eval_step = nnx.jit(lambda m, b: task.eval_batch(m, b))
  with jax.set_mesh(mesh):
    sharded = jax.device_get(eval_step(model, trainer._place(batch, mesh)))
    one_image = {key: value[:1] for key, value in batch.items()}
    replicated = jax.device_get(eval_step(model, trainer._place(one_image, mesh)))
  single_model = nnx.merge(*nnx.split(jax.device_get(model)))
  single = jax.device_get(eval_step(single_model, batch))
  single_one = jax.device_get(eval_step(single_model, one_image))
  np.testing.assert_array_equal(sharded["confusion"], single["confusion"])
  assert sharded["confusion"].sum() == np.sum(batch["label"] >= 0)
  np.testing.assert_array_equal(replicated["confusion"], single_one["confusion"])
