"""Convert the routed experts of a Hugging Face checkpoint into weight files.

The source is a checkpoint directory: ``config.json`` (optional) and
``*.safetensors`` shards, with or without ``model.safetensors.index.json``.
The routed experts are found by their keys (any prefix before ``layers.``):

* per expert: ``layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight``;
* Mixtral: ``layers.{L}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``
  (w1 = gate, w3 = up, w2 = down);
* fused (transformers >= 5): ``layers.{L}.mlp.experts.gate_up_proj``
  ``[E, 2I, H]`` (gate rows first) and ``layers.{L}.mlp.experts.down_proj``
  ``[E, H, I]``.

Each layer is read, packed with :func:`ktmoe.quant.quantize` and written with
:func:`ktmoe.weight_files.write_layer` (``layer_{L:05d}.safetensors``) before
the next one is read, so memory holds one projection of one layer at a time
plus the packed layer.  bf16 and fp32 weights are packed as they are, fp16
weights are widened to fp32 first (exactly).

Command line: ``ktmoe convert SRC --out DIR --method AMXINT4_KGroup_SFT``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .quant import METHOD_FORMATS, QuantSpec
from .weight_files import PROJECTIONS, WeightFileError, write_layer

INDEX_FILE = "model.safetensors.index.json"

_PER_EXPERT = re.compile(
    r"^(?P<prefix>(?:.+\.)?)layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>gate|up|down)_proj\.weight$")
_MIXTRAL = re.compile(
    r"^(?P<prefix>(?:.+\.)?)layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>w1|w3|w2)\.weight$")
_FUSED = re.compile(
    r"^(?P<prefix>(?:.+\.)?)layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)$")
_MIXTRAL_PROJ = {"w1": "gate", "w3": "up", "w2": "down"}

#: config.json names, in order of preference
_EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")
_INTERMEDIATE_KEYS = ("moe_intermediate_size", "intermediate_size")
#: model types whose experts are stored transposed (not supported)
_TRANSPOSED = ("gpt_oss", "llama4", "llama4_text")
_SOURCE_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
#: FP8 E4M3 weights with a "<key>_scale_inv" beside them (DeepSeek-V3/R1)
_FP8_DTYPE = "F8_E4M3"
_FP8_SCALE_SUFFIX = "_scale_inv"


class ConvertError(RuntimeError):
    """The source checkpoint cannot be converted (the message says why)."""


@dataclass
class LayerSource:
    """Where one MoE layer's experts are in the checkpoint."""

    layout: str                                 # "per_expert" or "fused"
    num_experts: int
    #: per_expert: proj -> one key per expert; fused: "gate_up"/"down" -> [key]
    keys: Dict[str, List[str]] = field(default_factory=dict)
    #: "fp8": block-scaled FP8 weights (DeepSeek-V3), each key's scales at
    #: key + "_scale_inv"
    quant: str = ""


@dataclass
class Checkpoint:
    """What :func:`scan_checkpoint` found in a checkpoint directory."""

    path: Path
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_experts: int
    layers: Dict[int, LayerSource]
    files: Dict[str, Path]                      # tensor key -> shard
    dtypes: Dict[str, str]                      # tensor key -> safetensors dtype name


def parse_layers(text: str) -> List[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    out = set()
    for item in text.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"bad layer list {text!r}: expected e.g. '0-3,7'")
        out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return sorted(out)


def _read_config(src: Path) -> dict:
    p = src / "config.json"
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{p}: cannot read: {e}") from e
    if not isinstance(cfg, dict):
        raise ConvertError(f"{p}: expected a JSON object")
    text = cfg.get("text_config")
    if isinstance(text, dict):  # multimodal models keep the language model's sizes here
        cfg = {**cfg, **{k: v for k, v in text.items() if v is not None}}
    return cfg


def _first(cfg: dict, names: Sequence[str]) -> Tuple[Optional[str], Optional[int]]:
    for n in names:
        v = cfg.get(n)
        if isinstance(v, int) and not isinstance(v, bool):
            return n, v
    return None, None


