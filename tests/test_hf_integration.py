"""Hugging Face integration: wrapped tiny random models of every supported
architecture against the unmodified model with the same LoRA applied by PEFT
(attention LoRA through ``target_modules``, expert LoRA through
``target_parameters``, PEFT's own merged-weight implementation).

Everything runs in fp32 with expert weights rounded to bf16 values (the
AMXBF16_SFT method stores them in bf16; the kernels compute in fp32), so the
two sides differ only by fp32 summation order.  Tolerances (relative L2 error
against the reference):

* logits, loss, router logits: 2e-5 (measured <= 5.2e-7),
* gradients (input embeddings, router weights, attention / shared-expert
  LoRA, every expert LoRA factor): 1e-4 (measured <= 3.2e-6; a gradient is a
  sum of larger terms of both signs, so it keeps fewer exact bits).
"""

from __future__ import annotations

import gc
import math
import os
import weakref

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ktmoe = pytest.importorskip("ktmoe")

from conftest import release_wrappers  # noqa: E402
from hf_tiny_models import ARCHS, tiny_model  # noqa: E402
from reference import rel_err  # noqa: E402

from ktmoe.hf import (  # noqa: E402
    EXPERT_TARGET_PARAMETERS,
    KTAMXConfigError,
    KTAMXModelNotSupportedError,
    KTMoELayerWrapper,
    freed_expert_bytes,
    get_kt_peft_model,
    kt_weight_bytes,
    kt_wrappers,
    load_kt_adapter,
    save_kt_adapter,
    wrap_moe_layers_with_kt_wrapper,
)

# PEFT 0.21 checks rank_pattern keys against module names only, so a key for a
# target *parameter* ("experts.gate_up_proj") is reported as unmatched although
# it is applied (the gate_up LoRA does get rank 2r; checked below)
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")

OUT_TOL = 2e-5
GRAD_TOL = 1e-4
R, ALPHA = 4, 8.0
KT = dict(cpuinfer_threads=2, threadpool_count=1, lora_rank=R, lora_alpha=ALPHA)
LORA = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")


@pytest.fixture(autouse=True)
def _release():
    yield
    release_wrappers()


def attn_targets(model_type):
    t = {"deepseek_v3": ["q_b_proj", "o_proj"]}.get(model_type, ["q_proj", "o_proj"])
    if model_type == "qwen2_moe":
        t = t + ["shared_expert.up_proj"]  # PEFT LoRA inside the kept shared expert
    return t


def randomize_router_bias_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(torch.randn(mod.e_score_correction_bias.shape, generator=g) * 0.2)


