"""Adapters of a wrapped model in PEFT's layout.

A saved adapter is a plain PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``) for the *unmodified* transformers model:
attention (and any other PEFT ``target_modules``) LoRA as PEFT saves it, and
the routed experts' LoRA as PEFT ``target_parameters`` on
``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``:

* gate_up (rank 2r, alpha 2·alpha, so the scale stays alpha/r):
  ``A = [A_gate; A_up]`` per expert, ``B = blockdiag(B_gate, B_up)``;
* down (rank r): ``A = A_down``, ``B = B_down``;
* flattened as PEFT stores them: ``lora_A [E·R, in]`` (expert-major rows),
  ``lora_B [out, R·E]`` (column ``j·E + e``).

``peft.PeftModel.from_pretrained(model, path)`` loads it onto the unmodified
model; :func:`load_kt_adapter` loads it (or any PEFT adapter of that form)
back into a wrapped model.  A side file ``kt_adapter.json`` keeps what the
PEFT config cannot hold (the attention ``lora_dropout``, which PEFT's
parameter LoRA does not allow, and the KT rank / alpha).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from typing import Dict, Optional, Tuple

import torch

from ..experts_sft import LORA_NAMES
from .errors import KTAMXConfigError, KTAMXNotAvailableError
from .layer import KTMoELayerWrapper
from .wrap import get_base_model

#: PEFT ``target_parameters`` of the routed experts
EXPERT_TARGET_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_GU_KEY, _DN_KEY = "experts.gate_up_proj", "experts.down_proj"
KT_ADAPTER_FILE = "kt_adapter.json"
_EXPERT_RE = re.compile(r"^(?:base_model\.model\.)?(.*\.experts)(\.base_layer)?\.lora_([AB])\.weight$")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise KTAMXNotAvailableError("adapters need the 'peft' package (pip install peft)") from e
    return peft


def _is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _layer_paths(model) -> Dict[str, KTMoELayerWrapper]:
    """experts module path (relative to the transformers model) -> wrapper."""
    base = get_base_model(model)
    out = {}
    for name, mod in base.named_modules():
        if isinstance(mod, KTMoELayerWrapper):
            out[(name + "." if name else "") + "experts"] = mod
    if not out:
        raise KTAMXConfigError("the model has no KT-wrapped MoE layer (call wrap_moe_layers_with_kt_wrapper first)")
    return out


# ---------------------------------------------------------------- layouts

def expert_lora_to_peft(loras: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The six KT factors -> PEFT tensors ``gate_up.lora_A [E·2r, H]``,
    ``gate_up.lora_B [2I, 2r·E]``, ``down.lora_A [E·r, I]``,
    ``down.lora_B [H, r·E]`` (same scale alpha/r with rank 2r / alpha 2·alpha
    for gate_up)."""
    ag, bg, au, bu, ad, bd = (loras[n].detach().cpu() for n in LORA_NAMES)
    E, r, H = ag.shape
    I = bg.shape[1]
    a_gu = torch.cat([ag, au], dim=1).reshape(E * 2 * r, H)
    b = torch.zeros(E, 2 * I, 2 * r, dtype=bg.dtype)
    b[:, :I, :r] = bg
    b[:, I:, r:] = bu
    b_gu = b.permute(1, 2, 0).reshape(2 * I, 2 * r * E)
    a_d = ad.reshape(E * r, I)
    b_d = bd.permute(1, 2, 0).reshape(H, r * E)
    return {"gate_up.lora_A": a_gu.contiguous(), "gate_up.lora_B": b_gu.contiguous(),
            "down.lora_A": a_d.contiguous(), "down.lora_B": b_d.contiguous()}


