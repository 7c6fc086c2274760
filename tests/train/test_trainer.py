"""The training loop: falling loss, exact resume, Ctrl-C, checkpoints that survive a kill, metrics rows."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from vermeil.checkpoint import load_torch
from vermeil.config import ConfigError, from_dict
from vermeil.data import WindowSampler
from vermeil.nn.blocks import TransformerBlock
from vermeil.nn.positional import RotaryEmbedding
from vermeil.train import (
    Hook,
    TrainConfig,
    Trainer,
    causal_lm_loss,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    read_metrics,
)

# Axis legend: B batch, T sequence length, V vocabulary, D model dim.
VOCAB, DIM, SEQ = 11, 16, 7


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from 2 threads, and on a shared, busy machine OpenMP spinning makes them ~1000x
    # slower: one thread keeps the suite fast.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyLM(nn.Module):
    """Embedding -> one causal TransformerBlock (with dropout, so the RNG matters) -> RMSNorm -> head."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.block = TransformerBlock(
            DIM, 2, hidden_dim=24, causal=True, rotary=RotaryEmbedding(DIM // 2), dropout=dropout
        )
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.block(self.tok(tokens))))  # (B, T, V)


def _data() -> Tensor:
    g = torch.Generator().manual_seed(1)
    base = torch.arange(400) % VOCAB  # a learnable cycle with some noise
    noise = torch.randint(0, VOCAB, (400,), generator=g)
    return torch.where(torch.rand(400, generator=g) < 0.2, noise, base)


def _config(out_dir: Path | None, **kw: object) -> TrainConfig:
    base = dict(
        steps=8,
        lr=1e-2,
        warmup=2,
        batch_size=3,
        seq_len=SEQ,
        grad_accum=2,
        log_every=1,
        eval_every=4,
        save_every=3,
        progress=False,
        plot=False,
        out_dir=None if out_dir is None else str(out_dir),
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _trainer(out_dir: Path | None, hooks: list[Hook] = (), loss_fn=causal_lm_loss, **kw: object) -> Trainer:
    torch.manual_seed(0)
    model = TinyLM()
    data = _data()
    sampler = WindowSampler(data, 3, SEQ, seed=5)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        x, y = data[:-1][: 4 * SEQ].view(4, SEQ), data[1:][: 4 * SEQ].view(4, SEQ)
        logits = m(x)
        return {"val_loss": float(nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))}

    return Trainer(model, sampler, loss_fn, _config(out_dir, **kw), eval_fn=eval_fn, hooks=list(hooks))


def _train_losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_loss_falls_and_metrics_rows(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, steps=30, lr=2e-2, warmup=3, eval_every=10, save_every=10, plot=True)
    result = trainer.fit()
    assert result.step == 30 and not result.interrupted
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert [r["step"] for r in val] == [10, 20, 30]
    for key in ("loss", "ce", "lr", "grad_norm", "tokens_per_s", "tokens", "elapsed_s", "bpt"):
        assert key in train[0], key
    assert train[-1]["tokens"] == 30 * 2 * 3 * SEQ  # steps * grad_accum * batch * seq
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert val[-1]["val_loss"] < val[0]["val_loss"] + 1e-3
    assert result.history == rows
    png = (tmp_path / "loss.png").read_bytes() if (tmp_path / "loss.png").exists() else None
    if png is not None:  # matplotlib installed
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the learning rate logged is the one the update used: warm-up 1/3, 2/3, then the peak
    assert [round(r["lr"] / 2e-2, 6) for r in train[:4]] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 1.0] or (
        train[3]["lr"] < 2e-2
    )
    assert train[2]["lr"] == pytest.approx(2e-2)


