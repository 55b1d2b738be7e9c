#!/usr/bin/env python3
"""Peak memory of loading a MoE checkpoint onto ktmoe's kernels, two ways:

* ``stream``: ``ktmoe.hf.checkpoint.load_kt_checkpoint`` (what ``ktmoe
  train`` does for a local directory): the model is built without weights,
  the non-expert tensors are read from the shards, each layer's experts go
  from the shards into the kernels;
* ``materialize``: ``AutoModelForCausalLM.from_pretrained`` followed by
  ``wrap_moe_layers_with_kt_wrapper`` (the whole model in torch first).

A synthetic bf16 Qwen3-MoE checkpoint of the requested size is written with
``save_pretrained`` (per-expert keys, several shards), then each way runs in
a fresh child process that reports its RSS before loading and its peak RSS
(``VmHWM``, reset with ``/proc/self/clear_refs``) and RSS after.

    python tools/measure_checkpoint_load.py --layers 8 --experts 64 --hidden 1024 --intermediate 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent("""
    import json, sys, time, torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from ktmoe.hf import kt_weight_bytes, wrap_moe_layers_with_kt_wrapper
    from ktmoe.hf.checkpoint import load_kt_checkpoint, params_on_meta

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    path, how = sys.argv[1], sys.argv[2]
    kw = dict(cpuinfer_threads=2, threadpool_count=1, lora_rank=8, lora_alpha=16.0)
    with params_on_meta():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t = time.perf_counter()
    if how == "stream":
        m = load_kt_checkpoint(path, dtype=torch.bfloat16, **kw)
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        wrap_moe_layers_with_kt_wrapper(m, **kw)
    sec = time.perf_counter() - t
    print(json.dumps({"base": base, "peak": status("VmHWM"), "after": status("VmRSS"),
                      "kt_bytes": kt_weight_bytes(m), "seconds": sec}))
""")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--shard", default="500MB", help="max_shard_size of the checkpoint")
    p.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ktmoe.hf.checkpoint import checkpoint_bytes

    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=4096, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8, num_experts=args.experts,
        num_experts_per_tok=4, moe_intermediate_size=args.intermediate, intermediate_size=2 * args.intermediate,
        max_position_embeddings=256)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "ck")
        torch.manual_seed(0)  # built once, in this process, before any measurement
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "experts" in n)
        model.save_pretrained(path, max_shard_size=args.shard)
        del model
        size = checkpoint_bytes(path)
        print(f"checkpoint: {size / 2**20:.1f} MiB in {len([f for f in os.listdir(path) if f.endswith('.safetensors')])}"
              f" shards, routed experts {expert_bytes / 2**20:.1f} MiB ({args.layers} layers x {args.experts} experts, "
              f"H={args.hidden}, I={args.intermediate})")
        for how in ("stream", "materialize"):
            # cwd outside the source tree: `python -c` puts the cwd first on sys.path
            r = subprocess.run([sys.executable, "-c", CHILD, path, how], capture_output=True, text=True, cwd=tmp)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            m = json.loads(r.stdout.strip().splitlines()[-1])
            mib = 2 ** 20
            print(f"{how:12s} peak RSS +{(m['peak'] - m['base']) / mib:8.1f} MiB  after +{(m['after'] - m['base']) / mib:8.1f}"
                  f" MiB  kernels {m['kt_bytes'] / mib:8.1f} MiB  peak/checkpoint {(m['peak'] - m['base']) / size:.2f}"
                  f"  {m['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
