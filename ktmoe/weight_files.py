"""Weight files: the frozen experts of MoE layers, pre-packed in an SFT method.

A weight file is a standard safetensors file (``docs/weight_files.md`` is the
full specification).  It holds one or more MoE layers, each as three
projections (gate [E, I, H], up [E, I, H], down [E, H, I]; rows, cols) whose
packed parts (:mod:`ktmoe.quant`) are stacked over the experts::

    layers.{L}.{gate,up,down}.{qweight,scale,min,zero}

The safetensors metadata names the method and its options, the layer sizes,
the layers held and a CRC-32 per tensor.  A ``weight_path`` is one such file or
a directory of them (searched by their metadata, not by their names; the
converter writes ``layer_{L:05d}.safetensors``).

Reading maps the files into memory (``read_layer`` copies nothing), and every
problem with a file raises :class:`WeightFileError` naming the file, the layer
and what was expected.

This module uses torch only (never libktmoe).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .quant import METHOD_FORMATS, QuantSpec

FORMAT_NAME = "ktmoe.experts"
FORMAT_VERSION = 1
PROJECTIONS = ("gate", "up", "down")
FILE_SUFFIX = ".safetensors"

#: safetensors dtype names this module reads and writes
_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
#: a header larger than this is not a weight file (safetensors uses the same bound)
_MAX_HEADER = 100 * 1024 * 1024
_REQUIRED_META = ("format_version", "method", "quant_format", "group_size", "zero_point",
                  "num_experts", "hidden_size", "intermediate_size", "layers", "checksums")

PathLike = Union[str, os.PathLike]
Parts = Dict[str, torch.Tensor]


class WeightFileError(RuntimeError):
    """A weight file is missing, unreadable, corrupted, or does not match."""


# ----------------------------------------------------------------- helpers

def tensor_key(layer_idx: int, proj: str, part: str) -> str:
    """The safetensors key of one part of one projection of one layer."""
    return f"layers.{layer_idx}.{proj}.{part}"


def proj_dims(proj: str, hidden_size: int, intermediate_size: int) -> Tuple[int, int]:
    """(rows, cols) of one expert's matrix of projection ``proj``."""
    if proj == "down":
        return hidden_size, intermediate_size
    return intermediate_size, hidden_size


def _spec_text(spec: QuantSpec) -> str:
    if spec.kgroup:
        return f"{spec.method} ({spec.format}, group_size={spec.group_size})"
    return f"{spec.method} ({spec.format})"


def _same_format(a: QuantSpec, b: QuantSpec) -> bool:
    return (a.method == b.method and a.format == b.format
            and (not a.kgroup or a.group_size == b.group_size))


def _crc32(t: torch.Tensor) -> str:
    return f"crc32:{zlib.crc32(_byte_view(t).numpy()):08x}"


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor as a flat uint8 tensor (no copy)."""
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8).reshape(-1)


def _format_layers(layers: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (for messages)."""
    out: List[str] = []
    ls = sorted(set(layers))
    i = 0
    while i < len(ls):
        j = i
        while j + 1 < len(ls) and ls[j + 1] == ls[j] + 1:
            j += 1
        out.append(str(ls[i]) if i == j else f"{ls[i]}-{ls[j]}")
        i = j + 1
    return ",".join(out) if out else "none"


# -------------------------------------------------------- safetensors header

@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


@dataclass
class _FileInfo:
    """One parsed and checked weight file (header and metadata only)."""

    path: Path
    size: int
    tensors: Dict[str, _Entry]
    meta: Dict[str, str]
    version: int = 0
    spec: Optional[QuantSpec] = None
    num_experts: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    layers: Tuple[int, ...] = ()
    checksums: Dict[str, str] = field(default_factory=dict)


