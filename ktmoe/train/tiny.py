"""The built-in tiny MoE model (``model_name_or_path: builtin:tiny-moe``).

``ktmoe train`` with it needs no download: a byte-level BPE tokenizer is
trained (with the ``tokenizers`` library) on the bundled instruction data, a
Qwen3-MoE-shaped model is built from a config with seeded random weights,
and both are saved as an ordinary Hugging Face checkpoint directory
(``<output_dir>/base_model``: bf16 safetensors, config, tokenizer with a
ChatML chat template).  Training then loads that directory like any local
checkpoint (streaming the experts into the kernels), and ``ktmoe chat``
finds it through the adapter's ``base_model_name_or_path``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from ..hf.errors import KTAMXConfigError
from .args import BUILTIN_MODEL

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

#: the built-in model: Qwen3-MoE layout, 4 MoE layers of 16 experts (top 4), hidden 256
TINY_MODEL_CONFIG: Dict[str, Any] = dict(
    model_type="qwen3_moe", hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, head_dim=32, num_experts=16, num_experts_per_tok=4,
    moe_intermediate_size=256, intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1,
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
    # larger than transformers' 0.02: with a frozen random lm_head of std 0.02 the logits cannot
    # exceed ~2.5, which caps how far a LoRA can lower the loss (about 4.4 nats for 1024 tokens)
    initializer_range=0.1,
)
TOKENIZER_VOCAB = 1024
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MARKER = "ktmoe_builtin.json"
#: bump when the built model or tokenizer would change for the same settings
BUILTIN_VERSION = 1


def _corpus():
    """Texts the tokenizer is trained on: the bundled conversations as the
    chat template renders them."""
    alpaca = json.loads((DATA_DIR / "tiny_sft_alpaca.json").read_text(encoding="utf-8"))
    sharegpt = json.loads((DATA_DIR / "tiny_sft_sharegpt.json").read_text(encoding="utf-8"))
    for ex in alpaca:
        user = ex["instruction"] + ("\n" + ex["input"] if ex.get("input") else "")
        yield f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{ex['output']}<|im_end|>\n"
    for conv in sharegpt:
        parts = []
        if conv.get("system"):
            parts.append(f"<|im_start|>system\n{conv['system']}<|im_end|>\n")
        for t in conv["conversations"]:
            role = "user" if t["from"] == "human" else "assistant"
            parts.append(f"<|im_start|>{role}\n{t['value']}<|im_end|>\n")
        yield "".join(parts)


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer trained on the bundled data, as a
    ``PreTrainedTokenizerFast`` with a ChatML chat template (eos
    ``<|im_end|>``, pad ``<|pad|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(_corpus()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
                                   model_max_length=TINY_MODEL_CONFIG["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def builtin_spec(overrides: Optional[Dict[str, Any]] = None, seed: int = 0) -> dict:
    cfg = dict(TINY_MODEL_CONFIG)
    cfg.update(overrides or {})
    return {"version": BUILTIN_VERSION, "config": cfg, "seed": seed}


def build_builtin_model(out_dir, overrides: Optional[Dict[str, Any]] = None, seed: int = 0) -> Path:
    """Build the tiny model and its tokenizer and save them to ``out_dir``
    (bf16 safetensors).  The expert weights are random with standard
    deviation 1/sqrt(fan-in)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = builtin_spec(overrides, seed)
    cfg = dict(spec["config"])
    model_type = cfg.pop("model_type")
    tokenizer = build_tokenizer()
    vocab = (len(tokenizer) + 63) // 64 * 64
    try:
        config = AutoConfig.for_model(model_type, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **cfg)
    except (ValueError, TypeError) as e:
        raise KTAMXConfigError(f"builtin_model_config: {e}") from None
    gen = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    model = model.to(torch.bfloat16)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MARKER).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def prepare_builtin_model(model_args, output_dir, seed: int = 0) -> bool:
    """When ``model_args.model_name_or_path`` is the built-in model, make sure
    ``<output_dir>/base_model`` holds it (built when missing or built with
    other settings) and point ``model_name_or_path`` there.  Returns whether
    the built-in model is used."""
    if model_args.model_name_or_path != BUILTIN_MODEL:
        return False
    out = Path(output_dir) / "base_model"
    spec = builtin_spec(model_args.builtin_model_config, seed)
    marker = out / MARKER
    current = None
    if marker.is_file():
        try:
            current = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            current = None
    if current != json.loads(json.dumps(spec)) or not (out / "config.json").is_file():
        build_builtin_model(out, model_args.builtin_model_config, seed)
    model_args.model_name_or_path = str(out.resolve())
    return True


__all__ = ["TINY_MODEL_CONFIG", "build_tokenizer", "build_builtin_model", "prepare_builtin_model",
           "DATA_DIR", "CHAT_TEMPLATE"]
