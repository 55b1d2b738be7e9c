"""RAWINT4 (compressed-tensors pack-quantized int4) and FP8 (DeepSeek block
FP8) checkpoint tensors -> ktmoe packed parts (ktmoe.loaders).

Both conversions are exact re-layouts: the packed parts must dequantize to
exactly (max abs difference 0) the values the source format defines, computed
here independently from the format's own definition:

* RAWINT4: compressed-tensors ``unpack_from_int32`` (bits 4i..4i+3 of int32 g
  hold column 8g + i, stored as v + 8), value ``v * scale``;
* FP8: ``float(weight) * weight_scale_inv[n // 128, k // 128]`` in fp32.

Then each format runs through a whole layer (NativeLayer.load_packed +
forward) against the float64 reference on the dequantized weights
(relative error < 2e-5: fp32 accumulation only).
"""

from __future__ import annotations

import gc

import pytest
import torch
from reference import moe_sft_reference, rel_err

ktmoe = pytest.importorskip("ktmoe")

from ktmoe import loaders  # noqa: E402  (a failure here is a failure, not a skip)
from ktmoe.quant import QuantSpec, dequantize  # noqa: E402

KERNEL_TOL = 2e-5  # fp32 accumulation against float64 (as tests/test_quant_sft.py)


# ---------------------------------------------------------------- helpers


def unpack_from_int32_reference(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """compressed-tensors' unpack_from_int32(value, 4, shape) (packed_dim=1):
    for i in 0..7, unpacked[:, i::8] = (value >> 4i) & 15; minus 8."""
    rows = packed.shape[:-1]
    out = torch.zeros(*rows, packed.shape[-1] * 8, dtype=torch.int32)
    for i in range(8):
        out[..., i::8] = (packed >> (4 * i)) & 0xF
    return (out[..., :cols] - 8).to(torch.int8)


def expand_blocks(s: torch.Tensor, bn: int, bk: int, N: int, K: int) -> torch.Tensor:
    return s.repeat_interleave(bn, -2)[..., :N, :].repeat_interleave(bk, -1)[..., :K]


def random_fp8(shape, gen) -> torch.Tensor:
    """Random valid E4M3 codes (NaN codes 0x7F / 0xFF replaced)."""
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    codes[(codes & 0x7F) == 0x7F] = 0x3C
    return codes.view(torch.float8_e4m3fn)


def run_layer(specs, parts, E, H, I, tier, k=2, q=16, seed=0):
    """NativeLayer forward of packed parts; returns (x, ids, wts, out)."""
    from ktmoe._native import NativeLayer

    cpu = ktmoe.CPUInfer.get(2, 1)
    layer = NativeLayer(cpu, num_experts=E, experts_per_token=k, hidden_size=H,
                        intermediate_size=I, specs=specs, isa=tier)
    layer.load_packed(layer.check_packed(*parts), None, E)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(q, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(q)])
    wts = torch.rand(q, k, generator=g)
    out = torch.empty(q, H)
    layer.submit_forward(x, ids, wts, out)
    cpu.sync()
    layer.close()
    del layer, cpu
    gc.collect()
    return x, ids, wts, out


def check_layer(specs, parts, E, H, I, tier):
    x, ids, wts, out = run_layer(specs, parts, E, H, I, tier)
    dq = [dequantize(p, s, K) for p, s, K in zip(parts, specs, (H, H, I))]
    ref = moe_sft_reference(x, ids, wts, *dq, None, 1.0)
    err = rel_err(out, ref)
    assert err < KERNEL_TOL, err
    assert ref.abs().max() > 0


# ---------------------------------------------------------------- RAWINT4


