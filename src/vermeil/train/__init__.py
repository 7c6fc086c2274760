"""Training: the `Trainer` loop with hooks, its config, losses and loss heads, AdamW groups and the warm-up +
cosine schedule, metrics on disk and on screen.

    trainer.py   Trainer, Hook, TrainResult          config.py    TrainConfig (the `train:` section)
    losses.py    causal_lm_loss, loss heads, z-loss  optim.py     weight-decay groups, AdamW, the schedule
    metrics.py   metrics.jsonl, loss.png, progress   allocator.py keep_freed_memory

The run folder a trainer writes is `vermeil.runs` (its reading functions are re-exported here). Imports torch
and the rest of Vermeil only; tqdm, PyYAML, safetensors (the `train` extra) and matplotlib (the `plot` extra)
are imported where they are used.
"""

from vermeil.runs import latest_checkpoint, list_checkpoints, load_model_weights
from vermeil.train.allocator import keep_freed_memory
from vermeil.train.config import TrainConfig
from vermeil.train.losses import (
    LOSS_HEADS,
    CrossEntropyLoss,
    causal_lm_loss,
    head_loss,
    lm_loss_fn,
    loss_head,
    register_loss_head,
)
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
from vermeil.train.trainer import Hook, Trainer, TrainResult

__all__ = [
    "LOSS_HEADS",
    "CrossEntropyLoss",
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
    "cosine_with_warmup",
    "head_loss",
    "keep_freed_memory",
    "latest_checkpoint",
    "list_checkpoints",
    "lm_loss_fn",
    "load_model_weights",
    "loss_head",
    "param_groups",
    "plot_loss_curve",
    "read_metrics",
    "register_loss_head",
    "truncate_metrics",
]