def peft_reference(model_type, seed=0, scale=0.3):
    """Unmodified tiny model + PEFT LoRA (attention + experts), all LoRA
    factors random and non-zero (the experts' gate_up B block-diagonal, as a
    rank-r gate and a rank-r up LoRA are), router weights trainable."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model(model_type, seed=seed)
    randomize_router_bias_(base, seed + 7)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=attn_targets(model_type),
                     target_parameters=list(EXPERT_TARGET_PARAMETERS), lora_dropout=0.0,
                     rank_pattern={"experts.gate_up_proj": 2 * R}, alpha_pattern={"experts.gate_up_proj": 2 * ALPHA})
    pm = get_peft_model(base, cfg)
    params = dict(pm.named_parameters())
    checked = 0
    for n, p in params.items():
        if n.endswith("experts.base_layer.lora_A.default.weight"):
            E = params[n.replace("lora_A.default.weight", "base_layer.gate_up_proj")].shape[0]
            assert p.shape[0] == E * 2 * R   # the rank pattern took effect
            checked += 1
    assert checked
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        for n, p in pm.named_parameters():
            # lora_B [2I, 2r*E], column j*E + e: gate rows use j < r, up rows j >= r
            if n.endswith("experts.base_layer.lora_B.default.weight"):
                I2, RE = p.shape
                j = torch.arange(RE) // (RE // (2 * R))
                p[: I2 // 2, j >= R] = 0
                p[I2 // 2:, j < R] = 0
    set_router_trainable_(pm)
    return pm


def set_router_trainable_(model):
    for n, p in model.named_parameters():
        if n.endswith(".gate.weight") and p.dim() == 2 and "mlp" in n:
            p.requires_grad_(True)


def wrapped_from_adapter(model_type, adapter_dir, seed=0, **kw):
    m = tiny_model(model_type, seed=seed)
    randomize_router_bias_(m, seed + 7)
    wrap_moe_layers_with_kt_wrapper(m, **dict(KT, **kw))
    pm = load_kt_adapter(m, adapter_dir)
    set_router_trainable_(pm)
    return pm


def run_step(model, ids):
    for p in model.parameters():
        p.grad = None
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, labels=ids, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return out, emb.grad.detach().clone(), grads


def peft_expert_grads_as_kt(grads, prefix, E):
    """PEFT's fused expert LoRA gradients in the KT per-expert layout (the
    layout of PEFT's target_parameters LoRA, written out independently of
    ktmoe.hf.adapter)."""
    ga = grads[prefix + ".base_layer.lora_A.default.weight"]   # [E*2r, H]
    gb = grads[prefix + ".base_layer.lora_B.default.weight"]   # [2I, 2r*E]
    da = grads[prefix + ".lora_A.default.weight"]              # [E*r, I]
    db = grads[prefix + ".lora_B.default.weight"]              # [H, r*E]
    H = ga.shape[1]
    I = gb.shape[0] // 2
    A = ga.reshape(E, 2 * R, H)
    B = gb.reshape(2 * I, 2 * R, E).permute(2, 0, 1)
    return {
        "gate_lora_a": A[:, :R], "up_lora_a": A[:, R:],
        "gate_lora_b": B[:, :I, :R], "up_lora_b": B[:, I:, R:],
        "down_lora_a": da.reshape(E, R, I),
        "down_lora_b": db.reshape(H, R, E).permute(2, 0, 1),
    }


# ------------------------------------------------------------ exactness

@pytest.mark.parametrize("model_type", ARCHS)
def test_matches_peft_reference(model_type, tmp_path):
    ref = peft_reference(model_type)
    ref.save_pretrained(str(tmp_path))  # PEFT's own adapter file: also checks the import layout
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    o_ref, e_ref, g_ref = run_step(ref, ids)

    pm = wrapped_from_adapter(model_type, str(tmp_path))
    wrappers = kt_wrappers(pm)
    assert wrappers
    o, e, g = run_step(pm, ids)

    assert rel_err(o.logits, o_ref.logits) <= OUT_TOL
    assert abs(o.loss.item() - o_ref.loss.item()) <= OUT_TOL * abs(o_ref.loss.item())
    if o_ref.aux_loss is not None:
        assert o.aux_loss is not None
        assert abs(o.aux_loss.item() - o_ref.aux_loss.item()) <= OUT_TOL * abs(o_ref.aux_loss.item())
    else:
        assert o.aux_loss is None
    assert len(o.router_logits) == len(o_ref.router_logits) == len(wrappers)
    for a, b in zip(o.router_logits, o_ref.router_logits):
        assert rel_err(a, b) <= OUT_TOL

    assert rel_err(e, e_ref) <= GRAD_TOL
    # router weights, attention and shared-expert LoRA: same names on both sides
    shared = [n for n in g_ref if ".experts." not in n]
    assert any(n.endswith(".gate.weight") for n in shared) and any("lora_A" in n for n in shared)
    for n in shared:
        assert n in g, n
        assert g_ref[n].abs().max() > 0, n
        assert rel_err(g[n], g_ref[n]) <= GRAD_TOL, (n, rel_err(g[n], g_ref[n]))
    # every expert LoRA factor of every wrapped layer
    for w in wrappers:
        prefix = f"base_model.model.model.layers.{w.layer_idx}.mlp.experts"
        want = peft_expert_grads_as_kt(g_ref, prefix, w.kt_wrapper.num_experts)
        for n in LORA:
            got = w.lora_params[n].grad
            assert got is not None, n
            assert want[n].abs().max() > 0
            assert rel_err(got, want[n]) <= GRAD_TOL, (w.layer_idx, n, rel_err(got, want[n]))
        st = w.cache_stats
        assert st["cached"] == 1 and st["recomputed"] == 0 and st["evicted"] == 0, st


def test_wrong_lora_is_detected(tmp_path):
    """The comparison above can fail: a wrapped model whose expert LoRA
    differs slightly from the reference's is caught by the tolerances."""
    ref = peft_reference("qwen3_moe")
    ref.save_pretrained(str(tmp_path))
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    o_ref, _, g_ref = run_step(ref, ids)
    pm = wrapped_from_adapter("qwen3_moe", str(tmp_path))
    w = kt_wrappers(pm)[0]
    with torch.no_grad():
        w.lora_params["down_lora_b"][3] *= 1.01
    o, _, _ = run_step(pm, ids)
    assert rel_err(o.logits, o_ref.logits) > OUT_TOL


