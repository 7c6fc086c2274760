"""Samplers with one signature, `sample_x(model_fn, noise, timesteps, *, cond, guidance, callback)`: DDPM, DDIM
(and its inversion) step for step as diffusers' schedulers; rectified-flow Euler (BFL flux `denoise`) and Heun.

`model_fn(x, t, **cond)`: t is (B,), integer steps for DDPM/DDIM, floats in [0, 1] for flow; `guidance` is passed
on as a (B,) `guidance=` (for classifier-free guidance see `cfg_model_fn`). `callback(i, t, x)` runs after step i
with its starting timestep (0-d) and the updated x (diffusers' legacy callback). Samplers run under no_grad
(k-diffusion); to differentiate through sampling, call the step formulas yourself.
"""

# Shapes: B batch, then any data axes (*); x and noise: (B, *). K number of sampling steps.

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from vermeil.diffusion.losses import ModelFn, PredictionType, _model_kwargs, _randn, prediction_to_x0_eps
from vermeil.diffusion.schedules import _check_prediction_type

Callback = Callable[[int, Tensor, Tensor], None]

__all__ = ["Callback", "invert_ddim", "sample_ddim", "sample_ddpm", "sample_euler", "sample_heun"]


def _check_timesteps(timesteps: Tensor, min_len: int, what: str) -> None:
    if timesteps.dim() != 1 or timesteps.shape[0] < min_len:
        raise ValueError(
            f"timesteps must be 1-D with at least {min_len} entries ({what}), got {tuple(timesteps.shape)}"
        )


