"""Error contract of the SFT wrapper: every misuse raises a Python exception
(ValueError / RuntimeError with a stable message prefix), never crashes, and
leaves the wrapper usable."""

from __future__ import annotations

import gc
import inspect

import pytest
import torch

ktmoe = pytest.importorskip("ktmoe")

from reference import LORA_NAMES, lora_shapes, make_inputs, make_layer, make_routing, rel_err, sft_step  # noqa: E402

E, H, I, R, K, Q = 8, 32, 16, 4, 2, 5


@pytest.fixture
def layer():
    return make_layer(E, H, I, R, seed=21)


@pytest.fixture
def batch():
    ids, wts = make_routing(Q, E, K, seed=21)
    x, go = make_inputs(Q, H, seed=21)
    return x, ids, wts, go


@pytest.fixture
def ready(build_wrapper, layer):
    """A loaded wrapper with LoRA initialized (E=8, H=32, I=16, r=4, k=2)."""
    return build_wrapper(layer, K)


def _assert_still_works(w, layer, batch):
    """After an error the wrapper has no stray cache entry and computes correctly."""
    x, ids, wts, go = batch
    assert w._cache_depth == 0
    out, _, _, _ = sft_step(w, x, ids, wts, go)
    assert rel_err(out, layer.reference(x, ids, wts)) <= 2e-3
    assert w._cache_depth == 0


# ---------------------------------------------------------------------------
# Module level
# ---------------------------------------------------------------------------


def test_sft_methods_and_exports():
    assert "AMXBF16_SFT" in ktmoe.SFT_METHODS
    info = ktmoe.cpu_info()
    assert isinstance(info, dict)
    for key in ("features", "compiled_tiers", "usable_tiers", "selected_tier"):
        assert key in info, key
    assert "ref" in info["compiled_tiers"]
    assert "ref" in info["usable_tiers"]
    assert set(info["usable_tiers"]) <= set(info["compiled_tiers"])
    assert info["selected_tier"] in info["usable_tiers"]


# ---------------------------------------------------------------------------
# Constructor validation
# ---------------------------------------------------------------------------


def test_unknown_mode(make_wrapper):
    with pytest.raises(ValueError, match=r"Unknown mode: 'xyz'"):
        make_wrapper(mode="xyz")


@pytest.mark.parametrize("method", ["FOO", "AMXINT4"])
def test_method_not_supported_in_sft_mode(make_wrapper, method):
    with pytest.raises(ValueError, match=rf"Method '{method}' is not supported in SFT mode"):
        make_wrapper(method=method, mode="sft")


def test_sft_method_in_inference_mode(make_wrapper):
    with pytest.raises(ValueError, match=r"Method 'AMXBF16_SFT' is not supported in inference mode"):
        make_wrapper(method="AMXBF16_SFT", mode="inference")


