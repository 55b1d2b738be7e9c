#!/usr/bin/env python3
"""Benchmark the inference forward of one ktmoe MoE layer (no LoRA).

Shapes (--shape): ``v2lite`` (default) DeepSeek-V2-Lite, E=64 experts, top-k=6,
H=2048, I=1408; ``v3`` DeepSeek-V3, E=256, k=8, H=7168, I=2048 (one layer is
about 5.6 GB in INT4, 11.3 GB in INT8).
Methods (--methods, default AMXINT4,AMXINT8,MOE_INT4,MOE_INT8): each is a
``ktmoe.KTMoEWrapper(..., mode="inference", method=M)`` layer; one layer is
alive at a time (closed and garbage-collected before the next is built), and
all of them share the process's one CPUInfer pool of --threads threads.

Weights: built packed, directly from random codes and positive random scales
(never a bf16 copy of the whole layer): a pool of S source experts
(--src-experts, default min(E, 64)) per method, in the method's own parts
(``ktmoe.quant.QuantSpec.part_shapes``: uint8 INT4 codes, int8 codes, fp32
scales of (0.5..1.5)/(sqrt(K)*code std), uint8 zero points 6..10), loaded with
``wrapper.load_packed_weights(gate, up, down, map, S)`` where physical expert
p takes source expert p % S.  The layer copies every physical expert into its
own memory, so the E experts are E distinct blocks of DRAM whatever S is.
Before each method the tool checks /proc/meminfo MemAvailable and skips the
method, saying so, when the layer, its source pool and 1 GiB of slack do not
fit.

Two forward paths are timed per method (--act), both ``wrapper.forward(x,
ids, weights)`` on the one loaded layer:
  * ``int8``: ``int8_activations=True`` (the wrapper's default): the integer
    kernels on activations quantized to int8 per block of 32
    (``ktmoe_forward_args.int8_activations`` in ktmoe.h);
  * ``fp32``: ``int8_activations=False``: fp32 activations, the fp32 kernels.
The tool sets the wrapper's ``int8_activations`` attribute before each call.
With a ktmoe whose wrapper has no such option, ``fp32`` is the plain
wrapper.forward() and ``int8`` calls the wrapper's own layer
(``ktmoe._native.NativeLayer.submit_forward(..., int8_activations=True)`` +
``cpu_infer.sync()``); the output says which.

Routing: every iteration has fresh random routing (distinct top-k of random
logits, softmax weights over them) and fresh bf16 hidden states; the same
pre-generated batches serve every method and the PyTorch baseline.  Between
timed calls the tool reads a buffer of twice the last-level cache (--no-flush
turns it off), so the routed experts' weights come from DRAM, not from the
cache (the previous call's experts could otherwise be partly cached: with
fresh routing ~k*k/E of them overlap).  The layer's weights must exceed the
LLC for that to mean anything; the tool prints both sizes.

Each timed call: flush the cache, then one untimed *wake* call (a forward
whose slots are all -1: it computes nothing but wakes the pool's threads,
which sleep after a few hundred microseconds idle; for PyTorch a small
parallel op that wakes its OpenMP threads), then the timed forward.  So "ms"
is a forward with cold weights and running threads; the cost of waking them
is shown apart ("idle ms").  Without the wake call and with a one-thread
flush, a 2-vCPU VM here paid +2-2.5 ms in a third to most of the calls (the
wake-up of a halted vCPU), which buried the bandwidth question.

Decode rows (qlen <= 16): median forward time over --decode-repeat calls
(after 1 warm-up), bytes of weights read per call = (distinct experts routed in
that call) * wrapper.weight_bytes / E, GB/s = bytes / time (median over the
calls), and that as a fraction of this machine's measured DRAM read bandwidth.
"hot ms": the same call repeated without flushing (weights cached as far as
they fit): the kernel's time when memory is not the limit.  "idle ms": the
flush, then --idle-ms (default 10) asleep, no wake call, as a CPU waiting for
the GPU between layers would: the pool's threads have gone to sleep and the
cores may have idled (on a VM: halted vCPUs), so the call also pays their
wake-up (20 calls).  "empty ms": a call whose slots are all -1 (no expert
computed), after a flush and a wake call: the fixed cost of one call with the
pool awake (Python checks, the task queue, the pool's phases).

Prefill rows (qlen > 16): median of --repeat calls; GFLOP/s with
FLOPs = 2*3*q*k*H*I (gate, up, down GEMMs; silu, the routing products and
dequantization are not counted), and the fraction of the FP32 FMA peak
measured by tools/bench_sft.py's micro-kernel (imported from there).

Measured DRAM read bandwidth, same run, --threads threads: (a) a C loop
compiled at run time (cc -O2 -mavx2 -pthread; one pinned pthread per thread,
each summing its own contiguous share of a --bw-mib buffer (default 1024 MiB,
first-touched by its reader) with 4 AVX2 accumulators), best of 7 passes;
(b) torch.sum of a float32 buffer of the same size with
torch.set_num_threads(threads), best of 7.  Both are measured at the start
and again at the end of the run (each retried up to 3 times while other
processes use > 0.25 cores); the run's reference ("% ref") is the largest of
the four.  Because the bandwidth a VM gets moves with its neighbours (34 vs
54 GB/s at the start and end of one run here), the C loop also runs just
before every decode row (--row-bw-mib, default 512 MiB, best of 5): "BW now",
and "% now" = the row's GB/s over it.  The issue's target is a qlen-1 INT4
forward at >= 70 % of the measured read bandwidth; the tool prints, for each
INT4 method and path, whether "% now" meets it (and "% ref" beside it).
"burst" (off with --no-burst): what a loop that only loads reads in a
decode call's conditions, measured just after each decode row: as many
random distinct chunks of one expert's packed size as the row's calls read
(out of E such chunks), after the same flush and an untimed wake-up, on
--threads threads that wait and take 256 KiB tiles as ktmoe's pool does
(BURST_C_SOURCE), median of --decode-repeat calls; "% burst" = the row's
GB/s over it.  A short cold read does not reach the streaming rate of "BW
now" (a 512 MiB pass), so "% burst" tells how much of the gap to the target
is the kernel's and how much the memory's.
"FMA now": bench_sft's FP32 FMA peak kernel (PEAK_C_SOURCE, imported),
5 x 20 ms just before each decode row: a vCPU whose host core is shared
(SMT sibling, neighbours) slows down without any "other load" in
/proc/stat; a row with FMA now well below the peak ran on slowed cores.

Baseline: plain PyTorch, torch.set_num_threads(threads): per routed expert,
F.linear(x_e, Wg), F.linear(x_e, Wu), silu(g)*u, F.linear(h, Wd), times the
routing weight, index_add_ into an fp32 output (cast to the input dtype).
--torch-dtypes (default bf16,fp32): ``bf16`` keeps weights and activations
in bf16 (the baseline the issue asks for); ``fp32`` stores the weights in
fp32 (twice the bytes) and computes in fp32 -- on CPU builds whose bf16
GEMM is slow for few rows (torch 2.13+cpu here: ~8 ms for one 1408x2048
bf16 GEMV, 0.3 ms in fp32) it is the stronger baseline.  Weights are random
N(0, 1/K); for v2lite all E experts (bf16 1056 MiB, fp32 2112 MiB), for v3 a
pool of --torch-pool experts (default 16: the whole layer would be 22.5 GB
in bf16) that expert e maps onto as e % pool.  Each is timed after all ktmoe
layers, with the same batches and flushes; "vs bf16" / "vs fp32" = torch
time / ktmoe time (> 1: ktmoe faster).

Accuracy check: for the first decode batch of each method and path, the
output against a float64 reference on the dequantized weights of the routed
experts (``ktmoe.quant.dequantize``), fp32 activations; the int8 path's
activation quantization adds ~0.5-1 %, the bf16 output rounding ~0.2 %.

Warm-up and allocator: the tool frees one 31 MiB block first
(bench_sft.prime_allocator), so glibc's malloc stops mmap'ing each call's
fresh output tensor (up to 7 MB at qlen 512) and faulting it in again; each
layer then runs untimed rounds of every qlen and path until a round takes
almost no page faults.  Each row gives the page faults of its timed calls and
"other load": the cores other processes used meanwhile (bench_sft.OtherLoad,
/proc/stat); well above 0 means the row's times are inflated.

Usage:
    python tools/bench_inference.py [--shape v2lite|v3] [--methods M1,M2,...]
        [--qlens 1,2,4,128,512] [--threads N] [--repeat 3] [--decode-repeat 50]
        [--act both|fp32|int8] [--group-size 128] [--no-zero-point] [--idle-ms 10]
        [--src-experts S] [--torch-pool P] [--torch-dtypes bf16,fp32] [--no-torch] [--no-peak] [--no-flush]
        [--bw-mib 1024] [--no-burst] [--isa avx2] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import glob
import inspect
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sft import (  # noqa: E402  (same directory: the house helpers)
    C_THREADS_HARNESS,
    FmaProbe,
    OtherLoad,
    _CProbe,
    _faults,
    current_rss_mib,
    loadavg1,
    measure_fp32_peak,
    parse_qlens,
    peak_rss_mib,
    prime_allocator,
    print_table,
)

SHAPES = {
    "v2lite": dict(name="DeepSeek-V2-Lite", E=64, k=6, H=2048, I=1408),
    "v3": dict(name="DeepSeek-V3", E=256, k=8, H=7168, I=2048),
}
DEFAULT_METHODS = ("AMXINT4", "AMXINT8", "MOE_INT4", "MOE_INT8")
INT4_METHODS = ("AMXINT4", "MOE_INT4")
DECODE_MAX_Q = 16
TARGET_FRACTION = 0.70
GiB = 2**30
MiB = 2**20


# ---------------------------------------------------------------------------
# Machine: memory, last-level cache, DRAM read bandwidth
# ---------------------------------------------------------------------------


def _cpu_fma_ok() -> bool:
    from bench_sft import _cpu_has_avx2_fma

    return platform.machine() in ("x86_64", "AMD64") and _cpu_has_avx2_fma()


def mem_available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _parse_size(text: str):
    m = re.match(r"\s*([0-9.]+)\s*([KMG]?)", text)
    if not m:
        return None
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def last_level_cache():
    """(bytes, text): the largest data/unified cache of cpu0 from sysfs (the
    LLC; shared by the CPUs in its shared_cpu_list), else lscpu's L3."""
    best = None
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "type")) as f:
                typ = f.read().strip()
            if typ == "Instruction":
                continue
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "size")) as f:
                size = _parse_size(f.read())
            try:
                with open(os.path.join(d, "shared_cpu_list")) as f:
                    shared = f.read().strip()
            except OSError:
                shared = "?"
        except (OSError, ValueError):
            continue
        if size and (best is None or (level, size) > (best[0], best[1])):
            best = (level, size, shared)
    if best:
        return best[1], f"L{best[0]} {best[1] / MiB:.0f} MiB (sysfs, shared by CPUs {best[2]})"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^L3 cache:\s*([0-9.]+\s*[KMG]i?B)", out, re.M)
        if m:
            size = _parse_size(m.group(1).replace("i", ""))
            return size, f"L3 {m.group(1)} (lscpu, total)"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None, "unknown"


