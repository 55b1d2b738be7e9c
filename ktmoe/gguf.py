"""Routed experts of a llama.cpp GGUF file as ktmoe's packed parts (the
LLAMAFILE inference method; ``docs/inference_formats.md``).

A layer's experts are the stacked 3-D tensors ``blk.{L}.ffn_gate_exps.weight``,
``blk.{L}.ffn_up_exps.weight``, ``blk.{L}.ffn_down_exps.weight`` (older files:
one 2-D tensor per expert, ``blk.{L}.ffn_gate.{e}.weight`` ...).  ggml lists
dimensions innermost first: ``ne = [K, N, E]``; gguf-py's ``GGUFReader`` keeps
that order in ``ReaderTensor.shape`` and gives ``data`` in numpy (outermost
first) order, ``[E, N, row_bytes]`` for the block-quantized types.

Each ggml type maps onto one ktmoe format:

======= ======================== =============================================
ggml    ktmoe format (QuantSpec) exact?
======= ======================== =============================================
Q8_0    int8_kgroup, group 32    yes: code q, scale fp32(d)
Q4_0    int4_kgroup, group 32    yes: nibbles re-paired, scale fp32(d)
Q4_1    int4_1_kgroup, group 32  yes: scale fp32(d), min fp32(m)
Q4_K    int4_1_kgroup, group 32  yes: scale d*sc, min -(dmin*m) (fp32, exact)
Q6_K    int8_kgroup, group 16    yes: code q-32, scale d*sc (fp32, exact)
BF16    bf16                     yes
F16/F32 bf16                     rounded to bf16 (8 significant bits)
others  int8_kgroup, group 32    dequantized (gguf-py) and re-quantized:
                                 error <= 1/254 of the group's max |w|
======= ======================== =============================================

The conversion works on chunks of rows of one expert (about 1M weights each,
converted in parallel threads); the whole layer is never held in fp32 or bf16
unless its target format is bf16.
The exact paths use gguf-py only to read the file; their block decoding is
written here (gguf-py's numpy dequantizers are the tests' reference).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .quant import QuantSpec, quantize

PROJ_NAMES = ("gate", "up", "down")

#: ggml type name -> ktmoe QuantSpec, for the exact conversions
_EXACT_SPECS = {
    "Q8_0": QuantSpec("INT8_KGROUP", 32),
    "Q4_0": QuantSpec("AMXINT4_KGroup_SFT", 32, zero_point=False),
    "Q4_1": QuantSpec("AMXINT4_1KGroup_SFT", 32),
    "Q4_K": QuantSpec("AMXINT4_1KGroup_SFT", 32),
    "Q6_K": QuantSpec("INT8_KGROUP", 16),
    "BF16": QuantSpec("AMXBF16_SFT"),
}
_ROUNDED_SPECS = {"F16": QuantSpec("AMXBF16_SFT"), "F32": QuantSpec("AMXBF16_SFT")}
#: target of every other (dequantizable) type
FALLBACK_SPEC = QuantSpec("INT8_KGROUP", 32)
#: ggml types that are not weights (or that gguf-py cannot decode)
_REJECTED = ("I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K")

#: weights per conversion chunk (rows of one expert)
_CHUNK_ELEMENTS = 1 << 20


def _gguf():
    try:
        import gguf  # the gguf-py package (llama.cpp), not this module
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF files needs the 'gguf' package (pip install gguf)") from exc
    return gguf


def _qtype(t):
    """A GGMLQuantizationType from the enum, its int value or its name."""
    Q = _gguf().GGMLQuantizationType
    if isinstance(t, Q):
        return t
    if isinstance(t, str):
        try:
            return Q[t.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type {t!r}") from None
    return Q(int(t))


def exact_types() -> Tuple[str, ...]:
    """ggml types converted without any rounding."""
    return tuple(_EXACT_SPECS)


def gguf_spec(ggml_type) -> QuantSpec:
    """The ktmoe format a ggml type is converted to (ValueError when it
    cannot be converted)."""
    t = _qtype(ggml_type)
    if t.name in _EXACT_SPECS:
        return _EXACT_SPECS[t.name]
    if t.name in _ROUNDED_SPECS:
        return _ROUNDED_SPECS[t.name]
    if t.name in _REJECTED or not _can_dequantize(t):
        raise ValueError(f"ggml type {t.name} is not supported for expert weights")
    return FALLBACK_SPEC


def conversion_kind(ggml_type) -> str:
    """'exact', 'rounded' (F16/F32 -> bf16) or 'requantized'."""
    t = _qtype(ggml_type)
    gguf_spec(t)
    if t.name in _EXACT_SPECS:
        return "exact"
    return "rounded" if t.name in _ROUNDED_SPECS else "requantized"


def _can_dequantize(t) -> bool:
    gq = _gguf().quants
    traits = getattr(gq, "_type_traits", None)
    if traits is not None:
        return t in traits
    return True  # pragma: no cover - older gguf-py: try and report at conversion


# ------------------------------------------------------- block decoders
#
# numpy, one chunk of rows at a time: each decoder takes the chunk's block
# bytes uint8 [R, row_bytes] and returns the parts as arrays [R, ...].
# (numpy rather than torch: ~20 small element-wise passes per chunk, where
# torch's intra-op threading costs more than it gains; chunks run in
# parallel instead, numpy releasing the GIL.)


def _f16(b: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] little-endian fp16 -> fp32 [...] (exact)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _repair_nibbles(qs: np.ndarray, chunk: int) -> np.ndarray:
    """ggml's 4-bit order -> ktmoe's.

    ggml: a run of ``chunk`` bytes holds 2*chunk elements: the first
    ``chunk`` in the low nibbles, the next ``chunk`` in the high nibbles
    (Q4_0/Q4_1: chunk 16 = one block; Q4_K: chunk 32 = two sub-blocks).
    ktmoe: element k in byte k // 2, low nibble for even k."""
    x = qs.reshape(*qs.shape[:-1], -1, chunk)
    a, b = x[..., 0::2], x[..., 1::2]
    lo = (a & 0x0F) | ((b & 0x0F) << 4)  # elements 0..chunk-1, pairwise
    hi = (a >> 4) | (b & 0xF0)  # elements chunk..2*chunk-1
    return np.concatenate([lo, hi], axis=-1).reshape(qs.shape[0], -1)


