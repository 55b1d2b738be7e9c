"""SFT on the checkpoints' own low-bit experts: DeepSeek-V3 block FP8
(AMXFP8_SFT) and GPT-OSS MXFP4 (MXFP4_SFT), loaded from their tensors with
no dequantized copy; kernels against float64 on the exact dequantized
values."""

from __future__ import annotations

import gc

import pytest
import torch

ktmoe = pytest.importorskip("ktmoe")

from ktmoe.loaders import mxfp4_to_parts, split_interleaved  # noqa: E402
from ktmoe.quant import QuantSpec, dequantize  # noqa: E402
from reference import (LORA_NAMES, make_inputs, make_layer, make_routing,  # noqa: E402
                       moe_sft_reference_grads, rel_err, sft_step)

TOL = 2e-5  # fp32 accumulation vs float64 on the same weights


def _mxfp4_checkpoint(E, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 124, (E, N, K // 32), dtype=torch.uint8, generator=g)
    return {"blocks": blocks, "scales": scales}


def _fp8_checkpoint(E, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(E, N, K, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(E, (N + 127) // 128, K // 128, generator=g) * 1e-3 + 1e-4
    return {"weight": w, "weight_scale_inv": s}


def _fp8_dequant(ck):
    w, s = ck["weight"].to(torch.float64), ck["weight_scale_inv"].to(torch.float64)
    N, K = w.shape[-2:]
    return w * s.repeat_interleave(128, -2)[..., :N, :].repeat_interleave(128, -1)


def test_mxfp4_matches_transformers_dequantization():
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    ck = _mxfp4_checkpoint(3, 96, 64, seed=1)
    ck["scales"][0, 0, 0] = 0      # 2^-127 (an fp32 subnormal)
    ck["scales"][1, 2, 1] = 254    # 2^127
    ref = mx.convert_moe_packed_tensors(ck["blocks"], ck["scales"], dtype=torch.float32)  # [E, K, N]
    parts = mxfp4_to_parts(ck["blocks"], ck["scales"])
    assert parts["qweight"].data_ptr() == ck["blocks"].data_ptr()  # no copy of the codes
    got = dequantize(parts, QuantSpec("MXFP4_SFT"), 64)
    assert torch.equal(got, ref.transpose(1, 2))


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8"])
def test_checkpoint_tensors_vs_float64(build_wrapper, tier, fmt):
    E, H, I, r, q, k = 6, 128, 256, 4, 21, 2
    layer = make_layer(E, H, I, r, seed=2)
    ids, wts = make_routing(q, E, k, seed=3)
    x, go = make_inputs(q, H, seed=4)
    if fmt == "mxfp4":
        method = "MXFP4_SFT"
        gate_up = _mxfp4_checkpoint(E, 2 * I, H, seed=5)  # GPT-OSS: gate, up rows interleaved
        down = _mxfp4_checkpoint(E, H, I, seed=6)
        gp, up = split_interleaved(mxfp4_to_parts(gate_up["blocks"], gate_up["scales"]))
        dp = mxfp4_to_parts(down["blocks"], down["scales"])
        spec = QuantSpec(method)
        deq = [dequantize(p, spec, p["qweight"].shape[-1] * 2, torch.float64) for p in (gp, up, dp)]
        # per projection: the checkpoint dicts of gate and up rows
        half = {k2: v.view(E, I, 2, *v.shape[2:]) for k2, v in gate_up.items()}
        args = ({k2: v[:, :, 0].contiguous() for k2, v in half.items()},
                {k2: v[:, :, 1].contiguous() for k2, v in half.items()}, down)
    else:
        method = "AMXFP8_SFT"
        args = (_fp8_checkpoint(E, I, H, 7), _fp8_checkpoint(E, I, H, 8), _fp8_checkpoint(E, H, I, 9))
        deq = [_fp8_dequant(a) for a in args]
    w = build_wrapper(layer, k, tier=tier, load=False, method=method)
    w.load_weights_from_tensors(*args, torch.arange(E))
    res = sft_step(w, x, ids, wts, go)
    assert w.weight_bytes == sum(QuantSpec(method).nbytes(*d.shape[-2:]) * E for d in deq)
    del w
    gc.collect()
    ref = moe_sft_reference_grads(x, ids, wts, *deq, layer.loras, layer.scaling, go)
    errs = {"out": rel_err(res[0], ref[0]), "grad_input": rel_err(res[1], ref[1]),
            "grad_weights": rel_err(res[3], ref[2])}
    errs.update({n: rel_err(res[2]["grad_" + n], ref[3]["grad_" + n]) for n in LORA_NAMES})
    assert max(errs.values()) < TOL, errs


def test_checkpoint_tensor_errors(build_wrapper):
    E, H, I = 4, 64, 64
    layer = make_layer(E, H, I, 2, seed=1)
    w = build_wrapper(layer, 2, load=False, init_lora=False, method="MXFP4_SFT")
    good = [_mxfp4_checkpoint(E, I, H, 1), _mxfp4_checkpoint(E, I, H, 2), _mxfp4_checkpoint(E, H, I, 3)]
    bad = dict(good[2])
    bad["scales"] = bad["scales"].clone()
    bad["scales"][2, 5, 1] = 255
    with pytest.raises(ValueError, match=r"down_proj: scale of expert 2, row 5 is the E8M0 NaN"):
        w.load_weights_from_tensors(good[0], good[1], bad)
    with pytest.raises(ValueError, match="scales shape mismatch"):
        w.load_weights_from_tensors(good[0], good[1], {"blocks": good[2]["blocks"],
                                                       "scales": good[2]["scales"][:, :, :1]})
    with pytest.raises(ValueError, match=r"lack \['scales'\]"):
        w.load_weights_from_tensors(good[0], good[1], {"blocks": good[2]["blocks"]})
    with pytest.raises(TypeError, match="same way"):
        w.load_weights_from_tensors(good[0], layer.up, good[2])
    with pytest.raises(RuntimeError, match="Weights not loaded"):  # nothing half-loaded
        w.forward_sft(torch.zeros(1, H), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2),
                      save_for_backward=False)
    w.load_weights_from_tensors(*good)  # and the good ones load
    del w
    w = build_wrapper(layer, 2, load=False, init_lora=False, method="AMXINT4_SFT")
    with pytest.raises(TypeError, match="FP8 and MXFP4"):
        w.load_weights_from_tensors(*good)
    del w


@pytest.mark.parametrize("method", ["AMXBF16_SFT", "MXFP4_SFT"])
def test_clamped_swiglu(build_wrapper, tier, method):
    """GPT-OSS's activation: gate clamped above, up clamped both ways, the
    clamps' gradients zero outside; weights scaled so that many activations
    hit the limit."""
    from reference import swiglu_clamp

    E, H, r, q, k = 6, 64, 4, 25, 2
    I = 90 if method == "AMXBF16_SFT" else 96  # 90: the vector tiers' scalar tails too
    alpha, limit = 1.702, 2.0
    layer = make_layer(E, H, I, r, seed=11)
    for t in (layer.gate, layer.up):
        t.mul_(8)
    ids, wts = make_routing(q, E, k, seed=12)
    x, go = make_inputs(q, H, seed=13)
    w = build_wrapper(layer, k, tier=tier, method=method, activation="swiglu_clamp",
                      swiglu_alpha=alpha, swiglu_limit=limit)
    res = sft_step(w, x, ids, wts, go)
    del w
    gc.collect()
    spec = QuantSpec(method)
    deq = [t.to(torch.float64) if spec.format == "bf16" else
           dequantize(ktmoe.quant.quantize(t, spec), spec, t.shape[-1], torch.float64)
           for t in (layer.gate, layer.up, layer.down)]
    g_pre = torch.einsum("qh,eih->qei", x.double(), deq[0])
    assert float((g_pre > limit).double().mean()) > 0.1  # the clamp is exercised
    ref = moe_sft_reference_grads(x, ids, wts, *deq, layer.loras, layer.scaling, go,
                                  act=swiglu_clamp(alpha, limit))
    errs = {"out": rel_err(res[0], ref[0]), "grad_input": rel_err(res[1], ref[1]),
            "grad_weights": rel_err(res[3], ref[2])}
    errs.update({n: rel_err(res[2]["grad_" + n], ref[3]["grad_" + n]) for n in LORA_NAMES})
    assert max(errs.values()) < TOL, errs


def test_activation_errors(make_wrapper):
    with pytest.raises(ValueError, match="Unknown activation"):
        make_wrapper(mode="sft", method="AMXBF16_SFT", activation="gelu")
    with pytest.raises(ValueError, match="swiglu_limit must be a finite positive"):
        make_wrapper(mode="sft", method="AMXBF16_SFT", activation="swiglu_clamp", swiglu_limit=0)
    with pytest.raises(ValueError, match="SFT mode only"):
        make_wrapper(mode="inference", method="AMXINT4", activation="swiglu_clamp")
