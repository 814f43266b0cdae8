"""vimoe.parallel.aot's pure parts, checked by hand: collective bytes read off HLO text, the roofline, chip lookup,
and the clear error when libtpu is missing (this venv has none; the compiles themselves are tests/tpu)."""

import pytest

from vimoe.parallel import aot

HLO = """
HloModule jit_step
%body (p: f32[4]) -> f32[4] {
  %ar.1 = f32[4]{0} all-reduce(f32[4]{0} %p), channel_id=9, to_apply=%add
}
ENTRY %main (a: f32[1024,512], b: bf16[8,64,128]) -> f32[] {
  %all-reduce.3 = f32[1024,512]{1,0:T(8,128)} all-reduce(%a), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %all-reduce.4 = (f32[16]{0}, bf16[32,2]{1,0}) all-reduce(%x, %y), channel_id=2, to_apply=%add
  %all-gather-start = (bf16[8,64,128]{2,1,0}, bf16[64,64,128]{2,1,0}) all-gather-start(%b), dimensions={0}
  %all-gather-done = bf16[64,64,128]{2,1,0} all-gather-done(%all-gather-start)
  %all-to-all.7 = bf16[8,64,128]{2,1,0} all-to-all(%b), dimensions={0}, metadata={op_name="all-reduce(fake)"}
  %ragged-all-to-all.1 = bf16[4096,512]{1,0} ragged-all-to-all(%r, %o, %i0, %s0, %i1, %s1), channel_id=4
  %fusion.2 = f32[1024,512]{1,0} fusion(%all-reduce.3), kind=kLoop, calls=%fused
  %cp-start = (f32[2,3]{1,0}, f32[2,3]{1,0}, u32[], u32[]) collective-permute-start(%q), source_target_pairs={{0,1}}
  ROOT %r = f32[] reduce(%fusion.2, %zero), dimensions={0,1}, to_apply=%add
}
"""


def test_collective_bytes_by_hand():
  out = aot.collective_bytes(HLO)
  # all-reduce: 4 floats in the loop body, 1024*512 floats, and a combined op of 16 floats + 32*2 bf16s.
  assert out["all-reduce"] == {"count": 3, "bytes": 4 * 4 + 1024 * 512 * 4 + 16 * 4 + 64 * 2}
  assert out["all-gather"] == {"count": 1, "bytes": 64 * 64 * 128 * 2}          # the result, not the operand; done: no
  assert out["all-to-all"] == {"count": 1, "bytes": 8 * 64 * 128 * 2}
  assert out["ragged-all-to-all"] == {"count": 1, "bytes": 4096 * 512 * 2}
  assert out["collective-permute"] == {"count": 1, "bytes": 2 * 3 * 4}
  assert set(out) == {"all-reduce", "all-gather", "all-to-all", "ragged-all-to-all", "collective-permute"}


def test_roofline_by_hand():
  chip = aot.CHIPS["v5e"]
  # 197e12 FLOP at 197 TFLOP/s: 1 s of compute; 819e9 bytes at 819 GB/s: 1 s of HBM traffic.
  r = aot.roofline(197e12, 0.5 * 819e9, chip)
  assert r["compute_s"] == pytest.approx(1.0) and r["memory_s"] == pytest.approx(0.5)
  assert r["step_s"] == pytest.approx(1.0) and r["bound"] == "compute" and r["mfu"] == pytest.approx(1.0)
  r = aot.roofline(0.25 * 197e12, 2 * 819e9, chip)
  assert r["step_s"] == pytest.approx(2.0) and r["bound"] == "HBM bandwidth" and r["mfu"] == pytest.approx(0.125)


class _Memory:
  argument_size_in_bytes, output_size_in_bytes, alias_size_in_bytes = 100, 90, 80
  temp_size_in_bytes, generated_code_size_in_bytes = 7, 3


def test_peak_bytes_counts_aliased_outputs_once():
  assert aot.peak_bytes(_Memory()) == 100 + (90 - 80) + 7 + 3


@pytest.mark.parametrize("name, message", [("v9:2x2", "unknown TPU generation 'v9'"), ("v5e", "not 'generation:shape'"),
                                           ("v5e:2by4", "not 'generation:shape'")])
def test_bad_topology_names_say_what_is_valid(name, message):
  with pytest.raises(ValueError, match=message) as error:
    aot.check_topology_name(name)
  assert "v5e:2x4" in str(error.value)


def test_chips_cover_the_generations_that_compile_here():
  assert {name.split(":")[0] for name in aot.EXAMPLE_TOPOLOGIES} == set(aot.CHIPS)
  assert aot.chip_for("v5p:4x4x4").hbm_bytes == 95 * 10**9


def test_missing_libtpu_is_explained():
  pytest.importorskip("jax")
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import
    pytest.skip("this venv has libtpu")
  except ImportError:
    pass
  with pytest.raises(RuntimeError, match="make tpu-venv"):
    aot.get_topology("v5e:2x2")


@pytest.mark.parametrize("topology, message", [("v9:2x2", "unknown TPU generation 'v9'"), ("v5e:2x2", "needs libtpu")])
def test_memory_report_bad_topology_is_one_line(topology, message):
  import pathlib, subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    if topology == "v5e:2x2":
      pytest.skip("this venv has libtpu")
  except ImportError:
    pass
  root = pathlib.Path(__file__).resolve().parent.parent
  result = subprocess.run([sys.executable, str(root / "scripts" / "memory_report.py"), "--config",
                           str(root / "configs" / "quickstart.py"), "--topology", topology], capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("memory_report.py: ") and message in lines[-1]
  assert "Traceback" not in result.stderr
