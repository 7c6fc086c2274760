"""What a run must never do silently: train on non-finite losses and save them, log a learning rate it does not
use, lose fp16's scaler state on resume, or stay silent when stdout is not a terminal."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from vermeil.checkpoint import load_torch
from vermeil.config import ConfigError, from_dict
from vermeil.train import (
    Hook,
    TrainConfig,
    Trainer,
    causal_lm_loss,
    latest_checkpoint,
    list_checkpoints,
    read_metrics,
)
from vermeil.train.optim import WarmupCosine

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import StopAt, TinyLM, _train_losses, _trainer, full_params  # noqa: E402


class NaNAt:
    """causal_lm_loss, but NaN in every micro-batch of the updates listed (a bad batch, a diverging step)."""

    def __init__(self, *steps: int, grad_accum: int = 2) -> None:
        self.calls, self.steps, self.grad_accum = 0, set(steps), grad_accum

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor]):
        self.calls += 1
        out = causal_lm_loss(model, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        step = (self.calls - 1) // self.grad_accum + 1
        return (loss * float("nan") if step in self.steps else loss), metrics


def _finite(folder: Path) -> bool:
    from vermeil.checkpoint import read_weights

    return all(bool(torch.isfinite(t).all()) for t in read_weights(folder / "model.safetensors").values())


# -- item 2: non-finite losses ---------------------------------------------------------------------------------


def test_nonfinite_loss_stops_without_saving_it(tmp_path: Path) -> None:
    from vermeil.train.trainer import NonFiniteError

    trainer = _trainer(tmp_path, loss_fn=NaNAt(5), save_every=2, keep_checkpoints=1, log_every=2)
    with pytest.raises(NonFiniteError, match=r"step 5\b") as info:
        trainer.fit()
    assert len(str(info.value).splitlines()) == 1
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_000004"]  # the last finite one: never replaced, never pruned
    assert latest_checkpoint(tmp_path).name == "step_000004" and _finite(
        tmp_path / "checkpoints" / "step_000004"
    )
    assert all(
        bool(torch.isfinite(p).all()) for p in trainer.model.parameters()
    )  # the bad update was a no-op


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_skip_keeps_training_and_counts(tmp_path: Path, fused: bool) -> None:
    trainer = _trainer(tmp_path, loss_fn=NaNAt(3, 6), on_nonfinite="skip", log_every=1, fused_adamw=fused)
    assert bool(trainer.optimizer.defaults.get("fused")) == fused
    result = trainer.fit()
    assert result.step == 8 and _finite(latest_checkpoint(tmp_path))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    skipped = {r["step"]: r["skipped_steps"] for r in rows}
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[8] == 2
    assert all(r["loss"] is None for r in rows if r["step"] in (3, 6))
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] not in (3, 6))


def test_skip_stops_after_too_many_in_a_row(tmp_path: Path) -> None:
    from vermeil.train.trainer import NonFiniteError

    trainer = _trainer(tmp_path, loss_fn=NaNAt(3, 4, 5), on_nonfinite="skip", max_nonfinite=3, log_every=4)
    with pytest.raises(NonFiniteError, match=r"3 steps in a row.*step 3\b"):
        trainer.fit()
    assert latest_checkpoint(tmp_path).name == "step_000003"  # saved while weights were finite
    assert _finite(latest_checkpoint(tmp_path))


def test_nonfinite_weights_are_never_saved(tmp_path: Path) -> None:
    from vermeil.train.trainer import NonFiniteError

    class Poison(Hook):
        def on_step_end(self, trainer: Trainer, step: int, loss: Tensor) -> None:
            if step == 2:
                with torch.no_grad():
                    trainer.model.head.weight[0, 0] = float("inf")

    with pytest.raises(NonFiniteError, match="step 3"):
        _trainer(tmp_path, hooks=[Poison()], save_every=3).fit()
    assert list_checkpoints(tmp_path) == []


class NaNAtUpdate:
    """causal_lm_loss, NaN in the updates listed, by the trainer's step (a resumed run keeps the same steps)."""

    def __init__(self, *steps: int) -> None:
        self.steps, self.trainer = set(steps), None

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor]):
        loss, metrics = causal_lm_loss(model, batch)
        return (loss * float("nan") if self.trainer.step + 1 in self.steps else loss), metrics


def _nan_run(out: Path, steps: tuple[int, ...], hooks=(), resume: bool = False, **kw: object) -> Trainer:
    loss_fn = NaNAtUpdate(*steps)
    trainer = _trainer(
        out, hooks=hooks, loss_fn=loss_fn, on_nonfinite="skip", log_every=1, eval_every=0, **kw
    )
    loss_fn.trainer = trainer
    if resume:
        trainer.load_checkpoint(out)
    return trainer


def test_resume_keeps_the_nonfinite_counts(tmp_path: Path) -> None:
    """skipped_steps and a streak of non-finite steps continue across a resume as in the uninterrupted run."""
    from vermeil.train.trainer import NonFiniteError

    _nan_run(tmp_path / "full", (2, 4)).fit()
    _nan_run(tmp_path / "cut", (2, 4), hooks=[StopAt(3)]).fit()
    _nan_run(tmp_path / "cut", (2, 4), resume=True).fit()
    skipped = [
        [
            (r["step"], r["skipped_steps"])
            for r in read_metrics(tmp_path / name / "metrics.jsonl")
            if r["split"] == "train"
        ]
        for name in ("full", "cut")
    ]
    assert skipped[0] == skipped[1] and skipped[0][-1] == (8, 2)
    # A streak of 3 from step 3, cut after step 3: the resumed run stops at step 5, as the whole one does.
    with pytest.raises(NonFiniteError, match=r"3 steps in a row from step 3\b"):
        _nan_run(tmp_path / "streak", (3, 4, 5), max_nonfinite=3).fit()
    _nan_run(tmp_path / "streak2", (3, 4, 5), hooks=[StopAt(3)], max_nonfinite=3).fit()
    with pytest.raises(NonFiniteError, match=r"3 steps in a row from step 3\b"):
        _nan_run(tmp_path / "streak2", (3, 4, 5), resume=True, max_nonfinite=3).fit()


