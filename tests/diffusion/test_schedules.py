"""Tests for vermeil/diffusion/schedules.py: parity with diffusers and with BFL's flux sampling.py."""

# Shapes: N training steps, K sampling steps.

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vermeil.diffusion.schedules import (
    alphas_cumprod,
    ddpm_betas,
    ddpm_timesteps,
    get_lin_function,
    get_schedule,
    log_snr,
    min_snr_weight,
    rescale_zero_terminal_snr,
    sigmas_from_alphas_cumprod,
    snr,
    time_shift,
)

DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


# --- A transcription of BFL flux/src/flux/sampling.py (the reference, written out here on purpose) ------------
def _bfl_time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def _bfl_get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15):
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def _bfl_get_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = _bfl_get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = _bfl_time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


# --- DDPM ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("num_steps", [1000, 37])
def test_betas_and_alphas_cumprod_match_diffusers(kind: str, num_steps: int) -> None:
    diffusers = pytest.importorskip("diffusers")
    kwargs = {"beta_start": 0.00085, "beta_end": 0.012} if kind == "scaled_linear" else {}
    ref = diffusers.DDPMScheduler(num_train_timesteps=num_steps, beta_schedule=DIFFUSERS_KIND[kind], **kwargs)
    betas = ddpm_betas(num_steps, kind, **kwargs)
    assert betas.dtype == torch.float32 and betas.shape == (num_steps,)
    assert_close(betas, ref.betas, rtol=0, atol=0)
    assert_close(alphas_cumprod(betas), ref.alphas_cumprod, rtol=0, atol=0)


def test_sigmoid_betas_match_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=97, beta_schedule="sigmoid")
    assert_close(ddpm_betas(97, "sigmoid"), ref.betas, rtol=0, atol=0)


def test_rescale_zero_terminal_snr_matches_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    ours = rescale_zero_terminal_snr(ddpm_betas(1000, "scaled_linear", 0.0001, 0.02))
    assert_close(ours, ref.betas, rtol=1e-6, atol=1e-7)
    assert alphas_cumprod(ours)[-1].abs() < 1e-12


def test_cosine_schedule_is_the_glide_formula() -> None:
    # Independent of diffusers: alpha_bar(t) = cos^2((t/N + s)/(1 + s) pi/2) / alpha_bar(0)-free ratio form.
    n = 50
    f = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
    expected = torch.tensor([f[i + 1] / f[0] for i in range(n)], dtype=torch.float64)
    got = alphas_cumprod(ddpm_betas(n, "cosine").double())
    # betas are capped at 0.999 only at the very end; compare all but the last step.
    assert_close(got[:-1], expected[:-1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("k", [1, 7, 50])
def test_ddpm_timesteps_match_diffusers(spacing: str, k: int) -> None:
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(k)
    ours = ddpm_timesteps(k, 1000, spacing, steps_offset=1 if spacing == "leading" else 0)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, ref.timesteps)


def test_snr_helpers() -> None:
    torch.manual_seed(0)
    ac = alphas_cumprod(ddpm_betas(37, "linear", 1e-3, 0.2)).double()
    s = snr(ac)
    assert_close(s, ac / (1 - ac))
    assert_close(log_snr(ac), torch.log(s))
    assert_close(sigmas_from_alphas_cumprod(ac), s.rsqrt())
    # Min-SNR weights against diffusers' training recipe (train_text_to_image.py): min(snr, g) / snr for eps.
    g = 5.0
    assert_close(min_snr_weight(s, g, "epsilon"), torch.stack([s, torch.full_like(s, g)]).min(0).values / s)
    assert_close(min_snr_weight(s, g, "v_prediction"), torch.clamp(s, max=g) / (s + 1))
    assert_close(min_snr_weight(s, g, "x0"), torch.clamp(s, max=g))


def test_min_snr_epsilon_weight_is_one_at_zero_terminal_snr() -> None:
    """Zero-terminal-SNR schedules end at snr = 0, where min(snr, g) / snr is 0 / 0; its limit (and diffusers'
    training scripts' `mse_loss_weights[snr == 0] = 1.0`) is 1, not NaN."""
    s = snr(alphas_cumprod(rescale_zero_terminal_snr(ddpm_betas(1000, "scaled_linear", 0.00085, 0.012))))
    assert s[-1] == 0
    w = min_snr_weight(s, 5.0, "epsilon")
    assert torch.isfinite(w).all() and w[-1] == 1
    assert_close(w[:-1], torch.clamp(s[:-1], max=5.0) / s[:-1], rtol=0, atol=0)


def test_snr_matches_diffusers_compute_snr() -> None:
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    sched = diffusers.DDPMScheduler()
    t = torch.tensor([0, 5, 499, 999])
    assert_close(snr(alphas_cumprod(ddpm_betas(1000)))[t], compute_snr(sched, t), rtol=1e-5, atol=0)


# --- Flow matching ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps,seq_len", [(1, 256), (4, 77), (28, 4096), (50, 1024), (13, 6000)])
@pytest.mark.parametrize("shift", [True, False])
def test_get_schedule_equals_bfl(num_steps: int, seq_len: int, shift: bool) -> None:
    ours = get_schedule(num_steps, seq_len, shift=shift)
    ref = torch.tensor(_bfl_get_schedule(num_steps, seq_len, shift=shift))
    assert ours.shape == (num_steps + 1,) and ours.dtype == torch.float32
    assert_close(ours, ref, rtol=0, atol=1e-6)
    assert ours[0] == 1 and ours[-1] == 0
    assert (ours[1:] < ours[:-1]).all()


@pytest.mark.parametrize("num_steps,seq_len", [(4, 77), (28, 4096), (50, 1024)])
def test_get_schedule_equals_diffusers_flow_match_sigmas(num_steps: int, seq_len: int) -> None:
    diffusers = pytest.importorskip("diffusers")
    np = pytest.importorskip("numpy")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type="exponential"
    )
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert mu == pytest.approx(get_lin_function(y1=0.5, y2=1.15)(seq_len), abs=1e-12)
    # The Flux pipeline's grid: linspace(1, 1/N, N), then the scheduler shifts it and appends 0.
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    assert_close(get_schedule(num_steps, seq_len), sched.sigmas, rtol=0, atol=1e-6)


