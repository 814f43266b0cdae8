"""Image-classification pipelines: digits split and transform, ImageNet on tfds' mock (no TensorFlow), resumption.

Expected values come from independent computations: the split rule recomputed from `load_digits()`, the upscaling
from `jax.image.resize`, crops from hand-worked offsets, ImageNet resizing straight from PIL.
"""

import json
import sys

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from vimoe import data
from vimoe.data import imagenet, transforms

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def digits_config(**overrides):
  return {"name": "digits", "image_size": 8, "mean": MEAN, "std": STD, "augment": False, **overrides}


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])


def image_rows(batches):
  """Each real image of the batches as bytes, for set comparisons."""
  return [image.tobytes() for batch in batches for image, label in zip(batch["image"], batch["label"]) if label >= 0]


# ----------------------------------------------------------------------------------------------------------- digits

def test_digits_split_is_fixed_disjoint_and_stratified():
  labels = load_digits().target
  train, test = data.digits.split_indices("train"), data.digits.split_indices("test")
  assert (len(train), len(test)) == (1442, 355)
  assert data.num_examples(digits_config(), "train") == 1442 and data.num_examples(digits_config(), "test") == 355
  assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
  expected_test = sorted(i for c in range(10) for i in np.flatnonzero(labels == c)[4::5])  # every 5th per class
  np.testing.assert_array_equal(test, expected_test)
  test_fraction = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
  assert np.all((test_fraction > 0.18) & (test_fraction < 0.21)), test_fraction
  np.testing.assert_array_equal(data.digits.split_indices("test"), test)  # a second computation agrees


def test_digits_eval_batches_match_numpy_transform_and_are_padded():
  config = digits_config(image_size=32)
  batches = list(data.build_image_dataset(config, "test", batch_size=64, seed=0, train=False))
  assert len(batches) == 6  # ceil(355 / 64)
  for batch in batches:
    assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  digits = load_digits()
  test = data.digits.split_indices("test")
  for row in (0, 1, 63):
    grey = jax.image.resize(digits.images[test[row]] / 16.0, (32, 32), "bilinear")
    expected = (np.repeat(np.asarray(grey)[:, :, None], 3, axis=2) - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(batches[0]["image"][row], expected, atol=1e-5)
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[:355], digits.target[test])
  np.testing.assert_array_equal(labels[355:], -1)  # 29 padding rows
  np.testing.assert_array_equal(batches[-1]["image"][355 - 5 * 64:], 0.0)


@pytest.mark.parametrize("out_size", [20, 32])
def test_bilinear_upscaling_matches_jax(out_size):
  images = np.random.default_rng(0).uniform(size=(3, 8, 8)).astype(np.float32)
  expected = jax.image.resize(images, (3, out_size, out_size), "bilinear")
  np.testing.assert_allclose(transforms.bilinear_resize(images, out_size, out_size), expected, atol=1e-6)


def test_digits_training_epoch_is_a_permutation_and_seeded():
  config = digits_config()
  ds = data.build_image_dataset(config, "train", batch_size=103, seed=5, train=True)  # 1442 = 14 * 103
  epoch = take(iter(ds), 14)
  eval_rows = image_rows(data.build_image_dataset(config, "train", batch_size=103, seed=0, train=False))
  assert sorted(image_rows(epoch)) == sorted(eval_rows)  # every training image exactly once
  assert image_rows(epoch) != eval_rows  # shuffled
  again = take(iter(data.build_image_dataset(config, "train", batch_size=103, seed=5, train=True)), 14)
  assert_same_batches(epoch, again)
  other_seed = take(iter(data.build_image_dataset(config, "train", batch_size=103, seed=6, train=True)), 1)
  assert not np.array_equal(other_seed[0]["label"], epoch[0]["label"])
  second_epoch = take(iter(ds), 28)[14:]
  assert image_rows(second_epoch) != image_rows(epoch)  # reshuffled each epoch


def test_digits_augmentation_is_a_small_shift_with_zero_background():
  config = digits_config(image_size=16, augment=True, max_shift=2)
  batch = next(iter(data.build_image_dataset(config, "train", batch_size=8, seed=1, train=True)))
  clean, _ = data.digits.load_split("train", 16)  # grey [1442, 16, 16] in [0, 1]
  padded = np.pad(clean, ((0, 0), (2, 2), (2, 2)))
  shifted = np.stack([padded[:, dy:dy + 16, dx:dx + 16] for dy in range(5) for dx in range(5)], 1)  # [N, 25, ..]
  moved = 0
  for image in batch["image"]:
    grey = image * np.array(STD) + np.array(MEAN)  # undo the normalisation
    np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1e-5)
    distance = np.abs(shifted - grey[None, None, :, :, 0]).max(axis=(2, 3))
    assert distance.min() < 1e-5  # some training image shifted by at most 2 pixels
    moved += np.unravel_index(distance.argmin(), distance.shape)[1] != 12  # 12 = no shift
  assert moved > 0


