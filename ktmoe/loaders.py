"""Checkpoint tensors in their own quantized layouts (RAWINT4 and FP8 for
inference, FP8 and MXFP4 for SFT too), re-laid out as ktmoe's packed parts
(``docs/inference_formats.md``).

Both conversions are exact: the packed parts dequantize (``ktmoe.quant``'s
table) to the very values the checkpoint's own definition gives, with no
re-quantization.  The 4-bit / 8-bit codes are reinterpreted in place where
the byte layout already matches (the returned ``qweight`` then shares memory
with the checkpoint tensor: keep it alive, do not modify it); only the small
scale tensors are converted (to fp32, exactly).

RAWINT4
    compressed-tensors "pack-quantized" int4 (Kimi-K2, GPTQ-style exports):
    ``weight_packed`` int32 [N, ceil(K/8)], ``weight_scale`` bf16/fp16/fp32
    [N, K/group_size], symmetric (no ``weight_zero_point``).  compressed-tensors'
    ``pack_to_int32`` stores signed value v as ``u = v + 8`` in bits
    ``4j..4j+3`` of int32 ``i`` for column ``8i + j``; on a little-endian
    machine that is byte ``(8i + j) // 2`` of the row, low nibble for even
    columns: ktmoe's ``int4_kgroup`` order, and ``(u - 8) * scale`` its value.
    Target: ``QuantSpec("AMXINT4_KGroup_SFT", group_size, zero_point=False)``.

FP8
    DeepSeek-V3/R1 block FP8: ``weight`` float8_e4m3fn [N, K] and
    ``weight_scale_inv`` fp32 [ceil(N/128), ceil(K/128)]; value
    ``weight * scale_inv[n // 128, k // 128]``.  Target:
    ``QuantSpec("FP8", 128)`` (``fp8_e4m3`` with one scale per row and
    128-column group: the block scale repeated over its 128 rows).

MXFP4
    OCP MX FP4 (GPT-OSS): ``*_blocks`` uint8 [N, K/32, 16] (two E2M1 codes a
    byte, low nibble first) and ``*_scales`` uint8 E8M0 [N, K/32]; value
    ``e2m1(code) * 2^(scale - 127)``: ktmoe's ``mxfp4`` bytes as they are, the
    scales as exact fp32 powers of two.  Target: ``QuantSpec("MXFP4_SFT")``.

Every function takes one projection, stacked over experts ``[E, N, ...]`` or
of one expert ``[N, ...]`` (the parts then have the same leading dims);
:func:`stack_parts` stacks per-expert results, and
:func:`checkpoint_to_parts` picks the conversion from the tensor names.
"""

from __future__ import annotations

import sys
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from .quant import FIXED_GROUP_SIZE, QuantSpec

#: group size of the usual pack-quantized int4 checkpoints (Kimi-K2)
RAWINT4_GROUP_SIZE = 32
#: (rows, columns) of a DeepSeek-V3 FP8 scale block
FP8_BLOCK = (128, 128)
#: columns per scale of OCP MX formats
MXFP4_GROUP_SIZE = FIXED_GROUP_SIZE["mxfp4"]
#: method names of checkpoint_to_parts and their canonical form
_CHECKPOINT_METHODS = {"RAWINT4": "RAWINT4", "FP8": "FP8", "AMXFP8_SFT": "FP8",
                       "MXFP4": "MXFP4", "MXFP4_SFT": "MXFP4"}
#: the SFT methods whose load_weights_from_tensors reads checkpoint tensors
CHECKPOINT_SFT_METHODS = ("AMXFP8_SFT", "MXFP4_SFT")

_SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: E4M3 "fn" has no infinities; these two codes (S.1111.111) are NaN
_FP8_NAN_CODES = (0x7F, 0xFF)
#: elements per conversion chunk (bounds the temporaries of a check)
_CHUNK_ELEMENTS = 1 << 24


def rawint4_spec(group_size: int = RAWINT4_GROUP_SIZE) -> QuantSpec:
    """The ktmoe format RAWINT4 checkpoints map onto (exactly)."""
    return QuantSpec("AMXINT4_KGroup_SFT", group_size, zero_point=False)


