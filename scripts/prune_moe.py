"""From routing analysis to a smaller ViMoE: merge the MoE blocks whose routing does not specialise back into dense
MLPs, drop rarely used experts in the others, measure, fine-tune briefly. Reads WORKDIR only; writes into --out.

    python scripts/prune_moe.py --workdir W --out W2 [--step N] [--min_traffic 0.01] [--keep 2,3,4,5]
        [--finetune_steps 100] [--stats_batches 20] [--measure_concat]

1. Restores W's checkpoint and routes --stats_batches batches of its TRAINING split (shuffled with a seed of its
   own, augmented as in training; the held-out split is never used to choose): the routing analysis of
   vimoe/analysis/routing.py (specialisation per MoE block and its advice, the blocks to keep) and each expert's
   traffic share, mean gate and gate mass (vimoe/analysis/prune.py). --keep overrides the advice ('none': all dense).
2. Merges every other MoE block into one dense MLP of width model.mlp_dim (the formula: docs/design.md, 'Pruning:
   from routing analysis to dense blocks'); keeps in the kept blocks the experts with traffic >= --min_traffic (the
   same count in every block: the most any block keeps), router columns included.
3. Writes W2/params_export (a parameter checkpoint for --config.init.checkpoint, with model_config.json),
   W2/finetune_config.json (W's config with the new model.moe.layers / num_experts and the fine-tune settings) and
   W2/prune_report.json; prints the table: parameters, activated parameters, train-step time (forward + backward
   + update of the same batch, before and after timed alternately in this process: their ratio), held-out top-1
   of the full model, the pruned one (no fine-tune) and both after --finetune_steps more steps of W's recipe
   (the full model fine-tuned from its own checkpoint too, so the extra steps do not favour the pruned one).
   --measure_concat also evaluates the wider merge (hidden width (S + 1) x mlp_dim, in memory only).

The fine-tunes run the trainer in W2/finetune_full and W2/finetune_pruned (rerunning resumes or reuses them).

    python scripts/prune_moe.py --summarize DIR     # markdown tables of DIR/*/prune_report.json, per model and
                                                    # per arm (directory names 'shared=0' / 'shared=1') over seeds
"""

import copy
import itertools
import json
import os
import pathlib
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