BW_C_SOURCE = C_THREADS_HARNESS + r"""
static unsigned char *g_buf;
static size_t g_chunk;
static long long g_sink[1024];
static int g_touch;

static void *worker(void *arg) {
    int id = (int)(long)arg;
    kt_pin(id);
    unsigned char *p = g_buf + (size_t)id * g_chunk;
    if (g_touch) memset(p, 1 + id, g_chunk); /* first touch by its reader */
    const __m256i *v = (const __m256i *)p;
    size_t n = g_chunk / 32;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    pthread_barrier_wait(&g_barrier);
    g_t0[id] = now();
    for (size_t i = 0; i + 4 <= n; i += 4) {
        a0 = _mm256_add_epi64(a0, _mm256_load_si256(v + i));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256(v + i + 1));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256(v + i + 2));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256(v + i + 3));
    }
    g_t1[id] = now();
    __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    long long tmp[4];
    _mm256_storeu_si256((__m256i *)tmp, s);
    g_sink[id] = tmp[0] + tmp[1] + tmp[2] + tmp[3];
    return NULL;
}

int main(int argc, char **argv) {
    kt_init_threads(argc, argv);
    size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 1024;
    int trials = argc > 3 ? atoi(argv[3]) : 7;
    g_chunk = (mib << 20) / (size_t)g_nthreads / 4096 * 4096;
    size_t total = g_chunk * (size_t)g_nthreads;
    g_buf = aligned_alloc(4096, total);
    if (!g_buf) { fprintf(stderr, "out of memory\n"); return 2; }
    g_touch = 1;
    kt_run(worker);
    g_touch = 0;
    double best = 0.0;
    printf("PASSES");
    for (int t = 0; t < trials; ++t) {
        double gbs = (double)total / kt_run(worker) * 1e-9;
        printf(" %.3f", gbs);
        if (gbs > best) best = gbs;
    }
    long long sink = 0;
    for (int i = 0; i < g_nthreads; ++i) sink += g_sink[i];
    printf("\nGBS=%.3f bytes=%zu threads=%d sink=%lld\n", best, total, g_nthreads, sink);
    free(g_buf);
    return 0;
}
"""


