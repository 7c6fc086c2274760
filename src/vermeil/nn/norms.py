"""Normalisation layers: RMSNorm, LayerNorm (bias optional) and QKNorm.

Statistics are computed in float32 and the result is cast back to the input dtype before the learned gain is
applied, as in gpt-fast and transformers' `LlamaRMSNorm`; this is what makes bf16 checkpoints reproduce.

Axis legend: B batch, T length, D model dim, H heads, Dh head dim.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.nn.checks import check_positive_int

QKNormKind = Literal["rms", "l2"]


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64, so gradcheck sees the exact function)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """`(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight` over the last axis: (..., D) -> (..., D).

    weight: (D,) gain, or None for a weightless norm (Llama 4's qk "L2Norm").
    """
    x32 = _upcast(x)
    out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if weight is None else out * weight


def _check_eps(eps: Any) -> float:
    """`eps` if it is a finite number >= 0 (a negative one makes rsqrt of a small mean square NaN)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps={eps!r} must be a finite number >= 0")
    return eps


def _check_last_dim(x: Tensor, dim: int, module: str) -> None:
    if x.shape[-1] != dim:
        raise ValueError(f"{module}: input of shape {tuple(x.shape)} must have last dim={dim}")


class RMSNorm(nn.RMSNorm):
    """RMSNorm (Zhang & Sennrich, 2019) with a learned gain `weight` (none when not `elementwise_affine`).

    `nn.RMSNorm`'s parameter and repr; the forward is `rms_norm`, which casts back before the gain as
    transformers' `LlamaRMSNorm` and Meta's Llama `RMSNorm` do (`nn.RMSNorm` casts after it).
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(check_positive_int("dim", dim), _check_eps(eps), elementwise_affine, device, dtype)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D)."""
        _check_last_dim(x, self.dim, "RMSNorm")
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` over the last axis `dim`, with an optional bias (PaLM and the Zeta block use none; Flux not
    even a gain: `elementwise_affine=False`) and an input check that names the module."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        *,
        bias: bool = True,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            check_positive_int("dim", dim), _check_eps(eps), elementwise_affine, bias, device, dtype
        )
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D)."""
        _check_last_dim(x, self.dim, "LayerNorm")
        return super().forward(x)


class _HeadNorm(nn.Module):
    """One half of QKNorm: normalises the head axis and multiplies by a learned `scale` (BFL's key name)."""

    def __init__(self, head_dim: int, kind: QKNormKind, learnable: bool, eps: float, **factory: Any) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.scale = nn.Parameter(torch.ones(head_dim, **factory)) if learnable else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "rms":
            return rms_norm(x, self.scale, self.eps)
        out = F.normalize(_upcast(x), dim=-1, eps=self.eps).to(x.dtype)
        return out if self.scale is None else out * self.scale


class QKNorm(nn.Module):
    """Normalisation of queries and keys over the head axis, with learned `query_norm.scale`, `key_norm.scale`.

    `kind="rms"`: RMSNorm (Flux, before RoPE); with `learnable=False` the weightless norm Llama 4 calls
    `L2Norm` (after RoPE). `kind="l2"`: `F.normalize(x)` times the scale (the Zeta/PaLM block's `qk_rmsnorm`,
    used with a fixed attention scale instead of `Dh^-0.5`).
    """

    def __init__(
        self,
        head_dim: int,
        kind: QKNormKind = "rms",
        *,
        learnable: bool = True,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("head_dim", head_dim)
        _check_eps(eps)
        if kind not in ("rms", "l2"):
            raise ValueError(f"kind={kind!r} must be 'rms' or 'l2'")
        self.head_dim, self.kind = head_dim, kind
        self.query_norm = _HeadNorm(head_dim, kind, learnable, eps, device=device, dtype=dtype)
        self.key_norm = _HeadNorm(head_dim, kind, learnable, eps, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        for scale in self.parameters():  # query_norm.scale, key_norm.scale
            nn.init.ones_(scale)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q: (B, H, T, Dh), k: (B, Hkv, S, Dh) -> the same shapes, normalised over Dh."""
        _check_last_dim(q, self.head_dim, "QKNorm")
        _check_last_dim(k, self.head_dim, "QKNorm")
        return self.query_norm(q), self.key_norm(k)

    def extra_repr(self) -> str:
        return f"{self.head_dim}, kind={self.kind!r}, learnable={self.query_norm.scale is not None}"
