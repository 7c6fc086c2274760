"""Training: the `Trainer` loop with hooks, AdamW groups and the warm-up + cosine schedule, metrics on disk.

Imports torch and the rest of Vermeil only; tqdm, PyYAML, safetensors (the `train` extra) and matplotlib (the
`plot` extra) are imported where they are used.
"""

from vermeil.train.allocator import keep_freed_memory
from vermeil.train.metrics import (
    MetricsLogger,
    bits_per_byte,
    plot_loss_curve,
    read_metrics,
    truncate_metrics,
)
from vermeil.train.optim import (
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    cosine_with_warmup,
    param_groups,
)
from vermeil.train.trainer import (
    Hook,
    TrainConfig,
    Trainer,
    TrainResult,
    causal_lm_loss,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
)

__all__ = [
    "Hook",
    "MetricsLogger",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "bits_per_byte",
    "build_optimizer",
    "build_scheduler",
    "causal_lm_loss",
    "keep_freed_memory",
    "cosine_with_warmup",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "param_groups",
    "plot_loss_curve",
    "read_metrics",
    "truncate_metrics",
]
