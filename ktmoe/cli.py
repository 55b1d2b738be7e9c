"""The ``ktmoe`` command: ``train``, ``chat``, ``info``, ``config``, ``demo``, ``convert`` and
``inspect``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _cmd_info(args) -> int:
    from . import cpu_info

    info = cpu_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:15s} {', '.join(v) if isinstance(v, list) else v}")
    return 0


def _cmd_config(args) -> int:
    from . import get_include, get_library

    libdir = os.path.dirname(get_library())
    if args.cflags:
        print(f"-I{get_include()}")
    elif args.libs:
        print(f"-L{libdir} -Wl,-rpath,{libdir} -lktmoe")
    else:
        print(f"include: {get_include()}\nlibrary: {get_library()}")
    return 0


def _cmd_demo(args) -> int:
    """A few LoRA SFT steps on one random MoE layer, with progress."""
    import torch

    from . import KTMoEWrapper, cpu_info

    torch.manual_seed(0)
    E, k, H, I, r = args.experts, args.topk, args.hidden, args.intermediate, args.rank
    threads = args.threads or os.cpu_count() or 1
    print(f"ktmoe demo: E={E} k={k} H={H} I={I} r={r} qlen={args.qlen} threads={threads} "
          f"tier={cpu_info()['selected_tier']}", flush=True)
    w = KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H,
                     moe_intermediate_size=I, num_gpu_experts=0, cpuinfer_threads=threads,
                     threadpool_count=1, weight_path="", chunked_prefill_size=args.qlen,
                     method="AMXBF16_SFT", mode="sft", lora_rank=r, lora_alpha=2.0 * r)
    w.load_weights_from_tensors(
        (torch.randn(E, I, H) / math.sqrt(H)).bfloat16(),
        (torch.randn(E, I, H) / math.sqrt(H)).bfloat16(),
        (torch.randn(E, H, I) / math.sqrt(I)).bfloat16(),
        torch.arange(E))
    lora = [torch.zeros(s) for s in ((E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r))]
    for a in lora[0::2]:
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    w.init_lora_weights(*lora)
    opt = torch.optim.AdamW(lora, lr=args.lr)

    x = torch.randn(args.qlen, H)
    logits = torch.randn(args.qlen, E)
    top = torch.topk(logits, k, dim=-1)
    ids, wts = top.indices, torch.softmax(top.values, dim=-1)
    target = torch.randn(args.qlen, H) * 0.05
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        out = w.forward_sft(x, ids, wts, save_for_backward=True)
        diff = out - target
        loss = float((diff * diff).mean())
        grad_out = 2.0 * diff / diff.numel()
        _, grads = w.backward(grad_out)
        for p, g in zip(lora, grads.values()):
            p.grad = g
        opt.step()
        opt.zero_grad()
        w.update_lora_weights()
        dt = time.perf_counter() - t0
        print(f"step {step:3d}/{args.steps}  loss {loss:.6f}  {dt * 1e3:8.1f} ms", flush=True)
    return 0


def _train_cli():
    """ktmoe.train.cli, imported on use (it does not import transformers
    until a command runs)."""
    from .train import cli

    return cli


def main(argv=None) -> int:
    from . import convert, weight_files

    p = argparse.ArgumentParser(prog="ktmoe", description="CPU MoE kernels for LoRA fine-tuning")
    sub = p.add_subparsers(dest="cmd")
    pt = sub.add_parser("train", help="LoRA fine-tuning of a MoE model from a YAML config (default: a tiny "
                                      "built-in model and dataset)")
    _train_cli().add_train_arguments(pt)
    ph = sub.add_parser("chat", help="chat with a model and a trained adapter")
    _train_cli().add_chat_arguments(ph)
    pi = sub.add_parser("info", help="CPU features and kernel tiers")
    pi.add_argument("--json", action="store_true")
    pc = sub.add_parser("config", help="where ktmoe.h and libktmoe are (for C programs)")
    pc.add_argument("--cflags", action="store_true")
    pc.add_argument("--libs", action="store_true")
    pd = sub.add_parser("demo", help="run LoRA SFT steps on one random MoE layer")
    pd.add_argument("--steps", type=int, default=20)
    pd.add_argument("--qlen", type=int, default=128)
    pd.add_argument("--experts", type=int, default=16)
    pd.add_argument("--topk", type=int, default=4)
    pd.add_argument("--hidden", type=int, default=512)
    pd.add_argument("--intermediate", type=int, default=256)
    pd.add_argument("--rank", type=int, default=8)
    pd.add_argument("--lr", type=float, default=1e-3)
    pd.add_argument("--threads", type=int, default=0)
    pv = sub.add_parser("convert", help="pack a Hugging Face checkpoint's routed experts into weight files")
    convert.add_convert_arguments(pv)
    pw = sub.add_parser("inspect", help="list and validate weight files")
    weight_files.add_inspect_arguments(pw)
    args = p.parse_args(argv)
    if args.cmd == "train":
        return _train_cli().run_train(args)
    if args.cmd == "chat":
        return _train_cli().run_chat(args)
    if args.cmd == "info":
        return _cmd_info(args)
    if args.cmd == "config":
        return _cmd_config(args)
    if args.cmd == "demo":
        return _cmd_demo(args)
    if args.cmd == "convert":
        return convert.run_convert(args)
    if args.cmd == "inspect":
        return weight_files.run_inspect(args)
    p.print_help()
    return 0 if argv is None and len(sys.argv) <= 1 else 2
