#!/usr/bin/env python3
"""Benchmark one SFT step of a ktmoe MoE layer (forward_sft + backward).

Shape: DeepSeek-V2-Lite MoE layer, E=64 experts, top-k=6, H=2048, I=1408,
LoRA rank r=16, alpha=32, on all three projections (gate, up, down).
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
C compiler or the CPU lacks AVX2/FMA. Note: it is an AVX2 (256-bit) peak; on
CPUs with two full-width 512-bit FMA units a kernel using AVX-512 can exceed
100% of it.

Baseline: a plain-PyTorch **fp32** implementation of the same layer (per-expert
loop: gather the expert's rows, F.linear with fp32 base weights plus LoRA
terms (x @ A.T @ B.T * s), silu(gate) * up, down + LoRA, times the routing
weight, index_add_ into the output), with torch autograd computing the
gradients of x, of the routing weights and of the six LoRA tensors (base
weights have requires_grad=False), torch.set_num_threads(--threads). It is
fed the same values as the ktmoe run (hidden states rounded to --dtype, LoRA
rounded to --lora-dtype, then computed in fp32), and the relative difference of
the two outputs is printed as a sanity check.
"speedup" = torch step time / ktmoe step time.

Each measurement: one warm-up iteration, then --repeat timed iterations; the
median is reported. Peak RSS is resource.getrusage(RUSAGE_SELF).ru_maxrss.

Usage:
    python tools/bench_sft.py [--qlens 1,128,512] [--threads N] [--repeat 3]
        [--method AMXBF16_SFT] [--isa avx2] [--no-torch] [--json out.json]
"""

from __future__ import annotations

import argparse
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

PEAK_C_SOURCE = r"""
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long g_iters;
static int g_nthreads;
static pthread_barrier_t g_barrier;
static double g_t0[1024], g_t1[1024];
static float g_sink[1024];
static int g_cpus[1024];
static int g_ncpus;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *worker(void *arg) {
    int id = (int)(long)arg;
    if (g_ncpus > 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(g_cpus[id % g_ncpus], &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    __m256 x = _mm256_set1_ps(1e-8f + 1e-10f * (float)id);
    __m256 y = _mm256_set1_ps(0.999f);
    __m256 a0 = _mm256_set1_ps(0.0f), a1 = _mm256_set1_ps(1.0f), a2 = _mm256_set1_ps(2.0f);
    __m256 a3 = _mm256_set1_ps(3.0f), a4 = _mm256_set1_ps(4.0f), a5 = _mm256_set1_ps(5.0f);
    __m256 a6 = _mm256_set1_ps(6.0f), a7 = _mm256_set1_ps(7.0f), a8 = _mm256_set1_ps(8.0f);
    __m256 a9 = _mm256_set1_ps(9.0f), a10 = _mm256_set1_ps(10.0f), a11 = _mm256_set1_ps(11.0f);
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
            : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3),
              [a4] "+x"(a4), [a5] "+x"(a5), [a6] "+x"(a6), [a7] "+x"(a7),
              [a8] "+x"(a8), [a9] "+x"(a9), [a10] "+x"(a10), [a11] "+x"(a11)
            : [x] "x"(x), [y] "x"(y));
    }
    g_t1[id] = now();
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    float tmp[8];
    _mm256_storeu_ps(tmp, s);
    g_sink[id] = tmp[0] + tmp[7];
    return NULL;
}

static double run(long iters) {
    pthread_t th[1024];
    g_iters = iters;
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

int main(int argc, char **argv) {
    g_nthreads = argc > 1 ? atoi(argv[1]) : 1;
    if (g_nthreads < 1) g_nthreads = 1;
    if (g_nthreads > 1024) g_nthreads = 1024;
    double target = argc > 2 ? atof(argv[2]) : 0.25; /* seconds per trial */
    cpu_set_t allowed;
    g_ncpus = 0;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0)
        for (int c = 0; c < CPU_SETSIZE && g_ncpus < 1024; ++c)
            if (CPU_ISSET(c, &allowed)) g_cpus[g_ncpus++] = c;
    long iters = 1 << 16;
    double t = run(iters);
    while (t < 0.05) { iters *= 4; t = run(iters); }
    iters = (long)((double)iters * target / t) + 1;
    double best = 0.0;
    for (int trial = 0; trial < 5; ++trial) {
        t = run(iters);
        double gflops = (double)iters * 12.0 * 8.0 * 2.0 * (double)g_nthreads / t * 1e-9;
        if (gflops > best) best = gflops;
    }
    float sink = 0.0f;
    for (int i = 0; i < g_nthreads; ++i) sink += g_sink[i];
    printf("GFLOPS=%.3f threads=%d iters=%ld sink=%g\n", best, g_nthreads, iters, (double)sink);
    return 0;
}
"""


