"""Positional encodings: RoPE (llama3 scaling, xPos), Llama 4's attention temperature tuning, Flux's N-D RoPE
and the sinusoidal timestep embedding. A model computes its `RopeTables` once per forward and hands them to
every attention layer, as gpt-fast and torchtitan pass `freqs_cis`.

Pairing conventions (the most common silent bug: a checkpoint converted with the wrong one loads without error
and gives wrong scores):
    "half":        channel i is rotated with channel i + Dh/2 (HF `rotate_half`, PaLM, zeta, mamba_ssm MHA).
    "interleaved": channel 2i is rotated with channel 2i + 1 (Meta complex `view_as_complex`, Flux, torchtune,
                   x-transformers 2.x). Both give the same attention scores once the q/k projection rows are
                   permuted as `convert_llama_weights_to_hf.py:permute` does.
"""

# Shapes: B batch, T query length, S key length, D model dim, H heads, Hkv kv heads, Dh head dim,
# L Flux sequence length (txt + img tokens), A number of position axes (Flux `axes_dim`).

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

from vermeil.nn.checks import check_positive_int, tracing

__all__ = [
    "RopePairing",
    "RopeScaling",
    "RopeTables",
    "rope_inv_freq",
    "apply_scaling",
    "rope_cos_sin",
    "apply_rotary",
    "xpos_scale",
    "temperature_scale",
    "rotate_qk",
    "timestep_embedding",
    "RotaryEmbedding",
    "EmbedND",
]

RopePairing = Literal["half", "interleaved"]
_PAIRINGS: tuple[str, ...] = get_args(RopePairing)


def _check_pairing(pairing: str) -> None:
    if pairing not in _PAIRINGS:
        raise ValueError(f"pairing={pairing!r} must be one of {_PAIRINGS}")


def _check_head_dim(head_dim: int) -> None:
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim!r} must be a positive even int (rotary pairs channels)")


