"""GGUF (llama.cpp, the LLAMAFILE method) routed experts -> ktmoe packed
parts (ktmoe.gguf).

Small .gguf files are written with gguf-py's GGUFWriter (3-D stacked expert
tensors ``blk.L.ffn_{gate,up,down}_exps.weight``, ne = [K, N, E]); the block
bytes come from ``gguf.quants.quantize`` where gguf-py can quantize the type,
otherwise they are random bytes with sane fp16 scale fields.  The reference
is gguf-py's own numpy dequantizer (``gguf.quants.dequantize``):

* exact types (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, BF16): ktmoe's dequantization
  of the parts equals it bit for bit (max abs difference 0; both compute the
  one rounded fp32 operation ggml's definition has, the rest is exact);
* F16/F32: the parts are its round-to-nearest-even bf16 values;
* every other type: the parts are ``ktmoe.quant.quantize(reference,
  int8_kgroup/32)`` and within 1/254 of each group's largest magnitude.

Whole layers (mixed per-projection formats, e.g. Q4_K gate/up + Q6_K down)
run through NativeLayer against the float64 reference on the dequantized
weights (relative error < 2e-5).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from reference import moe_sft_reference, rel_err

ktmoe = pytest.importorskip("ktmoe")
gguf = pytest.importorskip("gguf")  # gguf-py (llama.cpp's reader/writer), an optional dependency

from gguf import GGMLQuantizationType as Q  # noqa: E402

import ktmoe.gguf as kg  # noqa: E402  (a failure here is a failure, not a skip)
from ktmoe.quant import QuantSpec, dequantize, quantize  # noqa: E402

KERNEL_TOL = 2e-5
ARCH = "qwen3moe"

#: byte offsets of the fp16 fields (d, dmin, m) inside one block
F16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    "IQ4_NL": [0], "IQ4_XS": [0], "TQ2_0": [64],
}
#: typical magnitude of (code * sub-scale) of a block, to size the fp16 scales
CODE_RANGE = {"Q4_K": 63 * 8, "Q5_K": 63 * 16, "Q6_K": 64 * 32, "Q2_K": 15 * 2, "Q3_K": 32 * 4,
              "IQ4_XS": 32 * 64, "Q8_0": 127, "Q4_0": 8, "Q4_1": 8, "IQ4_NL": 64, "TQ2_0": 1}


def _can_quantize(t) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, 256), np.float32), t)
        return True
    except NotImplementedError:
        return False


def make_data(tname: str, E: int, N: int, K: int, rng, random_blocks: bool = False):
    """Source data of one stacked [E, N, K] projection as GGUFWriter takes it."""
    t = Q[tname]
    w = (rng.standard_normal((E, N, K)) / np.sqrt(K)).astype(np.float32)
    if tname == "F32":
        return w
    if tname == "F16":
        return w.astype(np.float16)
    if not random_blocks and _can_quantize(t):
        return gguf.quants.quantize(w, t)
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, size=(E, N, K // bs, ts), dtype=np.uint8)
    for off in F16_FIELDS[tname]:
        d = (rng.random((E, N, K // bs)) * 0.5 + 0.5) / (np.sqrt(K) * CODE_RANGE[tname] / 4)
        raw[..., off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(E, N, K // bs, 2)
    return raw.reshape(E, N, -1)


def add(writer, name, data, tname):
    if tname in ("F16", "F32"):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=Q[tname])


def write_gguf(path, tensors, meta=None):
    """tensors: {name: (data, type name)}; meta: {key suffix: int} under ARCH."""
    w = gguf.GGUFWriter(str(path), ARCH)
    for key, val in (meta or {}).items():
        w.add_uint32(f"{ARCH}.{key}", val)
    for name, (data, tname) in tensors.items():
        add(w, name, data, tname)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def layer_tensors(L, types, E, H, I, rng, random_blocks=False):
    out = {}
    for proj, tname, (N, K) in zip(("gate", "up", "down"), types, ((I, H), (I, H), (H, I))):
        out[f"blk.{L}.ffn_{proj}_exps.weight"] = (make_data(tname, E, N, K, rng, random_blocks),
                                                  tname)
    return out


def reference(path, name):
    """gguf-py's dequantization of a tensor of the file: fp32 [E, N, K]."""
    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == name)
    return np.array(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type))  # writable copy