def _dec_q8_0(b: np.ndarray):
    b = b.reshape(b.shape[0], -1, 34)
    return {"qweight": b[..., 2:].view(np.int8).reshape(b.shape[0], -1),
            "scale": _f16(b[..., 0:2])}


def _dec_q4_0(b: np.ndarray):
    b = b.reshape(b.shape[0], -1, 18)
    return {"qweight": _repair_nibbles(b[..., 2:], 16), "scale": _f16(b[..., 0:2])}


def _dec_q4_1(b: np.ndarray):
    b = b.reshape(b.shape[0], -1, 20)
    return {"qweight": _repair_nibbles(b[..., 4:], 16), "scale": _f16(b[..., 0:2]),
            "min": _f16(b[..., 2:4])}


def _q4_k_scale_min(s: np.ndarray):
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block (12 bytes):
    bytes 0-3 low 6 bits: sc 0-3; bytes 4-7 low 6 bits: m 0-3; bytes 8-11:
    low nibble sc 4-7, high nibble m 4-7, whose top 2 bits are the top bits
    of bytes 0-3 (sc) and 4-7 (m).  Returns (sc, m) uint8 [..., 8]."""
    w = np.ascontiguousarray(s).view("<u4")  # [..., 3]: bytes 0-3, 4-7, 8-11
    d, m, md = w[..., 0], w[..., 1], w[..., 2]
    out = np.stack([d & 0x3F3F3F3F, (md & 0x0F0F0F0F) | ((d >> 2) & 0x30303030),
                    m & 0x3F3F3F3F, ((md >> 4) & 0x0F0F0F0F) | ((m >> 2) & 0x30303030)],
                   axis=-1).astype("<u4")
    u = out.view(np.uint8)  # [..., 16]: sc 0-7, m 0-7
    return u[..., :8], u[..., 8:]


def _dec_q4_k(b: np.ndarray):
    R = b.shape[0]
    b = b.reshape(R, -1, 144)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [R, nb]
    sc, mn = _q4_k_scale_min(b[..., 4:16])  # [R, nb, 8]
    scale = d[..., None] * sc.astype(np.float32)  # 11 x 6 bits: exact in fp32
    minv = -(dmin[..., None] * mn.astype(np.float32))  # exact, as ggml's m1 = dmin * m
    return {"qweight": _repair_nibbles(b[..., 16:], 32), "scale": scale.reshape(R, -1),
            "min": minv.reshape(R, -1)}


_Q6_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)


def _dec_q6_k(b: np.ndarray):
    """Q6_K super-block (256 weights, 210 bytes): ql[128], qh[64], int8
    scales[16], fp16 d.  In each half h (128 weights; ql bytes 64h.., qh
    bytes 32h..), weight 32t + l (t = 0..3, l = 0..31) has low 4 bits
    ql[64h + l + 32(t&1)] >> 4(t>>1) and high 2 bits qh[32h + l] >> 2t;
    value d * scales[w // 16] * (q - 32)."""
    R = b.shape[0]
    b = b.reshape(R, -1, 210)
    ql = b[..., 0:128].reshape(*b.shape[:-1], 2, 2, 32)  # [R, nb, h, ql half, l]
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 1, 32)  # [R, nb, h, 1, l]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-2)  # [R, nb, h, t, l]
    high = (qh >> _Q6_SHIFTS) & 0x03
    q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)  # [R, nb, 16]
    d = _f16(b[..., 208:210])
    return {"qweight": q.reshape(R, -1),
            "scale": (d[..., None] * sc).reshape(R, -1)}  # 11 x 8 bits: exact in fp32


