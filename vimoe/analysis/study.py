"""The ViMoE placement study's report (issue 12): paired-seed statistics over a sweep's workdirs, the accuracy-vs-L
figure, the routing analysis of the all-MoE models, and a verdict on each of the paper's claims.

scripts/run_study.py trains the study (configs/study_pretrain.py, configs/study_placement.py) and calls
`write_report(WORKDIR)`, which reads WORKDIR/sweep/<point>/ (config.json, metrics.jsonl) and writes

    WORKDIR/study.md            the tables, the claim-by-claim lines and what a narrower interval would cost
    WORKDIR/study.json          every number of study.md
    WORKDIR/study_accuracy_vs_L.png    the paper's figure 2: top-1 vs L, shared expert on/off, 95 % CI bars,
                                       the dense fine-tune as a band
    WORKDIR/routing_shared{0,1}/       routing heatmaps and routing_analysis.json of the seed-0 all-MoE points

Statistics. An arm is a setting of (model.moe.layers, model.moe.num_shared_experts); its points differ only in the
seed, and the same seed gives every arm the same data order, so arms are compared seed by seed. For values x_1..x_n
(accuracies of one arm, or per-seed differences between two arms over their common seeds), the 95 % interval is
mean +- t_{n-1, 0.975} s / sqrt(n), s the sample standard deviation (ddof=1). The seeds needed for a half-width of at
most `target` at a measured s are the smallest n >= 2 with t_{n-1, 0.975} s / sqrt(n) <= target. Accuracies are
reported in points (top-1 x 100).

Multiple comparisons. The report states a verdict on every paired comparison it makes: each MoE arm vs dense,
shared vs no-shared at each L, the flatness difference and the all-L vs best-other-L difference per shared
setting (15 at 4 values of L). Those form one family, corrected by Holm-Bonferroni (Holm 1979): with the two-sided
t-test p-values sorted, p_(1) <= ... <= p_(m), the adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). A
comparison is resolved when its adjusted p < 1 - CONFIDENCE; the interval printed with it is the t-interval at the
level Holm tests it at (`holm_intervals`), which excludes 0 exactly when it is resolved. The headline verdicts
are the Holm ones; the unadjusted ones are printed beside them.

Test-set uncertainty. The seed intervals hold the test set fixed: they measure training variation, not how the
numbers would move on other test digits. The evaluation writes aggregate metrics only (no per-example
predictions), so no bootstrap over test examples can be computed from a finished sweep; for one accuracy p on n
independent examples the binomial standard error is sqrt(p (1 - p) / n) (`binomial_standard_error`), which for the
pairs set understates it (10,000 pairs reuse 355 digits).
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import numpy as np

CONFIDENCE = 0.95
TARGET_POINTS = 1.0  # the issue's target: paired 95 % CI of shared vs no-shared at most +-1 point at each L
CHANCE_FACTOR = 2.0  # a block "specialises" when S >= this x its shuffled-label score (as the routing advice)


# Statistics

def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
  """t_{dof, (1 + confidence) / 2}: the two-sided critical value."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(stats.t.ppf(0.5 + confidence / 2, dof))


def t_interval(values, confidence: float = CONFIDENCE) -> dict:
  """{"n", "mean", "std" (ddof=1), "half" (t_{n-1} std / sqrt(n)), "low", "high"}; std and half are NaN for n < 2."""
  values = np.asarray(list(values), np.float64)
  n = len(values)
  mean = float(values.mean()) if n else float("nan")
  std = float(values.std(ddof=1)) if n > 1 else float("nan")
  half = t_quantile(n - 1, confidence) * std / math.sqrt(n) if n > 1 else float("nan")
  return {"n": n, "mean": mean, "std": std, "half": half, "low": mean - half, "high": mean + half}


def paired_interval(a: dict, b: dict, confidence: float = CONFIDENCE) -> dict:
  """The t-interval of a[seed] - b[seed] over the seeds both hold; adds "seeds" and "differences"."""
  seeds = sorted(set(a) & set(b))
  differences = [a[seed] - b[seed] for seed in seeds]
  return {**t_interval(differences, confidence), "seeds": seeds, "differences": differences}


