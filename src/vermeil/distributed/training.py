"""What a training loop needs under a distributed strategy: each data-parallel rank's batches, gradient
clipping over DTensors on several meshes, and optimizer groups split by tensor kind."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ShardedBatches", "clip_grad_norm", "is_dtensor", "split_dtensor_groups"]


def is_dtensor(t: Tensor) -> bool:
    """Whether `t` is a DTensor (imported here only: plain runs never load it)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class ShardedBatches:
    """This data-parallel rank's rows (dim 0) of every global batch of an endless batch iterator.

    Every rank draws the same global batch and keeps its B / dp_size rows: the sampler state is the same on
    every rank (one saved copy resumes them all), and N ranks see exactly the data of one process. Other
    attributes (`state_dict`, ...) are the wrapped iterator's.
    """

    def __init__(self, batches: Iterator[Any], dp_rank: int, dp_size: int) -> None:
        self.batches, self.dp_rank, self.dp_size = batches, dp_rank, dp_size

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> Any:
        return self._slice(next(self.batches))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["batches"], name)

    def _slice(self, batch: Any) -> Any:
        if isinstance(batch, Tensor):
            if batch.ndim == 0:
                return batch
            if (n := batch.shape[0]) % self.dp_size:
                raise ValueError(
                    f"a global batch of {n} rows must be divisible by the data-parallel size {self.dp_size}"
                )
            return batch.tensor_split(self.dp_size)[self.dp_rank]  # equal views of n / dp_size rows
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._slice(b) for b in batch)
        if isinstance(batch, Mapping):
            return {k: self._slice(v) for k, v in batch.items()}
        return batch


def clip_grad_norm(params: list[Tensor], max_norm: float) -> Tensor:
    """`clip_grad_norm_` for parameters that may be DTensors on different meshes (FSDP2, TP, both) or
    expert-parallel shards (`apply_expert_parallel`); returns the global 2-norm, combined from one norm (one
    collective) per mesh and placements, or per expert-parallel group."""
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[Tensor]] = {}
    expert_groups: dict[Any, list[Tensor]] = {}
    for p in params:
        ep_group = getattr(p, "expert_parallel_group", None)
        if ep_group is not None:  # with or without a gradient: every rank joins the group's all-reduce
            expert_groups.setdefault(ep_group, []).append(p)
        elif p.grad is not None:
            g = p.grad
            key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    for ep_group, group in expert_groups.items():  # each rank holds other experts: sum their squares
        grads = [p.grad for p in group if p.grad is not None]
        square = torch.nn.utils.get_total_norm(grads, 2.0).square() if grads else group[0].new_zeros(())
        dist.all_reduce(square, group=ep_group)
        norms.append(square.sqrt())
    groups.update(expert_groups)  # clipped like the rest
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    for group in groups.values():  # one group at a time: a foreach op cannot mix DTensors and plain tensors
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def split_dtensor_groups(optimizer: torch.optim.Optimizer) -> None:
    """Split each param group into its plain and DTensor parameters, before any step: AdamW's fused and
    foreach kernels cannot mix the two kinds in one call."""
    groups = []
    for group in optimizer.param_groups:
        names = group.get("param_names")  # build_optimizer's groups name their parameters: split alike
        for sharded in (False, True):
            keep = [i for i, p in enumerate(group["params"]) if is_dtensor(p) == sharded]
            if keep:
                part = {**group, "params": [group["params"][i] for i in keep]}
                if names is not None:
                    part["param_names"] = [names[i] for i in keep]
                groups.append(part)
    optimizer.param_groups = groups
