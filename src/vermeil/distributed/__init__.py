"""Multi-process training on public torch APIs: process-group lifecycle, DDP, FSDP2 and tensor parallelism.

`parallelize(model, strategy)` applies a config's `distributed.strategy` ("none", "ddp", "fsdp2", "tp",
"fsdp2+tp") and says how to split the data. `init_distributed()` reads torchrun's environment (gloo on CPU, nccl
on CUDA) and is a no-op in a single process; `shutdown()` leaves cleanly. `apply_ddp`, `apply_fsdp2` and
`apply_tensor_parallel` wrap or shard a model from the outside, by module name: `tensor_parallel_plan` knows the
`vermeil.nn` blocks, the LLM (MoE experts included), the hybrid and Flux, with optional sequence parallelism and
loss parallelism on the LM head (`vermeil.distributed.tensor_parallel`). `apply_expert_parallel` shards the
experts of every `MoE` over the ranks (tokens exchanged with an autograd all-to-all). Distributed checkpoints
(`torch.distributed.checkpoint`) are in `vermeil.distributed.checkpoint`; the `distributed:` section of a run
config is `DistributedConfig` (`vermeil.distributed.config`), and what the trainer needs per step is in
`vermeil.distributed.training`.

Names are imported on first use: reading a run config does not load torch.distributed's FSDP and DTensor
modules.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# name -> the module that defines it
_NAMES = {
    "DistributedConfig": "config",
    "ExpertParallelExperts": "expert",
    "apply_expert_parallel": "expert",
    "average_gradients": "expert",
    "DEFAULT_BLOCK_NAMES": "parallel",
    "STRATEGIES": "parallel",
    "Parallelized": "parallel",
    "apply_ddp": "parallel",
    "apply_fsdp2": "parallel",
    "apply_tensor_parallel": "parallel",
    "mixed_precision_policy": "parallel",
    "parallelize": "parallel",
    "tensor_parallel_plan": "parallel",
    "get_rank": "runtime",
    "get_world_size": "runtime",
    "init_distributed": "runtime",
    "is_distributed": "runtime",
    "is_main_process": "runtime",
    "rank_zero_only": "runtime",
    "shutdown": "runtime",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'vermeil.distributed' has no attribute {name!r}")
    value = getattr(import_module(f"vermeil.distributed.{_NAMES[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