# The same bytes as a decode call, read by a loop that only loads: each call
# reads `chunks` distinct random chunks of `chunk` bytes (one expert's packed
# weights each) out of `pool` chunks (the layer), after the same preparation
# as a timed decode call -- a flush of `flush` bytes by every thread, then an
# untimed empty region that wakes the threads -- on threads that wait as the
# ktmoe pool's do (spin, yield for 0.5 ms, then sleep on a condition variable)
# while the caller sleeps until the last one is done.  The threads take
# 256 KiB tiles of the chunks from one atomic counter and read them with AVX2
# loads and a software prefetch 4 KiB ahead; the buffer is in huge pages
# where the kernel allows (madvise), like ktmoe's weights.
BURST_C_SOURCE = r"""
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define TILE (256 << 10)
static int g_n, g_chunks;
static size_t g_chunk, g_flush;
static unsigned char *g_buf, *g_fbuf;
static const unsigned char *g_sel[4096];
static atomic_long g_next;
static atomic_int g_left;
static atomic_uint g_gen;
static int g_job; /* 0 wake, 1 flush, 2 read */
static long long g_sink[1024];
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER, g_done = PTHREAD_COND_INITIALIZER;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static long long sum_range(const unsigned char *p, size_t n, int prefetch) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 128 <= n; i += 128) {
        if (prefetch) _mm_prefetch((const char *)p + i + 4096, _MM_HINT_T0);
        a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    long long t[4];
    _mm256_storeu_si256((__m256i *)t, _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
    return t[0] + t[1] + t[2] + t[3];
}

static void *worker(void *arg) {
    int id = (int)(long)arg;
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        int spins = 0;
        double until = 0.0;
        while ((g = atomic_load(&g_gen)) == seen) {
            if (++spins < 200) { _mm_pause(); continue; }
            if (until == 0.0) until = now() + 5e-4;
            if (now() < until) { sched_yield(); continue; }
            pthread_mutex_lock(&g_mu);
            while ((g = atomic_load(&g_gen)) == seen) pthread_cond_wait(&g_cv, &g_mu);
            pthread_mutex_unlock(&g_mu);
        }
        seen = g;
        long long s = 0;
        if (g_job == 1) {
            size_t part = g_flush / (size_t)g_n / 128 * 128;
            s = sum_range(g_fbuf + (size_t)id * part, part, 0);
        } else if (g_job == 2) {
            long tiles = (long)((g_chunk + TILE - 1) / TILE), total = tiles * g_chunks, t;
            while ((t = atomic_fetch_add(&g_next, 1)) < total) {
                size_t off = (size_t)(t % tiles) * TILE, len = g_chunk - off < TILE ? g_chunk - off : TILE;
                s += sum_range(g_sel[t / tiles] + off, len, 1);
            }
        }
        g_sink[id] += s;
        if (atomic_fetch_sub(&g_left, 1) == 1) {
            pthread_mutex_lock(&g_mu);
            pthread_cond_signal(&g_done);
            pthread_mutex_unlock(&g_mu);
        }
    }
    return NULL;
}

static double region(int job) {
    g_job = job;
    atomic_store(&g_next, 0);
    atomic_store(&g_left, g_n);
    double t0 = now();
    pthread_mutex_lock(&g_mu);
    atomic_fetch_add(&g_gen, 1);
    pthread_cond_broadcast(&g_cv);
    while (atomic_load(&g_left) > 0) pthread_cond_wait(&g_done, &g_mu);
    pthread_mutex_unlock(&g_mu);
    return now() - t0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 7) return 2;
    g_n = atoi(argv[1]);
    g_chunk = (size_t)atoll(argv[2]) / 128 * 128;
    g_chunks = atoi(argv[3]);
    int pool = atoi(argv[4]), calls = atoi(argv[5]);
    g_flush = (size_t)atoll(argv[6]);
    if (g_n < 1 || g_n > 1024 || g_chunk < 128 || g_chunks < 1 || g_chunks > 4096 || pool < g_chunks ||
        calls < 1)
        return 2;
    size_t stride = (g_chunk + 4095) / 4096 * 4096, total = stride * (size_t)pool;
    size_t align = 2u << 20;
    g_buf = aligned_alloc(align, (total + align - 1) / align * align);
    g_fbuf = aligned_alloc(4096, (g_flush + 4095) / 4096 * 4096);
    double *ts = malloc(sizeof(double) * (size_t)calls);
    if (!g_buf || !g_fbuf || !ts) { fprintf(stderr, "out of memory\n"); return 2; }
#ifdef MADV_HUGEPAGE
    madvise(g_buf, (total + align - 1) / align * align, MADV_HUGEPAGE);
#endif
    memset(g_buf, 1, total);
    memset(g_fbuf, 2, g_flush);
    for (long i = 0; i < g_n; ++i) {
        pthread_t th;
        if (pthread_create(&th, NULL, worker, (void *)i) != 0) return 2;
    }
    unsigned r = 12345;
    for (int c = -1; c < calls; ++c) { /* call -1: warm-up */
        for (int j = 0; j < g_chunks; ++j) {
            int e, dup;
            do {
                r = r * 1664525u + 1013904223u;
                e = (int)((r >> 8) % (unsigned)pool);
                dup = 0;
                for (int q = 0; q < j; ++q) dup |= g_sel[q] == g_buf + (size_t)e * stride;
            } while (dup);
            g_sel[j] = g_buf + (size_t)e * stride;
        }
        region(1);
        region(0);
        double t = region(2);
        if (c >= 0) ts[c] = t;
    }
    qsort(ts, (size_t)calls, sizeof *ts, cmp);
    double bytes = (double)g_chunk * g_chunks;
    long long sink = 0;
    for (int i = 0; i < g_n; ++i) sink += g_sink[i];
    printf("GBS=%.3f Q1=%.3f Q3=%.3f BEST=%.3f sink=%lld\n", bytes / ts[calls / 2] * 1e-9,
           bytes / ts[(3 * calls) / 4] * 1e-9, bytes / ts[calls / 4] * 1e-9, bytes / ts[0] * 1e-9, sink);
    return 0;
}
"""

