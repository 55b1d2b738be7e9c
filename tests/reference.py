"""Float64 PyTorch reference for one SFT MoE layer with LoRA adapters.

This module is deliberately independent of ``ktmoe`` (it must be importable
and testable on its own). Everything is computed in float64 with torch
autograd; inputs of any dtype (bf16 weights included) are converted to float64,
which is exact for bf16 and fp32 values.

Math, for token t and each of its k routed experts e with routing weight w:

    s   = lora_alpha / lora_rank
    g   = x Wg^T + s (x Ag^T) Bg^T        Wg: [I,H]  Ag: [r,H]  Bg: [I,r]
    u   = x Wu^T + s (x Au^T) Bu^T        Wu: [I,H]  Au: [r,H]  Bu: [I,r]
    h   = silu(g) * u
    y_e = h Wd^T + s (h Ad^T) Bd^T        Wd: [H,I]  Ad: [r,I]  Bd: [H,r]
    out_t = sum_e w_e y_e
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

LORA_NAMES: Tuple[str, ...] = (
    "gate_lora_a",
    "gate_lora_b",
    "up_lora_a",
    "up_lora_b",
    "down_lora_a",
    "down_lora_b",
)
GRAD_NAMES: Tuple[str, ...] = tuple("grad_" + n for n in LORA_NAMES)


def lora_shapes(E: int, H: int, I: int, r: int) -> Dict[str, Tuple[int, int, int]]:
    """Shapes of the six LoRA tensors, keyed by LORA_NAMES."""
    return {
        "gate_lora_a": (E, r, H),
        "gate_lora_b": (E, I, r),
        "up_lora_a": (E, r, H),
        "up_lora_b": (E, I, r),
        "down_lora_a": (E, r, I),
        "down_lora_b": (E, H, r),
    }


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


# --------------------------------------------------------------------------
# Reference forward / backward
# --------------------------------------------------------------------------


def silu_glu(g, u):
    return F.silu(g) * u


def swiglu_clamp(alpha: float = 1.702, limit: float = 7.0):
    """GPT-OSS's clamped SwiGLU as transformers' GptOssExperts computes it."""
    def act(g, u):
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    return act


def _forward64(x, ids, weights, gate, up, down, loras, scaling, act=silu_glu):
    """Forward on float64 tensors (x, weights, loras may require grad)."""
    q, H = x.shape
    out = torch.zeros(q, H, dtype=torch.float64)
    ids_cpu = ids.detach().to("cpu", torch.int64)
    for e in torch.unique(ids_cpu).tolist():
        if e < 0:  # a skipped slot (-1) adds nothing
            continue
        tok, slot = (ids_cpu == e).nonzero(as_tuple=True)
        xe = x[tok]
        g = F.linear(xe, gate[e]) + scaling * F.linear(
            F.linear(xe, loras["gate_lora_a"][e]), loras["gate_lora_b"][e]
        )
        u = F.linear(xe, up[e]) + scaling * F.linear(
            F.linear(xe, loras["up_lora_a"][e]), loras["up_lora_b"][e]
        )
        h = act(g, u)
        y = F.linear(h, down[e]) + scaling * F.linear(
            F.linear(h, loras["down_lora_a"][e]), loras["down_lora_b"][e]
        )
        out = out.index_add(0, tok, y * weights[tok, slot].unsqueeze(1))
    return out


def moe_sft_reference(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    loras: Optional[Dict[str, torch.Tensor]],
    scaling: float,
) -> torch.Tensor:
    """Float64 output [q, H] of the layer. ``loras=None`` means no LoRA."""
    E, I, H = gate.shape
    if loras is None:
        r = 1
        loras = {n: torch.zeros(s) for n, s in lora_shapes(E, H, I, r).items()}
    l64 = {n: _f64(loras[n]) for n in LORA_NAMES}
    with torch.no_grad():
        return _forward64(
            _f64(x), ids, _f64(weights), _f64(gate), _f64(up), _f64(down), l64, float(scaling)
        )


def moe_sft_reference_grads(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    loras: Dict[str, torch.Tensor],
    scaling: float,
    grad_output: torch.Tensor,
    act=silu_glu,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Return (out, grad_x, grad_weights, {grad_<lora name>: grad}) in float64.

    The loss is sum(out * grad_output), i.e. grad_output is dL/dout.
    """
    x64 = _f64(x).requires_grad_(True)
    w64 = _f64(weights).requires_grad_(True)
    l64 = {n: _f64(loras[n]).requires_grad_(True) for n in LORA_NAMES}
    with torch.enable_grad():
        out = _forward64(x64, ids, w64, _f64(gate), _f64(up), _f64(down), l64, float(scaling), act)
        leaves = [x64, w64] + [l64[n] for n in LORA_NAMES]
        grads = torch.autograd.grad(out, leaves, grad_outputs=_f64(grad_output), allow_unused=True)
    grads = [torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)]
    grad_x, grad_w = grads[0], grads[1]
    grad_l = {"grad_" + n: g for n, g in zip(LORA_NAMES, grads[2:])}
    return out.detach(), grad_x, grad_w, grad_l


