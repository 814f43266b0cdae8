"""Segmentation: mIoU against a NumPy loop over classes, the sliding window's coverage, the heads, the digit
canvases, the ADE20K pipelines (tfds mock data and an ADEChallengeData2016-shaped directory), and resume."""

import json
import os
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from vimoe.data import segmentation as seg_data
from vimoe.models import segmentation as seg_models
from vimoe.train import segmentation as seg_task

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------------------------

def numpy_iou_loop(predictions, labels, num_classes):
  """Per-class IoU over labelled pixels, one class at a time; NaN where the class is in neither."""
  valid = labels >= 0
  ious = []
  for c in range(num_classes):
    intersection = np.sum((predictions == c) & (labels == c) & valid)
    union = np.sum(((predictions == c) | (labels == c)) & valid)
    ious.append(intersection / union if union else np.nan)
  return np.array(ious), np.sum((predictions == labels) & valid) / np.sum(valid)


def test_miou_worked_by_hand():
  # labels  [[0, 0, 1], [1, -1, 2]]   predictions [[0, 1, 1], [1, 2, 0]]   (one ignored pixel)
  # class 0: TP 1, union {(0,0),(0,1),(1,2)} = 3 -> 1/3; class 1: TP 2, union 3 -> 2/3; class 2: TP 0, union 1
  # (the pixel predicted 2 is ignored, so only (1,2)) -> 0; class 3 absent -> excluded. mIoU = (1/3+2/3+0)/3 = 1/3.
  labels = jnp.array([[0, 0, 1], [1, -1, 2]])
  predictions = jnp.array([[0, 1, 1], [1, 2, 0]])
  scores = seg_task.segmentation_metrics(seg_task.confusion_matrix(predictions, labels, 4))
  np.testing.assert_allclose(scores["iou_per_class"][:3], [1 / 3, 2 / 3, 0.0])
  assert np.isnan(scores["iou_per_class"][3])
  assert scores["miou"] == pytest.approx(1 / 3)
  assert scores["pixel_accuracy"] == pytest.approx(3 / 5)


def test_miou_matches_numpy_loop_with_ignored_and_absent_classes():
  rng = np.random.default_rng(0)
  num_classes = 7
  labels = rng.integers(-1, 5, size=(2, 3, 17, 19))          # classes 5, 6 never labelled; -1 ignored
  predictions = rng.integers(0, 6, size=labels.shape)         # class 6 never predicted either
  predictions[labels == 2] = 2                                # one class predicted perfectly
  confusion = sum(np.asarray(seg_task.confusion_matrix(jnp.asarray(p), jnp.asarray(l), num_classes))
                  for p, l in zip(predictions, labels))       # accumulated over two batches
  scores = seg_task.segmentation_metrics(confusion)
  expected_iou, expected_accuracy = numpy_iou_loop(predictions, labels, num_classes)
  np.testing.assert_allclose(scores["iou_per_class"], expected_iou, rtol=1e-12)
  assert np.isnan(scores["iou_per_class"][6]) and not np.isnan(scores["iou_per_class"][5])  # 5: predicted only
  assert scores["iou_per_class"][5] == 0.0
  assert scores["miou"] == pytest.approx(np.nanmean(expected_iou))
  assert scores["pixel_accuracy"] == pytest.approx(expected_accuracy)
  assert confusion.sum() == np.sum(labels >= 0)


# ----------------------------------------------------------------------------------------------------------------
# Sliding window
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,crop,stride", [(10, 4, 3), (9, 4, 4), (8, 8, 5), (5, 8, 3), (23, 7, 2)])
def test_window_starts_cover_the_side(size, crop, stride):
  starts = seg_models.window_starts(size, crop, stride)
  covered = np.zeros(size, int)
  for start in starts:
    covered[start:start + crop] += 1
  assert covered.min() >= 1
  assert starts[-1] + min(crop, size) == size and starts == sorted(set(starts))
  assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("shape,crop,stride", [((13, 17), 6, 4), ((12, 12), 12, 8), ((9, 20), (9, 8), (5, 5))])
