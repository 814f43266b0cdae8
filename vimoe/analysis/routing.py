"""Routing analysis: which experts each class goes to, per MoE layer, and which MoE layers are worth keeping.

ViMoE (arXiv 2410.15732, sec. 4) looks at how images of each class are routed: in deep blocks the routing
specialises (a class goes to few experts, different classes to different experts), in shallow blocks it is
close to class-independent and only makes training less stable; so MoE belongs in the blocks whose routing
specialises. This module measures that from a *routing log*:

    labels   int [U]             the class of every routing unit (an image for route_per="item", a token or patch
                                 for route_per="token"; units labelled < 0 are ignored)
    choices  {"block{i}": [U]}   the first-choice expert of every unit in each MoE block

Pure NumPy functions on the log give, per layer, the class x expert count matrix `routing_matrix`, its
row-normalised form (P(expert | class)), the expert load (P(expert)) and the specialisation score

    S = I(class; expert) / H(expert) = 1 - H(expert | class) / H(expert)        (entropies in bits)

the fraction of the routing's entropy that the class explains (normalised mutual information). S = 0 when the
expert does not depend on the class (P(expert | class) = P(expert) for every class), S = 1 when every class goes to
a single expert and not all classes go to the same one; all units on one expert (H(expert) = 0) scores 0, there
being no routing decision to explain. On a finite sample S is biased upwards (about (C-1)(E-1) / (2 n ln 2 H)
for C classes, E experts, n units), so `analyze` also reports `chance_specialization`, S averaged over shuffles of
the labels. `recommend_layers` turns the scores into the paper's advice: keep MoE where the routing specialises,
use a dense MLP elsewhere. `routing_degree` is the paper's D = C(N, k)^L.

`routing_log` collects the log by running evaluation batches through a model: ViT.encode(...,
return_routing=True) for classification; for segmentation the Segmenter's expert maps, each patch labelled with
the majority label of its pixels (label -1 ignored). vimoe/train/workdir.py does that for a training workdir
(`analyze_workdir`, which scripts/analyze_routing.py runs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import numpy as np


@dataclasses.dataclass
class RoutingLog:
  """labels [U] int, choices {"block{i}": [U] int first-choice experts}; units with label < 0 are ignored."""
  labels: np.ndarray
  choices: dict[str, np.ndarray]
  num_classes: int
  num_experts: int
  k: int = 1
  depth: int | None = None    # blocks of the model (to number layers as ViMoE does, l = depth - index)
  units: str = "image"        # what a routing unit is: "image", "token" or "patch"

  def __post_init__(self):
    self.labels = np.asarray(self.labels, np.int64).reshape(-1)
    self.choices = {name: np.asarray(choice, np.int64).reshape(-1) for name, choice in self.choices.items()}
    for name, choice in self.choices.items():
      if choice.shape != self.labels.shape:
        raise ValueError(f"choices[{name!r}] has {choice.size} units, labels has {self.labels.size}")
      if choice.size and (choice.min() < 0 or choice.max() >= self.num_experts):
        raise ValueError(f"choices[{name!r}] holds experts outside [0, {self.num_experts - 1}] "
                         f"(num_experts={self.num_experts})")
    if self.labels.size and self.labels.max() >= self.num_classes:
      raise ValueError(f"labels hold class {self.labels.max()}, outside [0, {self.num_classes - 1}] "
                       f"(num_classes={self.num_classes})")

  def save(self, path) -> pathlib.Path:
    """An .npz holding the arrays and the sizes (reload with RoutingLog.load)."""
    path = pathlib.Path(path)
    meta = dict(num_classes=self.num_classes, num_experts=self.num_experts, k=self.k, depth=self.depth,
                units=self.units)
    np.savez_compressed(path, labels=self.labels, meta=json.dumps(meta),
                        **{f"choice_{name}": choice for name, choice in self.choices.items()})
    return path

  @classmethod
  def load(cls, path) -> "RoutingLog":
    with np.load(path) as data:
      meta = json.loads(str(data["meta"]))
      choices = {key[len("choice_"):]: data[key] for key in data.files if key.startswith("choice_")}
      return cls(labels=data["labels"], choices=choices, **meta)


def block_index(name: str) -> int:
  """'block7' -> 7."""
  match = re.fullmatch(r"block(\d+)", name)
  if not match:
    raise ValueError(f"routing layer name {name!r} is not of the form 'block<index>'")
  return int(match.group(1))


# Pure functions on a routing log

def routing_matrix(labels, experts, num_classes: int, num_experts: int) -> np.ndarray:
  """int64 [num_classes, num_experts]: entry (c, e) counts the units of class c whose first choice is e.
  Units with a negative label are skipped."""
  labels = np.asarray(labels, np.int64).reshape(-1)
  experts = np.asarray(experts, np.int64).reshape(-1)
  valid = labels >= 0
  flat = labels[valid] * num_experts + experts[valid]
  return np.bincount(flat, minlength=num_classes * num_experts).reshape(num_classes, num_experts)


def row_normalize(counts) -> np.ndarray:
  """P(expert | class): each row divided by its sum; rows of classes without units stay 0."""
  counts = np.asarray(counts, np.float64)
  totals = counts.sum(axis=1, keepdims=True)
  return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def expert_load(counts) -> np.ndarray:
  """P(expert): the fraction of units whose first choice is each expert (column sums of the count matrix)."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  return counts.sum(axis=0) / total if total else np.zeros(counts.shape[1])