def expert_lora_from_peft(a_gu, b_gu, scale_gu: float, a_d, b_d, scale_d: float, *, num_experts: int,
                          rank: int, scaling: float) -> Dict[str, torch.Tensor]:
    """PEFT gate_up / down LoRA (``lora_A [E·R, in]``, ``lora_B [out, R·E]``,
    PEFT scales) -> the six KT factors for a layer of ``rank`` and scale
    ``scaling`` (scale differences are folded into B; exact).

    gate_up of rank 2·rank must be block-diagonal (as saved by
    :func:`save_kt_adapter`); gate_up of rank ``rank`` (a PEFT-trained fused
    adapter, one A shared by gate and up) is imported with A duplicated,
    which is exact for the forward (the two copies then train separately)."""
    E, r = num_experts, rank
    R = a_gu.shape[0] // E
    if a_gu.shape[0] != E * R or b_gu.shape[1] != E * R:
        raise KTAMXConfigError(f"gate_up LoRA shapes {tuple(a_gu.shape)} / {tuple(b_gu.shape)} do not fit "
                               f"{E} experts")
    H = a_gu.shape[1]
    I2 = b_gu.shape[0]
    I = I2 // 2
    A = a_gu.reshape(E, R, H)
    B = b_gu.reshape(I2, R, E).permute(2, 0, 1)  # [E, 2I, R]
    f_gu = scale_gu / scaling
    if R == 2 * r:
        off = torch.cat([B[:, :I, r:].reshape(-1), B[:, I:, :r].reshape(-1)])
        if off.numel() and bool(off.ne(0).any()):
            raise KTAMXConfigError(
                f"gate_up LoRA of rank {R} is not block-diagonal [gate | up]; it cannot be split into the "
                f"rank-{r} gate and up factors of this model")
        ag, au = A[:, :r], A[:, r:]
        bg, bu = B[:, :I, :r] * f_gu, B[:, I:, r:] * f_gu
    elif R == r:
        ag, au = A, A
        bg, bu = B[:, :I] * f_gu, B[:, I:] * f_gu
    else:
        raise KTAMXConfigError(f"gate_up LoRA rank {R} does not match the KT LoRA rank {r} (expected {2 * r} or {r})")
    Rd = a_d.shape[0] // E
    if Rd != r or b_d.shape[1] != E * r:
        raise KTAMXConfigError(f"down LoRA rank {Rd} does not match the KT LoRA rank {r}")
    Id = a_d.shape[1]
    Hd = b_d.shape[0]
    if Id != I or Hd != H:
        raise KTAMXConfigError(f"down LoRA shapes {tuple(a_d.shape)} / {tuple(b_d.shape)} do not match "
                               f"hidden {H} / intermediate {I}")
    ad = a_d.reshape(E, r, I)
    bd = b_d.reshape(H, r, E).permute(2, 0, 1) * (scale_d / scaling)
    vals = (ag, bg, au, bu, ad, bd)
    return {n: v.contiguous() for n, v in zip(LORA_NAMES, vals)}


def _scale(cfg, key: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), key), cfg.lora_alpha) \
        if cfg.alpha_pattern else cfg.lora_alpha
    return alpha / math.sqrt(rank) if cfg.use_rslora else alpha / rank


# ------------------------------------------------------------------ PEFT

def get_kt_peft_model(model, peft_config, adapter_name: str = "default", **kwargs):
    """``peft.get_peft_model`` for a wrapped model: PEFT LoRA on the modules
    ``peft_config`` targets (attention, shared experts, ...), with the KT
    experts' LoRA kept trainable (PEFT freezes every parameter it did not
    create, which would silently freeze them)."""
    peft = _peft()
    layers = _layer_paths(model)
    if getattr(peft_config, "target_parameters", None):
        raise KTAMXConfigError("target_parameters must be empty: the routed experts' LoRA is held by the "
                               "KT wrapper (lora_params)")
    pm = peft.get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)
    for w in layers.values():
        for p in w.lora_params.values():
            p.requires_grad_(True)
    return pm


# ------------------------------------------------------------------- save

