"""Config sweeps: run, print or collect the points of a sweep defined next to its config (big_vision style).

A config module may define, next to `get_config(arg=None)`,

    def get_sweep(arg=None) -> list[dict]:
      return [{"model.moe.layers": f"last:{L}", "model.moe.num_shared_experts": shared, "seed": seed}
              for L in range(1, 7) for shared in (0, 1) for seed in (0, 1)]

Each dict maps dotted config keys to values; a point's config is `get_config(arg)`, then the command line's
`--config.KEY=VALUE` overrides, then the point's own. Every point gets a readable, stable name built from its
overrides in the order the dict gives them, with short key names (`point_name`):

    {"model.moe.layers": "last:3", "model.moe.num_shared_experts": 0, "seed": 1} -> "layers=last_3,shared=0,seed=1"

The name is also the point's directory under the sweep root, so it keeps only letters, digits and `._=,+-`
(anything else becomes `_`; a name over 200 characters is cut and ends in a hash). scripts/sweep.py runs the points one after another (`run_sweep`), prints one
scripts/train.py command per point for a cluster scheduler (`train_commands`), or reads the finished workdirs back
into a table and a figure (`collect`, `write_results`).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import shlex
import sys
import time
import traceback

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# The headline evaluation metric of each task: the value a sweep is judged by.
FINAL_METRICS = {"classification": "eval/top1", "segmentation": "eval/miou", "language_model": "eval/ppl"}

# Short names for the keys sweeps usually vary; any other key is named by its last component (or in full when two
# keys of a sweep would get the same short name).
SHORT_NAMES = {"model.moe.layers": "layers", "model.moe.num_shared_experts": "shared",
               "model.moe.num_experts": "experts", "model.moe.k": "k"}
LAYERS_KEY = "model.moe.layers"
SEED_KEY = "seed"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
MAX_NAME = 200


# ---------------------------------------------------------------------------------------------------------------
# Loading a config module and its sweep
# ---------------------------------------------------------------------------------------------------------------

def split_config_spec(spec: str) -> tuple[str, str | None]:
  """'configs/x.py:ARG' -> ('configs/x.py', 'ARG'); 'configs/x.py' -> ('configs/x.py', None). Splits at the first
  ':' as ml_collections' config flags do, so the sweep sees the same argument as scripts/train.py."""
  path, separator, arg = str(spec).partition(":")
  return path, (arg if separator else None)


def load_config_module(path):
  """Imports a configs/*.py file by path. The repo root goes on sys.path first, so configs that import their
  shared recipe (`from configs.imagenet_common import ...`) load from any working directory."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {str(path)!r} does not exist")
  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
  name = "_vimoe_sweep_config_" + re.sub(r"\W", "_", str(path.resolve()))
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def sweep_points(module, arg=None) -> list[dict]:
  """The overrides of every point: `module.get_sweep(arg)`, checked (a non-empty list of dicts whose names are
  unique)."""
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"config {module.__file__} has no get_sweep(arg=None); a sweep config defines it next to "
                     f"get_config and returns a list of {{dotted.key: value}} dicts")
  points = module.get_sweep(arg)
  if not isinstance(points, (list, tuple)) or not points:
    raise ValueError(f"get_sweep({arg!r}) in {module.__file__} returned {type(points).__name__} "
                     f"{points!r:.80}; expected a non-empty list of dicts")
  for index, point in enumerate(points):
    if not isinstance(point, dict) or not all(isinstance(key, str) for key in point):
      raise ValueError(f"get_sweep({arg!r}) point {index} is {point!r}; expected a dict of dotted config keys")
  names = [point_name(point) for point in points]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise ValueError(f"get_sweep({arg!r}) gives several points the same name: {repeated}; every point must "
                     f"differ in its overrides")
  return [dict(point) for point in points]


# ---------------------------------------------------------------------------------------------------------------
# Point names and overrides
# ---------------------------------------------------------------------------------------------------------------

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


def point_name(overrides: dict) -> str:
  """'short=value,...' in the dict's order, made safe for a directory name; 'base' for no overrides. Names longer
  than MAX_NAME characters are cut and end in a hash of the full name (file systems allow 255 bytes)."""
  if not overrides:
    return "base"
  names = short_names(overrides)
  text = _UNSAFE.sub("_", ",".join(f"{names[key]}={format_value(value)}" for key, value in overrides.items()))
  if len(text) > MAX_NAME:
    text = text[:MAX_NAME - 9] + "~" + hashlib.sha1(text.encode()).hexdigest()[:8]
  return text


def apply_overrides(config, overrides: dict):
  """Sets dotted keys of an ml_collections config in place (a FieldReference keeps its followers in step, e.g.
  total_steps and optim.total_steps) and returns it. Unknown keys raise, naming the valid ones."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for depth, parent in enumerate(parents):
      if parent not in node:
        where = ".".join(parents[:depth]) or "the config"
        raise KeyError(f"sweep key {key!r}: {where} has no {parent!r}; valid: {', '.join(sorted(node.keys()))}")
      node = node[parent]
    if leaf not in node:
      where = ".".join(parents) or "the config"
      raise KeyError(f"sweep key {key!r}: {where} has no {leaf!r}; valid: {', '.join(sorted(node.keys()))}")
    try:
      node[leaf] = value
    except TypeError as error:
      raise TypeError(f"sweep key {key!r} cannot take {value!r}: {error}") from error
  return config


