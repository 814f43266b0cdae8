"""Image-classification input pipelines (grain, no TensorFlow): the one entry point the trainer calls.

    ds = build_image_dataset(config, "train", batch_size=256, seed=0, train=True)
    it = iter(ds)                       # a grain.DatasetIterator
    batch = next(it)                    # {"image": float32 [b, H, W, 3], "label": int32 [b]}
    state = it.get_state()              # == iterator_state(it): a JSON-serialisable dict
    it = iter(ds); it.set_state(state)  # == restore_iterator(it, state): continues with the next batch

`batch_size` is the GLOBAL batch: each process yields b = batch_size / jax.process_count() rows, its block of the
global batch of the step (the global batches do not depend on the process count).

Config keys, splits, order, padding and iterator checkpointing: docs/data.md, 'Image classification'.
"""

from __future__ import annotations

import json
import math
from typing import Any

import grain
import numpy as np

from vimoe.data import digit_pairs, digits, imagenet, transforms

NAMES = ("digits", "digit_pairs", "imagenet2012")
INTERPOLATIONS = tuple(transforms.INTERPOLATIONS)
_DEFAULTS = {
    "digits": {"image_size": 32, "read_threads": 0},
    "digit_pairs": {"image_size": digit_pairs.CANVAS, "read_threads": 0, "task": "pairs",
                    "test_per_class": digit_pairs.TEST_PER_CLASS},
    "imagenet2012": {"image_size": 224, "read_threads": 16},
}
_COMMON_DEFAULTS = {
    "mean": transforms.IMAGENET_MEAN, "std": transforms.IMAGENET_STD, "augment": True, "num_workers": 0,
    "max_shift": 2, "data_dir": None, "crop_scale": (0.08, 1.0), "crop_ratio": (3 / 4, 4 / 3),
    "crop_fraction": 0.875, "interpolation": "bicubic",
}
PAD_LABEL = -1


def config_values(config, defaults: dict) -> dict:
  """{key: the config's value, or defaults[key] where it is None or absent} (a ConfigDict, a dict or an object)."""
  get = config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)
  values = {key: get(key, None) for key in defaults}
  return {key: defaults[key] if value is None else value for key, value in values.items()}


def _resolve(config) -> dict[str, Any]:
  """Config values with defaults filled in, checked."""
  name = config_values(config, {"name": None})["name"]
  if name not in NAMES:
    raise ValueError(f"config.name={name!r} is not a known image dataset; valid names: {', '.join(NAMES)}")
  resolved = {"name": name, **config_values(config, {**_COMMON_DEFAULTS, **_DEFAULTS[name]})}
  for key in ("mean", "std"):
    value = np.asarray(resolved[key], np.float32).reshape(-1)
    if value.size not in (1, 3):
      raise ValueError(f"config.{key}={resolved[key]!r} must be one number or three (per RGB channel)")
    resolved[key] = tuple(float(v) for v in np.broadcast_to(value, (3,)))
  if np.any(np.asarray(resolved["std"]) <= 0):
    raise ValueError(f"config.std={resolved['std']} must be positive")
  for key in ("image_size", "num_workers", "read_threads", "max_shift"):
    value = resolved[key]
    minimum = 1 if key == "image_size" else 0
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
      raise ValueError(f"config.{key}={value!r} must be an integer >= {minimum}")
    resolved[key] = int(value)
  if name == "digit_pairs":
    digit_pairs.check_task(resolved["task"])
    if resolved["image_size"] != digit_pairs.CANVAS:
      raise ValueError(f"config.image_size={resolved['image_size']} is not supported by digit_pairs: its digits keep "
                       f"their native 8x8 pixels on a {digit_pairs.CANVAS}x{digit_pairs.CANVAS} canvas")
    per_class = resolved["test_per_class"]
    if (not isinstance(per_class, (int, np.integer)) or isinstance(per_class, bool)
        or not 1 <= per_class <= digit_pairs.MAX_TEST_PER_CLASS):
      raise ValueError(f"config.test_per_class={per_class!r} must be an integer in [1, "
                       f"{digit_pairs.MAX_TEST_PER_CLASS}]")
    resolved["test_per_class"] = int(per_class)
  if resolved["interpolation"] not in INTERPOLATIONS:
    raise ValueError(f"config.interpolation={resolved['interpolation']!r} is unknown; valid: "
                     f"{', '.join(INTERPOLATIONS)}")
  if not 0 < resolved["crop_fraction"] <= 1:
    raise ValueError(f"config.crop_fraction={resolved['crop_fraction']!r} must be in (0, 1]")
  for key in ("crop_scale", "crop_ratio"):
    low, high = resolved[key]
    if not 0 < low <= high:
      raise ValueError(f"config.{key}={resolved[key]!r} must be (low, high) with 0 < low <= high")
  if resolved["crop_scale"][1] > 1:
    raise ValueError(f"config.crop_scale={resolved['crop_scale']!r}: the area fraction cannot exceed 1")
  return resolved


