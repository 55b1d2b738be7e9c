"""One libktmoe MoE layer (``ktmoe_moe``) as the SFT and inference wrappers
use it: creation from QuantSpecs, weight loading, forward/backward tasks.

Validation of user input happens in the wrappers; this module checks the
packed parts it is given (shapes, dtypes) before their pointers cross."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._lib import check, ffi, isa_from_name, isa_name, lib, ptr
from ._validate import c_dtype, check_tensor, cpu_contiguous
from .quant import QuantSpec

#: expert activations (ktmoe_moe_config.activation): silu(g) * u, or the
#: clamped SwiGLU of GPT-OSS, min(g, L) * sigmoid(a min(g, L)) * (clamp(u, -L, L) + 1)
ACTIVATIONS = {"silu": 0, "swiglu_clamp": 1}

PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")


class NativeLayer:
    """A ``ktmoe_moe`` handle on the pool of ``cpu_infer``.

    ``specs``: one QuantSpec for all three projections, or three (gate, up,
    down) for files that mix formats.  Calls that touch the shared queue take
    ``cpu_infer._call_lock``; ``submit_*`` return at once and the arrays they
    were given must stay alive until ``cpu_infer.sync()``."""

    def __init__(self, cpu_infer, *, num_experts: int, experts_per_token: int, hidden_size: int,
                 intermediate_size: int, specs: Union[QuantSpec, Sequence[QuantSpec]],
                 lora_rank: int = 1, lora_alpha: float = 1.0, max_cache_depth: int = 1,
                 isa: Optional[str] = None, activation: str = "silu", act_alpha: float = 1.702,
                 act_limit: float = 7.0, batch_invariant: bool = True):
        if isinstance(specs, QuantSpec):
            specs = (specs, specs, specs)
        self.specs = tuple(specs)
        self.cpu_infer = cpu_infer
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        tp = cpu_infer.threadpool_count
        for name, spec, cols in zip(PROJ_NAMES, self.specs,
                                    (hidden_size, hidden_size, intermediate_size)):
            what = "hidden_size" if name != "down_proj" else "moe_intermediate_size"
            spec.check_cols(cols, what)
            if name == "down_proj":
                spec.check_cols(intermediate_size // tp, "moe_intermediate_size / threadpool_count")
        cfg = ffi.new("ktmoe_moe_config *")
        lib.ktmoe_moe_config_init(cfg)
        for pj, spec in enumerate(self.specs):
            cfg.proj_method[pj] = spec.code
            cfg.proj_group_size[pj] = spec.group_size if spec.kgroup else 0
            cfg.proj_zero_point[pj] = int(spec.format == "int4_kgroup_zp")
        cfg.method = self.specs[0].code
        cfg.num_experts = num_experts
        cfg.experts_per_token = experts_per_token
        cfg.hidden_size = hidden_size
        cfg.intermediate_size = intermediate_size
        cfg.lora_rank = lora_rank
        cfg.lora_alpha = lora_alpha
        cfg.max_cache_depth = max_cache_depth
        cfg.isa = isa_from_name(isa)
        cfg.activation = ACTIVATIONS[activation]
        cfg.act_alpha = act_alpha
        cfg.act_limit = act_limit
        cfg.batch_invariant = int(batch_invariant)
        out = ffi.new("ktmoe_moe **")
        check(lib.ktmoe_moe_create(cpu_infer.handle, cfg, out))
        self._moe = ffi.gc(out[0], lib.ktmoe_moe_destroy)

    # ------------------------------------------------------------ queries

    @property
    def isa(self) -> str:
        return isa_name(lib.ktmoe_moe_isa(self._moe))

    @property
    def weight_bytes(self) -> int:
        return int(lib.ktmoe_moe_weight_bytes(self._moe))

    @property
    def buffer_bytes(self) -> int:
        return int(lib.ktmoe_moe_buffer_bytes(self._moe))

    # ------------------------------------------------------------ weights

    def load_tensors(self, gate, up, down, pmap, num_src: int) -> None:
        """Quantize (or copy) validated, contiguous CPU tensors of one dtype,
        on the pool; synchronous."""
        mp = ptr(pmap, "int64_t *") if pmap is not None else ffi.NULL
        with self.cpu_infer._call_lock:
            check(lib.ktmoe_moe_load_weights(self._moe, ptr(gate), ptr(up), ptr(down), c_dtype(gate),
                                             mp, num_src))

    def check_packed(self, gate: dict, up: dict, down: dict,
                     num_src_experts: Optional[int] = None) -> tuple:
        """The three projections' parts, checked against the specs and made
        CPU-contiguous (no copy when they already are)."""
        I, H = self.intermediate_size, self.hidden_size
        out = []
        E_src = num_src_experts
        for name, spec, parts, (rows, cols) in zip(PROJ_NAMES, self.specs, (gate, up, down),
                                                   ((I, H), (I, H), (H, I))):
            if not isinstance(parts, dict):
                raise TypeError(f"{name} must be a dict of packed parts, got {type(parts).__name__}")
            missing = [p for p in spec.parts if p not in parts]
            if missing:
                raise ValueError(f"{name} lacks the part(s) {missing} of format {spec.format}")
            q = parts["qweight"]
            if not isinstance(q, torch.Tensor) or q.dim() != 3:
                raise ValueError(f"{name} qweight must be a 3-D tensor [E, rows, row_bytes]")
            if E_src is None:
                E_src = q.shape[0]
            packed = {}
            for part, (shape, dt) in spec.part_shapes(rows, cols).items():
                t = check_tensor(parts[part], f"{name}.{part}", (E_src,) + shape, (dt,))
                packed[part] = cpu_contiguous(t)
            out.append(packed)
        return tuple(out)

    def load_packed(self, packed: tuple, pmap, num_src: int) -> None:
        """Load parts from check_packed(); synchronous."""
        cparts = []
        for parts in packed:
            cp = ffi.new("ktmoe_packed *")
            cp.qweight = ptr(parts["qweight"])
            cp.scale = ptr(parts["scale"], "float *") if "scale" in parts else ffi.NULL
            aux = parts.get("min", parts.get("zero"))
            cp.aux = ptr(aux) if aux is not None else ffi.NULL
            cparts.append(cp)
        mp = ptr(pmap, "int64_t *") if pmap is not None else ffi.NULL
        with self.cpu_infer._call_lock:
            check(lib.ktmoe_moe_load_packed(self._moe, *cparts, mp, num_src))

    def set_lora(self, tensors: tuple) -> None:
        with self.cpu_infer._call_lock:
            check(lib.ktmoe_moe_set_lora(self._moe, c_dtype(tensors[0]), *(ptr(t) for t in tensors)))

    # -------------------------------------------------------------- tasks

    def submit_forward(self, x, ids, weights, out, save: bool = False, use_lora: bool = False,
                       int8_activations: bool = False) -> None:
        """Queue a forward (returns at once; x, ids, weights and out are read
        or written until the pool is synced).  ``int8_activations``: the
        integer kernels where the layer allows them (inference; see
        ``ktmoe_forward_args`` in ktmoe.h)."""
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
        a.int8_activations = int(int8_activations)
        with self.cpu_infer._call_lock:
            check(lib.ktmoe_moe_forward_submit(self._moe, a))

    def submit_backward(self, grad_output, grad_input, grad_weights, grads: Sequence[torch.Tensor],
                        accumulate: bool) -> None:
        a = ffi.new("ktmoe_backward_args *")
        a.struct_size = ffi.sizeof("ktmoe_backward_args")
        a.qlen = grad_output.shape[0]
        a.grad_output = ptr(grad_output)
        a.grad_output_dtype = c_dtype(grad_output)
        a.grad_input = ptr(grad_input)
        a.grad_input_dtype = c_dtype(grad_input)
        a.grad_weights = ptr(grad_weights, "float *")
        # None: that gradient is not computed (all None: frozen experts)
        a.grad_gate_a, a.grad_gate_b, a.grad_up_a, a.grad_up_b, a.grad_down_a, a.grad_down_b = (
            ffi.NULL if t is None else ptr(t) for t in grads)
        given = [t for t in grads if t is not None]
        a.grad_lora_dtype = c_dtype(given[0]) if given else c_dtype(grad_output)
        a.accumulate = int(accumulate)
        with self.cpu_infer._call_lock:
            check(lib.ktmoe_moe_backward_submit(self._moe, a))

    def submit_cache_drop(self) -> None:
        with self.cpu_infer._call_lock:
            check(lib.ktmoe_moe_cache_drop_submit(self._moe))

    def close(self) -> None:
        """Free the weights and buffers now (also done on garbage collection)."""
        if getattr(self, "_moe", None) is not None:
            self.cpu_infer.sync()
            ffi.release(self._moe)
            self._moe = None
