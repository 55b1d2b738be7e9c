"""End-to-end use of the SFT wrapper: a short AdamW fine-tuning loop on the six
LoRA tensors, and CUDA hidden states (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

ktmoe = pytest.importorskip("ktmoe")

from reference import GRAD_NAMES, LORA_NAMES, make_inputs, make_layer, make_loras, make_routing, rel_err, sft_step  # noqa: E402

F32 = torch.float32
BF16 = torch.bfloat16


@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["x-fp32", "x-bf16"])
def test_adamw_loop_reduces_loss(build_wrapper, x_dtype):
    """20 AdamW steps on fp32 LoRA params fit a target made by a different LoRA."""
    E, H, I, r, q, k = 8, 64, 32, 4, 32, 2
    layer = make_layer(E, H, I, r, seed=31, lora_dtype=F32)
    teacher = make_loras(E, H, I, r, seed=32, lora_dtype=F32, alpha=layer.alpha, rel_scale=0.3)
    ids, wts = make_routing(q, E, k, seed=31)
    x, _ = make_inputs(q, H, seed=31, dtype=x_dtype)
    target = layer.reference(x, ids, wts, loras=teacher).to(F32)

    w = build_wrapper(layer, k)
    params = [getattr(w, n) for n in LORA_NAMES]  # the very tensors the kernel reads
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

    def loss_and_grad(out):
        diff = out.float() - target
        return float((diff * diff).mean()), (2.0 * diff / diff.numel())

    losses = []
    for step in range(20):
        out = w.forward_sft(x, ids, wts, save_for_backward=True)
        loss, grad_out = loss_and_grad(out)
        losses.append(loss)
        grad_input, grad_loras = w.backward(grad_out.to(x_dtype))
        assert torch.isfinite(grad_input.float()).all()
        for n, p in zip(LORA_NAMES, params):
            g = grad_loras["grad_" + n]
            assert g.shape == p.shape and g.dtype == p.dtype
            p.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        w.update_lora_weights()
        for n, p in zip(LORA_NAMES, params):  # AdamW updates in place
            assert getattr(w, n).data_ptr() == p.data_ptr()

    final, _ = loss_and_grad(w.forward_sft(x, ids, wts, save_for_backward=False))
    assert all(l == l for l in losses), losses  # no NaN
    assert final < 0.7 * losses[0], f"loss {losses[0]:.4g} -> {final:.4g} ({losses})"
    # the kernel's view of the LoRA weights follows the optimizer
    ref_final = layer.reference(x, ids, wts)  # layer.loras are the optimized tensors
    assert rel_err(w.forward_sft(x, ids, wts, save_for_backward=False), ref_final) <= (
        2e-3 if x_dtype == F32 else 1e-2
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("routing_on_cuda", [True, False], ids=["routing-cuda", "routing-cpu"])
def test_cuda_hidden_states(build_wrapper, x_dtype, routing_on_cuda):
    E, H, I, r, q, k = 8, 77, 50, 4, 17, 2
    layer = make_layer(E, H, I, r, seed=41)
    ids, wts = make_routing(q, E, k, seed=41)
    x, go = make_inputs(q, H, seed=41, dtype=x_dtype)
    w = build_wrapper(layer, k)
    res_cpu = sft_step(w, x, ids, wts, go)

    dev = torch.device("cuda")
    ids_d, wts_d = (ids.to(dev), wts.to(dev)) if routing_on_cuda else (ids, wts)
    out = w.forward_sft(x.to(dev), ids_d, wts_d, save_for_backward=True)
    assert out.device.type == "cuda"
    assert out.dtype == x_dtype and tuple(out.shape) == (q, H)
    grad_input, grad_loras, grad_weights = w.backward(go.to(dev), return_grad_weights=True)
    assert grad_input.device.type == "cuda"
    assert grad_input.dtype == x_dtype
    assert tuple(grad_weights.shape) == (q, k)

    same = 1e-2 if x_dtype == BF16 else 1e-4
    out_c, gin_c, gl_c, gw_c = res_cpu
    assert rel_err(out.cpu(), out_c) <= same
    assert rel_err(grad_input.cpu(), gin_c) <= same
    assert rel_err(grad_weights.cpu(), gw_c) <= same
    for g in GRAD_NAMES:
        assert grad_loras[g].dtype == gl_c[g].dtype
        assert rel_err(grad_loras[g].cpu(), gl_c[g]) <= same, g
