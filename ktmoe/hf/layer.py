"""``KTMoEFunction`` (the autograd bridge to an SFT wrapper) and
``KTMoELayerWrapper`` (the nn.Module that takes a routed-expert block's place
in a transformers model), spec 000 §5.2-§5.4.

Gradients.  The function returns the gradient of the hidden states and of the
routing weights (so the router, and everything before it, gets exact
gradients) and writes the six LoRA gradients straight into the parameters'
``.grad`` (accumulating, no full-size temporary; autograd gets ``None`` for
them, so gradient hooks registered on those parameters do not fire).

Forward caches.  The C layer keeps at most ``max_cache_depth`` forward caches
and its backward always consumes the newest.  Each forward that caches gets a
ticket, saved with ``ctx.save_for_backward`` (so activation checkpointing maps
a recomputed forward's ticket onto the original node).  A backward uses the
cache only when the newest entry is its own; otherwise it recomputes the
forward from the saved inputs first.  Results are therefore exact whatever the
order of forwards and backwards, and ``max_cache_depth`` only decides how often
a recompute is needed (``KTMoELayerWrapper.cache_stats`` counts them).  See
docs/hf_integration.md for gradient checkpointing.
"""

from __future__ import annotations

import itertools
import math
import threading
import warnings
import weakref
from typing import Dict, Optional

import torch
from torch import nn

from ..experts_sft import GRAD_NAMES, LORA_NAMES, BaseSFTMoEWrapper
from .arch import MOEArchConfig
from .errors import KTAMXBackwardError, KTAMXConfigError, KTAMXForwardError

#: name under which the integration registers itself in transformers' ExpertsInterface
EXPERTS_IMPLEMENTATION = "ktmoe"

_tickets = itertools.count(1)