def test_on_nonfinite_is_checked() -> None:
    with pytest.raises(ConfigError, match="on_nonfinite"):
        from_dict(TrainConfig, {"on_nonfinite": "ignore"}, path="train")
    with pytest.raises(ConfigError, match="max_nonfinite"):
        from_dict(TrainConfig, {"max_nonfinite": 0}, path="train")


# -- item 6: a new learning rate on resume is applied, and the logged one is the one in effect ---------------


def test_resume_applies_a_new_lr(tmp_path: Path) -> None:
    class LrSeen(Hook):
        def __init__(self) -> None:
            self.lrs: dict[int, float] = {}

        def on_train_start(self, trainer: Trainer) -> None:
            self.lrs[trainer.step + 1] = trainer.optimizer.param_groups[0]["lr"]

        def on_step_end(self, trainer: Trainer, step: int, loss: Tensor) -> None:
            self.lrs[step + 1] = trainer.optimizer.param_groups[0]["lr"]  # the next update's

    _trainer(tmp_path, steps=4, save_every=4).fit()
    seen = LrSeen()
    resumed = _trainer(tmp_path, steps=8, lr=1e-3, hooks=[seen])
    resumed.load_checkpoint(tmp_path)
    resumed.fit()
    schedule = WarmupCosine(2, 8, 0.1)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"}
    for step in range(5, 9):
        expected = 1e-3 * schedule(step - 1)
        assert seen.lrs[step] == pytest.approx(expected, rel=1e-12), step
        assert rows[step]["lr"] == pytest.approx(seen.lrs[step], rel=1e-12), step


def test_resume_without_changes_stays_exact(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full").fit()
    _trainer(tmp_path / "cut", steps=8, hooks=[StopAt(4)]).fit()
    resumed = _trainer(tmp_path / "cut")
    resumed.load_checkpoint(tmp_path / "cut")
    resumed.fit()
    a = _train_losses(full.history)
    b = _train_losses(read_metrics(tmp_path / "cut" / "metrics.jsonl"))
    assert a == b
    for pa, pb in zip(full_params(tmp_path / "full"), full_params(tmp_path / "cut")):
        assert torch.equal(pa, pb)


# -- item 10: precision fp32 | bf16 | fp16 (with a gradient scaler) ------------------------------------------


def test_precision_is_checked_and_bf16_is_an_alias() -> None:
    assert TrainConfig(bf16=True).precision == "bf16"
    assert TrainConfig(precision="bf16").bf16 is True
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="bf16=True.*precision='fp16'"):
        TrainConfig(precision="fp16", bf16=True)


def test_fp16_scaler_state_in_checkpoint_and_exact_resume(tmp_path: Path) -> None:
    seen: set[torch.dtype] = set()

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        logits = model(inputs)
        seen.add(logits.dtype)
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    full = _trainer(tmp_path / "full", loss_fn=loss_fn, precision="fp16").fit()
    assert seen == {torch.float16}
    state = load_torch(latest_checkpoint(tmp_path / "full") / "state.pt")
    assert state["scaler"]["scale"] > 0
    _trainer(tmp_path / "cut", loss_fn=loss_fn, precision="fp16", hooks=[StopAt(5)]).fit()
    resumed = _trainer(tmp_path / "cut", loss_fn=loss_fn, precision="fp16")
    resumed.load_checkpoint(tmp_path / "cut")
    assert (
        resumed.scaler is not None
        and resumed.scaler.get_scale()
        == load_torch(latest_checkpoint(tmp_path / "cut") / "state.pt")["scaler"]["scale"]
    )
    resumed.fit()
    assert _train_losses(full.history) == _train_losses(read_metrics(tmp_path / "cut" / "metrics.jsonl"))
    for pa, pb in zip(full_params(tmp_path / "full"), full_params(tmp_path / "cut")):
        assert torch.equal(pa, pb)


def test_fp16_overflow_is_skipped_by_the_scaler_not_stopped(tmp_path: Path) -> None:
    """A scale too large for fp16 makes inf gradients: the scaler halves it and skips, the run goes on."""
    trainer = _trainer(tmp_path, precision="fp16", steps=4, save_every=0)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    result = trainer.fit()
    assert result.step == 4 and trainer.scaler.get_scale() < 2.0**60  # type: ignore[union-attr]
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


# -- item 11: a progress line every log_every steps when stdout is not a terminal ----------------------------


def test_plain_progress_lines_without_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _trainer(tmp_path, progress=None, log_every=2, eval_every=0).fit()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step ") and "ETA" in line]
    assert [line.split()[1] for line in lines] == ["2/8", "4/8", "6/8", "8/8"], err
    assert all("loss" in line and "tok/s" in line and "ETA" in line for line in lines)


def test_no_progress_lines_when_progress_is_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _trainer(tmp_path, progress=False, log_every=2, eval_every=0).fit()
    assert "ETA" not in capsys.readouterr().err


def test_tinylm_is_importable() -> None:
    assert isinstance(TinyLM(), nn.Module)
