"""Train and evaluate from a config; rerunning the same command resumes.

    python scripts/train.py --config configs/quickstart.py --workdir /tmp/quickstart [--config.total_steps=100]
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
  except (trainer.WorkdirInUse, trainer.ConfigMismatch, trainer.TrainingDiverged, NotADirectoryError,
          PermissionError) as error:  # the message says it all: no traceback
    sys.exit(f"train.py: {type(error).__name__}: {error}")
  if parallel.is_main_process():
    print("final evaluation:", headline(final))


if __name__ == "__main__":
  app.run(main)