def test_pack_rawint4_matches_compressed_tensors_definition():
    # v = -8..-1 -> u = 0..7 in nibbles 0..7: 0x76543210; v = 0..7 -> u = 8..15
    v = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7]], dtype=torch.int8)
    packed, _ = loaders.pack_rawint4(v, None)
    assert packed.dtype == torch.int32
    assert packed[0, 0].item() == 0x76543210
    assert packed[0, 1].item() == 0xFEDCBA98 - 2 ** 32  # as int32 bits
    assert torch.equal(unpack_from_int32_reference(packed, 16), v)
    # padding: K = 12 -> 2 int32, columns 12..15 hold u = 0
    p12, _ = loaders.pack_rawint4(v[:, :12], None)
    assert p12.shape == (1, 2) and (p12[0, 1].item() >> 16) == 0


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "one_expert"])
def test_rawint4_exact(scale_dtype, stacked):
    g = torch.Generator().manual_seed(1)
    E, N, K = 3, 10, 128
    v = torch.randint(-8, 8, (E, N, K), dtype=torch.int8, generator=g)
    s = (torch.rand(E, N, K // 32, generator=g) * 0.02 + 1e-3).to(scale_dtype)
    s[0, 0, 0] = -s[0, 0, 0]  # a negative scale is just a scale
    packed, scale = loaders.pack_rawint4(v, s)
    if not stacked:
        v, s, packed, scale = v[1], s[1], packed[1], scale[1]
    parts = loaders.rawint4_to_parts(packed, scale)
    spec = loaders.rawint4_spec()
    assert spec == QuantSpec("AMXINT4_KGroup_SFT", 32, zero_point=False)
    assert parts["qweight"].data_ptr() == packed.data_ptr()  # a view: no copy
    assert parts["scale"].dtype == torch.float32
    # the reference: compressed-tensors' unpacking and v * scale (fp32)
    v_ref = unpack_from_int32_reference(packed, K)
    assert torch.equal(v_ref, v)
    want = v_ref.to(torch.float32) * s.to(torch.float32).repeat_interleave(32, -1)
    got = dequantize(parts, spec, K)
    assert (got - want).abs().max().item() == 0.0
    # and in float64: the fp32 product is itself exact for bf16/fp16 scales
    if scale_dtype != torch.float32:
        assert torch.equal(dequantize(parts, spec, K, torch.float64),
                           v.to(torch.float64) * s.to(torch.float64).repeat_interleave(32, -1))


def test_rawint4_other_group_size_and_cols():
    g = torch.Generator().manual_seed(2)
    v = torch.randint(-8, 8, (2, 4, 256), dtype=torch.int8, generator=g)
    s = torch.rand(2, 4, 2, generator=g).to(torch.bfloat16)
    packed, _ = loaders.pack_rawint4(v, s)
    parts = loaders.rawint4_to_parts(packed, s, cols=256, group_size=128)
    want = v.float() * s.float().repeat_interleave(128, -1)
    assert torch.equal(dequantize(parts, loaders.rawint4_spec(128), 256), want)
    # group_size=None reads it from the scale's shape; so does checkpoint_to_parts
    inferred = loaders.rawint4_to_parts(packed, s, group_size=None)
    assert torch.equal(inferred["scale"], parts["scale"])
    spec, _ = loaders.checkpoint_to_parts("RAWINT4", {"weight_packed": packed, "weight_scale": s})
    assert spec == loaders.rawint4_spec(128)
    with pytest.raises(ValueError, match="3 groups per row, which do not divide K"):
        loaders.rawint4_to_parts(packed, torch.ones(2, 4, 3), group_size=None)
    with pytest.raises(ValueError, match="positive multiple of 16"):
        loaders.rawint4_to_parts(packed, torch.ones(2, 4, 32), group_size=None)  # groups of 8


def test_rawint4_errors():
    v = torch.zeros(2, 4, 64, dtype=torch.int8)
    s = torch.ones(2, 4, 2, dtype=torch.bfloat16)
    packed, _ = loaders.pack_rawint4(v, s)
    with pytest.raises(ValueError, match="must be int32"):
        loaders.rawint4_to_parts(packed.to(torch.int64), s)
    with pytest.raises(ValueError, match="weight_scale shape mismatch"):
        loaders.rawint4_to_parts(packed, s[..., :1])
    with pytest.raises(ValueError, match="weight_shape says 100 columns"):
        loaders.rawint4_to_parts(packed, s, cols=100)
    with pytest.raises(ValueError, match=r"K \(48\) must be divisible by group_size \(32\)"):
        p48, _ = loaders.pack_rawint4(v[..., :48], None)
        loaders.rawint4_to_parts(p48, s[..., :1])
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        loaders.rawint4_to_parts(packed, s.to(torch.int32))
    bad = s.clone()
    bad[1, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="expert 1, row 2 is not finite"):
        loaders.rawint4_to_parts(packed, bad, name="gate_proj")
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        loaders.pack_rawint4(torch.full((1, 8), 8), None)
    with pytest.raises(ValueError, match="weight_zero_point"):
        loaders.checkpoint_to_parts("RAWINT4", {"weight_packed": packed, "weight_scale": s,
                                                "weight_zero_point": packed})


def test_checkpoint_to_parts_per_expert_lists():
    g = torch.Generator().manual_seed(3)
    E, N, K = 3, 8, 64
    v = torch.randint(-8, 8, (E, N, K), dtype=torch.int8, generator=g)
    s = torch.rand(E, N, 2, generator=g).to(torch.bfloat16)
    packed, _ = loaders.pack_rawint4(v, s)
    per_expert = [{"weight_packed": packed[e], "weight_scale": s[e],
                   "weight_shape": torch.tensor([N, K])} for e in range(E)]
    spec, parts = loaders.checkpoint_to_parts("RAWINT4", per_expert)
    spec2, parts2 = loaders.checkpoint_to_parts("RAWINT4", {"weight_packed": packed,
                                                            "weight_scale": s})
    assert spec == spec2 and all(torch.equal(parts[p], parts2[p]) for p in parts)
    assert parts["qweight"].shape == (E, N, K // 2)
    with pytest.raises(ValueError, match="lack"):
        loaders.checkpoint_to_parts("RAWINT4", {"weight_packed": packed})
    with pytest.raises(ValueError, match="weight_shape says 9 rows"):
        loaders.checkpoint_to_parts("RAWINT4", {"weight_packed": packed, "weight_scale": s,
                                                "weight_shape": torch.tensor([9, K])})
    with pytest.raises(ValueError, match="unknown method"):
        loaders.checkpoint_to_parts("AMXINT4", {})


def test_rawint4_layer(tier):
    E, H, I = 4, 64, 96
    g = torch.Generator().manual_seed(4)
    parts = []
    for N, K in ((I, H), (I, H), (H, I)):
        v = torch.randint(-8, 8, (E, N, K), dtype=torch.int8, generator=g)
        s = (torch.rand(E, N, K // 32, generator=g) * 0.5 + 0.5) / (4 * K ** 0.5)
        packed, s = loaders.pack_rawint4(v, s.to(torch.bfloat16))
        parts.append(loaders.rawint4_to_parts(packed, s))
    spec = loaders.rawint4_spec()
    check_layer((spec,) * 3, parts, E, H, I, tier)


# -------------------------------------------------------------------- FP8


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "one_expert"])
def test_fp8_exact(stacked):
    g = torch.Generator().manual_seed(5)
    E, N, K = 2, 200, 256  # N not a multiple of the 128-row block
    w = random_fp8((E, N, K), g)
    sinv = torch.rand(E, 2, 2, generator=g) * 1e-2 + 1e-4
    if not stacked:
        w, sinv = w[1], sinv[1]
    parts = loaders.fp8_to_parts(w, sinv)
    spec = loaders.fp8_spec()
    assert spec == QuantSpec("FP8", 128)
    assert parts["qweight"].data_ptr() == w.data_ptr()  # a view: no copy
    assert torch.equal(parts["qweight"], w.view(torch.uint8))
    assert parts["scale"].shape == w.shape[:-1] + (2,)
    want = w.to(torch.float32) * expand_blocks(sinv, 128, 128, N, K)
    got = dequantize(parts, spec, K)
    assert (got - want).abs().max().item() == 0.0


def test_fp8_other_block_and_dtypes():
    g = torch.Generator().manual_seed(6)
    w = random_fp8((3, 40, 64), g)
    sinv = (torch.rand(3, 3, 2, generator=g) + 0.5).to(torch.bfloat16)
    parts = loaders.fp8_to_parts(w.view(torch.uint8), sinv, block=(16, 32))
    want = w.to(torch.float32) * expand_blocks(sinv.float(), 16, 32, 40, 64)
    assert torch.equal(dequantize(parts, loaders.fp8_spec(32), 64), want)


def test_fp8_errors():
    g = torch.Generator().manual_seed(7)
    w = random_fp8((2, 130, 256), g)
    sinv = torch.ones(2, 2, 2)
    with pytest.raises(ValueError, match=r"K \(192\) must be a multiple of the FP8 block width 128"):
        loaders.fp8_to_parts(w[..., :192], sinv)
    with pytest.raises(ValueError, match="weight_scale_inv shape mismatch"):
        loaders.fp8_to_parts(w, sinv[:, :1])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        loaders.fp8_to_parts(w.to(torch.float32), sinv)
    for code in (0x7F, 0xFF):
        bad = w.view(torch.uint8).clone()
        bad[1, 129, 7] = code
        with pytest.raises(ValueError, match=f"NaN FP8 code 0x{code:02X} at expert 1, row 129, column 7"):
            loaders.fp8_to_parts(bad.view(torch.float8_e4m3fn), sinv, name="down_proj")
    s_bad = sinv.clone()
    s_bad[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        loaders.fp8_to_parts(w, s_bad)


def test_fp8_checkpoint_to_parts():
    g = torch.Generator().manual_seed(8)
    w = random_fp8((2, 128, 128), g)
    sinv = torch.rand(2, 1, 1, generator=g)
    spec, parts = loaders.checkpoint_to_parts(
        "FP8", [{"weight": w[e], "weight_scale_inv": sinv[e]} for e in range(2)])
    assert spec == loaders.fp8_spec()
    assert torch.equal(parts["qweight"], w.view(torch.uint8))
    assert torch.equal(parts["scale"], sinv.expand(2, 128, 1))


def test_fp8_layer(tier):
    E, H, I = 4, 256, 128
    g = torch.Generator().manual_seed(9)
    parts = []
    for N, K in ((I, H), (I, H), (H, I)):
        w = random_fp8((E, N, K), g)
        # |e4m3| <= 448; scale so weights are ~ 1/sqrt(K) (random codes are log-uniform)
        sinv = (torch.rand(E, (N + 127) // 128, K // 128, generator=g) + 0.5) * (0.02 / K ** 0.5)
        parts.append(loaders.fp8_to_parts(w, sinv))
    spec = loaders.fp8_spec()
    check_layer((spec,) * 3, parts, E, H, I, tier)