def kt_adapter_state_dict(model, adapter_name: str = "default") -> Tuple[Dict[str, torch.Tensor], object, dict]:
    """(state_dict in PEFT's saved-key layout, LoraConfig, kt metadata) of a
    wrapped model: its PEFT adapter ``adapter_name`` (when the model is a
    PeftModel) plus the experts' LoRA."""
    peft = _peft()
    from peft import LoraConfig

    layers = _layer_paths(model)
    first = next(iter(layers.values())).kt_wrapper
    r, alpha = first.lora_rank, first.lora_alpha
    for w in layers.values():
        if (w.kt_wrapper.lora_rank, w.kt_wrapper.lora_alpha) != (r, alpha):
            raise KTAMXConfigError("all wrapped layers must share one LoRA rank and alpha to be saved as one adapter")
    meta = {"format": 1, "lora_rank": r, "lora_alpha": alpha,
            "method": getattr(first, "method", None), "expert_target_parameters": list(EXPERT_TARGET_PARAMETERS)}
    sd: Dict[str, torch.Tensor] = {}
    if _is_peft_model(model):
        if adapter_name not in model.peft_config:
            raise KTAMXConfigError(f"the PeftModel has no adapter named '{adapter_name}'")
        cfg = copy.deepcopy(model.peft_config[adapter_name])
        if getattr(cfg, "target_parameters", None):
            raise KTAMXConfigError("the PEFT adapter targets parameters; the experts' LoRA is held by the KT wrapper")
        if cfg.use_rslora:
            raise KTAMXConfigError("use_rslora adapters cannot carry the experts' LoRA (PEFT forbids rank_pattern "
                                   "with rslora)")
        peft_sd = peft.get_peft_model_state_dict(model, adapter_name=adapter_name)
        sd.update({k: v.detach().cpu().contiguous() for k, v in peft_sd.items()
                   if ".lora_params." not in k})
        meta["lora_dropout"] = cfg.lora_dropout
        cfg.lora_dropout = 0.0  # PEFT's parameter LoRA requires it (dropout only matters in training)
    else:
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=[], lora_dropout=0.0, task_type="CAUSAL_LM")
        meta["lora_dropout"] = 0.0
    cfg.target_parameters = list(EXPERT_TARGET_PARAMETERS)
    cfg.rank_pattern = dict(cfg.rank_pattern or {}, **{_GU_KEY: 2 * r, _DN_KEY: r})
    cfg.alpha_pattern = dict(cfg.alpha_pattern or {}, **{_GU_KEY: 2 * alpha, _DN_KEY: alpha})
    base = get_base_model(model)
    cfg.base_model_name_or_path = getattr(base.config, "_name_or_path", None) or cfg.base_model_name_or_path
    for path, w in layers.items():
        t = expert_lora_to_peft({n: w.lora_params[n] for n in LORA_NAMES})
        # both parameters are wrapped; PEFT nests gate_up_proj (registered first) innermost
        sd[f"base_model.model.{path}.base_layer.lora_A.weight"] = t["gate_up.lora_A"]
        sd[f"base_model.model.{path}.base_layer.lora_B.weight"] = t["gate_up.lora_B"]
        sd[f"base_model.model.{path}.lora_A.weight"] = t["down.lora_A"]
        sd[f"base_model.model.{path}.lora_B.weight"] = t["down.lora_B"]
    return sd, cfg, meta


