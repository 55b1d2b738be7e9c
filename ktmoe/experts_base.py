"""Shared base of the inference and SFT wrappers: the CPUInfer singleton and
the checks of the layer's configuration."""

from __future__ import annotations

from abc import ABC
from typing import Optional

import torch

from ._cpuinfer import CPUInfer
from ._validate import check_int, cpu_contiguous


class _MoEBase:
    """Owns the access to the process-wide CPUInfer and validates the layer
    shape (spec 002 §2.1)."""

    @classmethod
    def _get_cpu_infer(cls, cpuinfer_threads: int, threadpool_count: int) -> CPUInfer:
        return CPUInfer.get(cpuinfer_threads, threadpool_count)

    @classmethod
    def _validate_base_config(cls, num_experts, hidden_size, moe_intermediate_size,
                              num_experts_per_tok) -> None:
        check_int("num_experts", num_experts)
        check_int("hidden_size", hidden_size)
        check_int("moe_intermediate_size", moe_intermediate_size)
        check_int("num_experts_per_tok", num_experts_per_tok)
        if num_experts_per_tok > num_experts:
            raise ValueError(
                f"num_experts_per_tok ({num_experts_per_tok}) cannot exceed "
                f"num_experts ({num_experts})"
            )

    def _init_base(self, layer_idx, num_experts, num_experts_per_tok, hidden_size,
                   moe_intermediate_size, num_gpu_experts, cpuinfer_threads, threadpool_count,
                   weight_path, chunked_prefill_size) -> None:
        """Validate the shared configuration and store it (the CPUInfer is
        attached separately, by _attach_cpu_infer, once all checks passed)."""
        self._validate_base_config(num_experts, hidden_size, moe_intermediate_size, num_experts_per_tok)
        self._validate_pool_config(cpuinfer_threads, threadpool_count, moe_intermediate_size)
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.hidden_size = hidden_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_gpu_experts = num_gpu_experts
        self.weight_path = weight_path
        self.chunked_prefill_size = chunked_prefill_size
        self.cpuinfer_threads = cpuinfer_threads
        self.threadpool_count = threadpool_count

    def _check_map(self, physical_to_logical_map_cpu, num_src: int) -> Optional[torch.Tensor]:
        if physical_to_logical_map_cpu is None:
            return None
        m = physical_to_logical_map_cpu
        if not isinstance(m, torch.Tensor):
            m = torch.as_tensor(m)
        if m.dim() != 1 or m.shape[0] != self.num_experts:
            raise ValueError(
                f"physical_to_logical_map shape mismatch: expected ({self.num_experts},), got {tuple(m.shape)}"
            )
        if m.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"physical_to_logical_map must hold integers, got {m.dtype}")
        m = cpu_contiguous(m, torch.int64)
        if m.numel() and (int(m.min()) < 0 or int(m.max()) >= num_src):
            raise ValueError(f"physical_to_logical_map values must be in [0, {num_src})")
        return m

    def _read_weight_files(self, spec):
        """(num_src_experts, gate, up, down) of layer ``layer_idx`` from the
        weight files at ``weight_path`` (memory-mapped; WeightFileError, a
        RuntimeError, on any problem)."""
        from .weight_files import read_layer

        if not self.weight_path:
            raise RuntimeError("load_weights() needs weight_path (a weight file or directory); "
                               "use load_weights_from_tensors() to load tensors")
        return read_layer(self.weight_path, self.layer_idx, spec, hidden_size=self.hidden_size,
                          intermediate_size=self.moe_intermediate_size)

    def _attach_cpu_infer(self) -> None:
        self.cpu_infer = self._get_cpu_infer(self.cpuinfer_threads, self.threadpool_count)

    @classmethod
    def _validate_pool_config(cls, cpuinfer_threads, threadpool_count, moe_intermediate_size) -> None:
        check_int("cpuinfer_threads", cpuinfer_threads)
        check_int("threadpool_count", threadpool_count)
        if moe_intermediate_size % threadpool_count != 0:
            raise ValueError(
                f"intermediate_size ({moe_intermediate_size}) must be "
                f"divisible by threadpool_count ({threadpool_count})"
            )


class BaseMoEWrapper(_MoEBase, ABC):
    """Base of the inference wrappers (``mode="inference"``).  SFT methods
    raise the spec's RuntimeError here."""

    def __init__(self, layer_idx: int, num_experts: int, num_experts_per_tok: int,
                 hidden_size: int, moe_intermediate_size: int, num_gpu_experts: int,
                 cpuinfer_threads: int, threadpool_count: int, weight_path: str,
                 chunked_prefill_size: int, cpu_save: bool = False,
                 max_deferred_experts_per_token: Optional[int] = None):
        self._init_base(layer_idx, num_experts, num_experts_per_tok, hidden_size,
                        moe_intermediate_size, num_gpu_experts, cpuinfer_threads, threadpool_count,
                        weight_path, chunked_prefill_size)
        self._attach_cpu_infer()
        self.cpu_save = cpu_save
        self.max_deferred_experts_per_token = max_deferred_experts_per_token

    def forward_sft(self, *args, **kwargs):
        raise RuntimeError(
            "forward_sft() is not available in inference mode. "
            "Use forward() instead, or create wrapper with mode='sft'."
        )

    def backward(self, *args, **kwargs):
        raise RuntimeError(
            "backward() is not available in inference mode. "
            "Create wrapper with mode='sft' to use SFT features."
        )

    def init_lora_weights(self, *args, **kwargs):
        raise RuntimeError(
            "init_lora_weights() is not available in inference mode. "
            "Create wrapper with mode='sft' to use SFT features."
        )

    def update_lora_weights(self, *args, **kwargs):
        raise RuntimeError(
            "update_lora_weights() is not available in inference mode. "
            "Create wrapper with mode='sft' to use SFT features."
        )
