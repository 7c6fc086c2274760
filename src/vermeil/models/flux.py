"""Flux (Black Forest Labs, 2024): a rectified-flow transformer over two token sequences, data and condition.

Module and parameter names are BFL's (`src/flux/model.py`, `modules/layers.py`), so a BFL state dict loads with
`load_state_dict` as it is; `vermeil.interop.diffusers_flux` converts diffusers' `FluxTransformer2DModel`.
In BFL's words the two sequences are `img` and `txt`; here they are `data` (the sequence being generated) and
`cond` (the condition sequence), which may come from different data spaces (sequences, images, point sets).

What this file adds to BFL: `cond_mask` (padded condition tokens take no part in attention as keys; BFL and
diffusers let T5 padding attend: flux #507/#511, diffusers #10194; padded queries still produce finite, ignored
outputs), per-sample ids, and QKNorm and RoPE fused (`norm_rope`).

Order of operations (as BFL): QKNorm (RMS, eps 1e-6, learned `scale`) before RoPE; q/k cast to v's dtype;
sequence order is condition then data (`txt` then `img`); modulation chunks are (shift, scale, gate).
"""

# Shapes: B batch, L = Lc + Ld joint length, Lc condition (BFL txt) tokens, Ld data (BFL img) tokens,
# D hidden size, H heads, Dh head dim, M MLP width, A number of position axes, Cin/Cout data channels,
# Cc condition channels, V pooled vector width (BFL vec_in_dim).

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from vermeil.models.checks import check_fields
from vermeil.models.contract import AttentionLayer, build_preset
from vermeil.nn.attention import attention
from vermeil.nn.modulation import MLPEmbedder, Modulation, ModulationOut
from vermeil.nn.norms import QKNorm
from vermeil.nn.positional import EmbedND, timestep_embedding

__all__ = [
    "PRESETS",
    "DoubleStreamBlock",
    "Flux",
    "FluxParams",
    "FluxSelfAttention",
    "LastLayer",
    "SingleStreamBlock",
    "build_flux",
    "norm_rope",
    "qkv_heads",
    "rope_freqs",
    "rope_matrix",
]

_EPS = 1e-6  # BFL: LayerNorm and QKNorm epsilon
_TIME_DIM = 256  # BFL: width of the sinusoidal timestep / guidance features


