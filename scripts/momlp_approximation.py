"""MoMLP approximation: number of experts against expert size at a fixed loaded-parameter budget (issue 7).

    python scripts/momlp_approximation.py [--dim 2 --budgets 64,128,256 --experts 1,2,4,8,16,32 --steps 5000]
    python scripts/momlp_approximation.py --small --output_dir /tmp/momlp      # seconds; what the tests run

Kratsios, Borde, Furuya and Law (arXiv 2402.03460) prove that a mixture of (P)ReLU MLP experts, each input routed
to the expert of its nearest prototype (a Voronoi cell), approximates any Lipschitz f: [0,1]^n -> R uniformly to
eps while only O(1/eps) parameters are loaded for any one input; the number of experts grows instead. This script
asks the finite-size version of that question: at a fixed loaded budget, do more, smaller experts lower the
uniform (sup) error of a trained model?

Model (the layer used directly, no extra parameters): x [N,n] -> vimoe.moe.MoeLayer(dim=n, router="prototype",
k=1, normalize_gates=True, dispatch="gather", capacity_factor=None) -> [N,n] -> sum over the n outputs -> [N].
With k=1 and normalised gates the gate is exactly 1, so f_hat(x) = sum_j expert_e(x)(x)_j with e(x) the nearest
prototype: one expert per input, as in the paper. The prototypes are placed once by k-means on a uniform sample
of the cube (a centroidal Voronoi partition, the practical stand-in for the paper's delta-net) and kept fixed;
only the experts are trained (Adam on the squared error of fresh uniform samples each step).

Loaded parameters (what one input needs in memory): one expert as the layer stores it plus the whole router,
    loaded(E, H) = (2n + 1 + [prelu]) * H + n  +  n * E
(w_in n*H, b_in H, w_out H*n, b_out n, slope H for "prelu"; the flat router compares x with all E prototypes,
so all n*E prototype numbers are loaded; the paper's tree router would load only one root-to-leaf path). For a
budget P each E gets the largest width H with loaded(E, H) <= P; configurations with H < 1 are skipped.

Errors, on a regular grid of [0,1]^n (m points per axis, m^n <= --eval_points) plus --eval_points uniform random
points: uniform error = max |f - f_hat| over all of them (a lower bound on the true sup, within O(grid step));
L2 error = root-mean-square of f - f_hat over the random points (a Monte Carlo estimate of ||f - f_hat||_L2);
median cell error = median over the Voronoi cells of the largest error inside the cell (a typical expert's sup).

Writes <output_dir>/momlp_results.csv and momlp_results.md, and <figure_dir>/momlp_uniform_error_vs_experts.png
and momlp_uniform_error_vs_width.png (figure_dir: docs/figures, or output_dir with --small).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from vimoe.moe import MoeLayer

ACTIVATIONS = ("prelu", "relu")
RESULT_COLUMNS = ("target", "dim", "activation", "budget", "num_experts", "width", "loaded_params",
                  "total_params", "uniform_error", "l2_error", "median_cell_error", "train_loss", "seconds")

# ------------------------------------------------------------------------------------------------------------
# Targets: Lipschitz functions on [0,1]^n with a known constant in the Euclidean norm.

ABS_SINE_HUMPS = 4           # |sin| humps per axis
NUM_DISTANCE_CENTERS = 6     # points of the set S for the distance target


def abs_sine(x):
  """f(x) = (1/n) sum_i |sin(pi m x_i)|, m = ABS_SINE_HUMPS: x [..., n] -> [...], values in [0, 1].

  Kinks at every zero of the sine. Lipschitz constant pi m / sqrt(n): |f(x) - f(y)| <= (pi m / n) ||x - y||_1
  <= (pi m / sqrt(n)) ||x - y||_2, reached along the diagonal next to the origin.
  """
  return jnp.mean(jnp.abs(jnp.sin(math.pi * ABS_SINE_HUMPS * x)), axis=-1)


def distance_centers(dim: int) -> np.ndarray:
  """The fixed set S of the distance target: NUM_DISTANCE_CENTERS points of [0.1, 0.9]^n (seed 0) [S, n]."""
  return np.random.default_rng(0).uniform(0.1, 0.9, size=(NUM_DISTANCE_CENTERS, dim))


def set_distance(x):
  """f(x) = min over c in S of ||x - c||: x [..., n] -> [...]. 1-Lipschitz (a minimum of 1-Lipschitz functions).

  Cones at the points of S and ridges where two points are equally near: a (piecewise linear) ReLU net can only
  approximate them.
  """
  centers = jnp.asarray(distance_centers(x.shape[-1]), dtype=x.dtype)                 # [S, n]
  sq_dist = jnp.sum((x[..., None, :] - centers) ** 2, axis=-1)                      # [..., S]
  return jnp.sqrt(jnp.min(sq_dist, axis=-1))


TARGETS = {"abs_sine": abs_sine, "distance": set_distance}


def lipschitz_constant(target: str, dim: int) -> float:
  """The Euclidean Lipschitz constant of a target (derived in its docstring)."""
  if target == "abs_sine":
    return math.pi * ABS_SINE_HUMPS / math.sqrt(dim)
  if target == "distance":
    return 1.0
  raise ValueError(f"target={target!r} is not known; valid: {', '.join(TARGETS)}")


# ------------------------------------------------------------------------------------------------------------
# Parameter accounting.

def expert_parameter_count(dim: int, width: int, activation: str) -> int:
  """One expert as vimoe.moe.Experts stores it: w_in n*H + b_in H + w_out H*n + b_out n (+ slope H for prelu)."""
  return (2 * dim + 1 + (activation == "prelu")) * width + dim


def router_parameter_count(dim: int, num_experts: int) -> int:
  """The prototype router: one n-vector per expert, all compared with every input."""
  return dim * num_experts


def loaded_parameter_count(dim: int, width: int, num_experts: int, activation: str) -> int:
  """Parameters one input needs in memory: one expert plus the whole router."""
  return expert_parameter_count(dim, width, activation) + router_parameter_count(dim, num_experts)


def total_parameter_count(dim: int, width: int, num_experts: int, activation: str) -> int:
  return num_experts * expert_parameter_count(dim, width, activation) + router_parameter_count(dim, num_experts)


def width_for_budget(budget: int, dim: int, num_experts: int, activation: str) -> int:
  """The largest expert width H with loaded(E, H) <= budget; 0 when even H = 1 does not fit."""
  per_unit = expert_parameter_count(dim, 1, activation) - dim
  return max(0, (budget - dim - router_parameter_count(dim, num_experts)) // per_unit)


# ------------------------------------------------------------------------------------------------------------
# Model.

def kmeans_prototypes(dim: int, num_experts: int, seed: int, num_samples: int = 8192,
                      iterations: int = 50) -> np.ndarray:
  """Centroids of k-means (k-means++ start, Lloyd steps) on uniform points of [0,1]^n: [E, n] float32.

  Centroidal Voronoi cells are about equally large and round, so the largest cell diameter, which bounds the
  error of a Lipschitz fit cell by cell, shrinks like E^(-1/n).
  """
  rng = np.random.default_rng(seed)
  sample = rng.uniform(size=(num_samples, dim))                                    # [N, n]
  centers = [sample[rng.integers(num_samples)]]
  sq_dist = np.sum((sample - centers[0]) ** 2, axis=1)
  for _ in range(1, num_experts):                                                  # k-means++ seeding
    centers.append(sample[rng.choice(num_samples, p=sq_dist / sq_dist.sum())])
    sq_dist = np.minimum(sq_dist, np.sum((sample - centers[-1]) ** 2, axis=1))
  centers = np.stack(centers)                                                      # [E, n]
  for _ in range(iterations):
    nearest = np.argmin(((sample[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)  # [N]
    for e in range(num_experts):
      members = sample[nearest == e]
      if len(members):
        centers[e] = members.mean(0)
  return centers.astype(np.float32)


def build_model(dim: int, width: int, num_experts: int, activation: str, prototypes: np.ndarray,
                seed: int) -> MoeLayer:
  """A prototype-routed top-1 MoeLayer on [0,1]^n with the given prototypes [E, n] as router columns.

  Each expert's hidden units start with their kinks through points of its own cell: b_in = -w_in . q, q its
  prototype plus a jitter of about a cell radius. Zero biases would put every kink through the origin, a corner
  of the cube, far from most cells.
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r} is not valid; choose one of: {', '.join(ACTIVATIONS)}")
  if prototypes.shape != (num_experts, dim):
    raise ValueError(f"prototypes has shape {prototypes.shape}; expected (num_experts, dim) = {(num_experts, dim)}")

  @nnx.jit  # one compiled initialiser instead of a compilation per eager op (seconds on a busy CPU)
  def create(prototypes):                                                          # [E, n]
    layer = MoeLayer(dim, width, num_experts, k=1, router="prototype", normalize_gates=True, dispatch="gather",
                     capacity_factor=None, activation=activation, rngs=nnx.Rngs(seed))
    layer.router.kernel[...] = prototypes.T                                        # [n, E]
    cell_radius = 0.5 * num_experts ** (-1.0 / dim)
    jitter = jax.random.uniform(jax.random.key(seed + 1), (num_experts, width, dim), minval=-cell_radius,
                                maxval=cell_radius)
    kink_points = prototypes[:, None, :] + jitter                                  # [E, H, n]
    layer.experts.b_in[...] = -jnp.einsum("EDH,EHD->EH", layer.experts.w_in[...], kink_points)
    return layer

  return create(jnp.asarray(prototypes, jnp.float32))


