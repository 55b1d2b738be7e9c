"""LoRA fine-tuning of MoE models with their routed experts on ktmoe's
kernels: the ``ktmoe train`` / ``ktmoe chat`` workflow (spec 004 §1, §4, §7).

* :func:`get_train_args` parses a LLaMA-Factory style YAML config into the
  argument dataclasses (:class:`ModelArguments`, :class:`DataArguments`,
  :class:`FinetuningArguments`, :class:`GeneratingArguments`,
  ``TrainingArguments``);
* :func:`load_tokenizer`, :func:`load_model` (which streams a local
  checkpoint's experts into the kernels) and :func:`init_adapter`;
* :func:`get_dataset` reads alpaca / sharegpt JSON(L) data;
* :class:`KTTrainer` (a transformers ``Trainer``) and :func:`run_sft`;
* :class:`ChatModel` for generation with a trained adapter.

See docs/training.md.
"""

from __future__ import annotations

import importlib

#: public name -> submodule that defines it (imported on first use, so that
#: ``ktmoe train --help`` and ``import ktmoe.train`` stay light)
_EXPORTS = {
    "ModelArguments": "args", "DataArguments": "args", "FinetuningArguments": "args",
    "GeneratingArguments": "args", "TrainingArguments": "args", "get_train_args": "args",
    "get_infer_args": "args", "BUILTIN_MODEL": "args",
    "load_tokenizer": "model", "load_model": "model", "init_adapter": "model",
    "get_dataset": "data", "get_template": "data", "SFTDataCollator": "data",
    "KTTrainer": "trainer", "run_sft": "trainer", "ChatModel": "chat",
    "load_kt_model": "..hf", "init_cpu_infer": "..hf", "load_kt_checkpoint": "..hf.checkpoint",
    "KTAMXError": "..hf.errors", "KTAMXNotAvailableError": "..hf.errors",
    "KTAMXModelNotSupportedError": "..hf.errors", "KTAMXConfigError": "..hf.errors",
    "KTAMXForwardError": "..hf.errors", "KTAMXBackwardError": "..hf.errors",
}


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(mod if mod.startswith(".") else "." + mod, __name__), name)
    globals()[name] = value
    return value


__all__ = list(_EXPORTS)
