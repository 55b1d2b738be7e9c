"""Frozen-experts mode (the ``*_SkipLoRA`` methods): no expert LoRA; the
backward gives grad_input and the routing-weight gradient, against the
float64 autograd reference of the base layer."""

from __future__ import annotations

import gc

import pytest
import torch

ktmoe = pytest.importorskip("ktmoe")

from ktmoe.quant import QuantSpec, dequantize, quantize  # noqa: E402
from reference import (LORA_NAMES, make_inputs, make_layer, make_routing,  # noqa: E402
                       moe_sft_reference_grads, rel_err)

F32 = torch.float32
TOL = 2e-5  # fp32 accumulation vs float64 (observed ~4e-7)

METHODS = ["AMXBF16_SkipLoRA", "AMXINT8_SkipLoRA", "AMXINT4_SkipLoRA", "AMXINT4_KGroup_SkipLoRA",
           "MXFP4_SkipLoRA", "AMXFP8_SkipLoRA"]


def _zero_loras(layer):
    return {n: torch.zeros_like(t) for n, t in layer.loras.items()}


def test_every_sft_method_has_a_skip_lora_twin():
    sft = {m for m in ktmoe.SFT_METHODS if m.endswith("_SFT")}
    assert sft and {m[:-4] + "_SkipLoRA" for m in sft} <= set(ktmoe.SFT_METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tp", [1, 2])
def test_frozen_experts_grads(build_wrapper, tier, method, tp):
    E, H, I, r, q, k = 8, 64, 128, 4, 29, 3
    layer = make_layer(E, H, I, r, seed=3)
    ids, wts = make_routing(q, E, k, seed=4)
    ids[::5, 1] = -1  # skipped slots
    x, go = make_inputs(q, H, seed=5)
    w = build_wrapper(layer, k, tier=tier, init_lora=False, method=method, group_size=32,
                      threadpool_count=tp)
    assert w.skip_lora
    out = w.forward_sft(x, ids, wts, save_for_backward=True).clone()
    gi, grads, gw = w.backward(go, return_grad_weights=True)
    assert grads == {}
    del w
    gc.collect()
    base = method.replace("_SkipLoRA", "_SFT")
    spec = QuantSpec(base, 32)
    deq = [t.to(torch.float64) if spec.format == "bf16" else
           dequantize(quantize(t, spec), spec, t.shape[-1], torch.float64)
           for t in (layer.gate, layer.up, layer.down)]
    r_out, r_gx, r_gw, _ = moe_sft_reference_grads(x, ids, wts, *deq, _zero_loras(layer),
                                                   layer.scaling, go)
    errs = {"out": rel_err(out, r_out), "grad_input": rel_err(gi, r_gx), "grad_weights": rel_err(gw, r_gw)}
    assert max(errs.values()) < TOL, errs
    assert float(gw[::5, 1].abs().max()) == 0.0  # a skipped slot's weight gets no gradient


def test_skip_lora_api(build_wrapper):
    layer = make_layer(4, 32, 64, 2, seed=1)
    w = build_wrapper(layer, 2, init_lora=False, method="AMXBF16_SkipLoRA")
    with pytest.raises(RuntimeError, match="SkipLoRA"):
        w.init_lora_weights(*[layer.loras[n] for n in LORA_NAMES])
    w.update_lora_weights()  # nothing to re-bind: no error
    ids, wts = make_routing(3, 4, 2, seed=2)
    x, go = make_inputs(3, 32, seed=3)
    with pytest.raises(RuntimeError, match="No forward cache"):
        w.backward(go)
    w.forward_sft(x, ids, wts)  # save_for_backward defaults to True
    gi, grads = w.backward(go)
    assert gi.shape == x.shape and grads == {}
    # the LoRA method still needs its LoRA before a saved forward
    w2 = build_wrapper(layer, 2, init_lora=False, method="AMXBF16_SFT")
    with pytest.raises(RuntimeError, match="LoRA weights not initialized"):
        w2.forward_sft(x, ids, wts)
    del w, w2


def test_drop_forward_cache(build_wrapper):
    """drop_forward_cache pops the newest cache unused: the next backward
    uses the one below it (LIFO), and an empty cache is a RuntimeError."""
    layer = make_layer(4, 32, 64, 2, seed=1)
    w = build_wrapper(layer, 2, max_cache_depth=2)
    ids, wts = make_routing(3, 4, 2, seed=2)
    x, go = make_inputs(3, 32, seed=3)
    x2, _ = make_inputs(5, 32, seed=4)
    w.forward_sft(x, ids, wts)
    ids2, wts2 = make_routing(5, 4, 2, seed=5)
    w.forward_sft(x2, ids2, wts2)
    w.drop_forward_cache()
    gi, grads = w.backward(go)  # the first forward's (3 tokens)
    ref = w.forward_sft(x, ids, wts) is not None and w.backward(go)
    assert torch.equal(gi, ref[0])
    for n in grads:
        assert torch.equal(grads[n], ref[1][n])
    with pytest.raises(RuntimeError, match="No forward cache"):
        w.drop_forward_cache()
    del w
