"""Scaled dot-product attention: the `attention` function (four backends) and the one `Attention` module.

Causality is by position, bottom-right aligned when T < S (query i sits at position S - T + i, as in
`vermeil.nn.masks`). SDPA's `is_causal` is top-left aligned, so it is used only when T == S
(x-transformers #187 is this bug).

Axis legend: B batch, T query length, S key length, D model dim, Dc context dim, H heads,
Hkv kv heads, G = H / Hkv query heads per kv head, Dh head dim.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vermeil.nn.cache import KVCache, RingKVCache
from vermeil.nn.checks import (
    check_bool_mask,
    check_optional_positive_int,
    check_positive_int,
    check_positive_ints,
    check_probability,
    check_qkv,
)
from vermeil.nn.flex import flex_attention, flex_available
from vermeil.nn.masks import attention_mask, padding_mask
from vermeil.nn.norms import QKNorm
from vermeil.nn.positional import RopeTables, rotate_qk

__all__ = [
    "Attention",
    "AttentionBackend",
    "CrossAttention",
    "FlashAttention",
    "SelfAttention",
    "attention",
    "chunked_causal_attention",
]

AttentionBackend = Literal["sdpa", "math", "flash", "flex", "auto"]
_BACKENDS = ("sdpa", "math", "flash", "flex")  # attention()
_MODULE_BACKENDS = (*_BACKENDS, "auto")  # Attention: "auto" resolves per call (Attention._backend_for)

# `enable_gqa` arrived in torch 2.5 (pyproject allows 2.4): a feature check on the builtin's docstring.
_HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

# The fused kernels; "flash" allows only these (cuDNN only where this torch has it).
_FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] + (
    [SDPBackend.CUDNN_ATTENTION] if hasattr(SDPBackend, "CUDNN_ATTENTION") else []
)


def _check_mask(mask: Tensor, b: int, h: int, t: int, s: int, *, padding: bool = False) -> None:
    """A bool mask broadcastable to (B, H, T, S) with 4 dims, or with `padding` also a (B, S) key padding."""
    check_bool_mask("mask", mask, "True = may attend")
    if padding and mask.ndim == 2:
        if mask.shape != (b, s):
            raise ValueError(f"mask must have shape (B={b}, S={s}) for key padding, got {tuple(mask.shape)}")
    elif mask.ndim != 4 or any(m not in (1, n) for m, n in zip(mask.shape, (b, h, t, s))):
        rule = (
            f"shape (B={b}, S={s}) or (B|1, 1|H={h}, T={t}, S={s})"
            if padding
            else f"a shape broadcastable to (B={b}, H={h}, T={t}, S={s}) with 4 dims, each 1 or the full size"
        )
        raise ValueError(f"mask must have {rule}, got {tuple(mask.shape)}")


def _check_scale(scale: Any) -> None:
    """None or a finite number > 0 (SDPA turns a NaN scale into all-zero outputs without a word)."""
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf")
    ):
        raise ValueError(f"scale={scale!r} must be None or a finite number > 0")


@functools.cache
def _cpu_flash_combines_mask_and_causal() -> bool:
    """Whether this torch's fused CPU kernel applies `attn_mask` and `is_causal` together, exactly.

    SDPA documents the two as exclusive, but the CPU flash kernel of torch 2.13 takes both and skips the
    blocks above the diagonal: twice as fast as folding causality into the mask (bench/attention.py). Any
    error or mismatch of this one-off probe means the folded mask is used.
    """
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
        mask = torch.rand(1, 1, 5, 5, generator=g) > 0.3
        mask[..., 0] = True  # every query keeps a key
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
        folded = mask & torch.ones(5, 5, dtype=torch.bool).tril()
        return torch.allclose(got, _math_attention(q, k, v, folded, 0.5, 0.0), atol=1e-5)
    except RuntimeError:
        return False


def _fused_cpu_causal_with_mask(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """Whether SDPA runs its CPU flash kernel here with a mask and is_causal=True together: torch's own
    conditions (sdp_utils_cpp), and not under torch.compile, whose lowering follows the documented contract."""
    return (
        q.device.type == "cpu"
        and dropout_p == 0.0
        and not torch.compiler.is_compiling()
        and torch.backends.cuda.flash_sdp_enabled()  # the flag sdpa_kernel sets; the CPU kernel obeys it too
        and all(x.stride(-1) == 1 for x in (q, k, v))
        and _cpu_flash_combines_mask_and_causal()
    )


def _math_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout_p: float
) -> Tensor:
    """The definition: softmax(q k^T * scale, masked) v, materialising the (B, H, T, S) scores.

    A query whose keys are all masked gets a zero output, as SDPA gives in torch >= 2.5.
    """
    groups = q.shape[1] // k.shape[1]  # kv head j serves query heads j*G .. j*G + G - 1
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # (B, H, S, Dh)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if mask is not None:
        # finfo.min rather than -inf: a fully masked row stays finite (uniform), then is zeroed below.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, H, T, Dh)


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float, dropout_p: float
) -> Tensor:
    gqa: dict[str, bool] = {}
    if q.shape[1] != k.shape[1]:
        # On CPU (torch 2.13) the fused flash kernel takes enable_gqa with or without a mask. On CUDA
        # enable_gqa is for the flash and math kernels only, and flash takes no mask: a masked GQA call would
        # land on the math kernel (T x S scores), so K/V are expanded to keep the memory-efficient kernel.
        if _HAS_ENABLE_GQA and (mask is None or q.device.type == "cpu"):
            gqa["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **gqa
    )


def _flash(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float, dropout_p: float
) -> Tensor:
    if dropout_p > 0.0 and q.device.type == "cpu":
        raise ValueError(
            f"backend='flash' cannot serve dropout_p={dropout_p} on cpu: the fused CPU kernel has no dropout "
            "(use backend='sdpa', or dropout=0 / eval mode)"
        )
    if torch.compiler.is_compiling():  # Dynamo cannot trace warnings.catch_warnings
        with sdpa_kernel(_FUSED_BACKENDS):
            return _sdpa(q, k, v, mask, is_causal, scale, dropout_p)
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel(_FUSED_BACKENDS):
        warnings.simplefilter("always")
        try:
            return _sdpa(q, k, v, mask, is_causal, scale, dropout_p)
        except RuntimeError as err:
            if "No available kernel" not in str(err):
                raise
            reasons = "; ".join(
                str(w.message).split(" (Triggered internally")[0]
                for w in caught
                if "not used because" not in str(w.message)
            )
            m = "none" if mask is None else f"bool {tuple(mask.shape)}"
            raise RuntimeError(
                f"backend='flash': no fused SDPA kernel can serve q {tuple(q.shape)}, k {tuple(k.shape)}, "
                f"dtype={q.dtype}, device={q.device.type}, mask={m}, is_causal={is_causal}, "
                f"dropout_p={dropout_p}. torch says: {reasons or 'no reason given'}. "
                "Use backend='sdpa' to allow the math kernel."
            ) from None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: AttentionBackend = "sdpa",
) -> Tensor:
    """Scaled dot-product attention with grouped kv heads, boolean masks and bottom-right causality.

    q: (B, H, T, Dh), k and v: (B, Hkv, S, Dh) with Hkv dividing H -> (B, H, T, Dh) in q.dtype.

    Args:
        mask: bool, True = may attend, broadcastable to (B, H, T, S) with 4 dims, e.g. (B, 1, 1, S) padding or
            (1, 1, T, S) local masks from `vermeil.nn.masks`. A query with no visible key outputs zeros.
        causal: query i attends keys up to position S - T + i (bottom-right); needs T <= S.
        scale: None means Dh ** -0.5.
        backend: "sdpa" (`F.scaled_dot_product_attention`); "math" (the definition, (T, S) scores: the
            reference of the tests); "flash" (SDPA's fused kernels only, with an error naming what none
            serves instead of torch's "No available kernel"); "flex" (`vermeil.nn.flex`, no dropout).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {_BACKENDS}")
    check_qkv(q, k, v)
    b, h, t, dh = q.shape
    s = k.shape[2]
    if mask is not None:
        _check_mask(mask, b, h, t, s)
    check_probability("dropout_p", dropout_p)
    _check_scale(scale)
    if causal and t > s:
        raise ValueError(f"causal attention needs T <= S (bottom-right aligned), got T={t}, S={s}")
    scale = dh**-0.5 if scale is None else scale
    if backend == "flex":
        if dropout_p > 0.0:
            raise ValueError(f"backend='flex' has no dropout (dropout_p={dropout_p}); use backend='sdpa'")
        return flex_attention(q, k, v, causal=causal, mask=mask, scale=scale)
    # SDPA's is_causal where exact: with no mask at all (the fastest form), or with the mask as given where
    # the CPU kernel takes both and skips the blocks above the diagonal. Otherwise causality joins the mask.
    is_causal = (
        causal
        and t == s
        and backend != "math"
        and (mask is None or _fused_cpu_causal_with_mask(q, k, v, dropout_p))
    )
    if causal and not is_causal:
        pos = torch.arange(s, device=q.device)  # keys; the queries are the last T (bottom-right)
        causal_ts = pos <= pos[s - t :, None]  # (T, S)
        mask = causal_ts.view(1, 1, t, s) if mask is None else mask & causal_ts
    match backend:
        case "sdpa":
            return _sdpa(q, k, v, mask, is_causal, scale, dropout_p)
        case "math":
            return _math_attention(q, k, v, mask, scale, dropout_p)
        case _:  # "flash", checked above
            return _flash(q, k, v, mask, is_causal, scale, dropout_p)


def chunked_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chunk: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: AttentionBackend = "sdpa",
) -> Tensor:
    """Chunked causal attention (Llama 4) as T/C independent causal blocks: O(T x C), no (T, T) mask.

    Equals `attention(q, k, v, attention_mask(pos, pos, chunk=C))`. The last chunk is zero-padded: padded
    keys follow every real query of their chunk, so causality hides them.
    q: (B, H, T, Dh), k/v: (B, Hkv, T, Dh) -> (B, H, T, Dh).
    """
    check_positive_int("chunk", chunk)
    check_qkv(q, k, v)
    if k.shape[2] != q.shape[2]:  # self-attention over one sequence: the chunks must line up
        raise ValueError(f"chunked causal attention needs S == T, got T={q.shape[2]}, S={k.shape[2]}")
    b, _, t, _ = q.shape
    if pad := -t % chunk:  # rows that complete the last chunk
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))

    def split(x: Tensor) -> Tensor:  # (B, h, n*C, Dh) -> (B*n, h, C, Dh)
        return x.unflatten(2, (-1, chunk)).transpose(1, 2).flatten(0, 1)

    out = attention(
        split(q), split(k), split(v), causal=True, scale=scale, dropout_p=dropout_p, backend=backend
    )
    return out.unflatten(0, (b, -1)).transpose(1, 2).flatten(2, 3)[:, :, :t]


