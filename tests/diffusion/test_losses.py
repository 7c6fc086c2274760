"""Tests for vermeil/diffusion/losses.py: targets against diffusers, time sampling, masked losses."""

# Shapes: B batch, L tokens, C channels.

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vermeil.diffusion.losses import (
    add_noise,
    ddpm_target,
    diffusion_loss,
    flow_interpolate,
    flow_matching_loss,
    flow_target,
    masked_mse,
    prediction_to_x0_eps,
    sample_flow_timesteps,
    velocity,
)
from vermeil.diffusion.schedules import alphas_cumprod, ddpm_betas, get_lin_function, time_shift

B, L, C = 5, 7, 3


def _data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x0 = torch.randn(B, L, C, dtype=dtype)
    noise = torch.randn(B, L, C, dtype=dtype)
    t = torch.tensor([0, 1, 250, 998, 999])
    return x0, noise, t


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise_and_velocity_match_diffusers(kind: str, dtype: torch.dtype) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_schedule=kind)
    ours_kind = "cosine" if kind == "squaredcos_cap_v2" else kind
    ac = alphas_cumprod(ddpm_betas(1000, ours_kind))  # type: ignore[arg-type]
    x0, noise, t = _data(dtype)
    assert_close(add_noise(x0, noise, t, ac), sched.add_noise(x0, noise, t), rtol=0, atol=0)
    assert_close(velocity(x0, noise, t, ac), sched.get_velocity(x0, noise, t), rtol=0, atol=0)
    assert_close(
        ddpm_target(x0, noise, t, ac, "v_prediction"), sched.get_velocity(x0, noise, t), rtol=0, atol=0
    )
    assert ddpm_target(x0, noise, t, ac, "epsilon") is noise
    assert ddpm_target(x0, noise, t, ac, "sample") is x0
    assert ddpm_target(x0, noise, t, ac, "x0") is x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_prediction_to_x0_eps_inverts_the_targets(prediction_type: str) -> None:
    x0, noise, t = _data(torch.float64)
    ac = alphas_cumprod(ddpm_betas(1000)).double()
    x_t = add_noise(x0, noise, t, ac)
    target = ddpm_target(x0, noise, t, ac, prediction_type)  # type: ignore[arg-type]
    a = ac[t].reshape(B, 1, 1)
    x0_hat, eps_hat = prediction_to_x0_eps(x_t, target, a, prediction_type)  # type: ignore[arg-type]
    # t = 999 has alpha_bar ~ 4e-5, so x0 from eps loses digits: tolerances stated per conditioning.
    assert_close(x0_hat, x0, rtol=1e-7, atol=1e-7)
    assert_close(eps_hat, noise, rtol=1e-7, atol=1e-7)


def test_flow_interpolate_and_target() -> None:
    x0, noise, _ = _data(torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t = flow_interpolate(x0, noise, t)
    assert_close(x_t[0], x0[0])
    assert_close(x_t[-1], noise[-1])
    assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    # The target is d x_t / d t, checked by finite differences.
    h = 1e-6
    d = (flow_interpolate(x0, noise, t + h) - flow_interpolate(x0, noise, t - h)) / (2 * h)
    assert_close(flow_target(x0, noise), d, rtol=1e-6, atol=1e-6)


def test_flow_interpolate_matches_diffusers_scale_noise() -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(10)
    x0, noise, _ = _data()
    ts = sched.timesteps[[0, 3, 5, 7, 9]]
    ref = sched.scale_noise(x0, ts, noise)
    assert_close(flow_interpolate(x0, noise, ts / 1000), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "mode"])
def test_time_sampling_matches_diffusers_density(kind: str) -> None:
    pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ref = compute_density_for_timestep_sampling(
        kind, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29, generator=torch.Generator().manual_seed(3)
    )
    ours = sample_flow_timesteps(
        64, kind, logit_mean=0.3, logit_std=1.2, mode_scale=1.29, generator=torch.Generator().manual_seed(3)
    )  # type: ignore[arg-type]
    assert_close(ours, ref, rtol=0, atol=0)
    assert ((ours >= 0) & (ours <= 1)).all()


