"""Compare routing arms trained with scripts/train.py: final quality and expert load, mean ± std over seeds, and
the expert-load CV over training as a figure (docs/results.md, 'DeepSeek-style routing').

    python scripts/routing_comparison.py --root workdirs/issue16 --figure docs/figures/deepseek_lm_load_cv.png \
        --arms lm_topk,lm_deepseek

Workdirs are named ARM_sSEED under --root (e.g. lm_topk_s0). Per arm it prints the final evaluation metric
(eval/ppl for language models, eval/top1 for classification), the evaluation load CV and max/mean load (mean over
MoE blocks), and, where the run logs them in training (language models), the load CV over training: its mean over
all logged steps, its first and last value, and the last bias range. Each as mean ± sample std over seeds.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
from absl import app, flags

_ROOT = flags.DEFINE_string("root", None, "Folder holding the ARM_sSEED workdirs.")
_ARMS = flags.DEFINE_list("arms", None, "Arms to report (default: every ARM found).")
_FIGURE = flags.DEFINE_string("figure", None, "Where to draw the training load CV of the chosen arms (optional).")
flags.mark_flags_as_required(["root"])


def block_mean(row: dict, split: str, key: str) -> float | None:
  values = [v for k, v in row.items() if re.fullmatch(rf"{split}/block\d+/{key}", k)]
  return float(np.mean(values)) if values else None


def read_run(workdir: pathlib.Path) -> dict | None:
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
  config = json.loads((workdir / "config.json").read_text())
  if not evals or evals[-1]["step"] < config["total_steps"]:
    return None  # unfinished
  final = evals[-1]
  train = [r for r in rows if "train/loss" in r]
  curve = [(r["step"], block_mean(r, "train", "load_cv")) for r in train]
  curve = [(step, cv) for step, cv in curve if cv is not None]
  bias = [block_mean(r, "train", "bias_range") for r in train]
  return {"metric": final.get("eval/ppl", final.get("eval/top1")),
          "metric_name": "eval/ppl" if "eval/ppl" in final else "eval/top1",
          "eval_load_cv": block_mean(final, "eval", "load_cv"),
          "eval_max_mean_load": block_mean(final, "eval", "max_mean_load"),
          "train_load_cv": curve, "bias_range": bias[-1] if bias else None}


def mean_std(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  spread = np.std(values, ddof=1) if len(values) > 1 else float("nan")
  return f"{np.mean(values):.4f} ± {spread:.4f}"


def main(argv):
  del argv
  runs: dict[str, dict[int, dict]] = {}
  for workdir in sorted(pathlib.Path(_ROOT.value).iterdir()):
    match = re.fullmatch(r"(.+)_s(\d+)", workdir.name)
    if match and (workdir / "metrics.jsonl").exists():
      run = read_run(workdir)
      if run is not None:
        runs.setdefault(match.group(1), {})[int(match.group(2))] = run
  arms = _ARMS.value or sorted(runs)
  for arm in arms:
    seeds = runs.get(arm, {})
    if not seeds:
      print(f"{arm}: no finished run")
      continue
    rs = [seeds[s] for s in sorted(seeds)]
    curves = [r["train_load_cv"] for r in rs if r["train_load_cv"]]
    values = ", ".join(f"{r['metric']:.4f}" for r in rs)
    line = (f"{arm}: seeds {sorted(seeds)}; {rs[0]['metric_name']} {mean_std([r['metric'] for r in rs])} "
            f"({values}); eval load CV {mean_std([r['eval_load_cv'] for r in rs])}, "
            f"max/mean {mean_std([r['eval_max_mean_load'] for r in rs])}")
    if curves:
      line += (f"; train load CV mean over steps {mean_std([np.mean([cv for _, cv in c]) for c in curves])}, "
               f"first {mean_std([c[0][1] for c in curves])}, last {mean_std([c[-1][1] for c in curves])}")
    if any(r["bias_range"] is not None for r in rs):
      line += f"; bias range at the end {mean_std([r['bias_range'] for r in rs])}"
    print(line)
  if _FIGURE.value:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm in arms:
      curves = [r["train_load_cv"] for r in runs.get(arm, {}).values() if r["train_load_cv"]]
      if not curves:
        continue
      steps = [step for step, _ in curves[0]]
      values = np.array([[cv for _, cv in c] for c in curves if len(c) == len(steps)])
      mean = values.mean(0)
      line, = ax.plot(steps, mean, label=f"{arm} ({len(values)} seeds)")
      ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("expert load CV (mean over MoE blocks)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("Expert load over training: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(_FIGURE.value, dpi=120)
    print(f"wrote {_FIGURE.value}")


if __name__ == "__main__":
  app.run(main)
