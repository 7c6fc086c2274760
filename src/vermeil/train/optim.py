"""Optimizer setup: AdamW weight-decay groups and the warm-up + cosine learning-rate schedule.

Weight decay shrinks matrices towards zero; on scale and offset parameters (norm weights, biases), on the SSM's
`A_log` and `D`, and (by default) on embedding tables it only fights the model, so those go in a group with
`weight_decay=0` (nanoGPT `configure_optimizers`, mamba_ssm's `_no_weight_decay` marks, torchtitan).
`param_groups` is the one weight-decay rule of the house: models only mark parameters (`MambaBlock` marks
`A_log` and `D` with `_no_weight_decay = True`, as mamba_ssm does).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["WarmupCosine", "build_optimizer", "build_scheduler", "cosine_with_warmup", "param_groups"]

# Parameter leaf names that are never decayed (mamba_ssm marks them `_no_weight_decay`).
NO_DECAY_NAMES = frozenset({"A_log", "D", "dt_bias"})
# Modules whose parameters are scales and offsets: norms of every flavour.
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def _is_norm(module: nn.Module) -> bool:
    # Vermeil's RMSNorm/LayerNorm/QKNorm and foreign norms alike: by type, or by the class name as a fallback.
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def _model_hook_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    groups = [dict(g) for g in model.optimizer_groups(weight_decay)]
    for g in groups:
        if "params" not in g:
            raise ValueError(
                f"{type(model).__name__}.optimizer_groups returned a group without 'params': {g!r}"
            )
        g["params"] = list(g["params"])
    return [g for g in groups if g["params"]]


def param_groups(
    model: nn.Module, weight_decay: float, *, no_decay_embeddings: bool = True
) -> list[dict[str, Any]]:
    """AdamW parameter groups: `[{"params": decayed, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]`.

    Not decayed: parameters with fewer than two dimensions (biases, norm weights), every parameter of a norm
    module, `nn.Embedding` weights when `no_decay_embeddings`, parameters named `A_log`, `D` or `dt_bias`,
    parameters carrying `_no_weight_decay = True`, and names returned by a model's `no_weight_decay()`. The
    names are matched as well as the marks because wrapping a model (FSDP2, tensor parallelism, `to_empty`)
    makes new parameter objects, which do not keep the marks. When the model has its own
    `optimizer_groups(weight_decay)` method, its groups are used instead.

    Frozen parameters are left out; a tied tensor appears once (under its first name). Each group also holds a
    "param_names" list (torch.optim keeps it in `param_groups`, handy for inspection).

    Args:
        model: any module.
        weight_decay: the decay of the first group (>= 0).
        no_decay_embeddings: keep embedding tables out of the decay.
    """
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be a number >= 0")
    if callable(getattr(model, "optimizer_groups", None)):
        return _model_hook_groups(model, float(weight_decay))

    named: set[str] = set()
    if callable(getattr(model, "no_weight_decay", None)):
        named = set(model.no_weight_decay())
    exempt: set[int] = set()  # ids of parameters that must not be decayed, found by their module
    for module in model.modules():
        if _is_norm(module) or (no_decay_embeddings and isinstance(module, nn.Embedding)):
            exempt.update(id(p) for p in module.parameters(recurse=False))

    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():  # tied tensors are yielded once
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = (
            p.ndim < 2
            or id(p) in exempt
            or leaf in NO_DECAY_NAMES
            or getattr(p, "_no_weight_decay", False)
            or name in named
        )
        (no_decay if skip else decay).append((name, p))
    return [
        {"params": [p for _, p in named], "param_names": [n for n, _ in named], "weight_decay": wd}
        for named, wd in ((decay, float(weight_decay)), (no_decay, 0.0))
        if named
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
    """AdamW over `param_groups(model, weight_decay)`.

    Args:
        lr: peak learning rate (> 0); a scheduler scales it.
        betas: AdamW (beta1, beta2); 0.95 for beta2 is the LLM custom (nanoGPT, Llama).
        fused: use the fused AdamW kernel; None picks it where torch has one for the parameters' device
            (CPU included: bench/train_overhead.py measures it faster than the foreach path here).
    """
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a number > 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas={tuple(betas)!r} must be two numbers in [0, 1)")
    groups = param_groups(model, weight_decay, no_decay_embeddings=no_decay_embeddings)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if fused is None:
        fused = _fused_supported(params)
    kwargs: dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at `step` (0-based): linear warm-up, then cosine decay to `min_ratio`.

    `(step + 1) / warmup` for `step < warmup` (the first update already moves), then
    `min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2` with progress going from 0 at `warmup` to 1 at
    `total`; `min_ratio` after `total`.
    """
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
