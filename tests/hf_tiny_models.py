"""Tiny random Hugging Face MoE models (built from config classes, nothing
downloaded) for the integration tests, one per supported architecture.

Each config keeps hidden size 32-64, 2-3 layers and 4-8 experts, and where the
architecture has dense layers (``first_k_dense_replace``, ``mlp_only_layers``,
``decoder_sparse_step``) one layer is dense so that the wrapping must skip it.
"""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

#: case name -> extra config keywords (on top of COMMON); the case name is the
#: model type unless the keywords say otherwise ("model_type")
CONFIGS = {
    "qwen2_moe": dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=16, intermediate_size=48,
                      shared_expert_intermediate_size=24, mlp_only_layers=[1],
                      norm_topk_prob=False),
    "qwen3_moe": dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=3,
                      moe_intermediate_size=16, intermediate_size=48, head_dim=8,
                      norm_topk_prob=True, decoder_sparse_step=1),
    "mixtral": dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                    intermediate_size=24, head_dim=8),
    "deepseek_v2": dict(num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
                        moe_intermediate_size=16, intermediate_size=48, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, head_dim=4,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        routed_scaling_factor=1.5),
    "deepseek_v2_greedy": dict(model_type="deepseek_v2", num_hidden_layers=2, num_key_value_heads=4,
                               n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                               intermediate_size=48, n_shared_experts=2, first_k_dense_replace=0,
                               kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, v_head_dim=8,
                               qk_nope_head_dim=8, head_dim=4, topk_method="greedy", routed_scaling_factor=1.0),
    "deepseek_v3": dict(num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
                        moe_intermediate_size=16, intermediate_size=48, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                        qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, head_dim=4,
                        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
    "glm4_moe": dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=16, intermediate_size=48, n_shared_experts=1,
                     first_k_dense_replace=1, head_dim=8, n_group=2, topk_group=1,
                     norm_topk_prob=True, routed_scaling_factor=1.8),
    "olmoe": dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                  intermediate_size=16, norm_topk_prob=False),
    "qwen3_next": dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=16, intermediate_size=48,
                       shared_expert_intermediate_size=24, head_dim=8,
                       layer_types=["linear_attention", "full_attention"],
                       linear_num_value_heads=4, linear_num_key_heads=2,
                       linear_key_head_dim=8, linear_value_head_dim=8,
                       linear_conv_kernel_dim=4, norm_topk_prob=True),
}

ARCHS = tuple(CONFIGS)


def tiny_config(case: str, **overrides):
    from transformers import AutoConfig

    kw = dict(COMMON)
    kw.update(CONFIGS[case])
    kw.update(overrides)
    model_type = kw.pop("model_type", case)
    return AutoConfig.for_model(model_type, **kw)


def bf16_round_experts_(model) -> None:
    """Round every routed expert weight to bf16-representable values (in
    place, keeping the dtype): the BF16 method stores them in bf16, so a
    reference with the same values differs from it only by fp32 rounding."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                p.copy_(p.to(torch.bfloat16).to(p.dtype))


def tiny_model(case: str, seed: int = 0, dtype=torch.float32, experts_implementation="eager",
               **overrides):
    """A tiny random ``AutoModelForCausalLM`` for ``case`` (a key of CONFIGS;
    eval mode, expert weights bf16-representable)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(case, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                             experts_implementation=experts_implementation)
    # larger random weights than the default init so routing and LoRA matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("experts" in name or "gate" in name):
                p.normal_(0.0, 0.2)
    bf16_round_experts_(model)
    model.eval()
    return model
