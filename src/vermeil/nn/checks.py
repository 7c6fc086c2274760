"""The argument checks every layer shares: one positive-int rule with one message.

`vermeil.nn` is the bottom of the house, so the check lives here and the models, data and diffusion code import it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_positive_int", "check_positive_ints"]


def check_positive_int(name: str, value: Any) -> int:
    """Return `value` if it is an int > 0 (a bool is not an int here), else raise ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


def check_positive_ints(**values: Any) -> None:
    """`check_positive_int` for each keyword, in order: `check_positive_ints(dim=dim, n_heads=n_heads)`."""
    for name, value in values.items():
        check_positive_int(name, value)