def _parse_header(path: Path) -> _FileInfo:
    """Reads and checks the safetensors framing of ``path``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightFileError(
                    f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte "
                    "header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise WeightFileError(
                    f"{path}: not a valid safetensors file (corrupted or truncated): header "
                    f"length {n} does not fit in the file's {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise WeightFileError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(raw) != n:
        raise WeightFileError(f"{path}: truncated while reading the header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightFileError(
            f"{path}: not a valid safetensors file: corrupted header (not UTF-8 JSON: {e})") from e
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: corrupted header: expected a JSON object")

    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise WeightFileError(f"{path}: corrupted header: __metadata__ must map strings to strings")

    data_start = 8 + n
    data_len = size - data_start
    tensors: Dict[str, _Entry] = {}
    for key, e in header.items():
        try:
            dt_name, shape, (b, end) = e["dtype"], e["shape"], e["data_offsets"]
            shape = tuple(shape)
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                       for x in (*shape, b, end)):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise WeightFileError(f"{path}: corrupted header: bad entry for tensor {key!r}") from None
        if dt_name not in _DTYPES:
            raise WeightFileError(f"{path}: tensor {key!r} has an unsupported dtype {dt_name!r}")
        dtype = _DTYPES[dt_name]
        numel = 1
        for x in shape:
            numel *= x
        if end < b or end - b != numel * torch.empty((), dtype=dtype).element_size():
            raise WeightFileError(
                f"{path}: corrupted header: tensor {key!r} {dt_name}{list(shape)} does not fill "
                f"its byte range [{b}, {end})")
        tensors[key] = _Entry(dtype, shape, data_start + b, data_start + end)

    # The data must be covered exactly once, with no holes (safetensors' rule).
    pos = 0
    for key, e in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start - data_start != pos:
            raise WeightFileError(f"{path}: corrupted header: tensor {key!r} overlaps another or "
                                  "leaves a hole in the data")
        pos = e.end - data_start
    if pos > data_len:
        raise WeightFileError(
            f"{path}: truncated: the header describes {pos} bytes of tensor data, the file "
            f"holds {data_len}")
    if pos < data_len:
        raise WeightFileError(
            f"{path}: corrupted: {data_len - pos} bytes after the last tensor")
    return _FileInfo(path=path, size=size, tensors=tensors, meta=meta)


def _parse_int(path: Path, meta: Mapping[str, str], key: str, minimum: int) -> int:
    v = meta[key]
    try:
        x = int(v, 10)
    except ValueError:
        x = None
    if x is None or x < minimum:
        raise WeightFileError(f"{path}: bad metadata {key}={v!r} (expected an integer >= {minimum})")
    return x


def _check_meta(info: _FileInfo) -> _FileInfo:
    """Reads and checks the ktmoe metadata and the tensors it implies."""
    path, meta = info.path, info.meta
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        what = "no metadata 'format'" if fmt is None else f"metadata format={fmt!r}"
        raise WeightFileError(
            f"{path}: not a ktmoe expert weight file ({what}, expected {FORMAT_NAME!r})")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise WeightFileError(f"{path}: missing metadata {', '.join(missing)}")
    version = _parse_int(path, meta, "format_version", 1)
    if version != FORMAT_VERSION:
        raise WeightFileError(
            f"{path}: unsupported format_version {meta['format_version']!r} (this ktmoe reads "
            f"version {FORMAT_VERSION}; a newer ktmoe wrote it?)")
    method = meta["method"]
    if method not in METHOD_FORMATS:
        raise WeightFileError(f"{path}: unknown method {method!r} "
                              f"(known: {', '.join(sorted(METHOD_FORMATS))})")
    zp = meta["zero_point"]
    if zp not in ("true", "false"):
        raise WeightFileError(f"{path}: bad metadata zero_point={zp!r} (expected 'true' or 'false')")
    group_size = _parse_int(path, meta, "group_size", 0)
    try:
        spec = QuantSpec(method, group_size or 128, zp == "true")
    except (TypeError, ValueError) as e:
        raise WeightFileError(f"{path}: bad metadata: {e}") from None
    if spec.kgroup and group_size == 0:
        raise WeightFileError(f"{path}: bad metadata group_size=0 for the K-group method {method}")
    if spec.format != meta["quant_format"]:
        raise WeightFileError(
            f"{path}: inconsistent metadata: quant_format={meta['quant_format']!r}, but method "
            f"{method} with zero_point={zp} stores {spec.format!r}")
    E = _parse_int(path, meta, "num_experts", 1)
    H = _parse_int(path, meta, "hidden_size", 1)
    I = _parse_int(path, meta, "intermediate_size", 1)
    try:
        layers = tuple(int(x, 10) for x in meta["layers"].split(","))
        if any(x < 0 for x in layers) or len(set(layers)) != len(layers):
            raise ValueError
    except ValueError:
        raise WeightFileError(f"{path}: bad metadata layers={meta['layers']!r} (expected distinct "
                              "non-negative integers separated by commas)") from None
    try:
        checksums = json.loads(meta["checksums"])
        if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
            raise ValueError
    except ValueError:
        raise WeightFileError(f"{path}: bad metadata checksums (expected a JSON object of "
                              "tensor key -> 'crc32:<8 hex digits>')") from None

    expected = set()
    for L in layers:
        for proj in PROJECTIONS:
            rows, cols = proj_dims(proj, H, I)
            try:
                spec.check_cols(cols, "hidden_size" if proj != "down" else "intermediate_size")
            except ValueError as e:
                raise WeightFileError(f"{path}: bad metadata: {e}") from None
            for part, (shape, dtype) in spec.part_shapes(rows, cols).items():
                key = tensor_key(L, proj, part)
                expected.add(key)
                e = info.tensors.get(key)
                want = (E, *shape)
                if e is None:
                    raise WeightFileError(f"{path}: layer {L}: tensor {key} is missing "
                                          f"(expected {_DTYPE_NAMES[dtype]}{list(want)})")
                if e.shape != want or e.dtype != dtype:
                    raise WeightFileError(
                        f"{path}: layer {L}: tensor {key} is {_DTYPE_NAMES[e.dtype]}{list(e.shape)}, "
                        f"expected {_DTYPE_NAMES[dtype]}{list(want)} for {_spec_text(spec)} with "
                        f"E={E}, H={H}, I={I}")
                c = checksums.get(key)
                if c is None or not c.startswith("crc32:") or len(c) != 14:
                    raise WeightFileError(f"{path}: layer {L}: no valid checksum for {key}")
    extra = sorted(set(info.tensors) - expected)
    if extra:
        raise WeightFileError(f"{path}: unexpected tensors {', '.join(extra[:5])}"
                              f"{' ...' if len(extra) > 5 else ''}")
    info.version, info.spec, info.num_experts = version, spec, E
    info.hidden_size, info.intermediate_size = H, I
    info.layers, info.checksums = layers, checksums
    return info


_CACHE: Dict[tuple, Union[_FileInfo, WeightFileError]] = {}


def _file_info(path: Path) -> _FileInfo:
    """The checked header of ``path`` (cached while the file is unchanged)."""
    try:
        st = path.stat()
    except OSError as e:
        raise WeightFileError(f"{path}: cannot read: {e.strerror or e}") from e
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _CACHE.get(key)
    if hit is None:
        try:
            hit = _check_meta(_parse_header(path))
        except WeightFileError as e:
            hit = e
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = hit
    if isinstance(hit, WeightFileError):
        raise WeightFileError(str(hit))
    return hit


def _list_files(weight_path: PathLike) -> List[Path]:
    """The weight files of ``weight_path`` (a file, or a directory's *.safetensors)."""
    if weight_path is None or str(weight_path) == "":
        raise WeightFileError("weight_path is empty: give a weight file or a directory of them")
    p = Path(weight_path)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.name.endswith(FILE_SUFFIX) and q.is_file())
        if not files:
            raise WeightFileError(f"{p}: no {FILE_SUFFIX} files in this directory")
        return files
    if p.is_file():
        return [p]
    if p.exists():
        raise WeightFileError(f"{p}: not a regular file or directory")
    raise WeightFileError(f"{p}: no such file or directory")


