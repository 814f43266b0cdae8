"""Input pipelines (tfds + grain, no TensorFlow) and the embedded datasets. Data code never imports models.

Image classification: `build_image_dataset`, `num_examples`, `num_classes`, `iterator_state`, `restore_iterator`
(see vimoe.data.images for the config keys and the element format).
"""

from vimoe.data import digits, imagenet, transforms
from vimoe.data.images import (NAMES, PAD_LABEL, build_image_dataset, iterator_state, num_classes, num_examples,
                               restore_iterator)
from vimoe.data.imagenet import DataNotPreparedError

__all__ = [
    "DataNotPreparedError", "NAMES", "PAD_LABEL", "build_image_dataset", "digits", "imagenet", "iterator_state",
    "num_classes", "num_examples", "restore_iterator", "transforms",
]