def run_layer(specs, parts, E, H, I, tier):
    """Relative error of a NativeLayer forward of the parts against the
    float64 reference on their dequantized values."""
    from test_loaders import run_layer as forward

    x, ids, wts, out = forward(specs, parts, E, H, I, tier)
    dq = [dequantize(p, s, K) for p, s, K in zip(parts, specs, (H, H, I))]
    ref = moe_sft_reference(x, ids, wts, *dq, None, 1.0)
    assert ref.abs().max() > 0
    return rel_err(out, ref)


# ------------------------------------------------------------ exactness

EXACT = [("Q8_0", "int8_kgroup", 32), ("Q4_0", "int4_kgroup", 32), ("Q4_1", "int4_1_kgroup", 32),
         ("Q4_K", "int4_1_kgroup", 32), ("Q6_K", "int8_kgroup", 16), ("BF16", "bf16", None)]


@pytest.mark.parametrize("tname,fmt,gs", EXACT, ids=[e[0] for e in EXACT])
def test_exact_types(tmp_path, tname, fmt, gs):
    rng = np.random.default_rng(hash(tname) % 1000)
    E = 3
    H = I = 256 if tname.endswith("_K") else 64
    path = write_gguf(tmp_path / "m.gguf", layer_tensors(0, [tname] * 3, E, H, I, rng),
                      meta={"expert_count": E, "embedding_length": H,
                            "expert_feed_forward_length": I})
    n, specs, parts = kg.load_gguf_experts(path, 0, num_experts=E, hidden_size=H,
                                           intermediate_size=I)
    assert n == E
    for proj, spec, p, K in zip(("gate", "up", "down"), specs, parts, (H, H, I)):
        assert spec.format == fmt and (gs is None or spec.group_size == gs)
        assert kg.conversion_kind(tname) == "exact"
        ref = reference(path, f"blk.0.ffn_{proj}_exps.weight")
        got = dequantize(p, spec, K).numpy()
        assert got.shape == ref.shape
        assert np.array_equal(got, ref), (proj, np.abs(got - ref).max())
        assert np.abs(ref).max() > 0


def test_q4_0_nibble_order():
    """A hand-made Q4_0 block: weight j is the low nibble of byte j, weight
    j + 16 its high nibble; ktmoe wants weight k in byte k // 2."""
    block = np.zeros(18, np.uint8)
    block[0:2] = np.array([1.0], np.float16).view(np.uint8)
    q = np.arange(32) % 16  # weight j has code j % 16
    block[2:] = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    spec, parts = kg.gguf_to_parts(block.reshape(1, 18), "Q4_0", 32)
    codes = parts["qweight"][0].numpy()
    assert list(codes & 0xF) == list(q[0::2]) and list(codes >> 4) == list(q[1::2])
    assert np.array_equal(dequantize(parts, spec, 32).numpy()[0], q - 8.0)


@pytest.mark.parametrize("tname", ["F16", "F32"])
def test_float_types_round_to_bf16(tmp_path, tname):
    rng = np.random.default_rng(11)
    E, H, I = 2, 64, 32
    path = write_gguf(tmp_path / "f.gguf", layer_tensors(3, [tname] * 3, E, H, I, rng))
    n, specs, parts = kg.load_gguf_experts(path, 3)
    assert n == E
    assert kg.conversion_kind(tname) == "rounded"
    for proj, spec, p in zip(("gate", "up", "down"), specs, parts):
        assert spec == QuantSpec("AMXBF16_SFT")
        ref = torch.from_numpy(reference(path, f"blk.3.ffn_{proj}_exps.weight"))
        assert torch.equal(p["qweight"], ref.to(torch.bfloat16))  # round to nearest even
        err = (p["qweight"].float() - ref).abs()
        assert torch.all(err <= ref.abs() * 2.0 ** -8)  # half a bf16 ulp (8 significant bits)
        assert err.max() > 0