# ------------------------------------------------------- wrapping itself

@pytest.mark.parametrize("model_type", ARCHS)
def test_wrap_structure_and_freed_weights(model_type):
    m = tiny_model(model_type)
    layers = m.model.layers
    before = {i: l.mlp for i, l in enumerate(layers)}
    expert_params = {}
    expected_freed = 0
    for i, blk in before.items():
        if hasattr(blk, "experts"):
            for n in ("gate_up_proj", "down_proj"):
                p = getattr(blk.experts, n)
                expert_params[(i, n)] = weakref.ref(p)
                expected_freed += p.numel() * p.element_size()
    routers = {i: blk.gate for i, blk in before.items() if hasattr(blk, "experts")}
    shared = {i: getattr(blk, a) for i, blk in before.items() for a in ("shared_expert", "shared_experts")
              if hasattr(blk, "experts") and hasattr(blk, a)}
    n_params_before = sum(p.numel() for p in m.parameters())
    del p, blk

    wrappers = wrap_moe_layers_with_kt_wrapper(m, **KT)
    gc.collect()

    moe_idx = sorted(routers)
    assert [w.layer_idx for w in wrappers] == moe_idx
    for i, layer in enumerate(layers):
        if i in routers:
            w = layer.mlp
            assert isinstance(w, KTMoELayerWrapper) and w._is_kt_moe_wrapper
            assert w.router is routers[i] and w.gate is routers[i]       # the model's own router
            if i in shared:
                assert w.shared_experts is shared[i]
            else:
                assert w.shared_experts is None
            assert not hasattr(w.experts, "gate_up_proj") and not hasattr(w.experts, "down_proj")
            assert w.experts._kt_layer() is w
        else:
            assert layer.mlp is before[i]                                # dense layer untouched
    # the model's expert tensors are gone (one copy: the kernel's)
    assert all(ref() is None for ref in expert_params.values()), [k for k, r in expert_params.items() if r()]
    assert freed_expert_bytes(m) == expected_freed > 0
    assert kt_weight_bytes(m) == expected_freed // 2  # fp32 model -> bf16 kernel copy
    # LoRA factors are registered parameters
    names = dict(m.named_parameters())
    sd = m.state_dict()
    for w in wrappers:
        for n in LORA:
            key = f"model.layers.{w.layer_idx}.mlp.lora_params.{n}"
            assert names[key] is w.lora_params[n] and key in sd
            assert w.lora_params[n].requires_grad
            assert w.kt_wrapper.__dict__[n] is w.lora_params[n]          # read in place by the kernel
        kt = w.kt_wrapper
        A, B = w.lora_params["gate_lora_a"], w.lora_params["gate_lora_b"]
        assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) == A.numel()
        assert A.abs().max() <= 1 / math.sqrt(kt.hidden_size) + 1e-7        # kaiming-uniform, a = sqrt(5)
        assert w.lora_params["down_lora_a"].abs().max() <= 1 / math.sqrt(kt.moe_intermediate_size) + 1e-7
    lora_numel = sum(p.numel() for w in wrappers for p in w.lora_params.values())
    assert sum(p.numel() for p in m.parameters()) == n_params_before - expected_freed // 4 + lora_numel
    assert m.config._experts_implementation == "ktmoe"
    assert m._kt_wrappers == wrappers and m._kt_cpu_infer is wrappers[0].kt_wrapper.cpu_infer
    assert set(m._kt_moe_lora_params) == set(moe_idx)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    opt_ids = {id(p) for grp in opt.param_groups for p in grp["params"]}
    assert all(id(p) in opt_ids for w in wrappers for p in w.lora_params.values())


