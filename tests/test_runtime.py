"""The runtime around the kernels: pool singleton, tier selection, registry,
binding/header agreement, threads, buffers, CLI."""

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import ktmoe
from ktmoe import CPUInfer, KTMoEWrapper, split_threads
from ktmoe._lib import CDEF
from ktmoe.experts_base import BaseMoEWrapper

from reference import make_layer, make_routing, moe_sft_reference

ROOT = Path(__file__).resolve().parent.parent


def _kw(**over):
    kw = dict(layer_idx=0, num_experts=4, num_experts_per_tok=2, hidden_size=32,
              moe_intermediate_size=16, num_gpu_experts=0, cpuinfer_threads=2,
              threadpool_count=1, weight_path="", chunked_prefill_size=64,
              method="AMXBF16_SFT", mode="sft", lora_rank=4, lora_alpha=8.0)
    kw.update(over)
    return kw


def _release():
    gc.collect()


def test_split_threads():
    assert split_threads(61, 4) == [16, 15, 15, 15]
    assert split_threads(60, 4) == [15, 15, 15, 15]
    assert split_threads(2, 1) == [2]


def test_cpuinfer_singleton_and_shape_conflict():
    _release()
    a = CPUInfer.get(2, 1)
    assert CPUInfer.get(2, 1) is a
    assert a.subpool_threads == [2]
    with pytest.raises(RuntimeError, match="already running"):
        CPUInfer.get(3, 1)
    del a
    _release()
    b = CPUInfer.get(3, 3)
    assert b.subpool_threads == [1, 1, 1]
    del b
    _release()


def test_pool_thread_split_in_c():
    p = CPUInfer(61, 4, pin_threads=0)
    assert p.subpool_threads == [16, 15, 15, 15]
    with pytest.raises(ValueError, match="cpuinfer_threads"):
        CPUInfer(2, 3)


def test_wrapper_shape_conflict_while_alive():
    _release()
    w = KTMoEWrapper(**_kw())
    with pytest.raises(RuntimeError, match="already running"):
        KTMoEWrapper(**_kw(cpuinfer_threads=1))
    del w
    _release()


def test_isa_keyword():
    _release()
    with pytest.raises(ValueError, match="unknown isa"):
        KTMoEWrapper(**_kw(isa="sse9"))
    w = KTMoEWrapper(**_kw(isa="ref"))
    assert w.isa == "ref"
    for tier in ktmoe.cpu_info()["compiled_tiers"]:
        if tier not in ktmoe.cpu_info()["usable_tiers"]:
            with pytest.raises(ValueError, match="not supported by this CPU"):
                KTMoEWrapper(**_kw(isa=tier))
    del w
    _release()


def test_env_cap_selects_ref():
    code = ("import ktmoe, json; from ktmoe import KTMoEWrapper; "
            "w = KTMoEWrapper(layer_idx=0, num_experts=4, num_experts_per_tok=2, hidden_size=32, "
            "moe_intermediate_size=16, num_gpu_experts=0, cpuinfer_threads=1, threadpool_count=1, "
            "weight_path='', chunked_prefill_size=8, method='AMXBF16_SFT', mode='sft'); "
            "print(json.dumps([ktmoe.cpu_info()['selected_tier'], w.isa]))")
    env = dict(os.environ, KTMOE_ISA="ref")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=str(ROOT / "tests"), check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["ref", "ref"]


def test_registry_adds_method_without_touching_factory():
    class MySFT(ktmoe.NativeSFTMoEWrapper):
        METHODS = {"MY_TEST_SFT": "AMXBF16_SFT"}

    assert "MY_TEST_SFT" not in ktmoe.SFT_METHODS
    ktmoe.register_sft_method("MY_TEST_SFT", MySFT)
    try:
        assert "MY_TEST_SFT" in ktmoe.SFT_METHODS
        w = KTMoEWrapper(**_kw(method="MY_TEST_SFT"))
        assert type(w) is MySFT and w.method == "MY_TEST_SFT"
        del w
    finally:
        ktmoe.SFT_METHODS._classes.pop("MY_TEST_SFT", None)
    with pytest.raises(TypeError):
        ktmoe.register_sft_method("BAD", object)
    _release()


def test_inference_wrapper_refuses_sft_methods():
    class Dummy(BaseMoEWrapper):
        pass

    _release()
    d = Dummy(0, 4, 2, 32, 16, 0, 2, 1, "", 64)
    for name in ("forward_sft", "backward", "init_lora_weights", "update_lora_weights"):
        with pytest.raises(RuntimeError, match="not available in inference mode"):
            getattr(d, name)()
    # a registered name without a backend
    ktmoe.register_inference_method("TEST_NO_BACKEND", None)
    try:
        with pytest.raises(NotImplementedError, match="not implemented yet"):
            KTMoEWrapper(**_kw(mode="inference", method="TEST_NO_BACKEND"))
        with pytest.raises(ValueError, match="num_experts must be positive"):
            KTMoEWrapper(**_kw(mode="inference", method="TEST_NO_BACKEND", num_experts=0))
    finally:
        ktmoe.INFERENCE_METHODS._classes.pop("TEST_NO_BACKEND", None)
    del d
    _release()


