"""Diffusion and flow matching as functions: schedules, training targets and losses, samplers, guidance.

Imports torch only. One signature per family: schedules return tensors, samplers are
`sample_x(model_fn, noise, timesteps, *, cond=None, guidance=None, callback=None, ...)` with
`model_fn(x, t, **cond) -> prediction`.
"""

from vermeil.diffusion.guidance import cfg_model_fn, drop_condition
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
from vermeil.diffusion.samplers import invert_ddim, sample_ddim, sample_ddpm, sample_euler, sample_heun
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

__all__ = [
    "add_noise",
    "alphas_cumprod",
    "cfg_model_fn",
    "ddpm_betas",
    "ddpm_target",
    "ddpm_timesteps",
    "diffusion_loss",
    "drop_condition",
    "flow_interpolate",
    "flow_matching_loss",
    "flow_target",
    "invert_ddim",
    "get_lin_function",
    "get_schedule",
    "log_snr",
    "masked_mse",
    "min_snr_weight",
    "prediction_to_x0_eps",
    "rescale_zero_terminal_snr",
    "sample_ddim",
    "sample_ddpm",
    "sample_euler",
    "sample_flow_timesteps",
    "sample_heun",
    "sigmas_from_alphas_cumprod",
    "snr",
    "time_shift",
    "velocity",
]
