"""The small pieces the shipped Mamba/attention hybrids add to the generic blocks, as thin wrappers around them.

- `InnerNormMambaBlock`: Jamba's Mamba-1 mixer, `MambaBlock` plus RMSNorms on dt, B and C (`dt_layernorm`,
  `b_layernorm`, `c_layernorm`) between `x_proj` and `dt_proj` (transformers `JambaMambaMixer.forward`).
- `PartialRotary`: RoPE on the first `rotary_dim` channels of each head, the rest passed through (transformers
  `BambaAttention` with `partial_rotary_factor`, GPT-NeoX's `rotary_pct`); injected as `Attention(rotary=...)`.
- `SegmentScaledLinear` (defined in `vermeil.nn.mamba2`, re-exported here): Falcon-H1's `mup_vector` over
  Mamba-2's `in_proj` rows.
- `GateScaledSwiGLU`: `SwiGLU` with its gate pre-activation multiplied by a constant (Falcon-H1's
  `mlp_multipliers[0]`, transformers `FalconH1MLP`).

Axis legend: B batch, T length, H heads, Dh head dim, R rotary dim, D d_model, I inner width.
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
    """Jamba's Mamba-1 mixer: `MambaBlock` with RMSNorms on the dt, B and C projections.

    `x_proj(x)` splits into dt (R), B (N), C (N); each goes through its RMSNorm (`dt_layernorm`, `b_layernorm`,
    `c_layernorm`, eps `norm_eps`) before `dt_proj` and the scan, in the whole-sequence path and in the one-token
    step alike. Everything else (parameters, cache, init) is `MambaBlock`'s.

    Args:
        norm_eps: eps of the three norms (transformers `JambaConfig.rms_norm_eps`).
        **kwargs: `MambaBlock`'s arguments.
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
        """x (..., E) -> dt (..., E) without its bias, B and C (..., N), each normalised first."""
        dt, b, c = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, b, c = self.dt_layernorm(dt), self.b_layernorm(b), self.c_layernorm(c)
        return F.linear(dt, self.dt_proj.weight), b, c


class PartialRotary(nn.Module):
    """Half-split RoPE on the first `rotary_dim` channels of each head; channels `rotary_dim..head_dim` pass.

    The frequencies are those of a `rotary_dim`-wide rotary embedding (`theta ** (-2i / rotary_dim)`), as
    transformers computes them for `partial_rotary_factor < 1`. Called like `RotaryEmbedding` by `Attention`.

    Args:
        head_dim: Dh, the full head width (what `Attention` checks against).
        rotary_dim: R, even, 2 <= R <= Dh.
        theta, max_seq_len, device: as `RotaryEmbedding`.
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
    """`w2(silu(w1(x) * gate_multiplier) * w3(x))`: SwiGLU (same keys `w1`, `w3`, `w2`) with a scaled gate.

    Args:
        gate_multiplier: the constant on the gate's pre-activation. **kwargs: `SwiGLU`'s arguments.
    """

    def __init__(self, dim: int, hidden_dim: int, *, gate_multiplier: float = 1.0, **kwargs: Any) -> None:
        super().__init__(dim, hidden_dim, **kwargs)
        self.gate_multiplier = float(gate_multiplier)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.act(self.w1(x) * self.gate_multiplier) * self.w3(x)))

    def extra_repr(self) -> str:
        return f"gate_multiplier={self.gate_multiplier}"
