"""Tests for vermeil.nn.positional: parity with transformers (half pairing, llama3 scaling), Meta's complex
reference (interleaved), diffusers Flux (EmbedND, timestep embedding), PaLM xPos, and the relative property."""

# Shapes: B batch, T query length, H heads, Hkv kv heads, Dh head dim, L Flux sequence length, A position axes.

import math

import pytest
import torch
from torch.testing import assert_close

from vermeil.nn.positional import (
    EmbedND,
    RopeScaling,
    RotaryEmbedding,
    apply_rotary,
    apply_scaling,
    rope_cos_sin,
    rope_inv_freq,
    timestep_embedding,
    xpos_scale,
)

B, H, HKV, T, DH = 2, 3, 1, 7, 32
# Small original context so that all three llama3 bands (keep / interpolate / divide) hold frequencies at Dh=32.
SMALL_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)


def _qk(dtype: torch.dtype = torch.float32, t: int = T, dh: int = DH) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(B, H, t, dh, dtype=dtype), torch.randn(B, HKV, t, dh, dtype=dtype)


# ----------------------------------------------------------------------------------------- references (inline)


def meta_apply_scaling(freqs: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Meta llama-models `apply_scaling`: the per-element branchy loop (constants taken from `scaling`)."""
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scaling.factor)
        else:
            assert low_freq_wavelen != high_freq_wavelen
            smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            new_freqs.append((1 - smooth) * freq / scaling.factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype, device=freqs.device)


def meta_rotary(
    x: torch.Tensor, positions: torch.Tensor, theta: float, scaling: RopeScaling | None
) -> torch.Tensor:
    """Meta `precompute_freqs_cis` + `apply_rotary_emb` (complex, interleaved pairs). x: (B, H, T, Dh)."""
    dh = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, dh, 2)[: (dh // 2)].float() / dh))
    if scaling is not None:
        freqs = meta_apply_scaling(freqs, scaling)
    angles = positions.float()[..., None] * freqs  # (T, Dh/2) or (B, T, Dh/2)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    if freqs_cis.ndim == 3:
        freqs_cis = freqs_cis[:, None]  # (B, 1, T, Dh/2)
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_ * freqs_cis).flatten(3).type_as(x)


def palm_xpos(q: torch.Tensor, k: torch.Tensor, scale_base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PaLM-rlhf-pytorch `RotaryEmbedding(use_xpos=True)` + `apply_rotary_pos_emb` (half pairing, centre n//2)."""
    dim, n = q.shape[-1], q.shape[-2]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    base = (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim)
    t = torch.arange(n).type_as(inv_freq)
    freqs = torch.einsum("i , j -> i j", t, inv_freq)
    freqs = torch.cat((freqs, freqs), dim=-1)
    power = (t - (n // 2)) / scale_base
    scale = base ** power[:, None]
    scale = torch.cat((scale, scale), dim=-1)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def apply(pos: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (x * pos.cos() * s) + (rotate_half(x) * pos.sin() * s)

    return apply(freqs, q, scale), apply(freqs, k, scale**-1)


def hf_parts():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    return LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb


# ----------------------------------------------------------------------------------------------- parity tests


@pytest.mark.parametrize("scaling", [None, SMALL_SCALING], ids=["plain", "llama3"])
@pytest.mark.parametrize("offset", [0, 5])
def test_half_matches_transformers(scaling: RopeScaling | None, offset: int) -> None:
    LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb = hf_parts()
    theta = 500.0
    rope_parameters: dict = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        rope_parameters = {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_seq_len,
        }
    config = LlamaConfig(
        hidden_size=H * DH,
        num_attention_heads=H,
        num_key_value_heads=HKV,
        head_dim=DH,
        max_position_embeddings=128,
        rope_parameters=rope_parameters,
    )
    hf_rope = LlamaRotaryEmbedding(config)
    rope = RotaryEmbedding(DH, theta=theta, pairing="half", max_seq_len=16, scaling=scaling)
    assert_close(rope.inv_freq, hf_rope.inv_freq, rtol=0, atol=0)

    q, k = _qk()
    # Per-row offsets (KV-cache style): row b starts at offset + 3b.
    position_ids = torch.arange(T)[None] + offset + 3 * torch.arange(B)[:, None]  # (B, T)
    cos, sin = hf_rope(q, position_ids)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    q_out, k_out = rope(q, k, input_pos=position_ids)
    assert_close(q_out, q_ref, rtol=1e-6, atol=1e-6)
    assert_close(k_out, k_ref, rtol=1e-6, atol=1e-6)
    if offset == 0:
        q_none, k_none = rope(q[:1], k[:1])  # input_pos=None means 0..T-1 (row 0 has no extra offset)
        assert_close(q_none, q_ref[:1], rtol=1e-6, atol=1e-6)
        assert_close(k_none, k_ref[:1], rtol=1e-6, atol=1e-6)


def test_llama3_bands_all_populated() -> None:
    """Guards the parity test above: with SMALL_SCALING every llama3 branch is exercised at Dh=32."""
    inv_freq = rope_inv_freq(DH, 500.0)
    wavelen = 2 * math.pi / inv_freq
    s = SMALL_SCALING
    assert (wavelen < s.original_max_seq_len / s.high_freq_factor).any()
    assert (wavelen > s.original_max_seq_len / s.low_freq_factor).any()
    medium = (wavelen >= s.original_max_seq_len / s.high_freq_factor) & (
        wavelen <= s.original_max_seq_len / s.low_freq_factor
    )
    assert medium.any()


@pytest.mark.parametrize("scaling", [None, SMALL_SCALING], ids=["plain", "llama3"])
def test_interleaved_matches_meta_complex(scaling: RopeScaling | None) -> None:
    q, k = _qk()
    rope = RotaryEmbedding(DH, theta=500.0, pairing="interleaved", max_seq_len=16, scaling=scaling)
    for pos in (torch.arange(T), torch.arange(4, 4 + T), torch.randint(0, 40, (B, T))):
        q_out, k_out = rope(q, k, input_pos=pos)
        assert_close(q_out, meta_rotary(q, pos, 500.0, scaling), rtol=1e-6, atol=1e-6)
        assert_close(k_out, meta_rotary(k, pos, 500.0, scaling), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "scaling",
    [RopeScaling(8.0, 1.0, 4.0, 8192), RopeScaling(16.0, 1.0, 1.0, 8192)],
    ids=["llama3.1", "llama4-scout"],
)
def test_apply_scaling_matches_meta_loop(scaling: RopeScaling) -> None:
    inv_freq = rope_inv_freq(128, 500000.0)
    ours = apply_scaling(inv_freq, scaling)
    assert torch.isfinite(ours).all()
    assert_close(ours, meta_apply_scaling(inv_freq, scaling), rtol=1e-6, atol=0)
    assert_close(rope_inv_freq(128, 500000.0, scaling), ours, rtol=0, atol=0)
    # The scaling must actually change something (so the test can fail on a no-op).
    assert not torch.equal(ours, inv_freq)


def test_apply_scaling_scout_guard_is_finite_on_dense_grid() -> None:
    """high == low: no division by zero anywhere, including wavelengths right at the band edge."""
    scout = RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_max_seq_len=8192)
    edge = 2 * math.pi / 8192
    inv_freq = torch.cat(
        [torch.logspace(-6, 0, 513), torch.tensor([edge, edge * (1 + 1e-7), edge * (1 - 1e-7)])]
    )
    # The float32 edge value lands exactly on the (empty) band, where an unguarded formula gives 0/0 = NaN.
    assert (2 * math.pi / inv_freq[-3:-2]).item() == 8192.0
    out = apply_scaling(inv_freq, scout)
    assert torch.isfinite(out).all()
    assert_close(out[-3], inv_freq[-3] / 16.0, rtol=0, atol=0)
    # Every value is either kept or divided by the factor (the band is empty).
    kept_or_divided = torch.isclose(out, inv_freq, rtol=1e-6) | torch.isclose(out, inv_freq / 16.0, rtol=1e-6)
    assert kept_or_divided.all()


def test_embednd_matches_diffusers_flux() -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    axes_dim, theta = [4, 6, 6], 10000
    dh = sum(axes_dim)
    torch.manual_seed(0)
    # Flux ids: txt all zeros, img (0, row, col) on a 3 x 4 grid; diffusers takes batch-shared 2-D ids.
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros(12), rows.flatten().float(), cols.flatten().float()], dim=-1)
    ids = torch.cat([torch.zeros(5, 3), img_ids])  # (L, A), L = 17
    cos_ref, sin_ref = FluxPosEmbed(theta, axes_dim)(ids)  # (L, Dh) each, interleave-repeated
    cos, sin = EmbedND(dh, theta, axes_dim)(ids[None].expand(B, -1, -1))
    assert cos.shape == (B, 1, ids.shape[0], dh // 2) and cos.dtype == torch.float32
    assert_close(cos[1, 0].repeat_interleave(2, dim=-1), cos_ref, rtol=0, atol=0)
    assert_close(sin[1, 0].repeat_interleave(2, dim=-1), sin_ref, rtol=0, atol=0)

    x = torch.randn(B, H, ids.shape[0], dh)
    ref = apply_rotary_emb(x, (cos_ref, sin_ref), use_real=True, use_real_unbind_dim=-1)
    assert_close(apply_rotary(x, cos, sin, "interleaved"), ref, rtol=1e-6, atol=1e-6)


def test_embednd_per_sample_ids_match_bfl_rope() -> None:
    """Per-sample (B, L, A) ids against BFL `rope()` + `apply_rope` (2x2 rotation matrices, float64 angles)."""
    axes_dim, theta = [2, 4, 6], 10000
    dh = sum(axes_dim)
    torch.manual_seed(1)
    ids = torch.randint(0, 20, (B, 9, 3)).float()

    def bfl_rope(pos: torch.Tensor, dim: int) -> torch.Tensor:
        scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        omega = 1.0 / (theta**scale)
        out = torch.einsum("...n,d->...nd", pos.double(), omega)
        out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
        return out.unflatten(-1, (2, 2)).float()

    pe = torch.cat([bfl_rope(ids[..., i], d) for i, d in enumerate(axes_dim)], dim=-3).unsqueeze(1)
    x = torch.randn(B, H, 9, dh)
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    ref = (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*x.shape)
    cos, sin = EmbedND(dh, theta, axes_dim)(ids)
    assert_close(apply_rotary(x, cos, sin, "interleaved"), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim", [256, 7])
def test_timestep_embedding_matches_diffusers(dim: int) -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import Timesteps

    t = torch.tensor([0.0, 0.013, 0.5, 0.97, 1.0])
    ref = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)(t * 1000)
    out = timestep_embedding(t, dim)
    assert out.shape == (t.shape[0], dim)
    assert_close(out, ref, rtol=1e-6, atol=1e-5)
    if dim % 2:
        assert torch.equal(out[:, -1], torch.zeros(t.shape[0]))


def test_xpos_matches_palm() -> None:
    q, k = _qk(t=9)
    rope = RotaryEmbedding(DH, pairing="half", use_xpos=True, scale_base=16.0)
    q_ref, k_ref = palm_xpos(q, k, scale_base=16.0)
    q_out, k_out = rope(q, k)
    assert_close(q_out, q_ref, rtol=1e-6, atol=1e-6)
    assert_close(k_out, k_ref, rtol=1e-6, atol=1e-6)
    # xPos must change the result relative to plain RoPE.
    q_plain, _ = RotaryEmbedding(DH, pairing="half")(q, k)
    assert not torch.allclose(q_out, q_plain, atol=1e-3)


# ------------------------------------------------------------------------------------------- property tests


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("use_xpos", [False, True])
def test_scores_depend_only_on_relative_position(pairing: str, use_xpos: bool) -> None:
    torch.manual_seed(2)
    rope = RotaryEmbedding(DH, pairing=pairing, use_xpos=use_xpos, scale_base=32.0, max_seq_len=64)
    q, k = torch.randn(1, 1, 1, DH), torch.randn(1, 1, 1, DH)

    def score(i: int, j: int) -> torch.Tensor:
        qi, _ = rope(q, q, input_pos=torch.tensor([i]))
        _, kj = rope(k, k, input_pos=torch.tensor([j]))
        return (qi * kj).sum()

    for i, j in [(5, 2), (2, 5), (7, 7), (0, 6)]:
        base = score(i, j)
        for shift in (1, 13, 40):
            assert_close(score(i + shift, j + shift), base, rtol=1e-4, atol=1e-4)
    # ... and does depend on i - j (so a position-blind implementation fails).
    assert not torch.allclose(score(5, 2), score(2, 5), atol=1e-3)


def test_half_and_interleaved_differ_by_hf_permutation() -> None:
    """convert_llama_weights_to_hf `permute`: HF channel a*Dh/2 + i holds Meta channel 2i + a."""
    q, k = _qk()
    perm = torch.arange(DH).view(DH // 2, 2).t().reshape(-1)
    half = RotaryEmbedding(DH, pairing="half")
    inter = RotaryEmbedding(DH, pairing="interleaved")
    pos = torch.arange(3, 3 + T)
    qh, kh = half(q[..., perm], k[..., perm], input_pos=pos)
    qi, ki = inter(q, k, input_pos=pos)
    assert_close(qh, qi[..., perm], rtol=1e-6, atol=1e-6)
    assert_close(qh @ kh.transpose(-1, -2), qi @ ki.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    # Without the permutation the two conventions disagree.
    qh_wrong, _ = half(q, k, input_pos=pos)
    assert not torch.allclose(qh_wrong, qi, atol=1e-3)


@pytest.mark.parametrize("use_xpos", [False, True])
def test_table_growth_equals_fresh_larger_table(use_xpos: bool) -> None:
    q, k = _qk(t=11)
    small = RotaryEmbedding(DH, max_seq_len=4, use_xpos=use_xpos)
    big = RotaryEmbedding(DH, max_seq_len=64, use_xpos=use_xpos)
    out_small, out_big = small(q, k), big(q, k)
    assert small.max_seq_len >= 11
    for a, b in zip(out_small, out_big):
        assert_close(a, b, rtol=0, atol=0)
    rows = small.max_seq_len
    assert_close(small.cos_cached, big.cos_cached[:rows], rtol=0, atol=0)
    assert_close(small.sin_cached, big.sin_cached[:rows], rtol=0, atol=0)
    # Explicit positions past the table grow it too.
    pos = torch.arange(30, 41)
    for a, b in zip(small(q, k, input_pos=pos), big(q, k, input_pos=pos)):
        assert_close(a, b, rtol=0, atol=0)
    assert small.max_seq_len >= 41
    assert "cos_cached" not in small.state_dict() and "inv_freq" not in small.state_dict()
    # reserve() grows ahead of time (what accelerators rely on: they never read positions back)
    small.reserve(200)
    assert small.max_seq_len >= 200
    assert_close(small.cos_cached[:64], big.cos_cached, rtol=0, atol=0)


def test_attention_setup_cache_reserves_the_rotary_table() -> None:
    from vermeil.nn import Attention

    rope = RotaryEmbedding(DH, max_seq_len=8)
    attn = Attention(4 * DH, heads=4, rotary=rope, causal=True)
    attn.setup_cache(batch_size=1, max_seq_len=100)
    assert rope.max_seq_len >= 100


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_offsets_equal_slicing_longer_sequence_and_per_row_positions(pairing: str) -> None:
    q, k = _qk(t=3 + T)
    rope = RotaryEmbedding(DH, pairing=pairing, max_seq_len=16)
    q_full, k_full = rope(q, k)
    q_off, k_off = rope(q[..., 3:, :], k[..., 3:, :], input_pos=torch.arange(3, 3 + T))
    assert_close(q_off, q_full[..., 3:, :], rtol=0, atol=0)
    assert_close(k_off, k_full[..., 3:, :], rtol=0, atol=0)
    # (B, T) positions differing per row equal running each row alone with its (T,) positions.
    pos = torch.stack([torch.arange(T), torch.arange(5, 5 + T)])
    q_b, k_b = rope(q[..., :T, :], k[..., :T, :], input_pos=pos)
    for b in range(B):
        q_row, k_row = rope(q[b : b + 1, :, :T], k[b : b + 1, :, :T], input_pos=pos[b])
        assert_close(q_b[b : b + 1], q_row, rtol=0, atol=0)
        assert_close(k_b[b : b + 1], k_row, rtol=0, atol=0)
    assert not torch.allclose(q_b[1], rope(q[1:2, :, :T], k[1:2, :, :T])[0][0], atol=1e-3)


def test_low_precision_input_computes_in_float32() -> None:
    q, k = _qk()
    rope = RotaryEmbedding(DH)
    q_bf, k_bf = rope(q.bfloat16(), k.bfloat16())
    assert q_bf.dtype == torch.bfloat16
    q32, _ = rope(q.bfloat16().float(), k.bfloat16().float())
    assert torch.equal(q_bf, q32.bfloat16())


def test_cos_sin_and_functions_agree() -> None:
    rope = RotaryEmbedding(DH, theta=500.0, scaling=SMALL_SCALING, max_seq_len=8)
    pos = torch.tensor([[0, 3, 9], [1, 2, 20]])
    cos, sin = rope.cos_sin(pos)
    cos_ref, sin_ref = rope_cos_sin(pos, rope_inv_freq(DH, 500.0, SMALL_SCALING))
    assert cos.shape == (2, 3, DH // 2) and cos.dtype == torch.float32
    assert_close(cos, cos_ref, rtol=0, atol=0)
    assert_close(sin, sin_ref, rtol=0, atol=0)
    # Float positions are computed directly (no table).
    cos_f, _ = rope.cos_sin(pos.float() + 0.5)
    assert_close(cos_f, rope_cos_sin(pos.float() + 0.5, rope.inv_freq)[0], rtol=0, atol=0)


def test_xpos_scale_pairing_layout() -> None:
    pos = torch.arange(5)
    half = xpos_scale(pos, 8, 4.0, "half", center=2)
    inter = xpos_scale(pos, 8, 4.0, "interleaved", center=2)
    assert half.shape == (5, 8)
    assert_close(half[:, :4], half[:, 4:], rtol=0, atol=0)
    assert_close(inter[:, 0::2], half[:, :4], rtol=0, atol=0)
    assert_close(inter[:, 1::2], half[:, :4], rtol=0, atol=0)
    assert_close(half[2], torch.ones(8), rtol=0, atol=0)  # centre -> scale 1


# ---------------------------------------------------------------------------------- construction, autograd


@pytest.mark.parametrize("scaling", [None, SMALL_SCALING])
def test_meta_device_construction(scaling: RopeScaling | None) -> None:
    rope = RotaryEmbedding(DH, scaling=scaling, max_seq_len=16, device="meta")
    assert rope.cos_cached.is_meta and rope.inv_freq.is_meta
    rope.to_empty(device="cpu")
    rope.reset_parameters()
    fresh = RotaryEmbedding(DH, scaling=scaling, max_seq_len=16)
    for name in ("inv_freq", "cos_cached", "sin_cached"):
        assert_close(getattr(rope, name), getattr(fresh, name), rtol=0, atol=0)


def test_module_dtype_cast_keeps_float32_tables() -> None:
    """`model.to(torch.bfloat16)` must not round the angle tables to bf16."""
    rope = RotaryEmbedding(DH, max_seq_len=64).to(torch.bfloat16)
    fresh = RotaryEmbedding(DH, max_seq_len=64)
    for name in ("inv_freq", "cos_cached", "sin_cached"):
        assert getattr(rope, name).dtype == torch.float32
        assert_close(getattr(rope, name), getattr(fresh, name), rtol=0, atol=0)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_apply_rotary_gradcheck(pairing: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(torch.tensor([[0, 1, 2], [4, 5, 7]]), rope_inv_freq(6))
    scale = xpos_scale(torch.arange(3), 6, 4.0, pairing, center=1).double()
    assert torch.autograd.gradcheck(lambda x: apply_rotary(x, cos.double(), sin.double(), pairing), (x,))
    assert torch.autograd.gradcheck(lambda x: apply_rotary(x, cos, sin, pairing, scale=scale), (x,))


def test_compile_fullgraph_with_input_pos() -> None:
    torch._dynamo.reset()
    rope = RotaryEmbedding(DH, max_seq_len=32, use_xpos=True, scaling=SMALL_SCALING)
    q, k = _qk()
    pos = torch.arange(5, 5 + T)
    compiled = torch.compile(rope, fullgraph=True, backend="eager")
    for a, b in zip(compiled(q, k, input_pos=pos), rope(q, k, input_pos=pos)):
        assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(compiled(q, k), rope(q, k)):
        assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"factor=0 must be > 0"):
        RopeScaling(factor=0)
    with pytest.raises(ValueError, match=r"low_freq_factor=4.0 must be <= high_freq_factor=1.0"):
        RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match=r"original_max_seq_len=0 must be > 0"):
        RopeScaling(original_max_seq_len=0)
    with pytest.raises(ValueError, match=r"head_dim=7 must be a positive even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match=r"pairing='complex' must be one of"):
        RotaryEmbedding(8, pairing="complex")
    with pytest.raises(ValueError, match=r"max_seq_len=0 must be a positive"):
        RotaryEmbedding(8, max_seq_len=0)
    with pytest.raises(TypeError, match=r"scaling=.* must be a RopeScaling"):
        RotaryEmbedding(8, scaling={"factor": 8.0})

    rope = RotaryEmbedding(DH, max_seq_len=8)
    q, k = _qk()
    with pytest.raises(ValueError, match=rf"q.shape\[-1\]=16 must equal head_dim={DH}"):
        rope(q[..., :16], k)
    with pytest.raises(ValueError, match=r"k.ndim=3 must be 4"):
        rope(q, k[0])
    with pytest.raises(ValueError, match=r"must share B and T"):
        rope(q, k[..., :3, :])
    with pytest.raises(ValueError, match=rf"input_pos.shape=\(3,\) must be \(T,\) or \(B, T\) with T={T}"):
        rope(q, k, input_pos=torch.arange(3))
    with pytest.raises(ValueError, match=r"input_pos.shape\[0\]=3 must equal the batch size 2"):
        rope(q, k, input_pos=torch.zeros(3, T, dtype=torch.long))
    with pytest.raises(ValueError, match=r"positions must be >= 0, got min -1"):
        rope(q, k, input_pos=torch.arange(-1, T - 1))
    with pytest.raises(ValueError, match=r"cos.shape\[-1\]=4 must equal 16"):
        apply_rotary(q, torch.ones(T, 4), torch.ones(T, 4))

    with pytest.raises(ValueError, match=r"sum\(axes_dim\)=14 .* must equal dim=16"):
        EmbedND(16, 10000, [4, 4, 6])
    with pytest.raises(ValueError, match=r"n_axes=len\(axes_dim\)=3"):
        EmbedND(16, 10000, [4, 6, 6])(torch.zeros(1, 5, 2))
    with pytest.raises(ValueError, match=r"t.ndim=2 must be 1"):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_no_position_read_back_while_tracing_or_capturing(monkeypatch: pytest.MonkeyPatch) -> None:
    rope = RotaryEmbedding(DH, max_seq_len=16)
    pos = torch.tensor([3, 9])

    def no_read_back(positions: torch.Tensor) -> None:
        raise AssertionError("a host read of the positions while capturing")

    # a CUDA graph capture in progress (faked: this machine may have no CUDA): the lookup reads nothing back
    monkeypatch.setattr(rope, "_check_positions", no_read_back)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cos, _ = rope.cos_sin(pos)
    assert_close(cos, rope.cos_cached[pos], rtol=0, atol=0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(AssertionError, match="host read"):
        rope.cos_sin(pos)  # eager on the CPU: the check (and growth) runs
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    rope.cos_sin(pos)  # torch.jit.trace: skipped too


def test_reserve_rejects_a_bad_row_count() -> None:
    rope = RotaryEmbedding(DH, max_seq_len=16)
    with pytest.raises(ValueError, match="rows=0 must be a positive int"):
        rope.reserve(0)
    rope.reserve(8)  # already covered: no change
    assert rope.max_seq_len == 16


def test_embednd_axes_and_timestep_period_are_checked() -> None:
    # axes_dim=[2, 2.5] was truncated to [2, 2] by int() and accepted; max_period <= 0 failed in math.log.
    with pytest.raises(
        ValueError, match=r"axes_dim=\[2, 2.5\] must be a non-empty list of positive even int"
    ):
        EmbedND(4, 10000.0, [2, 2.5])
    with pytest.raises(
        ValueError, match=r"axes_dim=\['2', 2\] must be a non-empty list of positive even int"
    ):
        EmbedND(4, 10000.0, ["2", 2])
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"max_period={bad} must be > 0"):
            timestep_embedding(torch.rand(2), 8, max_period=bad)
