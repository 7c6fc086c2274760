"""2-D point distributions for flow-matching demos, and paired point sequences for the cross-domain (seq2seq) job.

The shapes follow the toy datasets of FFJORD (Grathwohl et al. 2019), each roughly within [-4, 4]^2; every
sampler is vectorised and draws only from the given `torch.Generator`, so a seed fixes the data.
Axis legend: n points, B batch, L sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from vermeil.nn.checks import check_positive_ints

__all__ = ["DISTRIBUTIONS", "RING_RADII", "paired_sequences", "sample_points"]

RING_RADII = (0.75, 1.5, 2.25, 3.0)


def _rand(n: int, g: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64)


def _randn(*shape: int, g: torch.Generator | None) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _moons(n: int, g: torch.Generator | None) -> Tensor:
    # Two interleaving half circles (sklearn's make_moons, noise 0.1), scaled by 2 as in FFJORD, centred at 0.
    t = _rand(n, g) * math.pi
    inner = torch.randint(0, 2, (n,), generator=g).bool()
    x = torch.where(inner, 1.0 - torch.cos(t), torch.cos(t))
    y = torch.where(inner, 0.5 - torch.sin(t), torch.sin(t))
    pts = torch.stack([x, y], dim=1) + 0.1 * _randn(n, 2, g=g)
    return pts * 2.0 + torch.tensor([-1.0, -0.5], dtype=torch.float64)


def _checkerboard(n: int, g: torch.Generator | None) -> Tensor:
    # 8 filled squares of side 2 in [-4, 4]^2: floor(x/2) + floor(y/2) is always even.
    x1 = _rand(n, g) * 4 - 2
    x2 = _rand(n, g) - torch.randint(0, 2, (n,), generator=g).double() * 2
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1) * 2


def _rings(n: int, g: torch.Generator | None) -> Tensor:
    # Four concentric circles (radii RING_RADII), each point on a ring chosen uniformly, noise 0.08.
    radii = torch.tensor(RING_RADII, dtype=torch.float64)
    r = radii[torch.randint(0, len(RING_RADII), (n,), generator=g)]
    theta = _rand(n, g) * 2 * math.pi
    pts = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
    return pts + 0.08 * _randn(n, 2, g=g)


def _gaussians(n: int, g: torch.Generator | None) -> Tensor:
    # FFJORD's 8 gaussians: centres at 45-degree steps on radius 4 / sqrt(2), std 0.5 / sqrt(2).
    angle = torch.randint(0, 8, (n,), generator=g).double() * math.pi / 4
    centres = 4.0 / math.sqrt(2.0) * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + (0.5 / math.sqrt(2.0)) * _randn(n, 2, g=g)


def _spiral(n: int, g: torch.Generator | None) -> Tensor:
    # FFJORD's "2spirals": two arms r = theta for theta up to 3*pi, the second arm point-mirrored, divided by 3.
    theta = torch.sqrt(_rand(n, g)) * 3 * math.pi
    jitter = torch.stack([_rand(n, g), _rand(n, g)], dim=1) * 0.5  # FFJORD's uniform jitter on x and y
    arm = torch.stack([-torch.cos(theta) * theta, torch.sin(theta) * theta], dim=1) + jitter
    sign = torch.where(torch.randint(0, 2, (n,), generator=g).bool(), 1.0, -1.0).double()[:, None]
    return arm * sign / 3 + 0.1 * _randn(n, 2, g=g)


DISTRIBUTIONS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "gaussian": lambda n, g: _randn(n, 2, g=g),
    "moons": _moons,
    "checkerboard": _checkerboard,
    "rings": _rings,
    "gaussians": _gaussians,
    "spiral": _spiral,
}


def _check_float_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating-point torch.dtype (points are coordinates)")


def sample_points(
    name: str,
    n: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n, 2) points of the `DISTRIBUTIONS` entry `name`, computed in float64 on the CPU, then cast and moved."""
    if not isinstance(name, str) or name not in DISTRIBUTIONS:
        raise ValueError(f"distribution {name!r} must be one of {sorted(DISTRIBUTIONS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative int")
    _check_float_dtype(dtype)
    return DISTRIBUTIONS[name](n, generator).to(device=device, dtype=dtype)


def _sort_by_angle(pts: Tensor) -> Tensor:
    """Sort each row's points by their angle around the row's mean: (B, L, 2) -> (B, L, 2)."""
    centred = pts - pts.mean(dim=1, keepdim=True)
    angle = torch.atan2(centred[..., 1], centred[..., 0])  # (B, L) in (-pi, pi]
    order = angle.argsort(dim=1)
    return pts.gather(1, order[..., None].expand_as(pts))


def paired_sequences(
    batch: int,
    length: int,
    generator: torch.Generator | None = None,
    *,
    source: str = "moons",
    target: str = "rings",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Paired point sequences for a cross-domain flow: cond (B, L, 2) from `source`, data (B, L, 2) from `target`.

    The two shapes are drawn independently, each row sorted by angle around its own mean, so position i of
    `data` is the target point whose angular rank matches source point i; a flow model learns p(data | cond).
    """
    check_positive_ints(batch=batch, length=length)
    _check_float_dtype(dtype)
    for role, name in (("source", source), ("target", target)):
        if not isinstance(name, str) or name not in DISTRIBUTIONS:
            raise ValueError(f"{role}={name!r} must be one of {sorted(DISTRIBUTIONS)}")
    cond = DISTRIBUTIONS[source](batch * length, generator).view(batch, length, 2)
    data = DISTRIBUTIONS[target](batch * length, generator).view(batch, length, 2)
    cond, data = _sort_by_angle(cond), _sort_by_angle(data)
    return cond.to(device=device, dtype=dtype), data.to(device=device, dtype=dtype)