def point_config(module, arg, overrides: dict, base_overrides: dict | None = None):
  """get_config(arg), then the command line's overrides, then the point's."""
  config = module.get_config(arg)
  apply_overrides(config, dict(base_overrides or {}))
  return apply_overrides(config, overrides)


def flag_value(value) -> str:
  """The text after `--config.KEY=` that ml_collections' config flags parse back to `value` (strings verbatim,
  booleans lower case, numbers and tuples as Python literals)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    value = tuple(value)
  return repr(value)


def train_command(config_spec: str, workdir, overrides: dict, python: str = "python",
                  script: str = "scripts/train.py") -> str:
  """One shell line that trains a point: every token quoted, so a shell hands train.py exactly these values."""
  words = [python, script, "--config", str(config_spec), "--workdir", str(workdir)]
  words += [f"--config.{key}={flag_value(value)}" for key, value in overrides.items()]
  return " ".join(shlex.quote(word) for word in words)


def check_flag_overridable(config, overrides: dict) -> None:
  """ml_collections' config flags cannot set a key whose value in get_config is a plain None (its type is
  unknown); raise, naming the key, instead of printing a command that train.py would refuse."""
  for key in overrides:
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if node.get_type(leaf) is type(None):
      raise ValueError(f"sweep key {key!r} is None in get_config, and --config.{key}=... cannot set a None-valued "
                       f"key; give it a typed default in the config (e.g. ml_collections.config_dict.placeholder"
                       f"(float)) or run the sweep in-process (without --print-commands)")


def train_commands(config_spec: str, root, points: list[dict], base_overrides: dict | None = None,
                   base_config=None, **kwargs) -> list[str]:
  """`train_command` for every point, in ROOT/<point name>; the command line's overrides come first and a point's
  own value wins where both set a key (each key appears once). With `base_config` (get_config(arg)), keys the
  config flags cannot set are refused (`check_flag_overridable`)."""
  root = pathlib.Path(root)
  commands = []
  for point in points:
    overrides = {**(base_overrides or {}), **point}
    if base_config is not None:
      check_flag_overridable(base_config, overrides)
    commands.append(train_command(config_spec, root / point_name(point), overrides, **kwargs))
  return commands


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

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


def is_finished(workdir, config) -> bool:
  """True when metrics.jsonl holds the evaluation line of the final step (train_and_evaluate writes it last)."""
  key = final_metric_key(config.task)
  return any(record.get("step") == config.total_steps and key in record for record in read_metrics(workdir))


def run_sweep(module, arg, root, points: list[dict], base_overrides: dict | None = None,
              train_fn=None, progress: bool = True, log=None) -> dict:
  """Trains every point in ROOT/<name>/, one after another, in this process.

  A finished point (`is_finished`) is skipped; a half-finished one resumes from its latest checkpoint (the trainer
  does that by itself). An error in one point is printed with its traceback and the sweep goes on. Returns
  {"finished": [names trained now], "skipped": [...], "failed": {name: error text}}. `log` prints a line per
  point (default: tqdm.write, which keeps the progress bar intact).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  if log is None:
    def log(text):
      tqdm.write(text)
      sys.stdout.flush()  # a sweep's log is often a file: show each point as it ends
  if train_fn is None:
    from vimoe.train.trainer import train_and_evaluate as train_fn  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  summary = {"finished": [], "skipped": [], "failed": {}}
  bar = tqdm(points, desc="sweep", unit="point", dynamic_ncols=True,
             disable=not progress or os.environ.get("VIMOE_NO_PROGRESS") == "1")
  for index, point in enumerate(bar):
    name = point_name(point)
    workdir = root / name
    bar.set_postfix_str(name)
    prefix = f"[{index + 1}/{len(points)}] {name}"
    try:
      config = point_config(module, arg, point, base_overrides)
      if is_finished(workdir, config):
        summary["skipped"].append(name)
        log(f"{prefix}: finished before, skipped")
        continue
      started = time.perf_counter()
      final = train_fn(config, workdir)
      key = final_metric_key(config.task)
      summary["finished"].append(name)
      log(f"{prefix}: {key}={final.get(key, float('nan')):.4f} ({time.perf_counter() - started:.0f} s)")
    except Exception as error:  # pylint: disable=broad-except
      summary["failed"][name] = f"{type(error).__name__}: {error}"
      log(f"{prefix}: FAILED\n{traceback.format_exc()}")
    finally:
      jax.clear_caches()  # compiled steps of one point are of no use to the next; keep memory flat
  bar.close()
  return summary


