"""TPU compile tests: run in the venv with libtpu (.venv-tpu, `make tpu-venv`), started by tests/test_tpu_compile.py.
They compile for real TPU slices ahead of time (jax.experimental.topologies); no TPU is attached or needed."""

import os
import pathlib
import sys

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo's configs/ and scripts/


@pytest.fixture(autouse=True, scope="session")
def libtpu_present():
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  except ImportError:
    pytest.fail(f"{sys.executable} has no libtpu: run these tests with .venv-tpu/bin/python (make tpu-venv)")
