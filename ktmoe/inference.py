"""Inference wrappers (``mode="inference"``, spec 001 §1.2-1.3) on libktmoe.

:class:`NativeMoEWrapper` runs the routed experts of one MoE layer on the
process-wide CPUInfer pool, from frozen weights in one of the
``ktmoe.quant`` formats:

========== ====================================== ==============================
method     frozen weights (``ktmoe.quant.QuantSpec``)  format
========== ====================================== ==============================
AMXINT8    ``QuantSpec("AMXINT8_SFT")``             int8, one scale per row
MOE_INT8   ``QuantSpec("AMXINT8_SFT")``             int8, one scale per row
AMXINT4    ``QuantSpec("AMXINT4_SFT")``             int4, one scale per row
MOE_INT4   ``QuantSpec("AMXINT4_KGroup_SFT",        int4, one scale (and zero
           group_size, zero_point)``                point) per group of K
========== ====================================== ==============================

The names fix the numeric format, not the instruction set: every method runs
on every x86-64 tier (``isa``).  Weight files written by
``ktmoe convert --method AMXINT8_SFT`` (etc., see docs/weight_files.md) load
with :meth:`NativeMoEWrapper.load_weights`.

Other methods plug in through the class-level ``SPECS`` table and a few small
hooks (``_specs``, ``_load_from_files``, ``_load_from_tensors``,
``_ensure_layer``); see :class:`NativeMoEWrapper` and docs/inference.md.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, ClassVar, Dict, List, Optional, Tuple, Union

import torch

from ._lib import isa_from_name
from ._native import NativeLayer
from ._validate import check_rows, cpu_contiguous, staging_tensor
from .experts_base import _IO_DTYPES, BaseMoEWrapper
from .quant import QuantSpec

#: one QuantSpec for the three projections, or three (gate, up, down)
Specs = Union[QuantSpec, Tuple[QuantSpec, QuantSpec, QuantSpec]]
#: ``builder(group_size, zero_point) -> Specs`` (None: known only at load time)
SpecBuilder = Callable[[int, bool], Optional[Specs]]


# --------------------------------------------------------------- buffers

class KExpertsCPUBuffer:
    """CPU staging buffers for inference forwards, shared by all inference
    wrappers of the process.

    A submission takes one buffer (:meth:`acquire`) and gives it back when it
    is synced (:meth:`release`), so the memory held is bounded by the number
    of submissions pending at the same time, not by the number of layers.
    Buffers are pinned when CUDA is available and grow geometrically, so a
    decode loop reuses the same few buffers.  ``clear_cache()`` frees the
    idle ones."""

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _free: ClassVar[Dict[tuple, List["KExpertsCPUBuffer"]]] = {}

    def __init__(self, capacity: int, hidden_size: int, num_experts_per_tok: int,
                 dtype: torch.dtype):
        self.capacity = max(int(capacity), 1)
        self.hidden_size = hidden_size
        self.num_experts_per_tok = num_experts_per_tok
        self.dtype = dtype
        q, h, k = self.capacity, hidden_size, num_experts_per_tok
        buf = staging_tensor

        self.input = buf((q, h), dtype)
        self.expert_ids = buf((q, k), torch.int64)
        self.weights = buf((q, k), torch.float32)
        self.output = buf((q, h), dtype)
        #: CUDA event of the last asynchronous copy that reads ``output``
        self.event = None

    @staticmethod
    def _round_capacity(qlen: int) -> int:
        if qlen <= 1024:
            return 1 << max(qlen - 1, 0).bit_length()
        return -(-qlen // 1024) * 1024

    @classmethod
    def acquire(cls, qlen: int, hidden_size: int, num_experts_per_tok: int,
                dtype: torch.dtype) -> "KExpertsCPUBuffer":
        """A free buffer of at least ``qlen`` rows (the smallest that fits),
        or a new one.  Waits for a pending CUDA copy out of it, if any."""
        key = (hidden_size, num_experts_per_tok, dtype)
        with cls._lock:
            free = cls._free.setdefault(key, [])
            fits = [b for b in free if b.capacity >= qlen]
            if fits:
                b = min(fits, key=lambda x: x.capacity)
                free.remove(b)
            else:
                if free:  # drop the largest too-small one: it is outgrown
                    free.remove(max(free, key=lambda x: x.capacity))
                b = None
        if b is None:
            b = cls(cls._round_capacity(qlen), hidden_size, num_experts_per_tok, dtype)
        if b.event is not None:
            b.event.synchronize()
            b.event = None
        return b

    @classmethod
    def release(cls, buf: "KExpertsCPUBuffer") -> None:
        key = (buf.hidden_size, buf.num_experts_per_tok, buf.dtype)
        with cls._lock:
            cls._free.setdefault(key, []).append(buf)

    @classmethod
    def clear_cache(cls) -> None:
        """Free every idle buffer (buffers of pending submissions stay)."""
        with cls._lock:
            cls._free.clear()


# ------------------------------------------------------- pending submissions

class _Submission:
    """One submitted forward: what C reads or writes until the pool is synced
    (kept alive here), and where the result goes."""

    __slots__ = ("cpu_infer", "qlen", "dtype", "out", "out_device", "buf", "keep", "cuda_stream",
                 "failures")

    def __init__(self, cpu_infer, qlen, dtype, out, out_device, buf, keep, cuda_stream):
        self.cpu_infer = cpu_infer
        self.qlen = qlen
        self.dtype = dtype
        self.out = out
        self.out_device = out_device
        self.buf = buf
        self.keep = keep
        self.cuda_stream = cuda_stream
        self.failures = cpu_infer.failures

    def sync(self) -> None:
        """Wait for the pool.  The C queue reports the first error of all
        tasks since the last sync to whoever syncs, so a failure raised to
        another caller (another layer, an SFT step) while this submission was
        pending may have been this one's: then its result is not trusted."""
        self.cpu_infer.sync()
        if self.cpu_infer.failures != self.failures:
            raise RuntimeError(
                "a task on the shared CPUInfer failed while this layer's forward was pending "
                "(the error was raised to another caller and the failing task cannot be told "
                "apart); the result is discarded")