def _scan(weight_path: PathLike) -> Tuple[List[_FileInfo], Dict[Path, WeightFileError]]:
    """The readable files, and the error of each unreadable one."""
    good, bad = [], {}
    for f in _list_files(weight_path):
        try:
            good.append(_file_info(f))
        except WeightFileError as e:
            bad[f] = e
    return good, bad


# -------------------------------------------------------------------- write

def write_layer(out: PathLike, layer_idx: int, spec: QuantSpec, gate: Mapping[str, torch.Tensor],
                up: Mapping[str, torch.Tensor], down: Mapping[str, torch.Tensor], *,
                hidden_size: int, intermediate_size: int,
                extra_metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write one layer's packed experts.

    ``out`` is a directory (created if needed; the file is
    ``layer_{layer_idx:05d}.safetensors`` in it) or a path ending in
    ``.safetensors``.  ``gate``/``up``/``down`` map each of ``spec.parts`` to
    a CPU tensor ``[E, *part_shape]`` (as :func:`ktmoe.quant.quantize` returns
    for ``[E, rows, cols]`` weights).  Returns the path written."""
    p = Path(out)
    if not p.name.endswith(FILE_SUFFIX):
        p = p / f"layer_{int(layer_idx):05d}{FILE_SUFFIX}"
    return write_layers(p, {layer_idx: (gate, up, down)}, spec, hidden_size=hidden_size,
                        intermediate_size=intermediate_size, extra_metadata=extra_metadata)


def write_layers(path: PathLike, layers: Mapping[int, Sequence[Mapping[str, torch.Tensor]]],
                 spec: QuantSpec, *, hidden_size: int, intermediate_size: int,
                 extra_metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write several layers ``{layer_idx: (gate, up, down)}`` into one file
    ``path`` (replaced atomically).  All layers share ``spec``, the sizes and
    the number of experts."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    H, I = int(hidden_size), int(intermediate_size)
    if H < 1 or I < 1:
        raise ValueError(f"hidden_size and intermediate_size must be >= 1, got {H}, {I}")
    if not layers:
        raise ValueError("no layers to write")
    spec.check_cols(H, "hidden_size")
    spec.check_cols(I, "intermediate_size")

    tensors: Dict[str, torch.Tensor] = {}
    E = None
    for L, projs in layers.items():
        if isinstance(L, bool) or not isinstance(L, int) or L < 0:
            raise ValueError(f"layer index must be a non-negative int, got {L!r}")
        if len(projs) != 3:
            raise ValueError(f"layer {L}: expected (gate, up, down), got {len(projs)} items")
        for proj, parts in zip(PROJECTIONS, projs):
            if set(parts) != set(spec.parts):
                raise ValueError(f"layer {L} {proj}: parts {sorted(parts)} do not match "
                                 f"{_spec_text(spec)}'s {list(spec.parts)}")
            rows, cols = proj_dims(proj, H, I)
            for part, (shape, dtype) in spec.part_shapes(rows, cols).items():
                t = parts[part]
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"layer {L} {proj}.{part} must be a torch.Tensor")
                if E is None:
                    E = t.shape[0] if t.dim() else 0
                want = (E, *shape)
                if tuple(t.shape) != want or t.dtype != dtype or t.device.type != "cpu":
                    raise ValueError(
                        f"layer {L} {proj}.{part}: expected a CPU {dtype} tensor of shape "
                        f"{list(want)}, got {t.device.type} {t.dtype} {list(t.shape)}")
                tensors[tensor_key(L, proj, part)] = t.detach().contiguous()
    if not E:
        raise ValueError("the parts hold no experts (E = 0)")

    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "method": spec.method,
        "quant_format": spec.format,
        "group_size": str(spec.group_size if spec.kgroup else 0),
        "zero_point": "true" if spec.format == "int4_kgroup_zp" else "false",
        "num_experts": str(E),
        "hidden_size": str(H),
        "intermediate_size": str(I),
        "layers": ",".join(str(L) for L in sorted(layers)),
        "checksums": json.dumps({k: _crc32(t) for k, t in sorted(tensors.items())},
                                separators=(",", ":")),
    }
    for k, v in (extra_metadata or {}).items():
        if k in meta or not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"extra_metadata: {k!r} must be a new str key with a str value")
        meta[k] = v
    _write_safetensors(Path(path), tensors, meta)
    return Path(path)


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    """safetensors' own writer (it orders tensors by element size, largest
    first, and pads the header to 8 bytes, so every tensor starts aligned and
    the reader maps it in place), made atomic with a rename."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=dict(meta))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise WeightFileError(f"{path}: cannot write: {e.strerror or e}") from e


