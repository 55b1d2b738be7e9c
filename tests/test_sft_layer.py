"""Whole-layer correctness of the SFT MoE wrapper against a float64 reference.

Every test drives forward_sft(save_for_backward=True) + backward(...,
return_grad_weights=True) and compares the output, grad_input, the six LoRA
gradients and grad_weights with tests/reference.py (float64 torch autograd).
Tests taking a ``tier`` argument run once per tier in
ktmoe.cpu_info()["usable_tiers"] (see conftest.py).
"""

from __future__ import annotations

import gc

import pytest
import torch

ktmoe = pytest.importorskip("ktmoe")

from reference import (  # noqa: E402
    GRAD_NAMES,
    LORA_NAMES,
    make_inputs,
    make_layer,
    make_loras,
    make_routing,
    rel_err,
    sft_step,
)

# ---------------------------------------------------------------------------
# Tolerances: relative norm error ||a - b|| / ||b|| against the float64
# reference (b), computed over a whole tensor (and per expert for LoRA grads).
#
# * fp32 results: the kernel and the reference use exactly the same bf16 base
#   weights and the same input values, so the only differences are fp32
#   rounding in dot products of length <= max(H, I, r*...) (<= 160 here) and in
#   silu/exp, i.e. ~1e-6..1e-5 relative. 2e-3 leaves ample room for blocked or
#   reordered fp32 accumulation while still catching real bugs: a missing or
#   mis-scaled LoRA term, a wrong routing weight or a wrong expert changes the
#   result by O(0.1) here (make_layer makes the LoRA terms ~20-40% of the base
#   projections, and both A and B are non-zero).
# * bf16 results (out / grad_input for bf16 hidden states, LoRA grads for bf16
#   LoRA parameters) and everything computed from bf16 hidden states: the
#   result is rounded to bf16, which has 8 significant bits, i.e. a relative
#   rounding error <= 2^-8 = 3.9e-3 per element (~1.5e-3 RMS), on top of any
#   bf16 staging of activations the kernel may do for bf16 inputs; so 1e-2.
# * kernel vs kernel (another tier vs "ref", thread pools 2 vs 1): the same
#   fp32 math with a different summation order: 1e-4 for fp32 results; for bf16
#   results a few elements may round to the neighbouring bf16 value: 1e-2.
# ---------------------------------------------------------------------------
FP32_TOL = 2e-3
BF16_TOL = 1e-2
SAME_FP32_TOL = 1e-4
SAME_BF16_TOL = 1e-2

F32 = torch.float32
BF16 = torch.bfloat16


def _dt_name(dt):
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dt]