def entropy_bits(probabilities) -> float:
  """H(p) = -sum p log2 p over the entries > 0."""
  p = np.asarray(probabilities, np.float64).reshape(-1)
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())


def routing_entropies(counts) -> dict:
  """Entropies in bits of the expert choice: H(expert), H(expert | class), their difference I(class; expert), and
  the specialisation score I / H(expert) (0 when H(expert) = 0)."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  if total == 0:
    return {"expert_entropy": 0.0, "conditional_entropy": 0.0, "mutual_information": 0.0, "specialization": 0.0}
  expert_entropy = entropy_bits(counts.sum(axis=0) / total)
  class_weights = counts.sum(axis=1) / total                          # P(class)
  conditional = sum(weight * entropy_bits(row) for weight, row in zip(class_weights, row_normalize(counts))
                    if weight > 0)                                    # H(expert | class) = sum_c P(c) H(E | c)
  mutual = max(expert_entropy - conditional, 0.0)
  score = mutual / expert_entropy if expert_entropy > 1e-12 else 0.0
  return {"expert_entropy": expert_entropy, "conditional_entropy": conditional, "mutual_information": mutual,
          "specialization": float(min(score, 1.0))}


def specialization_score(counts) -> float:
  """S = 1 - H(expert | class) / H(expert) for a class x expert count matrix (see the module docstring)."""
  return routing_entropies(counts)["specialization"]


def chance_specialization(labels, experts, num_classes: int, num_experts: int, *, shuffles: int = 20,
                          seed: int = 0) -> float:
  """Mean S after shuffling the labels across units: the score class-independent routing gets on this sample."""
  labels = np.asarray(labels, np.int64).reshape(-1)
  experts = np.asarray(experts, np.int64).reshape(-1)
  valid = labels >= 0
  labels, experts = labels[valid], experts[valid]
  rng = np.random.default_rng(seed)
  scores = [specialization_score(routing_matrix(rng.permutation(labels), experts, num_classes, num_experts))
            for _ in range(shuffles)]
  return float(np.mean(scores)) if scores else 0.0


def routing_degree(num_experts: int, k: int, num_layers: int) -> int:
  """ViMoE's routing degree D = C(N, k)^L: the number of expert paths a unit can take through L MoE blocks
  (N experts, top-k). The paper finds the good configurations near D = 32..64."""
  for name, value in (("num_experts", num_experts), ("k", k), ("num_layers", num_layers)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"routing_degree: {name}={value!r} must be a non-negative integer")
  if k > num_experts:
    raise ValueError(f"routing_degree: k={k} must be <= num_experts={num_experts}")
  return math.comb(int(num_experts), int(k)) ** int(num_layers)


def layers_spec(indices, depth: int | None) -> str:
  """The `model.moe.layers` value for these 0-based blocks: 'none', 'last:L' when they are the last L, or 'i,j'."""
  indices = sorted(indices)
  if not indices:
    return "none"
  if depth is not None and indices == list(range(depth - len(indices), depth)):
    return f"last:{len(indices)}"
  return ",".join(str(index) for index in indices)


def recommend_layers(scores: dict[str, float], *, num_experts: int, k: int = 1, depth: int | None = None,
                     chance: dict[str, float] | None = None, min_score: float = 0.1, relative: float = 0.5,
                     chance_factor: float = 2.0) -> dict:
  """ViMoE's advice from the specialisation scores {"block{i}": S}: keep MoE in the blocks whose routing
  specialises, a dense MLP (or a shared expert alone) elsewhere.

  A block is kept when S >= max(min_score, relative * best S) and, given its shuffled-label score `chance`,
  S >= chance_factor * chance (a small sample or a nearly constant routing scores well above 0 by chance).
  Returns {"keep", "drop" (block names), "moe_layers" (the config value for the kept blocks), "routing_degree"
  (D of the kept blocks), "threshold", "text"}.
  """
  if not scores:
    return {"keep": [], "drop": [], "moe_layers": "none", "routing_degree": 1, "threshold": None,
            "text": "No MoE layers: nothing to analyse."}
  best = max(scores.values())
  threshold = max(min_score, relative * best)
  chance = chance or {}
  order = sorted(scores, key=block_index)
  keep = [name for name in order
          if scores[name] >= threshold and scores[name] >= chance_factor * chance.get(name, 0.0)]
  drop = [name for name in order if name not in keep]
  spec = layers_spec([block_index(name) for name in keep], depth)
  degree = routing_degree(num_experts, k, len(keep))

  def describe(names):
    return ", ".join(f"{name} (S={scores[name]:.2f})" for name in names) or "none"

  lines = [f"Specialisation S = 1 - H(expert|class)/H(expert) per MoE layer; keep a layer when S >= "
           f"{threshold:.2f} (max of {min_score} and {relative} x the best, {best:.2f})"
           + (f" and S >= {chance_factor} x its shuffled-label score." if chance else ".")]
  if keep:
    lines.append(f"Keep MoE in: {describe(keep)}.")
    lines.append(f"Dense MLP instead in: {describe(drop)}." if drop else "Every MoE layer specialises: keep them all.")
    lines.append(f"Suggested model.moe.layers={spec!r}: L={len(keep)}, routing degree D = C({num_experts},{k})^"
                 f"{len(keep)} = {degree} (the paper's best configurations have D near 32..64).")
  else:
    lines.append(f"No layer's routing specialises (best S={best:.2f}): the MoE layers add parameters without "
                 f"class-dependent routing; consider a dense model or fewer MoE layers.")
  return {"keep": keep, "drop": drop, "moe_layers": spec, "routing_degree": degree, "threshold": threshold,
          "text": "\n".join(lines)}


def analyze(log: RoutingLog, *, min_score: float = 0.1, relative: float = 0.5, shuffles: int = 20) -> dict:
  """Every number of the analysis, JSON-ready.

  Returns {"num_classes", "num_experts", "k", "depth", "units", "num_units", "moe_blocks", "routing_degree",
  "layers": {"block{i}": {"block", "l", "counts", "matrix", "expert_load", "expert_entropy",
  "conditional_entropy", "mutual_information", "specialization", "chance_specialization"}},
  "recommendation": recommend_layers(...)}. `l` numbers layers as ViMoE does (1 = the last block).
  """
  valid = log.labels >= 0
  layers = {}
  for name in sorted(log.choices, key=block_index):
    counts = routing_matrix(log.labels, log.choices[name], log.num_classes, log.num_experts)
    index = block_index(name)
    layers[name] = {
        "block": index, "l": (log.depth - index) if log.depth is not None else None,
        "counts": counts.tolist(), "matrix": row_normalize(counts).tolist(),
        "expert_load": expert_load(counts).tolist(),
        **routing_entropies(counts),
        "chance_specialization": chance_specialization(log.labels, log.choices[name], log.num_classes,
                                                       log.num_experts, shuffles=shuffles)}
  scores = {name: layer["specialization"] for name, layer in layers.items()}
  chance = {name: layer["chance_specialization"] for name, layer in layers.items()}
  return {"num_classes": log.num_classes, "num_experts": log.num_experts, "k": log.k, "depth": log.depth,
          "units": log.units, "num_units": int(valid.sum()), "moe_blocks": [block_index(n) for n in layers],
          "routing_degree": routing_degree(log.num_experts, log.k, len(layers)), "layers": layers,
          "recommendation": recommend_layers(scores, num_experts=log.num_experts, k=log.k, depth=log.depth,
                                             chance=chance, min_score=min_score, relative=relative)}


# Figures (matplotlib Figure objects: no pyplot state, shown inline by notebooks, saved by scripts)

def _draw_heatmap(axis, layer: dict, name: str, class_names=None, colorbar_figure=None, class_label=True):
  matrix = np.asarray(layer["matrix"])
  rows = np.flatnonzero(np.asarray(layer["counts"]).sum(axis=1) > 0)  # classes seen in the log
  image = axis.imshow(matrix[rows], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
  names = class_names if class_names is not None else [str(c) for c in range(matrix.shape[0])]
  if len(rows) <= 40:
    axis.set_yticks(range(len(rows)), [names[row] for row in rows], fontsize=7)
  axis.set_xticks(range(matrix.shape[1]), [str(e) for e in range(matrix.shape[1])], fontsize=7)
  axis.set_xlabel("expert")
  if class_label:
    axis.set_ylabel("class")
  where = f"{name}" + (f" (l={layer['l']})" if layer.get("l") is not None else "")
  axis.set_title(f"{where}: S={layer['specialization']:.2f}", fontsize=9)
  if colorbar_figure is not None:
    colorbar_figure.colorbar(image, ax=axis, label="P(expert | class)")
  return image


def heatmap_figure(analysis: dict, name: str, class_names=None):
  """One layer's class x expert heatmap of P(expert | class)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  layer = analysis["layers"][name]
  figure = Figure(figsize=(0.45 * analysis["num_experts"] + 2.5, 0.25 * analysis["num_classes"] + 1.8),
                  layout="constrained")
  _draw_heatmap(figure.subplots(), layer, name, class_names, colorbar_figure=figure)
  return figure