_DECODERS = {"Q8_0": _dec_q8_0, "Q4_0": _dec_q4_0, "Q4_1": _dec_q4_1, "Q4_K": _dec_q4_k,
             "Q6_K": _dec_q6_k}


# ------------------------------------------------------------ converter


def _row_cols(arr: np.ndarray, t) -> int:
    """Weights per row of a source array as GGUFReader gives it."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if t in (Q.F16, Q.F32) and arr.dtype in (np.float16, np.float32):
        return arr.shape[-1]
    if arr.dtype != np.uint8:
        raise ValueError(f"{t.name} data must be raw bytes (uint8), got {arr.dtype}")
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    if arr.shape[-1] % ts:
        raise ValueError(f"{arr.shape[-1]} bytes per row is not a whole number of {t.name} "
                         f"blocks ({ts} bytes)")
    return arr.shape[-1] // ts * bs


def _workers() -> int:
    n = os.cpu_count() or 1
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass
    return max(1, min(n, 16))


def gguf_to_parts(data: Union[np.ndarray, Sequence[np.ndarray]], ggml_type, cols: Optional[int] = None,
                  *, name: str = "tensor") -> Tuple[QuantSpec, Dict[str, torch.Tensor]]:
    """One projection's ggml data -> ``(spec, parts)``.

    ``data``: ``[E, N, row]`` as GGUFReader gives it (raw block bytes, or
    float16/float32 values for F16/F32), one ``[N, row]`` matrix, or a list
    of per-expert ``[N, row]`` matrices.  ``cols`` (K) is checked when given.
    Parts are ``[E, N, ...]`` (``[N, ...]`` for a single matrix)."""
    t = _qtype(ggml_type)
    spec = gguf_spec(t)
    single = isinstance(data, np.ndarray) and data.ndim == 2
    if isinstance(data, np.ndarray):
        if data.ndim not in (2, 3):
            raise ValueError(f"{name}: expected [E, N, row] or [N, row] data, got shape {data.shape}")
        experts = list(data if data.ndim == 3 else data[None])
    else:
        experts = [np.asarray(x) for x in data]
        if not experts:
            raise ValueError(f"{name}: no experts")
    for e, x in enumerate(experts):
        if x.ndim != 2 or x.shape != experts[0].shape or x.dtype != experts[0].dtype:
            raise ValueError(f"{name}: expert {e} has shape {x.shape} {x.dtype}, expert 0 "
                             f"{experts[0].shape} {experts[0].dtype}")
    E, N = len(experts), experts[0].shape[0]
    K = _row_cols(experts[0], t)
    if cols is not None and cols != K:
        raise ValueError(f"{name}: {t.name} rows hold {K} weights, expected {cols}")
    if spec.kgroup and K % spec.group_size:  # pragma: no cover - block sizes are multiples of 32
        raise ValueError(f"{name}: K ({K}) is not a multiple of {spec.group_size}")
    out = {p: torch.empty((E,) + shape, dtype=dt) for p, (shape, dt) in spec.part_shapes(N, K).items()}
    # numpy views of the outputs, [E, N, ...] (bf16 through its int16 bits)
    out_np = {p: (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy()
              for p, v in out.items()}
    rows = max(1, min(N, _CHUNK_ELEMENTS // max(1, K)))
    jobs = [(e, r0, min(N, r0 + rows)) for e in range(E) for r0 in range(0, N, rows)]

    def run(job):
        e, r0, r1 = job
        parts = _convert_chunk(np.ascontiguousarray(experts[e][r0:r1]), t, spec, K, name)
        for p, v in parts.items():
            if p in ("scale", "min") and not np.isfinite(v).all():
                raise ValueError(f"{name}: {t.name} block {p} of expert {e} (row "
                                 f"{r0 + int(np.nonzero(~np.isfinite(v))[0][0])}) is not finite "
                                 "(corrupt file?)")
            np.copyto(out_np[p][e, r0:r1], v.reshape(out_np[p][e, r0:r1].shape), casting="no")

    workers = min(_workers(), len(jobs))
    if workers <= 1:
        for job in jobs:
            run(job)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for fut in [pool.submit(run, job) for job in jobs]:
                fut.result()  # the first error, in job order
    if single:
        out = {p: v[0] for p, v in out.items()}
    return spec, out


def _convert_chunk(src: np.ndarray, t, spec: QuantSpec, K: int, name: str) -> Dict[str, np.ndarray]:
    """Rows [R, row] of one expert -> part arrays [R, ...]."""
    if t.name in _DECODERS:
        return _DECODERS[t.name](src)
    if t.name == "BF16":
        return {"qweight": src.view(np.int16)}  # the bf16 bits
    if t.name in ("F16", "F32"):
        if src.dtype == np.uint8:  # raw bytes
            src = src.view(np.float16 if t.name == "F16" else np.float32)
        # round to nearest even, once (f16 -> f32 is exact)
        bf = torch.from_numpy(np.array(src)).to(torch.bfloat16)
        return {"qweight": bf.view(torch.int16).numpy()}
    try:
        w = _gguf().quants.dequantize(src, t)
    except NotImplementedError as exc:
        raise ValueError(f"{name}: ggml type {t.name} cannot be decoded by gguf-py") from exc
    w = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).reshape(src.shape[0], K))
    try:
        parts = quantize(w, spec)
    except ValueError as exc:
        raise ValueError(f"{name}: {t.name} weights: {exc}") from None
    return {p: v.numpy() for p, v in parts.items()}


# ------------------------------------------------------------ files


def _field_value(field) -> Any:
    if hasattr(field, "contents"):
        return field.contents()
    part = field.parts[field.data[0]]  # pragma: no cover - older gguf-py
    return bytes(part).decode("utf-8") if part.dtype == np.uint8 else part.tolist()[0]


@dataclass(frozen=True)
class GGUFLayerInfo:
    """What a file holds for one layer's routed experts (nothing converted)."""

    layer_idx: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    types: Tuple[str, str, str]  # ggml type names of gate, up, down
    specs: Tuple[QuantSpec, QuantSpec, QuantSpec]
    layout: str  # "stacked" (ffn_*_exps) or "per_expert" (ffn_*.{e})


