"""The trainer's callbacks: `Hook` (override any method to watch or steer a run), `TrainResult` (what `fit`
returns, and what `on_train_end` receives) and `LossCurve` (the hook that draws loss.png)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from vermeil.train.trainer import Trainer

__all__ = ["Hook", "LossCurve", "TrainResult"]


@dataclass
class TrainResult:
    """What `Trainer.fit` returns; `history` holds every metrics row of the run (resumed runs included)."""

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


class LossCurve(Hook):
    """Draw loss.png at the end of a run (with `train.plot`, on the main process, into a run folder); the
    recipes pass the task's label and a title."""

    def __init__(self, ylabel: str = "loss (nats per token)", title: str | None = None) -> None:
        self.ylabel, self.title = ylabel, title

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if trainer.out_dir is None or not trainer.config.plot or not getattr(trainer, "is_main", True):
            return
        from vermeil.train.metrics import echo, plot_loss_curve

        path = Path(trainer.out_dir) / "loss.png"
        plotted = plot_loss_curve(result.history, path, ylabel=self.ylabel, title=self.title)
        if not plotted and not result.interrupted:
            echo("loss.png not written (pip install matplotlib to get the loss curve)")