def fp8_spec(block_cols: int = FP8_BLOCK[1]) -> QuantSpec:
    """The ktmoe format FP8 block-scaled checkpoints map onto (exactly)."""
    return QuantSpec("FP8", block_cols)


def _require_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - x86-64 only
        raise RuntimeError("the RAWINT4/FP8 re-layout reads int32/fp8 bytes in place and "
                           "needs a little-endian machine")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.cpu()


def _row_chunks(rows: int, cols: int):
    """Slices of the flattened row dimension, ~_CHUNK_ELEMENTS each."""
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _where(lead: Tuple[int, ...], flat_row: int, rows: int) -> str:
    """'expert e, row n' (or 'row n') of a flattened row index."""
    n = flat_row % rows
    if not lead:
        return f"row {n}"
    e = flat_row // rows
    return f"expert {e}, row {n}"


def _check_scales(scale: torch.Tensor, name: str, lead: Tuple[int, ...], rows: int) -> None:
    bad = ~torch.isfinite(scale)
    if bool(bad.any()):
        idx = int(bad.reshape(-1, scale.shape[-1]).any(-1).nonzero()[0, 0])
        raise ValueError(f"{name}: scale of {_where(lead, idx, rows)} is not finite")


# ---------------------------------------------------------------- RAWINT4


def rawint4_to_parts(weight_packed: torch.Tensor, weight_scale: torch.Tensor, *,
                     cols: Optional[int] = None, group_size: Optional[int] = RAWINT4_GROUP_SIZE,
                     name: str = "weight") -> Dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized int4 -> ``int4_kgroup`` parts.

    ``weight_packed``: int32 ``[E, N, K/8]`` or ``[N, K/8]``;
    ``weight_scale``: bf16/fp16/fp32 ``[E, N, K/group_size]`` (or 2-D);
    ``cols``: K from the checkpoint's ``weight_shape`` (default ``8 *
    weight_packed.shape[-1]``); ``group_size``: columns per scale (None:
    K / weight_scale.shape[-1]).  Returns ``{"qweight": uint8 [..., N, K/2]
    (a view of weight_packed's bytes when it is a contiguous CPU tensor),
    "scale": fp32 [..., N, K/group_size]}`` for ``rawint4_spec(group_size)``.
    ``name`` labels error messages."""
    _require_little_endian()
    if not isinstance(weight_packed, torch.Tensor) or not isinstance(weight_scale, torch.Tensor):
        raise TypeError(f"{name}: weight_packed and weight_scale must be torch.Tensors")
    if weight_packed.dtype != torch.int32:
        raise ValueError(f"{name}: weight_packed must be int32 (eight 4-bit values per int32), "
                         f"got {weight_packed.dtype}")
    if weight_packed.dim() not in (2, 3):
        raise ValueError(f"{name}: weight_packed must be [N, K/8] or [E, N, K/8], "
                         f"got {tuple(weight_packed.shape)}")
    lead, (N, P) = tuple(weight_packed.shape[:-2]), tuple(weight_packed.shape[-2:])
    K = 8 * P if cols is None else int(cols)
    if cols is not None and (K + 7) // 8 != P:
        raise ValueError(f"{name}: weight_shape says {K} columns, which pack into "
                         f"{(K + 7) // 8} int32 per row, but weight_packed has {P}")
    if group_size is None:
        G = weight_scale.shape[-1] if weight_scale.dim() else 0
        if G <= 0 or K % G:
            raise ValueError(f"{name}: weight_scale has {G} groups per row, which do not divide "
                             f"K ({K})")
        group_size = K // G
    spec = rawint4_spec(group_size)  # a valid group size (positive multiple of 16)
    if K % group_size:
        raise ValueError(f"{name}: K ({K}) must be divisible by group_size ({group_size})")
    G = K // group_size
    if weight_scale.dtype not in _SCALE_DTYPES:
        raise ValueError(f"{name}: weight_scale must be bfloat16, float16 or float32, "
                         f"got {weight_scale.dtype}")
    if tuple(weight_scale.shape) != lead + (N, G):
        raise ValueError(f"{name}: weight_scale shape mismatch: expected {lead + (N, G)} "
                         f"(one scale per {group_size} columns), got {tuple(weight_scale.shape)}; "
                         "a weight_zero_point (asymmetric) or another group size is not RAWINT4")
    q = _cpu(weight_packed).contiguous().view(torch.uint8)  # [..., N, 4P] = [..., N, K/2]
    scale = _cpu(weight_scale).to(torch.float32).contiguous()  # exact for bf16/fp16/fp32
    _check_scales(scale, name, lead, N)
    assert tuple(q.shape) == lead + spec.part_shapes(N, K)["qweight"][0]
    return {"qweight": q, "scale": scale}


def pack_rawint4(int_values: torch.Tensor, scales: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The compressed-tensors encoding, written from its definition (for
    tests and for making RAWINT4 tensors): ``int_values`` signed int in
    [-8, 7] ``[..., N, K]`` -> ``(weight_packed int32 [..., N, ceil(K/8)],
    weight_scale)``; u = v + 8 goes to bits 4j..4j+3 of int32 i for column
    8i + j, padding columns hold u = 0 (compressed-tensors pads after the
    offset).  ``scales`` is returned unchanged."""
    v = int_values.to(torch.int64)
    if v.numel() and (int(v.min()) < -8 or int(v.max()) > 7):
        raise ValueError("int_values must be in [-8, 7]")
    u = v + 8
    K = u.shape[-1]
    pad = (-K) % 8
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))  # zeros after the offset
    u = u.reshape(*u.shape[:-1], -1, 8)
    packed = torch.zeros(u.shape[:-1], dtype=torch.int64)
    for j in range(8):
        packed |= u[..., j] << (4 * j)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)  # uint32 bits as int32
    return packed.to(torch.int32), scales