def check_step(layer, x, ids, wts, go, res, loras=None, what=""):
    """Compare (out, grad_input, grad_loras, grad_weights) with the reference.

    ``res[3]`` (grad_weights) may be None to skip it. ``loras`` defaults to
    layer.loras (their current values).
    """
    out, gin, gl, gw = res
    loras = layer.loras if loras is None else loras
    q, H = x.shape
    E = layer.E
    ref_out, ref_gx, ref_gw, ref_gl = layer.reference_grads(x, ids, wts, go, loras=loras)

    # --- metadata --------------------------------------------------------
    assert tuple(out.shape) == (q, H), f"{what}: out shape {tuple(out.shape)}"
    assert out.dtype == x.dtype, f"{what}: out dtype {out.dtype} != {x.dtype}"
    assert out.device == x.device, f"{what}: out device {out.device}"
    assert tuple(gin.shape) == (q, H), f"{what}: grad_input shape {tuple(gin.shape)}"
    assert gin.dtype == x.dtype, f"{what}: grad_input dtype {gin.dtype} != {x.dtype}"
    missing = set(GRAD_NAMES) - set(gl)
    assert not missing, f"{what}: grad_loras lacks {sorted(missing)}"
    for n in LORA_NAMES:
        g = gl["grad_" + n]
        assert tuple(g.shape) == tuple(loras[n].shape), f"{what}: grad_{n} shape {tuple(g.shape)}"
        assert g.dtype == loras[n].dtype, f"{what}: grad_{n} dtype {g.dtype} != {loras[n].dtype}"
    if gw is not None:
        assert tuple(gw.shape) == tuple(ids.shape), f"{what}: grad_weights shape {tuple(gw.shape)}"
        assert gw.dtype == torch.float32, f"{what}: grad_weights dtype {gw.dtype}"

    # --- values ----------------------------------------------------------
    x_bf16 = x.dtype == BF16
    lora_bf16 = loras["gate_lora_a"].dtype == BF16
    t_act = BF16_TOL if x_bf16 else FP32_TOL
    t_lora = BF16_TOL if (x_bf16 or lora_bf16) else FP32_TOL
    checks = {
        "out": (rel_err(out, ref_out), t_act),
        "grad_input": (rel_err(gin, ref_gx), t_act),
    }
    if gw is not None:
        checks["grad_weights"] = (rel_err(gw, ref_gw), t_act)
    used = set(torch.unique(ids.cpu()).tolist())
    for gname in GRAD_NAMES:
        checks[gname] = (rel_err(gl[gname], ref_gl[gname]), t_lora)
        for e in range(E):
            if e in used:
                checks[f"{gname}[e={e}]"] = (rel_err(gl[gname][e], ref_gl[gname][e]), t_lora)
            else:
                # an expert without tokens has an exactly zero gradient
                checks[f"{gname}[e={e}, no tokens]"] = (float(gl[gname][e].float().abs().max()), 0.0)
    bad = {k: v for k, v in checks.items() if not (v[0] <= v[1])}  # NaN fails too
    assert not bad, f"{what}: " + "; ".join(f"{k}: err {v[0]:.3g} > tol {v[1]:.1g}" for k, v in bad.items())


def compare_results(res_a, res_b, what=""):
    """Kernel-vs-kernel comparison of two (out, gin, grad_loras, gw) tuples."""
    out_a, gin_a, gl_a, gw_a = res_a
    out_b, gin_b, gl_b, gw_b = res_b
    pairs = {"out": (out_a, out_b), "grad_input": (gin_a, gin_b), "grad_weights": (gw_a, gw_b)}
    for g in GRAD_NAMES:
        pairs[g] = (gl_a[g], gl_b[g])
    bad = []
    for name, (a, b) in pairs.items():
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name} dtype/shape differ"
        tol = SAME_BF16_TOL if a.dtype == BF16 else SAME_FP32_TOL
        err = rel_err(a, b)
        if not err <= tol:
            bad.append(f"{name}: err {err:.3g} > tol {tol:.1g}")
    assert not bad, f"{what}: " + "; ".join(bad)


def make_case(E, H, I, r, q, k, seed=0, x_dtype=F32, lora_dtype=F32, alpha=None, kind="random"):
    layer = make_layer(E, H, I, r, seed=seed, lora_dtype=lora_dtype, alpha=alpha)
    ids, wts = make_routing(q, E, k, seed=seed, kind=kind)
    x, go = make_inputs(q, H, seed=seed, dtype=x_dtype)
    return layer, ids, wts, x, go


# ---------------------------------------------------------------------------
# Basics
# ---------------------------------------------------------------------------