def combined_heatmap_figure(analysis: dict, class_names=None):
  """Every MoE layer's heatmap side by side (first block left), one shared colour bar."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  names = sorted(analysis["layers"], key=block_index)
  count = max(len(names), 1)
  figure = Figure(figsize=(min(2.4 * count, 24) + 1.5, 0.25 * analysis["num_classes"] + 2.0), layout="constrained")
  axes = figure.subplots(1, count, squeeze=False)[0]
  image = None
  for position, (axis, name) in enumerate(zip(axes, names)):
    image = _draw_heatmap(axis, analysis["layers"][name], name, class_names, class_label=position == 0)
  if image is not None:
    figure.colorbar(image, ax=list(axes), label="P(expert | class)")
  figure.suptitle("first-choice expert per class", fontsize=10)
  return figure


def expert_load_figure(analysis: dict):
  """Bars of the expert load (fraction of units per expert) of every MoE layer; the dashed line is uniform load."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  names = sorted(analysis["layers"], key=block_index)
  experts = analysis["num_experts"]
  figure = Figure(figsize=(min(3.0 + 0.15 * experts * max(len(names), 1), 10.0), 3.2), layout="constrained")
  axis = figure.subplots()
  width = 0.8 / max(len(names), 1)
  for position, name in enumerate(names):
    load = analysis["layers"][name]["expert_load"]
    axis.bar(np.arange(experts) + (position - (len(names) - 1) / 2) * width, load, width=width, label=name)
  axis.axhline(1.0 / experts, color="black", linestyle="--", linewidth=0.8)
  axis.set_xticks(range(experts))
  axis.set_xlabel("expert")
  axis.set_ylabel(f"fraction of {analysis['units']}s")
  axis.legend(fontsize=7)
  return figure