@dataclass
class FluxParams:
    """BFL `FluxParams`, validated at construction.

    Args:
        in_channels: Cin, data channels per token (flux-dev: 64 = 16 latent channels x 2 x 2 patch).
        out_channels: Cout, predicted channels per data token.
        vec_in_dim: V, width of the pooled conditioning vector `y` (CLIP-L: 768).
        context_in_dim: Cc, condition channels per token (T5-XXL: 4096).
        hidden_size, num_heads: D and H; D must be divisible by H.
        mlp_ratio: M = int(D * mlp_ratio).
        depth, depth_single_blocks: numbers of double-stream and single-stream blocks.
        axes_dim, theta: RoPE channels per position axis (each even, summing to Dh = D / H) and base.
        qkv_bias: bias on the double blocks' qkv projections (the single blocks always have one, as BFL).
        guidance_embed: embed a guidance scale (guidance-distilled flux-dev); forward then needs `guidance`.
    """

    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool

    def __post_init__(self) -> None:
        self.axes_dim = list(self.axes_dim)
        check_fields(self, skip=("depth", "depth_single_blocks", "theta"))  # checked below: depths may be 0
        for name in ("depth", "depth_single_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(
                f"mlp_ratio={self.mlp_ratio} must give an MLP width int(hidden_size * mlp_ratio) >= 1"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if any(isinstance(a, bool) or not isinstance(a, int) or a <= 0 or a % 2 for a in self.axes_dim):
            raise ValueError(f"axes_dim={self.axes_dim} must be a non-empty list of positive even ints")
        if not self.axes_dim or sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"sum(axes_dim)={sum(self.axes_dim)} (axes_dim={self.axes_dim}) must equal the head dim "
                f"hidden_size // num_heads = {self.hidden_size} // {self.num_heads} = {self.head_dim}"
            )
        if not self.theta > 0:
            raise ValueError(f"theta={self.theta} must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def rope_matrix(cos: Tensor, sin: Tensor) -> Tensor:
    """(cos, sin), each (B, 1, L, Dh/2) -> BFL `EmbedND`'s pe (B, 1, L, Dh/2, 2, 2): the 2x2 rotations
    [[cos, -sin], [sin, cos]] of channel pairs (2p, 2p + 1)."""
    return torch.stack((cos, -sin, sin, cos), dim=-1).unflatten(-1, (2, 2))


def rope_freqs(cos: Tensor, sin: Tensor) -> Tensor:
    """The same rotations as complex numbers cos + i sin: (B, 1, L, Dh/2) complex (Flux's fast `pe`)."""
    return torch.complex(cos, sin)


class _NormRope(torch.autograd.Function):
    """rms_norm(x) * scale, then the interleaved rotation as a complex product over adjacent channel pairs.

    The rotation of pairs (x_2p, x_2p+1) by angle a is (x_2p + i x_2p+1) * e^{ia}: one vectorised complex
    multiply, where BFL's 2x2-matrix broadcast runs an inner loop of length 2 (about 100 times slower on CPU).
    A Function so that the backward is the closed form (multiply by e^{-ia}, the RMSNorm gradient, one reduction
    for the scale) instead of autograd's graph of small ops.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, freqs: Tensor, scale: Tensor, eps: float) -> Tensor:
        # x: (B, L, H, Dh); freqs: (B|1, L, 1, Dh/2) complex; scale: (S, Dh), S = 1 or L
        compute = torch.promote_types(x.dtype, torch.float32)
        freqs = freqs.to(torch.complex128 if compute == torch.float64 else torch.complex64)
        dh = x.shape[-1]
        # r = rsqrt(mean(x^2) + eps): one fused reduction, in float32 or wider
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=compute).square_().div_(dh)
        r = r.add_(eps).rsqrt_()
        u = torch.mul(x, scale.to(compute)[:, None, :]).mul_(r)  # (B, L, H, Dh) normalised, scaled
        y = torch.view_as_real(torch.view_as_complex(u.unflatten(-1, (dh // 2, 2))) * freqs).flatten(-2)
        ctx.save_for_backward(x, freqs, scale, r)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        x, freqs, scale, r = ctx.saved_tensors
        compute, dh = r.dtype, x.shape[-1]
        g = gy.to(compute).contiguous().unflatten(-1, (dh // 2, 2))
        gu = torch.view_as_real(torch.view_as_complex(g) * freqs.conj()).flatten(-2)  # dL/d(scale * n)
        t = gu * x  # (B, L, H, Dh)
        grad_scale = None
        if ctx.needs_input_grad[2]:
            gs = (t * r).sum(dim=(0, 2))  # (L, Dh): sum over batch and heads of gu * n
            grad_scale = (gs if scale.shape[0] != 1 else gs.sum(0, keepdim=True)).to(scale.dtype)
        if not ctx.needs_input_grad[0]:
            return None, None, grad_scale, None
        s = scale.to(compute)[:, None, :]  # (S, 1, Dh)
        gn = gu.mul_(s)  # dL/dn
        # RMSNorm backward: dL/dx = r gn - x r^3 mean(gn * x)
        coef = t.mul_(s).sum(-1, keepdim=True).mul_(r.pow(3)).div_(-dh)  # (B, L, H, 1)
        gx = gn.mul_(r).addcmul_(x, coef)
        return gx.to(x.dtype), None, grad_scale, None


def norm_rope(x: Tensor, freqs: Tensor, scale: Tensor, *, eps: float = _EPS) -> Tensor:
    """Flux's QKNorm (RMS, learned scale) then RoPE, fused: `apply_rope(rms_norm(x) * scale)` in BFL terms.

    x: (B, L, H, Dh) queries or keys (any strides with a contiguous last axis, e.g. a view of a fused qkv);
    freqs: (B|1, L, 1, Dh/2) complex rotations (`rope_freqs(cos, sin)[:, 0, :, None]`); scale: (Dh,) shared by
    all tokens, or (L, Dh) per token (the double blocks' two streams) -> (B, L, H, Dh) contiguous, in x's
    dtype; statistics and rotation in at least float32.
    """
    return _NormRope.apply(x, freqs, scale.reshape(-1, x.shape[-1]), eps)


def qkv_heads(
    qkv: Tensor, heads: int | None = None, *, head_dim: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3 H Dh) in BFL's `(K H Dh)` layout -> q, k, v views, each (B, L, H, Dh).

    Give `heads` or `head_dim`. The blocks give `head_dim`, so that under tensor parallelism, where a rank's
    qkv holds [q; k; v] of its own H/tp heads (`vermeil.distributed`), the same code views its local heads.
    `unbind` rather than indexing: its backward stacks the three gradients in one pass, where three selects
    would each zero-fill a full-size gradient.
    """
    b, seq, width = qkv.shape
    if head_dim is None:
        if heads is None:
            raise ValueError("qkv_heads needs heads or head_dim")
        head_dim = width // (3 * heads)
    return qkv.view(b, seq, 3, -1, head_dim).unbind(2)


def _modulate(x: Tensor, mod: ModulationOut) -> Tensor:
    """(1 + scale) * x + shift in one pass. x: (B, L, D); mod fields (B, 1, D)."""
    return torch.addcmul(mod.shift, x, 1 + mod.scale)


def _attend(
    q: Tensor, k: Tensor, v: Tensor, pe: Tensor, q_scale: Tensor, k_scale: Tensor, mask: Tensor | None
) -> Tensor:
    """QKNorm + RoPE (`norm_rope`), then `attention`. q, k, v: (B, L, H, Dh) views of a fused projection;
    pe: BFL's (B|1, 1, L, Dh/2, 2, 2) (`rope_matrix`) or complex (B|1, 1, L, Dh/2) (`rope_freqs`, what `Flux`
    passes); q_scale, k_scale: (Dh,) or (L, Dh); mask: (B, 1, 1, L) bool keys or None -> (B, L, H * Dh) (no
    copy: the fused CPU kernel writes (B, L, H, Dh))."""
    if not pe.is_complex():
        pe = torch.complex(pe[..., 0, 0], pe[..., 1, 0])  # cos, sin
    rot = pe[:, 0, :, None]  # (B|1, L, 1, Dh/2) complex rotations
    q, k = norm_rope(q, rot, q_scale), norm_rope(k, rot, k_scale)
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2).flatten(2)


def _per_token(txt_scale: Tensor, img_scale: Tensor, l_txt: int, l_img: int) -> Tensor:
    """(Lc + Ld, Dh): the txt norm's scale (Dh,) on the first Lc rows, the img norm's on the rest."""
    return torch.cat((txt_scale.expand(l_txt, -1), img_scale.expand(l_img, -1)))


class FluxSelfAttention(nn.Module):
    """The parameters of BFL's `SelfAttention`, under its names: fused `qkv` Linear in `(K H Dh)` layout, RMS
    `QKNorm` (`norm`, learned scales) and `proj`. The double blocks run one joint attention over both streams
    with them (`_attend`), so this module has no forward of its own. `proj` always has a bias, as BFL.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        self.norm = QKNorm(dim // num_heads, "rms", eps=_EPS, **factory)
        self.proj = nn.Linear(dim, dim, **factory)

    def reset_parameters(self) -> None:
        for module in (self.qkv, self.norm, self.proj):
            module.reset_parameters()


def _mlp(hidden_size: int, mlp_hidden_dim: int, factory: dict[str, Any]) -> nn.Sequential:
    # BFL names: img_mlp.0 / img_mlp.2
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden_dim, bias=True, **factory),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden_dim, hidden_size, bias=True, **factory),
    )


class DoubleStreamBlock(nn.Module):
    """BFL `DoubleStreamBlock` (MM-DiT): separate weights per stream, one joint attention over txt then img."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads, self.hidden_size = num_heads, hidden_size
        self.img_mod = Modulation(hidden_size, double=True, **factory)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_EPS)
        self.img_attn = FluxSelfAttention(hidden_size, num_heads, qkv_bias, **factory)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_EPS)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim, factory)
        self.txt_mod = Modulation(hidden_size, double=True, **factory)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_EPS)
        self.txt_attn = FluxSelfAttention(hidden_size, num_heads, qkv_bias, **factory)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_EPS)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim, factory)

    def reset_parameters(self) -> None:
        for module in (*self.children(), *self.img_mlp, *self.txt_mlp):  # the MLPs are Sequentials
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """img: (B, Ld, D), txt: (B, Lc, D), vec: (B, D), pe: (B|1, 1, Lc + Ld, Dh/2, 2, 2) or complex,
        mask: (B, 1, 1, Lc + Ld) bool (True = key may be attended) or None -> (img, txt), same shapes."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        l_txt, l_img = txt.shape[1], img.shape[1]
        img_qkv = self.img_attn.qkv(_modulate(self.img_norm1(img), img_mod1))  # (B, Ld, 3D)
        txt_qkv = self.txt_attn.qkv(_modulate(self.txt_norm1(txt), txt_mod1))  # (B, Lc, 3D)
        # One joint sequence, txt first: q, k, v (B, L, H, Dh) from the streams' (B, Lc|Ld, H, Dh) views.
        views = [qkv_heads(t, head_dim=self.img_attn.head_dim) for t in (txt_qkv, img_qkv)]
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(*views))
        # Each stream keeps its own QKNorm scale: (L, Dh) per-token tables.
        txt_norm, img_norm = self.txt_attn.norm, self.img_attn.norm
        q_scale = _per_token(txt_norm.query_norm.scale, img_norm.query_norm.scale, l_txt, l_img)
        k_scale = _per_token(txt_norm.key_norm.scale, img_norm.key_norm.scale, l_txt, l_img)
        attn = _attend(q, k, v, pe, q_scale, k_scale, mask)  # (B, L, D)
        txt_attn, img_attn = attn.split((l_txt, l_img), dim=1)  # split: its backward is one cat

        img = torch.addcmul(img, img_mod1.gate, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_mod2.gate, self.img_mlp(_modulate(self.img_norm2(img), img_mod2)))
        txt = torch.addcmul(txt, txt_mod1.gate, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_mod2.gate, self.txt_mlp(_modulate(self.txt_norm2(txt), txt_mod2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """BFL `SingleStreamBlock` (parallel attention and MLP, ViT-22B style) on the joint sequence.

    `linear1` = [q | k | v | mlp-in] (3 D + M outputs), `linear2` maps cat(attention, gelu(mlp)) (D + M) to D.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = self.hidden_dim = hidden_size  # hidden_dim: BFL's name
        self.num_heads, self.mlp_hidden_dim = num_heads, int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim, **factory)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, **factory)
        self.norm = QKNorm(hidden_size // num_heads, "rms", eps=_EPS, **factory)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_EPS)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False, **factory)

    def reset_parameters(self) -> None:
        for module in (self.linear1, self.linear2, self.norm, self.modulation):
            module.reset_parameters()

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, L, D), vec: (B, D), pe: (B|1, 1, L, Dh/2, 2, 2) or complex (B|1, 1, L, Dh/2), mask: (B, 1, 1, L) bool or None -> (B, L, D)."""
        mod, _ = self.modulation(vec)
        h = self.linear1(_modulate(self.pre_norm(x), mod))  # (B, L, 3D + M)
        # Sizes from the width: under tensor parallelism h is this rank's (3D + M) / tp ([q; k; v; mlp] pieces).
        width = h.shape[-1]
        d = width * self.hidden_size // (3 * self.hidden_size + self.mlp_hidden_dim)  # D, or D / tp
        qkv, mlp = h.split((3 * d, width - 3 * d), dim=-1)
        q, k, v = qkv_heads(qkv, head_dim=self.hidden_size // self.num_heads)  # (B, L, H, Dh) views
        attn = _attend(q, k, v, pe, self.norm.query_norm.scale, self.norm.key_norm.scale, mask)  # (B, L, D)
        out = self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))
        return torch.addcmul(x, mod.gate, out)


class LastLayer(nn.Module):
    """BFL `LastLayer`: adaLN (shift, scale) from vec, then a Linear to p x p patches of Cout channels (p = 1
    for sequence data)."""

    def __init__(
        self,
        hidden_size: int,
        patch_size: int,
        out_channels: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True, **factory)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, **factory))

    def reset_parameters(self) -> None:
        self.linear.reset_parameters()
        self.adaLN_modulation[1].reset_parameters()

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """x: (B, L, D), vec: (B, D) -> (B, L, p * p * Cout)."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # BFL order: shift first
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))


