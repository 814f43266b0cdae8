"""Input pipelines (tfds + grain, no TensorFlow) and the embedded datasets. Data code never imports models.

Image classification: `build_image_dataset`, `num_examples`, `num_classes`, `iterator_state`, `restore_iterator`
(see vimoe.data.images for the config keys and the element format).
Language modelling: `build_text_dataset`, `get_tokenizer` (see vimoe.data.text; Shakespeare is embedded, lm1b is tfds).
"""

from vimoe.data import digit_pairs, digits, imagenet, text, transforms
from vimoe.data.images import (NAMES, PAD_LABEL, build_image_dataset, iterator_state, num_classes, num_examples,
                               restore_iterator)
from vimoe.data.imagenet import DataNotPreparedError
from vimoe.data.text import build_text_dataset, get_tokenizer

__all__ = [
    "DataNotPreparedError", "NAMES", "PAD_LABEL", "build_image_dataset", "digit_pairs", "digits", "imagenet",
    "iterator_state", "num_classes", "num_examples", "restore_iterator", "transforms",
    "build_text_dataset", "get_tokenizer", "text",
]
