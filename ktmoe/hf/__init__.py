"""Hugging Face transformers / PEFT integration (spec 004, spec 000 §5).

``wrap_moe_layers_with_kt_wrapper(model, ...)`` puts the routed experts of a
transformers (>= 5) MoE model on ktmoe's CPU kernels, keeping the model's
router, shared experts and everything else; ``KTMoELayerWrapper`` is the
module that takes each block's place and ``KTMoEFunction`` the autograd
bridge.  ``save_kt_adapter`` / ``load_kt_adapter`` store the LoRA in PEFT's
layout.  See docs/hf_integration.md.

Importing this package does not import transformers or peft; the functions
that need them do.
"""

from __future__ import annotations

from .adapter import (
    EXPERT_TARGET_PARAMETERS,
    expert_lora_from_peft,
    expert_lora_to_peft,
    get_kt_peft_model,
    kt_adapter_state_dict,
    load_kt_adapter,
    save_kt_adapter,
)
from .arch import SUPPORTED_ARCHITECTURES, MOEArchConfig, supported_model_types
from .errors import (
    KTAMXBackwardError,
    KTAMXConfigError,
    KTAMXError,
    KTAMXForwardError,
    KTAMXModelNotSupportedError,
    KTAMXNotAvailableError,
)
from .layer import (
    EXPERTS_IMPLEMENTATION,
    KTMoEFunction,
    KTMoELayerWrapper,
    init_lora_params,
    ktmoe_experts_forward,
    register_experts_implementation,
)
from .wrap import (
    KTOptions,
    filter_attention_modules,
    freed_expert_bytes,
    init_cpu_infer,
    kt_weight_bytes,
    kt_wrappers,
    load_kt_model,
    resolve_options,
    update_lora_pointers,
    wrap_moe_layers_with_kt_wrapper,
)

__all__ = [
    "wrap_moe_layers_with_kt_wrapper", "KTMoELayerWrapper", "KTMoEFunction", "MOEArchConfig",
    "init_lora_params", "update_lora_pointers", "kt_wrappers", "freed_expert_bytes", "kt_weight_bytes",
    "init_cpu_infer", "load_kt_model", "filter_attention_modules", "resolve_options", "KTOptions",
    "save_kt_adapter", "load_kt_adapter", "get_kt_peft_model", "kt_adapter_state_dict", "expert_lora_to_peft",
    "expert_lora_from_peft", "EXPERT_TARGET_PARAMETERS",
    "register_experts_implementation", "ktmoe_experts_forward", "EXPERTS_IMPLEMENTATION",
    "SUPPORTED_ARCHITECTURES", "supported_model_types",
    "KTAMXError", "KTAMXNotAvailableError", "KTAMXModelNotSupportedError", "KTAMXConfigError",
    "KTAMXForwardError", "KTAMXBackwardError",
]
