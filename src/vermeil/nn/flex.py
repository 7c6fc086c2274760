"""Block-sparse attention masks through `torch.nn.attention.flex_attention` (FlexAttention).

The rules are those of `vermeil.nn.masks`, written as FlexAttention `mask_mod` functions
`(b, h, q_idx, kv_idx) -> bool`: causal, sliding window, Llama 4's chunks, key padding and documents
(packed sequences). `create_block_mask` turns a rule into a `BlockMask` that marks each 128 x 128 tile of the
(T, S) score matrix empty, partial or full, and `flex_attention` then computes only the non-empty tiles: at
T = 8192 a chunk of 2048 leaves 1/4 of the causal tiles, a window of 1024 about 1/7, where SDPA with a dense
boolean mask computes every tile (and cannot use its flash kernel at all).

Positions follow `vermeil.nn.masks`: keys sit at 0..S-1 and queries at the last T of them (query i at
position S - T + i, bottom-right aligned when T < S), so `flex_attention(q, k, v, causal=True, window=W)`
equals `attention(q, k, v, attention_mask(arange(S - T, S), arange(S), window=W))`; tests/nn/test_flex.py
checks every rule against those dense masks.

Costs (torch 2.13; pytorch.org/blog/flexattention): block masks of the rules without data (causal, window,
chunk) are cached per (rule, T, S, device, block size); padding and document masks depend on the batch and are
built per call. On CUDA `flex_attention` is compiled once per shape (the fused Triton kernel, forward and
backward). On the CPU it runs eager (the unfused reference, which materialises the scores) and has NO
backward: a clear error is raised when gradients are required there, so CPU tests compare forwards only.

FlexAttention arrived in torch 2.5; it is imported lazily, so this module imports on any torch and
`flex_available()` says whether it can run.

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


# Whether the module exists, found without importing it (the import itself waits for the first use); a plain
# constant, so code under torch.compile reads it without tracing a cache wrapper.
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


# ----------------------------------------------------------------------------------------------------------
# Rules as mask_mod functions


def mask_mod(
    *,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    q_offset: int = 0,
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
) -> MaskMod | None:
    """The conjunction of the requested rules as one FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool`.

    Query index i sits at position `q_offset + i` (q_offset = S - T: bottom-right), key index j at j; the
    rules are those of `vermeil.nn.masks.attention_mask`.

    Args:
        causal: keys at positions <= the query's.
        window: W: causal `0 <= q - k < W`, otherwise the band `|q - k| < W`; or None.
        chunk: C: `q // C == k // C` (Llama 4), and causal when `causal`; or None.
        q_offset: position of query 0 (S - T for the bottom-right alignment).
        key_padding_mask: (B, S) bool, True = real key; or None.
        document_ids: (B, S) integer document of each position (packed sequences): a query attends only keys
            of its own document; or None.

    Returns:
        The mask_mod, or None when no rule is given (every key visible: FlexAttention's default).
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
    if not (causal or window or chunk) and key_padding_mask is None and document_ids is None:
        return None

    # One closure over plain ints and the two optional tensors: FlexAttention traces it (vmap on the CPU,
    # into the Triton kernel on CUDA), so only tensor ops, no Python branches on data.
    def rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q = q_idx + q_offset
        keep = kv_idx <= q if causal else q >= 0  # q >= 0: an all-True start of the right shape
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
    """A mask_mod reading a dense boolean mask (B|1, H|1, T, S), and the causal rule when `causal`.

    For masks no rule describes; the block mask built from it still skips the empty tiles, but building it
    reads the whole mask every call.
    """
    if mask.dtype != torch.bool or mask.ndim != 4:
        raise TypeError(
            f"mask must be a 4-D bool tensor (B|1, H|1, T, S), got {mask.dtype} {tuple(mask.shape)}"
        )
    b_axis, h_axis = mask.shape[0] > 1, mask.shape[1] > 1

    def rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = mask[b if b_axis else 0, h if h_axis else 0, q_idx, kv_idx]
        return keep & (kv_idx <= q_idx + q_offset) if causal else keep

    return rule


# ----------------------------------------------------------------------------------------------------------
# Block masks


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
    """A FlexAttention `BlockMask` for T = q_len queries (bottom-right aligned) over S = kv_len keys.

    Rules without data (causal, window, chunk) give a mask cached per (rule, T, S, device, block size) and
    shared by every batch row and head; with `key_padding_mask` or `document_ids` (each (B, S)) the mask
    has a batch axis and is built anew each call. Returns None when no rule is given (nothing masked).
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
    rule = mask_mod(
        causal=causal,
        window=window,
        chunk=chunk,
        q_offset=kv_len - q_len,
        key_padding_mask=key_padding_mask,
        document_ids=document_ids,
    )
    batch = (key_padding_mask if key_padding_mask is not None else document_ids).shape[0]  # type: ignore[union-attr]
    for name, t in (("key_padding_mask", key_padding_mask), ("document_ids", document_ids)):
        if t is not None and t.shape != (batch, kv_len):
            raise ValueError(f"{name} must have shape (B={batch}, S={kv_len}), got {tuple(t.shape)}")
    return _require_flex().create_block_mask(
        rule, batch, heads, q_len, kv_len, device=device, BLOCK_SIZE=block_size
    )


# ----------------------------------------------------------------------------------------------------------
# The call


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    # One compiled function for the process: Dynamo specialises it per shape and block-mask structure, which
    # is the "compiled once per shape" the fused kernel needs (eager flex_attention is the unfused reference).
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
    """Attention under the given rules, computing only the non-empty 128 x 128 tiles.

    Args:
        q: (B, H, T, Dh); k, v: (B, Hkv, S, Dh), Hkv dividing H (GQA without repeating K/V).
        causal, window, chunk, key_padding_mask, document_ids: the rules of `mask_mod` (query i at position
            S - T + i); the static ones use a cached block mask.
        mask: a dense bool mask (B|1, H|1, T, S) for anything else (ANDed with `causal`), or None.
        block_mask: a ready `BlockMask` (e.g. from `flex_block_mask`), used as given (the rules must then be
            left unset).
        scale: multiplies the scores; None means Dh ** -0.5.
        compile: run the compiled (fused) kernel; None means on CUDA only. Inside a model under
            torch.compile the call is traced in place either way.

    Returns:
        (B, H, T, Dh) in q.dtype. A query with no visible key outputs zeros, as `attention` gives.

    Raises:
        RuntimeError: torch has no FlexAttention. NotImplementedError: gradients required on the CPU.
        ValueError: bad shapes, or `block_mask` combined with rules.
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
        block_mask = flex_block_mask(
            t,
            s,
            device=q.device,
            causal=causal,
            window=window,
            chunk=chunk,
            key_padding_mask=key_padding_mask,
            document_ids=document_ids,
        )
    return _run(q, k, v, block_mask, scale, compile)
