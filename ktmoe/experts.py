"""The ``KTMoEWrapper`` factory and the method registries (spec 000 §1, §4)."""

from __future__ import annotations

from collections.abc import Set
from typing import Dict, Optional, Type

from .experts_base import BaseMoEWrapper, _MoEBase
from .experts_sft import BaseSFTMoEWrapper, KExpertsSFTBuffer


class _MethodRegistry(Set):
    """A read-only set view of a name -> wrapper-class registry."""

    def __init__(self):
        self._classes: Dict[str, Type] = {}

    def __contains__(self, name) -> bool:
        return name in self._classes

    def __iter__(self):
        return iter(sorted(self._classes))

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({sorted(self._classes)})"

    def register(self, name: str, cls: Type) -> None:
        self._classes[name] = cls

    def cls(self, name: str) -> Type:
        return self._classes[name]


#: SFT method names (a live view of the registry; see register_sft_method).
SFT_METHODS = _MethodRegistry()
#: Inference method names (spec 001 §1.2).
INFERENCE_METHODS = _MethodRegistry()


def register_sft_method(name: str, cls: Type[BaseSFTMoEWrapper]) -> None:
    """Make ``KTMoEWrapper(..., mode="sft", method=name)`` build ``cls``.
    ``cls(method=name, isa=..., group_size=..., zero_point=..., **base_kwargs)``."""
    if not (isinstance(cls, type) and issubclass(cls, BaseSFTMoEWrapper)):
        raise TypeError("an SFT method class must subclass BaseSFTMoEWrapper")
    SFT_METHODS.register(name, cls)


def register_inference_method(name: str, cls: Optional[Type[BaseMoEWrapper]]) -> None:
    """Make ``KTMoEWrapper(..., mode="inference", method=name)`` build ``cls``
    (None: a known method whose backend is not available yet).
    ``cls(method=name, isa=..., group_size=..., zero_point=..., cpu_save=...,
    max_deferred_experts_per_token=..., **base_kwargs)``."""
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, BaseMoEWrapper)):
        raise TypeError("an inference method class must subclass BaseMoEWrapper")
    INFERENCE_METHODS.register(name, cls)


class KTMoEWrapper:
    """Factory: ``KTMoEWrapper(...)`` returns a BaseMoEWrapper (inference) or a
    BaseSFTMoEWrapper (sft) subclass instance, chosen by ``mode`` and
    ``method``.  Extra keyword ``isa`` (ktmoe extension) caps the kernel tier."""

    SFT_METHODS = SFT_METHODS
    INFERENCE_METHODS = INFERENCE_METHODS

    def __new__(
        cls,
        layer_idx: int,
        num_experts: int,
        num_experts_per_tok: int,
        hidden_size: int,
        moe_intermediate_size: int,
        num_gpu_experts: int,
        cpuinfer_threads: int,
        threadpool_count: int,
        weight_path: str,
        chunked_prefill_size: int,
        cpu_save: bool = False,
        max_deferred_experts_per_token: Optional[int] = None,
        method: str = "AMXINT4",
        mode: str = "inference",
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        max_cache_depth: int = 1,
        group_size: int = 128,
        zero_point: bool = True,
        isa: Optional[str] = None,
        int8_activations: Optional[bool] = None,
        batch_invariant: Optional[bool] = None,
        activation: str = "silu",
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
    ):
        if mode not in ("inference", "sft"):
            raise ValueError(f"Unknown mode: '{mode}'. Must be 'inference' or 'sft'.")
        if mode == "inference" and method not in INFERENCE_METHODS:
            raise ValueError(
                f"Method '{method}' is not supported in inference mode. "
                f"Supported methods: {sorted(INFERENCE_METHODS)}"
            )
        if mode == "sft" and method not in SFT_METHODS:
            raise ValueError(
                f"Method '{method}' is not supported in SFT mode. "
                f"Supported methods: {sorted(SFT_METHODS)}"
            )
        base_kwargs = dict(
            layer_idx=layer_idx,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            hidden_size=hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            num_gpu_experts=num_gpu_experts,
            cpuinfer_threads=cpuinfer_threads,
            threadpool_count=threadpool_count,
            weight_path=weight_path,
            chunked_prefill_size=chunked_prefill_size,
        )
        # the expert activation: silu(g) * u, or GPT-OSS's clamped SwiGLU
        # ("swiglu_clamp", with swiglu_alpha and swiglu_limit) -- SFT mode
        act = {} if activation == "silu" else dict(activation=activation, swiglu_alpha=swiglu_alpha,
                                                    swiglu_limit=swiglu_limit)
        if mode == "sft":
            return SFT_METHODS.cls(method)(
                method=method, isa=isa, group_size=group_size, zero_point=zero_point,
                lora_rank=lora_rank, lora_alpha=lora_alpha, max_cache_depth=max_cache_depth,
                **act, **base_kwargs,
            )
        if act:
            raise ValueError(f"activation {activation!r} is supported in SFT mode only "
                             "(inference layers compute silu(g) * u)")
        impl = INFERENCE_METHODS.cls(method)
        if impl is None:
            # validate the shared configuration first, so bad values still get
            # the spec's ValueError
            _MoEBase._validate_base_config(num_experts, hidden_size, moe_intermediate_size,
                                           num_experts_per_tok)
            raise NotImplementedError(f"inference method '{method}' is not implemented yet")
        extra = {} if int8_activations is None else {"int8_activations": int8_activations}
        if batch_invariant is not None:
            extra["batch_invariant"] = batch_invariant
        return impl(method=method, isa=isa, group_size=group_size, zero_point=zero_point,
                    cpu_save=cpu_save, max_deferred_experts_per_token=max_deferred_experts_per_token,
                    **extra, **base_kwargs)


def _register_builtin() -> None:
    from .inference import CheckpointMoEWrapper, LlamafileMoEWrapper, NativeMoEWrapper
    from .sft_backends import NativeSFTMoEWrapper

    for name in NativeSFTMoEWrapper.METHODS:
        register_sft_method(name, NativeSFTMoEWrapper)
    # AMXINT4, AMXINT8, MOE_INT4, MOE_INT8; RAWINT4, FP8; LLAMAFILE
    for cls in (NativeMoEWrapper, CheckpointMoEWrapper, LlamafileMoEWrapper):
        for name in cls.SPECS:
            register_inference_method(name, cls)


_register_builtin()

__all__ = [
    "KTMoEWrapper", "SFT_METHODS", "INFERENCE_METHODS", "register_sft_method",
    "register_inference_method", "BaseMoEWrapper", "BaseSFTMoEWrapper", "KExpertsSFTBuffer",
]
