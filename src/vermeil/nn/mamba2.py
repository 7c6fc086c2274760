"""The Mamba-2 (SSD) mixer block with mamba_ssm / transformers parameter names, and its decoding cache.

`Mamba2Block` is state-spaces `mamba_ssm.modules.mamba2.Mamba2` (Dao & Gu, 2024, arXiv:2405.21060) and
transformers' `Mamba2Mixer` (also Bamba's and Falcon-H1's mixer): the same parameters (`in_proj` with rows
`[z | x | B | C | dt]`, `conv1d` depthwise over `[x | B | C]` only, `dt_bias`, `A_log`, `D`, gated RMSNorm
`norm`, `out_proj`), so their state dicts load by name; mamba_ssm's initialisation. The scan is
`vermeil.nn.ssd.ssd_scan` (training and prefill, also from a cached state) and `ssd_step` (one token);
tests/nn/test_mamba2.py checks parity with transformers' torch path and cached decoding.

Axis legend: B batch, L (or T) length, D d_model, I d_inner = expand * d_model, H heads, P head dim
(I = H * P), G groups of B and C, N d_state, K d_conv, conv_dim = I + 2 * G * N.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The time-major causal depthwise conv of the Mamba-1 block, with its single-write backward. A private helper
# of vermeil.nn.ssm, imported rather than copied (it fits Mamba-2's conv over [x | B | C] unchanged).
from vermeil.nn.checks import check_positive_int
from vermeil.nn.norms import rms_norm
from vermeil.nn.ssd import _ssd_step, ssd_scan
from vermeil.nn.ssm import _causal_depthwise_conv, _f32

__all__ = ["GatedRMSNorm", "Mamba2Block", "Mamba2State"]

# Up to this many rows (decoding: one row per sequence) a CPU projection runs as `weight @ x.T` instead of
# `F.linear(x, weight)`: MKL's sgemm on the (M, K) x (K, N)^T form was 6x slower than on the (N, K) x (K, M)
# one for 2 rows, 2.7x for 4, 1.3x for 8, alike from 16 on (a 4-layer d_model 512 stack's nine projections
# with cold weights: 0.76 ms instead of 4.5 ms at 2 rows; 2-core AMD EPYC, torch 2.13). Same sums, another
# summation order.
_FEW_ROWS = 8


def _project(layer: nn.Module, x: Tensor) -> Tensor:
    """layer(x) for x (M, in_features); a plain CPU nn.Linear with few rows runs as `weight @ x.T` (above).

    Anything else (a subclass such as a scaled or LoRA-wrapped projection, hooks, CUDA, other dtypes, more
    rows) calls the module as usual.
    """
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
    """Mamba-2's gated RMSNorm over groups: `rms_norm(y * silu(z))` per group of `dim / groups` channels.

    mamba_ssm `RMSNormGated` (`norm_before_gate=False`, the Mamba-2 default) and transformers'
    `MambaRMSNormGated`: the gate is applied in float32 first, then each group of `dim // groups` channels is
    normalised, and the gain (key `weight`, [dim]) is applied in float32 before casting back to y's dtype, as
    mamba_ssm (transformers casts before the gain; the two agree in float32). `norm_before_gate=True` gives
    `rms_norm(y) * silu(z)` (Falcon-H1's default).

    Args:
        dim: I, the normalised width. groups: G, dim must be a multiple of it. eps: as RMSNorm.
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
        check_positive_int("dim", dim)
        check_positive_int("groups", groups)
        if dim % groups:
            raise ValueError(
                f"groups={groups} must divide dim={dim} (the norm runs over groups of dim/groups)"
            )
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


class Mamba2State(nn.Module):
    """Decoding state of a Mamba-2 block: a plain container of two static buffers (non-persistent).

    Attributes:
        conv_state: (B, conv_dim, K), the last K pre-conv `[x | B | C]` columns, oldest first, in `dtype`.
        ssm_state: (B, H, P, N), in float32 by default (also in a bf16 model, as mamba_ssm and transformers).
    """

    conv_state: Tensor
    ssm_state: Tensor

    def __init__(
        self,
        batch_size: int,
        conv_dim: int,
        d_conv: int,
        nheads: int,
        headdim: int,
        d_state: int,
        *,
        dtype: torch.dtype | None = None,
        ssm_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        self.batch_size = batch_size
        conv = torch.zeros(batch_size, conv_dim, d_conv, dtype=dtype, device=device)
        ssm = torch.zeros(batch_size, nheads, headdim, d_state, dtype=ssm_dtype, device=device)
        self.register_buffer("conv_state", conv, persistent=False)
        self.register_buffer("ssm_state", ssm, persistent=False)

    def reset(self) -> None:
        """Zero both states in place."""
        self.conv_state.zero_()
        self.ssm_state.zero_()

    def extra_repr(self) -> str:
        return f"conv_state={tuple(self.conv_state.shape)}, ssm_state={tuple(self.ssm_state.shape)}"


class Mamba2Block(nn.Module):
    """Mamba-2 mixer: in_proj -> causal depthwise conv over [x|B|C] -> SiLU -> SSD -> gated RMSNorm -> out_proj.

    Args:
        d_model: D, input and output width.
        d_state: N, state size per head channel (mamba_ssm default 128).
        d_conv: K, width of the causal depthwise convolution.
        expand: I = expand * d_model inner channels.
        headdim: P; I must be a multiple of it (H = I / P heads).
        ngroups: G groups of B and C; must divide H (head h reads group h // (H / G)).
        A_init_range: A is drawn uniform in this range at init (A_log = log A), as mamba_ssm.
        D_has_hdim: D is (I,) (one skip per channel, read as (H, P)) instead of (H,).
        rmsnorm: apply the gated RMSNorm (`norm`); False gives `y * silu(z)` with no `norm` parameter.
        norm_before_gate: `rms_norm(y) * silu(z)` instead of `rms_norm(y * silu(z))` (mamba_ssm False).
        norm_eps: eps of the gated norm (mamba_ssm fixes 1e-5; transformers' `layer_norm_epsilon`).
        dt_min, dt_max, dt_init_floor: the initial dt is log-uniform in [dt_min, dt_max], floored.
        time_step_limit: (low, high) clamp of dt in the whole-sequence scan (mamba_ssm `dt_limit`). The
            one-token step does not clamp, as mamba_ssm and transformers.
        conv_bias: bias in conv1d. bias: bias in in_proj and out_proj.
        chunk_size: Q of the chunked scan (only speed and memory depend on it).
        segment_tokens: on the CPU, a whole-sequence forward runs in pieces of about this many tokens
            (batch x positions; a multiple of chunk_size positions, at least one chunk), each piece starting
            from the states the previous one ended with: the same function and gradients (the split-sequence
            property), but each piece's activations stay in the CPU caches between the layer's ops. Measured
            1.2x faster forward+backward at L 1024 and 1.7x at L 4096 with 1024 (a d_model 512 block, batch
            2, one thread of a 2-core AMD EPYC); on both threads, a 4-layer stack at L 4096: 1.33x (2048
            alike, 4096 1.24x). None runs one piece; CUDA always does. A plain attribute.
        layer_idx: index of the block in its model (informational).
        device, dtype: of the parameters; A_log, D and dt_bias are always float32.

    Raises:
        ValueError: on a bad argument, naming it and its value.
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
        chunk_size: int = 64,
        segment_tokens: int | None = 1024,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("d_state", d_state),
            ("d_conv", d_conv),
            ("expand", expand),
            ("headdim", headdim),
            ("ngroups", ngroups),
            ("chunk_size", chunk_size),
        ):
            check_positive_int(name, value)
        if segment_tokens is not None:
            check_positive_int("segment_tokens", segment_tokens)
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(
                f"headdim={headdim} must divide d_inner = expand * d_model = {d_inner} (heads = d_inner/headdim)"
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

        # rows [z I | x I | B GN | C GN | dt H]
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            d_conv,
            groups=self.conv_dim,
            padding=d_conv - 1,
            bias=conv_bias,
            **factory,
        )
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
        # mamba_ssm's marks, read by vermeil.train's optimizer grouping (and mamba_ssm's own setup)
        no_decay = [self.dt_bias, self.A_log, self.D] + ([self.norm.weight] if self.norm is not None else [])
        for p in no_decay:
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.cache: Mamba2State | None = None
        self.reset_parameters()

    @staticmethod
    def no_weight_decay() -> set[str]:
        """Names (relative to this block) of parameters that must not get weight decay."""
        return {"dt_bias", "A_log", "D", "norm.weight"}

    def reset_parameters(self) -> None:
        """mamba_ssm `Mamba2` init: default Linear/Conv1d, dt_bias, A_log = log U(A_init_range), D = 1."""
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        self.out_proj.reset_parameters()
        if self.norm is not None:
            self.norm.reset_parameters()
        with torch.no_grad():
            # dt log-uniform in [dt_min, dt_max], floored; dt_bias is its inverse softplus (pytorch#72759)
            log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
            u = torch.rand(self.nheads, device=self.dt_bias.device, dtype=torch.float32)
            dt = torch.exp(u * (log_hi - log_lo) + log_lo).clamp(min=self.dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(*self.A_init_range)))
            self.D.fill_(1.0)

    # -- cache ------------------------------------------------------------------------------------------

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate the decoding state: conv_state (B, conv_dim, K) in dtype, ssm_state (B, H, P, N) in float32.

        max_seq_len is accepted for the shared cache API and unused: the state does not grow with length.
        dtype and device default to those of in_proj.weight.
        """
        check_positive_int("batch_size", batch_size)
        if max_seq_len is not None:
            check_positive_int("max_seq_len", max_seq_len)
        self.cache = Mamba2State(
            batch_size,
            self.conv_dim,
            self.d_conv,
            self.nheads,
            self.headdim,
            self.d_state,
            dtype=dtype or self.in_proj.weight.dtype,
            device=device or self.in_proj.weight.device,
        )

    def reset_cache(self) -> None:
        """Zero the states in place (start a new sequence); a no-op without a cache."""
        if self.cache is not None:
            self.cache.reset()

    def delete_cache(self) -> None:
        """Drop the cache, returning to plain (training) forwards."""
        self.cache = None

    # -- forward ----------------------------------------------------------------------------------------

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., 2I+2GN+H) -> z (..., I), xBC (..., conv_dim), dt (..., H)."""
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _ssm_args(self) -> dict:
        d = _f32(self.D)
        return {
            "D": d.view(self.nheads, self.headdim) if self.D_has_hdim else d,
            "dt_bias": _f32(self.dt_bias),
            "dt_softplus": True,
        }

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
        """Whole-sequence path. x: (B, L, D). States, if given, are those before x. Returns (out, conv, ssm).

        On the CPU a long sequence runs in pieces of `segment_tokens` tokens chained by their states.
        """
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
        """`_mix` of one piece."""
        bsz, length, _ = x.shape
        z, xbc, dt = self._split(self.in_proj(x))
        if conv_state is None:
            conv_state = xbc.new_zeros(bsz, self.conv_dim, self.d_conv)
        # the conv sees the last K - 1 pre-conv columns before x, then x; all (B, L, conv_dim)-major
        hist = torch.cat([conv_state.to(xbc.dtype).transpose(1, 2), xbc], dim=1)  # (B, K + L, conv_dim)
        new_conv = hist[:, -self.d_conv :].transpose(1, 2) if want_state else None  # (B, conv_dim, K)
        xbc = F.silu(_causal_depthwise_conv(hist[:, 1:], self.conv1d.weight, self.conv1d.bias))
        xs, b, c = torch.split(
            xbc, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1
        )
        result = ssd_scan(
            xs.unflatten(-1, (self.nheads, self.headdim)),
            dt,
            -torch.exp(_f32(self.A_log)),
            b.unflatten(-1, (self.ngroups, self.d_state)),
            c.unflatten(-1, (self.ngroups, self.d_state)),
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
        """One token, mamba_ssm `Mamba2.step` semantics. x: (B, 1, D). Returns (out, conv, ssm).

        conv_state, ssm_state: the states before the token; keep (1|B, 1) bool: False where the sequence
        restarts (the states are then taken as zeros). inplace: write the new states into conv_state and
        ssm_state (the cache) and return them (no autograd through them); otherwise return new tensors.
        """
        z, xbc, dt = self._split(_project(self.in_proj, x[:, 0]))
        # the conv window after this token: the last K - 1 columns (zeros on a restart), then the new one
        window = torch.cat(
            [
                torch.where(keep.unsqueeze(-1), conv_state[:, :, 1:], 0.0),
                xbc.unsqueeze(-1).to(conv_state.dtype),
            ],
            dim=-1,
        )
        if inplace:
            window = conv_state.copy_(window)
        xbc = (window.to(xbc.dtype) * self.conv1d.weight[:, 0]).sum(-1)  # (B, conv_dim)
        if self.conv1d.bias is not None:
            xbc = xbc + self.conv1d.bias
        xbc = F.silu(xbc)
        xs, b, c = torch.split(
            xbc, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1
        )
        args = self._ssm_args()
        y, ssm_state = _ssd_step(
            ssm_state,
            xs.unflatten(-1, (self.nheads, self.headdim)),
            dt,
            -torch.exp(_f32(self.A_log)),
            b.unflatten(-1, (self.ngroups, self.d_state)),
            c.unflatten(-1, (self.ngroups, self.d_state)),
            args["D"],
            None,
            args["dt_bias"],
            True,
            inplace=inplace,
            keep=keep,
        )
        out = self._gate_out(y.flatten(-2), z, _project)
        return out.unsqueeze(1), window, ssm_state

    def forward(
        self,
        x: Tensor,
        input_pos: Tensor | None = None,
        *,
        initial_state: tuple[Tensor, Tensor] | None = None,
        return_final_state: bool = False,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        """Mix a sequence; with a cache and `input_pos`, continue (or start) a cached sequence.

        Without `input_pos` the cache is not touched: a plain forward from `initial_state` (zeros if None).
        With a cache (`setup_cache`) and `input_pos` (T,) or (B, T), the states are read from and written back
        to the cache. The block continues from the cached state unless the first position is 0, where it
        starts from zeros (decided by tensor arithmetic, no `.item()`). The path is chosen by the static
        length T: T == 1 runs the recurrent step (`ssd_step`, O(1) per token, CUDA-graph capturable); T > 1
        runs the chunked scan from the cached state and stores the final one (prefill, or chunked prefill).
        Under `torch.no_grad()` / `inference_mode()` the step updates the cache tensors in place (the
        returned final states, if asked for, are copies); with autograd on it is functional, as before.

        Args:
            x: (B, T, D).
            input_pos: positions of the T tokens; requires `setup_cache` first.
            initial_state: (conv_state (B, conv_dim, K), ssm_state (B, H, P, N)) before x, differentiable
                (truncated BPTT: pass the final state of the previous piece). conv_state holds the last K
                pre-conv `[x | B | C]` columns, oldest first. Not allowed together with input_pos.
            return_final_state: also return (conv_state, ssm_state) after x.

        Returns:
            (B, T, D), and the final (conv_state, ssm_state) if `return_final_state`.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x.shape={tuple(x.shape)} must be (B, T, d_model={self.d_model})")
        bsz, length, _ = x.shape
        if initial_state is not None:
            if input_pos is not None:
                raise ValueError("initial_state and input_pos are exclusive: the cache holds the state")
            conv_state, ssm_state = initial_state
            expected = (
                ("conv_state", conv_state, (bsz, self.conv_dim, self.d_conv)),
                ("ssm_state", ssm_state, (bsz, self.nheads, self.headdim, self.d_state)),
            )
            for name, t, shape in expected:
                if tuple(t.shape) != shape:
                    raise ValueError(f"initial_state {name}.shape={tuple(t.shape)} must be {shape}")
        if input_pos is None:
            conv_state, ssm_state = initial_state if initial_state is not None else (None, None)
            out, conv, ssm = self._mix(x, conv_state, ssm_state, return_final_state)
            return (out, (conv, ssm)) if return_final_state else out  # type: ignore[return-value]

        if self.cache is None:
            raise ValueError("input_pos was given but no cache is set up: call setup_cache(batch_size) first")
        if bsz > self.cache.batch_size:
            raise ValueError(f"batch size {bsz} exceeds the cache's batch_size={self.cache.batch_size}")
        if input_pos.shape[-1] != length:
            raise ValueError(f"input_pos.shape={tuple(input_pos.shape)} must end in T={length}")
        cache_conv, cache_ssm = self.cache.conv_state[:bsz], self.cache.ssm_state[:bsz]
        # zero the carried state where the sequence starts at position 0 (no host sync)
        keep = input_pos.reshape(-1, length)[:, :1] > 0  # (1, 1) or (B, 1)
        if length == 1:
            # without autograd the step updates the cache in place: no copies of the (B, H, P, N) state
            if not torch.is_grad_enabled():
                out, conv, ssm = self._step(x, cache_conv, cache_ssm, keep, True)
                return (out, (conv.clone(), ssm.clone())) if return_final_state else out
            # with autograd the state product saves its input for backward: a copy, not the cache written below
            out, conv, ssm = self._step(x, cache_conv, cache_ssm.clone(), keep, False)
        else:
            keep = keep.unsqueeze(-1)  # (1|B, 1, 1)
            conv_state = torch.where(keep, cache_conv, 0.0)
            ssm_state = torch.where(keep.unsqueeze(-1), cache_ssm, 0.0)
            out, conv, ssm = self._mix(x, conv_state, ssm_state, True)
        cache_conv.copy_(conv.detach())
        cache_ssm.copy_(ssm.detach())
        return (out, (conv, ssm)) if return_final_state else out

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
            f"headdim={self.headdim}, ngroups={self.ngroups}, nheads={self.nheads}, chunk_size={self.chunk_size}, "
            f"segment_tokens={self.segment_tokens}, layer_idx={self.layer_idx}"
        )
