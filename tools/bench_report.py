#!/usr/bin/env python3
"""Run the SFT and inference benchmarks over qlen and thread count, plot
them, and write a results page (docs/results.md by default).

One command:

    python tools/bench_report.py [--quick] [--out docs] [--isa avx2]

For every thread count (--threads, default 1,2) it runs, each in its own
process (torch and ktmoe read their thread settings at start):

  * ``tools/bench_sft.py --methods AMXBF16_SFT,AMXINT8_SFT,AMXINT4_SFT``
    at every qlen (--qlens, default 1,4,16,64,256,512,1024,2048,4096): one
    SFT step (forward_sft + backward) per method, the plain-PyTorch fp32
    per-expert loop with LoRA and autograd (same process, same inputs), and
    the FP32 FMA peak of that many threads; at --paired-qlens (default 512)
    each method's step is also paired with the peak kernel, over
    --paired-repeat steps (default 9: a median that one slow step does not
    move);
  * ``tools/bench_inference.py --methods AMXINT4 --act int8
    --torch-dtypes bf16`` at the same qlens: the inference forward (qlen <= 16:
    GB/s of weights read, against the DRAM read bandwidth measured in the same
    process at its start and end and just before each decode row; larger
    qlen: GFLOP/s), and a plain-PyTorch bf16 loop.

Each tool writes its --json; this script keeps those files in
``<out>/figures/data/`` (with ``report_meta.json``: command, date, commit,
durations), draws ``<out>/figures/*.png`` (matplotlib, Agg) and writes
``<out>/results.md`` from them.  Every number on the page comes from those
JSON files.  ``--render-only`` redraws the page and figures from the saved
JSON without running anything.

Large qlen steps take seconds each, so qlens >= --large-qlen (default 1024)
are timed with --large-repeat (default 1) iterations after the warm-up
instead of --repeat (default 3); --torch-max-qlen skips the PyTorch SFT loop
above a qlen (default: it runs at every qlen).  ``--quick`` (qlens 1,16,128,
one repeat, short decode runs, output in /tmp/ktmoe_bench_report unless
--out is given) is for checking the script, not for figures.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)  # bench_sft, bench_inference: the house helpers

DEFAULT_QLENS = "1,4,16,64,256,512,1024,2048,4096"
DEFAULT_SFT_METHODS = "AMXBF16_SFT,AMXINT8_SFT,AMXINT4_SFT"
DEFAULT_INF_METHODS = "AMXINT4"
QUICK_OUT = "/tmp/ktmoe_bench_report"

TORCH_SFT = "PyTorch fp32 loop"
TORCH_INF = "PyTorch bf16"
COLORS = {"AMXBF16_SFT": "tab:blue", "AMXINT8_SFT": "tab:orange", "AMXINT4_SFT": "tab:green",
          "AMXINT4": "tab:cyan", "AMXINT8": "tab:olive", "MOE_INT4": "tab:purple", "MOE_INT8": "tab:brown",
          TORCH_SFT: "dimgray", TORCH_INF: "black"}
THREAD_STYLES = ["-", "--", ":", "-."]


# ---------------------------------------------------------------------------
# Running the tools
# ---------------------------------------------------------------------------


def run_tool(script: str, args: list, json_path: str) -> float:
    """Run tools/<script> with ``--json json_path``, echoing its output;
    returns the wall time in seconds.  Exits when the tool fails."""
    cmd = [sys.executable, os.path.join("tools", script), *args, "--json", json_path]
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print("    " + line, end="", flush=True)
    if proc.wait() != 0:
        sys.exit(f"{script} failed (rc {proc.returncode}); command: {shlex.join(cmd)}")
    return time.perf_counter() - t0


def git(*args) -> str:
    r = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30, check=False)
    return r.stdout.rstrip()


def thr(t) -> str:
    return f"{t} thread" + ("" if t == 1 else "s")


def file_sha(path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
    except (OSError, TypeError):
        return None


def shown_path(path: str) -> str:
    """path relative to the repository when it is inside it."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def lscpu_fields() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def machine_facts() -> dict:
    """What the page says about the machine besides ktmoe.cpu_info()."""
    import torch
    from bench_inference import last_level_cache

    ls = lscpu_fields()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        pass
    return dict(
        os_cpu_count=os.cpu_count(), model_name=ls.get("Model name"), family=ls.get("CPU family"),
        model=ls.get("Model"), threads_per_core=ls.get("Thread(s) per core"),
        cores_per_socket=ls.get("Core(s) per socket"), sockets=ls.get("Socket(s)"),
        hypervisor=ls.get("Hypervisor vendor"), llc=last_level_cache()[1], mem_total_bytes=mem,
        python=platform.python_version(), torch=torch.__version__, kernel=platform.release(),
    )


