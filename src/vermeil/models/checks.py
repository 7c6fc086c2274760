"""Argument checks the models share: config fields, tokens, cache positions.

Axis legend: B batch, T sequence length.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Collection
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from vermeil.nn.checks import check_positive_int, tracing

__all__ = ["check_fields", "check_input_pos", "check_positive_int", "check_tokens", "tracing"]


def check_fields(config: Any, *, positive: Collection[str] = (), skip: Collection[str] = ()) -> None:
    """Check each field of a config dataclass by its annotation (a string, under `from __future__ import
    annotations`), except those in `skip`: `int` a positive int, `bool` true or false, `float` finite (> 0 when
    named in `positive`), `Literal[...]` one of its values; `X | None` also allows None."""
    for f in fields(config):
        value, kind = getattr(config, f.name), f.type.removesuffix(" | None")
        if f.name in skip or (value is None and kind != f.type):
            continue
        if kind == "int":
            check_positive_int(f.name, value)
        elif kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{f.name}={value!r} must be true or false")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{f.name}={value!r} must be a finite number")
            if f.name in positive and not value > 0:
                raise ValueError(f"{f.name}={value!r} must be a positive number")
        elif kind.startswith("Literal[") and value not in (choices := ast.literal_eval(kind[7:])):
            raise ValueError(
                f"{f.name}={value!r} must be one of {choices}" + (" or None" if kind != f.type else "")
            )


def check_tokens(tokens: object, vocab_size: int) -> None:
    """The language models' one input check: `tokens` is a (B, T) integer tensor with B >= 1 and T >= 1, and,
    when not `tracing()`, every id is in [0, vocab_size)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a (batch, seq) integer tensor, got {type(tokens).__name__}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a (batch, seq) integer tensor, got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must hold integer ids, got dtype={tokens.dtype}")
    if 0 in tokens.shape:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} is empty: batch and seq must each be >= 1")
    if not tracing():
        lo, hi = torch.stack(torch.aminmax(tokens)).tolist()
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, vocab_size={vocab_size})")


def check_input_pos(
    tokens: Tensor, input_pos: Tensor, max_seq_len: int | None, batch_size: int | None
) -> None:
    """(T,) positions against tokens (B, T) and the cache; the value range only when not `tracing()`."""
    b, t = tokens.shape
    if not isinstance(input_pos, Tensor):
        raise TypeError(f"input_pos must be a (T,) integer tensor, got {type(input_pos).__name__}")
    if input_pos.dtype.is_floating_point or input_pos.dtype == torch.bool:
        raise TypeError(f"input_pos must hold integer positions, got dtype={input_pos.dtype}")
    if input_pos.shape != (t,):
        raise ValueError(f"input_pos must have shape (T={t},), got {tuple(input_pos.shape)}")
    if batch_size is not None and b > batch_size:
        raise ValueError(f"batch of {b} rows exceeds the cache's batch_size={batch_size}")
    if max_seq_len is not None and not tracing():
        lo, hi = torch.stack(torch.aminmax(input_pos)).tolist()
        if lo < 0 or hi >= max_seq_len:
            raise ValueError(
                f"input_pos spans [{lo}, {hi}], outside the cache's positions [0, max_seq_len={max_seq_len})"
            )
