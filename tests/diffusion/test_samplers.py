"""Tests for vermeil/diffusion/samplers.py and guidance.py: step-for-step parity with diffusers and BFL, exactness
and convergence order on flows with known solutions, Gaussian end-to-end checks, classifier-free guidance."""

# Shapes: B batch, L tokens, C channels; N training steps, K sampling steps.

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vermeil.diffusion.guidance import cfg_model_fn, drop_condition
from vermeil.diffusion.samplers import invert_ddim, sample_ddim, sample_ddpm, sample_euler, sample_heun
from vermeil.diffusion.schedules import alphas_cumprod, ddpm_betas, ddpm_timesteps, get_schedule

B, L, C = 3, 7, 5


def _ddpm_model(seed: int = 0):
    """A deterministic model_fn that depends on x and t (stands in for a trained network)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, C, generator=g) / C**0.5

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w) + (t.to(x.dtype)[:, None, None] / 1000) * 0.3

    return model_fn


def _record():
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    return calls, lambda i, t, x: calls.append((i, t.clone(), x.clone()))


# --- DDPM / DDIM against diffusers ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_matches_diffusers_step_for_step(prediction_type: str, variance: str, clip: bool) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        variance_type=variance,
        clip_sample=clip,
        clip_sample_range=1.5,
    )
    sched.set_timesteps(10)
    model_fn = _ddpm_model()
    torch.manual_seed(0)
    noise = torch.randn(B, L, C)

    g = torch.Generator().manual_seed(42)
    x, ref_traj = noise.clone(), []
    for t in sched.timesteps:
        x = sched.step(model_fn(x, t.expand(B)), t, x, generator=g).prev_sample
        ref_traj.append(x)

    calls, callback = _record()
    ours = sample_ddpm(
        model_fn,
        noise,
        ddpm_timesteps(10, 1000),
        alphas_cumprod=alphas_cumprod(ddpm_betas(1000, "scaled_linear", 0.00085, 0.012)),
        prediction_type=prediction_type,  # type: ignore[arg-type]
        variance=variance,  # type: ignore[arg-type]
        clip_sample=1.5 if clip else None,
        generator=torch.Generator().manual_seed(42),
        callback=callback,
    )
    assert_close(ours, x, rtol=1e-6, atol=1e-6)
    assert [i for i, _, _ in calls] == list(range(10))
    assert [int(t) for _, t, _ in calls] == sched.timesteps.tolist()
    for (_, _, xi), ri in zip(calls, ref_traj):
        assert_close(xi, ri, rtol=1e-6, atol=1e-6)


def test_ddpm_full_schedule_matches_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    n = 20
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=n, beta_schedule="squaredcos_cap_v2", clip_sample=False
    )
    model_fn = _ddpm_model(1)
    noise = torch.randn(B, L, C, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)
    x = noise.clone()
    for t in sched.timesteps:  # no set_timesteps: all N steps, N-1 .. 0
        x = sched.step(model_fn(x, t.expand(B)), t, x, generator=g).prev_sample
    ours = sample_ddpm(
        model_fn,
        noise,
        torch.arange(n - 1, -1, -1),
        alphas_cumprod=alphas_cumprod(ddpm_betas(n, "cosine")),
        generator=torch.Generator().manual_seed(7),
    )
    assert_close(ours, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_matches_diffusers_step_for_step(
    prediction_type: str, eta: float, set_alpha_to_one: bool
) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1
    )
    sched.set_timesteps(8)
    model_fn = _ddpm_model(2)
    noise = torch.randn(B, L, C, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(11)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model_fn(x, t.expand(B)), t, x, eta=eta, generator=g).prev_sample
    ours = sample_ddim(
        model_fn,
        noise,
        ddpm_timesteps(8, 1000, steps_offset=1),
        alphas_cumprod=alphas_cumprod(ddpm_betas(1000)),
        prediction_type=prediction_type,  # type: ignore[arg-type]
        eta=eta,
        final_alpha_cumprod=1.0 if set_alpha_to_one else None,
        generator=torch.Generator().manual_seed(11),
    )
    assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_ddim_clip_matches_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(clip_sample=True, clip_sample_range=0.5)
    sched.set_timesteps(5)
    model_fn = _ddpm_model(3)
    noise = torch.randn(B, L, C, generator=torch.Generator().manual_seed(3))
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model_fn(x, t.expand(B)), t, x).prev_sample
    ours = sample_ddim(model_fn, noise, sched.timesteps, alphas_cumprod=sched.alphas_cumprod, clip_sample=0.5)
    assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_ddim_eta0_is_deterministic_and_ignores_the_generator() -> None:
    model_fn = _ddpm_model()
    noise = torch.randn(B, L, C, generator=torch.Generator().manual_seed(0))
    ac, ts = alphas_cumprod(ddpm_betas(1000)), ddpm_timesteps(10)
    a = sample_ddim(model_fn, noise, ts, alphas_cumprod=ac, generator=torch.Generator().manual_seed(0))
    b = sample_ddim(model_fn, noise, ts, alphas_cumprod=ac, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = sample_ddim(
        model_fn, noise, ts, alphas_cumprod=ac, eta=1.0, generator=torch.Generator().manual_seed(1)
    )
    assert not torch.equal(a, c)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_invert_ddim_matches_diffusers_inverse_scheduler(
    prediction_type: str, set_alpha_to_one: bool
) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMInverseScheduler(
        prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=set_alpha_to_one
    )
    sched.set_timesteps(8)
    model_fn = _ddpm_model(4)
    x0 = torch.randn(B, L, C, generator=torch.Generator().manual_seed(4))
    x = x0.clone()
    for t in sched.timesteps:  # ascending
        x = sched.step(model_fn(x, t.expand(B)), t, x).prev_sample
    rec, callback = _record()
    ours = invert_ddim(
        model_fn,
        x0,
        ddpm_timesteps(8, 1000),
        alphas_cumprod=sched.alphas_cumprod,
        prediction_type=prediction_type,  # type: ignore[arg-type]
        initial_alpha_cumprod=1.0 if set_alpha_to_one else None,
        callback=callback,
    )
    assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert [int(t) for _, t, _ in rec] == sched.timesteps.tolist()


# --- Gaussian data with the exact model: samplers reach the true distribution ----------------------------------

M, S = 1.5, 0.4  # data N(M, S^2)


def _exact_eps(ac: torch.Tensor):
    """E[noise | x_t] for x_t = sqrt(a) x0 + sqrt(1 - a) noise, x0 ~ N(M, S^2): closed form."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ac.to(x.dtype)[t[0]]  # samplers pass one step for the whole batch
        return (1 - a).sqrt() / (a * S**2 + 1 - a) * (x - a.sqrt() * M)

    return model_fn


