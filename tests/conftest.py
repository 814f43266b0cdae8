# The multi-device tests need XLA_FLAGS set before jax is imported, so they run in their own pytest process
# (tests/test_multidevice.py starts it); the main session does not collect them.
collect_ignore = ["multidevice"]
