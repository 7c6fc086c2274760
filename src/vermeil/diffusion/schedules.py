"""Noise schedules as functions returning tensors: DDPM betas, signal-to-noise helpers, flow-matching time grids.

DDPM schedules follow diffusers DDPMScheduler, flow-matching grids BFL flux `sampling.py`. DDPM time is an
integer index 0..N-1 into `alphas_cumprod` (0 = least noise); flow-matching time t is a float in [0, 1] with
x_t = (1 - t) x_0 + t * noise (t = 1 is pure noise), as BFL and diffusers.
"""

# Shapes: N number of training steps, K number of sampling steps.

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from vermeil.nn.checks import check_positive_int, check_positive_ints

BetaKind = Literal["linear", "scaled_linear", "cosine", "sigmoid"]
PredictionType = Literal["epsilon", "sample", "x0", "v_prediction"]  # diffusers' names; "x0" = "sample"
TimestepSpacing = Literal["leading", "trailing", "linspace"]

__all__ = [
    "BetaKind",
    "TimestepSpacing",
    "alphas_cumprod",
    "ddpm_betas",
    "ddpm_timesteps",
    "get_lin_function",
    "get_schedule",
    "log_snr",
    "min_snr_weight",
    "rescale_zero_terminal_snr",
    "sigmas_from_alphas_cumprod",
    "snr",
    "time_shift",
]


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in ("epsilon", "sample", "x0", "v_prediction"):
        raise ValueError(
            f"prediction_type={prediction_type!r} must be 'epsilon', 'sample', 'x0' or 'v_prediction'"
        )


def ddpm_betas(
    num_steps: int,
    kind: BetaKind = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    *,
    max_beta: float = 0.999,
) -> Tensor:
    """(N,) float32 betas beta_1..beta_N, exactly as diffusers DDPMScheduler builds them.

    Args:
        num_steps: N (diffusers `num_train_timesteps`).
        kind: "linear" (Ho et al. 2020), "scaled_linear" (latent diffusion: linear in sqrt(beta)),
            "cosine" (Nichol & Dhariwal 2021; diffusers "squaredcos_cap_v2", ignores beta_start/beta_end),
            "sigmoid" (GeoDiff).
        max_beta: cap of the cosine schedule's betas.
    """
    check_positive_int("num_steps", num_steps)
    if kind != "cosine":  # the cosine schedule ignores them
        for name, beta in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name}={beta} must be in [0, 1) (a variance fraction; 1 - beta > 0)")
    match kind:
        case "linear":
            return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)
        case "scaled_linear":
            return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2
        case "cosine":
            if not 0.0 < max_beta <= 1.0:
                raise ValueError(f"max_beta={max_beta} must be in (0, 1]")

            def alpha_bar(t: float) -> float:
                # The 0.008 offset keeps beta_1 from being vanishingly small (improved DDPM, eq. 17).
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            # Python floats (float64) per step, then float32: the same arithmetic as diffusers.
            betas = [
                min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                for i in range(num_steps)
            ]
            return torch.tensor(betas, dtype=torch.float32)
        case "sigmoid":
            return torch.sigmoid(torch.linspace(-6, 6, num_steps)) * (beta_end - beta_start) + beta_start
        case _:
            raise ValueError(f"kind={kind!r} must be 'linear', 'scaled_linear', 'cosine' or 'sigmoid'")


