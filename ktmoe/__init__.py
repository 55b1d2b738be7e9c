"""ktmoe: CPU mixture-of-experts kernels for LoRA fine-tuning of MoE models.

The routed experts of a MoE layer run on libktmoe's CPU kernels (forward,
backward and LoRA gradients) through the ``KTMoEWrapper`` factory::

    from ktmoe import KTMoEWrapper
    w = KTMoEWrapper(layer_idx=0, num_experts=64, num_experts_per_tok=6,
                     hidden_size=2048, moe_intermediate_size=1408,
                     num_gpu_experts=0, cpuinfer_threads=8, threadpool_count=1,
                     weight_path="", chunked_prefill_size=4096,
                     method="AMXBF16_SFT", mode="sft", lora_rank=16, lora_alpha=32)

For a whole Hugging Face MoE model, ``ktmoe.hf.wrap_moe_layers_with_kt_wrapper``
puts every routed-expert block on these kernels (see ``ktmoe.hf``), and
``ktmoe train CONFIG.yaml`` (``ktmoe.train``) fine-tunes one from a
LLaMA-Factory style config.
"""

from __future__ import annotations

from pathlib import Path

from . import _lib
from ._cpuinfer import CPUInfer, split_threads
from .experts import (
    INFERENCE_METHODS,
    SFT_METHODS,
    KTMoEWrapper,
    register_inference_method,
    register_sft_method,
)
from .experts_base import BaseMoEWrapper
from .experts_sft import BaseSFTMoEWrapper, KExpertsSFTBuffer
from .inference import KExpertsCPUBuffer, NativeMoEWrapper
from .sft_backends import NativeSFTMoEWrapper

__version__ = "0.1.0"


def cpu_info() -> dict:
    """CPU features, compiled/usable kernel tiers and the tier selected now
    (after the ``KTMOE_ISA`` cap), plus library path and version."""
    return _lib.cpu_info()


def get_include() -> str:
    """Directory holding ``ktmoe.h`` (for C programs linking libktmoe)."""
    here = Path(__file__).resolve().parent / "include"
    if (here / "ktmoe.h").is_file():
        return str(here)
    src = Path(__file__).resolve().parent.parent / "libktmoe" / "include"
    return str(src)


def get_library() -> str:
    """Path of the libktmoe shared library this package loaded."""
    return str(_lib.LIBRARY_PATH)


#: the Hugging Face integration (ktmoe.hf), importable from here; loaded on
#: first use so that ``import ktmoe`` does not depend on it
_HF_NAMES = (
    "wrap_moe_layers_with_kt_wrapper", "KTMoELayerWrapper", "KTMoEFunction",
    "save_kt_adapter", "load_kt_adapter", "get_kt_peft_model", "load_kt_model", "init_cpu_infer",
)
#: the training workflow (ktmoe.train, ``ktmoe train`` / ``ktmoe chat``), also loaded on first use
_TRAIN_NAMES = ("KTTrainer", "run_sft", "get_train_args", "ChatModel")


def __getattr__(name):
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    if name in _TRAIN_NAMES:
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module 'ktmoe' has no attribute {name!r}")


__all__ = [
    "KTMoEWrapper", "BaseMoEWrapper", "BaseSFTMoEWrapper", "KExpertsSFTBuffer",
    "NativeSFTMoEWrapper", "NativeMoEWrapper", "KExpertsCPUBuffer", "CPUInfer",
    "SFT_METHODS", "INFERENCE_METHODS",
    "register_sft_method", "register_inference_method", "split_threads",
    "cpu_info", "get_include", "get_library", "__version__",
    *_HF_NAMES, *_TRAIN_NAMES,
]