def save_kt_adapter(model, save_directory: str, adapter_name: str = "default") -> None:
    """Save the wrapped model's LoRA (PEFT adapter + experts) as one PEFT
    adapter directory, loadable by ``peft.PeftModel.from_pretrained`` onto
    the unmodified model and by :func:`load_kt_adapter` into a wrapped one."""
    from safetensors.torch import save_file

    sd, cfg, meta = kt_adapter_state_dict(model, adapter_name)
    os.makedirs(save_directory, exist_ok=True)
    save_file(sd, os.path.join(save_directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(save_directory)
    with open(os.path.join(save_directory, KT_ADAPTER_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


# ------------------------------------------------------------------- load

def _read_adapter(path: str):
    from peft import LoraConfig

    cfg = LoraConfig.from_pretrained(path)
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        sd = load_file(st)
    else:
        binf = os.path.join(path, "adapter_model.bin")
        if not os.path.isfile(binf):
            raise KTAMXConfigError(f"no adapter_model.safetensors or adapter_model.bin in {path}")
        sd = torch.load(binf, map_location="cpu", weights_only=True)
    meta = {}
    mp = os.path.join(path, KT_ADAPTER_FILE)
    if os.path.isfile(mp):
        with open(mp) as f:
            meta = json.load(f)
    return cfg, sd, meta


def _expert_params_in_nesting(cfg) -> Tuple[Optional[str], Optional[str]]:
    """(param at ``experts.base_layer.lora_*``, param at ``experts.lora_*``)."""
    names = sorted({t.rpartition(".")[-1] for t in (cfg.target_parameters or [])
                    if t.rpartition(".")[-1] in ("gate_up_proj", "down_proj")})
    if names == ["down_proj", "gate_up_proj"]:
        return "gate_up_proj", "down_proj"
    if len(names) == 1:
        return None, names[0]
    return None, None


def load_kt_adapter(model, adapter_path: str, adapter_name: str = "default", is_trainable: bool = True):
    """Load a PEFT adapter directory into a wrapped model (to resume training
    or to infer); returns the model (a PeftModel when the adapter has PEFT
    modules and ``model`` was not one yet).

    The experts' LoRA (``target_parameters`` on ``experts.gate_up_proj`` and
    ``experts.down_proj``) is copied into each layer's ``lora_params`` in
    place; the other LoRA modules load through PEFT (added to ``model`` with
    the adapter's config when it has no adapter ``adapter_name``)."""
    peft = _peft()
    cfg, sd, meta = _read_adapter(adapter_path)
    layers = _layer_paths(model)
    inner, outer = _expert_params_in_nesting(cfg)
    if outer is None:
        raise KTAMXConfigError(
            f"{adapter_path}: the adapter has no LoRA on the routed experts (target_parameters "
            f"{cfg.target_parameters}); expected {list(EXPERT_TARGET_PARAMETERS)}")
    if inner is None:
        raise KTAMXConfigError(
            f"{adapter_path}: the adapter targets only experts.{outer}; the KT layer needs both "
            "gate_up_proj and down_proj")
    per_layer: Dict[str, Dict[str, torch.Tensor]] = {}
    rest: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _EXPERT_RE.match(k)
        if m is None:
            rest[k] = v
            continue
        path, nested, ab = m.group(1), m.group(2), m.group(3)
        param = inner if nested else outer
        per_layer.setdefault(path, {})[f"{param}.{ab}"] = v
    unknown = sorted(set(per_layer) - set(layers))
    missing = sorted(set(layers) - set(per_layer))
    if unknown or missing:
        raise KTAMXConfigError(f"{adapter_path}: expert LoRA for {unknown or 'no'} unknown layers, "
                               f"missing for {missing or 'none'}")
    imported = {}
    for path, w in layers.items():
        t = per_layer[path]
        need = ["gate_up_proj.A", "gate_up_proj.B", "down_proj.A", "down_proj.B"]
        lack = [n for n in need if n not in t]
        if lack:
            raise KTAMXConfigError(f"{adapter_path}: {path} lacks {lack}")
        kt = w.kt_wrapper
        E = kt.num_experts
        r_gu = t["gate_up_proj.A"].shape[0] // E
        r_d = t["down_proj.A"].shape[0] // E
        imported[path] = expert_lora_from_peft(
            t["gate_up_proj.A"], t["gate_up_proj.B"], _scale(cfg, f"{path}.gate_up_proj", r_gu),
            t["down_proj.A"], t["down_proj.B"], _scale(cfg, f"{path}.down_proj", r_d),
            num_experts=E, rank=kt.lora_rank, scaling=kt.lora_scaling)
        for n in LORA_NAMES:
            if tuple(imported[path][n].shape) != tuple(w.lora_params[n].shape):
                raise KTAMXConfigError(f"{adapter_path}: {path} {n} shape {tuple(imported[path][n].shape)} "
                                       f"!= {tuple(w.lora_params[n].shape)}")
    with torch.no_grad():
        for path, w in layers.items():
            for n in LORA_NAMES:
                p = w.lora_params[n]
                p.copy_(imported[path][n].to(p.dtype))
                p.requires_grad_(is_trainable)
    if rest:
        if not _is_peft_model(model) or adapter_name not in model.peft_config:
            mcfg = copy.deepcopy(cfg)
            mcfg.target_parameters = None
            for pat in (mcfg.rank_pattern, mcfg.alpha_pattern):
                for key in (_GU_KEY, _DN_KEY):
                    pat.pop(key, None)
            mcfg.lora_dropout = meta.get("lora_dropout", mcfg.lora_dropout)
            mcfg.inference_mode = not is_trainable
            if _is_peft_model(model):
                model.add_adapter(adapter_name, mcfg)
            else:
                model = peft.get_peft_model(model, mcfg, adapter_name=adapter_name)
        result = peft.set_peft_model_state_dict(model, rest, adapter_name=adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise KTAMXConfigError(f"{adapter_path}: keys not matching the model: {unexpected[:5]}")
        if not is_trainable:
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(False)
        # PEFT freezes what it does not know; the experts' LoRA is trainable
        for w in layers.values():
            for p in w.lora_params.values():
                p.requires_grad_(is_trainable)
    for w in layers.values():
        w.update_lora_pointers()
    return model