@pytest.mark.parametrize("case,overrides,want", [
    ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2), [1, 3]),
    ("qwen2_moe", dict(num_hidden_layers=4, mlp_only_layers=[0, 2]), [1, 3]),
    ("deepseek_v3", dict(num_hidden_layers=4, first_k_dense_replace=2), [2, 3]),
])
def test_dense_layers_are_skipped(case, overrides, want):
    m = tiny_model(case, **overrides)
    dense = {i: l.mlp for i, l in enumerate(m.model.layers) if i not in want}
    ws = wrap_moe_layers_with_kt_wrapper(m, **KT)
    assert [w.layer_idx for w in ws] == want
    assert all(m.model.layers[i].mlp is blk and not hasattr(blk, "experts") for i, blk in dense.items())
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[3, 4, 5, 6]])).logits).all()


def test_model_args_and_errors():
    from types import SimpleNamespace

    m = tiny_model("qwen3_moe")
    model_args = SimpleNamespace(kt_backend="AMXBF16", kt_num_threads=2, kt_tp_enabled=False,
                                 kt_max_cache_depth=3, kt_num_gpu_experts=0, kt_weight_path=None)
    ft = SimpleNamespace(lora_rank=2, lora_alpha=4.0)
    ws = wrap_moe_layers_with_kt_wrapper(m, model_args, ft)
    kt = ws[0].kt_wrapper
    assert (kt.method, kt.max_cache_depth, kt.lora_rank, kt.lora_alpha, kt.cpuinfer_threads) == \
        ("AMXBF16_SFT", 3, 2, 4.0, 2)
    with pytest.raises(KTAMXConfigError, match="already wrapped"):
        wrap_moe_layers_with_kt_wrapper(m, model_args, ft)
    with pytest.raises(ValueError, match="Method 'NOPE' is not supported in SFT mode"):
        wrap_moe_layers_with_kt_wrapper(tiny_model("qwen3_moe"), method="NOPE", **KT)
    with pytest.raises(KTAMXConfigError, match="kt_num_gpu_experts must be 0"):
        wrap_moe_layers_with_kt_wrapper(tiny_model("qwen3_moe"), dict(kt_num_gpu_experts=4), None, **KT)
    # the "ktmoe" experts implementation on a model that was not wrapped
    other = tiny_model("qwen3_moe")
    other.set_experts_implementation("ktmoe")
    with pytest.raises(KTAMXConfigError, match="was not wrapped"):
        other(torch.tensor([[3, 4, 5]]))


def test_spec_helpers(tmp_path):
    from types import SimpleNamespace

    from hf_tiny_models import tiny_config

    from ktmoe.hf import filter_attention_modules, init_cpu_infer, load_kt_model

    assert filter_attention_modules("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj") == \
        ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert filter_attention_modules(["q_proj", "w1", "w2", "w3"]) == ["q_proj"]
    m = load_kt_model(tiny_config("olmoe"), SimpleNamespace(kt_num_threads=2, kt_max_cache_depth=2),
                      SimpleNamespace(lora_rank=3, lora_alpha=6.0), dtype=torch.float32)
    assert len(m._kt_wrappers) == 2 and m._kt_wrappers[0].kt_wrapper.lora_rank == 3
    assert set(m._kt_moe_lora_params[1]) == set(LORA)
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[3, 4, 5]])).logits).all()
    # the pool the layers share (spec 004 §2.2)
    assert init_cpu_infer(SimpleNamespace(kt_num_threads=2, kt_tp_enabled=False)) is m._kt_cpu_infer


def test_weight_path_files_match_tensors(tmp_path):
    """kt_weight_path: experts read from converted weight files (the model's
    tensors are dropped without being copied) give the same result as
    loading the same method from the model's tensors."""
    from ktmoe.convert import convert_checkpoint
    from ktmoe.quant import QuantSpec

    src = tmp_path / "ckpt"
    tiny_model("qwen3_moe").save_pretrained(str(src))
    convert_checkpoint(src, tmp_path / "w", QuantSpec("AMXINT8_SFT", 128, True))
    a = tiny_model("qwen3_moe")
    wrap_moe_layers_with_kt_wrapper(a, method="AMXINT8_SFT", weight_path=str(tmp_path / "w"), **KT)
    b = tiny_model("qwen3_moe")
    wrap_moe_layers_with_kt_wrapper(b, method="AMXINT8_SFT", **KT)
    assert freed_expert_bytes(a) == freed_expert_bytes(b) > 0
    assert not hasattr(a.model.layers[0].mlp.experts, "gate_up_proj")
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(a(ids).logits, b(ids).logits) <= 1e-6


