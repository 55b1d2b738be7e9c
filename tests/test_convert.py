"""The converter (ktmoe.convert): Hugging Face checkpoint -> weight files.

Every converted layer is read back and compared exactly with what the
quantizer makes of the source expert weights; the bf16 method must give the
source weights back bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ktmoe.convert import ConvertError, convert_checkpoint, parse_layers, scan_checkpoint
from ktmoe.quant import QuantSpec, dequantize, quantize
from ktmoe.weight_files import PROJECTIONS, inspect, read_layer, validate

H, I, E = 64, 32, 4
GS = 16
INT4_KG = QuantSpec("AMXINT4_KGroup_SFT", GS, True)


def dims(proj):
    return (H, I) if proj == "down" else (I, H)


def expected(w, spec):
    """What a converted projection must dequantize to."""
    return dequantize(quantize(w, spec), spec, w.shape[-1])


def check_layer(out, layer, spec, weights, num_experts=E):
    """weights: proj -> [E, rows, cols] source tensor (bf16 or fp32)."""
    n, *got = read_layer(out, layer, spec, hidden_size=H, intermediate_size=I)
    assert n == num_experts
    for proj, parts in zip(PROJECTIONS, got):
        w = weights[proj]
        assert torch.equal(dequantize(parts, spec, w.shape[-1]), expected(w, spec)), (layer, proj)
        if spec.method == "AMXBF16_SFT" and w.dtype == torch.bfloat16:
            assert torch.equal(parts["qweight"], w)


# -------------------------------------------------- models from transformers

def tiny_model(kind, dtype=torch.bfloat16):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=H, num_attention_heads=4, num_experts_per_tok=2)
    if kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=I, shared_expert_intermediate_size=32,
            num_hidden_layers=2, num_key_value_heads=2, num_experts=E, **common)
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=I, num_hidden_layers=2,
                                         num_key_value_heads=2, num_local_experts=E, **common)
    elif kind == "deepseek_v2":
        cfg = transformers.DeepseekV2Config(
            intermediate_size=48, moe_intermediate_size=I, num_hidden_layers=3, num_key_value_heads=4,
            n_routed_experts=E, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1,
            topk_group=1, **common)
    else:
        raise AssertionError(kind)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def model_weights(model):
    """MoE layer index -> proj -> [E, rows, cols], from the model's fused parameters."""
    out = {}
    for L, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None or not hasattr(experts, "gate_up_proj"):
            continue
        gu = experts.gate_up_proj.detach()
        out[L] = {"gate": gu[:, :I].contiguous(), "up": gu[:, I:].contiguous(),
                  "down": experts.down_proj.detach().contiguous()}
    return out


@pytest.mark.parametrize("kind,moe_layers", [("qwen2_moe", [0, 1]), ("mixtral", [0, 1]),
                                             ("deepseek_v2", [1, 2])])
def test_convert_saved_model(tmp_path, kind, moe_layers):
    model = tiny_model(kind)
    src, out = tmp_path / "hf", tmp_path / "out"
    model.save_pretrained(src)
    ck = scan_checkpoint(src)
    assert (ck.hidden_size, ck.intermediate_size, ck.num_experts) == (H, I, E)
    assert sorted(ck.layers) == moe_layers and ck.model_type == kind

    report = convert_checkpoint(src, out, INT4_KG, progress=False)
    assert [r["layer"] for r in report] == moe_layers
    assert sorted(os.listdir(out)) == [f"layer_{L:05d}.safetensors" for L in moe_layers]
    for r in report:
        assert r["bytes"] == os.path.getsize(r["file"]) and r["num_experts"] == E
    weights = model_weights(model)
    assert sorted(weights) == moe_layers
    for L in moe_layers:
        check_layer(out, L, INT4_KG, weights[L])
    assert validate(out) == []
    assert inspect(out)["files"][0]["bytes_per_layer"] == sum(E * INT4_KG.nbytes(*dims(p))
                                                              for p in PROJECTIONS)


@pytest.mark.parametrize("method,zp", [("AMXBF16_SFT", True), ("AMXINT8_SFT", True),
                                       ("AMXINT4_SFT", True), ("AMXINT4_1_SFT", True),
                                       ("AMXINT4_KGroup_SFT", False), ("AMXINT4_1KGroup_SFT", True)])
