"""The benchmarks' C probes (tools/bench_sft.py, tools/bench_inference.py):
they compile, run at tiny sizes and report plausible figures.  Timing itself
is not tested here."""

import os
import platform
import shutil
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not (shutil.which("cc") or shutil.which("gcc")),
    reason="the probes are x86-64 C compiled at run time",
)


def _avx2_fma():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@pytest.fixture(scope="module")
def bench_inference():
    import bench_inference as bi

    return bi


def test_burst_probe_reads(bench_inference):
    probe = bench_inference.BurstReadProbe()
    try:
        assert probe.error is None, probe.error
        for threads in (1, 2):
            r = probe.run(threads, chunk_bytes=1 << 20, chunks=3, pool=8, calls=5, flush_bytes=8 << 20)
            assert r is not None
            assert set(r) == {"gbs", "q1", "q3", "best"}
            assert 0.05 < r["gbs"] < 10000.0
            assert r["q1"] <= r["gbs"] <= r["q3"] <= r["best"]
        # more chunks than the pool holds, or none: refused, not a crash
        assert probe.run(1, 1 << 20, chunks=9, pool=8, calls=2, flush_bytes=1 << 20) is None
        assert probe.run(1, 1 << 20, chunks=0, pool=8, calls=2, flush_bytes=1 << 20) is None
    finally:
        probe.close()


@pytest.mark.skipif(not _avx2_fma(), reason="the FMA peak kernel needs AVX2 and FMA")
def test_fma_probe_rate(bench_inference):
    from bench_sft import FmaProbe

    probe = FmaProbe()
    try:
        assert probe.error is None, probe.error
        best = probe.run(1, 0.01)
        one = probe.rate(1, 0.01)
        assert best is not None and one is not None
        assert 0.5 < one < 10000.0 and 0.5 < best < 10000.0
    finally:
        probe.close()


def _avx512f():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _avx512f(), reason="the 512-bit FMA peak kernel needs AVX-512F")
def test_fma_probe_zmm(bench_inference):
    """The zmm kernel (the avx512 and amx tiers' reference) compiles, runs
    and counts 16 lanes: at least the 256-bit rate less noise, at most
    twice it plus noise."""
    from bench_sft import FmaProbe, peak_zmm_for

    assert peak_zmm_for("avx512") and peak_zmm_for("amx") and not peak_zmm_for("avx2")
    ymm, zmm = FmaProbe(), FmaProbe(zmm=True)
    try:
        assert zmm.error is None, zmm.error
        y = [ymm.run(1, 0.01) for _ in range(3)]
        z = [zmm.run(1, 0.01) for _ in range(3)]
        assert None not in y and None not in z
        assert 0.6 * max(y) < max(z) < 2.6 * max(y)
    finally:
        ymm.close()
        zmm.close()
