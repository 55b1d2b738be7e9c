"""Plain-PyTorch reference of the quantization rules of docs/quant_formats.md.

Independent of libktmoe: it re-implements the rules in fp32 torch ops (the
same IEEE operations, round half to even), so the C quantizer must agree
with it bit for bit.  Returns the same parts as ``ktmoe.quant.quantize``.
"""

from __future__ import annotations

from typing import Dict

import torch


def _groups(w: torch.Tensor, gs: int) -> torch.Tensor:
    """[..., K] -> [..., G, gs]"""
    K = w.shape[-1]
    return w.reshape(*w.shape[:-1], K // gs, gs)


def _pack4(u: torch.Tensor) -> torch.Tensor:
    """codes [..., K] in 0..15 -> uint8 [..., ceil(K/2)], low nibble first."""
    K = u.shape[-1]
    if K % 2:
        u = torch.cat([u, torch.zeros_like(u[..., :1])], dim=-1)
    u = u.to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def quantize_reference(w: torch.Tensor, fmt: str, group_size: int) -> Dict[str, torch.Tensor]:
    """Quantize ``w [..., N, K]`` (bf16/fp32) to ``fmt``; per-row formats
    ignore ``group_size``."""
    x = w.to(torch.float32)
    if fmt == "bf16":
        return {"qweight": w.to(torch.bfloat16).contiguous()}
    K = x.shape[-1]
    gs = group_size if fmt in ("int4_kgroup", "int4_kgroup_zp", "int4_1_kgroup") else K
    xg = _groups(x, gs)  # [..., N, G, gs]
    lo = xg.amin(-1, keepdim=True)
    hi = xg.amax(-1, keepdim=True)
    # the element of largest magnitude, first one on ties
    idx = xg.abs().argmax(-1, keepdim=True)
    big = torch.gather(xg, -1, idx)
    one = torch.ones((), dtype=torch.float32)
    if fmt == "fp8_e4m3":
        gs = group_size
        xg = _groups(x, gs)
        big = torch.gather(xg, -1, xg.abs().argmax(-1, keepdim=True))
        s = big.abs() / 448.0
        safe = torch.where(s != 0, s, one)
        v = torch.where(s != 0, (xg / safe).clamp(-448, 448), torch.zeros_like(xg))
        q = v.to(torch.float8_e4m3fn).view(torch.uint8)
        return {"qweight": q.reshape(x.shape).contiguous(), "scale": s.squeeze(-1)}
    if fmt == "mxfp4":
        xg = _groups(x, 32)
        amax = xg.abs().amax(-1, keepdim=True)
        _, E = torch.frexp(amax)  # amax = m 2^E, m in [0.5, 1)
        e = torch.where(amax > 0, (E - 3).clamp(-127, 127), torch.full_like(E, -127))
        s = torch.ldexp(torch.ones_like(amax), e)
        v = xg / s
        # the nearest of the 16 E2M1 values; among equally near ones an even
        # code, and +0 (code 0) rather than -0 (code 8)
        grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        grid = torch.cat([grid, -grid])
        dist = (v.unsqueeze(-1) - grid).abs()
        code = torch.arange(16)
        near = dist == dist.amin(-1, keepdim=True)
        rank = (code % 2) * 2 + (code == 8)
        u = torch.where(near, rank, torch.full_like(rank, 99)).argmin(-1)
        return {"qweight": _pack4(u.reshape(x.shape)), "scale": s.squeeze(-1)}
    if fmt in ("int8", "int8_kgroup"):
        if fmt == "int8_kgroup":
            xg = _groups(x, group_size)
            big = torch.gather(xg, -1, xg.abs().argmax(-1, keepdim=True))
        s = big.abs() / 127.0
        safe = torch.where(s != 0, s, one)
        q = torch.where(s != 0, torch.round(xg / safe).clamp(-127, 127), torch.zeros_like(xg))
        return {"qweight": q.reshape(x.shape).to(torch.int8), "scale": s.squeeze(-1)}
    if fmt in ("int4", "int4_kgroup"):
        s = big / -8.0
        safe = torch.where(s != 0, s, one)
        u = torch.where(s != 0, (torch.round(xg / safe) + 8).clamp(0, 15), torch.full_like(xg, 8))
        return {"qweight": _pack4(u.reshape(x.shape)), "scale": s.squeeze(-1)}
    if fmt in ("int4_1", "int4_1_kgroup"):
        s = (hi - lo) / 15.0
        safe = torch.where(s != 0, s, one)
        u = torch.where(s != 0, torch.round((xg - lo) / safe).clamp(0, 15), torch.zeros_like(xg))
        return {"qweight": _pack4(u.reshape(x.shape)), "scale": s.squeeze(-1), "min": lo.squeeze(-1)}
    if fmt == "int4_kgroup_zp":
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
        s = (hi - lo) / 15.0
        safe = torch.where(s != 0, s, one)
        z = torch.where(s != 0, torch.round(-lo / safe).clamp(0, 15), torch.zeros_like(s))
        u = torch.where(s != 0, (torch.round(xg / safe) + z).clamp(0, 15), torch.zeros_like(xg))
        return {"qweight": _pack4(u.reshape(x.shape)), "scale": s.squeeze(-1),
                "zero": z.squeeze(-1).to(torch.uint8)}
    raise ValueError(f"unknown format {fmt!r}")