def test_unsupported_architectures():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    oss = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_oss", vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, layer_types=["full_attention"]))
    with pytest.raises(KTAMXModelNotSupportedError, match="'gpt_oss'") as ei:
        wrap_moe_layers_with_kt_wrapper(oss, **KT)
    assert isinstance(ei.value, ValueError)
    assert hasattr(oss.model.layers[0].mlp.experts, "gate_up_proj")  # untouched
    llama = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(KTAMXModelNotSupportedError, match="'llama'"):
        wrap_moe_layers_with_kt_wrapper(llama, **KT)


# ----------------------------------------------------------- generation

@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral", "deepseek_v3", "qwen3_next"])
def test_generate_zero_lora_matches_unwrapped(model_type):
    ref = tiny_model(model_type)
    m = tiny_model(model_type)
    wrap_moe_layers_with_kt_wrapper(m, **KT)   # default LoRA init: B = 0
    prompt = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(9))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = ref.generate(prompt, **kw)
    got = m.generate(prompt, **kw)
    assert got.shape == want.shape == (2, 15)
    assert torch.equal(got, want)
    for w in kt_wrappers(m):
        assert w.kt_wrapper._cache_depth == 0 and w.cache_stats["cached"] == 0


# ------------------------------------------------------------- adapters

@pytest.mark.parametrize("model_type,use_peft", [("qwen2_moe", "after"), ("deepseek_v3", "before"),
                                                  ("olmoe", None)])