def test_convert_every_method(tmp_path, method, zp):
    model = tiny_model("qwen2_moe")
    model.save_pretrained(tmp_path / "hf")
    spec = QuantSpec(method, GS, zp)
    convert_checkpoint(tmp_path / "hf", tmp_path / "out", spec, layers=[1], progress=False)
    assert os.listdir(tmp_path / "out") == ["layer_00001.safetensors"]
    check_layer(tmp_path / "out", 1, spec, model_weights(model)[1])


def test_convert_fp32_sharded_checkpoint(tmp_path):
    model = tiny_model("mixtral", dtype=torch.float32)
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="40KB")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 2 and (src / "model.safetensors.index.json").is_file()
    weights = model_weights(model)
    assert weights[0]["gate"].dtype == torch.float32
    for spec in (INT4_KG, QuantSpec("AMXBF16_SFT")):
        out = tmp_path / spec.method
        convert_checkpoint(src, out, spec, progress=False)
        for L in (0, 1):
            check_layer(out, L, spec, weights[L])
    # the same shards without the index are found by scanning
    (src / "model.safetensors.index.json").unlink()
    convert_checkpoint(src, tmp_path / "noindex", INT4_KG, layers=[1], progress=False)
    check_layer(tmp_path / "noindex", 1, INT4_KG, weights[1])


# ------------------------------------------------- checkpoints written by hand

def random_experts(dtype=torch.bfloat16, seed=0, experts=E):
    g = torch.Generator().manual_seed(seed)
    return {p: (torch.randn((experts, *dims(p)), generator=g) * 0.05).to(dtype) for p in PROJECTIONS}


def write_fused(src, layers, config=True, prefix="model.", **cfg_extra):
    src.mkdir(parents=True, exist_ok=True)
    tensors = {f"{prefix}embed_tokens.weight": torch.zeros(8, H, dtype=torch.bfloat16)}
    for L, w in layers.items():
        tensors[f"{prefix}layers.{L}.mlp.experts.gate_up_proj"] = torch.cat([w["gate"], w["up"]], 1)
        tensors[f"{prefix}layers.{L}.mlp.experts.down_proj"] = w["down"]
        tensors[f"{prefix}layers.{L}.mlp.gate.weight"] = torch.zeros(E, H, dtype=torch.bfloat16)
    save_file(tensors, str(src / "model.safetensors"))
    if config:
        cfg = dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E,
                   intermediate_size=96)
        cfg.update(cfg_extra)
        (src / "config.json").write_text(json.dumps(cfg))


def write_per_expert(src, layers, dtype_of=None, skip=(), mixtral=False):
    src.mkdir(parents=True, exist_ok=True)
    names = {"gate": "w1", "up": "w3", "down": "w2"} if mixtral else \
        {p: f"{p}_proj" for p in PROJECTIONS}
    block = "block_sparse_moe" if mixtral else "mlp"
    tensors = {}
    for L, w in layers.items():
        for p in PROJECTIONS:
            for e in range(w[p].shape[0]):
                k = f"model.layers.{L}.{block}.experts.{e}.{names[p]}.weight"
                if k not in skip:
                    tensors[k] = w[p][e].clone()
    save_file(tensors, str(src / "model.safetensors"))


def test_convert_fused_checkpoint(tmp_path):
    layers = {0: random_experts(seed=1), 3: random_experts(seed=2)}
    write_fused(tmp_path / "hf", layers)
    ck = scan_checkpoint(tmp_path / "hf")
    assert ck.layers[0].layout == "fused" and sorted(ck.layers) == [0, 3]
    convert_checkpoint(tmp_path / "hf", tmp_path / "out", INT4_KG, progress=False)
    for L, w in layers.items():
        check_layer(tmp_path / "out", L, INT4_KG, w)
    convert_checkpoint(tmp_path / "hf", tmp_path / "bf16", QuantSpec("AMXBF16_SFT"), progress=False)
    _, g, u, d = read_layer(tmp_path / "bf16", 3, QuantSpec("AMXBF16_SFT"), hidden_size=H,
                            intermediate_size=I)
    # gate rows come first in gate_up_proj, then up
    assert torch.equal(g["qweight"], layers[3]["gate"]) and torch.equal(u["qweight"], layers[3]["up"])
    assert torch.equal(d["qweight"], layers[3]["down"])


