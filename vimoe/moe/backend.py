"""Which platform the MoE code is being compiled for.

Usually the default backend, but not when compiling ahead of time for another one: `memory_report.py --topology`
runs on a CPU host and compiles for a TPU slice, whose mesh devices say "tpu". Choices that depend on the
platform (the dropless exchange, `grouped_matmul="auto"`) ask `target_platform()`, never `jax.default_backend()`.
"""

from __future__ import annotations

import jax


def target_platform(mesh=None) -> str:
  """'cpu', 'gpu' or 'tpu': the platform of `mesh`'s devices (default: the ambient mesh, `with jax.set_mesh(mesh):`),
  else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  device = None if getattr(mesh, "empty", False) else getattr(mesh, "abstract_device", None)
  platform = device.platform if device is not None else jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm") else platform
