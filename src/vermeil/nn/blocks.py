"""Transformer blocks: the pre-norm `TransformerBlock` (Llama layout, optional cross-attention) and PaLM's
`ParallelTransformerBlock` (the API of zetascale's `TransformerBlock`, made to work).

Axis legend: B batch, T query length, S key (context) length, D model dim, Dc context dim, H heads,
Hkv kv heads, Dh head dim, F feed-forward hidden dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.nn.attention import Attention, attention
from vermeil.nn.checks import check_optional_positive_int, check_positive_ints, check_probability
from vermeil.nn.feedforward import FeedForward, GeGLU, SwiGLU, llama_hidden_dim
from vermeil.nn.masks import padding_mask
from vermeil.nn.norms import LayerNorm, RMSNorm
from vermeil.nn.positional import RotaryEmbedding

__all__ = ["ParallelTransformerBlock", "TransformerBlock", "ValueFirstSwiGLU"]

FeedForwardKind = Literal["swiglu", "geglu", "mlp"]
NormKind = Literal["rms", "layer"]
FinetuneModules = Sequence[Callable[[Tensor], Tensor] | None]


class ValueFirstSwiGLU(nn.Module):
    """PaLM's parameter-free SwiGLU, value half first (Meta/HF put the gate first): (..., 2F) -> (..., F)."""

    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class ParallelTransformerBlock(nn.Module):
    """PaLM's parallel attention + feed-forward block, with exactly zetascale's `TransformerBlock` API.

    The published zetascale block (zeta 2.8.8, `zeta/structs/transformer_block.py`, a copy of
    PaLM-rlhf-pytorch's `ParallelTransformerBlock`) cannot be constructed, calls its xPos helper with swapped
    arguments and drops `qk_scale`; tests/nn/test_blocks.py checks this one against a transcription of PaLM's.
    `x + attn(norm(x)) + ff(norm(x))` from one fused bias-free projection, with multi-query attention (one
    key/value head, Shazeer 2019) and half-split rotary (xPos only when `causal`, centred at T // 2).

    PaLM checkpoint keys map as: `norm.gamma` -> `norm.weight` (PaLM's `norm.beta` is a zero buffer: drop it);
    `fused_attn_ff_proj.weight`, `attn_out.weight`, `ff_out.2.weight`, `q_scale`, `k_scale` unchanged;
    `rotary_emb.inv_freq`/`rotary_emb.scale` are recomputed here (drop them); LoRA weights under
    `finetune_modules.<0..3>`.

    Args:
        dim_head: Dh (even).
        heads: H query heads.
        qk_rmsnorm: l2-normalise q and k with learned `q_scale`/`k_scale` (Dh,) and use `qk_scale` (PaLM: 8)
            as the attention scale instead of Dh^-0.5.
        ff_mult: feed-forward hidden size F = ff_mult * D.
        ff_dropout: on the SwiGLU output (training only).
        flash_attn: `attention(..., backend="flash")`: an input no fused kernel serves raises, saying why.
        finetune_modules: default (lora_q, lora_k, lora_v, lora_o), any of them None, registered as
            submodules `finetune_modules.<i>`: lora_q maps D -> H*Dh, lora_k/lora_v D -> Dh, lora_o H*Dh -> D.
        residual: return `x + attn + ff` (True) or PaLM's `attn + ff` (False).
    """

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        causal: bool = True,
        heads: int = 8,
        qk_rmsnorm: bool = False,
        qk_scale: float = 8,
        ff_mult: int = 4,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        use_xpos: bool = True,
        xpos_scale_base: float = 512,
        flash_attn: bool = False,
        *,
        finetune_modules: FinetuneModules | None = None,
        residual: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(dim=dim, dim_head=dim_head, heads=heads)
        if dim_head % 2:
            raise ValueError(f"dim_head={dim_head} must be even (rotary pairs channels)")

        def positive(value: object) -> bool:  # a finite number > 0 (NaN fails every comparison)
            return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf

        if not positive(ff_mult) or (ff_mult * dim) != int(ff_mult * dim):
            raise ValueError(f"ff_mult={ff_mult!r} must be > 0 with ff_mult * dim={dim} an integer")
        for name, value in (("qk_scale", qk_scale), ("xpos_scale_base", xpos_scale_base)):
            if not positive(value):
                raise ValueError(f"{name}={value!r} must be > 0 and finite")
        check_probability("attn_dropout", attn_dropout)
        check_probability("ff_dropout", ff_dropout)
        factory = {"device": device, "dtype": dtype}

        self.dim, self.dim_head, self.heads, self.causal = dim, dim_head, heads, causal
        self.qk_rmsnorm, self.residual, self.flash_attn = qk_rmsnorm, residual, flash_attn
        self.use_xpos = use_xpos and causal  # PaLM: xPos only for causal attention
        self.scale = float(qk_scale) if qk_rmsnorm else dim_head**-0.5
        self.attn_dropout = float(attn_dropout)
        ff_inner = int(ff_mult * dim)
        self.fused_dims = (heads * dim_head, dim_head, dim_head, 2 * ff_inner)

        self.norm = LayerNorm(dim, bias=False, **factory)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False, **factory)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False, **factory)
        self.ff_out = nn.Sequential(
            ValueFirstSwiGLU(), nn.Dropout(ff_dropout), nn.Linear(ff_inner, dim, bias=False, **factory)
        )
        self.q_scale = nn.Parameter(torch.empty(dim_head, **factory)) if qk_rmsnorm else None
        self.k_scale = nn.Parameter(torch.empty(dim_head, **factory)) if qk_rmsnorm else None

        # Keys "0".."3" as PaLM's `finetune_modules.<scope>.<layer>.<0..3>`; None entries are skipped.
        self.finetune_modules = None
        if finetune_modules is not None:
            mods = enumerate(self._check_finetune(finetune_modules, constructor=True))
            self.finetune_modules = nn.ModuleDict({str(i): m for i, m in mods if m is not None})

        self.rotary_emb = RotaryEmbedding(
            dim_head, max_seq_len=256, use_xpos=self.use_xpos, scale_base=xpos_scale_base, device=device
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init for the projections, ones for the gains; rebuilds the rotary tables."""
        for module in (self.norm, self.fused_attn_ff_proj, self.attn_out, self.ff_out[2], self.rotary_emb):
            module.reset_parameters()
        if self.q_scale is not None:
            nn.init.ones_(self.q_scale)
            nn.init.ones_(self.k_scale)

    @staticmethod
    def _check_finetune(mods: FinetuneModules, constructor: bool = False) -> tuple:
        if isinstance(mods, (str, bytes)) or not isinstance(mods, Sequence) or len(mods) != 4:
            raise ValueError(
                f"finetune_modules={mods!r} must be a sequence of 4 (lora_q, lora_k, lora_v, lora_o), "
                "each a module, callable or None"
            )
        for i, m in enumerate(mods):
            if m is not None and not callable(m):
                raise ValueError(f"finetune_modules[{i}]={m!r} must be callable or None")
            if constructor and m is not None and not isinstance(m, nn.Module):
                raise ValueError(
                    f"finetune_modules[{i}]={m!r} must be an nn.Module or None when given to the "
                    "constructor (plain callables may be passed to forward)"
                )
        return tuple(mods)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, finetune_modules: FinetuneModules | None = None
    ) -> Tensor:
        """x: (B, T, D), mask: (B, T) bool key padding (True = keep) -> (B, T, D).

        finetune_modules: (lora_q, lora_k, lora_v, lora_o) for this call, overriding the constructor's.
        """
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x of shape {tuple(x.shape)} must be (B, T, D) with D=dim={self.dim}")
        b, n, _ = x.shape
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, n)):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} and dtype {mask.dtype} must be a bool (B, T)=({b}, {n}) "
                "key-padding mask (True = keep)"
            )
        if finetune_modules is not None:
            lora_q, lora_k, lora_v, lora_o = self._check_finetune(finetune_modules)
        else:  # the stored ones, checked once by the constructor
            stored = self.finetune_modules or {}
            lora_q, lora_k, lora_v, lora_o = (stored[i] if i in stored else None for i in "0123")  # noqa: SIM401

        h = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(h).split(self.fused_dims, dim=-1)
        q, k, v = (t if lora is None else t + lora(h) for t, lora in zip((q, k, v), (lora_q, lora_k, lora_v)))

        q = q.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)  # (B, H, T, Dh)
        k, v = k.unsqueeze(1), v.unsqueeze(1)  # (B, 1, T, Dh): one shared key/value head
        if self.q_scale is not None:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale

        q, k = self.rotary_emb(q, k)  # half-split rotary, xPos (q * s, k / s) when use_xpos

        # `attention` combines the padding mask with causality itself (SDPA's is_causal where it can).
        pad = None if mask is None else padding_mask(mask)  # (B, 1, 1, S)
        dropout_p = self.attn_dropout if self.training else 0.0
        backend = "flash" if self.flash_attn else "sdpa"
        out = attention(
            q, k, v, pad, causal=self.causal, scale=self.scale, dropout_p=dropout_p, backend=backend
        )  # (B, H, T, Dh)
        out = out.transpose(1, 2).flatten(2)  # (B, T, H*Dh), heads merged
        attn = self.attn_out(out)
        if lora_o is not None:
            attn = attn + lora_o(out)
        y = attn + self.ff_out(ff)
        return x + y if self.residual else y

    def extra_repr(self) -> str:
        names = ("dim", "dim_head", "heads", "causal", "qk_rmsnorm", "use_xpos", "flash_attn", "residual")
        return ", ".join(f"{name}={getattr(self, name)}" for name in names)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (Meta Llama layout), with an optional cross-attention sub-layer.

    Submodule names are Meta's; transformers' Llama names map one to one (`convert_llama_weights_to_hf.py`):
    `input_layernorm` -> `attention_norm`, `self_attn.{q,k,v,o}_proj` -> `attention.{wq,wk,wv,wo}`,
    `post_attention_layernorm` -> `ffn_norm`, `mlp.{gate,up,down}_proj` -> `feed_forward.{w1,w3,w2}`
    (half-split rotary there, so no q/k permutation). tests/nn/test_blocks.py checks it against
    transformers' `LlamaDecoderLayer` (GQA, llama3 rope scaling).

    Args:
        hidden_dim: F. None means `llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier)` for the gated
            kinds and 4 * D for "mlp".
        feed_forward: "swiglu" (Llama), "geglu" or "mlp" (GELU MLP, `fc1`/`fc2`).
        norm: "rms" (`RMSNorm`) or "layer" (`LayerNorm`, with a bias when `bias`).
        rotary: an injected `RotaryEmbedding` for the self-attention (None: no positions inside the block).
        qk_norm: None, "rms" or "l2" (`QKNorm` in both attentions).
        cross_attention: add the cross-attention sub-layer; `context_dim` (Dc) None means D.
        dropout: residual dropout on each sub-layer's output (training only).
        bias: biases on every linear (and on LayerNorm).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        hidden_dim: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        feed_forward: FeedForwardKind = "swiglu",
        norm: NormKind = "rms",
        norm_eps: float = 1e-6,
        causal: bool = True,
        rotary: nn.Module | None = None,
        qk_norm: Literal["rms", "l2"] | None = None,
        cross_attention: bool = False,
        context_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(dim=dim)
        check_optional_positive_int("hidden_dim", hidden_dim)
        check_probability("dropout", dropout)
        if context_dim is not None and not cross_attention:
            raise ValueError(f"context_dim={context_dim} needs cross_attention=True")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.causal, self.has_cross_attention = dim, causal, cross_attention

        def make_norm() -> nn.Module:
            match norm:
                case "rms":
                    return RMSNorm(dim, norm_eps, **factory)
                case "layer":
                    return LayerNorm(dim, norm_eps, bias=bias, **factory)
                case _:
                    raise ValueError(f"norm={norm!r} must be 'rms' or 'layer'")

        heads_args, shared = (dim, heads, kv_heads, head_dim), {"qk_norm": qk_norm, "bias": bias, **factory}
        self.attention_norm = make_norm()
        self.attention = Attention(*heads_args, causal=causal, rotary=rotary, **shared)
        if cross_attention:
            self.cross_attention_norm = make_norm()
            context_dim = dim if context_dim is None else context_dim
            self.cross_attention = Attention(*heads_args, context_dim=context_dim, **shared)
        else:
            self.cross_attention_norm = self.cross_attention = None
        self.ffn_norm = make_norm()
        match feed_forward:
            case "swiglu" | "geglu":
                if hidden_dim is None:
                    hidden_dim = llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
                glu = SwiGLU if feed_forward == "swiglu" else GeGLU
                self.feed_forward = glu(dim, hidden_dim, bias=bias, **factory)
            case "mlp":
                hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
                self.feed_forward = FeedForward(dim, hidden_dim, activation="gelu", bias=bias, **factory)
            case _:
                raise ValueError(f"feed_forward={feed_forward!r} must be 'swiglu', 'geglu' or 'mlp'")
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        """Each submodule's own `reset_parameters`, and the injected rotary's tables."""
        # The injected rotary's tables are garbage after meta construction + to_empty.
        for module in (*self.children(), self.attention.rotary):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate the self-attention's static KV cache (`Attention.setup_cache`)."""
        self.attention.setup_cache(batch_size, max_seq_len, dtype=dtype, device=device)

    def reset_cache(self) -> None:
        """Zero the self-attention's KV cache (a new sequence)."""
        self.attention.reset_cache()

    def delete_cache(self) -> None:
        """Drop the KV cache (back to plain forwards)."""
        self.attention.delete_cache()

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, D), context: (B, S, Dc) exactly when the block has cross-attention -> (B, T, D).

        `mask`, `input_pos` go to the self-attention, `context_mask` to the cross-attention (`Attention.forward`).
        """
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x of shape {tuple(x.shape)} must be (B, T, D) with D=dim={self.dim}")
        h = x + self.dropout(self.attention(self.attention_norm(x), mask=mask, input_pos=input_pos))
        if self.cross_attention is not None:
            if context is None:
                raise ValueError("context is required: this block has cross_attention=True")
            h = h + self.dropout(
                self.cross_attention(self.cross_attention_norm(h), context, mask=context_mask)
            )
        elif context is not None or context_mask is not None:
            raise ValueError("context/context_mask given to a block built with cross_attention=False")
        return h + self.dropout(self.feed_forward(self.ffn_norm(h)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, cross_attention={self.has_cross_attention}"