def _cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.machine() in ("x86_64", "AMD64")  # let the binary try
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    flags = set(m.group(1).split()) if m else set()
    return "avx2" in flags and "fma" in flags


def measure_fp32_peak(threads: int):
    """Return (GFLOP/s or None, note)."""
    if platform.machine() not in ("x86_64", "AMD64", "i686", "i386"):
        return None, f"not x86 ({platform.machine()})"
    if not _cpu_has_avx2_fma():
        return None, "CPU lacks AVX2/FMA"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler"
    with tempfile.TemporaryDirectory(prefix="ktmoe_peak_") as tmp:
        src = os.path.join(tmp, "peak.c")
        exe = os.path.join(tmp, "peak")
        with open(src, "w") as f:
            f.write(PEAK_C_SOURCE)
        cmd = [cc, "-O2", "-mavx2", "-mfma", "-pthread", "-o", exe, src]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"compile failed: {e}"
        if r.returncode != 0:
            return None, "compile failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
        try:
            r = subprocess.run([exe, str(threads)], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"run failed: {e}"
        m = re.search(r"GFLOPS=([0-9.]+)", r.stdout)
        if r.returncode != 0 or not m:
            return None, f"run failed (rc={r.returncode})"
        return float(m.group(1)), f"AVX2 FMA micro-kernel, {threads} threads, compiled with {os.path.basename(cc)}"


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


def peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        return kb / 2**20
    return kb / 1024.0


def median_ms(samples):
    return 1e3 * statistics.median(samples)


def bench_ktmoe(wrapper, q: int, repeat: int, x_dtype: torch.dtype):
    """Median (fwd, bwd, step) ms and the last output (fp32 copy)."""
    x, ids, weights, go = make_batch(q, seed=q, dtype=x_dtype)
    fwd, bwd, step = [], [], []
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
    return median_ms(fwd), median_ms(bwd), median_ms(step), out.float().clone()


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qlens", type=parse_qlens, default=[1, 128, 512], help="comma-separated (default 1,128,512)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default os.cpu_count())")
    p.add_argument("--repeat", type=int, default=3, help="timed iterations after one warm-up (median reported)")
    p.add_argument("--method", default="AMXBF16_SFT")
    p.add_argument("--isa", default=None, help="force a ktmoe tier (ref, avx2, ...); default: best usable")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="hidden states dtype for ktmoe (default bf16)")
    p.add_argument("--lora-dtype", choices=sorted(DTYPES), default="fp32", help="LoRA parameter dtype (default fp32)")
    p.add_argument("--no-torch", action="store_true", help="skip the plain-PyTorch fp32 baseline")
    p.add_argument("--no-peak", action="store_true", help="skip the FP32 FMA peak measurement")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeat < 1:
        p.error("--threads and --repeat must be >= 1")

    import ktmoe

    torch.set_num_threads(args.threads)
    info = ktmoe.cpu_info()
    x_dtype = DTYPES[args.dtype]
    lora_dtype = DTYPES[args.lora_dtype]

    print("ktmoe SFT benchmark: one step = forward_sft(save_for_backward=True) + backward(return_grad_weights=True)")
    print(f"  layer     : DeepSeek-V2-Lite MoE  E={E} k={K} H={H} I={I} r={R} alpha={ALPHA:g}")
    print(f"  method    : {args.method}   tier: {args.isa or info.get('selected_tier')} "
          f"(selected_tier={info.get('selected_tier')}, usable={info.get('usable_tiers')})")
    print(f"  threads   : {args.threads} (cpuinfer_threads, torch.set_num_threads); os.cpu_count()={os.cpu_count()}")
    print(f"  dtypes    : hidden {args.dtype}, LoRA {args.lora_dtype}, base weights bf16; torch baseline all fp32")
    print(f"  repeat    : {args.repeat} timed iterations after 1 warm-up, median")
    print("  FLOPs     : step = base + lora, base = 2*3*q*k*H*I (fwd) + 2*3*q*k*H*I (bwd: dh, dx_gate, dx_up),")
    print("              lora = 2*3*q*k*r*(H+I)*3 (fwd + bwd input grad + A/B grads); GFLOP/s counts base + lora")

    peak, peak_note = (None, "skipped (--no-peak)") if args.no_peak else measure_fp32_peak(args.threads)
    peak_txt = f"{peak:.1f} GFLOP/s" if peak else "unknown"
    print(f"  FP32 peak : {peak_txt} ({peak_note})")
    sys.stdout.flush()

    gate, up, down, loras = make_weights(seed=0)
    kt_loras = {n: t.to(lora_dtype).contiguous() for n, t in loras.items()}
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
        method=args.method,
        mode="sft",
        lora_rank=R,
        lora_alpha=ALPHA,
        max_cache_depth=1,
    )
    if args.isa is not None:
        wrapper_kwargs["isa"] = args.isa
    wrapper = ktmoe.KTMoEWrapper(**wrapper_kwargs)
    wrapper.load_weights_from_tensors(gate, up, down, torch.arange(E))
    wrapper.init_lora_weights(*[kt_loras[n] for n in LORA_NAMES])

    rows = []
    kt_outs = {}
    for q in args.qlens:
        fwd, bwd, step, kt_out = bench_ktmoe(wrapper, q, args.repeat, x_dtype)
        kt_outs[q] = kt_out
        base, lora = step_flops(q)
        gflops = (base + lora) / (step * 1e-3) * 1e-9
        rows.append(dict(qlen=q, kt_fwd_ms=fwd, kt_bwd_ms=bwd, kt_step_ms=step,
                         flops_base=base, flops_lora=lora, gflops=gflops,
                         pct_peak=(100.0 * gflops / peak) if peak else None))
    rss_kt = peak_rss_mib()
    del wrapper

    if not args.no_torch:
        model = TorchMoE(gate, up, down, kt_loras)  # same (possibly bf16-rounded) LoRA values
        for row in rows:
            tf, tb, ts, t_out = bench_torch(model, row["qlen"], args.repeat, x_dtype)
            ref = kt_outs[row["qlen"]]
            err = float(torch.linalg.vector_norm(ref - t_out) / torch.linalg.vector_norm(t_out).clamp_min(1e-30))
            row.update(torch_fwd_ms=tf, torch_bwd_ms=tb, torch_step_ms=ts, speedup=ts / row["kt_step_ms"],
                       out_rel_err_vs_torch=err)
        del model
    rss_all = peak_rss_mib()

    hdr = ["qlen", "kt fwd ms", "kt bwd ms", "kt step ms", "GFLOP/s", "% peak", "torch step ms", "speedup"]
    table = []
    for row in rows:
        table.append([
            str(row["qlen"]),
            f"{row['kt_fwd_ms']:.2f}",
            f"{row['kt_bwd_ms']:.2f}",
            f"{row['kt_step_ms']:.2f}",
            f"{row['gflops']:.1f}",
            f"{row['pct_peak']:.1f}" if row["pct_peak"] is not None else "unknown",
            f"{row['torch_step_ms']:.2f}" if "torch_step_ms" in row else "-",
            f"{row['speedup']:.2f}x" if "speedup" in row else "-",
        ])
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(hdr)]
    print()
    print(" | ".join(h.rjust(w) for h, w in zip(hdr, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in table:
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))
    if not args.no_torch:
        print("sanity: ||out_kt - out_torch|| / ||out_torch|| = "
              + ", ".join(f"{r['out_rel_err_vs_torch']:.2e} (q={r['qlen']})" for r in rows))
    print()
    print(f"peak RSS: {rss_kt:.0f} MiB after the ktmoe runs, {rss_all:.0f} MiB at the end"
          + ("" if args.no_torch else " (incl. the fp32 torch baseline)"))

    if args.json:
        result = dict(
            shape=dict(E=E, k=K, H=H, I=I, r=R, alpha=ALPHA),
            method=args.method,
            isa=args.isa,
            cpu_info=info,
            threads=args.threads,
            repeat=args.repeat,
            hidden_dtype=args.dtype,
            lora_dtype=args.lora_dtype,
            flops_formula="base=2*3*q*k*H*I (fwd) + 2*3*q*k*H*I (bwd); lora=2*3*q*k*r*(H+I)*3; gflops uses base+lora",
            fp32_peak_gflops=peak,
            fp32_peak_note=peak_note,
            peak_rss_mib_kt=rss_kt,
            peak_rss_mib_end=rss_all,
            rows=rows,
        )
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
