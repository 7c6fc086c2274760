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
        dtypes = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in dtypes:
                raise ValueError(f"{name}={value!r} must be one of {dtypes} (or null)")
        mixed_precision = {"param_dtype": self.param_dtype, "reduce_dtype": self.reduce_dtype}
        flags = {"sequence_parallel": self.sequence_parallel, "loss_parallel": self.loss_parallel}
        _check_options(self.strategy, self.tp_size, mixed_precision, flags, yaml=True)


def _check_options(
    strategy: str,
    tp_size: object,
    mixed_precision: dict[str, object],
    flags: dict[str, bool],
    *,
    yaml: bool = False,
) -> None:
    """Refuse an unknown strategy, a bad tp_size or flag, and an option the strategy would ignore.
    `DistributedConfig` and `parallelize` share it, so one mistake reads the same in both (`yaml` spells
    values as a config file does).

    Args:
        mixed_precision: FSDP2 settings by name (set: not None), used by "fsdp2" and "fsdp2+tp" only.
        flags: sequence_parallel / loss_parallel by name, used by "tp" and "fsdp2+tp" only.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    null, true = ("null", "true") if yaml else ("None", "True")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be a bool ({true} or {'false' if yaml else 'False'})")
    if tp_size is not None and (not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1):
        raise ValueError(f"tp_size={tp_size!r} must be an int >= 1 (or {null})")
    if strategy == "fsdp2+tp" and tp_size is None:
        raise ValueError("strategy='fsdp2+tp' needs tp_size")
    tp, fsdp = ("tp", "fsdp2+tp"), ("fsdp2", "fsdp2+tp")
    if tp_size is not None and strategy not in tp:
        # e.g. "fsdp2" with tp_size=2 would silently run plain FSDP2
        raise ValueError(f"tp_size={tp_size} needs strategy 'tp' or 'fsdp2+tp', got strategy={strategy!r}")
    for name, value in mixed_precision.items():
        if value is not None and strategy not in fsdp:  # DDP and TP keep the parameters' dtype
            raise ValueError(
                f"{name}={value!r} needs strategy 'fsdp2' or 'fsdp2+tp', got strategy={strategy!r}"
            )
    for name, value in flags.items():
        if value and strategy not in tp:
            raise ValueError(f"{name}={true} needs strategy 'tp' or 'fsdp2+tp', got strategy={strategy!r}")