def test_convert_fused_without_config_and_other_prefix(tmp_path):
    layers = {2: random_experts(seed=3)}
    write_fused(tmp_path / "hf", layers, config=False, prefix="model.language_model.")
    ck = scan_checkpoint(tmp_path / "hf")
    assert (ck.hidden_size, ck.intermediate_size, ck.num_experts) == (H, I, E)
    convert_checkpoint(tmp_path / "hf", tmp_path / "out", INT4_KG, progress=False)
    check_layer(tmp_path / "out", 2, INT4_KG, layers[2])


def test_convert_fp16_source_is_widened_exactly(tmp_path):
    w = random_experts(torch.float16, seed=4)
    write_per_expert(tmp_path / "hf", {0: w}, mixtral=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "out", INT4_KG, progress=False)
    check_layer(tmp_path / "out", 0, INT4_KG, {p: t.float() for p, t in w.items()})


def test_cli_convert_then_inspect(tmp_path, capsys):
    from ktmoe.cli import main

    layers = {0: random_experts(seed=5), 1: random_experts(seed=6)}
    write_per_expert(tmp_path / "hf", layers)
    rc = main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--method",
               "AMXINT4_KGroup_SFT", "--group-size", "32", "--no-zero-point", "--layers", "1",
               "--threads", "2"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "layer 1: " in cap.err and "wrote 1 layer(s)" in cap.out
    spec = QuantSpec("AMXINT4_KGroup_SFT", 32, False)
    check_layer(tmp_path / "out", 1, spec, layers[1])
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "AMXINT4_KGroup_SFT (int4_kgroup, group_size=32)" in capsys.readouterr().out

    rc = main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "o2"), "--method",
               "AMXINT4_KGroup_SFT", "--group-size", "40"])
    assert rc == 1 and "group_size must be a positive multiple of 16" in capsys.readouterr().err


# ------------------------------------------------------------------- errors

def test_error_config_disagrees_with_tensors(tmp_path):
    write_fused(tmp_path / "hf", {0: random_experts()}, hidden_size=128)
    with pytest.raises(ConvertError, match=r"config.json has hidden_size=128, but the experts "
                                           r"of layer 0 have hidden_size=64"):
        scan_checkpoint(tmp_path / "hf")
    write_fused(tmp_path / "hf2", {0: random_experts()}, num_experts=8)
    with pytest.raises(ConvertError, match="num_experts=8"):
        scan_checkpoint(tmp_path / "hf2")


def test_error_missing_expert(tmp_path):
    write_per_expert(tmp_path / "hf", {0: random_experts()},
                     skip={"model.layers.0.mlp.experts.2.up_proj.weight"})
    with pytest.raises(ConvertError, match=r"layer 0: up weights of experts \[2\] are missing"):
        scan_checkpoint(tmp_path / "hf")


def test_error_wrong_expert_shape(tmp_path):
    w = random_experts()
    w["down"] = w["down"][:, :, :16].contiguous()
    write_per_expert(tmp_path / "hf", {0: w})
    with pytest.raises(ConvertError, match=r"down_proj.weight has shape \[64, 16\], expected \[64, 32\]"):
        scan_checkpoint(tmp_path / "hf")


def test_error_no_experts_and_bad_source(tmp_path):
    (tmp_path / "dense").mkdir()
    save_file({"model.layers.0.mlp.gate_proj.weight": torch.zeros(4, 4)},
              str(tmp_path / "dense" / "model.safetensors"))
    with pytest.raises(ConvertError, match="no routed-expert weights found"):
        scan_checkpoint(tmp_path / "dense")
    with pytest.raises(ConvertError, match="not a directory"):
        scan_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match=r"no \*.safetensors files"):
        scan_checkpoint(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"garbage!" * 4)
    with pytest.raises(ConvertError, match="not a readable safetensors file"):
        scan_checkpoint(tmp_path / "junk")