def test_state_attributes_and_two_tuple_backward(build_wrapper, tier):
    E, H, I, r, q, k = 4, 32, 16, 4, 5, 2
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=1, alpha=12.0)
    w = build_wrapper(layer, k, tier=tier, load=False, init_lora=False)
    assert isinstance(w, ktmoe.BaseSFTMoEWrapper)
    assert w.lora_scaling == pytest.approx(12.0 / 4)
    assert w.max_cache_depth == 1
    assert not w._weights_loaded
    assert not w._lora_initialized
    assert w._cache_depth == 0

    w.load_weights_from_tensors(layer.gate, layer.up, layer.down, torch.arange(E))
    assert w._weights_loaded
    w.init_lora_weights(*layer.lora_list())
    assert w._lora_initialized
    for n in LORA_NAMES:  # zero copy: the wrapper exposes the very tensors given
        assert getattr(w, n).data_ptr() == layer.loras[n].data_ptr(), n

    out = w.forward_sft(x, ids, wts, save_for_backward=True).clone()
    assert w._cache_depth == 1
    res = w.backward(go)
    assert isinstance(res, tuple) and len(res) == 2
    gin, gl = res
    assert w._cache_depth == 0
    check_step(layer, x, ids, wts, go, (out, gin, gl, None), what=f"{tier} 2-tuple backward")


@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=_dt_name)
@pytest.mark.parametrize("lora_dtype", [F32, BF16], ids=_dt_name)
def test_dtypes_vs_reference(build_wrapper, tier, x_dtype, lora_dtype):
    E, H, I, r, q, k = 8, 77, 50, 4, 17, 2
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=2, x_dtype=x_dtype, lora_dtype=lora_dtype)
    before = {
        "x": x.clone(), "ids": ids.clone(), "wts": wts.clone(), "go": go.clone(),
        "gate": layer.gate.clone(), "up": layer.up.clone(), "down": layer.down.clone(),
        **{n: t.clone() for n, t in layer.loras.items()},
    }
    w = build_wrapper(layer, k, tier=tier)
    res = sft_step(w, x, ids, wts, go)
    check_step(layer, x, ids, wts, go, res, what=f"{tier} x={x_dtype} lora={lora_dtype}")
    # inputs, base weights and LoRA parameters are left untouched
    after = {
        "x": x, "ids": ids, "wts": wts, "go": go,
        "gate": layer.gate, "up": layer.up, "down": layer.down, **layer.loras,
    }
    for name, t in before.items():
        assert torch.equal(t, after[name]), f"{name} was modified"


# (E, H, I, r, q, k, lora_dtype, alpha); H/I deliberately include values that
# are not multiples of 8 or 16, q includes 1 and odd sizes, k includes 1.
SWEEP = [
    (4, 32, 16, 2, 1, 1, F32, None),
    (4, 40, 24, 4, 3, 2, F32, 4.0),
    (8, 77, 50, 8, 17, 4, F32, None),
    (8, 160, 96, 8, 40, 2, F32, 16.0),
    (6, 77, 16, 3, 40, 1, F32, None),
    (8, 32, 96, 4, 17, 2, BF16, None),
    (5, 160, 24, 2, 3, 4, F32, 1.0),
    (8, 40, 50, 5, 1, 4, F32, None),
    (8, 160, 50, 8, 40, 4, BF16, 32.0),
    (4, 77, 96, 6, 3, 2, F32, None),
    (16, 32, 16, 2, 3, 1, F32, None),  # most experts get no token
    (4, 40, 24, 2, 40, 4, F32, None),  # k == E: every expert gets every token
    (2, 400, 24, 256, 5, 2, F32, None),  # r = 256: LoRA gradients of H in two column chunks
    (4, 48, 300, 4, 40, 2, F32, None),  # I past one 256-column backward tile (amx tier)
]


@pytest.mark.parametrize(
    "E,H,I,r,q,k,lora_dtype,alpha",
    SWEEP,
    ids=[f"E{c[0]}-H{c[1]}-I{c[2]}-r{c[3]}-q{c[4]}-k{c[5]}-{_dt_name(c[6])}" for c in SWEEP],
)
def test_shape_sweep(build_wrapper, tier, E, H, I, r, q, k, lora_dtype, alpha):
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=3, lora_dtype=lora_dtype, alpha=alpha)
    w = build_wrapper(layer, k, tier=tier)
    res = sft_step(w, x, ids, wts, go)
    check_step(layer, x, ids, wts, go, res, what=f"{tier} E{E} H{H} I{I} r{r} q{q} k{k}")


