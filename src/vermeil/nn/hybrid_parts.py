"""Thin wrappers of the generic blocks for the shipped Mamba/attention hybrids (Jamba, Bamba, Falcon-H1).

`SegmentScaledLinear` is defined in `vermeil.nn.mamba2` and re-exported here.
Axis legend: B batch, T length, H heads, Dh head dim, R rotary dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.nn.checks import check_positive_ints
from vermeil.nn.feedforward import SwiGLU
from vermeil.nn.mamba2 import SegmentScaledLinear
from vermeil.nn.norms import RMSNorm
from vermeil.nn.positional import RotaryEmbedding
from vermeil.nn.ssm import MambaBlock

__all__ = ["GateScaledSwiGLU", "InnerNormMambaBlock", "PartialRotary", "SegmentScaledLinear"]


class InnerNormMambaBlock(MambaBlock):
    """Jamba's Mamba-1 mixer (transformers `JambaMambaMixer`): `MambaBlock` with RMSNorms `dt_layernorm`,
    `b_layernorm`, `c_layernorm` (eps `norm_eps`) on the dt, B and C splits of `x_proj`, before `dt_proj`.
    """

    def __init__(self, d_model: int, *, norm_eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(d_model, **kwargs)
        factory = {"device": self.in_proj.weight.device, "dtype": self.in_proj.weight.dtype}
        self.dt_layernorm = RMSNorm(self.dt_rank, eps=norm_eps, **factory)
        self.b_layernorm = RMSNorm(self.d_state, eps=norm_eps, **factory)
        self.c_layernorm = RMSNorm(self.d_state, eps=norm_eps, **factory)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for name in ("dt_layernorm", "b_layernorm", "c_layernorm"):
            if hasattr(self, name):  # MambaBlock.__init__ resets before the norms exist
                getattr(self, name).reset_parameters()

    def _dt_bc(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dt, b, c = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, b, c = self.dt_layernorm(dt), self.b_layernorm(b), self.c_layernorm(c)
        return F.linear(dt, self.dt_proj.weight), b, c


class PartialRotary(nn.Module):
    """Half-split RoPE on the first `rotary_dim` (R, even, <= Dh) channels of each head; the rest pass.

    Frequencies of an R-wide rotary embedding, as transformers' `partial_rotary_factor < 1` (Bamba; GPT-NeoX's
    `rotary_pct`). Injected as `Attention(rotary=...)`, called like `RotaryEmbedding`.
    """

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        *,
        theta: float = 10000.0,
        max_seq_len: int = 2048,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(head_dim=head_dim, rotary_dim=rotary_dim)
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim={rotary_dim} must be even and at most head_dim={head_dim}")
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        self.rope = RotaryEmbedding(rotary_dim, theta=theta, max_seq_len=max_seq_len, device=device)

    def reset_parameters(self) -> None:
        self.rope.reset_parameters()

    def reserve(self, rows: int) -> None:
        self.rope.reserve(rows)

    def forward(self, q: Tensor, k: Tensor, input_pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """q (B, H, T, Dh), k (B, Hkv, T, Dh) -> the same, the first R channels rotated."""
        r = self.rotary_dim
        if r == self.head_dim:
            return self.rope(q, k, input_pos)
        q_rot, k_rot = self.rope(q[..., :r], k[..., :r], input_pos)
        return torch.cat([q_rot, q[..., r:]], -1), torch.cat([k_rot, k[..., r:]], -1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}"


class GateScaledSwiGLU(SwiGLU):
    """`w2(silu(w1(x) * gate_multiplier) * w3(x))`: SwiGLU with a scaled gate (Falcon-H1's `mlp_multipliers[0]`,
    transformers `FalconH1MLP`)."""

    def __init__(self, dim: int, hidden_dim: int, *, gate_multiplier: float = 1.0, **kwargs: Any) -> None:
        super().__init__(dim, hidden_dim, **kwargs)
        self.gate_multiplier = float(gate_multiplier)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.act(self.w1(x) * self.gate_multiplier) * self.w3(x)))

    def extra_repr(self) -> str:
        return f"gate_multiplier={self.gate_multiplier}"
