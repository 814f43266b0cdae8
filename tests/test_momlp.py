"""scripts/momlp_approximation.py: target Lipschitz bounds, loaded-parameter accounting, the reported errors against
a NumPy recomputation, and the --small sweep end to end."""

import csv
import math
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import momlp_approximation as momlp  # noqa: E402


@pytest.fixture(scope="module")
def layer():
  """One fixed, untrained model (n = 2, E = 4, H = 5, prelu), built once: construction compiles for seconds."""
  return momlp.build_model(2, 5, 4, "prelu", momlp.kmeans_prototypes(2, 4, 0), 0)


def _random_pairs(dim, rng):
  """Far pairs (independent uniform points) and near pairs (steps of about 1e-3), both inside [0,1]^n."""
  x = rng.uniform(size=(4000, dim))
  far = rng.uniform(size=(2000, dim))
  near = np.clip(x[2000:] + rng.normal(scale=1e-3, size=(2000, dim)), 0.0, 1.0)
  return x, np.concatenate([far, near])


@pytest.mark.parametrize("target", sorted(momlp.TARGETS))
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_lipschitz_bound_holds_on_random_pairs(target, dim):
  rng = np.random.default_rng(dim)
  x, y = _random_pairs(dim, rng)
  f = momlp.TARGETS[target]
  lipschitz = momlp.lipschitz_constant(target, dim)
  change = np.abs(np.asarray(f(x.astype(np.float32)), np.float64) - np.asarray(f(y.astype(np.float32)), np.float64))
  distance = np.linalg.norm(x - y, axis=1)
  # 1e-5 covers float32 rounding of f (values of order 1) on the near pairs.
  assert np.all(change <= lipschitz * distance + 1e-5), np.max(change - lipschitz * distance)


def test_lipschitz_constants_are_tight():
  """Pairs where the bound is reached, worked by hand: it is the constant, not just a bound."""
  # abs_sine, n=2: next to the origin f(t, t) = |sin(4 pi t)| = sin(4 pi t), slope 4 pi cos(0) = 4 pi per unit of
  # t, and ||(t, t)|| = sqrt(2) t, so the ratio tends to 4 pi / sqrt(2) = 8.8858 as t -> 0.
  assert momlp.lipschitz_constant("abs_sine", 2) == pytest.approx(8.8858, abs=1e-4)
  a, b = np.array([[0.0, 0.0]], np.float32), np.array([[1e-3, 1e-3]], np.float32)
  ratio = abs(float(momlp.abs_sine(b)[0] - momlp.abs_sine(a)[0])) / (math.sqrt(2) * 1e-3)
  assert ratio == pytest.approx(8.8858, rel=1e-3)
  # distance, n=3: moving straight away from a point of S, alone nearest, changes f by the distance moved.
  center = momlp.distance_centers(3)[0]
  others = np.delete(momlp.distance_centers(3), 0, axis=0)
  assert np.min(np.linalg.norm(others - center, axis=1)) > 0.02
  direction = np.array([1.0, 0.0, 0.0])
  a, b = (center + 0.002 * direction)[None], (center + 0.008 * direction)[None]
  change = float(momlp.set_distance(b.astype(np.float32))[0] - momlp.set_distance(a.astype(np.float32))[0])
  assert change == pytest.approx(0.006, rel=1e-3)