class Attention(nn.Module):
    """Multi-head attention for self- and cross-attention: MHA, GQA (kv_heads < heads) and MQA (kv_heads=1).

    The house's one attention module (blocks, vision encoder, LLM, hybrid), with Meta's projection names
    `wq`, `wk`, `wv`, `wo`. Masks are the rules of `vermeil.nn.masks`, by position. Fast paths, each equal to
    the masked definition (tests/nn/test_attention.py, test_flex.py): SDPA's `is_causal`, chunks as
    independent causal blocks, and FlexAttention for backend "flex" (or "auto").

    Args:
        head_dim: Dh; None means dim / heads (which must then divide).
        context_dim: Dc, width of `context`; setting it makes this a cross-attention module.
        causal: by position (bottom-right when T < S). Required for a KV cache.
        qk_norm: None, "rms" (Flux; learnable scale), "l2" (PaLM/Zeta), or a module called as
            `qk_norm(q, k) -> (q, k)`, e.g. `QKNorm(Dh, "rms", learnable=False)` (Llama 4's weightless norm).
        qk_norm_after_rope: False normalises then rotates (Flux); True rotates then normalises (Llama 4).
        bias: a bool for wq, wk, wv and wo alike, or a pair (qkv_bias, out_bias) (Qwen2: (True, False);
            Flux: (False, True)).
        dropout: on the attention probabilities, in training only (on CPU SDPA serves dropout with its math
            kernel only, which materialises the T x S scores).
        rotary: a module called as `rotary(q, k, input_pos)` (e.g. an xPos `RotaryEmbedding`); self-attention
            only. Otherwise positions enter as `rope=` tables in `forward`, or not at all (NoPE).
        window: sliding-window size (the last `window` positions, itself included), or None.
        chunk: chunked local attention block size (Llama 4), or None.
        scale: None means Dh ** -0.5 (the PaLM block with l2 qk norm uses a fixed one).
        backend: "sdpa", "math", "flash", "flex" (a KV cache keeps SDPA) or "auto" (`_backend_for`).
    """

    kv_cache: KVCache | RingKVCache | None
    head_names: tuple[str, str] = ("heads", "kv_heads")  # the arguments' names, for errors raised elsewhere

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        context_dim: int | None = None,
        causal: bool = False,
        qk_norm: Literal["rms", "l2"] | nn.Module | None = None,
        qk_norm_after_rope: bool = False,
        bias: bool | tuple[bool, bool] = False,
        dropout: float = 0.0,
        rotary: nn.Module | None = None,
        window: int | None = None,
        chunk: int | None = None,
        scale: float | None = None,
        backend: AttentionBackend = "sdpa",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        check_positive_ints(dim=dim, heads=heads, kv_heads=kv_heads)
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim={dim} must be divisible by heads={heads}")
            head_dim = dim // heads
        check_positive_int("head_dim", head_dim)
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be divisible by kv_heads={kv_heads}")
        check_optional_positive_int("context_dim", context_dim)
        if context_dim is not None and rotary is not None:
            raise ValueError(
                "rotary must be None for cross-attention (context_dim is set): positions of "
                "queries and context keys are unrelated"
            )
        rotary_dim = getattr(rotary, "head_dim", head_dim)
        if rotary_dim != head_dim:
            raise ValueError(f"rotary.head_dim={rotary_dim} must equal head_dim={head_dim}")
        if qk_norm not in (None, "rms", "l2") and not isinstance(qk_norm, nn.Module):
            raise ValueError(f"qk_norm={qk_norm!r} must be None, 'rms' or 'l2' (or a module)")
        check_probability("dropout", dropout)
        _check_scale(scale)
        check_optional_positive_int("window", window)
        check_optional_positive_int("chunk", chunk)
        if backend not in _MODULE_BACKENDS:
            raise ValueError(f"backend={backend!r} must be one of {_MODULE_BACKENDS}")
        pair = (bias, bias) if isinstance(bias, bool) else bias
        if not (isinstance(pair, (tuple, list)) and [type(b) for b in pair] == [bool, bool]):
            raise ValueError(f"bias={bias!r} must be a bool or a pair (qkv_bias, out_bias) of bools")
        qkv_bias, out_bias = pair

        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.context_dim, self.causal, self.window, self.chunk = context_dim, causal, window, chunk
        self.dropout, self.backend, self.scale = dropout, backend, scale
        self.qk_norm_after_rope = qk_norm_after_rope
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        kv_in = dim if context_dim is None else context_dim
        self.wq = nn.Linear(dim, heads * head_dim, bias=qkv_bias, **factory)
        self.wk = nn.Linear(kv_in, kv_heads * head_dim, bias=qkv_bias, **factory)
        self.wv = nn.Linear(kv_in, kv_heads * head_dim, bias=qkv_bias, **factory)
        self.wo = nn.Linear(heads * head_dim, dim, bias=out_bias, **factory)
        self.qk_norm = QKNorm(head_dim, qk_norm, **factory) if isinstance(qk_norm, str) else qk_norm
        self.rotary = rotary
        self.kv_cache = None

    def reset_parameters(self) -> None:
        for lin in (self.wq, self.wk, self.wv, self.wo):
            lin.reset_parameters()
        if hasattr(self.qk_norm, "reset_parameters"):  # None, or a custom module without one, is skipped
            self.qk_norm.reset_parameters()

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate a static cache, used by every forward given `input_pos` (dtype, device: `wk.weight`'s).

        A full `KVCache`, or with `window` and/or `chunk` a `RingKVCache` of min(window, chunk, max_seq_len)
        slots: a local query never sees further back. A forward without `input_pos` ignores the cache.
        """
        if not self.causal:
            raise ValueError("a KV cache needs causal=True (decoding attends to earlier positions only)")
        if self.context_dim is not None:
            raise ValueError("a KV cache is for self-attention; this module has context_dim set")
        w = self.wk.weight
        factory: dict[str, Any] = {"dtype": dtype or w.dtype, "device": device or w.device}
        if self.window is None and self.chunk is None:
            self.kv_cache = KVCache(batch_size, max_seq_len, self.kv_heads, self.head_dim, **factory)
        else:
            slots = min(self.window or max_seq_len, self.chunk or max_seq_len, max_seq_len)
            self.kv_cache = RingKVCache(
                batch_size, slots, self.kv_heads, self.head_dim, max_seq_len=max_seq_len, **factory
            )
        if self.rotary is not None and hasattr(self.rotary, "reserve"):
            self.rotary.reserve(max_seq_len)  # decode lookups then never grow the tables (no device sync)

    def reset_cache(self) -> None:
        """Empty the cache in place (start a new sequence); a no-op without a cache."""
        if self.kv_cache is not None:
            self.kv_cache.reset()

    def delete_cache(self) -> None:
        """Drop the cache, returning to plain (training) forwards."""
        self.kv_cache = None

    def _check_inputs(
        self,
        x: Tensor,
        context: Tensor | None,
        input_pos: Tensor | None,
        rope: RopeTables | None,
        q_scale: Tensor | None,
    ) -> None:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, seq, dim={self.dim}), got {tuple(x.shape)}")
        if x.dtype != self.wq.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x.dtype={x.dtype} does not match the module's dtype {self.wq.weight.dtype}")
        if self.context_dim is None:
            if context is not None:
                raise ValueError("context given to a self-attention module (context_dim=None)")
        elif context is None:
            raise ValueError(f"context of shape (batch, seq, context_dim={self.context_dim}) is required")
        elif context.ndim != 3 or context.shape[-1] != self.context_dim or context.shape[0] != x.shape[0]:
            raise ValueError(
                f"context must have shape (batch={x.shape[0]}, seq, context_dim={self.context_dim}), "
                f"got {tuple(context.shape)}"
            )
        if rope is not None and (self.rotary is not None or self.context_dim is not None):
            raise ValueError(
                "rope tables given to a module that has an injected rotary or is cross-attention; "
                "pass tables only to self-attention built with rotary=None"
            )
        b, t = x.shape[:2]
        for name, p in (("q_scale", q_scale), ("input_pos", input_pos)):
            if p is not None and (p.ndim not in (1, 2) or p.shape[-1] != t):
                raise ValueError(f"{name} must have shape (T={t},) or (B, T), got {tuple(p.shape)}")
            if p is not None and p.ndim == 2 and p.shape[0] != b:
                raise ValueError(
                    f"{name} must have shape (T={t},) or (B, T) with B={b}, got {tuple(p.shape)}"
                )
        if input_pos is not None and self.kv_cache is not None and x.shape[1] > self.kv_cache.max_seq_len:
            raise ValueError(
                f"input_pos of {x.shape[1]} positions exceeds max_seq_len={self.kv_cache.max_seq_len}"
            )

    def _backend_for(
        self, x: Tensor, cache: KVCache | RingKVCache | None, mask: Tensor | None, dropout_p: float
    ) -> AttentionBackend:
        """The backend of this call, "auto" and "flex" resolved ("flex" with a cache runs on SDPA).

        "auto" picks FlexAttention where its block sparsity pays: on CUDA, without a cache or dropout, for a
        sliding window or chunks with a padding mask (chunks alone run as causal blocks on SDPA), at a
        power-of-two head dim >= 16 (the Triton kernel's tiles).
        """
        if self.backend == "auto":
            local = self.window is not None or (self.chunk is not None and mask is not None)
            use_flex = (
                local
                and cache is None
                and dropout_p == 0.0
                and x.device.type == "cuda"
                and self.head_dim >= 16
                and self.head_dim & (self.head_dim - 1) == 0
                and flex_available()
            )
            return "flex" if use_flex else "sdpa"
        if self.backend == "flex":
            if cache is not None:
                return "sdpa"
            if dropout_p > 0.0:
                raise ValueError(
                    f"backend='flex' has no dropout (dropout={self.dropout} in training mode); use "
                    "backend='sdpa' or 'auto', or eval mode"
                )
        return self.backend

    def _mask(
        self, user: Tensor | None, input_pos: Tensor | None, t: int, s: int
    ) -> tuple[Tensor | None, bool]:
        """Without a cache: the bool mask for `attention` and the `causal` flag to pass with it.

        Keys sit at 0..S-1 and queries at the last T of them, or for self-attention at `input_pos`.
        """
        if self.window is None and self.chunk is None:
            return user, self.causal  # causality is left to `attention` (SDPA's is_causal where it can)
        if input_pos is not None and self.context_dim is None:
            q_pos = kv_pos = input_pos  # the chunk rule depends on where the sequence starts
        else:
            kv_pos = torch.arange(s, device=self.wq.weight.device)
            # Bottom-right: query i at S - T + i, negative when a context is shorter than x (T > S).
            q_pos = torch.arange(s - t, s, device=kv_pos.device)
        full = attention_mask(q_pos, kv_pos, causal=self.causal, window=self.window, chunk=self.chunk)
        full = full if user is None else full & user
        # Pass causal too although the mask is causal already: `attention` then lets the CPU kernel skip the
        # blocks above the diagonal (twice as fast) where it can. Positions given may not be increasing.
        return full, self.causal and input_pos is None

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        rope: RopeTables | None = None,
        q_scale: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, D), context: (B, S, Dc) for cross-attention -> (B, T, D).

        Args:
            mask: bool, True = may attend: (B, S) key padding, or (B|1, 1|H, T, S). With a cache, S is the
                cache length S_max (positions, whatever the cache's layout).
            input_pos: (T,) or (B, T) integer positions. Without a cache they feed `rotary` and the local
                (window, chunk) masks; plain causality follows index order. With a cache, (T,) consecutive
                positions where the new keys/values are written; attention then spans the cache.
            rope: `RopeTables` for these T positions (`RotaryEmbedding.tables`), computed once per model forward.
            q_scale: (T,) or (B, T) factor on the queries, e.g. `temperature_scale(input_pos)` (Llama 4 NoPE).
        """
        self._check_inputs(x, context, input_pos, rope, q_scale)
        b, t, _ = x.shape
        src = x if context is None else context
        s_in = src.shape[1]
        cache = self.kv_cache if input_pos is not None else None
        dropout_p = self.dropout if self.training else 0.0
        backend = self._backend_for(x, cache, mask, dropout_p)
        if mask is not None:  # with a cache, over positions 0 .. S_max - 1
            _check_mask(mask, b, self.heads, t, s_in if cache is None else cache.max_seq_len, padding=True)
        user = mask if mask is None or mask.ndim == 4 else padding_mask(mask)  # (B|1, 1|H, T|1, S)
        # FlexAttention takes the rules themselves (cached block masks, no (T, S) tensor) where positions are
        # index order; given positions or a 4-D mask, it reads the dense mask built below.
        flex_rules = backend == "flex" and input_pos is None and (mask is None or mask.ndim == 2)
        # Llama 4's chunked layers in training: independent causal blocks, no (T, T) mask (static checks only).
        blocks = (
            backend != "flex"
            and self.chunk is not None
            and self.window is None
            and self.causal
            and mask is None
            and input_pos is None
            and t == s_in
            and t > self.chunk
        )
        full, causal = None, self.causal
        if cache is None and not blocks and not flex_rules:
            # The mask first, before the projections: its transient buffers never coexist with q, k, v.
            full, causal = self._mask(user, input_pos, t, s_in)

        # Head counts come from the projections' widths: under tensor parallelism a rank holds a shard of them
        # (not view(..., -1, Dh), which cannot infer the axis of an empty batch or context).
        def heads(y: Tensor) -> Tensor:  # (B, L, h*Dh) -> (B, h, L, Dh)
            return y.unflatten(-1, (y.shape[-1] // self.head_dim, self.head_dim)).transpose(1, 2)

        q, k, v = heads(self.wq(x)), heads(self.wk(src)), heads(self.wv(src))  # (B, H|Hkv, T|S, Dh)
        if self.qk_norm is not None and not self.qk_norm_after_rope:
            q, k = self.qk_norm(q, k)
        if self.rotary is not None:
            q, k = self.rotary(q, k, input_pos)
        elif rope is not None:
            q, k = rotate_qk(q, k, rope)
        if self.qk_norm is not None and self.qk_norm_after_rope:
            q, k = self.qk_norm(q, k)
        if q_scale is not None:
            scales = q_scale.view(-1, 1, t, 1)  # (B|1, 1, T, 1)
            q = (q.to(torch.promote_types(q.dtype, torch.float32)) * scales).to(q.dtype)

        if cache is not None:
            assert input_pos is not None  # internal: a cache is used only with positions
            k, v, kv_pos = cache.update_with_positions(input_pos, k, v)  # (B, Hkv, S_cache, Dh), (S_cache,)
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache has its own dtype
            # Queries at `input_pos`, keys at the positions the cache holds (an empty slot's is in every
            # query's future, so the causal rule hides it); `user` is over positions, read in slot order.
            full, causal = attention_mask(input_pos, kv_pos, window=self.window, chunk=self.chunk), False
            if user is not None:
                full = full & user.index_select(-1, kv_pos.clamp(max=cache.max_seq_len - 1))
        if flex_rules:
            rules = {"causal": self.causal, "window": self.window, "chunk": self.chunk}
            out = flex_attention(q, k, v, **rules, key_padding_mask=mask, scale=self.scale)
        elif blocks:
            assert self.chunk is not None  # internal: `blocks` implies a chunk
            out = chunked_causal_attention(
                q, k, v, self.chunk, scale=self.scale, dropout_p=dropout_p, backend=backend
            )
        else:
            out = attention(
                q, k, v, full, causal=causal, scale=self.scale, dropout_p=dropout_p, backend=backend
            )  # (B, H, T, Dh)
        return self.wo(out.transpose(1, 2).flatten(2))  # (B, T, H*Dh) -> (B, T, D)

    def extra_repr(self) -> str:
        always = ("dim", "heads", "kv_heads", "head_dim", "causal", "backend")
        where_set = ("context_dim", "window", "chunk", "dropout")
        parts = [f"{n}={getattr(self, n)!r}" for n in always]
        parts += [f"{n}={getattr(self, n)}" for n in where_set if getattr(self, n)]
        if self.qk_norm is not None:
            parts.append(f"qk_norm_after_rope={self.qk_norm_after_rope}")
        return ", ".join(parts)


class SelfAttention(Attention):
    """`Attention` without context: the same arguments except `context_dim` (the name torchtune and x-transformers use)."""

    def __init__(
        self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None, **kwargs: Any
    ) -> None:
        if "context_dim" in kwargs:
            raise TypeError("SelfAttention takes no context_dim; use CrossAttention")
        super().__init__(dim, heads, kv_heads, head_dim, **kwargs)


class CrossAttention(Attention):
    """Attention from x (B, T, D) to a context (B, S, Dc): never causal, no rotary, `context` required."""

    def __init__(
        self,
        dim: int,
        context_dim: int,
        heads: int,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        for banned in ("causal", "rotary", "window", "chunk"):
            if banned in kwargs:
                raise TypeError(f"CrossAttention takes no {banned}")
        super().__init__(dim, heads, kv_heads, head_dim, context_dim=context_dim, **kwargs)

    def forward(  # type: ignore[override]
        self, x: Tensor, context: Tensor, *, mask: Tensor | None = None
    ) -> Tensor:
        """x: (B, T, D), context: (B, S, Dc), mask: (B, S) context padding or (B|1, 1|H, T, S) -> (B, T, D)."""
        return super().forward(x, context, mask=mask)


class FlashAttention(Attention):
    """`Attention` restricted to the fused SDPA kernels (backend="flash"): a clear error where none fits."""

    def __init__(
        self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None, **kwargs: Any
    ) -> None:
        if "backend" in kwargs:
            raise TypeError("FlashAttention fixes backend='flash'")
        super().__init__(dim, heads, kv_heads, head_dim, backend="flash", **kwargs)