def _header_functions():
    text = (ROOT / "libktmoe" / "include" / "ktmoe.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    decls = re.findall(r"KTMOE_API\s+([^;]+);", text)
    return [" ".join(d.split()) for d in decls if "(" in d]


def test_cdef_matches_header():
    cdef = " ".join(CDEF.split())
    decls = _header_functions()
    assert len(decls) >= 25
    for d in decls:
        d = re.sub(r"\s*,\s*", ", ", re.sub(r"\(\s*", "(", re.sub(r"\s*\)", ")", d)))
        assert d in cdef, f"header declaration missing from the cffi CDEF: {d}"


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm not available")
def test_only_ktmoe_symbols_exported():
    out = subprocess.run(["nm", "-D", "--defined-only", ktmoe.get_library()],
                         capture_output=True, text=True, check=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert names and all(n.startswith("ktmoe_") for n in names), names


def _layer(E=6, H=40, I=24, r=4, seed=0):
    L = make_layer(E, H, I, r, seed=seed, lora_dtype=torch.float32, alpha=8.0)
    return L.gate, L.up, L.down, L.loras


def test_threads_share_one_pool():
    """Two Python threads drive two layers on the one CPUInfer at once."""
    _release()
    E, H, I, r, k, q = 6, 40, 24, 4, 2, 9
    results, errors = {}, []

    def run(i):
        try:
            gate, up, down, loras = _layer(seed=i)
            w = KTMoEWrapper(**_kw(num_experts=E, hidden_size=H, moe_intermediate_size=I,
                                   lora_rank=r, num_experts_per_tok=k))
            w.load_weights_from_tensors(gate, up, down, torch.arange(E))
            w.init_lora_weights(*[loras[n] for n in ktmoe.experts_sft.LORA_NAMES])
            x = torch.randn(q, H, generator=torch.Generator().manual_seed(i))
            ids, wts = make_routing(q, E, k, seed=i)
            outs = [w.forward_sft(x, ids, wts, save_for_backward=False) for _ in range(20)]
            ref = moe_sft_reference(x, ids, wts, gate, up, down, loras, w.lora_scaling)
            results[i] = (outs, ref)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    for outs, ref in results.values():
        for o in outs:
            assert float((o.double() - ref).norm() / ref.norm()) < 2e-3
    _release()


def test_buffers_are_reused_and_weights_held_once():
    _release()
    E, H, I, r, k = 6, 40, 24, 4, 2
    gate, up, down, loras = _layer()
    w = KTMoEWrapper(**_kw(num_experts=E, hidden_size=H, moe_intermediate_size=I, lora_rank=r))
    w.load_weights_from_tensors(gate, up, down, torch.arange(E))
    assert w.weight_bytes == 3 * E * I * H * 2
    w.init_lora_weights(*[loras[n] for n in ktmoe.experts_sft.LORA_NAMES])
    sizes = []
    for q in (16, 5, 16, 16, 9):
        x = torch.randn(q, H)
        ids, wts = make_routing(q, E, k, seed=q)
        out = w.forward_sft(x, ids, wts)
        w.backward(torch.randn_like(out))
        sizes.append(w.buffer_bytes)
    assert sizes[0] > 0 and len(set(sizes)) == 1, sizes  # grown once, then reused
    del w
    _release()


def test_empty_batch():
    _release()
    E, H, I, r = 6, 40, 24, 4
    gate, up, down, loras = _layer()
    w = KTMoEWrapper(**_kw(num_experts=E, hidden_size=H, moe_intermediate_size=I, lora_rank=r))
    w.load_weights_from_tensors(gate, up, down, torch.arange(E))
    w.init_lora_weights(*[loras[n] for n in ktmoe.experts_sft.LORA_NAMES])
    out = w.forward_sft(torch.zeros(0, H), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2))
    assert out.shape == (0, H)
    gi, grads, gw = w.backward(torch.zeros(0, H), return_grad_weights=True)
    assert gi.shape == (0, H) and gw.shape == (0, 2)
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())
    del w
    _release()


def test_cli_info_and_config():
    exe = [sys.executable, "-m", "ktmoe"]
    info = json.loads(subprocess.run(exe + ["info", "--json"], capture_output=True, text=True,
                                     check=True, cwd=str(ROOT / "tests")).stdout)
    assert "ref" in info["usable_tiers"] and info["selected_tier"] in info["usable_tiers"]
    cflags = subprocess.run(exe + ["config", "--cflags"], capture_output=True, text=True, check=True,
                            cwd=str(ROOT / "tests")).stdout.strip()
    assert Path(cflags[2:], "ktmoe.h").is_file()
