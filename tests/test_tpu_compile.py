"""Runs tests/tpu (compiles for real TPU slices ahead of time) in a separate pytest process with the libtpu venv.

That venv (.venv-tpu, built by `make test` / `make tpu-venv`) is kept apart because every jax process of a venv
with libtpu loads the TPU plugin and takes /tmp/libtpu_lockfile; the trainings and the multi-process tests of this
session must not. Without it the test is skipped, except in CI (CI=true), where it fails."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tpu_python() -> str | None:
  python = os.environ.get("VIMOE_TPU_PYTHON") or str(ROOT / ".venv-tpu" / "bin" / "python")
  return python if pathlib.Path(python).exists() else None


def test_tpu_compile_suite():
  python = tpu_python()
  if python is None:
    message = "no libtpu venv (.venv-tpu): run `make tpu-venv`, or `make test`, which builds it"
    if os.environ.get("CI"):
      pytest.fail(message)
    pytest.skip(message)
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu", VIMOE_NO_PROGRESS="1")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(ROOT / "tests" / "tpu")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  print(result.stdout[-8000:])
  assert result.returncode == 0, "TPU compile tests failed:\n" + result.stdout[-8000:] + result.stderr[-3000:]
  assert " passed" in result.stdout
