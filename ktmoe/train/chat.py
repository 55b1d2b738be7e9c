"""``ktmoe chat``: load a base model with a trained adapter and answer
prompts (:class:`ChatModel`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..hf.errors import KTAMXConfigError
from .args import BUILTIN_MODEL, get_infer_args, load_config_file, parse_overrides
from .trainer import CONFIG_FILE

logger = logging.getLogger(__name__)


def _adapter_dir(p: Path) -> bool:
    return (p / "adapter_config.json").is_file()


def resolve_chat_config(config=None, overrides=None, adapter: Optional[str] = None) -> Dict:
    """The chat config: the training config saved next to the adapter (when
    there is one), then ``config`` (a file, a dict, or an adapter / training
    output directory), then ``overrides``.  The adapter is
    ``adapter_name_or_path``, the directory given, or a training config's
    ``output_dir`` when it holds one; ``model_name_or_path`` defaults to the
    adapter's base model and ``lora_rank`` / ``lora_alpha`` / ``kt_backend``
    to the KT adapter's."""
    explicit: Dict = {}
    if isinstance(config, dict):
        explicit = dict(config)
    elif config is not None:
        p = Path(config)
        if p.is_dir():
            if adapter is not None:
                raise KTAMXConfigError(f"two adapters given: {p} and {adapter}")
            adapter = str(p)
        else:
            explicit = load_config_file(p)
    if overrides:
        explicit.update(overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    adapter = explicit.get("adapter_name_or_path") or adapter
    out = explicit.get("output_dir")
    if not adapter and out and _adapter_dir(Path(out)):
        adapter = str(out)  # a training config: chat with what that run saved
    if adapter and explicit.get("model_name_or_path") == BUILTIN_MODEL:
        del explicit["model_name_or_path"]  # the built-in model is the base_model saved with the run
    cfg: Dict = {}
    if adapter:
        a = Path(adapter)
        if not _adapter_dir(a):
            raise KTAMXConfigError(f"{a} holds no adapter (adapter_config.json)")
        for d in (a, a.parent):
            if (d / CONFIG_FILE).is_file():
                cfg.update(load_config_file(d / CONFIG_FILE))
                break
        cfg["adapter_name_or_path"] = str(a)
        acfg = json.loads((a / "adapter_config.json").read_text(encoding="utf-8"))
        base = acfg.get("base_model_name_or_path")
        if "model_name_or_path" not in explicit:
            # the adapter's base model, or the base_model directory a built-in run keeps beside it
            choice = next((c for c in (base, str(a / "base_model"), str(a.parent / "base_model"))
                           if c and Path(c).is_dir()), None)
            if choice is None:
                saved = cfg.get("model_name_or_path")
                choice = saved if saved and saved != BUILTIN_MODEL else base
            if choice:
                cfg["model_name_or_path"] = choice
        kt_meta = a / "kt_adapter.json"
        if kt_meta.is_file():
            meta = json.loads(kt_meta.read_text(encoding="utf-8"))
            cfg["lora_rank"] = int(meta["lora_rank"])
            cfg["lora_alpha"] = float(meta["lora_alpha"])
            cfg.setdefault("use_kt", True)
            if meta.get("method"):
                cfg.setdefault("kt_backend", meta["method"])
    cfg.update(explicit)
    if adapter:
        cfg["adapter_name_or_path"] = str(adapter)
    if cfg.get("model_name_or_path") in (None, BUILTIN_MODEL):
        raise KTAMXConfigError("no model to chat with: give an adapter directory (a ktmoe train output_dir) or "
                               "model_name_or_path")
    return cfg


class ChatModel:
    """A model (with its adapter) and its chat template, for generation.

    ``ChatModel("outputs/tiny_moe_sft")`` loads the adapter a ``ktmoe train``
    run saved there, on top of its base model, with the run's settings."""

    def __init__(self, config=None, overrides=None, *, adapter: Optional[str] = None):
        from .data import get_template
        from .model import infer_dtype, load_config, load_model, load_tokenizer

        self.config = resolve_chat_config(config, overrides, adapter)
        self.model_args, self.data_args, self.finetuning_args, self.generating_args = get_infer_args(self.config)
        self.tokenizer = None
        adapter_dir = self.model_args.adapter_name_or_path
        if adapter_dir and any((Path(adapter_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(adapter_dir, use_fast=True)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_args)["tokenizer"]
        self.template = get_template(self.data_args.template, self.tokenizer)
        dtype = infer_dtype(self.model_args, load_config(self.model_args))
        self.model = load_model(self.tokenizer, self.model_args, self.finetuning_args, is_trainable=False,
                                dtype=dtype)
        self.model.eval()
        if torch.cuda.is_available():
            self.model.to("cuda")

    @property
    def device(self):
        return self.model.get_input_embeddings().weight.device

    def _eos_ids(self) -> List[int]:
        ids = []
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for x in (self.tokenizer.eos_token_id, gen_eos):
            if isinstance(x, int):
                ids.append(x)
            elif isinstance(x, (list, tuple)):
                ids += [int(i) for i in x]
        return sorted(set(ids))

    @torch.no_grad()
    def chat(self, messages, system: Optional[str] = None, **generate_kwargs) -> str:
        """The assistant's reply to ``messages`` (``[{"role": "user"|"assistant",
        "content": ...}]`` ending with a user turn, or a single string)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not messages or messages[-1]["role"] != "user":
            raise KTAMXConfigError("the conversation must end with a user message")
        ids = self.template.encode_prompt(messages, system or self.data_args.default_system)
        input_ids = torch.tensor([ids], device=self.device)
        kw = self.generating_args.to_generate_kwargs()
        kw.update(generate_kwargs)
        if kw.get("do_sample") is False:
            for k in ("temperature", "top_p", "top_k"):
                kw.pop(k, None)
        out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._eos_ids(), **kw)
        return self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()

    @torch.no_grad()
    def logits(self, text: str) -> torch.Tensor:
        """Next-token logits [T, V] of ``text`` (for checks)."""
        enc = self.tokenizer(text, return_tensors="pt")
        return self.model(input_ids=enc["input_ids"].to(self.device)).logits[0].float().cpu()


__all__ = ["ChatModel", "resolve_chat_config"]
