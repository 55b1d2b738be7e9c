"""Wrapping a transformers MoE model: ``wrap_moe_layers_with_kt_wrapper``
(spec 000 §5.1), plus the spec 004 helpers ``init_cpu_infer``,
``load_kt_model`` and ``filter_attention_modules``."""

from __future__ import annotations

import gc
import importlib.util
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..experts import SFT_METHODS, KTMoEWrapper
from ..experts_sft import LORA_NAMES
from .arch import MOEArchConfig, arch_spec, expected_moe_layers, routing_info
from .errors import KTAMXConfigError, KTAMXModelNotSupportedError, KTAMXNotAvailableError
from .layer import EXPERTS_IMPLEMENTATION, KTMoELayerWrapper, init_lora_params, register_experts_implementation

#: spec 004 §4.1 ``kt_backend`` values (and the INT4 family's short names) ->
#: SFT method names; any SFT method name is accepted as well
BACKEND_METHODS = {"AMXBF16": "AMXBF16_SFT", "AMXInt8": "AMXINT8_SFT", "AMXINT8": "AMXINT8_SFT",
                   "AMXInt4": "AMXINT4_SFT", "AMXINT4": "AMXINT4_SFT",
                   "AMXInt4_1": "AMXINT4_1_SFT", "AMXINT4_1": "AMXINT4_1_SFT",
                   "AMXInt4_KGroup": "AMXINT4_KGroup_SFT", "AMXINT4_KGroup": "AMXINT4_KGroup_SFT",
                   "AMXInt4_1KGroup": "AMXINT4_1KGroup_SFT", "AMXINT4_1KGroup": "AMXINT4_1KGroup_SFT"}

_DEFAULTS = dict(kt_backend="AMXBF16", kt_num_threads=None, kt_tp_enabled=False, kt_tp_count=None,
                 kt_num_gpu_experts=0, kt_weight_path=None, kt_max_cache_depth=1,
                 lora_rank=16, lora_alpha=32.0)


@dataclass
class KTOptions:
    """The resolved settings of one wrapping (see
    :func:`wrap_moe_layers_with_kt_wrapper` for where each comes from)."""

    method: str = "AMXBF16_SFT"
    cpuinfer_threads: int = 1
    threadpool_count: int = 1
    num_gpu_experts: int = 0
    weight_path: Optional[str] = None
    max_cache_depth: int = 1
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dtype: torch.dtype = torch.float32
    chunked_prefill_size: int = 8192
    group_size: int = 128
    zero_point: bool = True
    isa: Optional[str] = None


def _arg(obj, name):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def resolve_options(model_args=None, finetuning_args=None, **overrides) -> KTOptions:
    """KTOptions from spec 004 ``ModelArguments`` / ``FinetuningArguments``
    (objects or dicts with the ``kt_*`` / ``lora_*`` fields), with explicit
    keyword overrides taking precedence (None means "not given")."""
    def pick(key, obj):
        v = _arg(obj, key)
        return _DEFAULTS[key] if v is None else v

    backend = pick("kt_backend", model_args)
    method = BACKEND_METHODS.get(backend, backend)
    threads = pick("kt_num_threads", model_args) or os.cpu_count() or 1
    tp_count = _arg(model_args, "kt_tp_count")
    if tp_count is None:
        tp_count = 1
        if pick("kt_tp_enabled", model_args):
            tp_count = _numa_nodes()
    opts = KTOptions(
        method=method, cpuinfer_threads=int(threads), threadpool_count=int(tp_count),
        num_gpu_experts=int(pick("kt_num_gpu_experts", model_args)),
        weight_path=pick("kt_weight_path", model_args),
        max_cache_depth=int(pick("kt_max_cache_depth", model_args)),
        lora_rank=int(pick("lora_rank", finetuning_args)),
        lora_alpha=float(pick("lora_alpha", finetuning_args)),
    )
    for k, v in overrides.items():
        if not hasattr(opts, k):
            raise TypeError(f"unknown option {k!r}")
        if v is not None:
            setattr(opts, k, v)
    if opts.method not in SFT_METHODS:
        raise KTAMXConfigError(
            f"Method '{opts.method}' is not supported in SFT mode. Supported methods: {sorted(SFT_METHODS)}")
    if opts.num_gpu_experts != 0:
        raise KTAMXConfigError(
            f"kt_num_gpu_experts must be 0 (all routed experts on the CPU), got {opts.num_gpu_experts}")
    if opts.lora_dtype not in (torch.float32, torch.bfloat16):
        raise KTAMXConfigError(f"lora_dtype must be torch.float32 or torch.bfloat16, got {opts.lora_dtype}")
    return opts


