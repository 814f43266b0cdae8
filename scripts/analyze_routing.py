"""Routing analysis of a trained ViMoE workdir: which experts each class goes to, per MoE layer, and which layers
to keep as MoE (ViMoE's advice: those whose routing specialises). See vimoe/analysis/routing.py and
vimoe/train/workdir.py.

    python scripts/analyze_routing.py --workdir workdirs/quickstart [--step N] [--max_batches M]

Writes into the workdir (or --output_dir): routing_analysis.json (every number), routing_log.npz (labels and
first-choice experts), routing_block{i}.png (class x expert heatmap per MoE layer), routing_all.png (all layers)
and routing_load.png (expert load); prints a per-layer summary and the recommendation.
"""

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by scripts/train.py.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", None, "Evaluation batches to route (default: the whole split).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the JSON and figures go (default: the workdir).")
_MIN_SCORE = flags.DEFINE_float("min_score", 0.1, "Keep a layer only if its specialisation is at least this.")
_RELATIVE = flags.DEFINE_float("relative", 0.5, "... and at least this fraction of the best layer's.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from vimoe.train.workdir import analyze_workdir  # pylint: disable=import-outside-toplevel
  analysis = analyze_workdir(_WORKDIR.value, _STEP.value, _MAX_BATCHES.value, output_dir=_OUTPUT_DIR.value,
                             min_score=_MIN_SCORE.value, relative=_RELATIVE.value)
  print(f"step {analysis['step']}, {analysis['num_units']} {analysis['units']}s, {analysis['num_classes']} classes, "
        f"{analysis['num_experts']} experts (top-{analysis['k']}), routing degree D = {analysis['routing_degree']}")
  print(f"{'layer':>8} {'l':>3} {'S':>6} {'chance':>7} {'H(E)':>6} {'H(E|C)':>7}  expert load")
  for name, layer in analysis["layers"].items():
    load = " ".join(f"{value:.2f}" for value in layer["expert_load"])
    print(f"{name:>8} {layer['l']!s:>3} {layer['specialization']:6.3f} {layer['chance_specialization']:7.3f} "
          f"{layer['expert_entropy']:6.3f} {layer['conditional_entropy']:7.3f}  {load}")
  print(analysis["recommendation"]["text"])
  for path in analysis["figures"]:
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