@dataclass(frozen=True)
class RopeScaling:
    """llama3 RoPE frequency scaling (Llama 3.1: the defaults; Llama 4 Scout: factor=16, high_freq_factor=1).

    Read the constants from the checkpoint's own config: transformers' `convert_llama_weights_to_hf.py` can
    silently write the Llama 3.1 constants for Scout.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "original_max_seq_len"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not self.low_freq_factor <= self.high_freq_factor:
            raise ValueError(
                f"low_freq_factor={self.low_freq_factor} must be <= high_freq_factor={self.high_freq_factor}"
            )


def rope_inv_freq(
    head_dim: int,
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """(Dh/2,) float32 inverse frequencies `theta ** (-2i / Dh)`, optionally llama3-scaled.

    Same arithmetic as HF `compute_default_rope_parameters` and Meta `precompute_freqs_cis`.
    """
    _check_head_dim(head_dim)
    if not theta > 0:
        raise ValueError(f"theta={theta} must be > 0")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    return inv_freq if scaling is None else apply_scaling(inv_freq, scaling)


def apply_scaling(inv_freq: Tensor, scaling: RopeScaling) -> Tensor:
    """llama3 frequency scaling (Meta `apply_scaling`, HF `_compute_llama3_parameters`): (Dh/2,) -> (Dh/2,).

    Wavelengths below `original_max_seq_len / high_freq_factor` are kept, those above
    `original_max_seq_len / low_freq_factor` divided by `factor`, the band between interpolated. When the
    two factors are equal (Llama 4 Scout) the band is empty and Meta's formula would divide by zero; its
    smoothing weight is then 0 (the limit at the band edge), so no inf/NaN is produced.
    """
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low) if high > low else torch.zeros_like(inv_freq)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """Angles `pos * inv_freq` as (cos, sin). positions: (T,) or (B, T); inv_freq: (Dh/2,).

    Returns: cos, sin, each float32 (T, Dh/2) or (B, T, Dh/2) (positions cast to float32, as HF).
    """
    freqs = positions[..., None].to(torch.float32) * inv_freq.to(device=positions.device, dtype=torch.float32)
    return freqs.cos(), freqs.sin()


def _broadcast_table(t: Tensor, name: str, x: Tensor, last: int) -> Tensor:
    """Give a (T, n), (B, T, n) or (B|1, H|1, T, n) table a head axis to broadcast with x (B, H, T, Dh)."""
    if t.shape[-1] != last:
        raise ValueError(f"{name}.shape[-1]={t.shape[-1]} must equal {last} for x of last dim {x.shape[-1]}")
    match t.ndim:
        case 2 | 4:
            return t
        case 3:
            return t.unsqueeze(-3)  # (B, T, n) -> (B, 1, T, n)
        case _:
            raise ValueError(
                f"{name}.ndim={t.ndim} must be 2 (T, n), 3 (B, T, n) or 4 (B|1, H|1, T, n); "
                f"shape {tuple(t.shape)}"
            )


def apply_rotary(
    x: Tensor, cos: Tensor, sin: Tensor, pairing: RopePairing = "half", *, scale: Tensor | None = None
) -> Tensor:
    """Rotate channel pairs of x (B, H, T, Dh) -> (B, H, T, Dh) in x.dtype, computed in float32 (or float64).

    Args:
        cos, sin: (T, Dh/2) shared by the batch; (B, T, Dh/2) per batch row (a head axis is inserted here);
            or (B|1, H|1, T, Dh/2) used as given (e.g. `EmbedND` output). 2-D tables take any leading dims.
        scale: optional xPos factor (same leading-shape rules, last dim Dh), multiplied after the rotation
            as PaLM does.
    """
    _check_pairing(pairing)
    dh = x.shape[-1]
    if dh % 2:
        raise ValueError(f"x.shape[-1]={dh} must be even for rotary embedding")
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    cos = _broadcast_table(cos, "cos", x, dh // 2).to(compute)
    sin = _broadcast_table(sin, "sin", x, dh // 2).to(compute)
    # "half": (..., 2, Dh/2), the two halves; "interleaved": (..., Dh/2, 2), adjacent (real, imag) pairs.
    axis, pairs = (-2, (2, dh // 2)) if pairing == "half" else (-1, (dh // 2, 2))
    x1, x2 = xf.unflatten(-1, pairs).unbind(axis)
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=axis).flatten(-2)
    if scale is not None:
        out = out * _broadcast_table(scale, "scale", x, dh).to(compute)
    return out.to(x.dtype)


def xpos_scale(
    positions: Tensor,
    head_dim: int,
    scale_base: float = 512.0,
    pairing: RopePairing = "half",
    *,
    center: float = 0.0,
) -> Tensor:
    """xPos (Sun et al. 2022, arXiv:2212.10554) per-channel scale for q; k uses its reciprocal `scale ** -1`.

    `base = (arange(0, Dh, 2) + 0.4 Dh) / (1.4 Dh)` and `scale = base ** ((pos - center) / scale_base)`, as
    PaLM-rlhf-pytorch / zeta. In `q_i . k_j` the factors multiply to `base ** ((i - j) / scale_base)`, so
    `center` cancels; it only moves where the factors are near 1 (overflow).

    positions: (T,) or (B, T) -> (T, Dh) or (B, T, Dh) float32, expanded to Dh per `pairing`.
    """
    _check_pairing(pairing)
    _check_head_dim(head_dim)
    if not scale_base > 0:
        raise ValueError(f"scale_base={scale_base} must be > 0")
    channels = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    base = (channels + 0.4 * head_dim) / (1.4 * head_dim)
    power = (positions.to(torch.float32) - center) / scale_base
    scale = base ** power[..., None]  # (..., T, Dh/2)
    return torch.cat((scale, scale), dim=-1) if pairing == "half" else scale.repeat_interleave(2, dim=-1)


def temperature_scale(positions: Tensor, floor_scale: float = 8192.0, attn_scale: float = 0.1) -> Tensor:
    """Llama 4's attention temperature tuning (arXiv:2501.19399): a float32 factor on the queries by position.

    `log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1`, as Meta's `llama_models/llama4/model.py`
    (NoPE layers) and transformers' `Llama4TextAttention`; 1 below position `floor_scale - 1`.
    positions: (T,) or (B, T) -> the same shape.
    """
    if not floor_scale > 0:
        raise ValueError(f"floor_scale={floor_scale} must be > 0")
    pos = positions.to(torch.float32)
    return torch.log(torch.floor((pos + 1.0) / floor_scale) + 1.0) * attn_scale + 1.0


class RopeTables(NamedTuple):
    """RoPE angles for one forward, shared by the attention layers: cos, sin float32 (T, Dh/2) or (B, T, Dh/2)."""

    cos: Tensor
    sin: Tensor
    pairing: RopePairing = "half"


def rotate_qk(q: Tensor, k: Tensor, rope: RopeTables) -> tuple[Tensor, Tensor]:
    """Rotate q (B, H, T, Dh) and k (B, Hkv, T, Dh) by the same tables; returns the same shapes and dtypes."""
    return apply_rotary(q, *rope), apply_rotary(k, *rope)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal timestep embedding exactly as BFL flux `timestep_embedding` (cos first).

    t: (B,) (Flux: in [0, 1], times `time_factor`) -> (B, dim), float32 or t's floating dtype (as BFL); an odd
    dim gets a zero last column. Equals diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`.
    """
    if t.ndim != 1:
        raise ValueError(f"t.ndim={t.ndim} must be 1 (one timestep per batch row); shape {tuple(t.shape)}")
    check_positive_int("dim", dim)
    if not max_period > 0:
        raise ValueError(f"max_period={max_period} must be > 0")
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, dim/2)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, arXiv:2104.09864) with llama3 scaling and optional xPos.

    The float32 tables `cos_cached`/`sin_cached` (non-persistent) grow on demand for explicit positions on
    the CPU in eager mode (a host read of min/max). On an accelerator and while `tracing()` nothing is
    checked (a device sync per layer per step): positions must lie inside the table, which `reserve(rows)`
    sizes up front (`setup_cache` of `Attention` and of the models call it).

    xPos (`use_xpos=True`, PaLM/zeta): q times `xpos_scale(pos)`, k times its reciprocal, after the rotation.
    With `input_pos=None` the centre is `T // 2` as PaLM (exact parity); with explicit `input_pos` it is 0, so
    cached keys keep their scale. Do not mix the two: with a KV cache pass `input_pos` for the prefill too.
    The factors stay finite in float32 for |pos - centre| up to about 70 * scale_base.

    Args:
        max_seq_len: initial number of table rows.
        scale_base: xPos scale base (PaLM: 512).
        device: `torch.device("meta")` works; then `to_empty` + `reset_parameters`.
    """

    inv_freq: Tensor
    cos_cached: Tensor
    sin_cached: Tensor

    def __init__(
        self,
        head_dim: int,
        *,
        theta: float = 10000.0,
        pairing: RopePairing = "half",
        max_seq_len: int = 2048,
        scaling: RopeScaling | None = None,
        use_xpos: bool = False,
        scale_base: float = 512.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_head_dim(head_dim)  # theta is checked by rope_inv_freq below
        _check_pairing(pairing)
        check_positive_int("max_seq_len", max_seq_len)
        if scaling is not None and not isinstance(scaling, RopeScaling):
            raise TypeError(f"scaling={scaling!r} must be a RopeScaling or None")
        if not scale_base > 0:
            raise ValueError(f"scale_base={scale_base} must be > 0")
        self.head_dim, self.theta, self.pairing, self.scaling = head_dim, float(theta), pairing, scaling
        self.use_xpos, self.scale_base = use_xpos, float(scale_base)
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, device=device), persistent=False)
        rows = torch.empty(max_seq_len, head_dim // 2, device=device)  # (rows, Dh/2), filled below
        self.register_buffer("cos_cached", rows, persistent=False)
        self.register_buffer("sin_cached", rows, persistent=False)
        self.reset_parameters()

    @property
    def max_seq_len(self) -> int:
        """Current number of table rows (grows on demand)."""
        return self.cos_cached.shape[0]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute the buffers (float32) on their device (after meta construction + `to_empty`)."""
        # Assigning to a registered buffer name keeps it a (non-persistent) buffer.
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, device=self.inv_freq.device)
        self._set_rows(self.max_seq_len)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RotaryEmbedding:
        # `model.to(torch.bfloat16)` casts every floating buffer; a bf16 angle table loses ~3 digits at
        # position ~100 (HF recomputes from float32 for the same reason). Rebuild the tables in float32.
        super()._apply(fn, recurse)
        if self.cos_cached.dtype != torch.float32 and not self.cos_cached.is_meta:
            self.reset_parameters()
        return self

    @torch.no_grad()
    def _set_rows(self, rows: int) -> None:
        """cos/sin tables of positions 0 .. rows - 1 from `inv_freq`."""
        positions = torch.arange(rows, device=self.inv_freq.device)
        self.cos_cached, self.sin_cached = rope_cos_sin(positions, self.inv_freq)

    def _grow(self, rows: int) -> None:
        """Rebuild the tables to at least `rows` rows if they are shorter (doubling: growth is amortised)."""
        if rows > self.max_seq_len:
            self._set_rows(max(rows, 2 * self.max_seq_len))

    def reserve(self, rows: int) -> None:
        """Make the tables cover positions 0..rows-1 now, so lookups never need to grow them."""
        self._grow(check_positive_int("rows", rows))

    def _check_positions(self, positions: Tensor) -> None:
        """Eager only: positions must be >= 0; grow the tables to cover the largest one (one host sync)."""
        if positions.numel() == 0:
            return
        lo, hi = torch.stack(torch.aminmax(positions)).tolist()
        if lo < 0:
            raise ValueError(f"positions must be >= 0, got min {lo}")
        self._grow(hi + 1)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: (T,) or (B, T), integer (table) or floating (computed) -> cos, sin float32 (..., Dh/2)."""
        if positions.dtype in (torch.bool, torch.complex64, torch.complex128) or positions.ndim not in (1, 2):
            raise ValueError(
                f"positions must be a (T,) or (B, T) integer or floating tensor, got dtype {positions.dtype} "
                f"and shape {tuple(positions.shape)}"
            )
        if positions.is_floating_point():
            return rope_cos_sin(positions, self.inv_freq)
        if positions.device.type == "cpu" and not tracing():
            self._check_positions(positions)
        return self.cos_cached[positions], self.sin_cached[positions]

    def _first_rows(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin (T, Dh/2) of positions 0..T-1: a slice of the tables, grown (eager) if T exceeds them."""
        if seq_len > self.max_seq_len:  # static shape: a guard under compile, not a data-dependent branch
            if torch.compiler.is_compiling():
                return rope_cos_sin(torch.arange(seq_len, device=device), self.inv_freq)
            self._grow(seq_len)
        return self.cos_cached[:seq_len], self.sin_cached[:seq_len]

    def tables(self, positions: Tensor | None = None, *, seq_len: int | None = None) -> RopeTables:
        """`RopeTables` for (T,) or (B, T) `positions`, or for 0 .. seq_len - 1 (a table slice, no host read)."""
        if self.use_xpos:
            raise ValueError("tables() carries no xPos scale; inject a use_xpos RotaryEmbedding as rotary=")
        if positions is not None:
            return RopeTables(*self.cos_sin(positions), self.pairing)
        if seq_len is None:
            raise ValueError("tables() needs positions or seq_len")
        return RopeTables(*self._first_rows(seq_len, self.inv_freq.device), self.pairing)

    def forward(self, q: Tensor, k: Tensor, input_pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """q: (B, H, T, Dh), k: (B, Hkv, T, Dh) at `input_pos` (T,) or (B, T) (None: 0..T-1) -> same shapes."""
        for name, t in (("q", q), ("k", k)):
            if t.ndim != 4:
                raise ValueError(f"{name}.ndim={t.ndim} must be 4 (B, H, T, Dh); shape {tuple(t.shape)}")
            if t.shape[-1] != self.head_dim:
                raise ValueError(f"{name}.shape[-1]={t.shape[-1]} must equal head_dim={self.head_dim}")
        if q.shape[-2] != k.shape[-2] or q.shape[0] != k.shape[0]:
            raise ValueError(
                f"q (B, H, T, Dh)={tuple(q.shape)} and k (B, Hkv, T, Dh)={tuple(k.shape)} must share B and T"
            )
        seq_len = q.shape[-2]
        if input_pos is None:
            cos, sin = self._first_rows(seq_len, q.device)  # (T, Dh/2)
        else:
            if input_pos.ndim not in (1, 2) or input_pos.shape[-1] != seq_len:
                raise ValueError(
                    f"input_pos.shape={tuple(input_pos.shape)} must be (T,) or (B, T) with T={seq_len}"
                )
            if input_pos.ndim == 2 and input_pos.shape[0] != q.shape[0]:
                raise ValueError(
                    f"input_pos.shape[0]={input_pos.shape[0]} must equal the batch size {q.shape[0]}"
                )
            cos, sin = self.cos_sin(input_pos)  # (T, Dh/2) or (B, T, Dh/2)
        if not self.use_xpos:
            return apply_rotary(q, cos, sin, self.pairing), apply_rotary(k, cos, sin, self.pairing)
        if input_pos is None:
            # PaLM's centre for a full sequence, so a PaLM/zeta comparison is exact.
            positions, center = torch.arange(seq_len, device=q.device), float(seq_len // 2)
        else:
            positions, center = input_pos, 0.0
        scale = xpos_scale(positions, self.head_dim, self.scale_base, self.pairing, center=center)
        q = apply_rotary(q, cos, sin, self.pairing, scale=scale)
        k = apply_rotary(k, cos, sin, self.pairing, scale=scale**-1)
        return q, k

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, theta={self.theta}, pairing={self.pairing!r}, "
            f"max_seq_len={self.max_seq_len}, scaling={self.scaling}, use_xpos={self.use_xpos}"
        )


class EmbedND(nn.Module):
    """Flux's N-axis RoPE (BFL `EmbedND`, diffusers `FluxPosEmbed`): one RoPE per position axis, concatenated.

    Axis a uses `axes_dim[a]` (even) channels of the head dim Dh = sum(axes_dim) (flux-dev: 128 = 16 + 56 + 56);
    angles in float64 as BFL `rope()`, cast to float32. Interleaved pairing: `apply_rotary(x, cos, sin,
    "interleaved")`.
    """

    def __init__(self, dim: int, theta: float, axes_dim: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        given = list(axes_dim)
        try:  # ints (numpy's too), not floats: int(2.5) would silently truncate
            axes_dim = [operator.index(a) for a in given]
        except TypeError:
            axes_dim = []
        if not axes_dim or any(a <= 0 or a % 2 for a in axes_dim):
            raise ValueError(f"axes_dim={given} must be a non-empty list of positive even integers")
        if sum(axes_dim) != dim:
            raise ValueError(f"sum(axes_dim)={sum(axes_dim)} (axes_dim={axes_dim}) must equal dim={dim}")
        if not theta > 0:
            raise ValueError(f"theta={theta} must be > 0")
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids: (B, L, A) positions (int or float) -> (cos, sin), each float32 (B, 1, L, Dh/2)."""
        if ids.ndim != 3 or ids.shape[-1] != len(self.axes_dim):
            raise ValueError(
                f"ids.shape={tuple(ids.shape)} must be (B, L, n_axes) with "
                f"n_axes=len(axes_dim)={len(self.axes_dim)}"
            )
        pos = ids.to(torch.float64)
        angles = []
        for axis, axis_dim in enumerate(self.axes_dim):
            scale = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=ids.device) / axis_dim
            omega = 1.0 / (self.theta**scale)  # (axis_dim/2,)
            angles.append(pos[..., axis, None] * omega)  # (B, L, axis_dim/2)
        angle = torch.cat(angles, dim=-1)  # (B, L, Dh/2), axis blocks in order
        cos, sin = angle.cos().float(), angle.sin().float()
        return cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, L, Dh/2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}, axes_dim={self.axes_dim}"
