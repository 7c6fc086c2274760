"""The argument checks every layer shares: one positive-int rule with one message, and `tracing()`, which says
when a check must not read tensor values back to the host.

`vermeil.nn` is the bottom of the house, so the check lives here and the models, data and diffusion code import it.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "check_optional_positive_int",
    "check_positive_int",
    "check_positive_ints",
    "check_probability",
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


def tracing() -> bool:
    """True while the current code is being traced rather than run eagerly: under `torch.compile` /
    `torch.export` (`torch.compiler.is_compiling()`) or `torch.jit.trace`, or while a CUDA graph is being
    captured on the current stream. Checks that read tensor values (`.tolist()`, `.item()`) skip themselves
    then: a read is a graph break under compile, a baked-in constant under jit.trace, and illegal during a
    capture."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