def save_figures(analysis: dict, directory, class_names=None) -> list[pathlib.Path]:
  """routing_block{i}.png per layer, routing_all.png (every layer) and routing_load.png in `directory`."""
  directory = pathlib.Path(directory)
  paths = []
  for name in sorted(analysis["layers"], key=block_index):
    paths.append(directory / f"routing_{name}.png")
    heatmap_figure(analysis, name, class_names).savefig(paths[-1], dpi=110)
  if analysis["layers"]:
    paths.append(directory / "routing_all.png")
    combined_heatmap_figure(analysis, class_names).savefig(paths[-1], dpi=110)
    paths.append(directory / "routing_load.png")
    expert_load_figure(analysis).savefig(paths[-1], dpi=110)
  return paths


# Collecting a routing log from a model

def patch_majority_labels(labels: np.ndarray, patch_size: int, grid: tuple[int, int]) -> np.ndarray:
  """Pixel labels [B, H, W] -> [B, h, w]: the most frequent label >= 0 under each patch, -1 where none.

  The image is padded to the patch grid (h, w) as the Segmenter pads it (centred, see center_padding), padding
  labelled -1. Ties go to the smaller class index."""
  labels = np.asarray(labels, np.int64)
  B, H, W = labels.shape
  h, w = grid
  pad_h, pad_w = h * patch_size - H, w * patch_size - W
  if pad_h < 0 or pad_w < 0:
    raise ValueError(f"labels of {H}x{W} pixels do not fit a {h}x{w} grid of {patch_size}-pixel patches")
  padded = np.pad(labels, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)),
                  constant_values=-1)
  patches = padded.reshape(B, h, patch_size, w, patch_size).transpose(0, 1, 3, 2, 4).reshape(B * h * w, -1)
  num_classes = int(max(patches.max(), 0)) + 1
  offsets = np.arange(len(patches))[:, None] * num_classes
  flat = np.where(patches >= 0, patches + offsets, -1)
  counts = np.bincount(flat[flat >= 0], minlength=len(patches) * num_classes).reshape(len(patches), num_classes)
  majority = np.where(counts.sum(axis=1) > 0, counts.argmax(axis=1), -1)
  return majority.reshape(B, h, w)