def _shard_keys(src: Path) -> Dict[str, Path]:
    """tensor key -> shard file, from the index if there is one."""
    from safetensors import safe_open

    index = src / INDEX_FILE
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise ConvertError(f"{index}: cannot read its weight_map: {e!r}") from e
        files = {}
        for k, f in wm.items():
            p = src / f
            if not p.is_file():
                raise ConvertError(f"{index}: tensor {k} is in {f}, which does not exist")
            files[k] = p
        return files
    shards = sorted(p for p in src.glob("*.safetensors") if p.is_file())
    if not shards:
        raise ConvertError(f"{src}: no *.safetensors files (and no {INDEX_FILE})")
    files: Dict[str, Path] = {}
    for p in shards:
        try:
            with safe_open(str(p), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error type
            raise ConvertError(f"{p}: not a readable safetensors file: {e}") from e
        for k in keys:
            if k in files:
                raise ConvertError(f"{src}: tensor {k} is in two shards: {files[k].name} and {p.name}")
            files[k] = p
    return files


def _tensor_meta(files: Dict[str, Path], keys: Sequence[str]) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """key -> (dtype name, shape), read from the headers only."""
    from safetensors import safe_open

    by_file: Dict[Path, List[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for p, ks in by_file.items():
        try:
            with safe_open(str(p), framework="pt") as f:
                for k in ks:
                    s = f.get_slice(k)
                    out[k] = (s.get_dtype(), tuple(s.get_shape()))
        except ConvertError:
            raise
        except Exception as e:
            raise ConvertError(f"{p}: cannot read tensor headers: {e}") from e
    return out


def scan_checkpoint(src) -> Checkpoint:
    """Find and check the routed experts of the checkpoint directory ``src``
    (reads config.json and the safetensors headers, no tensor data)."""
    src = Path(src)
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory (expected a Hugging Face checkpoint directory)")
    cfg = _read_config(src)
    model_type = str(cfg.get("model_type", ""))
    if model_type in _TRANSPOSED:
        raise ConvertError(f"{src}: model_type {model_type!r} stores its experts transposed "
                           "([E, H, 2I]); this converter does not support it")
    files = _shard_keys(src)

    found: Dict[int, Dict[str, Dict[int, str]]] = {}   # layer -> proj -> expert -> key
    fused: Dict[int, Dict[str, str]] = {}              # layer -> gate_up/down -> key
    prefixes = set()
    for k in files:
        m = _PER_EXPERT.match(k) or _MIXTRAL.match(k)
        if m:
            proj = _MIXTRAL_PROJ.get(m["proj"], m["proj"])
            found.setdefault(int(m["layer"]), {}).setdefault(proj, {})[int(m["expert"])] = k
            prefixes.add(m["prefix"])
            continue
        m = _FUSED.match(k)
        if m:
            fused.setdefault(int(m["layer"]), {})[m["proj"].replace("_proj", "")] = k
            prefixes.add(m["prefix"])
    if not found and not fused:
        raise ConvertError(
            f"{src}: no routed-expert weights found (looked for layers.L.mlp.experts.E.gate_proj"
            ".weight, layers.L.block_sparse_moe.experts.E.w1.weight and "
            "layers.L.mlp.experts.gate_up_proj)")
    if len(prefixes) > 1:
        raise ConvertError(f"{src}: routed experts under several prefixes: "
                           f"{', '.join(sorted(p or '(none)' for p in prefixes))}")
    both = sorted(set(found) & set(fused))
    if both:
        raise ConvertError(f"{src}: layer {both[0]} has both per-expert and fused expert keys")

    layers: Dict[int, LayerSource] = {}
    for L, projs in sorted(found.items()):
        experts = None
        for proj in PROJECTIONS:
            es = projs.get(proj, {})
            if not es:
                raise ConvertError(f"{src}: layer {L}: no {proj} projection weights found")
            n = max(es) + 1
            missing = sorted(set(range(n)) - set(es))
            if missing:
                raise ConvertError(f"{src}: layer {L}: {proj} weights of experts {missing[:8]} "
                                   f"are missing (found {len(es)} of {n})")
            if experts is not None and n != experts:
                raise ConvertError(f"{src}: layer {L}: {proj} has {n} experts, the gate has {experts}")
            experts = n
        layers[L] = LayerSource("per_expert", experts,
                                {p: [projs[p][e] for e in range(experts)] for p in PROJECTIONS})
    for L, projs in sorted(fused.items()):
        for p in ("gate_up", "down"):
            if p not in projs:
                raise ConvertError(f"{src}: layer {L}: {p}_proj is missing next to the other fused key")
        layers[L] = LayerSource("fused", 0, {p: [projs[p]] for p in ("gate_up", "down")})

    meta = _tensor_meta(files, [k for ls in layers.values() for ks in ls.keys.values() for k in ks])
    for L, ls in layers.items():
        kinds = {meta[k][0] == _FP8_DTYPE for ks in ls.keys.values() for k in ks}
        if kinds == {True} and ls.layout == "per_expert":
            ls.quant = "fp8"
            for ks in ls.keys.values():
                for k in ks:
                    if k + _FP8_SCALE_SUFFIX not in files:
                        raise ConvertError(f"{files[k]}: FP8 tensor {k} has no {k + _FP8_SCALE_SUFFIX} "
                                           "(block scales) in the checkpoint")
            continue
        for ks in ls.keys.values():
            for k in ks:
                dt = meta[k][0]
                if dt not in _SOURCE_DTYPES:
                    raise ConvertError(
                        f"{files[k]}: tensor {k} has dtype {dt}; the converter reads "
                        f"{', '.join(sorted(_SOURCE_DTYPES))}, and per-expert FP8 E4M3 with "
                        f"{_FP8_SCALE_SUFFIX} block scales (every expert tensor of the layer)")

    # Sizes: from config.json where it has them, else from the first layer's tensors.
    L0 = min(layers)
    first = layers[L0]
    if first.layout == "per_expert":
        k0 = first.keys["gate"][0]
        shape_I, shape_H = meta[k0][1] if len(meta[k0][1]) == 2 else (None, None)
        shape_E = first.num_experts
    else:
        k0 = first.keys["gate_up"][0]
        s = meta[k0][1]
        shape_E, shape_I, shape_H = (s[0], s[1] // 2, s[2]) if len(s) == 3 else (None, None, None)
    if shape_H is None:
        raise ConvertError(f"{files[k0]}: tensor {k0} has shape {list(meta[k0][1])}, expected "
                           f"{'2' if first.layout == 'per_expert' else '3'} dimensions")
    sizes = {}
    for what, names, from_shape in (("hidden_size", ("hidden_size",), shape_H),
                                    ("intermediate_size", _INTERMEDIATE_KEYS, shape_I),
                                    ("num_experts", _EXPERT_KEYS, shape_E)):
        name, v = _first(cfg, names)
        if v is not None and v != from_shape:
            raise ConvertError(
                f"{src}: config.json has {name}={v}, but the experts of layer {L0} have "
                f"{what}={from_shape} (from {k0} {list(meta[k0][1])})")
        sizes[what] = v if v is not None else from_shape
    H, I, E_cfg = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_experts"]

    # Every expert tensor must have the shape these sizes imply.
    for L, ls in layers.items():
        if ls.layout == "per_expert":
            want = {"gate": (I, H), "up": (I, H), "down": (H, I)}
            for p, ks in ls.keys.items():
                for k in ks:
                    if meta[k][1] != want[p]:
                        raise ConvertError(
                            f"{files[k]}: layer {L}: {k} has shape {list(meta[k][1])}, expected "
                            f"{list(want[p])} (hidden_size={H}, intermediate_size={I})")
        else:
            gu, dn = ls.keys["gate_up"][0], ls.keys["down"][0]
            E = meta[gu][1][0] if meta[gu][1] else 0
            for k, want in ((gu, (E, 2 * I, H)), (dn, (E, H, I))):
                if meta[k][1] != want:
                    raise ConvertError(
                        f"{files[k]}: layer {L}: {k} has shape {list(meta[k][1])}, expected "
                        f"{list(want)} ([E, 2I, H] / [E, H, I] with hidden_size={H}, "
                        f"intermediate_size={I})")
            ls.num_experts = E
        if ls.num_experts != E_cfg:
            raise ConvertError(f"{src}: layer {L} has {ls.num_experts} experts, expected {E_cfg}")
    return Checkpoint(src, model_type, H, I, E_cfg, layers, files,
                      {k: dt for k, (dt, _) in meta.items()})


class _Shards:
    """The source shards, opened when first read and closed (unmapped) after
    the last layer that reads them, so that mapped pages do not pile up."""

    def __init__(self, ck: Checkpoint, todo: Sequence[int]):
        self._files = ck.files
        self._open: Dict[Path, object] = {}
        self._last: Dict[Path, int] = {}
        for L in todo:
            ls = ck.layers[L]
            for keys in ls.keys.values():
                for k in keys:
                    self._last[ck.files[k]] = L
                    if ls.quant == "fp8":
                        self._last[ck.files[k + _FP8_SCALE_SUFFIX]] = L

    def __call__(self, key: str):
        from safetensors import safe_open

        p = self._files[key]
        if p not in self._open:
            try:
                h = safe_open(str(p), framework="pt")
                self._open[p] = h.__enter__()
            except Exception as e:
                raise ConvertError(f"{p}: cannot open: {e}") from e
        return self._open[p]

    def done(self, layer: int) -> None:
        for p in [p for p in self._open if self._last.get(p) == layer]:
            self._open.pop(p).__exit__(None, None, None)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].__exit__(None, None, None)


def _load_projection(ck: Checkpoint, ls: LayerSource, proj: str, shards: _Shards):
    """One projection of one layer, [E, rows, cols], in bf16 or fp32; for an
    FP8 layer a list of per-expert ``{"weight", "weight_scale_inv"}`` dicts."""
    I = ck.intermediate_size
    if ls.layout == "per_expert":
        keys = ls.keys[proj]
    else:
        keys = ls.keys["down" if proj == "down" else "gate_up"]
    if ls.quant == "fp8":
        return [{"weight": shards(k).get_tensor(k),
                 "weight_scale_inv": shards(k + _FP8_SCALE_SUFFIX).get_tensor(k + _FP8_SCALE_SUFFIX)}
                for k in keys]
    dtypes = {ck.dtypes[k] for k in keys}
    dtype = torch.bfloat16 if dtypes == {"BF16"} else torch.float32
    if ls.layout == "fused":
        k = keys[0]
        s = shards(k).get_slice(k)
        t = s[:] if proj == "down" else (s[:, :I] if proj == "gate" else s[:, I:])
        return t.to(dtype).contiguous()
    first = shards(keys[0]).get_tensor(keys[0])
    out = torch.empty((len(keys), *first.shape), dtype=dtype)
    out[0].copy_(first)
    del first
    for e, k in enumerate(keys[1:], 1):
        out[e].copy_(shards(k).get_tensor(k))
    return out


def _quantize(w: torch.Tensor, spec: QuantSpec, num_threads: int) -> Dict[str, torch.Tensor]:
    """quantize() over slices of the experts on ``num_threads`` threads (the
    quantizer runs on its calling thread, outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from .quant import quantize

    E = w.shape[0]
    n = max(1, min(num_threads, E))
    if n == 1:
        return quantize(w, spec)
    parts = {name: torch.empty((E, *shape), dtype=dt)
             for name, (shape, dt) in spec.part_shapes(*w.shape[1:]).items()}
    bounds = [(E * i // n, E * (i + 1) // n) for i in range(n)]

    def work(b):
        q = quantize(w[b[0]:b[1]], spec)
        for name, t in q.items():
            parts[name][b[0]:b[1]].copy_(t)

    with ThreadPoolExecutor(n) as ex:
        list(ex.map(work, bounds))
    return parts


def _from_fp8(experts: List[Dict[str, torch.Tensor]], spec: QuantSpec):
    """Per-expert FP8 checkpoint tensors -> the packed parts of ``spec``
    (a dict) when ``spec`` is FP8 with the checkpoint's block width (exact,
    the codes copied), else the dequantized weights [E, N, K] in fp32 for
    the quantizer."""
    from .loaders import checkpoint_to_parts
    from .quant import dequantize

    w0, s0 = experts[0]["weight"], experts[0]["weight_scale_inv"]
    bk = -(-w0.shape[-1] // s0.shape[-1])  # block width: ceil(K / scale columns)
    src_spec, parts = checkpoint_to_parts("FP8", experts, group_size=bk)
    if spec.format == "fp8_e4m3" and spec.group_size == bk:
        return parts
    return dequantize(parts, src_spec, w0.shape[-1], torch.float32)


def convert_checkpoint(src, out, spec: QuantSpec, *, layers: Optional[Sequence[int]] = None,
                       num_threads: Optional[int] = None, progress: bool = True) -> List[dict]:
    """Convert the routed experts of checkpoint directory ``src`` into weight
    files in ``out`` (one ``layer_{L:05d}.safetensors`` per MoE layer), packed
    as ``spec``.  ``layers`` selects MoE layers (default: all).  Returns one
    dict per layer written: layer, file, bytes, num_experts, seconds."""
    from tqdm import tqdm

    ck = scan_checkpoint(src)
    threads = int(num_threads or os.cpu_count() or 1)
    H, I = ck.hidden_size, ck.intermediate_size
    try:
        spec.check_cols(H, "hidden_size")
        spec.check_cols(I, "intermediate_size")
    except ValueError as e:
        raise ConvertError(str(e)) from None
    todo = sorted(ck.layers) if layers is None else sorted(set(int(L) for L in layers))
    absent = [L for L in todo if L not in ck.layers]
    if absent:
        raise ConvertError(f"{ck.path}: layers {absent} have no routed experts (MoE layers: "
                           f"{','.join(map(str, sorted(ck.layers)))})")
    extra = {"source_model_type": ck.model_type} if ck.model_type else {}
    report = []
    shards = _Shards(ck, todo)
    bar = tqdm(todo, desc=f"converting to {spec.method}", unit="layer", disable=not progress,
               file=sys.stderr)
    try:
        for L in bar:
            t0 = time.perf_counter()
            ls = ck.layers[L]
            packed = []
            for proj in PROJECTIONS:
                w = _load_projection(ck, ls, proj, shards)
                try:
                    if isinstance(w, list):  # FP8 source: exact when the target is FP8 alike
                        w = _from_fp8(w, spec)
                    packed.append(w if isinstance(w, dict) else _quantize(w, spec, threads))
                except (ValueError, RuntimeError) as e:
                    raise ConvertError(f"{ck.path}: layer {L} {proj}: cannot pack: {e}") from e
                del w
            shards.done(L)
            path = write_layer(out, L, spec, *packed, hidden_size=H, intermediate_size=I,
                               extra_metadata=extra)
            del packed
            n = path.stat().st_size
            report.append({"layer": L, "file": str(path), "bytes": n,
                           "num_experts": ls.num_experts, "seconds": time.perf_counter() - t0})
            if progress:
                bar.write(f"layer {L}: {n} bytes -> {path.name}", file=sys.stderr)
    finally:
        bar.close()
        shards.close()
    return report


# --------------------------------------------------------------------- CLI

def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output directory for the weight files")
    p.add_argument("--method", required=True, choices=sorted(METHOD_FORMATS),
                   help="SFT method whose packed format to write")
    p.add_argument("--group-size", type=int, default=128,
                   help="K-group size of the K-group methods (default 128)")
    p.add_argument("--zero-point", action=argparse.BooleanOptionalAction, default=True,
                   help="AMXINT4_KGroup_SFT: an integer zero point per group (default) "
                        "or the fixed offset 8")
    p.add_argument("--layers", help="MoE layers to convert, e.g. '0-3,7' (default: all)")
    p.add_argument("--threads", type=int, default=0, help="quantizer threads (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-layer lines")


def run_convert(args: argparse.Namespace) -> int:
    try:
        spec = QuantSpec(args.method, args.group_size, args.zero_point)
        layers = parse_layers(args.layers) if args.layers else None
        t0 = time.perf_counter()
        report = convert_checkpoint(args.src, args.out, spec, layers=layers,
                                    num_threads=args.threads or None, progress=not args.no_progress)
    except (ConvertError, WeightFileError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = sum(r["bytes"] for r in report)
    print(f"wrote {len(report)} layer(s), {total} bytes, to {args.out} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ktmoe convert", description=__doc__.split("\n\n")[0])
    add_convert_arguments(p)
    return run_convert(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ConvertError", "Checkpoint", "LayerSource", "scan_checkpoint", "convert_checkpoint",
           "parse_layers", "main"]
