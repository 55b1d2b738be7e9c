"""Quantized frozen experts for SFT: INT8, INT4, INT4_1, INT4 K-group (with and
without zero point) and INT4_1 K-group.

Three kinds of check:

* the quantizer: libktmoe's packing equals an independent PyTorch
  implementation of docs/quant_formats.md bit for bit (tests/quant_reference.py),
  and dequantized values are within the format's step of the weights;
* the kernels (tight): a layer loaded with quantized weights against the
  float64 autograd reference run on the *dequantized* weights
  (``ktmoe.quant.dequantize``, plain PyTorch): only fp32 rounding differs, so
  the bound is the same as for BF16 layers (observed ~4e-7 relative);
* the quantization error (loose, documented in docs/quant_formats.md): the
  same layer against the float64 reference on the original bf16 weights.
"""

from __future__ import annotations

import gc

import pytest
import torch

ktmoe = pytest.importorskip("ktmoe")

from ktmoe.quant import QuantSpec, dequantize, quantize  # noqa: E402
from quant_reference import quantize_reference  # noqa: E402
from reference import (  # noqa: E402
    LORA_NAMES,
    make_inputs,
    make_layer,
    make_routing,
    moe_sft_reference_grads,
    rel_err,
    sft_step,
)

F32, BF16 = torch.float32, torch.bfloat16
QUANT_METHODS = ["AMXINT8_SFT", "AMXINT4_SFT", "AMXINT4_1_SFT", "AMXINT4_KGroup_SFT",
                 "AMXINT4_1KGroup_SFT", "AMXFP8_SFT", "MXFP4_SFT"]
# (method, zero_point): the two INT4 K-group variants are distinct formats
VARIANTS = [("AMXINT8_SFT", True), ("AMXINT4_SFT", True), ("AMXINT4_1_SFT", True),
            ("AMXINT4_KGroup_SFT", True), ("AMXINT4_KGroup_SFT", False),
            ("AMXINT4_1KGroup_SFT", True), ("AMXFP8_SFT", True), ("MXFP4_SFT", True)]
VARIANT_IDS = [f"{m}-zp{int(z)}" for m, z in VARIANTS]

# kernel vs float64 on the same dequantized weights: fp32 accumulation only
# (see test_sft_layer.py for the reasoning; observed errors are ~4e-7)
KERNEL_TOL = 2e-5
KERNEL_BF16_TOL = 1e-2  # results rounded to bf16
SAME_TOL = 1e-4         # tier vs tier, TP=2 vs TP=1: summation order only

# quantization error vs the bf16 layer on gaussian weights (relative norm
# error of the output and of every gradient; docs/quant_formats.md has the
# measured values: INT8 ~1%, INT4 formats 10-17%)
QUANT_TOL = {"AMXINT8_SFT": 0.03, "AMXFP8_SFT": 0.06}
INT4_QUANT_TOL = 0.3


def _names(spec):
    return spec.format


def _layer_and_batch(E=8, H=64, I=128, r=4, q=29, k=3, seed=0, x_dtype=F32, lora_dtype=F32):
    layer = make_layer(E, H, I, r, seed=seed, lora_dtype=lora_dtype)
    ids, wts = make_routing(q, E, k, seed=seed + 1)
    x, go = make_inputs(q, H, seed=seed + 2, dtype=x_dtype)
    return layer, ids, wts, x, go


def _wrapper(build_wrapper, layer, k, method, zero_point=True, group_size=32, tier=None,
             load=True, **kw):
    return build_wrapper(layer, k, tier=tier, load=load, init_lora=load, method=method,
                         group_size=group_size, zero_point=zero_point, **kw)


def _dequantized(layer, spec):
    return [dequantize(quantize(t, spec), spec, t.shape[-1], torch.float64)
            for t in (layer.gate, layer.up, layer.down)]


