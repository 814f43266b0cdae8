"""Collecting a sweep: its point workdirs read back into a table (results.csv, results.md) and a figure.

    python scripts/sweep.py --collect ROOT

A sweep's points (vimoe/train/sweep.py runs them) each train in ROOT/<point name>/, which holds config.json and
metrics.jsonl. `collect` reads them back, one row per point: the config keys whose values differ between the
points (the swept keys), the task's final metric (FINAL_METRICS) at the last evaluation, and the model's sizes;
`group_over_seeds` averages the finished points over seeds; `write_results` writes the table and the ViMoE
figure 2 (`plot_placement`). The models are built by the caller (`build_model`), so reading a sweep needs
nothing from the trainer.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib

import numpy as np

from vimoe.models.params import flatten_dict

# The headline evaluation metric of each task: the value a sweep is judged by.
FINAL_METRICS = {"classification": "eval/top1", "segmentation": "eval/miou", "language_model": "eval/ppl"}

# Short names for the keys sweeps usually vary; any other key is named by its last component (or in full when two
# keys of a sweep would get the same short name).
SHORT_NAMES = {"model.moe.layers": "layers", "model.moe.num_shared_experts": "shared",
               "model.moe.num_experts": "experts", "model.moe.k": "k"}
LAYERS_KEY = "model.moe.layers"
SEED_KEY = "seed"


def short_names(keys) -> dict[str, str]:
  """{dotted key: short name}: SHORT_NAMES, else the last component, else (on a clash) the full key."""
  keys = list(keys)
  short = {key: SHORT_NAMES.get(key, key.rsplit(".", 1)[-1]) for key in keys}
  clashes = {name for name in short.values() if list(short.values()).count(name) > 1}
  return {key: key if name in clashes else name for key, name in short.items()}


def format_value(value) -> str:
  """A value as it appears in a point name: strings as they are, sequences joined by '+', None as 'none'."""
  if value is None:
    return "none"
  if isinstance(value, (list, tuple)):
    return "+".join(format_value(item) for item in value)
  return str(value)


def read_metrics(workdir) -> list[dict]:
  """The lines of workdir/metrics.jsonl ([] if there is none yet); a torn last line (a killed run) is skipped."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def final_metric_key(task: str) -> str:
  if task not in FINAL_METRICS:
    raise ValueError(f"config.task={task!r} has no final metric; known: {FINAL_METRICS}")
  return FINAL_METRICS[task]


def flatten(tree: dict) -> dict:
  """Nested dicts -> {dotted key: value}; lists become tuples so values can be compared and grouped."""
  return {key: tuple(value) if isinstance(value, list) else value for key, value in flatten_dict(tree).items()}


def model_sizes(model) -> dict:
  """Total and activated parameters, MoE blocks, routing degree of a model whose `backbone` is a ViT (a
  segmentation model adds its head); an abstract model (nnx.eval_shape) will do."""
  from vimoe.analysis.routing import routing_degree  # pylint: disable=import-outside-toplevel
  from vimoe.models import activated_params, count_params, moe_blocks  # pylint: disable=import-outside-toplevel
  vit = model.backbone
  if not hasattr(vit, "blocks") or not hasattr(vit, "config"):
    raise ValueError(f"parameter counts need a ViT model (or a model with a ViT .backbone); got "
                     f"{type(model).__name__}")
  total = count_params(model)
  blocks = moe_blocks(vit)
  moe = vit.config.moe
  return {"total_params": total, "activated_params": total - count_params(vit) + activated_params(vit),
          "moe_blocks": list(blocks), "num_moe_layers": len(blocks), "num_experts": moe.num_experts, "k": moe.k,
          "routing_degree": routing_degree(moe.num_experts, moe.k, len(blocks))}


def final_value(records: list[dict], key: str, total_steps: int):
  """(value, step) of the last evaluation line carrying `key`, and whether it is the final step's."""
  evals = [record for record in records if key in record]
  if not evals:
    return None, None, False
  last = max(evals, key=lambda record: record["step"])
  return float(last[key]), int(last["step"]), int(last["step"]) == int(total_steps)


def collect(root, build_model) -> tuple[list[dict], list[str]]:
  """One row per point workdir under ROOT (each directory holding a config.json), and the swept keys.

  The swept keys are the config keys whose values differ between the points, so the table needs no record of how
  the sweep was launched (workdirs copied back from a cluster work too). Each row holds the swept keys, the final
  metric and its step (`finished`: the final step was evaluated) and the `model_sizes` of
  `build_model(config.json's dict)` (vimoe.train.sweep.abstract_model builds it without memory or compile).
  """
  root = pathlib.Path(root)
  workdirs = sorted(path.parent for path in root.glob("*/config.json"))
  if not workdirs:
    raise FileNotFoundError(f"no point workdirs (subdirectories with a config.json) under {root}")
  configs = {workdir: json.loads((workdir / "config.json").read_text()) for workdir in workdirs}
  flat = {workdir: flatten(config) for workdir, config in configs.items()}
  all_keys = sorted(set().union(*flat.values()))
  swept = [key for key in all_keys if len({repr(values.get(key)) for values in flat.values()}) > 1]
  sizes_cache = {}
  rows = []
  for workdir in workdirs:
    config = configs[workdir]
    metric = final_metric_key(config["task"])
    value, step, finished = final_value(read_metrics(workdir), metric, config["total_steps"])
    # Points that differ only in the seed have the same sizes: build each architecture once.
    architecture = json.dumps({**config, "seed": None}, sort_keys=True)
    if architecture not in sizes_cache:
      sizes_cache[architecture] = model_sizes(build_model(config))
    row = {"point": workdir.name, **{key: flat[workdir].get(key) for key in swept},
           "metric": metric, "value": value, "step": step, "finished": finished}
    row.update(sizes_cache[architecture])
    rows.append(row)
  return rows, swept


