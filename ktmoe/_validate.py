"""Checks made before a tensor's pointer crosses into libktmoe."""

from __future__ import annotations

import torch

from ._lib import DTYPE_BF16, DTYPE_F32

_C_DTYPES = {torch.float32: DTYPE_F32, torch.bfloat16: DTYPE_BF16}


def c_dtype(t: torch.Tensor) -> int:
    return _C_DTYPES[t.dtype]


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        if minimum == 1:
            raise ValueError(f"{name} must be positive, got {value}")
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_tensor(t, name: str, shape: tuple, dtypes=None) -> torch.Tensor:
    """Type, shape and dtype checks with clear messages (no conversion)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} shape mismatch: expected {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    return t


def cpu_contiguous(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """The tensor on the CPU, contiguous and of `dtype` (a copy only if needed)."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()


def check_rows(t, name: str, ncols: int, dtypes) -> int:
    """A 2-D tensor [q, ncols]; returns q."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2 or t.shape[1] != ncols:
        raise ValueError(f"{name} shape mismatch: expected [qlen, {ncols}], got {list(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    return t.shape[0]


def staging_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor for staging CUDA data: pinned when CUDA is
    available, so copies to and from the GPU can be asynchronous."""
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=torch.cuda.is_available())
