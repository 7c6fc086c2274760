"""The argument checks every layer shares (models, data and diffusion code import them from this bottom layer),
and `tracing()`, which says when a check must not read tensor values back to the host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_bool_mask",
    "check_optional_positive_int",
    "check_positive_int",
    "check_positive_ints",
    "check_probability",
    "check_qkv",
    "tracing",
]


def check_positive_int(name: str, value: Any) -> int:
    """Return `value` if it is an int > 0 (a bool is not an int here), else raise ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


def check_positive_ints(**values: Any) -> None:
    """`check_positive_int` for each keyword, in order: `check_positive_ints(dim=dim, n_heads=n_heads)`."""
    for name, value in values.items():
        check_positive_int(name, value)


def check_optional_positive_int(name: str, value: Any) -> None:
    """Raise ValueError naming `name` unless `value` is None or an int > 0 (a window or chunk size)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{name}={value!r} must be a positive int or None")


def check_probability(name: str, value: Any) -> None:
    """Raise ValueError naming `name` unless `value` is a number in [0, 1) (a dropout rate)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1)")


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q (B, H, T, Dh), k and v (B, Hkv, S, Dh) with Hkv dividing H, else ValueError naming the shapes."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "q, k, v must be 4-D (B, H, T, Dh), (B, Hkv, S, Dh), (B, Hkv, S, Dh), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k of shape {tuple(k.shape)} must match q of shape {tuple(q.shape)} in batch and head_dim"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads={q.shape[1]} must be divisible by k heads={k.shape[1]}")


def check_bool_mask(name: str, mask: Any, meaning: str) -> None:
    """Raise TypeError naming `name` unless `mask` is a bool Tensor; `meaning` says what True means."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool Tensor ({meaning}), got {got}")


def tracing() -> bool:
    """True under `torch.compile` / `torch.export`, `torch.jit.trace`, or a CUDA graph capture: checks that
    read tensor values skip themselves then (a graph break, a baked-in constant, illegal in a capture)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