def _saved_tensor_hooks_active() -> bool:
    """True while saved-tensor default hooks (activation checkpointing,
    offloading) are installed.  Only used to avoid caching a forward whose
    saved tensors will be thrown away; a wrong answer costs a recompute, not
    correctness."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except Exception:  # pragma: no cover - private API missing
        return False


def _in_backward() -> bool:
    try:
        return torch._C._current_graph_task_id() != -1
    except Exception:  # pragma: no cover
        return False


class _CacheTracker:
    """Mirrors one SFT wrapper's LIFO forward caches: one entry (ticket,
    weak reference to the ticket tensor, cache depth after the push) per
    cached forward made through KTMoEFunction."""

    def __init__(self, kt: BaseSFTMoEWrapper):
        self.kt_ref = weakref.ref(kt)
        self.entries: list = []
        self.stats: Dict[str, int] = dict(cached=0, uncached=0, recomputed=0, evicted=0)
        self.warned = False
        self.scratch: Optional[Dict[str, torch.Tensor]] = None

    def _consistent(self, kt) -> bool:
        # entries made by direct forward_sft() calls are not ours to pop
        return bool(self.entries) and self.entries[-1][2] == kt._cache_depth

    def scratch_grads(self, kt) -> Dict[str, torch.Tensor]:
        """LoRA-gradient buffers for backwards whose LoRA gradients are not
        wanted (the kernel always computes them): allocated once per layer and
        LoRA dtype, reused."""
        dtype = kt.gate_lora_a.dtype
        if self.scratch is None or self.scratch["grad_gate_lora_a"].dtype != dtype:
            shapes = kt._lora_shapes()
            self.scratch = {g: torch.empty(shapes[n], dtype=dtype) for g, n in zip(GRAD_NAMES, LORA_NAMES)}
        return self.scratch

    def _drop_newest(self, kt) -> None:
        """Pop the newest cache without using it (no computation; only
        needed when a forward's cache can no longer be used)."""
        kt.drop_forward_cache()
        self.entries.pop()
        self.stats["evicted"] += 1

    def make_room(self, kt, evict_live: bool) -> bool:
        """Free one cache slot if possible: drop newest entries whose owner is
        gone (and, with evict_live, live ones: their backward recomputes)."""
        while kt._cache_depth >= kt.max_cache_depth:
            if not self._consistent(kt):
                return False
            if self.entries[-1][1]() is not None and not evict_live:
                return False
            self._drop_newest(kt)
        return True

    def push(self, kt, ticket: int, ticket_tensor: torch.Tensor) -> None:
        self.entries.append((ticket, weakref.ref(ticket_tensor), kt._cache_depth))

    def is_newest(self, kt, ticket: int) -> bool:
        return self._consistent(kt) and self.entries[-1][0] == ticket

    def forget(self, ticket: int) -> None:
        """After its cache was consumed: drop the newest entry (ours)."""
        self.entries.pop()


_trackers: "weakref.WeakKeyDictionary[BaseSFTMoEWrapper, _CacheTracker]" = weakref.WeakKeyDictionary()
_trackers_lock = threading.Lock()


def _tracker(kt: BaseSFTMoEWrapper) -> _CacheTracker:
    with _trackers_lock:
        t = _trackers.get(kt)
        if t is None:
            t = _trackers[kt] = _CacheTracker(kt)
        return t


def _bind_lora(kt: BaseSFTMoEWrapper, loras) -> None:
    """Make ``kt`` read exactly these six tensors (re-binds the kernel when a
    tensor object or its storage changed; validates them)."""
    if not loras:
        return
    if len(loras) != len(LORA_NAMES):
        raise KTAMXConfigError(f"expected the six LoRA tensors {LORA_NAMES}, got {len(loras)}")
    if not kt._lora_initialized:
        kt.init_lora_weights(*loras)
        return
    for n, t in zip(LORA_NAMES, loras):
        if getattr(kt, n) is not t:
            setattr(kt, n, t)
    kt.update_lora_weights()


def _grad_targets(loras):
    """``grad_loras_out`` for kt.backward: the parameters' own ``.grad``
    (zeros created when None), written with accumulate.  Returns (out,
    fixups): fixups lists (param, scratch) pairs whose .grad cannot be written
    in place (non-contiguous, other device or dtype) and is added afterwards."""
    out, fixups = {}, []
    for g, p in zip(GRAD_NAMES, loras):
        if p.grad is None:
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
        gr = p.grad
        if gr.device.type != "cpu" or gr.dtype != p.dtype or not gr.is_contiguous():
            scratch = torch.zeros(p.shape, dtype=p.dtype)
            fixups.append((p, scratch))
            gr = scratch
        out[g] = gr
    return out, fixups


class KTMoEFunction(torch.autograd.Function):
    """Routed experts of one layer as an autograd function.

    ``KTMoEFunction.apply(hidden_states, topk_ids, topk_weights, kt_wrapper,
    training, *lora_params)``: hidden_states [T, H] (bf16/fp32, CPU or CUDA),
    topk_ids [T, k] int64, topk_weights [T, k] (any float dtype; its gradient
    comes back in that dtype), kt_wrapper a loaded SFT wrapper, training
    (False: never cache for backward), lora_params the six LoRA tensors in
    ``LORA_NAMES`` order (optional; when given they are bound to the wrapper
    and their ``.grad`` receives the LoRA gradients).  Returns [T, H] of the
    input's dtype and device."""

    @classmethod
    def apply(cls, hidden_states, topk_ids, topk_weights, kt_wrapper, training=True, *lora_params):
        # the grad mode is decided here: inside forward() it is always off
        training = bool(training) and torch.is_grad_enabled()
        return super().apply(hidden_states, topk_ids, topk_weights, kt_wrapper, training, *lora_params)

    @staticmethod
    def forward(ctx, hidden_states, topk_ids, topk_weights, kt_wrapper, training, *lora_params):
        kt = kt_wrapper
        if not isinstance(kt, BaseSFTMoEWrapper):
            raise KTAMXConfigError(f"kt_wrapper must be an SFT wrapper (mode='sft'), got {type(kt).__name__}")
        tracker = _tracker(kt)
        needs_grad = any(ctx.needs_input_grad[i] for i in (0, 2)) or any(
            ctx.needs_input_grad[5:])
        # a checkpointed (or offloaded) first forward: its saved tensors are
        # dropped and the forward is recomputed in backward, which caches then
        want_cache = training and needs_grad and not (_saved_tensor_hooks_active() and not _in_backward())
        with kt._lock:
            _bind_lora(kt, lora_params)
            save = want_cache and tracker.make_room(kt, evict_live=False)
            if want_cache and not save and not tracker.warned:
                tracker.warned = True
                warnings.warn(
                    f"KT MoE layer {kt.layer_idx}: all {kt.max_cache_depth} forward cache slot(s) are "
                    "held by forwards still waiting for their backward; this forward is not cached and "
                    "its backward will recompute it (exact, slower). Raise max_cache_depth to the number "
                    "of forwards run before their backward.", RuntimeWarning, stacklevel=4)
            try:
                out = kt.forward_sft(hidden_states, topk_ids, topk_weights, save_for_backward=save)
            except RuntimeError as e:
                raise KTAMXForwardError(f"KT MoE layer {kt.layer_idx} forward failed: {e}") from e
            ticket = next(_tickets) if save else 0
            ticket_t = torch.tensor([ticket], dtype=torch.int64)
            if save:
                tracker.push(kt, ticket, ticket_t)
                tracker.stats["cached"] += 1
            elif training and needs_grad:
                tracker.stats["uncached"] += 1
        ctx.kt = kt
        ctx.n_lora = len(lora_params)
        # the parameter objects themselves (saved tensors may come back as
        # detached aliases, e.g. from a checkpoint recompute)
        ctx.lora_params = lora_params
        ctx.save_for_backward(hidden_states, topk_ids, topk_weights, ticket_t, *lora_params)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        # unpacking may run a checkpoint recompute (which caches a forward)
        x, ids, w, ticket_t, *_ = ctx.saved_tensors  # the LoRA ones: version-checked only
        loras = ctx.lora_params
        kt = ctx.kt
        tracker = _tracker(kt)
        ticket = int(ticket_t.reshape(-1)[0])
        want_lora = bool(loras) and any(ctx.needs_input_grad[5:])
        with kt._lock:
            try:
                _bind_lora(kt, loras)
                if ticket and tracker.is_newest(kt, ticket):
                    tracker.forget(ticket)
                else:
                    # the cache is not (or no longer) ours: recompute it
                    if not tracker.make_room(kt, evict_live=True):
                        raise KTAMXBackwardError(
                            f"KT MoE layer {kt.layer_idx}: the forward cache is full of entries made by "
                            "direct forward_sft() calls, so this backward cannot recompute its forward; "
                            "call backward() for them first or raise max_cache_depth")
                    kt.forward_sft(x, ids, w, save_for_backward=True)
                    tracker.stats["recomputed"] += 1
                if want_lora:
                    out, fixups = _grad_targets(loras)
                else:
                    out, fixups = tracker.scratch_grads(kt), []
                grad_input, _, grad_w = kt.backward(grad_output.contiguous(), return_grad_weights=True,
                                                    grad_loras_out=out, accumulate=want_lora)
            except KTAMXBackwardError:
                raise
            except RuntimeError as e:
                raise KTAMXBackwardError(f"KT MoE layer {kt.layer_idx} backward failed: {e}") from e
        for p, scratch in fixups:
            p.grad.add_(scratch.to(p.grad.device, p.grad.dtype))
        gx = grad_input if ctx.needs_input_grad[0] else None
        gw = grad_w.to(device=w.device, dtype=w.dtype) if ctx.needs_input_grad[2] else None
        return (gx, None, gw, None, None) + (None,) * ctx.n_lora


def ktmoe_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"ktmoe"`` entry of transformers' ExpertsInterface: the routed
    experts of the layer that wrapped this experts module."""
    ref = experts.__dict__.get("_kt_layer")
    layer = ref() if ref is not None else None
    if layer is None:
        raise KTAMXConfigError(
            f"experts_implementation '{EXPERTS_IMPLEMENTATION}' is set, but this "
            f"{type(experts).__name__} module was not wrapped by wrap_moe_layers_with_kt_wrapper()")
    return layer.experts_forward(hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    """Register ``"ktmoe"`` in transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, ktmoe_experts_forward)


