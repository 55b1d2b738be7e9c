"""Inference mode (spec 001 §1.2-1.3): KTMoEWrapper(mode="inference") for
AMXINT8, MOE_INT8, AMXINT4 and MOE_INT4 (ktmoe.inference.NativeMoEWrapper).

Accuracy is checked against the float64 reference run on the *dequantized*
weights (``ktmoe.quant.dequantize`` of the same packing the layer holds), so
only fp32 accumulation differs: the bound is 2e-5 relative (observed ~1e-7)
for fp32 activations, 1e-2 when the output is rounded to bf16 (one bf16 ulp
is 2^-8 relative).  The protocol tests (async, several layers, chunks,
deferral, GPU experts) compare results bit for bit where the computation is
the same, and with the reference where it is not.

CUDA tests skip when CUDA is unavailable.
"""

from __future__ import annotations

import gc
import math
import time

import pytest
import torch

ktmoe = pytest.importorskip("ktmoe")

from ktmoe import KExpertsCPUBuffer, NativeMoEWrapper  # noqa: E402
from ktmoe.experts_base import BaseMoEWrapper  # noqa: E402
from ktmoe.quant import QuantSpec, dequantize, quantize  # noqa: E402
from ktmoe.weight_files import WeightFileError, write_layer  # noqa: E402
from reference import make_inputs, make_layer, make_routing, moe_sft_reference, rel_err  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16
METHODS = ["AMXINT8", "MOE_INT8", "AMXINT4", "MOE_INT4"]
GS = 32  # group size of MOE_INT4 in these tests (H and I are multiples of it)
KERNEL_TOL = 2e-5       # fp32 in/out, same dequantized weights: fp32 accumulation only
KERNEL_BF16_TOL = 1e-2  # output rounded to bf16
E, H, I, K, Q = 8, 64, 64, 3, 29

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def expected_spec(method, group_size=GS, zero_point=True):
    """The documented method -> format mapping (docs/inference.md)."""
    return {
        "AMXINT8": QuantSpec("AMXINT8_SFT"),
        "MOE_INT8": QuantSpec("AMXINT8_SFT"),
        "AMXINT4": QuantSpec("AMXINT4_SFT"),
        "MOE_INT4": QuantSpec("AMXINT4_KGroup_SFT", group_size, zero_point),
    }[method]


def dequantized(layer, spec, pmap=None):
    out = [dequantize(quantize(t, spec), spec, t.shape[-1], torch.float64)
           for t in (layer.gate, layer.up, layer.down)]
    if pmap is not None:
        out = [t[pmap] for t in out]
    return out


def reference(x, ids, wts, gate, up, down):
    """Float64 output; a slot with id -1 adds nothing."""
    skip = ids < 0
    return moe_sft_reference(x, ids.masked_fill(skip, 0), wts.masked_fill(skip, 0.0),
                             gate, up, down, None, 1.0)


def batch(q=Q, k=K, seed=0, dtype=F32, e=E, h=H):
    ids, wts = make_routing(q, e, k, seed=seed + 1)
    x, _ = make_inputs(q, h, seed=seed + 2, dtype=dtype)
    return x, ids, wts