def _check_imagenet_split(split: str) -> None:
  base = split.split("[", 1)[0]
  valid = ("train", "validation", "test")
  if base not in valid:
    raise ValueError(f"imagenet2012 split={split!r} is unknown; valid: {', '.join(valid)}, optionally with a tfds "
                     f"slice such as 'train[:99%]'")


def num_classes(config) -> int:
  """10 for digits, 100 for digit_pairs (20 with task="slots", 10 with "single"), 1000 for imagenet2012."""
  cfg = _resolve(config)
  if cfg["name"] == "digit_pairs":
    return digit_pairs.NUM_CLASSES[cfg["task"]]
  return digits.NUM_CLASSES if cfg["name"] == "digits" else imagenet.NUM_CLASSES


def num_examples(config, split: str) -> int:
  """Examples in `split` over all processes, before any padding or dropping (imagenet2012 reads the metadata)."""
  cfg = _resolve(config)
  if cfg["name"] == "digits":
    return digits.num_examples(split)
  if cfg["name"] == "digit_pairs":
    return digit_pairs.num_examples(cfg["task"], split, cfg["test_per_class"])
  _check_imagenet_split(split)
  return imagenet.num_examples(split, cfg["data_dir"])


def _source_and_transform(cfg: dict[str, Any], split: str, augment: bool):
  """(random-access source, grain Map or RandomMap turning a source example into the output element)."""
  mean, std, size = cfg["mean"], cfg["std"], cfg["image_size"]
  if cfg["name"] in ("digits", "digit_pairs"):
    source = (digits.DigitsSource(split, size) if cfg["name"] == "digits"
              else digit_pairs.DigitPairsSource(cfg["task"], split, cfg["test_per_class"]))
    if augment and cfg["max_shift"] > 0:
      return source, digits.DigitsTrain(mean, std, cfg["max_shift"])
    return source, digits.DigitsEval(mean, std)
  _check_imagenet_split(split)
  source = imagenet.open_source(split, cfg["data_dir"])
  if augment:
    return source, imagenet.ImagenetTrain(size, mean, std, cfg["interpolation"], cfg["crop_scale"],
                                          cfg["crop_ratio"])
  return source, imagenet.ImagenetEval(size, mean, std, cfg["interpolation"], cfg["crop_fraction"])


def _apply(ds: grain.MapDataset, transform) -> grain.MapDataset:
  if isinstance(transform, grain.transforms.RandomMap):
    return ds.random_map(transform)
  return ds.map(transform)


def _process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  return process_index, process_count


def check_loader_args(batch_size: int, seed: int, num_epochs: int | None, process_index: int | None,
                      process_count: int | None) -> tuple[int, int, int]:
  """The checks every grain loader here makes; returns (process_index, process_count, per-process batch)."""
  process_index, process_count = _process_shard(process_index, process_count)
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of the process count {process_count}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32)")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} must be positive or None")
  return process_index, process_count, batch_size // process_count


