"""Shazeer et al. 2017, table 6 at CPU scale: the LSTM-MoE LM trained with six (w_importance, w_load) pairs.

    python scripts/reproduce_shazeer_table6.py --workdir workdirs/shazeer_table6

Trains the paper's layout (vimoe/models/lstm.py: embedding -> LSTM -> MoE -> LSTM -> softmax) on the embedded
Shakespeare corpus (bytes) once per weight pair, with the same seed, data order and initialisation, then measures
on the validation plays, with the trained model and no router noise: perplexity (per byte), CV(Importance),
CV(Load) and max(Load)/mean(Load), per evaluation batch of 64 x 64 bytes and averaged over the split (the paper
averages its batch metrics over several training batches). Load counts the tokens routed to each expert.

One workdir per point under --workdir (ROOT/wimp{w}_wload{w}); rerunning resumes an interrupted point from its
last checkpoint and reuses finished ones (ROOT/.../result.json). Prints a Markdown table with the paper's
numbers beside ours and writes it between the `shazeer-table6` markers of docs/results.md (or, without the
markers, into docs/_draft_shazeer.md).

Scale: width 64, 16 experts (ReLU MLPs 64 -> 128 -> 64), k=2 (so an expert that always wins shows up as a
max/mean load near E/k = 8 and a load CV near sqrt(E/k - 1) = 2.6), windows of 64 bytes, batches of 32, 800
Adam steps: a few minutes per point on 2 CPU cores. The paper's MoE-256 on lm1b has 256 experts of
512 -> 1024 -> 512, k=4, and trains 27k steps of ~300k words (configs/lstm_moe256_lm1b.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import textwrap
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
START, END = "<!-- shazeer-table6:start -->", "<!-- shazeer-table6:end -->"
# (w_importance, w_load) -> (test perplexity, CV(Importance(X)), CV(Load(X)), max(Load(X))/mean(Load(X))), table 6
# of arXiv 1701.06538 (MoE-256 on the 1 Billion Word benchmark, 10 epochs).
PAPER = {
    (0.0, 0.0): (39.8, 3.04, 3.01, 17.80),
    (0.2, 0.0): (35.6, 0.06, 0.17, 1.47),
    (0.0, 0.2): (35.7, 0.22, 0.04, 1.15),
    (0.1, 0.1): (35.6, 0.06, 0.05, 1.14),
    (0.01, 0.01): (35.7, 0.48, 0.11, 1.37),
    (1.0, 1.0): (35.7, 0.03, 0.02, 1.07),
}
POINTS = tuple(PAPER)


def point_config(importance_weight: float, load_weight: float, steps: int):
  """The small LSTM-MoE of this reproduction (configs/lstm_moe_quickstart.py with the sizes of the docstring)."""
  sys.path.insert(0, str(ROOT))
  from configs.lstm_moe_quickstart import get_config  # pylint: disable=import-outside-toplevel
  config = get_config()
  config.unlock()
  config.update(batch_size=32, eval_batch_size=64, total_steps=steps, log_every=50, eval_every=steps,
                checkpoint_every=max(steps // 4, 1))
  config.data.update(seq_len=64, max_eval_batches=None)
  config.model.update(dim=64, dropout=0.1)
  config.model.moe.update(type="flat", num_experts=16, k=2, hidden_dim=128, importance_weight=importance_weight,
                          load_weight=load_weight, capacity_factor=None, dispatch="gather")
  config.optim.update(lr=3e-3, warmup_steps=50)
  config.lock()
  return config


def point_dir(root: pathlib.Path, importance_weight: float, load_weight: float) -> pathlib.Path:
  return root / f"wimp{importance_weight:g}_wload{load_weight:g}"


def run_point(root: pathlib.Path, importance_weight: float, load_weight: float, steps: int) -> dict:
  """Trains (or resumes, or reuses) one point and returns its measurements."""
  from vimoe.train import trainer  # pylint: disable=import-outside-toplevel
  workdir = point_dir(root, importance_weight, load_weight)
  result_path = workdir / "result.json"
  config = point_config(importance_weight, load_weight, steps)
  if result_path.exists():
    result = json.loads(result_path.read_text())
    if result.get("config") == json.loads(config.to_json_best_effort()):
      print(f"w_importance={importance_weight:g} w_load={load_weight:g}: finished earlier ({result_path})",
            flush=True)
      return result
  print(f"w_importance={importance_weight:g} w_load={load_weight:g}: training {steps} steps in {workdir}",
        flush=True)
  start = time.perf_counter()
  final = trainer.train_and_evaluate(config, workdir)
  seconds = time.perf_counter() - start
  load = np.asarray(final["eval/block1/expert_load"])
  result = {
      "importance_weight": importance_weight, "load_weight": load_weight, "steps": steps,
      "ppl": final["eval/ppl"], "bits_per_byte": final["eval/bits_per_token"],
      "importance_cv": final["eval/block1/importance_cv"], "load_cv": final["eval/block1/load_cv"],
      "max_mean_load": final["eval/block1/max_mean_load"],
      "smooth_load_cv": final["eval/block1/smooth_load_cv"],
      # The whole split as one batch: CV and max/mean of the fraction of routed tokens per expert.
      "split_load_cv": float(np.std(load) / np.mean(load)), "split_max_mean_load": float(load.max() / load.mean()),
      "expert_load": load.tolist(), "train_seconds": seconds,
      "train_batch": training_batch_metrics(workdir, last=4),
      "config": json.loads(config.to_json_best_effort()),
  }
  result_path.write_text(json.dumps(result, indent=2) + "\n")
  return result


def training_batch_metrics(workdir: pathlib.Path, last: int) -> dict:
  """Routing metrics of the last `last` logged training batches (with router noise), averaged, as the paper did."""
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [line for line in lines if "train/block1/load_cv" in line][-last:]
  return {key: float(np.mean([line[f"train/block1/{key}"] for line in train]))
          for key in ("importance_cv", "load_cv", "max_mean_load")}


def markdown_table(results: list[dict]) -> str:
  rows = ["| w_importance | w_load | ppl (paper, per word) | ppl (ours, per byte) | CV(Importance) paper | ours "
          "| CV(Load) paper | ours | max/mean Load paper | ours |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for result in results:
    key = (result["importance_weight"], result["load_weight"])
    paper = PAPER.get(key)
    paper_cells = [f"{paper[0]:.1f}", f"{paper[1]:.2f}", f"{paper[2]:.2f}", f"{paper[3]:.2f}"] if paper else [""] * 4
    rows.append(f"| {key[0]:g} | {key[1]:g} | {paper_cells[0]} | {result['ppl']:.3f} | {paper_cells[1]} | "
                f"{result['importance_cv']:.2f} | {paper_cells[2]} | {result['load_cv']:.2f} | {paper_cells[3]} | "
                f"{result['max_mean_load']:.2f} |")
  return "\n".join(rows)


def training_batch_table(results: list[dict]) -> str:
  rows = ["| w_importance | w_load | CV(Importance) | CV(Load) | max/mean Load |", "|---:|---:|---:|---:|---:|"]
  for result in results:
    train = result["train_batch"]
    rows.append(f"| {result['importance_weight']:g} | {result['load_weight']:g} | {train['importance_cv']:.2f} | "
                f"{train['load_cv']:.2f} | {train['max_mean_load']:.2f} |")
  return "\n".join(rows)


def report(results: list[dict], seconds: float, steps: int) -> str:
  point_minutes = sum(r["train_seconds"] for r in results) / 60
  intro = (
      f"Generated by `python scripts/reproduce_shazeer_table6.py --workdir ROOT`: {steps} steps per point, "
      f"{point_minutes:.1f} min wall time for the six points (this invocation {seconds / 60:.1f} min) on "
      f"{os.cpu_count()} CPU cores. The LSTM-MoE of appendix C.1 at width 64, 16 experts 64 -> 128 -> 64, k=2, "
      f"DropProb 0.1, one seed, on Shakespeare bytes (38 training texts), measured on the validation plays "
      f"(Macbeth, The Tempest: 201,868 bytes) without router noise. CVs and max/mean are per evaluation batch of "
      f"4096 bytes, averaged; Load counts routed tokens. The paper's columns are its MoE-256 on lm1b; its "
      f"perplexity is per word, ours per byte, so only the pattern compares.")
  note = ("The same metrics on the last four logged training batches (2048 bytes each, with router noise), "
          "which is where the paper measured them:")
  return (textwrap.fill(intro, 120) + "\n\n" + markdown_table(results) + "\n\n" + textwrap.fill(note, 120)
          + "\n\n" + training_batch_table(results) + "\n")


def write_results(text: str, results_path: pathlib.Path, draft_path: pathlib.Path) -> pathlib.Path:
  """Replaces the text between the markers of results_path; without the markers, writes draft_path instead."""
  if results_path.exists():
    content = results_path.read_text()
    pattern = re.compile(re.escape(START) + r"\n.*?" + re.escape(END), re.DOTALL)
    if pattern.search(content):
      results_path.write_text(pattern.sub(lambda _: f"{START}\n{text}{END}", content, count=1))
      return results_path
  block = f"{START}\n{text}{END}\n"
  if draft_path.exists():
    content = draft_path.read_text()
    pattern = re.compile(re.escape(START) + r"\n.*?" + re.escape(END) + r"\n?", re.DOTALL)
    content = pattern.sub(lambda _: block, content, count=1) if pattern.search(content) else content + "\n" + block
  else:
    content = block
  draft_path.write_text(content)
  return draft_path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, type=pathlib.Path, help="root directory, one workdir per point")
  parser.add_argument("--steps", type=int, default=800, help="training steps per point (default 800)")
  parser.add_argument("--results", type=pathlib.Path, default=ROOT / "docs" / "results.md",
                      help="Markdown file with the shazeer-table6 markers (default docs/results.md)")
  parser.add_argument("--draft", type=pathlib.Path, default=ROOT / "docs" / "_draft_shazeer.md",
                      help="where the table goes when --results has no markers")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps={args.steps} must be a positive integer")
  os.environ.setdefault("VIMOE_NO_PROGRESS", "1")
  start = time.perf_counter()
  root = args.workdir.absolute()
  results = [run_point(root, wi, wl, args.steps) for wi, wl in POINTS]
  text = report(results, time.perf_counter() - start, args.steps)
  print("\n" + text)
  for result in results:
    print(f"w_importance={result['importance_weight']:g} w_load={result['load_weight']:g}: "
          f"bits/byte {result['bits_per_byte']:.3f}, whole-split load CV {result['split_load_cv']:.2f} "
          f"(max/mean {result['split_max_mean_load']:.2f}), smooth-load CV {result['smooth_load_cv']:.2f}, "
          f"training batches (with noise): importance CV {result['train_batch']['importance_cv']:.2f}, "
          f"load CV {result['train_batch']['load_cv']:.2f}, max/mean {result['train_batch']['max_mean_load']:.2f}; "
          f"trained in {result['train_seconds']:.0f} s")
  written = write_results(text, args.results, args.draft)
  print(f"\nwrote the table into {written}")


if __name__ == "__main__":
  main()