@pytest.fixture
def make_inf(make_wrapper):
    """make_inf(method, layer=None, load=True, **overrides) -> inference wrapper."""

    def factory(method="MOE_INT4", layer=None, load=True, **over):
        # fp32 activations, so results are within fp32 rounding of the
        # reference; the default int8 activations are tested separately
        kw = dict(mode="inference", method=method, num_experts=E, num_experts_per_tok=K,
                  hidden_size=H, moe_intermediate_size=I, group_size=GS, int8_activations=False)
        if layer is not None:
            kw.update(num_experts=layer.E, hidden_size=layer.H, moe_intermediate_size=layer.I)
        kw.update(over)
        w = make_wrapper(**kw)
        if load and layer is not None:
            w.load_weights_from_tensors(layer.gate, layer.up, layer.down)
        return w

    return factory


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
    """The float64 references are tiny: one torch thread avoids its OpenMP
    threads spinning against the pool's workers on small machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def layer():
    return make_layer(E, H, I, 1, seed=0)


# ---------------------------------------------------------------- factory

@pytest.mark.parametrize("method", METHODS)
def test_factory_builds_native_wrapper(make_inf, method, usable_tiers):
    w = make_inf(method)
    assert type(w) is NativeMoEWrapper and isinstance(w, BaseMoEWrapper)
    assert w.method == method
    assert w.quant_specs == (expected_spec(method),) * 3
    assert w.isa in usable_tiers
    assert method in ktmoe.INFERENCE_METHODS


def test_factory_errors(make_inf):
    # FP8 blocks are 128 columns wide
    with pytest.raises(ValueError, match=r"FP8: hidden_size \(64\) must be divisible by group_size \(128\)"):
        make_inf("FP8")
    with pytest.raises(ValueError, match="not supported in inference mode"):
        make_inf("AMXBF16_SFT")
    with pytest.raises(ValueError, match="not supported in inference mode"):
        make_inf("NOPE")
    with pytest.raises(ValueError, match="Unsupported method"):
        NativeMoEWrapper(method="FP8", layer_idx=0, num_experts=E, num_experts_per_tok=K,
                         hidden_size=H, moe_intermediate_size=I, num_gpu_experts=0,
                         cpuinfer_threads=2, threadpool_count=1, weight_path="",
                         chunked_prefill_size=16)


def test_config_errors(make_inf):
    with pytest.raises(ValueError, match="chunked_prefill_size must be positive"):
        make_inf(chunked_prefill_size=0)
    with pytest.raises(ValueError, match="max_deferred_experts_per_token must be >= 0"):
        make_inf(max_deferred_experts_per_token=-1)
    with pytest.raises(ValueError, match=r"num_gpu_experts \(9\) must be in \[0, num_experts=8\]"):
        make_inf(num_gpu_experts=E + 1)
    with pytest.raises(ValueError, match="num_gpu_experts must be >= 0"):
        make_inf(num_gpu_experts=-1)
    with pytest.raises(TypeError, match="num_gpu_experts must be an int"):
        make_inf(num_gpu_experts=1.0)
    with pytest.raises(ValueError, match=r"must be divisible by group_size \(48\)"):
        make_inf("MOE_INT4", group_size=48)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 16"):
        make_inf("MOE_INT4", group_size=20)
    with pytest.raises(ValueError, match="unknown isa"):
        make_inf(isa="sse9")
    with pytest.raises(ValueError, match="num_experts must be positive"):
        make_inf(num_experts=0)


def test_sft_methods_refused(make_inf):
    w = make_inf()
    for name in ("forward_sft", "backward", "init_lora_weights", "update_lora_weights"):
        with pytest.raises(RuntimeError, match="not available in inference mode"):
            getattr(w, name)()


# ---------------------------------------------------------------- accuracy

@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_forward_matches_dequantized_reference(make_inf, layer, method, tier, x_dtype):
    w = make_inf(method, layer, isa=tier)
    assert w.isa == tier
    x, ids, wts = batch(dtype=x_dtype)
    out = w.forward(x, ids, wts)
    assert out.shape == (Q, H) and out.dtype == x_dtype and out.device.type == "cpu"
    want = reference(x, ids, wts, *dequantized(layer, expected_spec(method)))
    err = rel_err(out, want)
    assert err < (KERNEL_TOL if x_dtype == F32 else KERNEL_BF16_TOL), err
    # the weights really are quantized: the unquantized layer differs
    assert rel_err(out, reference(x, ids, wts, layer.gate, layer.up, layer.down)) > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_default_int8_activations(make_inf, layer, method, tier):
    """By default the integer kernels run on int8 activations: within fp32
    rounding of the emulated reference (tests/test_int8_activations.py), ~1%
    from fp32 activations, and the same through submit/sync."""
    from test_int8_activations import EMULATED_TOL, reference as act_reference

    w = make_inf(method, layer, isa=tier, int8_activations=None)
    assert w.int8_activations
    x, ids, wts = batch()
    out = w.forward(x, ids, wts)
    deq = dequantized(layer, expected_spec(method))
    assert rel_err(out, act_reference(x, ids, wts, *deq, True)) < EMULATED_TOL
    assert 1e-4 < rel_err(out, reference(x, ids, wts, *deq)) < 0.03
    w.submit_forward(x, ids, wts)
    assert torch.equal(w.sync_forward(), out)


@pytest.mark.parametrize("threads,pools", [(4, 1), (3, 2)], ids=["4threads", "3threads-2pools"])
@pytest.mark.parametrize("method", ["AMXINT8", "MOE_INT4"])
def test_threads_and_pools_match_reference(make_inf, layer, method, tier, threads, pools):
    """Gate/up and down run in one parallel region, each expert's down tiles
    waiting for its gate/up tiles: with more threads than cores, and with two
    sub-pools (the intermediate dimension split), every path and qlen still
    gives the reference, and the same as one thread."""
    from test_int8_activations import EMULATED_TOL, reference as act_reference

    deq = dequantized(layer, expected_spec(method))
    outs = {}
    for n, tp in ((1, 1), (threads, pools)):
        gc.collect()  # the CPUInfer singleton is re-shaped once no wrapper is alive
        for int8 in (False, True):
            w = make_inf(method, layer, isa=tier, int8_activations=int8, cpuinfer_threads=n, threadpool_count=tp)
            for q in (1, 2, Q):
                x, ids, wts = batch(q=q, seed=q)
                out = w.forward(x, ids, wts)
                if int8:
                    assert rel_err(out, act_reference(x, ids, wts, *deq, True)) < EMULATED_TOL, (n, tp, q)
                else:
                    assert rel_err(out, reference(x, ids, wts, *deq)) < KERNEL_TOL, (n, tp, q)
                outs[(n, tp, int8, q)] = out
            del w
    for (n, tp, int8, q), out in outs.items():
        if n == 1:
            continue
        # one pool: the same sums in the same order as one thread
        if tp == 1:
            assert torch.equal(out, outs[(1, 1, int8, q)]), (int8, q)


def test_int32_ids_and_other_weight_dtypes_accepted(make_inf, layer):
    w = make_inf("AMXINT8", layer)
    x, ids, wts = batch()
    out = w.forward(x, ids, wts)
    assert torch.equal(w.forward(x, ids.int(), wts.double()), out)
    assert torch.equal(w.forward(x, ids.t().contiguous().t(), wts.t().contiguous().t()), out)
    xs = torch.randn(Q, 2 * H)[:, ::2]  # non-contiguous activations
    assert torch.equal(w.forward(xs, ids, wts), w.forward(xs.contiguous(), ids, wts))


def test_weight_bytes_follow_the_format(make_inf, layer):
    sizes = {}
    for m in METHODS:
        w = make_inf(m, layer)
        sizes[m] = w.weight_bytes
        del w
        gc.collect()
    assert sizes["AMXINT8"] == sizes["MOE_INT8"] > sizes["MOE_INT4"] > sizes["AMXINT4"] > 0
    assert sizes["AMXINT8"] >= 3 * E * H * I  # one byte per weight


def test_empty_batch(make_inf, layer):
    w = make_inf("AMXINT4", layer)
    x, ids, wts = batch(q=0)
    assert w.forward(x, ids, wts).shape == (0, H)
    w.submit_forward(x, ids, wts)
    assert w.sync_forward().shape == (0, H)


# ---------------------------------------------------------------- async

@pytest.mark.parametrize("method", METHODS)
def test_sync_and_async_identical(make_inf, layer, method):
    w = make_inf(method, layer)
    for q, seed, dt in ((Q, 0, F32), (5, 1, BF16), (40, 2, F32), (1, 3, F32)):
        x, ids, wts = batch(q=q, seed=seed, dtype=dt)
        want = w.forward(x, ids, wts)
        assert w.submit_forward(x, ids, wts) is None
        got = w.sync_forward(x)
        assert got.dtype == dt and torch.equal(got, want)


def test_submit_stages_its_inputs(make_inf, layer):
    w = make_inf("MOE_INT8", layer)
    x, ids, wts = batch()
    want = w.forward(x, ids, wts)
    xs, idss, wtss = x.clone(), ids.clone(), wts.clone()
    w.submit_forward(xs, idss, wtss)
    xs.fill_(float("nan"))  # the caller may reuse its tensors at once
    idss.fill_(-7)
    wtss.zero_()
    del xs, idss, wtss
    assert torch.equal(w.sync_forward(), want)


def test_submit_overlaps_the_caller(make_inf):
    """submit_forward returns long before the forward is done, and the pool
    computes while the calling thread does something else."""
    e, h, i, k, q = 4, 2048, 1024, 2, 256
    gen = torch.Generator().manual_seed(5)
    w = make_inf("AMXINT8", num_experts=e, num_experts_per_tok=k, hidden_size=h,
                 moe_intermediate_size=i, chunked_prefill_size=4096)
    w.load_weights_from_tensors(*[(torch.randn(s, generator=gen) / math.sqrt(s[-1])).to(BF16)
                                  for s in ((e, i, h), (e, i, h), (e, h, i))])
    x, ids, wts = batch(q=q, k=k, e=e, h=h, seed=5)
    want = w.forward(x, ids, wts)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        w.forward(x, ids, wts)
        times.append(time.perf_counter() - t)
    t_fwd = min(times)
    assert t_fwd > 0.01, f"layer too small to measure overlap ({t_fwd * 1e3:.1f} ms)"
    ok = []
    for _ in range(3):  # shared machines are noisy: one clean attempt suffices
        t0 = time.perf_counter()
        w.submit_forward(x, ids, wts)
        t_submit = time.perf_counter() - t0
        # the caller's own work (e.g. the GPU's attention); a Python step runs too
        side = sum(j * j for j in range(1000))
        time.sleep(1.5 * t_fwd)
        t1 = time.perf_counter()
        got = w.sync_forward()
        t_wait = time.perf_counter() - t1
        assert side == 332833500 and torch.equal(got, want)
        ok.append((t_submit < 0.25 * t_fwd and t_wait < 0.5 * t_fwd, t_submit, t_wait))
        if ok[-1][0]:
            break
    assert any(o[0] for o in ok), (t_fwd, ok)


def test_layers_share_one_cpuinfer(make_inf):
    layers = [make_layer(E, H, I, 1, seed=10 + j) for j in range(3)]
    ws = [make_inf("MOE_INT4", lay, layer_idx=j) for j, lay in enumerate(layers)]
    assert ws[0].cpu_infer is ws[1].cpu_infer is ws[2].cpu_infer
    inputs = [batch(q=q, seed=20 + j) for j, q in enumerate((17, 4, 33))]
    want = [w.forward(*inp) for w, inp in zip(ws, inputs)]
    a, b, c = ws
    # A, B submitted; C's synchronous forward syncs the pool in between;
    # B is synced before A
    a.submit_forward(*inputs[0])
    b.submit_forward(*inputs[1])
    assert torch.equal(c.forward(*inputs[2]), want[2])
    assert torch.equal(b.sync_forward(), want[1])
    assert torch.equal(a.sync_forward(), want[0])
    # all three pending, synced in submission order and in reverse
    for order in ((0, 1, 2), (2, 1, 0)):
        for w, inp in zip(ws, inputs):
            w.submit_forward(*inp)
        for j in order:
            assert torch.equal(ws[j].sync_forward(), want[j])
    # every layer differs (the test would not notice swapped results otherwise)
    assert not torch.equal(want[0][:4], want[1])


def test_task_error_reaches_every_pending_layer(make_inf, layer):
    """The pool reports the first error of all queued tasks; no pending layer
    may then return a result as if nothing happened."""
    a, b, c = (make_inf("AMXINT8", layer, layer_idx=j) for j in range(3))
    x, ids, wts = batch()
    want = a.forward(x, ids, wts)
    a.submit_forward(x, ids, wts)
    b.submit_forward(x, ids, wts)
    bad = torch.full((Q, K), E + 5, dtype=torch.int64)  # bypasses the Python checks
    out = torch.empty(Q, H)
    c._layer.submit_forward(x, bad, wts, out)
    with pytest.raises(ValueError, match="expert"):
        a.sync_forward()
    with pytest.raises(RuntimeError, match="failed while this layer's forward was pending"):
        b.sync_forward()
    with pytest.raises(RuntimeError, match="without a pending submit_forward"):
        b.sync_forward()
    for w in (a, b, c):  # all usable again
        w.submit_forward(x, ids, wts)
        assert torch.equal(w.sync_forward(), want)


# ---------------------------------------------------------------- chunks

@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_chunked_prefill_equals_one_call(make_inf, layer, method, int8):
    """batch_invariant=True: a chunked prefill equals one call bit for bit
    (the kernels' paths do not depend on how many tokens an expert gets)."""
    one = make_inf(method, layer, chunked_prefill_size=512, batch_invariant=True, int8_activations=int8)
    chunked = make_inf(method, layer, layer_idx=1, chunked_prefill_size=7, batch_invariant=True,
                       int8_activations=int8)
    x, ids, wts = batch(q=40, seed=3)
    want = one.forward(x, ids, wts)
    assert torch.equal(chunked.forward(x, ids, wts), want)
    chunked.submit_forward(x, ids, wts)
    assert torch.equal(chunked.sync_forward(), want)
    # the C layer's scratch is that of a 7-token call
    bounded = chunked.buffer_bytes
    chunked.forward(x[:7], ids[:7], wts[:7])
    assert chunked.buffer_bytes == bounded < one.buffer_bytes


@pytest.mark.parametrize("int8", [False, True])
def test_chunked_prefill_default_within_rounding(make_inf, layer, int8):
    """The default (batch_invariant=False) lets the kernels choose their path
    by the tokens an expert gets: chunks and one call agree to rounding."""
    one = make_inf("MOE_INT4", layer, chunked_prefill_size=512, int8_activations=int8)
    chunked = make_inf("MOE_INT4", layer, layer_idx=1, chunked_prefill_size=3, int8_activations=int8)
    assert not one.batch_invariant and not chunked.batch_invariant
    x, ids, wts = batch(q=40, seed=5)
    want = one.forward(x, ids, wts)
    assert rel_err(chunked.forward(x, ids, wts), want) < 1e-5


# ---------------------------------------------------------------- GPU experts

def test_num_gpu_experts_are_skipped(make_inf, layer):
    ngpu = 3
    w = make_inf("MOE_INT4", layer, num_gpu_experts=ngpu)
    full = make_inf("MOE_INT4", layer, layer_idx=1)
    x, ids, wts = batch(q=40, seed=4)
    assert (ids < ngpu).any() and (ids >= ngpu).any()
    out = w.forward(x, ids, wts)
    g, u, d = dequantized(layer, expected_spec("MOE_INT4"))
    for t in (g, u, d):
        t[:ngpu] = 0
    err = rel_err(out, reference(x, ids, wts, g, u, d))
    assert err < KERNEL_TOL, err
    # the same as routing those slots to -1 on a CPU-only layer
    assert torch.equal(out, full.forward(x, ids.masked_fill(ids < ngpu, -1), wts))
    w.submit_forward(x, ids, wts)
    assert torch.equal(w.sync_forward(), out)
    assert not torch.equal(out, full.forward(x, ids, wts))
    del w
    gc.collect()
    everything_on_gpu = make_inf("MOE_INT4", layer, num_gpu_experts=E)
    assert torch.count_nonzero(everything_on_gpu.forward(x, ids, wts)) == 0


# ---------------------------------------------------------------- deferral

def test_select_deferred_experts_hand_checked(make_inf):
    w = make_inf(num_experts_per_tok=4, max_deferred_experts_per_token=2)
    ids = torch.tensor([[5, 2, 7, 1], [3, 0, 6, 4]], dtype=torch.int32)
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.9, 0.05, 0.03, 0.02]])
    ids_before = ids.clone()
    imm, dfr = w.select_deferred_experts(ids, scores, protected_k=1)
    # token 0 ranks slots 1, 2, 3, 0; token 1 ranks 0, 1, 2, 3: the two lowest are deferred
    assert imm.tolist() == [[-1, 2, 7, -1], [3, 0, -1, -1]]
    assert dfr.tolist() == [[5, -1, -1, 1], [-1, -1, 6, 4]]
    assert imm.dtype == dfr.dtype == torch.int64
    assert torch.equal(ids, ids_before)
    # protected_k caps the deferral: k - protected_k = 1 < 2
    imm, dfr = w.select_deferred_experts(ids, scores, protected_k=3)
    assert dfr.tolist() == [[5, -1, -1, -1], [-1, -1, -1, 4]]
    assert imm.tolist() == [[-1, 2, 7, 1], [3, 0, 6, -1]]
    # nothing protected, nothing over the cap of 2
    imm, dfr = w.select_deferred_experts(ids, scores, protected_k=0)
    assert dfr.tolist() == [[5, -1, -1, 1], [-1, -1, 6, 4]]
    # all protected
    imm, dfr = w.select_deferred_experts(ids, scores, protected_k=4)
    assert imm.tolist() == ids.tolist() and (dfr == -1).all()
    # ties: the later slot is deferred first
    imm, dfr = w.select_deferred_experts(ids, torch.full((2, 4), 0.25), protected_k=0)
    assert dfr.tolist() == [[-1, -1, 7, 1], [-1, -1, 6, 4]]
    # the outputs are copies
    imm[0, 0] = 99
    assert ids[0, 0] == 5


