"""The one trainer (vimoe/train/trainer.py), its optimizer (optim.py) and the tasks it trains (tasks.py)."""

from vimoe.train.trainer import (TrainingDiverged, evaluate, headline, load_for_evaluation, train_and_evaluate,
                                 validate_config)

__all__ = ["TrainingDiverged", "evaluate", "headline", "load_for_evaluation", "train_and_evaluate", "validate_config"]
