"""Multi-host start-up: one process per host (TPU pod slice) or per GPU/node (SLURM, Open MPI, manual).

Call `initialize()` first thing in a script, before anything touches a device. It is a no-op for a single
process, so the same script runs on a laptop and on a pod.
"""

from __future__ import annotations

import logging
import os

import jax

_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _looks_multi_process() -> bool:
  if any(os.environ.get(name) for name in _MULTI_PROCESS_ENV):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  # Cloud TPU VMs list every worker of the slice.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, force: bool = False) -> bool:
  """Starts `jax.distributed` when this run spans several processes. Returns True if it did.

  With no arguments jax detects TPU pods, SLURM and Open MPI itself; pass the three values for a manual launch
  (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
  """
  manual = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not (force or manual or _looks_multi_process()):
    return False
  kwargs = {}
  if manual:
    kwargs = {"coordinator_address": manual,
              "num_processes": num_processes or int(os.environ["JAX_NUM_PROCESSES"]),
              "process_id": process_id if process_id is not None else int(os.environ["JAX_PROCESS_ID"])}
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  """True on the process that writes logs, metrics and checkpoints metadata (process 0)."""
  return jax.process_index() == 0


def per_process_batch_size(global_batch_size: int) -> int:
  """Each process loads its own slice of the global batch."""
  if global_batch_size % jax.process_count():
    raise ValueError(f"batch_size={global_batch_size} must be divisible by the {jax.process_count()} processes")
  return global_batch_size // jax.process_count()
