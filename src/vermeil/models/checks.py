"""Argument checks the language models share: positive sizes, and cache positions against tokens and the cache.

Axis legend: B batch, T sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vermeil.nn.checks import check_positive_int

__all__ = ["check_input_pos", "check_positive_int"]


def check_input_pos(
    tokens: Tensor, input_pos: Tensor, max_seq_len: int | None, batch_size: int | None
) -> None:
    """Static checks of (T,) positions against tokens (B, T) and the cache; the value range only in eager mode
    (reading it would be a graph break under compile)."""
    b, t = tokens.shape
    if not isinstance(input_pos, Tensor):
        raise TypeError(f"input_pos must be a (T,) integer tensor, got {type(input_pos).__name__}")
    if input_pos.dtype.is_floating_point or input_pos.dtype == torch.bool:
        raise TypeError(f"input_pos must hold integer positions, got dtype={input_pos.dtype}")
    if input_pos.shape != (t,):
        raise ValueError(f"input_pos must have shape (T={t},), got {tuple(input_pos.shape)}")
    if batch_size is not None and b > batch_size:
        raise ValueError(f"batch of {b} rows exceeds the cache's batch_size={batch_size}")
    if max_seq_len is not None and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(input_pos)).tolist()
        if lo < 0 or hi >= max_seq_len:
            raise ValueError(
                f"input_pos spans [{lo}, {hi}], outside the cache's positions [0, max_seq_len={max_seq_len})"
            )
