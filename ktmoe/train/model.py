"""Tokenizer, model and adapter loading for ``ktmoe train`` / ``ktmoe chat``
(spec 004 §1.1 ``load_model``, §1.2 ``init_adapter``)."""

from __future__ import annotations

import logging
import os
import warnings
from typing import List, Tuple

import torch
from torch import nn

from ..hf.errors import KTAMXConfigError, KTAMXNotAvailableError

logger = logging.getLogger(__name__)

#: lora_target names that mean "the routed experts" (the KT wrapper's LoRA)
EXPERT_TARGETS = frozenset({"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "experts", "gate_up_proj"})
_ATTENTION_SCOPES = ("self_attn", "linear_attn", "attn", "attention", "self_attention")


def load_tokenizer(model_args) -> dict:
    """``{"tokenizer": ...}`` of ``model_args.model_name_or_path`` (a fast
    tokenizer; the pad token defaults to the eos token)."""
    from transformers import AutoTokenizer

    path = model_args.model_name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code,
                                            cache_dir=model_args.cache_dir, use_fast=True)
    except (OSError, ValueError) as e:
        raise KTAMXConfigError(f"cannot load the tokenizer of {path}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise KTAMXConfigError(f"{path}: a fast tokenizer is needed (its offsets locate the response tokens)")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise KTAMXConfigError(f"{path}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return {"tokenizer": tok}


def _linear_names(model) -> Tuple[set, set]:
    """(leaf names of the attention nn.Linear modules, leaf names of all
    nn.Linear modules except lm_head)."""
    attn, every = set(), set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        parts = name.split(".")
        if parts[-1] == "lm_head" or "base_layer" in parts:
            continue
        every.add(parts[-1])
        if any(p in _ATTENTION_SCOPES for p in parts[:-1]):
            attn.add(parts[-1])
    return attn, every


def resolve_lora_targets(model, lora_target: str) -> Tuple[List[str], bool]:
    """(PEFT ``target_modules``, whether the routed experts get LoRA) for a
    LLaMA-Factory ``lora_target``.  PEFT LoRA goes on the attention
    projections only (spec 004 §1.2: the routed experts' LoRA is the KT
    wrapper's): ``all`` means every attention projection and the experts;
    expert projection names (gate_proj, up_proj, down_proj, w1-w3) switch the
    experts' LoRA on; other names must name nn.Linear modules of the model."""
    names = [n.strip() for n in lora_target.split(",") if n.strip()]
    attn, every = _linear_names(model)
    if any(n in ("all", "all-linear") for n in names):
        return sorted(attn), True
    experts_on = any(n in EXPERT_TARGETS for n in names)
    others = [n for n in names if n not in EXPERT_TARGETS]
    missing = [n for n in others if n not in every]
    if missing and len(missing) == len(others):
        raise KTAMXConfigError(
            f"lora_target: {', '.join(missing)} match{'es' if len(missing) == 1 else ''} no linear module of "
            f"this model; its attention projections are {', '.join(sorted(attn)) or 'none'} (or use 'all')")
    if missing:
        logger.warning("lora_target: %s match no linear module of this model and are ignored", ", ".join(missing))
    return [n for n in others if n in every], experts_on


def compute_dtype(training_args=None) -> torch.dtype:
    """The model dtype for training: bf16 with ``bf16: true``, else fp32."""
    return torch.bfloat16 if training_args is not None and getattr(training_args, "bf16", False) else torch.float32


def infer_dtype(model_args, config) -> torch.dtype:
    if model_args.infer_dtype == "bfloat16":
        return torch.bfloat16
    if model_args.infer_dtype == "float32":
        return torch.float32
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.bfloat16 if d in (torch.bfloat16, "bfloat16") else torch.float32


def load_config(model_args):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code,
                                          cache_dir=model_args.cache_dir)
    except (OSError, ValueError) as e:
        raise KTAMXConfigError(f"cannot load the config of {model_args.model_name_or_path}: {e}") from None


def load_model(tokenizer, model_args, finetuning_args, is_trainable: bool = False, add_valuehead: bool = False,
               *, dtype: torch.dtype = None, progress: bool = False):
    """The model of ``model_args`` with its adapter (spec 004 §1.1).  With
    ``use_kt`` its routed experts run on ktmoe's kernels: a local checkpoint
    directory is streamed (experts straight from the shards, or from
    ``kt_weight_path``, into the kernels), a model id goes through
    ``from_pretrained`` and is wrapped.  Then :func:`init_adapter`."""
    if add_valuehead:
        raise KTAMXConfigError("value-head models (reward modelling, PPO) are not supported; stage must be sft")
    config = load_config(model_args)
    if dtype is None:
        dtype = torch.float32
    path = model_args.model_name_or_path
    if model_args.use_kt:
        from ..hf.wrap import load_kt_model

        if os.path.isdir(path):
            from ..hf.checkpoint import load_kt_checkpoint

            model = load_kt_checkpoint(path, model_args, finetuning_args, config=config, dtype=dtype,
                                       progress=progress)
        else:
            model = load_kt_model(config, model_args, finetuning_args, model_name_or_path=path, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                     trust_remote_code=model_args.trust_remote_code,
                                                     cache_dir=model_args.cache_dir)
    if is_trainable:
        model.config.use_cache = False
    model = init_adapter(config, model, model_args, finetuning_args, is_trainable)
    model.train(is_trainable)
    return model


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover
        raise KTAMXNotAvailableError("LoRA training needs the 'peft' package (pip install peft)") from e
    return peft


def init_adapter(config, model, model_args, finetuning_args, is_trainable: bool):
    """LoRA on the model (spec 004 §1.2).  With ``use_kt``: PEFT LoRA on the
    attention projections (:func:`resolve_lora_targets`), the routed experts'
    LoRA held by the KT wrappers (trainable when ``lora_target`` includes the
    experts); without: PEFT LoRA on the attention and PEFT
    ``target_parameters`` LoRA on the experts.  ``adapter_name_or_path`` is
    loaded when set (its own config decides the PEFT modules)."""
    with warnings.catch_warnings():
        # PEFT 0.21 reads transformers' deprecated is_gradient_checkpointing (a FutureWarning per model)
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return _init_adapter(config, model, model_args, finetuning_args, is_trainable)


def _init_adapter(config, model, model_args, finetuning_args, is_trainable: bool):
    peft = _peft()
    from peft import LoraConfig

    targets, experts_on = resolve_lora_targets(model, finetuning_args.lora_target)
    r, alpha = finetuning_args.lora_rank, float(finetuning_args.lora_alpha)
    adapter = model_args.adapter_name_or_path
    if model_args.use_kt:
        from ..hf import get_kt_peft_model, kt_wrappers, load_kt_adapter

        if adapter:
            model = load_kt_adapter(model, adapter, is_trainable=is_trainable)
        elif targets:
            cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=finetuning_args.lora_dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
            model = get_kt_peft_model(model, cfg)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
        for w in kt_wrappers(model):
            for p in w.lora_params.values():
                p.requires_grad_(is_trainable and experts_on)
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
        return model
    if adapter:
        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=is_trainable)
        return model
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0 if experts_on else finetuning_args.lora_dropout,
                     target_modules=targets,
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts_on else None,
                     task_type="CAUSAL_LM")
    if experts_on and finetuning_args.lora_dropout:
        logger.warning("lora_dropout is set to 0: PEFT's LoRA on the experts' parameters does not allow dropout")
    return peft.get_peft_model(model, cfg)


def count_parameters(model) -> Tuple[int, int]:
    """(trainable, all) parameter counts (the kernels' frozen experts are not parameters)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


__all__ = ["load_tokenizer", "load_model", "init_adapter", "resolve_lora_targets", "compute_dtype",
           "infer_dtype", "load_config", "count_parameters", "EXPERT_TARGETS"]