@pytest.mark.parametrize("max_deferred", [None, 0])
def test_no_deferral_without_max_deferred(make_inf, max_deferred):
    w = make_inf(max_deferred_experts_per_token=max_deferred)
    _, ids, wts = batch()
    imm, dfr = w.select_deferred_experts(ids, wts, protected_k=0)
    assert torch.equal(imm, ids) and (dfr == -1).all()
    assert imm.data_ptr() != ids.data_ptr()


def test_immediate_and_deferred_sum_to_full_output(make_inf, layer):
    w = make_inf("AMXINT4", layer, max_deferred_experts_per_token=2)
    x, ids, wts = batch(q=33, seed=6)
    full = w.forward(x, ids, wts)
    imm, dfr = w.select_deferred_experts(ids, wts, protected_k=1)
    assert int((dfr >= 0).sum()) == 33 * 2 and int((imm >= 0).sum()) == 33 * 1
    assert torch.equal(torch.where(imm >= 0, imm, dfr), ids)
    out_imm = w.forward(x, imm, wts)              # now
    w.submit_forward(x, dfr, wts)                 # runs during the next attention
    out_dfr = w.sync_forward()                    # added to the next residual
    assert rel_err(out_imm + out_dfr, full) < 1e-6
    deq = dequantized(layer, expected_spec("AMXINT4"))
    assert rel_err(out_imm, reference(x, imm, wts, *deq)) < KERNEL_TOL
    assert rel_err(out_dfr, reference(x, dfr, wts, *deq)) < KERNEL_TOL