def test_parameter_accounting_matches_a_count_by_hand(layer):
  # n = 2, H = 5, E = 4, prelu. One expert: w_in 2*5 = 10, b_in 5, w_out 5*2 = 10, b_out 2, slope 5 -> 32.
  # Router: 4 prototypes of 2 numbers -> 8. Loaded = 32 + 8 = 40; total = 4*32 + 8 = 136.
  assert momlp.expert_parameter_count(2, 5, "prelu") == 32
  assert momlp.loaded_parameter_count(2, 5, 4, "prelu") == 40
  assert momlp.total_parameter_count(2, 5, 4, "prelu") == 136
  # relu has no slope: 32 - 5 = 27 per expert.
  assert momlp.expert_parameter_count(2, 5, "relu") == 27
  # The largest width within a budget: 40 fits H = 5 exactly, 39 only H = 4; 8 + 2 + 6 = 16 is H = 1.
  assert momlp.width_for_budget(40, 2, 4, "prelu") == 5
  assert momlp.width_for_budget(39, 2, 4, "prelu") == 4
  assert momlp.width_for_budget(16, 2, 4, "prelu") == 1
  assert momlp.width_for_budget(15, 2, 4, "prelu") == 0
  # The built model holds exactly the counted total.
  assert sum(leaf.size for leaf in jax.tree.leaves(nnx.state(layer, nnx.Param))) == 136


def _numpy_predictions(layer, points):
  """The MoMLP by hand in float64: (f_hat [N], cell [N]) with the cell the nearest prototype, f_hat that expert's
  PReLU MLP with its outputs summed."""
  prototypes = np.asarray(layer.router.kernel[...], np.float64).T                     # [E, n]
  w_in, b_in = np.asarray(layer.experts.w_in[...], np.float64), np.asarray(layer.experts.b_in[...], np.float64)
  w_out, b_out = np.asarray(layer.experts.w_out[...], np.float64), np.asarray(layer.experts.b_out[...], np.float64)
  slope = np.asarray(layer.experts.slope[...], np.float64)
  out, cells = np.zeros(len(points)), np.zeros(len(points), int)
  for i, x in enumerate(points.astype(np.float64)):
    distances = np.sum((prototypes - x) ** 2, axis=1)
    first, second = np.sort(distances)[:2]
    # float32 squared distances are good to about 1e-6 here; closer calls could route differently in the layer.
    assert second - first > 1e-5, "point on a cell boundary: float32 routing could differ; pick other points"
    e = cells[i] = int(np.argmin(distances))
    pre = x @ w_in[e] + b_in[e]
    hidden = np.where(pre >= 0, pre, slope[e] * pre)
    out[i] = np.sum(hidden @ w_out[e] + b_out[e])
  return out, cells


def test_reported_errors_equal_a_numpy_recomputation(layer):
  grid, random = momlp.evaluation_points(2, 300, 2)
  assert grid.shape == (17 * 17, 2) and random.shape == (300, 2)  # 17^2 = 289 <= 300 < 18^2
  reported = momlp.evaluate(layer, momlp.abs_sine, grid, random)
  f = lambda x: np.mean(np.abs(np.sin(4 * np.pi * x.astype(np.float64))), axis=1)   # the target, by hand
  points = np.concatenate([grid, random])
  prediction, cells = _numpy_predictions(layer, points)
  error = np.abs(prediction - f(points))
  assert reported["uniform_error"] == pytest.approx(error.max(), rel=1e-5)
  assert reported["l2_error"] == pytest.approx(np.sqrt(np.mean(error[len(grid):] ** 2)), rel=1e-5)
  cell_max = [error[cells == e].max() for e in range(4) if np.any(cells == e)]   # a loop over the cells
  assert reported["median_cell_error"] == pytest.approx(np.median(cell_max), rel=1e-5)


def test_small_mode_runs_end_to_end(tmp_path):
  momlp.main(["--small", "--output_dir", str(tmp_path)])
  with open(tmp_path / "momlp_results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["target"], int(r["num_experts"])) for r in rows] == [("abs_sine", 1), ("abs_sine", 4)]
  for r in rows:
    assert int(r["loaded_params"]) <= int(r["budget"])
    assert 0 < float(r["l2_error"]) <= float(r["uniform_error"]) < 10
  for name in ("momlp_results.md", "momlp_uniform_error_vs_experts.png", "momlp_uniform_error_vs_width.png"):
    assert (tmp_path / name).stat().st_size > 0
