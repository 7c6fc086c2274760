"""The run folder: where a training run, a conversion or a fine-tuning start keeps its files, and how to read it.

    config.yaml                         the resolved run config (what `vermeil train --resume` rebuilds from)
    metrics.jsonl                       one JSON row per log step and per evaluation (`vermeil.train.metrics`)
    loss.png, samples.png               plots (when matplotlib is installed)
    checkpoints/step_000100/            model.safetensors (weights) and state.pt (the training state: optimizer,
                                        scheduler, RNG and data-sampler states, step, the config as a dict);
                                        a distributed run adds dcp/ (`vermeil.distributed.checkpoint`)
    checkpoints/latest                  the name of the newest complete checkpoint folder

A checkpoint folder is complete when it holds both `model.safetensors` and `state.pt` (written last). Files are
written atomically (`vermeil.checkpoint`) and `latest` moves only after a folder is complete, so a run killed at
any moment leaves the previous checkpoint loadable.

Reading a run (`latest_checkpoint`, `load_model_weights`, `read_run_config`) and writing one without training
(`write_run`, for `vermeil convert`) need no training code: `vermeil generate` and `convert` use this module
alone; `vermeil.train.Trainer` writes its checkpoints through it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from vermeil.checkpoint import (
    atomic_write,
    clean_temp_files,
    load_torch,
    load_weights,
    save_torch,
    save_weights,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG",
    "DCP",
    "STATE",
    "WEIGHTS",
    "checkpoint_name",
    "checkpoint_step",
    "clear_run",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "point_latest",
    "prune_checkpoints",
    "read_run_config",
    "write_run",
]

CHECKPOINTS_DIR = "checkpoints"
CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
DCP = "dcp"
_LATEST = "latest"


def checkpoint_name(step: int) -> str:
    """The folder name of step `step`: `step_000100`."""
    return f"step_{step:06d}"


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step of a checkpoint folder named `step_000100`."""
    name = Path(path).name
    if not name.startswith("step_") or not name[5:].isdigit():
        raise ValueError(f"{os.fspath(path)} is not a checkpoint folder (expected a name like step_000100)")
    return int(name[5:])


def _is_step_folder(p: Path) -> bool:
    return p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()


def _complete(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / STATE).is_file()


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _is_step_folder(p) and _complete(p)), key=checkpoint_step)


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
        raise FileNotFoundError(f"{os.fspath(run)} holds no checkpoint (no {CHECKPOINTS_DIR}/step_*/{STATE})")
    return found[-1]


def load_model_weights(model: nn.Module, run_dir: str | os.PathLike[str]) -> Path:
    """Load the newest checkpoint's weights of a run into `model` (strict); returns the checkpoint folder."""
    folder = latest_checkpoint(run_dir)
    load_weights(model, folder / WEIGHTS)
    return folder


def read_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run config of a run folder as a plain dict: its config.yaml, else the copy inside its newest
    checkpoint's state.pt.

    Raises:
        FileNotFoundError: no such folder, or neither a config.yaml nor a checkpoint in it.
    """
    from vermeil.config import load_yaml

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {os.fspath(run)} does not exist")
    if (run / CONFIG).is_file():
        return load_yaml(run / CONFIG)
    return dict(load_torch(latest_checkpoint(run) / STATE)["config"])


def point_latest(run_dir: str | os.PathLike[str], folder: Path) -> None:
    """Point `checkpoints/latest` at a complete checkpoint folder (atomically)."""
    with atomic_write(Path(run_dir) / CHECKPOINTS_DIR / _LATEST, "w") as f:
        f.write(folder.name + "\n")


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int, current: Path) -> None:
    """Delete all but the `keep` newest complete checkpoints (and `current`), and folders left incomplete."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    kept = set(list_checkpoints(run_dir)[-keep:]) | {current}
    for old in root.iterdir():
        if _is_step_folder(old) and old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def write_run(run_config: Mapping[str, Any], model: nn.Module, run_dir: str | os.PathLike[str]) -> Path:
    """Write `model` as step 0 of a run folder (config.yaml, checkpoints/step_000000/ with model.safetensors and
    a state.pt holding the step and the config, checkpoints/latest), so that `vermeil generate`, `sample` and
    `train --resume` (fine-tuning from these weights, with a fresh optimizer) read it. Returns the checkpoint
    folder.

    Args:
        run_config: the resolved run config as a plain dict (`RunConfig.to_dict()`).
    """
    from vermeil.config import save_yaml

    run = Path(run_dir)
    folder = run / CHECKPOINTS_DIR / checkpoint_name(0)
    folder.mkdir(parents=True, exist_ok=True)
    clean_temp_files(folder)
    save_yaml(dict(run_config), run / CONFIG)
    save_weights(model, folder / WEIGHTS, metadata={"step": "0"})
    # No optimizer state: a trainer resuming here starts its optimizer, schedule and data afresh.
    save_torch({"step": 0, "config": dict(run_config)}, folder / STATE)  # last: marks the folder complete
    point_latest(run, folder)
    return folder


def clear_run(run_dir: str | os.PathLike[str]) -> None:
    """Remove what a run wrote into a folder (checkpoints, metrics, the loss plot, the config); other files stay."""
    run = Path(run_dir)
    if (run / CHECKPOINTS_DIR).is_dir():
        shutil.rmtree(run / CHECKPOINTS_DIR)
    for name in ("metrics.jsonl", "loss.png", CONFIG):
        (run / name).unlink(missing_ok=True)