def _check_ddpm_args(
    timesteps: Tensor, alphas_cumprod: Tensor, prediction_type: str, clip_sample: float | None = None
) -> list[int]:
    _check_timesteps(timesteps, 1, "K integer steps, descending")
    if alphas_cumprod.dim() != 1:
        raise ValueError(f"alphas_cumprod must be 1-D (N,), got shape {tuple(alphas_cumprod.shape)}")
    if clip_sample is not None and not clip_sample > 0:
        raise ValueError(
            f"clip_sample={clip_sample} must be > 0 (x_0 is clamped to [-clip_sample, clip_sample])"
        )
    if timesteps.is_floating_point():
        raise ValueError(
            f"timesteps must be integer indices into alphas_cumprod, got dtype {timesteps.dtype}"
        )
    _check_prediction_type(prediction_type)
    # One host read of K integers up front; the loop then branches on Python ints, never on device values.
    steps = timesteps.tolist()
    n = alphas_cumprod.shape[0]
    if any(not 0 <= s < n for s in steps):
        raise ValueError(f"timesteps must lie in [0, {n - 1}] (len(alphas_cumprod)), got {steps}")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {steps}")
    return steps


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn,
    noise: Tensor,
    timesteps: Tensor,
    *,
    alphas_cumprod: Tensor,
    cond: Mapping[str, Any] | None = None,
    guidance: Tensor | float | None = None,
    callback: Callback | None = None,
    prediction_type: PredictionType = "epsilon",
    variance: Literal["fixed_small", "fixed_large"] = "fixed_small",
    clip_sample: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral DDPM (Ho et al. 2020, eq. 7; diffusers DDPMScheduler.step): x_T (B, *) -> x_0 (B, *).

    Steps from t to the next entry of `timesteps` (alpha_bar = 1 after the last), so skipped-step grids work as
    in diffusers. Noise is added at every step with t > 0.

    Args:
        timesteps: (K,) integer steps, strictly descending (e.g. `ddpm_timesteps(K, N)`).
        alphas_cumprod: (N,) the training schedule.
        variance: "fixed_small" (posterior variance beta~_t, diffusers default) or "fixed_large" (beta_t).
        clip_sample: clamp predicted x_0 to [-clip_sample, clip_sample] (diffusers clip_sample_range) or None.
        generator: the same seed as a diffusers run gives the same samples.
    """
    steps = _check_ddpm_args(timesteps, alphas_cumprod, prediction_type, clip_sample)
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance={variance!r} must be 'fixed_small' or 'fixed_large'")
    ac = alphas_cumprod.to(noise.device)
    a_prevs = [ac[s] for s in steps[1:]] + [ac.new_tensor(1.0)]  # alpha_bar = 1 after the last step
    kwargs = _model_kwargs(cond, guidance, noise)
    x = noise
    for i, (t, a_prev) in enumerate(zip(steps, a_prevs)):
        a_t = ac[t]
        beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha

        out = model_fn(x, timesteps[i].to(x.device).expand(x.shape[0]), **kwargs)
        x0, _ = prediction_to_x0_eps(x, out, a_t, prediction_type)
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        # Posterior mean, DDPM eq. 7.
        mean = (a_prev**0.5 * cur_beta / beta_prod_t) * x0 + (
            cur_alpha**0.5 * beta_prod_prev / beta_prod_t
        ) * x
        if t > 0:
            var = torch.clamp(beta_prod_prev / beta_prod_t * cur_beta, min=1e-20)
            if variance == "fixed_large":
                var = cur_beta
            x = mean + var**0.5 * _randn(out, generator)
        else:
            x = mean
        if callback is not None:
            callback(i, timesteps[i], x)
    return x


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    noise: Tensor,
    timesteps: Tensor,
    *,
    alphas_cumprod: Tensor,
    cond: Mapping[str, Any] | None = None,
    guidance: Tensor | float | None = None,
    callback: Callback | None = None,
    prediction_type: PredictionType = "epsilon",
    eta: float = 0.0,
    clip_sample: float | None = None,
    final_alpha_cumprod: float | None = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 and 16; diffusers DDIMScheduler.step): x_T (B, *) -> x_0 (B, *).

    eta = 0 is the deterministic sampler, eta = 1 has DDPM's posterior variance. Steps from t to the next entry
    of `timesteps` (K,), strictly descending; after the last, to `final_alpha_cumprod` (1.0: diffusers
    `set_alpha_to_one=True`; None: alphas_cumprod[0]). With "leading" spacing this is diffusers'
    `prev = t - N // K`.
    """
    steps = _check_ddpm_args(timesteps, alphas_cumprod, prediction_type, clip_sample)
    if not eta >= 0:
        raise ValueError(f"eta={eta} must be >= 0")
    ac = alphas_cumprod.to(noise.device)
    final = ac[0] if final_alpha_cumprod is None else ac.new_tensor(final_alpha_cumprod)
    a_prevs = [ac[s] for s in steps[1:]] + [final]
    kwargs = _model_kwargs(cond, guidance, noise)
    x = noise
    for i, (t, a_prev) in enumerate(zip(steps, a_prevs)):
        a_t = ac[t]
        out = model_fn(x, timesteps[i].to(x.device).expand(x.shape[0]), **kwargs)
        x0, eps = prediction_to_x0_eps(x, out, a_t, prediction_type)
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        # sigma_t(eta) of DDIM eq. 16.
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * _randn(out, generator)
        if callback is not None:
            callback(i, timesteps[i], x)
    return x


@torch.no_grad()
def invert_ddim(
    model_fn: ModelFn,
    x0: Tensor,
    timesteps: Tensor,
    *,
    alphas_cumprod: Tensor,
    cond: Mapping[str, Any] | None = None,
    guidance: Tensor | float | None = None,
    callback: Callback | None = None,
    prediction_type: PredictionType = "epsilon",
    initial_alpha_cumprod: float | None = 1.0,
) -> Tensor:
    """DDIM inversion (eta = 0 backwards, diffusers DDIMInverseScheduler): data x0 (B, *) -> x at timesteps[0].

    Walks `sample_ddim`'s descending `timesteps` upwards from alpha_bar = `initial_alpha_cumprod` (None:
    alphas_cumprod[0]), evaluating the model at the current x with the step's target timestep: exact only when
    the prediction is constant over a step, so the round-trip error is first order in the step size.
    """
    steps = _check_ddpm_args(timesteps, alphas_cumprod, prediction_type)
    ac = alphas_cumprod.to(x0.device)
    a_cur = ac[0] if initial_alpha_cumprod is None else ac.new_tensor(initial_alpha_cumprod)
    kwargs = _model_kwargs(cond, guidance, x0)
    x = x0
    for j, i in enumerate(range(len(steps) - 1, -1, -1)):
        a_next = ac[steps[i]]
        out = model_fn(x, timesteps[i].to(x.device).expand(x.shape[0]), **kwargs)
        x0_hat, eps = prediction_to_x0_eps(x, out, a_cur, prediction_type)
        x = a_next**0.5 * x0_hat + (1 - a_next) ** 0.5 * eps
        a_cur = a_next
        if callback is not None:
            callback(j, timesteps[i], x)
    return x


