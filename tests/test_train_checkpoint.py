"""Loading a local checkpoint directory with the routed experts streamed
from the safetensors shards into the kernels (``ktmoe.hf.checkpoint``):
the same model as ``from_pretrained`` + wrapping, the ``kt_weight_path``
route, clear errors, and a peak memory below what materializing the model in
torch would need (measured in a child process on a checkpoint written here).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import release_wrappers  # noqa: E402
from hf_tiny_models import tiny_model  # noqa: E402
from reference import rel_err  # noqa: E402

from ktmoe.hf import wrap_moe_layers_with_kt_wrapper  # noqa: E402
from ktmoe.hf.checkpoint import checkpoint_bytes, load_kt_checkpoint  # noqa: E402
from ktmoe.hf.errors import KTAMXConfigError  # noqa: E402

KT = dict(cpuinfer_threads=2, threadpool_count=1, lora_rank=4, lora_alpha=8.0)


@pytest.fixture(autouse=True)
def _release():
    yield
    release_wrappers()


def _save(model, path, shard="20KB"):
    model.save_pretrained(str(path), max_shard_size=shard)
    return str(path)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral", "deepseek_v2", "qwen2_moe"])
def test_streamed_model_equals_from_pretrained_and_wrap(tmp_path, case):
    from transformers import AutoModelForCausalLM

    d = _save(tiny_model(case, dtype=torch.bfloat16), tmp_path / case)
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        keys = json.load(f)["weight_map"]
    assert any((".experts.0." in k) for k in keys)   # per-expert keys, as on the Hub
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    wrap_moe_layers_with_kt_wrapper(ref, **KT)
    want = _logits(ref.eval(), ids)
    del ref
    gc.collect()
    m = load_kt_checkpoint(d, dtype=torch.float32, **KT)
    assert not m.training
    assert all(p.device.type == "cpu" for p in m.parameters())
    got = _logits(m, ids)
    assert rel_err(got, want) < 1e-6
    expert_bytes = sum(2 * torch.Size(s).numel() for s in _expert_shapes(d))
    assert m._kt_load_stats["expert_bytes"] == expert_bytes   # every expert read once, in bf16
    assert m._kt_load_stats["unused_keys"] == []
    del m


def _expert_shapes(d):
    from safetensors import safe_open

    out = []
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as h:
                out += [h.get_slice(k).get_shape() for k in h.keys() if ".experts." in k]
    return out


def test_weight_files_instead_of_the_checkpoint_experts(tmp_path):
    from ktmoe.convert import convert_checkpoint
    from ktmoe.quant import QuantSpec

    d = _save(tiny_model("qwen3_moe", dtype=torch.bfloat16), tmp_path / "ck")
    convert_checkpoint(d, tmp_path / "w", QuantSpec("AMXBF16_SFT"), progress=False)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    a = load_kt_checkpoint(d, dtype=torch.float32, **KT)
    want = _logits(a, ids)
    del a
    gc.collect()
    b = load_kt_checkpoint(d, {"kt_weight_path": str(tmp_path / "w")}, dtype=torch.float32, **KT)
    assert b._kt_load_stats["expert_bytes"] == 0      # the checkpoint's experts were not read
    assert rel_err(_logits(b, ids), want) < 1e-6
    del b


def test_train_config_loads_a_local_checkpoint(tmp_path):
    """load_model with use_kt streams a checkpoint directory (the path
    ``ktmoe train`` takes for model_name_or_path: /path/to/DeepSeek-V2-Lite)."""
    from ktmoe.train.args import get_infer_args
    from ktmoe.train.model import load_model

    d = _save(tiny_model("deepseek_v2", dtype=torch.bfloat16), tmp_path / "ds")
    model_args, _, ft_args, _ = get_infer_args({"model_name_or_path": d, "use_kt": True, "kt_num_threads": 2,
                                                "kt_tp_count": 1, "lora_rank": 4, "lora_target": "all"})
    m = load_model(None, model_args, ft_args, is_trainable=True, dtype=torch.float32)
    assert len(m._kt_wrappers) == 2 and hasattr(m, "_kt_load_stats")
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("lora_params" in n for n in trainable) and any("kv_b_proj.lora_A" in n for n in trainable)
    del m


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _save(tiny_model("qwen3_moe", dtype=torch.bfloat16), tmp_path / "ck", shard="10GB")
    st = os.path.join(d, "model.safetensors")
    sd = load_file(st)
    del sd["model.norm.weight"]
    save_file(sd, st, metadata={"format": "pt"})
    with pytest.raises(KTAMXConfigError, match="has no tensor for 1 of the model's weights: model.norm.weight"):
        load_kt_checkpoint(d, dtype=torch.float32, **KT)
    cfg_path = os.path.join(d, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["num_experts"] = 16
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(KTAMXConfigError, match="num_experts=16"):
        load_kt_checkpoint(d, dtype=torch.float32, **KT)
    with pytest.raises(KTAMXConfigError, match=r"no \*\.safetensors files"):
        os.makedirs(tmp_path / "empty")
        with open(tmp_path / "empty" / "config.json", "w") as f:
            json.dump(cfg, f)
        load_kt_checkpoint(str(tmp_path / "empty"), **KT)


# ------------------------------------------------------------------ memory

_CHILD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from ktmoe.hf import kt_weight_bytes, wrap_moe_layers_with_kt_wrapper
    from ktmoe.hf.checkpoint import load_kt_checkpoint, params_on_meta

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    path, how = sys.argv[1], sys.argv[2]
    kw = dict(cpuinfer_threads=2, threadpool_count=1, lora_rank=4, lora_alpha=8.0)
    with params_on_meta():  # import the model's modules before measuring
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    base = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # reset the peak (VmHWM) to the current RSS
        reset = status("VmHWM") <= base + (4 << 20)
    except OSError:
        reset = False
    stats = {"reset": reset}
    if how == "stream":
        m = load_kt_checkpoint(path, dtype=torch.bfloat16, **kw)
        stats.update({k: v for k, v in m._kt_load_stats.items() if k != "unused_keys"})
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        wrap_moe_layers_with_kt_wrapper(m, **kw)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "kt_bytes": kt_weight_bytes(m), **stats}))
""")


