"""The configuration of ``ktmoe train`` and ``ktmoe chat``.

A config is a YAML (or JSON) mapping with LLaMA-Factory's key names (spec 004
§4.1, §7.1), split over the argument dataclasses:

* :class:`ModelArguments`: the model and the KT settings (``use_kt``,
  ``kt_backend``, ``kt_num_threads``, ``kt_tp_enabled`` / ``kt_tp_count``,
  ``kt_num_gpu_experts``, ``kt_weight_path``, ``kt_max_cache_depth``);
* :class:`DataArguments`: the dataset and its template;
* :class:`FinetuningArguments`: ``stage``, ``finetuning_type`` and the LoRA;
* :class:`GeneratingArguments`: decoding settings of ``ktmoe chat``;
* :class:`TrainingArguments`: every field of transformers'
  ``Seq2SeqTrainingArguments`` plus ``overwrite_output_dir``,
  ``warmup_ratio``.

:func:`get_train_args` / :func:`get_infer_args` parse a config (a path, a
dict, or None for the bundled example) plus ``key=value`` overrides.  Values
are converted to the field's type (``learning_rate: 1e-4``, which YAML reads as
a string, becomes a float); an unknown key or a bad value raises
:class:`~ktmoe.hf.errors.KTAMXConfigError` naming the valid keys or values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from ..hf.errors import KTAMXConfigError

#: ``model_name_or_path`` of the tiny MoE model built locally (see ktmoe.train.tiny)
BUILTIN_MODEL = "builtin:tiny-moe"
#: the bundled example config (also examples/train_tiny.yaml in the repository)
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "data" / "train_tiny.yaml"
#: dataset templates: the tokenizer's chat template, a plain "User:/Assistant:" one, or auto
TEMPLATES = ("auto", "tokenizer", "plain")


@dataclass
class ModelArguments:
    """The model, and how its routed experts run (spec 004 §4.1)."""

    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": f"A local checkpoint directory (streamed), a Hugging Face model id, or '{BUILTIN_MODEL}' "
                "(a tiny MoE model built locally, with its own tokenizer)."})
    adapter_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "A saved adapter (ktmoe or PEFT) to start training from, or to chat with."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Passed to from_pretrained for models that are not local directories."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Hugging Face cache directory."})
    infer_dtype: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata={
        "help": "Model dtype of `ktmoe chat` (auto: the checkpoint's dtype, float16 read as float32)."})
    builtin_model_config: Optional[Dict[str, Any]] = field(default=None, metadata={
        "help": f"Config overrides of the '{BUILTIN_MODEL}' model (e.g. num_hidden_layers)."})
    use_kt: bool = field(default=False, metadata={
        "help": "Whether to run the routed experts on ktmoe's CPU kernels (else plain PyTorch + PEFT)."})
    kt_backend: str = field(default="AMXBF16", metadata={
        "help": "Expert weight format: AMXBF16, AMXInt8, AMXInt4, AMXInt4_1, AMXInt4_KGroup, "
                "AMXInt4_1KGroup, or an SFT method name."})
    kt_num_threads: Optional[int] = field(default=None, metadata={
        "help": "CPU threads of the kernels (default: all CPUs)."})
    kt_tp_enabled: bool = field(default=True, metadata={
        "help": "Split the experts over the NUMA nodes (one sub-pool per node)."})
    kt_tp_count: Optional[int] = field(default=None, metadata={
        "help": "Number of sub-pools (overrides kt_tp_enabled)."})
    kt_num_gpu_experts: int = field(default=0, metadata={
        "help": "Experts on the GPU; must be 0 (all routed experts on the CPU)."})
    kt_weight_path: Optional[str] = field(default=None, metadata={
        "help": "Pre-packed expert weight files (ktmoe convert) to load instead of the checkpoint's experts."})
    kt_max_cache_depth: int = field(default=1, metadata={
        "help": "Forward caches per layer (forwards before their backward)."})


@dataclass
class DataArguments:
    """The training data."""

    dataset: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated dataset names (from dataset_dir/dataset_info.json or the bundled "
                "tiny_alpaca, tiny_sharegpt) or .json / .jsonl files."})
    dataset_dir: Optional[str] = field(default=None, metadata={
        "help": "Directory of dataset_info.json and relative dataset files."})
    template: str = field(default="auto", metadata={
        "help": "tokenizer (its chat template), plain (User:/Assistant: lines), or auto (the chat "
                "template when the tokenizer has one)."})
    cutoff_len: int = field(default=1024, metadata={"help": "Tokens per example (longer ones are cut)."})
    max_samples: Optional[int] = field(default=None, metadata={"help": "Examples to use per dataset."})
    val_size: float = field(default=0.0, metadata={
        "help": "Held-out evaluation examples: a fraction (< 1) or a count."})
    train_on_prompt: bool = field(default=False, metadata={"help": "Also train on the prompt tokens."})
    mask_history: bool = field(default=False, metadata={"help": "Train on the last assistant turn only."})
    default_system: Optional[str] = field(default=None, metadata={
        "help": "System prompt for examples without one."})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={
        "help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-read the dataset files."})


@dataclass
class FinetuningArguments:
    """What is trained: LoRA on the attention (PEFT) and on the routed experts (KT)."""

    stage: Literal["sft"] = field(default="sft", metadata={"help": "Training stage (only sft)."})
    finetuning_type: Literal["lora"] = field(default="lora", metadata={"help": "Only lora."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha (default 2 * lora_rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout of the attention LoRA."})
    lora_target: str = field(default="all", metadata={
        "help": "Comma-separated module names or 'all'. Attention names get PEFT LoRA; the routed experts "
                "get LoRA when 'all' or an expert projection name (gate_proj, up_proj, down_proj) is listed."})
    plot_loss: bool = field(default=True, metadata={"help": "Write training_loss.png to output_dir."})

    def __post_init__(self):
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank


@dataclass
class GeneratingArguments:
    """Decoding settings (``ktmoe chat``)."""

    do_sample: bool = field(default=False, metadata={"help": "Sample (else greedy)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass."})
    top_k: int = field(default=50, metadata={"help": "Top-k sampling."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens to generate at most."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty."})

    def to_generate_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                  repetition_penalty=self.repetition_penalty)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


def _training_base():
    from transformers import Seq2SeqTrainingArguments

    return Seq2SeqTrainingArguments


_TRAINING_CLS = None


def training_arguments_class():
    """:class:`TrainingArguments`: transformers' ``Seq2SeqTrainingArguments``
    plus ``overwrite_output_dir`` and ``warmup_ratio`` (built on first use so
    that importing this module does not import transformers)."""
    global _TRAINING_CLS
    if _TRAINING_CLS is None:
        base = _training_base()

        @dataclass
        class TrainingArguments(base):
            """transformers' Seq2SeqTrainingArguments plus LLaMA-Factory's
            ``overwrite_output_dir`` (start over instead of resuming from the
            last checkpoint in output_dir) and ``warmup_ratio`` (read as
            ``warmup_steps`` when that is not given)."""

            overwrite_output_dir: bool = field(default=False, metadata={
                "help": "Start over even when output_dir holds checkpoints (else resume from the last)."})
            warmup_ratio: Optional[float] = field(default=None, metadata={
                "help": "Warm-up as a fraction of the training steps (sets warmup_steps)."})

            def __post_init__(self):
                if self.warmup_ratio is not None:
                    if not 0 <= self.warmup_ratio < 1:
                        raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
                    if not self.warmup_steps:
                        self.warmup_steps = self.warmup_ratio
                super().__post_init__()

        TrainingArguments.__module__ = __name__
        TrainingArguments.__qualname__ = "TrainingArguments"
        _TRAINING_CLS = TrainingArguments
    return _TRAINING_CLS


def __getattr__(name):
    if name == "TrainingArguments":
        return training_arguments_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: defaults that differ from transformers' for keys the config does not set
TRAINING_DEFAULTS = {"logging_steps": 10, "logging_first_step": True, "report_to": "none",
                     "label_names": ["labels"], "save_steps": 100}

_GROUPS = (("model", ModelArguments), ("data", DataArguments), ("finetuning", FinetuningArguments),
           ("generating", GeneratingArguments))


def _init_fields(cls) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _hints(cls) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # forward references that cannot be resolved: use the raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def valid_keys(include_training: bool = True) -> Dict[str, List[str]]:
    """group -> the config keys it accepts."""
    out = {g: [f.name for f in _init_fields(c)] for g, c in _GROUPS}
    if include_training:
        own = {f.name for g, c in _GROUPS for f in _init_fields(c)}
        out["training"] = [f.name for f in _init_fields(training_arguments_class()) if f.name not in own]
    return out


def valid_kt_backends() -> List[str]:
    from ..experts import SFT_METHODS
    from ..hf.wrap import BACKEND_METHODS

    return list(BACKEND_METHODS) + sorted(SFT_METHODS)


# ----------------------------------------------------------------- values

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class _Bad(Exception):
    pass


def _union_args(tp) -> Optional[tuple]:
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, getattr(types, "UnionType"))):
        return typing.get_args(tp)
    return None


def _describe(tp) -> str:
    args = _union_args(tp)
    if args:
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp):
    """``value`` converted to type ``tp``; raises _Bad."""
    if tp is Any or tp is object:
        return value
    args = _union_args(tp)
    if args is not None:
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        # the member the value already is, first
        members.sort(key=lambda a: 0 if isinstance(a, type) and isinstance(value, a)
                     and not (a is int and isinstance(value, bool)) else 1)
        for a in members:
            try:
                return _coerce(value, a)
            except _Bad:
                continue
        raise _Bad
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str):
            for c in choices:
                if isinstance(c, str) and c.lower() == value.lower():
                    return c
        raise _Bad
    if value is None:
        raise _Bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Bad
    if tp is int:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip(), 10)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise _Bad from None
                if f.is_integer():
                    return int(f)
        raise _Bad
    if tp is float:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Bad from None
        raise _Bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            return ",".join(str(v) for v in value)  # lists of names (dataset, lora_target)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Bad
    if origin in (dict, Dict) or tp is dict:
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            try:
                v = json.loads(value)
            except ValueError:
                raise _Bad from None
            if isinstance(v, dict):
                return v
        raise _Bad
    if origin in (list, List) or tp is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp) or (Any,)
            return [_coerce(v, item) for v in value]
        if isinstance(value, str):
            (item,) = typing.get_args(tp) or (Any,)
            return [_coerce(v.strip(), item) for v in value.split(",") if v.strip()]
        raise _Bad
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        try:  # enums (transformers' strategies) and other constructible types
            import enum

            if issubclass(tp, enum.Enum):
                return tp(value)
        except (ValueError, TypeError):
            raise _Bad from None
        if isinstance(value, (str, int, float, bool)) and tp in (str, int, float, bool):
            return tp(value)
        raise _Bad
    return value  # an annotation this parser does not know: the dataclass checks it


def _build(cls, values: Dict[str, Any], source: str):
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
        tp = hints.get(name, Any)
        try:
            kwargs[name] = _coerce(value, tp)
        except _Bad:
            raise KTAMXConfigError(f"{source}: {name}: {value!r} is not a valid value; expected "
                                   f"{_describe(tp)}") from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise KTAMXConfigError(f"{source}: {e}") from None


# ----------------------------------------------------------------- config

def load_config_file(path) -> Dict[str, Any]:
    """A YAML or JSON config file as a dict."""
    p = Path(path)
    if not p.is_file():
        raise KTAMXConfigError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise KTAMXConfigError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise KTAMXConfigError(f"{p}: expected a mapping of keys to values at the top level")
    return data


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``["max_steps=20", "use_kt=true"]`` -> dict (values read as YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise KTAMXConfigError(f"override {item!r} is not of the form key=value")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    return out


def read_config(config=None, overrides=None) -> Tuple[Dict[str, Any], str]:
    """(merged config dict, a name for messages) from a path / dict / None
    (the bundled example) and an overrides dict or ``key=value`` list."""
    if config is None:
        data, source = load_config_file(DEFAULT_CONFIG), str(DEFAULT_CONFIG.name)
    elif isinstance(config, dict):
        data, source = dict(config), "config"
    else:
        data, source = load_config_file(config), str(config)
    if overrides:
        if not isinstance(overrides, dict):
            overrides = parse_overrides(list(overrides))
        data.update(overrides)
    return data, source


def _unknown_key_error(unknown: List[str], source: str, groups: Dict[str, List[str]]) -> KTAMXConfigError:
    every = [k for ks in groups.values() for k in ks]
    parts = []
    for k in unknown:
        close = difflib.get_close_matches(k, every, n=3, cutoff=0.6)
        parts.append(f"'{k}'" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
    lines = [f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}. Valid keys:"]
    for g, ks in groups.items():
        label = f"  {g}: "
        text = textwrap.fill(", ".join(ks), width=100, initial_indent=label,
                             subsequent_indent=" " * len(label))
        lines.append(text)
    return KTAMXConfigError("\n".join(lines))


def _split(data: Dict[str, Any], source: str, include_training: bool):
    groups = valid_keys(include_training)
    owner = {k: g for g, ks in groups.items() for k in ks}
    unknown = [k for k in data if k not in owner]
    if unknown:
        raise _unknown_key_error(unknown, source, groups)
    split: Dict[str, Dict[str, Any]] = {g: {} for g in groups}
    for k, v in data.items():
        split[owner[k]][k] = v
    return split


def _check_common(model_args: ModelArguments, finetuning_args: FinetuningArguments, source: str) -> None:
    def bad(msg):
        raise KTAMXConfigError(f"{source}: {msg}")

    if model_args.kt_backend not in valid_kt_backends():
        bad(f"kt_backend: '{model_args.kt_backend}' is not a valid backend; valid values: "
            f"{', '.join(valid_kt_backends())}")
    if model_args.kt_num_gpu_experts != 0:
        bad(f"kt_num_gpu_experts must be 0 (all routed experts run on the CPU), got {model_args.kt_num_gpu_experts}")
    if model_args.kt_num_threads is not None and model_args.kt_num_threads < 1:
        bad(f"kt_num_threads must be >= 1, got {model_args.kt_num_threads}")
    if model_args.kt_tp_count is not None and model_args.kt_tp_count < 1:
        bad(f"kt_tp_count must be >= 1, got {model_args.kt_tp_count}")
    if model_args.kt_max_cache_depth < 1:
        bad(f"kt_max_cache_depth must be >= 1, got {model_args.kt_max_cache_depth}")
    if model_args.kt_weight_path and not os.path.exists(model_args.kt_weight_path):
        bad(f"kt_weight_path: {model_args.kt_weight_path} does not exist")
    if finetuning_args.lora_rank < 1:
        bad(f"lora_rank must be >= 1, got {finetuning_args.lora_rank}")
    if not finetuning_args.lora_alpha > 0:
        bad(f"lora_alpha must be > 0, got {finetuning_args.lora_alpha}")
    if not 0 <= finetuning_args.lora_dropout < 1:
        bad(f"lora_dropout must be in [0, 1), got {finetuning_args.lora_dropout}")
    if not finetuning_args.lora_target.strip():
        bad("lora_target is empty; give module names (e.g. q_proj,v_proj,gate_proj) or 'all'")


def _build_common(data, source):
    """The key groups of a parsed config and the four argument objects every
    command uses (model, data, finetuning, generating), checked together."""
    split = _split(data, source, include_training=True)
    model_args = _build(ModelArguments, split["model"], source)
    data_args = _build(DataArguments, split["data"], source)
    finetuning_args = _build(FinetuningArguments, split["finetuning"], source)
    generating_args = _build(GeneratingArguments, split["generating"], source)
    _check_common(model_args, finetuning_args, source)
    return split, model_args, data_args, finetuning_args, generating_args


def get_train_args(config=None, overrides=None):
    """Parse a training config: ``(model_args, data_args, training_args,
    finetuning_args, generating_args)``.  ``config``: a YAML/JSON path, a
    dict, or None (the bundled example, ``examples/train_tiny.yaml``);
    ``overrides``: a dict or a list of ``key=value`` strings."""
    data, source = read_config(config, overrides)
    split, model_args, data_args, finetuning_args, generating_args = _build_common(data, source)

    def bad(msg):
        raise KTAMXConfigError(f"{source}: {msg}")

    if not model_args.model_name_or_path:
        bad(f"model_name_or_path is required (a checkpoint directory, a model id, or '{BUILTIN_MODEL}')")
    if not data_args.dataset:
        bad("dataset is required (e.g. tiny_alpaca, or a .json / .jsonl file)")
    if data_args.template not in TEMPLATES:
        bad(f"template: '{data_args.template}' is not a valid template; valid values: {', '.join(TEMPLATES)}")
    if data_args.cutoff_len < 2:
        bad(f"cutoff_len must be >= 2, got {data_args.cutoff_len}")
    if data_args.max_samples is not None and data_args.max_samples < 1:
        bad(f"max_samples must be >= 1, got {data_args.max_samples}")
    if data_args.val_size < 0:
        bad(f"val_size must be >= 0, got {data_args.val_size}")
    tr = dict(split["training"])
    if isinstance(tr.get("resume_from_checkpoint"), bool):  # `true`: the last checkpoint in output_dir
        tr["resume_from_checkpoint"] = "true" if tr["resume_from_checkpoint"] else None
    if "output_dir" not in tr or not tr["output_dir"]:
        bad("output_dir is required")
    for k, v in TRAINING_DEFAULTS.items():
        tr.setdefault(k, v)
    import torch

    if "dataloader_pin_memory" not in tr:
        tr["dataloader_pin_memory"] = torch.cuda.is_available()
    if tr.get("bf16") and "use_cpu" not in tr and not torch.cuda.is_available():
        tr["use_cpu"] = True  # transformers refuses bf16 without a GPU unless told to use the CPU
    if tr.get("fp16"):
        bad("fp16 is not supported (the kernels take bf16 or fp32 activations); use bf16: true")
    if data_args.val_size and "eval_strategy" not in tr:
        tr["eval_strategy"] = "steps"
        tr.setdefault("eval_steps", tr.get("save_steps", 100))
    training_args = _build(training_arguments_class(), tr, source)
    if training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:
        bad("set num_train_epochs > 0 or max_steps > 0")
    if training_args.per_device_train_batch_size < 1:
        bad(f"per_device_train_batch_size must be >= 1, got {training_args.per_device_train_batch_size}")
    if training_args.gradient_accumulation_steps < 1:
        bad(f"gradient_accumulation_steps must be >= 1, got {training_args.gradient_accumulation_steps}")
    if not training_args.learning_rate > 0:
        bad(f"learning_rate must be > 0, got {training_args.learning_rate}")
    return model_args, data_args, training_args, finetuning_args, generating_args


def get_infer_args(config=None, overrides=None):
    """Parse a chat config: ``(model_args, data_args, finetuning_args,
    generating_args)``; training keys are accepted and ignored (so a training
    config can be reused)."""
    data, source = read_config(config, overrides) if (config is not None or overrides) else ({}, "config")
    split, model_args, data_args, finetuning_args, generating_args = _build_common(data, source)
    if data_args.template not in TEMPLATES:
        raise KTAMXConfigError(f"{source}: template: '{data_args.template}' is not a valid template; "
                               f"valid values: {', '.join(TEMPLATES)}")
    if generating_args.max_new_tokens < 1:
        raise KTAMXConfigError(f"{source}: max_new_tokens must be >= 1")
    return model_args, data_args, finetuning_args, generating_args


def format_keys() -> str:
    """Every accepted key with its group, type and help (``ktmoe train --list-keys``)."""
    lines = []
    for g, cls in _GROUPS:
        lines.append(f"[{g}]")
        hints = _hints(cls)
        for f in _init_fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(f"  {f.name} ({_describe(hints.get(f.name, Any))}, default {default!r}): "
                         f"{f.metadata.get('help', '')}")
    lines.append("[training] (transformers Seq2SeqTrainingArguments, plus overwrite_output_dir, warmup_ratio)")
    own = {f.name for _, c in _GROUPS for f in _init_fields(c)}
    for f in _init_fields(training_arguments_class()):
        if f.name in own:
            continue
        default = TRAINING_DEFAULTS.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        lines.append(f"  {f.name} (default {default!r})")
    return "\n".join(lines)


__all__ = ["ModelArguments", "DataArguments", "FinetuningArguments", "GeneratingArguments",
           "training_arguments_class", "get_train_args", "get_infer_args", "read_config", "parse_overrides",
           "load_config_file", "valid_keys", "valid_kt_backends", "format_keys", "BUILTIN_MODEL",
           "DEFAULT_CONFIG", "TEMPLATES", "TRAINING_DEFAULTS"]