@pytest.mark.parametrize("name", ["num_experts", "hidden_size", "moe_intermediate_size", "num_experts_per_tok"])
@pytest.mark.parametrize("value", [0, -1])
def test_dimension_must_be_positive(make_wrapper, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be positive"):
        make_wrapper(**{name: value})


def test_topk_cannot_exceed_num_experts(make_wrapper):
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(9\) cannot exceed num_experts \(8\)"):
        make_wrapper(num_experts=8, num_experts_per_tok=9)


@pytest.mark.parametrize(
    "name,value",
    [("lora_rank", 0), ("lora_rank", -2), ("lora_alpha", 0.0), ("lora_alpha", -1.0),
     ("max_cache_depth", 0), ("max_cache_depth", -1)],
)
def test_sft_parameter_must_be_positive(make_wrapper, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be positive"):
        make_wrapper(**{name: value})


def test_intermediate_size_divisible_by_threadpool_count(make_wrapper):
    gc.collect()
    with pytest.raises(ValueError, match=r"intermediate_size \(\d+\) must be divisible by threadpool_count \(\d+\)"):
        make_wrapper(moe_intermediate_size=51, threadpool_count=2)
    with pytest.raises(ValueError, match=r"intermediate_size \(51\) must be divisible by threadpool_count \(2\)"):
        make_wrapper(moe_intermediate_size=51, threadpool_count=2)


def test_unknown_isa(make_wrapper):
    with pytest.raises(ValueError):
        make_wrapper(isa="no-such-tier")


def test_compiled_but_unusable_isa(make_wrapper):
    info = ktmoe.cpu_info()
    unusable = [t for t in info["compiled_tiers"] if t not in info["usable_tiers"]]
    if not unusable:
        pytest.skip("every compiled tier is usable on this CPU")
    with pytest.raises(ValueError):
        make_wrapper(isa=unusable[0])


def test_thread_pool_shape_is_a_process_singleton(make_wrapper):
    gc.collect()
    w1 = make_wrapper(threadpool_count=1, moe_intermediate_size=16)
    with pytest.raises(RuntimeError):
        make_wrapper(threadpool_count=2, moe_intermediate_size=16)
    # same shape is fine while w1 lives
    w_same = make_wrapper(threadpool_count=1, moe_intermediate_size=16)
    del w1, w_same
    gc.collect()
    w2 = make_wrapper(threadpool_count=2, moe_intermediate_size=16)
    del w2
    gc.collect()


# ---------------------------------------------------------------------------
# State errors
# ---------------------------------------------------------------------------


def test_forward_before_weights_loaded(build_wrapper, layer, batch):
    x, ids, wts, _ = batch
    w = build_wrapper(layer, K, load=False, init_lora=False)
    with pytest.raises(RuntimeError, match=r"Weights not loaded"):
        w.forward_sft(x, ids, wts, save_for_backward=False)
    assert w._cache_depth == 0


def test_forward_with_lora_but_no_weights(build_wrapper, layer, batch):
    x, ids, wts, _ = batch
    w = build_wrapper(layer, K, load=False, init_lora=True)
    with pytest.raises(RuntimeError, match=r"Weights not loaded"):
        w.forward_sft(x, ids, wts, save_for_backward=True)
    assert w._cache_depth == 0


def test_forward_save_before_lora_init(build_wrapper, layer, batch):
    x, ids, wts, _ = batch
    w = build_wrapper(layer, K, load=True, init_lora=False)
    with pytest.raises(RuntimeError, match=r"LoRA weights not initialized"):
        w.forward_sft(x, ids, wts, save_for_backward=True)
    assert w._cache_depth == 0
    w.init_lora_weights(*layer.lora_list())
    _assert_still_works(w, layer, batch)


def test_update_lora_before_init(build_wrapper, layer):
    w = build_wrapper(layer, K, load=True, init_lora=False)
    with pytest.raises(RuntimeError, match=r"LoRA weights not initialized"):
        w.update_lora_weights()


def test_forward_cache_full(ready, layer, batch):
    x, ids, wts, go = batch
    out = ready.forward_sft(x, ids, wts, save_for_backward=True).clone()
    x2, _ = make_inputs(Q, H, seed=99)
    with pytest.raises(RuntimeError, match=r"Forward cache full"):
        ready.forward_sft(x2, ids, wts, save_for_backward=True)
    assert ready._cache_depth == 1
    # the failed forward did not clobber the saved entry
    gin, gl, gw = ready.backward(go, return_grad_weights=True)
    _, ref_gx, ref_gw, ref_gl = layer.reference_grads(x, ids, wts, go)
    assert rel_err(gin, ref_gx) <= 2e-3
    assert rel_err(gw, ref_gw) <= 2e-3
    for n in LORA_NAMES:
        assert rel_err(gl["grad_" + n], ref_gl["grad_" + n]) <= 2e-3, n
    assert rel_err(out, layer.reference(x, ids, wts)) <= 2e-3
    assert ready._cache_depth == 0


def test_forward_cache_full_depth_2(build_wrapper, layer, batch):
    x, ids, wts, go = batch
    w = build_wrapper(layer, K, max_cache_depth=2)
    w.forward_sft(x, ids, wts, save_for_backward=True)
    w.forward_sft(x, ids, wts, save_for_backward=True)
    with pytest.raises(RuntimeError, match=r"Forward cache full"):
        w.forward_sft(x, ids, wts, save_for_backward=True)
    assert w._cache_depth == 2
    w.backward(go)
    w.backward(go)
    assert w._cache_depth == 0
    _assert_still_works(w, layer, batch)


def test_backward_with_empty_cache(ready, layer, batch):
    x, ids, wts, go = batch
    with pytest.raises(RuntimeError, match=r"No forward cache available"):
        ready.backward(go)
    # a forward without save leaves nothing to backward through
    ready.forward_sft(x, ids, wts, save_for_backward=False)
    with pytest.raises(RuntimeError, match=r"No forward cache available"):
        ready.backward(go, return_grad_weights=True)
    # one forward, one backward; the second backward fails
    ready.forward_sft(x, ids, wts, save_for_backward=True)
    ready.backward(go)
    with pytest.raises(RuntimeError, match=r"No forward cache available"):
        ready.backward(go)
    _assert_still_works(ready, layer, batch)


# ---------------------------------------------------------------------------
# LoRA / weight shape errors
# ---------------------------------------------------------------------------


def _bad_shapes(name):
    """A few wrong shapes for LoRA tensor ``name``."""
    good = lora_shapes(E, H, I, R)[name]
    return [
        (good[0] + 1,) + good[1:],  # wrong expert count
        (good[0], good[1] + 1, good[2]),
        (good[0], good[1], good[2] + 1),
        (good[0], good[2], good[1]),  # transposed
        good[1:],  # missing expert dim
    ]


@pytest.mark.parametrize("name", LORA_NAMES)
@pytest.mark.parametrize("which", range(5))
def test_lora_shape_mismatch(build_wrapper, layer, batch, name, which):
    w = build_wrapper(layer, K, init_lora=False)
    bad = dict(layer.loras)
    shape = _bad_shapes(name)[which]
    if tuple(shape) == tuple(layer.loras[name].shape):  # e.g. transposing a square matrix
        pytest.skip("shape coincides with the valid one")
    bad[name] = torch.zeros(shape, dtype=layer.loras[name].dtype)
    with pytest.raises(ValueError, match=rf"{name} shape mismatch"):
        w.init_lora_weights(*[bad[n] for n in LORA_NAMES])
    assert not w._lora_initialized
    w.init_lora_weights(*layer.lora_list())
    _assert_still_works(w, layer, batch)


@pytest.mark.parametrize(
    "which,shape",
    [
        ("gate", (E, I, H + 1)),
        ("gate", (E - 1, I, H)),
        ("up", (E, I + 1, H)),
        ("up", (E, H, I)),
        ("down", (E, I, H)),  # transposed
        ("down", (E, H, I - 1)),
        ("gate", (I, H)),  # missing expert dim
    ],
)
def test_load_weights_shape_mismatch(build_wrapper, layer, batch, which, shape):
    w = build_wrapper(layer, K, load=False, init_lora=False)
    tensors = {"gate": layer.gate, "up": layer.up, "down": layer.down}
    tensors[which] = torch.zeros(shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        w.load_weights_from_tensors(tensors["gate"], tensors["up"], tensors["down"], torch.arange(E))
    assert not w._weights_loaded
    w.load_weights_from_tensors(layer.gate, layer.up, layer.down, torch.arange(E))
    w.init_lora_weights(*layer.lora_list())
    _assert_still_works(w, layer, batch)


# ---------------------------------------------------------------------------
# Input validation of forward_sft (never a crash)
# ---------------------------------------------------------------------------


def _bad_inputs():
    x, ids, wts = "x", "ids", "wts"
    return {
        "x-H+1": (x, torch.randn(Q, H + 1)),
        "x-H-1": (x, torch.randn(Q, H - 1)),
        "x-1d": (x, torch.randn(Q * H)),
        "ids-eq-E": (ids, "set", E),
        "ids-neg": (ids, "set", -2),  # -1 is the documented "skip" id
        "ids-huge": (ids, "set", 1 << 40),
        "ids-k+1": (ids, torch.zeros(Q, K + 1, dtype=torch.int64)),
        "ids-q+1": (ids, torch.zeros(Q + 1, K, dtype=torch.int64)),
        "ids-1d": (ids, torch.zeros(Q * K, dtype=torch.int64)),
        "wts-k+1": (wts, torch.full((Q, K + 1), 0.5)),
        "wts-q-1": (wts, torch.full((Q - 1, K), 0.5)),
        "wts-1d": (wts, torch.full((Q * K,), 0.5)),
    }


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("save", [True, False], ids=["save", "nosave"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_forward_inputs(ready, layer, batch, case, save):
    x, ids, wts, go = batch
    args = {"x": x, "ids": ids.clone(), "wts": wts}
    spec = BAD_INPUTS[case]
    if len(spec) == 3:  # put one out-of-range id somewhere in the middle
        args["ids"][Q // 2, K - 1] = spec[2]
    else:
        args[spec[0]] = spec[1]
    with pytest.raises(ValueError):
        ready.forward_sft(args["x"], args["ids"], args["wts"], save_for_backward=save)
    assert ready._cache_depth == 0
    _assert_still_works(ready, layer, batch)


def test_bad_grad_output_shape(ready, layer, batch):
    x, ids, wts, go = batch
    ready.forward_sft(x, ids, wts, save_for_backward=True)
    with pytest.raises(ValueError):
        ready.backward(torch.randn(Q, H + 1))
    with pytest.raises(ValueError):
        ready.backward(torch.randn(Q + 1, H))
    # the cache entry survives a rejected backward
    assert ready._cache_depth == 1
    ready.backward(go)
    _assert_still_works(ready, layer, batch)


# ---------------------------------------------------------------------------
# Inference entry points on an SFT wrapper
# ---------------------------------------------------------------------------


def _call_with_plausible_args(fn, batch):
    """Call an inference entry point with arguments in the kt-kernel style,
    trimmed to what the signature accepts (so that a TypeError about the
    arguments cannot mask the RuntimeError under test)."""
    x, ids, wts, _ = batch
    plausible = {
        "forward": (x, ids, wts, 0),
        "submit_forward": (x, ids, wts, 0),
        "sync_forward": (x, 0),
        "select_deferred_experts": (ids, wts, 1),
    }[fn.__name__]
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return fn(*plausible)
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return fn(*plausible)
    n = sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return fn(*plausible[:n])


@pytest.mark.parametrize("method", ["forward", "submit_forward", "sync_forward", "select_deferred_experts"])
def test_inference_methods_unavailable_in_sft_mode(ready, batch, method):
    with pytest.raises(RuntimeError, match=r"not available in SFT mode"):
        _call_with_plausible_args(getattr(ready, method), batch)
