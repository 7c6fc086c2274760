"""Tests for vermeil/nn/modulation.py against a transcription of BFL flux layers and against diffusers."""

# Shapes: B batch, T sequence length, D model dim, Din embedder input dim.

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from vermeil.nn.modulation import AdaLayerNorm, MLPEmbedder, Modulation, ModulationOut, modulate

B, T, D, DIN = 3, 7, 37, 256


# --- A transcription of BFL flux/src/flux/modules/layers.py (written out here on purpose) -----------------------
class _BflMLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class _BflModulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor):
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return out[:3], (out[3:] if self.is_double else None)


class _BflLastLayerNorm(nn.Module):
    """BFL LastLayer without its final linear."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]


# --- Modulation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double", [True, False])
def test_modulation_matches_bfl_transcription(double: bool) -> None:
    torch.manual_seed(0)
    ref = _BflModulation(D, double)
    ours = Modulation(D, double)
    assert set(ours.state_dict()) == {"lin.weight", "lin.bias"}  # BFL keys: double_blocks.N.img_mod.lin.*
    ours.load_state_dict(ref.state_dict())
    vec = torch.randn(B, D)
    m1, m2 = ours(vec)
    r1, r2 = ref(vec)
    for got, want in zip((m1.shift, m1.scale, m1.gate), r1):
        assert got.shape == (B, 1, D)
        assert_close(got, want, rtol=0, atol=0)
    if double:
        assert m2 is not None
        for got, want in zip((m2.shift, m2.scale, m2.gate), r2):
            assert_close(got, want, rtol=0, atol=0)
    else:
        assert m2 is None


def test_modulation_chunk_order_is_shift_scale_gate() -> None:
    # Zero weight: the output is the bias, so each field must be its slice of the bias, in this order.
    mod = Modulation(D, double=True)
    with torch.no_grad():
        mod.lin.weight.zero_()
        mod.lin.bias.copy_(torch.arange(6 * D, dtype=torch.float32))
    m1, m2 = mod(torch.randn(B, D))
    assert m2 is not None
    for k, field in enumerate((m1.shift, m1.scale, m1.gate, m2.shift, m2.scale, m2.gate)):
        assert_close(field, torch.arange(k * D, (k + 1) * D, dtype=torch.float32).expand(B, 1, D))


def test_modulation_applies_silu_first() -> None:
    mod = Modulation(D, double=False)
    vec = torch.randn(B, D)
    m, _ = mod(vec)
    expected = F.linear(F.silu(vec), mod.lin.weight, mod.lin.bias)
    assert_close(torch.cat([m.shift, m.scale, m.gate], -1)[:, 0], expected)
    assert not torch.allclose(m.shift[:, 0], mod.lin(vec)[:, :D])


def test_modulation_matches_diffusers_ada_layer_norm_zero() -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.normalization import AdaLayerNormZero

    torch.manual_seed(1)
    ref = AdaLayerNormZero(D)
    ours = Modulation(D, double=True)
    ours.lin.load_state_dict(ref.linear.state_dict())  # transformer_blocks.N.norm1.linear -> img_mod.lin
    x, vec = torch.randn(B, T, D), torch.randn(B, D)
    x_ref, gate_msa, shift_mlp, scale_mlp, gate_mlp = ref(x, emb=vec)
    m1, m2 = ours(vec)
    assert m2 is not None
    ln = F.layer_norm(x, (D,), eps=1e-6)
    assert_close(modulate(ln, m1.shift, m1.scale), x_ref, rtol=1e-5, atol=1e-5)
    assert_close(m1.gate[:, 0], gate_msa)
    assert_close(m2.shift[:, 0], shift_mlp)
    assert_close(m2.scale[:, 0], scale_mlp)
    assert_close(m2.gate[:, 0], gate_mlp)


def test_modulate() -> None:
    x, shift, scale = torch.randn(B, T, D), torch.randn(B, 1, D), torch.randn(B, 1, D)
    assert_close(modulate(x, shift, scale), x * (1 + scale) + shift)
    assert_close(modulate(x, torch.zeros(B, 1, D), torch.zeros(B, 1, D)), x)


def test_modulation_out_is_a_dataclass_with_bfl_fields() -> None:
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    m = ModulationOut(a, b, c)
    assert (m.shift, m.scale, m.gate) == (a, b, c)


# --- MLPEmbedder ------------------------------------------------------------------------------------------------


def test_mlp_embedder_matches_bfl_and_diffusers_timestep_embedding() -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import TimestepEmbedding

    torch.manual_seed(0)
    ref = TimestepEmbedding(DIN, D)
    ours = MLPEmbedder(DIN, D)
    assert set(ours.state_dict()) == {
        "in_layer.weight",
        "in_layer.bias",
        "out_layer.weight",
        "out_layer.bias",
    }
    ours.in_layer.load_state_dict(ref.linear_1.state_dict())
    ours.out_layer.load_state_dict(ref.linear_2.state_dict())
    x = torch.randn(B, DIN)
    assert_close(ours(x), ref(x), rtol=0, atol=0)
    bfl = _BflMLPEmbedder(DIN, D)
    bfl.load_state_dict(ours.state_dict())
    assert_close(ours(x), bfl(x), rtol=0, atol=0)


# --- AdaLayerNorm -----------------------------------------------------------------------------------------------


def test_ada_layer_norm_matches_bfl_last_layer_and_diffusers_swapped() -> None:
    torch.manual_seed(0)
    ref = _BflLastLayerNorm(D)
    ours = AdaLayerNorm(D)
    ours.load_state_dict(ref.state_dict(), strict=True)  # final_layer.adaLN_modulation.1.* loads by name
    x, vec = torch.randn(B, T, D), torch.randn(B, D)
    assert_close(ours(x, vec), ref(x, vec), rtol=0, atol=0)

    pytest.importorskip("diffusers")
    from diffusers.models.normalization import AdaLayerNormContinuous

    dif = AdaLayerNormContinuous(D, D, elementwise_affine=False, eps=1e-6)
    w, b = ours.adaLN_modulation[1].weight, ours.adaLN_modulation[1].bias
    # diffusers' norm_out stores (scale, shift): swap the halves (diffusers, scripts/convert_flux_to_diffusers.py: swap_scale_shift).
    with torch.no_grad():
        dif.linear.weight.copy_(torch.cat([w[D:], w[:D]]))
        dif.linear.bias.copy_(torch.cat([b[D:], b[:D]]))
    assert_close(ours(x, vec), dif(x, vec), rtol=1e-6, atol=1e-6)


def test_zero_init_gives_identity_modulation() -> None:
    x, vec = torch.randn(B, T, D), torch.randn(B, D)
    ada = AdaLayerNorm(D, cond_dim=11, zero_init=True)
    assert_close(ada(x, torch.randn(B, 11)), F.layer_norm(x, (D,), eps=1e-6))
    m, _ = Modulation(D, double=False, zero_init=True)(vec)
    assert (m.shift == 0).all() and (m.scale == 0).all() and (m.gate == 0).all()


# --- Module contract --------------------------------------------------------------------------------------------


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    d = 5
    mod = Modulation(d, double=True, dtype=torch.float64)
    emb = MLPEmbedder(4, d, dtype=torch.float64)
    ada = AdaLayerNorm(d, cond_dim=3, dtype=torch.float64)
    vec = torch.randn(2, d, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def mod_fn(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m1, m2 = mod(v)
        return m1.shift, m1.scale, m1.gate, m2.shift, m2.scale, m2.gate  # type: ignore[union-attr]

    assert torch.autograd.gradcheck(mod_fn, (vec,))
    assert torch.autograd.gradcheck(emb, (e,))
    assert torch.autograd.gradcheck(ada, (x, c))
    assert torch.autograd.gradcheck(
        modulate, (x, torch.randn_like(x[:, :1]).requires_grad_(), c[:, None, :1])
    )


def test_meta_device_dtype_and_reset_parameters() -> None:
    meta = torch.device("meta")
    for module in (
        Modulation(D, True, device=meta),
        MLPEmbedder(DIN, D, device=meta),
        AdaLayerNorm(D, device=meta),
    ):
        assert all(p.device.type == "meta" for p in module.parameters())
        module.reset_parameters()
        empty = module.to_empty(device="cpu")
        empty.reset_parameters()
        assert all(torch.isfinite(p).all() for p in empty.parameters())
    m = Modulation(D, False, dtype=torch.bfloat16)
    assert m.lin.weight.dtype == torch.bfloat16
    out, _ = m(torch.randn(B, D, dtype=torch.bfloat16))
    assert out.shift.dtype == torch.bfloat16
    z = Modulation(D, False, zero_init=True)
    torch.nn.init.ones_(z.lin.weight)
    z.reset_parameters()
    assert (z.lin.weight == 0).all()


def test_invalid_arguments_raise_naming_the_value() -> None:
    with pytest.raises(ValueError, match="dim=0"):
        Modulation(0, True)
    with pytest.raises(ValueError, match="in_dim=-1"):
        MLPEmbedder(-1, 4)
    with pytest.raises(ValueError, match="cond_dim=0"):
        AdaLayerNorm(4, cond_dim=0)
    with pytest.raises(ValueError, match=r"vec must be \(B, D\), got shape \(3, 1, 37\)"):
        Modulation(D, True)(torch.randn(B, 1, D))
    with pytest.raises(ValueError, match=r"vec must be \(B, D\), got shape \(3, 36\): D=37"):
        Modulation(D, True)(torch.randn(B, D - 1))
    with pytest.raises(ValueError, match=r"vec must be \(B, Dc\), got shape \(3, 4\): Dc=5"):
        AdaLayerNorm(D, 5)(torch.randn(B, 2, D), torch.randn(B, 4))
    with pytest.raises(ValueError, match=r"x must be \(B, T, D\), got shape \(3, 2, 36\): D=37"):
        AdaLayerNorm(D, 5)(torch.randn(B, 2, D - 1), torch.randn(B, 5))