# --------------------------------------------------------------------- read

def _find_layer(weight_path: PathLike, layer_idx: int) -> _FileInfo:
    good, bad = _scan(weight_path)
    holders = [fi for fi in good if layer_idx in fi.layers]
    if len(holders) > 1:
        raise WeightFileError(
            f"{weight_path}: layer {layer_idx} is in several files: "
            f"{', '.join(str(fi.path.name) for fi in holders)}")
    if holders:
        return holders[0]
    if bad:
        # The layer may well be in the file that could not be read.
        raise WeightFileError(f"layer {layer_idx} not found in {weight_path}; "
                              f"{len(bad)} unreadable file(s), first: {next(iter(bad.values()))}")
    present = sorted(L for fi in good for L in fi.layers)
    raise WeightFileError(f"{weight_path}: layer {layer_idx} not found "
                          f"(layers present: {_format_layers(present)})")


def _map_file(fi: _FileInfo) -> torch.UntypedStorage:
    try:
        # shared=False: a private (copy-on-write) mapping; pages are read from
        # the file on first touch and never copied unless written to.
        return torch.UntypedStorage.from_file(str(fi.path), shared=False, nbytes=fi.size)
    except (RuntimeError, OSError) as e:
        raise WeightFileError(f"{fi.path}: cannot map: {e}") from e