# -------------------------------------------------------------------- FP8


def fp8_to_parts(weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                 block: Tuple[int, int] = FP8_BLOCK, *, name: str = "weight") -> Dict[str, torch.Tensor]:
    """DeepSeek block-scaled FP8 -> ``fp8_e4m3`` parts.

    ``weight``: float8_e4m3fn (or its uint8 codes) ``[E, N, K]`` / ``[N, K]``;
    ``weight_scale_inv``: fp32 (bf16/fp16 accepted) ``[E, ceil(N/bn),
    ceil(K/bk)]`` / 2-D, ``block = (bn, bk)``.  K must be a multiple of bk.
    Returns ``{"qweight": uint8 [..., N, K] (a view of weight when it is a
    contiguous CPU tensor), "scale": fp32 [..., N, K/bk]}`` for
    ``fp8_spec(bk)``; ``scale[n, g] = weight_scale_inv[n // bn, g]``.
    NaN codes (0x7F, 0xFF) raise ValueError."""
    _require_little_endian()
    bn, bk = (int(b) for b in block)
    if bn <= 0:
        raise ValueError(f"{name}: block rows must be positive, got {bn}")
    spec = fp8_spec(bk)
    if not isinstance(weight, torch.Tensor) or not isinstance(weight_scale_inv, torch.Tensor):
        raise TypeError(f"{name}: weight and weight_scale_inv must be torch.Tensors")
    if weight.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise ValueError(f"{name}: weight must be float8_e4m3fn, got {weight.dtype}")
    if weight.dim() not in (2, 3):
        raise ValueError(f"{name}: weight must be [N, K] or [E, N, K], got {tuple(weight.shape)}")
    lead, (N, K) = tuple(weight.shape[:-2]), tuple(weight.shape[-2:])
    if K % bk:
        raise ValueError(f"{name}: K ({K}) must be a multiple of the FP8 block width {bk} "
                         "(the scale of a column group must not change inside a ktmoe group)")
    G = K // bk
    want = lead + ((N + bn - 1) // bn, G)
    if weight_scale_inv.dtype not in _SCALE_DTYPES:
        raise ValueError(f"{name}: weight_scale_inv must be float32, got {weight_scale_inv.dtype}")
    if tuple(weight_scale_inv.shape) != want:
        raise ValueError(f"{name}: weight_scale_inv shape mismatch: expected {want} "
                         f"(blocks of {bn}x{bk}), got {tuple(weight_scale_inv.shape)}")
    q = _cpu(weight).contiguous().view(torch.uint8)
    flat = q.view(-1, K) if q.numel() else q.reshape(0, K)
    for r0, r1 in _row_chunks(flat.shape[0], K):
        low = flat[r0:r1] & 0x7F
        bad = low == 0x7F
        if bool(bad.any()):
            r, c = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}: NaN FP8 code 0x{int(flat[r0 + r, c]):02X} at "
                             f"{_where(lead, r0 + r, N)}, column {c}")
    s = _cpu(weight_scale_inv).to(torch.float32)
    _check_scales(s, name + " (weight_scale_inv)", lead, (N + bn - 1) // bn)
    scale = s.repeat_interleave(bn, dim=-2)[..., :N, :].contiguous()
    assert tuple(q.shape) == lead + spec.part_shapes(N, K)["qweight"][0]
    return {"qweight": q, "scale": scale}


# ------------------------------------------------------------------ MXFP4


def mxfp4_to_parts(blocks: torch.Tensor, scales: torch.Tensor, *,
                   name: str = "weight") -> Dict[str, torch.Tensor]:
    """OCP MX FP4 as GPT-OSS checkpoints hold it -> ``mxfp4`` parts.

    ``blocks``: uint8 ``[E, N, K/32, 16]`` (or ``[E, N, K/2]``, or without
    E): two FP4 E2M1 codes a byte, the low nibble first (column 2i);
    ``scales``: uint8 E8M0 ``[E, N, K/32]``, value ``2^(s - 127)``.  Returns
    ``{"qweight": uint8 [..., N, K/2] (a view of blocks when it is a
    contiguous CPU tensor), "scale": fp32 [..., N, K/32]}`` for
    ``mxfp4_spec()``; exact.  The E8M0 NaN byte 255 raises ValueError."""
    if not isinstance(blocks, torch.Tensor) or not isinstance(scales, torch.Tensor):
        raise TypeError(f"{name}: blocks and scales must be torch.Tensors")
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"{name}: blocks and scales must be uint8 (packed FP4 codes, E8M0 exponents), "
                         f"got {blocks.dtype} and {scales.dtype}")
    gs = MXFP4_GROUP_SIZE
    if blocks.dim() >= 3 and blocks.shape[-1] == gs // 2 and blocks.dim() == scales.dim() + 1:
        blocks = _cpu(blocks).contiguous()
        blocks = blocks.view(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1])
    if blocks.dim() not in (2, 3) or blocks.dim() != scales.dim():
        raise ValueError(f"{name}: blocks must be [E, N, K/32, 16] or [E, N, K/2] (or 2-D) and scales "
                         f"[E, N, K/32], got {tuple(blocks.shape)} and {tuple(scales.shape)}")
    lead, N, K = tuple(blocks.shape[:-2]), blocks.shape[-2], 2 * blocks.shape[-1]
    if K % gs or tuple(scales.shape) != lead + (N, K // gs):
        raise ValueError(f"{name}: scales shape mismatch: expected {lead + (N, K // gs)} for blocks "
                         f"{tuple(blocks.shape)} (one scale per 32 columns), got {tuple(scales.shape)}")
    s = _cpu(scales)
    bad = s == 255
    if bool(bad.any()):
        idx = int(bad.reshape(-1, s.shape[-1]).any(-1).nonzero()[0, 0])
        raise ValueError(f"{name}: scale of {_where(lead, idx, N)} is the E8M0 NaN (255)")
    scale = torch.ldexp(torch.ones(s.shape, dtype=torch.float32), s.to(torch.int32) - 127)
    return {"qweight": _cpu(blocks).contiguous(), "scale": scale}


def mxfp4_spec() -> QuantSpec:
    """The ktmoe format MXFP4 checkpoints map onto (exactly)."""
    return QuantSpec("MXFP4_SFT")


def split_interleaved(parts: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """A fused projection whose output rows alternate gate, up (GPT-OSS's
    ``gate_up_proj``: gate = rows 0::2, up = rows 1::2) -> (gate parts, up
    parts), each row-contiguous."""
    return ({k: v[..., 0::2, :].contiguous() for k, v in parts.items()},
            {k: v[..., 1::2, :].contiguous() for k, v in parts.items()})


# ------------------------------------------------------------ dispatching


def stack_parts(parts_per_expert: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Per-expert part dicts ``[N, ...]`` -> one dict ``[E, N, ...]`` (one
    copy of the packed bytes; nothing is dequantized)."""
    if not parts_per_expert:
        raise ValueError("stack_parts needs at least one expert")
    keys = tuple(parts_per_expert[0])
    for e, p in enumerate(parts_per_expert):
        if tuple(p) != keys:
            raise ValueError(f"expert {e} has parts {sorted(p)}, expert 0 has {sorted(keys)}")
    return {k: torch.stack([p[k] for p in parts_per_expert]) for k in keys}


def checkpoint_to_parts(method: str, tensors, *, group_size: Optional[int] = None,
                        name: str = "weight") -> Tuple[QuantSpec, Dict[str, torch.Tensor]]:
    """One projection's checkpoint tensors -> ``(spec, parts)``.

    ``tensors``: a dict keyed by the checkpoint's suffixes, stacked over
    experts, or a list of such dicts (one per expert, stacked here):

    - ``method="RAWINT4"``: ``weight_packed``, ``weight_scale``, optional
      ``weight_shape`` ([N, K] of one expert); ``group_size`` default: read
      from the scale's shape (K / groups; 32 for Kimi-K2).
    - ``method="FP8"`` (or ``"AMXFP8_SFT"``): ``weight``,
      ``weight_scale_inv``; ``group_size`` is the block width (default 128;
      blocks are square).
    - ``method="MXFP4"`` (or ``"MXFP4_SFT"``): ``blocks``, ``scales`` (GPT-OSS's
      ``*_blocks`` / ``*_scales``); groups of 32.
    """
    if isinstance(tensors, (list, tuple)):
        specs_parts = [checkpoint_to_parts(method, t, group_size=group_size, name=f"{name}[{e}]")
                       for e, t in enumerate(tensors)]
        if not specs_parts:
            raise ValueError(f"{name}: no experts given")
        return specs_parts[0][0], stack_parts([p for _, p in specs_parts])
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{name}: tensors must be a dict of checkpoint tensors or a list of them")
    if method not in _CHECKPOINT_METHODS:
        raise ValueError(f"checkpoint_to_parts: unknown method {method!r} "
                         f"({', '.join(sorted(_CHECKPOINT_METHODS))}; LLAMAFILE reads .gguf files "
                         "with ktmoe.gguf)")
    method = _CHECKPOINT_METHODS[method]

    def need(*keys):
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"{name}: {method} checkpoint tensors lack {missing} "
                             f"(got {sorted(tensors)})")

    if method == "RAWINT4":
        need("weight_packed", "weight_scale")
        if "weight_zero_point" in tensors:
            raise ValueError(f"{name}: weight_zero_point present: asymmetric int4 is not RAWINT4 "
                             "(symmetric, scale only)")
        cols = None
        if "weight_shape" in tensors:
            shape = torch.as_tensor(tensors["weight_shape"]).reshape(-1, 2)
            if bool((shape != shape[0]).any()):
                raise ValueError(f"{name}: experts have different weight_shape values")
            rows, cols = int(shape[0, 0]), int(shape[0, 1])
            if rows != tensors["weight_packed"].shape[-2]:
                raise ValueError(f"{name}: weight_shape says {rows} rows, weight_packed has "
                                 f"{tensors['weight_packed'].shape[-2]}")
        parts = rawint4_to_parts(tensors["weight_packed"], tensors["weight_scale"], cols=cols,
                                 group_size=group_size, name=name)
        K = cols if cols is not None else 8 * tensors["weight_packed"].shape[-1]
        return rawint4_spec(K // parts["scale"].shape[-1]), parts
    if method == "FP8":
        need("weight", "weight_scale_inv")
        bk = FP8_BLOCK[1] if group_size is None else group_size
        return fp8_spec(bk), fp8_to_parts(tensors["weight"], tensors["weight_scale_inv"],
                                          (bk, bk), name=name)
    need("blocks", "scales")
    return mxfp4_spec(), mxfp4_to_parts(tensors["blocks"], tensors["scales"], name=name)


__all__ = ["RAWINT4_GROUP_SIZE", "FP8_BLOCK", "rawint4_spec", "fp8_spec", "rawint4_to_parts",
           "pack_rawint4", "fp8_to_parts", "MXFP4_GROUP_SIZE", "mxfp4_spec", "mxfp4_to_parts",
           "split_interleaved", "stack_parts", "checkpoint_to_parts"]