def _exact_x0(ac: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """The probability-flow map of the Gaussian: standardise x_t at step t, rescale to N(M, S^2)."""
    a = ac[t]
    return M + S * (x_t - a.sqrt() * M) / (a * S**2 + 1 - a).sqrt()


def test_ddpm_reaches_the_gaussian_target() -> None:
    ac = alphas_cumprod(ddpm_betas(1000)).double()
    n = 4000
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = sample_ddpm(_exact_eps(ac), noise, torch.arange(999, -1, -1), alphas_cumprod=ac, generator=gen)
    # Standard errors: mean S / sqrt(n) = 0.006, std S / sqrt(2n) = 0.0045. The fixed (posterior) variance
    # biases the std low by under 2% at 1000 steps; the tolerance covers it.
    assert abs(x.mean().item() - M) < 0.025
    assert abs(x.std().item() - S) < 0.02


def test_ddim_eta0_follows_the_probability_flow_at_first_order() -> None:
    ac = alphas_cumprod(ddpm_betas(1000)).double()
    noise = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for k in (100, 200):
        ts = torch.arange(k - 1, -1, -1) * (1000 // k) + (1000 // k - 1)  # "trailing": starts at 999
        x = sample_ddim(_exact_eps(ac), noise, ts, alphas_cumprod=ac)
        errs.append((x - _exact_x0(ac, noise, 999)).abs().max().item())
    assert errs[1] < 0.03
    assert 1.7 < errs[0] / errs[1] < 2.3, errs  # DDIM is a first-order solver of the probability-flow ODE


def test_ddim_eta0_round_trip_inverts_to_first_order() -> None:
    ac = alphas_cumprod(ddpm_betas(1000)).double()
    x0 = M + S * torch.randn(500, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for k in (50, 100):
        ts = ddpm_timesteps(k, 1000, "trailing")
        z = invert_ddim(_exact_eps(ac), x0, ts, alphas_cumprod=ac)
        x_rec = sample_ddim(_exact_eps(ac), z, ts, alphas_cumprod=ac)
        errs.append((x_rec - x0).abs().max().item())
        assert abs(z.std().item() - 1) < 0.05
    # The stated tolerance: 100 steps reconstruct every point to 0.1 (data std 0.4; mean error ~0.036), and the
    # error halves with the step size (inversion reuses each step's prediction, so it is first order).
    assert errs[1] < 0.1, errs
    assert 1.7 < errs[0] / errs[1] < 2.3, errs


def _gaussian_velocity(m: torch.Tensor, s: torch.Tensor):
    """Exact rectified-flow velocity E[noise - x0 | x_t = x] for x0 ~ N(m, s^2), noise ~ N(0, 1)."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(-1, *([1] * (x.dim() - 1)))
        var = (1 - tt) ** 2 * s**2 + tt**2
        return -m + (tt - (1 - tt) * s**2) / var * (x - (1 - tt) * m)

    return model_fn


@pytest.mark.parametrize("sampler,steps,tol", [("euler", 400, 0.04), ("heun", 50, 0.01)])
def test_flow_samplers_transport_gaussian_to_gaussian(sampler: str, steps: int, tol: float) -> None:
    m = torch.tensor([1.5, -0.5], dtype=torch.float64)
    s = torch.tensor([0.4, 2.0], dtype=torch.float64)
    n = 4000
    noise = torch.randn(n, 1, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fn = sample_euler if sampler == "euler" else sample_heun
    x = fn(_gaussian_velocity(m, s), noise, get_schedule(steps, 1024).double())
    # Per axis the flow map is monotone and affine: x0 = m + s * noise exactly, so compare point by point
    # (the error is discretisation only and grows with |noise|; tol covers 4-sigma tails).
    exact = m + s * noise
    assert_close(x, exact, rtol=0, atol=tol)
    assert_close(x.mean((0, 1)), exact.mean((0, 1)), rtol=0, atol=tol / 4)
    assert_close(x.std((0, 1)), exact.std((0, 1)), rtol=0.01, atol=0)
    # And the true distribution, within sampling error (standard error of the mean s / sqrt(n) <= 0.032).
    assert_close(x.mean((0, 1)), m, rtol=0, atol=0.1)
    assert_close(x.std((0, 1)), s, rtol=0.05, atol=0)


# --- Flow Euler against diffusers and BFL ----------------------------------------------------------------------


def _flow_model(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, C, generator=g) / C**0.5

    def model_fn(x: torch.Tensor, t: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        out = torch.sin(x @ w) * (1 + t.to(x.dtype)[:, None, None])
        if "guidance" in kw:
            out = out + kw["guidance"][:, None, None] * 0.01
        return out

    return model_fn


@pytest.mark.parametrize("num_steps,seq_len", [(4, 77), (28, 4096)])
def test_euler_matches_diffusers_flow_match_scheduler(num_steps: int, seq_len: int) -> None:
    diffusers = pytest.importorskip("diffusers")
    np = pytest.importorskip("numpy")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=calculate_shift(seq_len))
    model_fn = _flow_model()
    noise = torch.randn(B, L, C, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(model_fn(x, sched.sigmas[i].expand(B)), t, x).prev_sample
    ours = sample_euler(model_fn, noise, sched.sigmas)
    assert_close(ours, x, rtol=1e-6, atol=1e-6)
    ours_grid = sample_euler(model_fn, noise, get_schedule(num_steps, seq_len))
    assert_close(ours_grid, x, rtol=1e-5, atol=1e-5)


def test_euler_matches_bfl_denoise_with_guidance_and_cond() -> None:
    """A transcription of BFL `denoise` (model call with keyword conditioning and guidance_vec)."""
    base = _flow_model(1)
    seen = []

    def model_fn(
        x: torch.Tensor, t: torch.Tensor, *, y: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        seen.append((t, guidance))
        return base(x, t, guidance=guidance) + y[:, None, :]

    noise = torch.randn(B, L, C, generator=torch.Generator().manual_seed(1))
    y = torch.randn(B, C)
    timesteps = get_schedule(6, 512).tolist()
    img = noise.clone()
    guidance_vec = torch.full((B,), 4.0, dtype=img.dtype)
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        t_vec = torch.full((B,), t_curr, dtype=img.dtype)
        pred = model_fn(img, t_vec, y=y, guidance=guidance_vec)
        img = img + (t_prev - t_curr) * pred
    seen.clear()
    ours = sample_euler(model_fn, noise, get_schedule(6, 512), cond={"y": y}, guidance=4.0)
    assert_close(ours, img, rtol=1e-6, atol=1e-6)
    assert len(seen) == 6 and all(g.shape == (B,) and (g == 4.0).all() for _, g in seen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_euler_and_heun_match_bfl_denoise_bit_for_bit_in_low_and_high_precision(dtype: torch.dtype) -> None:
    """BFL steps by Python floats t_prev - t_curr (float64): a 0-d float32 step would be cast to bfloat16 first."""
    base = _flow_model(2)
    model_fn = lambda x, t: (base(x.float(), t.float()) * 3).to(x.dtype)  # noqa: E731
    noise = torch.randn(B, L, C, generator=torch.Generator().manual_seed(2)).to(dtype)
    grid = get_schedule(28, 4096)
    timesteps = grid.tolist()
    img = heun = noise.clone()
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        t_vec = torch.full((B,), t_curr, dtype=img.dtype)
        img = img + (t_prev - t_curr) * model_fn(img, t_vec)
        v = model_fn(heun, t_vec)
        v2 = model_fn(heun + (t_prev - t_curr) * v, torch.full((B,), t_prev, dtype=img.dtype))
        heun = heun + (t_prev - t_curr) * (v + v2) / 2
    assert torch.equal(sample_euler(model_fn, noise, grid), img)
    assert torch.equal(sample_heun(model_fn, noise, grid, last_step_euler=False), heun)


# --- Heun: exactness and order ---------------------------------------------------------------------------------


def test_heun_and_euler_are_exact_for_point_mass_transport() -> None:
    a = torch.tensor([[0.3, -2.0, 5.0]], dtype=torch.float64)  # data point
    b = torch.tensor([[1.0, 4.0, -1.0]], dtype=torch.float64)  # noise point
    v = lambda x, t: (b - a).expand_as(x)  # noqa: E731  straight-line OT velocity
    grid = get_schedule(5, 3000).double()
    assert_close(sample_euler(v, b, grid), a, rtol=0, atol=1e-14)
    assert_close(sample_heun(v, b, grid), a, rtol=0, atol=1e-14)


def test_heun_is_exact_for_time_linear_velocity() -> None:
    c0, c1 = 0.7, -2.3
    v = lambda x, t: (c0 + c1 * t.to(x.dtype)[:, None]).expand_as(x)  # noqa: E731
    x1 = torch.tensor([[1.0, -3.0]], dtype=torch.float64)
    grid = get_schedule(7, 900).double()  # BFL's float32 grid: its first entry may be 1 + 1 ulp
    t0, tk = grid[0].item(), grid[-1].item()
    exact = x1 - (c0 * (t0 - tk) + c1 * (t0**2 - tk**2) / 2)  # x(tk) = x(t0) - integral_tk^t0 v dt
    assert_close(sample_heun(v, x1, grid, last_step_euler=False), exact, rtol=0, atol=1e-13)
    # With the Euler last step, the only error is that step's: -c1 (t_{K-1} - t_K)^2 / 2.
    t_last = grid[-2].item()
    assert_close(sample_heun(v, x1, grid), exact - c1 * (t_last - tk) ** 2 / 2, rtol=0, atol=1e-13)
    assert not torch.allclose(sample_euler(v, x1, grid), exact, atol=1e-4)  # Euler is not exact here


def _nonlinear_flow():
    """dx/dt = sin(x) (1 + t): tan(x/2) scales by exp(G(t) - G(1)), G(t) = t + t^2/2."""
    v = lambda x, t: torch.sin(x) * (1 + t.to(x.dtype).reshape(-1, 1))  # noqa: E731
    x1 = torch.tensor([[-2.5, -1.0, 0.3, 2.0, 3.0]], dtype=torch.float64)
    exact = 2 * torch.atan(torch.tan(x1 / 2) * math.exp(-1.5))
    return v, x1, exact


@pytest.mark.parametrize("last_step_euler", [True, False])
@pytest.mark.parametrize("shifted", [False, True])
def test_heun_converges_at_second_order(last_step_euler: bool, shifted: bool) -> None:
    v, x1, exact = _nonlinear_flow()

    def err(k: int, fn, **kw) -> float:
        grid = get_schedule(k, 2048, shift=shifted).double()
        return (fn(v, x1, grid, **kw) - exact).abs().max().item()

    heun = [err(k, sample_heun, last_step_euler=last_step_euler) for k in (32, 64, 128)]
    euler = [err(k, sample_euler) for k in (32, 64, 128)]
    for coarse, fine in zip(heun, heun[1:]):
        assert 3.5 < coarse / fine < 4.5, heun
    for coarse, fine in zip(euler, euler[1:]):
        assert 1.8 < coarse / fine < 2.2, euler
    assert heun[-1] < 1e-3


def test_heun_model_calls_and_callback() -> None:
    calls = []
    v = lambda x, t: calls.append(t) or torch.zeros_like(x)  # noqa: E731
    grid = get_schedule(5, 256)
    rec, callback = _record()
    sample_heun(v, torch.zeros(2, 3), grid, callback=callback)
    assert len(calls) == 2 * 5 - 1
    assert [i for i, _, _ in rec] == list(range(5))
    assert_close(torch.stack([t for _, t, _ in rec]), grid[:-1])
    calls.clear()
    sample_heun(v, torch.zeros(2, 3), grid, last_step_euler=False)
    assert len(calls) == 2 * 5


# --- Classifier-free guidance ---------------------------------------------------------------------------------


def _cond_model():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(C, C, generator=g)
    calls = []

    def model_fn(
        x: torch.Tensor, t: torch.Tensor, *, ctx: torch.Tensor, y: torch.Tensor, **kw
    ) -> torch.Tensor:
        calls.append(x.shape[0])
        out = torch.tanh(x @ w + ctx.mean(1, keepdim=True)) * y[:, None, :1] + t[:, None, None]
        if "guidance" in kw:
            out = out * kw["guidance"][:, None, None]
        return out

    return model_fn, calls


def test_cfg_model_fn_scale_one_is_cond_and_zero_is_uncond() -> None:
    model_fn, calls = _cond_model()
    torch.manual_seed(0)
    x, t = torch.randn(B, L, C), torch.rand(B)
    cond = {"ctx": torch.randn(B, 4, C), "y": torch.randn(B, 2)}
    uncond = {"ctx": torch.zeros(B, 4, C), "y": torch.ones(B, 2)}
    c, u = model_fn(x, t, **cond), model_fn(x, t, **uncond)
    calls.clear()
    assert_close(cfg_model_fn(model_fn, cond, uncond, 1.0)(x, t), c, rtol=1e-6, atol=1e-6)
    assert calls == [2 * B]  # one batched call of 2B
    assert_close(cfg_model_fn(model_fn, cond, uncond, 0.0)(x, t), u, rtol=1e-6, atol=1e-6)
    guided = cfg_model_fn(model_fn, cond, uncond, 4.5)(x, t)
    assert_close(guided, u + 4.5 * (c - u), rtol=1e-5, atol=1e-5)
    calls.clear()
    unbatched = cfg_model_fn(model_fn, cond, uncond, 4.5, batched=False)(x, t)
    assert calls == [B, B]
    assert_close(unbatched, guided, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batched", [True, False])
def test_cfg_scale_one_and_zero_are_exactly_the_cond_and_uncond_predictions(batched: bool) -> None:
    """u + 1 * (c - u) rounds (|u| >> |c|): the ends of the guidance line must be the predictions themselves."""
    model_fn = lambda x, t, ctx: x * ctx + t[:, None]  # noqa: E731  rows independent: halves equal B calls
    x, t = torch.randn(B, 8, generator=torch.Generator().manual_seed(0)), torch.rand(B)
    cond = {"ctx": torch.randn(B, 8, generator=torch.Generator().manual_seed(1))}
    uncond = {"ctx": 1000 * torch.randn(B, 8, generator=torch.Generator().manual_seed(2))}
    assert torch.equal(
        cfg_model_fn(model_fn, cond, uncond, 1.0, batched=batched)(x, t), model_fn(x, t, **cond)
    )
    assert torch.equal(
        cfg_model_fn(model_fn, cond, uncond, 0.0, batched=batched)(x, t), model_fn(x, t, **uncond)
    )
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"scale={bad}.*finite"):
            cfg_model_fn(model_fn, cond, uncond, bad, batched=batched)


def test_cfg_inside_samplers_with_guidance_passthrough() -> None:
    model_fn, _ = _cond_model()
    torch.manual_seed(1)
    noise = torch.randn(B, L, C)
    cond = {"ctx": torch.randn(B, 4, C), "y": torch.randn(B, 2)}
    uncond = {"ctx": torch.zeros(B, 4, C), "y": torch.ones(B, 2)}
    grid = get_schedule(4, 256)
    guided = sample_euler(cfg_model_fn(model_fn, cond, uncond, 1.0), noise, grid, guidance=2.0)
    plain = sample_euler(model_fn, noise, grid, cond=cond, guidance=2.0)
    assert_close(guided, plain, rtol=1e-5, atol=1e-5)
    no_guidance = sample_euler(model_fn, noise, grid, cond=cond)
    assert not torch.allclose(plain, no_guidance)


def test_drop_condition() -> None:
    torch.manual_seed(0)
    cond = torch.randn(6, 4, C)
    null = torch.nn.Parameter(torch.zeros(4, C))
    keep = torch.tensor([True, False, True, True, False, False])
    out = drop_condition(cond, 0.5, null, keep=keep)
    assert_close(out[keep], cond[keep])
    assert (out[~keep] == 0).all()
    out.sum().backward()
    assert null.grad is not None and null.grad.sum() == 3 * 4 * C  # the learned null trains where used
    d = drop_condition(
        {"a": cond, "b": torch.randn(6, 2)}, 0.5, {"a": torch.zeros(C), "b": torch.ones(2)}, keep=keep
    )
    assert (d["a"][~keep] == 0).all() and (d["b"][~keep] == 1).all()
    assert torch.equal(drop_condition(cond, 0.0, null.detach()), cond)
    assert (drop_condition(cond, 1.0, null.detach()) == 0).all()
    big = drop_condition(
        torch.ones(10_000, 1), 0.1, torch.zeros(1), generator=torch.Generator().manual_seed(0)
    )
    assert abs((big == 0).float().mean().item() - 0.1) < 0.015


# --- Bad input -------------------------------------------------------------------------------------------------


def test_invalid_arguments_raise() -> None:
    model_fn = _ddpm_model()
    x = torch.randn(B, L, C)
    ac = alphas_cumprod(ddpm_betas(1000))
    with pytest.raises(ValueError, match="prediction_type='noise'"):
        sample_ddpm(model_fn, x, ddpm_timesteps(4), alphas_cumprod=ac, prediction_type="noise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="variance='learned'"):
        sample_ddpm(model_fn, x, ddpm_timesteps(4), alphas_cumprod=ac, variance="learned")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eta=-0.1"):
        sample_ddim(model_fn, x, ddpm_timesteps(4), alphas_cumprod=ac, eta=-0.1)
    with pytest.raises(ValueError, match="eta=nan"):
        sample_ddim(model_fn, x, ddpm_timesteps(4), alphas_cumprod=ac, eta=float("nan"))
    for fn in (sample_ddpm, sample_ddim):  # clamp(1, -1) would silently set every x_0 to -1
        with pytest.raises(ValueError, match="clip_sample=-1.0 must be > 0"):
            fn(model_fn, x, ddpm_timesteps(4), alphas_cumprod=ac, clip_sample=-1.0)
    with pytest.raises(ValueError, match=r"alphas_cumprod must be 1-D \(N,\), got shape \(1, 1000\)"):
        sample_ddim(model_fn, x, ddpm_timesteps(4), alphas_cumprod=ac[None])
    with pytest.raises(ValueError, match="strictly descending"):
        sample_ddim(model_fn, x, torch.tensor([0, 500]), alphas_cumprod=ac)
    with pytest.raises(ValueError, match=r"must lie in \[0, 999\]"):
        sample_ddpm(model_fn, x, torch.tensor([1000, 5]), alphas_cumprod=ac)
    with pytest.raises(ValueError, match="integer indices"):
        sample_ddpm(model_fn, x, torch.tensor([0.9, 0.5]), alphas_cumprod=ac)
    with pytest.raises(ValueError, match="floats in"):
        sample_euler(_flow_model(), x, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="at least 2 entries"):
        sample_heun(_flow_model(), x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="guidance given both"):
        sample_euler(_flow_model(), x, get_schedule(2, 256), cond={"guidance": 1.0}, guidance=2.0)
    with pytest.raises(ValueError, match="cond keys"):
        cfg_model_fn(model_fn, {"a": x}, {"b": x}, 2.0)
    with pytest.raises(ValueError, match="p=1.5"):
        drop_condition(x, 1.5, torch.zeros(C))
    with pytest.raises(
        ValueError, match=r"keep must be a bool \(B,\) = \(3,\) tensor, got torch.int64 \(3,\)"
    ):
        drop_condition(x, 0.5, torch.zeros(C), keep=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match=r"null\[''\] of shape \(4,\) must broadcast to one sample of cond"):
        drop_condition(x, 0.5, torch.zeros(4))
