"""Routing analysis: the class x expert matrix, load, specialisation score and routing degree against numbers
worked by hand; the layer advice; patch majority labels; scripts/analyze_routing.py on a freshly trained workdir."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from vimoe.analysis import routing

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A hand-made routing log: 2 classes, 2 experts, 8 units plus one unit labelled -1 (ignored).
#   class 0 -> experts 0, 0, 0, 1      class 1 -> experts 1, 1, 1, 1      (label -1 -> expert 0)
LABELS = [0, 0, 0, 0, 1, 1, 1, 1, -1]
EXPERTS = [0, 0, 0, 1, 1, 1, 1, 1, 0]


def test_matrix_and_load_by_hand():
  counts = routing.routing_matrix(LABELS, EXPERTS, num_classes=2, num_experts=2)
  # counts: class 0 has 3 units on expert 0 and 1 on expert 1; class 1 has 4 on expert 1; the -1 unit is skipped.
  np.testing.assert_array_equal(counts, [[3, 1], [0, 4]])
  # P(expert | class): rows divided by 4 and 4.
  np.testing.assert_allclose(routing.row_normalize(counts), [[0.75, 0.25], [0.0, 1.0]])
  # Load: expert 0 gets 3 of 8 units, expert 1 gets 5 of 8.
  np.testing.assert_allclose(routing.expert_load(counts), [3 / 8, 5 / 8])
  # A class with no units keeps a zero row; a third class and a third expert extend the matrix.
  counts3 = routing.routing_matrix([0, 2, 2], [2, 0, 1], num_classes=3, num_experts=3)
  np.testing.assert_array_equal(counts3, [[0, 0, 1], [0, 0, 0], [1, 1, 0]])
  np.testing.assert_allclose(routing.row_normalize(counts3), [[0, 0, 1], [0, 0, 0], [0.5, 0.5, 0]])


def test_specialisation_in_between_by_hand():
  counts = routing.routing_matrix(LABELS, EXPERTS, num_classes=2, num_experts=2)
  # H(E)   = -(3/8 log2 3/8 + 5/8 log2 5/8)                    = 0.5306 + 0.4238 = 0.954434
  # H(E|C) = P(c=0) H(3/4, 1/4) + P(c=1) H(0, 1) = 0.5 * 0.811278 + 0.5 * 0 = 0.405639
  # S      = 1 - 0.405639 / 0.954434                           = 0.574995
  entropies = routing.routing_entropies(counts)
  assert entropies["expert_entropy"] == pytest.approx(0.954434, abs=1e-6)
  assert entropies["conditional_entropy"] == pytest.approx(0.405639, abs=1e-6)
  assert entropies["mutual_information"] == pytest.approx(0.954434 - 0.405639, abs=1e-6)
  assert routing.specialization_score(counts) == pytest.approx(0.574995, abs=1e-6)


def test_specialisation_zero_and_one():
  # Class-independent: both classes split 2/2 over the two experts -> H(E|C) = H(E) = 1 bit, S = 0.
  independent = routing.routing_matrix([0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0, 1, 0], 2, 2)
  np.testing.assert_array_equal(independent, [[2, 2], [2, 2]])
  assert routing.specialization_score(independent) == pytest.approx(0.0, abs=1e-12)
  # Proportional but unequal rows are class-independent too: P(E|c) = (1/4, 3/4) for both classes.
  assert routing.specialization_score([[1, 3], [2, 6]]) == pytest.approx(0.0, abs=1e-12)
  # Each class to one expert, experts not all the same -> H(E|C) = 0, S = 1 (classes 1 and 2 may share expert 1).
  assert routing.specialization_score([[5, 0], [0, 2], [0, 3]]) == pytest.approx(1.0)
  assert routing.specialization_score(np.eye(4) * 7) == pytest.approx(1.0)
  # Everything on one expert: no routing decision to explain, S = 0 by definition.
  assert routing.specialization_score([[4, 0], [3, 0]]) == 0.0
  # A shuffled-label baseline of the in-between log lies well below its S.
  chance = routing.chance_specialization(LABELS, EXPERTS, 2, 2, shuffles=50)
  assert 0.0 <= chance < 0.5


def test_routing_degree():
  assert routing.routing_degree(8, 1, 2) == 64        # C(8,1)^2: the quickstart's last:2
  assert routing.routing_degree(8, 1, 6) == 262144    # 8^6
  assert routing.routing_degree(8, 2, 1) == 28        # C(8,2) = 8*7/2
  assert routing.routing_degree(16, 2, 2) == 14400    # C(16,2)^2 = 120^2
  assert routing.routing_degree(8, 1, 0) == 1         # a dense model has one path
  with pytest.raises(ValueError, match=r"k=3 must be <= num_experts=2"):
    routing.routing_degree(2, 3, 1)


def test_recommendation_keeps_specialised_layers():
  advice = routing.recommend_layers({"block3": 0.04, "block4": 0.35, "block5": 0.6}, num_experts=8, depth=6)
  # threshold = max(0.1, 0.5 * 0.6) = 0.3: blocks 4 and 5 stay MoE, the last 2 blocks -> last:2, D = 8^2 = 64.
  assert advice["keep"] == ["block4", "block5"] and advice["drop"] == ["block3"]
  assert advice["moe_layers"] == "last:2" and advice["routing_degree"] == 64
  assert "last:2" in advice["text"] and "block3" in advice["text"]
  scattered = routing.recommend_layers({"block1": 0.5, "block3": 0.1, "block5": 0.6}, num_experts=8, depth=6)
  assert scattered["moe_layers"] == "1,5"
  none = routing.recommend_layers({"block5": 0.02}, num_experts=8, depth=6)
  assert none["keep"] == [] and "No layer" in none["text"]
  # A score less than twice its shuffled-label score is not kept: block4 (0.35 < 2 * 0.2) drops out.
  noisy = routing.recommend_layers({"block4": 0.35, "block5": 0.6}, num_experts=8, depth=6,
                                   chance={"block4": 0.2, "block5": 0.05})
  assert noisy["keep"] == ["block5"] and noisy["moe_layers"] == "last:1"


def test_analyze_and_log_round_trip(tmp_path):
  log = routing.RoutingLog(labels=LABELS, choices={"block5": EXPERTS, "block4": [0, 1] * 4 + [1]}, num_classes=2,
                           num_experts=2, depth=6)
  analysis = routing.analyze(log)
  assert list(analysis["layers"]) == ["block4", "block5"] and analysis["num_units"] == 8
  assert analysis["layers"]["block5"]["l"] == 1 and analysis["layers"]["block4"]["l"] == 2
  assert analysis["layers"]["block5"]["specialization"] == pytest.approx(0.574995, abs=1e-6)
  assert analysis["layers"]["block4"]["specialization"] == pytest.approx(0.0, abs=1e-12)
  assert analysis["routing_degree"] == 4  # C(2,1)^2
  assert analysis["recommendation"]["moe_layers"] == "last:1"
  json.dumps(analysis)  # JSON-ready
  loaded = routing.RoutingLog.load(log.save(tmp_path / "log.npz"))
  np.testing.assert_array_equal(loaded.labels, log.labels)
  np.testing.assert_array_equal(loaded.choices["block5"], log.choices["block5"])
  assert (loaded.num_classes, loaded.num_experts, loaded.depth) == (2, 2, 6)
  with pytest.raises(ValueError, match=r"choices\['block5'\] holds experts outside \[0, 1\]"):
    routing.RoutingLog(labels=[0], choices={"block5": [2]}, num_classes=1, num_experts=2)


def test_patch_majority_labels():
  labels = np.array([[[0, 0, 1, 1],
                      [0, 2, 1, -1],
                      [-1, -1, 3, 3],
                      [-1, -1, 3, 2]]])
  # 2x2 patches: top-left {0,0,0,2} -> 0; top-right {1,1,1,-1} -> 1; bottom-left all -1 -> -1;
  # bottom-right {3,3,3,2} -> 3.
  np.testing.assert_array_equal(routing.patch_majority_labels(labels, 2, (2, 2)), [[[0, 1], [-1, 3]]])
  # 3x3 pixels on a 2x2 grid of 2-pixel patches: one row/column of -1 padding after (centre padding 0 before,
  # 1 after). Patches: {5,5,5,6} -> 5; {7,-1,7,-1} -> 7; {6,6,-1,-1} -> 6; {4} -> 4. Ties go to the lower class.
  small = np.array([[[5, 5, 7], [5, 6, 7], [6, 6, 4]]])
  np.testing.assert_array_equal(routing.patch_majority_labels(small, 2, (2, 2)), [[[5, 7], [6, 4]]])
  tie = np.array([[[2, 1], [1, 2]]])
  np.testing.assert_array_equal(routing.patch_majority_labels(tie, 2, (1, 1)), [[[1]]])


def test_analyze_routing_script_on_a_trained_workdir(tmp_path, subprocess_env):
  from tests.test_trainer import TINY
  workdir = tmp_path / "run"
  env = subprocess_env
  train = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.py"),
           "--workdir", str(workdir), "--config.total_steps=3", "--config.eval_every=3", "--config.checkpoint_every=3",
           *TINY]
  subprocess.run(train, check=True, capture_output=True, timeout=300, env=env)
  result = subprocess.run([sys.executable, str(ROOT / "scripts" / "analyze_routing.py"), "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Suggested model.moe.layers=" in result.stdout or "No layer's routing specialises" in result.stdout
  analysis = json.loads((workdir / "routing_analysis.json").read_text())
  # The tiny quickstart: depth 2, last:2 -> blocks 0 and 1, 8 experts top-1, routing per image;
  # the held-out digits are 355 images (20% of 1797, rounded up).
  assert analysis["moe_blocks"] == [0, 1] and analysis["routing_degree"] == 64
  assert analysis["units"] == "image" and analysis["num_units"] == 355 and analysis["step"] == 3
  for name in ("block0", "block1"):
    layer = analysis["layers"][name]
    counts = np.asarray(layer["counts"])
    assert counts.shape == (10, 8) and counts.sum() == 355
    np.testing.assert_allclose(layer["expert_load"], counts.sum(0) / 355)
    np.testing.assert_allclose(np.asarray(layer["matrix"]).sum(1), 1.0)
    # S recomputed from the counts with the textbook mutual information I(C; E) = sum p(c,e) log2 p(c,e)/p(c)p(e).
    joint = counts / counts.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    mutual = np.sum(joint[joint > 0] * np.log2(joint[joint > 0] / outer[joint > 0]))
    marginal = joint.sum(0)
    expert_entropy = -np.sum(marginal[marginal > 0] * np.log2(marginal[marginal > 0]))
    # H(expert) = 0 (every image on one expert, common after 3 steps) comes out as ~1e-16 in floating point:
    # S is defined as 0 there.
    expected = mutual / expert_entropy if expert_entropy > 1e-12 else 0.0
    assert layer["specialization"] == pytest.approx(expected, abs=1e-9)
    assert (workdir / f"routing_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (workdir / "routing_all.png").exists() and (workdir / "routing_load.png").exists()
  log = routing.RoutingLog.load(workdir / "routing_log.npz")
  assert log.labels.shape == (355,) and math.isclose(np.bincount(log.labels).sum(), 355)
