"""Run, print or collect a config sweep (`get_sweep(arg)` next to `get_config` in the config file).

    # every point, one after another, in ROOT/<point>/ (finished points skipped, half-finished ones resumed):
    python scripts/sweep.py --config configs/quickstart_placement.py --workdir workdirs/placement
    # one scripts/train.py command per point, for a cluster scheduler:
    python scripts/sweep.py --config configs/vimoe_s14_in1k_placement.py --workdir runs/placement --print-commands
    # ROOT/results.csv, ROOT/results.md (mean +- std over seeds) and ROOT/placement.png from the point workdirs:
    python scripts/sweep.py --collect workdirs/placement

`--config.KEY=VALUE` overrides apply to every point (a point's own value wins). The exit status is 1 when a point
failed (the others still run).
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Configs import their shared recipe as `configs.<module>`: the repo root must be importable when flags are parsed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file with get_sweep (optionally :ARG).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep root: every point trains in WORKDIR/<point name>/.")
_PRINT = flags.DEFINE_bool("print-commands", False, "Print one scripts/train.py command per point and exit.")
_PYTHON = flags.DEFINE_string("python", "python", "Interpreter named in the printed commands.")
_COLLECT = flags.DEFINE_string("collect", None, "Sweep root to collect into results.csv, results.md, placement.png.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  from vimoe.analysis import sweep_report  # pylint: disable=import-outside-toplevel
  from vimoe.train import sweep  # pylint: disable=import-outside-toplevel

  if _COLLECT.value:
    results = sweep.write_results(_COLLECT.value)
    print(sweep_report.markdown_table(results["groups"], results["swept"]))
    for kind, path in results["paths"].items():
      print(f"{kind}: {path}")
    unfinished = [row["point"] for row in results["rows"] if not row["finished"]]
    if unfinished:
      print(f"not finished: {', '.join(unfinished)}")
    return 0

  config_flag = flags.FLAGS["config"]
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required (or --collect ROOT)")
  spec = config_flags.get_config_filename(config_flag)  # "configs/x.py[:ARG]" as given
  path, arg = sweep.split_config_spec(spec)
  module = sweep.load_config_module(path)
  points = sweep.sweep_points(module, arg)
  base_overrides = config_flags.get_override_values(config_flag)

  if _PRINT.value:
    for command in sweep.train_commands(spec, _WORKDIR.value, points, base_overrides, module.get_config(arg),
                                        python=_PYTHON.value):
      print(command)
    return 0

  summary = sweep.run_sweep(module, arg, _WORKDIR.value, points, base_overrides)
  print(f"sweep: {len(summary['finished'])} trained, {len(summary['skipped'])} finished before, "
        f"{len(summary['failed'])} failed")
  for name, error in summary["failed"].items():
    print(f"  FAILED {name}: {error}")
  return 1 if summary["failed"] else 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
