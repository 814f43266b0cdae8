"""The ViMoE placement study of issue 12 in one command: stage 1 (pretrain the dense backbone), stage 2 (the
fine-tuning sweep: dense and upcycled ViMoE, L = 1, 2, 3, 6, shared expert off/on, paired seeds), the report.

    .venv/bin/python scripts/run_study.py --workdir workdirs/study                 # 5 seeds x 9 arms, 400 steps each
    .venv/bin/python scripts/run_study.py --workdir workdirs/study --seeds 6       # add a seed later: only it trains
    .venv/bin/python scripts/run_study.py --workdir workdirs/study --report_only   # rewrite the report

Resumable: run the same command again after an interruption. Stage 1 is skipped when finished and resumes when
half-done (the trainer resumes a workdir by itself); its final checkpoint is exported once to
WORKDIR/pretrain/params_export (a parameter checkpoint, vimoe.train.workdir.export_workdir), which every stage-2 point
loads as --config.init.checkpoint. Stage 2 skips finished points and resumes a half-finished one.

WORKDIR holds pretrain/ (stage 1), sweep/<point>/ (stage 2: configs/study_placement.py's get_sweep), study.md and
study.json (the report, vimoe/analysis/study.py), study_accuracy_vs_L.png, routing_shared{0,1}/ (routing heatmaps of
the seed-0 all-MoE points and the layer-keep advice), study_times.json (wall time per stage and per trained
point, over every invocation) and jax_cache/ (compiled steps, unless $JAX_COMPILATION_CACHE_DIR names another). Configs and design: configs/study_pretrain.py, configs/study_placement.py.
`--tiny` runs the whole pipeline at smoke-test size in about a minute (the tests use it; not a result).
"""

import datetime
import functools
import json
import os
import pathlib
import sys
import time

from absl import app, flags, logging

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_WORKDIR = flags.DEFINE_string("workdir", None, "Study root (created if missing).")
_SEEDS = flags.DEFINE_integer("seeds", None, "Paired seeds 0..N-1 of stage 2 (default: the config's, 5).")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps per stage-2 point (default: the config's, 400).")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", None, "Stage-1 steps (default: the config's, 1500).")
_TINY = flags.DEFINE_bool("tiny", False, "Smoke-test sizes (2 blocks of dim 32, a few steps): tests only.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite the report from the finished points.")
_NO_ROUTING = flags.DEFINE_bool("skip_routing", False, "Leave out the routing analysis of the report.")
flags.mark_flags_as_required(["workdir"])

PRETRAIN_CONFIG = REPO / "configs" / "study_pretrain.py"
PLACEMENT_CONFIG = REPO / "configs" / "study_placement.py"
TIMES_FILE = "study_times.json"


def config_arg(**values) -> str | None:
  words = (["tiny"] if values.pop("tiny", False) else []) + [f"{k}={v}" for k, v in values.items() if v is not None]
  return ",".join(words) or None


def load_times(path: pathlib.Path) -> dict:
  if path.exists():
    try:
      return json.loads(path.read_text())
    except json.JSONDecodeError:
      pass
  return {"invocations": [], "points": {}, "total_s": 0.0}