# ---------------------------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------------------------

def flatten(tree: dict, prefix: str = "") -> dict:
  """Nested dicts -> {dotted key: value}; lists become tuples so values can be compared and grouped."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = tuple(value) if isinstance(value, list) else value
  return flat


def model_sizes(config) -> dict:
  """Total and activated parameters, MoE blocks, routing degree: the model is built abstractly (nnx.eval_shape,
  no memory, no compile). A segmentation model counts its backbone's experts as the ViT does, plus its head."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from vimoe.analysis.routing import routing_degree  # pylint: disable=import-outside-toplevel
  from vimoe.models import activated_params, count_params, moe_blocks  # pylint: disable=import-outside-toplevel
  from vimoe.train.tasks import get_task  # pylint: disable=import-outside-toplevel
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  task = get_task(config.task)
  model = nnx.eval_shape(lambda: task.build_model(config, nnx.Rngs(0)))
  vit = getattr(model, "backbone", model)
  if not hasattr(vit, "blocks") or not hasattr(vit, "config"):
    raise ValueError(f"config.task={config.task!r}: parameter counts need a ViT model (or a model with a ViT "
                     f".backbone); got {type(model).__name__}")
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


def collect(root) -> tuple[list[dict], list[str]]:
  """One row per point workdir under ROOT (each directory holding a config.json), and the swept keys.

  The swept keys are the config keys whose values differ between the points, so the table needs no record of how
  the sweep was launched (workdirs copied back from a cluster work too). Each row holds the swept keys, the final
  metric and its step (`finished`: the final step was evaluated) and `model_sizes`.
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
      sizes_cache[architecture] = model_sizes(config)
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


def write_results(root) -> dict:
  """ROOT/results.csv (one row per point), ROOT/results.md (mean +- std over seeds) and ROOT/placement.png.
  Returns {"rows", "groups", "swept", "paths"}."""
  root = pathlib.Path(root)
  rows, swept = collect(root)
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