def routing_log(model, batches, *, segmentation: bool, num_classes: int, crop: int = 0,
                max_batches: int | None = None) -> RoutingLog:
  """Routes evaluation batches ({"image", "label"}) through a ViMoE model and logs the first-choice experts.

  Classification (a ViT): one unit per image (route_per="item") or per token (route_per="token", every token
  labelled with its image's class). Segmentation (a Segmenter): one unit per patch, labelled with the majority
  label of its pixels; images larger than `crop` are cut to their top-left crop (one forward pass, as the
  trainer's expert maps do). Units without a label (padding images, patches with no labelled pixel) are left out.
  The model must have at least one MoE block.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  vit = model.backbone
  moe_config = vit.config.moe
  if not vit.config.moe_layers:
    raise ValueError("model.moe.layers gives the model no MoE block: there is no routing to analyse")
  if segmentation:
    route = nnx.jit(lambda m, x: m(x, deterministic=True, return_routing=True)[1]["expert_maps"])
  else:
    route = nnx.jit(lambda m, x: m.encode(x, deterministic=True, return_routing=True)[1]["routing"])
  labels, choices = [], {}
  for batch_index, batch in enumerate(batches):
    if max_batches is not None and batch_index >= max_batches:
      break
    images, batch_labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    if segmentation and crop and (images.shape[1] > crop or images.shape[2] > crop):
      images, batch_labels = images[:, :crop, :crop], batch_labels[:, :crop, :crop]
    routing = {name: np.asarray(choice) for name, choice in route(model, jnp.asarray(images)).items()}
    if segmentation:
      grid = next(iter(routing.values())).shape[1:]
      unit_labels = patch_majority_labels(batch_labels, vit.config.patch_size, grid).reshape(-1)
    else:
      first = next(iter(routing.values()))
      per_unit = 1 if first.ndim == 1 else first.shape[1]        # [B] per image or [B, T] per token
      unit_labels = np.repeat(batch_labels, per_unit)
    keep = unit_labels >= 0  # padding rows of the last batch, patches with no labelled pixel
    labels.append(unit_labels[keep])
    for name, choice in routing.items():
      choices.setdefault(name, []).append(choice.reshape(-1)[keep])
  if not labels:
    raise ValueError("the evaluation data gave no batch")
  units = "patch" if segmentation else ("image" if moe_config.route_per == "item" else "token")
  return RoutingLog(labels=np.concatenate(labels), choices={n: np.concatenate(c) for n, c in choices.items()},
                    num_classes=num_classes, num_experts=moe_config.num_experts, k=moe_config.k,
                    depth=len(vit.blocks), units=units)


def save_analysis(analysis: dict, log: RoutingLog, output_dir) -> dict:
  """Writes routing_log.npz, the figures (save_figures; their paths go to analysis["figures"]) and
  routing_analysis.json into `output_dir`. Returns the analysis."""
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  log.save(output_dir / "routing_log.npz")
  analysis["figures"] = [str(path) for path in save_figures(analysis, output_dir)]
  (output_dir / "routing_analysis.json").write_text(json.dumps(analysis, indent=1) + "\n")
  return analysis