def save_times(path: pathlib.Path, times: dict) -> None:
  times["total_s"] = sum(run.get("total_s", 0.0) for run in times["invocations"])
  temporary = path.with_suffix(".tmp")
  temporary.write_text(json.dumps(times, indent=1) + "\n")
  os.replace(temporary, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  from vimoe.analysis import study  # pylint: disable=import-outside-toplevel
  from vimoe.train import sweep, train_and_evaluate  # pylint: disable=import-outside-toplevel
  from vimoe.train.workdir import analyze_workdir, export_workdir  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(_WORKDIR.value).absolute()
  root.mkdir(parents=True, exist_ok=True)
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # Every seed of an arm compiles the same steps: seeds after the first load them from this cache (about a third
    # of a point's time on 2 CPU cores).
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
  times_path = root / TIMES_FILE
  times = load_times(times_path)
  started = time.perf_counter()
  run = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "argv": sys.argv[1:],
         "stage1_s": 0.0, "stage2_s": 0.0, "report_s": 0.0, "total_s": 0.0}
  times["invocations"].append(run)

  def checkpoint_times():
    run["total_s"] = time.perf_counter() - started
    save_times(times_path, times)

  failed = {}
  module = sweep.load_config_module(PLACEMENT_CONFIG)
  arg = config_arg(tiny=_TINY.value, steps=_STEPS.value, seeds=_SEEDS.value)
  points = sweep.sweep_points(module, arg)
  num_arms = len({json.dumps({k: v for k, v in point.items() if k != "seed"}, sort_keys=True) for point in points})
  if not _REPORT_ONLY.value:
    # Stage 1: the dense backbone.
    stage_start = time.perf_counter()
    pretrain_module = sweep.load_config_module(PRETRAIN_CONFIG)
    pretrain_config = pretrain_module.get_config(config_arg(tiny=_TINY.value, steps=_PRETRAIN_STEPS.value))
    pretrain_dir = root / "pretrain"
    if sweep.is_finished(pretrain_dir, pretrain_config):
      print(f"stage 1: {pretrain_dir} finished before, skipped", flush=True)
    else:
      final = train_and_evaluate(pretrain_config, pretrain_dir)
      print(f"stage 1: eval/top1={final.get('eval/top1', float('nan')):.4f} "
            f"({time.perf_counter() - stage_start:.0f} s)", flush=True)
    export_dir = pretrain_dir / "params_export"
    info_path = export_dir / "export_info.json"
    if not (info_path.exists() and json.loads(info_path.read_text()).get("step") == pretrain_config.total_steps):
      info = export_workdir(str(pretrain_dir), str(export_dir))
      print(f"stage 1: exported step {info['step']} to {export_dir}", flush=True)
    run["stage1_s"] = time.perf_counter() - stage_start
    checkpoint_times()

    # Stage 2: the sweep, every point initialised from the exported backbone.
    stage_start = time.perf_counter()
    run["stage2_arg"] = arg
    run["stage2_points"] = len(points)

    def timed_train(config, workdir):
      point_start = time.perf_counter()
      final = train_and_evaluate(config, workdir)
      times["points"][pathlib.Path(workdir).name] = time.perf_counter() - point_start
      run["stage2_s"] = time.perf_counter() - stage_start
      checkpoint_times()
      return final

    summary = sweep.run_sweep(module, arg, root / "sweep", points, {"init.checkpoint": str(export_dir)},
                              train_fn=timed_train)
    failed = summary["failed"]
    print(f"stage 2: {len(summary['finished'])} trained, {len(summary['skipped'])} finished before, "
          f"{len(failed)} failed", flush=True)
    run["stage2_s"] = time.perf_counter() - stage_start
    checkpoint_times()

  # Report. A routing analysis already written for a point's latest checkpoint is reused.
  stage_start = time.perf_counter()
  analyze = None if _NO_ROUTING.value else functools.partial(analyze_workdir, reuse=True)
  result = study.write_report(root, times=times, analyze_routing=analyze, num_arms=num_arms)
  run["report_s"] = time.perf_counter() - stage_start
  checkpoint_times()
  # Rewrite with this invocation's final times included.
  result = study.write_report(root, times=times, analyze_routing=analyze, num_arms=num_arms)
  print(result["paths"]["markdown"].read_text())
  print(f"wall time of this invocation: {run['total_s']:.0f} s (stage 1 {run['stage1_s']:.0f} s, stage 2 "
        f"{run['stage2_s']:.0f} s, report {run['report_s']:.0f} s); all invocations {times['total_s']:.0f} s")
  for kind, path in result["paths"].items():
    print(f"{kind}: {path}")
  for name, error in failed.items():
    print(f"  FAILED {name}: {error}")
  return 1 if failed else 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