def shard_batches(ds: grain.MapDataset, transform, *, train: bool, split: str, process_index: int,
                  process_count: int, local_batch: int, num_epochs: int | None, pad_element: dict) -> grain.MapDataset:
  """This process's batches of a seeded MapDataset, transformed: its rows of every GLOBAL batch.

  The global stream is the same for every process count: training shuffles (reshuffled every epoch), repeats
  `num_epochs` times (None = forever) and drops the last partial global batch; evaluation keeps the order and pads
  the end with `pad_element` to a whole number of global batches. Global batch t is rows [t B, (t + 1) B) of that
  stream (B = local_batch x process_count) and process p yields its rows [t B + p b, t B + (p + 1) b) (b =
  local_batch): the block `jax.make_array_from_process_local_data` expects from it when the batch axis is split
  over devices in process order. So a run gives every step the same global batch whatever the process count, and
  every process's iterator is at the same position (its state counts steps).
  """
  global_batch = local_batch * process_count
  if train:
    ds = _apply(ds.shuffle(), transform)
    if len(ds) < global_batch:
      raise ValueError(f"split {split!r} holds {len(ds)} examples, fewer than one global batch of {global_batch} "
                       f"({process_count} process(es) x {local_batch})")
    batches = ds.repeat(num_epochs).batch(local_batch, drop_remainder=True)
  else:
    length = len(ds)
    ds = _apply(ds, transform)
    padded_length = math.ceil(length / global_batch) * global_batch
    if padded_length > length:
      ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([pad_element] * (padded_length - length))])
    batches = ds.batch(local_batch)
    if num_epochs is not None and num_epochs > 1:
      batches = batches.repeat(num_epochs)
  whole = len(batches) - len(batches) % process_count  # only whole global batches
  return batches[:whole][process_index::process_count]


def build_image_dataset(config, split: str, *, batch_size: int, seed: int, train: bool,
                        num_epochs: int | None = None, process_index: int | None = None,
                        process_count: int | None = None) -> grain.IterDataset:
  """A grain IterDataset of {"image": float32 [b, H, W, 3], "label": int32 [b]}, b = batch_size / process_count.

  Args:
    config: dataset config, keys in the module docstring.
    split: see the module docstring.
    batch_size: GLOBAL batch size, divisible by the process count.
    seed: shuffle and augmentation seed, an integer in [0, 2**32).
    train: shuffle, augment (if config.augment), repeat and drop the last partial batch; else one ordered pass
      with padded batches (label -1 on padding rows).
    num_epochs: passes over the split; None = forever when training, once when evaluating.
    process_index, process_count: this process's shard; default jax.process_index() / jax.process_count().
  """
  cfg = _resolve(config)
  process_index, process_count, local_batch = check_loader_args(batch_size, seed, num_epochs, process_index,
                                                                process_count)
  source, transform = _source_and_transform(cfg, split, augment=train and cfg["augment"])
  pad_element = {"image": np.zeros((cfg["image_size"], cfg["image_size"], 3), np.float32),
                 "label": np.int32(PAD_LABEL)}
  # Batching before the threads and workers split the work makes the batches independent of read_threads and
  # num_workers; each thread builds whole batches, and at most read_threads of them wait in the buffer.
  ds = shard_batches(grain.MapDataset.source(source).seed(seed), transform, train=train, split=split,
                     process_index=process_index, process_count=process_count, local_batch=local_batch,
                     num_epochs=num_epochs, pad_element=pad_element)
  read_options = grain.ReadOptions(num_threads=cfg["read_threads"], prefetch_buffer_size=cfg["read_threads"])
  iter_ds = ds.to_iter_dataset(read_options)
  return prefetch_in_workers(iter_ds, cfg["num_workers"])


def prefetch_in_workers(iter_ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  """`iter_ds` read ahead by `num_workers` grain worker processes (as it is for 0). The workers read absl flags;
  outside absl.app.run (notebooks, pytest) they get their defaults."""
  if num_workers <= 0:
    return iter_ds
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
  """`iterator.get_state()`: a JSON-serialisable dict (its position); save it with the model checkpoint."""
  return iterator.get_state()


def restore_iterator(iterator: grain.DatasetIterator, state: dict[str, Any] | str | bytes) -> grain.DatasetIterator:
  """`iterator.set_state(state)` (state as a dict or its JSON text); the iterator then yields what followed it."""
  if isinstance(state, (str, bytes)):
    state = json.loads(state)
  iterator.set_state(state)
  return iterator
