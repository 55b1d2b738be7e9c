"""SFT (LoRA fine-tuning) wrappers: the base class with the spec's public
methods, and the staging buffers used for CUDA tensors."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import ClassVar, Dict, Optional

import torch

from ._validate import check_int, check_rows, check_tensor, cpu_contiguous, staging_tensor
from .experts_base import _IO_DTYPES, _MoEBase

LORA_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")
GRAD_NAMES = tuple("grad_" + n for n in LORA_NAMES)


class KExpertsSFTBuffer:
    """Reusable CPU staging buffers for one (hidden_size, dtype, device kind).

    Tensors on a CUDA device are copied through these (pinned when CUDA is
    available) instead of fresh allocations per call.  A buffer grows to the
    largest qlen seen and is then reused; ``clear_cache()`` frees them all.
    CPU tensors are passed to the kernels in place and never staged."""

    _buffer_lock: ClassVar[threading.Lock] = threading.Lock()
    capture_buffers: ClassVar[Dict[tuple, "KExpertsSFTBuffer"]] = {}

    def __init__(self, qlen: int, hidden_size: int, num_experts_per_tok: int,
                 dtype: torch.dtype = torch.bfloat16):
        self.capacity = max(int(qlen), 1)
        self.hidden_size = hidden_size
        self.num_experts_per_tok = num_experts_per_tok
        self.dtype = dtype
        q, h, k = self.capacity, hidden_size, num_experts_per_tok
        buf = staging_tensor

        self.input_cpu = buf((q, h), dtype)
        self.expert_ids_cpu = buf((q, k), torch.int64)
        self.weights_cpu = buf((q, k), torch.float32)
        self.output_cpu = buf((q, h), dtype)
        self.grad_output_cpu = buf((q, h), dtype)
        self.grad_input_cpu = buf((q, h), dtype)

    @classmethod
    def get_buffer(cls, qlen: int, hidden_size: int, num_experts_per_tok: int,
                   dtype: torch.dtype = torch.bfloat16) -> "KExpertsSFTBuffer":
        key = (hidden_size, num_experts_per_tok, dtype)
        with cls._buffer_lock:
            b = cls.capture_buffers.get(key)
            if b is None or b.capacity < qlen:
                cap = qlen if b is None else max(qlen, 2 * b.capacity)
                b = cls(cap, hidden_size, num_experts_per_tok, dtype)
                cls.capture_buffers[key] = b
            return b

    @classmethod
    def clear_cache(cls) -> None:
        with cls._buffer_lock:
            cls.capture_buffers.clear()


class BaseSFTMoEWrapper(_MoEBase, ABC):
    """Base of the SFT wrappers (``mode="sft"``).

    Validates every input before a pointer crosses, stages CUDA tensors
    through CPU buffers, keeps the forward-cache depth, and re-binds the LoRA
    tensors whenever their storage changed.  A backend implements the
    ``_backend_*`` hooks."""

    def __init__(self, layer_idx: int, num_experts: int, num_experts_per_tok: int,
                 hidden_size: int, moe_intermediate_size: int, num_gpu_experts: int,
                 cpuinfer_threads: int, threadpool_count: int, weight_path: str,
                 chunked_prefill_size: int, lora_rank: int = 16, lora_alpha: float = 32.0,
                 max_cache_depth: int = 1, skip_lora: bool = False):
        self._init_base(layer_idx, num_experts, num_experts_per_tok, hidden_size,
                        moe_intermediate_size, num_gpu_experts, cpuinfer_threads, threadpool_count,
                        weight_path, chunked_prefill_size)
        self._validate_sft_config(lora_rank, lora_alpha, max_cache_depth)
        if num_gpu_experts != 0:
            raise ValueError(
                f"num_gpu_experts must be 0 in SFT mode (all routed experts run on the CPU), "
                f"got {num_gpu_experts}"
            )
        self._attach_cpu_infer()

        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha)
        self.lora_scaling = self.lora_alpha / lora_rank
        self.max_cache_depth = max_cache_depth
        #: frozen experts (the ``*_SkipLoRA`` methods): no expert LoRA; the
        #: backward gives grad_input and the routing-weight gradient only
        self.skip_lora = bool(skip_lora)

        self.gate_lora_a: Optional[torch.Tensor] = None
        self.gate_lora_b: Optional[torch.Tensor] = None
        self.up_lora_a: Optional[torch.Tensor] = None
        self.up_lora_b: Optional[torch.Tensor] = None
        self.down_lora_a: Optional[torch.Tensor] = None
        self.down_lora_b: Optional[torch.Tensor] = None

        self._weights_loaded = False
        self._lora_initialized = False
        self._cache_depth = 0
        self._cache_qlens: list = []
        self._bound_ptrs: Optional[tuple] = None
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- checks

    @staticmethod
    def _validate_sft_config(lora_rank, lora_alpha, max_cache_depth) -> None:
        check_int("lora_rank", lora_rank)
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
            raise TypeError(f"lora_alpha must be a number, got {type(lora_alpha).__name__}")
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {lora_alpha}")
        check_int("max_cache_depth", max_cache_depth)

    def _lora_shapes(self) -> dict:
        E, r, H, I = self.num_experts, self.lora_rank, self.hidden_size, self.moe_intermediate_size
        return {
            "gate_lora_a": (E, r, H), "gate_lora_b": (E, I, r),
            "up_lora_a": (E, r, H), "up_lora_b": (E, I, r),
            "down_lora_a": (E, r, I), "down_lora_b": (E, H, r),
        }

    def _validate_lora_weight(self, weight, name: str, expected_shape: tuple) -> torch.Tensor:
        check_tensor(weight, name, expected_shape)
        if weight.dtype not in _IO_DTYPES:
            raise ValueError(f"{name} must be bfloat16 or float32, got {weight.dtype}")
        if weight.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU (it is read in place), got {weight.device}")
        if not weight.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is read in place)")
        return weight

    def _lora_tensors(self) -> tuple:
        return tuple(getattr(self, n) for n in LORA_NAMES)

    def _ensure_lora_bound(self) -> None:
        """Re-binds the LoRA tensors when any was replaced or moved, so a
        stale pointer is never read."""
        tensors = self._lora_tensors()
        if any(t is None for t in tensors):
            raise RuntimeError("LoRA weights not initialized. Call init_lora_weights() first.")
        ptrs = tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.is_contiguous()) for t in tensors)
        if ptrs == self._bound_ptrs:
            return
        shapes = self._lora_shapes()
        for n, t in zip(LORA_NAMES, tensors):
            self._validate_lora_weight(t, n, shapes[n])
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            raise ValueError(f"all six LoRA tensors must share one dtype, got {sorted(map(str, dtypes))}")
        self._backend_bind_lora(tensors)
        self._bound_ptrs = ptrs

    # ----------------------------------------------------------- public API

    @abstractmethod
    def load_weights(self, physical_to_logical_map_cpu: torch.Tensor) -> None:
        """Load the frozen expert weights from ``weight_path``."""

    def load_weights_from_tensors(self, gate_proj: torch.Tensor, up_proj: torch.Tensor,
                                  down_proj: torch.Tensor,
                                  physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """Copy the frozen weights in (quantizing where the method asks).

        gate_proj, up_proj: [E_src, I, H]; down_proj: [E_src, H, I]; bf16 (or
        fp32, rounded to bf16).  Physical expert p takes source expert
        ``physical_to_logical_map_cpu[p]`` (identity when None).  The tensors
        are not kept: free them after the call to hold one copy."""
        g, u, d, pmap, E_src = self._check_weight_tensors(gate_proj, up_proj, down_proj,
                                                          physical_to_logical_map_cpu)
        with self._lock:
            self._weights_loaded = False  # a failed load leaves the layer unloaded
            self._backend_load_tensors(g, u, d, pmap, E_src)
            self._weights_loaded = True

    def init_lora_weights(self, gate_lora_a: torch.Tensor, gate_lora_b: torch.Tensor,
                          up_lora_a: torch.Tensor, up_lora_b: torch.Tensor,
                          down_lora_a: torch.Tensor, down_lora_b: torch.Tensor) -> None:
        """Bind the six LoRA factors (CPU, contiguous, bf16 or fp32; all one
        dtype).  They are read in place: changes to them are seen by the next
        call (see update_lora_weights)."""
        if self.skip_lora:
            raise RuntimeError(f"{getattr(self, 'method', type(self).__name__)} keeps the experts frozen "
                               "(SkipLoRA): it has no expert LoRA to initialize")
        given = dict(zip(LORA_NAMES, (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)))
        shapes = self._lora_shapes()
        for n in LORA_NAMES:
            self._validate_lora_weight(given[n], n, shapes[n])
        dtypes = {t.dtype for t in given.values()}
        if len(dtypes) != 1:
            raise ValueError(f"all six LoRA tensors must share one dtype, got {sorted(map(str, dtypes))}")
        with self._lock:
            for n in LORA_NAMES:
                setattr(self, n, given[n])
            self._bound_ptrs = None
            self._ensure_lora_bound()
            self._lora_initialized = True

    def update_lora_weights(self) -> None:
        """Make the kernels see the current LoRA tensors (after an optimizer
        step, or after an attribute was replaced).  Zero-copy: in-place
        updates need no call, but a replaced or moved tensor is re-bound."""
        if self.skip_lora:
            return  # nothing bound
        if not self._lora_initialized:
            raise RuntimeError("LoRA weights not initialized. Call init_lora_weights() first.")
        with self._lock:
            self._ensure_lora_bound()

    def forward_sft(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor,
                    weights: torch.Tensor, save_for_backward: bool = True) -> torch.Tensor:
        """Routed-experts forward with LoRA.

        hidden_states [qlen, H] bf16/fp32 (CPU or CUDA); expert_ids [qlen, k]
        int64 (int32 accepted; -1 skips a slot: it adds nothing and its
        routing-weight gradient is 0); weights [qlen, k] fp32.  Returns [qlen, H] of
        the input's dtype on the input's device.  With save_for_backward the
        activations are cached (LIFO, at most max_cache_depth)."""
        if not self._weights_loaded:
            raise RuntimeError("Weights not loaded. Call load_weights() first.")
        if save_for_backward and not self._lora_initialized and not self.skip_lora:
            raise RuntimeError(
                "LoRA weights not initialized. "
                "Call init_lora_weights() first, or set save_for_backward=False."
            )
        k = self.num_experts_per_tok
        qlen = check_rows(hidden_states, "hidden_states", self.hidden_size, _IO_DTYPES)
        if not isinstance(expert_ids, torch.Tensor):
            raise TypeError("expert_ids must be a torch.Tensor")
        if tuple(expert_ids.shape) != (qlen, k):
            raise ValueError(f"expert_ids shape mismatch: expected ({qlen}, {k}), got {tuple(expert_ids.shape)}")
        if expert_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expert_ids must be int64 (or int32), got {expert_ids.dtype}")
        if not isinstance(weights, torch.Tensor):
            raise TypeError("weights must be a torch.Tensor")
        if tuple(weights.shape) != (qlen, k):
            raise ValueError(f"weights shape mismatch: expected ({qlen}, {k}), got {tuple(weights.shape)}")
        if not weights.is_floating_point():
            raise ValueError(f"weights must be floating point, got {weights.dtype}")

        # one op at a time on the shared queue and staging buffers
        with self._lock, self.cpu_infer._call_lock:
            if save_for_backward and self._cache_depth >= self.max_cache_depth:
                raise RuntimeError(
                    f"Forward cache full (depth={self._cache_depth}, max={self.max_cache_depth}). "
                    "Call backward() to free cache slots."
                )
            if self._lora_initialized:
                self._ensure_lora_bound()
            device = hidden_states.device
            if device.type == "cpu":
                x = hidden_states.contiguous()
                ids = cpu_contiguous(expert_ids, torch.int64)
                wts = cpu_contiguous(weights, torch.float32)
                out = torch.empty_like(x)
            else:
                buf = KExpertsSFTBuffer.get_buffer(qlen, self.hidden_size, k, hidden_states.dtype)
                x, ids, wts, out = (buf.input_cpu[:qlen], buf.expert_ids_cpu[:qlen],
                                    buf.weights_cpu[:qlen], buf.output_cpu[:qlen])
                x.copy_(hidden_states)
                ids.copy_(expert_ids)
                wts.copy_(weights)
            self._backend_forward(x, ids, wts, out, bool(save_for_backward), self._lora_initialized)
            if save_for_backward:
                self._cache_depth += 1
                self._cache_qlens.append(qlen)
            if device.type != "cpu":
                out = out.to(device)
            return out

    def backward(self, grad_output: torch.Tensor, return_grad_weights: bool = False,
                 grad_loras_out: Optional[Dict[str, torch.Tensor]] = None,
                 accumulate: bool = False):
        """Backward of the newest cached forward (LIFO).

        Returns ``(grad_input, grad_loras)``, or with return_grad_weights
        ``(grad_input, grad_loras, grad_weights)`` where grad_weights [qlen, k]
        fp32 is the gradient of the routing weights.  grad_loras holds the six
        LoRA gradients (keys ``grad_gate_lora_a`` ...), of the LoRA dtype.
        With ``grad_loras_out`` (CPU contiguous tensors of the LoRA shapes) the
        gradients are written (or, with accumulate, added) there instead."""
        with self._lock, self.cpu_infer._call_lock:
            if self._cache_depth <= 0:
                raise RuntimeError(
                    "No forward cache available. "
                    "Call forward_sft() with save_for_backward=True first."
                )
            qlen = self._cache_qlens[-1]
            got = check_rows(grad_output, "grad_output", self.hidden_size, _IO_DTYPES)
            if got != qlen:
                raise ValueError(f"grad_output shape mismatch: expected ({qlen}, {self.hidden_size}), "
                                 f"got {tuple(grad_output.shape)}")
            if self.skip_lora:
                grads = {}
            else:
                grads = self._grad_buffers(grad_loras_out)
            device = grad_output.device
            if device.type == "cpu":
                go = grad_output.contiguous()
                gi = torch.empty_like(go)
            else:
                buf = KExpertsSFTBuffer.get_buffer(qlen, self.hidden_size, self.num_experts_per_tok,
                                                   grad_output.dtype)
                go, gi = buf.grad_output_cpu[:qlen], buf.grad_input_cpu[:qlen]
                go.copy_(grad_output)
            gw = torch.empty((qlen, self.num_experts_per_tok), dtype=torch.float32)
            self._backend_backward(go, gi, gw, grads, bool(accumulate and grad_loras_out is not None))
            self._cache_depth -= 1
            self._cache_qlens.pop()
            if device.type != "cpu":
                gi = gi.to(device)
                gw = gw.to(device)
            if return_grad_weights:
                return gi, grads, gw
            return gi, grads

    def drop_forward_cache(self) -> None:
        """Release the newest cached forward without a backward (a forward
        whose gradient will not be asked for, e.g. one that gradient
        checkpointing recomputes).  Costs nothing; RuntimeError when the
        cache is empty."""
        with self._lock, self.cpu_infer._call_lock:
            if self._cache_depth <= 0:
                raise RuntimeError("No forward cache available. "
                                   "Call forward_sft() with save_for_backward=True first.")
            self._backend_drop_cache()
            self._cache_depth -= 1
            self._cache_qlens.pop()

    def _backend_drop_cache(self) -> None:
        """Pop the newest forward cache (a backend may override with a
        cheaper way than a backward of zeros)."""
        qlen = self._cache_qlens[-1]
        go = torch.zeros(qlen, self.hidden_size, dtype=torch.float32)
        gi = torch.empty_like(go)
        gw = torch.empty((qlen, self.num_experts_per_tok), dtype=torch.float32)
        grads = {} if self.skip_lora else self._grad_buffers(None)
        self._backend_backward(go, gi, gw, grads, False)

    def _grad_buffers(self, grad_loras_out) -> Dict[str, torch.Tensor]:
        """The six LoRA-gradient outputs: new tensors, or the caller's."""
        self._ensure_lora_bound()
        lora_dtype = self.gate_lora_a.dtype
        shapes = self._lora_shapes()
        if grad_loras_out is None:
            return {g: torch.empty(shapes[n], dtype=lora_dtype) for g, n in zip(GRAD_NAMES, LORA_NAMES)}
        grads = {}
        for g, n in zip(GRAD_NAMES, LORA_NAMES):
            t = grad_loras_out.get(g)
            if t is None:
                raise ValueError(f"grad_loras_out is missing {g}")
            check_tensor(t, g, shapes[n], (lora_dtype,))
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"{g} must be a contiguous CPU tensor")
            grads[g] = t
        return grads

    # ------------------------------------------------------- backend hooks

    @abstractmethod
    def _backend_load_tensors(self, gate, up, down, pmap, num_src) -> None: ...

    @abstractmethod
    def _backend_bind_lora(self, tensors: tuple) -> None: ...

    @abstractmethod
    def _backend_forward(self, x, ids, weights, out, save: bool, use_lora: bool) -> None: ...

    @abstractmethod
    def _backend_backward(self, grad_output, grad_input, grad_weights, grads: dict,
                          accumulate: bool) -> None: ...

    # ---------------------------------------------- inference-only methods

    def forward(self, *args, **kwargs):
        raise RuntimeError("forward() is not available in SFT mode. Use forward_sft() instead.")

    def submit_forward(self, *args, **kwargs):
        raise RuntimeError(
            "submit_forward() is not available in SFT mode. "
            "SFT mode uses synchronous forward_sft()."
        )

    def sync_forward(self, *args, **kwargs):
        raise RuntimeError("sync_forward() is not available in SFT mode.")

    def select_deferred_experts(self, *args, **kwargs):
        raise RuntimeError("select_deferred_experts() is not available in SFT mode.")