def test_select_deferred_experts_errors(make_inf):
    w = make_inf(max_deferred_experts_per_token=1)
    _, ids, wts = batch()
    for bad in (-1, K + 1):
        with pytest.raises(ValueError, match=rf"protected_k must be in \[0, {K}\]"):
            w.select_deferred_experts(ids, wts, bad)
    for bad in (True, 1.0, None):
        with pytest.raises(ValueError, match="protected_k must be an int"):
            w.select_deferred_experts(ids, wts, bad)
    with pytest.raises(ValueError, match="scores shape mismatch"):
        w.select_deferred_experts(ids, wts[:-1], 1)
    with pytest.raises(ValueError, match="expert_ids shape mismatch"):
        w.select_deferred_experts(ids[:, :2], wts[:, :2], 1)
    with pytest.raises(ValueError, match="expert_ids must be int64"):
        w.select_deferred_experts(ids.float(), wts, 1)
    with pytest.raises(ValueError, match="scores must be floating point"):
        w.select_deferred_experts(ids, ids, 1)
    with pytest.raises(TypeError, match="expert_ids must be a torch.Tensor"):
        w.select_deferred_experts(ids.tolist(), wts, 1)


# ---------------------------------------------------------------- cpu_save

@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_cpu_save_on_cpu(make_inf, layer, x_dtype):
    w = make_inf("MOE_INT8", layer, cpu_save=True)
    plain = make_inf("MOE_INT8", layer, layer_idx=1)
    x, ids, wts = batch(dtype=x_dtype)
    out = w.forward(x, ids, wts)
    assert out.device.type == "cpu" and out.dtype == x_dtype
    assert torch.equal(out, plain.forward(x, ids, wts))
    w.submit_forward(x, ids, wts)
    assert torch.equal(w.sync_forward(), out)


