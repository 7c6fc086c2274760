"""Boolean attention masks (True = may attend) as functions of query positions `q_pos` and key positions
`kv_pos`, never of the tensor layout, so one rule serves a full forward, a prefill and a decode step on a
static cache (causality is then bottom-right aligned when T < S, unlike SDPA's `is_causal`).

Axis legend: B batch, T query length, S key length. Positions are integer (T,) or (B, T) / (S,) or (B, S).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vermeil.nn.checks import check_bool_mask, check_positive_int

__all__ = [
    "attention_mask",
    "causal_mask",
    "chunked_mask",
    "document_mask",
    "padding_mask",
    "sliding_window_mask",
]


def _check_integer(name: str, t: Tensor, what: str, ndims: tuple[int, ...] = (1, 2)) -> None:
    """An integer Tensor of `ndims` dims: (T,) or (B, T) positions, or (B, T) document ids."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor of integer {what}, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer {what}, got dtype={t.dtype}")
    if t.ndim not in ndims:
        raise ValueError(
            f"{name} must have shape {'(T,) or (B, T)' if 1 in ndims else '(B, T)'}, got {tuple(t.shape)}"
        )


def _pairs(q_pos: Tensor, kv_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Broadcast positions to a query axis and a key axis: q (B|1, T, 1), k (B|1, 1, S)."""
    _check_integer("q_pos", q_pos, "positions")
    _check_integer("kv_pos", kv_pos, "positions")
    q = q_pos if q_pos.ndim == 2 else q_pos.unsqueeze(0)  # (B|1, T)
    k = kv_pos if kv_pos.ndim == 2 else kv_pos.unsqueeze(0)  # (B|1, S)
    if q.shape[0] != k.shape[0] and 1 not in (q.shape[0], k.shape[0]):
        raise ValueError(
            f"q_pos of shape {tuple(q_pos.shape)} and kv_pos of shape {tuple(kv_pos.shape)} must share the "
            "batch size (or have none)"
        )
    return q.unsqueeze(-1), k.unsqueeze(-2)


def causal_mask(q_pos: Tensor, kv_pos: Tensor) -> Tensor:
    """(B|1, T, S) bool, `kv_pos <= q_pos`: a query attends to keys at the same or earlier positions."""
    q, k = _pairs(q_pos, kv_pos)
    return k <= q


def sliding_window_mask(q_pos: Tensor, kv_pos: Tensor, window: int, *, causal: bool = True) -> Tensor:
    """(B|1, T, S) bool: the last `window` W positions, the query's own included (Mistral).

    Causal: `0 <= q - k < W`; not causal: `|q - k| < W` (a symmetric band).
    """
    check_positive_int("window", window)
    q, k = _pairs(q_pos, kv_pos)
    # Comparisons of the broadcast (T, 1) and (1, S) positions yield bool (T, S) directly; an int64
    # difference q - k would cost 8 bytes per pair (128 MiB at T = S = 4096).
    lower = k > q - window
    return lower & (k <= q) if causal else lower & (k < q + window)


def chunked_mask(q_pos: Tensor, kv_pos: Tensor, chunk: int, *, causal: bool = True) -> Tensor:
    """(B|1, T, S) bool, Llama 4's chunks: `q // C == k // C` (and `k <= q` when causal), C = `chunk`."""
    check_positive_int("chunk", chunk)
    q, k = _pairs(q_pos, kv_pos)
    same = torch.div(q, chunk, rounding_mode="floor") == torch.div(k, chunk, rounding_mode="floor")
    return same & (k <= q) if causal else same


def padding_mask(key_padding_mask: Tensor) -> Tensor:
    """(B, S) bool key padding (True = real token) -> a (B, 1, 1, S) view: B x S booleans, not B x T x S."""
    check_bool_mask("key_padding_mask", key_padding_mask, "True = real token")
    if key_padding_mask.ndim != 2:
        raise ValueError(f"key_padding_mask must have shape (B, S), got {tuple(key_padding_mask.shape)}")
    return key_padding_mask[:, None, None, :]


def document_mask(q_ids: Tensor, kv_ids: Tensor) -> Tensor:
    """Packed sequences: (B, 1, T, S) bool, `q_ids[:, t] == kv_ids[:, s]` for document ids (B, T), (B, S).

    AND it with `causal_mask` for causal packing.
    """
    _check_integer("q_ids", q_ids, "document ids", (2,))
    _check_integer("kv_ids", kv_ids, "document ids", (2,))
    if q_ids.shape[0] != kv_ids.shape[0]:
        raise ValueError(f"q_ids batch={q_ids.shape[0]} must equal kv_ids batch={kv_ids.shape[0]}")
    return (q_ids[:, :, None] == kv_ids[:, None, :]).unsqueeze(1)


def attention_mask(
    q_pos: Tensor,
    kv_pos: Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The conjunction of the requested rules as one (B|1, 1, T, S) mask for `attention` (all True if none).

    key_padding_mask: (B, S) bool, True = real token.
    """
    q, k = _pairs(q_pos, kv_pos)  # window and chunk are checked by their own masks below
    if window is not None:  # already causal when causal=True
        mask = sliding_window_mask(q_pos, kv_pos, window, causal=causal)
        if chunk is not None:
            mask = mask & chunked_mask(q_pos, kv_pos, chunk, causal=False)
    elif chunk is not None:  # already causal when causal=True
        mask = chunked_mask(q_pos, kv_pos, chunk, causal=causal)
    elif causal:
        mask = k <= q
    else:
        mask = (q == q) & (k == k)  # all True (B|1, T, S)
    mask = mask.unsqueeze(1)  # (B|1, 1, T, S)
    if key_padding_mask is not None:
        pad = padding_mask(key_padding_mask)
        if pad.shape[-1] != mask.shape[-1]:
            raise ValueError(
                f"key_padding_mask must have shape (B, S={mask.shape[-1]}), got {tuple(key_padding_mask.shape)}"
            )
        if mask.shape[0] not in (1, pad.shape[0]):
            raise ValueError(
                f"key_padding_mask batch={pad.shape[0]} does not match the positions' batch={mask.shape[0]}"
            )
        mask = mask & pad
    return mask