def _integrate(
    model_fn: ModelFn,
    noise: Tensor,
    timesteps: Tensor,
    cond: Mapping[str, Any] | None,
    guidance: Tensor | float | None,
    callback: Callback | None,
    heun: bool,
    last_step_euler: bool = True,
) -> Tensor:
    """The loop of both flow samplers: x + h v(x, t) with h = t_prev - t_curr, trapezoid-corrected for `heun`."""
    _check_timesteps(timesteps, 2, "a grid of K + 1 times from 1 towards 0")
    if not timesteps.is_floating_point():
        raise ValueError(f"timesteps must be floats in [0, 1], got dtype {timesteps.dtype}")
    # One host read of the grid, as BFL's `timesteps.tolist()`: the step h is a Python float (the difference in
    # float64), which multiplies v at full precision. A 0-d tensor h would be cast to a bfloat16 x's dtype first
    # (up to 2^-9 relative error per step, no longer summing to t_K - t_0).
    times = timesteps.tolist()
    ts = timesteps.to(noise.device)  # the callback's 0-d timesteps
    kwargs = _model_kwargs(cond, guidance, noise)
    b = noise.shape[0]
    x = noise
    k = len(times) - 1

    def t_vec(t: float) -> Tensor:
        return torch.full((b,), t, dtype=x.dtype, device=x.device)  # BFL's t_vec

    for i in range(k):
        t_curr, t_prev = times[i], times[i + 1]
        h = t_prev - t_curr
        v = model_fn(x, t_vec(t_curr), **kwargs)
        if heun and not (last_step_euler and i == k - 1):
            v2 = model_fn(x + h * v, t_vec(t_prev), **kwargs)
            x = x + h * (v + v2) / 2
        else:
            x = x + h * v
        if callback is not None:
            callback(i, ts[i], x)
    return x


@torch.no_grad()
def sample_euler(
    model_fn: ModelFn,
    noise: Tensor,
    timesteps: Tensor,
    *,
    cond: Mapping[str, Any] | None = None,
    guidance: Tensor | float | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Flow-matching Euler, x <- x + (t_prev - t_curr) v (BFL `denoise`, diffusers FlowMatchEulerDiscreteScheduler).

    noise (B, *) at timesteps[0] -> x at timesteps[-1]; timesteps: (K + 1,), e.g. `get_schedule(K, seq_len)`;
    v ≈ noise - x_0, t: (B,) in x's dtype.
    """
    return _integrate(model_fn, noise, timesteps, cond, guidance, callback, heun=False)


@torch.no_grad()
def sample_heun(
    model_fn: ModelFn,
    noise: Tensor,
    timesteps: Tensor,
    *,
    cond: Mapping[str, Any] | None = None,
    guidance: Tensor | float | None = None,
    callback: Callback | None = None,
    last_step_euler: bool = True,
) -> Tensor:
    """Flow-matching Heun (Karras et al. 2022, Algorithm 1 without churn), as `sample_euler` but second order.

    x' = x + h v(x, t); x <- x + h (v(x, t) + v(x', t_prev)) / 2. The last step is Euler when `last_step_euler`
    (k-diffusion's choice; saves a call at t = 0, keeps global order 2): 2K - 1 model calls for K steps.
    """
    return _integrate(model_fn, noise, timesteps, cond, guidance, callback, True, last_step_euler)