class ReadBandwidthProbe(_CProbe):
    """The C read loop (BW_C_SOURCE); ``run(threads, mib, trials)`` -> (best
    GB/s or None, [GB/s per pass], note)."""

    SOURCE = BW_C_SOURCE

    def run(self, threads: int, mib: int, trials: int = 7):
        if self.exe is None:
            return None, [], self.error
        try:
            r = subprocess.run([self.exe, str(threads), str(mib), str(trials)], capture_output=True,
                               text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, [], f"run failed: {e}"
        m = re.search(r"GBS=([0-9.]+)", r.stdout)
        pm = re.search(r"PASSES((?: [0-9.]+)*)", r.stdout)
        if r.returncode != 0 or not m:
            return None, [], f"run failed (rc={r.returncode})"
        passes = [float(v) for v in pm.group(1).split()] if pm else []
        return float(m.group(1)), passes, (f"C AVX2 read loop, {threads} pinned threads, {mib} MiB, "
                                           f"best of {trials}, {self.cc}")


class BurstReadProbe(_CProbe):
    """BURST_C_SOURCE: ``run(threads, chunk_bytes, chunks, pool, calls,
    flush_bytes)`` -> dict(gbs, q1, q3, best) in GB/s (median, quartiles and
    best call) or None."""

    SOURCE = BURST_C_SOURCE

    def run(self, threads: int, chunk_bytes: int, chunks: int, pool: int, calls: int, flush_bytes: int):
        if self.exe is None:
            return None
        try:
            r = subprocess.run([self.exe, str(threads), str(int(chunk_bytes)), str(chunks), str(pool), str(calls),
                                str(int(flush_bytes))], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            return None
        m = re.search(r"GBS=([0-9.]+) Q1=([0-9.]+) Q3=([0-9.]+) BEST=([0-9.]+)", r.stdout)
        if r.returncode != 0 or not m:
            return None
        return dict(zip(("gbs", "q1", "q3", "best"), (float(v) for v in m.groups())))

def measure_read_bw_torch(threads: int, mib: int, trials: int = 7):
    """(best GB/s, [GB/s per pass], note) of torch.sum over a float32 buffer."""
    torch.set_num_threads(threads)
    n = mib * MiB // 4
    buf = torch.ones(n, dtype=torch.float32)
    buf.sum()  # warm (first touch was the fill)
    passes = []
    for _ in range(trials):
        t0 = time.perf_counter()
        s = buf.sum()
        dt = time.perf_counter() - t0
        passes.append(n * 4 / dt * 1e-9)
    del buf, s
    return max(passes), passes, f"torch.sum float32, {threads} threads, {mib} MiB, best of {trials}"


class CacheFlusher:
    """Reads a buffer of twice the LLC (at least 64 MiB) so that the next call
    finds no weights in the cache.  numpy sums, one Python thread per
    --threads on its own share (numpy drops the GIL): every core stays busy
    during the flush, so none is idle (on a VM: a halted vCPU, whose wake-up
    took up to 2.5 ms here) when the timed call starts; and no torch op, whose
    OpenMP workers would keep spinning into the timed call."""

    def __init__(self, llc_bytes, enabled: bool, threads: int = 1):
        self.enabled = enabled
        self.nbytes = max(2 * (llc_bytes or 32 * MiB), 64 * MiB) if enabled else 0
        self.buf, self.pool, self.parts = None, None, None
        if not enabled:
            self.how = "off (--no-flush)"
            return
        try:
            import numpy as np
        except ImportError:
            self.buf = torch.ones(self.nbytes // 4, dtype=torch.float32)
            self.how = f"torch.sum of {self.nbytes // MiB} MiB (numpy missing)"
            return
        from concurrent.futures import ThreadPoolExecutor

        self.buf = np.ones(self.nbytes // 4, dtype=np.float32)
        self.parts = np.array_split(self.buf, max(1, threads))
        self.pool = ThreadPoolExecutor(max_workers=len(self.parts), thread_name_prefix="flush")
        self._sum = np.sum
        self.how = f"numpy sum of {self.nbytes // MiB} MiB in {len(self.parts)} threads"

    def __call__(self):
        if not self.enabled:
            return
        if self.pool is None:
            self.buf.sum()
        else:
            list(self.pool.map(self._sum, self.parts))

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


# ---------------------------------------------------------------------------
# Weights and batches
# ---------------------------------------------------------------------------


def _code_std(fmt: str) -> float:
    # int4: codes 0..15 minus 8 (or a zero point near 8): std of uniform -8..7;
    # int8: uniform -127..127
    return 4.61 if fmt != "int8" else 73.6


def make_source_parts(spec, S: int, rows: int, cols: int, seed: int):
    """One projection's parts for S source experts, random codes and scales,
    generated expert by expert (a generator per expert, so expert e is
    reproducible)."""
    shapes = spec.part_shapes(rows, cols)
    parts = {name: torch.empty((S,) + shape, dtype=dt) for name, (shape, dt) in shapes.items()}
    fmt = spec.format
    base = 1.0 / (math.sqrt(cols) * _code_std(fmt))
    for e in range(S):
        gen = torch.Generator().manual_seed(seed * 100_003 + e)
        q = parts["qweight"]
        if q.dtype == torch.int8:
            q[e].copy_(torch.randint(-127, 128, q.shape[1:], dtype=torch.int8, generator=gen))
        else:
            q[e].copy_(torch.randint(0, 256, q.shape[1:], dtype=torch.uint8, generator=gen))
        if "scale" in parts:
            sc = parts["scale"]
            sc[e].copy_((0.5 + torch.rand(sc.shape[1:], generator=gen)) * base)
        if "zero" in parts:
            z = parts["zero"]
            z[e].copy_(torch.randint(6, 11, z.shape[1:], dtype=torch.uint8, generator=gen))
        if "min" in parts:
            mn = parts["min"]
            mn[e].copy_(-8.0 * parts["scale"][e])
    return parts


def source_bytes(specs, S, H, I) -> int:
    g, u, d = specs
    return S * (g.nbytes(I, H) + u.nbytes(I, H) + d.nbytes(H, I))


def make_batch(q: int, E: int, k: int, H: int, seed: int):
    gen = torch.Generator().manual_seed(1_000_003 * q + seed)
    logits = torch.randn(q, E, generator=gen)
    vals, ids = torch.topk(logits, k, dim=1)  # distinct experts per token
    weights = torch.softmax(vals, dim=1).float().contiguous()
    x = torch.randn(q, H, generator=gen).to(torch.bfloat16).contiguous()
    return x, ids.to(torch.int64).contiguous(), weights


# ---------------------------------------------------------------------------
# Forward paths
# ---------------------------------------------------------------------------


def make_forward(wrapper, act: str):
    """(callable(x, ids, w) -> out, description) of one forward path.

    The wrapper's ``int8_activations`` (a KTMoEWrapper keyword, stored as an
    attribute and read by every forward) is set per call, so both paths run
    on the one loaded layer.  A ktmoe whose wrapper lacks it runs fp32
    activations in forward(); the int8 path then calls the wrapper's own
    NativeLayer directly."""
    if hasattr(wrapper, "int8_activations"):
        on = act == "int8"

        def fwd(x, ids, w):
            wrapper.int8_activations = on
            return wrapper.forward(x, ids, w)

        return fwd, f"wrapper.forward(), int8_activations={on}"
    if act == "fp32":
        return (lambda x, ids, w: wrapper.forward(x, ids, w)), "wrapper.forward() (fp32 activations)"
    layer = getattr(wrapper, "_layer", None)
    cpu = wrapper.cpu_infer
    if layer is None or "int8_activations" not in inspect.signature(layer.submit_forward).parameters:
        return None, "no int8-activation path in this ktmoe"

    def fwd(x, ids, w):
        out = torch.empty(x.shape, dtype=x.dtype)
        layer.submit_forward(x, ids, w, out, int8_activations=True)
        cpu.sync()
        return out

    return fwd, "NativeLayer.submit_forward(int8_activations=True) + sync (the wrapper has no int8 option)"


def reference_output(x, ids, w, src_parts, specs, S, H, I):
    """float64 forward on the dequantized routed experts (fp32 activations)."""
    from ktmoe.quant import dequantize

    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    xx = x.double()
    cache = {}
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            s = e % S
            if s not in cache:
                mats = []
                for parts, spec, (_rows, cols) in zip(src_parts, specs, ((I, H), (I, H), (H, I))):
                    one = {n: p[s] for n, p in parts.items()}
                    mats.append(dequantize(one, spec, cols, torch.float64))
                cache[s] = mats
            g, u, d = cache[s]
            gg, uu = g @ xx[t], u @ xx[t]
            h = F.silu(gg) * uu
            out[t] += float(w[t, j]) * (d @ h)
    return out


def rel_err(a, ref):
    return float(torch.linalg.vector_norm(a.double() - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def time_calls(fn, batches, flush, bytes_fn=None, idle_s=0.0, wake=None):
    """Times fn over batches (batch 0 = warm-up, untimed).  Before each call:
    flush the cache, sleep idle_s, then call wake() (untimed) when given;
    returns (median s, [s], [bytes])."""
    times, nbytes = [], []
    for it, (x, ids, w) in enumerate(batches):
        flush()
        if idle_s:
            time.sleep(idle_s)
        if wake is not None:
            wake()
        t0 = time.perf_counter()
        fn(x, ids, w)
        dt = time.perf_counter() - t0
        if it > 0:
            times.append(dt)
            if bytes_fn is not None:
                nbytes.append(bytes_fn(ids))
    return statistics.median(times), times, nbytes


def time_hot(fn, batch, n):
    """The same call n times in a row (no flush; first untimed): median s."""
    x, ids, w = batch
    fn(x, ids, w)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(x, ids, w)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ---------------------------------------------------------------------------
# PyTorch baseline
# ---------------------------------------------------------------------------


class TorchMoE:
    """Plain-PyTorch per-expert forward in ``dtype``; expert e uses pool slot
    e % P."""

    def __init__(self, P, H, I, dtype, seed=7):
        gen = torch.Generator().manual_seed(seed)
        self.P = P
        self.dtype = dtype
        self.gate = torch.empty(P, I, H, dtype=dtype)
        self.up = torch.empty(P, I, H, dtype=dtype)
        self.down = torch.empty(P, H, I, dtype=dtype)
        for e in range(P):
            self.gate[e].copy_(torch.randn(I, H, generator=gen) / math.sqrt(H))
            self.up[e].copy_(torch.randn(I, H, generator=gen) / math.sqrt(H))
            self.down[e].copy_(torch.randn(H, I, generator=gen) / math.sqrt(I))
        self.H = H

    @property
    def expert_bytes(self) -> int:
        return (self.gate[0].numel() + self.up[0].numel() + self.down[0].numel()) * self.gate.element_size()

    def __call__(self, x, ids, w):
        q, k = ids.shape
        out = torch.zeros(q, self.H, dtype=torch.float32)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        start = 0
        for e, c in zip(experts.tolist(), counts.tolist()):
            sel = order[start:start + c]
            start += c
            tok, slot = sel // k, sel % k
            p = e % self.P
            xe = x[tok].to(self.dtype)
            h = F.silu(F.linear(xe, self.gate[p])) * F.linear(xe, self.up[p])
            y = F.linear(h, self.down[p])
            out.index_add_(0, tok, y.float() * w[tok, slot].unsqueeze(1))
        return out.to(x.dtype)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


class OtherLoadWithChildren(OtherLoad):
    """bench_sft.OtherLoad, counting this process's waited-for children (the
    compiled C measurements) as its own CPU time, not as other load."""

    def __enter__(self):
        super().__enter__()
        t = os.times()
        self._own0 += t.children_user + t.children_system
        return self

    def __exit__(self, *exc):
        b1 = self._busy_s()
        t = os.times()
        wall = time.perf_counter() - self._w0
        own = t.user + t.system + t.children_user + t.children_system
        if self._b0 is not None and b1 is not None and wall > 0:
            self.cores = max(0.0, ((b1 - self._b0) - (own - self._own0)) / wall)
        return False


def measure_references(probe, threads: int, bw_mib: int, want_peak: bool, tries: int = 3):
    """DRAM read bandwidth (C loop and torch.sum) and FP32 FMA peak, each
    retried (up to ``tries`` times, best kept) while other processes used
    more than 0.25 cores during the measurement."""
    out = {}

    def best_of(fn):
        best, load = None, None
        for _ in range(tries):
            with OtherLoadWithChildren() as other:
                res = fn()
            if res[0] is not None and (best is None or res[0] > best[0]):
                best, load = res, other.cores
            if other.cores is not None and other.cores <= 0.25:
                break
        return best, load

    (out["bw_c"], out["bw_c_passes"], out["bw_c_note"]), out["bw_c_other_load"] = best_of(
        lambda: probe.run(threads, bw_mib))
    (out["bw_t"], out["bw_t_passes"], out["bw_t_note"]), out["bw_t_other_load"] = best_of(
        lambda: measure_read_bw_torch(threads, bw_mib))
    if want_peak:
        (out["peak"], out["peak_note"]), out["peak_other_load"] = best_of(lambda: measure_fp32_peak(threads))
    else:
        out["peak"], out["peak_note"], out["peak_other_load"] = None, "skipped (--no-peak)", None
    cands = [(v, n) for v, n in ((out["bw_c"], "C loop"), (out["bw_t"], "torch.sum")) if v]
    out["bw"], out["bw_src"] = max(cands) if cands else (None, None)
    return out


def print_references(r, when: str) -> None:
    def ol(v):
        return f"other load {v:.2f}" if v is not None else "other load ?"

    c = f"C loop {r['bw_c']:.2f} GB/s" if r["bw_c"] else f"C loop unknown ({r['bw_c_note']})"
    print(f"  DRAM read ({when}): {c} (passes {[round(v, 1) for v in r['bw_c_passes']]}, {ol(r['bw_c_other_load'])}); "
          f"torch.sum {r['bw_t']:.2f} GB/s (passes {[round(v, 1) for v in r['bw_t_passes']]}, "
          f"{ol(r['bw_t_other_load'])})")
    pk = f"{r['peak']:.1f} GFLOP/s" if r["peak"] else "unknown"
    print(f"  FP32 peak ({when}): {pk} ({r['peak_note']}; {ol(r['peak_other_load'])})")


def git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        r = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=10)
        d = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() + ("+dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def warm_up(paths, batches_by_q, max_rounds=4):
    """Untimed rounds (every path, every qlen, largest first) until a round
    takes (almost) no page faults; returns [faults per round]."""
    per_round = []
    qs = sorted(batches_by_q, reverse=True)
    for _ in range(max_rounds):
        f0 = _faults()
        for fn in paths:
            for q in qs:
                x, ids, w = batches_by_q[q][0]
                fn(x, ids, w)
        per_round.append(_faults() - f0)
        if len(per_round) > 1 and per_round[-1] <= 256:
            break
    return per_round


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="v2lite", help="layer shape (default v2lite)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list of inference methods (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--qlens", type=parse_qlens, default=[1, 2, 4, 128, 512],
                   help=f"comma list (default 1,2,4,128,512; <= {DECODE_MAX_Q} are decode rows)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default os.cpu_count())")
    p.add_argument("--repeat", type=int, default=3, help="timed prefill calls after 1 warm-up (median)")
    p.add_argument("--decode-repeat", type=int, default=50, help="timed decode calls after 1 warm-up (median)")
    p.add_argument("--act", choices=("both", "fp32", "int8"), default="both",
                   help="forward paths: int8_activations=True, False (fp32), or both (default)")
    p.add_argument("--group-size", type=int, default=128, help="MOE_INT4 group_size (default 128)")
    p.add_argument("--no-zero-point", action="store_true", help="MOE_INT4 with zero_point=False")
    p.add_argument("--src-experts", type=int, default=None, help="source experts per method (default min(E, 64))")
    p.add_argument("--torch-pool", type=int, default=None,
                   help="experts in the PyTorch baselines' weight pool (default E for v2lite, 16 for v3)")
    p.add_argument("--isa", default=None, help="force a ktmoe tier (ref, avx2, ...); default: best usable")
    p.add_argument("--torch-dtypes", default="bf16,fp32",
                   help="PyTorch baselines to time (comma list of bf16, fp32; default both)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    p.add_argument("--no-peak", action="store_true", help="skip the FP32 FMA peak measurement")
    p.add_argument("--no-flush", action="store_true", help="do not evict the cache between timed calls")
    p.add_argument("--idle-ms", type=float, default=10.0,
                   help="decode 'idle ms' column: sleep this long after the flush (0: no column; default 10)")
    p.add_argument("--bw-mib", type=int, default=1024,
                   help="buffer of the start/end bandwidth measurements (default 1024)")
    p.add_argument("--row-bw-mib", type=int, default=512,
                   help="buffer of the bandwidth measured just before each decode row (0: off; default 512)")
    p.add_argument("--no-burst", action="store_true",
                   help="skip the load-only reading of each decode row's bytes ('burst' column)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeat < 1 or args.decode_repeat < 1:
        p.error("--threads, --repeat and --decode-repeat must be >= 1")
    shape = SHAPES[args.shape]
    E, K, H, I = shape["E"], shape["k"], shape["H"], shape["I"]
    S = args.src_experts or min(E, 64)
    if not 1 <= S <= E:
        p.error(f"--src-experts must be in [1, {E}]")
    P = args.torch_pool or (E if args.shape == "v2lite" else 16)
    if not 1 <= P <= E:
        p.error(f"--torch-pool must be in [1, {E}]")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    acts = ["int8", "fp32"] if args.act == "both" else [args.act]
    torch_dtypes = [d.strip() for d in args.torch_dtypes.split(",") if d.strip()]
    if any(d not in ("bf16", "fp32") for d in torch_dtypes):
        p.error("--torch-dtypes items must be bf16 or fp32")

    import ktmoe

    unknown = [m for m in methods if m not in ktmoe.INFERENCE_METHODS]
    if unknown:
        p.error(f"unknown inference method(s) {unknown}; known: {sorted(ktmoe.INFERENCE_METHODS)}")

    torch.set_num_threads(args.threads)
    info = ktmoe.cpu_info()
    llc, llc_note = last_level_cache()
    mem0 = mem_available_bytes()
    commit = git_commit()
    decode_q = [q for q in args.qlens if q <= DECODE_MAX_Q]
    prefill_q = [q for q in args.qlens if q > DECODE_MAX_Q]

    print("ktmoe inference benchmark: one MoE layer forward (no LoRA)")
    print(f"  layer     : {shape['name']} ({args.shape})  E={E} k={K} H={H} I={I}")
    print(f"  cpu       : {info.get('cpu')}   tier: {args.isa or info.get('selected_tier')} "
          f"(usable={info.get('usable_tiers')}); os.cpu_count()={os.cpu_count()}")
    print(f"  threads   : {args.threads} (cpuinfer_threads, torch.set_num_threads, bandwidth, peak)")
    print(f"  methods   : {', '.join(methods)}; paths: {', '.join(acts)} activations")
    print(f"  weights   : random packed codes/scales, {S} source experts per method, physical p <- p % {S}")
    flush = CacheFlusher(llc, not args.no_flush, args.threads)
    print(f"  LLC       : {llc_note}; cache flush between calls: {flush.how}")
    print(f"  memory    : MemAvailable {mem0 / GiB:.1f} GiB at start" if mem0 else "  memory    : ?")
    print(f"  repeat    : decode {args.decode_repeat}, prefill {args.repeat} timed calls after 1 warm-up; median")
    print(f"  commit    : {commit}; {datetime.datetime.now().isoformat(timespec='seconds')}")
    la = loadavg1()
    if la is not None:
        print(f"  load avg  : {la:.2f} (1 min) at start")
    sys.stdout.flush()

    # ---- machine references, same run, same threads (again at the end) ----
    for name, mib in (("--bw-mib", args.bw_mib), ("--row-bw-mib", args.row_bw_mib)):
        if llc and mib and mib * MiB < 8 * llc:
            print(f"  WARNING: {name} {mib} MiB is less than 8x the LLC ({llc // MiB} MiB): the bandwidth "
                  "measured partly comes from the cache")
    probe = ReadBandwidthProbe()
    fma = FmaProbe() if not args.no_peak and _cpu_fma_ok() else None
    burst = BurstReadProbe() if decode_q and not args.no_burst else None
    refs = measure_references(probe, args.threads, args.bw_mib, not args.no_peak)
    print_references(refs, "start")
    bw, bw_src, peak, peak_note = refs["bw"], refs["bw_src"], refs["peak"], refs["peak_note"]
    sys.stdout.flush()

    prime_allocator()
    batches = {}
    for q in args.qlens:
        n = (args.decode_repeat if q <= DECODE_MAX_Q else args.repeat) + 1
        batches[q] = [make_batch(q, E, K, H, seed=it) for it in range(n)]

    def f(v, spec, none="-"):
        return format(v, spec) if v is not None else none

    rows, method_rows, skipped = [], [], []
    for mi, method in enumerate(methods):
        wrapper = ktmoe.KTMoEWrapper(
            layer_idx=0, num_experts=E, num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I,
            num_gpu_experts=0, cpuinfer_threads=args.threads, threadpool_count=1, weight_path="",
            chunked_prefill_size=max(args.qlens), method=method, mode="inference",
            group_size=args.group_size, zero_point=not args.no_zero_point, isa=args.isa)
        specs = wrapper.quant_specs
        layer_bytes_pred = E * source_bytes(specs, 1, H, I)
        src_bytes = source_bytes(specs, S, H, I)
        avail = mem_available_bytes()
        need = layer_bytes_pred + src_bytes + GiB
        fmt = "/".join(sorted({s.format + (f"/g{s.group_size}" if s.kgroup else "") for s in specs}))
        if avail is not None and need > avail:
            msg = (f"[{method}] SKIPPED: needs ~{need / GiB:.1f} GiB (layer {layer_bytes_pred / GiB:.1f} + "
                   f"sources {src_bytes / GiB:.1f} + 1 slack), MemAvailable {avail / GiB:.1f} GiB")
            print(msg, flush=True)
            skipped.append(dict(method=method, reason=msg))
            wrapper.close()
            del wrapper
            gc.collect()
            continue
        print(f"[{method}] {fmt}: building {S} source experts ({src_bytes / MiB:.0f} MiB) ...", end="", flush=True)
        t0 = time.perf_counter()
        src = [make_source_parts(sp, S, rows_, cols_, seed=100 * mi + j)
               for j, (sp, (rows_, cols_)) in enumerate(zip(specs, ((I, H), (I, H), (H, I))))]
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        wrapper.load_packed_weights(*src, torch.arange(E) % S, S)
        load_s = time.perf_counter() - t0
        wbytes = int(wrapper.weight_bytes)
        per_expert = wbytes / E
        print(f" {gen_s:.1f} s; load {load_s:.1f} s; layer {wbytes / MiB:.0f} MiB"
              + (f" ({wbytes / llc:.0f}x LLC)" if llc else "") + f"; tier {wrapper.isa}", flush=True)
        if llc and wbytes < 4 * llc:
            print(f"[{method}] WARNING: the layer ({wbytes / MiB:.0f} MiB) is not much larger than the LLC "
                  f"({llc / MiB:.0f} MiB): decode reads may come from the cache", flush=True)

        # keep only what the accuracy check needs: the first decode batch's experts
        check_q = decode_q[0] if decode_q else args.qlens[0]
        cx, cids, cw = batches[check_q][0]
        need_src = sorted({int(e) % S for e in cids.reshape(-1).tolist()})
        check_parts = [{n: t[need_src].clone() for n, t in parts.items()} for parts in src]
        remap = {s_: i for i, s_ in enumerate(need_src)}
        del src
        gc.collect()

        paths = {}
        for act in acts:
            fn, how = make_forward(wrapper, act)
            if fn is None:
                print(f"[{method}] {act} path: {how}; skipped", flush=True)
                continue
            paths[act] = (fn, how)
            print(f"[{method}] {act} path: {how}", flush=True)
        warm = warm_up([fn for fn, _ in paths.values()], batches)
        print(f"[{method}] warm-up: page faults per round {warm}", flush=True)

        # accuracy: first check batch against float64 on the dequantized experts
        ids_local = torch.tensor([[remap[int(e) % S] for e in row] for row in cids.tolist()])
        ref = reference_output(cx, ids_local, cw, check_parts, specs, len(need_src), H, I)
        errs = {act: rel_err(fn(cx, cids, cw), ref) for act, (fn, _) in paths.items()}
        del check_parts, ref
        print(f"[{method}] rel err vs float64 (qlen {check_q}): "
              + ", ".join(f"{a} {v:.1e}" for a, v in errs.items()), flush=True)

        def nbytes_of(ids, per_expert=per_expert):
            return len(set(ids.reshape(-1).tolist())) * per_expert

        empty_ids = torch.full((1, K), -1, dtype=torch.int64)
        for act, (fn, how) in paths.items():
            x1, w1 = batches[args.qlens[0]][0][0][:1], batches[args.qlens[0]][0][2][:1]

            def wake(fn=fn, x1=x1, w1=w1, empty_ids=empty_ids):  # computes nothing: wakes the pool
                fn(x1, empty_ids, w1)

            empty, _, _ = time_calls(fn, [(x1, empty_ids, w1)] * 21, flush, wake=wake)
            for q in args.qlens:
                decode = q <= DECODE_MAX_Q
                bw_row = probe.run(args.threads, args.row_bw_mib, 5)[0] if decode and args.row_bw_mib else None
                fma_row = fma.run(args.threads) if decode and fma is not None else None
                f0 = _faults()
                with OtherLoad() as other:
                    med, times, nb = time_calls(fn, batches[q], flush, nbytes_of, wake=wake)
                    hot = time_hot(fn, batches[q][0], min(20, args.decode_repeat)) if decode else None
                    idle = (time_calls(fn, batches[q][:21], flush, idle_s=args.idle_ms * 1e-3)[0]
                            if decode and args.idle_ms > 0 else None)
                faults = _faults() - f0
                gbs = statistics.median(b / t * 1e-9 for b, t in zip(nb, times))
                flops = 2 * 3 * q * K * H * I
                gflops = flops / med * 1e-9
                nexp = max(1, round(statistics.mean(b / per_expert for b in nb)))
                bst = (burst.run(args.threads, per_expert, nexp, E, args.decode_repeat, flush.nbytes or 64 * MiB)
                       if decode and burst is not None else None) or {}
                rows.append(dict(
                    method=method, format=fmt, act=act, path=how, isa=wrapper.isa, qlen=q,
                    kind="decode" if decode else "prefill", ms=med * 1e3, ms_all=[t * 1e3 for t in times],
                    hot_ms=hot * 1e3 if hot is not None else None, empty_call_ms=empty * 1e3,
                    idle_ms=idle * 1e3 if idle is not None else None, bw_row_gbs=bw_row, fma_row_gflops=fma_row,
                    frac_bw_row=gbs / bw_row if bw_row else None,
                    burst_gbs=bst.get("gbs"), burst_q1_gbs=bst.get("q1"), burst_q3_gbs=bst.get("q3"),
                    burst_best_gbs=bst.get("best"), frac_burst=gbs / bst["gbs"] if bst else None,
                    distinct_experts=statistics.mean(b / per_expert for b in nb), bytes_per_call=statistics.mean(nb),
                    gbs=gbs, frac_bw=gbs / bw if bw else None,
                    floor_ms=statistics.mean(nb) / bw * 1e-6 if bw else None,
                    flops=flops, gflops=gflops, frac_peak=gflops / peak if peak else None,
                    weight_bytes=wbytes, rel_err=errs.get(act), page_faults=faults,
                    other_load_cores=other.cores))
                r = rows[-1]
                print(f"[{method}] {act} q={q}: {r['ms']:.3f} ms"
                      + (f", hot {r['hot_ms']:.3f} ms, {gbs:.1f} GB/s" if decode else f", {gflops:.1f} GFLOP/s")
                      + (f", load-only {bst['gbs']:.1f} GB/s" if bst else "")
                      + f", faults {faults}, other load {f(other.cores, '.2f', '?')}", flush=True)
        rss_loaded = current_rss_mib()
        wrapper.close()
        del wrapper, paths
        gc.collect()
        method_rows.append(dict(method=method, format=fmt, weight_bytes=wbytes, per_expert_bytes=per_expert,
                                gen_s=gen_s, load_s=load_s, warmup_page_faults=warm, rel_err=errs,
                                rss_mib_loaded=rss_loaded, rss_mib_after_free=current_rss_mib()))

    torch_rows = []
    torch_notes = {}
    for tdt in ([] if args.no_torch else torch_dtypes):
        dt = torch.bfloat16 if tdt == "bf16" else torch.float32
        tbytes = P * 3 * H * I * (2 if tdt == "bf16" else 4)
        avail = mem_available_bytes()
        label = f"PyTorch {tdt}"
        if avail is not None and tbytes + GiB > avail:
            torch_notes[tdt] = (f"SKIPPED: the {tdt} pool needs {tbytes / GiB:.1f} GiB + 1 slack, "
                                f"MemAvailable {avail / GiB:.1f} GiB")
            print(f"[{label}] {torch_notes[tdt]}", flush=True)
            continue
        torch_notes[tdt] = (f"{tdt} weights, pool of {P} experts ({tbytes / MiB:.0f} MiB)"
                            + (f", expert e uses slot e % {P}" if P < E else ""))
        print(f"[{label}] {torch_notes[tdt]}; timing", flush=True)
        torch.set_num_threads(args.threads)
        model = TorchMoE(P, H, I, dt)
        for q in sorted(args.qlens, reverse=True):
            model(*batches[q][0])
        eb = model.expert_bytes
        wake_buf = torch.zeros(1 << 20)

        def torch_wake(buf=wake_buf):  # a parallel op: wakes the OpenMP threads
            buf.add_(1.0)

        for q in args.qlens:
            decode = q <= DECODE_MAX_Q
            bw_row = probe.run(args.threads, args.row_bw_mib, 5)[0] if decode and args.row_bw_mib else None
            fma_row = fma.run(args.threads) if decode and fma is not None else None
            with OtherLoad() as other:
                med, times, nb = time_calls(
                    model, batches[q], flush,
                    lambda ids, eb=eb: len({int(e) % P for e in ids.reshape(-1).tolist()}) * eb, wake=torch_wake)
            gbs = statistics.median(b / t * 1e-9 for b, t in zip(nb, times))
            flops = 2 * 3 * q * K * H * I
            torch_rows.append(dict(dtype=tdt, qlen=q, kind="decode" if decode else "prefill", ms=med * 1e3,
                                   bw_row_gbs=bw_row, frac_bw_row=gbs / bw_row if bw_row else None,
                                   fma_row_gflops=fma_row,
                                   ms_all=[t * 1e3 for t in times], bytes_per_call=statistics.mean(nb),
                                   gbs=gbs, frac_bw=gbs / bw if bw else None, gflops=flops / med * 1e-9,
                                   frac_peak=(flops / med * 1e-9 / peak) if peak else None,
                                   other_load_cores=other.cores))
            print(f"[{label}] q={q}: {med * 1e3:.3f} ms, other load {f(other.cores, '.2f', '?')}", flush=True)
        del model
        gc.collect()
    trow = {(r["dtype"], r["qlen"]): r for r in torch_rows}
    for r in rows:
        for tdt in ("bf16", "fp32"):
            t = trow.get((tdt, r["qlen"]))
            r[f"torch_{tdt}_ms"] = t["ms"] if t else None
            r[f"vs_torch_{tdt}"] = t["ms"] / r["ms"] if t else None

    def fx(v):
        return f"{v:.2f}x" if v is not None else "-"

    # ---- references again: the larger of the two measurements is used ----
    refs_end = measure_references(probe, args.threads, args.bw_mib, not args.no_peak)
    probe.close()
    flush.close()
    if fma is not None:
        fma.close()
    if burst is not None:
        burst.close()
    print()
    print_references(refs_end, "end")
    if refs_end["bw"] and (bw is None or refs_end["bw"] > bw):
        bw, bw_src = refs_end["bw"], refs_end["bw_src"] + ", end of run"
    if refs_end["peak"] and (peak is None or refs_end["peak"] > peak):
        peak, peak_note = refs_end["peak"], refs_end["peak_note"] + ", end of run"
    print(f"  -> DRAM read reference {f(bw, '.2f')} GB/s ({bw_src}); FP32 peak {f(peak, '.1f', 'unknown')} "
          "GFLOP/s (the larger of start and end)")
    for r in rows + torch_rows:
        r["frac_bw"] = r["gbs"] / bw if bw else None
        r["frac_peak"] = r["gflops"] / peak if peak else None
        if "floor_ms" in r:
            r["floor_ms"] = r["bytes_per_call"] / bw * 1e-6 if bw else None

    # ---- decode table ----
    print()
    if decode_q:
        print(f"Decode (fresh random routing per call{', cache flushed' if not args.no_flush else ''}); "
              f"DRAM read reference {f(bw, '.2f')} GB/s ({bw_src})")
        hdr = ["qlen", "method", "act", "ms", "hot ms", "idle ms", "empty ms", "experts", "MB read", "GB/s",
               "BW now", "% now", "% ref", "burst", "% burst", "FMA now", "vs bf16", "vs fp32", "rel err",
               "other load"]
        table, blanks = [], []

        def pct(v):
            return f(v and 100 * v, ".1f")

        for q in decode_q:
            if table:
                blanks.append(len(table))
            for tdt in ("bf16", "fp32"):
                t = trow.get((tdt, q))
                if t:
                    table.append([str(q), f"PyTorch {tdt}", tdt, f"{t['ms']:.3f}", "-", "-", "-", "-",
                                  f"{t['bytes_per_call'] / 1e6:.1f}", f"{t['gbs']:.1f}", f(t["bw_row_gbs"], ".1f"),
                                  pct(t["frac_bw_row"]), pct(t["frac_bw"]), "-", "-", f(t["fma_row_gflops"], ".0f"),
                                  fx(trow[("bf16", q)]["ms"] / t["ms"]) if ("bf16", q) in trow else "-",
                                  fx(trow[("fp32", q)]["ms"] / t["ms"]) if ("fp32", q) in trow else "-", "-",
                                  f(t["other_load_cores"], ".2f", "?")])
            for r in rows:
                if r["qlen"] != q:
                    continue
                table.append([str(q), r["method"], r["act"], f"{r['ms']:.3f}", f"{r['hot_ms']:.3f}",
                              f(r["idle_ms"], ".3f"), f"{r['empty_call_ms']:.3f}", f"{r['distinct_experts']:.2f}",
                              f"{r['bytes_per_call'] / 1e6:.1f}", f"{r['gbs']:.1f}", f(r["bw_row_gbs"], ".1f"),
                              pct(r["frac_bw_row"]), pct(r["frac_bw"]), f(r["burst_gbs"], ".1f"),
                              pct(r["frac_burst"]), f(r["fma_row_gflops"], ".0f"),
                              fx(r["vs_torch_bf16"]), fx(r["vs_torch_fp32"]),
                              f(r["rel_err"], ".1e"), f(r["other_load_cores"], ".2f", "?")])
        print_table(hdr, table, blanks)
        print("ms = median forward (flush, untimed wake call, timed call); hot ms = the same call repeated, "
              "no flush;" + (f" idle ms = flush, then {args.idle_ms:g} ms asleep, no wake call (20 calls);"
                             if args.idle_ms > 0 else ""))
        print("empty ms = a call with every slot -1 (flush, wake call, timed); experts = distinct experts per call "
              "(mean);")
        print("MB read = their packed bytes (weight_bytes / E each; torch: bf16/fp32); GB/s = median of bytes/time;")
        if args.row_bw_mib:
            print(f"BW now = DRAM read GB/s of the C loop ({args.row_bw_mib} MiB, best of 5) just before the row; "
                  "% now = GB/s / BW now;")
        print(f"% ref = GB/s / {f(bw, '.2f')} GB/s (the run's reference);")
        if burst is not None:
            print("burst = median GB/s of a loop that only loads the same number of experts' bytes (random distinct "
                  "experts of the layer's size) the same way, just after the row: flush, wake, the same threads "
                  "taking 256 KiB tiles (BURST_C_SOURCE); % burst = GB/s / burst;")
        if fma is not None:
            print("FMA now = FP32 FMA GFLOP/s of bench_sft's peak kernel (5 x 20 ms) just before the row: well below "
                  f"{f(peak, '.0f', 'the peak')} means the vCPUs were slowed from outside (host SMT siblings, "
                  "neighbours);")
        print("vs bf16/fp32 = PyTorch bf16/fp32 ms / this row's ms; rel err = vs float64 on the dequantized weights "
              f"(qlen {decode_q[0]}); other load = cores used by other processes meanwhile")
    # ---- prefill table ----
    if prefill_q:
        print()
        print(f"Prefill; FP32 FMA peak {f(peak, '.1f', 'unknown')} GFLOP/s; FLOPs = 2*3*q*k*H*I")
        hdr = ["qlen", "method", "act", "ms", "GFLOP/s", "% peak", "vs bf16", "vs fp32", "faults", "other load"]
        table, blanks = [], []
        for q in prefill_q:
            if table:
                blanks.append(len(table))
            for tdt in ("bf16", "fp32"):
                t = trow.get((tdt, q))
                if t:
                    table.append([str(q), f"PyTorch {tdt}", tdt, f"{t['ms']:.1f}", f"{t['gflops']:.1f}",
                                  f(t["frac_peak"] and 100 * t["frac_peak"], ".1f"),
                                  fx(trow[("bf16", q)]["ms"] / t["ms"]) if ("bf16", q) in trow else "-",
                                  fx(trow[("fp32", q)]["ms"] / t["ms"]) if ("fp32", q) in trow else "-", "-",
                                  f(t["other_load_cores"], ".2f", "?")])
            for r in rows:
                if r["qlen"] != q:
                    continue
                table.append([str(q), r["method"], r["act"], f"{r['ms']:.1f}", f"{r['gflops']:.1f}",
                              f(r["frac_peak"] and 100 * r["frac_peak"], ".1f"),
                              fx(r["vs_torch_bf16"]), fx(r["vs_torch_fp32"]),
                              str(r["page_faults"]), f(r["other_load_cores"], ".2f", "?")])
        print_table(hdr, table, blanks)
    print()
    if skipped:
        for s in skipped:
            print(s["reason"])
    for tdt, note in torch_notes.items():
        print(f"PyTorch {tdt} baseline: {note}")
    if args.no_torch:
        print("PyTorch baselines: skipped (--no-torch)")

    # ---- the issue's target ----
    target = []
    if 1 in decode_q and bw and any(m in INT4_METHODS for m in methods):
        print(f"target: qlen-1 INT4 forward >= {TARGET_FRACTION:.0%} of the measured DRAM read bandwidth "
              "(judged on % now; % ref: against the larger of the start and end measurements)")
        for r in rows:
            if r["qlen"] == 1 and r["method"] in INT4_METHODS:
                fr = r["frac_bw_row"] if r["frac_bw_row"] is not None else r["frac_bw"]
                met = fr >= TARGET_FRACTION
                target.append(dict(method=r["method"], act=r["act"], frac_bw_now=r["frac_bw_row"],
                                   frac_bw_ref=r["frac_bw"], frac_burst=r["frac_burst"], met=met))
                now = f"{r['frac_bw_row']:.1%}" if r["frac_bw_row"] is not None else "-"
                print(f"  {r['method']} {r['act']}: {r['gbs']:.1f} GB/s = {now} of BW now "
                      f"({f(r['bw_row_gbs'], '.1f')} GB/s), {r['frac_bw']:.1%} of the reference -> "
                      f"{'MET' if met else 'NOT met'}"
                      + (f"; the load-only loop read the same bytes at {r['burst_gbs']:.1f} GB/s "
                         f"({r['burst_gbs'] / r['bw_row_gbs']:.1%} of BW now), this call at {r['frac_burst']:.1%} "
                         "of that" if r["burst_gbs"] and r["bw_row_gbs"] else ""))
    print(f"peak RSS {peak_rss_mib():.0f} MiB")

    if args.json:
        result = dict(
            shape=dict(name=shape["name"], key=args.shape, E=E, k=K, H=H, I=I),
            methods=methods, acts=acts, threads=args.threads, repeat=args.repeat,
            decode_repeat=args.decode_repeat, qlens=args.qlens, isa=args.isa, cpu_info=info,
            commit=commit, date=datetime.datetime.now().isoformat(timespec="seconds"),
            llc_bytes=llc, llc_note=llc_note, flush=flush.how, flush_bytes=flush.nbytes,
            src_experts=S, torch_pool=P, mem_available_start=mem0, loadavg1_start=la,
            dram_read_gbs=bw, dram_read_source=bw_src, fp32_peak_gflops=peak, fp32_peak_note=peak_note,
            references_start=refs, references_end=refs_end,
            flops_formula="2*3*q*k*H*I", target_fraction=TARGET_FRACTION, target=target,
            method_summary=method_rows, skipped=skipped, torch_notes=torch_notes, torch_rows=torch_rows,
            rows=rows, peak_rss_mib=peak_rss_mib(),
        )
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
