"""Multi-process training on public torch APIs: process-group lifecycle, DDP, FSDP2, tensor and expert parallelism.

`parallelize(model, strategy)` applies a config's `distributed.strategy`; `init_distributed()` reads
torchrun's environment. Names are imported on first use: reading a run config loads no FSDP or DTensor module.
"""

from __future__ import annotations

from vermeil._lazy import lazy_names

_NAMES = {
    "DistributedConfig": "vermeil.distributed.config",
    "ExpertParallelExperts": "vermeil.distributed.expert",
    "apply_expert_parallel": "vermeil.distributed.expert",
    "average_gradients": "vermeil.distributed.expert",
    "DEFAULT_BLOCK_NAMES": "vermeil.distributed.parallel",
    "STRATEGIES": "vermeil.distributed.parallel",
    "Parallelized": "vermeil.distributed.parallel",
    "apply_ddp": "vermeil.distributed.parallel",
    "apply_fsdp2": "vermeil.distributed.parallel",
    "apply_tensor_parallel": "vermeil.distributed.parallel",
    "mixed_precision_policy": "vermeil.distributed.parallel",
    "parallelize": "vermeil.distributed.parallel",
    "tensor_parallel_plan": "vermeil.distributed.parallel",
    "get_rank": "vermeil.distributed.runtime",
    "get_world_size": "vermeil.distributed.runtime",
    "init_distributed": "vermeil.distributed.runtime",
    "is_distributed": "vermeil.distributed.runtime",
    "is_main_process": "vermeil.distributed.runtime",
    "rank_zero_only": "vermeil.distributed.runtime",
    "shutdown": "vermeil.distributed.runtime",
}

__all__ = sorted(_NAMES)

__getattr__, __dir__ = lazy_names(__name__, _NAMES)