# --------------------------------------------------------------------------
# Error metrics
# --------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference). 0/0 -> 0."""
    a64 = _f64(a)
    b64 = _f64(b)
    num = torch.linalg.vector_norm(a64 - b64).item()
    den = torch.linalg.vector_norm(b64).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


# --------------------------------------------------------------------------
# Random test data
# --------------------------------------------------------------------------


@dataclass
class Layer:
    """Random layer: bf16 base weights and LoRA factors (dtype lora_dtype)."""

    E: int
    H: int
    I: int
    r: int
    alpha: float
    gate: torch.Tensor  # [E, I, H] bf16
    up: torch.Tensor  # [E, I, H] bf16
    down: torch.Tensor  # [E, H, I] bf16
    loras: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def lora_list(self) -> List[torch.Tensor]:
        return [self.loras[n] for n in LORA_NAMES]

    def reference(self, x, ids, weights, loras=None):
        return moe_sft_reference(
            x, ids, weights, self.gate, self.up, self.down,
            self.loras if loras is None else loras, self.scaling,
        )

    def reference_grads(self, x, ids, weights, grad_output, loras=None):
        return moe_sft_reference_grads(
            x, ids, weights, self.gate, self.up, self.down,
            self.loras if loras is None else loras, self.scaling, grad_output,
        )


def make_loras(
    E: int,
    H: int,
    I: int,
    r: int,
    seed: int,
    lora_dtype: torch.dtype = torch.float32,
    alpha: Optional[float] = None,
    rel_scale: float = 0.2,
) -> Dict[str, torch.Tensor]:
    """Random non-zero LoRA factors (A and B both random).

    A ~ N(0, 1/fan_in) so that x A^T has unit-order entries; B is scaled by
    rel_scale / (sqrt(r) * s) so that the LoRA term s (x A^T) B^T has about
    rel_scale times the magnitude of the base projection (which is O(1) for
    unit-variance inputs and 1/sqrt(fan_in) base weights).
    """
    if alpha is None:
        alpha = 2.0 * r
    s = alpha / r
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    shapes = lora_shapes(E, H, I, r)
    fan_in_a = {"gate_lora_a": H, "up_lora_a": H, "down_lora_a": I}
    out = {}
    for n in LORA_NAMES:
        t = torch.randn(shapes[n], generator=gen, dtype=torch.float32)
        if n.endswith("_a"):
            t = t / math.sqrt(fan_in_a[n])
        else:
            t = t * (rel_scale / (math.sqrt(r) * s))
        out[n] = t.to(lora_dtype).contiguous()
    return out


def make_layer(
    E: int,
    H: int,
    I: int,
    r: int,
    seed: int = 0,
    lora_dtype: torch.dtype = torch.float32,
    alpha: Optional[float] = None,
    rel_scale: float = 0.2,
) -> Layer:
    """bf16 base weights ~ N(0, 1/fan_in) and random non-zero LoRA factors."""
    if alpha is None:
        alpha = 2.0 * r
    gen = torch.Generator().manual_seed(int(seed))
    gate = (torch.randn(E, I, H, generator=gen) / math.sqrt(H)).to(torch.bfloat16).contiguous()
    up = (torch.randn(E, I, H, generator=gen) / math.sqrt(H)).to(torch.bfloat16).contiguous()
    down = (torch.randn(E, H, I, generator=gen) / math.sqrt(I)).to(torch.bfloat16).contiguous()
    loras = make_loras(E, H, I, r, seed, lora_dtype, alpha, rel_scale)
    return Layer(E=E, H=H, I=I, r=r, alpha=float(alpha), gate=gate, up=up, down=down, loras=loras)