_WORKDIR = flags.DEFINE_string("workdir", None, "A ViMoE classification workdir written by scripts/train.py.")
_OUT = flags.DEFINE_string("out", None, "Output directory (export, fine-tune workdirs, prune_report.json).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
_MIN_TRAFFIC = flags.DEFINE_float("min_traffic", 0.01, "Drop experts with a smaller traffic share (kept blocks).")
_KEEP = flags.DEFINE_string("keep", None, "MoE blocks to keep, e.g. '2,3,4,5' or 'none' (default: the advice).")
_STATS_BATCHES = flags.DEFINE_integer("stats_batches", 20, "Training batches (of eval_batch_size) to route.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 100, "Fine-tune steps for both models (0: none).")
_TIMING_ROUNDS = flags.DEFINE_integer("timing_rounds", 6, "Alternating timing rounds (before, after).")
_TIMING_STEPS = flags.DEFINE_integer("timing_steps", 10, "Train steps per model per round.")
_MEASURE_CONCAT = flags.DEFINE_bool("measure_concat", False, "Also evaluate the (S + 1) x mlp_dim merge.")
_SUMMARIZE = flags.DEFINE_string("summarize", None, "Instead: print the tables of every DIR/*/prune_report.json.")

STATS_SEED_OFFSET = 7919  # the statistics' shuffle seed is config.seed + this: not the training run's data order


def parse_keep(text, depth):
  if text is None:
    return None
  from vimoe.models.config_utils import parse_moe_layers  # pylint: disable=import-outside-toplevel
  return list(parse_moe_layers(text, depth, key="--keep"))


def finetune_config(config, checkpoint: str, steps: int):
  """W's config for `steps` more steps from `checkpoint`: the same recipe (lr, warmup fraction, schedule shape,
  batch, seed) scaled to the new length, one evaluation at the end."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = copy.deepcopy(config)
  config.total_steps = steps
  config.optim.total_steps = steps
  config.optim.warmup_steps = max(1, steps // 10)
  config.log_every = max(1, min(100, steps // 3))
  config.eval_every = config.checkpoint_every = steps
  config.keep_checkpoints = 1
  if "init" not in config:
    config.init = ml_collections.ConfigDict(dict(checkpoint="", noise_std=0.0))
  config.init.checkpoint = os.path.abspath(checkpoint)
  return config


def time_train_steps(configs_models, batch, rounds: int, steps: int) -> list[list[float]]:
  """Seconds per train step of each (config, task, model) in `configs_models`, timed in alternating rounds (the
  order flips every round) after one compiling step each. Returns per model the per-round mean step times."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from vimoe.train import trainer  # pylint: disable=import-outside-toplevel
  runners = []
  for config, task, model in configs_models:
    _, fresh, optimizer = trainer.build(config)
    nnx.update(fresh, nnx.state(model, nnx.Param))
    graphdef, state = nnx.split((fresh, optimizer))
    step = trainer.make_train_step(task, config, graphdef)
    guard = {"step": jnp.asarray(0, jnp.int32), "first_bad": jnp.asarray(0, jnp.int32),
             "bad_loss": jnp.asarray(0.0, jnp.float32)}
    holder = {"state": state, "guard": guard}
    def run(n, step=step, holder=holder):
      for _ in range(n):
        holder["state"], holder["guard"], metrics = step(holder["state"], holder["guard"], batch)
      jax.block_until_ready((holder["state"], metrics))
    run(2)  # compiles twice: the state the first step returns differs from nnx.split's (weak types)
    runners.append(run)
  times = [[] for _ in runners]
  for r in range(rounds):
    order = range(len(runners)) if r % 2 == 0 else reversed(range(len(runners)))
    for i in order:
      start = time.perf_counter()
      runners[i](steps)
      times[i].append((time.perf_counter() - start) / steps)
  return times


def evaluate_top1(task, model, config) -> float:
  from vimoe.train import evaluate  # pylint: disable=import-outside-toplevel
  return float(evaluate(task, model, config)["eval/top1"])


def concat_model(full_model, pruned_model, config, dense_blocks, mass_by_block):
  """A copy of the pruned model with the (S + 1) x mlp_dim merge of the full model's blocks `dense_blocks` (in
  memory only: the config has one mlp_dim, so this model has no config of its own)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from vimoe.analysis import prune  # pylint: disable=import-outside-toplevel
  from vimoe.models import vit as vit_lib  # pylint: disable=import-outside-toplevel
  flat = vit_lib.flat_params(full_model)
  vit = copy.deepcopy(pruned_model)
  for name in dense_blocks:
    index = int(name[5:])
    params = prune.merge_to_dense(prune.block_params(flat, index), mass_by_block[name], mode="concat")
    width = params["fc1.kernel"].shape[1]
    mlp = vit_lib.Mlp(config.model.dim, width, config.model.mlp_activation, dtype=vit.dtype, rngs=nnx.Rngs(0))
    vit_lib.assign_params(mlp, params)
    vit.blocks[index].mlp = mlp
    vit.blocks[index].is_moe = False
  return vit


def summary_tables(root) -> str:
  """Markdown tables of root/*/prune_report.json: one row per model, then mean ± std per arm (the directories
  whose name holds the same 'shared=S'), with the paired difference of the two fine-tuned models."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rows, arms = [], {}
  for path in sorted(pathlib.Path(root).glob("*/prune_report.json")):
    report = json.loads(path.read_text())
    top1, tuned, sizes = report["top1"], report["top1_finetuned"], report["sizes"]
    row = dict(name=path.parent.name, kept=",".join(b[5:] for b in report["kept_blocks"]) or "none",
               experts=report["num_experts_after"], ratio=report["step_time_ratio"]["median"],
               sizes=sizes, full=100 * top1["full"], pruned=100 * top1["pruned"],
               concat=100 * top1.get("pruned_concat", float("nan")), full_ft=100 * tuned.get("full", float("nan")),
               pruned_ft=100 * tuned.get("pruned", float("nan")))
    rows.append(row)
    arm = next((part for part in row["name"].split(",") if part.startswith("shared=")), "all")
    arms.setdefault(arm, []).append(row)
  lines = ["| model | MoE blocks kept | experts | params full -> pruned | activated full -> pruned | step time "
           "pruned/full | top-1 full | pruned | pruned (concat merge) | full + ft | pruned + ft |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    full, pruned = r["sizes"]["full"], r["sizes"]["pruned"]
    lines.append(f"| {r['name']} | {r['kept']} | {r['experts']} | {full['params']:,} -> {pruned['params']:,} | "
                 f"{full['activated']:,} -> {pruned['activated']:,} | {r['ratio']:.3f} | {r['full']:.2f} | "
                 f"{r['pruned']:.2f} | {r['concat']:.2f} | {r['full_ft']:.2f} | {r['pruned_ft']:.2f} |")
  spread = lambda v: f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
  lines += ["", "| arm | seeds | step time pruned/full | top-1 full | pruned | pruned (concat) | full + ft | "
            "pruned + ft | pruned+ft minus full+ft (paired) |", "|---|---|---|---|---|---|---|---|---|"]
  for arm, group in sorted(arms.items()):
    values = lambda key: [r[key] for r in group]
    ratio = values("ratio")
    ratio_text = f"{np.mean(ratio):.3f} ± {np.std(ratio, ddof=1):.3f}" if len(ratio) > 1 else f"{ratio[0]:.3f}"
    lines.append(f"| {arm} | {len(group)} | {ratio_text} | {spread(values('full'))} | {spread(values('pruned'))} | "
                 f"{spread(values('concat'))} | {spread(values('full_ft'))} | {spread(values('pruned_ft'))} | "
                 f"{spread([r['pruned_ft'] - r['full_ft'] for r in group])} |")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _SUMMARIZE.value:
    print(summary_tables(_SUMMARIZE.value))
    return
  if not (_WORKDIR.value and _OUT.value):
    sys.exit("prune_moe.py: --workdir and --out are required (or --summarize DIR)")
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vimoe.analysis import prune, routing  # pylint: disable=import-outside-toplevel
  from vimoe.checkpoints import save_params  # pylint: disable=import-outside-toplevel
  from vimoe.models import vit as vit_lib  # pylint: disable=import-outside-toplevel
  from vimoe.train import load_for_evaluation, train_and_evaluate, trainer  # pylint: disable=import-outside-toplevel
  from vimoe.train.workdir import export_workdir  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(_OUT.value).absolute()
  out.mkdir(parents=True, exist_ok=True)
  config, task, model, step = load_for_evaluation(_WORKDIR.value, _STEP.value)
  if config.task != "classification":
    sys.exit(f"prune_moe.py: config.task={config.task!r}; only 'classification' ViMoE workdirs are supported")
  vit = model.backbone
  depth = len(vit.blocks)
  moe_names = [f"block{i}" for i in vit_lib.moe_blocks(vit)]
  if not moe_names:
    sys.exit(f"prune_moe.py: {_WORKDIR.value} has no MoE block (model.moe.layers={config.model.moe.layers!r})")

  # 1. Routing on the training split.
  data = task.build_data(config, config.data.train_split, train=True, seed=config.seed + STATS_SEED_OFFSET,
                         batch_size=config.get("eval_batch_size", config.batch_size))
  batches = list(itertools.islice(iter(data), _STATS_BATCHES.value))
  log = routing.routing_log(model, batches, segmentation=False, num_classes=int(config.model.num_classes))
  analysis = routing.analyze(log)
  stats = prune.routing_statistics(model, batches)
  keep_override = parse_keep(_KEEP.value, depth)
  if keep_override is not None:
    unknown = [i for i in keep_override if f"block{i}" not in moe_names]
    if unknown:
      sys.exit(f"prune_moe.py: --keep={_KEEP.value!r} names blocks {unknown} that are not MoE blocks; MoE blocks: "
               f"{moe_names}")
    keep_names = [f"block{i}" for i in keep_override]
  else:
    keep_names = analysis["recommendation"]["keep"]
  dense_names = [name for name in moe_names if name not in keep_names]

  # 2. The pruned parameters and config.
  count, keep_experts = prune.experts_to_keep(stats, keep_names, _MIN_TRAFFIC.value)
  flat = vit_lib.flat_params(model)
  pruned_flat = prune.prune_params(flat, stats, dense={name: None for name in dense_names}, keep_experts=keep_experts)
  pruned_config = copy.deepcopy(config)
  pruned_config.model.moe.layers = routing.layers_spec([int(n[5:]) for n in keep_names], depth)
  if keep_names:
    pruned_config.model.moe.num_experts = count
  _, pruned_model, _ = trainer.build(pruned_config)
  vit_lib.assign_params(pruned_model, pruned_flat)
  export = out / "params_export"
  save_params(str(export), pruned_flat, pruned_config.model.to_dict())
  (export / "export_info.json").write_text(json.dumps(
      {"workdir": os.path.abspath(_WORKDIR.value), "step": int(step), "pruned_by": "scripts/prune_moe.py"}, indent=2))
  overrides = {"model.moe.layers": pruned_config.model.moe.layers,
               "model.moe.num_experts": int(pruned_config.model.moe.num_experts),
               "init.checkpoint": str(export)}

  # 3. Measurements.
  top1 = {"full": evaluate_top1(task, model, config), "pruned": evaluate_top1(task, pruned_model, pruned_config)}
  if _MEASURE_CONCAT.value and dense_names:
    wide = concat_model(model, pruned_model, config, dense_names, {n: stats[n]["mass"] for n in dense_names})
    top1["pruned_concat"] = evaluate_top1(task, wide, pruned_config)
  train_batch = next(iter(task.build_data(config, config.data.train_split, train=True, seed=config.seed,
                                          batch_size=config.batch_size)))
  times = time_train_steps([(config, task, model), (pruned_config, task, pruned_model)], train_batch,
                           _TIMING_ROUNDS.value, _TIMING_STEPS.value)
  ratios = [after / before for before, after in zip(*times)]
  sizes = {"full": {"params": vit_lib.count_params(model), "activated": vit_lib.activated_params(model)},
           "pruned": {"params": vit_lib.count_params(pruned_model),
                      "activated": vit_lib.activated_params(pruned_model)}}

  finetune = {}
  if _FINETUNE_STEPS.value:
    steps = _FINETUNE_STEPS.value
    full_export = out / "full_export"
    if not (full_export / "model_config.json").exists():
      full_export.mkdir(parents=True, exist_ok=True)
      export_workdir(_WORKDIR.value, str(full_export), step)
    pruned_ft = finetune_config(pruned_config, str(export), steps)
    (out / "finetune_config.json").write_text(pruned_ft.to_json_best_effort(indent=2) + "\n")
    for name, ft_config in (("full", finetune_config(config, str(full_export), steps)), ("pruned", pruned_ft)):
      metrics = train_and_evaluate(ft_config, out / f"finetune_{name}")
      finetune[name] = float(metrics["eval/top1"])
    overrides.update({"total_steps": steps, "optim.total_steps": steps, "optim.warmup_steps": max(1, steps // 10)})

  report = {
      "workdir": os.path.abspath(_WORKDIR.value), "step": int(step), "out": str(out),
      "stats_split": f"{config.data.train_split} (train=True pipeline, seed {config.seed + STATS_SEED_OFFSET})",
      "stats_units": int(log.labels.size), "min_traffic": _MIN_TRAFFIC.value, "keep_override": _KEEP.value,
      "specialization": {name: layer["specialization"] for name, layer in analysis["layers"].items()},
      "advice": analysis["recommendation"]["text"], "kept_blocks": keep_names, "dense_blocks": dense_names,
      "experts_kept": {name: keep_experts.get(name) for name in keep_names}, "num_experts_after": count,
      "experts_below_min_traffic": {name: [e for e, t in enumerate(stats[name]["traffic"]) if t < _MIN_TRAFFIC.value]
                                    for name in moe_names},
      "routing": stats, "sizes": sizes,
      "step_time_s": {"full": times[0], "pruned": times[1]},
      "step_time_ratio": {"per_round": ratios, "median": float(np.median(ratios))},
      "top1": top1, "top1_finetuned": finetune, "finetune_steps": _FINETUNE_STEPS.value,
      "config_overrides": overrides}
  (out / "prune_report.json").write_text(json.dumps(report, indent=1) + "\n")

  print(f"{_WORKDIR.value} step {step}: routing of {log.labels.size} training {log.units}s")
  print("S per block: " + ", ".join(f"{n}={s:.3f}" for n, s in report["specialization"].items()))
  print(f"keep MoE in {keep_names or 'none'} (model.moe.layers={pruned_config.model.moe.layers!r}, "
        f"{count} experts); dense: {dense_names or 'none'}")
  median = lambda values: float(np.median(values))
  print(f"{'':10} {'params':>9} {'activated':>9} {'step ms':>8} {'top1':>7} {'+ft top1':>8}")
  for name in ("full", "pruned"):
    print(f"{name:10} {sizes[name]['params']:9d} {sizes[name]['activated']:9d} "
          f"{1e3 * median(times[0 if name == 'full' else 1]):8.2f} {top1[name]:7.4f} "
          f"{finetune.get(name, float('nan')):8.4f}")
  if "pruned_concat" in top1:
    print(f"pruned with the (S + 1) x mlp_dim merge (no fine-tune): top1 {top1['pruned_concat']:.4f}")
  print(f"step time ratio pruned / full: median {report['step_time_ratio']['median']:.3f} over "
        f"{len(ratios)} rounds ({', '.join(f'{r:.3f}' for r in ratios)})")
  print(f"fine-tune the pruned model: W's config with " + " ".join(f"--config.{k}={v}" for k, v in overrides.items()))
  print(f"wrote {out / 'prune_report.json'}")


if __name__ == "__main__":
  app.run(main)
