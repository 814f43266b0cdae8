"""Config sweeps: run or print the points of a sweep defined next to its config (big_vision style).

A config module may define, next to `get_config(arg=None)`,

    def get_sweep(arg=None) -> list[dict]:
      return [{"model.moe.layers": f"last:{L}", "model.moe.num_shared_experts": shared, "seed": seed}
              for L in range(1, 7) for shared in (0, 1) for seed in (0, 1)]

Each dict maps dotted config keys to values; a point's config is `get_config(arg)`, then the command line's
`--config.KEY=VALUE` overrides, then the point's own. Every point gets a readable, stable name built from its
overrides in the order the dict gives them, with short key names (`point_name`):

    {"model.moe.layers": "last:3", "model.moe.num_shared_experts": 0, "seed": 1} -> "layers=last_3,shared=0,seed=1"

The name is also the point's directory under the sweep root, so it keeps only letters, digits and `._=,+-`
(anything else becomes `_`; a name over 200 characters is cut and ends in a hash). scripts/sweep.py runs the
points one after another (`run_sweep`) or prints one scripts/train.py command per point for a cluster scheduler
(`train_commands`); vimoe/analysis/sweep_report.py reads the finished workdirs back into a table and a figure
(`write_results` here builds their models for it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import re
import shlex
import sys
import time
import traceback

from vimoe.analysis import sweep_report
from vimoe.analysis.sweep_report import final_metric_key, format_value, read_metrics, short_names

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
MAX_NAME = 200


# Loading a config module and its sweep

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


# Point names and overrides

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


# Running

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


# Collecting (vimoe/analysis/sweep_report.py), with the models built by their tasks

def abstract_model(config):
  """The model of a config (a dict, e.g. a workdir's config.json, or a ConfigDict) as its task builds it,
  abstractly (nnx.eval_shape: no memory, no compile)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from vimoe.train.tasks import get_task  # pylint: disable=import-outside-toplevel
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  task = get_task(config.task)
  return nnx.eval_shape(lambda: task.build_model(config, nnx.Rngs(0)))


def write_results(root) -> dict:
  """sweep_report.write_results: ROOT/results.csv, results.md and placement.png of a finished sweep."""
  return sweep_report.write_results(root, abstract_model)
