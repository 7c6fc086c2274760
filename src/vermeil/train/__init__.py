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

_MODULES = {  # module -> the public names it defines
    "vermeil.runs": "latest_checkpoint list_checkpoints load_model_weights",
    "vermeil.train.allocator": "keep_freed_memory",
    "vermeil.train.config": "TrainConfig",
    "vermeil.train.hooks": "Hook LossCurve TrainResult",
    "vermeil.train.losses": (
        "LOSS_HEADS CrossEntropyLoss causal_lm_loss chunked_cross_entropy chunked_lm_loss_fn head_loss lm_loss_fn "
        "loss_head register_loss_head"
    ),
    "vermeil.train.metrics": "MetricsLogger bits_per_byte plot_loss_curve read_metrics truncate_metrics",
    "vermeil.train.optim": "WarmupCosine build_optimizer build_scheduler cosine_with_warmup param_groups",
    "vermeil.train.regional": "compile_blocks uncompile_blocks",
    "vermeil.train.trainer": "Trainer",
}
_NAMES = {name: module for module, names in _MODULES.items() for name in names.split()}

__all__ = sorted(_NAMES)


__getattr__, __dir__ = lazy_names(__name__, _NAMES)