def _stream_ctx(cuda_stream, device: torch.device):
    """Run the copies of a CUDA tensor on ``cuda_stream`` (a torch.cuda.Stream
    or a raw ``cudaStream_t`` as an int, e.g. ``stream.cuda_stream``); the
    current stream when None."""
    if device.type != "cuda" or cuda_stream is None:
        return contextlib.nullcontext()
    if isinstance(cuda_stream, torch.cuda.Stream):
        return torch.cuda.stream(cuda_stream)
    if isinstance(cuda_stream, bool) or not isinstance(cuda_stream, int):
        raise TypeError("cuda_stream must be None, a torch.cuda.Stream or an int (cudaStream_t), "
                        f"got {type(cuda_stream).__name__}")
    if cuda_stream == torch.cuda.current_stream(device).cuda_stream:
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.ExternalStream(cuda_stream, device=device))


# ------------------------------------------------------------- the wrapper

def _int8(gs, zp):
    return QuantSpec("AMXINT8_SFT")


def _int4(gs, zp):
    return QuantSpec("AMXINT4_SFT")


def _int4_kgroup(gs, zp):
    return QuantSpec("AMXINT4_KGroup_SFT", gs, bool(zp))


class NativeMoEWrapper(BaseMoEWrapper):
    """Inference MoE layer computed by libktmoe (the spec's AMXMoEWrapper /
    GeneralMoEWrapper).

    Keywords beyond the spec's: ``isa`` (None: the best usable tier, or
    "ref"/"avx2"/... to force one), ``group_size`` and ``zero_point`` (the
    K-group method MOE_INT4), ``int8_activations`` (default True: integer
    kernels on activations quantized to int8 per block of 32 wherever the
    layer allows, ~1% output error for 2-4x the speed of fp32 activations;
    False: fp32 activations, results within fp32 rounding of the
    dequantized weights), ``batch_invariant`` (default False: the kernels
    may choose their path by the number of tokens an expert gets, e.g. AMX
    tiles for a prefill's experts and the VNNI kernel for a decode token's,
    so a token's output can differ in the last bits with the tokens beside
    it and with ``chunked_prefill_size``; True: a token's output does not
    depend on the other tokens of a call, bit for bit -- a chunked prefill
    equals one call -- at some cost on CPUs with AMX: decode ~10% slower).

    Subclass hooks (for other weight formats, e.g. loaders of FP8 or GGUF
    checkpoints):

    * ``SPECS``: method name -> ``builder(group_size, zero_point)`` returning
      one QuantSpec (all three projections) or a (gate, up, down) triple.  A
      builder may return None when the format is only known from the weight
      file; the layer is then created at load time by ``_ensure_layer``.
    * ``_specs()``: the current method's specs (default: the SPECS builder).
    * ``_ensure_layer(specs)``: create the libktmoe layer for these specs (or
      keep the existing one when they are equal); returns the NativeLayer.
    * ``_load_from_files(physical_to_logical_map_cpu)``: the body of
      load_weights() (default: ``_read_weight_files`` + ``_load_packed``).
    * ``_load_from_tensors(gate, up, down, pmap, num_src)``: the body of
      load_weights_from_tensors() after the shared validation (default:
      quantize online in C).
    * ``_load_packed(gate, up, down, physical_to_logical_map_cpu,
      num_src_experts)``: check and load pre-packed parts of the layer's specs.

    The hooks run under the wrapper's lock with no submission pending; the
    public methods set ``_weights_loaded`` around them."""

    #: inference method -> spec builder (see the module docstring for the table)
    SPECS: ClassVar[Dict[str, SpecBuilder]] = {
        "AMXINT8": _int8,
        "MOE_INT8": _int8,
        "AMXINT4": _int4,
        "MOE_INT4": _int4_kgroup,
    }

    def __init__(self, *, method: str = "AMXINT4", isa: Optional[str] = None,
                 group_size: int = 128, zero_point: bool = True, int8_activations: bool = True,
                 batch_invariant: bool = False, **kwargs):
        # attributes that close()/__del__ read, set before anything can fail
        self._layer: Optional[NativeLayer] = None
        self._pending: Optional[_Submission] = None
        self._weights_loaded = False
        self._closed = False
        self._lock = threading.RLock()
        if method not in self.SPECS:
            raise ValueError(f"Unsupported method: {method}. Supported methods: {sorted(self.SPECS)}")
        isa_from_name(isa)  # an unknown name is a ValueError before anything is built
        self.method = method
        self.group_size = group_size
        self.zero_point = zero_point
        self.int8_activations = bool(int8_activations)
        self.batch_invariant = bool(batch_invariant)
        self._isa_request = isa
        super().__init__(**kwargs)
        specs = self._specs()
        if specs is not None:
            self._ensure_layer(specs)

    # ------------------------------------------------------------- hooks

    def _specs(self) -> Optional[Specs]:
        return self.SPECS[self.method](self.group_size, self.zero_point)

    def _ensure_layer(self, specs: Specs) -> NativeLayer:
        triple = (specs,) * 3 if isinstance(specs, QuantSpec) else tuple(specs)
        if len(triple) != 3 or not all(isinstance(s, QuantSpec) for s in triple):
            raise TypeError("specs must be one QuantSpec or three (gate, up, down)")
        if self._layer is not None and self._layer.specs == triple:
            return self._layer
        if self._layer is not None:
            self._drain()
            self._layer.close()
            self._layer = None
            self._weights_loaded = False
        self._layer = NativeLayer(
            self.cpu_infer, num_experts=self.num_experts, experts_per_token=self.num_experts_per_tok,
            hidden_size=self.hidden_size, intermediate_size=self.moe_intermediate_size, specs=triple,
            lora_rank=1, lora_alpha=1.0, max_cache_depth=1, isa=self._isa_request,
            batch_invariant=self.batch_invariant)
        return self._layer

    def _require_layer(self) -> NativeLayer:
        if self._closed:
            raise RuntimeError("This layer was closed (close()); create a new wrapper.")
        if self._layer is None:
            raise RuntimeError(f"{type(self).__name__}: no layer yet (the format of method "
                               f"'{self.method}' is set by its weights: call load_weights())")
        return self._layer

    def _load_from_files(self, physical_to_logical_map_cpu) -> None:
        specs = self._specs()
        if specs is None or (not isinstance(specs, QuantSpec) and len(set(specs)) != 1):
            raise NotImplementedError(
                f"{type(self).__name__}: method '{self.method}' has no single weight-file format; "
                "override _load_from_files()")
        spec = specs if isinstance(specs, QuantSpec) else specs[0]
        num_src, gate, up, down = self._read_weight_files(spec)
        self._load_packed(gate, up, down, physical_to_logical_map_cpu, num_src)

    def _load_from_tensors(self, gate, up, down, pmap, num_src) -> None:
        self._require_layer().load_tensors(gate, up, down, pmap, num_src)

    def _load_packed(self, gate: dict, up: dict, down: dict, physical_to_logical_map_cpu,
                     num_src_experts: Optional[int] = None) -> None:
        layer = self._require_layer()
        packed, pmap, E_src = self._check_packed_weights(layer, gate, up, down,
                                                         physical_to_logical_map_cpu, num_src_experts)
        layer.load_packed(packed, pmap, E_src)

    # ----------------------------------------------------------- queries

    @property
    def quant_specs(self) -> Optional[Tuple[QuantSpec, QuantSpec, QuantSpec]]:
        """The (gate, up, down) formats of the frozen weights (None before a
        lazily created layer exists)."""
        return self._layer.specs if self._layer is not None else None

    @property
    def isa(self) -> Optional[str]:
        """The kernel tier this layer runs (None before the layer exists)."""
        return self._layer.isa if self._layer is not None else None

    @property
    def weight_bytes(self) -> int:
        """Bytes of frozen expert weights held by the layer."""
        return self._layer.weight_bytes if self._layer is not None else 0

    @property
    def buffer_bytes(self) -> int:
        """Bytes of scratch held by the C layer (bounded by chunked_prefill_size)."""
        return self._layer.buffer_bytes if self._layer is not None else 0

    # ----------------------------------------------------------- loading

    def _begin_load(self) -> None:
        if self._closed:
            raise RuntimeError("This layer was closed (close()); create a new wrapper.")
        if self._pending is not None:
            raise RuntimeError("Cannot load weights while a submitted forward is pending. "
                               "Call sync_forward() first.")

    def load_weights(self, physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """Load pre-quantized experts of layer ``layer_idx`` from the weight
        files at ``weight_path`` (docs/weight_files.md; write them with
        ``ktmoe convert --method AMXINT8_SFT|AMXINT4_SFT|AMXINT4_KGroup_SFT``
        for AMXINT8/MOE_INT8, AMXINT4, MOE_INT4).  Physical expert p takes the
        file's expert ``physical_to_logical_map_cpu[p]`` (identity when None).
        Raises ``WeightFileError`` (a RuntimeError) for a missing or bad file,
        or one written for another format or shape."""
        with self._lock:
            self._begin_load()
            self._weights_loaded = False  # a failed load leaves the layer unloaded
            self._load_from_files(physical_to_logical_map_cpu)
            self._weights_loaded = True

    def load_weights_from_tensors(self, gate_proj: torch.Tensor, up_proj: torch.Tensor,
                                  down_proj: torch.Tensor,
                                  physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """Quantize bf16/fp32 weights online (in C, on the pool) into the
        method's format.  gate_proj, up_proj: [E_src, I, H]; down_proj:
        [E_src, H, I].  Physical expert p takes source expert
        ``physical_to_logical_map_cpu[p]`` (identity when None).  The tensors
        are not kept."""
        g, u, d, pmap, E_src = self._check_weight_tensors(gate_proj, up_proj, down_proj,
                                                          physical_to_logical_map_cpu)
        with self._lock:
            self._begin_load()
            self._weights_loaded = False
            self._load_from_tensors(g, u, d, pmap, E_src)
            self._weights_loaded = True

    def load_packed_weights(self, gate: dict, up: dict, down: dict,
                            physical_to_logical_map_cpu: Optional[torch.Tensor] = None,
                            num_src_experts: Optional[int] = None) -> None:
        """Load experts already packed in the layer's format(s): each of gate,
        up, down is a dict of parts (``ktmoe.quant.quantize`` output, or read
        from a weight file) stacked over the source experts."""
        with self._lock:
            self._begin_load()
            self._weights_loaded = False
            self._load_packed(gate, up, down, physical_to_logical_map_cpu, num_src_experts)
            self._weights_loaded = True

    # ---------------------------------------------------------- forward

    def _check_inputs(self, hidden_states, topk_ids, topk_weights) -> int:
        if self._closed:
            raise RuntimeError("This layer was closed (close()); create a new wrapper.")
        if not self._weights_loaded:
            raise RuntimeError("Weights not loaded. Call load_weights() first.")
        k = self.num_experts_per_tok
        qlen = check_rows(hidden_states, "hidden_states", self.hidden_size, _IO_DTYPES)
        if not isinstance(topk_ids, torch.Tensor):
            raise TypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
        if tuple(topk_ids.shape) != (qlen, k):
            raise ValueError(f"topk_ids shape mismatch: expected ({qlen}, {k}), got {tuple(topk_ids.shape)}")
        if topk_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"topk_ids must be int64 (or int32), got {topk_ids.dtype}")
        if not isinstance(topk_weights, torch.Tensor):
            raise TypeError(f"topk_weights must be a torch.Tensor, got {type(topk_weights).__name__}")
        if tuple(topk_weights.shape) != (qlen, k):
            raise ValueError(f"topk_weights shape mismatch: expected ({qlen}, {k}), "
                             f"got {tuple(topk_weights.shape)}")
        if not topk_weights.is_floating_point():
            raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
        return qlen

    def _check_and_mask_ids(self, ids: torch.Tensor) -> None:
        """ids: an int64 CPU tensor this wrapper owns.  Ids must be in [0, E)
        or -1; ids of GPU experts (< num_gpu_experts) become -1 (skipped)."""
        if ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(ids))
            if lo < -1 or hi >= self.num_experts:
                raise ValueError(f"topk_ids must be in [0, {self.num_experts}) or -1 (skip the slot), "
                                 f"got values in [{lo}, {hi}]")
        if self.num_gpu_experts:
            ids.masked_fill_(ids < self.num_gpu_experts, -1)

    def _queue(self, x, ids, wts, out) -> None:
        """Queue the forward of CPU tensors as chunks of at most
        chunked_prefill_size tokens (the C layer's scratch grows with the
        tokens of one task).  On failure, tasks already queued are drained
        before the error propagates."""
        layer = self._require_layer()
        n, c = x.shape[0], self.chunked_prefill_size
        queued = False
        try:
            with self.cpu_infer._call_lock:
                if n <= c:  # one chunk: no slicing (a decode token's few microseconds)
                    layer.submit_forward(x, ids, wts, out, int8_activations=self.int8_activations)
                    queued = True
                    return
                for a in range(0, n, c):
                    b = min(n, a + c)
                    layer.submit_forward(x[a:b], ids[a:b], wts[a:b], out[a:b],
                                         int8_activations=self.int8_activations)
                    queued = True
        except BaseException:
            if queued:
                try:
                    self.cpu_infer.sync()
                except Exception:
                    pass
            raise

    def _out_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu") if (self.cpu_save or device.type == "cpu") else device

    def _require_no_pending(self, what: str) -> None:
        if self._pending is not None:
            raise RuntimeError(
                f"{what}() called while a submitted forward is pending on this layer "
                "(one submission per layer). Call sync_forward() first."
            )

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, cuda_stream=None) -> torch.Tensor:
        """Routed-experts forward, synchronous.

        hidden_states [q, H] bf16/fp32 (CPU or CUDA); topk_ids [q, k] int64
        or int32, in [0, E) or -1 to skip a slot; topk_weights [q, k]
        floating.  Returns a new [q, H] tensor of the input's dtype on the
        input's device (on the CPU with ``cpu_save``).  Experts with id <
        num_gpu_experts are skipped (computed on the GPU by the caller).
        ``cuda_stream`` (torch.cuda.Stream or int): the stream of the copies."""
        q = self._check_inputs(hidden_states, topk_ids, topk_weights)
        H, k = self.hidden_size, self.num_experts_per_tok
        with self._lock:
            self._require_no_pending("forward")
            device, dtype = hidden_states.device, hidden_states.dtype
            out_device = self._out_device(device)
            if device.type == "cpu":
                x = hidden_states.contiguous()
                ids = torch.empty((q, k), dtype=torch.int64)
                ids.copy_(topk_ids)
                self._check_and_mask_ids(ids)
                wts = cpu_contiguous(topk_weights, torch.float32)
                out = torch.empty((q, H), dtype=dtype)
                if q:
                    self._queue(x, ids, wts, out)
                    self.cpu_infer.sync()
                return out
            # a CUDA input: staged chunk by chunk through one bounded buffer
            out = torch.empty((q, H), dtype=dtype, device=out_device)
            if q == 0:
                return out
            c = self.chunked_prefill_size
            buf = KExpertsCPUBuffer.acquire(min(q, c), H, k, dtype)
            try:
                with _stream_ctx(cuda_stream, device):
                    for a in range(0, q, c):
                        b = min(q, a + c)
                        n = b - a
                        x, ids, wts = buf.input[:n], buf.expert_ids[:n], buf.weights[:n]
                        x.copy_(hidden_states[a:b])
                        ids.copy_(topk_ids[a:b])
                        self._check_and_mask_ids(ids)
                        wts.copy_(topk_weights[a:b])
                        o = out[a:b] if out_device.type == "cpu" else buf.output[:n]
                        self._queue(x, ids, wts, o)
                        self.cpu_infer.sync()
                        if out_device.type != "cpu":
                            out[a:b].copy_(o)
            finally:
                KExpertsCPUBuffer.release(buf)
            return out

    def submit_forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor, cuda_stream=None) -> None:
        """Queue the forward and return at once (the caller's thread is free
        while the pool computes).  The inputs are copied into staging buffers
        first, so they may be changed or freed right after the call.  One
        submission per layer may be pending; get the result with
        sync_forward().  Arguments as in forward()."""
        q = self._check_inputs(hidden_states, topk_ids, topk_weights)
        H, k = self.hidden_size, self.num_experts_per_tok
        with self._lock:
            if self._pending is not None:
                raise RuntimeError(
                    "submit_forward() called twice without sync_forward(): one submission per "
                    "layer may be pending. Call sync_forward() first."
                )
            device, dtype = hidden_states.device, hidden_states.dtype
            out_device = self._out_device(device)
            buf = KExpertsCPUBuffer.acquire(q, H, k, dtype)
            try:
                x, ids, wts = buf.input[:q], buf.expert_ids[:q], buf.weights[:q]
                with _stream_ctx(cuda_stream, device):
                    x.copy_(hidden_states)
                    ids.copy_(topk_ids)
                    wts.copy_(topk_weights)
                self._check_and_mask_ids(ids)
                out = torch.empty((q, H), dtype=dtype) if out_device.type == "cpu" else buf.output[:q]
                sub = _Submission(self.cpu_infer, q, dtype, out, out_device, buf,
                                  (self._layer,), cuda_stream)
                if q:
                    self._queue(x, ids, wts, out)
            except BaseException:
                KExpertsCPUBuffer.release(buf)
                raise
            self._pending = sub

    def sync_forward(self, hidden_states: Optional[torch.Tensor] = None,
                     cuda_stream=None) -> torch.Tensor:
        """Wait for this layer's submitted forward and return its output
        ([q, H], the submitted input's dtype, on its device; on the CPU with
        cpu_save).  Other layers' submissions stay pending and keep their
        results.  ``hidden_states``, when given, must have the submitted
        input's shape.  ``cuda_stream`` (default: the one given to
        submit_forward) is the stream of the copy to the GPU."""
        with self._lock:
            sub = self._pending
            if sub is None:
                raise RuntimeError(
                    "sync_forward() called without a pending submit_forward(). "
                    "Call submit_forward() first."
                )
            if hidden_states is not None:
                if (not isinstance(hidden_states, torch.Tensor)
                        or tuple(hidden_states.shape) != (sub.qlen, self.hidden_size)):
                    got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else \
                        type(hidden_states).__name__
                    raise ValueError(f"hidden_states shape mismatch: the pending forward has "
                                     f"({sub.qlen}, {self.hidden_size}), got {got}")
            try:
                sub.sync()
                out = sub.out
                if sub.out_device.type == "cuda":
                    stream = cuda_stream if cuda_stream is not None else sub.cuda_stream
                    with _stream_ctx(stream, sub.out_device):
                        res = torch.empty((sub.qlen, self.hidden_size), dtype=sub.dtype,
                                          device=sub.out_device)
                        res.copy_(out, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record()
                    sub.buf.event = ev  # the buffer is reused only after this copy
                    out = res
                return out
            finally:
                self._pending = None
                KExpertsCPUBuffer.release(sub.buf)

    # --------------------------------------------------------- lifetime

    def _drain(self) -> None:
        """Wait for this layer's pending submission, if any, and drop it
        (its result is lost; an error is not raised here, and the pool's
        failure count tells other pending submissions about it)."""
        sub = self._pending
        if sub is None:
            return
        try:
            sub.sync()
        except Exception:
            pass
        finally:
            self._pending = None
            KExpertsCPUBuffer.release(sub.buf)

    def close(self) -> None:
        """Free the layer's weights and buffers now (a pending submission is
        waited for and dropped).  Also done on garbage collection."""
        with self._lock:
            self._drain()
            if self._layer is not None:
                try:
                    self.cpu_infer.sync()
                except Exception:
                    pass
                self._layer.close()
                self._layer = None
            self._weights_loaded = False
            self._closed = True

    def __enter__(self) -> "NativeMoEWrapper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # a pending task still reads this layer and its buffers: wait for it
        try:
            if getattr(self, "_pending", None) is not None:
                self._drain()
        except Exception:
            pass


__all__ = ["NativeMoEWrapper", "KExpertsCPUBuffer"]


# ------------------------------------------- checkpoint-format methods

class CheckpointMoEWrapper(NativeMoEWrapper):
    """RAWINT4 and FP8 (the spec's NativeMoEWrapper): experts in a
    checkpoint's own quantized layout, re-laid out exactly into ktmoe's
    packed format (docs/inference_formats.md) — no dequantized copy.

    ``load_weights_from_tensors(gate, up, down, map)`` takes per projection
    either a dict of the checkpoint's tensors stacked over experts, or a list
    of such dicts (one per expert):

    * RAWINT4 (compressed-tensors pack-quantized, symmetric int4, group 32):
      ``weight_packed`` int32 [N, K/8], ``weight_scale`` [N, K/32], optional
      ``weight_shape``;
    * FP8 (DeepSeek-V3): ``weight`` float8_e4m3fn [N, K], ``weight_scale_inv``
      float32 [ceil(N/128), ceil(K/128)].

    Plain bf16/fp32 tensors are accepted too and quantized online into the
    same format.  ``load_weights()`` reads ktmoe weight files of that format
    (``ktmoe.loaders.rawint4_spec()`` / ``fp8_spec()``)."""

    SPECS: ClassVar[Dict[str, SpecBuilder]] = {
        "RAWINT4": lambda gs, zp: _loaders().rawint4_spec(),
        "FP8": lambda gs, zp: _loaders().fp8_spec(),
    }

    def load_weights_from_tensors(self, gate_proj, up_proj, down_proj,
                                  physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        projs = (gate_proj, up_proj, down_proj)
        if all(isinstance(t, torch.Tensor) for t in projs):
            return super().load_weights_from_tensors(*projs, physical_to_logical_map_cpu)
        converted = [_loaders().checkpoint_to_parts(self.method, t, name=n)
                     for t, n in zip(projs, ("gate_proj", "up_proj", "down_proj"))]
        specs = tuple(spec for spec, _ in converted)
        with self._lock:
            self._begin_load()
            self._weights_loaded = False
            self._ensure_layer(specs)
            self._load_packed(*(parts for _, parts in converted), physical_to_logical_map_cpu)
            self._weights_loaded = True


class LlamafileMoEWrapper(NativeMoEWrapper):
    """LLAMAFILE (the spec's LlamafileMoEWrapper): the routed experts of a
    GGUF file (``weight_path``: a .gguf file or a folder of split files),
    read with the ``gguf`` package and laid out exactly for Q8_0, Q4_0, Q4_1,
    Q4_K, Q6_K and BF16; F16/F32 round to bf16; other types are dequantized
    and re-quantized to int8 groups of 32 (docs/inference_formats.md).  The
    projections may differ in type (Q4_K_M); the layer takes each one's
    format."""

    SPECS: ClassVar[Dict[str, SpecBuilder]] = {"LLAMAFILE": lambda gs, zp: None}

    def _load_from_files(self, physical_to_logical_map_cpu) -> None:
        from .gguf import open_gguf

        if not self.weight_path:
            raise RuntimeError("LLAMAFILE: load_weights() needs weight_path (a .gguf file or a folder)")
        model = open_gguf(self.weight_path)
        info = model.layer_info(
            self.layer_idx, hidden_size=self.hidden_size, intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts if physical_to_logical_map_cpu is None else None)
        self._ensure_layer(info.specs)
        num_src, _, parts = model.read_layer(self.layer_idx)
        self._load_packed(*parts, physical_to_logical_map_cpu, num_src)

    def load_weights_from_tensors(self, *args, **kwargs) -> None:
        raise RuntimeError("LLAMAFILE loads GGUF files: set weight_path and call load_weights(); "
                           "for bf16 tensors use method MOE_INT8 or MOE_INT4")


def _loaders():
    from . import loaders

    return loaders
