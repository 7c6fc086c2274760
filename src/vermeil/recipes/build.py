"""From a run config to what training and sampling need: the model (`build_model`), its data, loss and
evaluation (`build_run`), and a trained model read back from its run folder (`load_trained`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from vermeil.recipes.config import FAMILIES, RunConfig, read_run_dir_config
from vermeil.recipes.tasks import Run
from vermeil.train.hooks import LossCurve

__all__ = ["LossCurve", "build_model", "build_run", "load_trained", "loss_label"]


def build_model(run: RunConfig, *, device: torch.device | str | None = None) -> nn.Module:
    """The model a run config names, seeded by `train.seed`, then the task's `init_model`."""
    _, model_cls, _ = FAMILIES[run.family].load()
    torch.manual_seed(run.train.seed)
    model = model_cls(run.model, device=device)
    run.data.init_model(model)
    return model


def build_run(run: RunConfig, *, model: nn.Module | None = None) -> Run:
    """Model, data, loss and evaluation of a run config, with a `LossCurve` hook labelled by the task."""
    built = run.data.build(run, model if model is not None else build_model(run))
    built.hooks.append(
        LossCurve(loss_label(run), title=f"{run.name or run.family}: data.task={run.data.task}")
    )
    return built


def loss_label(run: RunConfig) -> str:
    """What a run's loss measures, for a plot's y axis: the task's `loss_label`, else "loss"."""
    return str(getattr(run.data, "loss_label", "loss"))


def load_trained(run_dir: str | os.PathLike[str]) -> tuple[RunConfig, nn.Module, Path]:
    """(run config, model with the newest checkpoint's weights in eval mode, checkpoint folder) of a run folder;
    FileNotFoundError without a complete checkpoint."""
    from vermeil.runs import latest_checkpoint, load_model_weights

    latest_checkpoint(run_dir)  # a clear error before building anything
    run = read_run_dir_config(run_dir)
    model = build_model(run)
    folder = load_model_weights(model, run_dir)
    return run, model.eval(), folder