def _all_errors(res, ref):
    out, gi, gl, gw = res
    r_out, r_gx, r_gw, r_gl = ref
    errs = {"out": rel_err(out, r_out), "grad_input": rel_err(gi, r_gx),
            "grad_weights": rel_err(gw, r_gw)}
    for n in LORA_NAMES:
        errs["grad_" + n] = rel_err(gl["grad_" + n], r_gl["grad_" + n])
    return errs


# ---------------------------------------------------------------------------
# the quantizer
# ---------------------------------------------------------------------------

def _special_rows(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    w[0] = 0.0                     # all zero: scale 0
    w[1] = 0.37                    # constant
    w[2] = -torch.rand(K, generator=g) - 0.1   # all negative
    w[3] = torch.rand(K, generator=g) + 0.1    # all positive
    w[4, : K // 2] = 1e-30         # tiny values beside normal ones
    w[5] *= 1e4
    return w


@pytest.mark.parametrize("src_dtype", [BF16, F32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("method,zero_point", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("K", [64, 96, 37])
def test_quantizer_matches_reference(method, zero_point, K, src_dtype):
    spec = QuantSpec(method, 32, zero_point)
    if spec.kgroup and K % 32:
        with pytest.raises(ValueError, match=r"must be divisible by group_size \(32\)"):
            quantize(torch.zeros(2, K), spec)
        return
    w = _special_rows(12, K, seed=K).to(src_dtype)
    got = quantize(w, spec)
    want = quantize_reference(w, spec.format, 32)
    assert set(got) == set(want) == set(spec.parts)
    for part in spec.parts:
        shape, dt = spec.part_shapes(12, K)[part]
        assert got[part].shape == shape and got[part].dtype == dt, part
        assert torch.equal(got[part], want[part]), f"{spec.format} {part} differs from the reference"


@pytest.mark.parametrize("method,zero_point", VARIANTS, ids=VARIANT_IDS)
def test_dequantized_values_within_one_step(method, zero_point):
    spec = QuantSpec(method, 32, zero_point)
    w = torch.randn(3, 16, 128).to(BF16)
    parts = quantize(w, spec)
    dq = dequantize(parts, spec, 128, torch.float64)
    step = parts["scale"].abs().to(torch.float64).repeat_interleave(128 // spec.groups(128), -1)
    err = (dq - w.to(torch.float64)).abs()
    # round to nearest: half a step; the symmetric INT4 formats clip the
    # extreme opposite to the largest magnitude by up to one step, and the
    # zero point's rounding shifts the grid by up to half a step
    bound = 0.5 if spec.format in ("int8", "int4_1", "int4_1_kgroup") else 1.0
    if spec.format == "fp8_e4m3":  # 3 mantissa bits: half a step is 1/16 of the value's binade
        step = torch.maximum(w.abs().to(torch.float64) / 8, step * 2.0 ** -9)
    if spec.format == "mxfp4":  # grid steps up to 2 scales; beyond 6 scales it saturates
        bound = 2.0
    assert torch.all(err <= bound * step * (1 + 1e-5) + 1e-30)
    assert err.max() > 0  # really quantized


@pytest.mark.parametrize("fmt_key", ["INT8_KGROUP", "FP8"])
@pytest.mark.parametrize("src_dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_quantizer_extra_formats(fmt_key, src_dtype):
    """The inference-side formats (GGUF Q8_0-like int8 groups, FP8 E4M3 with
    group scales) against the same PyTorch reference; FP8 rounding is
    torch.float8_e4m3fn's (round to nearest even), subnormals included."""
    spec = QuantSpec(fmt_key, 32)
    w = _special_rows(12, 96, seed=5)
    w[6, :32] = torch.logspace(-12, 0, 32)  # down into the FP8 subnormals
    w = w.to(src_dtype)
    got = quantize(w, spec)
    want = quantize_reference(w, spec.format, 32)
    for part in spec.parts:
        assert torch.equal(got[part], want[part]), part
    err = (dequantize(got, spec, 96, torch.float64) - w.to(torch.float64)).abs()
    rel = {"int8_kgroup": 0.5 / 127, "fp8_e4m3": 1 / 16}[spec.format]
    bound = rel * got["scale"].repeat_interleave(32, -1).to(torch.float64) * (
        127 if spec.format == "int8_kgroup" else 448)
    assert torch.all(err <= bound + 1e-30)


def test_quantizer_rejects_non_finite():
    w = torch.randn(4, 64)
    w[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(w, QuantSpec("AMXINT8_SFT"))
    w[2, 5] = float("inf")
    with pytest.raises(ValueError, match="row 2"):
        quantize(w, QuantSpec("AMXINT4_1_SFT"))


def test_quant_spec_validation():
    with pytest.raises(ValueError, match="Unsupported method"):
        QuantSpec("FOO")
    for bad in (0, -16, 24, 8):
        with pytest.raises(ValueError, match="positive multiple of 16"):
            QuantSpec("AMXINT4_KGroup_SFT", bad)
    with pytest.raises(TypeError):
        QuantSpec("AMXINT4_1KGroup_SFT", 32.0)
    # per-row methods ignore group_size
    assert QuantSpec("AMXINT8_SFT", 0).groups(100) == 1
    assert QuantSpec("AMXINT4_KGroup_SFT", 32, True).format == "int4_kgroup_zp"
    assert QuantSpec("AMXINT4_KGroup_SFT", 32, False).format == "int4_kgroup"
    assert QuantSpec("AMXINT4_1KGroup_SFT", 32, False).format == "int4_1_kgroup"
    assert QuantSpec("FP8", 128).format == "fp8_e4m3" and QuantSpec("FP8").kgroup


# ---------------------------------------------------------------------------
# kernels against the dequantized float64 reference (tight)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,zero_point", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("tp", [1, 2])
def test_kernel_vs_dequantized_reference(build_wrapper, tier, method, zero_point, tp):
    layer, ids, wts, x, go = _layer_and_batch(seed=3)
    spec = QuantSpec(method, 32, zero_point)
    gc.collect()
    w = _wrapper(build_wrapper, layer, 3, method, zero_point, tier=tier, threadpool_count=tp)
    res = sft_step(w, x, ids, wts, go)
    del w
    gc.collect()
    dg, du, dd = _dequantized(layer, spec)
    ref = moe_sft_reference_grads(x, ids, wts, dg, du, dd, layer.loras, layer.scaling, go)
    errs = _all_errors(res, ref)
    assert max(errs.values()) < KERNEL_TOL, errs


@pytest.mark.parametrize("method,zero_point", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("case", ["odd", "odd_tp2", "bf16", "one_expert_top1", "qlen1"])
def test_kernel_cases(build_wrapper, tier, method, zero_point, case):
    """Tails (K not a multiple of 8 for the per-row formats; with TP=2 the
    second slice of down_proj starts at an odd 4-bit column), bf16 inputs
    and LoRA, all tokens on one expert, a single token."""
    spec = QuantSpec(method, 16, zero_point)
    E, H, I, r, q, k = 6, 48, 64, 3, 23, 2
    x_dtype = lora_dtype = F32
    kind = "random"
    tp = 2 if case == "odd_tp2" else 1
    if case.startswith("odd") and not spec.kgroup:
        H, I = 77, 50
    if spec.kgroup and H % spec.group_size:  # a fixed group size (MXFP4: 32)
        H = 64
    if case == "bf16":
        x_dtype = lora_dtype = BF16
    if case == "one_expert_top1":
        kind, k = "one_expert", 1
    if case == "qlen1":
        q = 1
    layer = make_layer(E, H, I, r, seed=5, lora_dtype=lora_dtype)
    ids, wts = make_routing(q, E, k, seed=6, kind=kind)
    x, go = make_inputs(q, H, seed=7, dtype=x_dtype)
    gc.collect()
    w = _wrapper(build_wrapper, layer, k, method, zero_point, group_size=16, tier=tier,
                 threadpool_count=tp)
    res = sft_step(w, x, ids, wts, go)
    del w
    gc.collect()
    dg, du, dd = _dequantized(layer, spec)
    ref = moe_sft_reference_grads(x, ids, wts, dg, du, dd, layer.loras, layer.scaling, go)
    errs = _all_errors(res, ref)
    tol = KERNEL_BF16_TOL if case == "bf16" else KERNEL_TOL
    assert max(errs.values()) < tol, errs


@pytest.mark.parametrize("method,zero_point", VARIANTS, ids=VARIANT_IDS)
def test_tier_matches_ref(build_wrapper, nonref_tier, method, zero_point):
    layer, ids, wts, x, go = _layer_and_batch(H=96, I=160, q=41, seed=9)
    w = _wrapper(build_wrapper, layer, 3, method, zero_point, tier="ref")
    res_ref = sft_step(w, x, ids, wts, go)
    del w
    w = _wrapper(build_wrapper, layer, 3, method, zero_point, tier=nonref_tier)
    res = sft_step(w, x, ids, wts, go)
    del w
    ref = (res_ref[0], res_ref[1], res_ref[3], res_ref[2])
    errs = _all_errors(res, ref)
    assert max(errs.values()) < SAME_TOL, errs


# ---------------------------------------------------------------------------
# quantization error against the bf16 layer (loose)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,zero_point", VARIANTS, ids=VARIANT_IDS)
def test_quantization_error_vs_bf16(build_wrapper, method, zero_point):
    layer, ids, wts, x, go = _layer_and_batch(H=128, I=128, q=64, seed=13)
    w = _wrapper(build_wrapper, layer, 3, method, zero_point)
    res = sft_step(w, x, ids, wts, go)
    del w
    ref = layer.reference_grads(x, ids, wts, go)
    errs = _all_errors(res, ref)
    tol = QUANT_TOL.get(method, INT4_QUANT_TOL)
    assert max(errs.values()) < tol, errs
    # and the weights really are quantized (not kept in bf16)
    assert errs["out"] > tol / 30, errs


# ---------------------------------------------------------------------------
# loading, memory
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,zero_point", VARIANTS, ids=VARIANT_IDS)
def test_packed_load_equals_online_quantization(build_wrapper, method, zero_point):
    """load_packed_weights (the weight-file path) and load_weights_from_tensors
    hold the same bits; a non-identity physical map picks source experts."""
    layer, ids, wts, x, go = _layer_and_batch(seed=17)
    spec = QuantSpec(method, 32, zero_point)
    perm = torch.randperm(layer.E, generator=torch.Generator().manual_seed(1))
    w = _wrapper(build_wrapper, layer, 3, method, zero_point, load=False)
    w.load_weights_from_tensors(layer.gate[perm].contiguous(), layer.up[perm].contiguous(),
                                layer.down[perm].contiguous(), torch.arange(layer.E))
    w.init_lora_weights(*[layer.loras[n] for n in LORA_NAMES])
    res_online = sft_step(w, x, ids, wts, go)
    packed = [quantize(t, spec) for t in (layer.gate, layer.up, layer.down)]
    w.load_packed_weights(*packed, physical_to_logical_map_cpu=perm)
    res_packed = sft_step(w, x, ids, wts, go)
    del w
    assert torch.equal(res_online[0], res_packed[0])
    assert torch.equal(res_online[1], res_packed[1])
    for n in res_online[2]:
        assert torch.equal(res_online[2][n], res_packed[2][n]), n


@pytest.mark.parametrize("method", ["AMXBF16_SFT"] + QUANT_METHODS)
def test_one_packed_copy(build_wrapper, method):
    """The layer holds exactly the packed bytes of the three projections (no
    transposed or dequantized second copy), and a training step adds no
    weight-sized buffer."""
    E, H, I, k = 8, 256, 128, 2
    layer = make_layer(E, H, I, 4, seed=1)
    spec = QuantSpec(method, 128, True)
    w = _wrapper(build_wrapper, layer, k, method, group_size=128)
    packed = E * (2 * spec.nbytes(I, H) + spec.nbytes(H, I))
    assert w.weight_bytes == packed
    ratio = w.weight_bytes / (3 * E * H * I * 2)
    # FP8: 1 byte + an fp32 scale per 128; MXFP4: 4 bits + an fp32 scale per 32
    expect = {"AMXBF16_SFT": (1.0, 1.0), "AMXINT8_SFT": (0.5, 0.52), "AMXFP8_SFT": (0.5, 0.52),
              "MXFP4_SFT": (0.3125, 0.3125)}.get(method, (0.25, 0.3))
    assert expect[0] <= ratio <= expect[1], ratio
    ids, wts = make_routing(1, E, k, seed=2)
    x, go = make_inputs(1, H, seed=3)
    sft_step(w, x, ids, wts, go)
    assert w.buffer_bytes < 0.1 * w.weight_bytes + 64 * 1024, (w.buffer_bytes, w.weight_bytes)
    del w


def test_kgroup_shape_rules(make_wrapper):
    with pytest.raises(ValueError, match=r"hidden_size \(72\) must be divisible by group_size \(32\)"):
        make_wrapper(method="AMXINT4_KGroup_SFT", hidden_size=72, moe_intermediate_size=64, group_size=32)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(48\) must be divisible by group_size \(32\)"):
        make_wrapper(method="AMXINT4_1KGroup_SFT", hidden_size=64, moe_intermediate_size=48, group_size=32)
    gc.collect()
    with pytest.raises(ValueError, match=r"moe_intermediate_size / threadpool_count \(32\)"):
        make_wrapper(method="AMXINT4_1KGroup_SFT", hidden_size=64, moe_intermediate_size=64,
                     group_size=64, threadpool_count=2)
    with pytest.raises(ValueError, match="positive multiple of 16"):
        make_wrapper(method="AMXINT4_KGroup_SFT", hidden_size=64, moe_intermediate_size=64, group_size=20)
    # per-row methods accept any shape and ignore group_size
    w = make_wrapper(method="AMXINT4_1_SFT", hidden_size=77, moe_intermediate_size=50, group_size=20)
    del w


def test_bad_packed_weights(build_wrapper):
    layer, ids, wts, x, go = _layer_and_batch(seed=21)
    spec = QuantSpec("AMXINT4_KGroup_SFT", 32, True)
    w = _wrapper(build_wrapper, layer, 3, "AMXINT4_KGroup_SFT", True)
    good = [quantize(t, spec) for t in (layer.gate, layer.up, layer.down)]

    def variant(proj, part, fn):
        out = [dict(p) for p in good]
        out[proj][part] = fn(out[proj][part].clone())
        return out

    def nan_at(t):
        t.view(-1)[7] = float("nan")
        return t

    def big_zero(t):
        t.view(-1)[3] = 16
        return t

    with pytest.raises(ValueError, match="scale of group .* not finite"):
        w.load_packed_weights(*variant(2, "scale", nan_at))
    with pytest.raises(RuntimeError, match="Weights not loaded"):
        w.forward_sft(x, ids, wts, save_for_backward=False)
    with pytest.raises(ValueError, match="zero point .* above 15"):
        w.load_packed_weights(*variant(0, "zero", big_zero))
    with pytest.raises(ValueError, match=r"lacks the part\(s\) \['zero'\]"):
        w.load_packed_weights(*[{k: v for k, v in p.items() if k != "zero"} for p in good])
    with pytest.raises(ValueError, match="down_proj.scale shape mismatch"):
        w.load_packed_weights(*variant(2, "scale", lambda t: t[:, :, :1]))
    with pytest.raises(ValueError, match="up_proj.qweight must have dtype uint8"):
        w.load_packed_weights(*variant(1, "qweight", lambda t: t.to(torch.int16)))
    with pytest.raises(ValueError, match=r"physical_to_logical_map values must be in \[0, 8\)"):
        w.load_packed_weights(*good, physical_to_logical_map_cpu=torch.full((8,), 8))
    # a good load afterwards works
    w.load_packed_weights(*good)
    w.forward_sft(x, ids, wts, save_for_backward=False)
    del w


def test_nan_weight_fails_load_cleanly(build_wrapper):
    layer, ids, wts, x, go = _layer_and_batch(seed=23)
    w = _wrapper(build_wrapper, layer, 3, "AMXINT8_SFT", load=False)
    bad = layer.down.clone()
    bad[5, 3, 9] = float("nan")
    with pytest.raises(ValueError, match=r"expert 5, down_proj row 3: .*NaN or infinite"):
        w.load_weights_from_tensors(layer.gate, layer.up, bad, torch.arange(layer.E))
    with pytest.raises(RuntimeError, match="Weights not loaded"):
        w.forward_sft(x, ids, wts, save_for_backward=False)
    del w


@pytest.mark.parametrize("method", QUANT_METHODS)
def test_training_reduces_loss(build_wrapper, method):
    """A few AdamW steps on a quantized layer fit a target: the LoRA
    gradients computed through the packed weights are usable."""
    E, H, I, r, q, k = 8, 64, 64, 8, 64, 2
    layer = make_layer(E, H, I, r, seed=31)
    params = [layer.loras[n] for n in LORA_NAMES]
    w = _wrapper(build_wrapper, layer, k, method)
    ids, wts = make_routing(q, E, k, seed=32)
    x, _ = make_inputs(q, H, seed=33)
    # the target is the layer with its random LoRA; training starts from B = 0
    target = w.forward_sft(x, ids, wts, save_for_backward=False)
    for n in ("gate_lora_b", "up_lora_b", "down_lora_b"):
        layer.loras[n].zero_()  # read in place by the layer
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(15):
        out = w.forward_sft(x, ids, wts)
        diff = out - target
        losses.append(float((diff * diff).mean()))
        _, grads = w.backward(2 * diff / diff.numel())
        for p, n in zip(params, LORA_NAMES):
            p.grad = grads["grad_" + n]
        opt.step()
        w.update_lora_weights()
    del w
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------
# load_weights from weight files
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,zero_point", [("AMXBF16_SFT", True)] + VARIANTS,
                         ids=["AMXBF16_SFT"] + VARIANT_IDS)
def test_load_weights_from_files(build_wrapper, tmp_path, method, zero_point):
    """Weight files (written for 10 source experts) load the same bits as
    online quantization; physical expert p takes file expert map[p], with a
    non-identity map; TP=2 reads the same file."""
    from ktmoe.weight_files import write_layer

    layer, ids, wts, x, go = _layer_and_batch(seed=41)
    spec = QuantSpec(method, 32, zero_point)
    extra = make_layer(2, layer.H, layer.I, layer.r, seed=42)  # two more experts in the file
    src = [torch.cat([a, b]) for a, b in ((layer.gate, extra.gate), (layer.up, extra.up),
                                          (layer.down, extra.down))]
    write_layer(tmp_path, 3, spec, *[quantize(t, spec) for t in src],
                hidden_size=layer.H, intermediate_size=layer.I)
    pmap = torch.tensor([9, 0, 7, 2, 8, 5, 1, 3])  # uses both extra experts
    online = [t[pmap].contiguous() for t in src]
    results = []
    for tp in (1, 2):
        gc.collect()
        w = _wrapper(build_wrapper, layer, 3, method, zero_point, load=False, layer_idx=3,
                     weight_path=str(tmp_path), threadpool_count=tp)
        w.init_lora_weights(*[layer.loras[n] for n in LORA_NAMES])
        w.load_weights(pmap)
        results.append(sft_step(w, x, ids, wts, go))
        if tp == 1:
            w.load_weights_from_tensors(*online, torch.arange(layer.E))
            res_online = sft_step(w, x, ids, wts, go)
        del w
    gc.collect()
    assert torch.equal(results[0][0], res_online[0])
    assert torch.equal(results[0][1], res_online[1])
    # TP=2 from the same file: same result up to summation order
    ref = (results[0][0], results[0][1], results[0][3], results[0][2])
    assert max(_all_errors(results[1], ref).values()) < SAME_TOL


def test_load_weights_errors(build_wrapper, tmp_path):
    from ktmoe.weight_files import WeightFileError, write_layer

    layer, ids, wts, x, go = _layer_and_batch(seed=43)
    spec8 = QuantSpec("AMXINT8_SFT")
    write_layer(tmp_path, 0, spec8, *[quantize(t, spec8) for t in (layer.gate, layer.up, layer.down)],
                hidden_size=layer.H, intermediate_size=layer.I)
    cases = [
        (dict(method="AMXINT8_SFT", weight_path=""), "needs weight_path"),
        (dict(method="AMXINT8_SFT", weight_path=str(tmp_path / "nope")), "nope"),
        (dict(method="AMXINT8_SFT", weight_path=str(tmp_path), layer_idx=1), r"layer 1 not found"),
        (dict(method="AMXINT4_SFT", weight_path=str(tmp_path)), "method mismatch"),
    ]
    for kw, msg in cases:
        w = _wrapper(build_wrapper, layer, 3, load=False, **kw)
        with pytest.raises(RuntimeError, match=msg):
            w.load_weights(torch.arange(layer.E))
        assert not w._weights_loaded
        del w
    assert issubclass(WeightFileError, RuntimeError)
    w = _wrapper(build_wrapper, layer, 3, "AMXINT8_SFT", load=False, weight_path=str(tmp_path))
    with pytest.raises(ValueError, match="physical_to_logical_map shape mismatch"):
        w.load_weights(torch.arange(7))
    with pytest.raises(ValueError, match=r"values must be in \[0, 8\)"):
        w.load_weights(torch.arange(8) + 1)
    w.load_weights(torch.arange(8).flip(0))
    w.forward_sft(x, ids, wts, save_for_backward=False)
    del w


# ---------------------------------------------------------------------------
# the inference-side formats through a whole layer, forward and backward
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt_key", ["INT8_KGROUP", "FP8"])
@pytest.mark.parametrize("tp", [1, 2])
def test_extra_formats_vs_dequantized_reference(build_wrapper, tier, fmt_key, tp):
    """INT8 K-group and FP8 weights run through the same kernels: checked
    forward and backward via an SFT method name registered for the test."""
    name = "TEST_" + fmt_key

    class Extra(ktmoe.NativeSFTMoEWrapper):
        METHODS = {name: fmt_key}

    ktmoe.register_sft_method(name, Extra)
    try:
        layer, ids, wts, x, go = _layer_and_batch(seed=51)
        gc.collect()
        w = _wrapper(build_wrapper, layer, 3, name, tier=tier, threadpool_count=tp)
        assert w.quant_spec.format == QuantSpec(fmt_key).format
        res = sft_step(w, x, ids, wts, go)
        del w
        gc.collect()
    finally:
        ktmoe.SFT_METHODS._classes.pop(name, None)
    dg, du, dd = _dequantized(layer, QuantSpec(fmt_key, 32))
    ref = moe_sft_reference_grads(x, ids, wts, dg, du, dd, layer.loras, layer.scaling, go)
    errs = _all_errors(res, ref)
    assert max(errs.values()) < KERNEL_TOL, errs
