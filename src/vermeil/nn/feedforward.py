"""Feed-forward layers: the plain MLP and the gated (GLU) family, with Llama's hidden-size rule.

Axis legend: B batch, T length, D model dim, F hidden (feed-forward) dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.nn.checks import check_optional_positive_int, check_positive_ints, check_probability

Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def llama_hidden_dim(
    dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None, hidden_dim: int | None = None
) -> int:
    """Meta Llama's SwiGLU hidden size: 2/3 of `hidden_dim or 4 * dim` (so the gated MLP costs what a 4x
    MLP does), times `ffn_dim_multiplier`, rounded up to `multiple_of`. Llama 3 8B: (4096, 1024, 1.3) -> 14336.
    """
    check_positive_ints(dim=dim, multiple_of=multiple_of)
    check_optional_positive_int("hidden_dim", hidden_dim)
    if ffn_dim_multiplier is not None and not (ffn_dim_multiplier > 0 and math.isfinite(ffn_dim_multiplier)):
        raise ValueError(f"ffn_dim_multiplier={ffn_dim_multiplier!r} must be > 0 and finite")
    h = 4 * dim if hidden_dim is None else hidden_dim
    h = int(2 * h / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    if h <= 0:  # rounding up to multiple_of would keep 0
        raise ValueError(
            f"the Llama rule gives a hidden size of 0 (dim={dim}, hidden_dim={hidden_dim}, "
            f"ffn_dim_multiplier={ffn_dim_multiplier}); give hidden_dim or a larger multiplier"
        )
    return multiple_of * math.ceil(h / multiple_of)


class _MLP(nn.Module):
    """What `FeedForward` and `GLU` share: the argument checks, `act`, `dropout`, the init and the width check."""

    def __init__(self, dim: int, hidden_dim: int, activation: str, dropout: float) -> None:
        super().__init__()
        check_positive_ints(dim=dim, hidden_dim=hidden_dim)
        check_probability("dropout", dropout)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {sorted(_ACTIVATIONS)}")
        self.dim, self.hidden_dim, self.activation = dim, hidden_dim, activation
        self.act = _ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        """nn.Linear's default init for every projection."""
        for child in self.children():
            if isinstance(child, nn.Linear):
                child.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dim={self.dim}, got shape {tuple(x.shape)}")
        return self._mlp(x)

    def _mlp(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class FeedForward(_MLP):
    """Two-layer MLP: `fc2(dropout(act(fc1(x))))`; "gelu_tanh" is Flux's and GPT-2's activation."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        activation: Activation = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, hidden_dim, activation, dropout)
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class GLU(_MLP):
    """Gated MLP (Shazeer, 2020): `w2(dropout(act(w1(x)) * w3(x)))`, F from `llama_hidden_dim` for Llama.

    Meta's names: `w1` gate, `w3` up, `w2` down (transformers' `gate_proj`, `up_proj`, `down_proj`).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        activation: Activation = "silu",
        bias: bool = False,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, hidden_dim, activation, dropout)
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias, **factory)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias, **factory)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias, **factory)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.act(self.w1(x)) * self.w3(x)))


class SwiGLU(GLU):
    """GLU with SiLU gating (PaLM, Llama): `w2(silu(w1 x) * w3 x)`. Arguments: those of `GLU` but `activation`."""

    def __init__(self, dim: int, hidden_dim: int, **kwargs: Any) -> None:
        super().__init__(dim, hidden_dim, activation="silu", **kwargs)


class GeGLU(GLU):
    """GLU with GELU gating (Shazeer, 2020): `w2(gelu(w1 x) * w3 x)`. Arguments: those of `GLU` but `activation`."""

    def __init__(self, dim: int, hidden_dim: int, **kwargs: Any) -> None:
        super().__init__(dim, hidden_dim, activation="gelu", **kwargs)
