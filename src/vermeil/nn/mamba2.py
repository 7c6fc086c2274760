"""The Mamba-2 (SSD) mixer block and its gated norm.

`Mamba2Block` is state-spaces `mamba_ssm/modules/mamba2.py` `Mamba2` (Dao & Gu, 2024, arXiv:2405.21060) and
transformers' `Mamba2Mixer` (also Bamba's and Falcon-H1's): same parameter names (`in_proj` rows
`[z | x | B | C | dt]`, `conv1d` over `[x | B | C]`), so their state dicts load by name; mamba_ssm's init.

Axis legend: B batch, L (or T) length, D d_model, I d_inner = expand * d_model, H heads, P head dim
(I = H * P), G groups of B and C, N d_state, K d_conv, conv_dim = I + 2 * G * N.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.nn.cache import SSMState
from vermeil.nn.checks import check_optional_positive_int, check_positive_int, check_positive_ints
from vermeil.nn.norms import rms_norm
from vermeil.nn.ssd import _ssd_step, ssd_scan
from vermeil.nn.ssm import _f32, _SSMMixer, init_dt_bias_

__all__ = ["GatedRMSNorm", "Mamba2Block", "Mamba2State", "SegmentScaledLinear"]

Mamba2State = SSMState  # conv_state (B, conv_dim, K), ssm_state (B, H, P, N)

# Up to this many rows (decoding) a CPU projection runs as `weight @ x.T`: MKL's sgemm on F.linear's
# (M, K) x (K, N)^T form measured 6x slower for 2 rows, 2.7x for 4, 1.3x for 8, alike from 16 (2-core AMD
# EPYC, torch 2.13). Same sums, another summation order.
_FEW_ROWS = 8


def _project(layer: nn.Module, x: Tensor) -> Tensor:
    """layer(x) for x (M, in_features); `weight @ x.T` for a plain hook-free CPU nn.Linear with few rows."""
    if (
        type(layer) is not nn.Linear
        or x.shape[0] > _FEW_ROWS
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or x.dtype != layer.weight.dtype
        or layer._forward_hooks
        or layer._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    ):
        return layer(x)
    if layer.bias is None:
        return (layer.weight @ x.t()).t()
    return torch.addmm(layer.bias[:, None], layer.weight, x.t()).t()


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm: `rms_norm(y * silu(z))` per group of `dim // groups` channels, in float32.

    mamba_ssm `RMSNormGated` and transformers' `MambaRMSNormGated`; the gain `weight` (dim,) is applied before
    the cast back, as mamba_ssm (transformers casts first; alike in float32). `norm_before_gate=True` gives
    `rms_norm(y) * silu(z)` (Falcon-H1's default).
    """

    def __init__(
        self,
        dim: int,
        groups: int = 1,
        eps: float = 1e-5,
        *,
        norm_before_gate: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(dim=dim, groups=groups)
        if dim % groups:
            raise ValueError(f"groups={groups} must divide dim={dim} (one norm per group)")
        self.dim, self.groups, self.eps, self.norm_before_gate = dim, groups, eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: Tensor, z: Tensor | None = None) -> Tensor:
        """y, z: (..., I) -> (..., I) in y.dtype."""
        if y.shape[-1] != self.dim:
            raise ValueError(f"GatedRMSNorm: input of shape {tuple(y.shape)} must have last dim={self.dim}")
        h = _f32(y)
        if z is not None and not self.norm_before_gate:
            h = h * F.silu(_f32(z))
        h = rms_norm(h.unflatten(-1, (self.groups, -1)), None, self.eps).flatten(-2)
        h = h * _f32(self.weight)
        if z is not None and self.norm_before_gate:
            h = h * F.silu(_f32(z))
        return h.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, groups={self.groups}, eps={self.eps}, norm_before_gate={self.norm_before_gate}"


class SegmentScaledLinear(nn.Linear):
    """`nn.Linear` times `multipliers[i]` over output segment i of width `sizes[i]` (a non-persistent buffer
    `scale`). Falcon-H1's `mup_vector` over Mamba-2's `in_proj` rows (transformers `compute_mup_vector`).
    """

    scale: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        sizes: Sequence[int],
        multipliers: Sequence[float],
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if len(sizes) != len(multipliers) or sum(sizes) != out_features:
            raise ValueError(
                f"sizes={list(sizes)} must sum to out_features={out_features}, one per multiplier "
                f"(multipliers={list(multipliers)})"
            )
        self.multipliers = tuple(float(m) for m in multipliers)
        self.sizes = tuple(int(s) for s in sizes)
        self.register_buffer("scale", self._scale(device), persistent=False)

    def _scale(self, device: torch.device | str | None) -> Tensor:
        return torch.tensor(self.multipliers).repeat_interleave(torch.tensor(self.sizes)).to(device=device)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "scale") and not self.scale.is_meta:  # rebuilt after meta construction + to_empty
            self.scale = self._scale(self.scale.device)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, multipliers={self.multipliers}"


