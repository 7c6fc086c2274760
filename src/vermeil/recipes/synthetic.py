"""The synthetic long-range tasks: multi-query associative recall (Zoology) and selective copying (Mamba), scored
by accuracy on a fixed evaluation set."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from vermeil.config import ConfigError, to_dict
from vermeil.data import mqar, selective_copying
from vermeil.data.sampler import SeededSampler
from vermeil.nn.checks import check_positive_int, check_positive_ints
from vermeil.recipes.tasks import EVAL_SEED_OFFSET, Run, TaskData, eval_token_batches
from vermeil.train.losses import lm_loss_fn

if TYPE_CHECKING:
    from vermeil.recipes.config import RunConfig

__all__ = ["MQARData", "SelectiveCopyingData"]


class _SyntheticTask(TaskData):
    """A task whose batches come from one generator function of `vermeil.data` (`make`), called with every
    field of the config but `task`."""

    make: Callable[..., Any]
    # What loss.png's y axis shows: cross-entropy on the scored positions only (the answers), not every token.
    loss_label = "cross-entropy (nats per answer token)"

    def generator(self, seq_len: int) -> tuple[Callable[..., Any], dict[str, Any]]:
        kwargs = {k: v for k, v in to_dict(self).items() if k != "task"}
        return self.make, {**kwargs, "seq_len": seq_len}

    def build(self, run: RunConfig, model: nn.Module) -> Run:
        train = run.train
        make, kwargs = self.generator(train.seq_len)
        sampler = SeededSampler(make, train.batch_size, train.seed, **kwargs)
        eval_gen = torch.Generator().manual_seed(train.seed + EVAL_SEED_OFFSET)
        val_batches = [
            make(train.batch_size, generator=eval_gen, **kwargs) for _ in range(train.eval_batches)
        ]
        device = torch.device(train.device)

        def eval_fn(m: nn.Module) -> dict[str, float]:
            loss, acc = eval_token_batches(m, val_batches, device)
            return {"val_loss": loss, "val_accuracy": acc}

        return Run(run, model, sampler, lm_loss_fn(run.model), eval_fn)


@dataclass
class MQARData(_SyntheticTask):
    """Multi-query associative recall (Zoology): `vermeil.data.mqar` (see its Args) at `train.seq_len`."""

    task: Literal["mqar"] = "mqar"
    make = staticmethod(mqar)
    vocab_size: int = 512
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self) -> None:
        check_positive_ints(vocab_size=self.vocab_size, num_kv_pairs=self.num_kv_pairs)
        if not 0 < self.power_a < math.inf:
            raise ValueError(f"power_a={self.power_a!r} must be > 0 and finite")

    def check_fit(self, run: RunConfig) -> None:
        super().check_fit(run)
        seq_len = run.train.seq_len
        if seq_len % 2:
            raise ConfigError(f"train.seq_len={seq_len} must be even for data.task=mqar")
        if self.vocab_size <= seq_len:
            raise ConfigError(
                f"data.vocab_size={self.vocab_size} must be > train.seq_len={seq_len} (Zoology's MQAR rule)"
            )
        if 4 * self.num_kv_pairs > seq_len:
            raise ConfigError(
                f"data.num_kv_pairs={self.num_kv_pairs} is too many for train.seq_len={seq_len} "
                "(4 * num_kv_pairs must be <= seq_len)"
            )


@dataclass
class SelectiveCopyingData(_SyntheticTask):
    """Selective copying (Mamba §3.1): `vermeil.data.selective_copying`, sequence length `train.seq_len`."""

    task: Literal["selective_copying"] = "selective_copying"
    make = staticmethod(selective_copying)
    vocab_size: int = 16
    num_tokens_to_copy: int = 16

    def __post_init__(self) -> None:
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size={self.vocab_size!r} must be >= 3")
        check_positive_int("num_tokens_to_copy", self.num_tokens_to_copy)

    def check_fit(self, run: RunConfig) -> None:
        super().check_fit(run)
        seq_len = run.train.seq_len
        if seq_len <= 2 * self.num_tokens_to_copy + 1:
            raise ConfigError(
                f"train.seq_len={seq_len} must be > 2 * data.num_tokens_to_copy + 1 = "
                f"{2 * self.num_tokens_to_copy + 1}"
            )
