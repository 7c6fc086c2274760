"""Block-sparse attention through `torch.nn.attention.flex_attention` (FlexAttention, torch >= 2.5).

The rules of `vermeil.nn.masks` (causal, sliding window, Llama 4's chunks, key padding, documents) as
`mask_mod` functions; `create_block_mask` marks each 128 x 128 tile of the (T, S) scores empty, partial or full,
and only the non-empty tiles are computed (at T = 8192, a chunk of 2048 leaves 1/4 of the causal tiles).
Positions as in `vermeil.nn.masks`: query i at S - T + i; tests/nn/test_flex.py checks every rule against
the dense masks.

On CUDA `flex_attention` is compiled once per shape (the fused Triton kernel). On the CPU it runs eager
(the unfused reference) and has NO backward, so an error is raised when gradients are required there.
FlexAttention is imported lazily: this module imports on any torch.

Axis legend: B batch, H query heads, Hkv kv heads, T query length, S key length, Dh head dim.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vermeil.nn.checks import check_bool_mask, check_optional_positive_int, check_qkv

__all__ = [
    "dense_mask_mod",
    "flex_attention",
    "flex_available",
    "flex_block_mask",
    "mask_mod",
]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


# A plain constant (found without importing), so code under torch.compile reads it without tracing.
_HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def flex_available() -> bool:
    """Whether this torch has `torch.nn.attention.flex_attention` (torch >= 2.5)."""
    return _HAS_FLEX


def _require_flex() -> Any:
    if not _HAS_FLEX:
        raise RuntimeError(
            f"FlexAttention needs torch >= 2.5 (torch.nn.attention.flex_attention); this is torch "
            f"{torch.__version__}. Use backend='sdpa' (a dense mask) instead."
        )
    from torch.nn.attention import flex_attention as module

    return module


def mask_mod(
    *,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    q_offset: int = 0,
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
) -> MaskMod | None:
    """The rules of `vermeil.nn.masks.attention_mask` as one `mask_mod(b, h, q_idx, kv_idx) -> bool`.

    Query index i sits at position `q_offset + i` (S - T: bottom-right), key index j at j.
    key_padding_mask: (B, S) bool, True = real key; document_ids: (B, S) integer document of each position.
    Returns None when no rule is given (every key visible: FlexAttention's default).
    """
    check_optional_positive_int("window", window)
    check_optional_positive_int("chunk", chunk)
    for name, t in (("key_padding_mask", key_padding_mask), ("document_ids", document_ids)):
        if t is not None and (not isinstance(t, Tensor) or t.ndim != 2):
            raise ValueError(f"{name} must be a (B, S) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if key_padding_mask is not None:
        check_bool_mask("key_padding_mask", key_padding_mask, "True = real key")
    if document_ids is not None and (
        document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool
    ):
        raise TypeError(f"document_ids must hold integer ids, got dtype={document_ids.dtype}")
    if document_ids is not None and q_offset < 0:  # a query at a negative position would read a wrapped id
        raise ValueError(
            f"document_ids hold the documents of the S key positions, so the queries (the last T) need T <= S; "
            f"got q_offset = S - T = {q_offset}"
        )
    if not (causal or window or chunk) and key_padding_mask is None and document_ids is None:
        return None

    # One closure over plain ints and the two optional tensors: FlexAttention traces it (vmap on the CPU,
    # into the Triton kernel on CUDA), so only tensor ops, no Python branches on data.
    def rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q = q_idx + q_offset
        # kv_idx >= 0: an all-True start of the right shape (q < 0 for the first T - S queries when T > S)
        keep = kv_idx <= q if causal else kv_idx >= 0
        if window is not None:
            keep = keep & (kv_idx > q - window)
            if not causal:
                keep = keep & (kv_idx < q + window)
        if chunk is not None:
            keep = keep & (q // chunk == kv_idx // chunk)
        if key_padding_mask is not None:
            keep = keep & key_padding_mask[b, kv_idx]
        if document_ids is not None:
            keep = keep & (document_ids[b, q] == document_ids[b, kv_idx])
        return keep

    return rule


def dense_mask_mod(mask: Tensor, *, causal: bool = False, q_offset: int = 0) -> MaskMod:
    """A mask_mod reading a dense bool mask (B|1, H|1, T, S), ANDed with the causal rule when `causal`."""
    if mask.dtype != torch.bool or mask.ndim != 4:
        raise TypeError(
            f"mask must be a 4-D bool tensor (B|1, H|1, T, S), got {mask.dtype} {tuple(mask.shape)}"
        )
    b_axis, h_axis = mask.shape[0] > 1, mask.shape[1] > 1

    def rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = mask[b if b_axis else 0, h if h_axis else 0, q_idx, kv_idx]
        return keep & (kv_idx <= q_idx + q_offset) if causal else keep

    return rule


def _rule_block_mask(
    causal: bool,
    window: int | None,
    chunk: int | None,
    q_len: int,
    kv_len: int,
    device: torch.device,
    block_size: int,
) -> Any:
    rule = mask_mod(causal=causal, window=window, chunk=chunk, q_offset=kv_len - q_len)
    assert rule is not None  # internal: the caller handles "no rule"
    return _require_flex().create_block_mask(
        rule, None, None, q_len, kv_len, device=device, BLOCK_SIZE=block_size
    )


_static_block_mask = functools.lru_cache(maxsize=64)(_rule_block_mask)


def flex_block_mask(
    q_len: int,
    kv_len: int,
    *,
    device: torch.device | str,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
    heads: int | None = None,
    block_size: int = 128,
) -> Any | None:
    """A `BlockMask` for T = q_len queries (bottom-right aligned) over S = kv_len keys; None without rules.

    Rules without data (causal, window, chunk) give a mask cached per (rule, T, S, device, block size); with
    `key_padding_mask` or `document_ids` (each (B, S)) it has a batch axis and is built each call.
    """
    device = torch.device(device)
    if q_len > kv_len and causal:
        raise ValueError(f"causal attention needs T <= S (bottom-right aligned), got T={q_len}, S={kv_len}")
    if key_padding_mask is None and document_ids is None:
        if not (causal or window or chunk):
            return None
        check_optional_positive_int("window", window)
        check_optional_positive_int("chunk", chunk)
        # Traced in place under torch.compile: the cache's Python is not traceable.
        build = _rule_block_mask if torch.compiler.is_compiling() else _static_block_mask
        return build(causal, window, chunk, q_len, kv_len, device, block_size)
    data = {"key_padding_mask": key_padding_mask, "document_ids": document_ids}
    rule = mask_mod(causal=causal, window=window, chunk=chunk, q_offset=kv_len - q_len, **data)
    batch = (key_padding_mask if key_padding_mask is not None else document_ids).shape[0]  # type: ignore[union-attr]
    for name, t in data.items():
        if t is not None and t.shape != (batch, kv_len):
            raise ValueError(f"{name} must have shape (B={batch}, S={kv_len}), got {tuple(t.shape)}")
    return _require_flex().create_block_mask(
        rule, batch, heads, q_len, kv_len, device=device, BLOCK_SIZE=block_size
    )


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    # One compiled function per process; Dynamo specialises it per shape and block-mask structure.
    return torch.compile(_require_flex().flex_attention, dynamic=False)


def _run(
    q: Tensor, k: Tensor, v: Tensor, block_mask: Any, scale: float | None, compile: bool | None
) -> Tensor:
    module = _require_flex()
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            f"flex attention has no backward on the CPU (torch {torch.__version__}): run it under "
            "torch.no_grad() there, or use backend='sdpa' for training on the CPU"
        )
    kw: dict[str, Any] = {"block_mask": block_mask, "scale": scale}
    if q.shape[1] != k.shape[1]:
        kw["enable_gqa"] = True  # GQA without repeating K/V
    if compile is None:
        compile = q.device.type == "cuda"
    if compile and not torch.compiler.is_compiling():
        return _compiled_flex()(q, k, v, **kw)
    if torch.compiler.is_compiling() and q.device.type == "cpu":
        # Inductor's CPU flex template (torch 2.13) fails to render ("not enough values to unpack") when q is
        # a transposed view of a matmul output, as a model's projections give; dense (B, H, T, Dh) copies pass.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return module.flex_attention(q, k, v, **kw)


def flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    chunk: int | None = None,
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
    mask: Tensor | None = None,
    block_mask: Any | None = None,
    scale: float | None = None,
    compile: bool | None = None,
) -> Tensor:
    """Attention under the rules of `mask_mod`, computing only the non-empty tiles.

    q: (B, H, T, Dh), k and v: (B, Hkv, S, Dh) -> (B, H, T, Dh) in q.dtype; a query with no visible key
    outputs zeros, as `attention` gives.

    Args:
        mask: a dense bool mask (B|1, H|1, T, S) for anything no rule describes (ANDed with `causal`); its
            block mask is built from the whole mask each call.
        block_mask: a ready `BlockMask` (e.g. from `flex_block_mask`), used as given (no rules then).
        scale: None means Dh ** -0.5.
        compile: run the compiled (fused) kernel; None means on CUDA only (under torch.compile the call is
            traced in place either way).
    """
    check_qkv(q, k, v)
    t, s = q.shape[2], k.shape[2]
    rules = causal or window or chunk or key_padding_mask is not None or document_ids is not None
    if block_mask is not None:
        if rules or mask is not None:
            raise ValueError("block_mask is used as given: pass no causal/window/chunk/padding/document/mask")
    elif mask is not None:
        if window or chunk or key_padding_mask is not None or document_ids is not None:
            raise ValueError("a dense mask combines with causal only; fold the other rules into it")
        if causal and t > s:
            raise ValueError(f"causal attention needs T <= S (bottom-right aligned), got T={t}, S={s}")
        b = mask.shape[0] if mask.shape[0] > 1 else None
        h = mask.shape[1] if mask.shape[1] > 1 else None
        rule = dense_mask_mod(mask.expand(-1, -1, t, s), causal=causal, q_offset=s - t)
        block_mask = _require_flex().create_block_mask(rule, b, h, t, s, device=q.device)
    else:
        data = {"key_padding_mask": key_padding_mask, "document_ids": document_ids}
        block_mask = flex_block_mask(t, s, device=q.device, causal=causal, window=window, chunk=chunk, **data)
    return _run(q, k, v, block_mask, scale, compile)
