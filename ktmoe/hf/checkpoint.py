"""Loading a local Hugging Face checkpoint with the routed experts streamed
into the kernels (:func:`load_kt_checkpoint`).

``from_pretrained`` followed by wrapping holds the whole model in torch
before the experts move into the kernels (about twice the experts' size at
the peak).  Here the model is built with its parameters on the meta device
(buffers such as rotary tables are real), the non-expert tensors are read
from the safetensors shards into it, and each MoE layer's experts are read
from the shards into one ``[E, rows, cols]`` tensor per projection, handed
to that layer's kernel wrapper and freed before the next layer is read.  The
memory peak is the non-expert weights, the kernels' copy and one layer's
experts in transit.

Checkpoint keys are located with :func:`ktmoe.convert.scan_checkpoint`
(per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``, Mixtral
``block_sparse_moe.experts.{e}.w{1,3,2}.weight``, or fused
``mlp.experts.gate_up_proj`` / ``down_proj``); tensors are read with plain
file reads at the offsets of the safetensors header straight into their
destination (no memory map, so the process holds no pages of the shards).
Non-expert keys are renamed with transformers' own checkpoint conversion
rules (e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

from .errors import KTAMXConfigError, KTAMXModelNotSupportedError
from .wrap import resolve_options, wrap_moe_layers_with_kt_wrapper

logger = logging.getLogger(__name__)

_EXPERT_PARAM_SUFFIXES = ("experts.gate_up_proj", "experts.down_proj")


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no
    memory); buffers are created normally, so computed buffers (rotary
    frequency tables) are real."""
    register = nn.Module.register_parameter

    def register_parameter(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _Shards:
    """The checkpoint's shards: headers parsed once, files opened once,
    tensors read with ``readinto`` into caller-provided tensors."""

    def __init__(self, files: Dict[str, Path]):
        self.files = files
        self._headers: Dict[Path, object] = {}
        self._open: Dict[Path, object] = {}

    def entry(self, key: str):
        from ..weight_files import WeightFileError, _parse_header

        p = self.files[key]
        if p not in self._headers:
            try:
                self._headers[p] = _parse_header(p)
            except WeightFileError as e:
                raise KTAMXConfigError(str(e)) from None
        return self._headers[p].tensors[key]

    def dtype(self, key: str) -> torch.dtype:
        return self.entry(key).dtype

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.entry(key).shape)

    def read_into(self, key: str, out: torch.Tensor, byte_offset: int = 0) -> torch.Tensor:
        """Fill the contiguous CPU tensor ``out`` (of the tensor's dtype) with
        ``out.nbytes`` bytes of tensor ``key`` starting ``byte_offset`` bytes
        into it."""
        e = self.entry(key)
        n = out.numel() * out.element_size()
        if out.dtype != e.dtype or not out.is_contiguous() or e.start + byte_offset + n > e.end:
            raise ValueError(f"read of {key}: bad destination or range")
        p = self.files[key]
        f = self._open.get(p)
        if f is None:
            f = self._open[p] = open(p, "rb", buffering=0)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        f.seek(e.start + byte_offset)
        done = 0
        while done < n:
            got = f.readinto(view[done:])
            if not got:
                raise KTAMXConfigError(f"{p}: truncated while reading tensor {key}")
            done += got
        return out

    def read(self, key: str) -> torch.Tensor:
        e = self.entry(key)
        return self.read_into(key, torch.empty(e.shape, dtype=e.dtype))

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def _expert_key_patterns():
    from ..convert import _FUSED, _MIXTRAL, _PER_EXPERT

    return (_PER_EXPERT, _MIXTRAL, _FUSED)


class ExpertReader:
    """``layer_idx -> (gate [E, I, H], up [E, I, H], down [E, H, I])`` read
    from a scanned checkpoint (bf16 when the checkpoint's experts are bf16,
    else fp32); the ``expert_weights`` argument of
    :func:`wrap_moe_layers_with_kt_wrapper`.

    The three tensors are buffers reused for the next layer (the kernels copy
    them while loading): one layer's experts are allocated once for the whole
    load, so no freed-but-resident heap pages pile up between layers."""

    def __init__(self, ck, shards: _Shards, progress=None):
        self.ck = ck
        self.shards = shards
        self.progress = progress
        self.bytes_read = 0
        self._buffers: Dict[tuple, torch.Tensor] = {}

    def _buffer(self, proj: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        key = (proj, shape, dtype)
        buf = self._buffers.get(key)
        if buf is None:
            for k in [k for k in self._buffers if k[0] == proj]:
                del self._buffers[k]
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype)
        return buf

    def release(self) -> None:
        """Free the reused buffers."""
        self._buffers.clear()

    def _projection(self, L: int, proj: str) -> torch.Tensor:
        ck = self.ck
        ls = ck.layers[L]
        H, I = ck.hidden_size, ck.intermediate_size
        rows, cols = (H, I) if proj == "down" else (I, H)
        if ls.layout == "per_expert":
            keys = ls.keys[proj]
        else:
            keys = ls.keys["down" if proj == "down" else "gate_up"]
        src = {self.shards.dtype(k) for k in keys}
        dtype = torch.bfloat16 if src == {torch.bfloat16} else torch.float32
        E = ls.num_experts
        out = self._buffer(proj, (E, rows, cols), dtype)
        if ls.layout == "per_expert":
            for e, k in enumerate(keys):
                sd = self.shards.dtype(k)
                if sd == dtype:
                    self.shards.read_into(k, out[e])
                else:
                    out[e].copy_(self.shards.read(k))
        else:
            k = keys[0]
            sd = self.shards.dtype(k)
            es = torch.empty((), dtype=sd).element_size()
            tmp = None if sd == dtype else torch.empty((rows, cols), dtype=sd)
            for e in range(E):
                if proj == "down":
                    off = e * H * I
                else:
                    off = e * 2 * I * H + (I * H if proj == "up" else 0)
                if tmp is None:
                    self.shards.read_into(k, out[e], off * es)
                else:
                    out[e].copy_(self.shards.read_into(k, tmp, off * es))
        self.bytes_read += out.numel() * out.element_size()
        return out

    def __call__(self, layer_idx: int):
        if layer_idx not in self.ck.layers:
            raise KTAMXConfigError(
                f"{self.ck.path}: the model's layer {layer_idx} is a MoE layer but the checkpoint has no routed "
                f"experts for it (checkpoint MoE layers: {sorted(self.ck.layers)})")
        out = tuple(self._projection(layer_idx, p) for p in ("gate", "up", "down"))
        if self.progress is not None:
            self.progress.update(1)
        return out


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        mod._buffers[attr] = value


