"""Optimizer setup: AdamW weight-decay groups (the one weight-decay rule: models only mark parameters, as
mamba_ssm's `_no_weight_decay`; nanoGPT `configure_optimizers`) and the warm-up + cosine schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["WarmupCosine", "build_optimizer", "build_scheduler", "cosine_with_warmup", "param_groups"]

NO_DECAY_NAMES = frozenset({"A_log", "D", "dt_bias"})
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def param_groups(
    model: nn.Module, weight_decay: float, *, no_decay_embeddings: bool = True
) -> list[dict[str, Any]]:
    """AdamW parameter groups: `[{"params": decayed, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]`.

    Decay only fights scales and offsets, so these are not decayed: parameters with fewer than two dimensions,
    every parameter of a norm module, `nn.Embedding` weights when `no_decay_embeddings`, parameters named
    `A_log`, `D` or `dt_bias` or marked `_no_weight_decay = True`, and names from `model.no_weight_decay()`.
    Names are matched as well as marks because wrapping a model (FSDP2, TP, `to_empty`) makes new parameter
    objects without the marks. A model's own `optimizer_groups(weight_decay)` wins over all this.

    Frozen parameters are left out; a tied tensor appears once. Each group also holds "param_names".
    """
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be a number >= 0")
    if callable(getattr(model, "optimizer_groups", None)):
        groups = [dict(g) for g in model.optimizer_groups(float(weight_decay))]
        for g in groups:
            if "params" not in g:
                raise ValueError(
                    f"{type(model).__name__}.optimizer_groups returned a group without 'params': {g!r}"
                )
            g["params"] = list(g["params"])
        return [g for g in groups if g["params"]]

    named = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    exempt: set[int] = set()  # ids of parameters that must not be decayed, found by their module
    for module in model.modules():
        # Norms by type, or by class name as a fallback (Vermeil's RMSNorm/QKNorm and foreign norms alike).
        norm = isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()
        if norm or (no_decay_embeddings and isinstance(module, nn.Embedding)):
            exempt.update(id(p) for p in module.parameters(recurse=False))

    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():  # tied tensors are yielded once
        if not p.requires_grad:
            continue
        skip = (
            p.ndim < 2
            or id(p) in exempt
            or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
            or getattr(p, "_no_weight_decay", False)
            or name in named
        )
        (no_decay if skip else decay).append((name, p))
    return [
        {"params": [p for _, p in group], "param_names": [n for n, _ in group], "weight_decay": wd}
        for group, wd in ((decay, float(weight_decay)), (no_decay, 0.0))
        if group
    ]


def _fused_supported(params: Iterable[torch.Tensor]) -> bool:
    # torch >= 2.4 has a fused AdamW kernel for CPU tensors too; it needs floating-point, dense tensors.
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:  # pragma: no cover - older torch
        return False
    devices = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in devices and p.is_floating_point() and not p.is_sparse for p in params)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    *,
    eps: float = 1e-8,
    fused: bool | None = None,
    no_decay_embeddings: bool = True,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`; `fused=None` uses the fused kernel where torch has one
    for the parameters' device (CPU included: bench/train_overhead.py measures it faster than foreach)."""
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a number > 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas={tuple(betas)!r} must be two numbers in [0, 1)")
    groups = param_groups(model, weight_decay, no_decay_embeddings=no_decay_embeddings)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    fused = _fused_supported(params) if fused is None else fused
    kwargs: dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at `step` (0-based): linear warm-up `(step + 1) / warmup` (the first update
    already moves), then cosine decay from 1 at `warmup` to `min_ratio` at `total`, and `min_ratio` after."""
    if warmup < 0 or total < 1:
        raise ValueError(f"warmup={warmup} must be >= 0 and total={total} >= 1")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio={min_ratio} must be in [0, 1]")
    if step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return min_ratio
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """`cosine_with_warmup` as a picklable callable for `LambdaLR` (its settings go into the state dict)."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.1) -> None:
        cosine_with_warmup(0, warmup, total, min_ratio)  # validates
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        return cosine_with_warmup(step, self.warmup, self.total, self.min_ratio)

    def __repr__(self) -> str:
        return f"WarmupCosine(warmup={self.warmup}, total={self.total}, min_ratio={self.min_ratio})"


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio))`: call `.step()` once per update."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio))
