"""Low-rank adaptation (LoRA, Hu et al., 2021, arXiv:2106.09685).

`LoRALinear` follows torchtune's layout and key names, so adapter checkpoints line up; `LoRA` is the update
alone (PaLM-rlhf-pytorch's `LoRA`).

Axis legend: B batch, T length, I input features, O output features, R rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.nn.checks import check_positive_ints, check_probability

TargetModules = str | Iterable[str] | Callable[[str, nn.Module], bool]


def _check_lora_args(in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float) -> None:
    check_positive_ints(in_dim=in_dim, out_dim=out_dim, rank=rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"alpha={alpha!r} must be a number")
    check_probability("dropout", dropout)


class _LowRank(nn.Module):
    """Shared parts of `LoRA` and `LoRALinear`: `lora_a` (R x I), `lora_b` (O x R), dropout and scale."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        _check_lora_args(in_dim, out_dim, rank, alpha, dropout)
        self.in_dim, self.out_dim, self.rank, self.alpha = in_dim, out_dim, rank, float(alpha)
        self.scale = float(alpha) / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_a = nn.Linear(in_dim, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, out_dim, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        # torchtune's init: A as nn.Linear's default, B zero, so a fresh adapter is an exact no-op.
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def delta(self, x: Tensor) -> Tensor:
        """The low-rank update: x (..., I) -> (alpha / R) B A dropout(x), (..., O)."""
        return self.lora_b(self.lora_a(self.dropout(x))) * self.scale

    def delta_weight(self) -> Tensor:
        """The update as a dense matrix, (O, I): (alpha / R) B @ A."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scale

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, alpha={self.alpha}"


class LoRA(_LowRank):
    """The low-rank update alone, `(alpha / rank) * lora_b(lora_a(dropout(x)))`, to add to an existing
    projection (e.g. `ParallelTransformerBlock`'s `finetune_modules`). alpha None means `rank` (scale 1, as
    PaLM-rlhf-pytorch)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim, rank, rank if alpha is None else alpha, dropout, device, dtype)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., I) -> (..., O)."""
        return self.delta(x)


class LoRALinear(_LowRank):
    """A frozen linear plus a trainable low-rank update (torchtune's `LoRALinear`), x (..., I) -> (..., O):
    `x W^T + b + (alpha / rank) * lora_b(lora_a(dropout(x)))`.

    `merge()` folds the update into `weight` for inference (a merged layer has no adapter dropout);
    `unmerge()` subtracts it again, restoring the base weight up to float rounding. A merged layer's state
    dict says so (a `merged` key beside its four), and loading adopts the checkpoint's state: a merged
    checkpoint loads merged, and adapters loaded alone under a merged weight are re-merged, so the update is
    never counted twice or lost.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim, rank, alpha, dropout, device, dtype)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_dim, **factory), requires_grad=False) if bias else None
        self.merged = False
        self._remerge_after_load = False
        self.register_load_state_dict_post_hook(LoRALinear._after_load)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Base weight and bias as `nn.Linear`'s default init, then the adapter's."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_dim)
            nn.init.uniform_(self.bias, -bound, bound)
        super().reset_parameters()
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """Wrap an existing `nn.Linear`, keeping (sharing, not copying) its weight and bias, now frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w, b = linear.weight, linear.bias  # (O, I), (O,) or None
        lora = cls(
            w.shape[1], w.shape[0], rank, alpha, dropout, bias=b is not None, device=w.device, dtype=w.dtype
        )
        lora.weight = w.requires_grad_(False)
        if b is not None:
            lora.bias = b.requires_grad_(False)
        return lora

    @torch.no_grad()
    def merge(self) -> LoRALinear:
        """Fold the update into `weight` (in place); a no-op when already merged."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> LoRALinear:
        """Subtract the update from `weight` again (in place); a no-op when not merged."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:  # `weight` holds W + the update: a loader must not add the update again
            destination[prefix + "merged"] = torch.tensor(True, device=self.weight.device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # Called before the adapters (child modules) load; `_after_load` runs once they have.
        merged = state_dict.pop(prefix + "merged", None)  # load_state_dict's own copy of the dict
        if prefix + "weight" in state_dict:
            self.merged = bool(merged)  # the loaded weight is merged exactly when the checkpoint says so
        elif self.merged:  # adapters alone under a merged weight: take the old update out, fold the new in
            self.unmerge()
            self._remerge_after_load = True
        super()._load_from_state_dict(state_dict, prefix, *args)

    @staticmethod
    def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
        if module._remerge_after_load:
            module._remerge_after_load = False
            module.merge()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"LoRALinear: input of shape {tuple(x.shape)} must have last dim={self.in_dim}")
        out = F.linear(x, self.weight, self.bias)
        return out if self.merged else out + self.delta(x)  # merged: the update already lives in `weight`

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias={self.bias is not None}, merged={self.merged}"


def _matcher(target_modules: TargetModules) -> tuple[Callable[[str, nn.Module], bool], str]:
    if callable(target_modules):
        return target_modules, repr(target_modules)
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"target_modules={target_modules!r} must be non-empty names or a callable")

    def match(name: str, module: nn.Module) -> bool:
        return any(name == p or name.endswith("." + p) for p in patterns)

    return match, repr(patterns)


def _adapter_modules(model: nn.Module) -> set[str]:
    """The qualified names of the `lora_a`/`lora_b` of every `LoRA` and `LoRALinear` in `model`."""
    return {
        f"{p}.{sub}" if p else sub
        for p, m in model.named_modules()
        if isinstance(m, _LowRank)
        for sub in ("lora_a", "lora_b")
    }


def apply_lora(
    model: nn.Module, target_modules: TargetModules, rank: int, alpha: float, dropout: float = 0.0
) -> nn.Module:
    """Replace the matching `nn.Linear` submodules by `LoRALinear`, in place; returns `model`.

    target_modules: names matched as a suffix of the qualified name on a dot boundary (`"wq"` matches
    `layers.0.attention.wq`), or a callable `(qualified_name, module) -> bool`. Raises when none matched.
    """
    match, described = _matcher(target_modules)
    _check_lora_args(1, 1, rank, alpha, dropout)
    inside = _adapter_modules(model)  # never wrap these, nor a wrapper (exact type nn.Linear only)
    targets = [
        name
        for name, module in model.named_modules()
        if name and type(module) is nn.Linear and name not in inside and match(name, module)
    ]
    if not targets:
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        raise ValueError(
            f"target_modules={described} matched no nn.Linear in {type(model).__name__}; "
            f"its linears are {linears[:20]}"
        )
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear.from_linear(getattr(parent, child), rank, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every `LoRALinear` in `model` (in place) and return it."""
    return model.apply(lambda m: m.merge() if isinstance(m, LoRALinear) else None)


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Unmerge every `LoRALinear` in `model` (in place) and return it."""
    return model.apply(lambda m: m.unmerge() if isinstance(m, LoRALinear) else None)


def _adapter_param_names(model: nn.Module) -> set[str]:
    modules = _adapter_modules(model)
    return {n for n, _ in model.named_parameters(remove_duplicate=False) if n.rpartition(".")[0] in modules}


def mark_only_lora_as_trainable(model: nn.Module) -> list[str]:
    """Freeze all but the `lora_a`/`lora_b` weights of `LoRA` and `LoRALinear` (plain `nn.Linear`
    `finetune_modules` too); returns the names of the parameters left trainable."""
    adapters = _adapter_param_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapters)
    return [name for name, _ in model.named_parameters() if name in adapters]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights only (`...lora_a.weight`, `...lora_b.weight`), keyed as in `model.state_dict()`."""
    adapters = _adapter_param_names(model)
    return {k: v for k, v in model.state_dict().items() if k in adapters}