def _load_non_expert(model: nn.Module, shards: _Shards, path: Path) -> Tuple[int, List[str]]:
    """Read every checkpoint tensor except the routed experts into ``model``.
    Returns (bytes read, checkpoint keys not used by the model)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    targets = dict(model.state_dict(keep_vars=True))
    patterns = _expert_key_patterns()
    nbytes, unused = 0, []
    for key in sorted(shards.files, key=lambda k: (str(shards.files[k]), shards.entry(k).start)):
        if any(p.match(key) for p in patterns):
            continue
        name, conv = rename_source_key(key, renamings, converters, model.base_model_prefix, targets)
        if conv is not None:
            raise KTAMXModelNotSupportedError(
                f"{path}: tensor {key} needs the checkpoint conversion {conv!r}, which the streaming "
                "loader does not apply")
        target = targets.get(name)
        if target is None:
            unused.append(key)
            continue
        if shards.shape(key) != tuple(target.shape):
            raise KTAMXConfigError(f"{path}: tensor {key} has shape {list(shards.shape(key))}, the model's "
                                   f"{name} has {list(target.shape)} (does config.json match the weights?)")
        value = shards.read(key)
        nbytes += value.numel() * value.element_size()
        if value.dtype != target.dtype:
            value = value.to(target.dtype)
        _set_tensor(model, name, value)
    return nbytes, unused


def load_kt_checkpoint(path, model_args=None, finetuning_args=None, *, config=None,
                       dtype: torch.dtype = torch.bfloat16, progress: bool = False, **wrap_kwargs):
    """Load the checkpoint directory ``path`` (``config.json`` + safetensors
    shards) as a causal LM in ``dtype`` with its MoE layers wrapped, reading
    the routed experts layer by layer straight into the kernels (or from
    ``kt_weight_path`` weight files when set, in which case the checkpoint's
    expert tensors are not read at all).  ``model_args`` /
    ``finetuning_args`` / ``wrap_kwargs`` are those of
    :func:`wrap_moe_layers_with_kt_wrapper`.

    The returned model (eval mode, like ``from_pretrained``) also has
    ``_kt_load_stats``: bytes read for the non-expert tensors and for the
    experts, and the checkpoint keys it did not use."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ..convert import ConvertError, _shard_keys, scan_checkpoint

    path = Path(path)
    if config is None:
        config = AutoConfig.from_pretrained(str(path))
    opts = resolve_options(model_args, finetuning_args, weight_path=wrap_kwargs.get("weight_path"))
    try:
        files = _shard_keys(path)
        ck = None if opts.weight_path else scan_checkpoint(path)
    except ConvertError as e:
        raise KTAMXConfigError(str(e)) from None
    shards = _Shards(files)
    bar = reader = None
    try:
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        nonexpert_bytes, unused = _load_non_expert(model, shards, path)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters()
                   if p.device.type == "meta" and not n.endswith(_EXPERT_PARAM_SUFFIXES)]
        missing += [n for n, b in model.named_buffers() if b.device.type == "meta"]
        if missing:
            raise KTAMXConfigError(f"{path}: the checkpoint has no tensor for {len(missing)} of the model's "
                                   f"weights: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unused:
            logger.info("%s: %d checkpoint tensors are not used by the model (e.g. %s)", path, len(unused),
                        unused[0])
        if ck is not None:
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(ck.layers), desc="loading experts", unit="layer")
            reader = ExpertReader(ck, shards, bar)
        wrap_moe_layers_with_kt_wrapper(model, model_args, finetuning_args, expert_weights=reader, **wrap_kwargs)
    finally:
        shards.close()
        if reader is not None:
            reader.release()
        if bar is not None:
            bar.close()
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        except (OSError, ValueError) as e:  # a bad generation config does not stop training
            logger.warning("%s: generation_config.json not used: %s", path, e)
    model.config._name_or_path = str(path)
    model._kt_load_stats = {"nonexpert_bytes": nonexpert_bytes,
                            "expert_bytes": reader.bytes_read if reader is not None else 0,
                            "unused_keys": unused}
    model.eval()
    return model


def checkpoint_bytes(path) -> int:
    """Total size of a checkpoint directory's safetensors shards."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors") if p.is_file())


__all__ = ["load_kt_checkpoint", "params_on_meta", "ExpertReader", "checkpoint_bytes"]
