"""Ahead-of-time compilation for real TPU slices on a machine without one: topologies, chips, and what a compiled
program costs (collective bytes, a roofline).

    topology = get_topology("v5e:2x4")          # needs libtpu (pip install -e '.[tpu-aot]', make tpu-venv)
    mesh = parallel.make_mesh(expert=8, devices=topology.devices)
    compiled = jax.jit(f).lower(*abstract_args_with_shardings).compile()
    collective_bytes(compiled.as_text()), roofline(compiled.cost_analysis(), chip_for(topology))

The TPU compiler itself (libtpu) does the work: `memory_analysis()` and `cost_analysis()` of the executable are
its own, for the chip of the slice. No TPU is needed, only libtpu, which is kept in its own venv: with libtpu
installed every jax process of a venv loads the TPU plugin and takes /tmp/libtpu_lockfile, so a second concurrent
process fails unless ALLOW_MULTIPLE_LIBTPU_LOAD=1 is set (`enable_concurrent_libtpu`, before jax starts).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures of a TPU generation (Google Cloud TPU documentation, system architecture pages:
  cloud.google.com/tpu/docs/v4, /v5e, /v5p-training, /v6e)."""
  name: str
  peak_bf16_flops: float     # FLOP/s, dense bf16 matmul peak
  hbm_bytes: int             # HBM capacity per chip
  hbm_bytes_per_s: float     # HBM bandwidth per chip
  source: str


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * 2**30, 1200e9, "cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB HBM2, "
               "1200 GBps"),
    "v5e": Chip("TPU v5e", 197e12, 16 * 10**9, 819e9, "cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GB HBM2, "
                "819 GBps"),
    "v5p": Chip("TPU v5p", 459e12, 95 * 10**9, 2765e9, "cloud.google.com/tpu/docs/v5p-training: 459 TFLOPs bf16, "
                "95 GB HBM2e, 2765 GBps"),
    "v6e": Chip("TPU v6e", 918e12, 32 * 10**9, 1638e9, "cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GB HBM, "
                "1638 GBps"),
}

# Examples of slices that compile here; any `generation:shape` libtpu knows works.
EXAMPLE_TOPOLOGIES = ("v4:2x2x1", "v4:2x2x2", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5p:2x2x1", "v5p:2x2x2",
                      "v5p:4x4x4", "v6e:2x2", "v6e:2x4")


def enable_concurrent_libtpu() -> None:
  """Lets several processes load libtpu at once (compile-only use: none of them owns a TPU). Call before jax
  initialises its backends."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def chip_for(topology_name: str) -> Chip:
  """The Chip of a topology name such as 'v5e:2x4' (the part before the colon)."""
  generation = topology_name.split(":", 1)[0].lower()
  if generation not in CHIPS:
    raise ValueError(f"--topology {topology_name!r}: unknown TPU generation {generation!r}; known: "
                     f"{', '.join(CHIPS)} (e.g. {', '.join(EXAMPLE_TOPOLOGIES)})")
  return CHIPS[generation]


def check_topology_name(name: str) -> None:
  """'generation:AxB[xC]' with a known generation; a ValueError names what is wrong."""
  chip_for(name)
  if not re.fullmatch(r"[a-z0-9]+:\d+(x\d+){1,2}", name.lower()):
    raise ValueError(f"--topology {name!r} is not 'generation:shape' (e.g. {', '.join(EXAMPLE_TOPOLOGIES[:4])})")


def get_topology(name: str):
  """jax's TopologyDescription of a TPU slice ('v5e:2x4'), compiled for by libtpu without a TPU attached."""
  check_topology_name(name)
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise RuntimeError(f"--topology {name}: compiling for TPU needs libtpu, which this Python "
                       f"({os.sys.executable}) does not have. Run `make tpu-venv` and use .venv-tpu/bin/python "
                       f"(or pip install -e '.[tpu-aot]' into a venv of its own)") from None
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return topologies.get_topology_desc(topology_name=name, platform="tpu")


# Collectives in compiled HLO text.

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute",
               "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
# `%name = TYPE op-name(` with TYPE an array type or a tuple of them; async pairs as op-start / op-done.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(
    sorted(COLLECTIVES, key=len, reverse=True)) + r")(-start|-done)?\(")


def _array_bytes(type_text: str) -> list[float]:
  return [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype]
          for dtype, dims in _ARRAY.findall(type_text)]


def collective_bytes(hlo_text: str) -> dict[str, dict[str, float]]:
  """{collective: {"count": ops, "bytes": result bytes per device}} over an HLO module's text.

  Each collective counts once with the bytes of its result (a combined op: all its results; an async `-start`
  whose result is a tuple of operand and result buffers: its largest array; `-done` is not counted again). Ops inside loop bodies count once
  per appearance in the text, not per trip: a collective in a scan over microbatches runs that many times more.
  """
  out: dict[str, dict[str, float]] = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None or match.group(3) == "-done":
      continue
    type_text, op, suffix = match.groups()
    sizes = _array_bytes(type_text)
    if not sizes:
      continue
    # An async all-gather / permute / reduce-scatter start returns (operand(s), result, ...): count the result; a
    # combined all-reduce (several operands in one op, async or not) returns them all: count them all.
    nbytes = max(sizes) if suffix == "-start" and op != "all-reduce" else sum(sizes)
    entry = out.setdefault(op, {"count": 0, "bytes": 0.0})
    entry["count"] += 1
    entry["bytes"] += nbytes
  return out


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> dict[str, float]:
  """Lower bound on one step's time from the chip's peaks, and the MFU it would give.

  step_s = max(flops / peak FLOP/s, bytes_accessed / HBM bandwidth); mfu = flops / (step_s * peak), 1 when the
  step is compute-bound. Collective time and overheads are not in it (an optimistic bound): `flops` and
  `bytes_accessed` are the compiler's per-device counts (remat's recomputation included)."""
  compute_s = flops / chip.peak_bf16_flops
  memory_s = bytes_accessed / chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  return {"compute_s": compute_s, "memory_s": memory_s, "step_s": step_s,
          "bound": "compute" if compute_s >= memory_s else "HBM bandwidth",
          "mfu": flops / (step_s * chip.peak_bf16_flops) if step_s > 0 else 0.0}


def peak_bytes(memory_analysis) -> int:
  """Per-device bytes live at the step's peak: arguments + outputs not aliased to a donated argument + temporaries
  (+ generated code)."""
  m = memory_analysis
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
          + m.generated_code_size_in_bytes)