def test_time_shift_equals_static_shift_and_fixed_points() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = 3.0
    assert_close(time_shift(math.log(s), 1.0, t), s * t / (1 + (s - 1) * t))
    assert_close(time_shift(0.7, 1.0, t), _bfl_time_shift(0.7, 1.0, t))
    assert_close(time_shift(0.7, 2.0, t), _bfl_time_shift(0.7, 2.0, t))
    assert time_shift(1.15, 1.0, torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]


def test_lin_function_reference_points() -> None:
    f = get_lin_function()
    assert f(256) == pytest.approx(0.5) and f(4096) == pytest.approx(1.15)
    # black-forest-labs/flux, src/flux/sampling.py: get_lin_function(y1=0.5, y2=1.15)
    assert math.exp(f(4096)) == pytest.approx(3.158, abs=1e-3)


# --- Bad input -------------------------------------------------------------------------------------------------


def test_invalid_arguments_raise_naming_the_value() -> None:
    with pytest.raises(ValueError, match="kind='cosine_v3'"):
        ddpm_betas(10, "cosine_v3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_steps=0"):
        ddpm_betas(0)
    for kind in (
        "linear",
        "scaled_linear",
        "sigmoid",
    ):  # beta >= 1 makes alpha_bar <= 0: NaN square roots later
        with pytest.raises(ValueError, match=r"beta_end=1.5 must be in \[0, 1\)"):
            ddpm_betas(10, kind, 1e-4, 1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"beta_start=-0.1 must be in \[0, 1\)"):
            ddpm_betas(10, kind, -0.1, 0.02)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_steps=0"):
        get_schedule(0, 256)
    with pytest.raises(ValueError, match="seq_len=0"):
        get_schedule(4, 0)
    with pytest.raises(ValueError, match="spacing='middle'"):
        ddpm_timesteps(4, 1000, "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_inference_steps=2000"):
        ddpm_timesteps(2000, 1000)
    with pytest.raises(ValueError, match="x1=3"):
        get_lin_function(x1=3, x2=3)
    with pytest.raises(ValueError, match="gamma=0"):
        min_snr_weight(torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="prediction_type='noise'"):
        min_snr_weight(torch.ones(2), 5.0, "noise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        alphas_cumprod(torch.ones(2, 3))
