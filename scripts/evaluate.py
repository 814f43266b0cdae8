"""Re-evaluates a finished (or running) training workdir from its latest checkpoint. Reads the workdir only.

    python scripts/evaluate.py --workdir /tmp/quickstart [--step N]
"""

import json
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by scripts/train.py.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from vimoe.train import evaluate, load_for_evaluation
  try:
    config, task, model, step = load_for_evaluation(_WORKDIR.value, _STEP.value)
  except (FileNotFoundError, NotADirectoryError, ValueError) as error:  # a wrong --workdir or --step
    sys.exit(f"evaluate.py: {error}")
  metrics = evaluate(task, model, config)
  print(json.dumps({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, float)}}, indent=1))


if __name__ == "__main__":
  app.run(main)