def run_all(args, data_dir: str, argv: list) -> dict:
    """Run every benchmark; returns the meta record (also saved as JSON)."""
    import ktmoe  # an editable install rebuilds the library here, before any timing

    head, dirty = git("rev-parse", "--short", "HEAD").strip(), git("status", "--porcelain", "--untracked-files=no")
    meta = dict(
        command="python tools/bench_report.py" + ("" if not argv else " " + shlex.join(argv)),
        date=datetime.datetime.now().isoformat(timespec="seconds"), commit=head,
        commit_subject=git("log", "-1", "--format=%s").strip(),
        dirty_files=[line[3:] for line in dirty.splitlines() if line.strip()], ktmoe_version=getattr(ktmoe, "__version__", None),
        machine=machine_facts(), threads=args.threads, qlens=args.qlens, isa=args.isa,
        sft_methods=args.methods, inf_methods=args.inf_methods, repeat=args.repeat,
        large_qlen=args.large_qlen, large_repeat=args.large_repeat, torch_max_qlen=args.torch_max_qlen,
        decode_repeat=args.decode_repeat, paired_repeat=args.paired_repeat, runs=[],
    )
    qlens = ",".join(map(str, args.qlens))
    isa = ["--isa", args.isa] if args.isa else []
    t_start = time.perf_counter()
    for t in args.threads:
        sft_args = ["--methods", args.methods, "--threads", str(t), "--qlens", qlens, "--repeat", str(args.repeat),
                    "--large-qlen", str(args.large_qlen), "--large-repeat", str(args.large_repeat),
                    "--paired-qlens", args.paired_qlens, "--paired-repeat", str(args.paired_repeat), *isa]
        if args.torch_max_qlen is not None:
            sft_args += ["--torch-max-qlen", str(args.torch_max_qlen)]
        inf_args = ["--methods", args.inf_methods, "--threads", str(t), "--qlens", qlens, "--repeat",
                    str(args.repeat), "--decode-repeat", str(args.decode_repeat), "--act", "int8",
                    "--torch-dtypes", "bf16", "--bw-mib", str(args.bw_mib), "--row-bw-mib", str(args.bw_mib // 2),
                    *isa]
        for kind, script, targs in (("sft", "bench_sft.py", sft_args), ("inference", "bench_inference.py", inf_args)):
            name = f"{kind}_t{t}.json"
            path = os.path.join(data_dir, name)
            wall = run_tool(script, targs, path)
            with open(path) as f:
                lib = json.load(f).get("cpu_info", {}).get("library")
            meta["runs"].append(dict(kind=kind, threads=t, json=name, wall_s=wall,
                                     command=shlex.join(["python", "tools/" + script, *targs, "--json",
                                                         shown_path(path)]),
                                     library_sha256_after=file_sha(lib)))
            print(f"[report] {script} --threads {t}: {wall:.0f} s", flush=True)
    meta["total_s"] = time.perf_counter() - t_start
    meta["commit_after"] = git("rev-parse", "--short", "HEAD").strip()
    meta["dirty_files_after"] = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
                                 if line.strip()]
    with open(os.path.join(data_dir, "report_meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def load_results(data_dir: str):
    """(meta, {threads: sft json}, {threads: inference json})."""
    with open(os.path.join(data_dir, "report_meta.json")) as f:
        meta = json.load(f)
    sft, inf = {}, {}
    for run in meta["runs"]:
        with open(os.path.join(data_dir, run["json"])) as f:
            (sft if run["kind"] == "sft" else inf)[run["threads"]] = json.load(f)
    return meta, sft, inf


# ---------------------------------------------------------------------------
# Series: (qlen, value) lists per method and thread count, from the JSON
# ---------------------------------------------------------------------------


def sft_series(sft: dict, key: str, torch_key: str | None = None):
    """{(label, threads): [(qlen, row[key])]}; the PyTorch loop as TORCH_SFT
    (its rows read torch_key, default key)."""
    out = {}
    for t, d in sorted(sft.items()):
        for r in d["torch_rows"]:
            if r.get(torch_key or key) is not None:
                out.setdefault((TORCH_SFT, t), []).append((r["qlen"], r[torch_key or key]))
        for r in d["rows"]:
            if r.get(key) is not None:
                out.setdefault((r["label"], t), []).append((r["qlen"], r[key]))
    return out


def inf_series(inf: dict, key: str, kind=None):
    """{(method, threads): [(qlen, row[key])]}; the PyTorch loop as TORCH_INF."""
    out = {}
    for t, d in sorted(inf.items()):
        for label, rows in ((TORCH_INF, [r for r in d["torch_rows"] if r["dtype"] == "bf16"]), (None, d["rows"])):
            for r in rows:
                if (kind is None or r["kind"] == kind) and r.get(key) is not None:
                    out.setdefault((label or r["method"], t), []).append((r["qlen"], r[key]))
    return out


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _plot(ax, series, threads_list, ylabel, title, with_threads=True):
    for (label, t), pts in sorted(series.items(), key=lambda kv: (kv[0][0] in (TORCH_SFT, TORCH_INF), kv[0])):
        pts = sorted(pts)
        ax.plot([q for q, _ in pts], [v for _, v in pts], marker="o", ms=3,
                color=COLORS.get(label), linestyle=THREAD_STYLES[threads_list.index(t) % len(THREAD_STYLES)],
                label=f"{label}, {thr(t)}" if with_threads else label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("qlen (tokens per call)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def _hline(ax, y, text, t, threads_list, color):
    if y:
        ax.axhline(y, color=color, linewidth=1, linestyle=THREAD_STYLES[threads_list.index(t) % len(THREAD_STYLES)],
                   alpha=0.7, label=f"{text}, {thr(t)} ({y:.0f})")


def make_figures(fig_dir: str, sft: dict, inf: dict) -> dict:
    """Draws the PNGs; returns {name: (file, caption)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads_list = sorted(set(sft) | set(inf))
    figs = {}

    if sft:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        _plot(ax, sft_series(sft, "gflops"), threads_list, "GFLOP/s (nominal step FLOPs / step time)",
              "SFT step (forward_sft + backward), DeepSeek-V2-Lite layer")
        for t, d in sft.items():
            _hline(ax, d.get("fp32_peak_gflops"), "FP32 FMA peak", t, threads_list, "red")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(fig_dir, "sft_throughput.png"), dpi=110)
        plt.close(fig)
        figs["sft"] = ("figures/sft_throughput.png", ("SFT step throughput per method and thread count; grey: "
                       "the PyTorch fp32 loop of the same run; red: the measured FP32 FMA peak"))

    if inf:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5))
        _plot(a1, inf_series(inf, "gbs", "decode"), threads_list, "GB/s of expert weights read",
              "Inference decode: weight read rate")
        for t, d in inf.items():
            _hline(a1, d.get("dram_read_gbs"), "DRAM read BW", t, threads_list, "red")
        a1.set_ylim(bottom=0)
        a1.legend(fontsize=7)
        _plot(a2, inf_series(inf, "gflops"), threads_list, "GFLOP/s (2*3*q*k*H*I / time)",
              "Inference forward: compute rate")
        for t, d in inf.items():
            _hline(a2, d.get("fp32_peak_gflops"), "FP32 FMA peak", t, threads_list, "red")
        a2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(fig_dir, "inference_throughput.png"), dpi=110)
        plt.close(fig)
        figs["inference"] = ("figures/inference_throughput.png", (
            "Inference forward (int8 activations): left, decode qlens as GB/s of weights read against the DRAM "
            "read bandwidth measured in the same process; right, GFLOP/s at every qlen against the FP32 FMA peak"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    _plot(axes[0], sft_series(sft, "speedup"), threads_list, "speedup (PyTorch step ms / ktmoe step ms)", "SFT: speedup vs PyTorch fp32 loop")
    vs = {k: v for k, v in inf_series(inf, "vs_torch_bf16").items() if k[0] != TORCH_INF}
    _plot(axes[1], vs, threads_list, "speedup (PyTorch ms / ktmoe ms)",
          "Inference: speedup vs PyTorch bf16 loop")
    for ax in axes:
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(fig_dir, "speedup.png"), dpi=110)
    plt.close(fig)
    figs["speedup"] = ("figures/speedup.png", "Speedup over the PyTorch baseline of the same process and qlen")

    if len(threads_list) >= 2:
        lo, hi = threads_list[0], threads_list[-1]
        scaling = {}
        for series in (sft_series(sft, "kt_step_ms", "torch_step_ms"), inf_series(inf, "ms")):
            for (label, t), pts in series.items():
                if t == hi and (label, lo) in series:
                    base = dict(series[(label, lo)])
                    scaling[(label, hi)] = [(q, base[q] / v) for q, v in pts if q in base and v]
        scaling = {k: v for k, v in scaling.items() if v}
        if scaling:
            fig, ax = plt.subplots(figsize=(8, 5))
            _plot(ax, scaling, threads_list, f"time with {thr(lo)} / time with {thr(hi)}",
                  f"Thread scaling, {thr(lo)} -> {thr(hi)} (SFT step and inference forward)", with_threads=False)
            ax.axhline(hi / lo, color="red", linewidth=0.8, label=f"ideal {hi / lo:g}x")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(fig_dir, "thread_scaling.png"), dpi=110)
            plt.close(fig)
            figs["scaling"] = ("figures/thread_scaling.png", (
                f"Time with {thr(lo)} over time with {thr(hi)}, same qlen (SFT methods, the PyTorch SFT "
                "loop, inference)"))
    return figs


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------


def f(v, spec, none="–"):
    return format(v, spec) if v is not None else none


def table(hdr, rows, align=None):
    align = align or ["r"] * len(hdr)
    out = ["| " + " | ".join(hdr) + " |",
           "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def sft_table(d: dict) -> str:
    trow = {r["qlen"]: r for r in d["torch_rows"]}
    qlens = sorted({r["qlen"] for r in d["rows"]})
    rows = []
    for q in qlens:
        t = trow.get(q)
        if t:
            rows.append([str(q), TORCH_SFT, str(t.get("repeat", d["repeat"])), f(t["torch_fwd_ms"], ".1f"),
                         f(t["torch_bwd_ms"], ".1f"), f(t["torch_step_ms"], ".1f"), f(t["gflops"], ".1f"),
                         f(t["pct_peak"], ".1f"), "–", "1.00×", f(t["other_load_cores"], ".2f")])
        else:
            rows.append([str(q), TORCH_SFT, "–", "not run (`--torch-max-qlen`)", "", "", "", "", "", "", ""])
        for r in d["rows"]:
            if r["qlen"] == q:
                rows.append([str(q), r["label"], str(r.get("repeat", d["repeat"])), f(r["kt_fwd_ms"], ".1f"),
                             f(r["kt_bwd_ms"], ".1f"), f(r["kt_step_ms"], ".1f"), f(r["gflops"], ".1f"),
                             f(r["pct_peak"], ".1f"), f(r.get("pct_paired_peak"), ".1f"),
                             f(r.get("speedup"), ".2f") + ("×" if r.get("speedup") else ""),
                             f(r["other_load_cores"], ".2f")])
    return table(["qlen", "method", "n", "fwd ms", "bwd ms", "step ms", "GFLOP/s", "% peak", "% paired", "speedup",
                  "other load"], rows, ["r", "l"] + ["r"] * 9)


def inf_tables(inf: dict):
    dec, pre = [], []
    for t, d in sorted(inf.items()):
        torch_rows = [r for r in d["torch_rows"] if r["dtype"] == "bf16"]
        for q in sorted({r["qlen"] for r in d["rows"]}):
            for r in [x for x in torch_rows if x["qlen"] == q] + [x for x in d["rows"] if x["qlen"] == q]:
                name = r.get("method") or TORCH_INF
                vs = r.get("vs_torch_bf16")
                vs_txt = f(vs, ".2f") + "×" if vs else ("1.00×" if name == TORCH_INF else "–")
                if r["kind"] == "decode":
                    dec.append([str(t), str(q), name, f(r["ms"], ".3f"), f(r.get("hot_ms"), ".3f"),
                                f(r["bytes_per_call"] / 1e6, ".1f"), f(r["gbs"], ".1f"), f(r["bw_row_gbs"], ".1f"),
                                f(r["frac_bw_row"] and 100 * r["frac_bw_row"], ".0f"),
                                f(d["dram_read_gbs"], ".1f"), f(r["frac_bw"] and 100 * r["frac_bw"], ".0f"),
                                f(r.get("burst_gbs"), ".1f"),
                                f(r.get("frac_burst") and 100 * r["frac_burst"], ".0f"),
                                vs_txt, f(r["other_load_cores"], ".2f")])
                else:
                    pre.append([str(t), str(q), name, f(r["ms"], ".1f"), f(r["gflops"], ".1f"),
                                f(r["frac_peak"] and 100 * r["frac_peak"], ".1f"), vs_txt,
                                f(r["other_load_cores"], ".2f")])
    dec_t = table(["threads", "qlen", "method", "ms", "hot ms", "MB read", "GB/s", "BW now", "% now", "BW ref",
                   "% ref", "burst", "% burst", "vs PyTorch bf16", "other load"], dec,
                  ["r", "r", "l"] + ["r"] * 12) if dec else ""
    pre_t = table(["threads", "qlen", "method", "ms", "GFLOP/s", "% peak", "vs PyTorch bf16", "other load"], pre,
                  ["r", "r", "l"] + ["r"] * 5) if pre else ""
    return dec_t, pre_t


def headlines(sft: dict, inf: dict) -> list:
    """Summary bullets computed from the data."""
    out = []
    for t, d in sorted(sft.items()):
        best = {}
        for r in d["rows"]:
            if r["label"] not in best or r["gflops"] > best[r["label"]]["gflops"]:
                best[r["label"]] = r
        parts = [f"{lab} {r['gflops']:.0f} GFLOP/s at qlen {r['qlen']}"
                 + (f" ({r['pct_peak']:.0f} % of peak)" if r.get("pct_peak") is not None else "")
                 for lab, r in best.items()]
        tbest = max(d["torch_rows"], key=lambda r: r["gflops"], default=None)
        sps = [r["speedup"] for r in d["rows"] if r.get("speedup")]
        out.append(f"SFT, {thr(t)}, FP32 FMA peak {f(d.get('fp32_peak_gflops'), '.0f', 'unknown')} GFLOP/s: "
                   "best " + "; ".join(parts)
                   + (f"; PyTorch fp32 loop best {tbest['gflops']:.0f} GFLOP/s at qlen {tbest['qlen']}" if tbest else "")
                   + (f"; speedup over it {min(sps):.2f}-{max(sps):.2f}×." if sps else "."))
        paired = [r for r in d["rows"] if r.get("pct_paired_peak") is not None]

        def paired_pct(r):
            qs = r.get("pct_paired_quartiles")
            return f"{r['pct_paired_peak']:.1f} %" + (f" ({qs[0]:.1f}-{qs[2]:.1f} %)" if qs else "")

        note = (" (median over the steps, quartiles in brackets)"
                if any(r.get("pct_paired_quartiles") for r in paired) else "")
        for q in sorted({r["qlen"] for r in paired}):
            out.append(f"SFT, {thr(t)}, qlen {q}, each step against the FMA peak kernel run right after it for as "
                       f"long{note}: " + "; ".join(f"{r['label']} {paired_pct(r)}"
                                                   for r in paired if r["qlen"] == q) + ".")
    for t, d in sorted(inf.items()):
        for r in d["rows"]:
            if r["qlen"] == min(x["qlen"] for x in d["rows"]) and r["kind"] == "decode":
                out.append(f"Inference {r['method']} decode qlen {r['qlen']}, {thr(t)}: {r['ms']:.2f} ms, "
                           f"{r['gbs']:.1f} GB/s = {f(r['frac_bw_row'] and 100 * r['frac_bw_row'], '.0f')} % of the "
                           f"bandwidth measured just before ({f(r['bw_row_gbs'], '.1f')} GB/s), "
                           f"{f(r['frac_bw'] and 100 * r['frac_bw'], '.0f')} % of the run's reference "
                           f"({f(d['dram_read_gbs'], '.1f')} GB/s)"
                           + (f", {100 * r['frac_burst']:.0f} % of what a load-only loop read of the same bytes "
                              f"just after ({r['burst_gbs']:.1f} GB/s)" if r.get("frac_burst") else "")
                           + f"; {f(r['vs_torch_bf16'], '.1f')}× PyTorch bf16.")
        pre = [r for r in d["rows"] if r["kind"] == "prefill"]
        if pre:
            b = max(pre, key=lambda r: r["gflops"])
            out.append(f"Inference {b['method']} prefill, {thr(t)}: best {b['gflops']:.0f} GFLOP/s at qlen "
                       f"{b['qlen']} ({f(b['frac_peak'] and 100 * b['frac_peak'], '.0f')} % of the FP32 FMA peak), "
                       f"{f(b['vs_torch_bf16'], '.2f')}× PyTorch bf16.")
    loads = [r["other_load_cores"] for d in list(sft.values()) + list(inf.values())
             for r in d["rows"] + d["torch_rows"] if r.get("other_load_cores") is not None]
    if loads:
        busy = sum(v > 0.25 for v in loads)
        out.append(f"Other load (cores used by other processes during a row): at most {max(loads):.2f}; "
                   f"{busy} of {len(loads)} rows above 0.25" + (" — those rows' times are inflated." if busy else "."))
    return out


def write_page(out_dir: str, meta: dict, sft: dict, inf: dict, figs: dict) -> str:
    m = meta["machine"]
    any_json = next(iter(sft.values()), None) or next(iter(inf.values()))
    info = any_json["cpu_info"]
    tiers = sorted({r.get("isa") for d in list(sft.values()) + list(inf.values()) for r in d["rows"]} - {None})
    libs = {r["library_sha256_after"] for r in meta["runs"]}
    L = []
    L.append("# Benchmark results\n")
    bench_doc = os.path.relpath(os.path.join(ROOT, "docs", "benchmarks.md"), out_dir)
    L.append("Generated by `tools/bench_report.py`; do not edit by hand — rerun it (see "
             f"[benchmarks.md]({bench_doc})). Every number below comes from the JSON files in "
             "[figures/data/](figures/data/), measured in the run described here.\n")
    loads = [r["other_load_cores"] for d in list(sft.values()) + list(inf.values())
             for r in d["rows"] + d["torch_rows"] if r.get("other_load_cores") is not None]
    busy = sum(v > 0.25 for v in loads)
    if busy > len(loads) // 4 or len(libs) > 1:
        L.append("> **Caution — not clean measurements.** "
                 + (f"{busy} of {len(loads)} rows ran while other processes used more than 0.25 cores "
                    f"(up to {max(loads):.2f}), which inflates their times and skews ratios between rows. "
                    if busy > len(loads) // 4 else "")
                 + ("The library was rebuilt between the runs (see below), so the runs did not all time the "
                    "same kernels. " if len(libs) > 1 else "")
                 + "Rerun on a quiet machine before quoting these numbers.\n")
    L.append("## Run\n")
    L.append(f"- Command: `{meta['command']}`")
    L.append(f"- Date: {meta['date']}; wall time of the benchmarks {meta['total_s'] / 60:.1f} min")
    dirty = meta["dirty_files"]
    L.append(f"- Commit: `{meta['commit']}` ({meta['commit_subject']})"
             + (f"; **tree dirty**: {len(dirty)} tracked file(s) modified ("
                + ", ".join(f"`{p}`" for p in dirty[:8]) + (", …" if len(dirty) > 8 else "") + ")"
                if dirty else "; tracked files clean at the start")
             + ("" if meta.get("commit_after") in (None, meta["commit"])
                else f"; HEAD moved to `{meta['commit_after']}` during the run")
             + (f"; tracked files modified at the end of the run: {len(meta['dirty_files_after'])}"
                if meta.get("dirty_files_after") else ""))
    L.append(f"- libktmoe {info.get('version')} (`{shown_path(info.get('library', '?'))}`)"
             + (f", sha256 {next(iter(libs))}, the same after every run" if len(libs) == 1
                else "; **the library changed between runs** (sha256 after each: "
                     + ", ".join(f"{r['kind']} t{r['threads']} {r['library_sha256_after']}" for r in meta["runs"])
                     + ")"))
    L.append(f"- Python {m['python']}, torch {m['torch']}, Linux {m['kernel']}")
    L.append("- Runs (one process each; thread counts set at process start):")
    for r in meta["runs"]:
        L.append(f"  - `{r['command']}` — {r['wall_s']:.0f} s")
    L.append("")
    L.append("## Machine\n")
    L.append(f"- CPU: {info.get('cpu')} (lscpu: family {m['family']} model {m['model']}"
             + (f", {m['hypervisor']} guest" if m.get("hypervisor") else "") + ")")
    L.append(f"- {m['os_cpu_count']} logical CPUs ({m['sockets']} socket × {m['cores_per_socket']} cores × "
             f"{m['threads_per_core']} thread per core); LLC {m['llc']}; "
             f"memory {f(m['mem_total_bytes'] and m['mem_total_bytes'] / 2**30, '.1f')} GiB")
    L.append(f"- Features: {', '.join(info.get('features', []))}")
    L.append(f"- ktmoe tiers usable: {', '.join(info.get('usable_tiers', []))}; selected by default: "
             f"{info.get('selected_tier')}; "
             + (f"forced with `--isa {meta['isa']}`; " if meta.get("isa") else "")
             + f"used in these runs: {', '.join(tiers) or '?'}")
    hdr = ["threads", "FP32 FMA peak (SFT run)", "FP32 FMA peak (inference run)", "DRAM read BW start",
           "DRAM read BW end", "BW reference"]
    rows = []
    for t in meta["threads"]:
        s, d = sft.get(t, {}), inf.get(t, {})
        rs, re_ = d.get("references_start") or {}, d.get("references_end") or {}
        rows.append([str(t), f(s.get("fp32_peak_gflops"), ".1f") + " GFLOP/s",
                     f(d.get("fp32_peak_gflops"), ".1f") + " GFLOP/s",
                     f(rs.get("bw"), ".1f") + f" GB/s ({rs.get('bw_src', '?')})",
                     f(re_.get("bw"), ".1f") + f" GB/s ({re_.get('bw_src', '?')})",
                     f(d.get("dram_read_gbs"), ".1f") + " GB/s"])
    L.append("\nMeasured in the same run, with that many threads (bench_sft's AVX2 FMA micro-kernel; "
             "bench_inference's C read loop and torch.sum over 1 GiB, the larger one kept):\n")
    L.append(table(hdr, rows))
    L.append("")
    L.append("## Headlines\n")
    L += [f"- {h}" for h in headlines(sft, inf)]
    L.append("")
    L.append("## Figures\n")
    for name in ("sft", "inference", "speedup", "scaling"):
        if name in figs:
            path, cap = figs[name]
            L.append(f"![{cap}]({path})\n\n*{cap}.*\n")
    if sft:
        d0 = next(iter(sft.values()))
        sh = d0["shape"]
        L.append("## SFT step\n")
        L.append(f"DeepSeek-V2-Lite layer, E={sh['E']}, k={sh['k']}, H={sh['H']}, I={sh['I']}, LoRA r={sh['r']} "
                 f"on gate/up/down; hidden states {d0['hidden_dtype']}, LoRA {d0['lora_dtype']}, base weights "
                 "bf16 quantized at load. Step = `forward_sft(save_for_backward=True)` + "
                 "`backward(return_grad_weights=True)`; FLOPs " + d0["flops_formula"] + ". "
                 f"n = timed iterations after one warm-up (median; --repeat {meta['repeat']}, "
                 f"{meta['large_repeat']} at qlen ≥ {meta['large_qlen']}). speedup = PyTorch fp32 loop step / "
                 "ktmoe step, same process and qlen; % peak = of that process's FP32 FMA peak; % paired (rows "
                 "of the qlens in `--paired-qlens`) = the row's steps run again"
                 + (f" ({meta['paired_repeat']} of them)" if meta.get("paired_repeat") else "")
                 + ", each followed by the FMA peak "
                 "kernel for as long as the step took, median of the per-step ratios; other load = "
                 "cores used by other processes during the row (well above 0: inflated times)."
                 + (f" The PyTorch loop was not run above qlen {meta['torch_max_qlen']} (`--torch-max-qlen`)."
                    if meta.get("torch_max_qlen") else "") + "\n")
        for t, d in sorted(sft.items()):
            L.append(f"### {thr(t)} — FP32 FMA peak {f(d.get('fp32_peak_gflops'), '.1f', 'unknown')} GFLOP/s\n")
            L.append(sft_table(d))
            L.append("")
    if inf:
        d0 = next(iter(inf.values()))
        sh = d0["shape"]
        dec_t, pre_t = inf_tables(inf)
        L.append("## Inference forward\n")
        L.append(f"{sh['name']} layer (E={sh['E']}, k={sh['k']}, H={sh['H']}, I={sh['I']}), methods "
                 f"{', '.join(d0['methods'])}, int8 activations (the wrapper's default path); PyTorch bf16 "
                 "per-expert loop as the baseline, same process and batches. Fresh random routing every call, "
                 f"cache flushed between calls ({d0['flush']}).\n")
        if dec_t:
            L.append(f"Decode (qlen ≤ 16; median of {d0['decode_repeat']} calls): GB/s = bytes of the routed "
                     "experts' weights / time; BW now = the C read loop just before the row, BW ref = the larger "
                     "of the start and end measurements; burst = a loop that only loads, reading as many experts' bytes the "
                     "same way just after the row (flush, wake-up, the same threads; median), % burst = GB/s / "
                     "burst; hot ms = the same call repeated without a flush.\n")
            L.append(dec_t)
            L.append("")
        if pre_t:
            L.append(f"Prefill (median of {d0['repeat']} calls): GFLOP/s with FLOPs {d0['flops_formula']}; % peak "
                     "of the FP32 FMA peak (an AVX2 fp32 figure: the int8 kernels can exceed it).\n")
            L.append(pre_t)
            L.append("")
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as fh:
        fh.write("\n".join(L).rstrip() + "\n")
    return path


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output directory (default docs; with --quick " + QUICK_OUT + ")")
    p.add_argument("--quick", action="store_true", help="tiny settings for checking the script (not for figures)")
    p.add_argument("--threads", default="1,2", help="comma list of thread counts, one process each (default 1,2)")
    p.add_argument("--qlens", default=None, help=f"comma list (default {DEFAULT_QLENS})")
    p.add_argument("--methods", default=DEFAULT_SFT_METHODS, help=f"SFT methods (default {DEFAULT_SFT_METHODS})")
    p.add_argument("--inf-methods", default=DEFAULT_INF_METHODS,
                   help=f"inference methods (default {DEFAULT_INF_METHODS})")
    p.add_argument("--isa", default=None, help="force a ktmoe tier in both tools (e.g. avx2); default: best usable")
    p.add_argument("--repeat", type=int, default=None, help="timed iterations per row (default 3; --quick 1)")
    p.add_argument("--large-qlen", type=int, default=1024, help="SFT qlens >= this use --large-repeat (default 1024)")
    p.add_argument("--large-repeat", type=int, default=1, help="SFT timed iterations at large qlen (default 1)")
    p.add_argument("--torch-max-qlen", type=int, default=None,
                   help="run the PyTorch SFT loop only up to this qlen (default: every qlen)")
    p.add_argument("--decode-repeat", type=int, default=None, help="inference decode calls (default 50; --quick 5)")
    p.add_argument("--bw-mib", type=int, default=1024, help="DRAM bandwidth buffer in MiB (default 1024)")
    p.add_argument("--paired-qlens", default=None,
                   help="SFT qlens that also get the paired FMA peak (bench_sft; default 512, --quick the largest)")
    p.add_argument("--paired-repeat", type=int, default=None,
                   help="paired steps per paired row (bench_sft --paired-repeat; default 9, --quick 1)")
    p.add_argument("--render-only", action="store_true",
                   help="redraw figures and the page from <out>/figures/data without running anything")
    args = p.parse_args(argv)
    from bench_sft import parse_qlens

    args.threads = [int(v) for v in args.threads.split(",") if v.strip()]
    args.qlens = parse_qlens(args.qlens or ("1,16,128" if args.quick else DEFAULT_QLENS))
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.decode_repeat = args.decode_repeat or (5 if args.quick else 50)
    args.paired_qlens = args.paired_qlens or (str(max(args.qlens)) if args.quick else "512")
    args.paired_repeat = args.paired_repeat or (1 if args.quick else 9)
    out_dir = args.out or (QUICK_OUT if args.quick else os.path.join(ROOT, "docs"))
    fig_dir = os.path.join(out_dir, "figures")
    data_dir = os.path.join(fig_dir, "data")
    os.makedirs(data_dir, exist_ok=True)

    if not args.render_only:
        meta = run_all(args, data_dir, argv)
        print(f"[report] all runs: {meta['total_s'] / 60:.1f} min", flush=True)
    meta, sft, inf = load_results(data_dir)
    figs = make_figures(fig_dir, sft, inf)
    page = write_page(out_dir, meta, sft, inf, figs)
    print(f"[report] wrote {page} and {len(figs)} figure(s) in {fig_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
