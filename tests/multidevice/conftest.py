import jax
import pytest


@pytest.fixture(autouse=True, scope="session")
def eight_devices():
  if jax.device_count() != 8:
    pytest.fail("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_multidevice.py does)")

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo's configs/ package
