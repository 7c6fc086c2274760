"""Tests for vermeil.models.flux: an inline transcription of Black Forest Labs' flux (layers.py, math.py, model.py
at 802fb47, einops replaced by reshapes) loads our state dict by name and gives the same outputs; cond_mask
padding invariance; the seed's usage example; presets on meta; gradcheck; input errors."""

# Shapes: B batch, L = Lc + Ld joint length, Lc condition (txt) tokens, Ld data (img) tokens, D hidden,
# H heads, Dh head dim, A position axes.

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

from vermeil.models.flux import (
    PRESETS,
    DoubleStreamBlock,
    Flux,
    FluxParams,
    SingleStreamBlock,
    build_flux,
    norm_rope,
    qkv_heads,
    rope_freqs,
    rope_matrix,
)
from vermeil.nn.norms import rms_norm
from vermeil.nn.positional import EmbedND, apply_rotary

# ------------------------------------------------------------------------- BFL reference, transcribed inline


def bfl_rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.unflatten(-1, (2, 2)).float()  # "b n d (i j) -> b n d i j"


def _f32(x: Tensor) -> Tensor:
    """BFL's `.float()`, except that float64 stays float64 so the float64 tests compare exact functions."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def bfl_apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    xq_ = _f32(xq).reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = _f32(xk).reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def bfl_attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    q, k = bfl_apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)  # "B H L D -> B L (H D)"


def bfl_timestep_embedding(
    t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0
) -> Tensor:
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
        t.device
    )
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if torch.is_floating_point(t):
        embedding = embedding.to(t)
    return embedding


class BflEmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        n_axes = ids.shape[-1]
        emb = torch.cat([bfl_rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(n_axes)], dim=-3)
        return emb.unsqueeze(1)


class BflMLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class BflRMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = _f32(x)
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class BflQKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = BflRMSNorm(dim)
        self.key_norm = BflRMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class BflSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = BflQKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


def _kbhld(qkv: Tensor, heads: int) -> Tensor:
    """ "B L (K H D) -> K B H L D" """
    b, seq, _ = qkv.shape
    return qkv.view(b, seq, 3, heads, -1).permute(2, 0, 3, 1, 4)


class BflModulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return tuple(out[:3]), tuple(out[3:]) if self.is_double else None


class BflDoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = BflModulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = BflSelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden_dim, hidden_size),
        )
        self.txt_mod = BflModulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = BflSelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden_dim, hidden_size),
        )

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        (i_shift1, i_scale1, i_gate1), (i_shift2, i_scale2, i_gate2) = self.img_mod(vec)
        (t_shift1, t_scale1, t_gate1), (t_shift2, t_scale2, t_gate2) = self.txt_mod(vec)
        img_modulated = (1 + i_scale1) * self.img_norm1(img) + i_shift1
        img_q, img_k, img_v = _kbhld(self.img_attn.qkv(img_modulated), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_modulated = (1 + t_scale1) * self.txt_norm1(txt) + t_shift1
        txt_q, txt_k, txt_v = _kbhld(self.txt_attn.qkv(txt_modulated), self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = bfl_attention(q, k, v, pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp((1 + i_scale2) * self.img_norm2(img) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp((1 + t_scale2) * self.txt_norm2(txt) + t_shift2)
        return img, txt


class BflSingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = BflQKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = BflModulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        (shift, scale, gate), _ = self.modulation(vec)
        x_mod = (1 + scale) * self.pre_norm(x) + shift
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = _kbhld(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = bfl_attention(q, k, v, pe=pe)
        output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))
        return x + gate * output


class BflLastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


class BflFlux(nn.Module):
    def __init__(self, p: FluxParams):
        super().__init__()
        self.params = p
        self.hidden_size = p.hidden_size
        pe_dim = p.hidden_size // p.num_heads
        self.pe_embedder = BflEmbedND(dim=pe_dim, theta=p.theta, axes_dim=p.axes_dim)
        self.img_in = nn.Linear(p.in_channels, p.hidden_size, bias=True)
        self.time_in = BflMLPEmbedder(in_dim=256, hidden_dim=p.hidden_size)
        self.vector_in = BflMLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = BflMLPEmbedder(256, p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            [
                BflDoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias)
                for _ in range(p.depth)
            ]
        )
        self.single_blocks = nn.ModuleList(
            [
                BflSingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio)
                for _ in range(p.depth_single_blocks)
            ]
        )
        self.final_layer = BflLastLayer(p.hidden_size, 1, p.out_channels)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None) -> Tensor:  # noqa: ANN001
        img = self.img_in(img)
        vec = self.time_in(bfl_timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            vec = vec + self.guidance_in(bfl_timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec=vec, pe=pe)
        img = img[:, txt.shape[1] :, ...]
        return self.final_layer(img, vec)


# ------------------------------------------------------------------------------------------------- helpers

D, H, AXES = 42, 3, [4, 4, 6]  # Dh = 14
B, LC, LD = 2, 5, 7


def small_params(**overrides: object) -> FluxParams:
    base = dict(
        in_channels=3,
        out_channels=5,
        vec_in_dim=6,
        context_in_dim=7,
        hidden_size=D,
        mlp_ratio=3.0,
        num_heads=H,
        depth=2,
        depth_single_blocks=2,
        axes_dim=AXES,
        theta=10_000,
        qkv_bias=True,
        guidance_embed=False,
    )
    return FluxParams(**{**base, **overrides})


def randomize_(module: nn.Module, std: float = 0.2) -> nn.Module:
    """Random weights everywhere, QKNorm scales included (ones would hide a scale mix-up)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def inputs(p: FluxParams, b: int = B, lc: int = LC, ld: int = LD, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(1)
    out = dict(
        data=torch.randn(b, ld, p.in_channels, generator=g, dtype=dtype),
        data_ids=torch.randint(0, 30, (b, ld, len(p.axes_dim)), generator=g),
        cond=torch.randn(b, lc, p.context_in_dim, generator=g, dtype=dtype),
        cond_ids=torch.randint(0, 30, (b, lc, len(p.axes_dim)), generator=g),
        timesteps=torch.rand(b, generator=g, dtype=dtype),
        y=torch.randn(b, p.vec_in_dim, generator=g, dtype=dtype),
    )
    if p.guidance_embed:
        out["guidance"] = 1 + 4 * torch.rand(b, generator=g, dtype=dtype)
    return out


def bfl_pe(ids: Tensor, p: FluxParams) -> Tensor:
    return BflEmbedND(p.head_dim, p.theta, p.axes_dim)(ids)


# --------------------------------------------------------------------------------------------------- tests


def test_rope_matrix_equals_bfl_embednd() -> None:
    p = small_params()
    ids = torch.randint(0, 50, (B, LC + LD, 3))
    ours = rope_matrix(*EmbedND(p.head_dim, p.theta, p.axes_dim)(ids))
    assert_close(ours, bfl_pe(ids, p), atol=0, rtol=0)


def _norm_rope_inputs(
    per_token: bool, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, seq, heads, dh = 2, 9, 3, 10
    x = torch.randn(b, seq, heads, dh, dtype=dtype)
    cos, sin = EmbedND(dh, 10_000, [4, 6])(torch.randint(0, 20, (b, seq, 2)))
    scale = torch.randn(seq, dh, dtype=dtype) if per_token else torch.randn(dh, dtype=dtype)
    return x, cos, sin, scale


@pytest.mark.parametrize("per_token", [False, True])
def test_norm_rope_equals_rms_norm_then_apply_rotary(per_token: bool) -> None:
    """The fused path equals vermeil.nn's rms_norm times the scale, then interleaved apply_rotary."""
    x, cos, sin, scale = _norm_rope_inputs(per_token)
    freqs = rope_freqs(cos, sin)[:, 0, :, None]
    out = norm_rope(x, freqs, scale)
    expected = apply_rotary(rms_norm(x.transpose(1, 2), None) * scale, cos, sin, "interleaved")
    assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_token", [False, True])
def test_norm_rope_gradcheck(per_token: bool) -> None:
    x, cos, sin, scale = _norm_rope_inputs(per_token, torch.float64)
    freqs = rope_freqs(cos, sin)[:, 0, :, None]
    x = x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # a strided view, as from fused qkv
    scale = scale.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, s: norm_rope(a, freqs, s), (x, scale))


def test_qkv_heads_layout() -> None:
    qkv = torch.arange(2 * 3 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 60)  # B=2, L=3, H=4, Dh=5
    q, k, v = qkv_heads(qkv, 4)
    assert q.shape == (2, 3, 4, 5)
    assert_close(k, qkv[..., 20:40].view(2, 3, 4, 5), atol=0, rtol=0)  # (K H Dh): all q, then all k, then v
    assert_close(v, qkv[..., 40:].view(2, 3, 4, 5), atol=0, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_double_stream_block_matches_bfl(dtype: torch.dtype, tol: float) -> None:
    ours = randomize_(DoubleStreamBlock(D, H, 3.0, qkv_bias=True)).to(dtype)
    ref = BflDoubleStreamBlock(D, H, 3.0, qkv_bias=True).to(dtype)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same names, BFL's
    img, txt, vec = (
        torch.randn(B, LD, D, dtype=dtype),
        torch.randn(B, LC, D, dtype=dtype),
        torch.randn(B, D, dtype=dtype),
    )
    pe = bfl_pe(torch.randint(0, 30, (B, LC + LD, 3)), small_params()).to(dtype)
    out_img, out_txt = ours(img, txt, vec, pe)
    ref_img, ref_txt = ref(img, txt, vec, pe)
    assert_close(out_img, ref_img, atol=tol, rtol=tol)
    assert_close(out_txt, ref_txt, atol=tol, rtol=tol)
    _assert_same_grads(
        ours,
        ref,
        (out_img.sin().sum() + out_txt.cos().sum()),
        (ref_img.sin().sum() + ref_txt.cos().sum()),
        tol,
    )


def _assert_same_grads(ours: nn.Module, ref: nn.Module, loss: Tensor, ref_loss: Tensor, tol: float) -> None:
    """Parameter gradients by name (the QKNorm scales go through the fused backward)."""
    loss.backward()
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, ref_grads[name].grad, atol=10 * tol, rtol=10 * tol, msg=name)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_single_stream_block_matches_bfl(dtype: torch.dtype, tol: float) -> None:
    ours = randomize_(SingleStreamBlock(D, H, 3.0)).to(dtype)
    ref = BflSingleStreamBlock(D, H, 3.0).to(dtype)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, vec = torch.randn(B, LC + LD, D, dtype=dtype), torch.randn(B, D, dtype=dtype)
    pe = bfl_pe(torch.randint(0, 30, (B, LC + LD, 3)), small_params()).to(dtype)
    out, expected = ours(x, vec, pe), ref(x, vec, pe)
    assert_close(out, expected, atol=tol, rtol=tol)
    _assert_same_grads(ours, ref, out.sin().sum(), expected.sin().sum(), tol)


@pytest.mark.parametrize("guidance_embed", [False, True])
def test_flux_loads_bfl_state_dict_and_matches(guidance_embed: bool) -> None:
    p = small_params(guidance_embed=guidance_embed)
    ours = randomize_(Flux(p)).eval()
    ref = BflFlux(p).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # a BFL checkpoint loads natively, and back
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = inputs(p)
    with torch.no_grad():
        out = ours(**x)
        expected = ref(
            x["data"], x["data_ids"], x["cond"], x["cond_ids"], x["timesteps"], x["y"], x.get("guidance")
        )
    assert out.shape == (B, LD, p.out_channels)
    assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bfl_key_names() -> None:
    keys = set(Flux(PRESETS["flux-dev"], device="meta").state_dict())
    for key in [
        "img_in.weight",
        "txt_in.bias",
        "time_in.in_layer.weight",
        "vector_in.out_layer.bias",
        "guidance_in.in_layer.weight",
        "double_blocks.18.img_mod.lin.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.0.img_attn.norm.query_norm.scale",
        "double_blocks.0.txt_attn.norm.key_norm.scale",
        "double_blocks.0.img_attn.proj.weight",
        "double_blocks.0.img_mlp.0.weight",
        "double_blocks.0.txt_mlp.2.bias",
        "single_blocks.37.linear1.weight",
        "single_blocks.0.linear2.weight",
        "single_blocks.0.norm.query_norm.scale",
        "single_blocks.0.modulation.lin.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
    ]:
        assert key in keys, key
    sd = Flux(PRESETS["flux-dev"], device="meta").state_dict()
    assert sd["double_blocks.0.img_attn.qkv.weight"].shape == (9216, 3072)
    assert sd["single_blocks.0.linear1.weight"].shape == (21504, 3072)
    assert sd["single_blocks.0.linear2.weight"].shape == (3072, 15360)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (6144, 3072)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_on_meta(name: str) -> None:
    model = Flux(PRESETS[name], device="meta")
    assert all(t.is_meta for t in model.state_dict().values())
    if name == "flux-dev":
        assert sum(t.numel() for t in model.parameters()) == 11_901_408_320  # BFL flux-dev, 11.9B


def test_meta_then_reset_parameters() -> None:
    model = Flux(small_params(guidance_embed=True), device="meta")
    model.to_empty(device="cpu")
    model.reset_parameters()
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert_close(model.single_blocks[0].norm.key_norm.scale, torch.ones(D // H), atol=0, rtol=0)
    assert torch.isfinite(model(**inputs(model.params))).all()


def test_build_flux_overrides() -> None:
    model = build_flux("debug", depth=2, device="meta")
    assert len(model.double_blocks) == 2 and model.params.hidden_size == PRESETS["debug"].hidden_size
    with pytest.raises(ValueError, match="preset='nope'"):
        build_flux("nope")


def test_cond_mask_padding_invariance() -> None:
    """Padded condition tokens are invisible: outputs equal the unpadded runs, whatever the padding holds."""
    p = small_params()
    model = randomize_(Flux(p)).eval()
    lengths = [3, LC]
    x = inputs(p)
    mask = torch.arange(LC)[None, :] < torch.tensor(lengths)[:, None]  # (B, Lc)
    with torch.no_grad():
        padded = model(**x, cond_mask=mask)
        noise = torch.where(mask[..., None], x["cond"], 100 * torch.randn_like(x["cond"]))
        other_ids = torch.where(mask[..., None], x["cond_ids"], torch.randint_like(x["cond_ids"], 0, 99))
        changed = model(**{**x, "cond": noise, "cond_ids": other_ids}, cond_mask=mask)
        for i, n in enumerate(lengths):
            alone = model(
                data=x["data"][i : i + 1],
                data_ids=x["data_ids"][i : i + 1],
                cond=x["cond"][i : i + 1, :n],
                cond_ids=x["cond_ids"][i : i + 1, :n],
                timesteps=x["timesteps"][i : i + 1],
                y=x["y"][i : i + 1],
            )
            assert_close(padded[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        unmasked = model(**x)
    assert torch.isfinite(padded).all()
    assert_close(changed, padded, atol=1e-5, rtol=1e-5)
    # and the mask matters: without it the padded row sees its padding
    assert not torch.allclose(unmasked[0], padded[0], atol=1e-4)
    assert_close(unmasked[1], padded[1], atol=1e-5, rtol=1e-5)


def test_all_true_cond_mask_equals_no_mask() -> None:
    p = small_params()
    model = randomize_(Flux(p)).eval()
    x = inputs(p)
    with torch.no_grad():
        assert_close(
            model(**x, cond_mask=torch.ones(B, LC, dtype=torch.bool)), model(**x), atol=1e-5, rtol=1e-5
        )


def test_shared_ids_broadcast() -> None:
    p = small_params()
    model = randomize_(Flux(p)).eval()
    x = inputs(p)
    x["data_ids"], x["cond_ids"] = x["data_ids"][:1], x["cond_ids"][:1]
    with torch.no_grad():
        shared = model(**x)
        expanded = model(
            **{**x, "data_ids": x["data_ids"].expand(B, -1, -1), "cond_ids": x["cond_ids"].expand(B, -1, -1)}
        )
    assert_close(shared, expanded, atol=0, rtol=0)


def test_gradcheck_float64() -> None:
    p = small_params(
        hidden_size=8, num_heads=2, axes_dim=[2, 2], mlp_ratio=1.5, depth=1, depth_single_blocks=1
    )
    model = randomize_(Flux(p, dtype=torch.float64), std=0.5)
    x = inputs(p, b=2, lc=3, ld=3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])

    def f(data: Tensor, cond: Tensor, y: Tensor) -> Tensor:
        return model(data, x["data_ids"], cond, x["cond_ids"], x["timesteps"], y, cond_mask=mask)

    args = tuple(x[k].clone().requires_grad_() for k in ("data", "cond", "y"))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


def test_parameter_gradients_flow() -> None:
    """Every parameter gets a gradient (the folded QKNorm scales and both streams' weights included)."""
    p = small_params(guidance_embed=True)
    model = randomize_(Flux(p))
    model(**inputs(p)).square().mean().backward()
    missing = [n for n, t in model.named_parameters() if t.grad is None or not t.grad.abs().sum() > 0]
    assert missing == []


def test_bfloat16_close_to_float32() -> None:
    p = small_params()
    model = randomize_(Flux(p), std=0.1).eval()
    x = inputs(p)
    with torch.no_grad():
        ref = model(**x)
        # timesteps stay float32: t * 1000 rounded to bf16 moves the embedding's fast frequencies (BFL would)
        low_x = {
            k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timesteps" else v for k, v in x.items()
        }
        low = model.to(torch.bfloat16)(**low_x)
    assert low.dtype == torch.bfloat16
    assert_close(low.float(), ref, atol=0.1, rtol=0.1)


def test_seed_example_shapes_on_meta() -> None:
    """The seed's usage example, verbatim but on the meta device (the real run is the slow test below)."""
    with torch.device("meta"):
        _, _, output = _seed_example()
    assert output.shape == (2, 1024, 2)


def _assert_seed_example_matches_bfl(length: int) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        model, args, output = _seed_example(length)
        ref = BflFlux(model.config)
        ref.load_state_dict(model.state_dict(), strict=True)
        expected = ref(*args)
    assert output.shape == (2, length, 2)
    assert_close(output, expected, atol=1e-4, rtol=1e-4)


def test_seed_example_equals_bfl_reference_short() -> None:
    """The seed's example at its width and depth, 16 tokens a stream: equal to BFL's reference Flux."""
    _assert_seed_example_matches_bfl(16)


@pytest.mark.slow
def test_seed_example_runs() -> None:
    _assert_seed_example_matches_bfl(1024)


def _seed_example(length: int = 1024) -> tuple[Flux, tuple[Tensor, ...], Tensor]:
    from vermeil.models.flux import Flux, FluxParams  # as the seed writes it

    # Configure model parameters
    params = FluxParams(
        in_channels=2,
        out_channels=2,
        vec_in_dim=4,
        context_in_dim=4,
        hidden_size=1024,
        mlp_ratio=4.0,
        num_heads=8,
        depth=2,
        depth_single_blocks=4,
        axes_dim=[16, 56, 56],  # sum must equal hidden_size // num_heads
        theta=10_000,
        qkv_bias=True,
        guidance_embed=False,
    )
    # Create model
    model = Flux(params)
    # Prepare inputs
    data = torch.randn(2, length, 2)  # Input sequence
    cond = torch.randn(2, length, 4)  # Condition sequence
    data_ids = torch.randint(0, 1024, (2, length, 3))  # Position IDs
    cond_ids = torch.randint(0, 1024, (2, length, 3))  # Condition position IDs
    timesteps = torch.randn(2)  # Diffusion timesteps
    y = torch.randn(2, 4)  # Additional conditioning
    # Forward pass
    args = (data, data_ids, cond, cond_ids, timesteps, y)
    return model, args, model(*args)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(axes_dim=[4, 4, 4]), r"sum\(axes_dim\)=12 .* must equal the head dim .* = 14"),
        (dict(hidden_size=40), "hidden_size=40 must be divisible by num_heads=3"),
        (dict(axes_dim=[3, 5, 6]), "positive even"),
        (dict(depth=-1), "depth=-1"),
        (dict(mlp_ratio=0.0), "mlp_ratio=0.0"),
        (dict(in_channels=0), "in_channels=0"),
    ],
)
def test_bad_params(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small_params(**overrides)


def test_params_round_trip_dict() -> None:
    p = small_params()
    assert FluxParams(**asdict(p)) == p


def _bad(x: dict, **changes: object) -> dict:
    return {**x, **changes}


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda x: _bad(x, data_ids=x["data_ids"][..., :2]),
            r"data_ids must be .*n_axes=len\(axes_dim\)=3.*\(2, 7, 2\)",
        ),
        (lambda x: _bad(x, cond_ids=x["cond_ids"][:, :-1]), r"cond_ids must be \(B=2 or 1, 5, n_axes"),
        (lambda x: _bad(x, timesteps=x["timesteps"][:1]), r"timesteps must be \(B,\) = \(2,\), got \(1,\)"),
        (lambda x: _bad(x, timesteps=x["timesteps"][:, None]), r"timesteps must be \(B,\)"),
        (lambda x: _bad(x, data=x["data"][..., :2]), r"data must be \(B, Ld, in_channels=3\)"),
        (lambda x: _bad(x, cond=x["cond"][..., :2]), r"cond must be \(B=2, Lc, context_in_dim=7\)"),
        (lambda x: _bad(x, y=x["y"][:1]), r"y must be \(B=2, vec_in_dim=6\)"),
        (lambda x: _bad(x, guidance=torch.ones(2)), "guidance_embed=False"),
        (lambda x: _bad(x, cond_mask=torch.ones(2, 5)), "cond_mask must be a bool"),
        (lambda x: _bad(x, cond_mask=torch.ones(2, 4, dtype=torch.bool)), r"\(B, Lc\) = \(2, 5\)"),
    ],
)
def test_bad_inputs(change, match: str) -> None:  # noqa: ANN001
    p = small_params()
    model = Flux(p)
    with pytest.raises(ValueError, match=match):
        model(**change(inputs(p)))


def test_missing_guidance() -> None:
    p = small_params(guidance_embed=True)
    x = inputs(p)
    del x["guidance"]
    with pytest.raises(ValueError, match="guidance must be given"):
        Flux(p)(**x)