# ---------------------------------------------------------------- weight files

@pytest.mark.parametrize("method", METHODS)
def test_load_weights_from_files(make_inf, tmp_path, method):
    src = make_layer(10, H, I, 1, seed=7)  # 10 source experts, 8 physical
    spec = expected_spec(method)
    parts = [quantize(t, spec) for t in (src.gate, src.up, src.down)]
    write_layer(tmp_path, 3, spec, *parts, hidden_size=H, intermediate_size=I)
    pmap = torch.tensor([9, 3, 3, 0, 7, 1, 5, 2])
    w = make_inf(method, layer_idx=3, weight_path=str(tmp_path))
    w.load_weights(pmap)
    x, ids, wts = batch(q=31, seed=8)
    out = w.forward(x, ids, wts)
    err = rel_err(out, reference(x, ids, wts, *dequantized(src, spec, pmap)))
    assert err < KERNEL_TOL, err
    # the same packing as quantizing the tensors online
    online = make_inf(method, layer_idx=4)
    online.load_weights_from_tensors(src.gate, src.up, src.down, pmap)
    assert torch.equal(online.forward(x, ids, wts), out)


def test_load_weights_errors(make_inf, tmp_path, layer):
    spec = expected_spec("AMXINT8")
    parts = [quantize(t, spec) for t in (layer.gate, layer.up, layer.down)]
    write_layer(tmp_path, 0, spec, *parts, hidden_size=H, intermediate_size=I)
    with pytest.raises(RuntimeError, match="needs weight_path"):
        make_inf("AMXINT8").load_weights(torch.arange(E))
    with pytest.raises(WeightFileError, match="method mismatch"):
        make_inf("AMXINT4", weight_path=str(tmp_path)).load_weights(torch.arange(E))
    kg = expected_spec("MOE_INT4")
    kparts = [quantize(t, kg) for t in (layer.gate, layer.up, layer.down)]
    write_layer(tmp_path, 1, kg, *kparts, hidden_size=H, intermediate_size=I)
    with pytest.raises(WeightFileError, match="method mismatch"):
        make_inf("MOE_INT4", layer_idx=1, weight_path=str(tmp_path), group_size=16).load_weights(None)
    w = make_inf("AMXINT8", weight_path=str(tmp_path))
    with pytest.raises(ValueError, match="physical_to_logical_map values must be in"):
        w.load_weights(torch.full((E,), E))
    with pytest.raises(RuntimeError, match="Weights not loaded"):
        w.forward(*batch())
    w.load_weights(torch.arange(E))
    x, ids, wts = batch()
    assert rel_err(w.forward(x, ids, wts), reference(x, ids, wts, *dequantized(layer, spec))) < KERNEL_TOL