class KTMoELayerWrapper(nn.Module):
    """A routed-expert MoE block whose experts run on a ktmoe SFT wrapper.

    Attributes (spec 000 §5.2): ``kt_wrapper`` (the BaseSFTMoEWrapper),
    ``router`` (the model's own router module), ``shared_experts`` (or None),
    ``lora_params`` (nn.ParameterDict of the six LoRA factors, registered, so
    optimizers, ``parameters()`` and ``state_dict()`` see them),
    ``moe_config`` (MOEArchConfig), ``_is_kt_moe_wrapper``.

    Built by :func:`wrap_moe_layers_with_kt_wrapper` with ``block`` (the
    model's block): the block's children are registered here under their own
    names, so parameter paths (``mlp.gate.weight``,
    ``mlp.shared_expert.gate_proj.weight``, PEFT targets) are unchanged, and
    :meth:`forward` runs the block's own forward (router, shared experts,
    jitter, casts) whose experts call dispatches to :meth:`experts_forward`.
    Without ``block`` the forward is the generic one: router -> experts ->
    + shared experts (sigmoid-gated when ``moe_config.shared_gate_attr``)."""

    _is_kt_moe_wrapper = True

    def __init__(self, kt_wrapper: BaseSFTMoEWrapper, router: nn.Module, shared_experts: Optional[nn.Module],
                 moe_config: MOEArchConfig, lora_params: Dict[str, nn.Parameter], hidden_size: int,
                 layer_idx: int, block: Optional[nn.Module] = None, shared_expert_gate: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(kt_wrapper, BaseSFTMoEWrapper):
            raise KTAMXConfigError(f"kt_wrapper must be an SFT wrapper (mode='sft'), got {type(kt_wrapper).__name__}")
        missing = [n for n in LORA_NAMES if n not in lora_params]
        if missing:
            raise KTAMXConfigError(f"lora_params lacks {missing}")
        if hidden_size != kt_wrapper.hidden_size:
            raise KTAMXConfigError(f"hidden_size {hidden_size} != the wrapper's {kt_wrapper.hidden_size}")
        self.kt_wrapper = kt_wrapper
        self.moe_config = moe_config
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.freed_bytes = 0
        if block is not None:
            # share the children dict: a module replaced here (e.g. by PEFT) is the one the block calls
            for name, child in list(block.named_children()):
                self.add_module(name, child)
            block._modules = self._modules
        else:
            self.add_module(moe_config.router_attr, router)
            if shared_experts is not None:
                self.add_module(moe_config.shared_attr or "shared_experts", shared_experts)
            if shared_expert_gate is not None:
                self.add_module(moe_config.shared_gate_attr or "shared_expert_gate", shared_expert_gate)
        object.__setattr__(self, "_block", block)
        self.lora_params = nn.ParameterDict(
            {n: p if isinstance(p, nn.Parameter) else nn.Parameter(p) for n, p in
             ((n, lora_params[n]) for n in LORA_NAMES)})
        self.update_lora_pointers()

    # ------------------------------------------------------------ access

    @property
    def block(self) -> Optional[nn.Module]:
        """The model's original block (not registered as a child)."""
        return self.__dict__.get("_block")

    def __getattr__(self, name: str):
        # router / shared_experts / shared_expert_gate (spec names) resolve to
        # the children of whatever name the architecture gives them; other
        # attributes of the original block (top_k, ...) are readable here
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        cfg = self.__dict__.get("moe_config")
        mods = self.__dict__.get("_modules", {})
        if cfg is not None and name in ("router", "shared_experts", "shared_expert_gate"):
            attr = {"router": cfg.router_attr, "shared_experts": cfg.shared_attr,
                    "shared_expert_gate": cfg.shared_gate_attr}[name]
            if attr is None:
                return None
            if attr in mods:
                return mods[attr]
        block = self.__dict__.get("_block")
        if block is not None and not name.startswith("__"):
            return getattr(block, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    @property
    def cache_stats(self) -> Dict[str, int]:
        """Forwards cached / not cached for backward, backwards that had to
        recompute their forward, caches dropped unused."""
        return dict(_tracker(self.kt_wrapper).stats)

    def extra_repr(self) -> str:
        kt = self.kt_wrapper
        return (f"layer_idx={self.layer_idx}, method={getattr(kt, 'method', '?')}, "
                f"experts={kt.num_experts}, top_k={kt.num_experts_per_tok}, hidden={kt.hidden_size}, "
                f"intermediate={kt.moe_intermediate_size}, lora_rank={kt.lora_rank}, "
                f"lora_alpha={kt.lora_alpha}, max_cache_depth={kt.max_cache_depth}")

    # ------------------------------------------------------------- LoRA

    def lora_tensors(self) -> tuple:
        return tuple(self.lora_params[n] for n in LORA_NAMES)

    def update_lora_pointers(self) -> None:
        """Make the kernels read the current ``lora_params`` (a replaced
        Parameter, ``.data`` swapped, moved or re-typed tensors are re-bound
        and re-validated; in-place updates need nothing).  Called by every
        forward, so it never has to be called by hand."""
        _bind_lora(self.kt_wrapper, self.lora_tensors())

    def _apply(self, fn, recurse=True):
        # LoRA factors stay on the CPU (the kernels read them in place); a
        # dtype change is kept if the kernels accept it (bf16 / fp32)
        lora = self._modules.pop("lora_params")
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules["lora_params"] = lora
        with torch.no_grad():
            for n in LORA_NAMES:
                p = lora[n]
                # what fn does to a tensor of this dtype, found on an empty one:
                # only a dtype change is taken, the data stay on the CPU
                probe = fn(torch.empty(0, dtype=p.dtype))
                dtype = probe.dtype if probe.dtype in (torch.float32, torch.bfloat16) else p.dtype
                t = p.data.to(dtype).contiguous()
                if t.data_ptr() != p.data.data_ptr() or t.dtype != p.dtype:
                    p.data = t
                    if p.grad is not None:
                        p.grad = p.grad.to(dtype).contiguous()
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self._block is not None:
            self._block.training = mode
        return self

    # ---------------------------------------------------------- forward

    def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
        """Routed experts: [T, H], ids [T, k], weights [T, k] -> [T, H]."""
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.hidden_size:
            raise KTAMXForwardError(
                f"hidden_states shape mismatch: expected [tokens, {self.hidden_size}], got {list(hidden_states.shape)}")
        return KTMoEFunction.apply(hidden_states, top_k_index, top_k_weights, self.kt_wrapper, True,
                                   *self.lora_tensors())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[batch, seq, H] (or [T, H]) -> same shape, on the input's device."""
        self.update_lora_pointers()
        if self._block is not None:
            self._block.training = self.training
            return self._block(hidden_states)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, ids = self.router(x)
        out = self.experts_forward(x, ids, weights)
        shared = self.shared_experts
        if shared is not None:
            s = shared(x)
            gate = self.shared_expert_gate
            if gate is not None:
                s = torch.sigmoid(gate(x)) * s
            out = out + s
        return out.reshape(shape)


def init_lora_params(num_experts: int, hidden_size: int, intermediate_size: int, rank: int,
                     dtype=torch.float32, generator: Optional[torch.Generator] = None) -> Dict[str, nn.Parameter]:
    """The six LoRA factors as Parameters on the CPU (spec 000 §5.4): each
    expert's A is kaiming-uniform with a = sqrt(5) over its own fan-in (as
    ``nn.Linear`` and PEFT initialise lora_A), B is zero."""
    E, H, I, r = num_experts, hidden_size, intermediate_size, rank
    shapes = {"gate_lora_a": (E, r, H), "gate_lora_b": (E, I, r), "up_lora_a": (E, r, H),
              "up_lora_b": (E, I, r), "down_lora_a": (E, r, I), "down_lora_b": (E, H, r)}
    out = {}
    for n, shp in shapes.items():
        t = torch.zeros(shp, dtype=torch.float32)
        if n.endswith("_a"):
            # kaiming_uniform_(a=sqrt(5)) on one [r, fan_in] matrix: bound = 1/sqrt(fan_in)
            bound = 1.0 / math.sqrt(shp[2])
            t.uniform_(-bound, bound, generator=generator)
        out[n] = nn.Parameter(t.to(dtype), requires_grad=True)
    return out