def _view(storage: torch.UntypedStorage, e: _Entry) -> torch.Tensor:
    item = torch.empty((), dtype=e.dtype).element_size()
    if e.start % item == 0:
        t = torch.empty(0, dtype=e.dtype)
        t.set_(storage, e.start // item, e.shape)
        return t
    # A misaligned tensor (not written by write_layers) cannot be viewed in place.
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, e.start, (e.end - e.start,))
    return raw.clone().view(e.dtype).reshape(e.shape)


def _verify(fi: _FileInfo, keys: Iterable[str], parts: Mapping[str, torch.Tensor],
            layer_idx: Optional[int]) -> None:
    for key in keys:
        got = _crc32(parts[key])
        want = fi.checksums[key]
        if got != want:
            where = f"layer {layer_idx}: " if layer_idx is not None else ""
            raise WeightFileError(
                f"{fi.path}: {where}checksum mismatch for {key} (stored {want}, data has {got}): "
                "the file is corrupted")


def read_layer(weight_path: PathLike, layer_idx: int, spec: QuantSpec, *, hidden_size: int,
               intermediate_size: int, verify: bool = True
               ) -> Tuple[int, Parts, Parts, Parts]:
    """Map one layer's packed experts from ``weight_path`` (a weight file or a
    directory of them).

    Returns ``(num_src_experts, gate, up, down)``; each projection is a dict
    part -> CPU tensor ``[num_src_experts, *part_shape]`` that views the
    mapped file (nothing is copied; the mapping lives as long as the tensors).
    The file must hold ``spec``'s method and options and the given sizes;
    with ``verify`` the layer's CRC-32s are checked (this reads its bytes).
    Raises WeightFileError on any problem."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    layer_idx = int(layer_idx)
    fi = _find_layer(weight_path, layer_idx)
    if not _same_format(fi.spec, spec):
        raise WeightFileError(
            f"{fi.path}: layer {layer_idx}: method mismatch: the file holds {_spec_text(fi.spec)}, "
            f"expected {_spec_text(spec)}")
    if (fi.hidden_size, fi.intermediate_size) != (hidden_size, intermediate_size):
        raise WeightFileError(
            f"{fi.path}: layer {layer_idx}: shape mismatch: the file holds hidden_size="
            f"{fi.hidden_size}, intermediate_size={fi.intermediate_size}; expected hidden_size="
            f"{hidden_size}, intermediate_size={intermediate_size}")
    storage = _map_file(fi)
    out = []
    views: Dict[str, torch.Tensor] = {}
    for proj in PROJECTIONS:
        parts = {}
        for part in spec.parts:
            key = tensor_key(layer_idx, proj, part)
            parts[part] = views[key] = _view(storage, fi.tensors[key])
        out.append(parts)
    if verify:
        _verify(fi, views, views, layer_idx)
    return (fi.num_experts, *out)


# ----------------------------------------------------------- inspect/validate

def _file_summary(fi: _FileInfo) -> dict:
    spec = fi.spec
    projs = {}
    for proj in PROJECTIONS:
        rows, cols = proj_dims(proj, fi.hidden_size, fi.intermediate_size)
        parts = {}
        for part, (shape, dtype) in spec.part_shapes(rows, cols).items():
            parts[part] = {"dtype": str(dtype).replace("torch.", ""),
                           "shape": [fi.num_experts, *shape]}
        projs[proj] = {"rows": rows, "cols": cols, "parts": parts,
                       "bytes": fi.num_experts * spec.nbytes(rows, cols)}
    return {
        "file": fi.path.name,
        "bytes": fi.size,
        "format_version": fi.version,
        "layers": list(fi.layers),
        "method": spec.method,
        "quant_format": spec.format,
        "group_size": spec.group_size if spec.kgroup else 0,
        "zero_point": spec.format == "int4_kgroup_zp",
        "num_experts": fi.num_experts,
        "hidden_size": fi.hidden_size,
        "intermediate_size": fi.intermediate_size,
        "projections": projs,
        "bytes_per_layer": sum(p["bytes"] for p in projs.values()),
    }


def inspect(weight_path: PathLike) -> dict:
    """A description of the weight files at ``weight_path`` (headers only).

    Keys: ``path``; ``files`` (one dict per readable file: file, bytes,
    format_version, layers, method, quant_format, group_size, zero_point,
    num_experts, hidden_size, intermediate_size, projections {gate, up, down:
    rows, cols, bytes, parts {name: dtype, shape}}, bytes_per_layer);
    ``unreadable`` (file -> error message); and a summary over the readable
    files: ``layers``, ``methods``, ``quant_formats``, ``group_sizes``,
    ``num_experts``, ``hidden_sizes``, ``intermediate_sizes`` (sorted
    distinct values), ``total_bytes``.  Raises WeightFileError only when
    ``weight_path`` holds no files to look at."""
    good, bad = _scan(weight_path)
    files = [_file_summary(fi) for fi in good]

    def distinct(k):
        return sorted({f[k] for f in files})

    return {
        "path": str(weight_path),
        "files": files,
        "unreadable": {f.name: str(e) for f, e in bad.items()},
        "layers": sorted(L for f in files for L in f["layers"]),
        "methods": distinct("method"),
        "quant_formats": distinct("quant_format"),
        "group_sizes": distinct("group_size"),
        "num_experts": distinct("num_experts"),
        "hidden_sizes": distinct("hidden_size"),
        "intermediate_sizes": distinct("intermediate_size"),
        "total_bytes": sum(f["bytes"] for f in files),
    }


def validate(weight_path: PathLike, verify: bool = True) -> List[str]:
    """Problems with the weight files at ``weight_path``, one message each
    (an empty list means they are fine): unreadable or inconsistent files,
    a layer held twice, files that disagree on the method or sizes, and,
    with ``verify``, checksum mismatches."""
    try:
        good, bad = _scan(weight_path)
    except WeightFileError as e:
        return [str(e)]
    problems = [str(e) for e in bad.values()]
    seen: Dict[int, Path] = {}
    for fi in good:
        for L in fi.layers:
            if L in seen:
                problems.append(f"layer {L} is in two files: {seen[L]} and {fi.path}")
            else:
                seen[L] = fi.path
    for what, get in (("method", lambda fi: _spec_text(fi.spec)),
                      ("sizes", lambda fi: f"hidden_size={fi.hidden_size}, "
                                           f"intermediate_size={fi.intermediate_size}")):
        vals = sorted({get(fi) for fi in good})
        if len(vals) > 1:
            problems.append(f"{weight_path}: the files disagree on the {what}: {'; '.join(vals)}")
    if verify:
        for fi in good:
            try:
                storage = _map_file(fi)
                views = {k: _view(storage, e) for k, e in fi.tensors.items()}
                _verify(fi, sorted(views), views, None)
            except WeightFileError as e:
                problems.append(str(e))
    return problems


# -------------------------------------------------------------------- tool

def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a weight file, or a directory of them")
    p.add_argument("--json", action="store_true", help="print a JSON description")
    p.add_argument("--no-verify", action="store_true",
                   help="check the structure only, not the checksums (reads no tensor data)")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _report(info: dict) -> str:
    lines = [f"{info['path']}: {len(info['files'])} file(s), {len(info['layers'])} layer(s) "
             f"[{_format_layers(info['layers'])}], {_human(info['total_bytes'])}"]
    for f in info["files"]:
        gs = f", group_size={f['group_size']}" if f["group_size"] else ""
        lines.append(
            f"  {f['file']}: layers {_format_layers(f['layers'])}; {f['method']} "
            f"({f['quant_format']}{gs}); E={f['num_experts']} H={f['hidden_size']} "
            f"I={f['intermediate_size']}; {_human(f['bytes_per_layer'])}/layer")
        for proj, d in f["projections"].items():
            parts = ", ".join(f"{n} {p['dtype']}{p['shape']}" for n, p in d["parts"].items())
            lines.append(f"    {proj:4s} [{d['rows']}, {d['cols']}] {_human(d['bytes']):>11s}: {parts}")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    """``inspect_weights``: print the description, validate, exit 1 on a problem."""
    try:
        info = inspect(args.path)
    except WeightFileError as e:
        info = None
        problems = [str(e)]
    else:
        problems = validate(args.path, verify=not args.no_verify)
    if args.json:
        doc = dict(info or {"path": str(args.path)})
        doc["problems"] = problems
        doc["ok"] = not problems
        print(json.dumps(doc, indent=2))
    elif info is not None:
        print(_report(info))
    for msg in problems:
        print(f"error: {msg}", file=sys.stderr)
    if not problems and not args.json:
        print("OK" + (" (structure only; checksums not verified)" if args.no_verify else ""))
    return 1 if problems else 0


def inspect_main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="List and validate ktmoe weight files.")
    add_inspect_arguments(p)
    return run_inspect(p.parse_args(argv))


__all__ = ["WeightFileError", "FORMAT_NAME", "FORMAT_VERSION", "PROJECTIONS", "tensor_key",
           "write_layer", "write_layers", "read_layer", "inspect", "validate", "inspect_main"]