def test_load_weights_from_tensors_errors(make_inf, layer):
    w = make_inf("AMXINT4")
    g, u, d = layer.gate, layer.up, layer.down
    with pytest.raises(ValueError, match="gate_proj shape mismatch"):
        w.load_weights_from_tensors(g[:, :-1], u, d)
    with pytest.raises(ValueError, match="down_proj shape mismatch"):
        w.load_weights_from_tensors(g, u, d.transpose(1, 2)[:, :, :-1])
    with pytest.raises(ValueError, match="gate_proj shape mismatch: expected 8 experts"):
        w.load_weights_from_tensors(g[:5], u[:5], d[:5])
    with pytest.raises(ValueError, match="up_proj must be bfloat16 or float32"):
        w.load_weights_from_tensors(g, u.half(), d)
    with pytest.raises(TypeError, match="down_proj must be a torch.Tensor"):
        w.load_weights_from_tensors(g, u, None)
    with pytest.raises(RuntimeError, match="Weights not loaded"):
        w.forward(*batch())
    w.load_weights_from_tensors(g[:5], u[:5], d[:5], torch.tensor([0, 1, 2, 3, 4, 4, 3, 2]))
    assert w.forward(*batch()).shape == (Q, H)


# ---------------------------------------------------------------- errors

def test_forward_input_errors(make_inf, layer):
    w = make_inf("MOE_INT4")
    x, ids, wts = batch()
    for call in (w.forward, w.submit_forward):
        with pytest.raises(RuntimeError, match=r"Weights not loaded. Call load_weights\(\) first."):
            call(x, ids, wts)
    w.load_weights_from_tensors(layer.gate, layer.up, layer.down)
    bad = [
        ((x[:, :-1], ids, wts), ValueError, "hidden_states shape mismatch"),
        ((x[0], ids, wts), ValueError, "hidden_states shape mismatch"),
        ((x.half(), ids, wts), ValueError, "hidden_states must have dtype"),
        ((x.tolist(), ids, wts), TypeError, "hidden_states must be a torch.Tensor"),
        ((x, ids[:, :2], wts), ValueError, "topk_ids shape mismatch"),
        ((x, ids[:-1], wts), ValueError, "topk_ids shape mismatch"),
        ((x, ids.float(), wts), ValueError, "topk_ids must be int64"),
        ((x, ids.short(), wts), ValueError, "topk_ids must be int64"),
        ((x, ids.masked_fill(ids == ids[3, 1], E), wts), ValueError, r"topk_ids must be in \[0, 8\)"),
        ((x, ids.masked_fill(ids == ids[3, 1], -2), wts), ValueError, r"or -1 \(skip the slot\)"),
        ((x, ids, wts[:, :1]), ValueError, "topk_weights shape mismatch"),
        ((x, ids, ids), ValueError, "topk_weights must be floating point"),
        ((x, ids, None), TypeError, "topk_weights must be a torch.Tensor"),
    ]
    for args, exc, msg in bad:
        for call in (w.forward, w.submit_forward):
            with pytest.raises(exc, match=msg):
                call(*args)
    # nothing is left pending by a refused submission
    with pytest.raises(RuntimeError, match="without a pending submit_forward"):
        w.sync_forward()
    want = w.forward(x, ids, wts)
    w.submit_forward(x, ids, wts)
    assert torch.equal(w.sync_forward(), want)