class StopAt(Hook):
    """Raise KeyboardInterrupt after step `at` (as a Ctrl-C landing between steps would)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer: Trainer, step: int, loss: Tensor) -> None:
        if step == self.at:
            raise KeyboardInterrupt


class InterruptingLoss:
    """causal_lm_loss that raises KeyboardInterrupt once, in the second micro-batch of update `at` + 1."""

    def __init__(self, at: int) -> None:
        self.calls, self.fire_at = 0, 2 * at + 2

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor]):
        self.calls += 1
        if self.calls == self.fire_at:
            raise KeyboardInterrupt
        return causal_lm_loss(model, batch)


@pytest.mark.parametrize("where", ["between_steps", "inside_step"])
def test_resume_equals_uninterrupted(tmp_path: Path, where: str) -> None:
    full = _trainer(tmp_path / "full").fit()
    assert full.step == 8

    if where == "between_steps":
        first = _trainer(tmp_path / "cut", hooks=[StopAt(5)])
    else:
        first = _trainer(tmp_path / "cut", loss_fn=InterruptingLoss(5))
    cut = first.fit()
    assert cut.interrupted and cut.step == 5
    assert latest_checkpoint(tmp_path / "cut").name == "step_000005"

    torch.manual_seed(123)  # a different global RNG and a different init: the checkpoint must restore both
    resumed = _trainer(tmp_path / "cut")
    resumed.load_checkpoint(tmp_path / "cut")
    assert resumed.step == 5
    done = resumed.fit()
    assert done.step == 8 and not done.interrupted

    a = _train_losses(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    b = _train_losses(read_metrics(tmp_path / "cut" / "metrics.jsonl"))
    assert sorted(b) == list(range(1, 9))  # the resumed file continues the curve, no duplicates
    for step in range(1, 9):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    for pa, pb in zip(full_params(tmp_path / "full"), full_params(tmp_path / "cut")):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def full_params(run_dir: Path) -> list[Tensor]:
    model = TinyLM()
    load_model_weights(model, run_dir)
    return [p.detach().clone() for p in model.parameters()]


def test_sigint_saves_and_stops(tmp_path: Path) -> None:
    class SendSigint(Hook):
        def on_step_end(self, trainer: Trainer, step: int, loss: Tensor) -> None:
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    trainer = _trainer(tmp_path, hooks=[SendSigint()], save_every=0)
    result = trainer.fit()
    assert result.interrupted and result.step == 3
    assert latest_checkpoint(tmp_path).name == "step_000003"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    state = load_torch(latest_checkpoint(tmp_path) / "state.pt")
    assert state["step"] == 3 and state["data"] is not None and "rng" in state and "config" in state


def test_checkpoints_pruned_and_state_complete(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, steps=7, save_every=2, keep_checkpoints=2)
    trainer.fit()
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_000006", "step_000007"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000007"
    assert (tmp_path / "config.yaml").is_file()
    state = load_torch(tmp_path / "checkpoints" / "step_000007" / "state.pt")
    assert set(state) >= {"step", "optimizer", "scheduler", "rng", "data", "config"}
    assert state["config"]["train"]["steps"] == 7


def test_no_checkpoint_raises_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        latest_checkpoint(tmp_path)


def test_kill_during_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing step 4's state: step 2 stays the latest loadable checkpoint."""
    run = tmp_path / "run"
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            import vermeil.train.trainer as T
            from vermeil.checkpoint import atomic_write
            from test_trainer import _trainer

            real = T.save_torch
            def dying_save(obj, path):
                if obj["step"] == 4:
                    with atomic_write(path, "wb") as f:
                        f.write(b"PK\\x03\\x04 half a zip archive")
                        f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                return real(obj, path)
            T.save_torch = dying_save
            _trainer({str(run)!r}, save_every=2).fit()
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (run / "checkpoints" / "step_000004" / "model.safetensors").exists()  # the kill was mid-checkpoint
    folder = latest_checkpoint(run)
    assert folder.name == "step_000002"
    assert load_torch(folder / "state.pt")["step"] == 2
    # and the run resumes from it and finishes
    resumed = _trainer(run, save_every=2)
    resumed.load_checkpoint(run)
    assert resumed.fit().step == 8
    assert [p.name for p in list_checkpoints(run)] == ["step_000006", "step_000008"]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_failed_resave_of_the_latest_checkpoint_is_never_loaded(tmp_path: Path, monkeypatch) -> None:
    """Resumed from step 4 of a run whose `latest` is step 6: the save of the new step 6 dies after its weights.
    The folder must not pass for a checkpoint (new weights with the old optimizer, data and RNG state)."""
    import vermeil.train.trainer as T

    _trainer(tmp_path, steps=6, save_every=2, keep_checkpoints=3).fit()
    resumed = _trainer(tmp_path, steps=6, save_every=2, keep_checkpoints=3, lr=1e-3)  # another branch
    resumed.load_checkpoint(tmp_path / "checkpoints" / "step_000004")

    def dying_save(obj: object, path: Path) -> None:
        raise OSError("killed while writing state.pt")

    monkeypatch.setattr(T, "save_torch", dying_save)
    with pytest.raises(OSError, match="killed"):
        resumed.fit()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_000004"


def test_moe_aux_loss_is_added() -> None:
    @dataclass
    class Out:
        logits: Tensor
        aux_loss: Tensor

    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = TinyLM(dropout=0.0)

        def forward(self, tokens: Tensor) -> Out:
            logits = self.lm(tokens)
            return Out(logits, logits.square().mean() * 0.5)

    model = WithAux()
    x = torch.randint(0, VOCAB, (2, SEQ))
    y = torch.randint(0, VOCAB, (2, SEQ))
    loss, metrics = causal_lm_loss(model, (x, y))
    ce = nn.functional.cross_entropy(model.lm(x).flatten(0, 1), y.flatten())
    torch.testing.assert_close(metrics["ce"], ce)
    torch.testing.assert_close(loss, ce + model.lm(x).square().mean() * 0.5)