ROUTING_CASES = [
    ("sparse", 1),
    ("sparse", 2),
    ("sparse", 4),
    ("one_expert", 1),  # top-1, every token on the same expert
    ("one_expert", 2),  # one expert shared by all tokens + random others
    ("same_set", 3),  # all tokens on the same 3 experts
]


@pytest.mark.parametrize("kind,k", ROUTING_CASES, ids=[f"{c[0]}-k{c[1]}" for c in ROUTING_CASES])
@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=_dt_name)
def test_routing_patterns(build_wrapper, tier, kind, k, x_dtype):
    E, H, I, r, q = 8, 40, 24, 4, 17
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=4, x_dtype=x_dtype, kind=kind)
    if kind in ("sparse", "same_set") or (kind, k) == ("one_expert", 1):
        assert len(torch.unique(ids)) < E  # some experts really get no token
    if kind == "one_expert":
        assert bool((ids[:, 0] == ids[0, 0]).all())  # one expert has every token
    w = build_wrapper(layer, k, tier=tier)
    res = sft_step(w, x, ids, wts, go)
    check_step(layer, x, ids, wts, go, res, what=f"{tier} {kind} k={k}")


def test_top1_all_tokens_on_one_expert(build_wrapper, tier):
    E, H, I, r, q, k = 6, 77, 50, 4, 40, 1
    layer, _, _, x, go = make_case(E, H, I, r, q, k, seed=5)
    ids = torch.full((q, 1), 4, dtype=torch.int64)
    wts = torch.rand(q, 1, generator=torch.Generator().manual_seed(5)) + 0.5
    w = build_wrapper(layer, k, tier=tier)
    res = sft_step(w, x, ids, wts, go)
    check_step(layer, x, ids, wts, go, res, what=f"{tier} top-1 on expert 4")


# ---------------------------------------------------------------------------
# save_for_backward=False
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=_dt_name)
def test_no_save_matches_save(build_wrapper, tier, x_dtype):
    E, H, I, r, q, k = 8, 40, 24, 4, 17, 2
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=6, x_dtype=x_dtype)
    w = build_wrapper(layer, k, tier=tier)
    out_ns = w.forward_sft(x, ids, wts, save_for_backward=False).clone()
    assert w._cache_depth == 0
    out_s = w.forward_sft(x, ids, wts, save_for_backward=True).clone()
    assert w._cache_depth == 1
    assert out_ns.dtype == x.dtype and out_ns.shape == x.shape
    tol = SAME_BF16_TOL if x_dtype == BF16 else SAME_FP32_TOL
    assert rel_err(out_ns, out_s) <= tol
    assert rel_err(out_ns, layer.reference(x, ids, wts)) <= (BF16_TOL if x_dtype == BF16 else FP32_TOL)
    w.backward(go)
    assert w._cache_depth == 0


def test_no_save_forward_does_not_disturb_saved_cache(build_wrapper, tier):
    """A forward without save between a saved forward and its backward."""
    E, H, I, r, k = 8, 40, 24, 4, 2
    layer, ids, wts, x, go = make_case(E, H, I, r, 17, k, seed=7)
    ids2, wts2 = make_routing(33, E, k, seed=8)
    x2, _ = make_inputs(33, H, seed=8)
    w = build_wrapper(layer, k, tier=tier)
    out = w.forward_sft(x, ids, wts, save_for_backward=True).clone()
    out2 = w.forward_sft(x2, ids2, wts2, save_for_backward=False)
    assert rel_err(out2, layer.reference(x2, ids2, wts2)) <= FP32_TOL
    assert w._cache_depth == 1
    gin, gl, gw = w.backward(go, return_grad_weights=True)
    check_step(layer, x, ids, wts, go, (out, gin, gl, gw), what=f"{tier} interleaved no-save forward")


