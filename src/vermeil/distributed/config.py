"""The `distributed:` section of a run config; no torch.distributed import, so any machine reads configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["DistributedConfig"]

Strategy = Literal["none", "ddp", "fsdp2", "tp", "fsdp2+tp"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


@dataclass
class DistributedConfig:
    """How a run is split over torchrun's processes; ignored in a process without `WORLD_SIZE`.

    Args:
        strategy: see `vermeil.distributed.parallelize`.
        tp_size: tensor-parallel degree; None means all ranks for "tp" (required for "fsdp2+tp").
        param_dtype, reduce_dtype: FSDP2 mixed precision ("bf16", "fp32", ...; None keeps the parameters'
            dtype), used by "fsdp2" and "fsdp2+tp" only.
        sequence_parallel: with "tp"/"fsdp2+tp", shard the residual stream and the norms over the sequence
            (LLM and hybrid; `vermeil.distributed.tensor_parallel`).
        loss_parallel: with "tp"/"fsdp2+tp", vocab-sharded logits and a cross-entropy under
            `torch.distributed.tensor.parallel.loss_parallel()` (never gathers the full logits in training).
    """

    strategy: Strategy = "none"
    tp_size: int | None = None
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    sequence_parallel: bool = False
    loss_parallel: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} must be one of {STRATEGIES}")
        if self.tp_size is not None and (
            not isinstance(self.tp_size, int) or isinstance(self.tp_size, bool) or self.tp_size < 1
        ):
            raise ValueError(f"tp_size={self.tp_size!r} must be an int >= 1 (or null)")
        if self.strategy == "fsdp2+tp" and self.tp_size is None:
            raise ValueError("strategy='fsdp2+tp' needs tp_size")
        dtypes = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in dtypes:
                raise ValueError(f"{name}={value!r} must be one of {dtypes} (or null)")
        for name in ("sequence_parallel", "loss_parallel"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be a bool (true or false)")
            if value and self.strategy not in ("tp", "fsdp2+tp"):
                raise ValueError(
                    f"{name}=true needs strategy 'tp' or 'fsdp2+tp', got strategy={self.strategy!r}"
                )
