"""Weight files (ktmoe.weight_files) and the inspect tool.

Round trips for every format (synthetic parts exercise the file structure,
quantized weights the whole path), in-place reading (the tensors view a
private mapping of the file), every error case, and the CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ktmoe.quant import QuantSpec, dequantize
from ktmoe.weight_files import (
    PROJECTIONS,
    WeightFileError,
    inspect,
    read_layer,
    tensor_key,
    validate,
    write_layer,
    write_layers,
)

REPO = Path(__file__).resolve().parent.parent
H, I, E = 64, 32, 4
GS = 16

#: (method, zero_point): every packed format once
FORMATS = [
    ("AMXBF16_SFT", True), ("AMXINT8_SFT", True), ("AMXINT4_SFT", True),
    ("AMXINT4_1_SFT", True), ("AMXINT4_KGroup_SFT", True), ("AMXINT4_KGroup_SFT", False),
    ("AMXINT4_1KGroup_SFT", True),
]
FORMAT_IDS = [f"{m}-zp{int(z)}" for m, z in FORMATS]


def dims(proj, h=H, i=I):
    return (h, i) if proj == "down" else (i, h)


def synth_parts(spec, rows, cols, experts=E, seed=0):
    """Random parts of the right shapes and dtypes (not a real quantization)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for part, (shape, dt) in spec.part_shapes(rows, cols).items():
        if dt.is_floating_point:
            out[part] = torch.randn((experts, *shape), generator=g).to(dt)
        else:
            info = torch.iinfo(dt)
            out[part] = torch.randint(info.min, info.max + 1, (experts, *shape), generator=g, dtype=dt)
    return out


def synth_layer(spec, seed=0, experts=E, h=H, i=I):
    return tuple(synth_parts(spec, *dims(p, h, i), experts=experts, seed=seed + k)
                 for k, p in enumerate(PROJECTIONS))


def write_sample(out, spec, layer=3, seed=0, experts=E):
    layer_parts = synth_layer(spec, seed, experts)
    path = write_layer(out, layer, spec, *layer_parts, hidden_size=H, intermediate_size=I)
    return path, layer_parts