def _measure(path, how):
    # cwd: not the source tree (python -c puts the cwd first on sys.path,
    # where ktmoe/ has no built library when the package is installed)
    r = subprocess.run([sys.executable, "-c", _CHILD, path, how], capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(path))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_streaming_load_peak_memory(tmp_path):
    """Peak RSS of loading a 100 MiB bf16 checkpoint (8 MoE layers of 32
    experts, 12 MiB of experts per layer), each way in a fresh process: the
    streaming load stays within the kernels' copy of the experts + the
    non-expert weights + one layer's experts in transit (+ 24 MiB slack);
    from_pretrained + wrapping, measured alongside, needs far more."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=1024, hidden_size=256, num_hidden_layers=8,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32,
                               num_experts_per_tok=4, moe_intermediate_size=256, intermediate_size=512,
                               max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    path = _save(model, tmp_path / "ck", shard="30MB")
    del model
    gc.collect()
    size = checkpoint_bytes(path)
    s = _measure(path, "stream")
    if not s["reset"]:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    layer = s["expert_bytes"] // 8
    assert s["expert_bytes"] + s["nonexpert_bytes"] == pytest.approx(size, rel=0.01)
    peak = s["peak"] - s["base"]
    bound = s["kt_bytes"] + s["nonexpert_bytes"] + layer + 24 * 2**20
    m = _measure(path, "materialize")
    peak_m = m["peak"] - m["base"]
    print(f"checkpoint {size / 2**20:.1f} MiB, kernels {s['kt_bytes'] / 2**20:.1f} MiB, peak RSS increase: "
          f"streaming {peak / 2**20:.1f} MiB (bound {bound / 2**20:.1f}), from_pretrained + wrap "
          f"{peak_m / 2**20:.1f} MiB")
    assert peak <= bound
    assert peak < 0.7 * peak_m
