"""Train and evaluate from a config; rerunning the same command resumes.

    python scripts/train.py --config configs/quickstart.py --workdir /tmp/quickstart [--config.total_steps=100]

Exit codes (docs/workdirs.md, 'Exit codes'): 0 done; 75 preempted (SIGTERM/SIGINT/SIGUSR1: the step was saved)
or workdir in use: requeue; 78 config differs from the workdir's run; 65 training diverged; 74 an I/O error
(full disk, unwritable workdir); 1 anything else.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Configs import shared recipes (`from configs.imagenet_common import ...`): make the repo root importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from vimoe import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally :ARG).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  parallel.initialize()  # multi-host start-up; a no-op for one process
  from vimoe.train import headline, train_and_evaluate, trainer
  try:
    final = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except trainer.Preempted as stopped:  # saved and released: a requeue resumes from it
    print(f"train.py: {stopped}; rerun the same command to resume", flush=True)
    sys.exit(trainer.EXIT_CODES["Preempted"])
  except (trainer.WorkdirInUse, trainer.ConfigMismatch, trainer.TrainingDiverged, OSError) as error:
    # the message says it all: no traceback (OSError: a full disk, an unwritable or missing path)
    print(f"train.py: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    code = next((trainer.EXIT_CODES[cls.__name__] for cls in type(error).__mro__ if cls.__name__ in trainer.EXIT_CODES),
                1)
    sys.exit(code)
  if parallel.is_main_process():
    print("final evaluation:", headline(final))


if __name__ == "__main__":
  if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in sys.argv[1:]):
    try:  # absl exits 1 after printing the help; asking for help is not a failure
      app.run(main)
    except SystemExit as done:
      sys.exit(0 if done.code == 1 else done.code)
  app.run(main)