REQUANT = ["Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "IQ4_NL", "IQ4_XS", "TQ2_0"]


@pytest.mark.parametrize("tname", REQUANT)
def test_requantized_types(tmp_path, tname):
    rng = np.random.default_rng(12)
    E, H, I = 2, 256, 256
    path = write_gguf(tmp_path / "r.gguf", layer_tensors(1, [tname] * 3, E, H, I, rng))
    n, specs, parts = kg.load_gguf_experts(path, 1)
    assert n == E
    assert kg.conversion_kind(tname) == "requantized"
    for proj, spec, p in zip(("gate", "up", "down"), specs, parts):
        assert spec == kg.FALLBACK_SPEC == QuantSpec("INT8_KGROUP", 32)
        ref = torch.from_numpy(reference(path, f"blk.1.ffn_{proj}_exps.weight"))
        want = quantize(ref, spec)  # ktmoe's int8 K-group quantizer on gguf-py's values
        assert all(torch.equal(p[k], want[k]) for k in spec.parts)
        ref = ref.to(torch.float64)
        err = (dequantize(p, spec, ref.shape[-1], torch.float64) - ref).abs()
        gmax = ref.abs().reshape(E, ref.shape[1], -1, 32).amax(-1).repeat_interleave(32, -1)
        # half an int8 step (step = max / 127 in fp32); ties are reached (the
        # source values lie on a grid), so allow the fp32 rounding of the step
        assert torch.all(err <= gmax / 254 * (1 + 1e-5)), tname
        assert err.max() > 0


def test_gguf_to_parts_arrays_and_lists():
    rng = np.random.default_rng(13)
    data = make_data("Q4_K", 3, 8, 512, rng, random_blocks=True)
    spec, stacked = kg.gguf_to_parts(data, Q.Q4_K, 512)
    spec1, one = kg.gguf_to_parts(data[1], "Q4_K")
    spec2, listed = kg.gguf_to_parts([data[0], data[1], data[2]], int(Q.Q4_K))
    assert spec == spec1 == spec2 == QuantSpec("AMXINT4_1KGroup_SFT", 32)
    for k in spec.parts:
        assert torch.equal(stacked[k][1], one[k]) and torch.equal(stacked[k], listed[k])
    with pytest.raises(ValueError, match="rows hold 512 weights, expected 256"):
        kg.gguf_to_parts(data, "Q4_K", 256)
    with pytest.raises(ValueError, match="not a whole number of Q4_K blocks"):
        kg.gguf_to_parts(data[..., :100], "Q4_K")
    with pytest.raises(ValueError, match="not supported"):
        kg.gguf_spec("I32")
    with pytest.raises(ValueError, match="unknown ggml type"):
        kg.gguf_spec("Q9_9")


# ----------------------------------------------------- whole layers

LAYERS = {
    "Q4_K_M": (["Q4_K", "Q4_K", "Q6_K"], 256, 256, False),  # mixed: Q6_K down
    "Q4_0-Q4_1-Q8_0": (["Q4_0", "Q4_1", "Q8_0"], 64, 96, False),
    "BF16-F16-F32": (["BF16", "F16", "F32"], 64, 32, False),
    "requantized": (["Q5_K", "Q5_0", "IQ4_NL"], 256, 256, False),
}


@pytest.mark.parametrize("case", list(LAYERS))
def test_layer(tmp_path, tier, case):
    types, H, I, random_blocks = LAYERS[case]
    E = 4
    rng = np.random.default_rng(14)
    path = write_gguf(tmp_path / "l.gguf", layer_tensors(2, types, E, H, I, rng, random_blocks),
                      meta={"expert_count": E, "embedding_length": H})
    info = kg.open_gguf(path).layer_info(2)
    assert info.types == tuple(types) and (info.num_experts, info.hidden_size,
                                           info.intermediate_size) == (E, H, I)
    n, specs, parts = kg.load_gguf_experts(path, 2, num_experts=E, hidden_size=H,
                                           intermediate_size=I)
    assert n == E and specs == info.specs
    if case == "Q4_K_M":
        assert [s.format for s in specs] == ["int4_1_kgroup", "int4_1_kgroup", "int8_kgroup"]
        assert [s.group_size for s in specs] == [32, 32, 16]
    err = run_layer(specs, parts, E, H, I, tier)
    assert err < KERNEL_TOL, err


# ------------------------------------------------------ layouts, errors


def test_per_expert_layout_and_shards(tmp_path):
    rng = np.random.default_rng(15)
    E, H, I = 3, 64, 32
    stacked = layer_tensors(0, ["Q8_0", "Q4_0", "Q4_1"], E, H, I, rng)
    a = write_gguf(tmp_path / "stacked.gguf", stacked)
    per = {}
    for name, (data, tname) in stacked.items():
        proj = name.split(".")[2][len("ffn_"):-len("_exps")]
        for e in range(E):
            per[f"blk.0.ffn_{proj}.{e}.weight"] = (np.ascontiguousarray(data[e]), tname)
    b = write_gguf(tmp_path / "per_expert.gguf", per)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    names = list(stacked)
    write_gguf(shard_dir / "m-00001-of-00002.gguf", {n: stacked[n] for n in names[:2]},
               meta={"expert_count": E})
    write_gguf(shard_dir / "m-00002-of-00002.gguf", {names[2]: stacked[names[2]]})
    (shard_dir / "README.md").write_text("not a gguf file")
    results = [kg.load_gguf_experts(p, 0) for p in (a, b, str(shard_dir))]
    assert kg.open_gguf(b).layer_info(0).layout == "per_expert"
    for n, specs, parts in results[1:]:
        assert n == E and specs == results[0][1]
        for p, p0 in zip(parts, results[0][2]):
            assert all(torch.equal(p[k], p0[k]) for k in p0)


def test_errors(tmp_path):
    rng = np.random.default_rng(16)
    E, H, I = 2, 64, 32
    good = layer_tensors(0, ["Q8_0"] * 3, E, H, I, rng)
    with pytest.raises(FileNotFoundError, match="not found"):
        kg.load_gguf_experts(tmp_path / "missing.gguf", 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .gguf file"):
        kg.load_gguf_experts(tmp_path / "empty", 0)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        kg.load_gguf_experts(junk, 0)

    path = write_gguf(tmp_path / "ok.gguf", good, meta={"expert_count": E})
    with pytest.raises(ValueError, match=r"ok.gguf: layer 5 has no routed-expert tensors"):
        kg.load_gguf_experts(path, 5)
    with pytest.raises(ValueError, match="the file has hidden_size = 64, the layer expects 128"):
        kg.load_gguf_experts(path, 0, hidden_size=128)
    with pytest.raises(ValueError, match="num_experts = 2, the layer expects 8"):
        kg.load_gguf_experts(path, 0, num_experts=8)

    bad_meta = write_gguf(tmp_path / "meta.gguf", good, meta={"expert_count": E + 1})
    with pytest.raises(ValueError, match=f"metadata {ARCH}.expert_count = 3 but the expert "
                                         "tensors say 2"):
        kg.load_gguf_experts(bad_meta, 0)

    wrong_down = dict(good)
    wrong_down["blk.0.ffn_down_exps.weight"] = (make_data("Q8_0", E, H, 2 * I, rng), "Q8_0")
    p = write_gguf(tmp_path / "down.gguf", wrong_down)
    with pytest.raises(ValueError, match="ffn_down"):
        kg.load_gguf_experts(p, 0)

    p = str(tmp_path / "ints.gguf")
    w = gguf.GGUFWriter(p, ARCH)
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((E, I, H), np.int32))  # type I32
    for n in ("blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"):
        add(w, n, *good[n])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"blk.0.ffn_gate_exps.weight: ggml type I32 is not "
                                         "supported"):
        kg.load_gguf_experts(p, 0)

    fused = {"blk.0.ffn_gate_up_exps.weight": (make_data("Q8_0", E, 2 * I, H, rng), "Q8_0"),
             "blk.0.ffn_down_exps.weight": good["blk.0.ffn_down_exps.weight"]}
    p = write_gguf(tmp_path / "fused.gguf", fused)
    with pytest.raises(ValueError, match="fused .*unsupported layout"):
        kg.load_gguf_experts(p, 0)

    corrupt = dict(good)
    data = good["blk.0.ffn_up_exps.weight"][0].copy()
    data[1, 3, 34 * 1:34 * 1 + 2] = np.array([np.inf], np.float16).view(np.uint8)
    corrupt["blk.0.ffn_up_exps.weight"] = (data, "Q8_0")
    p = write_gguf(tmp_path / "corrupt.gguf", corrupt)
    with pytest.raises(ValueError, match=r"ffn_up_exps.weight \(Q8_0\): Q8_0 block scale of "
                                         r"expert 1 \(row 3\) is not finite"):
        kg.load_gguf_experts(p, 0)


def test_open_gguf_is_cached_until_the_file_changes(tmp_path):
    rng = np.random.default_rng(17)
    tensors = layer_tensors(0, ["Q8_0"] * 3, 2, 64, 32, rng)
    p = write_gguf(tmp_path / "c.gguf", tensors)
    m = kg.open_gguf(p)
    assert kg.open_gguf(p) is m and m.architecture == ARCH
    os.utime(p, ns=(1, 1))  # another mtime: re-read
    assert kg.open_gguf(p) is not m