class GGUFModel:
    """One GGUF model: a .gguf file, or a directory of .gguf files (split
    models; every tensor is looked up in all of them).  Memory-maps the
    files; tensors are read when a layer is converted."""

    def __init__(self, path: Union[str, os.PathLike]):
        gguf = _gguf()
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"GGUF weight path not found: {path}")
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".gguf"))
            if not files:
                raise FileNotFoundError(f"no .gguf file in directory {path}")
        else:
            files = [path]
        self.path = path
        self.files = files
        self._readers = []
        self._tensors: Dict[str, Tuple[str, Any]] = {}
        self._fields: Dict[str, Any] = {}
        for f in files:
            try:
                r = gguf.GGUFReader(f, "r")
            except (ValueError, IndexError, KeyError, OSError) as exc:
                raise ValueError(f"{f} is not a readable GGUF file: {exc}") from None
            if getattr(r, "byte_order", "I") != "I":
                raise ValueError(f"{f}: GGUF file of the other byte order (big-endian) is not "
                                 "supported")
            self._readers.append(r)
            for name, field in r.fields.items():
                self._fields.setdefault(name, field)
            for tensor in r.tensors:
                self._tensors.setdefault(tensor.name, (f, tensor))
        arch = self.metadata("general.architecture")
        self.architecture = arch if isinstance(arch, str) else None

    def metadata(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else _field_value(field)

    def arch_metadata(self, suffix: str, default=None):
        """``{general.architecture}.{suffix}``, e.g. ``expert_count``."""
        if self.architecture is None:
            return default
        return self.metadata(f"{self.architecture}.{suffix}", default)

    @property
    def tensor_names(self) -> List[str]:
        return list(self._tensors)

    def _layer_tensors(self, L: int):
        stacked = [self._tensors.get(f"blk.{L}.ffn_{p}_exps.weight") for p in PROJ_NAMES]
        if all(x is not None for x in stacked):
            return "stacked", stacked
        if f"blk.{L}.ffn_gate_up_exps.weight" in self._tensors:
            raise ValueError(f"{self.path}: layer {L} stores gate and up fused "
                             f"(blk.{L}.ffn_gate_up_exps.weight): unsupported layout")
        per = []
        for p in PROJ_NAMES:
            e, found = 0, []
            while f"blk.{L}.ffn_{p}.{e}.weight" in self._tensors:
                found.append(self._tensors[f"blk.{L}.ffn_{p}.{e}.weight"])
                e += 1
            per.append(found)
        if all(per):
            return "per_expert", per
        missing = [f"blk.{L}.ffn_{p}_exps.weight" for p, x in zip(PROJ_NAMES, stacked) if x is None]
        raise ValueError(f"{self.path}: layer {L} has no routed-expert tensors {missing} "
                         "(not an MoE layer, or another layout)")

    def layer_info(self, layer_idx: int, *, num_experts: Optional[int] = None,
                   hidden_size: Optional[int] = None,
                   intermediate_size: Optional[int] = None) -> GGUFLayerInfo:
        """Shapes and types of one layer's experts, checked against each
        other, the file's metadata and the caller's expectations."""
        L = int(layer_idx)
        layout, src = self._layer_tensors(L)
        dims, types = [], []
        for p, entry in zip(PROJ_NAMES, src):
            if layout == "stacked":
                f, tensor = entry
                ne = [int(x) for x in tensor.shape]
                if len(ne) != 3:
                    raise ValueError(f"{f}: {tensor.name} has {len(ne)} dims {ne}, expected 3 "
                                     "(ne = [K, N, experts])")
                E = ne[2]
            else:
                f, tensor = entry[0]
                ne = [int(x) for x in tensor.shape]
                if len(ne) != 2:
                    raise ValueError(f"{f}: {tensor.name} has {len(ne)} dims {ne}, expected 2")
                for f2, t2 in entry:
                    if [int(x) for x in t2.shape] != ne or t2.tensor_type != tensor.tensor_type:
                        raise ValueError(f"{f2}: {t2.name} ({t2.tensor_type.name} {list(t2.shape)}) "
                                         f"differs from {tensor.name} ({tensor.tensor_type.name} {ne})")
                E = len(entry)
            try:
                spec = gguf_spec(tensor.tensor_type)
            except ValueError as exc:
                raise ValueError(f"{f}: {tensor.name}: {exc}") from None
            dims.append((ne[0], ne[1], E))
            types.append((tensor.tensor_type.name, spec))
        (Hg, Ig, Eg), (Hu, Iu, Eu), (Id, Hd, Ed) = dims
        what = f"{self.path}: layer {L}"
        if (Hg, Ig, Eg) != (Hu, Iu, Eu):
            raise ValueError(f"{what}: ffn_gate [K, N, E] = {[Hg, Ig, Eg]} differs from ffn_up "
                             f"{[Hu, Iu, Eu]}")
        if (Id, Hd, Ed) != (Ig, Hg, Eg):
            raise ValueError(f"{what}: ffn_down [K, N, E] = {[Id, Hd, Ed]}, expected {[Ig, Hg, Eg]} "
                             "(the transpose of ffn_gate's)")
        E, H, I = Eg, Hg, Ig
        for key, val in (("expert_count", E), ("embedding_length", H),
                         ("expert_feed_forward_length", I)):
            meta = self.arch_metadata(key)
            if isinstance(meta, int) and meta != val:
                raise ValueError(f"{what}: metadata {self.architecture}.{key} = {meta} but the "
                                 f"expert tensors say {val}")
        for key, want, got in (("num_experts", num_experts, E), ("hidden_size", hidden_size, H),
                               ("intermediate_size", intermediate_size, I)):
            if want is not None and want != got:
                raise ValueError(f"{what}: the file has {key} = {got}, the layer expects {want}")
        return GGUFLayerInfo(L, E, H, I, tuple(n for n, _ in types), tuple(s for _, s in types),
                             layout)

    def read_layer(self, layer_idx: int, *, num_experts: Optional[int] = None,
                   hidden_size: Optional[int] = None, intermediate_size: Optional[int] = None):
        """``(num_experts, (gate_spec, up_spec, down_spec), (gate, up, down))``
        with each projection's parts ``[E, N, ...]`` ready for
        ``NativeLayer.load_packed``."""
        info = self.layer_info(layer_idx, num_experts=num_experts, hidden_size=hidden_size,
                               intermediate_size=intermediate_size)
        layout, src = self._layer_tensors(info.layer_idx)
        parts = []
        for p, entry, K in zip(PROJ_NAMES, src, (info.hidden_size, info.hidden_size,
                                                 info.intermediate_size)):
            if layout == "stacked":
                f, tensor = entry
                data, tt, label = tensor.data, tensor.tensor_type, f"{f}: {tensor.name}"
            else:
                f, tensor = entry[0]
                data = [t.data for _, t in entry]
                tt, label = tensor.tensor_type, f"{f}: blk.{info.layer_idx}.ffn_{p}.*.weight"
            _, pp = gguf_to_parts(data, tt, K, name=f"{label} ({tt.name})")
            parts.append(pp)
        return info.num_experts, info.specs, tuple(parts)


_CACHE: Dict[Tuple, GGUFModel] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def open_gguf(path: Union[str, os.PathLike]) -> GGUFModel:
    """A GGUFModel, shared between calls while the file(s) are unchanged
    (parsing a large file's header takes a while; every layer reuses it)."""
    path = os.path.realpath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF weight path not found: {path}")
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".gguf")]
             if os.path.isdir(path) else [path])
    key = (path,) + tuple((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)
    with _CACHE_LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = GGUFModel(path)
            for old in [k for k in _CACHE if k[0] == path]:
                del _CACHE[old]
            while len(_CACHE) >= _CACHE_SIZE:
                del _CACHE[next(iter(_CACHE))]
            _CACHE[key] = model
        return model


def load_gguf_experts(path: Union[str, os.PathLike], layer_idx: int, *,
                      num_experts: Optional[int] = None, hidden_size: Optional[int] = None,
                      intermediate_size: Optional[int] = None):
    """Read layer ``layer_idx``'s routed experts from a .gguf file (or a
    directory of them): ``(num_experts, specs, parts)``, see
    :meth:`GGUFModel.read_layer`.  The expected sizes, when given, are
    checked against the file."""
    return open_gguf(path).read_layer(layer_idx, num_experts=num_experts, hidden_size=hidden_size,
                                      intermediate_size=intermediate_size)


__all__ = ["GGUFModel", "GGUFLayerInfo", "FALLBACK_SPEC", "open_gguf", "load_gguf_experts",
           "gguf_to_parts", "gguf_spec", "conversion_kind", "exact_types"]