def test_adapter_save_load_roundtrip(model_type, use_peft, tmp_path):
    """use_peft: PEFT LoRA on attention added after wrapping
    (get_kt_peft_model), before wrapping (peft.get_peft_model, then wrap the
    PeftModel), or none (experts only)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    m = tiny_model(model_type)
    randomize_router_bias_(m, 7)
    pcfg = LoraConfig(r=2, lora_alpha=6, target_modules=attn_targets(model_type), lora_dropout=0.05)
    if use_peft == "before":
        m = get_peft_model(m, pcfg)
    wrap_moe_layers_with_kt_wrapper(m, **KT)
    if use_peft == "after":
        m = get_kt_peft_model(m, pcfg)
    if use_peft is None:
        for n, p in m.named_parameters():
            p.requires_grad_("lora_params" in n)   # the adapter holds LoRA only
    # train a few steps so that every LoRA factor is non-trivial
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    params = [p for p in m.parameters() if p.requires_grad]
    assert any(p is q for w in kt_wrappers(m) for q in w.lora_params.values() for p in params)
    opt = torch.optim.AdamW(params, lr=2e-2)
    m.train()
    for _ in range(3):
        opt.zero_grad()
        m(ids, labels=ids).loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        want = m(ids).logits
    save_kt_adapter(m, str(tmp_path))
    cfg = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert sorted(cfg.target_parameters) == sorted(EXPERT_TARGET_PARAMETERS)
    assert cfg.rank_pattern["experts.gate_up_proj"] == 2 * R and cfg.alpha_pattern["experts.gate_up_proj"] == 2 * ALPHA
    assert os.path.isfile(tmp_path / "kt_adapter.json")

    # (a) PEFT loads it onto the unmodified transformers model
    plain = tiny_model(model_type)
    randomize_router_bias_(plain, 7)
    loaded = PeftModel.from_pretrained(plain, str(tmp_path))
    with torch.no_grad():
        got = loaded(ids).logits
    assert rel_err(got, want) <= OUT_TOL

    # (b) and back into a freshly wrapped model (resume / infer)
    fresh = tiny_model(model_type)
    randomize_router_bias_(fresh, 7)
    wrap_moe_layers_with_kt_wrapper(fresh, **KT)
    fresh = load_kt_adapter(fresh, str(tmp_path))
    for w_old, w_new in zip(kt_wrappers(m), kt_wrappers(fresh)):
        for n in LORA:
            assert torch.equal(w_old.lora_params[n], w_new.lora_params[n])
            assert w_new.lora_params[n].requires_grad
    if use_peft:
        assert fresh.peft_config["default"].lora_dropout == 0.05  # restored from kt_adapter.json
    fresh.eval()
    with torch.no_grad():
        assert rel_err(fresh(ids).logits, want) <= 1e-6
    if use_peft == "after":
        # (c) resume into a wrapped model that already has the PEFT adapter
        again = tiny_model(model_type)
        randomize_router_bias_(again, 7)
        wrap_moe_layers_with_kt_wrapper(again, **KT)
        again = get_kt_peft_model(again, pcfg)
        same = load_kt_adapter(again, str(tmp_path))
        assert same is again
        src = dict(m.named_parameters())
        for n, p in again.named_parameters():
            if "lora_" in n:
                assert torch.equal(p, src[n]), n
                assert p.requires_grad, n
        again.eval()
        with torch.no_grad():
            assert rel_err(again(ids).logits, want) <= 1e-6


def test_load_rejects_adapter_without_experts(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_model("qwen3_moe"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path))
    m = tiny_model("qwen3_moe")
    wrap_moe_layers_with_kt_wrapper(m, **KT)
    with pytest.raises(KTAMXConfigError, match="no LoRA on the routed experts"):
        load_kt_adapter(m, str(tmp_path))


# --------------------------------------------- checkpointing and caches

def _grads_of(model, ids):
    for p in model.parameters():
        p.grad = None
    model(ids, labels=ids, output_router_logits=True).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_gradient_checkpointing_same_gradients(mode, tmp_path):
    peft_reference("deepseek_v2").save_pretrained(str(tmp_path))
    m = wrapped_from_adapter("deepseek_v2", str(tmp_path))   # max_cache_depth = 1
    m.train()
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    plain = _grads_of(m, ids)
    before = [w.cache_stats for w in kt_wrappers(m)]
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    m.enable_input_require_grads()
    assert m.get_base_model().model.layers[1].gradient_checkpointing
    ckpt = _grads_of(m, ids)
    assert set(ckpt) == set(plain) and any("lora_params" in n for n in plain)
    for n in plain:
        assert rel_err(ckpt[n], plain[n]) <= 1e-6, n
    for w, b in zip(kt_wrappers(m), before):
        st = w.cache_stats
        # the checkpointed first forward is not cached; its recompute is, and
        # the backward uses that cache: depth 1 is enough, nothing is recomputed twice
        assert st["cached"] - b["cached"] == 1 and st["recomputed"] == b["recomputed"] == 0, st
        assert st["evicted"] == 0 and w.kt_wrapper._cache_depth == 0
        if mode == "non-reentrant":
            assert st["uncached"] - b["uncached"] == 1


def test_cache_depth_two_forwards_before_backward(tmp_path):
    """Two micro-batches forwarded before one backward: with
    max_cache_depth=1 the second forward is not cached (a warning says so)
    and its backward recomputes it; gradients are exact either way; with
    max_cache_depth=2 nothing is recomputed."""
    peft_reference("qwen3_moe").save_pretrained(str(tmp_path))
    a = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(11))
    b = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(12))
    results = {}
    for depth in (1, 2):
        m = wrapped_from_adapter("qwen3_moe", str(tmp_path), max_cache_depth=depth)
        ga = _grads_of(m, a)
        gb = _grads_of(m, b)
        for p in m.parameters():
            p.grad = None
        kw = dict(output_router_logits=True)
        if depth == 1:
            with pytest.warns(RuntimeWarning, match="forward cache slot"):
                loss = m(a, labels=a, **kw).loss + m(b, labels=b, **kw).loss
        else:
            loss = m(a, labels=a, **kw).loss + m(b, labels=b, **kw).loss
        loss.backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                assert rel_err(p.grad, ga[n] + gb[n]) <= 1e-5, n
        results[depth] = [w.cache_stats for w in kt_wrappers(m)]
        for w in kt_wrappers(m):
            assert w.kt_wrapper._cache_depth == 0
        del m, loss
        release_wrappers()
    assert all(st["uncached"] == 1 and st["recomputed"] >= 1 for st in results[1]), results
    assert all(st["uncached"] == 0 and st["recomputed"] == 0 for st in results[2]), results


def test_forward_without_backward_does_not_block(tmp_path):
    peft_reference("olmoe").save_pretrained(str(tmp_path))
    m = wrapped_from_adapter("olmoe", str(tmp_path))   # depth 1
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(4))
    want = _grads_of(m, ids)
    m(ids, labels=ids).loss  # a graph that is dropped without backward: its cache is orphaned
    got = _grads_of(m, ids)
    for n in want:
        assert rel_err(got[n], want[n]) <= 1e-6
    assert all(w.cache_stats["evicted"] == 1 for w in kt_wrappers(m))


def test_retain_graph_double_backward_accumulates(tmp_path):
    peft_reference("mixtral").save_pretrained(str(tmp_path))
    m = wrapped_from_adapter("mixtral", str(tmp_path))
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(4))
    once = _grads_of(m, ids)
    for p in m.parameters():
        p.grad = None
    loss = m(ids, labels=ids, output_router_logits=True).loss
    loss.backward(retain_graph=True)
    loss.backward()   # the cache is gone: this backward recomputes the forward
    for n, p in m.named_parameters():
        if n in once:
            assert rel_err(p.grad, 2 * once[n]) <= 1e-5, n
    assert all(w.cache_stats["recomputed"] == 1 for w in kt_wrappers(m))


# ------------------------------------------------------- LoRA pointers

def test_lora_pointers_follow_optimizer_and_replacement():
    m = tiny_model("qwen2_moe")
    wrap_moe_layers_with_kt_wrapper(m, **KT)
    twin = tiny_model("qwen2_moe")
    wrap_moe_layers_with_kt_wrapper(twin, **KT)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(8))

    def sync_twin():
        with torch.no_grad():
            for w, t in zip(kt_wrappers(m), kt_wrappers(twin)):
                for n in LORA:
                    t.lora_params[n].copy_(w.lora_params[n])   # in place: same pointers in twin

    def same():
        sync_twin()
        with torch.no_grad():
            return rel_err(m(ids).logits, twin(ids).logits) <= 1e-7

    opt = torch.optim.AdamW([p for w in kt_wrappers(m) for p in w.lora_params.values()], lr=5e-2)
    for _ in range(2):
        opt.zero_grad()
        m(ids, labels=ids).loss.backward()
        opt.step()                      # in-place update of the bound tensors
    assert same()
    w = kt_wrappers(m)[0]
    with torch.no_grad():
        base = m(ids).logits
    # a replaced Parameter object
    w.lora_params["up_lora_b"] = torch.nn.Parameter(torch.randn_like(w.lora_params["up_lora_b"]) * 0.2)
    assert same()
    with torch.no_grad():
        assert rel_err(m(ids).logits, base) > 1e-3
    # storage swapped under the same Parameter (.data =)
    p = w.lora_params["down_lora_a"]
    old_ptr = p.data_ptr()
    p.data = torch.randn_like(p) * 0.3
    assert p.data_ptr() != old_ptr
    assert same()
    assert w.kt_wrapper._bound_ptrs[5][0] == w.lora_params["down_lora_a"].data_ptr() or \
        any(bp[0] == p.data_ptr() for bp in w.kt_wrapper._bound_ptrs)
    # a LoRA factor that cannot be read in place is an error, not a silent copy
    w.lora_params["gate_lora_a"] = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="gate_lora_a shape mismatch"):
        m(ids)


def test_gradient_accumulation_into_grad():
    m = tiny_model("glm4_moe")
    wrap_moe_layers_with_kt_wrapper(m, **KT)
    with torch.no_grad():
        for w in kt_wrappers(m):
            for n in ("gate_lora_b", "up_lora_b", "down_lora_b"):
                w.lora_params[n].normal_(0, 0.1)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(8))
    one = _grads_of(m, ids)
    grads_before = {id(p): p.grad for w in kt_wrappers(m) for p in w.lora_params.values()}
    m(ids, labels=ids, output_router_logits=True).loss.backward()   # accumulates in place into the same .grad tensors
    for w in kt_wrappers(m):
        for n in LORA:
            p = w.lora_params[n]
            assert p.grad is grads_before[id(p)]
            assert rel_err(p.grad, 2 * one[f"model.layers.{w.layer_idx}.mlp.lora_params.{n}"]) <= 1e-6


def test_frozen_expert_lora():
    """Experts' LoRA frozen, gradients still flowing (e.g. training attention
    only): no .grad is made for the frozen factors, the input gradient is the
    same, and the kernel's unwanted LoRA gradients go to one reused buffer."""
    m = tiny_model("olmoe")
    wrap_moe_layers_with_kt_wrapper(m, **KT)
    with torch.no_grad():
        for w in kt_wrappers(m):
            w.lora_params["down_lora_b"].normal_(0, 0.1)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(8))

    def input_grad():
        emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        m(inputs_embeds=emb, labels=ids).loss.backward()
        return emb.grad

    want = input_grad()
    for w in kt_wrappers(m):
        for p in w.lora_params.values():
            p.requires_grad_(False)
            p.grad = None
    got = input_grad()
    assert rel_err(got, want) <= 1e-7
    from ktmoe.hf.layer import _tracker

    bufs = [_tracker(w.kt_wrapper).scratch for w in kt_wrappers(m)]
    assert all(b is not None for b in bufs)
    input_grad()
    assert all(_tracker(w.kt_wrapper).scratch is b for w, b in zip(kt_wrappers(m), bufs))
    assert all(p.grad is None for w in kt_wrappers(m) for p in w.lora_params.values())