def test_logit_normal_has_the_right_moments_in_logit_space() -> None:
    g = torch.Generator().manual_seed(0)
    n, m, s = 200_000, -0.4, 0.8
    t = sample_flow_timesteps(n, "logit_normal", logit_mean=m, logit_std=s, generator=g, dtype=torch.float64)
    logit = torch.log(t) - torch.log1p(-t)
    # Standard error of the mean is s / sqrt(n) ~ 0.0018; 5 standard errors of tolerance.
    assert abs(logit.mean().item() - m) < 5 * s / math.sqrt(n)
    assert abs(logit.std().item() - s) < 0.01


def test_shift_applied_equals_time_shift_with_inference_mu() -> None:
    seq_len = 1024
    u = sample_flow_timesteps(33, "logit_normal", generator=torch.Generator().manual_seed(1))
    shifted = sample_flow_timesteps(
        33, "logit_normal", seq_len=seq_len, generator=torch.Generator().manual_seed(1)
    )
    mu = get_lin_function(y1=0.5, y2=1.15)(seq_len)
    assert_close(shifted, time_shift(mu, 1.0, u))
    assert (shifted > u).all()  # the shift moves training times towards noise, as at inference
    not_shifted = sample_flow_timesteps(
        33, "logit_normal", seq_len=seq_len, shift=False, generator=torch.Generator().manual_seed(1)
    )
    assert_close(not_shifted, u, rtol=0, atol=0)
    static = sample_flow_timesteps(
        33, "uniform", mu=math.log(3.0), generator=torch.Generator().manual_seed(1)
    )
    u2 = sample_flow_timesteps(33, "uniform", generator=torch.Generator().manual_seed(1))
    assert_close(static, 3 * u2 / (1 + 2 * u2))


def test_masked_mse_ignores_padding() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(B, L, C), torch.randn(B, L, C)
    lengths = torch.tensor([7, 3, 5, 1, 6])
    mask = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)
    expected = torch.cat(
        [((pred[b, :n] - target[b, :n]) ** 2).flatten() for b, n in enumerate(lengths)]
    ).mean()
    assert_close(masked_mse(pred, target, mask), expected)
    # Garbage in padded positions changes nothing.
    pred2 = torch.where(mask[..., None], pred, torch.full_like(pred, 1e6))
    assert_close(masked_mse(pred2, target, mask), expected)
    assert_close(masked_mse(pred, target), torch.nn.functional.mse_loss(pred, target))
    assert masked_mse(pred, target, torch.zeros(B, L, dtype=torch.bool)) == 0


def test_masked_mse_ignores_non_finite_padding_in_value_and_gradient() -> None:
    """Padding may hold anything (torch.empty, inf from a masked-out branch): loss and gradient stay finite."""
    torch.manual_seed(0)
    pred, target = torch.randn(B, L, C), torch.randn(B, L, C)
    mask = torch.arange(L)[None, :] < torch.tensor([7, 3, 5, 1, 6])[:, None]  # (B, L)
    expected = masked_mse(pred, target, mask)
    for bad in (float("nan"), float("inf")):
        pred2 = torch.where(mask[..., None], pred, bad).requires_grad_()
        target2 = torch.where(mask[..., None], target, -bad)
        loss = masked_mse(pred2, target2, mask)
        assert_close(loss, expected)
        loss.backward()
        assert torch.isfinite(pred2.grad).all() and (pred2.grad[~mask] == 0).all()


