"""The ``ktmoe train`` and ``ktmoe chat`` subcommands."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence, Tuple

from ..hf.errors import KTAMXConfigError, KTAMXError


def _split_positional(items: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """(config path or directory, key=value overrides)."""
    config, overrides = None, []
    for it in items:
        if "=" in it and not it.lower().endswith((".yaml", ".yml", ".json")):
            overrides.append(it)
        elif config is None:
            config = it
        else:
            raise KTAMXConfigError(f"more than one config given: {config} and {it}")
    return config, overrides


def _fail(e: Exception) -> int:
    """Prints the error; the exit status: 2 for a bad configuration, 1 otherwise."""
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, KTAMXConfigError) else 1


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="a YAML/JSON config (default: the bundled examples/train_tiny.yaml) and key=value "
                        "overrides, e.g. max_steps=50 output_dir=outputs/run2")
    p.add_argument("--list-keys", action="store_true", help="list every config key and exit")


def run_train(args: argparse.Namespace) -> int:
    from .args import format_keys

    if args.list_keys:
        print(format_keys())
        return 0
    try:
        from .args import get_train_args, read_config

        config, overrides = _split_positional(args.args)
        data, _ = read_config(config, overrides)
        model_args, data_args, training_args, finetuning_args, generating_args = get_train_args(config, overrides)
    except KTAMXConfigError as e:
        return _fail(e)
    try:
        from .trainer import run_sft

        trainer = run_sft(model_args, data_args, training_args, finetuning_args, generating_args, config=data)
    except (KTAMXError, OSError) as e:
        return _fail(e)
    s = trainer.kt_summary

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    print(f"trained {s['steps_this_run']} steps (now at step {s['steps']}) in {s['train_runtime_s']:.1f} s, "
          f"loss {fmt(s['loss_first'], '.4f')} -> {fmt(s['loss_last'], '.4f')}, "
          f"{fmt(s['tokens_per_second'], '.0f')} tokens/s, peak RSS {s['peak_rss_mib']:.0f} MiB")
    print(f"adapter: {s['adapter']}")
    if s["loss_curve"]:
        print(f"loss curve: {s['loss_curve']}")
    print(f"summary: {s['output_dir']}/run_summary.json")
    print(f"try it: ktmoe chat {s['output_dir']} --prompt \"What is the capital of France?\"")
    return 0


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="DIR | CONFIG.yaml | key=value",
                   help="an adapter directory (a ktmoe train output_dir), or a config with model_name_or_path "
                        "/ adapter_name_or_path, and key=value overrides")
    p.add_argument("--prompt", action="append", help="answer this prompt and exit (repeatable); "
                                                       "without it, chat interactively")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, help="sample with this temperature (default: greedy)")


def run_chat(args: argparse.Namespace) -> int:
    try:
        from .chat import ChatModel

        config, overrides = _split_positional(args.args)
        extra = {}
        if args.max_new_tokens is not None:
            extra["max_new_tokens"] = args.max_new_tokens
        if args.temperature is not None:
            extra.update(do_sample=args.temperature > 0, temperature=args.temperature)
        ov = dict(extra)
        if overrides:
            from .args import parse_overrides

            ov.update(parse_overrides(overrides))
        chat = ChatModel(config, ov or None)
    except (KTAMXError, OSError) as e:
        return _fail(e)
    if args.prompt:
        for i, q in enumerate(args.prompt):
            answer = chat.chat(q, system=args.system)
            if len(args.prompt) > 1:
                print(f"> {q}")
            print(answer, flush=True)
        return 0
    print("ktmoe chat: type a message; 'clear' forgets the conversation, 'exit' (or an empty line at the "
          "start) quits.", file=sys.stderr)
    history: list = []
    while True:
        try:
            q = input("User: ").strip()
        except EOFError:
            print()
            return 0
        if q in ("exit", "quit") or (not q and not history):
            return 0
        if q == "clear":
            history = []
            continue
        if not q:
            continue
        history.append({"role": "user", "content": q})
        answer = chat.chat(history, system=args.system)
        history.append({"role": "assistant", "content": answer})
        print(f"Assistant: {answer}", flush=True)


__all__ = ["add_train_arguments", "run_train", "add_chat_arguments", "run_chat"]
