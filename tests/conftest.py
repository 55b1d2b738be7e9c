"""Shared fixtures for the ktmoe test suite.

* ``tier`` / ``nonref_tier`` are parametrized (pytest_generate_tests) over the
  tiers listed in ``ktmoe.cpu_info()["usable_tiers"]`` ("ref" is always there).
* ``make_wrapper(**overrides)`` builds a KTMoEWrapper with small default
  arguments (2 CPUInfer threads, 1 thread pool); ``build_wrapper(layer, k, ...)``
  also loads the base weights of a ``reference.Layer`` and initializes its LoRA.

The CPUInfer thread pool is a process singleton: a wrapper with another
(cpuinfer_threads, threadpool_count) can only be created once every earlier
wrapper is gone. Therefore the factories keep NO reference to the wrappers they
create, and every test using them ends with a ``gc.collect()`` (plus dropping
``sys.last_traceback`` & co., which pytest sets on failure and which would keep
a failed test's frame, and its wrappers, alive).
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from reference import LORA_NAMES, Layer  # noqa: E402

# Default constructor arguments (small layer, 2 threads, 1 pool).
WRAPPER_DEFAULTS = dict(
    layer_idx=0,
    num_experts=8,
    num_experts_per_tok=2,
    hidden_size=32,
    moe_intermediate_size=16,
    num_gpu_experts=0,
    cpuinfer_threads=2,
    threadpool_count=1,
    weight_path="",
    chunked_prefill_size=512,
    method="AMXBF16_SFT",
    mode="sft",
    lora_rank=4,
    lora_alpha=8.0,
    max_cache_depth=1,
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: larger shapes (still seconds, not minutes)")


def _try_import_ktmoe():
    try:
        import ktmoe  # noqa: F401

        return ktmoe
    except Exception:  # package not built / not importable
        return None


def _usable_tiers():
    ktmoe = _try_import_ktmoe()
    if ktmoe is None:
        return ["ref"]
    try:
        tiers = list(ktmoe.cpu_info()["usable_tiers"])
    except Exception:
        return ["ref"]
    if "ref" not in tiers:
        tiers.insert(0, "ref")
    return tiers


def pytest_generate_tests(metafunc):
    if "tier" in metafunc.fixturenames:
        metafunc.parametrize("tier", _usable_tiers())
    if "nonref_tier" in metafunc.fixturenames:
        others = [t for t in _usable_tiers() if t != "ref"]
        if others:
            metafunc.parametrize("nonref_tier", others)
        else:
            metafunc.parametrize(
                "nonref_tier",
                [pytest.param(None, marks=pytest.mark.skip(reason="only the 'ref' tier is usable here"))],
            )


def release_wrappers() -> None:
    """Drop references that pytest may hold to failed frames, then collect."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            try:
                setattr(sys, name, None)
            except Exception:
                pass
    gc.collect()


@pytest.fixture(scope="session")
def ktmoe():
    return pytest.importorskip("ktmoe")


@pytest.fixture(scope="session")
def usable_tiers(ktmoe):
    return _usable_tiers()


@pytest.fixture
def make_wrapper(ktmoe):
    """Factory: make_wrapper(**overrides) -> KTMoEWrapper (not loaded).

    Overrides use the real constructor keyword names. ``isa`` is passed only
    when it is among the overrides (then forwarded as given, None included).
    """

    def factory(**overrides):
        kwargs = dict(WRAPPER_DEFAULTS)
        kwargs.update(overrides)
        return ktmoe.KTMoEWrapper(**kwargs)

    yield factory
    release_wrappers()


@pytest.fixture
def build_wrapper(make_wrapper):
    """Factory: build_wrapper(layer, k, tier=None, load=True, init_lora=True, **overrides).

    Creates a wrapper matching ``layer`` (a reference.Layer), loads its bf16
    base weights and (optionally) initializes its LoRA tensors (zero copy:
    the wrapper then uses ``layer.loras[...]`` in place).
    """

    def factory(layer: Layer, k: int, tier=None, load=True, init_lora=True, **overrides):
        kwargs = dict(
            num_experts=layer.E,
            num_experts_per_tok=k,
            hidden_size=layer.H,
            moe_intermediate_size=layer.I,
            lora_rank=layer.r,
            lora_alpha=layer.alpha,
        )
        if tier is not None:
            kwargs["isa"] = tier
        kwargs.update(overrides)
        w = make_wrapper(**kwargs)
        if load:
            w.load_weights_from_tensors(layer.gate, layer.up, layer.down, torch.arange(layer.E))
        if init_lora:
            w.init_lora_weights(*[layer.loras[n] for n in LORA_NAMES])
        return w

    return factory
