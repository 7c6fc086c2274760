"""Samplers as functions with one signature: `sample_x(model_fn, noise, timesteps, *, cond, guidance, callback)`.

- `sample_ddpm`: ancestral DDPM (Ho et al. 2020, eq. 7), step for step diffusers DDPMScheduler.step.
- `sample_ddim`: DDIM with eta (Song et al. 2021, eq. 12 and 16), step for step diffusers DDIMScheduler.step;
  `invert_ddim` runs it backwards (data -> noise) as diffusers DDIMInverseScheduler.
- `sample_euler`: rectified-flow Euler, x <- x + (t_prev - t_curr) v (BFL flux `denoise`, diffusers
  FlowMatchEulerDiscreteScheduler.step).
- `sample_heun`: rectified-flow Heun (trapezoidal predictor-corrector, Karras et al. 2022, Algorithm 1 without
  churn); second order, with an Euler last step by default as k-diffusion.

`model_fn(x, t, **cond)` returns the model's prediction; t is a (B,) tensor (integer steps for DDPM/DDIM, floats
in [0, 1] for flow). When `guidance` is not None the samplers also pass `guidance=` as a (B,) tensor (BFL's
`guidance_vec` for guidance-distilled Flux). For classifier-free guidance wrap the model with
`vermeil.diffusion.guidance.cfg_model_fn`. `callback(i, t, x)` runs after step i with that step's (starting)
timestep t (a 0-d tensor) and the updated x, as diffusers' legacy `callback(i, t, latents)`. Samplers run
under `torch.no_grad()` (k-diffusion); call the step formulas yourself to differentiate through sampling.

tests/diffusion/test_samplers.py checks each sampler against diffusers step by step and on flows with known
solutions.
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


def _check_ddpm_args(timesteps: Tensor, alphas_cumprod: Tensor, prediction_type: str) -> list[int]:
    _check_timesteps(timesteps, 1, "K integer steps, descending")
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
    """Ancestral DDPM sampling: x_{prev} ~ q(x_prev | x_t, x_0 = f(model output)).

    Step from t to the next entry of `timesteps` (alpha_bar = 1 after the last), so skipped-step grids
    (`ddpm_timesteps(K)`) work as in diffusers. Noise is added at every step with t > 0.

    Args:
        model_fn: model_fn(x, t, **cond) -> prediction of `prediction_type`, x: (B, *), t: (B,) int64.
        noise: (B, *) the starting x_T.
        timesteps: (K,) integer steps, strictly descending (e.g. `ddpm_timesteps(K, N)`).
        alphas_cumprod: (N,) the training schedule.
        variance: "fixed_small" (posterior variance beta~_t, diffusers default) or "fixed_large" (beta_t).
        clip_sample: clamp predicted x_0 to [-clip_sample, clip_sample] (diffusers clip_sample_range) or None.
        generator: for the per-step noise; the same seed as a diffusers run gives the same samples.

    Returns:
        (B, *) the sample x_0.
    """
    steps = _check_ddpm_args(timesteps, alphas_cumprod, prediction_type)
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance={variance!r} must be 'fixed_small' or 'fixed_large'")
    ac = alphas_cumprod.to(noise.device)
    a_prevs = [ac[s] for s in steps[1:]] + [ac.new_tensor(1.0)]  # alpha_bar = 1 after the last step
    kwargs = _model_kwargs(cond, guidance, noise)
    b = noise.shape[0]
    x = noise
    for i, (t, a_prev) in enumerate(zip(steps, a_prevs)):
        a_t = ac[t]
        beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha

        t_vec = timesteps[i].to(x.device).expand(b)
        out = model_fn(x, t_vec, **kwargs)
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
    """DDIM sampling; eta = 0 is the deterministic ODE-like sampler, eta = 1 has DDPM's posterior variance.

    Steps from t to the next entry of `timesteps`; after the last entry, to `final_alpha_cumprod` (diffusers
    `set_alpha_to_one=True` gives 1.0; None uses alphas_cumprod[0], i.e. `set_alpha_to_one=False`). With
    "leading" spacing this is exactly diffusers' `prev = t - N // K`.

    Args:
        model_fn: model_fn(x, t, **cond) -> prediction of `prediction_type`, t: (B,) int64.
        noise: (B, *) the starting x_T.
        timesteps: (K,) integer steps, strictly descending.
        alphas_cumprod: (N,) the training schedule.
        eta: 0 <= eta; the weight of the stochastic part (DDIM eq. 16).
        clip_sample: clamp predicted x_0 to [-clip_sample, clip_sample] or None.
        generator: for the noise when eta > 0.

    Returns:
        (B, *) the sample x_0.
    """
    steps = _check_ddpm_args(timesteps, alphas_cumprod, prediction_type)
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    ac = alphas_cumprod.to(noise.device)
    final = ac[0] if final_alpha_cumprod is None else ac.new_tensor(final_alpha_cumprod)
    a_prevs = [ac[s] for s in steps[1:]] + [final]
    kwargs = _model_kwargs(cond, guidance, noise)
    b = noise.shape[0]
    x = noise
    for i, (t, a_prev) in enumerate(zip(steps, a_prevs)):
        a_t = ac[t]
        t_vec = timesteps[i].to(x.device).expand(b)
        out = model_fn(x, t_vec, **kwargs)
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
    """DDIM inversion (eta = 0 run backwards): data -> the noise that `sample_ddim` maps back to it.

    Takes the same descending `timesteps` as `sample_ddim` and walks them in ascending order, starting at
    alpha_bar = `initial_alpha_cumprod` (None: alphas_cumprod[0]). Each step evaluates the model at the current
    x with the step's target timestep, as diffusers DDIMInverseScheduler (whose steps it equals): the inverse is
    exact only when the prediction does not change over a step, so the round trip error is first order in
    the step size (tests/diffusion/test_samplers.py states it for a Gaussian).

    Args:
        x0: (B, *) data.
        timesteps: (K,) integer steps, strictly descending (the sampling grid).

    Returns:
        (B, *) x at timesteps[0].
    """
    steps = _check_ddpm_args(timesteps, alphas_cumprod, prediction_type)
    ac = alphas_cumprod.to(x0.device)
    a_cur = ac[0] if initial_alpha_cumprod is None else ac.new_tensor(initial_alpha_cumprod)
    kwargs = _model_kwargs(cond, guidance, x0)
    b = x0.shape[0]
    x = x0
    for j, i in enumerate(range(len(steps) - 1, -1, -1)):
        a_next = ac[steps[i]]
        out = model_fn(x, timesteps[i].to(x.device).expand(b), **kwargs)
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
    """The loop of both flow samplers: steps x + h v(x, t) with h = t_prev - t_curr (Euler), or with `heun` that
    step corrected by the trapezoidal rule (but for an Euler last step when `last_step_euler`)."""
    _check_timesteps(timesteps, 2, "a grid of K + 1 times from 1 towards 0")
    if not timesteps.is_floating_point():
        raise ValueError(f"timesteps must be floats in [0, 1], got dtype {timesteps.dtype}")
    ts = timesteps.to(noise.device)
    kwargs = _model_kwargs(cond, guidance, noise)
    b = noise.shape[0]
    x = noise
    k = ts.shape[0] - 1
    for i in range(k):
        t_curr, t_prev = ts[i], ts[i + 1]
        h = t_prev - t_curr
        v = model_fn(x, t_curr.to(x.dtype).expand(b), **kwargs)
        if heun and not (last_step_euler and i == k - 1):
            v2 = model_fn(x + h * v, t_prev.to(x.dtype).expand(b), **kwargs)
            x = x + h * (v + v2) / 2
        else:
            x = x + h * v
        if callback is not None:
            callback(i, t_curr, x)
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
    """Flow-matching Euler: x <- x + (t_prev - t_curr) v(x, t_curr), BFL `denoise`.

    Args:
        model_fn: model_fn(x, t, **cond) -> velocity d x_t / d t ≈ noise - x_0, t: (B,) in x's dtype.
        noise: (B, *) x at timesteps[0] (pure noise when it is 1).
        timesteps: (K + 1,) float grid, e.g. `get_schedule(K, seq_len)`; K steps are taken.

    Returns:
        (B, *) x at timesteps[-1].
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
    """Flow-matching Heun (explicit trapezoidal rule): second order, 2 model calls per step.

    x' = x + h v(x, t); x <- x + h (v(x, t) + v(x', t_prev)) / 2 with h = t_prev - t_curr. The last step is
    Euler when `last_step_euler` (k-diffusion's choice; saves a call at t = 0 and keeps global order 2).

    Args:
        model_fn: model_fn(x, t, **cond) -> velocity, t: (B,) in x's dtype.
        noise: (B, *) x at timesteps[0].
        timesteps: (K + 1,) float grid; 2K - 1 model calls (2K without the Euler last step).

    Returns:
        (B, *) x at timesteps[-1].
    """
    return _integrate(model_fn, noise, timesteps, cond, guidance, callback, True, last_step_euler)
