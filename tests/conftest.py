# The multi-device tests need XLA_FLAGS set before jax is imported, so they run in their own pytest process
# (tests/test_multidevice.py starts it); the main session does not collect them.
collect_ignore = ["multidevice"]

import pathlib
import sys

# Tests import the repo's configs/ package (configs/*.py are plain modules with get_config()).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
