"""Expert parallelism for `vermeil.nn.MoE`: experts sharded over ranks, tokens exchanged with all-to-all.

Axis legend: T local tokens, D model dim, F expert hidden dim, E experts, El = E / ep experts per rank,
S routed (token, expert) rows sent by this rank, R rows received by this rank, ep the expert-parallel degree.

Each rank keeps its own tokens (the EP ranks are also the data-parallel ranks); rank r holds experts
r*El .. (r+1)*El - 1, everything else is replicated. Rows arrive sorted by expert, so each destination's rows
are contiguous: `all_to_all_single_autograd` sends them (its backward is the reverse exchange).

An expert's gradient on its owner rank is already the sum over every rank's tokens, while replicated
parameters hold only the local part: `average_gradients` gives both DDP's mean (DDP itself would all-reduce
the expert shards too). Clip with `vermeil.distributed.clip_grad_norm`, which adds up the ranks' expert
norms (torch's `clip_grad_norm_` would see this rank's experts only, and each rank would clip differently). `torch.distributed.checkpoint` cannot save the per-rank shards yet: gather them first.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed._functional_collectives import all_to_all_single_autograd

from vermeil.nn.moe import Experts, MoE

__all__ = ["ExpertParallelExperts", "apply_expert_parallel", "average_gradients"]


class ExpertParallelExperts(nn.Module):
    """Drop-in replacement for `MoE.experts` holding this rank's El experts (`local.w1/w3/w2`, (El, D, F)),
    with `Experts.forward`'s contract; rows run on the ranks owning their experts."""

    def __init__(self, experts: Experts, group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.ep_size = dist.get_world_size(self.group)
        self.ep_rank = dist.get_rank(self.group)
        self.num_experts = experts.num_experts
        if self.num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={self.num_experts} must be divisible by the expert-parallel degree "
                f"ep_size={self.ep_size}"
            )
        n_local = self.num_experts // self.ep_size
        self.first_expert = first = self.ep_rank * n_local
        p = experts.w1
        # Built on meta, then materialised: no random init here, so the caller's RNG stream is untouched.
        local = Experts(experts.dim, experts.hidden_dim, n_local, device="meta", dtype=p.dtype)
        self.local = local.to_empty(device=p.device)
        with torch.no_grad():
            for name in ("w1", "w3", "w2"):
                getattr(self.local, name).copy_(getattr(experts, name)[first : first + n_local])
        for param in self.local.parameters():  # `clip_grad_norm` sums these norms over the group
            param.expert_parallel_group = self.group

    def reset_parameters(self) -> None:
        """Re-initialise the local experts (each rank draws its own)."""
        self.local.reset_parameters()

    def forward(
        self, x_SD: Tensor, expert_S: Tensor, counts_E: Tensor, offs_E: Tensor, *, grouped: bool = True
    ) -> Tensor:
        """x_SD: (S, D) rows sorted by global expert id; counts_E: (E,) rows per expert -> (S, D)."""
        del expert_S, offs_E  # recomputed for the received rows
        n_local = self.local.num_experts
        # Rows per (source rank, local expert): every rank sends its E counts, El to each destination.
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        recv_counts_WE = recv_counts.view(self.ep_size, n_local)
        # The split sizes must be Python ints: one host sync per MoE layer (as torchtitan's EP).
        send_splits = counts_E.view(self.ep_size, n_local).sum(1).tolist()
        recv_splits = recv_counts_WE.sum(1).tolist()
        x_RD = all_to_all_single_autograd(x_SD, recv_splits, send_splits, self.group)
        # Received rows are grouped by source rank, then by expert: regroup them by local expert.
        local_ids = torch.arange(n_local, device=x_SD.device).repeat(self.ep_size)
        expert_R = torch.repeat_interleave(local_ids, recv_counts_WE.reshape(-1))
        expert_R, order_R = torch.sort(expert_R, stable=True)
        counts_local = recv_counts_WE.sum(0)
        offs_local = counts_local.cumsum(0, dtype=torch.int32)
        y_RD = self.local(x_RD[order_R], expert_R, counts_local, offs_local, grouped=grouped)
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        return all_to_all_single_autograd(y_RD[inverse_R], send_splits, recv_splits, self.group)

    def extra_repr(self) -> str:
        last = self.first_expert + self.local.num_experts - 1
        return f"experts {self.first_expert}..{last} of {self.num_experts}, ep_size={self.ep_size}"


def apply_expert_parallel(model: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Shard the experts of every `MoE` of `model` (identical on every rank) over `group`, in place.

    Every MoE must use the "grouped" or "padded" backend (the references read all expert weights) and a number
    of experts divisible by the group size; both are checked before anything changes.
    """
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    ep_size = dist.get_world_size(group)
    for name, moe in moes:
        label = name or "<root>"
        if moe.backend not in ("grouped", "padded"):
            raise ValueError(
                f"MoE {label!r} has backend={moe.backend!r}; expert parallelism needs 'grouped' or 'padded'"
            )
        if moe.num_experts % ep_size:
            raise ValueError(
                f"num_experts={moe.num_experts} of MoE {label!r} must be divisible by the expert-parallel "
                f"degree ep_size={ep_size}"
            )
    for _, moe in moes:
        if not isinstance(moe.experts, ExpertParallelExperts):
            moe.experts = ExpertParallelExperts(moe.experts, group)
    return model


@torch.no_grad()
def average_gradients(model: nn.Module, group: ProcessGroup | None = None) -> None:
    """Turn per-rank gradients into those of the mean loss over ranks: replicated parameters are all-reduced,
    then every gradient is divided by the group size."""
    world = dist.get_world_size(group)
    expert_params = {
        id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()
    }
    for p in model.parameters():
        if p.grad is None:
            continue
        if id(p) not in expert_params:
            dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)