def test_submit_sync_protocol_errors(make_inf, layer):
    w = make_inf("AMXINT8", layer)
    x, ids, wts = batch()
    with pytest.raises(RuntimeError, match=r"sync_forward\(\) called without a pending submit_forward"):
        w.sync_forward()
    want = w.forward(x, ids, wts)
    w.submit_forward(x, ids, wts)
    with pytest.raises(RuntimeError, match=r"submit_forward\(\) called twice without sync_forward"):
        w.submit_forward(x, ids, wts)
    with pytest.raises(RuntimeError, match=r"forward\(\) called while a submitted forward is pending"):
        w.forward(x, ids, wts)
    with pytest.raises(RuntimeError, match="while a submitted forward is pending"):
        w.load_weights_from_tensors(layer.gate, layer.up, layer.down)
    with pytest.raises(ValueError, match="hidden_states shape mismatch: the pending forward"):
        w.sync_forward(x[:3])
    assert torch.equal(w.sync_forward(x), want)  # still pending after the refused calls
    with pytest.raises(RuntimeError, match="without a pending submit_forward"):
        w.sync_forward()


def test_close_and_collect_with_pending_submission(make_inf, layer):
    x, ids, wts = batch()
    w = make_inf("AMXINT4", layer)
    want = w.forward(x, ids, wts)
    w.submit_forward(x, ids, wts)
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.forward(x, ids, wts)
    with pytest.raises(RuntimeError, match="without a pending submit_forward"):
        w.sync_forward()
    w.close()  # idempotent
    assert w.weight_bytes == 0
    with make_inf("AMXINT4", layer) as w2:
        w2.submit_forward(x, ids, wts)
        del w2  # the pending task keeps its layer and buffers until the pool is done
    gc.collect()
    w3 = make_inf("AMXINT4", layer)
    assert torch.equal(w3.forward(x, ids, wts), want)
    KExpertsCPUBuffer.clear_cache()


# ---------------------------------------------------------------- CUDA

@needs_cuda
@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_cuda_inputs(make_inf, layer, x_dtype):
    w = make_inf("MOE_INT4", layer, chunked_prefill_size=8)
    saved = make_inf("MOE_INT4", layer, layer_idx=1, cpu_save=True)
    x, ids, wts = batch(q=21, dtype=x_dtype)
    want = w.forward(x, ids, wts)
    xc, idc, wtc = x.cuda(), ids.int().cuda(), wts.cuda()
    stream = torch.cuda.current_stream().cuda_stream
    out = w.forward(xc, idc, wtc, stream)
    assert out.device.type == "cuda" and out.dtype == x_dtype
    assert torch.equal(out.cpu(), want)
    side = torch.cuda.Stream()
    w.submit_forward(xc, idc, wtc, side)
    got = w.sync_forward(xc, side)
    side.synchronize()
    assert got.device.type == "cuda" and torch.equal(got.cpu(), want)
    cpu_out = saved.forward(xc, idc, wtc)
    assert cpu_out.device.type == "cpu" and torch.equal(cpu_out, want)
    saved.submit_forward(xc, idc, wtc, stream)
    assert torch.equal(saved.sync_forward(), want)