def test_flow_matching_loss_is_zero_for_the_exact_velocity_and_respects_masks() -> None:
    torch.manual_seed(0)
    x0, noise = torch.randn(B, L, C), torch.randn(B, L, C)
    t = torch.rand(B)
    seen = {}

    def oracle(x: torch.Tensor, tt: torch.Tensor, *, y: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        seen["y"], seen["guidance"], seen["t"] = y, guidance, tt
        # Recover x0 from x_t with the known noise: the exact velocity for this pair.
        return (x - (1 - tt[:, None, None]) * x0) / tt[:, None, None] - x0

    y = torch.randn(B, 4)
    loss = flow_matching_loss(oracle, x0, noise=noise, t=t, cond={"y": y}, guidance=3.5)
    assert loss < 1e-10
    assert seen["y"] is y and seen["guidance"].shape == (B,) and (seen["guidance"] == 3.5).all()
    assert_close(seen["t"], t)

    def zero(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, 4:] = False
    masked = flow_matching_loss(zero, x0, noise=noise, t=t, mask=mask)
    assert_close(masked, ((noise - x0)[:, :4] ** 2).mean())


def test_flow_matching_loss_samples_shifted_times_when_t_is_none() -> None:
    torch.manual_seed(0)
    x0 = torch.randn(64, L, C)
    seen = {}

    def model(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        seen["t"] = tt
        return torch.zeros_like(x)

    flow_matching_loss(
        model, x0, kind="logit_normal", seq_len=4096, generator=torch.Generator().manual_seed(5)
    )
    ref = sample_flow_timesteps(64, "logit_normal", seq_len=4096, generator=_after_randn(x0.shape, 5))
    assert_close(seen["t"], ref)


def _after_randn(shape: torch.Size, seed: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=g)  # the loss draws its noise first
    return g


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_diffusion_loss_matches_hand_computation(prediction_type: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(prediction_type=prediction_type)
    ac = sched.alphas_cumprod
    x0, noise, t = _data()
    w = torch.randn(C, C)

    def model(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return x @ w + tt[:, None, None].float() / 1000

    loss = diffusion_loss(model, x0, ac, prediction_type=prediction_type, noise=noise, t=t)  # type: ignore[arg-type]
    x_t = sched.add_noise(x0, noise, t)
    target = {"epsilon": noise, "sample": x0, "v_prediction": sched.get_velocity(x0, noise, t)}[
        prediction_type
    ]
    assert_close(loss, torch.nn.functional.mse_loss(model(x_t, t), target))


def test_diffusion_loss_draws_noise_and_t_reproducibly() -> None:
    x0, _, _ = _data()
    ac = alphas_cumprod(ddpm_betas(100))

    def model(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return x * 0.5

    a = diffusion_loss(model, x0, ac, generator=torch.Generator().manual_seed(0))
    b = diffusion_loss(model, x0, ac, generator=torch.Generator().manual_seed(0))
    c = diffusion_loss(model, x0, ac, generator=torch.Generator().manual_seed(1))
    assert a == b and a != c and a.dim() == 0


def test_losses_backpropagate() -> None:
    torch.manual_seed(0)
    x0 = torch.randn(B, L, C, dtype=torch.float64)
    lin = torch.nn.Linear(C, C, dtype=torch.float64)

    def model(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return lin(x) * tt[:, None, None].to(x.dtype)

    loss = flow_matching_loss(model, x0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_float64_losses_stay_float64_and_pass_gradcheck() -> None:
    """float32 data keeps a float32 loss; float64 data is not rounded to float32 (gradcheck needs the exact loss)."""
    x0, noise, _ = _data(torch.float64)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, -2:] = False
    pred = torch.randn_like(x0, requires_grad=True)
    assert masked_mse(pred, noise, mask).dtype == torch.float64
    assert masked_mse(pred.float(), noise.float(), mask).dtype == torch.float32
    assert torch.autograd.gradcheck(lambda p: masked_mse(p, noise, mask), (pred,))
    t = torch.rand(B, dtype=torch.float64)
    w = torch.randn(C, C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w: flow_matching_loss(lambda x, tt: x @ w, x0, noise=noise, t=t, mask=mask), (w,)
    )


def test_invalid_arguments_raise_naming_the_value() -> None:
    x0, noise, t = _data()
    ac = alphas_cumprod(ddpm_betas(1000))
    with pytest.raises(ValueError, match="kind='beta'"):
        sample_flow_timesteps(4, "beta")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch=0"):
        sample_flow_timesteps(0)
    with pytest.raises(ValueError, match="logit_std=0"):
        sample_flow_timesteps(4, "logit_normal", logit_std=0.0)
    with pytest.raises(ValueError, match=r"mode_scale=2.0 must be in \[-1, 2 / \(pi - 2\)"):
        sample_flow_timesteps(4, "mode", mode_scale=2.0)  # t would leave [0, 1]
    with pytest.raises(ValueError, match="seq_len=0"):
        sample_flow_timesteps(4, seq_len=0, shift=False)
    with pytest.raises(ValueError, match="mu=1.0 or seq_len=256"):
        sample_flow_timesteps(4, mu=1.0, seq_len=256)
    with pytest.raises(ValueError, match="prediction_type='noise'"):
        ddpm_target(x0, noise, t, ac, "noise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        add_noise(x0, noise, t[:3], ac)
    with pytest.raises(ValueError, match="mask shape"):
        masked_mse(x0, noise, torch.ones(B, C, dtype=torch.bool))
    with pytest.raises(ValueError, match="guidance must be"):
        flow_matching_loss(lambda x, tt, guidance: x, x0, guidance=torch.ones(3))