def test_no_save_without_lora_is_base_layer(build_wrapper, tier):
    """Before init_lora_weights, forward_sft(save_for_backward=False) is the base MoE."""
    E, H, I, r, q, k = 8, 77, 24, 4, 17, 2
    layer, ids, wts, x, _ = make_case(E, H, I, r, q, k, seed=9)
    w = build_wrapper(layer, k, tier=tier, init_lora=False)
    out = w.forward_sft(x, ids, wts, save_for_backward=False)
    zero = {n: torch.zeros_like(t) for n, t in layer.loras.items()}
    assert rel_err(out, layer.reference(x, ids, wts, loras=zero)) <= FP32_TOL
    assert w._cache_depth == 0


def test_base_weights_are_copied(build_wrapper, tier):
    """load_weights_from_tensors copies: changing the source later has no effect."""
    E, H, I, r, q, k = 4, 40, 24, 4, 9, 2
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=10)
    gate, up, down = layer.gate.clone(), layer.up.clone(), layer.down.clone()
    w = build_wrapper(layer, k, tier=tier, load=False)
    w.load_weights_from_tensors(gate, up, down, torch.arange(E))
    gate.zero_()
    up.mul_(-3)
    del down
    gc.collect()
    res = sft_step(w, x, ids, wts, go)
    check_step(layer, x, ids, wts, go, res, what=f"{tier} weights copied")


# ---------------------------------------------------------------------------
# Tiers and thread pools
# ---------------------------------------------------------------------------

TIER_CASES = [
    (8, 77, 50, 4, 17, 4, F32, F32),
    (8, 160, 96, 8, 40, 2, F32, F32),
    (8, 77, 50, 4, 17, 2, BF16, F32),
    (8, 77, 50, 4, 17, 2, F32, BF16),
    (6, 40, 16, 3, 1, 1, F32, F32),
]


@pytest.mark.parametrize(
    "E,H,I,r,q,k,x_dtype,lora_dtype",
    TIER_CASES,
    ids=[f"H{c[1]}-I{c[2]}-q{c[4]}-k{c[5]}-x{_dt_name(c[6])}-lora{_dt_name(c[7])}" for c in TIER_CASES],
)
def test_tier_matches_ref_tier(build_wrapper, nonref_tier, E, H, I, r, q, k, x_dtype, lora_dtype):
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=11, x_dtype=x_dtype, lora_dtype=lora_dtype)
    w_ref = build_wrapper(layer, k, tier="ref")
    res_ref = sft_step(w_ref, x, ids, wts, go)
    del w_ref
    w = build_wrapper(layer, k, tier=nonref_tier)
    res = sft_step(w, x, ids, wts, go)
    compare_results(res, res_ref, what=f"{nonref_tier} vs ref")
    check_step(layer, x, ids, wts, go, res, what=f"{nonref_tier}")


@pytest.mark.parametrize("I", [50, 96])
def test_threadpool_count_2_matches_1(build_wrapper, tier, I):
    """Splitting the intermediate dimension over 2 thread pools (TP) changes nothing."""
    E, H, r, q, k = 8, 77, 4, 17, 2
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=12)
    gc.collect()
    w1 = build_wrapper(layer, k, tier=tier, threadpool_count=1)
    res1 = sft_step(w1, x, ids, wts, go)
    del w1
    gc.collect()  # the CPUInfer singleton may only be re-shaped once no wrapper is alive
    w2 = build_wrapper(layer, k, tier=tier, threadpool_count=2)
    res2 = sft_step(w2, x, ids, wts, go)
    # a second round on the same TP wrapper (buffer reuse across pools)
    res2b = sft_step(w2, x, ids, wts, go)
    del w2
    gc.collect()
    compare_results(res2, res1, what=f"{tier} TP=2 vs TP=1")
    compare_results(res2b, res1, what=f"{tier} TP=2 (2nd call) vs TP=1")
    check_step(layer, x, ids, wts, go, res2, what=f"{tier} TP=2")