def seeds_needed(std: float, target: float = TARGET_POINTS, confidence: float = CONFIDENCE,
                 limit: int = 100_000) -> int | None:
  """The smallest n >= 2 with t_{n-1} std / sqrt(n) <= target (None for a NaN std or when over `limit`)."""
  if not math.isfinite(std):
    return None
  n = 2
  while t_quantile(n - 1, confidence) * std / math.sqrt(n) > target:
    n += 1
    if n > limit:
      return None
  return n


def t_p_value(interval: dict) -> float:
  """Two-sided p-value of "mean = 0" for a t-interval: 2 P(T_{n-1} >= |mean| sqrt(n) / std); NaN for n < 2."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  n, mean, std = interval["n"], interval["mean"], interval["std"]
  if n < 2 or not math.isfinite(std):
    return float("nan")
  if std == 0:
    return 0.0 if mean != 0 else 1.0
  return float(2 * stats.t.sf(abs(mean) * math.sqrt(n) / std, n - 1))


def holm_adjust(p_values) -> list[float]:
  """Holm-Bonferroni adjusted p-values, in the order given: sorted ascending, p_(i) -> max_{j <= i} min(1,
  (m - j + 1) p_(j)) (1-based ranks). NaN entries (no test) stay NaN and do not count in m."""
  p_values = [float(p) for p in p_values]
  tested = sorted((p, index) for index, p in enumerate(p_values) if math.isfinite(p))
  m = len(tested)
  adjusted = [float("nan")] * len(p_values)
  running = 0.0
  for rank, (p, index) in enumerate(tested):  # rank 0-based: factor m - rank
    running = max(running, min(1.0, (m - rank) * p))
    adjusted[index] = running
  return adjusted


def holm_intervals(family: dict, confidence: float = CONFIDENCE) -> dict:
  """Holm over a family {name: t-interval}: {name: {"mean", "n", "p", "p_holm", "confidence", "half", "low",
  "high", "resolved"}}. With alpha = 1 - confidence and the tested p sorted ascending, the i-th (0-based) is tested
  at alpha / (m - i) up to the first comparison Holm does not reject (rank r); every later one at alpha / (m - r).
  Its interval is the t-interval at that level, so it excludes 0 exactly when p_holm < alpha ("resolved")."""
  alpha = 1.0 - confidence
  names = list(family)
  p = [t_p_value(family[name]) for name in names]
  adjusted = holm_adjust(p)
  order = sorted((value, i) for i, value in enumerate(p) if math.isfinite(value))
  m = len(order)
  levels, first_kept = {}, None
  for rank, (value, i) in enumerate(order):
    if first_kept is None and value >= alpha / (m - rank):
      first_kept = rank
    levels[i] = alpha / (m - (rank if first_kept is None else first_kept))
  out = {}
  for i, name in enumerate(names):
    interval = family[name]
    entry = {"mean": interval["mean"], "n": interval["n"], "p": p[i], "p_holm": adjusted[i]}
    if i in levels:
      half = t_quantile(interval["n"] - 1, 1.0 - levels[i]) * interval["std"] / math.sqrt(interval["n"])
      entry.update(confidence=1.0 - levels[i], half=half, low=interval["mean"] - half,
                   high=interval["mean"] + half, resolved=bool(adjusted[i] < alpha))
    else:
      entry.update(confidence=float("nan"), half=float("nan"), low=float("nan"), high=float("nan"),
                   resolved=False)
    out[name] = entry
  return out


def binomial_standard_error(accuracy: float, examples: int) -> float:
  """sqrt(p (1 - p) / n): the standard error of an accuracy p measured on n independent test examples."""
  return math.sqrt(accuracy * (1.0 - accuracy) / examples)


def verdict(interval: dict, *, reproduced_if: str) -> str:
  """'reproduced' when the interval lies entirely on the claim's side of 0 (reproduced_if 'below' or 'above'),
  'contradicted' when entirely on the other side, else 'unresolved' (also for fewer than 2 seeds)."""
  low, high = interval["low"], interval["high"]
  if not (math.isfinite(low) and math.isfinite(high)):
    return "unresolved"
  below, above = high < 0, low > 0
  if reproduced_if == "below":
    return "reproduced" if below else "contradicted" if above else "unresolved"
  return "reproduced" if above else "contradicted" if below else "unresolved"


# Reading the sweep

def layer_count(layers) -> int:
  """'none' -> 0, 'last:L' -> L."""
  if layers in (None, "", "none"):
    return 0
  match = re.fullmatch(r"last:(\d+)", str(layers))
  if not match:
    raise ValueError(f"model.moe.layers={layers!r}: the study reads 'none' or 'last:L'")
  return int(match.group(1))


def arm_name(L: int, shared: int) -> str:
  return "dense" if L == 0 else f"L={L} {'shared' if shared else 'no-shared'}"


def collect_points(sweep_root) -> list[dict]:
  """One row per point workdir: {"point", "workdir", "L", "shared", "seed", "value" (top-1 in points or None),
  "finished", "depth", "config"}."""
  from vimoe.analysis.sweep_report import final_value, read_metrics  # pylint: disable=import-outside-toplevel
  rows = []
  for config_path in sorted(pathlib.Path(sweep_root).glob("*/config.json")):
    config = json.loads(config_path.read_text())
    value, _, finished = final_value(read_metrics(config_path.parent), "eval/top1", config["total_steps"])
    L = layer_count(config["model"]["moe"]["layers"])
    rows.append({"point": config_path.parent.name, "workdir": str(config_path.parent), "L": L,
                 "shared": int(config["model"]["moe"]["num_shared_experts"] or 0) if L else 0,
                 "seed": int(config["seed"]), "value": None if value is None else 100.0 * value,
                 "finished": finished, "depth": int(config["model"]["depth"]), "config": config})
  return rows


def arm_values(rows: list[dict]) -> dict[tuple[int, int], dict[int, float]]:
  """{(L, shared): {seed: top-1 in points}} of the finished points."""
  arms: dict[tuple[int, int], dict[int, float]] = {}
  for row in rows:
    if row["finished"]:
      arms.setdefault((row["L"], row["shared"]), {})[row["seed"]] = row["value"]
  return dict(sorted(arms.items()))


def complete_seeds(arms: dict) -> list[int]:
  """Seeds that every arm finished (the paired comparisons use these)."""
  if not arms:
    return []
  return sorted(set.intersection(*(set(values) for values in arms.values())))


# The analysis

def summarize(arms: dict, *, point_seconds: float | None = None, target: float = TARGET_POINTS,
              num_arms: int | None = None) -> dict:
  """Per-arm intervals, paired differences vs dense and shared vs no-shared, flatness, too-many-layers, and the
  seeds needed to reach +-target on the shared-vs-no-shared intervals (costed at `num_arms` points per extra seed,
  default the arms found)."""
  per_arm = {arm_name(*key): {"L": key[0], "shared": key[1], "values": values,
                              **t_interval(values.values())}
             for key, values in arms.items()}
  moe_keys = [key for key in arms if key[0] > 0]
  Ls = sorted({key[0] for key in moe_keys})
  dense = arms.get((0, 0))
  vs_dense = {arm_name(*key): paired_interval(arms[key], dense) for key in moe_keys} if dense else {}
  shared_vs = {L: paired_interval(arms[(L, 1)], arms[(L, 0)]) for L in Ls if (L, 1) in arms and (L, 0) in arms}
  seeds = complete_seeds(arms)
  num_arms = num_arms or len(arms)
  for interval in shared_vs.values():
    interval["meets_target"] = bool(math.isfinite(interval["half"]) and interval["half"] <= target)
    needed = seeds_needed(interval["std"], target)
    interval["seeds_needed"] = needed
    extra = None if needed is None else max(0, needed - interval["n"])
    interval["extra_seeds"] = extra
    interval["extra_minutes"] = (None if extra is None or point_seconds is None
                                 else extra * num_arms * point_seconds / 60.0)
  flat, many = flatness(arms, Ls), too_many_layers(arms, Ls)
  holm = holm_intervals(comparison_family(vs_dense, shared_vs, flat, many))
  if "difference" in flat:
    flat["holm_verdict"] = verdict(holm[FLATNESS_NAME], reproduced_if="below")
  for shared, result in many.items():
    result["holm_verdict"] = verdict(holm[too_many_name(result["all_L"], shared)], reproduced_if="below")
  return {"arms": per_arm, "vs_dense": vs_dense, "shared_vs_no_shared": shared_vs, "Ls": Ls,
          "complete_seeds": seeds, "num_arms": num_arms, "point_seconds": point_seconds,
          "flatness": flat, "too_many_layers": many, "holm": holm}


FLATNESS_NAME = "flatness: spread over L, shared minus no-shared"


def too_many_name(all_L: int, shared: int) -> str:
  return f"L={all_L} minus the best other L ({'shared' if shared else 'no-shared'})"


def comparison_family(vs_dense: dict, shared_vs: dict, flat: dict, many: dict) -> dict:
  """Every paired comparison the report gives a verdict on, {name: t-interval}: the family Holm corrects."""
  family = {f"{name} minus dense": interval for name, interval in vs_dense.items()}
  family.update({f"shared minus no-shared, L={L}": interval for L, interval in shared_vs.items()})
  if "difference" in flat:
    family[FLATNESS_NAME] = flat["difference"]
  family.update({too_many_name(result["all_L"], shared): result for shared, result in many.items()})
  return family


def flatness(arms: dict, Ls: list[int]) -> dict:
  """Claim (a), the shared expert stabilises and flattens accuracy across L: per setting the spread (max - min
  over L) of the arm means and the mean seed std; per seed the spread over L, and the paired interval of
  spread(shared) - spread(no-shared) over the seeds both settings finished at every L."""
  out = {}
  for shared in (0, 1):
    keys = [(L, shared) for L in Ls if (L, shared) in arms]
    if not keys:
      continue
    means = [float(np.mean(list(arms[key].values()))) for key in keys]
    stds = [t_interval(arms[key].values())["std"] for key in keys]
    seeds = sorted(set.intersection(*(set(arms[key]) for key in keys)))
    out[shared] = {"spread_of_means": max(means) - min(means), "mean_seed_std": float(np.nanmean(stds))
                   if any(math.isfinite(s) for s in stds) else float("nan"),
                   "per_seed_spread": {seed: max(arms[key][seed] for key in keys) -
                                       min(arms[key][seed] for key in keys) for seed in seeds}}
  if 0 in out and 1 in out:
    difference = paired_interval(out[1]["per_seed_spread"], out[0]["per_seed_spread"])
    out["difference"] = difference
    out["verdict"] = verdict(difference, reproduced_if="below")
  else:
    out["verdict"] = "unresolved"
  return out


def too_many_layers(arms: dict, Ls: list[int]) -> dict:
  """Claim (c), too many sparse layers hurt with little data: per shared setting, the all-blocks arm minus the best
  other L (by mean), paired over seeds; reproduced when that interval is entirely below 0. (Picking the best L on the
  same runs favours it slightly: the interval is an optimistic test of the claim.)"""
  out = {}
  if not Ls:
    return out
  deepest = max(Ls)
  for shared in (0, 1):
    others = [L for L in Ls if L != deepest and (L, shared) in arms]
    if (deepest, shared) not in arms or not others:
      continue
    best = max(others, key=lambda L: np.mean(list(arms[(L, shared)].values())))
    interval = paired_interval(arms[(deepest, shared)], arms[(best, shared)])
    out[shared] = {"all_L": deepest, "best_other_L": best, **interval,
                   "verdict": verdict(interval, reproduced_if="below")}
  return out


def digit_specialization(log_path) -> dict:
  """Per block, the specialisation S with respect to the tens digit and to the units digit alone (which half of
  the canvas the routing follows), from the saved routing log."""
  from vimoe.analysis import routing  # pylint: disable=import-outside-toplevel
  log = routing.RoutingLog.load(log_path)
  out = {}
  for name, choice in log.choices.items():
    out[name] = {part: routing.specialization_score(routing.routing_matrix(labels, choice, 10, log.num_experts))
                 for part, labels in (("tens", log.labels // 10), ("units", log.labels % 10))}
  return out


def specialization_verdict(analysis: dict, depth: int) -> dict:
  """Claim (b), deep layers specialise by class, for one routing analysis: reproduced when the deeper half of the
  blocks scores higher on average than the shallower half AND the best block is in the deeper half with S >=
  CHANCE_FACTOR x its shuffled-label score; contradicted when the shallower half wins both ways; else unresolved."""
  layers = analysis["layers"]
  if not layers:
    return {"verdict": "unresolved", "reason": "no MoE layer"}
  deep = [name for name, layer in layers.items() if layer["block"] >= depth / 2]
  shallow = [name for name in layers if name not in deep]
  best = max(layers, key=lambda name: layers[name]["specialization"])
  best_layer = layers[best]
  above = best_layer["specialization"] >= CHANCE_FACTOR * best_layer["chance_specialization"]
  mean = lambda names: float(np.mean([layers[n]["specialization"] for n in names])) if names else float("nan")
  deep_mean, shallow_mean = mean(deep), mean(shallow)
  if not shallow:
    result = "reproduced" if above else "unresolved"
  elif above and best in deep and deep_mean > shallow_mean:
    result = "reproduced"
  elif above and best in shallow and shallow_mean > deep_mean:
    result = "contradicted"
  else:
    result = "unresolved"
  return {"verdict": result, "best_block": best, "best_S": best_layer["specialization"],
          "best_chance": best_layer["chance_specialization"], "deep_mean_S": deep_mean,
          "shallow_mean_S": shallow_mean}


# Routing analyses of the all-MoE points

def routing_analyses(rows: list[dict], output_root, analyze, seed: int = 0) -> dict:
  """`analyze(workdir, output_dir=...)` (scripts/run_study.py passes vimoe.train.workdir.analyze_workdir, which
  saves routing_log.npz there) on the finished all-blocks points of `seed` (shared off and on), into
  OUTPUT_ROOT/routing_shared{0,1}/. Returns {shared: analysis (plus "digits": digit_specialization,
  "output_dir")}."""
  out = {}
  if not rows:
    return out
  depth = max(row["depth"] for row in rows)
  for shared in (0, 1):
    matches = [row for row in rows if row["L"] == depth and row["shared"] == shared and row["seed"] == seed
               and row["finished"]]
    if not matches:
      continue
    row = matches[0]
    output_dir = pathlib.Path(output_root) / f"routing_shared{shared}"
    analysis = analyze(row["workdir"], output_dir=output_dir)
    analysis["digits"] = digit_specialization(output_dir / "routing_log.npz")
    analysis["output_dir"] = str(output_dir)
    analysis["point"] = row["point"]
    out[shared] = analysis
  return out


# Figure and report

def plot_accuracy_vs_L(summary: dict, path) -> pathlib.Path:
  """Top-1 vs L with 95 % CI bars, shared expert off and on; the dense fine-tune as a horizontal band (its CI)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  figure = Figure(figsize=(6, 4), layout="constrained")
  axis = figure.subplots()
  arms = summary["arms"]
  dense = arms.get("dense")
  if dense:
    half = dense["half"] if math.isfinite(dense["half"]) else 0.0
    axis.axhspan(dense["mean"] - half, dense["mean"] + half, color="grey", alpha=0.25, label="dense (95% CI)")
    axis.axhline(dense["mean"], color="grey", linewidth=1)
  for shared, shift in ((0, -0.04), (1, 0.04)):
    members = sorted((arm for arm in arms.values() if arm["L"] > 0 and arm["shared"] == shared),
                     key=lambda arm: arm["L"])
    if not members:
      continue
    x = [arm["L"] + shift for arm in members]
    y = [arm["mean"] for arm in members]
    error = [arm["half"] if math.isfinite(arm["half"]) else 0.0 for arm in members]
    axis.errorbar(x, y, yerr=error, marker="o", capsize=3, label="shared expert" if shared else "no shared expert")
  axis.set_xticks(summary["Ls"])
  axis.set_xlabel("L (MoE in the last L blocks)")
  axis.set_ylabel("held-out top-1 (points; mean, 95% CI over seeds)")
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  path = pathlib.Path(path)
  figure.savefig(path, dpi=120)
  return path


