"""What every task shares: the `TaskData` base of the `data:` configs, the built `Run`, the seeded batch stream
`TaskSampler`, and the token-level evaluation. Axis legend: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.config import ConfigError, merge_preset
from vermeil.data.sampler import SeededSampler as TaskSampler  # the one seeded sampler, by the recipes' name
from vermeil.models.contract import split_output
from vermeil.train.hooks import Hook

if TYPE_CHECKING:
    from vermeil.recipes.config import Family, RunConfig

__all__ = ["Run", "TaskData", "TaskSampler", "eval_token_batches"]

# A task's evaluation data are seeded with `train.seed + EVAL_SEED_OFFSET`, far from the training stream's seed.
EVAL_SEED_OFFSET = 1_000_003


@dataclass
class Run:
    """What a recipe builds: the model, an endless batch iterator, the loss and evaluation functions."""

    config: RunConfig
    model: nn.Module
    train_batches: Iterator[Any]
    loss_fn: Callable[[nn.Module, Any], Any]
    eval_fn: Callable[[nn.Module], dict[str, float]] | None
    tokenizer: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    hooks: list[Hook] = field(default_factory=list)


class TaskData:
    """Base of the data configs (defaults for a token task): completes the model section it trains
    (`complete_model`), checks that the run fits (`check_fit`), builds batches, loss and evaluation (`build`)."""

    task: str

    def complete_model(
        self, family: Family, user: Mapping[str, Any], presets: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The model section with its preset merged in; a token model's vocabulary defaults to the data's."""
        merged = merge_preset(user, presets, path="model")
        if family.vocab_key is not None and family.vocab_key not in user:
            merged[family.vocab_key] = self.vocab_size  # the data decides, unless the config says otherwise
        return merged

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def check_fit(self, run: RunConfig) -> None:
        """Cross-section rules (ConfigError naming the keys); a token task needs the data's vocabulary."""
        from vermeil.recipes.config import model_vocab_size  # config.py imports this module

        vocab = model_vocab_size(run)
        if vocab < self.vocab_size:
            raise ConfigError(
                f"model.vocab_size={vocab} must be >= the data vocabulary {self.vocab_size} (data.task={self.task})"
            )

    @classmethod
    def for_model(cls, model_config: Any) -> TaskData:
        """The task's default config for a model that came without one (a converted checkpoint)."""
        return cls()

    def init_model(self, model: nn.Module) -> None:
        """A task's own initialisation of a freshly built model (none by default)."""

    def build(self, run: RunConfig, model: nn.Module) -> Run:
        raise NotImplementedError


def eval_token_batches(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], device: torch.device
) -> tuple[float, float]:
    """(mean cross-entropy over scored positions, accuracy over scored positions)."""
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    count = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = split_output(model(inputs))[0].float()
        flat, tgt = logits.flatten(0, 1), targets.flatten()
        total_loss += F.cross_entropy(flat, tgt, ignore_index=-100, reduction="sum").double().cpu()
        scored = tgt != -100
        correct += ((flat.argmax(-1) == tgt) & scored).sum().double().cpu()
        count += int(scored.sum())
    if count == 0:
        return math.nan, math.nan
    return float(total_loss) / count, float(correct) / count