def test_bf16_autocast_tracks_float32(tmp_path: Path) -> None:
    """bf16=True runs the forward in bfloat16 (the logits come out bf16), and its loss curve stays within 0.02 of
    the float32 run's at every one of 20 steps (measured: 1e-3; weights and AdamW stay float32), and falls."""

    def run(bf16: bool) -> tuple[list[float], set[torch.dtype]]:
        dtypes: set[torch.dtype] = set()

        def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            inputs, targets = batch
            logits = model(inputs)
            dtypes.add(logits.dtype)
            return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

        result = _trainer(None, loss_fn=loss_fn, steps=20, lr=2e-2, warmup=3, eval_every=0, bf16=bf16).fit()
        return [r["loss"] for r in result.history if r["split"] == "train"], dtypes

    low, low_dtypes = run(bf16=True)
    full, full_dtypes = run(bf16=False)
    assert low_dtypes == {torch.bfloat16} and full_dtypes == {torch.float32}
    assert len(low) == len(full) == 20
    diffs = [abs(a - b) for a, b in zip(low, full)]
    assert max(diffs) < 0.02, diffs
    assert sum(low[-3:]) / 3 < sum(low[:3]) / 3 - 0.3, low


def test_train_config_is_strict() -> None:
    with pytest.raises(ConfigError, match="grad_accum=0 must be an int >= 1"):
        from_dict(TrainConfig, {"grad_accum": 0})
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        from_dict(TrainConfig, {"step": 10})
    with pytest.raises(ConfigError, match="lr='fast' must be float"):
        from_dict(TrainConfig, {"lr": "fast"})


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("lr", math.inf, "must be a finite number > 0"),
        ("weight_decay", math.inf, "must be a finite number >= 0"),
        ("weight_decay", math.nan, "must be a finite number >= 0"),
        ("eps", -1.0, "must be a finite number > 0"),
        ("eps", 0.0, "must be a finite number > 0"),
        ("eps", math.nan, "must be a finite number > 0"),
        ("grad_clip", math.nan, "must be >= 0"),
    ],
)
def test_train_config_rejects_values_that_would_destroy_the_weights(
    key: str, value: float, rule: str
) -> None:
    """Each of these made the first update write non-finite weights (NaN gradients after clipping, an infinite
    step or decay, a division by eps = 0 on an unused embedding row) and blamed the data at step 2."""
    with pytest.raises(ConfigError, match=rf"train: {key}={value!r} {rule}"):
        from_dict(TrainConfig, {key: value}, path="train")


def test_metrics_file_is_valid_jsonl(tmp_path: Path) -> None:
    _trainer(tmp_path, steps=3, eval_every=0).fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["split"] for r in rows] == ["train", "train", "train", "val"]  # the end always evaluates


def test_new_run_refuses_a_folder_holding_another_runs_checkpoints(tmp_path: Path) -> None:
    """A fresh Trainer pointed at a folder with checkpoints neither mixes its own into them nor prunes them;
    it says how to continue that run or start over, and does either when asked."""
    from vermeil.runs import RunExistsError, clear_run

    _trainer(tmp_path, steps=6, save_every=2, keep_checkpoints=5, eval_every=0).fit()
    before = {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(tmp_path)}
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(RunExistsError, match="already holds a run") as e:
        _trainer(tmp_path, steps=3, save_every=1, keep_checkpoints=2, eval_every=0).fit()
    assert str(tmp_path) in str(e.value) and "load_checkpoint" in str(e.value) and "clear_run" in str(e.value)
    after = {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(tmp_path)}
    assert after == before and (tmp_path / "metrics.jsonl").read_bytes() == metrics
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000006"
    # resuming it explicitly is fine; so is starting over after clear_run
    resumed = _trainer(tmp_path, steps=8, save_every=2, keep_checkpoints=5, eval_every=0)
    resumed.load_checkpoint(tmp_path)
    assert resumed.fit().step == 8
    clear_run(tmp_path)
    assert _trainer(tmp_path, steps=2, save_every=1, eval_every=0).fit().step == 2


def test_metrics_rows_that_are_not_objects_are_skipped(tmp_path: Path) -> None:
    """A metrics.jsonl line that parses but is no JSON object (a list, a number: a foreign or edited file) is
    skipped like a damaged line, not an AttributeError in `vermeil compare` or a resume's truncation."""
    from vermeil.train.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "split": "train", "loss": 2.0}\n[1, 2]\n5\n"x"\nnull\n{"step": 2, "loss": 1.0}\n'
    )
    assert read_metrics(path) == [{"step": 1, "split": "train", "loss": 2.0}, {"step": 2, "loss": 1.0}]
    assert truncate_metrics(path, 1) == 1
    assert read_metrics(path) == [{"step": 1, "split": "train", "loss": 2.0}]
