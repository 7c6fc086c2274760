"""Multi-process training on public torch APIs: process-group lifecycle, DDP, FSDP2 and tensor parallelism.

`parallelize(model, strategy)` applies a config's `distributed.strategy` ("none", "ddp", "fsdp2", "tp",
"fsdp2+tp") and says how to split the data. `init_distributed()` reads torchrun's environment (gloo on CPU, nccl
on CUDA) and is a no-op in a single process; `shutdown()` leaves cleanly. `apply_ddp`, `apply_fsdp2` and
`apply_tensor_parallel` wrap or shard a model from the outside, by module name: `tensor_parallel_plan` knows the
`vermeil.nn` blocks, the LLM (MoE experts included), the hybrid and Flux, with optional sequence parallelism and
loss parallelism on the LM head (`vermeil.distributed.tensor_parallel`). `apply_expert_parallel` shards the
experts of every `MoE` over the ranks (tokens exchanged with an autograd all-to-all). Distributed checkpoints
(`torch.distributed.checkpoint`) are in `vermeil.distributed.checkpoint`.
"""

from vermeil.distributed.expert import ExpertParallelExperts, apply_expert_parallel, average_gradients
from vermeil.distributed.parallel import (
    DEFAULT_BLOCK_NAMES,
    STRATEGIES,
    Parallelized,
    apply_ddp,
    apply_fsdp2,
    apply_tensor_parallel,
    mixed_precision_policy,
    parallelize,
    tensor_parallel_plan,
)
from vermeil.distributed.runtime import (
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    rank_zero_only,
    shutdown,
)

__all__ = [
    "DEFAULT_BLOCK_NAMES",
    "STRATEGIES",
    "ExpertParallelExperts",
    "Parallelized",
    "apply_ddp",
    "apply_expert_parallel",
    "apply_fsdp2",
    "apply_tensor_parallel",
    "average_gradients",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "mixed_precision_policy",
    "parallelize",
    "rank_zero_only",
    "shutdown",
    "tensor_parallel_plan",
]