def test_training_reduces_loss():
    m = tiny_model("deepseek_v3")
    wrap_moe_layers_with_kt_wrapper(m, **KT)
    ids = torch.randint(3, 96, (4, 10), generator=torch.Generator().manual_seed(1))
    for n, p in m.named_parameters():
        p.requires_grad_("lora_params" in n)   # only the experts' LoRA learns
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-2)
    m.train()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.92 * losses[0], losses   # measured: 4.59 -> 4.03


# ----------------------------------------------------- other settings

def test_standalone_layer_generic_forward():
    """KTMoELayerWrapper built from its parts (spec constructor, no block):
    router -> experts -> + sigmoid-gated shared expert, equal to the block path."""
    m = tiny_model("qwen2_moe")
    w = wrap_moe_layers_with_kt_wrapper(m, **KT)[0]
    with torch.no_grad():
        w.lora_params["down_lora_b"].normal_(0, 0.1)
    alone = KTMoELayerWrapper(w.kt_wrapper, w.router, w.shared_experts, w.moe_config,
                              dict(w.lora_params.items()), w.hidden_size, w.layer_idx,
                              shared_expert_gate=w.shared_expert_gate)
    x = torch.randn(2, 5, w.hidden_size)
    with torch.no_grad():
        assert rel_err(alone(x), w(x)) <= 1e-7


