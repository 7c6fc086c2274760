"""Training: the `Trainer` loop and its parts.

    trainer.py   Trainer                             config.py    TrainConfig (the `train:` section)
    hooks.py     Hook, TrainResult, LossCurve        allocator.py keep_freed_memory
    losses.py    causal_lm_loss, loss heads, z-loss  optim.py     weight-decay groups, AdamW, the schedule
                 chunked_cross_entropy (head + CE)   regional.py  compile_blocks (train.compile)
    metrics.py   metrics.jsonl, loss.png, progress

The run folder is `vermeil.runs` (its readers are re-exported here). Names load on first use; tqdm, PyYAML,
safetensors (the `train` extra) and matplotlib (the `plot` extra) are imported where they are used.
"""

from __future__ import annotations

from vermeil._lazy import lazy_names

_NAMES = {
    "latest_checkpoint": "vermeil.runs",
    "list_checkpoints": "vermeil.runs",
    "load_model_weights": "vermeil.runs",
    "keep_freed_memory": "vermeil.train.allocator",
    "TrainConfig": "vermeil.train.config",
    "Hook": "vermeil.train.hooks",
    "LossCurve": "vermeil.train.hooks",
    "TrainResult": "vermeil.train.hooks",
    "LOSS_HEADS": "vermeil.train.losses",
    "CrossEntropyLoss": "vermeil.train.losses",
    "causal_lm_loss": "vermeil.train.losses",
    "chunked_cross_entropy": "vermeil.train.losses",
    "chunked_lm_loss_fn": "vermeil.train.losses",
    "head_loss": "vermeil.train.losses",
    "lm_loss_fn": "vermeil.train.losses",
    "loss_head": "vermeil.train.losses",
    "register_loss_head": "vermeil.train.losses",
    "MetricsLogger": "vermeil.train.metrics",
    "bits_per_byte": "vermeil.train.metrics",
    "plot_loss_curve": "vermeil.train.metrics",
    "read_metrics": "vermeil.train.metrics",
    "truncate_metrics": "vermeil.train.metrics",
    "WarmupCosine": "vermeil.train.optim",
    "build_optimizer": "vermeil.train.optim",
    "build_scheduler": "vermeil.train.optim",
    "cosine_with_warmup": "vermeil.train.optim",
    "param_groups": "vermeil.train.optim",
    "compile_blocks": "vermeil.train.regional",
    "uncompile_blocks": "vermeil.train.regional",
    "Trainer": "vermeil.train.trainer",
}

__all__ = sorted(_NAMES)


__getattr__, __dir__ = lazy_names(__name__, _NAMES)