def test_multi_process_batches_are_blocks_of_the_global_batch():
  """Process p's batch t is rows [7p, 7p + 7) of the one-process batch t: every step sees the same global batch
  whatever the process count (multi-process runs reproduce one-process runs)."""
  config = digits_config()
  shards = [take(iter(data.build_image_dataset(config, "train", batch_size=14, seed=2, train=True,
                                               process_index=p, process_count=2)), 103) for p in range(2)]
  single = take(iter(data.build_image_dataset(config, "train", batch_size=14, seed=2, train=True,
                                              process_index=0, process_count=1)), 103)
  assert all(b["image"].shape[0] == 7 for shard in shards for b in shard)  # local batch = 14 / 2
  for t, whole in enumerate(single):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([shards[0][t][key], shards[1][t][key]]), whole[key])
  rows = [image_rows(shard) for shard in shards]  # 2 * 103 * 7 = 1442: one epoch, disjoint
  assert not set(rows[0]) & set(rows[1]) and len(set(rows[0]) | set(rows[1])) == 1442
  evals = [list(data.build_image_dataset(config, "test", batch_size=64, seed=0, train=False, process_index=p,
                                         process_count=2)) for p in range(2)]
  single_eval = list(data.build_image_dataset(config, "test", batch_size=64, seed=0, train=False, process_index=0,
                                              process_count=1))
  assert len(evals[0]) == len(evals[1]) == len(single_eval) == 6  # 355 examples padded to 6 batches of 2 x 32
  for t, whole in enumerate(single_eval):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([evals[0][t][key], evals[1][t][key]]), whole[key])
  labels = np.concatenate([b["label"] for b in single_eval])
  assert (labels >= 0).sum() == 355 and np.all(labels[355:] == data.PAD_LABEL)


def test_iterator_resumes_from_saved_state():
  ds = data.build_image_dataset(digits_config(augment=True, max_shift=1), "train", batch_size=32, seed=3,
                                train=True)
  iterator = iter(ds)
  take(iterator, 3)
  state = data.iterator_state(iterator)
  expected = take(iterator, 4)
  json.dumps(state)  # serialisable as it is
  assert_same_batches(take(data.restore_iterator(iter(ds), state), 4), expected)
  assert_same_batches(take(data.restore_iterator(iter(ds), json.dumps(state)), 4), expected)