def alphas_cumprod(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod(1 - beta), the signal variance at step t. betas: (N,) -> (N,)."""
    if betas.dim() != 1:
        raise ValueError(f"betas must be 1-D (N,), got shape {tuple(betas.shape)}")
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas (N,) so the last step has zero SNR (Lin et al. 2023, Algorithm 1; diffusers' function)."""
    if betas.dim() != 1 or betas.shape[0] < 2:
        raise ValueError(f"betas must be 1-D with at least 2 steps, got shape {tuple(betas.shape)}")
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    # Shift so the last step is 0, then scale so the first keeps its value.
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    return 1 - torch.cat([ab[0:1], ab[1:] / ab[:-1]])  # 1 - alphas


def snr(alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar). (N,) -> (N,) (any shape works elementwise)."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def log_snr(alphas_cumprod: Tensor) -> Tensor:
    """log SNR = log(alpha_bar) - log(1 - alpha_bar), computed without forming the ratio. Elementwise."""
    return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """Variance-exploding noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar) = SNR^-1/2 (k-diffusion)."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5


def min_snr_weight(snr: Tensor, gamma: float = 5.0, prediction_type: PredictionType = "epsilon") -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023), snr: (B,) -> (B,). epsilon: min(snr, gamma) / snr (1 at snr 0);
    v_prediction: min(snr, gamma) / (snr + 1); sample/x0: min(snr, gamma)."""
    if gamma <= 0:
        raise ValueError(f"gamma={gamma} must be > 0")
    _check_prediction_type(prediction_type)
    clipped = torch.clamp(snr, max=gamma)
    match prediction_type:
        case "epsilon":
            # snr = 0 (zero terminal SNR): the limit of min(snr, gamma) / snr is 1, not 0 / 0 (diffusers' scripts
            # set it to 1 too).
            return torch.where(snr == 0, torch.ones_like(clipped), clipped / snr)
        case "v_prediction":
            return clipped / (snr + 1)
        case _:
            return clipped


def ddpm_timesteps(
    num_inference_steps: int,
    num_train_steps: int = 1000,
    spacing: TimestepSpacing = "leading",
    *,
    steps_offset: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """(K,) int64 descending timesteps for DDPM/DDIM sampling, as diffusers `set_timesteps` spaces them.

    Args:
        num_inference_steps: K <= num_train_steps = N, the length of `alphas_cumprod`.
        spacing: "leading" (arange(K) * (N // K) + steps_offset), "trailing" (ending at N - 1) or "linspace"
            (Lin et al. 2023, Table 2).
        steps_offset: added to "leading" timesteps (Stable Diffusion uses 1).
    """
    check_positive_ints(num_inference_steps=num_inference_steps, num_train_steps=num_train_steps)
    if num_inference_steps > num_train_steps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be <= num_train_steps={num_train_steps}"
        )
    k, n = num_inference_steps, num_train_steps
    match spacing:
        case "leading":
            ts = (torch.arange(k, dtype=torch.int64) * (n // k) + steps_offset).flip(0)
        case "trailing":
            # float64 arange then round, as numpy does in diffusers.
            ts = torch.round(torch.arange(n, 0, -n / k, dtype=torch.float64)).to(torch.int64) - 1
        case "linspace":
            ts = torch.linspace(0, n - 1, k, dtype=torch.float64).round().flip(0).to(torch.int64)
        case _:
            raise ValueError(f"spacing={spacing!r} must be 'leading', 'trailing' or 'linspace'")
    return ts.to(device)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """BFL's time shift e^mu / (e^mu + (1/t - 1)^sigma): moves a grid on [0, 1] towards t = 1 (more noise).

    With sigma = 1 it is SD3's static shift s t / (1 + (s - 1) t), s = e^mu; t = 0 and 1 are fixed points.
    """
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(
    x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15
) -> Callable[[float], float]:
    """The line through (x1, y1) and (x2, y2): maps a token count to Flux's shift mu (BFL)."""
    if x1 == x2:
        raise ValueError(f"x1={x1} must differ from x2={x2}")
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(
    num_steps: int,
    seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Flux's (K + 1,) float32 grid from 1 to 0: linspace(1, 0, K + 1), shifted when `shift` (BFL get_schedule).

    seq_len (data tokens) sets mu by the line through (256, base_shift) and (4096, max_shift); `shift=False`
    gives schnell-style unshifted grids.
    """
    check_positive_ints(num_steps=num_steps, seq_len=seq_len)
    timesteps = torch.linspace(1, 0, num_steps + 1, device=device)  # extra step for zero
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps
