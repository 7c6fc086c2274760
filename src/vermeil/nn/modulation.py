"""Conditioning blocks for diffusion transformers, with the names and math of Black Forest Labs' flux
`modules/layers.py`, so Flux checkpoints load by key; tests/nn/test_modulation.py checks them against a
transcription of BFL and against diffusers.
"""

# Shapes: B batch, T sequence length, D model dim, Din input dim of an embedder, Dc conditioning vector dim.

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.nn.checks import check_positive_ints

__all__ = ["AdaLayerNorm", "MLPEmbedder", "Modulation", "ModulationOut", "modulate"]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """(1 + scale) * x + shift (adaLN, DiT / Flux). x: (B, T, D); shift, scale: (B, 1, D) or broadcastable."""
    return (1 + scale) * x + shift


def _reset_linear(lin: nn.Linear, zero: bool) -> None:
    """Zeros (DiT's adaLN-Zero: the block starts as the identity) or nn.Linear's default init (BFL's)."""
    if zero:
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    else:
        lin.reset_parameters()


class MLPEmbedder(nn.Module):
    """Two-layer SiLU MLP (BFL; Flux `time_in`, `vector_in`, `guidance_in`): (..., Din) -> (..., D). Diffusers'
    `TimestepEmbedding(in_dim, hidden_dim)` with `linear_1 -> in_layer`, `linear_2 -> out_layer`."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(in_dim=in_dim, hidden_dim=hidden_dim)
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True, device=device, dtype=dtype)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """nn.Linear's default init, as BFL."""
        self.in_layer.reset_parameters()
        self.out_layer.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


@dataclass
class ModulationOut:
    """One adaLN modulation: shift, scale and gate, each (B, 1, D) (BFL field order)."""

    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """BFL `Modulation`: lin(silu(vec)) split into (shift, scale, gate), twice when `double` (Flux's double
    blocks: one set for attention, one for the MLP). `zero_init`: DiT's adaLN-Zero (BFL: False)."""

    def __init__(
        self,
        dim: int,
        double: bool,
        *,
        zero_init: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(dim=dim)
        self.dim, self.is_double, self.multiplier, self.zero_init = dim, double, 6 if double else 3, zero_init
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True, device=device, dtype=dtype)
        if zero_init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_linear(self.lin, self.zero_init)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        """vec: (B, D) -> (ModulationOut, ModulationOut or None), fields (B, 1, D)."""
        if vec.dim() != 2 or vec.shape[1] != self.dim:
            raise ValueError(f"vec must be (B, D), got shape {tuple(vec.shape)}: D={self.dim}")
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # multiplier x (B, 1, D)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


class AdaLayerNorm(nn.Module):
    """Flux's `LastLayer` norm: (1 + scale) * LN(x) + shift from `adaLN_modulation(vec)`, chunked (shift, scale)
    (diffusers' `AdaLayerNormContinuous` stores the halves swapped). cond_dim: Dc, None means D."""

    def __init__(
        self,
        dim: int,
        cond_dim: int | None = None,
        *,
        eps: float = 1e-6,
        zero_init: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        cond_dim = dim if cond_dim is None else cond_dim
        check_positive_ints(dim=dim, cond_dim=cond_dim)
        self.dim, self.cond_dim, self.zero_init = dim, cond_dim, zero_init
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(cond_dim, 2 * dim, bias=True, device=device, dtype=dtype)
        )
        if zero_init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_linear(self.adaLN_modulation[1], self.zero_init)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """x: (B, T, D), vec: (B, Dc) -> (B, T, D)."""
        if vec.dim() != 2 or vec.shape[1] != self.cond_dim:
            raise ValueError(f"vec must be (B, Dc), got shape {tuple(vec.shape)}: Dc={self.cond_dim}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, D), got shape {tuple(x.shape)}: D={self.dim}")
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # 2 x (B, D)
        return modulate(self.norm(x), shift[:, None, :], scale[:, None, :])
