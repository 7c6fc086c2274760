"""End-to-end launch of `vermeil train` under torchrun (2 CPU ranks, gloo) with a distributed strategy.

Axis legend: none (whole runs; rows of metrics.jsonl are compared).

Each test starts `python -m torch.distributed.run --standalone --nproc_per_node=2 -m vermeil train
configs/llm-tiny.yaml distributed.strategy=...` in a subprocess with tiny overrides, then checks the run folder
(DCP shards, exported safetensors, metrics written once by rank 0), that `vermeil generate` works on it, and
that the logged cross-entropy of every step equals a single-process run of the same config (each rank trains on
its slice of the same global batch, so the two runs see the same data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vermeil.cli import main as vermeil_main
from vermeil.config import ConfigError
from vermeil.distributed.config import DistributedConfig
from vermeil.recipes import build_run, load_run_config, run_config_from_dict
from vermeil.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "llm-tiny.yaml"
STEPS = 3
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.log_every=1",
    "train.save_every=2",
    "train.plot=false",
    "data.max_bytes=20000",
]


def _torchrun(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*launch, "-m", "vermeil", "train", *args]
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr  # the gloo teardown abort
    assert proc.stderr.count("vermeil train:") == 1, proc.stderr  # rank 0 alone talks
    assert proc.stdout.count("done: step") <= 1, proc.stdout
    return proc


def _train_args(strategy: str, out: Path, *extra: str) -> list[str]:
    return [
        os.fspath(CONFIG),
        f"distributed.strategy={strategy}",
        *OVERRIDES,
        *extra,
        "--out",
        os.fspath(out),
    ]


def _assert_same_curve(rows: list[dict], single_rows: list[dict]) -> None:
    """Same data, same model: the cross-entropy (averaged over the ranks) follows the single-process curve."""
    train = [r for r in rows if r["split"] == "train"]
    single = [r for r in single_rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [r["step"] for r in single] == list(range(1, STEPS + 1))
    for got, want in zip(train, single, strict=True):
        assert got["ce"] == pytest.approx(want["ce"], rel=1e-4, abs=1e-4), (got, want)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def single_process_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The same run in this process (no WORLD_SIZE: the distributed section is ignored)."""
    out = tmp_path_factory.mktemp("single") / "run"
    run = load_run_config(CONFIG, [*OVERRIDES, "distributed.strategy=fsdp2", f"train.out_dir={out}"])
    assert "WORLD_SIZE" not in os.environ
    built = build_run(run)
    trainer = Trainer(
        built.model,
        built.train_batches,
        built.loss_fn,
        run.train,
        eval_fn=built.eval_fn,
        run_config=run.to_dict(),
    )
    assert trainer.world_size == 1 and trainer.dp_size == 1
    trainer.fit()
    return _rows(out)


# Sequence and loss parallelism on the tiny LLM: tied embeddings, an MoE layer, GQA, chunked attention.
SP_LP = ("distributed.sequence_parallel=true", "distributed.loss_parallel=true")


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [("fsdp2", ()), ("ddp", ()), ("tp", ()), ("tp", SP_LP)],
    ids=["fsdp2", "ddp", "tp", "tp-sequence-loss-parallel"],
)
def test_torchrun_train_end_to_end(
    strategy: str,
    extra: tuple[str, ...],
    tmp_path: Path,
    single_process_rows: list[dict],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    _torchrun(run_dir, *_train_args(strategy, run_dir, *extra))

    # Checkpoints: DCP shards of both ranks, the exported full weights, the trainer state, `latest`.
    last = run_dir / "checkpoints" / f"step_{STEPS:06d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == last.name
    for name in ("model.safetensors", "state.pt", "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"):
        assert (last / name).is_file(), name
    assert (run_dir / "config.yaml").read_text().count(f"strategy: {strategy}") == 1

    # Metrics written once (rank 0 only): one train row per step and one evaluation row at the end.
    rows = _rows(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows if r["split"] == "val"] == [STEPS]
    assert train[-1]["tokens"] == STEPS * 4 * 32  # the global batch's positions, not one rank's
    _assert_same_curve(rows, single_process_rows)

    # `vermeil generate` reads the exported model.safetensors.
    capsys.readouterr()
    assert vermeil_main(["generate", os.fspath(run_dir), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_torchrun_resume_continues_the_curve(tmp_path: Path, single_process_rows: list[dict]) -> None:
    """FSDP2 run stopped after 2 steps, resumed under torchrun to step 3. A single process refuses the 2-rank
    checkpoint's training state in one line (its dcp/ plan is a pickle, read only under torchrun: SECURITY.md);
    before that rule it resumed it here, which was the code-execution path of a crafted folder."""
    run_dir = tmp_path / "run"
    _torchrun(run_dir, *_train_args("fsdp2", run_dir, "train.steps=2"))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    _torchrun(run_dir, "--resume", os.fspath(run_dir), f"train.steps={STEPS}")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:06d}"
    _assert_same_curve(_rows(run_dir), single_process_rows)

    run = load_run_config(run_dir / "config.yaml", [f"train.steps={STEPS + 1}"])
    built = build_run(run)
    trainer = Trainer(built.model, built.train_batches, built.loss_fn, run.train, run_config=run.to_dict())
    with pytest.raises(ValueError, match="a single process never reads dcp/ folders"):
        trainer.load_checkpoint(run_dir)
    assert trainer.step == 0 and not trainer.optimizer.state  # nothing of the refused state was taken


def test_distributed_section_is_checked_and_round_trips() -> None:
    run = load_run_config(CONFIG, ["distributed.strategy=fsdp2", "distributed.param_dtype=bf16"])
    assert run.distributed == DistributedConfig("fsdp2", None, "bf16", None)
    assert run_config_from_dict(run.to_dict()).distributed == run.distributed
    assert (
        "distributed" not in load_run_config(CONFIG).to_dict()
    )  # the default section stays out of config.yaml
    with pytest.raises(ConfigError, match="distributed.strategy"):
        load_run_config(CONFIG, ["distributed.strategy=zero3"])
    with pytest.raises(ConfigError, match="tp_size"):
        load_run_config(CONFIG, ["distributed.strategy=fsdp2+tp"])
    with pytest.raises(ConfigError, match="param_dtype"):
        load_run_config(CONFIG, ["distributed.strategy=fsdp2", "distributed.param_dtype=int8"])
    run = load_run_config(CONFIG, ["distributed.strategy=tp", *SP_LP])
    assert run.distributed == DistributedConfig("tp", sequence_parallel=True, loss_parallel=True)
    assert run_config_from_dict(run.to_dict()).distributed == run.distributed
    with pytest.raises(ConfigError, match="sequence_parallel"):
        load_run_config(CONFIG, ["distributed.strategy=fsdp2", "distributed.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="loss_parallel"):
        load_run_config(CONFIG, ["distributed.strategy=tp", "distributed.loss_parallel=maybe"])


def test_strategy_none_under_torchrun_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank would train alone and write the same run folder: refused before anything is built."""
    run = load_run_config(CONFIG, OVERRIDES)
    built = build_run(run)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="strategy='none' under torchrun"):
        Trainer(built.model, built.train_batches, built.loss_fn, run.train, run_config=run.to_dict())
