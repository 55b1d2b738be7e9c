"""libktmoe-backed SFT wrapper.  Each SFT method name maps to a numeric
format of the frozen weights (ktmoe.quant); all run on every x86-64 tier."""

from __future__ import annotations

from typing import Optional

import torch


from ._lib import isa_from_name
from ._native import ACTIVATIONS, NativeLayer
from .experts_sft import GRAD_NAMES, BaseSFTMoEWrapper
from .quant import METHOD_FORMATS, QuantSpec

SKIP_LORA_SUFFIX = "_SkipLoRA"


class NativeSFTMoEWrapper(BaseSFTMoEWrapper):
    """SFT MoE layer computed by libktmoe (the spec's ``AMXSFTMoEWrapper``).

    Extra keyword ``isa``: None for the best usable tier, or "ref"/"avx2"/...
    to force one (ValueError if this CPU or build cannot run it)."""

    #: SFT method name -> the built-in method whose weight format it uses
    #: (a subclass may register new names for existing formats).  Each
    #: ``X_SFT`` has a frozen-experts twin ``X_SkipLoRA``: no expert LoRA,
    #: the backward computes grad_input and the routing-weight gradient only
    #: (attention-only LoRA on models whose experts stay frozen).
    METHODS = {**{name: name for name in METHOD_FORMATS},
               **{name[:-len("_SFT")] + SKIP_LORA_SUFFIX: name for name in METHOD_FORMATS}}

    def __init__(self, *, method: str = "AMXBF16_SFT", isa: Optional[str] = None,
                 group_size: int = 128, zero_point: bool = True, activation: str = "silu",
                 swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, **kwargs):
        if method not in self.METHODS:
            raise ValueError(f"Unsupported method: {method}. Supported methods: {sorted(self.METHODS)}")
        spec = QuantSpec(self.METHODS[method], group_size, bool(zero_point))
        isa_from_name(isa)  # an unknown name is a ValueError before anything is built
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation: {activation!r}. Supported: {sorted(ACTIVATIONS)}")
        for name, v in (("swiglu_alpha", swiglu_alpha), ("swiglu_limit", swiglu_limit)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")
        kwargs.setdefault("skip_lora", method.endswith(SKIP_LORA_SUFFIX))
        super().__init__(**kwargs)
        self.method = method
        self.group_size = group_size
        self.zero_point = zero_point
        self.quant_spec = spec
        self.activation = activation
        self.swiglu_alpha, self.swiglu_limit = float(swiglu_alpha), float(swiglu_limit)
        self._layer = NativeLayer(
            self.cpu_infer, num_experts=self.num_experts, experts_per_token=self.num_experts_per_tok,
            hidden_size=self.hidden_size, intermediate_size=self.moe_intermediate_size, specs=spec,
            lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
            max_cache_depth=self.max_cache_depth, isa=isa, activation=activation,
            act_alpha=self.swiglu_alpha, act_limit=self.swiglu_limit,
            batch_invariant=False)  # one call per step: the faster large-batch kernels
        self._keep = ()

    @property
    def isa(self) -> str:
        """The kernel tier this layer runs."""
        return self._layer.isa

    @property
    def weight_bytes(self) -> int:
        """Bytes of frozen expert weights held by the layer."""
        return self._layer.weight_bytes

    @property
    def buffer_bytes(self) -> int:
        """Bytes of forward caches and scratch held by the layer."""
        return self._layer.buffer_bytes

    def load_weights(self, physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """Load pre-packed experts of layer ``layer_idx`` from the weight
        files at ``weight_path`` (docs/weight_files.md), memory-mapped and
        copied once into the layer.  Physical expert p takes the file's
        expert ``physical_to_logical_map_cpu[p]`` (identity when None).
        Raises ``WeightFileError`` (a RuntimeError) for a missing or bad
        file, or one written for another method or shape."""
        num_src, gate, up, down = self._read_weight_files(self.quant_spec)
        self.load_packed_weights(gate, up, down, physical_to_logical_map_cpu, num_src_experts=num_src)

    def load_weights_from_tensors(self, gate_proj, up_proj, down_proj,
                                  physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """bf16/fp32 tensors (quantized here), or for AMXFP8_SFT / MXFP4_SFT
        (and their SkipLoRA twins) the checkpoint's own tensors, re-laid out
        exactly with no dequantized copy (``ktmoe.loaders``): per projection
        a dict stacked over experts, or a list of per-expert dicts --
        ``{"weight": float8_e4m3fn [E, N, K], "weight_scale_inv": fp32
        [E, N/128, K/128]}`` (DeepSeek-V3) or ``{"blocks": uint8 [E, N, K/32,
        16], "scales": uint8 [E, N, K/32]}`` (GPT-OSS; split its interleaved
        ``gate_up_proj`` with ``ktmoe.loaders.split_interleaved``)."""
        projs = (gate_proj, up_proj, down_proj)
        if all(isinstance(t, torch.Tensor) for t in projs):
            return super().load_weights_from_tensors(*projs, physical_to_logical_map_cpu)
        from .loaders import CHECKPOINT_SFT_METHODS, checkpoint_to_parts

        base = self.quant_spec.method  # the X_SFT method of a SkipLoRA twin too
        if base not in CHECKPOINT_SFT_METHODS:
            raise TypeError(f"{self.method}: gate_proj, up_proj and down_proj must be torch.Tensors "
                            "(checkpoint tensor dicts are read by the FP8 and MXFP4 methods)")

        parts = []
        for t, name in zip(projs, ("gate_proj", "up_proj", "down_proj")):
            if isinstance(t, torch.Tensor):
                raise TypeError(f"{self.method}: {name} is a tensor while another projection is a dict "
                                "of checkpoint tensors; give all three the same way")
            _, p = checkpoint_to_parts(base, t, name=name, group_size=self.quant_spec.group_size)
            parts.append(p)
        self.load_packed_weights(*parts, physical_to_logical_map_cpu)

    def load_packed_weights(self, gate: dict, up: dict, down: dict,
                            physical_to_logical_map_cpu: Optional[torch.Tensor] = None,
                            num_src_experts: Optional[int] = None) -> None:
        """Load experts already packed in this method's format: each of gate,
        up, down is a dict of parts (``ktmoe.quant.quantize`` output, or read
        from a weight file) stacked over the source experts."""
        packed, pmap, E_src = self._check_packed_weights(self._layer, gate, up, down,
                                                         physical_to_logical_map_cpu, num_src_experts)
        with self._lock:
            self._weights_loaded = False  # a failed load leaves the layer unloaded
            self._layer.load_packed(packed, pmap, E_src)
            self._weights_loaded = True

    def _sync(self) -> None:
        self.cpu_infer.sync()

    # hooks

    def _backend_load_tensors(self, gate, up, down, pmap, num_src) -> None:
        self._layer.load_tensors(gate, up, down, pmap, num_src)

    def _backend_bind_lora(self, tensors: tuple) -> None:
        self._layer.set_lora(tensors)
        self._keep = tensors

    def _backend_forward(self, x, ids, weights, out, save: bool, use_lora: bool) -> None:
        with self.cpu_infer._call_lock:
            self._layer.submit_forward(x, ids, weights, out, save, use_lora)
            self._sync()

    def _backend_backward(self, grad_output, grad_input, grad_weights, grads: dict,
                          accumulate: bool) -> None:
        with self.cpu_infer._call_lock:
            self._layer.submit_backward(grad_output, grad_input, grad_weights,
                                        [grads.get(n) for n in GRAD_NAMES], accumulate)
            self._sync()

    def _backend_drop_cache(self) -> None:
        with self.cpu_infer._call_lock:
            self._layer.submit_cache_drop()
            self._sync()

    def close(self) -> None:
        """Free the layer's weights and buffers now (also done on garbage
        collection)."""
        if getattr(self, "_layer", None) is not None:
            self._layer.close()
