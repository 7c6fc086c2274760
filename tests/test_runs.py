"""Tests for vermeil/runs.py: the run folder. A folder written without training (`write_run`) reads back like a
trained one (config, newest checkpoint, weights) and a trainer fine-tunes from it; `latest` and pruning; reading
a run never imports the trainer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vermeil.runs import (
    CHECKPOINTS_DIR,
    checkpoint_name,
    checkpoint_step,
    clear_run,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    point_latest,
    prune_checkpoints,
    read_run_config,
    write_run,
)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))


def test_write_run_reads_back(tmp_path: Path) -> None:
    config = {"name": "tiny", "model": {"family": "none"}, "train": {"steps": 3}}
    model = _model(0)
    folder = write_run(config, model, tmp_path / "run")
    assert folder == tmp_path / "run" / CHECKPOINTS_DIR / "step_000000"
    assert latest_checkpoint(tmp_path / "run") == folder and list_checkpoints(tmp_path / "run") == [folder]
    assert read_run_config(tmp_path / "run") == config
    (tmp_path / "run" / "config.yaml").unlink()  # the copy inside the checkpoint answers then
    assert read_run_config(tmp_path / "run") == config
    other = _model(1)
    assert not torch.equal(other[1].weight, model[1].weight)
    assert load_model_weights(other, tmp_path / "run") == folder
    assert torch.equal(other[1].weight, model[1].weight)
    clear_run(tmp_path / "run")
    assert list(tmp_path.joinpath("run").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        latest_checkpoint(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_run_config(tmp_path / "nowhere")


def test_trainer_fine_tunes_from_a_written_run(tmp_path: Path) -> None:
    from vermeil.train import TrainConfig, Trainer

    model = _model(0)
    write_run({"train": {}}, model, tmp_path / "run")
    tokens = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    batches = iter(lambda: (tokens[:, :-1], tokens[:, 1:]), None)
    config = TrainConfig(steps=2, warmup=0, eval_every=0, progress=False, plot=False)
    trainer = Trainer(_model(1), batches, config=config, out_dir=tmp_path / "run")
    assert trainer.load_checkpoint(tmp_path / "run").name == "step_000000" and trainer.step == 0
    assert torch.equal(trainer.model[1].weight, model[1].weight)  # the written weights, a fresh optimizer
    assert trainer.fit().step == 2
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_000000", "step_000002"]


def test_names_latest_and_pruning(tmp_path: Path) -> None:
    assert checkpoint_name(100) == "step_000100" and checkpoint_step("a/step_000100") == 100
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        checkpoint_step("a/final")
    first = write_run({}, _model(0), tmp_path)
    for step in (1, 2, 3):
        shutil.copytree(first, tmp_path / CHECKPOINTS_DIR / checkpoint_name(step))
    (tmp_path / CHECKPOINTS_DIR / checkpoint_name(4)).mkdir()  # incomplete: no state.pt
    point_latest(tmp_path, tmp_path / CHECKPOINTS_DIR / checkpoint_name(2))
    assert latest_checkpoint(tmp_path).name == "step_000002"  # `latest` wins over the newest folder
    prune_checkpoints(tmp_path, keep=2, current=tmp_path / CHECKPOINTS_DIR / checkpoint_name(3))
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS_DIR).iterdir() if p.is_dir()) == [
        "step_000002",
        "step_000003",
    ]


def test_pruning_to_no_older_checkpoint(tmp_path: Path) -> None:
    """keep=0 keeps `current` alone (a slice [-0:] kept every folder); a negative keep is refused."""
    first = write_run({}, _model(0), tmp_path)
    for step in (1, 2):
        shutil.copytree(first, tmp_path / CHECKPOINTS_DIR / checkpoint_name(step))
    current = tmp_path / CHECKPOINTS_DIR / checkpoint_name(1)
    with pytest.raises(ValueError, match=r"keep=-1 must be an int >= 0"):
        prune_checkpoints(tmp_path, keep=-1, current=current)
    assert len(list_checkpoints(tmp_path)) == 3
    prune_checkpoints(tmp_path, keep=0, current=current)
    assert list_checkpoints(tmp_path) == [current]


def test_reading_a_run_imports_no_training() -> None:
    # generate and convert read run folders through this module: it must not pull in the trainer.
    code = "import sys, vermeil.runs; print(sorted(m for m in sys.modules if m.startswith('vermeil.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "vermeil.runs" in out and "vermeil.train" not in out and "vermeil.recipes" not in out, out


def _trained_run(run: Path) -> tuple[object, Path]:
    from vermeil.train import TrainConfig, Trainer

    tokens = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    batches = iter(lambda: (tokens[:, :-1], tokens[:, 1:]), None)
    config = TrainConfig(steps=1, warmup=0, eval_every=0, progress=False, plot=False, threads=1)
    Trainer(_model(0), batches, config=config, out_dir=run).fit()
    return lambda: Trainer(_model(1), batches, config=config, out_dir=run), latest_checkpoint(run)


@pytest.mark.parametrize(
    "craft, why",
    [
        (lambda s: [1, 2], "holds a list"),
        (lambda s: {**s, "step": "x"}, "step"),
        (lambda s: {**s, "config": "abc"}, "config"),
        (lambda s: {k: v for k, v in s.items() if k != "config"}, "config"),
        (lambda s: {k: v for k, v in s.items() if k != "rng"}, "rng"),
        (lambda s: {**s, "optimizer": 5}, "optimizer"),
        (lambda s: {**s, "scheduler": [1]}, "scheduler"),
        (lambda s: {**s, "scheduler": {**s["scheduler"], "optimizer": {}}}, "scheduler"),
        (lambda s: {**s, "rng": {"torch": 1, "python": 2}}, "rng"),
        (lambda s: {**s, "window": {"loss": 1.0}}, "window"),
        (lambda s: {**s, "nonfinite": torch.zeros(2)}, "nonfinite"),
    ],
)
def test_a_crafted_state_file_is_named_not_a_crash(tmp_path: Path, craft, why: str) -> None:
    """state.pt holds only tensors and plain containers (weights_only), but of any shape: a run folder from
    elsewhere gives an error naming the file and what is wrong, never a KeyError or AttributeError."""
    from vermeil.checkpoint import load_torch, save_torch
    from vermeil.runs import DamagedCheckpointError, write_manifest

    make_trainer, folder = _trained_run(tmp_path / "run")
    save_torch(craft(load_torch(folder / "state.pt")), folder / "state.pt")
    write_manifest(folder)  # an intact file: its content is the problem
    (tmp_path / "run" / "config.yaml").unlink()  # the checkpoint's copy of the config is read then
    if why != "config":  # a trainer reads no config from the checkpoint
        with pytest.raises(DamagedCheckpointError, match=why) as e:
            make_trainer().load_checkpoint(tmp_path / "run")
        assert "state.pt" in str(e.value)
    if why not in ("rng", "optimizer", "scheduler", "window", "nonfinite"):  # what a trainer alone reads
        with pytest.raises(DamagedCheckpointError, match=why) as e:
            read_run_config(tmp_path / "run")
        assert "state.pt" in str(e.value)
