"""The training loop: `Trainer`, an explicit loop with hooks, clean Ctrl-C and exact resume from a `vermeil.runs`
checkpoint (a resumed run continues the uninterrupted run's loss curve exactly: tests/train/test_trainer.py).

Under torchrun with `distributed.strategy` set, the trainer joins the process group, applies
`vermeil.distributed.parallelize`, gives each data-parallel rank its slice of every global batch, averages the
logged metrics over the ranks and lets rank 0 alone write files; a checkpoint then adds `dcp/` (every rank's
shards) beside rank 0's full `model.safetensors`, and the trainer leaves the group it joined when `fit` ends.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vermeil import runs
from vermeil.checkpoint import clean_temp_files, load_weights, save_torch, save_weights
from vermeil.config import from_dict, save_yaml, to_dict
from vermeil.distributed.config import DistributedConfig
from vermeil.distributed.training import ShardedBatches, clip_grad_norm, is_dtensor, split_dtensor_groups
from vermeil.train.config import TrainConfig
from vermeil.train.hooks import Hook, LossCurve, TrainResult
from vermeil.train.losses import ChunkedLossError, LossFn, causal_lm_loss, chunked_lm_loss_fn, plain
from vermeil.train.metrics import (
    LN2,
    MetricsLogger,
    MetricsWindow,
    echo,
    format_row,
    progress_bar,
    read_metrics,
    truncate_metrics,
)
from vermeil.train.optim import WarmupCosine, build_optimizer, build_scheduler
from vermeil.train.regional import (
    compile_blocks,
    compiled_calls,
    is_compiled,
    resolve_compile,
    uncompile_blocks,
)

__all__ = ["Hook", "NonFiniteError", "TrainResult", "Trainer"]


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient norm (`train.on_nonfinite`); names the step."""


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
    return math.prod(first.shape[:2]) if isinstance(first, Tensor) and first.ndim > 0 else 0


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
    version, internal, gauss = state["python"]  # random.setstate needs tuples, a saved state may hold lists
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _distributed_config(
    distributed: DistributedConfig | Mapping[str, Any] | None, run_config: Mapping[str, Any]
) -> DistributedConfig:
    distributed = (run_config.get("distributed") or {}) if distributed is None else distributed
    if isinstance(distributed, Mapping):
        distributed = from_dict(DistributedConfig, dict(distributed), path="distributed")
    if not isinstance(distributed, DistributedConfig):
        raise TypeError(
            f"distributed must be a DistributedConfig, a mapping or None, got {type(distributed).__name__}"
        )
    return distributed