# ---------------------------------------------------------------------------
# LoRA updates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lora_dtype", [F32, BF16], ids=_dt_name)
def test_lora_in_place_update(build_wrapper, tier, lora_dtype):
    E, H, I, r, q, k = 8, 40, 24, 4, 17, 2
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=13, lora_dtype=lora_dtype)
    w = build_wrapper(layer, k, tier=tier)
    res0 = sft_step(w, x, ids, wts, go)
    check_step(layer, x, ids, wts, go, res0, what="before update")

    ptrs = {n: getattr(w, n).data_ptr() for n in LORA_NAMES}
    delta = make_loras(E, H, I, r, seed=99, lora_dtype=lora_dtype, alpha=layer.alpha, rel_scale=0.3)
    w.gate_lora_b.add_(delta["gate_lora_b"])  # like an optimizer step: in place
    for n in LORA_NAMES:
        if n != "gate_lora_b":
            getattr(w, n).add_(delta[n])
    w.update_lora_weights()
    for n in LORA_NAMES:
        assert getattr(w, n).data_ptr() == ptrs[n]

    res1 = sft_step(w, x, ids, wts, go)
    # layer.loras are the same tensors, i.e. hold the new values
    check_step(layer, x, ids, wts, go, res1, what=f"{tier} after in-place update")
    assert rel_err(res1[0], res0[0]) > 1e-2, "the update should visibly change the output"


def test_lora_replaced_by_init_again(build_wrapper, tier):
    E, H, I, r, q, k = 8, 40, 24, 4, 17, 2
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=14)
    w = build_wrapper(layer, k, tier=tier)
    check_step(layer, x, ids, wts, go, sft_step(w, x, ids, wts, go), what="old LoRA")

    new = make_loras(E, H, I, r, seed=55, lora_dtype=F32, alpha=layer.alpha)
    w.init_lora_weights(*[new[n] for n in LORA_NAMES])
    assert w._lora_initialized
    for n in LORA_NAMES:
        assert getattr(w, n).data_ptr() == new[n].data_ptr()
    res = sft_step(w, x, ids, wts, go)
    check_step(layer, x, ids, wts, go, res, loras=new, what=f"{tier} new LoRA tensors")

    # the old tensors are no longer read
    for t in layer.loras.values():
        t.fill_(1.0)
    out = w.forward_sft(x, ids, wts, save_for_backward=False)
    assert rel_err(out, res[0]) <= SAME_FP32_TOL


def test_lora_attribute_replaced_then_update(build_wrapper, tier):
    """Assigning new tensors to w.<lora> and calling update_lora_weights() re-binds."""
    E, H, I, r, q, k = 4, 32, 16, 2, 9, 2
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=15)
    w = build_wrapper(layer, k, tier=tier)
    sft_step(w, x, ids, wts, go)
    new = make_loras(E, H, I, r, seed=66, lora_dtype=F32, alpha=layer.alpha)
    for n in LORA_NAMES:
        setattr(w, n, new[n])
    w.update_lora_weights()
    res = sft_step(w, x, ids, wts, go)
    check_step(layer, x, ids, wts, go, res, loras=new, what=f"{tier} re-bound LoRA tensors")


# ---------------------------------------------------------------------------
# Forward cache and buffer reuse
# ---------------------------------------------------------------------------


