#!/usr/bin/env python3
"""Benchmark one SFT step of a ktmoe MoE layer (forward_sft + backward).

Shape: DeepSeek-V2-Lite MoE layer, E=64 experts, top-k=6, H=2048, I=1408,
LoRA rank r=16, alpha=32, on all three projections (gate, up, down).
Methods: one (--method, default AMXBF16_SFT) or several in one process
(--methods all, or a comma list; see the end of this text).  The bf16 base weights
are built once; each method's layer quantizes them at load
(load_weights_from_tensors), is timed at every qlen, then closed and dropped
(gc.collect()) before the next one is built, so one ktmoe layer is alive at a
time.  Each row reports the resident bytes of the layer's frozen weights
(``wrapper.weight_bytes``) and their ratio to the bf16 size 3*E*H*I*2.
One *step* = ``forward_sft(x, ids, weights, save_for_backward=True)`` followed
by ``backward(grad_output, return_grad_weights=True)``.
Routing: random distinct top-k experts per token (top-k of random logits) with
softmax weights over the selected logits.

FLOP count (what "GFLOP/s" means here; elementwise work such as silu, the
routing-weight products and grad_weights is not counted):

    base  = 2*3*q*k*H*I   (forward: gate, up, down GEMMs)
          + 2*3*q*k*H*I   (backward: dh = dy Wd, dx from gate and from up)
    lora  = 2*3*q*k*r*(H+I) * 3
            (per projection the forward costs 2*q*k*r*(in+out); the backward
             costs twice that: the input gradient through B then A, and the
             gradients of A and B; x3 projections)
    step FLOPs = base + lora          <- used for GFLOP/s and % of peak

Peak: the machine's FP32 FMA peak is *measured* in the same run by a small C
micro-kernel (AVX2+FMA: 12 independent ymm accumulators doing vfmadd231ps in a
loop, one pthread per core, --threads threads), compiled at run time with
``cc -O2 -mavx2 -mfma -pthread``. It is reported as "unknown" when there is no
C compiler or the CPU lacks AVX2/FMA. For the avx512 and amx tiers (on a CPU
with AVX-512F) the same kernel runs on zmm registers (``-mavx512f``): on CPUs
with two full-width 512-bit FMA units that peak is twice the AVX2 one, on
CPUs that split 512-bit operations in two it is the same.

Baseline: a plain-PyTorch **fp32** implementation of the same layer (per-expert
loop: gather the expert's rows, F.linear with fp32 base weights plus LoRA
terms (x @ A.T @ B.T * s), silu(gate) * up, down + LoRA, times the routing
weight, index_add_ into the output), with torch autograd computing the
gradients of x, of the routing weights and of the six LoRA tensors (base
weights have requires_grad=False), torch.set_num_threads(--threads). It is
fed the same values as the ktmoe run (hidden states rounded to --dtype, LoRA
rounded to --lora-dtype, bf16 base weights, then computed in fp32), and the
relative difference of the two outputs is printed as a sanity check (for the
INT methods it is mostly the quantization error of the weights).  It is
measured once per qlen, after all ktmoe layers, and shared by every method's
row.  "speedup" = torch step time / ktmoe step time.  GFLOP/s counts the same
nominal FLOPs for every method (dequantization work is not counted).

Each measurement: one warm-up iteration, then --repeat timed iterations; the
median is reported.  Before that, each ktmoe layer runs untimed rounds of
one step at every qlen (largest first) until a round takes almost no page
faults (warm_up_ktmoe, at most 4 rounds), and once per process the malloc
threshold is primed (prime_allocator): without it the first method of the
process was timed while each backward still faulted in fresh pages for its
returned gradients (~70 ms a step on a 2-core VM) and looked slower.
Peak RSS is resource.getrusage(RUSAGE_SELF).ru_maxrss; "huge MiB" is the
process's anonymous memory on transparent huge pages after the warm-up
(the weights ask for them; where the kernel found none, steps take TLB
misses).  Each row also gives "other load", the CPU other processes used
meanwhile (OtherLoad).

Usage:
    python tools/bench_sft.py [--qlens 1,128,512] [--threads N] [--repeat 3]
        [--method AMXBF16_SFT | --methods all|M1,M2,...] [--group-size 128]
        [--no-zero-point] [--isa avx2] [--no-torch] [--json out.json]
        [--large-qlen 1024 --large-repeat 1] [--torch-max-qlen 2048]
        [--paired-qlens 512] [--paired-repeat 15]

--paired-qlens / --paired-repeat N: the qlens whose rows also get "% paired"
(each step run again, followed by the FMA peak kernel for as long as the
step took; the median of the per-step ratios, and its quartiles from 4
steps on), and how many such steps (default: the row's timed iterations).

--large-qlen Q / --large-repeat N: qlens >= Q get N timed iterations instead
of --repeat (steps at qlen 4096 take seconds each); --torch-max-qlen Q times
the PyTorch loop only at qlens <= Q (rows above it have no speedup).

A --methods item is a method name, optionally with ":zp" or ":nozp" (the
zero_point option of AMXINT4_KGroup_SFT; without one, zero_point=True unless
--no-zero-point is given); "all" (ALL_METHODS) is
AMXBF16_SFT, AMXINT8_SFT, AMXINT4_SFT, AMXINT4_1_SFT, AMXINT4_KGroup_SFT:zp,
AMXINT4_KGroup_SFT:nozp, AMXINT4_1KGroup_SFT, AMXFP8_SFT, MXFP4_SFT.  K-group
methods use --group-size (default 128; MXFP4's groups are always 32).

Frozen-experts methods (``X_SkipLoRA``) may be listed too: no expert LoRA,
the backward computes grad_input and the routing-weight gradient only.  Their
GFLOP/s count the base FLOPs only, their "speedup" is still against the
PyTorch loop *with* LoRA (compare their step time with the X_SFT row), and
no output difference is printed (the torch loop has LoRA).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

# DeepSeek-V2-Lite MoE layer
E, K, H, I, R, ALPHA = 64, 6, 2048, 1408, 16, 32.0

LORA_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

#: what --methods all runs: (method, zero_point); zero_point only matters for
#: AMXINT4_KGroup_SFT
ALL_METHODS = (
    ("AMXBF16_SFT", True),
    ("AMXINT8_SFT", True),
    ("AMXINT4_SFT", True),
    ("AMXINT4_1_SFT", True),
    ("AMXINT4_KGroup_SFT", True),
    ("AMXINT4_KGroup_SFT", False),
    ("AMXINT4_1KGroup_SFT", True),
    ("AMXFP8_SFT", True),
    ("MXFP4_SFT", True),
)

#: bytes of the frozen weights in bf16 (gate, up, down): the ratio's reference
BF16_WEIGHT_BYTES = 3 * E * H * I * 2


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------


def step_flops(q: int, k: int = K, h: int = H, i: int = I, r: int = R):
    """(base FLOPs, LoRA FLOPs) of one forward+backward step, see module doc."""
    base = 2 * 3 * q * k * h * i + 2 * 3 * q * k * h * i
    lora = 2 * 3 * q * k * r * (h + i) * 3
    return base, lora


# ---------------------------------------------------------------------------
# FP32 FMA peak micro-kernel
# ---------------------------------------------------------------------------

#: The threading frame of the run-time compiled C probes (this tool's FMA
#: peak, bench_inference's DRAM read loop): argv[1] threads, each pinned to
#: one allowed CPU (kt_pin), started together at a barrier; kt_run returns
#: the wall time from the first thread's g_t0 to the last one's g_t1.
C_THREADS_HARNESS = r"""
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int g_nthreads, g_ncpus, g_cpus[1024];
static pthread_barrier_t g_barrier;
static double g_t0[1024], g_t1[1024];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void kt_pin(int id) {
    if (g_ncpus > 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(g_cpus[id % g_ncpus], &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
}

static double kt_run(void *(*worker)(void *)) {
    pthread_t th[1024];
    pthread_barrier_init(&g_barrier, NULL, (unsigned)g_nthreads);
    for (int i = 0; i < g_nthreads; ++i) pthread_create(&th[i], NULL, worker, (void *)(long)i);
    for (int i = 0; i < g_nthreads; ++i) pthread_join(th[i], NULL);
    pthread_barrier_destroy(&g_barrier);
    double t0 = g_t0[0], t1 = g_t1[0];
    for (int i = 1; i < g_nthreads; ++i) {
        if (g_t0[i] < t0) t0 = g_t0[i];
        if (g_t1[i] > t1) t1 = g_t1[i];
    }
    return t1 - t0;
}

static void kt_init_threads(int argc, char **argv) {
    g_nthreads = argc > 1 ? atoi(argv[1]) : 1;
    if (g_nthreads < 1) g_nthreads = 1;
    if (g_nthreads > 1024) g_nthreads = 1024;
    cpu_set_t allowed;
    g_ncpus = 0;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0)
        for (int c = 0; c < CPU_SETSIZE && g_ncpus < 1024; ++c)
            if (CPU_ISSET(c, &allowed)) g_cpus[g_ncpus++] = c;
}
"""

PEAK_C_SOURCE = C_THREADS_HARNESS + r"""
/* KT_PEAK_ZMM: 512-bit vectors (AVX-512F), else 256-bit (AVX2 + FMA) */
#ifdef KT_PEAK_ZMM
typedef __m512 kt_vec;
#define KT_LANES 16
#define kt_set1 _mm512_set1_ps
#define kt_add _mm512_add_ps
#define kt_storeu _mm512_storeu_ps
#else
typedef __m256 kt_vec;
#define KT_LANES 8
#define kt_set1 _mm256_set1_ps
#define kt_add _mm256_add_ps
#define kt_storeu _mm256_storeu_ps
#endif

static long g_iters;
static float g_sink[1024];

static void *worker(void *arg) {
    int id = (int)(long)arg;
    kt_pin(id);
    kt_vec x = kt_set1(1e-8f + 1e-10f * (float)id);
    kt_vec y = kt_set1(0.999f);
    kt_vec a0 = kt_set1(0.0f), a1 = kt_set1(1.0f), a2 = kt_set1(2.0f);
    kt_vec a3 = kt_set1(3.0f), a4 = kt_set1(4.0f), a5 = kt_set1(5.0f);
    kt_vec a6 = kt_set1(6.0f), a7 = kt_set1(7.0f), a8 = kt_set1(8.0f);
    kt_vec a9 = kt_set1(9.0f), a10 = kt_set1(10.0f), a11 = kt_set1(11.0f);
    pthread_barrier_wait(&g_barrier);
    g_t0[id] = now();
    for (long it = 0; it < g_iters; ++it) {
        /* 12 independent dependency chains, each one vfmadd231ps */
        __asm__ volatile(
            "vfmadd231ps %[x], %[y], %[a0]\n\t"
            "vfmadd231ps %[x], %[y], %[a1]\n\t"
            "vfmadd231ps %[x], %[y], %[a2]\n\t"
            "vfmadd231ps %[x], %[y], %[a3]\n\t"
            "vfmadd231ps %[x], %[y], %[a4]\n\t"
            "vfmadd231ps %[x], %[y], %[a5]\n\t"
            "vfmadd231ps %[x], %[y], %[a6]\n\t"
            "vfmadd231ps %[x], %[y], %[a7]\n\t"
            "vfmadd231ps %[x], %[y], %[a8]\n\t"
            "vfmadd231ps %[x], %[y], %[a9]\n\t"
            "vfmadd231ps %[x], %[y], %[a10]\n\t"
            "vfmadd231ps %[x], %[y], %[a11]\n\t"
            : [a0] "+v"(a0), [a1] "+v"(a1), [a2] "+v"(a2), [a3] "+v"(a3),
              [a4] "+v"(a4), [a5] "+v"(a5), [a6] "+v"(a6), [a7] "+v"(a7),
              [a8] "+v"(a8), [a9] "+v"(a9), [a10] "+v"(a10), [a11] "+v"(a11)
            : [x] "v"(x), [y] "v"(y));
    }
    g_t1[id] = now();
    kt_vec s = kt_add(kt_add(kt_add(a0, a1), kt_add(a2, a3)),
                             kt_add(kt_add(a4, a5), kt_add(a6, a7)));
    s = kt_add(s, kt_add(kt_add(a8, a9), kt_add(a10, a11)));
    float tmp[KT_LANES];
    kt_storeu(tmp, s);
    g_sink[id] = tmp[0] + tmp[KT_LANES - 1];
    return NULL;
}

static double run(long iters) {
    g_iters = iters;
    return kt_run(worker);
}

int main(int argc, char **argv) {
    kt_init_threads(argc, argv);
    double target = argc > 2 ? atof(argv[2]) : 0.25; /* seconds per trial; argv[3]: trials (5) */
    long iters = 1 << 16;
    double t = run(iters);
    while (t < 0.05) { iters *= 4; t = run(iters); }
    iters = (long)((double)iters * target / t) + 1;
    int trials = argc > 3 ? atoi(argv[3]) : 5;
    double best = 0.0;
    for (int trial = 0; trial < (trials > 0 ? trials : 1); ++trial) {
        t = run(iters);
        double gflops = (double)iters * 12.0 * KT_LANES * 2.0 * (double)g_nthreads / t * 1e-9;
        if (gflops > best) best = gflops;
    }
    float sink = 0.0f;
    for (int i = 0; i < g_nthreads; ++i) sink += g_sink[i];
    printf("GFLOPS=%.3f threads=%d iters=%ld sink=%g\n", best, g_nthreads, iters, (double)sink);
    return 0;
}
"""


class _CProbe:
    """A C micro-benchmark compiled once per run into a temporary directory."""

    SOURCE = ""
    FLAGS = ("-O2", "-mavx2", "-pthread")

    def __init__(self, extra_flags=()):
        self.exe, self.error, self._tmp = None, None, None
        if platform.machine() not in ("x86_64", "AMD64"):
            self.error = f"not x86-64 ({platform.machine()})"
            return
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not cc:
            self.error = "no C compiler"
            return
        self.cc = os.path.basename(cc)
        self._tmp = tempfile.TemporaryDirectory(prefix="ktmoe_probe_")
        src, exe = os.path.join(self._tmp.name, "probe.c"), os.path.join(self._tmp.name, "probe")
        with open(src, "w") as f:
            f.write(self.SOURCE)
        try:
            r = subprocess.run([cc, *self.FLAGS, *extra_flags, "-o", exe, src], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.error = f"compile failed: {e}"
            return
        if r.returncode != 0:
            self.error = "compile failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
            return
        self.exe = exe

    def close(self):
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class FmaProbe(_CProbe):
    """PEAK_C_SOURCE compiled once: ``run(threads, seconds)`` -> the best of 5
    trials of ``seconds`` each (GFLOP/s or None), a quick look at what the
    cores deliver right now (a VM's vCPU slows down when its host's SMT
    sibling or neighbours get busy, which /proc/stat does not show);
    ``rate(threads, seconds)`` -> one trial of ``seconds``: the peak kernel
    over the same span as a timed step, for a paired ratio.  zmm: 512-bit
    FMAs (AVX-512F), the peak of the avx512 and amx tiers' vector code."""

    SOURCE = PEAK_C_SOURCE
    FLAGS = ("-O2", "-mavx2", "-mfma", "-pthread")

    def __init__(self, zmm: bool = False):
        self.zmm = zmm
        super().__init__(("-mavx512f", "-DKT_PEAK_ZMM") if zmm else ())

    def run(self, threads: int, seconds: float = 0.02, trials: int = 5):
        if self.exe is None:
            return None
        try:
            r = subprocess.run([self.exe, str(threads), str(seconds), str(trials)], capture_output=True,
                               text=True, timeout=120 + 2 * trials * seconds)
        except (OSError, subprocess.TimeoutExpired):
            return None
        m = re.search(r"GFLOPS=([0-9.]+)", r.stdout)
        return float(m.group(1)) if r.returncode == 0 and m else None

    def rate(self, threads: int, seconds: float):
        return self.run(threads, max(seconds, 0.01), 1)


def _cpu_flags():
    """The CPU's /proc/cpuinfo flags, or None where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def _cpu_has_avx2_fma() -> bool:
    flags = _cpu_flags()
    if flags is None:
        return platform.machine() in ("x86_64", "AMD64")  # let the binary try
    return "avx2" in flags and "fma" in flags


def peak_zmm_for(tier) -> bool:
    """Whether the FP32 peak to compare a tier with is the 512-bit one: the
    avx512 and amx tiers' vector code runs on zmm registers (on CPUs with two
    full-width 512-bit FMA units that peak is twice the AVX2 one)."""
    flags = _cpu_flags()
    return tier in ("avx512", "amx") and bool(flags) and "avx512f" in flags


def measure_fp32_peak(threads: int, zmm: bool = False):
    """Return (GFLOP/s or None, note): FmaProbe, 5 trials of 0.25 s, the best."""
    if platform.machine() in ("x86_64", "AMD64") and not _cpu_has_avx2_fma():
        return None, "CPU lacks AVX2/FMA"
    probe = FmaProbe(zmm)
    try:
        if probe.exe is None:
            return None, probe.error
        gflops = probe.run(threads, 0.25)
        if gflops is None:
            return None, "run failed"
        kind = "AVX-512 (zmm)" if zmm else "AVX2"
        return gflops, f"{kind} FMA micro-kernel, {threads} threads, compiled with {probe.cc}"
    finally:
        probe.close()


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def make_weights(seed: int = 0):
    """bf16 base weights ~ N(0, 1/fan_in) and LoRA factors (both A and B non-zero)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(shape, scale):
        return (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16).contiguous()

    gate = rnd((E, I, H), 1 / math.sqrt(H))
    up = rnd((E, I, H), 1 / math.sqrt(H))
    down = rnd((E, H, I), 1 / math.sqrt(I))
    s = ALPHA / R
    b_scale = 0.2 / (math.sqrt(R) * s)
    loras = {
        "gate_lora_a": torch.randn(E, R, H, generator=gen) / math.sqrt(H),
        "gate_lora_b": torch.randn(E, I, R, generator=gen) * b_scale,
        "up_lora_a": torch.randn(E, R, H, generator=gen) / math.sqrt(H),
        "up_lora_b": torch.randn(E, I, R, generator=gen) * b_scale,
        "down_lora_a": torch.randn(E, R, I, generator=gen) / math.sqrt(I),
        "down_lora_b": torch.randn(E, H, R, generator=gen) * b_scale,
    }
    return gate, up, down, loras