# ------------------------------------------- RAWINT4, FP8, LLAMAFILE methods

def _ckpt_wrapper(make_inf, method, **over):
    kw = dict(num_experts=E, hidden_size=H, moe_intermediate_size=I)
    kw.update(over)
    return make_inf(method, None, **kw)


def test_rawint4_from_checkpoint_tensors(make_inf):
    """compressed-tensors int4 (weight_packed/weight_scale per projection,
    stacked or per-expert dicts) through the factory; the output equals the
    reference on the exact values int * scale."""
    from ktmoe.loaders import pack_rawint4

    gen = torch.Generator().manual_seed(3)
    src, dq = [], []
    for N, Kc in ((I, H), (I, H), (H, I)):
        vals = torch.randint(-8, 8, (E, N, Kc), generator=gen, dtype=torch.int8)
        scales = (torch.rand(E, N, Kc // 32, generator=gen) / (4 * math.sqrt(Kc))).to(BF16)
        packed, sc = pack_rawint4(vals, scales)
        src.append({"weight_packed": packed, "weight_scale": sc})
        dq.append(vals.double() * sc.double().repeat_interleave(32, -1))
    w = _ckpt_wrapper(make_inf, "RAWINT4")
    assert type(w).__name__ == "CheckpointMoEWrapper"
    w.load_weights_from_tensors(src[0], src[1], [{k: v[e] for k, v in src[2].items()} for e in range(E)])
    x, ids, wts = batch()
    assert rel_err(w.forward(x, ids, wts), reference(x, ids, wts, *dq)) < KERNEL_TOL


def test_fp8_from_checkpoint_tensors(make_inf):
    """DeepSeek-V3 FP8 (E4M3 + 128x128 block scale_inv); a non-identity map."""
    Hf, If = 128, 256
    gen = torch.Generator().manual_seed(4)
    src, dq = [], []
    for N, Kc in ((If, Hf), (If, Hf), (Hf, If)):
        wt = (torch.randn(E, N, Kc, generator=gen) / math.sqrt(Kc)).to(torch.float8_e4m3fn)
        sinv = torch.rand(E, (N + 127) // 128, Kc // 128, generator=gen) + 0.5
        src.append({"weight": wt, "weight_scale_inv": sinv})
        dq.append(wt.double() * sinv.double().repeat_interleave(128, -2)[:, :N].repeat_interleave(128, -1))
    pmap = torch.arange(E).flip(0)
    w = _ckpt_wrapper(make_inf, "FP8", hidden_size=Hf, moe_intermediate_size=If)
    w.load_weights_from_tensors(*src, pmap)
    x, ids, wts = batch(h=Hf)
    want = reference(x, ids, wts, *[t[pmap] for t in dq])
    assert rel_err(w.forward(x, ids, wts), want) < KERNEL_TOL
    bad = dict(src[0])
    bad["weight"] = bad["weight"].clone()
    bad["weight"].view(torch.uint8)[1, 2, 3] = 0x7F
    with pytest.raises(ValueError, match="NaN"):
        w.load_weights_from_tensors(bad, src[1], src[2])


def test_llamafile_gguf_mixed_types(make_inf, tmp_path):
    """A GGUF layer with Q4_K gate/up and Q6_K down (llama.cpp's Q4_K_M mix),
    read by load_weights(); the output equals the reference on gguf-py's own
    dequantization."""
    pytest.importorskip("gguf")
    import numpy as np
    from test_gguf import layer_tensors, reference as gguf_reference, write_gguf

    Hg, Ig = 256, 256
    path = write_gguf(tmp_path / "m.gguf",
                      layer_tensors(2, ("Q4_K", "Q4_K", "Q6_K"), E, Hg, Ig, np.random.default_rng(0)))
    w = _ckpt_wrapper(make_inf, "LLAMAFILE", hidden_size=Hg, moe_intermediate_size=Ig,
                      weight_path=path, layer_idx=2)
    assert w.quant_specs is None  # the format comes with the file
    w.load_weights()
    assert [s.format for s in w.quant_specs] == ["int4_1_kgroup", "int4_1_kgroup", "int8_kgroup"]
    dq = [torch.from_numpy(gguf_reference(path, f"blk.2.ffn_{p}_exps.weight")).double()
          for p in ("gate", "up", "down")]
    x, ids, wts = batch(h=Hg)
    assert rel_err(w.forward(x, ids, wts), reference(x, ids, wts, *dq)) < KERNEL_TOL
    with pytest.raises(RuntimeError, match="LLAMAFILE loads GGUF files"):
        w.load_weights_from_tensors(*dq)
    w2 = _ckpt_wrapper(make_inf, "LLAMAFILE", hidden_size=Hg, moe_intermediate_size=Ig,
                       weight_path=path, layer_idx=5)
    with pytest.raises((ValueError, RuntimeError), match="5"):
        w2.load_weights()
