"""Shared base of the inference and SFT wrappers: the CPUInfer singleton and
the checks of the layer's configuration."""

from __future__ import annotations

from abc import ABC
from typing import Optional, Tuple

import torch

from ._cpuinfer import CPUInfer
from ._validate import check_int, check_tensor, cpu_contiguous

#: dtypes accepted for activations and for weights given as tensors
_IO_DTYPES = (torch.bfloat16, torch.float32)


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

    def _check_weight_tensors(self, gate_proj, up_proj, down_proj,
                              physical_to_logical_map_cpu) -> tuple:
        """The checks of ``load_weights_from_tensors`` (shared by the SFT and
        inference wrappers).

        gate_proj, up_proj: [E_src, I, H]; down_proj: [E_src, H, I]; bf16 or
        fp32.  Returns ``(gate, up, down, pmap, E_src)``: the three as
        contiguous CPU tensors of one dtype (fp32 when they differ), and the
        checked map (None: identity, then E_src must equal num_experts)."""
        I, H = self.moe_intermediate_size, self.hidden_size
        for n, t in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3:
                raise ValueError(f"{n} shape mismatch: expected 3 dims [E, ., .], got {tuple(t.shape)}")
            if t.dtype not in _IO_DTYPES:
                raise ValueError(f"{n} must be bfloat16 or float32, got {t.dtype}")
        E_src = gate_proj.shape[0]
        check_tensor(gate_proj, "gate_proj", (E_src, I, H))
        check_tensor(up_proj, "up_proj", (E_src, I, H))
        check_tensor(down_proj, "down_proj", (E_src, H, I))
        if physical_to_logical_map_cpu is None and E_src != self.num_experts:
            raise ValueError(
                f"gate_proj shape mismatch: expected {self.num_experts} experts, got {E_src}"
            )
        pmap = self._check_map(physical_to_logical_map_cpu, E_src)
        dtype = gate_proj.dtype if gate_proj.dtype == up_proj.dtype == down_proj.dtype else torch.float32
        g, u, d = (cpu_contiguous(t, dtype) for t in (gate_proj, up_proj, down_proj))
        return g, u, d, pmap, E_src

    def _check_packed_weights(self, layer, gate: dict, up: dict, down: dict,
                              physical_to_logical_map_cpu,
                              num_src_experts: Optional[int] = None) -> Tuple[tuple, Optional[torch.Tensor], int]:
        """The checks of ``load_packed_weights`` (shared): ``layer`` (a
        ``_native.NativeLayer``) checks the parts against its specs.  Returns
        ``(packed, pmap, E_src)`` ready for ``layer.load_packed``."""
        packed = layer.check_packed(gate, up, down, num_src_experts)
        E_src = packed[0]["qweight"].shape[0]
        if physical_to_logical_map_cpu is None and E_src != self.num_experts:
            raise ValueError(f"gate_proj shape mismatch: expected {self.num_experts} experts, got {E_src}")
        pmap = self._check_map(physical_to_logical_map_cpu, E_src)
        return packed, pmap, E_src

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
    """Base of the inference wrappers (``mode="inference"``): the inference
    configuration (``num_gpu_experts``, ``chunked_prefill_size``,
    ``cpu_save``, ``max_deferred_experts_per_token``), the backend-independent
    :meth:`select_deferred_experts`, and the spec's RuntimeErrors for the SFT
    methods.  ``ktmoe.inference.NativeMoEWrapper`` is the libktmoe backend."""

    def __init__(self, layer_idx: int, num_experts: int, num_experts_per_tok: int,
                 hidden_size: int, moe_intermediate_size: int, num_gpu_experts: int,
                 cpuinfer_threads: int, threadpool_count: int, weight_path: str,
                 chunked_prefill_size: int, cpu_save: bool = False,
                 max_deferred_experts_per_token: Optional[int] = None):
        self._init_base(layer_idx, num_experts, num_experts_per_tok, hidden_size,
                        moe_intermediate_size, num_gpu_experts, cpuinfer_threads, threadpool_count,
                        weight_path, chunked_prefill_size)
        self._validate_inference_config(num_experts, num_gpu_experts, chunked_prefill_size,
                                        max_deferred_experts_per_token)
        self._attach_cpu_infer()
        self.cpu_save = bool(cpu_save)
        self.max_deferred_experts_per_token = max_deferred_experts_per_token

    @staticmethod
    def _validate_inference_config(num_experts, num_gpu_experts, chunked_prefill_size,
                                   max_deferred_experts_per_token) -> None:
        check_int("num_gpu_experts", num_gpu_experts, minimum=0)
        if num_gpu_experts > num_experts:
            raise ValueError(
                f"num_gpu_experts ({num_gpu_experts}) must be in [0, num_experts={num_experts}]"
            )
        check_int("chunked_prefill_size", chunked_prefill_size)
        if max_deferred_experts_per_token is not None:
            check_int("max_deferred_experts_per_token", max_deferred_experts_per_token, minimum=0)

    def select_deferred_experts(self, expert_ids: torch.Tensor, scores: torch.Tensor,
                                protected_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Split each token's routed slots into an immediate and a deferred set.

        expert_ids [q, k] (integer, -1 allowed), scores [q, k] (floating; the
        router's scores or the routing weights); 0 <= protected_k <= k.  Per
        token, the ``protected_k`` highest-scoring slots are never deferred;
        of the others, the ``min(max_deferred_experts_per_token, k -
        protected_k)`` lowest-scoring slots are deferred (none when
        max_deferred_experts_per_token is None or 0).  Ties rank the earlier
        slot higher (the later slot is deferred first).

        Returns ``(immediate_ids, deferred_ids)``: two [q, k] int64 copies of
        expert_ids on its device, with -1 in the slots of the other set, so
        that forward(x, immediate_ids, w) + forward(x, deferred_ids, w) is the
        full output.  See docs/inference.md for the intended overlap."""
        k = self.num_experts_per_tok
        if not isinstance(expert_ids, torch.Tensor):
            raise TypeError(f"expert_ids must be a torch.Tensor, got {type(expert_ids).__name__}")
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
        if expert_ids.dim() != 2 or expert_ids.shape[1] != k:
            raise ValueError(f"expert_ids shape mismatch: expected [qlen, {k}], got {list(expert_ids.shape)}")
        if tuple(scores.shape) != tuple(expert_ids.shape):
            raise ValueError(f"scores shape mismatch: expected {list(expert_ids.shape)}, "
                             f"got {list(scores.shape)}")
        if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
            raise ValueError(f"expert_ids must be int64 (or int32), got {expert_ids.dtype}")
        if not scores.dtype.is_floating_point:
            raise ValueError(f"scores must be floating point, got {scores.dtype}")
        if isinstance(protected_k, bool) or not isinstance(protected_k, int):
            raise ValueError(f"protected_k must be an int in [0, {k}], got {protected_k!r}")
        if not 0 <= protected_k <= k:
            raise ValueError(f"protected_k must be in [0, {k}], got {protected_k}")
        ids = expert_ids.to(torch.int64, copy=True)
        n_def = min(self.max_deferred_experts_per_token or 0, k - protected_k)
        if n_def == 0 or ids.shape[0] == 0:
            return ids, torch.full_like(ids, -1)
        order = torch.sort(scores.to(ids.device), dim=1, descending=True, stable=True).indices
        deferred = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        deferred.scatter_(1, order[:, k - n_def:], True)
        immediate_ids = ids.masked_fill(deferred, -1)
        deferred_ids = ids.masked_fill(~deferred, -1)
        return immediate_ids, deferred_ids

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
