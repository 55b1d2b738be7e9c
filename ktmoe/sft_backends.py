"""libktmoe-backed SFT wrapper.  Each SFT method name maps to a numeric
format of the frozen weights (ktmoe.quant); all run on every x86-64 tier."""

from __future__ import annotations

from typing import Optional

import torch

from ._lib import check, ffi, isa_from_name, isa_name, lib, ptr
from ._validate import c_dtype, check_tensor, cpu_contiguous
from .experts_sft import GRAD_NAMES, BaseSFTMoEWrapper
from .quant import METHOD_FORMATS, QuantSpec

_PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")


class NativeSFTMoEWrapper(BaseSFTMoEWrapper):
    """SFT MoE layer computed by libktmoe (the spec's ``AMXSFTMoEWrapper``).

    Extra keyword ``isa``: None for the best usable tier, or "ref"/"avx2"/...
    to force one (ValueError if this CPU or build cannot run it)."""

    #: SFT method name -> the built-in method whose weight format it uses
    #: (a subclass may register new names for existing formats)
    METHODS = {name: name for name in METHOD_FORMATS}

    def __init__(self, *, method: str = "AMXBF16_SFT", isa: Optional[str] = None,
                 group_size: int = 128, zero_point: bool = True, **kwargs):
        if method not in self.METHODS:
            raise ValueError(f"Unsupported method: {method}. Supported methods: {sorted(self.METHODS)}")
        spec = QuantSpec(self.METHODS[method], group_size, bool(zero_point))
        isa_value = isa_from_name(isa)
        super().__init__(**kwargs)
        spec.check_cols(self.hidden_size, "hidden_size")
        spec.check_cols(self.moe_intermediate_size, "moe_intermediate_size")
        spec.check_cols(self.moe_intermediate_size // self.threadpool_count,
                        "moe_intermediate_size / threadpool_count")
        self.method = method
        self.group_size = group_size
        self.zero_point = zero_point
        self.quant_spec = spec
        cfg = ffi.new("ktmoe_moe_config *")
        lib.ktmoe_moe_config_init(cfg)
        cfg.method = spec.code
        cfg.group_size = spec.group_size if spec.kgroup else 0
        cfg.zero_point = int(spec.format == "int4_kgroup_zp")
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

    def load_weights(self, physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """Load pre-packed experts of layer ``layer_idx`` from the weight
        files at ``weight_path`` (docs/weight_files.md), memory-mapped and
        copied once into the layer.  Physical expert p takes the file's
        expert ``physical_to_logical_map_cpu[p]`` (identity when None).
        Raises ``WeightFileError`` (a RuntimeError) for a missing or bad
        file, or one written for another method or shape."""
        from .weight_files import read_layer

        if not self.weight_path:
            raise RuntimeError("load_weights() needs weight_path (a weight file or directory); "
                               "use load_weights_from_tensors() to load tensors")
        num_src, gate, up, down = read_layer(
            self.weight_path, self.layer_idx, self.quant_spec,
            hidden_size=self.hidden_size, intermediate_size=self.moe_intermediate_size)
        self.load_packed_weights(gate, up, down, physical_to_logical_map_cpu, num_src_experts=num_src)

    def load_packed_weights(self, gate: dict, up: dict, down: dict,
                            physical_to_logical_map_cpu: Optional[torch.Tensor] = None,
                            num_src_experts: Optional[int] = None) -> None:
        """Load experts already packed in this method's format: each of gate,
        up, down is a dict of parts (``ktmoe.quant.quantize`` output, or read
        from a weight file) stacked over the source experts."""
        I, H = self.moe_intermediate_size, self.hidden_size
        spec = self.quant_spec
        args = []
        for name, parts, (rows, cols) in zip(_PROJ_NAMES, (gate, up, down), ((I, H), (I, H), (H, I))):
            if not isinstance(parts, dict):
                raise TypeError(f"{name} must be a dict of packed parts, got {type(parts).__name__}")
            missing = [p for p in spec.parts if p not in parts]
            if missing:
                raise ValueError(f"{name} lacks the part(s) {missing} of format {spec.format}")
            q = parts["qweight"]
            if not isinstance(q, torch.Tensor) or q.dim() != 3:
                raise ValueError(f"{name} qweight must be a 3-D tensor [E, rows, row_bytes]")
            E_src = q.shape[0] if num_src_experts is None else num_src_experts
            packed = {}
            for part, (shape, dt) in spec.part_shapes(rows, cols).items():
                t = check_tensor(parts[part], f"{name}.{part}", (E_src,) + shape, (dt,))
                packed[part] = cpu_contiguous(t)
            args.append(packed)
        E_src = args[0]["qweight"].shape[0]
        if physical_to_logical_map_cpu is None and E_src != self.num_experts:
            raise ValueError(f"gate_proj shape mismatch: expected {self.num_experts} experts, got {E_src}")
        pmap = self._check_map(physical_to_logical_map_cpu, E_src)
        cparts = []
        for packed in args:
            cp = ffi.new("ktmoe_packed *")
            cp.qweight = ptr(packed["qweight"])
            cp.scale = ptr(packed["scale"], "float *") if "scale" in packed else ffi.NULL
            aux = packed.get("min", packed.get("zero"))
            cp.aux = ptr(aux) if aux is not None else ffi.NULL
            cparts.append(cp)
        mp = ptr(pmap, "int64_t *") if pmap is not None else ffi.NULL
        with self._lock, self.cpu_infer._call_lock:
            self._weights_loaded = False  # a failed load leaves the layer unloaded
            check(lib.ktmoe_moe_load_packed(self._moe, *cparts, mp, E_src))
            self._weights_loaded = True

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