def make_batch(q: int, seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(10_000 + seed)
    logits = torch.randn(q, E, generator=gen)
    vals, ids = torch.topk(logits, K, dim=1)  # distinct experts per token
    weights = torch.softmax(vals, dim=1).float().contiguous()
    x = torch.randn(q, H, generator=gen).to(dtype).contiguous()
    go = (torch.randn(q, H, generator=gen) * 1e-2).to(dtype).contiguous()
    return x, ids.to(torch.int64).contiguous(), weights, go


# ---------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------


def _proc_mib(path: str, key: str):
    """The "key: N kB" line of a /proc file, in MiB, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_mib():
    """Resident set size now (Linux /proc), or None."""
    return _proc_mib("/proc/self/status", "VmRSS")


def current_huge_mib():
    """Anonymous memory of this process on transparent huge pages (Linux
    /proc/self/smaps_rollup), or None: the weights and caches ask for them
    (madvise), and whether the kernel found free 2 MiB pages shows in the
    step times (TLB misses)."""
    return _proc_mib("/proc/self/smaps_rollup", "AnonHugePages")


def loadavg1():
    """1-minute load average (other processes compete for the cores), or None."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


class OtherLoad:
    """CPU used by everything but this process while a block runs, in cores
    (Linux /proc/stat busy + steal time minus this process's own CPU time,
    divided by the wall time).  ~0 on a quiet machine; 1.0 means another
    process kept one core busy on average.  None where /proc is missing."""

    @staticmethod
    def _busy_s():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal (guest is inside user)
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
        return busy / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        t = os.times()
        self._b0, self._own0, self._w0 = self._busy_s(), t.user + t.system, time.perf_counter()
        self.cores = None
        return self

    def __exit__(self, *exc):
        b1 = self._busy_s()
        t = os.times()
        wall = time.perf_counter() - self._w0
        if self._b0 is not None and b1 is not None and wall > 0:
            self.cores = max(0.0, ((b1 - self._b0) - (t.user + t.system - self._own0)) / wall)
        return False


def peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        return kb / 2**20
    return kb / 1024.0


def median_ms(samples):
    return 1e3 * statistics.median(samples)


def _faults() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt


def prime_allocator() -> None:
    """Put glibc's malloc in the state a process reaches after some work.

    backward() returns six fresh LoRA-gradient tensors (~42 MB fp32, 5.8-8 MB
    each) per call.  In a fresh process these are mmap'ed and page-faulted in
    anew on every call (~8-13k faults, ~70 ms per backward on a 2-core VM, at
    qlen 1 as at qlen 512) until malloc's dynamic mmap threshold has grown
    past their size; that happened only while the *first* layer of the
    process ran, so whichever method came first looked slower.  Freeing one
    31 MiB block (below glibc's 32 MiB cap on the dynamic threshold) raises
    the threshold at once; the grad tensors then come from the heap and are
    reused without faults, as in every later layer.  No effect elsewhere."""
    t = torch.empty(31 * 2**20, dtype=torch.uint8)
    t[::4096] = 1  # touch it, so the block is really mapped
    del t


def warm_up_ktmoe(wrapper, qlens, x_dtype: torch.dtype, max_rounds: int = 4):
    """Untimed steps, one at every qlen (largest first) per round, until a
    round takes (almost) no page faults (the first round allocates the
    layer's caches and scratch); returns [faults per round]."""
    per_round = []
    batches = [make_batch(q, seed=q, dtype=x_dtype) for q in sorted(set(qlens), reverse=True)]
    for _ in range(max_rounds):
        f0 = _faults()
        for x, ids, weights, go in batches:
            wrapper.forward_sft(x, ids, weights, save_for_backward=True)
            wrapper.backward(go, return_grad_weights=True)
        per_round.append(_faults() - f0)
        if len(per_round) > 1 and per_round[-1] <= 256:
            break
    return per_round


def bench_ktmoe(wrapper, q: int, repeat: int, x_dtype: torch.dtype, paired=None):
    """Median (fwd, bwd, step) ms, the last output (fp32 copy) and, with
    ``paired`` (a callable seconds -> GFLOP/s), [(step s, the FMA peak kernel's
    GFLOP/s over as long, run right after it)] for each timed iteration."""
    x, ids, weights, go = make_batch(q, seed=q, dtype=x_dtype)
    fwd, bwd, step, pairs = [], [], [], []
    out = None
    for it in range(repeat + 1):  # iteration 0 = warm-up
        t0 = time.perf_counter()
        out = wrapper.forward_sft(x, ids, weights, save_for_backward=True)
        t1 = time.perf_counter()
        wrapper.backward(go, return_grad_weights=True)
        t2 = time.perf_counter()
        if it > 0:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            step.append(t2 - t0)
            if paired is not None:
                pairs.append((t2 - t0, paired(t2 - t0)))
    return median_ms(fwd), median_ms(bwd), median_ms(step), out.float().clone(), pairs


class TorchMoE:
    """Plain-PyTorch fp32 reference implementation (per-expert loop + autograd)."""

    def __init__(self, gate, up, down, loras):
        self.gate = gate.float()  # requires_grad=False (frozen)
        self.up = up.float()
        self.down = down.float()
        self.loras = {n: t.detach().float().clone().requires_grad_(True) for n, t in loras.items()}
        self.s = ALPHA / R

    def forward(self, x, ids, weights):
        L = self.loras
        s = self.s
        q = x.shape[0]
        out = torch.zeros(q, H, dtype=torch.float32)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E).tolist()
        tok_all = order // K
        slot_all = order % K
        start = 0
        for e in range(E):
            c = counts[e]
            if c == 0:
                continue
            tok = tok_all[start:start + c]
            slot = slot_all[start:start + c]
            start += c
            xe = x[tok]
            g = F.linear(xe, self.gate[e]) + (xe @ L["gate_lora_a"][e].T @ L["gate_lora_b"][e].T) * s
            u = F.linear(xe, self.up[e]) + (xe @ L["up_lora_a"][e].T @ L["up_lora_b"][e].T) * s
            h = F.silu(g) * u
            y = F.linear(h, self.down[e]) + (h @ L["down_lora_a"][e].T @ L["down_lora_b"][e].T) * s
            out.index_add_(0, tok, y * weights[tok, slot].unsqueeze(1))
        return out