def _numa_nodes() -> int:
    try:
        nodes = [d for d in os.listdir("/sys/devices/system/node") if d.startswith("node") and d[4:].isdigit()]
        return max(1, len(nodes))
    except OSError:
        return 1


def init_cpu_infer(model_args=None, cpuinfer_threads: Optional[int] = None,
                   threadpool_count: Optional[int] = None):
    """The process-wide CPUInfer pool for ``kt_num_threads`` / ``kt_tp_*``
    (spec 004 §2.2); every wrapped layer shares it."""
    from .._cpuinfer import CPUInfer

    o = resolve_options(model_args, cpuinfer_threads=cpuinfer_threads, threadpool_count=threadpool_count)
    return CPUInfer.get(o.cpuinfer_threads, o.threadpool_count)


def get_base_model(model) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        return model.get_base_model()
    return model


def _decoder_layers(base) -> Iterable[nn.Module]:
    inner = getattr(base, "model", base)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise KTAMXModelNotSupportedError(
            f"Model type '{getattr(base.config, 'model_type', type(base).__name__)}': no decoder layers found "
            "at model.model.layers")
    return layers


def _check_block(model_type: str, idx: int, block: nn.Module, spec, weights_elsewhere: bool = False) -> nn.Module:
    experts = getattr(block, "experts", None)
    if experts is None or not isinstance(getattr(block, spec.router_attr, None), nn.Module):
        raise KTAMXModelNotSupportedError(
            f"Model type '{model_type}': layer {idx} should be a routed-expert block but "
            f"{type(block).__name__} has no 'experts' and '{spec.router_attr}' children")
    if type(experts).__name__ == "ParamWrapper" or hasattr(experts, "base_layer"):
        raise KTAMXConfigError(
            f"layer {idx}: the experts module is wrapped by PEFT (target_parameters); the KT wrapper holds "
            "the expert LoRA itself: wrap the model before adding PEFT adapters on other modules, and "
            "leave the experts out of target_parameters")
    gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3 or dn.dim() != 3:
        raise KTAMXModelNotSupportedError(
            f"Model type '{model_type}': layer {idx} experts ({type(experts).__name__}) lack 3-D "
            "gate_up_proj / down_proj parameters")
    layout = {k: getattr(experts, k, d) for k, d in (("has_gate", True), ("has_bias", False),
                                                      ("is_transposed", False), ("is_concatenated", True),
                                                      ("has_post_expert_norm", False))}
    if layout != {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                  "has_post_expert_norm": False}:
        raise KTAMXModelNotSupportedError(
            f"Model type '{model_type}': experts layout {layout} is not the supported "
            "[gate; up] concatenated, untransposed, bias-free layout")
    from transformers.integrations.moe import _default_apply_gate

    if getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        raise KTAMXModelNotSupportedError(f"Model type '{model_type}': custom expert gating is not supported")
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise KTAMXModelNotSupportedError(
            f"Model type '{model_type}': expert activation '{act}' is not supported (only silu)")
    E, I2, H = gu.shape
    if I2 % 2 or tuple(dn.shape) != (E, H, I2 // 2):
        raise KTAMXModelNotSupportedError(
            f"Model type '{model_type}': layer {idx} gate_up_proj {tuple(gu.shape)} / down_proj "
            f"{tuple(dn.shape)} are not [E, 2I, H] / [E, H, I]")
    if (gu.device.type == "meta" or dn.device.type == "meta") and not weights_elsewhere:
        raise KTAMXConfigError(f"layer {idx}: expert weights are on the meta device (not loaded); pass "
                               "expert_weights or weight_path to load them from elsewhere")
    if any(True for _ in block.named_parameters(recurse=False)) or any(True for _ in block.named_buffers(recurse=False)):
        raise KTAMXModelNotSupportedError(
            f"Model type '{model_type}': {type(block).__name__} holds parameters outside its children")
    return experts


def _return_freed_memory() -> None:
    """Hand the freed expert tensors' pages back to the OS (glibc keeps
    freed heap memory otherwise; RSS would not show the saving)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def wrap_moe_layers_with_kt_wrapper(model, model_args=None, finetuning_args=None, *,
                                    method: Optional[str] = None, cpuinfer_threads: Optional[int] = None,
                                    threadpool_count: Optional[int] = None, lora_rank: Optional[int] = None,
                                    lora_alpha: Optional[float] = None, max_cache_depth: Optional[int] = None,
                                    weight_path: Optional[str] = None, lora_dtype: Optional[torch.dtype] = None,
                                    chunked_prefill_size: Optional[int] = None, group_size: Optional[int] = None,
                                    zero_point: Optional[bool] = None, isa: Optional[str] = None,
                                    generator: Optional[torch.Generator] = None,
                                    expert_weights: Optional[Callable[[int], Tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]]] = None
                                    ) -> List[KTMoELayerWrapper]:
    """Replace every routed-expert block of ``model`` by a KTMoELayerWrapper.

    ``model``: a transformers (>= 5) causal LM or its base model, or a
    PeftModel around one.  Settings come from ``model_args`` (``kt_backend``,
    ``kt_num_threads``, ``kt_tp_enabled`` / ``kt_tp_count``,
    ``kt_weight_path``, ``kt_max_cache_depth``, ``kt_num_gpu_experts``) and
    ``finetuning_args`` (``lora_rank``, ``lora_alpha``), objects or dicts; the
    keywords override them.  Defaults: AMXBF16_SFT, all CPUs, one pool,
    rank 16, alpha 32, depth 1, fp32 LoRA.

    Per MoE layer (dense layers are left alone): the frozen experts move into
    one ``KTMoEWrapper`` (copied from the model's tensors, or read from
    ``weight_path`` files when given) and the model's copies are deleted; the
    router, shared experts and their gate stay the model's own modules and run
    as before; six LoRA factors (A kaiming-uniform, B zero) are registered as
    ``mlp.lora_params.*``.  The model's experts implementation is switched to
    ``"ktmoe"`` (transformers' ExpertsInterface).

    ``expert_weights``: a function ``layer_idx -> (gate [E, I, H], up [E, I,
    H], down [E, H, I])`` giving each layer's frozen experts instead of the
    model's tensors (used to stream them from a checkpoint); with it, or with
    ``weight_path``, the model's expert tensors may be on the meta device.

    Returns the wrappers, also kept as ``model._kt_wrappers``, with
    ``model._kt_cpu_infer`` and ``model._kt_moe_lora_params`` ({layer:
    {name: Parameter}}).  Raises KTAMXModelNotSupportedError (a ValueError)
    naming the model type for an unsupported architecture."""
    opts = resolve_options(model_args, finetuning_args, method=method, cpuinfer_threads=cpuinfer_threads,
                           threadpool_count=threadpool_count, lora_rank=lora_rank, lora_alpha=lora_alpha,
                           max_cache_depth=max_cache_depth, weight_path=weight_path, lora_dtype=lora_dtype,
                           chunked_prefill_size=chunked_prefill_size, group_size=group_size,
                           zero_point=zero_point, isa=isa)
    if importlib.util.find_spec("transformers") is None:  # pragma: no cover
        raise KTAMXNotAvailableError("wrap_moe_layers_with_kt_wrapper needs transformers >= 5")

    base = get_base_model(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None) or type(base).__name__
    spec = arch_spec(model_type)
    if getattr(base, "_kt_wrappers", None):
        raise KTAMXConfigError("this model's MoE layers are already wrapped")
    layers = list(_decoder_layers(base))
    moe_idx = expected_moe_layers(model_type, config, len(layers))

    # check every layer before touching any
    plan = []
    for i, layer in enumerate(layers):
        block = getattr(layer, "mlp", None)
        if isinstance(block, KTMoELayerWrapper):
            raise KTAMXConfigError(f"layer {i} is already wrapped")
        looks_moe = block is not None and hasattr(block, "experts")
        if (i in moe_idx) != looks_moe:
            raise KTAMXModelNotSupportedError(
                f"Model type '{model_type}': layer {i} is {'not ' if not looks_moe else ''}a routed-expert "
                f"block ({type(block).__name__}) but the config says it {'is' if i in moe_idx else 'is not'}")
        if looks_moe:
            plan.append((i, layer, block, _check_block(model_type, i, block, spec,
                                                       bool(opts.weight_path) or expert_weights is not None)))
    if not plan:
        raise KTAMXModelNotSupportedError(f"Model type '{model_type}': no routed-expert layer found")

    register_experts_implementation()
    wrappers: List[KTMoELayerWrapper] = []
    for i, layer, block, experts in plan:
        E, I2, H = experts.gate_up_proj.shape
        I = I2 // 2
        router = getattr(block, spec.router_attr)
        k = int(getattr(router, "top_k", 0) or getattr(config, "num_experts_per_tok"))
        kt = KTMoEWrapper(
            layer_idx=i, num_experts=E, num_experts_per_tok=k, hidden_size=H, moe_intermediate_size=I,
            num_gpu_experts=0, cpuinfer_threads=opts.cpuinfer_threads, threadpool_count=opts.threadpool_count,
            weight_path=opts.weight_path or "", chunked_prefill_size=opts.chunked_prefill_size,
            method=opts.method, mode="sft", lora_rank=opts.lora_rank, lora_alpha=opts.lora_alpha,
            max_cache_depth=opts.max_cache_depth, group_size=opts.group_size, zero_point=opts.zero_point,
            isa=opts.isa)
        freed = sum(t.numel() * t.element_size() for t in (experts.gate_up_proj, experts.down_proj)
                    if t.device.type != "meta")
        with torch.no_grad():
            if opts.weight_path:
                kt.load_weights()
            elif expert_weights is not None:
                g, u, d = expert_weights(i)
                want = {"gate": (E, I, H), "up": (E, I, H), "down": (E, H, I)}
                for name, t in zip(want, (g, u, d)):
                    if tuple(t.shape) != want[name]:
                        raise KTAMXConfigError(f"layer {i}: expert_weights gave {name} of shape {tuple(t.shape)}, "
                                               f"the model expects {want[name]}")
                kt.load_weights_from_tensors(g, u, d)
                del g, u, d
            else:
                gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
                kt.load_weights_from_tensors(gu[:, :I], gu[:, I:], dn)
                del gu, dn
        # one copy of the frozen experts: the model's are dropped
        del experts.gate_up_proj
        del experts.down_proj
        lora = init_lora_params(E, H, I, opts.lora_rank, dtype=opts.lora_dtype, generator=generator)
        moe_cfg = MOEArchConfig(
            model_type=model_type, num_experts=E, num_experts_per_tok=k, hidden_size=H,
            moe_intermediate_size=I, hidden_act=getattr(config, "hidden_act", "silu"),
            router_attr=spec.router_attr, shared_attr=spec.shared_attr, shared_gate_attr=spec.shared_gate_attr,
            routing=routing_info(router))
        wrapper = KTMoELayerWrapper(
            kt, router, getattr(block, spec.shared_attr) if spec.shared_attr else None, moe_cfg, lora, H, i,
            block=block)
        wrapper.freed_bytes = freed
        wrapper.train(block.training)
        experts.__dict__["_kt_layer"] = weakref.ref(wrapper)
        layer.mlp = wrapper
        wrappers.append(wrapper)
    gc.collect()
    _return_freed_memory()

    base.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    if getattr(base.config, "_experts_implementation", None) != EXPERTS_IMPLEMENTATION:
        raise KTAMXModelNotSupportedError(
            f"Model type '{model_type}': could not switch the experts implementation to "
            f"'{EXPERTS_IMPLEMENTATION}'")
    lora_map = {w.layer_idx: {n: w.lora_params[n] for n in LORA_NAMES} for w in wrappers}
    for obj in {id(base): base, id(model): model}.values():
        obj._kt_wrappers = wrappers
        obj._kt_cpu_infer = wrappers[0].kt_wrapper.cpu_infer
        obj._kt_moe_lora_params = lora_map
    return wrappers


def kt_wrappers(model) -> List[KTMoELayerWrapper]:
    """The KTMoELayerWrappers of a wrapped model (in layer order)."""
    return [m for m in get_base_model(model).modules() if isinstance(m, KTMoELayerWrapper)]


def update_lora_pointers(model) -> None:
    """``update_lora_pointers()`` on every wrapped layer (never required:
    each forward does it; offered for the spec's call sites)."""
    for w in kt_wrappers(model):
        w.update_lora_pointers()


def freed_expert_bytes(model) -> int:
    """Bytes of torch expert parameters that wrapping removed from the model."""
    return sum(w.freed_bytes for w in kt_wrappers(model))


def kt_weight_bytes(model) -> int:
    """Bytes of frozen expert weights held by the kernels."""
    return sum(int(getattr(w.kt_wrapper, "weight_bytes", 0)) for w in kt_wrappers(model))


#: module names that the KT wrapper covers (routed experts), which PEFT must not target
_EXPERT_TARGETS = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "experts", "gate_up_proj"}


def filter_attention_modules(lora_target: Any) -> List[str]:
    """The PEFT ``target_modules`` to use with a wrapped model (spec 004 §1.2):
    ``lora_target`` (a list or a comma-separated string) without the expert
    projection names, whose LoRA the KT wrapper holds."""
    if isinstance(lora_target, str):
        names = [t.strip() for t in lora_target.split(",") if t.strip()]
    else:
        names = list(lora_target)
    if any(n in ("all", "all-linear") for n in names):
        return ["q_proj", "k_proj", "v_proj", "o_proj"]
    return [n for n in names if n.split(".")[-1] not in _EXPERT_TARGETS]


def load_kt_model(config, model_args=None, finetuning_args=None, *, model_name_or_path: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None, **wrap_kwargs):
    """Load a causal LM and wrap its MoE layers (spec 004 §2.1).

    From ``model_name_or_path`` (or ``model_args.model_name_or_path``) when
    given, else built from ``config`` with random weights.  A local
    checkpoint directory is streamed (:func:`ktmoe.hf.checkpoint.load_kt_checkpoint`):
    the model is built without weights, its non-expert tensors are read from
    the safetensors shards and each layer's experts go from the shards (or
    from ``kt_weight_path`` weight files) straight into the kernels, so the
    model's experts never exist as torch tensors.  Anything else goes through
    ``AutoModelForCausalLM.from_pretrained`` and is wrapped afterwards.
    Returns the model with ``_kt_wrappers``, ``_kt_cpu_infer`` and
    ``_kt_moe_lora_params``."""
    from transformers import AutoModelForCausalLM

    path = model_name_or_path or _arg(model_args, "model_name_or_path")
    if dtype is None:
        dtype = torch.bfloat16
    if path and os.path.isdir(path):
        from .checkpoint import load_kt_checkpoint

        return load_kt_checkpoint(path, model_args, finetuning_args, config=config, dtype=dtype, **wrap_kwargs)
    if path:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    wrap_moe_layers_with_kt_wrapper(model, model_args, finetuning_args, **wrap_kwargs)
    return model