ROUTING_KINDS = ("random", "sparse", "one_expert", "same_set")


def make_routing(
    q: int, E: int, k: int, seed: int = 0, kind: str = "random"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return (expert_ids [q,k] int64 with distinct ids per row, weights [q,k] fp32).

    kinds:
      random     - top-k of random router logits (tokens share experts).
      sparse     - only the first max(k, E//2) experts of a random permutation
                   can be chosen, so (for E >= 2k) some experts get no tokens.
      one_expert - every token has the same expert in slot 0 (so with k=1,
                   all tokens go to one expert); the other slots are random.
      same_set   - every token is routed to the same k experts (the order of
                   the slots is permuted per token).
    Weights are the softmax over the k selected logits (rows sum to 1).
    """
    if not 1 <= k <= E:
        raise ValueError("need 1 <= k <= E")
    gen = torch.Generator().manual_seed(int(seed) + 104729)
    logits = torch.randn(q, E, generator=gen)
    if kind == "random":
        vals, ids = torch.topk(logits, k, dim=1)
    elif kind == "sparse":
        perm = torch.randperm(E, generator=gen)
        allowed = perm[: max(k, E // 2)]
        mask = torch.full((E,), float("-inf"))
        mask[allowed] = 0.0
        vals, ids = torch.topk(logits + mask, k, dim=1)
        vals = torch.gather(logits, 1, ids)
    elif kind == "one_expert":
        target = int(torch.randint(E, (1,), generator=gen))
        boosted = logits.clone()
        boosted[:, target] = 1e4
        _, ids = torch.topk(boosted, k, dim=1)
        vals = torch.gather(logits, 1, ids)
    elif kind == "same_set":
        chosen = torch.randperm(E, generator=gen)[:k]
        ids = torch.stack([chosen[torch.randperm(k, generator=gen)] for _ in range(q)]) if q else (
            torch.empty(0, k, dtype=torch.int64))
        vals = torch.gather(logits, 1, ids)
    else:
        raise ValueError(f"unknown routing kind {kind!r}")
    weights = torch.softmax(vals, dim=1).to(torch.float32).contiguous()
    return ids.to(torch.int64).contiguous(), weights


def make_inputs(q: int, H: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(x, grad_output), both [q, H] of the given dtype, unit variance."""
    gen = torch.Generator().manual_seed(int(seed) + 15485863)
    x = torch.randn(q, H, generator=gen).to(dtype).contiguous()
    go = torch.randn(q, H, generator=gen).to(dtype).contiguous()
    return x, go


# --------------------------------------------------------------------------
# Driving a wrapper (duck-typed: no ktmoe import here)
# --------------------------------------------------------------------------


def sft_step(w, x, ids, weights, grad_output):
    """forward_sft(save) + backward(return_grad_weights=True) on wrapper ``w``.

    Returns (out, grad_input, grad_loras, grad_weights), all cloned: the API
    does not promise that returned tensors are not reused buffers, so the
    results are copied before the wrapper is used again.
    """
    out = w.forward_sft(x, ids, weights, save_for_backward=True).clone()
    res = w.backward(grad_output, return_grad_weights=True)
    assert isinstance(res, tuple) and len(res) == 3, type(res)
    grad_input, grad_loras, grad_weights = res
    return (
        out,
        grad_input.clone(),
        {key: v.clone() for key, v in grad_loras.items()},
        grad_weights.clone(),
    )


# --------------------------------------------------------------------------
# Self-check (python tests/reference.py): compares autograd against
# finite differences and a hand-written backward on a tiny layer.
# --------------------------------------------------------------------------


def _self_check() -> None:
    E, H, I, r, q, k = 4, 12, 10, 3, 5, 2
    layer = make_layer(E, H, I, r, seed=1, lora_dtype=torch.float32)
    ids, wts = make_routing(q, E, k, seed=1)
    x, go = make_inputs(q, H, seed=1)
    out, gx, gw, gl = layer.reference_grads(x, ids, wts, go)
    assert torch.allclose(out, layer.reference(x, ids, wts))

    # loop-over-tokens formulation of the forward
    s = layer.scaling
    L = {n: _f64(t) for n, t in layer.loras.items()}
    Wg, Wu, Wd = _f64(layer.gate), _f64(layer.up), _f64(layer.down)
    out2 = torch.zeros(q, H, dtype=torch.float64)
    for t in range(q):
        xt = _f64(x[t])
        for j in range(k):
            e = int(ids[t, j])
            g = Wg[e] @ xt + s * L["gate_lora_b"][e] @ (L["gate_lora_a"][e] @ xt)
            u = Wu[e] @ xt + s * L["up_lora_b"][e] @ (L["up_lora_a"][e] @ xt)
            h = g * torch.sigmoid(g) * u
            y = Wd[e] @ h + s * L["down_lora_b"][e] @ (L["down_lora_a"][e] @ h)
            out2[t] += float(wts[t, j]) * y
    assert rel_err(out, out2) < 1e-12, rel_err(out, out2)

    # grad_weights = <grad_output_t, y_e>
    # central finite differences on a few scalars
    def loss(xx, ww, ll):
        return float((_forward64(xx, ids, ww, Wg, Wu, Wd, ll, s) * _f64(go)).sum())

    x64, w64 = _f64(x), _f64(wts)
    eps = 1e-6
    for (t, c) in [(0, 0), (3, 7)]:
        xp, xm = x64.clone(), x64.clone()
        xp[t, c] += eps
        xm[t, c] -= eps
        fd = (loss(xp, w64, L) - loss(xm, w64, L)) / (2 * eps)
        assert abs(fd - float(gx[t, c])) < 1e-6 * max(1.0, abs(fd)), (fd, float(gx[t, c]))
    for (t, j) in [(1, 0), (4, 1)]:
        wp, wm = w64.clone(), w64.clone()
        wp[t, j] += eps
        wm[t, j] -= eps
        fd = (loss(x64, wp, L) - loss(x64, wm, L)) / (2 * eps)
        assert abs(fd - float(gw[t, j])) < 1e-6 * max(1.0, abs(fd))
    for n in LORA_NAMES:
        e = int(ids[0, 0])
        Lp = {m: v.clone() for m, v in L.items()}
        Lm = {m: v.clone() for m, v in L.items()}
        Lp[n][e, 1, 2] += eps
        Lm[n][e, 1, 2] -= eps
        fd = (loss(x64, w64, Lp) - loss(x64, w64, Lm)) / (2 * eps)
        an = float(gl["grad_" + n][e, 1, 2])
        assert abs(fd - an) < 1e-6 * max(1.0, abs(fd)), (n, fd, an)
        assert gl["grad_" + n].abs().sum() > 0, n

    # routing helpers
    for kind in ROUTING_KINDS:
        for kk in (1, 2, 4):
            ii, ww = make_routing(17, 8, kk, seed=3, kind=kind)
            assert ii.shape == (17, kk) and ww.shape == (17, kk)
            assert ii.dtype == torch.int64 and ww.dtype == torch.float32
            assert all(len(set(row.tolist())) == kk for row in ii)
            assert int(ii.min()) >= 0 and int(ii.max()) < 8
            assert torch.allclose(ww.sum(1), torch.ones(17))
    ii, _ = make_routing(40, 8, 2, seed=0, kind="sparse")
    assert len(torch.unique(ii)) <= 4
    ii, _ = make_routing(40, 8, 1, seed=0, kind="one_expert")
    assert len(torch.unique(ii)) == 1
    ii, _ = make_routing(40, 8, 3, seed=0, kind="same_set")
    assert len(torch.unique(ii)) == 3

    # bf16 LoRA: reference uses the exact bf16 values
    lb = make_layer(E, H, I, r, seed=1, lora_dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in lb.lora_list())
    print("reference self-check OK")


if __name__ == "__main__":
    _self_check()