def assert_parts_equal(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def rewrite_header(path, edit):
    """Rewrite the safetensors header of ``path`` with ``edit(header_dict)``,
    keeping the data bytes."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def header_len(path):
    return struct.unpack("<Q", Path(path).read_bytes()[:8])[0]


# ------------------------------------------------------------- round trips

@pytest.mark.parametrize("method,zp", FORMATS, ids=FORMAT_IDS)
def test_round_trip_synthetic(tmp_path, method, zp):
    spec = QuantSpec(method, GS, zp)
    path, (g, u, d) = write_sample(tmp_path, spec)
    assert path == tmp_path / "layer_00003.safetensors"
    n, g2, u2, d2 = read_layer(tmp_path, 3, spec, hidden_size=H, intermediate_size=I)
    assert n == E
    for got, want in ((g2, g), (u2, u), (d2, d)):
        assert_parts_equal(got, want)


@pytest.mark.parametrize("method,zp", FORMATS, ids=FORMAT_IDS)
def test_file_is_standard_safetensors(tmp_path, method, zp):
    from safetensors import safe_open

    spec = QuantSpec(method, GS, zp)
    path, layer = write_sample(tmp_path, spec, layer=7)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        for proj, parts in zip(PROJECTIONS, layer):
            for part, t in parts.items():
                assert torch.equal(f.get_tensor(tensor_key(7, proj, part)), t)
    assert keys == {tensor_key(7, p, part) for p in PROJECTIONS for part in spec.parts}
    assert meta["format"] == "ktmoe.experts" and meta["format_version"] == "1"
    assert meta["method"] == method and meta["quant_format"] == spec.format
    assert meta["group_size"] == (str(GS) if spec.kgroup else "0")
    assert meta["zero_point"] == ("true" if spec.format == "int4_kgroup_zp" else "false")
    assert (meta["num_experts"], meta["hidden_size"], meta["intermediate_size"]) == (str(E), str(H), str(I))
    assert meta["layers"] == "7"
    sums = json.loads(meta["checksums"])
    assert set(sums) == keys and all(v.startswith("crc32:") and len(v) == 14 for v in sums.values())


@pytest.mark.parametrize("method,zp", FORMATS, ids=FORMAT_IDS)
def test_round_trip_quantized(tmp_path, method, zp):
    from ktmoe.quant import quantize

    spec = QuantSpec(method, GS, zp)
    torch.manual_seed(1)
    w = {p: (torch.randn(E, *dims(p)) * 0.05).bfloat16() for p in PROJECTIONS}
    packed = [quantize(w[p], spec) for p in PROJECTIONS]
    write_layer(tmp_path, 0, spec, *packed, hidden_size=H, intermediate_size=I)
    n, *got = read_layer(tmp_path, 0, spec, hidden_size=H, intermediate_size=I)
    assert n == E
    for p, parts, want in zip(PROJECTIONS, got, packed):
        assert_parts_equal(parts, want)
        cols = dims(p)[1]
        assert torch.equal(dequantize(parts, spec, cols), dequantize(want, spec, cols))
    if method == "AMXBF16_SFT":
        assert torch.equal(got[0]["qweight"], w["gate"])


def test_single_file_path_and_spec_options_ignored_by_per_row_formats(tmp_path):
    spec = QuantSpec("AMXINT8_SFT", 128, True)
    f = tmp_path / "experts.safetensors"
    _, (g, u, d) = write_sample(f, spec, layer=0)
    assert f.is_file() and sorted(os.listdir(tmp_path)) == ["experts.safetensors"]
    # group_size / zero_point do not apply to per-row formats: any value matches
    n, g2, _, _ = read_layer(f, 0, QuantSpec("AMXINT8_SFT", 64, False), hidden_size=H,
                             intermediate_size=I)
    assert n == E and torch.equal(g2["qweight"], g["qweight"])


def test_layer_found_by_metadata_not_by_name(tmp_path):
    spec = QuantSpec("AMXINT4_SFT")
    # misleading names: layer 5 lives in "layer_00007", layer 7 in "misc"
    _, l5 = write_sample(tmp_path / "layer_00007.safetensors", spec, layer=5, seed=10)
    _, l7 = write_sample(tmp_path / "misc.safetensors", spec, layer=7, seed=20)
    (tmp_path / "README.md").write_text("not a weight file\n")
    for L, want in ((5, l5), (7, l7)):
        _, *got = read_layer(tmp_path, L, spec, hidden_size=H, intermediate_size=I)
        for g, w in zip(got, want):
            assert_parts_equal(g, w)


def test_several_layers_in_one_file(tmp_path):
    spec = QuantSpec("AMXINT4_1KGroup_SFT", GS)
    layers = {0: synth_layer(spec, 1), 2: synth_layer(spec, 2)}
    f = write_layers(tmp_path / "all.safetensors", layers, spec, hidden_size=H, intermediate_size=I)
    for L, want in layers.items():
        _, *got = read_layer(f, L, spec, hidden_size=H, intermediate_size=I)
        for g, w in zip(got, want):
            assert_parts_equal(g, w)
    info = inspect(f)
    assert info["layers"] == [0, 2] and info["files"][0]["layers"] == [0, 2]


def test_more_source_experts_than_a_layer_uses(tmp_path):
    spec = QuantSpec("AMXBF16_SFT")
    write_sample(tmp_path, spec, experts=9)
    assert read_layer(tmp_path, 3, spec, hidden_size=H, intermediate_size=I)[0] == 9


def test_writer_rejects_bad_parts(tmp_path):
    spec = QuantSpec("AMXINT4_KGroup_SFT", GS, True)
    g, u, d = synth_layer(spec)
    with pytest.raises(ValueError, match="parts"):
        write_layer(tmp_path, 0, spec, {"qweight": g["qweight"]}, u, d, hidden_size=H,
                    intermediate_size=I)
    bad = dict(g, scale=g["scale"].double())
    with pytest.raises(ValueError, match=r"gate\.scale"):
        write_layer(tmp_path, 0, spec, bad, u, d, hidden_size=H, intermediate_size=I)
    with pytest.raises(ValueError, match="down.qweight"):
        write_layer(tmp_path, 0, spec, g, u, synth_parts(spec, H, I, experts=E + 1),
                    hidden_size=H, intermediate_size=I)
    with pytest.raises(ValueError, match="divisible by group_size"):
        write_layer(tmp_path, 0, spec, g, u, d, hidden_size=H, intermediate_size=24)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------- mapped, not copied

def _mappings_of(path):
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].strip() == str(path):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi))
    return out


def _rss_anon_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_read_maps_the_file_without_copying(tmp_path):
    spec = QuantSpec("AMXBF16_SFT")
    h, i, e = 1024, 512, 16  # 16 MiB per projection, 48 MiB in all
    parts = tuple({"qweight": torch.full((e, *dims(p, h, i)), k + 1.0, dtype=torch.bfloat16)}
                  for k, p in enumerate(PROJECTIONS))
    path = write_layer(tmp_path, 0, spec, *parts, hidden_size=h, intermediate_size=i).resolve()
    del parts
    total = path.stat().st_size

    before = _rss_anon_bytes()
    n, g, u, d = read_layer(tmp_path, 0, spec, hidden_size=h, intermediate_size=i, verify=True)
    grown = _rss_anon_bytes() - before  # verify=True read every byte
    assert grown < total // 4, f"anonymous memory grew by {grown} bytes for a {total}-byte file"

    maps = _mappings_of(path)
    assert maps, "the file is not mapped"
    for t in (g["qweight"], u["qweight"], d["qweight"]):
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        assert any(a <= lo and hi <= b for a, b in maps), "tensor is not inside the file mapping"
    assert float(u["qweight"][3, 7, 9]) == 2.0

    # A private mapping: writing to a tensor does not change the file.
    g["qweight"][0, 0, 0] = -5.0
    _, g2, _, _ = read_layer(tmp_path, 0, spec, hidden_size=h, intermediate_size=i, verify=True)
    assert float(g2["qweight"][0, 0, 0]) == 1.0


# ------------------------------------------------------------------- errors

def expect_error(match, *args, **kwargs):
    spec = kwargs.pop("spec", QuantSpec("AMXINT4_KGroup_SFT", GS, True))
    kw = dict(hidden_size=H, intermediate_size=I)
    kw.update(kwargs)
    with pytest.raises(WeightFileError, match=match) as ei:
        read_layer(*args, spec, **kw)
    assert isinstance(ei.value, RuntimeError)
    return str(ei.value)


@pytest.fixture
def sample(tmp_path):
    spec = QuantSpec("AMXINT4_KGroup_SFT", GS, True)
    path, _ = write_sample(tmp_path / "w", spec, layer=3)
    return path


def test_error_missing_path(tmp_path):
    expect_error("no such file or directory", tmp_path / "nope", 0)
    expect_error("empty", "", 0)


def test_error_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    expect_error(r"no \.safetensors files", tmp_path, 0)


def test_error_not_a_safetensors_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello, this is text and not a weight file\n")
    msg = expect_error("not a valid safetensors file", f, 0)
    assert str(f) in msg
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    expect_error("not a safetensors file", tmp_path / "short.safetensors", 0)


def test_error_plain_safetensors_without_ktmoe_metadata(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(f))
    expect_error("not a ktmoe expert weight file", f, 0)


def test_error_missing_layer_lists_present_ones(sample):
    msg = expect_error("layer 9 not found", sample.parent, 9)
    assert "layers present: 3" in msg


def test_error_layer_in_two_files(sample):
    spec = QuantSpec("AMXINT4_KGroup_SFT", GS, True)
    write_sample(sample.parent / "again.safetensors", spec, layer=3)
    expect_error("layer 3 is in several files", sample.parent, 3)
    assert any("two files" in p for p in validate(sample.parent))


@pytest.mark.parametrize("spec,words", [
    (QuantSpec("AMXINT8_SFT"), ["AMXINT8_SFT (int8)", "AMXINT4_KGroup_SFT (int4_kgroup_zp, group_size=16)"]),
    (QuantSpec("AMXINT4_KGroup_SFT", 32, True), ["group_size=32", "group_size=16"]),
    (QuantSpec("AMXINT4_KGroup_SFT", GS, False), ["int4_kgroup,", "int4_kgroup_zp,"]),
], ids=["method", "group_size", "zero_point"])
def test_error_method_mismatch_names_both(sample, spec, words):
    msg = expect_error("method mismatch", sample, 3, spec=spec)
    for w in words:
        assert w in msg
    assert "layer 3" in msg and str(sample) in msg


def test_error_size_mismatch(sample):
    msg = expect_error("shape mismatch", sample, 3, hidden_size=128)
    assert "hidden_size=64" in msg and "hidden_size=128" in msg
    expect_error("intermediate_size=48", sample, 3, intermediate_size=48)


def test_error_truncated_file(sample):
    data = sample.read_bytes()
    sample.write_bytes(data[:-10])
    msg = expect_error("truncated", sample, 3)
    assert str(sample) in msg
    # through the directory, too
    expect_error("truncated", sample.parent, 3)


def test_error_truncated_inside_header(sample):
    sample.write_bytes(sample.read_bytes()[:40])
    expect_error("corrupted or truncated", sample, 3)


def test_error_flipped_header_bytes(sample):
    data = bytearray(sample.read_bytes())
    data[8] ^= 0xFF  # the '{' that opens the JSON header
    sample.write_bytes(bytes(data))
    expect_error("corrupted header", sample, 3)
    data[8] ^= 0xFF
    data[5] ^= 0x40  # the header length
    sample.write_bytes(bytes(data))
    expect_error("header length", sample, 3)


def test_error_flipped_data_byte_fails_the_checksum(sample):
    data = bytearray(sample.read_bytes())
    data[-1] ^= 0x01  # last byte of the last tensor
    sample.write_bytes(bytes(data))
    msg = expect_error("checksum mismatch", sample, 3)
    assert "layer 3" in msg and "crc32:" in msg
    # without verification the (corrupted) data is returned as it is
    spec = QuantSpec("AMXINT4_KGroup_SFT", GS, True)
    read_layer(sample, 3, spec, hidden_size=H, intermediate_size=I, verify=False)
    problems = validate(sample)
    assert len(problems) == 1 and "checksum mismatch" in problems[0]
    assert validate(sample, verify=False) == []


def _set_meta(key, value):
    def edit(h):
        if value is None:
            del h["__metadata__"][key]
        else:
            h["__metadata__"][key] = value
    return edit


@pytest.mark.parametrize("edit,match", [
    (_set_meta("format_version", "2"), "unsupported format_version '2'"),
    (_set_meta("format_version", "one"), "bad metadata format_version"),
    (_set_meta("format", "other"), "not a ktmoe expert weight file"),
    (_set_meta("method", None), "missing metadata method"),
    (_set_meta("method", "AMXFP4_SFT"), "unknown method 'AMXFP4_SFT'"),
    (_set_meta("quant_format", "int4_kgroup"), "inconsistent metadata"),
    (_set_meta("zero_point", "yes"), "bad metadata zero_point"),
    (_set_meta("group_size", "24"), "bad metadata: group_size must be a positive multiple"),
    (_set_meta("num_experts", "5"), r"is U8\[4, 32, 32\], expected U8\[5, 32, 32\]"),
    (_set_meta("hidden_size", "x"), "bad metadata hidden_size"),
    (_set_meta("layers", "3,a"), "bad metadata layers"),
    (_set_meta("layers", "3,4"), "tensor layers.4.gate.qweight is missing"),
    (_set_meta("checksums", "[1, 2]"), "bad metadata checksums"),
    (_set_meta("checksums", "{}"), "no valid checksum for layers.3.gate.qweight"),
    (lambda h: h.pop("__metadata__"), "not a ktmoe expert weight file"),
    (lambda h: h["layers.3.up.scale"].update(dtype="F16"), "does not fill its byte range"),
    (lambda h: h["layers.3.up.scale"].update(dtype="Q9"), "unsupported dtype 'Q9'"),
    (lambda h: h["layers.3.up.scale"].pop("shape"), "bad entry for tensor 'layers.3.up.scale'"),
    (lambda h: h.update({"extra": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}),
     "unexpected tensors extra"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_error_bad_metadata_or_header(sample, edit, match):
    rewrite_header(sample, edit)
    msg = expect_error(match, sample, 3)
    assert str(sample) in msg
    assert validate(sample.parent) and match.split()[0] in " ".join(validate(sample.parent))


def test_error_tensor_checksum_changed(sample):
    def edit(h):
        sums = json.loads(h["__metadata__"]["checksums"])
        sums["layers.3.down.zero"] = "crc32:00000000"
        h["__metadata__"]["checksums"] = json.dumps(sums)
    rewrite_header(sample, edit)
    expect_error("checksum mismatch for layers.3.down.zero", sample, 3)


def test_unreadable_file_next_to_good_ones(sample):
    (sample.parent / "broken.safetensors").write_bytes(b"\x00" * 3)
    spec = QuantSpec("AMXINT4_KGroup_SFT", GS, True)
    assert read_layer(sample.parent, 3, spec, hidden_size=H, intermediate_size=I)[0] == E
    msg = expect_error("layer 4 not found", sample.parent, 4)
    assert "broken.safetensors" in msg
    info = inspect(sample.parent)
    assert list(info["unreadable"]) == ["broken.safetensors"] and info["layers"] == [3]


# ------------------------------------------------------ inspect and validate

def test_inspect_describes_the_files(tmp_path):
    spec = QuantSpec("AMXINT4_KGroup_SFT", GS, True)
    for L in (0, 1, 5):
        write_sample(tmp_path, spec, layer=L)
    info = inspect(tmp_path)
    assert info["layers"] == [0, 1, 5]
    assert info["methods"] == ["AMXINT4_KGroup_SFT"] and info["quant_formats"] == ["int4_kgroup_zp"]
    assert info["group_sizes"] == [GS] and info["num_experts"] == [E]
    assert [f["file"] for f in info["files"]] == [f"layer_0000{L}.safetensors" for L in (0, 1, 5)]
    f = info["files"][0]
    for p in PROJECTIONS:
        rows, cols = dims(p)
        assert f["projections"][p]["bytes"] == E * spec.nbytes(rows, cols)
        assert f["projections"][p]["parts"]["qweight"] == {"dtype": "uint8",
                                                           "shape": [E, rows, (cols + 1) // 2]}
    assert f["bytes_per_layer"] == sum(E * spec.nbytes(*dims(p)) for p in PROJECTIONS)
    assert info["total_bytes"] == sum(os.path.getsize(tmp_path / f["file"]) for f in info["files"])
    assert validate(tmp_path) == []


def test_validate_reports_mixed_methods_and_sizes(tmp_path):
    write_sample(tmp_path, QuantSpec("AMXINT8_SFT"), layer=0)
    write_sample(tmp_path, QuantSpec("AMXINT4_SFT"), layer=1)
    problems = validate(tmp_path)
    assert len(problems) == 1 and "disagree on the method" in problems[0]
    assert validate(tmp_path / "missing") == [f"{tmp_path / 'missing'}: no such file or directory"]


# ---------------------------------------------------------------------- CLI

def run_tool(*args):
    return subprocess.run([sys.executable, "tools/inspect_weights.py", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_tool_lists_and_validates(sample):
    r = run_tool(sample.parent)
    assert r.returncode == 0, r.stderr
    assert "AMXINT4_KGroup_SFT (int4_kgroup_zp, group_size=16)" in r.stdout
    assert "layer_00003.safetensors" in r.stdout and r.stdout.rstrip().endswith("OK")
    assert "qweight uint8[4, 32, 32]" in r.stdout

    r = run_tool(sample, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["problems"] == [] and doc["layers"] == [3]
    assert doc["files"][0]["projections"]["down"]["parts"]["scale"]["shape"] == [E, H, I // GS]


def test_tool_fails_on_a_bad_file(sample, tmp_path):
    data = bytearray(sample.read_bytes())
    data[-1] ^= 0x01
    sample.write_bytes(bytes(data))
    r = run_tool(sample.parent)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "checksum mismatch" in lines[0]

    r = run_tool(sample.parent, "--no-verify", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True

    r = run_tool(tmp_path / "nowhere", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and "no such file or directory" in doc["problems"][0]


def test_ktmoe_inspect_subcommand(sample, capsys):
    from ktmoe.cli import main

    assert main(["inspect", str(sample), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == [3]
    sample.write_bytes(sample.read_bytes()[:-1])
    assert main(["inspect", str(sample)]) == 1
    assert "truncated" in capsys.readouterr().err
