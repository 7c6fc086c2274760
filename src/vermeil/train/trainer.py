"""The training loop: an explicit loop with hooks, checkpoints that resume exactly, and clean Ctrl-C.

One step is `grad_accum` micro-batches of forward + backward, gradient clipping, an AdamW step and a scheduler
step (warm-up then cosine). Around it: evaluation every `eval_every` steps, metrics appended to `metrics.jsonl`,
a tqdm progress bar (loss, tokens/s, ETA; silent when stdout is not a terminal), checkpoints every `save_every`
steps, a loss-curve PNG at the end.

A run folder holds:
    config.yaml                         the resolved run config (what `vermeil train --resume` rebuilds from)
    metrics.jsonl                       one JSON row per log step and per evaluation
    loss.png                            the loss curve (when matplotlib is installed)
    checkpoints/step_000100/            model.safetensors (weights) and state.pt (optimizer, scheduler, RNG
                                        states, data sampler state, step, config as a dict)
    checkpoints/latest                  the name of the newest complete checkpoint folder

Every file is written atomically (`vermeil.checkpoint`) and `latest` moves only after a checkpoint folder is
complete, so a run killed at any moment (SIGKILL included) leaves the previous checkpoint loadable.

Under `torchrun` with a run config's `distributed.strategy` ("ddp", "fsdp2", "tp", "fsdp2+tp"; see
`DistributedConfig`), the trainer joins the process group, applies `vermeil.distributed.parallelize` before
building the optimizer, gives each data-parallel rank its slice of every global batch (`train.batch_size` stays
the global micro-batch, so a run on N ranks trains on the same data as one process), averages the logged loss
and metrics over the ranks, and lets rank 0 alone draw the bar and write metrics, plots and `config.yaml`. A
checkpoint folder then holds `dcp/` (`vermeil.distributed.checkpoint`: every rank writes its shards of the
model and optimizer), `state.pt` (the rest, from rank 0) and `model.safetensors` (the full weights exported by
rank 0, so `vermeil generate` works on the run). With `distributed.loss_parallel` the model returns
vocab-sharded logits in training mode, and each micro-batch's loss and backward run under `loss_parallel()`. At
the end of `fit` the trainer leaves the process group it joined (barrier, `destroy_process_group`). In one
process (no `WORLD_SIZE`) the section is ignored.

Resuming restores weights, optimizer and scheduler state, the torch and Python RNG states and the data sampler's
state, so the resumed loss curve continues exactly the curve of the same run left uninterrupted (the loss of
step s is the same float whether or not the run stopped before s; tests/train/test_trainer.py checks it).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.checkpoint import (
    atomic_write,
    clean_temp_files,
    load_torch,
    load_weights,
    save_torch,
    save_weights,
)
from vermeil.train.metrics import LN2, MetricsLogger, plot_loss_curve, read_metrics, truncate_metrics
from vermeil.train.optim import WarmupCosine, build_optimizer, build_scheduler, cosine_with_warmup

__all__ = [
    "CHECKPOINTS_DIR",
    "DistributedConfig",
    "Hook",
    "LossFn",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "causal_lm_loss",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_weights",
]

CHECKPOINTS_DIR = "checkpoints"
_LATEST = "latest"
_WEIGHTS = "model.safetensors"
_STATE = "state.pt"
_DCP = "dcp"

# A loss function takes the model and one batch and returns the loss to minimise, or (loss, metrics) where
# metrics are scalar tensors logged by name (e.g. {"ce": ..., "aux_loss": ...}).
LossFn = Callable[[nn.Module, Any], "Tensor | tuple[Tensor, Mapping[str, Tensor]]"]


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    """Settings of one training run (the `train:` section of a run config).

    Args:
        steps: optimizer updates in the whole run (the schedule's length; resuming continues up to it).
        lr: peak learning rate; min_lr_ratio: the cosine ends at `lr * min_lr_ratio`; warmup: linear warm-up steps.
        weight_decay, betas, eps: AdamW (no decay on norms, biases, embeddings, A_log, D: `train.optim`).
        no_decay_embeddings: keep embedding tables out of the weight decay.
        fused_adamw: the fused AdamW kernel; None uses it where torch has one (CPU included).
        grad_clip: clip the global gradient norm to this; None or 0 disables clipping.
        grad_accum: micro-batches per update (the effective batch is `batch_size * grad_accum`).
        batch_size, seq_len: the shape of one micro-batch (the recipes' data builders read them).
        eval_every: evaluate every N steps (0: only at the end); eval_batches: batches per evaluation.
        log_every: a `metrics.jsonl` row (and a progress-bar update) every N steps.
        save_every: a checkpoint every N steps (0: only at the end and on Ctrl-C); keep_checkpoints: how many
            checkpoint folders stay on disk.
        bf16: autocast the forward to bfloat16 (CPU or GPU); weights and optimizer stay float32.
        seed: seeds the model init, the data order and dropout.
        device: where to train ("cpu", "cuda", ...).
        out_dir: the run folder (None: the CLI picks `runs/<config name>`; the Python API then keeps nothing on
            disk).
        progress: show the tqdm bar; None shows it only when stdout is a terminal (tqdm's `disable=None`).
        plot: write `loss.png` at the end (needs matplotlib).
        threads: torch intra-op threads (None: leave torch's default).
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
    bf16: bool = False
    seed: int = 0
    device: str = "cpu"
    out_dir: str | None = None
    progress: bool | None = None
    plot: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "grad_accum",
            "batch_size",
            "seq_len",
            "eval_batches",
            "log_every",
            "keep_checkpoints",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        for name in ("warmup", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)!r} must be two numbers in [0, 1)")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip!r} must be >= 0 (or null to disable)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads!r} must be >= 1 (or null)")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device={self.device!r} is not a torch device: {e}") from None


@dataclass
class DistributedConfig:
    """How a run is split over the processes of `torchrun` (the `distributed:` section of a run config).

    Ignored (a plain single-process run) when the process was not started by torchrun (no `WORLD_SIZE`).

    Args:
        strategy: "none", "ddp", "fsdp2", "tp" or "fsdp2+tp" (`vermeil.distributed.parallelize`).
        tp_size: tensor-parallel degree; None means all ranks for "tp" (required for "fsdp2+tp").
        param_dtype, reduce_dtype: FSDP2 mixed precision ("bf16", "fp32", ...; None keeps the parameters'
            dtype), used by "fsdp2" and "fsdp2+tp" only.
        sequence_parallel: with "tp"/"fsdp2+tp", shard the residual stream and the norms over the sequence
            (LLM and hybrid; `vermeil.distributed.tensor_parallel`).
        loss_parallel: with "tp"/"fsdp2+tp", vocab-sharded logits and a cross-entropy under
            `torch.distributed.tensor.parallel.loss_parallel()` (never gathers the full logits in training).
    """

    strategy: Literal["none", "ddp", "fsdp2", "tp", "fsdp2+tp"] = "none"
    tp_size: int | None = None
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    sequence_parallel: bool = False
    loss_parallel: bool = False

    def __post_init__(self) -> None:
        strategies = ("none", "ddp", "fsdp2", "tp", "fsdp2+tp")
        if self.strategy not in strategies:
            raise ValueError(f"strategy={self.strategy!r} must be one of {strategies}")
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


@dataclass
class TrainResult:
    """What `Trainer.fit` returns: the last completed step, whether Ctrl-C stopped it, the last checkpoint and
    evaluation, and every metrics row of the run (resumed runs included)."""

    step: int
    interrupted: bool
    checkpoint: Path | None
    final_eval: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


class Hook:
    """Override any of these to watch or steer training; `trainer.request_stop()` ends the run after the step."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step (after a resume has restored the state)."""

    def on_step_end(self, trainer: Trainer, step: int, loss: Tensor) -> None:
        """After update `step` (1-based: `trainer.step`), with its loss as a detached 0-dim tensor."""

    def on_log(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After a train row was written."""

    def on_eval(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After an evaluation row was written."""

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """After a checkpoint folder was completed."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """At the end of `fit`, interrupted or not."""


# ----------------------------------------------------------------------------------------------------------
# Loss heads


def _logits_and_aux(output: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(output, Tensor):
        return output, None
    return output.logits, getattr(output, "aux_loss", None)


def causal_lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token cross-entropy (ignore_index -100), plus the MoE auxiliary loss when the model returns one.

    Args:
        batch: (inputs (B, T), targets (B, T)); targets hold -100 where nothing is scored.

    Returns:
        (loss, {"ce": cross-entropy, "aux_loss": MoE auxiliary loss (when present)}). A model's output may be
        logits (B, T, V) or an object with `.logits` and optionally `.aux_loss` (the LLM's TransformerOutput).
    """
    inputs, targets = batch
    logits, aux = _logits_and_aux(model(inputs))
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    # Vocab-sharded logits (loss parallelism) give a replicated DTensor: plain before it meets the plain aux
    # loss, whose backward would otherwise receive a DTensor gradient.
    ce = _plain(ce)
    if aux is None:
        return ce, {"ce": ce}
    return ce + aux, {"ce": ce, "aux_loss": aux}


# ----------------------------------------------------------------------------------------------------------
# Checkpoint folders


def _checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step of a checkpoint folder named `step_000100`."""
    name = Path(path).name
    if not name.startswith("step_") or not name[5:].isdigit():
        raise ValueError(f"{os.fspath(path)} is not a checkpoint folder (expected a name like step_000100)")
    return int(name[5:])


def _complete(folder: Path) -> bool:
    return (folder / _WEIGHTS).is_file() and (folder / _STATE).is_file()


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted((p for p in found if _complete(p)), key=checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path:
    """The newest complete checkpoint folder of a run (or `run_dir` itself when it is a checkpoint folder).

    Raises:
        FileNotFoundError: the folder does not exist or holds no complete checkpoint.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {os.fspath(run)} does not exist")
    if _complete(run):
        return run
    pointer = run / CHECKPOINTS_DIR / _LATEST
    if pointer.is_file():
        folder = run / CHECKPOINTS_DIR / pointer.read_text(encoding="utf-8").strip()
        if _complete(folder):
            return folder
    found = list_checkpoints(run)
    if not found:
        raise FileNotFoundError(
            f"{os.fspath(run)} holds no checkpoint (no {CHECKPOINTS_DIR}/step_*/{_STATE})"
        )
    return found[-1]


def load_model_weights(model: nn.Module, run_dir: str | os.PathLike[str]) -> Path:
    """Load the newest checkpoint's weights of a run into `model` (strict); returns the checkpoint folder."""
    folder = latest_checkpoint(run_dir)
    load_weights(model, folder / _WEIGHTS)
    return folder


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _count_tokens(batch: Any) -> int:
    """Positions in a batch: B * T of its first tensor ((B, T) ids or (B, T, C) features)."""
    first = batch
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, Mapping) and first:
        first = next(iter(first.values()))
    if not isinstance(first, Tensor) or first.ndim == 0:
        return 0
    return first.shape[0] * (first.shape[1] if first.ndim > 1 else 1)


def _split_loss(out: Any) -> tuple[Tensor, Mapping[str, Tensor]]:
    if isinstance(out, Tensor):
        return out, {}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor):
        return out[0], out[1] or {}
    raise TypeError(f"a loss function must return a tensor or (loss, metrics), got {type(out).__name__}")


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    # random.setstate needs tuples all the way down; a saved state may come back with lists.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


class _NoBar:
    """Stand-in for tqdm when it is not installed or the bar is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, enabled: bool | None) -> Any:
    if enabled is False:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    # disable=None: a bar on a terminal, nothing when stdout is a pipe or a file (logs stay clean).
    return tqdm(
        total=total,
        initial=initial,
        disable=None if enabled is None else False,
        unit="step",
        dynamic_ncols=True,
        smoothing=0.1,
    )


def _echo(message: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:
        print(message, file=sys.stderr)


def _format_row(row: Mapping[str, Any]) -> str:
    parts = []
    for k, v in row.items():
        if k in ("split",):
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)


class _ShardedBatches:
    """This data-parallel rank's slice (along dim 0) of every global batch of an endless batch iterator.

    Every rank draws the same global batch (same sampler, same seed) and keeps rows
    `[dp_rank * B / dp_size, (dp_rank + 1) * B / dp_size)`: deterministic, the sampler state is the same on every
    rank (one saved copy resumes them all), and N ranks train on exactly the data of one process.
    `state_dict`/`load_state_dict` (and any other attribute) are the wrapped iterator's.
    """

    def __init__(self, batches: Iterator[Any], dp_rank: int, dp_size: int) -> None:
        self.batches, self.dp_rank, self.dp_size = batches, dp_rank, dp_size

    def __iter__(self) -> _ShardedBatches:
        return self

    def __next__(self) -> Any:
        return self._slice(next(self.batches))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["batches"], name)

    def _slice(self, batch: Any) -> Any:
        if isinstance(batch, Tensor):
            if batch.ndim == 0:
                return batch
            n = batch.shape[0]
            if n % self.dp_size:
                raise ValueError(
                    f"a global batch of {n} rows must be divisible by the data-parallel size {self.dp_size}"
                )
            k = n // self.dp_size
            return batch[self.dp_rank * k : (self.dp_rank + 1) * k]
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._slice(b) for b in batch)
        if isinstance(batch, Mapping):
            return {k: self._slice(v) for k, v in batch.items()}
        return batch


def _clip_grad_norm(params: list[Tensor], max_norm: float) -> Tensor:
    """`clip_grad_norm_` for parameters that may be DTensors on different meshes (FSDP2, TP, both).

    The norm of each group of gradients sharing a mesh and placements is computed as a DTensor and made full
    (one collective per group); the groups' norms combine into the global 2-norm, a plain 0-dim tensor.
    """
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    for group in groups.values():  # one group at a time: a foreach op cannot mix DTensors and plain tensors
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def _split_dtensor_groups(optimizer: torch.optim.Optimizer) -> None:
    """Split each param group into its plain-tensor and DTensor parameters (same settings), before any step.

    Under tensor parallelism only some parameters are DTensors; AdamW's fused and foreach kernels run once per
    group and cannot mix the two kinds in one call.
    """
    groups = []
    for group in optimizer.param_groups:
        plain = [p for p in group["params"] if not _is_dtensor(p)]
        sharded = [p for p in group["params"] if _is_dtensor(p)]
        groups.extend({**group, "params": ps} for ps in (plain, sharded) if ps)
    optimizer.param_groups = groups


def _distributed_config(
    distributed: DistributedConfig | Mapping[str, Any] | None, run_config: Mapping[str, Any]
) -> DistributedConfig:
    if distributed is None:
        distributed = run_config.get("distributed") or {}
    if isinstance(distributed, DistributedConfig):
        return distributed
    if isinstance(distributed, Mapping):
        from vermeil.config import from_dict

        return from_dict(DistributedConfig, dict(distributed), path="distributed")
    raise TypeError(
        f"distributed must be a DistributedConfig, a mapping or None, got {type(distributed).__name__}"
    )


# ----------------------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """Train `model` on `train_batches` with `loss_fn`, evaluating with `eval_fn`, checkpointing into a folder.

    Args:
        model: the module to train (moved to `config.device`).
        train_batches: an endless iterator of batches; when it has `state_dict()`/`load_state_dict()`
            (e.g. `vermeil.data.WindowSampler`) its position is saved with each checkpoint, which resume needs
            to be exact.
        loss_fn: `loss_fn(model, batch) -> loss` or `(loss, {name: scalar})`; default `causal_lm_loss`.
        config: the `TrainConfig`.
        eval_fn: `eval_fn(model) -> {name: float}`, run in eval mode under `no_grad`, in a forked RNG (so that
            evaluating never changes the training randomness).
        hooks: `Hook` instances, called in order.
        run_config: the resolved run config as a plain dict, saved as `config.yaml` and inside every checkpoint
            (default: `{"train": <config>}`).
        out_dir: the run folder (default `config.out_dir`); None keeps nothing on disk.
        distributed: how to split the run under torchrun (default: the `distributed` entry of `run_config`,
            else none); ignored in a single process (no `WORLD_SIZE` in the environment).

    Example:
        >>> trainer = Trainer(model, WindowSampler(data, 8, 64), causal_lm_loss, TrainConfig(steps=100))
        >>> result = trainer.fit()
    """

    def __init__(
        self,
        model: nn.Module,
        train_batches: Iterator[Any],
        loss_fn: LossFn | None = None,
        config: TrainConfig | None = None,
        *,
        eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
        hooks: Sequence[Hook] = (),
        run_config: Mapping[str, Any] | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        distributed: DistributedConfig | Mapping[str, Any] | None = None,
    ) -> None:
        from vermeil.config import to_dict

        self.config = config = config if config is not None else TrainConfig()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.run_config = dict(run_config) if run_config is not None else {"train": to_dict(config)}
        self.distributed = _distributed_config(distributed, self.run_config)
        self.device = torch.device(config.device)
        # Data-parallel layout (rank 0 of 1 in a single process) and whether this trainer joined the group.
        self.rank, self.world_size, self.dp_rank, self.dp_size = 0, 1, 0, 1
        self._owns_group = False
        strategy = self.distributed.strategy
        if strategy == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _group_exists():
            # Every rank would train the whole model on its own and write the same run folder.
            raise ValueError(
                f"distributed.strategy='none' under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}): set "
                "distributed.strategy=ddp, fsdp2, tp or fsdp2+tp, or run a single process"
            )
        if strategy != "none" and ("WORLD_SIZE" in os.environ or _group_exists()):
            from vermeil.distributed import init_distributed

            existed = _group_exists()
            self.rank, self.world_size, device = init_distributed()
            self._owns_group = not existed and _group_exists()
            if self.device.type == "cuda":
                self.device = device  # cuda:LOCAL_RANK
        self.is_main = self.rank == 0
        self.model = model.to(self.device)
        # Around each micro-batch's loss and backward: loss_parallel() under a loss-parallel TP plan.
        self._loss_parallel = False
        self._loss_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        if self.world_size > 1:
            from vermeil.distributed import mixed_precision_policy, parallelize

            d = self.distributed
            mp = None
            if d.param_dtype is not None or d.reduce_dtype is not None:
                mp = mixed_precision_policy(d.param_dtype, d.reduce_dtype)
            par = parallelize(
                self.model,
                strategy,
                tp_size=d.tp_size,
                device=self.device,
                mp_policy=mp,
                sequence_parallel=d.sequence_parallel,
                loss_parallel=d.loss_parallel,
            )
            self.model, self.dp_rank, self.dp_size = par.model, par.dp_rank, par.dp_size
            if par.loss_parallel:
                from torch.distributed.tensor.parallel import loss_parallel

                self._loss_parallel, self._loss_context = True, loss_parallel
            if config.batch_size % self.dp_size:
                raise ValueError(
                    f"train.batch_size={config.batch_size} (the global batch) must be divisible by the "
                    f"data-parallel size {self.dp_size}"
                )
            if self.dp_size > 1:
                train_batches = _ShardedBatches(train_batches, self.dp_rank, self.dp_size)
        self.train_batches = train_batches
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else causal_lm_loss
        self.eval_fn = eval_fn
        self.hooks = list(hooks)
        out = out_dir if out_dir is not None else config.out_dir
        self.out_dir = Path(out) if out is not None else None
        self.optimizer = build_optimizer(
            self.model,
            config.lr,
            config.weight_decay,
            config.betas,
            eps=config.eps,
            fused=config.fused_adamw,
            no_decay_embeddings=config.no_decay_embeddings,
        )
        if self.world_size > 1:
            _split_dtensor_groups(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, config.warmup, config.steps, config.min_lr_ratio)
        self.step = 0  # completed updates
        self.tokens = 0  # positions trained on so far
        self.elapsed = 0.0  # training seconds so far (across resumes), evaluation and saving excluded
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self._stop = False
        self._phase = "idle"  # "step" (forward/backward), "update" (optimizer), "done": where a Ctrl-C landed
        self._logger = (
            MetricsLogger(self.out_dir / "metrics.jsonl")
            if self.out_dir is not None and self.is_main
            else None
        )
        self._autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if config.bf16
            else contextlib.nullcontext
        )
        self._window = _Window(self.device)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._dtensor_params = any(_is_dtensor(p) for p in self._params)

    # -- control ---------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return from `fit` (what Ctrl-C does)."""
        self._stop = True

    def _stop_requested(self) -> bool:
        """`self._stop`; across ranks, True when any rank asked (torchrun forwards Ctrl-C to every rank, but
        they may see it at different steps: all must stop at the same step to save one checkpoint together)."""
        if self.world_size == 1:
            return self._stop
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop = bool(flag.item())
        return self._stop

    def _call(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self, *args)

    # -- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights, as plain containers (loadable with `weights_only=True`)."""
        data_state = None
        if callable(getattr(self.train_batches, "state_dict", None)):
            data_state = self.train_batches.state_dict()
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed,
            # Under a distributed strategy the optimizer state is sharded: it lives in the checkpoint's dcp/.
            "optimizer": self.optimizer.state_dict() if self.world_size == 1 else None,
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(self.device),
            "data": data_state,
            "window": self._window.state_dict(),
            "config": self.run_config,
        }

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step_N/` (weights, then state), then point `latest` at it, then prune old ones."""
        if self.out_dir is None:
            raise ValueError("this Trainer has no out_dir: set TrainConfig.out_dir or pass out_dir= to save")
        root = self.out_dir / CHECKPOINTS_DIR
        folder = root / _checkpoint_name(self.step)
        if self.world_size > 1:
            self._save_distributed(folder)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            clean_temp_files(folder)  # left by a run killed while writing this step before
            save_weights(self.model, folder / _WEIGHTS, metadata={"step": str(self.step)})
            save_torch(self.state_dict(), folder / _STATE)  # last: its presence marks the folder complete
        if self.is_main:
            with atomic_write(root / _LATEST, "w") as f:
                f.write(folder.name + "\n")
            keep = {p for p in list_checkpoints(self.out_dir)[-self.config.keep_checkpoints :]} | {folder}
            for old in root.iterdir():  # older checkpoints, and folders a killed run left incomplete
                if old.is_dir() and old.name.startswith("step_") and old not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        if self.world_size > 1:
            _barrier()  # no rank moves on (or reads `latest`) before the folder is complete
        self.last_checkpoint = folder
        self._call("on_save", folder)
        return folder

    def _save_distributed(self, folder: Path) -> None:
        """Every rank writes its shards into `folder/dcp` (a collective); rank 0 then exports the full weights
        to `model.safetensors` and writes `state.pt` (last: its presence marks the folder complete)."""
        from vermeil.distributed.checkpoint import export_weights
        from vermeil.distributed.checkpoint import save_checkpoint as dcp_save

        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            clean_temp_files(folder)
            (folder / _STATE).unlink(missing_ok=True)  # the folder is incomplete until state.pt is back
        _barrier()
        dcp_save(folder / _DCP, self.model, self.optimizer)
        state = self.state_dict()  # every rank: no collective inside, and the same on all ranks but RNG
        if self.is_main:
            # dcp.save returns on the coordinator (rank 0) after every rank's shards and the metadata are written.
            export_weights(folder / _DCP, folder / _WEIGHTS, metadata={"step": str(self.step)})
            save_torch(state, folder / _STATE)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Restore weights and the whole training state from a run folder (its newest checkpoint) or a
        checkpoint folder. Returns the checkpoint folder used."""
        cfg = self.config
        folder = latest_checkpoint(path)
        if self.is_main:
            clean_temp_files(folder)
            clean_temp_files(folder.parent)
        if self.world_size > 1:
            _barrier()
        state = load_torch(folder / _STATE)
        if self.world_size > 1 or state.get("optimizer") is None:
            # A checkpoint of a distributed run (any layout, any number of ranks): DCP reshards on load.
            from vermeil.distributed.checkpoint import load_checkpoint as dcp_load

            if not (folder / _DCP).is_dir():
                raise ValueError(
                    f"checkpoint {os.fspath(folder)} has no {_DCP}/ folder: a distributed run resumes only from "
                    "a checkpoint written by a distributed run"
                )
            dcp_load(folder / _DCP, self.model, self.optimizer)
        else:
            load_weights(self.model, folder / _WEIGHTS)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The config's schedule wins over the saved one (a resumed run may be given more steps).
        for fn in self.scheduler.lr_lambdas:
            if isinstance(fn, WarmupCosine):
                fn.warmup, fn.total, fn.min_ratio = cfg.warmup, cfg.steps, cfg.min_lr_ratio
        _set_rng_state(state["rng"])
        if state.get("data") is not None:
            if not callable(getattr(self.train_batches, "load_state_dict", None)):
                raise ValueError(
                    f"checkpoint {os.fspath(folder)} has a data-sampler state, but train_batches "
                    f"({type(self.train_batches).__name__}) has no load_state_dict"
                )
            self.train_batches.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.tokens = int(state.get("tokens", 0))
        self.elapsed = float(state.get("elapsed_s", 0.0))
        if state.get("window") is not None:
            self._window.load_state_dict(state["window"])
        self.last_checkpoint = folder
        if self.out_dir is not None:
            metrics = self.out_dir / "metrics.jsonl"
            if self.is_main:
                truncate_metrics(metrics, self.step)  # rows logged after this checkpoint are replayed
            if self.world_size > 1:
                _barrier()
            self.history = read_metrics(metrics)
        return folder

    resume = load_checkpoint

    # -- evaluation ------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Run `eval_fn` (eval mode, no grad, forked RNG, autocast as in training); {} without an eval_fn."""
        if self.eval_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad(), self._autocast():
                out = self.eval_fn(self.model)
        finally:
            self.model.train(was_training)
        return {k: float(v) for k, v in out.items()}

    def _eval_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            row = {"step": self.step, "split": "val", **metrics}
            self._write(row)
            self._call("on_eval", row)
            if self.is_main:
                _echo(f"step {self.step}: " + _format_row({k: v for k, v in row.items() if k != "step"}))
        return metrics

    def _write(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self._logger is not None:
            self._logger.log(row)

    # -- the loop --------------------------------------------------------------------------------------------

    def _train_step(self) -> tuple[Tensor, dict[str, Tensor], Tensor | None, int]:
        """One update: grad_accum micro-batches, clip, AdamW, scheduler. Returns (loss, metrics, grad norm,
        tokens)."""
        cfg = self.config
        total = torch.zeros((), device=self.device)
        sums: dict[str, Tensor] = {}
        tokens = 0
        for _ in range(cfg.grad_accum):
            batch = next(self.train_batches)
            tokens += _count_tokens(batch)
            if self.device.type != "cpu":
                batch = _to_device(batch, self.device)
            with self._loss_context():  # the backward of a vocab-parallel cross-entropy needs it too
                with self._autocast():
                    loss, metrics = _split_loss(self.loss_fn(self.model, batch))
                if self._loss_parallel:  # the loss is a replicated DTensor: the loop keeps plain tensors
                    loss, metrics = _plain(loss), {k: _plain(v) for k, v in metrics.items()}
                (loss / cfg.grad_accum if cfg.grad_accum > 1 else loss).backward()
            total += loss.detach()
            for k, v in metrics.items():
                v = v.detach() if isinstance(v, Tensor) else torch.tensor(float(v))
                sums[k] = sums[k] + v if k in sums else v
        grad_norm = None
        if cfg.grad_clip:
            if self._dtensor_params:
                grad_norm = _clip_grad_norm(self._params, cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip)
        self._phase = "update"  # from here on a Ctrl-C cannot be rolled back to the step's start
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.grad_accum > 1:
            total = total / cfg.grad_accum
            sums = {k: v / cfg.grad_accum for k, v in sums.items()}
        return total, sums, grad_norm, tokens * self.dp_size  # the global batch's positions (equal slices)

    def _snapshot(self) -> tuple[Any, Any] | None:
        # Start-of-step data and RNG state, to roll a step back when Ctrl-C lands in its forward or backward.
        if not callable(getattr(self.train_batches, "state_dict", None)):
            return None
        return self.train_batches.state_dict(), _rng_state(self.device)

    def _rollback(self, snapshot: tuple[Any, Any] | None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if snapshot is not None:
            self.train_batches.load_state_dict(snapshot[0])
            _set_rng_state(snapshot[1])

    @contextlib.contextmanager
    def _sigint_to_stop(self) -> Iterator[None]:
        """First Ctrl-C (or SIGTERM): finish the step, save, stop. Second Ctrl-C: the usual KeyboardInterrupt.

        Installed only in the main thread and only over the default handlers (never over someone else's).
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        mine = [sig for sig, default in defaults.items() if signal.getsignal(sig) is default]

        def handler(signum: int, frame: Any) -> None:
            self._stop = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
            _echo(f"{name}: saving a checkpoint after this step (Ctrl-C again to abort at once)")

        for sig in mine:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig in mine:
                signal.signal(sig, defaults[sig])

    def fit(self) -> TrainResult:
        """Train from `self.step` up to `config.steps`; returns a `TrainResult`.

        Ctrl-C (or `request_stop()`, or a KeyboardInterrupt raised inside a step or a hook) saves a checkpoint of
        the last completed step and returns with `interrupted=True`; resuming from it continues the same curve.
        """
        cfg = self.config
        if self.out_dir is not None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clean_temp_files(self.out_dir)
            if self.step == 0:  # a fresh start: rows left by an earlier attempt in this folder are stale
                truncate_metrics(self.out_dir / "metrics.jsonl", 0)
            from vermeil.config import save_yaml

            save_yaml(self.run_config, self.out_dir / "config.yaml")
        self.model.train()
        self._stop = False
        interrupted = False
        final_eval: dict[str, float] = {}
        self._call("on_train_start")
        bar = _progress_bar(cfg.steps, self.step, cfg.progress if self.is_main else False)
        try:
            with self._sigint_to_stop():
                while self.step < cfg.steps:
                    if self._stop_requested():
                        interrupted = True
                        break
                    self._phase = "step"
                    snapshot = self._snapshot()
                    start = time.perf_counter()
                    try:
                        loss, metrics, grad_norm, tokens = self._train_step()
                    except KeyboardInterrupt:
                        if self._phase == "update":
                            raise  # the optimizer was mid-update: the weights are not at a step boundary
                        self._rollback(snapshot)
                        interrupted = True
                        break
                    self._phase = "done"
                    dt = time.perf_counter() - start
                    self.step += 1
                    self.tokens += tokens
                    self.elapsed += dt
                    self._window.add(loss, metrics, tokens, dt)
                    bar.update(1)
                    try:
                        # Bookkeeping first, hooks last: a hook that stops the run finds this step logged.
                        last = self.step == cfg.steps
                        if self.step % cfg.log_every == 0 or last:
                            row = self._train_row(grad_norm)
                            self._write(row)
                            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                            self._call("on_log", row)
                        if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                            final_eval = self._eval_and_log()
                        if self.out_dir is not None and (
                            (cfg.save_every and self.step % cfg.save_every == 0) or last
                        ):
                            self.save_checkpoint()
                        self._call("on_step_end", self.step, loss)
                    except KeyboardInterrupt:
                        interrupted = True
                        break
        finally:
            bar.close()
        if interrupted and self.out_dir is not None and self.step > 0:
            if self.last_checkpoint is None or checkpoint_step(self.last_checkpoint) != self.step:
                self.save_checkpoint()
            if self.is_main:
                _echo(f"stopped at step {self.step}/{cfg.steps}; checkpoint {self.last_checkpoint}")
        if self.out_dir is not None and cfg.plot and self.is_main:
            plotted = plot_loss_curve(self.history, self.out_dir / "loss.png")
            if not plotted and not interrupted:
                _echo("loss.png not written (pip install matplotlib to get the loss curve)")
        result = TrainResult(self.step, interrupted, self.last_checkpoint, final_eval, list(self.history))
        self._call("on_train_end", result)
        if self._owns_group:
            from vermeil.distributed import shutdown

            shutdown()  # barrier, destroy_process_group: the group this trainer joined ends with its run
            self._owns_group = False
        return result

    def _train_row(self, grad_norm: Tensor | None) -> dict[str, Any]:
        """The row of the steps since the last log step (means over them); empties the window."""
        w = self._window
        loss, metrics = w.loss, dict(w.metrics)
        if self.world_size > 1:  # the mean over the ranks (each holds the mean over its slice)
            import torch.distributed as dist

            flat = torch.stack([loss.float(), *(v.float() for v in metrics.values())])
            dist.all_reduce(flat)
            flat = flat / self.world_size
            loss, metrics = flat[0], dict(zip(metrics, flat[1:]))
        # The only host syncs of the loop: once per log step.
        row: dict[str, Any] = {"step": self.step, "split": "train", "loss": float(loss) / w.steps}
        for k, v in metrics.items():
            row[k] = float(v) / w.steps
        if "ce" in row and math.isfinite(row["ce"]):
            row["bpt"] = row["ce"] / LN2  # bits per token (= bits per byte for a byte tokenizer)
        cfg = self.config  # the learning rate the last update used (the scheduler already points at the next)
        row["lr"] = cfg.lr * cosine_with_warmup(self.step - 1, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        row["tokens_per_s"] = w.tokens / w.seconds if w.seconds > 0 else 0.0
        row["tokens"] = self.tokens
        row["elapsed_s"] = round(self.elapsed, 3)
        w.clear()
        return row


def _group_exists() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _plain(value: Any) -> Any:
    """A replicated DTensor (a loss-parallel cross-entropy) as a plain tensor, differentiably; else unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value  # no import: DTensors only


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class _Window:
    """Sums of the steps since the last log row; saved in checkpoints, so a resumed run logs the same rows."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clear()

    def clear(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.metrics: dict[str, Tensor] = {}
        self.steps = self.tokens = 0
        self.seconds = 0.0

    def add(self, loss: Tensor, metrics: Mapping[str, Tensor], tokens: int, seconds: float) -> None:
        self.loss = self.loss + loss
        for k, v in metrics.items():
            self.metrics[k] = self.metrics[k] + v if k in self.metrics else v
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.detach().cpu(),
            "metrics": {k: v.detach().cpu() for k, v in self.metrics.items()},
            "steps": self.steps,
            "tokens": self.tokens,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loss = state["loss"].to(self.device)
        self.metrics = {k: v.to(self.device) for k, v in state["metrics"].items()}
        self.steps, self.tokens, self.seconds = (
            int(state["steps"]),
            int(state["tokens"]),
            float(state["seconds"]),
        )
