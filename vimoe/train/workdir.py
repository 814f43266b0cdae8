"""Reading a training workdir (docs/workdirs.md) back: its model as a parameter checkpoint, its routing analysis.

    export_workdir(WORKDIR, DIR)       the checkpoint's model as a parameter checkpoint that init.checkpoint loads
    analyze_workdir(WORKDIR)           vimoe.analysis.routing on the evaluation split, written into the workdir

The model is rebuilt and restored by `trainer.load_for_evaluation`; the statistics are vimoe.analysis functions of
the model and its data, which never read a workdir themselves.
"""

from __future__ import annotations

import json
import os
import pathlib

from vimoe.analysis import routing
from vimoe.train.trainer import checkpoint_steps, load_for_evaluation


def export_workdir(workdir: str, directory: str, step: int | None = None) -> dict:
  """Writes the model of a training workdir's checkpoint (the latest, or `step`) as a parameter checkpoint
  (`vimoe.checkpoints.save_params`: DIRECTORY/params and model_config.json = the run's config.model) that
  `init.checkpoint` loads, plus DIRECTORY/export_info.json {"workdir", "step"}. This is how a dense vimoe run
  becomes the pretrained backbone of a ViMoE (upcycled) or dense fine-tune. Returns the export info."""
  from vimoe.checkpoints import save_params  # pylint: disable=import-outside-toplevel
  from vimoe.models.vit import flat_params  # pylint: disable=import-outside-toplevel
  config, _, model, step = load_for_evaluation(workdir, step)
  save_params(directory, flat_params(model), config.model.to_dict())
  info = {"workdir": os.path.abspath(workdir), "step": int(step)}
  with open(os.path.join(directory, "export_info.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info


def analyze_workdir(workdir, step: int | None = None, max_batches: int | None = None, *, output_dir=None,
                    min_score: float = 0.1, relative: float = 0.5, save: bool = True, reuse: bool = False) -> dict:
  """Restores a workdir's checkpoint (the latest, or `step`), routes its evaluation split (at most `max_batches`)
  and analyses the first-choice experts (vimoe.analysis.routing.routing_log and analyze); with `save`, writes
  routing_analysis.json, routing_log.npz and the figures into `output_dir` (default: the workdir). With `reuse`, a
  routing_analysis.json already there for the same workdir and its latest checkpoint is returned as it is. Returns
  the analysis (plus "workdir", "step", "task", "moe_layers", "num_shared_experts")."""
  absolute = str(pathlib.Path(workdir).absolute())
  cached = pathlib.Path(output_dir or workdir) / "routing_analysis.json"
  if reuse and step is None and cached.exists() and checkpoint_steps(workdir):
    previous = json.loads(cached.read_text())
    if previous.get("step") == checkpoint_steps(workdir)[-1] and previous.get("workdir") == absolute:
      return previous
  config, task, model, step = load_for_evaluation(workdir, step)
  if config.task not in ("classification", "segmentation"):
    raise ValueError(f"config.task={config.task!r}: routing analysis supports 'classification' and "
                     f"'segmentation'")
  data = task.build_data(config, config.data.eval_split, train=False, seed=config.seed,
                         batch_size=config.get("eval_batch_size", config.batch_size))
  log = routing.routing_log(model, data, segmentation=config.task == "segmentation",
                            num_classes=int(config.model.num_classes), crop=int(config.data.get("crop_size") or 0),
                            max_batches=max_batches)
  analysis = {"workdir": absolute, "step": int(step), "task": config.task, "moe_layers": config.model.moe.get("layers"),
              "num_shared_experts": int(config.model.moe.get("num_shared_experts", 0) or 0),
              **routing.analyze(log, min_score=min_score, relative=relative)}
  if save:
    routing.save_analysis(analysis, log, output_dir or workdir)
  return analysis