class Mamba2Block(_SSMMixer):
    """Mamba-2 mixer: in_proj -> causal depthwise conv over [x|B|C] -> SiLU -> SSD -> gated RMSNorm -> out_proj.

    Args:
        d_model, d_state, d_conv: D, N (per head channel) and K, as `MambaBlock`.
        expand: I = expand * d_model inner channels, unless d_inner is given.
        d_inner: I itself, a multiple of headdim but not necessarily of d_model (Falcon-H1's `mamba_d_ssm`).
        headdim: P (H = I / P heads). ngroups: G groups of B and C, dividing H.
        A_init_range: A ~ U(A_init_range) at init (A_log = log A), as mamba_ssm.
        D_has_hdim: D is (I,) (read as (H, P)) instead of (H,).
        rmsnorm: apply the gated RMSNorm `norm`; False gives `y * silu(z)` and no `norm`.
        norm_before_gate, norm_eps: as `GatedRMSNorm` (transformers' `layer_norm_epsilon`).
        dt_min, dt_max, dt_init_floor: the initial dt is log-uniform in [dt_min, dt_max], floored.
        time_step_limit: (low, high) clamp of dt in the scan (mamba_ssm `dt_limit`; the step does not clamp).
        conv_bias: bias in conv1d. bias: bias in in_proj and out_proj.
        in_proj_multipliers: 5 numbers for the `in_proj` rows `[z, x, B, C, dt]`, making it a
            `SegmentScaledLinear` (Falcon-H1's `ssm_multipliers`).
        chunk_size: Q of the chunked scan (only speed and memory depend on it).
        segment_tokens: on the CPU, a whole-sequence forward runs in pieces of about this many tokens (batch x
            positions, whole chunks) chained by their states, so each piece's activations stay in the CPU
            caches: forward+backward 1.2x faster at L 1024, 1.7x at L 4096 (d_model 512, batch 2, 2-core AMD
            EPYC). None runs one piece; CUDA always does. A plain attribute.
        device, dtype: of the parameters; A_log, D and dt_bias are always float32.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        *,
        d_inner: int | None = None,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        norm_eps: float = 1e-5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        time_step_limit: tuple[float, float] = (0.0, float("inf")),
        conv_bias: bool = True,
        bias: bool = False,
        in_proj_multipliers: Sequence[float] | None = None,
        chunk_size: int = 64,
        segment_tokens: int | None = 1024,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(
            d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups
        )
        check_positive_int("chunk_size", chunk_size)
        check_optional_positive_int("segment_tokens", segment_tokens)
        if d_inner is None:
            d_inner = expand * d_model
        else:
            check_positive_int("d_inner", d_inner)
            expand = d_inner / d_model  # type: ignore[assignment]
        if d_inner % headdim:
            raise ValueError(
                f"headdim={headdim} must divide d_inner = {d_inner} (expand * d_model unless given; heads = "
                "d_inner/headdim)"
            )
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"ngroups={ngroups} must divide nheads = d_inner / headdim = {nheads}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range={A_init_range!r} must satisfy 0 < low <= high")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min={dt_min!r} and dt_max={dt_max!r} must satisfy 0 < dt_min <= dt_max")
        if len(time_step_limit) != 2 or not time_step_limit[0] <= time_step_limit[1]:
            raise ValueError(
                f"time_step_limit={time_step_limit!r} must be a pair (low, high) with low <= high"
            )
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.headdim, self.ngroups, self.d_inner, self.nheads = headdim, ngroups, d_inner, nheads
        self.conv_dim = d_inner + 2 * ngroups * d_state
        self.A_init_range, self.D_has_hdim = tuple(A_init_range), D_has_hdim
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.chunk_size, self.layer_idx = chunk_size, layer_idx
        self.segment_tokens = segment_tokens
        self.state_shape = ((self.conv_dim, d_conv), (nheads, headdim, d_state))  # conv_state, ssm_state

        rows = (d_inner, d_inner, ngroups * d_state, ngroups * d_state, nheads)  # [z | x | B | C | dt]
        if in_proj_multipliers is None:
            self.in_proj = nn.Linear(d_model, sum(rows), bias=bias, **factory)
        else:
            self.in_proj = SegmentScaledLinear(
                d_model, sum(rows), sizes=rows, multipliers=in_proj_multipliers, bias=bias, **factory
            )
        c = self.conv_dim  # depthwise over [x | B | C]
        self.conv1d = nn.Conv1d(c, c, d_conv, groups=c, padding=d_conv - 1, bias=conv_bias, **factory)
        f32 = {"device": device, "dtype": torch.float32}
        self.dt_bias = nn.Parameter(torch.empty(nheads, **f32))
        self.A_log = nn.Parameter(torch.empty(nheads, **f32))
        self.D = nn.Parameter(torch.empty(d_inner if D_has_hdim else nheads, **f32))
        self.norm = (
            GatedRMSNorm(d_inner, ngroups, norm_eps, norm_before_gate=norm_before_gate, **factory)
            if rmsnorm
            else None
        )
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)
        no_decay = [self.dt_bias, self.A_log, self.D] + ([self.norm.weight] if self.norm is not None else [])
        for p in no_decay:
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.cache: SSMState | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba_ssm `Mamba2` init: default Linear/Conv1d, dt_bias, A_log = log U(A_init_range), D = 1."""
        for layer in (self.in_proj, self.conv1d, self.out_proj, self.norm):
            if layer is not None:
                layer.reset_parameters()
        with torch.no_grad():
            init_dt_bias_(self.dt_bias, self.dt_min, self.dt_max, self.dt_init_floor)
            self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(*self.A_init_range)))
            self.D.fill_(1.0)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., 2I+2GN+H) -> z (..., I), xBC (..., conv_dim), dt (..., H)."""
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., conv_dim) after the conv -> x (..., H, P), B and C (..., G, N)."""
        gn = self.ngroups * self.d_state
        xs, b, c = torch.split(xbc, [self.d_inner, gn, gn], -1)
        groups = (self.ngroups, self.d_state)
        return xs.unflatten(-1, (self.nheads, self.headdim)), b.unflatten(-1, groups), c.unflatten(-1, groups)

    def _ssm_args(self) -> dict[str, Any]:
        """What both paths pass the SSD, in float32: A = -exp(A_log) (H,), D (H,) or (H, P), dt_bias (H,)."""
        D = _f32(self.D).view(self.nheads, self.headdim) if self.D_has_hdim else _f32(self.D)
        return dict(A=-torch.exp(_f32(self.A_log)), D=D, dt_bias=_f32(self.dt_bias), dt_softplus=True)

    def _gate_out(self, y: Tensor, z: Tensor, project=None) -> Tensor:
        """Gated norm (or plain SiLU gate) then out_proj (through `project(layer, y)` if given). y, z: (..., I)."""
        if self.norm is not None:
            y = self.norm(y, z)
        else:
            y = (_f32(y) * F.silu(_f32(z))).to(y.dtype)
        y = y.to(self.out_proj.weight.dtype)
        return self.out_proj(y) if project is None else project(self.out_proj, y)

    def _mix(
        self, x: Tensor, conv_state: Tensor | None, ssm_state: Tensor | None, want_state: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (B, L, D) after the given states -> (out, conv, ssm), in pieces of `segment_tokens` on the CPU."""
        bsz, length, _ = x.shape
        piece = length
        if self.segment_tokens is not None and x.device.type == "cpu":
            piece = max(1, self.segment_tokens // (bsz * self.chunk_size)) * self.chunk_size
        if length <= piece:
            return self._mix_piece(x, conv_state, ssm_state, want_state)
        outs = []
        # split, not slicing in a loop: each slice's backward would zero-fill a gradient of all of x
        for xp in torch.split(x, piece, dim=1):
            out, conv_state, ssm_state = self._mix_piece(xp, conv_state, ssm_state, True)
            outs.append(out)
        out = torch.cat(outs, dim=1)
        return (out, conv_state, ssm_state) if want_state else (out, None, None)

    def _mix_piece(
        self, x: Tensor, conv_state: Tensor | None, ssm_state: Tensor | None, want_state: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        z, xbc, dt = self._split(self.in_proj(x))
        xbc, new_conv = self._conv(xbc, conv_state, want_state)  # (B, L, conv_dim)
        xs, b, c = self._split_xbc(xbc)
        result = ssd_scan(
            xs,
            dt,
            B=b,
            C=c,
            chunk_size=self.chunk_size,
            dt_limit=self.time_step_limit,
            initial_state=ssm_state,
            return_final_state=want_state,
            **self._ssm_args(),
        )
        y, new_ssm = result if want_state else (result, None)
        return self._gate_out(y.flatten(-2), z), new_conv, new_ssm

    def _step(
        self, x: Tensor, conv_state: Tensor, ssm_state: Tensor, keep: Tensor, inplace: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One token x (B, 1, D) -> (out, conv, ssm), mamba_ssm `Mamba2.step`; keep and inplace as `MambaBlock`."""
        z, xbc, dt = self._split(_project(self.in_proj, x[:, 0]))
        xbc, window = self._conv_step(xbc, conv_state, keep, inplace)  # (B, conv_dim), (B, conv_dim, K)
        xs, b, c = self._split_xbc(xbc)
        args = self._ssm_args()
        y, ssm_state = _ssd_step(ssm_state, xs, dt, B=b, C=c, z=None, inplace=inplace, keep=keep, **args)
        out = self._gate_out(y.flatten(-2), z, _project)
        return out.unsqueeze(1), window, ssm_state

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
            f"headdim={self.headdim}, ngroups={self.ngroups}, nheads={self.nheads}, chunk_size={self.chunk_size}, "
            f"segment_tokens={self.segment_tokens}, layer_idx={self.layer_idx}"
        )
