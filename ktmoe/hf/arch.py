"""What the integration knows about each supported transformers (>= 5) MoE
architecture: which decoder layers hold a routed-expert block, and the names
of the block's router and shared-expert children.

All supported architectures share one layout (see docs/hf_integration.md):
the block at ``model.layers[i].mlp`` holds a router module returning
``(router_logits, top_k_weights, top_k_index)`` and an experts module with
``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``
that the block calls as ``experts(hidden[T, H], top_k_index, top_k_weights)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .errors import KTAMXModelNotSupportedError


@dataclass(frozen=True)
class _ArchSpec:
    router_attr: str = "gate"
    shared_attr: Optional[str] = None        # shared expert MLP
    shared_gate_attr: Optional[str] = None   # Linear(H, 1): sigmoid gate of the shared expert
    dense_rule: str = "all"                  # "qwen" | "first_k" | "all"


#: model_type -> layout facts (checked against the instantiated modules when wrapping)
SUPPORTED_ARCHITECTURES: Dict[str, _ArchSpec] = {
    "qwen2_moe": _ArchSpec(shared_attr="shared_expert", shared_gate_attr="shared_expert_gate",
                           dense_rule="qwen"),
    "qwen3_moe": _ArchSpec(dense_rule="qwen"),
    "qwen3_next": _ArchSpec(shared_attr="shared_expert", shared_gate_attr="shared_expert_gate",
                            dense_rule="qwen"),
    "mixtral": _ArchSpec(),
    "olmoe": _ArchSpec(),
    "deepseek_v2": _ArchSpec(shared_attr="shared_experts", dense_rule="first_k"),
    "deepseek_v3": _ArchSpec(shared_attr="shared_experts", dense_rule="first_k"),
    "glm4_moe": _ArchSpec(shared_attr="shared_experts", dense_rule="first_k"),
}


@dataclass(frozen=True)
class MOEArchConfig:
    """One MoE layer's architecture, as the wrapper uses it.

    ``router_attr`` / ``shared_attr`` / ``shared_gate_attr`` name the block's
    children (None where the architecture has none).  The routing fields are
    informational: the model's own router computes the routing."""

    model_type: str
    num_experts: int
    num_experts_per_tok: int
    hidden_size: int
    moe_intermediate_size: int
    hidden_act: str = "silu"
    router_attr: str = "gate"
    shared_attr: Optional[str] = None
    shared_gate_attr: Optional[str] = None
    routing: Dict[str, object] = field(default_factory=dict, compare=False)


def supported_model_types() -> Tuple[str, ...]:
    return tuple(sorted(SUPPORTED_ARCHITECTURES))


def arch_spec(model_type: str) -> _ArchSpec:
    spec = SUPPORTED_ARCHITECTURES.get(model_type)
    if spec is None:
        raise KTAMXModelNotSupportedError(
            f"Model type '{model_type}' is not supported by the KT MoE wrapper. "
            f"Supported model types: {', '.join(supported_model_types())}"
        )
    return spec


def expected_moe_layers(model_type: str, config, num_layers: int) -> List[int]:
    """Indices of the decoder layers that the config makes routed-expert
    layers (``mlp_only_layers`` / ``decoder_sparse_step`` for the Qwen family,
    ``first_k_dense_replace`` for DeepSeek / GLM, every layer otherwise)."""
    rule = arch_spec(model_type).dense_rule
    if rule == "qwen":
        only = set(getattr(config, "mlp_only_layers", None) or [])
        step = getattr(config, "decoder_sparse_step", 1) or 1
        n_exp = getattr(config, "num_experts", 1)
        return [i for i in range(num_layers) if i not in only and n_exp > 0 and (i + 1) % step == 0]
    if rule == "first_k":
        k = getattr(config, "first_k_dense_replace", 0) or 0
        return list(range(k, num_layers))
    return list(range(num_layers))


def routing_info(router) -> Dict[str, object]:
    """The router's routing parameters (for repr and docs)."""
    keys = ("top_k", "num_experts", "norm_topk_prob", "routed_scaling_factor", "topk_method",
            "num_group", "topk_group")
    info = {k: getattr(router, k) for k in keys if hasattr(router, k)}
    if hasattr(router, "e_score_correction_bias"):
        info["e_score_correction_bias"] = True
    return info