def _points(value: float, digits: int = 2) -> str:
  return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _interval_text(interval: dict) -> str:
  if interval["n"] < 2:
    return f"{_points(interval['mean'])} (n={interval['n']}, no interval)"
  return (f"{interval['mean']:+.2f} ± {interval['half']:.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}] "
          f"(n={interval['n']})")


def _json_ready(value):
  if isinstance(value, dict):
    return {str(key): _json_ready(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(item) for item in value]
  if isinstance(value, (np.floating, float)):
    return None if not math.isfinite(float(value)) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


def report_markdown(summary: dict, routing: dict, depth: int, *, times: dict | None = None,
                    figure: str | None = None, unfinished=()) -> str:
  """study.md: tables, figure, routing, claims, CI target."""
  lines = ["# ViMoE placement study (issue 12): fine-tuned from the stage-1 backbone", ""]
  seeds = summary["complete_seeds"]
  lines.append(f"{summary['num_arms']} arms; seeds finished by every arm: {seeds or 'none'}. Top-1 on the held-out "
               f"pairs in points (x100); intervals are 95 % t-intervals over seeds; differences are paired by seed.")
  if times:
    total = times.get("total_s")
    stage = {key: sum(run.get(key, 0.0) for run in times.get("invocations", []))
             for key in ("stage1_s", "stage2_s", "report_s")}
    lines.append(f"Wall time (all invocations): {_minutes(total)} = stage 1 {_minutes(stage['stage1_s'])}, stage 2 "
                 f"{_minutes(stage['stage2_s'])}, report {_minutes(stage['report_s'])}; mean time per trained point "
                 f"{_points(summary['point_seconds'], 0)} s.")
  if unfinished:
    lines.append(f"Not finished (left out): {', '.join(unfinished)}.")
  lines += ["", "## Accuracy per arm", "",
            "| arm | L | shared | seeds | mean ± 95% CI | seed std | per seed |", "|---|---|---|---|---|---|---|"]
  for name, arm in summary["arms"].items():
    per_seed = ", ".join(f"{value:.2f}" for _, value in sorted(arm["values"].items()))
    ci = f"{arm['mean']:.2f}" + (f" ± {arm['half']:.2f}" if math.isfinite(arm["half"]) else "")
    lines.append(f"| {name} | {arm['L']} | {arm['shared'] if arm['L'] else '-'} | {arm['n']} | {ci} | "
                 f"{_points(arm['std'])} | {per_seed} |")
  if figure:
    lines += ["", f"![top-1 vs L]({figure})"]
  holm = summary.get("holm", {})
  lines += ["", "## Paired differences vs the dense fine-tune (MoE arm minus dense, points)", "",
            "| arm | mean ± 95% CI [low, high] | resolved (Holm) |", "|---|---|---|"]
  for name, interval in summary["vs_dense"].items():
    lines.append(f"| {name} | {_interval_text(interval)} | {_resolved(holm.get(f'{name} minus dense', interval))} |")
  lines += ["", "## Shared minus no-shared at each L (points)", "",
            f"| L | mean ± 95% CI [low, high] | resolved (Holm) | sd of differences | half-width <= "
            f"{TARGET_POINTS:g}? | seeds for ±{TARGET_POINTS:g} | extra minutes |", "|---|---|---|---|---|---|---|"]
  for L, interval in summary["shared_vs_no_shared"].items():
    extra = interval["extra_minutes"]
    lines.append(f"| {L} | {_interval_text(interval)} | "
                 f"{_resolved(holm.get(f'shared minus no-shared, L={L}', interval))} | {_points(interval['std'])} | "
                 f"{'yes' if interval['meets_target'] else 'no'} | {interval['seeds_needed'] or 'n/a'} | "
                 f"{_points(extra, 0) if extra is not None else 'n/a'} |")
  if holm:
    lines += ["", f"## Holm-Bonferroni over the {sum(math.isfinite(e['p']) for e in holm.values())} comparisons "
              "of this report", "",
              "Two-sided paired t-test p; Holm-adjusted p; the interval at the level Holm tests the comparison at "
              "(it excludes 0 exactly when the adjusted p < 0.05). Verdicts below use these.", "",
              "| comparison | mean | p | Holm p | level | Holm interval [low, high] | resolved |",
              "|---|---|---|---|---|---|---|"]
    for name, entry in holm.items():
      level = f"{100 * entry['confidence']:.2f} %" if math.isfinite(entry["confidence"]) else "n/a"
      bounds = (f"[{entry['low']:+.2f}, {entry['high']:+.2f}]" if math.isfinite(entry["half"]) else "n/a")
      lines.append(f"| {name} | {_points(entry['mean'])} | {_points(entry['p'], 4)} | "
                   f"{_points(entry['p_holm'], 4)} | {level} | {bounds} | {'yes' if entry['resolved'] else 'no'} |")
  lines += ["", f"Extra minutes: (seeds needed - seeds run) x {summary['num_arms']} arms x the measured time per point "
            "(all arms are rerun per seed to keep the comparisons paired)."]
  lines += ["", f"## Routing of the all-MoE models (L={depth}, seed 0)", ""]
  for shared, analysis in routing.items():
    lines += [f"### shared expert {'on' if shared else 'off'} ({analysis['point']})", "",
              "| block | l | S | shuffled-label S | S(tens) | S(units) | H(E) bits |", "|---|---|---|---|---|---|---|"]
    for name, layer in analysis["layers"].items():
      digit = analysis["digits"].get(name, {})
      lines.append(f"| {name} | {layer['l']} | {layer['specialization']:.3f} | "
                   f"{layer['chance_specialization']:.3f} | {digit.get('tens', float('nan')):.3f} | "
                   f"{digit.get('units', float('nan')):.3f} | {max(layer['expert_entropy'], 0.0):.2f} |")
    directory = pathlib.Path(analysis["output_dir"]).name
    lines += ["", f"![routing, shared={shared}]({directory}/routing_all.png)", "",
              "Layer-keep advice: " + analysis["recommendation"]["text"].replace("\n", " "), ""]
  if not routing:
    lines.append("No finished all-MoE point of seed 0: no routing analysis.")
  lines += ["", "## The paper's claims", ""]
  lines += claim_lines(summary, routing, depth)
  return "\n".join(lines) + "\n"


def claim_lines(summary: dict, routing: dict, depth: int) -> list[str]:
  lines = []
  flat = summary["flatness"]
  if 0 in flat and 1 in flat:
    difference = flat.get("difference")
    lines.append(
        f"- (a) The shared expert stabilises and flattens accuracy across L: **{flat.get('holm_verdict', 'unresolved')}"
        f"** after Holm (unadjusted: {flat['verdict']}). Spread "
        f"(max - min over L) of the arm means: {flat[1]['spread_of_means']:.2f} with, {flat[0]['spread_of_means']:.2f} "
        f"without; mean seed std per arm: {_points(flat[1]['mean_seed_std'])} with, "
        f"{_points(flat[0]['mean_seed_std'])} without; per-seed spread, shared minus no-shared: "
        f"{_interval_text(difference)}.")
  else:
    lines.append("- (a) The shared expert stabilises and flattens accuracy across L: **unresolved** (an arm is "
                 "missing).")
  verdicts = {shared: specialization_verdict(analysis, depth) for shared, analysis in routing.items()}
  if verdicts:
    values = {v["verdict"] for v in verdicts.values()}
    overall = values.pop() if len(values) == 1 else "unresolved"
    parts = [f"shared={shared}: {v['verdict']} (best {v['best_block']} S={v['best_S']:.3f} vs shuffled "
             f"{v['best_chance']:.3f}; mean S deeper half {v['deep_mean_S']:.3f}, shallower half "
             f"{_points(v['shallow_mean_S'], 3)})" for shared, v in verdicts.items()]
    lines.append(f"- (b) Deep layers specialise by class: **{overall}** (one seed per setting). " + "; ".join(parts)
                 + ".")
  else:
    lines.append("- (b) Deep layers specialise by class: **unresolved** (no routing analysis).")
  many = summary["too_many_layers"]
  if many:
    for shared, result in many.items():
      lines.append(f"- (c) Too many sparse layers hurt with little data (shared={shared}): "
                   f"**{result.get('holm_verdict', 'unresolved')}** after Holm (unadjusted: {result['verdict']}). "
                   f"L={result['all_L']} minus the best other L={result['best_other_L']}: {_interval_text(result)} "
                   f"(the best L is picked on these runs, which favours the claim).")
  else:
    lines.append("- (c) Too many sparse layers hurt with little data: **unresolved** (arms missing).")
  return lines


def _resolved(interval: dict) -> str:
  """'better' / 'worse' when the interval (a Holm interval in the report) excludes 0, else 'no'."""
  if interval["n"] < 2 or not math.isfinite(interval["half"]):
    return "n/a"
  if interval["high"] < 0:
    return "worse"
  if interval["low"] > 0:
    return "better"
  return "no"


def _minutes(seconds) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "n/a"
  return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def write_report(workdir, *, times: dict | None = None, routing_seed: int = 0, analyze_routing=None,
                 num_arms: int | None = None) -> dict:
  """Reads WORKDIR/sweep, writes WORKDIR/study.md, study.json, study_accuracy_vs_L.png and, with
  `analyze_routing` (see routing_analyses; None: none), the routing analyses. `times` (run_study.py's
  study_times.json) gives the wall times and the time per point; `num_arms` the arms of the sweep (default: those
  found), what an extra seed costs. Returns {"summary", "routing", "paths"}."""
  workdir = pathlib.Path(workdir)
  rows = collect_points(workdir / "sweep")
  if not rows:
    raise FileNotFoundError(f"no point workdirs under {workdir / 'sweep'}")
  depth = max(row["depth"] for row in rows)
  point_times = list((times or {}).get("points", {}).values())
  point_seconds = float(np.mean(point_times)) if point_times else None
  summary = summarize(arm_values(rows), point_seconds=point_seconds, num_arms=num_arms)
  routing = routing_analyses(rows, workdir, analyze_routing, routing_seed) if analyze_routing else {}
  figure = plot_accuracy_vs_L(summary, workdir / "study_accuracy_vs_L.png")
  unfinished = [row["point"] for row in rows if not row["finished"]]
  text = report_markdown(summary, routing, depth, times=times, figure=figure.name, unfinished=unfinished)
  md_path = workdir / "study.md"
  md_path.write_text(text)
  claims = {"flatness": summary["flatness"]["verdict"],
            "flatness_holm": summary["flatness"].get("holm_verdict", "unresolved"),
            "too_many_layers_holm": {shared: r["holm_verdict"] for shared, r in summary["too_many_layers"].items()},
            "holm_resolved": [name for name, entry in summary["holm"].items() if entry["resolved"]],
            "specialization": {shared: specialization_verdict(a, depth) for shared, a in routing.items()},
            "too_many_layers": {shared: r["verdict"] for shared, r in summary["too_many_layers"].items()}}
  routing_numbers = {shared: {"point": a["point"], "recommendation": a["recommendation"], "digits": a["digits"],
                              "layers": {name: {key: layer[key] for key in ("block", "l", "specialization",
                                                                              "chance_specialization",
                                                                              "expert_entropy", "expert_load")}
                                         for name, layer in a["layers"].items()}}
                     for shared, a in routing.items()}
  json_path = workdir / "study.json"
  json_path.write_text(json.dumps(_json_ready({"depth": depth, "summary": summary, "claims": claims,
                                               "routing": routing_numbers, "unfinished": unfinished,
                                               "times": times}), indent=1) + "\n")
  return {"summary": summary, "routing": routing, "claims": claims,
          "paths": {"markdown": md_path, "json": json_path, "figure": figure}}
