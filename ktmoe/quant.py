"""Numeric formats of the frozen expert weights, and their packed layout.

Every SFT method stores each projection matrix ``W [N, K]`` (N output rows,
K the reduction dimension) of every expert as a few "parts":

============== ============================ ===================================
format         parts                        dequantized value of W[n, k]
============== ============================ ===================================
bf16           qweight bf16 [N, K]          qweight[n, k]
int8           qweight int8 [N, K],         qweight[n, k] * scale[n, 0]
               scale f32 [N, 1]
int4           qweight uint8 [N, ceil(K/2)] (u - 8) * scale[n, 0]
               scale f32 [N, 1]
int4_1         qweight, scale, min f32      u * scale[n, 0] + min[n, 0]
               [N, 1]
int4_kgroup    qweight, scale f32 [N, G]    (u - 8) * scale[n, g]
int4_kgroup_zp qweight, scale f32 [N, G],   (u - zero[n, g]) * scale[n, g]
               zero uint8 [N, G]
int4_1_kgroup  qweight, scale, min f32      u * scale[n, g] + min[n, g]
               [N, G]
int8_kgroup    qweight int8 [N, K],         qweight[n, k] * scale[n, g]
               scale f32 [N, G]
fp8_e4m3       qweight uint8 [N, K] (FP8    e4m3(qweight[n, k]) * scale[n, g]
               E4M3 codes), scale [N, G]
mxfp4          qweight uint8 [N, ceil(K/2)] e2m1(u) * scale[n, g]
               (FP4 E2M1 codes), scale f32
               [N, K/32] (powers of two)
============== ============================ ===================================

``u`` is the 4-bit code of element k: the low nibble (bits 0-3) of byte
``k // 2`` for even k, the high nibble for odd k; with odd K the last high
nibble of a row is padding (0).  ``g = k // group_size`` and
``G = K // group_size``; the K-group formats need ``K % group_size == 0``.
``e2m1(u)``: OCP MX FP4, bit 3 of u the sign, magnitudes (u & 7) -> 0, 0.5,
1, 1.5, 2, 3, 4, 6; its groups are always 32 columns (an MX checkpoint's
E8M0 scale byte b is the float 2^(b - 127)).
``docs/quant_formats.md`` gives the quantization rules.

:func:`quantize` runs libktmoe's quantizer (the same code that
``load_weights_from_tensors`` uses); :func:`dequantize` is an independent,
plain-PyTorch reading of the table above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

#: SFT method name -> format name (``int4_kgroup`` becomes ``int4_kgroup_zp``
#: with ``zero_point=True``).
METHOD_FORMATS = {
    "AMXBF16_SFT": "bf16",
    "AMXINT8_SFT": "int8",
    "AMXINT4_SFT": "int4",
    "AMXINT4_1_SFT": "int4_1",
    "AMXINT4_KGroup_SFT": "int4_kgroup",
    "AMXINT4_1KGroup_SFT": "int4_1_kgroup",
    "AMXFP8_SFT": "fp8_e4m3",
    "MXFP4_SFT": "mxfp4",
}

#: formats that no SFT method name selects (yet): the inference loaders
#: (FP8 checkpoints, GGUF Q8_0/Q6_K) name them by these keys
EXTRA_FORMATS = {"INT8_KGROUP": "int8_kgroup", "FP8": "fp8_e4m3"}

#: format name -> libktmoe ``ktmoe_method`` value
FORMAT_CODES = {
    "bf16": 0, "int8": 1, "int4": 2, "int4_1": 3, "int4_kgroup": 4, "int4_kgroup_zp": 4,
    "int4_1_kgroup": 5, "int8_kgroup": 6, "fp8_e4m3": 7, "mxfp4": 8,
}

FORMATS = ("bf16", "int8", "int4", "int4_1", "int4_kgroup", "int4_kgroup_zp", "int4_1_kgroup",
           "int8_kgroup", "fp8_e4m3", "mxfp4")
KGROUP_FORMATS = ("int4_kgroup", "int4_kgroup_zp", "int4_1_kgroup", "int8_kgroup", "fp8_e4m3",
                  "mxfp4")
#: formats whose group size is fixed (group_size is ignored for them)
FIXED_GROUP_SIZE = {"mxfp4": 32}
#: FP4 E2M1 magnitudes of the codes 0..7 (bit 3 is the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FORMAT_OF = {**METHOD_FORMATS, **EXTRA_FORMATS}
INT4_FORMATS = ("int4", "int4_1") + KGROUP_FORMATS
#: smallest group size, and the multiple every group size must be
GROUP_SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class QuantSpec:
    """A numeric format: the SFT method (or an EXTRA_FORMATS key) plus its
    K-group options.

    ``group_size`` and ``zero_point`` matter only for the K-group methods
    (``AMXINT4_KGroup_SFT``: zero_point selects an integer zero point per
    group instead of the fixed offset 8; ``AMXINT4_1KGroup_SFT`` always stores
    a float min per group, so zero_point has no effect there).  ``MXFP4_SFT``
    always has groups of 32 (the MX format's): its group_size is set to 32."""

    method: str
    group_size: int = 128
    zero_point: bool = True

    def __post_init__(self):
        if self.method not in _FORMAT_OF:
            raise ValueError(f"Unsupported method: {self.method}. "
                             f"Supported methods: {sorted(METHOD_FORMATS)}")
        fixed = FIXED_GROUP_SIZE.get(_FORMAT_OF[self.method])
        if fixed is not None:
            object.__setattr__(self, "group_size", fixed)
        if self.kgroup:
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, int):
                raise TypeError(f"group_size must be an int, got {type(gs).__name__}")
            if gs <= 0 or gs % GROUP_SIZE_MULTIPLE:
                raise ValueError(f"group_size must be a positive multiple of {GROUP_SIZE_MULTIPLE}, "
                                 f"got {gs}")

    @property
    def format(self) -> str:
        f = _FORMAT_OF[self.method]
        if f == "int4_kgroup" and self.zero_point:
            return "int4_kgroup_zp"
        return f

    @property
    def kgroup(self) -> bool:
        return _FORMAT_OF[self.method] in KGROUP_FORMATS

    @property
    def code(self) -> int:
        return FORMAT_CODES[self.format]

    @property
    def parts(self) -> Tuple[str, ...]:
        f = self.format
        if f == "bf16":
            return ("qweight",)
        if f in ("int4_1", "int4_1_kgroup"):
            return ("qweight", "scale", "min")
        if f == "int4_kgroup_zp":
            return ("qweight", "scale", "zero")
        return ("qweight", "scale")

    def groups(self, cols: int) -> int:
        """Groups per row of a matrix with ``cols`` columns."""
        return cols // self.group_size if self.kgroup else 1

    def check_cols(self, cols: int, what: str = "K") -> None:
        """The K % group_size rule, with the error message users see."""
        if self.kgroup and cols % self.group_size:
            raise ValueError(
                f"{self.method}: {what} ({cols}) must be divisible by group_size "
                f"({self.group_size})")

    def part_shapes(self, rows: int, cols: int) -> Dict[str, Tuple[Tuple[int, int], torch.dtype]]:
        """Shape and dtype of each part of one [rows, cols] matrix."""
        f = self.format
        G = self.groups(cols)
        if f == "bf16":
            return {"qweight": ((rows, cols), torch.bfloat16)}
        if f in ("int8", "int8_kgroup"):
            out = {"qweight": ((rows, cols), torch.int8)}
        elif f == "fp8_e4m3":
            out = {"qweight": ((rows, cols), torch.uint8)}
        else:
            out = {"qweight": ((rows, (cols + 1) // 2), torch.uint8)}
        out["scale"] = ((rows, G), torch.float32)
        if "min" in self.parts:
            out["min"] = ((rows, G), torch.float32)
        if "zero" in self.parts:
            out["zero"] = ((rows, G), torch.uint8)
        return out

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes of one packed [rows, cols] matrix (all parts)."""
        total = 0
        for shape, dt in self.part_shapes(rows, cols).values():
            total += shape[0] * shape[1] * torch.empty((), dtype=dt).element_size()
        return total


def spec_for(method: str, group_size: int = 128, zero_point: bool = True) -> QuantSpec:
    return QuantSpec(method, group_size, bool(zero_point))


def quantize(weight: torch.Tensor, spec: QuantSpec) -> Dict[str, torch.Tensor]:
    """Pack ``weight [..., N, K]`` (bf16 or fp32, CPU) into ``spec``'s parts,
    each shaped ``[..., *part_shape]``.  Runs libktmoe's quantizer, the code
    ``load_weights_from_tensors`` runs, so the result is bit-identical to what
    a layer holds after loading the same tensor."""
    from ._lib import check, ffi, lib, ptr
    from ._validate import c_dtype

    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims [..., N, K], got {tuple(weight.shape)}")
    if weight.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"weight must be bfloat16 or float32, got {weight.dtype}")
    lead, (N, K) = tuple(weight.shape[:-2]), tuple(weight.shape[-2:])
    spec.check_cols(K)
    w = weight.detach().to("cpu").contiguous()
    rows = w.numel() // K if K else 0
    parts = {name: torch.empty(lead + shape, dtype=dt)
             for name, (shape, dt) in spec.part_shapes(N, K).items()}
    if rows == 0 or K == 0:
        return parts
    null = ffi.NULL
    aux = parts.get("min", parts.get("zero"))
    check(lib.ktmoe_quantize(
        spec.code, spec.group_size if spec.kgroup else 0, int(spec.format == "int4_kgroup_zp"),
        c_dtype(w), ptr(w), rows, K, ptr(parts["qweight"]),
        ptr(parts["scale"], "float *") if "scale" in parts else null,
        ptr(aux) if aux is not None else null))
    return parts


def unpack_int4(qweight: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [..., ceil(K/2)] -> codes int16 [..., K] in 0..15."""
    q = qweight.to(torch.int16)
    codes = torch.stack([q & 0xF, q >> 4], dim=-1).flatten(-2)
    return codes[..., :cols]


def dequantize(parts: Dict[str, torch.Tensor], spec: QuantSpec, cols: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights ``[..., N, K]`` that the packed ``parts`` stand for, in
    ``dtype`` (float32 and float64 hold every dequantized value the kernels
    use: a product of a small integer and an fp32 scale, plus an fp32 min)."""
    f = spec.format
    q = parts["qweight"]
    if f == "bf16":
        return q.to(dtype)
    if f in ("int8", "int8_kgroup"):
        codes = q.to(torch.int16)
    elif f == "fp8_e4m3":
        codes = q.view(torch.float8_e4m3fn)
    elif f == "mxfp4":
        u = unpack_int4(q, cols).long()
        mag = torch.tensor(E2M1_VALUES, dtype=dtype)[u & 7]
        codes = torch.where((u & 8) != 0, -mag, mag)
    else:
        codes = unpack_int4(q, cols)
    G = spec.groups(cols)
    gs = cols // G if G else 1

    def per_col(t):  # [..., N, G] -> [..., N, K]
        return t.to(dtype).repeat_interleave(gs, dim=-1)

    scale = per_col(parts["scale"])
    c = codes.to(dtype)
    if f in ("int4", "int4_kgroup"):
        return (c - 8) * scale
    if f == "int4_kgroup_zp":
        return (c - per_col(parts["zero"])) * scale
    if f in ("int4_1", "int4_1_kgroup"):
        return c * scale + per_col(parts["min"])
    return c * scale  # int8, int8_kgroup, fp8_e4m3, mxfp4


__all__ = ["QuantSpec", "METHOD_FORMATS", "FORMATS", "spec_for", "quantize", "dequantize",
           "unpack_int4"]
