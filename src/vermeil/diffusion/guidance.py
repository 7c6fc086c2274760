"""Classifier-free guidance (Ho & Salimans 2022): `cfg_model_fn` for sampling, `drop_condition` for training.

Guidance-distilled Flux needs no wrapper: samplers pass `guidance=` straight to model_fn (BFL `guidance_vec`).
"""

# Shapes: B batch, then any data axes (*); condition tensors are (B, ...) with the batch first.

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

from vermeil.diffusion.losses import ModelFn, _per_sample

__all__ = ["cfg_model_fn", "drop_condition"]

C = TypeVar("C", Tensor, Mapping[str, Tensor])


def _cat_batch(a: Any, b: Any, batch: int, name: str) -> Any:
    """Stack a conditional and an unconditional value along the batch axis; non-batch values must agree."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.dim() == 0 or a.shape[0] != batch or b.shape[1:] != a.shape[1:] or b.shape[0] != batch:
            raise ValueError(
                f"cond[{name!r}] {tuple(a.shape)} and uncond[{name!r}] {tuple(b.shape)} must both be (B, ...) "
                f"with B = {batch} and equal trailing shapes"
            )
        return torch.cat([a, b], dim=0)
    if a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b):
        return a
    raise ValueError(f"cond[{name!r}] and uncond[{name!r}] differ but are not both batched tensors")


def cfg_model_fn(
    model_fn: ModelFn,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any],
    scale: float,
    *,
    batched: bool = True,
) -> ModelFn:
    """Wrap `model_fn` with classifier-free guidance, uncond + scale * (cond - uncond), for any sampler. The
    prediction may be epsilon, v or velocity: guidance is linear in any.

    Args:
        cond: keyword arguments of the conditional call (e.g. {"cond": tokens, "y": pooled}), tensors (B, ...).
        uncond: the same keys for the unconditional call (null prompt / null tokens), same shapes.
        scale: w; 1 gives the conditional model, 0 the unconditional one.
        batched: run both halves as one call on a batch of 2B, or as two calls (less memory).

    Returns:
        guided(x (B, *), t (B,), **extra); `extra` (e.g. a sampler's `guidance=`) goes to both halves.
    """
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale={scale} must be a finite number")
    if set(cond) != set(uncond):
        raise ValueError(f"cond keys {sorted(cond)} must equal uncond keys {sorted(uncond)}")
    cond, uncond = dict(cond), dict(uncond)

    def guided(x: Tensor, t: Tensor, **extra: Any) -> Tensor:
        b = x.shape[0]
        if clash := set(extra) & set(cond):
            raise ValueError(f"keyword(s) {sorted(clash)} given both to the sampler and to cfg_model_fn")
        if not batched:
            out_c = model_fn(x, t, **cond, **extra)
            out_u = model_fn(x, t, **uncond, **extra)
        else:
            both = {k: _cat_batch(cond[k], uncond[k], b, k) for k in cond}
            for k, v in extra.items():
                both[k] = (
                    torch.cat([v, v]) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b else v
                )
            t2 = torch.cat([t, t]) if t.dim() > 0 else t
            out_c, out_u = model_fn(torch.cat([x, x]), t2, **both).chunk(2, dim=0)
        # lerp: exactly out_c at scale 1 and out_u at 0 (u + 1 * (c - u) rounds), one rounding per element.
        return torch.lerp(out_u, out_c, scale)

    return guided


def drop_condition(
    cond: C, p: float, null: C, *, generator: torch.Generator | None = None, keep: Tensor | None = None
) -> C:
    """Replace each sample's condition by `null` with probability p (condition dropout for CFG training).
    Gradients flow to `null` where it was used, so a learned null embedding trains.

    Args:
        cond: (B, ...) tensor, or a dict of such tensors (one draw per sample, shared by all keys).
        null: broadcastable to one sample (e.g. (L, D), (D,) or a learned parameter), or a dict with cond's keys.
        keep: optional (B,) bool, True = keep; overrides the random draw.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p} must be in [0, 1]")
    tensors = cond if isinstance(cond, Mapping) else {"": cond}
    nulls = null if isinstance(null, Mapping) else {"": null}
    if set(tensors) != set(nulls):
        raise ValueError(f"cond keys {sorted(tensors)} must equal null keys {sorted(nulls)}")
    first = next(iter(tensors.values()))
    b = first.shape[0]
    if keep is None:
        device = generator.device if generator is not None else first.device
        keep = torch.rand(b, generator=generator, device=device).to(first.device) >= p
    elif keep.dtype != torch.bool or keep.shape != (b,):
        raise ValueError(f"keep must be a bool (B,) = ({b},) tensor, got {keep.dtype} {tuple(keep.shape)}")
    out: dict[str, Tensor] = {}
    for k, c in tensors.items():
        if c.shape[0] != b:
            raise ValueError(f"cond[{k!r}] has batch {c.shape[0]}, expected {b}")
        try:
            torch.broadcast_shapes(nulls[k].shape, c.shape[1:])
        except RuntimeError:
            raise ValueError(
                f"null[{k!r}] of shape {tuple(nulls[k].shape)} must broadcast to one sample of cond, "
                f"{tuple(c.shape[1:])}"
            ) from None
        out[k] = torch.where(_per_sample(keep, c), c, nulls[k].to(dtype=c.dtype, device=c.device))
    return out[""] if not isinstance(cond, Mapping) else out  # type: ignore[return-value]
