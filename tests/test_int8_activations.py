"""The integer inference kernels: int8 activations (per block of 32) against
integer-format weights, in each activation layout (column order for int8
weights; per block, or per pair of blocks where K and the groups are
multiples of 64, for 4-bit weights).

The reference emulates the same activation quantization in PyTorch
(x and h are quantized exactly as docs/inference.md states), then runs the
layer in float64 on the dequantized weights: the kernels must agree within
fp32 rounding.  (h is computed in fp32 by the kernels; an element whose
h / d lands on a rounding tie in one and not the other moves by one code,
so the bound is 1e-3, not 1e-6; observed: 1e-7 typical, 2e-4 worst.)  A
second check bounds the error the activation quantization itself adds
against fp32 activations (observed ~1.2%)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

ktmoe = pytest.importorskip("ktmoe")

from ktmoe._native import NativeLayer  # noqa: E402
from ktmoe.quant import QuantSpec, dequantize, quantize  # noqa: E402
from reference import make_routing, rel_err  # noqa: E402

EMULATED_TOL = 1e-3
ACT_QUANT_TOL = 0.03

SPECS = [("AMXINT8_SFT", 128, True), ("AMXINT4_SFT", 128, True), ("AMXINT4_1_SFT", 128, True),
         ("AMXINT4_KGroup_SFT", 32, True), ("AMXINT4_KGroup_SFT", 64, False),
         ("AMXINT4_1KGroup_SFT", 32, True), ("AMXINT4_1KGroup_SFT", 64, True),
         ("AMXINT4_KGroup_SFT", 128, True), ("AMXINT4_1KGroup_SFT", 128, False),
         ("INT8_KGROUP", 32, True)]
SPEC_IDS = [f"{m}-g{g}-zp{int(z)}" for m, g, z in SPECS]


def quant_act(x: torch.Tensor) -> torch.Tensor:
    """The documented activation quantization, dequantized to float64."""
    xb = x.to(torch.float32).reshape(*x.shape[:-1], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.where(d > 0, torch.round(xb / safe).clamp(-127, 127), torch.zeros_like(xb))
    return (q.double() * d.double()).reshape(x.shape)


def reference(x, ids, wts, g, u, d, act_quant: bool):
    out = torch.zeros(x.shape[0], g.shape[2], dtype=torch.float64)
    xx = quant_act(x) if act_quant else x.double()
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gg, uu = g[e] @ xx[t], u[e] @ xx[t]
            h = F.silu(gg.float()) * uu.float()  # fp32, as the kernels compute it
            h = quant_act(h) if act_quant else h.double()
            out[t] += float(wts[t, j]) * (d[e] @ h)
    return out


def _weights(E, H, I, specs, seed):
    gen = torch.Generator().manual_seed(seed)
    src = [torch.randn(E, I, H, generator=gen) / math.sqrt(H),
           torch.randn(E, I, H, generator=gen) / math.sqrt(H),
           torch.randn(E, H, I, generator=gen) / math.sqrt(I)]
    parts = [quantize(t, s) for t, s in zip(src, specs)]
    deq = [dequantize(p, s, t.shape[-1], torch.float64) for p, s, t in zip(parts, specs, src)]
    return parts, deq


def _run(cpu, specs, parts, E, k, H, I, x, ids, wts, isa, int8_act=True):
    layer = NativeLayer(cpu, num_experts=E, experts_per_token=k, hidden_size=H,
                        intermediate_size=I, specs=specs, isa=isa)
    layer.load_packed(layer.check_packed(*parts), None, E)
    out = torch.empty(x.shape[0], H)
    layer.submit_forward(x, ids, wts, out, int8_activations=int8_act)
    cpu.sync()
    layer.close()
    return out


@pytest.fixture
def cpu_infer():
    from conftest import release_wrappers

    release_wrappers()
    yield ktmoe.CPUInfer.get(2, 1)
    release_wrappers()


@pytest.mark.parametrize("method,gs,zp", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("q", [1, 5, 40])
def test_integer_kernels_vs_emulated_reference(cpu_infer, tier, method, gs, zp, q):
    E, k, H, I = 8, 3, 128, 96
    spec = QuantSpec(method, gs, zp)
    if spec.kgroup and I % gs:
        I = 128
    if spec.kgroup and gs == 128:  # several groups a row (a tier may special-case 128)
        H, I = 384, 256
    parts, deq = _weights(E, H, I, (spec,) * 3, seed=q)
    ids, wts = make_routing(q, E, k, seed=q)
    x = torch.randn(q, H, generator=torch.Generator().manual_seed(q))
    out = _run(cpu_infer, (spec,) * 3, parts, E, k, H, I, x, ids, wts, tier)
    assert rel_err(out, reference(x, ids, wts, *deq, True)) < EMULATED_TOL
    err = rel_err(out, reference(x, ids, wts, *deq, False))
    assert 1e-4 < err < ACT_QUANT_TOL, err  # the activations really are int8


MIXED = {
    # GGUF Q4_K_M style: 4-bit gate/up, int8 down; groups of 32 (one block)
    "q4km-g32": (96, ("AMXINT4_1KGroup_SFT", 32), ("AMXINT4_1KGroup_SFT", 32), ("INT8_KGROUP", 32)),
    # 4-bit gate next to int8 up: x in column order for a 4-bit matrix;
    # K and groups multiples of 64 (two blocks a step where a tier can)
    "int4-int8-g64": (128, ("AMXINT4_SFT", 0), ("AMXINT8_SFT", 0), ("AMXINT4_KGroup_SFT", 64)),
}


@pytest.mark.parametrize("case", sorted(MIXED))
def test_mixed_formats_and_skipped_slots(cpu_infer, tier, case):
    """Per-projection formats and skipped expert slots."""
    H, *proj = MIXED[case]
    E, k, I, q = 8, 3, 64, 9
    specs = tuple(QuantSpec(name, gs) if gs else QuantSpec(name) for name, gs in proj)
    parts, deq = _weights(E, H, I, specs, seed=3)
    ids, wts = make_routing(q, E, k, seed=4)
    ids[::3, 1] = -1
    x = torch.randn(q, H, generator=torch.Generator().manual_seed(5))
    out = _run(cpu_infer, specs, parts, E, k, H, I, x, ids, wts, tier)
    assert rel_err(out, reference(x, ids, wts, *deq, True)) < EMULATED_TOL


@pytest.mark.parametrize("case", ["H-not-32", "fp8", "bf16"])
def test_falls_back_to_fp32_activations(cpu_infer, case):
    """Layers the integer kernels cannot run (H not a multiple of 32, FP8 or
    bf16 weights) give exactly the fp32-activation result."""
    E, k, H, I, q = 6, 2, 48, 64, 7
    spec = {"fp8": QuantSpec("FP8", 16), "bf16": QuantSpec("AMXBF16_SFT")}.get(
        case, QuantSpec("AMXINT8_SFT"))
    if case == "H-not-32":
        H = 40
    parts, deq = _weights(E, H, I, (spec,) * 3, seed=7)
    ids, wts = make_routing(q, E, k, seed=8)
    x = torch.randn(q, H, generator=torch.Generator().manual_seed(9))
    a = _run(cpu_infer, (spec,) * 3, parts, E, k, H, I, x, ids, wts, None, int8_act=True)
    b = _run(cpu_infer, (spec,) * 3, parts, E, k, H, I, x, ids, wts, None, int8_act=False)
    assert torch.equal(a, b)
    assert rel_err(a, reference(x, ids, wts, *deq, False)) < 2e-5


def test_tp2_matches_tp1():
    from conftest import release_wrappers

    E, k, H, I, q = 8, 3, 64, 128, 11
    spec = QuantSpec("AMXINT4_KGroup_SFT", 32, True)
    parts, deq = _weights(E, H, I, (spec,) * 3, seed=11)
    ids, wts = make_routing(q, E, k, seed=12)
    x = torch.randn(q, H, generator=torch.Generator().manual_seed(13))
    outs = []
    for tp in (1, 2):
        release_wrappers()
        cpu = ktmoe.CPUInfer.get(2, tp)
        outs.append(_run(cpu, (spec,) * 3, parts, E, k, H, I, x, ids, wts, None))
        del cpu
        release_wrappers()
    assert rel_err(outs[1], outs[0]) < 1e-5
    assert rel_err(outs[0], reference(x, ids, wts, *deq, True)) < EMULATED_TOL
