"""Runs tests/multidevice in a separate pytest process with 8 fake CPU devices."""

import os
import pathlib
import subprocess
import sys


def test_multidevice_suite():
  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(root / "tests" / "multidevice")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1200)
  print(result.stdout[-6000:], result.stderr[-3000:])
  assert result.returncode == 0, "multi-device tests failed:\n" + result.stdout[-6000:] + result.stderr[-3000:]
  assert " passed" in result.stdout