def _mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
  return float(values.mean()), std


def group_over_seeds(rows: list[dict], swept: list[str]) -> list[dict]:
  """Finished rows grouped by every swept key but the seed: mean and sample std (ddof=1) of the final metric."""
  keys = [key for key in swept if key != SEED_KEY]
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    if row["finished"]:
      groups.setdefault(tuple(repr(row[key]) for key in keys), []).append(row)
  out = []
  for members in groups.values():
    mean, std = _mean_std([row["value"] for row in members])
    first = members[0]
    out.append({**{key: first[key] for key in keys}, "metric": first["metric"], "mean": mean, "std": std,
                "seeds": [row.get(SEED_KEY) for row in members],
                "values": [row["value"] for row in members],
                **{key: first[key] for key in ("num_moe_layers", "num_experts", "k", "routing_degree",
                                               "activated_params", "total_params")}})
  out.sort(key=lambda group: tuple(_sortable(group[key]) for key in keys + ["num_moe_layers"]))
  return out


def _sortable(value):
  return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, repr(value))


def _millions(count: int) -> str:
  return f"{count / 1e6:.3f}M"


def markdown_table(groups: list[dict], swept: list[str]) -> str:
  """The seed-averaged table: swept keys (but the seed), L, D, seeds, mean +- std, activated / total params."""
  keys = [key for key in swept if key != SEED_KEY]
  names = short_names(keys)
  metric = groups[0]["metric"] if groups else "metric"
  header = [names[key] for key in keys] + ["L", "D = C(N,k)^L", "seeds", f"{metric} mean ± std", "per seed",
                                           "activated params", "total params"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for group in groups:
    std = "" if math.isnan(group["std"]) else f" ± {group['std']:.4f}"
    degree = f"{math.comb(group['num_experts'], group['k'])}^{group['num_moe_layers']} = {group['routing_degree']}"
    cells = [format_value(group[key]) for key in keys] + [
        str(group["num_moe_layers"]), degree, str(len(group["values"])), f"{group['mean']:.4f}{std}",
        ", ".join(f"{value:.4f}" for value in group["values"]),
        _millions(group["activated_params"]), _millions(group["total_params"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_placement(groups: list[dict], swept: list[str], path) -> pathlib.Path:
  """The ViMoE paper's figure 2: final metric vs the number of MoE blocks L, one line per setting of the other
  swept keys (shared expert on/off, number of experts, ...), mean over seeds with +- std bars."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  series_keys = [key for key in swept if key not in (SEED_KEY, LAYERS_KEY)]
  names = short_names(series_keys)
  series: dict[str, list[dict]] = {}
  for group in groups:
    label = ", ".join(f"{names[key]}={format_value(group[key])}" for key in series_keys) or "all"
    series.setdefault(label, []).append(group)
  figure = Figure(figsize=(6, 4), layout="constrained")
  axis = figure.subplots()
  for position, (label, members) in enumerate(sorted(series.items())):
    members = sorted(members, key=lambda group: group["num_moe_layers"])
    shift = 0.06 * (position - (len(series) - 1) / 2)  # side by side, so the error bars do not hide each other
    x = [group["num_moe_layers"] + shift for group in members]
    y = [group["mean"] for group in members]
    error = [0.0 if math.isnan(group["std"]) else group["std"] for group in members]
    axis.errorbar(x, y, yerr=error, marker="o", capsize=3, label=label)
  metric = groups[0]["metric"] if groups else "metric"
  axis.set_xlabel("L (number of MoE blocks, counted from the last)")
  axis.set_ylabel(f"{metric} (mean ± std over seeds)")
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  path = pathlib.Path(path)
  figure.savefig(path, dpi=120)
  return path


CSV_COLUMNS = ("point", "metric", "value", "step", "finished", "num_moe_layers", "num_experts", "k",
               "routing_degree", "activated_params", "total_params")


def write_results(root, build_model) -> dict:
  """ROOT/results.csv (one row per point), ROOT/results.md (mean +- std over seeds) and ROOT/placement.png
  (`collect` with `build_model`). Returns {"rows", "groups", "swept", "paths"}."""
  root = pathlib.Path(root)
  rows, swept = collect(root, build_model)
  groups = group_over_seeds(rows, swept)
  columns = ["point"] + swept + [column for column in CSV_COLUMNS if column != "point"]
  csv_path = root / "results.csv"
  with csv_path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({key: format_value(row[key]) if isinstance(row[key], (tuple, list)) else row[key]
                       for key in columns})
  unfinished = [row["point"] for row in rows if not row["finished"]]
  md_path = root / "results.md"
  text = markdown_table(groups, swept)
  if unfinished:
    text += f"\nNot finished (left out of the means): {', '.join(unfinished)}\n"
  md_path.write_text(text)
  paths = {"csv": csv_path, "markdown": md_path}
  if groups:
    paths["plot"] = plot_placement(groups, swept, root / "placement.png")
  return {"rows": rows, "groups": groups, "swept": swept, "paths": paths}