def test_sliding_window_averages_each_pixel_over_exactly_its_windows(shape, crop, stride):
  H, W = shape
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(2, H, W, 3)).astype(np.float32))
  calls = []

  def apply_fn(window):  # logits = the pixel's own channels + a per-window offset (the window's number)
    calls.append(window.shape)
    offset = float(len(calls))
    return window[..., :2] + offset, {"metrics": {"x": jnp.asarray(offset)}}

  logits, aux = seg_models.sliding_window_logits(apply_fn, images, crop, stride)
  # Independent expectation: the mean over windows containing the pixel of (pixel + window number).
  crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
  stride_h, stride_w = (stride, stride) if isinstance(stride, int) else stride
  offsets_sum, counts, number = np.zeros((H, W)), np.zeros((H, W)), 0
  for top in seg_models.window_starts(H, crop_h, stride_h):
    for left in seg_models.window_starts(W, crop_w, stride_w):
      number += 1
      offsets_sum[top:top + crop_h, left:left + crop_w] += number
      counts[top:top + crop_h, left:left + crop_w] += 1
  assert counts.min() >= 1 and number == len(calls)
  expected = np.asarray(images[..., :2]) + (offsets_sum / counts)[None, :, :, None]
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
  assert float(aux["metrics"]["x"]) == pytest.approx((number + 1) / 2)  # metrics averaged over windows


# ----------------------------------------------------------------------------------------------------------------
# Model and heads
# ----------------------------------------------------------------------------------------------------------------

def tiny_model_config(kind="linear", **overrides):
  from configs.seg_quickstart import get_config
  config = get_config().model
  config.update(dim=32, depth=4, num_heads=2, mlp_dim=64, image_size=16)
  config.head.kind = kind
  if kind == "segmenter":
    config.head.update(dim=32, depth=1, num_heads=2, mlp_dim=64)
  config.update(overrides)
  return config


@pytest.mark.parametrize("kind", seg_models.HEADS)
def test_heads_give_full_resolution_logits_for_any_image_size(kind):
  model = seg_models.build_segmenter(tiny_model_config(kind), rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 18, 22, 3)).astype(np.float32))  # not /4
  logits, aux = nnx.jit(lambda m, x: m(x, deterministic=True, return_routing=True))(model, images)
  assert logits.shape == (2, 18, 22, 11) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  # 18 -> padded 20 (1 each side), 22 -> 24: 5 x 6 patches; token routing gives one expert per patch.
  assert set(aux["expert_maps"]) == {"block2", "block3"}
  for choice in aux["expert_maps"].values():
    assert choice.shape == (2, 5, 6) and choice.min() >= 0 and choice.max() < 8