def predict(layer: MoeLayer, x: jax.Array) -> jax.Array:
  """f_hat: x [N, n] -> [N]. The N points form one routing group; the read-out sums the layer's n outputs."""
  y, _ = layer(x[None])                                                            # [1, N, n]
  return jnp.sum(y[0], axis=-1)


# Only the experts learn; the prototypes stay where k-means put them (with a gate of exactly 1 they get no
# gradient anyway, and Adam would blow rounding noise up into steps).
_TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("experts"))


def train(layer: MoeLayer, target, *, steps: int, batch_size: int, learning_rate: float, seed: int) -> float:
  """Adam with cosine decay on mean squared error, a fresh uniform batch each step; updates `layer` in place.

  The whole loop is one compiled lax.scan. Returns the mean training loss of the last tenth of the steps.
  """
  dim = layer.dim
  graphdef, trainable, frozen = nnx.split(layer, _TRAINABLE, ...)
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def loss_fn(params, x):
    pred = predict(nnx.merge(graphdef, params, frozen), x)
    return jnp.mean((pred - target(x)) ** 2)

  @jax.jit
  def run(params, key):
    def step(carry, i):
      params, opt_state = carry
      x = jax.random.uniform(jax.random.fold_in(key, i), (batch_size, dim))       # [B, n]
      loss, grads = jax.value_and_grad(loss_fn)(params, x)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(steps))
    return params, losses

  params, losses = run(trainable, jax.random.key(seed))
  nnx.update(layer, params)
  return float(jnp.mean(losses[-max(1, steps // 10):]))


def evaluation_points(dim: int, num_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(grid [m^n, n] with the largest m such that m^n <= num_points, random [num_points, n]) in [0,1]^n."""
  per_axis = max(2, int(math.floor(num_points ** (1.0 / dim) + 1e-9)))
  axes = np.meshgrid(*[np.linspace(0.0, 1.0, per_axis)] * dim, indexing="ij")
  grid = np.stack([a.reshape(-1) for a in axes], axis=-1).astype(np.float32)
  random = np.random.default_rng(seed).uniform(size=(num_points, dim)).astype(np.float32)
  return grid, random


_predict_jit = nnx.jit(predict)


def predictions(layer: MoeLayer, points: np.ndarray, chunk: int = 65536) -> np.ndarray:
  """f_hat on many points [N, n] -> [N], in chunks of one padded shape (one compilation, bounded memory)."""
  chunk = min(chunk, len(points))
  num_chunks = -(-len(points) // chunk)
  padded = np.zeros((num_chunks * chunk, points.shape[1]), np.float32)
  padded[:len(points)] = points
  out = [np.asarray(_predict_jit(layer, jnp.asarray(padded[i * chunk:(i + 1) * chunk]))) for i in range(num_chunks)]
  return np.concatenate(out)[:len(points)]


def nearest_prototype(layer: MoeLayer, points: np.ndarray) -> np.ndarray:
  """The Voronoi cell (expert) of each point [N, n] -> [N], recomputed in NumPy from the router's prototypes."""
  prototypes = np.asarray(layer.router.kernel[...], np.float32)                     # [n, E]
  sq_dist = np.sum(points ** 2, 1, keepdims=True) - 2 * points @ prototypes + np.sum(prototypes ** 2, 0)  # [N, E]
  return np.argmin(sq_dist, axis=1)


def evaluate(layer: MoeLayer, target, grid: np.ndarray, random: np.ndarray) -> dict:
  """Errors of f_hat against f on the evaluation points:

  uniform_error: max |f - f_hat| over the grid and random points.
  l2_error: root-mean-square of f - f_hat over the random points.
  median_cell_error: median over the Voronoi cells of the largest |f - f_hat| inside the cell, the error of a
    typical expert (the uniform error is that of the worst one).
  """
  errors = {}
  for name, points in (("grid", grid), ("random", random)):
    errors[name] = predictions(layer, points) - np.asarray(target(jnp.asarray(points)))
  abs_error = np.abs(np.concatenate([errors["grid"], errors["random"]]))
  cell = nearest_prototype(layer, np.concatenate([grid, random]))
  cell_max = np.zeros(layer.num_experts)
  np.maximum.at(cell_max, cell, abs_error)
  return {"uniform_error": float(np.max(abs_error)),
          "l2_error": float(np.sqrt(np.mean(errors["random"] ** 2))),
          "median_cell_error": float(np.median(cell_max[np.bincount(cell, minlength=layer.num_experts) > 0]))}


# ------------------------------------------------------------------------------------------------------------
# Sweep and reports.

def sweep_configs(args) -> tuple[list[tuple], list[tuple]]:
  """(configurations (target, budget, E, H) to train, (budget, E) pairs skipped because no width fits)."""
  configs, skipped = [], []
  for budget in args.budgets:
    for num_experts in args.experts:
      width = width_for_budget(budget, args.dim, num_experts, args.activation)
      if width < 1:
        skipped.append((budget, num_experts))
        continue
      configs += [(target, budget, num_experts, width) for target in args.targets]
  if not configs:
    raise ValueError(f"no configuration fits: budgets={args.budgets} are all below the loaded parameters of a "
                     f"width-1 expert plus the router for experts={args.experts} at dim={args.dim}")
  return sorted(configs, key=lambda c: args.targets.index(c[0])), skipped  # stable: one target at a time


def sweep(args, configs: list[tuple]) -> list[dict]:
  """Trains and evaluates every configuration (same seed for all): one result row each."""
  grid, random = evaluation_points(args.dim, args.eval_points, args.seed + 1)
  rows = []
  progress = tqdm(configs, desc="MoMLP sweep", unit="model")
  for target_name, budget, num_experts, width in progress:
    progress.set_postfix(target=target_name, budget=budget, E=num_experts, H=width)
    start = time.perf_counter()
    prototypes = kmeans_prototypes(args.dim, num_experts, args.seed)
    layer = build_model(args.dim, width, num_experts, args.activation, prototypes, args.seed)
    target = TARGETS[target_name]
    train_loss = train(layer, target, steps=args.steps, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, seed=args.seed)
    errors = evaluate(layer, target, grid, random)
    rows.append({"target": target_name, "dim": args.dim, "activation": args.activation, "budget": budget,
                 "num_experts": num_experts, "width": width,
                 "loaded_params": loaded_parameter_count(args.dim, width, num_experts, args.activation),
                 "total_params": total_parameter_count(args.dim, width, num_experts, args.activation),
                 **errors, "train_loss": train_loss, "seconds": time.perf_counter() - start})
  return rows


def write_csv(rows: list[dict], path: str) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def markdown_table(rows: list[dict], skipped: list[tuple]) -> str:
  lines = ["| target | budget | E | H | loaded | total | uniform error | L2 error | median cell error |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['target']} | {r['budget']} | {r['num_experts']} | {r['width']} | {r['loaded_params']} | "
                 f"{r['total_params']} | {r['uniform_error']:.4f} | {r['l2_error']:.4f} | "
                 f"{r['median_cell_error']:.4f} |")
  if skipped:
    lines.append("\nSkipped (the router alone leaves no room for a width-1 expert): "
                 + ", ".join(f"E={e} at budget {b}" for b, e in skipped) + ".")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], figure_dir: str) -> list[str]:
  """Uniform (solid) and L2 (dashed) error against E and against H, one colour per budget, one panel per
  target. Returns the paths written."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  targets = sorted({r["target"] for r in rows})
  budgets = sorted({r["budget"] for r in rows})
  colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(budgets)))
  paths = []
  for x_key, x_label, name in (("num_experts", "number of experts E", "momlp_uniform_error_vs_experts.png"),
                               ("width", "expert width H", "momlp_uniform_error_vs_width.png")):
    fig, axes = plt.subplots(1, len(targets), figsize=(5.2 * len(targets), 4.0), squeeze=False)
    for ax, target in zip(axes[0], targets):
      for color, budget in zip(colors, budgets):
        line = sorted((r for r in rows if r["target"] == target and r["budget"] == budget),
                      key=lambda r: r["num_experts"])
        if not line:
          continue
        xs = [r[x_key] for r in line]
        ax.plot(xs, [r["uniform_error"] for r in line], "o-", color=color, label=f"uniform, budget {budget}")
        ax.plot(xs, [r["l2_error"] for r in line], "s--", color=color, alpha=0.5, markersize=3,
                label=f"L2, budget {budget}")
        if x_key == "width":
          for r in line:
            ax.annotate(f"E={r['num_experts']}", (r["width"], r["uniform_error"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel(x_label)
      ax.set_ylabel("error")
      ax.set_title(f"{target}, n={line[0]['dim'] if line else '?'}, {rows[0]['activation']} experts")
      ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(figure_dir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


def _int_list(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: give at least one positive integer")
  return values


def _target_list(text: str) -> list[str]:
  names = [v.strip() for v in text.split(",") if v.strip()]
  unknown = [n for n in names if n not in TARGETS]
  if not names or unknown:
    raise argparse.ArgumentTypeError(f"targets={text!r}: choose from {', '.join(TARGETS)}")
  return names


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dim", type=int, default=2, help="n: the input dimension of the cube [0,1]^n")
  parser.add_argument("--targets", type=_target_list, default=list(TARGETS), help="comma-separated target names")
  parser.add_argument("--budgets", type=_int_list, default=[64, 128, 256], help="loaded-parameter budgets")
  parser.add_argument("--experts", type=_int_list, default=[1, 2, 4, 8, 16, 32], help="numbers of experts")
  parser.add_argument("--activation", choices=ACTIVATIONS, default="prelu")
  parser.add_argument("--steps", type=int, default=5000, help="Adam steps per model")
  parser.add_argument("--batch_size", type=int, default=512, help="fresh uniform points per step")
  parser.add_argument("--learning_rate", type=float, default=3e-2, help="peak Adam rate (cosine decay to 0)")
  parser.add_argument("--eval_points", type=int, default=2 ** 17, help="random points, and the grid size cap")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output_dir", default="workdirs/momlp", help="where the CSV and Markdown table go")
  parser.add_argument("--figure_dir", default=None, help="where the PNGs go (default docs/figures; "
                                                         "output_dir with --small)")
  parser.add_argument("--small", action="store_true", help="a seconds-long sweep for tests: the first target, "
                                                           "budget 40, E in {1, 4}, 50 steps, 4096 points")
  args = parser.parse_args(argv)
  if args.small:
    args.targets, args.budgets, args.experts = args.targets[:1], [40], [1, 4]
    args.steps, args.batch_size, args.eval_points = 50, 256, 4096
    args.figure_dir = args.figure_dir or args.output_dir
  args.figure_dir = args.figure_dir or os.path.join("docs", "figures")
  for name in ("dim", "steps", "batch_size", "eval_points"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} must be a positive integer")
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  os.makedirs(args.output_dir, exist_ok=True)
  os.makedirs(args.figure_dir, exist_ok=True)
  start = time.perf_counter()
  configs, skipped = sweep_configs(args)
  rows = sweep(args, configs)
  csv_path = os.path.join(args.output_dir, "momlp_results.csv")
  write_csv(rows, csv_path)
  table = markdown_table(rows, skipped)
  with open(os.path.join(args.output_dir, "momlp_results.md"), "w") as f:
    f.write(table)
  figures = plot(rows, args.figure_dir)
  print(table)
  print(f"wrote {csv_path}, {', '.join(figures)} in {time.perf_counter() - start:.0f} s")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