def test_error_unsupported_dtype_and_layout(tmp_path):
    write_per_expert(tmp_path / "hf", {0: {p: t.to(torch.int8) for p, t in random_experts().items()}})
    with pytest.raises(ConvertError, match="has dtype I8"):
        scan_checkpoint(tmp_path / "hf")
    write_fused(tmp_path / "oss", {0: random_experts()}, model_type="gpt_oss")
    with pytest.raises(ConvertError, match="transposed"):
        scan_checkpoint(tmp_path / "oss")


def test_error_group_size_and_layers(tmp_path):
    write_fused(tmp_path / "hf", {0: random_experts()})
    with pytest.raises(ConvertError,
                       match=r"intermediate_size \(32\) must be divisible by group_size \(64\)"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", QuantSpec("AMXINT4_KGroup_SFT", 64),
                           progress=False)
    with pytest.raises(ConvertError, match=r"layers \[5\] have no routed experts \(MoE layers: 0\)"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", INT4_KG, layers=[5], progress=False)
    assert not (tmp_path / "out").exists()


def test_error_non_finite_weight(tmp_path):
    w = random_experts()
    w["up"][1, 2, 3] = float("nan")
    write_fused(tmp_path / "hf", {0: w})
    with pytest.raises(ConvertError, match="layer 0 up: cannot pack"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", INT4_KG, progress=False)


def test_parse_layers():
    assert parse_layers("0-3,7, 5") == [0, 1, 2, 3, 5, 7]
    for bad in ("", "a", "3-1", "1,,2"):
        with pytest.raises(ValueError):
            parse_layers(bad)


# ------------------------------------------------- FP8 (DeepSeek-V3) sources

def write_fp8(src, layers, bk=32, seed=0):
    """Per-expert FP8 E4M3 weights with [ceil(N/bk), K/bk] weight_scale_inv;
    returns proj -> [E, rows, cols] of the exact dequantized fp32 values."""
    src.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors, deq = {}, {}
    for L, w in layers.items():
        deq[L] = {}
        for p in PROJECTIONS:
            rows, cols = dims(p)
            outs = []
            for e in range(w[p].shape[0]):
                q = (w[p][e].float() * 2000).clamp(-448, 448).to(torch.float8_e4m3fn)
                s = torch.rand((rows + bk - 1) // bk, cols // bk, generator=g) * 1e-3 + 1e-4
                k = f"model.layers.{L}.mlp.experts.{e}.{p}_proj.weight"
                tensors[k], tensors[k + "_scale_inv"] = q, s
                full = s.repeat_interleave(bk, 0)[:rows].repeat_interleave(bk, 1)
                outs.append(q.float() * full)
            deq[L][p] = torch.stack(outs)
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(dict(model_type="deepseek_v3", hidden_size=H,
                                                     moe_intermediate_size=I, n_routed_experts=E)))
    return deq


def test_convert_fp8_checkpoint(tmp_path):
    deq = write_fp8(tmp_path / "hf", {1: random_experts(seed=7, dtype=torch.float32)})
    fp8 = QuantSpec("AMXFP8_SFT", 32)
    convert_checkpoint(tmp_path / "hf", tmp_path / "fp8", fp8, progress=False)
    n, *got = read_layer(tmp_path / "fp8", 1, fp8, hidden_size=H, intermediate_size=I)
    for proj, parts in zip(PROJECTIONS, got):  # exact: the FP8 codes and block scales as they are
        assert torch.equal(dequantize(parts, fp8, dims(proj)[1]), deq[1][proj]), proj
    # another target: the exact dequantized values, quantized
    convert_checkpoint(tmp_path / "hf", tmp_path / "int4", INT4_KG, progress=False)
    check_layer(tmp_path / "int4", 1, INT4_KG, deq[1])


def test_error_fp8_without_scales(tmp_path):
    write_fp8(tmp_path / "hf", {0: random_experts(seed=1, dtype=torch.float32)})
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del t["model.layers.0.mlp.experts.2.up_proj.weight_scale_inv"]
    save_file(t, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConvertError, match=r"experts\.2\.up_proj\.weight has no .*_scale_inv"):
        scan_checkpoint(tmp_path / "hf")
