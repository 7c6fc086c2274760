"""The `train:` section of a run config: `TrainConfig`, the settings of one training run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Settings of one training run.

    Args:
        steps: optimizer updates in the whole run (the schedule's length; resuming continues up to it).
        lr: peak learning rate; min_lr_ratio: the cosine ends at `lr * min_lr_ratio`; warmup: linear warm-up steps.
        weight_decay, betas, eps: AdamW (which parameters decay: `vermeil.train.optim.param_groups`).
        no_decay_embeddings: keep embedding tables out of the weight decay.
        fused_adamw: the fused AdamW kernel; None uses it where torch has one.
        grad_clip: clip the global gradient norm to this; None or 0 disables clipping.
        grad_accum: micro-batches per update (the effective batch is `batch_size * grad_accum`).
        batch_size, seq_len: the shape of one micro-batch (the recipes' data builders read them).
        eval_every: evaluate every N steps (0: only at the end); eval_batches: batches per evaluation.
        log_every: a `metrics.jsonl` row (and a progress-bar update) every N steps.
        save_every: a checkpoint every N steps (0: only at the end and on Ctrl-C); keep_checkpoints: how many
            checkpoint folders stay on disk.
        precision: "fp32"; "bf16" autocasts the forward to bfloat16; "fp16" to float16 with a
            `torch.amp.GradScaler` (for GPUs without bf16). Weights and optimizer state stay float32.
        bf16: True is a shorthand for `precision: bf16`.
        on_nonfinite: on a non-finite loss or gradient norm, "stop" raises `NonFiniteError`; "skip" leaves
            that update out and counts `skipped_steps`. No checkpoint is ever written from non-finite weights.
        max_nonfinite: with "skip", stop after this many non-finite steps in a row.
        seed: seeds the model init, the data order and dropout.
        device: where to train ("cpu", "cuda", ...).
        out_dir: the run folder (None: the CLI picks `runs/<config name>`; the Python API keeps nothing).
        progress: show the tqdm bar; None shows it only on a terminal (else a plain line per log row).
        plot: write `loss.png` at the end (needs matplotlib).
        threads: torch intra-op threads (None: leave torch's default).
        compile: compile the model's repeated blocks (`vermeil.train.regional`); "auto" compiles on CUDA in a
            single process only. If compiling fails, one line says so and training continues eagerly.
        loss_chunk_size: fuse the LM cross-entropy with the output head, chunked over this many tokens
            (`vermeil.train.losses.chunked_cross_entropy`: no (B*T, V) logits); 0: full logits; "auto" chunks
            on CUDA in a single process. For `causal_lm_loss` and `cross_entropy` heads on an nn.Linear head.
    """

    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    no_decay_embeddings: bool = True
    fused_adamw: bool | None = None
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    batch_size: int = 16
    seq_len: int = 256
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    bf16: bool = False
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite: int = 10
    seed: int = 0
    device: str = "cpu"
    out_dir: str | None = None
    progress: bool | None = None
    plot: bool = True
    threads: int | None = None
    compile: bool | Literal["auto"] = "auto"
    loss_chunk_size: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        counts = {  # the lowest value of each count (0: none, or only at the end)
            1: "steps grad_accum batch_size seq_len eval_batches log_every keep_checkpoints max_nonfinite",
            0: "warmup eval_every save_every",
        }
        for low, names in counts.items():
            for name in names.split():
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < low:
                    raise ValueError(f"{name}={value!r} must be an int >= {low}")
        # Each of these, out of range (inf, nan, eps = 0: 0/0 on a parameter without gradient), makes the first
        # update write non-finite weights.
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr={self.lr!r} must be a finite number > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a finite number >= 0")
        if not 0 < self.eps < math.inf:
            raise ValueError(f"eps={self.eps!r} must be a finite number > 0")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)!r} must be two numbers in [0, 1)")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ValueError(f"grad_clip={self.grad_clip!r} must be >= 0 (or null to disable)")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision={self.precision!r} must be 'fp32', 'bf16' or 'fp16'")
        if self.bf16 and self.precision == "fp16":
            raise ValueError("bf16=True contradicts precision='fp16': set one of them")
        if self.bf16:
            self.precision = "bf16"
        self.bf16 = self.precision == "bf16"
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite={self.on_nonfinite!r} must be 'stop' or 'skip'")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads!r} must be >= 1 (or null)")
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ValueError(f"compile={self.compile!r} must be true, false or 'auto'")
        chunk = self.loss_chunk_size
        if chunk != "auto" and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
            raise ValueError(f"loss_chunk_size={chunk!r} must be 'auto' or an int >= 0 (0: no chunking)")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device={self.device!r} is not a torch device: {e}") from None