def test_cache_depth_2_lifo(build_wrapper, tier):
    E, H, I, r, k = 8, 40, 24, 4, 2
    layer = make_layer(E, H, I, r, seed=16)
    ids_a, wts_a = make_routing(17, E, k, seed=16)
    x_a, go_a = make_inputs(17, H, seed=16)
    ids_b, wts_b = make_routing(5, E, k, seed=17, kind="sparse")
    x_b, go_b = make_inputs(5, H, seed=17)
    w = build_wrapper(layer, k, tier=tier, max_cache_depth=2)
    assert w.max_cache_depth == 2

    out_a = w.forward_sft(x_a, ids_a, wts_a, save_for_backward=True).clone()
    assert w._cache_depth == 1
    out_b = w.forward_sft(x_b, ids_b, wts_b, save_for_backward=True).clone()
    assert w._cache_depth == 2

    # newest first: the first backward belongs to the second forward
    gin_b, gl_b, gw_b = w.backward(go_b, return_grad_weights=True)
    gin_b, gl_b, gw_b = gin_b.clone(), {n: g.clone() for n, g in gl_b.items()}, gw_b.clone()
    assert w._cache_depth == 1
    gin_a, gl_a, gw_a = w.backward(go_a, return_grad_weights=True)
    assert w._cache_depth == 0

    check_step(layer, x_b, ids_b, wts_b, go_b, (out_b, gin_b, gl_b, gw_b), what=f"{tier} LIFO 1st backward")
    check_step(layer, x_a, ids_a, wts_a, go_a, (out_a, gin_a, gl_a, gw_a), what=f"{tier} LIFO 2nd backward")


def test_repeated_calls_with_varying_qlen(build_wrapper, tier):
    E, H, I, r, k = 8, 77, 50, 4, 2
    layer = make_layer(E, H, I, r, seed=18)
    w = build_wrapper(layer, k, tier=tier)
    kinds = ["random", "sparse", "random", "one_expert", "random", "same_set", "random"]
    for i, q in enumerate([17, 1, 40, 3, 40, 2, 17]):
        x_dtype = BF16 if i % 3 == 2 else F32
        ids, wts = make_routing(q, E, k, seed=100 + i, kind=kinds[i])
        x, go = make_inputs(q, H, seed=100 + i, dtype=x_dtype)
        res = sft_step(w, x, ids, wts, go)
        check_step(layer, x, ids, wts, go, res, what=f"{tier} call {i} q={q} {x_dtype}")
        assert w._cache_depth == 0


@pytest.mark.slow
def test_larger_layer_default_tier(build_wrapper):
    """One bigger shape on the default (best) tier."""
    E, H, I, r, q, k = 16, 512, 384, 16, 64, 4
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=19)
    w = build_wrapper(layer, k)
    res = sft_step(w, x, ids, wts, go)
    check_step(layer, x, ids, wts, go, res, what="default tier, larger layer")


def test_skip_expert_id(build_wrapper, tier):
    """Expert id -1 (KTMOE_SKIP_EXPERT) routes nothing: the result equals the
    layer with those slots' routing weights set to 0, and their
    routing-weight gradient is 0."""
    E, H, I, r, q, k = 8, 40, 24, 4, 13, 3
    layer, ids, wts, x, go = make_case(E, H, I, r, q, k, seed=21)
    skipped = ids.clone()
    skipped[::2, 1] = -1
    skipped[5, :] = -1  # a token with no expert at all
    w = build_wrapper(layer, k, tier=tier)
    out, gi, gl, gw = sft_step(w, x, skipped, wts, go)
    del w
    keep = skipped >= 0
    ref_ids = torch.where(keep, ids, ids[:, :1])  # any valid id: its weight is 0
    ref_w = torch.where(keep, wts, torch.zeros_like(wts))
    r_out, r_gx, r_gw, r_gl = layer.reference_grads(x, ref_ids, ref_w, go)
    assert rel_err(out, r_out) < FP32_TOL
    assert rel_err(gi, r_gx) < FP32_TOL
    assert torch.all(gw[~keep] == 0)
    assert rel_err(gw[keep], r_gw[keep]) < FP32_TOL
    for n in GRAD_NAMES:
        assert rel_err(gl[n], r_gl[n]) < FP32_TOL, n
    assert torch.all(out[5] == 0) and torch.all(gi[5] == 0)
