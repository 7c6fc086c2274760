"""Tests for vermeil.interop.diffusers_flux: a random diffusers FluxTransformer2DModel converted to Flux gives the
same outputs and input gradients (float32, 1e-4), the way back reproduces diffusers' state dict exactly, and the
strict key check names what does not line up."""

# Shapes: B batch, Lc condition (txt) tokens, Ld data (img) tokens, A = 3 position axes.

from collections.abc import Iterator

import pytest
import torch
from torch.testing import assert_close

from vermeil.interop.diffusers_flux import flux_params_from_diffusers, from_diffusers, to_diffusers
from vermeil.models.flux import Flux

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread, since OpenMP wake-ups cost more than the work on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


B, LC, LD = 2, 5, 9  # odd lengths
CONFIG = dict(
    patch_size=1,
    in_channels=5,
    out_channels=3,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=24,  # = sum(axes_dims_rope)
    num_attention_heads=2,
    joint_attention_dim=7,
    pooled_projection_dim=6,
    axes_dims_rope=(4, 10, 10),
)


def make_transformer(guidance: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    t = diffusers.FluxTransformer2DModel(**CONFIG, guidance_embeds=guidance).eval()
    with torch.no_grad():  # random everything, norm weights included (ones would hide a swap)
        for p in t.parameters():
            p.normal_(0.0, 0.2)
    return t


def make_inputs(guidance: bool) -> dict:
    g = torch.Generator().manual_seed(3)
    return dict(
        hidden_states=torch.randn(B, LD, 5, generator=g),
        encoder_hidden_states=torch.randn(B, LC, 7, generator=g),
        pooled_projections=torch.randn(B, 6, generator=g),
        timestep=torch.rand(B, generator=g),  # in [0, 1]: diffusers multiplies by 1000, as BFL
        img_ids=torch.randint(0, 16, (LD, 3), generator=g).float(),
        txt_ids=torch.randint(0, 16, (LC, 3), generator=g).float(),
        guidance=(1 + 4 * torch.rand(B, generator=g)) if guidance else None,
    )


def run_ours(model: Flux, x: dict) -> torch.Tensor:
    return model(
        x["hidden_states"],
        x["img_ids"][None],  # diffusers' ids are batch-shared (L, A); ours are (B|1, L, A)
        x["encoder_hidden_states"],
        x["txt_ids"][None],
        x["timestep"],
        x["pooled_projections"],
        guidance=x["guidance"],
    )


def run_diffusers(transformer: torch.nn.Module, x: dict) -> torch.Tensor:
    return transformer(**x, return_dict=False)[0]


@pytest.mark.parametrize("guidance", [False, True])
def test_from_diffusers_matches_outputs(guidance: bool) -> None:
    transformer = make_transformer(guidance)
    model = from_diffusers(transformer).eval()
    assert model.params.guidance_embed is guidance
    x = make_inputs(guidance)
    with torch.no_grad():
        expected = run_diffusers(transformer, x)
        out = run_ours(model, x)
    assert out.shape == (B, LD, 3)
    assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_from_diffusers_matches_input_gradients() -> None:
    transformer = make_transformer(True)
    model = from_diffusers(transformer)
    x = make_inputs(True)
    grads = []
    for run, net in ((run_diffusers, transformer), (run_ours, model)):
        h = x["hidden_states"].clone().requires_grad_()
        c = x["encoder_hidden_states"].clone().requires_grad_()
        run(net, {**x, "hidden_states": h, "encoder_hidden_states": c}).square().sum().backward()
        grads.append((h.grad, c.grad))
    assert_close(grads[1][0], grads[0][0], atol=1e-3, rtol=1e-4)
    assert_close(grads[1][1], grads[0][1], atol=1e-3, rtol=1e-4)


def test_final_modulation_halves_are_swapped() -> None:
    transformer = make_transformer(False)
    model = from_diffusers(transformer)
    dif = transformer.norm_out.linear.weight  # (scale, shift)
    ours = model.final_layer.adaLN_modulation[1].weight  # (shift, scale)
    assert_close(ours[:48], dif[48:], atol=0, rtol=0)
    assert_close(ours[48:], dif[:48], atol=0, rtol=0)


@pytest.mark.parametrize("guidance", [False, True])
def test_to_diffusers_round_trip(guidance: bool) -> None:
    transformer = make_transformer(guidance)
    back = to_diffusers(from_diffusers(transformer))
    assert dict(back.config)["guidance_embeds"] is guidance
    original, again = transformer.state_dict(), back.state_dict()
    assert original.keys() == again.keys()
    for key in original:
        assert_close(again[key], original[key], atol=0, rtol=0, msg=key)


def test_params_from_config() -> None:
    p = flux_params_from_diffusers(make_transformer(True).config)
    assert (p.hidden_size, p.num_heads, p.depth, p.depth_single_blocks) == (48, 2, 2, 2)
    assert (p.in_channels, p.out_channels, p.context_in_dim, p.vec_in_dim) == (5, 3, 7, 6)
    assert p.axes_dim == [4, 10, 10] and p.guidance_embed


def test_dtype_argument() -> None:
    model = from_diffusers(make_transformer(False), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


class _Edited(torch.nn.Module):
    """A transformer stand-in with an edited state dict (the converter reads only .config and .state_dict())."""

    def __init__(self, transformer: torch.nn.Module, drop: str | None = None, add: str | None = None) -> None:
        super().__init__()
        self.config = transformer.config
        self._state = dict(transformer.state_dict())
        if drop:
            del self._state[drop]
        if add:
            self._state[add] = torch.zeros(1)

    def state_dict(self, *args, **kwargs) -> dict:  # noqa: ANN002, ANN003
        return self._state


def test_strict_key_check_names_missing_and_unused_keys() -> None:
    transformer = make_transformer(False)
    with pytest.raises(ValueError, match=r"missing: \['transformer_blocks.1.attn.to_k.bias'\]"):
        from_diffusers(_Edited(transformer, drop="transformer_blocks.1.attn.to_k.bias"))
    with pytest.raises(ValueError, match=r"not used: \['extra.weight'\]"):
        from_diffusers(_Edited(transformer, add="extra.weight"))


def test_shape_mismatch_is_named() -> None:
    edited = _Edited(make_transformer(False))
    edited._state["proj_out.weight"] = torch.zeros(4, 48)
    with pytest.raises(ValueError, match=r"final_layer.linear.weight: shape \(4, 48\)"):
        from_diffusers(edited)


@pytest.mark.parametrize(
    "options",
    [
        dict(axes_dim=[8, 16]),  # two position axes
        dict(axes_dim=[2, 2, 2, 18]),  # four
        dict(num_heads=4, axes_dim=[4, 4, 4]),  # head dim 12
        dict(depth=0),  # single-stream blocks only
        dict(depth_single_blocks=0),  # double-stream blocks only
        dict(qkv_bias=False),  # diffusers has the biases: zeros
        dict(guidance_embed=True, in_channels=1, context_in_dim=1, vec_in_dim=1),
    ],
)
def test_non_default_flux_to_diffusers_and_back(options: dict) -> None:
    """Flux -> diffusers matches outputs for options beside the tested default; back gives the same tensors."""
    from vermeil.models.flux import FluxParams

    base = dict(in_channels=5, out_channels=3, vec_in_dim=6, context_in_dim=7, hidden_size=48, mlp_ratio=4.0)
    base |= dict(num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 10, 10], theta=10_000)
    params = FluxParams(**{**base, "qkv_bias": True, "guidance_embed": False, **options})
    torch.manual_seed(0)
    model = Flux(params).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    transformer = to_diffusers(model).eval()
    g = torch.Generator().manual_seed(1)
    n_axes = len(params.axes_dim)
    x = dict(
        hidden_states=torch.randn(B, LD, params.in_channels, generator=g),
        encoder_hidden_states=torch.randn(B, LC, params.context_in_dim, generator=g),
        pooled_projections=torch.randn(B, params.vec_in_dim, generator=g),
        timestep=torch.rand(B, generator=g),
        img_ids=torch.randint(0, 16, (LD, n_axes), generator=g).float(),
        txt_ids=torch.randint(0, 16, (LC, n_axes), generator=g).float(),
        guidance=(1 + 4 * torch.rand(B, generator=g)) if params.guidance_embed else None,
    )
    with torch.no_grad():
        assert_close(run_ours(model, x), run_diffusers(transformer, x), atol=1e-5, rtol=1e-5)
    ours, again = model.state_dict(), from_diffusers(transformer).state_dict()
    for key, value in again.items():
        expected = ours.get(key, torch.zeros_like(value))  # qkv_bias=False: the zero biases
        assert_close(value, expected, atol=0, rtol=0, msg=key)
    assert set(ours) <= set(again)


def test_package_level_converters_dispatch_both_ways() -> None:
    """`vermeil.interop.from_diffusers` / `to_diffusers` as the transformers pair: by class, refusing others."""
    from vermeil import interop

    transformer = make_transformer(False)
    model = interop.from_diffusers(transformer)
    assert isinstance(model, Flux)
    back = interop.to_diffusers(model)
    assert type(back).__name__ == "FluxTransformer2DModel"
    for key, value in transformer.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"to_diffusers: Linear is not supported; supported: \['Flux'\]"):
        interop.to_diffusers(torch.nn.Linear(2, 2))
