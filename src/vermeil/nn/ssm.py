"""The Mamba (S6) mixer block and `_SSMMixer`, the base it shares with `vermeil.nn.mamba2.Mamba2Block`.

`MambaBlock` is state-spaces `mamba_ssm/modules/mamba_simple.py` `Mamba` (Gu & Dao, 2023, arXiv:2312.00752):
same parameter names (mamba_ssm, transformers `MambaMixer` and mambapy state dicts load by name) and init.

Axis legend: B batch, L (or T) length, D d_model, E d_inner = expand * d_model, N d_state, R dt_rank,
K d_conv.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.nn.cache import SSMState
from vermeil.nn.checks import check_optional_positive_int, check_positive_int, check_positive_ints
from vermeil.nn.scan import BACKENDS, _selective_step, selective_scan

__all__ = ["MambaBlock", "MambaState"]

MambaState = SSMState  # conv_state (B, E, K), ssm_state (B, E, N)


def _f32(t: Tensor) -> Tensor:
    """At least float32: the SSM parameters are used in float32 (float64 stays, for gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _CausalDepthwiseConv(torch.autograd.Function):
    """out[:, t] = sum_j hist[:, t + j] * taps[j] (+ bias), with a backward that writes each gradient once.

    Autograd through K slices of `hist` would zero-fill and add K full (B, K - 1 + L, E) gradients; here the
    input gradient is one buffer filled by K shifted multiply-adds.
    """

    @staticmethod
    def forward(ctx, hist: Tensor, taps: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        k = taps.shape[0]
        length = hist.shape[1] - k + 1
        out = hist[:, :length] * taps[0]
        for j in range(1, k):
            out.addcmul_(hist[:, j : j + length], taps[j])
        if bias is not None:
            out += bias
        ctx.save_for_backward(hist, taps)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        hist, taps = ctx.saved_tensors
        k = taps.shape[0]
        length = grad.shape[1]
        grad_hist = torch.empty_like(hist)
        grad_hist[:, : k - 1].zero_()
        if torch.compiler.is_compiling():
            # Dynamo graph-breaks on `out=` into a strided view; Inductor fuses this product into the copy.
            grad_hist[:, k - 1 :].copy_(grad * taps[k - 1])
        else:  # eager: written in place, no (B, L, E) temporary
            torch.mul(grad, taps[k - 1], out=grad_hist[:, k - 1 :])
        for j in range(k - 1):
            grad_hist[:, j : j + length].addcmul_(grad, taps[j])
        grad_taps = torch.stack([(grad * hist[:, j : j + length]).sum((0, 1)) for j in range(k)])
        grad_bias = grad.sum((0, 1)) if ctx.has_bias else None
        return grad_hist, grad_taps, grad_bias


def _causal_depthwise_conv(hist: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.conv1d(hist.mT, weight, bias, groups=E).mT` as K shifted multiply-adds (cuDNN's conv1d on CUDA).

    hist: (B, K - 1 + L, E), the K - 1 inputs before the sequence then the sequence; weight: (E, 1, K);
    bias: (E,) or None -> (B, L, E). Time-major saves the two transposing copies a channels-first conv needs.
    """
    dtype = torch.promote_types(hist.dtype, weight.dtype)
    hist, weight = hist.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if hist.is_cuda:  # cuDNN's depthwise kernel; its (B, E, L) output is handed on as a (B, L, E) view
        return F.conv1d(hist.transpose(1, 2), weight, bias, groups=weight.shape[0]).transpose(1, 2)
    return _CausalDepthwiseConv.apply(hist, weight[:, 0].t(), bias)


def init_dt_bias_(bias: Tensor, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """state-spaces' dt init, in place: dt log-uniform in [dt_min, dt_max], floored at dt_init_floor, and the
    bias its inverse softplus (dt + log(-expm1(-dt)), pytorch#72759), so that softplus(bias) == dt at init."""
    with torch.no_grad():
        u = torch.rand(bias.shape, device=bias.device, dtype=torch.float32)
        log_lo, log_hi = math.log(dt_min), math.log(dt_max)
        dt = torch.exp(u * (log_hi - log_lo) + log_lo).clamp(min=dt_init_floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class _SSMMixer(nn.Module):
    """The decoding cache, state checks, causal conv and `forward` of the Mamba-1 and Mamba-2 blocks.

    A subclass sets `d_model`, `d_conv`, `in_proj`, `conv1d` and `state_shape` (the conv_state and ssm_state
    shapes per sequence) and implements `_mix(x, conv_state, ssm_state, want_state) -> (out, conv, ssm)` and
    `_step(x, conv_state, ssm_state, keep, inplace) -> (out, conv, ssm)`.
    """

    d_model: int
    d_conv: int
    in_proj: nn.Linear
    conv1d: nn.Conv1d
    state_shape: tuple[tuple[int, ...], tuple[int, ...]]
    cache: SSMState | None

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this block) of the parameters marked `_no_weight_decay` (A_log, D, ...)."""
        return {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate the state (`state_shape` per sequence): conv_state in dtype (default in_proj's), ssm_state
        in at least float32 (a float64 model keeps float64, so decoding equals its forward to float64
        rounding). max_seq_len is unused (the state does not grow with length)."""
        check_optional_positive_int("max_seq_len", max_seq_len)
        (channels, d_conv), ssm_shape = self.state_shape
        weight = self.in_proj.weight
        dtype = dtype or weight.dtype
        ssm_dtype = torch.promote_types(dtype, torch.float32)
        kw = {"dtype": dtype, "ssm_dtype": ssm_dtype, "device": device or weight.device}
        self.cache = SSMState(batch_size, channels, d_conv, ssm_shape[-1], ssm_shape=ssm_shape, **kw)

    def reset_cache(self) -> None:
        """Zero the states in place; a no-op without a cache."""
        if self.cache is not None:
            self.cache.reset()

    def delete_cache(self) -> None:
        self.cache = None

    # How many of initial_state's (conv_state, ssm_state) forward checks: Mamba-1 leaves the SSM state to
    # selective_scan, whose own check names it `initial_state`, with both shapes.
    _checked_initial_states = 2

    def _check_states(self, where: str, states: tuple[Tensor, ...], bsz: int) -> None:
        for name, t, shape in zip(("conv_state", "ssm_state"), states, self.state_shape):
            if tuple(t.shape) != (bsz, *shape):
                raise ValueError(f"{where} {name}.shape={tuple(t.shape)} must be {(bsz, *shape)}")

    def _conv(self, xbc: Tensor, conv_state: Tensor | None, want_state: bool) -> tuple[Tensor, Tensor | None]:
        """SiLU(causal conv) of xbc (B, L, C) after conv_state (B, C, K) (zeros if None) -> (B, L, C), and
        if `want_state` the new conv_state (the last K inputs)."""
        if conv_state is None:
            conv_state = xbc.new_zeros(xbc.shape[0], xbc.shape[-1], self.d_conv)
        hist = torch.cat([conv_state.to(xbc.dtype).transpose(1, 2), xbc], dim=1)  # (B, K + L, C)
        new_conv = hist[:, -self.d_conv :].transpose(1, 2) if want_state else None  # (B, C, K) pre-conv
        return F.silu(_causal_depthwise_conv(hist[:, 1:], self.conv1d.weight, self.conv1d.bias)), new_conv

    def _conv_step(
        self, xbc: Tensor, conv_state: Tensor, keep: Tensor, inplace: bool
    ) -> tuple[Tensor, Tensor]:
        """One token xbc (B, C) -> (SiLU(conv) (B, C), the new window (B, C, K), written into conv_state if
        `inplace`). Where `keep` (1|B, 1) is False the old window counts as zeros (a restart)."""
        kept = torch.where(keep.unsqueeze(-1), conv_state[:, :, 1:], 0.0)
        window = torch.cat([kept, xbc.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
        if inplace:
            window = conv_state.copy_(window)
        out = (window.to(xbc.dtype) * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias
        return F.silu(out), window

    def forward(
        self,
        x: Tensor,
        input_pos: Tensor | None = None,
        *,
        initial_state: tuple[Tensor, Tensor] | None = None,
        return_final_state: bool = False,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, D) -> (B, T, D), and the final (conv_state, ssm_state) if `return_final_state`.

        Without `input_pos` the cache is untouched: a plain forward from `initial_state` (zeros if None;
        differentiable, for truncated BPTT; conv_state holds the last K pre-conv inputs, oldest first).
        With a cache and `input_pos` (T,) or (B, T), the states are read from and written back to the cache,
        from zeros where the first position is 0 (no `.item()`). T == 1 runs the recurrent step (CUDA-graph
        capturable; in place without autograd), T > 1 the scan.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x.shape={tuple(x.shape)} must be (B, T, d_model={self.d_model})")
        bsz, length, _ = x.shape
        if initial_state is not None:
            if input_pos is not None:
                raise ValueError("initial_state and input_pos are exclusive: the cache holds the state")
            self._check_states("initial_state", initial_state[: self._checked_initial_states], bsz)
        if input_pos is None:
            conv_state, ssm_state = initial_state if initial_state is not None else (None, None)
            out, conv, ssm = self._mix(x, conv_state, ssm_state, return_final_state)
            return (out, (conv, ssm)) if return_final_state else out  # type: ignore[return-value]

        if self.cache is None:
            raise ValueError("input_pos was given but no cache is set up: call setup_cache(batch_size) first")
        if bsz > self.cache.batch_size:
            raise ValueError(f"batch size {bsz} exceeds the cache's batch_size={self.cache.batch_size}")
        if input_pos.dim() not in (1, 2) or input_pos.shape[-1] != length:
            raise ValueError(
                f"input_pos.shape={tuple(input_pos.shape)} must be (T,) or (B, T) with T={length}"
            )
        if input_pos.dim() == 2 and input_pos.shape[0] not in (1, bsz):
            raise ValueError(f"input_pos.shape[0]={input_pos.shape[0]} must be 1 or the batch size {bsz}")
        cache_conv, cache_ssm = self.cache.conv_state[:bsz], self.cache.ssm_state[:bsz]
        self._check_states("the cache's", (cache_conv, cache_ssm), bsz)  # e.g. one set up for another block
        keep = input_pos.reshape(-1, length)[:, :1] > 0  # (1, 1) or (B, 1)
        if length == 1:
            if not torch.is_grad_enabled():
                out, conv, ssm = self._step(x, cache_conv, cache_ssm, keep, True)
                return (out, (conv.clone(), ssm.clone())) if return_final_state else out
            # with autograd the state product saves its input for backward: a copy, not the cache written below
            out, conv, ssm = self._step(x, cache_conv, cache_ssm.clone(), keep, False)
        else:
            # keep (1|B, 1) viewed as (1|B, 1, ..., 1) over each (B, ...) state
            conv_state, ssm_state = [
                torch.where(keep.view(-1, *(1,) * (t.dim() - 1)), t, 0.0) for t in (cache_conv, cache_ssm)
            ]
            out, conv, ssm = self._mix(x, conv_state, ssm_state, True)
        cache_conv.copy_(conv.detach())
        cache_ssm.copy_(ssm.detach())
        return (out, (conv, ssm)) if return_final_state else out


class MambaBlock(_SSMMixer):
    """Mamba mixer: in_proj -> causal depthwise conv -> SiLU -> selective scan (gated by SiLU(z)) -> out_proj.

    Args:
        d_model, d_state, d_conv: D, N (state size per channel) and K (conv width).
        expand: E = int(expand * d_model) inner channels.
        dt_rank: R, rank of the dt projection; "auto" is ceil(d_model / 16).
        dt_min, dt_max, dt_init_floor: the initial dt is log-uniform in [dt_min, dt_max], floored.
        dt_init, dt_scale: dt_proj.weight ~ U(+-R^-0.5 * dt_scale) ("random") or that constant ("constant").
        conv_bias: bias in conv1d. bias: bias in in_proj and out_proj.
        compile_scan: `selective_scan(..., compile=True)`: a 4-layer d_model 512 stack trains 1.2-1.4x faster
            on a 2-core CPU (bench/mamba.py) after a first compiling call. A plain attribute, as scan_backend.
        scan_backend: `selective_scan`'s `backend` (`vermeil.nn.scan.BACKENDS`).
        device, dtype: of the parameters; A_log and D are always float32 (Mamba's precision rule).
    """

    _checked_initial_states = 1

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: int | None = None,
        compile_scan: bool = False,
        scan_backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(d_model=d_model, d_state=d_state, d_conv=d_conv)
        if isinstance(expand, bool) or not isinstance(expand, (int, float)) or int(expand * d_model) <= 0:
            raise ValueError(f"expand={expand!r} must be a positive number with int(expand * d_model) >= 1")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif isinstance(dt_rank, str):
            raise ValueError(f"dt_rank={dt_rank!r} must be 'auto' or a positive int")
        check_positive_int("dt_rank", dt_rank)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min={dt_min!r} and dt_max={dt_max!r} must satisfy 0 < dt_min <= dt_max")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init={dt_init!r} must be 'random' or 'constant'")
        if dt_init_floor < 0:
            raise ValueError(f"dt_init_floor={dt_init_floor!r} must be >= 0")
        if dt_scale <= 0:
            raise ValueError(f"dt_scale={dt_scale!r} must be > 0")
        if scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend={scan_backend!r} must be one of {BACKENDS}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.compile_scan, self.scan_backend = bool(compile_scan), scan_backend
        self.d_inner, self.dt_rank = int(expand * d_model), dt_rank
        self.state_shape = ((self.d_inner, d_conv), (self.d_inner, d_state))  # conv_state, ssm_state
        self.dt_min, self.dt_max, self.dt_init = dt_min, dt_max, dt_init
        self.dt_scale, self.dt_init_floor, self.layer_idx = dt_scale, dt_init_floor, layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)  # [x, z]: x first
        c = self.d_inner  # depthwise, as state-spaces; the forward runs _causal_depthwise_conv on its weights
        self.conv1d = nn.Conv1d(c, c, d_conv, groups=c, padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, dt_rank + 2 * d_state, bias=False, **factory)  # [dt, B, C]
        self.dt_proj = nn.Linear(dt_rank, self.d_inner, bias=True, **factory)
        # A and D stay float32 whatever dtype is (mamba_ssm README "Precision"; mamba #6, #72)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        # state-spaces' marks, read by its optimizer setup and init code (and vermeil.train's grouping)
        for p in (self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]
        self.cache: SSMState | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """state-spaces init: default Linear/Conv1d init, dt_proj as below, A_log = log(1..N), D = 1."""
        for layer in (self.in_proj, self.conv1d, self.x_proj, self.out_proj):
            layer.reset_parameters()
        with torch.no_grad():
            std = self.dt_rank**-0.5 * self.dt_scale
            if self.dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -std, std)
            init_dt_bias_(self.dt_proj.bias, self.dt_min, self.dt_max, self.dt_init_floor)
            # S4D-real: A = -(1, 2, ..., N) for every channel, stored as its log
            a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(a).expand(self.d_inner, -1))
            self.D.fill_(1.0)

    def _dt_bc(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., E) -> dt (..., E) without its bias (added inside the softplus), B and C (..., N)."""
        dt, b, c = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), b, c

    def _ssm_args(self) -> dict[str, Any]:
        """What both paths pass the scan, in float32: A = -exp(A_log) (E, N), D and the dt bias (E,)."""
        bias = _f32(self.dt_proj.bias)
        return dict(A=-torch.exp(_f32(self.A_log)), D=_f32(self.D), delta_bias=bias, delta_softplus=True)

    def _mix(
        self, x: Tensor, conv_state: Tensor | None, ssm_state: Tensor | None, want_state: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (B, L, D) after the given states -> (out, conv, ssm)."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, E) each
        # (B, L, E) throughout: the scan reads transposed views, and its y comes back (B, L, E)-major
        xs, new_conv = self._conv(xs, conv_state, want_state)
        dt, b, c = self._dt_bc(xs)  # (B, L, E), (B, L, N), (B, L, N)
        u, delta, B, C, z = (t.transpose(1, 2) for t in (xs, dt, b, c, z))  # (B, X, L) views
        scan = dict(compile=self.compile_scan, backend=self.scan_backend, **self._ssm_args())
        result = selective_scan(
            u, delta, B=B, C=C, z=z, initial_state=ssm_state, return_final_state=want_state, **scan
        )
        y, new_ssm = result if want_state else (result, None)
        return self.out_proj(y.transpose(1, 2)), new_conv, new_ssm

    def _step(
        self, x: Tensor, conv_state: Tensor, ssm_state: Tensor, keep: Tensor, inplace: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One token x (B, 1, D) -> (out, conv, ssm), state-spaces `Mamba.step`. keep (1|B, 1): False where
        the sequence restarts (states taken as zeros); inplace: write the states into the given ones."""
        xs, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)  # (B, E) each
        xs, window = self._conv_step(xs, conv_state, keep, inplace)
        dt, b, c = self._dt_bc(xs)
        state = torch.where(keep.unsqueeze(-1), ssm_state, 0.0)
        y, new_ssm = _selective_step(state, xs, dt, B_t=b, C_t=c, z_t=z, **self._ssm_args())
        if inplace:
            new_ssm = ssm_state.copy_(new_ssm)
        return self.out_proj(y).unsqueeze(1), window, new_ssm

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
            f"dt_rank={self.dt_rank}, layer_idx={self.layer_idx}"
        )
