"""Training targets, time sampling and losses for DDPM-style diffusion (diffusers DDPMScheduler) and rectified
flow (BFL Flux, SD3). `model_fn(x, t, **cond) -> prediction` everywhere: the callable the samplers take.
"""

# Shapes: B batch, then any data axes (*); a typical sequence is x: (B, L, C) with L tokens of C channels.

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from vermeil.diffusion.schedules import PredictionType, _check_prediction_type, get_lin_function, time_shift
from vermeil.nn.checks import check_positive_int

TimeSampling = Literal["uniform", "logit_normal", "mode"]
ModelFn = Callable[..., Tensor]

__all__ = [
    "ModelFn",
    "PredictionType",
    "TimeSampling",
    "add_noise",
    "ddpm_target",
    "diffusion_loss",
    "flow_interpolate",
    "flow_matching_loss",
    "flow_target",
    "masked_mse",
    "prediction_to_x0_eps",
    "sample_flow_timesteps",
    "velocity",
]


def _per_sample(coef: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like` (B, *)."""
    return coef.reshape(coef.shape[0], *([1] * (like.dim() - 1)))


def _check_batch(name: str, t: Tensor, x: Tensor) -> None:
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Noise like `like`, drawn on the generator's device then moved (diffusers' randn_tensor: same numbers)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _model_kwargs(
    cond: Mapping[str, Any] | None, guidance: Tensor | float | None, x: Tensor
) -> dict[str, Any]:
    """`cond` plus `guidance=` as a (B,) tensor in x's dtype and device when given (BFL's `guidance_vec`)."""
    kwargs = dict(cond or {})
    if guidance is None:
        return kwargs
    if "guidance" in kwargs:
        raise ValueError("guidance given both as an argument and inside cond; give it once")
    v = torch.as_tensor(guidance, dtype=x.dtype, device=x.device)
    if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != x.shape[0]):
        raise ValueError(f"guidance must be a float or a (B,) = ({x.shape[0]},) tensor, got {tuple(v.shape)}")
    kwargs["guidance"] = v.expand(x.shape[0])
    return kwargs


def _sqrt_coefs(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    # Cast the table to the data dtype before indexing, as diffusers does, so results agree bit for bit.
    ab = alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device)]
    return _per_sample(ab**0.5, like), _per_sample((1 - ab) ** 0.5, like)


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward process q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (diffusers add_noise).
    x0, noise: (B, *); t: (B,) integer steps; alphas_cumprod: (N,) -> (B, *)."""
    _check_batch("t", t, x0)
    a, s = _sqrt_coefs(alphas_cumprod, t, x0)
    return a * x0 + s * noise


def velocity(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """v target sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022; diffusers get_velocity).
    x0, noise: (B, *); t: (B,) integer steps -> (B, *)."""
    _check_batch("t", t, x0)
    a, s = _sqrt_coefs(alphas_cumprod, t, x0)
    return a * noise - s * x0


def ddpm_target(
    x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction_type: PredictionType = "epsilon"
) -> Tensor:
    """What a DDPM model regresses on: noise ("epsilon"), x_0 ("sample"/"x0") or v ("v_prediction")."""
    _check_prediction_type(prediction_type)
    match prediction_type:
        case "epsilon":
            return noise
        case "sample" | "x0":
            return x0
        case _:
            return velocity(x0, noise, t, alphas_cumprod)


def prediction_to_x0_eps(
    x_t: Tensor, output: Tensor, alpha_prod: Tensor | float, prediction_type: PredictionType = "epsilon"
) -> tuple[Tensor, Tensor]:
    """(predicted x_0, predicted noise) from a model output at alpha_bar = `alpha_prod` (broadcastable to x_t),
    the formulas of diffusers DDIMScheduler.step (DDIM eq. 12). x_t, output: (B, *)."""
    _check_prediction_type(prediction_type)
    a, s = alpha_prod**0.5, (1 - alpha_prod) ** 0.5  # sqrt(alpha_bar), sqrt(1 - alpha_bar)
    match prediction_type:
        case "epsilon":
            return (x_t - s * output) / a, output
        case "sample" | "x0":
            return output, (x_t - a * output) / s
        case _:
            return a * x_t - s * output, a * output + s * x_t


def flow_interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x_0 + t * noise (t = 1 is pure noise). x0, noise: (B, *); t: (B,) floats -> (B, *)."""
    _check_batch("t", t, x0)
    tt = _per_sample(t.to(x0.dtype), x0)
    return (1 - tt) * x0 + tt * noise


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Velocity target d x_t / d t = noise - x_0 (samplers integrate it from t = 1 down to t = 0)."""
    return noise - x0


def sample_flow_timesteps(
    batch: int,
    kind: TimeSampling = "uniform",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    seq_len: int | None = None,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
    mu: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(B,) training times t in (0, 1) for rectified flow, optionally shifted as Flux inference shifts its grid.

    Draws u as diffusers `compute_density_for_timestep_sampling` (same generator calls, so the same numbers;
    SD3, Esser et al. 2024, section 3.1): "uniform" U(0, 1); "logit_normal" sigmoid(N(logit_mean, logit_std^2));
    "mode" 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u). With `seq_len` and `shift`, t = time_shift(mu, 1, u)
    with the mu `get_schedule` uses; an explicit `mu` (e.g. log(3.0), SD3's static shift 3) overrides it.
    """
    check_positive_int("batch", batch)
    gen_device = generator.device if generator is not None else device
    match kind:
        case "uniform":
            u = torch.rand(batch, device=gen_device, generator=generator)
        case "logit_normal":
            if logit_std <= 0:
                raise ValueError(f"logit_std={logit_std} must be > 0")
            u = torch.normal(logit_mean, logit_std, (batch,), generator=generator, device=gen_device)
            u = torch.sigmoid(u)
        case "mode":
            # SD3 (Esser et al. 2024) requires this range, where u -> t is a bijection of [0, 1] (a monotone
            # map); below -1, t leaves [0, 1].
            if not -1.0 <= mode_scale <= 2 / (math.pi - 2):
                raise ValueError(
                    f"mode_scale={mode_scale} must be in [-1, 2 / (pi - 2) = {2 / (math.pi - 2):.4f}]"
                )
            u = torch.rand(batch, device=gen_device, generator=generator)
            u = 1 - u - mode_scale * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
        case _:
            raise ValueError(f"kind={kind!r} must be 'uniform', 'logit_normal' or 'mode'")
    if mu is not None and seq_len is not None:
        raise ValueError(f"give mu={mu} or seq_len={seq_len}, not both")
    if seq_len is not None:
        check_positive_int("seq_len", seq_len)
    if mu is None and seq_len is not None and shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(seq_len)
    if mu is not None:
        u = time_shift(mu, 1.0, u)
    return u.to(device=device if device is not None else u.device, dtype=dtype)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over the valid elements, independent of how much padding a batch has, in float32
    (float64 stays float64, so gradcheck sees the exact loss).
    pred, target: (B, *); mask: None or a bool/0-1 tensor shaped as a prefix of pred's ((B, L) of (B, L, C))."""
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} must equal target shape {tuple(target.shape)}")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    diff = pred.to(dtype) - target.to(dtype)
    if mask is None:
        return (diff**2).mean()
    if mask.dim() > diff.dim() or tuple(mask.shape) != tuple(diff.shape[: mask.dim()]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must be a prefix of the data shape {tuple(diff.shape)}"
        )
    m = mask.to(dtype).reshape(*mask.shape, *([1] * (diff.dim() - mask.dim())))
    per_element = diff.numel() // max(mask.numel(), 1)  # elements per mask entry (e.g. C channels)
    # where, not only a product: padding may hold inf or NaN, and 0 * inf is NaN (in the loss and the gradient).
    err = torch.where(m != 0, diff, 0) ** 2 * m
    # clamp: an all-padding batch gives 0 rather than NaN.
    return err.sum() / (m.sum() * per_element).clamp(min=1)


def diffusion_loss(
    model_fn: ModelFn,
    x0: Tensor,
    alphas_cumprod: Tensor,
    *,
    prediction_type: PredictionType = "epsilon",
    noise: Tensor | None = None,
    t: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDPM training loss (float32 scalar; float64 data: float64): MSE of model_fn(x_t, t, **cond) against the
    `prediction_type` target.

    Args:
        x0: (B, *) clean data.
        alphas_cumprod: (N,) from `alphas_cumprod(ddpm_betas(...))`.
        noise: (B, *), or None to draw it.
        t: (B,) integer steps, or None to draw them uniformly from 0..N-1.
        mask: see `masked_mse`.
    """
    if noise is None:
        noise = _randn(x0, generator)
    if t is None:
        gen_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, alphas_cumprod.shape[0], x0.shape[:1], generator=generator, device=gen_device)
        t = t.to(x0.device)
    x_t = add_noise(x0, noise, t, alphas_cumprod)
    target = ddpm_target(x0, noise, t, alphas_cumprod, prediction_type)
    pred = model_fn(x_t, t, **(cond or {}))
    return masked_mse(pred, target, mask)


def flow_matching_loss(
    model_fn: ModelFn,
    x0: Tensor,
    *,
    noise: Tensor | None = None,
    t: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    guidance: Tensor | float | None = None,
    mask: Tensor | None = None,
    kind: TimeSampling = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    seq_len: int | None = None,
    shift: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Rectified-flow loss (float32 scalar; float64 data: float64): MSE of model_fn(x_t, t, **cond) against
    noise - x_0.

    Args:
        x0: (B, *) clean data (for Flux, the packed tokens (B, L, C)).
        noise: (B, *), or None to draw it.
        t: (B,) floats in [0, 1], or None to draw them with `sample_flow_timesteps(kind, ..., seq_len, shift)`.
        guidance: passed as a (B,) `guidance=` when not None, for guidance-distilled models.
        mask: see `masked_mse`.
    """
    if noise is None:
        noise = _randn(x0, generator)
    if t is None:
        t = sample_flow_timesteps(
            x0.shape[0],
            kind,
            logit_mean=logit_mean,
            logit_std=logit_std,
            mode_scale=mode_scale,
            seq_len=seq_len,
            shift=shift,
            generator=generator,
            device=x0.device,
            dtype=x0.dtype,
        )
    pred = model_fn(flow_interpolate(x0, noise, t), t.to(x0.dtype), **_model_kwargs(cond, guidance, x0))
    return masked_mse(pred, flow_target(x0, noise), mask)