def bench_torch(model: TorchMoE, q: int, repeat: int, x_dtype: torch.dtype):
    """Median (fwd, bwd, step) ms and the last output. Same inputs as the
    ktmoe run (x rounded to x_dtype, then computed in fp32)."""
    x0, ids, w0, go = make_batch(q, seed=q, dtype=x_dtype)
    x0, go = x0.float(), go.float()
    fwd, bwd, step = [], [], []
    for it in range(repeat + 1):
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        for t in model.loras.values():
            t.grad = None
        t0 = time.perf_counter()
        out = model.forward(x, ids, w)
        t1 = time.perf_counter()
        out.backward(go)
        t2 = time.perf_counter()
        assert x.grad is not None and w.grad is not None
        assert all(t.grad is not None for t in model.loras.values())
        if it > 0:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            step.append(t2 - t0)
    return median_ms(fwd), median_ms(bwd), median_ms(step), out.detach()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_qlens(text: str):
    vals = [int(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError("qlens must be positive integers, e.g. 1,128,512")
    return vals


def parse_methods(text: str, default_zero_point: bool):
    """--methods text -> list of (method, zero_point); names are checked
    against ktmoe later (importing ktmoe may rebuild it)."""
    out = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if item.lower() == "all":
            out.extend(ALL_METHODS)
            continue
        name, _, opt = item.partition(":")
        if opt not in ("", "zp", "nozp"):
            raise argparse.ArgumentTypeError(f"bad --methods item {item!r}: suffix must be ':zp' or ':nozp'")
        out.append((name, default_zero_point if opt == "" else opt == "zp"))
    if not out:
        raise argparse.ArgumentTypeError("--methods is empty")
    return out


def describe_method(method: str, group_size: int, zero_point: bool):
    """(label, format text, QuantSpec) of one method configuration."""
    from ktmoe.quant import QuantSpec

    spec = QuantSpec(method.replace("_SkipLoRA", "_SFT"), group_size, bool(zero_point))
    spec.check_cols(H, "hidden_size")
    spec.check_cols(I, "moe_intermediate_size")
    label = method
    if spec.kgroup and method == "AMXINT4_KGroup_SFT":
        label += ":zp" if zero_point else ":nozp"
    fmt = spec.format + (f"/g{spec.group_size}" if spec.kgroup else "")
    return label, fmt, spec


def print_table(hdr, table, blank_before=()):
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(hdr)]
    print(" | ".join(h.rjust(w) for h, w in zip(hdr, widths)))
    print("-+-".join("-" * w for w in widths))
    for n, r in enumerate(table):
        if n in blank_before:
            print("-+-".join("-" * w for w in widths))
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qlens", type=parse_qlens, default=[1, 128, 512], help="comma-separated (default 1,128,512)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default os.cpu_count())")
    p.add_argument("--repeat", type=int, default=3, help="timed iterations after one warm-up (median reported)")
    p.add_argument("--method", default=None, help="one SFT method (default AMXBF16_SFT)")
    p.add_argument("--methods", default=None,
                   help="'all' or a comma list of methods, each optionally ':zp'/':nozp' "
                        "(AMXINT4_KGroup_SFT's zero_point); run in this order in one process")
    p.add_argument("--group-size", type=int, default=128, help="group_size of the K-group methods (default 128)")
    p.add_argument("--no-zero-point", action="store_true",
                   help="zero_point=False for AMXINT4_KGroup_SFT given without a suffix")
    p.add_argument("--isa", default=None, help="force a ktmoe tier (ref, avx2, ...); default: best usable")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="hidden states dtype for ktmoe (default bf16)")
    p.add_argument("--lora-dtype", choices=sorted(DTYPES), default="fp32", help="LoRA parameter dtype (default fp32)")
    p.add_argument("--no-torch", action="store_true", help="skip the plain-PyTorch fp32 baseline")
    p.add_argument("--torch-max-qlen", type=int, default=None,
                   help="time the PyTorch loop only at qlens <= this (default: every qlen)")
    p.add_argument("--large-qlen", type=int, default=None,
                   help="qlens >= this use --large-repeat timed iterations (default: off)")
    p.add_argument("--large-repeat", type=int, default=1, help="timed iterations at qlens >= --large-qlen (default 1)")
    p.add_argument("--no-peak", action="store_true", help="skip the FP32 FMA peak measurement")
    p.add_argument("--paired-qlens", default="512",
                   help="qlens whose ktmoe rows also get the paired peak ('%% paired'; comma list, default 512; "
                        "'none': off)")
    p.add_argument("--paired-repeat", type=int, default=None,
                   help="steps of the paired peak per row (default: the row's timed iterations); more steps "
                        "give a steadier median on a machine whose speed drifts")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeat < 1 or args.large_repeat < 1:
        p.error("--threads, --repeat and --large-repeat must be >= 1")
    if args.paired_repeat is not None and args.paired_repeat < 1:
        p.error("--paired-repeat must be >= 1")

    def repeat_for(q):
        return args.large_repeat if args.large_qlen is not None and q >= args.large_qlen else args.repeat

    torch_qlens = [q for q in args.qlens if args.torch_max_qlen is None or q <= args.torch_max_qlen]
    if args.method is not None and args.methods is not None:
        p.error("give --method or --methods, not both")
    zp_default = not args.no_zero_point
    try:
        if args.methods is not None:
            method_list = parse_methods(args.methods, zp_default)
        else:
            method_list = [(args.method or "AMXBF16_SFT", zp_default)]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))

    import ktmoe

    unknown = sorted({m for m, _ in method_list if m not in ktmoe.SFT_METHODS})
    if unknown:
        p.error(f"unknown method(s) {unknown}; SFT methods: {sorted(ktmoe.SFT_METHODS)}")
    try:
        variants = [(m, zp) + describe_method(m, args.group_size, zp) for m, zp in method_list]
    except (TypeError, ValueError) as e:
        p.error(str(e))

    torch.set_num_threads(args.threads)
    info = ktmoe.cpu_info()
    x_dtype = DTYPES[args.dtype]
    lora_dtype = DTYPES[args.lora_dtype]

    print("ktmoe SFT benchmark: one step = forward_sft(save_for_backward=True) + backward(return_grad_weights=True)")
    print(f"  layer     : DeepSeek-V2-Lite MoE  E={E} k={K} H={H} I={I} r={R} alpha={ALPHA:g}")
    print(f"  cpu       : {info.get('cpu')}   tier: {args.isa or info.get('selected_tier')} "
          f"(selected_tier={info.get('selected_tier')}, usable={info.get('usable_tiers')})")
    print("  methods   : " + ", ".join(f"{v[2]} ({v[3]})" for v in variants))
    print(f"  threads   : {args.threads} (cpuinfer_threads, torch.set_num_threads); os.cpu_count()={os.cpu_count()}")
    print(f"  dtypes    : hidden {args.dtype}, LoRA {args.lora_dtype}, base weights bf16 (quantized at load by "
          "the INT methods); torch baseline all fp32")
    print(f"  repeat    : {args.repeat} timed iterations after 1 warm-up, median"
          + (f"; {args.large_repeat} at qlen >= {args.large_qlen}" if args.large_qlen is not None else ""))
    print("  FLOPs     : step = base + lora, base = 2*3*q*k*H*I (fwd) + 2*3*q*k*H*I (bwd: dh, dx_gate, dx_up),")
    print("              lora = 2*3*q*k*r*(H+I)*3 (fwd + bwd input grad + A/B grads); GFLOP/s counts base + lora")
    print(f"  weights   : bf16 size 3*E*H*I*2 = {BF16_WEIGHT_BYTES / 2**20:.1f} MiB (the 'x bf16' reference)")

    zmm = peak_zmm_for(args.isa or info.get("selected_tier"))
    peak, peak_note = (None, "skipped (--no-peak)") if args.no_peak else measure_fp32_peak(args.threads, zmm)
    paired_q = set() if args.no_peak or args.paired_qlens == "none" else set(parse_qlens(args.paired_qlens))
    fma = FmaProbe(zmm) if paired_q and peak else None
    peak_txt = f"{peak:.1f} GFLOP/s" if peak else "unknown"
    print(f"  FP32 peak : {peak_txt} ({peak_note})")
    la = loadavg1()
    if la is not None:
        print(f"  load avg  : {la:.2f} (1 min) at start; os.cpu_count()={os.cpu_count()}")
    sys.stdout.flush()

    gate, up, down, loras = make_weights(seed=0)  # built once, shared by every method
    prime_allocator()
    kt_loras = {n: t.to(lora_dtype).contiguous() for n, t in loras.items()}
    del loras
    rss_base = current_rss_mib()

    rows = []
    method_rows = []
    kt_outs = {}
    for method, zp, label, fmt, spec in variants:
        wrapper_kwargs = dict(
            layer_idx=0,
            num_experts=E,
            num_experts_per_tok=K,
            hidden_size=H,
            moe_intermediate_size=I,
            num_gpu_experts=0,
            cpuinfer_threads=args.threads,
            threadpool_count=1,
            weight_path="",
            chunked_prefill_size=max(args.qlens),
            method=method,
            mode="sft",
            lora_rank=R,
            lora_alpha=ALPHA,
            max_cache_depth=1,
            group_size=args.group_size,
            zero_point=zp,
        )
        if args.isa is not None:
            wrapper_kwargs["isa"] = args.isa
        load_before = loadavg1()
        print(f"[{label}] loading ({fmt}) ...", end="", flush=True)
        wrapper = ktmoe.KTMoEWrapper(**wrapper_kwargs)
        t0 = time.perf_counter()
        wrapper.load_weights_from_tensors(gate, up, down, torch.arange(E))
        load_s = time.perf_counter() - t0
        skip = bool(getattr(wrapper, "skip_lora", False))
        if not skip:
            wrapper.init_lora_weights(*[kt_loras[n] for n in LORA_NAMES])
        wbytes = int(wrapper.weight_bytes)
        tier = getattr(wrapper, "isa", None)
        rss_loaded = current_rss_mib()
        print(f" {load_s:.1f} s, weights {wbytes / 2**20:.1f} MiB ({wbytes / BF16_WEIGHT_BYTES:.3f}x bf16), "
              f"tier {tier}; timing qlen " + ",".join(map(str, args.qlens)), flush=True)
        warm_faults = warm_up_ktmoe(wrapper, args.qlens, x_dtype)
        huge_warm = current_huge_mib()
        print(f"[{label}] warm-up: {len(warm_faults)} round(s) over all qlens, page faults per round "
              f"{warm_faults}, huge pages {huge_warm if huge_warm is not None else '?'} MiB", flush=True)
        for q in args.qlens:
            f0 = _faults()
            with OtherLoad() as other:
                fwd, bwd, step, kt_out, _ = bench_ktmoe(wrapper, q, repeat_for(q), x_dtype)
            row_faults = _faults() - f0
            # the paired peak: each step again, the FMA peak kernel right after
            # it for as long (outside the other-load window: it is load)
            pairs = (bench_ktmoe(wrapper, q, args.paired_repeat or repeat_for(q), x_dtype,
                                 lambda sec: fma.rate(args.threads, sec))[4]
                     if fma is not None and q in paired_q else [])
            if not skip:
                kt_outs[(label, q)] = kt_out
            base, lora = step_flops(q)
            lora = 0 if skip else lora
            gflops = (base + lora) / (step * 1e-3) * 1e-9
            ratios = [(base + lora) / t * 1e-9 / g for t, g in pairs if g]
            rows.append(dict(method=method, label=label, format=fmt, group_size=args.group_size if spec.kgroup else None,
                             zero_point=bool(zp) if method == "AMXINT4_KGroup_SFT" else None, isa=tier,
                             qlen=q, repeat=repeat_for(q), kt_fwd_ms=fwd, kt_bwd_ms=bwd, kt_step_ms=step,
                             flops_base=base, flops_lora=lora, gflops=gflops,
                             pct_peak=(100.0 * gflops / peak) if peak else None,
                             pct_paired_peak=100.0 * statistics.median(ratios) if ratios else None,
                             pct_paired_quartiles=([100.0 * v for v in statistics.quantiles(ratios, n=4)]
                                                   if len(ratios) >= 4 else None),
                             paired_steps=[dict(step_ms=1e3 * t, peak_gflops=g) for t, g in pairs],
                             weight_bytes=wbytes, weight_ratio_bf16=wbytes / BF16_WEIGHT_BYTES,
                             other_load_cores=other.cores, page_faults=row_faults))
        buffer_bytes = int(getattr(wrapper, "buffer_bytes", 0) or 0)
        rss_run = current_rss_mib()
        # one ktmoe layer alive at a time: free it before building the next
        if hasattr(wrapper, "close"):
            wrapper.close()
        del wrapper
        gc.collect()
        rss_freed = current_rss_mib()
        method_rows.append(dict(method=method, label=label, format=fmt, isa=tier, load_s=load_s,
                                loadavg1_before=load_before, loadavg1_after=loadavg1(),
                                warmup_rounds=len(warm_faults), warmup_page_faults=warm_faults,
                                weight_bytes=wbytes, weight_ratio_bf16=wbytes / BF16_WEIGHT_BYTES,
                                buffer_bytes_after_run=buffer_bytes, rss_mib_before_load=rss_base,
                                rss_mib_loaded=rss_loaded, rss_mib_after_run=rss_run, huge_mib_warm=huge_warm,
                                rss_mib_after_free=rss_freed))
    rss_kt = peak_rss_mib()

    torch_rows = []
    if not args.no_torch and torch_qlens:
        torch_load_before = loadavg1()
        print("[PyTorch fp32 loop] timing qlen " + ",".join(map(str, torch_qlens)), flush=True)
        model = TorchMoE(gate, up, down, kt_loras)  # same (possibly bf16-rounded) LoRA values
        del gate, up, down
        gc.collect()
        for q in torch_qlens:
            with OtherLoad() as other:
                tf, tb, ts, t_out = bench_torch(model, q, repeat_for(q), x_dtype)
            base, lora = step_flops(q)
            tg = (base + lora) / (ts * 1e-3) * 1e-9
            torch_rows.append(dict(qlen=q, repeat=repeat_for(q), torch_fwd_ms=tf, torch_bwd_ms=tb, torch_step_ms=ts, gflops=tg,
                                   pct_peak=(100.0 * tg / peak) if peak else None,
                                   weight_bytes=2 * BF16_WEIGHT_BYTES, weight_ratio_bf16=2.0,
                                   other_load_cores=other.cores))
            tnorm = torch.linalg.vector_norm(t_out).clamp_min(1e-30)
            for row in rows:
                if row["qlen"] != q:
                    continue
                row.update(torch_fwd_ms=tf, torch_bwd_ms=tb, torch_step_ms=ts, speedup=ts / row["kt_step_ms"])
                ref = kt_outs.get((row["label"], q))
                if ref is not None:
                    row.update(out_rel_err_vs_torch=float(torch.linalg.vector_norm(ref - t_out) / tnorm))
        del model
        for t in torch_rows:
            t.update(loadavg1_before=torch_load_before, loadavg1_after=loadavg1())
    rss_all = peak_rss_mib()
    if fma is not None:
        fma.close()

    def fmt_other(v):
        return f"{v:.2f}" if v is not None else "?"

    # ---- table: per qlen, the torch loop first, then every method ----
    hdr = ["qlen", "method", "format", "fwd ms", "bwd ms", "step ms", "GFLOP/s", "% peak", "% paired",
           "speedup", "weights MiB", "x bf16", "rel err", "other load"]
    table = []
    blank_before = []
    trow = {r["qlen"]: r for r in torch_rows}
    for q in args.qlens:
        if table:
            blank_before.append(len(table))
        t = trow.get(q)
        if t is not None:
            table.append([str(q), "PyTorch fp32 loop", "fp32", f"{t['torch_fwd_ms']:.2f}", f"{t['torch_bwd_ms']:.2f}",
                          f"{t['torch_step_ms']:.2f}", f"{t['gflops']:.1f}",
                          f"{t['pct_peak']:.1f}" if t["pct_peak"] is not None else "unknown", "-",
                          "1.00x", f"{t['weight_bytes'] / 2**20:.0f}", f"{t['weight_ratio_bf16']:.3f}", "-",
                          fmt_other(t["other_load_cores"])])
        for row in rows:
            if row["qlen"] != q:
                continue
            table.append([
                str(q), row["label"], row["format"],
                f"{row['kt_fwd_ms']:.2f}",
                f"{row['kt_bwd_ms']:.2f}",
                f"{row['kt_step_ms']:.2f}",
                f"{row['gflops']:.1f}",
                f"{row['pct_peak']:.1f}" if row["pct_peak"] is not None else "unknown",
                f"{row['pct_paired_peak']:.1f}" if row.get("pct_paired_peak") is not None else "-",
                f"{row['speedup']:.2f}x" if "speedup" in row else "-",
                f"{row['weight_bytes'] / 2**20:.0f}",
                f"{row['weight_ratio_bf16']:.3f}",
                f"{row['out_rel_err_vs_torch']:.1e}" if "out_rel_err_vs_torch" in row else "-",
                fmt_other(row["other_load_cores"]),
            ])
    print()
    print_table(hdr, table, blank_before)
    print("speedup = PyTorch fp32 step ms / ktmoe step ms (same qlen, same run); weights = resident frozen "
          "weights (wrapper.weight_bytes), x bf16 = / (3*E*H*I*2);")
    print("rel err = ||out_kt - out_torch|| / ||out_torch|| (torch: bf16 weights in fp32; for the INT methods "
          "mostly quantization error)")
    print("other load = cores used by other processes (and VM steal) during that row's timed iterations; "
          "well above 0 on a machine with --threads cores means the row's times are inflated")
    print()
    def fmt_load(a, b):
        return f"{a:.2f} -> {b:.2f}" if a is not None and b is not None else "?"

    mhdr = ["method", "format", "tier", "load s", "weights MiB", "x bf16", "RSS MiB loaded", "RSS MiB after free",
            "huge MiB", "loadavg(1m)"]
    mtable = [[m["label"], m["format"], str(m["isa"]), f"{m['load_s']:.1f}", f"{m['weight_bytes'] / 2**20:.1f}",
               f"{m['weight_ratio_bf16']:.3f}",
               f"{m['rss_mib_loaded']:.0f}" if m["rss_mib_loaded"] is not None else "?",
               f"{m['rss_mib_after_free']:.0f}" if m["rss_mib_after_free"] is not None else "?",
               f"{m['huge_mib_warm']:.0f}" if m["huge_mib_warm"] is not None else "?",
               fmt_load(m["loadavg1_before"], m["loadavg1_after"])]
              for m in method_rows]
    print_table(mhdr, mtable)
    if torch_rows:
        print(f"PyTorch fp32 loop: loadavg(1m) {fmt_load(torch_rows[0]['loadavg1_before'], torch_rows[0]['loadavg1_after'])}")
    print(f"(loadavg above ~{args.threads} while this runs means other processes shared the cores: "
          "timings are then inflated, the torch loop's OpenMP threads suffer most)")
    if rss_base is not None:
        print(f"(RSS {rss_base:.0f} MiB before the first load: the shared bf16 weights, "
              f"{BF16_WEIGHT_BYTES / 2**20:.0f} MiB, and LoRA)")
    print()
    print(f"peak RSS: {rss_kt:.0f} MiB after the ktmoe runs, {rss_all:.0f} MiB at the end"
          + ("" if args.no_torch else " (incl. the fp32 torch baseline)"))
    paired_rows = [r for r in rows if r.get("pct_paired_peak") is not None]
    if paired_rows:
        print()
        print("paired peak: the row's steps again, each followed by the FP32 FMA peak kernel for as long as it took; "
              "% paired = median of step GFLOP/s / that kernel's GFLOP/s (a machine that slows down for minutes "
              "slows both); per step: step ms @ kernel GFLOP/s")
        for r in paired_rows:
            qs = r.get("pct_paired_quartiles")
            print(f"  qlen {r['qlen']} {r['label']}: {r['pct_paired_peak']:.1f} % paired"
                  + (f" (quartiles {qs[0]:.1f} {qs[2]:.1f}; {len(r['paired_steps'])} steps)" if qs else "") + " ("
                  + ", ".join(f"{p['step_ms']:.0f} ms @ {p['peak_gflops']:.0f}" for p in r["paired_steps"]) + ")")

    if args.json:
        result = dict(
            shape=dict(E=E, k=K, H=H, I=I, r=R, alpha=ALPHA),
            method=method_list[0][0] if len(method_list) == 1 else [v[2] for v in variants],
            methods=[dict(method=v[0], zero_point=v[1], label=v[2], format=v[3]) for v in variants],
            group_size=args.group_size,
            isa=args.isa,
            cpu_info=info,
            threads=args.threads,
            repeat=args.repeat,
            large_qlen=args.large_qlen,
            large_repeat=args.large_repeat,
            torch_max_qlen=args.torch_max_qlen,
            hidden_dtype=args.dtype,
            lora_dtype=args.lora_dtype,
            flops_formula="base=2*3*q*k*H*I (fwd) + 2*3*q*k*H*I (bwd); lora=2*3*q*k*r*(H+I)*3; gflops uses base+lora",
            bf16_weight_bytes=BF16_WEIGHT_BYTES,
            fp32_peak_gflops=peak,
            fp32_peak_note=peak_note,
            paired_qlens=sorted(paired_q),
            loadavg1_start=la,
            peak_rss_mib_kt=rss_kt,
            peak_rss_mib_end=rss_all,
            method_summary=method_rows,
            torch_rows=torch_rows,
            rows=rows,
        )
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