def test_linear_head_and_upsampling_match_torch():
  torch = pytest.importorskip("torch")
  model = seg_models.build_segmenter(tiny_model_config("linear", moe={"layers": "none"}), rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32))
  # Non-trivial running statistics and affine parameters for the batch norm.
  rng = np.random.default_rng(3)
  norm = model.head.norm
  norm.mean[...] = jnp.asarray(rng.normal(size=32).astype(np.float32))
  norm.var[...] = jnp.asarray(rng.uniform(0.5, 2, size=32).astype(np.float32))
  norm.scale[...] = jnp.asarray(rng.normal(size=32).astype(np.float32))
  norm.bias[...] = jnp.asarray(rng.normal(size=32).astype(np.float32))
  logits, _ = nnx.jit(lambda m, x: m(x, deterministic=True))(model, images)
  tokens = np.asarray(nnx.jit(lambda m, x: m.backbone.features(x))(model, images))[:, 1:].reshape(2, 4, 4, 32)
  bn = torch.nn.BatchNorm2d(32, eps=1e-5).eval()
  conv = torch.nn.Conv2d(32, 11, 1)
  with torch.no_grad():
    bn.running_mean.copy_(torch.tensor(np.asarray(norm.mean[...])))
    bn.running_var.copy_(torch.tensor(np.asarray(norm.var[...])))
    bn.weight.copy_(torch.tensor(np.asarray(norm.scale[...])))
    bn.bias.copy_(torch.tensor(np.asarray(norm.bias[...])))
    conv.weight.copy_(torch.tensor(np.asarray(model.head.classifier.kernel[...]).T[:, :, None, None]))
    conv.bias.copy_(torch.tensor(np.asarray(model.head.classifier.bias[...])))
    x = torch.tensor(tokens).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(conv(bn(x)), size=(16, 16), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(np.asarray(logits), expected.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)


def test_linear4_concatenates_the_last_four_blocks():
  model = seg_models.build_segmenter(tiny_model_config("linear4", depth=5, moe={"layers": "none"}),
                                     rngs=nnx.Rngs(0))
  assert model.feature_layers == (1, 2, 3, 4)
  assert model.head.norm.mean[...].shape == (4 * 32,)


def test_frozen_backbone_gets_no_update():
  from configs.seg_quickstart import get_config
  from vimoe.train import trainer
  config = get_config()
  config.model.update(dim=32, depth=2, num_heads=2, mlp_dim=64)
  config.model.head.freeze_backbone = True
  config.batch_size = 4
  config.optim.warmup_steps = 0  # the warmup starts at lr 0: the first update would change nothing
  task, model, optimizer = trainer.build(config)
  before = jax.tree.map(np.asarray, nnx.state(model.backbone, nnx.Param))
  head_before = np.asarray(model.head.classifier.kernel[...])
  batch = next(iter(task.build_data(config, "train", train=True, seed=0, batch_size=4)))
  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: task.loss(m, batch, config)[0], argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  after = jax.tree.map(np.asarray, nnx.state(model.backbone, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert not np.array_equal(head_before, np.asarray(model.head.classifier.kernel[...]))


def test_head_config_errors_name_the_key():
  with pytest.raises(ValueError, match=r"model\.head\.kind='fpn'"):
    seg_models.build_segmenter(tiny_model_config("fpn"))
  config = tiny_model_config()
  config.head.unlock()
  config.head.depthh = 2
  with pytest.raises(ValueError, match=r"model\.head\.depthh"):
    seg_models.build_segmenter(config)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

CANVAS = dict(name="digit_canvas", canvas_size=36, digit_size=12, digits_per_canvas=(2, 3))


def _first(config, split, train, seed=0, batch_size=8):
  return next(iter(seg_data.build_segmentation_dataset(config, split, batch_size=batch_size, seed=seed, train=train,
                                                       process_index=0, process_count=1)))


def test_digit_canvas_labels_follow_the_ink():
  batch = _first(CANVAS, "train", True)
  assert batch["image"].shape == (8, 36, 36, 3) and batch["label"].shape == (8, 36, 36)
  grey = batch["image"][..., 0] * 0.5 + 0.5                   # undo the (0.5, 0.5) normalisation
  np.testing.assert_array_equal(batch["label"] > 0, grey > 0.25)
  assert batch["label"].min() >= 0 and batch["label"].max() <= 10
  for canvas in batch["label"]:
    assert 2 <= len(np.unique(canvas)) <= 4                  # background + 1..3 digit classes


def test_digit_canvas_eval_set_is_fixed_and_training_follows_the_seed():
  a, b = _first(CANVAS, "test", False, seed=0), _first(CANVAS, "test", False, seed=7)
  np.testing.assert_array_equal(a["label"], b["label"])
  t0, t1 = _first(CANVAS, "train", True, seed=0), _first(CANVAS, "train", True, seed=1)
  assert not np.array_equal(t0["label"], t1["label"])
  np.testing.assert_array_equal(t0["label"], _first(CANVAS, "train", True, seed=0)["label"])
  # The held-out canvases only use held-out digits: every canvas digit equals some test digit exactly.
  from vimoe.data import digits
  test_digits, _ = digits.load_split("test", 12)
  grey = a["image"][0, ..., 0] * 0.5 + 0.5
  rows, cols = np.nonzero(grey > 0.25)
  found = any(np.allclose(grey[r:r + 12, c:c + 12], d, atol=1e-6) for d in test_digits
              for r in range(max(rows.min() - 11, 0), rows.min() + 1) for c in range(max(cols.min() - 11, 0), 36 - 11))
  assert found


def test_compose_canvas_places_digits_without_overlap():
  pool = np.ones((5, 4, 4), np.float32)
  rng = np.random.default_rng(0)
  grey, label = seg_data.compose_canvas(pool, np.arange(5), rng, canvas_size=12, digits_per_canvas=(3, 3),
                                        ink_threshold=0.5)
  assert grey.sum() == 3 * 16 and (label > 0).sum() == 3 * 16  # three whole, disjoint squares


def test_annotation_to_label_ignores_other_and_never_invents_classes():
  annotation = np.array([[0, 1, 1], [150, 7, 200]], np.uint8)
  np.testing.assert_array_equal(seg_data.annotation_to_label(annotation, 2, 3), [[-1, 0, 0], [149, 6, -1]])
  rgb = np.stack([annotation, annotation + 5, annotation * 0], axis=-1)  # tfds: red channel is the class
  np.testing.assert_array_equal(seg_data.annotation_to_label(rgb, 2, 3), [[-1, 0, 0], [149, 6, -1]])
  resized = seg_data.annotation_to_label(annotation, 5, 7)
  assert set(np.unique(resized)) <= {-1, 0, 149, 6}


ADE = dict(crop_size=32, eval_pad_multiple=16)


def test_scene_parse150_pipeline_on_tfds_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  config = dict(name="scene_parse150", **ADE)
  with tfds.testing.mock_data(num_examples=4):
    source = seg_data.open_scene_parse150("test", None)
    raw = [source[i] for i in range(len(source))]
    train = _first(config, "train", True, batch_size=2)
    evaluation = list(seg_data.build_segmentation_dataset(config, "test", batch_size=1, seed=0, train=False,
                                                          process_index=0, process_count=1))
    with pytest.raises(ValueError, match="eval batch size 2"):
      _first(config, "test", False, batch_size=2)
  assert train["image"].shape == (2, 32, 32, 3) and train["label"].shape == (2, 32, 32)
  assert train["label"].min() >= -1 and train["label"].max() <= 149
  assert len(evaluation) == 4
  for batch, element in zip(evaluation, raw):
    height, width = element["image"].shape[:2]  # the mock's annotation has another size: resized to the image
    padded_h, padded_w = batch["label"].shape[1:]
    assert padded_h == max(32, -(-height // 16) * 16) and padded_w == max(32, -(-width // 16) * 16)
    expected = seg_data.annotation_to_label(element["annotation"], height, width)
    np.testing.assert_array_equal(batch["label"][0, :height, :width], expected)
    assert np.all(batch["label"][0, height:] == -1) and np.all(batch["label"][0, :, width:] == -1)
    np.testing.assert_allclose(batch["image"][0, :height, :width] * np.array(seg_data.transforms.IMAGENET_STD)
                               + np.array(seg_data.transforms.IMAGENET_MEAN),
                               element["image"] / 255.0, atol=1e-5)


def _fake_ade20k(root: pathlib.Path, count=3):
  rng = np.random.default_rng(0)
  for split in ("training", "validation"):
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for i in range(count):
      height, width = 40 + 7 * i, 50 - 5 * i
      Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
          root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
      Image.fromarray(rng.integers(0, 151, (height, width), dtype=np.uint8)).save(
          root / "annotations" / split / f"ADE_{split}_{i:08d}.png")


def test_ade20k_directory_pipeline(tmp_path):
  _fake_ade20k(tmp_path / "ADEChallengeData2016")
  config = dict(name="ade20k", data_dir=str(tmp_path / "ADEChallengeData2016"), **ADE)
  assert seg_data.num_examples(config, "validation") == 3
  train = _first(config, "train", True, batch_size=2)
  assert train["image"].shape == (2, 32, 32, 3)
  assert set(np.unique(train["label"])) <= set(range(-1, 150))
  evaluation = list(seg_data.build_segmentation_dataset(config, "validation", batch_size=1, seed=0, train=False,
                                                        process_index=0, process_count=1))
  annotation = np.asarray(Image.open(sorted((tmp_path / "ADEChallengeData2016" / "annotations" / "validation")
                                            .iterdir())[1]))
  height, width = annotation.shape
  np.testing.assert_array_equal(evaluation[1]["label"][0, :height, :width], annotation.astype(np.int32) - 1)
  assert evaluation[1]["label"].shape[1:] == (48, 48)


def test_missing_ade20k_explains_how_to_prepare(tmp_path):
  with pytest.raises(seg_data.DataNotPreparedError, match="ADEChallengeData2016.zip"):
    _first(dict(name="ade20k", data_dir=str(tmp_path)), "train", True)
  with pytest.raises(ValueError, match=r"data\.crop_sise"):
    _first(dict(name="ade20k", crop_sise=3), "train", True)


# ----------------------------------------------------------------------------------------------------------------
# Training: resume, per-class IoU, expert maps
# ----------------------------------------------------------------------------------------------------------------

def tiny_train_config(total_steps):
  from configs.seg_quickstart import get_config
  config = get_config()
  config.model.update(dim=32, depth=2, num_heads=2, mlp_dim=64, image_size=36)
  config.data.update(canvas_size=36, digit_size=12, crop_size=36, num_eval_canvases=20)
  config.batch_size, config.eval_batch_size = 8, 20
  config.total_steps = total_steps
  config.update(checkpoint_every=3, eval_every=total_steps, log_every=1)
  config.optim.warmup_steps = 1
  return config


def test_segmentation_training_resumes_and_writes_miou_and_expert_maps(tmp_path):
  from vimoe.train import trainer
  config = tiny_train_config(6)
  final = trainer.train_and_evaluate(config, tmp_path)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines[-1]["eval/miou"] == pytest.approx(final["eval/miou"]) and 0 <= final["eval/miou"] <= 1
  assert len(final["eval/iou_per_class"]) == 11
  per_class = json.loads((tmp_path / "per_class_iou.json").read_text())
  assert per_class["step"] == 6 and per_class["miou"] == pytest.approx(final["eval/miou"])
  assert (tmp_path / "expert_maps.png").stat().st_size > 10_000
  # Drop the last checkpoint: the rerun resumes at step 3 and must redo steps 4-6 exactly.
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  again = trainer.train_and_evaluate(config, tmp_path)
  relines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in relines] == [m["step"] for m in lines]
  for a, b in zip(lines, relines):
    for key in a:
      if key != "train/examples_per_sec":
        np.testing.assert_allclose(np.asarray(a[key], float), np.asarray(b[key], float), rtol=1e-5, atol=1e-6,
                                   err_msg=f"step {a['step']} {key}")
  assert again["eval/miou"] == pytest.approx(final["eval/miou"])


# ----------------------------------------------------------------------------------------------------------------
# scripts/seg_patch_oracle.py
# ----------------------------------------------------------------------------------------------------------------

def test_patch_oracle_against_hand_worked_maps():
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
  import seg_patch_oracle
  # Every 2x2 patch uniform: the upsampled histograms put 0.75 of each pixel's weight on its own patch -> exact.
  blocks = np.array([[0, 1], [2, 0]])
  uniform = np.kron(blocks, np.ones((2, 2), np.int64))[None]
  metrics = seg_patch_oracle.oracle_miou(uniform, patch=2, num_classes=3)
  assert metrics["miou"] == 1.0 and metrics["pixel_accuracy"] == 1.0
  # One pixel of class 1 in a 4x4 background: its patch's histogram is 3/4 background, so every pixel is predicted
  # background: IoU(background) = 15/16, IoU(class 1) = 0, mIoU = 15/32.
  island = np.zeros((1, 4, 4), np.int64)
  island[0, 0, 0] = 1
  metrics = seg_patch_oracle.oracle_miou(island, patch=2, num_classes=2)
  np.testing.assert_allclose(metrics["iou_per_class"], [15 / 16, 0.0])
  assert metrics["miou"] == pytest.approx(15 / 32) and metrics["pixel_accuracy"] == pytest.approx(15 / 16)
  with pytest.raises(ValueError, match="5x4 pixels are not a whole number of 2x2 patches"):
    seg_patch_oracle.oracle_miou(np.zeros((1, 5, 4), np.int64), patch=2, num_classes=2)