def test_iterator_state_round_trips_through_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  ds = data.build_image_dataset(digits_config(), "train", batch_size=16, seed=4, train=True)
  iterator = iter(ds)
  take(iterator, 2)
  manager = ocp.CheckpointManager(tmp_path)
  manager.save(2, args=ocp.args.Composite(model=ocp.args.StandardSave({"w": np.arange(3.0)}),
                                          data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = take(iterator, 2)
  restored = manager.restore(2, args=ocp.args.Composite(model=ocp.args.StandardRestore({"w": np.zeros(3)}),
                                                        data=grain.checkpoint.CheckpointRestore(iter(ds))))
  assert_same_batches(take(restored["data"], 2), expected)


def test_config_errors_name_the_key_and_valid_values():
  with pytest.raises(ValueError, match=r"config\.name='mnist'.*digits, digit_pairs, imagenet2012"):
    data.build_image_dataset({"name": "mnist"}, "train", batch_size=8, seed=0, train=True)
  with pytest.raises(ValueError, match=r"config\.interpolation='nearest'.*bilinear, bicubic"):
    data.num_classes(digits_config(interpolation="nearest"))
  with pytest.raises(ValueError, match=r"split='val'.*train, test"):
    data.build_image_dataset(digits_config(), "val", batch_size=8, seed=0, train=False)
  with pytest.raises(ValueError, match=r"split='val'.*train, validation, test"):
    data.num_examples({"name": "imagenet2012"}, "val")
  with pytest.raises(ValueError, match="multiple of the process count 2"):
    data.build_image_dataset(digits_config(), "train", batch_size=7, seed=0, train=True, process_index=0,
                             process_count=2)
  assert data.num_classes(digits_config()) == 10 and data.num_classes({"name": "imagenet2012"}) == 1000


# --------------------------------------------------------------------------------------------------------- imagenet

def imagenet_config(tmp_path, **overrides):
  return {"name": "imagenet2012", "image_size": 16, "data_dir": str(tmp_path), "mean": MEAN, "std": STD,
          "read_threads": 2, **overrides}


def test_imagenet_mock_reads_decoded_images_without_tensorflow(tmp_path):
  # The default MockPolicy.AUTO falls back to USE_CODE (no metadata files) and mocks tfds.data_source.
  with tfds.testing.mock_data(num_examples=10):
    raw = tfds.data_source("imagenet2012", split="validation", data_dir=str(tmp_path))
    assert raw[0]["image"].dtype == np.uint8 and raw[0]["image"].ndim == 3  # decoded by tfds, not by us
    config = imagenet_config(tmp_path)
    assert data.num_examples(config, "validation") == 10
    train = take(iter(data.build_image_dataset(config, "train", batch_size=4, seed=0, train=True)), 3)
    evaluation = list(data.build_image_dataset(config, "validation", batch_size=4, seed=0, train=False))
  assert "tensorflow" not in sys.modules
  for batch in train + evaluation:
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
  assert all(0 <= label < 1000 for batch in train for label in batch["label"])
  labels = np.concatenate([b["label"] for b in evaluation])
  np.testing.assert_array_equal(labels[:10], [raw[i]["label"] for i in range(10)])
  np.testing.assert_array_equal(labels[10:], -1)  # 10 examples padded to 3 batches of 4
  # Evaluation view of example 3, from PIL directly: shorter side to floor(16 / 0.875) = 18, central 16x16.
  image = raw[3]["image"]
  height, width = image.shape[:2]
  new_size = (18, int(18 * height / width)) if width <= height else (int(18 * width / height), 18)  # (w, h)
  resized = np.asarray(Image.fromarray(image).resize(new_size, Image.Resampling.BICUBIC))
  top, left = int(round((resized.shape[0] - 16) / 2)), int(round((resized.shape[1] - 16) / 2))
  expected = (resized[top:top + 16, left:left + 16] / 255.0 - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(evaluation[0]["image"][3], expected, atol=1e-5)


@pytest.mark.parametrize("shape, top, left", [((18, 24), 1, 4), ((25, 18), 4, 1)])
def test_eval_center_crop_on_a_known_image(shape, top, left):
  # crop_fraction 16/18 makes the resize target 18 = the shorter side, so only the crop acts. Offsets by hand:
  # 18x24: (18 - 16) / 2 = 1, (24 - 16) / 2 = 4; 25x18: (25 - 16) / 2 = 4.5 rounds to 4 (as torchvision), 1.
  height, width = shape
  image = np.arange(height * width * 3, dtype=np.int64).reshape(height, width, 3) % 251
  image = image.astype(np.uint8)
  out = imagenet.ImagenetEval(16, MEAN, STD, crop_fraction=16 / 18).map({"image": image, "label": 7})
  expected = (image[top:top + 16, left:left + 16] / 255.0 - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(out["image"], expected, atol=1e-6)
  assert out["label"] == 7 and out["label"].dtype == np.int32


def test_random_resized_crop_boxes_respect_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, crop_height, crop_width = transforms.random_resized_crop_box(100, 160, rng)
    assert 0 <= top and top + crop_height <= 100 and 0 <= left and left + crop_width <= 160
    assert 0.075 <= crop_height * crop_width / 16000 <= 1.0
    assert 3 / 4 - 0.05 <= crop_width / crop_height <= 4 / 3 + 0.05
  # A strip too wide for any crop of ratio <= 4/3 with area >= 0.5 falls back to the central 4:3 crop.
  assert transforms.random_resized_crop_box(10, 200, rng, scale=(0.5, 1.0)) == (0, 93, 10, 13)


def test_imagenet_training_is_seeded_and_resumable(tmp_path):
  with tfds.testing.mock_data(num_examples=24):
    config = imagenet_config(tmp_path)
    ds = data.build_image_dataset(config, "train", batch_size=4, seed=11, train=True)
    first = take(iter(ds), 8)  # crosses into the second epoch
    assert_same_batches(first, take(iter(data.build_image_dataset(config, "train", batch_size=4, seed=11,
                                                                  train=True)), 8))
    other = take(iter(data.build_image_dataset(config, "train", batch_size=4, seed=12, train=True)), 2)
    assert any(not np.array_equal(a["label"], b["label"]) for a, b in zip(first, other))
    iterator = iter(ds)
    take(iterator, 3)
    state = data.iterator_state(iterator)
    expected = take(iterator, 3)
    assert_same_batches(take(data.restore_iterator(iter(ds), state), 3), expected)


def test_missing_imagenet_explains_how_to_prepare_it(tmp_path):
  with pytest.raises(data.DataNotPreparedError) as error:
    data.build_image_dataset(imagenet_config(tmp_path), "train", batch_size=4, seed=0, train=True)
  message = str(error.value)
  assert f"{tmp_path}/downloads/manual/" in message
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path} --file_format=array_record" in message
  assert "pip install tensorflow" in message
  for line in tfds.builder_cls("imagenet2012").MANUAL_DOWNLOAD_INSTRUCTIONS.strip().splitlines():
    assert line.strip() in message  # tfds' own instructions quoted verbatim
  assert isinstance(error.value, FileNotFoundError)