class Flux(nn.Module):
    """BFL `Flux`: flow-matching transformer carrying a data sequence, conditioned on a condition sequence.

    Example:
        >>> model = Flux(PRESETS["debug"])
        >>> out = model(data, data_ids, cond, cond_ids, timesteps, y)  # (B, Ld, Cout)
    """

    def __init__(
        self,
        params: FluxParams,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(params, FluxParams):
            raise TypeError(f"params must be a FluxParams, got {type(params).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.config = p = params
        d, h = p.hidden_size, p.num_heads
        self.in_channels, self.out_channels = p.in_channels, p.out_channels
        self.hidden_size, self.num_heads = d, h
        self.pe_embedder = EmbedND(dim=p.head_dim, theta=p.theta, axes_dim=p.axes_dim)
        self.img_in = nn.Linear(p.in_channels, d, bias=True, **factory)
        self.time_in = MLPEmbedder(_TIME_DIM, d, **factory)
        self.vector_in = MLPEmbedder(p.vec_in_dim, d, **factory)
        self.guidance_in = MLPEmbedder(_TIME_DIM, d, **factory) if p.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(p.context_in_dim, d, **factory)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, h, p.mlp_ratio, p.qkv_bias, **factory) for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, h, p.mlp_ratio, **factory) for _ in range(p.depth_single_blocks)
        )
        self.final_layer = LastLayer(d, 1, p.out_channels, **factory)

    @property
    def params(self) -> FluxParams:
        """The config under BFL's name (`Flux.params`); read-only, `.config` is the contract's name."""
        return self.config

    def attention_layers(self) -> list[AttentionLayer]:
        """Every double and single block attends globally over the joint [cond; data] sequence."""
        p = self.config
        return [AttentionLayer(p.hidden_size, None)] * (p.depth + p.depth_single_blocks)

    def reset_parameters(self) -> None:
        """nn.Linear's default init everywhere (BFL trains from it); QKNorm scales to ones."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def _check_inputs(
        self,
        data: Tensor,
        data_ids: Tensor,
        cond: Tensor,
        cond_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None,
        cond_mask: Tensor | None,
    ) -> None:
        p = self.config
        n_axes = len(p.axes_dim)
        if data.ndim != 3 or data.shape[-1] != p.in_channels:
            raise ValueError(f"data must be (B, Ld, in_channels={p.in_channels}), got {tuple(data.shape)}")
        b, l_data = data.shape[:2]
        if b == 0 or l_data == 0:
            raise ValueError(f"data of shape {tuple(data.shape)} is empty: it needs B >= 1 and Ld >= 1")
        # Under autocast the projections cast their inputs; otherwise a dtype other than the weights' fails
        # deep inside the first Linear without naming the input.
        weight_dtype = self.img_in.weight.dtype
        device_type = data.device.type
        autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
        if not autocast:
            for name, x in (("data", data), ("cond", cond), ("y", y)):
                if x.dtype != weight_dtype:
                    raise TypeError(
                        f"{name} has dtype {x.dtype} but the model's parameters are {weight_dtype}: convert the "
                        f"input (`{name}.to({weight_dtype})`) or the model"
                    )
        if cond.ndim != 3 or cond.shape[0] != b or cond.shape[-1] != p.context_in_dim:
            raise ValueError(
                f"cond must be (B={b}, Lc, context_in_dim={p.context_in_dim}), got {tuple(cond.shape)}"
            )
        l_cond = cond.shape[1]
        for name, ids, length in (("data_ids", data_ids, l_data), ("cond_ids", cond_ids, l_cond)):
            if ids.ndim != 3 or ids.shape[0] not in (1, b) or ids.shape[1:] != (length, n_axes):
                raise ValueError(
                    f"{name} must be (B={b} or 1, {length}, n_axes=len(axes_dim)={n_axes}), got {tuple(ids.shape)}"
                )
        if data_ids.shape[0] != cond_ids.shape[0]:
            raise ValueError(
                f"data_ids and cond_ids must have the same batch size, got {data_ids.shape[0]} and {cond_ids.shape[0]}"
            )
        if y.ndim != 2 or y.shape[0] != b or y.shape[1] != p.vec_in_dim:
            raise ValueError(f"y must be (B={b}, vec_in_dim={p.vec_in_dim}), got {tuple(y.shape)}")
        if p.guidance_embed and guidance is None:
            raise ValueError("guidance must be given (a (B,) tensor) when guidance_embed=True")
        if not p.guidance_embed and guidance is not None:
            raise ValueError("guidance was given but params.guidance_embed=False; pass guidance=None")
        for name, t in (("timesteps", timesteps), ("guidance", guidance)):
            if t is not None and (t.ndim != 1 or t.shape[0] != b):
                raise ValueError(f"{name} must be (B,) = ({b},), got {tuple(t.shape)}")
        if cond_mask is not None and (cond_mask.dtype != torch.bool or tuple(cond_mask.shape) != (b, l_cond)):
            raise ValueError(
                f"cond_mask must be a bool (B, Lc) = ({b}, {l_cond}) tensor (True = real token), got "
                f"{cond_mask.dtype} {tuple(cond_mask.shape)}"
            )

    def forward(
        self,
        data: Tensor,
        data_ids: Tensor,
        cond: Tensor,
        cond_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        cond_mask: Tensor | None = None,
    ) -> Tensor:
        """The flow velocity (B, Ld, Cout) of the data tokens (BFL `Flux.forward(img, img_ids, txt, ...)`).

        Args:
            data: (B, Ld, Cin) noisy data tokens (BFL img).
            data_ids: (B, Ld, A) position ids per token (or (1, Ld, A) shared by the batch).
            cond: (B, Lc, Cc) condition tokens (BFL txt). cond_ids: (B, Lc, A) (or (1, Lc, A)).
            timesteps: (B,) flow times in [0, 1] (multiplied by 1000 inside the embedding, as BFL).
            y: (B, V) pooled conditioning vector.
            guidance: (B,) guidance scales; required iff `params.guidance_embed`.
            cond_mask: (B, Lc) bool, True = real condition token; False tokens are never attended to.
        """
        self._check_inputs(data, data_ids, cond, cond_ids, timesteps, y, guidance, cond_mask)
        img = self.img_in(data)
        vec = self.time_in(timestep_embedding(timesteps, _TIME_DIM).to(img.dtype))
        if self.config.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, _TIME_DIM).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(cond)
        l_txt = txt.shape[1]

        cos, sin = self.pe_embedder(torch.cat((cond_ids, data_ids), dim=1))  # (B, 1, L, Dh/2), txt first
        pe = rope_freqs(cos, sin)  # (B, 1, L, Dh/2) complex
        mask = None
        if cond_mask is not None:
            keep_data = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
            mask = torch.cat((cond_mask, keep_data), dim=1)[:, None, None, :]  # (B, 1, 1, L)

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe, mask)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe, mask)
        return self.final_layer(x.split((l_txt, img.shape[1]), dim=1)[1], vec)

    def extra_repr(self) -> str:
        return f"params={self.params}"


def build_flux(preset: str, **overrides: Any) -> Flux:
    """`build_flux("debug", depth=2, device="meta")` (see `contract.build_preset`)."""
    return build_preset(Flux, FluxParams, PRESETS, preset, overrides)


PRESETS: dict[str, FluxParams] = {
    # Tiny odd-ish model for tests and the cross-domain job: Dh = 16 = 4 + 6 + 6.
    "debug": FluxParams(
        in_channels=2,
        out_channels=2,
        vec_in_dim=4,
        context_in_dim=4,
        hidden_size=48,
        mlp_ratio=4.0,
        num_heads=3,
        depth=1,
        depth_single_blocks=2,
        axes_dim=[4, 6, 6],
        theta=10_000,
        qkv_bias=True,
        guidance_embed=False,
    ),
    # BFL util.py configs (build them on the meta device to inspect shapes without 12B parameters).
    "flux-dev": FluxParams(
        in_channels=64,
        out_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=3072,
        mlp_ratio=4.0,
        num_heads=24,
        depth=19,
        depth_single_blocks=38,
        axes_dim=[16, 56, 56],
        theta=10_000,
        qkv_bias=True,
        guidance_embed=True,
    ),
}
# schnell is dev without the guidance embedding (it is timestep-distilled, not guidance-distilled).
PRESETS["flux-schnell"] = replace(PRESETS["flux-dev"], guidance_embed=False)
