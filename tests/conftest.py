# The multi-device tests need XLA_FLAGS set before jax is imported, so they run in their own pytest process
# (tests/test_multidevice.py starts it); the TPU compile tests need libtpu, so they run in .venv-tpu
# (tests/test_tpu_compile.py starts it). The main session collects neither.
collect_ignore = ["multidevice", "tpu"]

import os
import pathlib
import sys

import pytest

# Tests import the repo's configs/ package (configs/*.py are plain modules with get_config()).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


@pytest.fixture
def subprocess_env(tmp_path_factory) -> dict:
  """Environment for the processes a test starts: CPU, no progress bars, and one persistent XLA compilation cache
  for the whole pytest session (every process builds the same tiny model; a warm cache cuts each start-up's
  compilations, about 25 s of a 35 s tiny run here, to almost nothing)."""
  cache = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
  return dict(os.environ, VIMOE_NO_PROGRESS="1", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