def test_bf16_model():
    """A bf16 model: activations cross in bf16; the result is within bf16
    rounding of the unwrapped bf16 model (HF's own experts implementations
    differ from each other by about that much)."""
    ref = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    m = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    wrap_moe_layers_with_kt_wrapper(m, **KT)
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, m(ids).logits
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= 2e-2
    loss = m(ids, labels=ids).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for w in kt_wrappers(m) for p in w.lora_params.values())


def test_int8_method_is_approximate():
    ref = tiny_model("mixtral")
    m = tiny_model("mixtral")
    wrap_moe_layers_with_kt_wrapper(m, method="AMXINT8_SFT", **KT)
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = rel_err(m(ids).logits, ref(ids).logits)
    # int8 weights with one scale per row: about 1e-2 per layer output (the
    # kernel tests), a few times that on the logits of the whole model
    assert 1e-3 < err <= 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_hidden_states(tmp_path):
    from ktmoe import KExpertsSFTBuffer

    peft_reference("qwen2_moe").save_pretrained(str(tmp_path))
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    cpu_model = wrapped_from_adapter("qwen2_moe", str(tmp_path))
    o_cpu, e_cpu, g_cpu = run_step(cpu_model, ids)
    gpu_model = wrapped_from_adapter("qwen2_moe", str(tmp_path))
    gpu_model.to("cuda")
    for w in kt_wrappers(gpu_model):            # the LoRA factors stay where the kernels read them
        assert all(p.device.type == "cpu" for p in w.lora_params.values())
        assert w.router.weight.device.type == "cuda"
    o, e, g = run_step(gpu_model, ids.cuda())
    assert o.logits.device.type == "cuda" and e.device.type == "cuda"
    assert rel_err(o.logits.cpu(), o_cpu.logits) <= 1e-4
    assert rel_err(e.cpu(), e_cpu) <= 1e-3
    for n in g_cpu:
        assert rel_err(g[n].cpu(), g_cpu[n]) <= 1e-3, n
    bufs = list(KExpertsSFTBuffer.capture_buffers.values())
    assert bufs and all(b.input_cpu.is_pinned() and b.grad_output_cpu.is_pinned() for b in bufs)
    ptrs = {id(b): b.input_cpu.data_ptr() for b in bufs}
    run_step(gpu_model, ids.cuda())              # same shapes: the staging buffers are reused
    assert {id(b): b.input_cpu.data_ptr() for b in KExpertsSFTBuffer.capture_buffers.values()} == ptrs