class Trainer:
    """Train `model` on `train_batches` with `loss_fn`, evaluating with `eval_fn`, checkpointing into a folder.

    Args:
        train_batches: an endless iterator of batches; one with `state_dict()`/`load_state_dict()` (e.g.
            `vermeil.data.WindowSampler`) has its position saved in each checkpoint, for an exact resume.
        loss_fn: `loss_fn(model, batch) -> loss` or `(loss, {name: scalar})`; default `causal_lm_loss`.
        eval_fn: `eval_fn(model) -> {name: float}` (see `evaluate`).
        hooks: called in order; a `LossCurve` is added last unless one is among them.
        run_config: the resolved run config, saved as `config.yaml` and in every checkpoint (default:
            `{"train": <config>}`).
        out_dir: the run folder (default `config.out_dir`); None keeps nothing on disk.
        distributed: how to split the run under torchrun (default: `run_config["distributed"]`, else none).
        tokenizer: recorded in every checkpoint: "bytes" makes `vermeil generate` decode bytes even beside a
            converted model's tokenizer.json; None lets that file decode (`vermeil.data.tokenizer_path`).

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
        tokenizer: Literal["bytes"] | None = "bytes",
    ) -> None:
        self.config = config = config if config is not None else TrainConfig()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.run_config = dict(run_config) if run_config is not None else {"train": to_dict(config)}
        if tokenizer not in ("bytes", None):
            raise ValueError(f"tokenizer={tokenizer!r} must be 'bytes' or None (no record)")
        self._tokenizer_meta = {runs.TOKENIZER_KEY: tokenizer} if tokenizer else {}
        self.distributed = _distributed_config(distributed, self.run_config)
        self.device = torch.device(config.device)
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
        self._loss_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        if self.world_size > 1:
            from vermeil.distributed import mixed_precision_policy, parallelize

            d = self.distributed
            dtypes = (d.param_dtype, d.reduce_dtype)
            mp = mixed_precision_policy(*dtypes) if dtypes != (None, None) else None
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

                self._loss_context = loss_parallel
            if config.batch_size % self.dp_size:
                raise ValueError(
                    f"train.batch_size={config.batch_size} (the global batch) must be divisible by the "
                    f"data-parallel size {self.dp_size}"
                )
            if self.dp_size > 1:
                train_batches = ShardedBatches(train_batches, self.dp_rank, self.dp_size)
        self.train_batches = train_batches
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else causal_lm_loss
        self._full_loss_fn = self.loss_fn  # what "auto" falls back to when the model does not fit the chunks
        self.loss_chunked = self._chunk_loss(config.loss_chunk_size)
        # `compiled_blocks`: those of the last fit ([] when eager, or after a fallback).
        self._compile = resolve_compile(config.compile, self.device, world_size=self.world_size)
        self.compiled_blocks: list[str] = []
        self._check_calls = False  # set by a compiled fit: check after its first step that the blocks ran
        self.eval_fn = eval_fn
        self.hooks = list(hooks)
        if not any(isinstance(h, LossCurve) for h in self.hooks):
            self.hooks.append(LossCurve())
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
            split_dtensor_groups(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, config.warmup, config.steps, config.min_lr_ratio)
        self.step = 0  # completed updates
        self.tokens = 0  # positions trained on so far
        self.elapsed = 0.0  # training seconds so far (across resumes), evaluation and saving excluded
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self._stop = False
        self._phase = "idle"  # "step" (forward/backward), "update" (optimizer), "done": where a Ctrl-C landed
        self._logger = (
            MetricsLogger(self.out_dir / "metrics.jsonl") if self.out_dir and self.is_main else None
        )
        self._autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        if amp_dtype := {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision):
            self._autocast = functools.partial(torch.autocast, self.device.type, dtype=amp_dtype)
        # fp16 needs loss scaling; the steps the scaler skips (overflow) are its normal work, not non-finite.
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self._window = MetricsWindow(self.device)
        # Non-finite steps, counted on the device and read only where the loop reads anyway (log rows,
        # checkpoints): [current streak, its first step, longest streak, its first step, first bad step, total].
        self._nonfinite = torch.tensor([0, 0, 0, 0, -1, 0], dtype=torch.float64, device=self.device)
        self._fused = bool(self.optimizer.defaults.get("fused"))
        self._last_lr = float(self.optimizer.param_groups[0]["lr"])  # the lr of the last update, for its row
        self._start = (0, 0.0)  # (step, elapsed) when this fit began: the ETA of the plain progress lines
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._dtensor_params = any(is_dtensor(p) for p in self._params)  # their norm is a collective

    def _chunk_loss(self, setting: int | str) -> bool:
        """Swap `self.loss_fn` for its chunked equivalent as `train.loss_chunk_size` asks; whether it did.
        An explicit size that cannot be honoured raises rather than silently compute full logits."""
        if setting == 0 or (setting == "auto" and not _auto_chunks(self.device, self.world_size)):
            return False
        what = f"train.loss_chunk_size={setting} (the chunked cross-entropy)"
        if self.world_size > 1:
            raise ValueError(f"{what} runs in a single process only: set it to 0")
        chunked = chunked_lm_loss_fn(self.loss_fn, self.model, None if setting == "auto" else int(setting))
        if chunked is None and setting != "auto":
            raise ValueError(
                f"{what} needs causal_lm_loss or a cross_entropy loss head, and a model whose head is an nn.Linear "
                "(the last of its lm_parts, or named output or lm_head): set it to 0"
            )
        self.loss_fn = chunked or self.loss_fn
        return chunked is not None

    def _compile_blocks(self) -> None:
        if not self._compile:
            return
        self.compiled_blocks = compile_blocks(self.model)
        self._check_calls = bool(self.compiled_blocks)
        if not self.compiled_blocks and self.is_main:
            echo(
                f"train.compile: {type(self.model).__name__} has no repeated blocks (an nn.ModuleList of one "
                "block class, or _repeated_blocks): training eagerly"
            )

    def _fall_back_to_eager(self, why: str) -> None:
        """Restore the eager blocks for the rest of this trainer's life and say `why` in one line."""
        uncompile_blocks(self.model)
        self._compile, self.compiled_blocks = False, []
        if self.is_main:
            echo(f"train.compile: {why}")

    def _fall_back_to_full_logits(self, error: Exception) -> None:
        """Compute full logits for the rest of this trainer's life (`train.loss_chunk_size=auto`)."""
        self.loss_fn, self.loss_chunked = self._full_loss_fn, False
        if self.is_main:
            why = str(error).split(": set train.loss_chunk_size=0")[0]
            echo(f"train.loss_chunk_size=auto: {why}; training continues with full logits")

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return from `fit` (what Ctrl-C does)."""
        self._stop = True

    def _stop_requested(self) -> bool:
        """`self._stop`, True on every rank when any rank asked (all must stop at one step to save together)."""
        if self.world_size == 1:
            return self._stop
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop = bool(flag.item())
        return self._stop

    def _sync(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _call(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self, *args)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights, as plain containers (loadable with `weights_only=True`)."""
        data = self.train_batches
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed,
            # Under a distributed strategy the optimizer state is sharded: it lives in the checkpoint's dcp/.
            "optimizer": self.optimizer.state_dict() if self.world_size == 1 else None,
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(self.device),
            "data": data.state_dict() if callable(getattr(data, "state_dict", None)) else None,
            "window": self._window.state_dict(),
            "nonfinite": self._nonfinite.cpu(),  # skipped steps and the current streak go on after a resume
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": self.run_config,
        }

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step_N/` (weights, then state), then point `latest` at it, then prune old ones."""
        if self.out_dir is None:
            raise ValueError("this Trainer has no out_dir: set TrainConfig.out_dir or pass out_dir= to save")
        self._check_nonfinite()
        self._check_weights_finite()  # never a checkpoint from non-finite weights, whatever happened
        folder = self.out_dir / runs.CHECKPOINTS_DIR / runs.checkpoint_name(self.step)
        meta = {"step": str(self.step), **self._tokenizer_meta}
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            clean_temp_files(folder)  # left by a run killed while writing this step before
            # A folder saved before (by a branch this run resumed behind, perhaps the one `latest` names) is
            # rewritten in place: incomplete until state.pt is back, never new weights beside an old state.
            (folder / runs.STATE).unlink(missing_ok=True)
            (folder / runs.MANIFEST).unlink(missing_ok=True)  # one of an earlier attempt would not match
        if self.world_size > 1:
            from vermeil.distributed.checkpoint import export_weights
            from vermeil.distributed.checkpoint import save_checkpoint as dcp_save

            self._sync()
            dcp_save(folder / runs.DCP, self.model, self.optimizer)
            state = self.state_dict()
            if self.is_main:  # dcp_save returned: every rank's shards are written
                export_weights(folder / runs.DCP, folder / runs.WEIGHTS, metadata=meta)
        else:
            save_weights(self.model, folder / runs.WEIGHTS, metadata=meta)
            state = self.state_dict()
        if self.is_main:
            save_torch(state, folder / runs.STATE)  # its presence marks the folder complete
            # Last: sizes and hashes; for a distributed save, the record that lets a later run read dcp/.
            runs.write_manifest(folder, distributed=self.world_size > 1)
            runs.point_latest(self.out_dir, folder)
            runs.prune_checkpoints(self.out_dir, self.config.keep_checkpoints, folder)
        self._sync()  # no rank moves on (or reads `latest`) before the folder is complete
        self.last_checkpoint = folder
        self._call("on_save", folder)
        return folder

    def load_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Restore weights and training state from a run folder (its newest checkpoint) or a checkpoint
        folder; returns the checkpoint folder used."""
        folder = runs.latest_checkpoint(path)  # verified against its manifest
        if self.is_main:
            run_dir = folder.parent.parent if folder.parent.name == runs.CHECKPOINTS_DIR else folder
            with runs.lock_run(run_dir):
                clean_temp_files(folder)
                clean_temp_files(folder.parent)
        self._sync()
        state = runs.read_state(folder)
        if "optimizer" not in state and self.world_size == 1:
            # Weights only (`vermeil.runs.write_run`): fine-tune with a fresh optimizer, schedule and data.
            load_weights(self.model, folder / runs.WEIGHTS)
            self.step, self.last_checkpoint = int(state["step"]), folder
            return folder
        if self.world_size > 1:
            # DCP reshards on load (any layout, any number of ranks); only a manifest-recorded dcp/ is read.
            from vermeil.distributed.checkpoint import load_checkpoint as dcp_load

            if not runs.saved_distributed(folder) or not (folder / runs.DCP).is_dir():
                raise ValueError(
                    f"checkpoint {os.fspath(folder)} was not saved by a distributed run (its {runs.MANIFEST} "
                    f"does not record one): a distributed run resumes only from a {runs.DCP}/ checkpoint it "
                    "wrote"
                )
            dcp_load(folder / runs.DCP, self.model, self.optimizer)
        elif runs.saved_distributed(folder) or state.get("optimizer") is None:
            # Never read a dcp/ folder in one process: its plan is a pickle (SECURITY.md).
            raise ValueError(
                f"checkpoint {os.fspath(folder)} holds a distributed ({runs.DCP}/) training state: resume it "
                f"under torchrun with its distributed strategy (a single process never reads {runs.DCP}/ "
                "folders), or fine-tune from its weights in a new run"
            )
        else:
            load_weights(self.model, folder / runs.WEIGHTS)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_config_to_optimizer()
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
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
        if state.get("nonfinite") is not None:  # absent from older checkpoints
            self._nonfinite = state["nonfinite"].to(self.device, torch.float64)
        self.last_checkpoint = folder
        if self.out_dir is not None:
            metrics = self.out_dir / "metrics.jsonl"
            if self.is_main:
                truncate_metrics(metrics, self.step)  # rows logged after this checkpoint are replayed
            self._sync()
            self.history = read_metrics(metrics)
        return folder

    resume = load_checkpoint

    def _apply_config_to_optimizer(self) -> None:
        """After a resume the config's lr, schedule, betas, eps and weight decay win over the saved ones;
        unchanged settings give the very same floats, so an unchanged resume stays exact."""
        cfg = self.config
        for fn in self.scheduler.lr_lambdas:
            if isinstance(fn, WarmupCosine):
                fn.warmup, fn.total, fn.min_ratio = cfg.warmup, cfg.steps, cfg.min_lr_ratio
        self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        for group, fn in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * fn(self.scheduler.last_epoch)
            group["betas"], group["eps"] = tuple(cfg.betas), cfg.eps
            if group["weight_decay"]:  # the no-decay groups stay at 0
                group["weight_decay"] = cfg.weight_decay
        self._last_lr = float(self.optimizer.param_groups[0]["lr"])

    def evaluate(self) -> dict[str, float]:
        """Run `eval_fn` in eval mode, no grad, autocast as in training and a forked RNG (evaluating never
        changes the training randomness); {} without an eval_fn."""
        if self.eval_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []

        def run() -> Mapping[str, float]:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), self._autocast():
                return self.eval_fn(self.model)  # type: ignore[misc]

        try:
            try:
                out = run()
            except Exception as e:
                if not is_compiled(self.model):
                    raise
                self._fall_back_to_eager(_compile_failure(e))
                out = run()  # eagerly
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
                echo(f"step {self.step}: {format_row(metrics)}")
        return metrics

    def _write(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self._logger is not None:
            self._logger.log(row)

    def _train_step(self) -> tuple[Tensor, dict[str, Tensor], Tensor | None, int, Tensor]:
        """One update -> (loss, metrics, grad norm, tokens, whether the step was finite)."""
        cfg = self.config
        total = torch.zeros((), device=self.device)
        sums: dict[str, Tensor] = {}
        tokens = 0
        for _ in range(cfg.grad_accum):
            batch = next(self.train_batches)
            tokens += _count_tokens(batch)
            if self.device.type != "cpu":
                batch = _to_device(batch, self.device)
            with self._loss_context():  # loss_parallel() around the loss and its backward
                with self._autocast():
                    loss, metrics = _split_loss(self.loss_fn(self.model, batch))
                loss, metrics = plain(loss), {k: plain(v) for k, v in metrics.items()}
                scaled = loss / cfg.grad_accum if cfg.grad_accum > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.detach()
            for k, v in metrics.items():
                v = v.detach() if isinstance(v, Tensor) else torch.tensor(float(v))
                sums[k] = sums[k] + v if k in sums else v
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and check the true gradients
        grad_norm = self._grad_norm(cfg.grad_clip) if cfg.grad_clip else None
        ok = torch.isfinite(total)
        if self.scaler is None:  # with a scaler, overflowing gradients are its business (it skips them)
            ok = ok & torch.isfinite(grad_norm if grad_norm is not None else self._grad_norm(None))
        self._count_nonfinite(~ok)
        self._phase = "update"  # from here on a Ctrl-C cannot be rolled back to the step's start
        self._last_lr = float(self.optimizer.param_groups[0]["lr"])  # a Python float: no device read
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self._fused:
            # Given found_inf = 1 (what GradScaler uses) the fused kernel leaves weights, moments and its step
            # count untouched: a non-finite step is skipped on the device, with no host read.
            self.optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
        elif bool(ok):  # a host read per step: only without a fused AdamW (free on the CPU)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.grad_accum > 1:
            total = total / cfg.grad_accum
            sums = {k: v / cfg.grad_accum for k, v in sums.items()}
        # tokens: the global batch's positions (equal slices)
        return total, sums, grad_norm, tokens * self.dp_size, ok

    def _grad_norm(self, clip: float | None) -> Tensor:
        """The global gradient 2-norm, after clipping to `clip` (None: no clipping)."""
        if self._dtensor_params:
            return clip_grad_norm(self._params, clip or math.inf)
        if clip:
            return torch.nn.utils.clip_grad_norm_(self._params, clip)
        grads = [p.grad for p in self._params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    def _count_nonfinite(self, bad: Tensor) -> None:
        step = float(self.step + 1)  # the update being counted
        streak, start, worst, worst_start, first, total = self._nonfinite.unbind()
        bad = bad.to(self._nonfinite.dtype)
        start = torch.where((bad > 0) & (streak == 0), step, start)
        streak = (streak + 1) * bad
        longer = streak > worst
        worst, worst_start = torch.where(longer, streak, worst), torch.where(longer, start, worst_start)
        first = torch.where((bad > 0) & (first < 0), step, first)
        self._nonfinite = torch.stack([streak, start, worst, worst_start, first, total + bad])

    def _check_nonfinite(self, counters: Sequence[float] | None = None) -> int:
        """Raise `NonFiniteError` when `train.on_nonfinite` says stop; returns the total of non-finite steps.
        Reads the counters (one host read) unless given."""
        cfg = self.config
        _, _, worst, worst_start, first, total = self._nonfinite.tolist() if counters is None else counters
        last = f"; the last checkpoint, {self.last_checkpoint}, is finite" if self.last_checkpoint else ""
        hint = "lower train.lr, check the data, or set train.on_nonfinite=skip"
        if cfg.on_nonfinite == "stop" and total > 0:
            raise NonFiniteError(
                f"non-finite loss or gradient norm at step {int(first)}: training stopped (train.on_nonfinite="
                f"stop), that update was not applied and no checkpoint was written after it{last}; {hint}"
            )
        if worst >= cfg.max_nonfinite:
            raise NonFiniteError(
                f"non-finite loss or gradient norm in {int(worst)} steps in a row from step {int(worst_start)}: "
                f"training stopped (train.max_nonfinite={cfg.max_nonfinite}){last}; lower train.lr or check the data"
            )
        return int(total)

    def _check_weights_finite(self) -> None:
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            last = f"; the last checkpoint, {self.last_checkpoint}, is finite" if self.last_checkpoint else ""
            raise NonFiniteError(
                f"non-finite weights at step {self.step} ({bad[0]}{' and more' if bad[1:] else ''}): no "
                f"checkpoint written{last}"
            )

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
        """First Ctrl-C (or SIGTERM): finish the step, save, stop; a second: the usual KeyboardInterrupt.
        Installed only in the main thread and only over the default handlers."""
        main = threading.current_thread() is threading.main_thread()  # signal.signal works there only
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        mine = [sig for sig, default in defaults.items() if main and signal.getsignal(sig) is default]

        def handler(signum: int, _frame: Any) -> None:
            self._stop = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
            echo(f"{name}: saving a checkpoint after this step (Ctrl-C again to abort at once)")

        for sig in mine:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig in mine:
                signal.signal(sig, defaults[sig])

    def fit(self) -> TrainResult:
        """Train from `self.step` up to `config.steps`.

        Ctrl-C, `request_stop()` or a KeyboardInterrupt in a step or hook saves the last completed step and
        returns with `interrupted=True`. The run folder is locked meanwhile (`vermeil.runs.lock_run`). With
        `train.compile` the repeated blocks are compiled only meanwhile: the model leaves as it came in.

        Raises:
            vermeil.runs.RunExistsError: the run folder holds checkpoints this trainer did not resume from
                (`load_checkpoint`): continue that run, or `vermeil.runs.clear_run` it, or pick another folder.
        """
        try:
            if self.out_dir is None or not self.is_main:
                return self._fit()
            with runs.lock_run(self.out_dir):
                return self._fit()
        finally:
            uncompile_blocks(self.model)

    def _fit(self) -> TrainResult:
        cfg = self.config
        if self.out_dir is not None:
            self._refuse_another_run(self.out_dir)
        if self.out_dir is not None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clean_temp_files(self.out_dir)
            if self.step == 0:  # a fresh start: rows left by an earlier attempt in this folder are stale
                truncate_metrics(self.out_dir / "metrics.jsonl", 0)
            save_yaml(self.run_config, self.out_dir / runs.CONFIG)
        self.model.train()
        self._stop = False
        interrupted = False
        final_eval: dict[str, float] = {}
        self._compile_blocks()
        self._call("on_train_start")
        bar = progress_bar(cfg.steps, self.step, cfg.progress if self.is_main else False)
        # A plain line per log row where tqdm's disable=None turned the bar off (not a terminal: CI, | tee).
        plain_lines = self.is_main and cfg.progress is None and getattr(bar, "disable", True)
        self._start = (self.step, self.elapsed)

        def due(every: int) -> bool:  # every N steps (0: never), and at the last step
            return self.step == cfg.steps or (every > 0 and self.step % every == 0)

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
                        try:
                            loss, metrics, grad_norm, tokens, ok = self._train_step()
                        except Exception as e:
                            # A compiled block failed, or a model that "auto" chunked its loss for transforms
                            # its logits: the step restarts once, eagerly or with full logits, from its start.
                            unchunkable = isinstance(e, ChunkedLossError) and cfg.loss_chunk_size == "auto"
                            if (not unchunkable and not is_compiled(self.model)) or self._phase == "update":
                                raise
                            if unchunkable:
                                self._fall_back_to_full_logits(e)
                            else:
                                self._fall_back_to_eager(_compile_failure(e))
                            self._rollback(snapshot)
                            start = time.perf_counter()
                            loss, metrics, grad_norm, tokens, ok = self._train_step()
                    except KeyboardInterrupt:
                        if self._phase == "update":
                            raise  # the optimizer was mid-update: the weights are not at a step boundary
                        self._rollback(snapshot)
                        interrupted = True
                        break
                    self._phase = "done"
                    dt = time.perf_counter() - start
                    if self._check_calls:  # once per fit, after its first step
                        self._check_calls = False
                        if self.compiled_blocks and not compiled_calls(self.model):
                            self._fall_back_to_eager(
                                f"{type(self.model).__name__} never called its compiled blocks "
                                f"({self.compiled_blocks[0]}, ...) through block(...): they ran eagerly; "
                                "training continues eagerly"
                            )
                    self.step += 1
                    self.tokens += tokens
                    self.elapsed += dt
                    self._window.add(loss, metrics, tokens, dt, ok)
                    bar.update(1)
                    try:
                        # Bookkeeping first, hooks last: a hook that stops the run finds this step logged.
                        if due(cfg.log_every):
                            row = self._train_row(grad_norm)
                            self._write(row)
                            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                            if plain_lines:
                                echo(self._progress_line(row))
                            self._call("on_log", row)
                        if due(cfg.eval_every):
                            final_eval = self._eval_and_log()
                        if self.out_dir is not None and due(cfg.save_every):
                            self.save_checkpoint()
                        self._call("on_step_end", self.step, loss)
                    except KeyboardInterrupt:
                        interrupted = True
                        break
        finally:
            bar.close()
        if interrupted and self.out_dir is not None and self.step > 0:
            if self.last_checkpoint is None or runs.checkpoint_step(self.last_checkpoint) != self.step:
                self.save_checkpoint()
            if self.is_main:
                echo(f"stopped at step {self.step}/{cfg.steps}; checkpoint {self.last_checkpoint}")
        result = TrainResult(self.step, interrupted, self.last_checkpoint, final_eval, list(self.history))
        self._call("on_train_end", result)
        if self._owns_group:
            from vermeil.distributed import shutdown

            shutdown()  # barrier, destroy_process_group: the group this trainer joined ends with its run
            self._owns_group = False
        return result

    def _refuse_another_run(self, out_dir: Path) -> None:
        """Unless this trainer continues a checkpoint of `out_dir` (`load_checkpoint`, or an earlier `fit`), the
        folder must hold none: a new run would write its own beside them, move `latest` and prune them (what
        `vermeil train` refuses without --resume or --overwrite)."""
        own = self.last_checkpoint is not None and (
            self.last_checkpoint.resolve().parent == (out_dir / runs.CHECKPOINTS_DIR).resolve()
        )
        found = not own and self.is_main and bool(runs.list_checkpoints(out_dir))
        if self.world_size > 1:  # every rank stops, or none (rank 0 alone reads the folder)
            flag = torch.tensor([1.0 if found else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            found = bool(flag.item())
        if not found:
            return
        if self.is_main:
            where = os.fspath(out_dir)
            runs.refuse_existing_run(
                out_dir,
                resume=f"trainer.load_checkpoint({where!r}) before fit()",
                start_over=f"pass another out_dir, or call vermeil.runs.clear_run({where!r}) to start over there",
            )
        raise runs.RunExistsError(f"{os.fspath(out_dir)} already holds a run (rank 0 found its checkpoints)")

    def _train_row(self, grad_norm: Tensor | None) -> dict[str, Any]:
        """The row of the steps since the last log row (means over the finite ones); empties the window.
        Raises `NonFiniteError` when the run must stop."""
        w = self._window
        loss, metrics = w.loss, dict(w.metrics)
        if self.world_size > 1:  # the mean over the ranks (each holds the mean over its slice)
            flat = torch.stack([loss.float(), *(v.float() for v in metrics.values())])
            dist.all_reduce(flat)
            flat = flat / self.world_size
            loss, metrics = flat[0], dict(zip(metrics, flat[1:]))
        # The only host read of the loop: once per log step, everything at once.
        parts = [loss.double(), *(v.double() for v in metrics.values()), w.skipped.double()]
        if grad_norm is not None:
            parts.append(grad_norm.detach().double())
        values = torch.cat([torch.stack(parts), self._nonfinite.to(parts[0].device)]).tolist()
        counters, values = values[-6:], values[:-6]
        total_skipped = self._check_nonfinite(counters)
        n = w.steps - int(values[len(metrics) + 1])  # the finite steps of the window
        means = {k: v / n if n else math.nan for k, v in zip(["loss", *metrics], values)}
        row: dict[str, Any] = {"step": self.step, "split": "train", **means}
        if "ce" in row and math.isfinite(row["ce"]):
            row["bpt"] = row["ce"] / LN2  # bits per token (= bits per byte for a byte tokenizer)
        row["lr"] = self._last_lr  # what the last update used (the scheduler already points at the next)
        if grad_norm is not None:
            row["grad_norm"] = values[-1]
        row["skipped_steps"] = total_skipped
        row["tokens_per_s"] = w.tokens / w.seconds if w.seconds > 0 else 0.0
        row["tokens"] = self.tokens
        row["elapsed_s"] = round(self.elapsed, 3)
        w.clear()
        return row

    def _progress_line(self, row: Mapping[str, Any]) -> str:
        """`step 20/300 | loss 2.3100 | 1.2e+04 tok/s | ETA 3m12s`: the plain stand-in of the progress bar."""
        done, seconds = self.step - self._start[0], self.elapsed - self._start[1]
        left = (self.config.steps - self.step) * seconds / done if done > 0 else math.nan
        eta = "?" if not math.isfinite(left) else _duration(left)
        loss = row["loss"]
        loss_text = f"{loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "nan"
        return f"step {self.step}/{self.config.steps} | loss {loss_text} | {row['tokens_per_s']:.4g} tok/s | ETA {eta}"


def _compile_failure(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return (
        f"the compiled blocks failed ({type(error).__name__}: {first[:200]}); training continues eagerly "
        "(set train.compile=false to skip compiling)"
    )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _auto_chunks(device: torch.device, world_size: int) -> bool:
    """Whether `train.loss_chunk_size=auto` chunks: on CUDA, in a single process."""
    return device.type == "cuda" and world_size == 1


def _group_exists() -> bool:
    return dist.is_available() and dist.is_initialized()
