"""libktmoe-backed SFT wrapper.  Each SFT method name maps to a numeric
format of the frozen weights; all run on every x86-64 tier."""

from __future__ import annotations

from typing import Optional

import torch

from ._lib import check, ffi, isa_from_name, isa_name, lib, ptr
from ._validate import c_dtype
from .experts_sft import GRAD_NAMES, BaseSFTMoEWrapper


class NativeSFTMoEWrapper(BaseSFTMoEWrapper):
    """SFT MoE layer computed by libktmoe (the spec's ``AMXSFTMoEWrapper``).

    Extra keyword ``isa``: None for the best usable tier, or "ref"/"avx2"/...
    to force one (ValueError if this CPU or build cannot run it)."""

    #: method name -> libktmoe ktmoe_method value
    METHOD_CODES = {"AMXBF16_SFT": 0}

    def __init__(self, *, method: str = "AMXBF16_SFT", isa: Optional[str] = None,
                 group_size: int = 128, zero_point: bool = True, **kwargs):
        if method not in self.METHOD_CODES:
            raise ValueError(f"Unsupported method: {method}. Supported methods: {sorted(self.METHOD_CODES)}")
        isa_value = isa_from_name(isa)
        super().__init__(**kwargs)
        self.method = method
        self.group_size = group_size
        self.zero_point = zero_point
        cfg = ffi.new("ktmoe_moe_config *")
        lib.ktmoe_moe_config_init(cfg)
        cfg.method = self.METHOD_CODES[method]
        cfg.num_experts = self.num_experts
        cfg.experts_per_token = self.num_experts_per_tok
        cfg.hidden_size = self.hidden_size
        cfg.intermediate_size = self.moe_intermediate_size
        cfg.lora_rank = self.lora_rank
        cfg.lora_alpha = self.lora_alpha
        cfg.max_cache_depth = self.max_cache_depth
        cfg.isa = isa_value
        out = ffi.new("ktmoe_moe **")
        check(lib.ktmoe_moe_create(self.cpu_infer.handle, cfg, out))
        self._moe = ffi.gc(out[0], lib.ktmoe_moe_destroy)
        self._keep = ()

    @property
    def isa(self) -> str:
        """The kernel tier this layer runs."""
        return isa_name(lib.ktmoe_moe_isa(self._moe))

    @property
    def weight_bytes(self) -> int:
        """Bytes of frozen expert weights held by the layer."""
        return int(lib.ktmoe_moe_weight_bytes(self._moe))

    @property
    def buffer_bytes(self) -> int:
        """Bytes of forward caches and scratch held by the layer."""
        return int(lib.ktmoe_moe_buffer_bytes(self._moe))

    def load_weights(self, physical_to_logical_map_cpu: torch.Tensor) -> None:
        raise NotImplementedError(
            f"load_weights() reads pre-converted weight files, which {self.method} does not "
            "support yet; use load_weights_from_tensors()"
        )

    def _run(self, status: int) -> None:
        check(status)
        self.cpu_infer.sync()

    # hooks

    def _backend_load_tensors(self, gate, up, down, pmap, num_src) -> None:
        mp = ptr(pmap, "int64_t *") if pmap is not None else ffi.NULL
        with self.cpu_infer._call_lock:  # these sync the shared queue
            check(lib.ktmoe_moe_load_weights(self._moe, ptr(gate), ptr(up), ptr(down), c_dtype(gate),
                                             mp, num_src))

    def _backend_bind_lora(self, tensors: tuple) -> None:
        with self.cpu_infer._call_lock:
            check(lib.ktmoe_moe_set_lora(self._moe, c_dtype(tensors[0]), *(ptr(t) for t in tensors)))
        self._keep = tensors

    def _backend_forward(self, x, ids, weights, out, save: bool, use_lora: bool) -> None:
        a = ffi.new("ktmoe_forward_args *")
        a.struct_size = ffi.sizeof("ktmoe_forward_args")
        a.qlen = x.shape[0]
        a.expert_ids = ptr(ids, "int64_t *")
        a.weights = ptr(weights, "float *")
        a.input = ptr(x)
        a.input_dtype = c_dtype(x)
        a.output = ptr(out)
        a.output_dtype = c_dtype(out)
        a.save_for_backward = int(save)
        a.use_lora = int(use_lora)
        with self.cpu_infer._call_lock:
            self._run(lib.ktmoe_moe_forward_submit(self._moe, a))

    def _backend_backward(self, grad_output, grad_input, grad_weights, grads: dict,
                          accumulate: bool) -> None:
        a = ffi.new("ktmoe_backward_args *")
        a.struct_size = ffi.sizeof("ktmoe_backward_args")
        a.qlen = grad_output.shape[0]
        a.grad_output = ptr(grad_output)
        a.grad_output_dtype = c_dtype(grad_output)
        a.grad_input = ptr(grad_input)
        a.grad_input_dtype = c_dtype(grad_input)
        a.grad_weights = ptr(grad_weights, "float *")
        g = [grads[n] for n in GRAD_NAMES]
        a.grad_gate_a, a.grad_gate_b, a.grad_up_a, a.grad_up_b, a.grad_down_a, a.grad_down_b = (ptr(t) for t in g)
        a.grad_lora_dtype = c_dtype(g[0])
        a.accumulate = int(accumulate)
        with self.cpu_infer._call_lock:
            self._run(lib.ktmoe_moe_backward_submit(self._moe, a))

    def close(self) -> None:
        """Free the layer's weights and buffers now (also done on garbage
        collection)."""
        if getattr(self, "_moe", None) is not None:
            self.cpu_infer.sync()
            ffi.release(self._moe)
            self._moe = None
