"""A run folder is something people copy, share and download: nothing in it may run code, a damaged checkpoint
is named and skipped, `latest` stays inside the folder, and one trainer at a time writes it."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from vermeil.checkpoint import load_torch, save_torch
from vermeil.cli import main
from vermeil.runs import (
    CHECKPOINTS_DIR,
    MANIFEST,
    DamagedCheckpointError,
    RunLockedError,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    lock_run,
    write_run,
)

TINY = {
    "name": "tiny",
    "model": {"family": "llm", "dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 8},
    "data": {"task": "text", "max_bytes": 20000},
    "train": {
        "steps": 4,
        "lr": 1e-2,
        "warmup": 1,
        "batch_size": 2,
        "seq_len": 16,
        "log_every": 1,
        "eval_every": 2,
        "eval_batches": 1,
        "save_every": 2,
        "keep_checkpoints": 3,
        "plot": False,
        "threads": 1,
    },
}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY, sort_keys=False))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(cfg), "--out", str(root / "run")]) == 0
    finally:
        torch.set_num_threads(n)
    return root / "run"


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# -- item 1: no pickle from a run folder is ever executed ----------------------------------------------------


class _Payload:
    """Unpickling this creates the file named by `path`: what an attacker's `dcp/.metadata` would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _plant_dcp(folder: Path, marker: Path) -> None:
    """Make a checkpoint folder look distributed: `optimizer: None` in state.pt and a pickle in dcp/.metadata."""
    state = load_torch(folder / "state.pt")
    state["optimizer"] = None
    save_torch(state, folder / "state.pt")
    (folder / "dcp").mkdir()
    (folder / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    (folder / MANIFEST).unlink(missing_ok=True)


def test_resume_never_unpickles_dcp_metadata(run: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    _plant_dcp(latest_checkpoint(run), marker)
    code, _, err = _run(capsys, "train", "--resume", str(run), "train.steps=6")
    assert not marker.exists()
    assert code == 2
    line = _one_error_line(err)
    assert "dcp" in line and "distributed" in line


def test_dcp_loader_refuses_a_metadata_file_it_did_not_write(tmp_path: Path) -> None:
    from vermeil.distributed.checkpoint import export_weights, load_checkpoint

    marker = tmp_path / "pwned"
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"\.metadata.*pathlib.Path.touch"):
        load_checkpoint(tmp_path / "dcp", model)
    with pytest.raises(ValueError, match=r"\.metadata"):
        export_weights(tmp_path / "dcp", tmp_path / "out.safetensors")
    assert not marker.exists()


def test_dcp_metadata_we_write_still_loads(tmp_path: Path) -> None:
    from vermeil.distributed.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "dcp", model, opt)
    with pytest.warns(UserWarning, match="single process"):
        load_checkpoint(tmp_path / "dcp", other)
    assert torch.equal(other.weight, model.weight)


def test_security_md_names_the_rules() -> None:
    text = (Path(__file__).resolve().parents[1] / "SECURITY.md").read_text()
    for needle in ("weights_only=True", "safetensors", "safe_load", "dcp/", ".metadata", "Reporting"):
        assert needle in text, needle


# -- item 4: damaged checkpoints are named and skipped --------------------------------------------------------


def _flip(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_written_last_and_verified(run: Path) -> None:
    folder = latest_checkpoint(run)
    assert folder.name == "step_000004"
    manifest = (folder / MANIFEST).read_text()
    assert "sha256" in manifest and "model.safetensors" in manifest and "state.pt" in manifest


@pytest.mark.parametrize("damage", ["flip_weights", "truncate_weights", "truncate_state"])
def test_generate_falls_back_to_the_newest_intact_checkpoint(run: Path, capsys, damage: str) -> None:
    newest = run / CHECKPOINTS_DIR / "step_000004"
    name = "state.pt" if damage == "truncate_state" else "model.safetensors"
    if damage.startswith("flip"):
        _flip(newest / name)
    else:
        (newest / name).write_bytes((newest / name).read_bytes()[:50])
    with pytest.warns(UserWarning, match=rf"step_000004.{name}"):
        assert latest_checkpoint(run).name == "step_000002"
    code, out, err = _run(capsys, "generate", str(run), "--prompt", "def ", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("def ")
    assert f"step_000004/{name}" in err and "warning" in err and "Traceback" not in err


def test_every_checkpoint_damaged_names_the_file(run: Path, capsys) -> None:
    for folder in list_checkpoints(run):
        _flip(folder / "model.safetensors")
    code, _, err = _run(capsys, "generate", str(run), "--prompt", "def ", "--max-new-tokens", "4")
    assert code == 2
    assert "step_000004/model.safetensors" in err.splitlines()[-1]


def test_resume_falls_back_and_convert_too(run: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers")
    _flip(run / CHECKPOINTS_DIR / "step_000004" / "model.safetensors")
    code, _, err = _run(capsys, "convert", "--to", "transformers", str(run), "--out", str(tmp_path / "hf"))
    assert code == 0 and "step_000004/model.safetensors" in err
    code, out, err = _run(capsys, "train", "--resume", str(run), "train.steps=6")
    assert code == 0 and "resumed from" in err and "step_000002" in err


# -- item 5: `latest` stays inside the run folder ------------------------------------------------------------


@pytest.mark.parametrize("pointer", ["../../elsewhere/checkpoints/step_000009", "ABSOLUTE", "step_000002/.."])
def test_latest_is_confined_to_the_run_folder(tmp_path: Path, pointer: str) -> None:
    model = nn.Linear(2, 2)
    mine = write_run({"train": {}}, model, tmp_path / "a" / "b" / "run")
    foreign = write_run({"train": {}}, nn.Linear(2, 2), tmp_path / "elsewhere")
    (foreign.parent / "step_000009").mkdir()
    for f in foreign.iterdir():
        shutil.copy(f, foreign.parent / "step_000009")
    if pointer == "ABSOLUTE":
        pointer = os.fspath(foreign.parent / "step_000009")
    (mine.parent / "latest").write_text(pointer + "\n")
    stray = foreign.parent / "step_000009" / ".model.safetensors.abcdefgh.tmp"
    stray.write_text("x")
    with pytest.warns(UserWarning, match="latest"):
        assert latest_checkpoint(tmp_path / "a" / "b" / "run") == mine
    assert load_model_weights(nn.Linear(2, 2), tmp_path / "a" / "b" / "run") == mine
    assert stray.exists()


# -- item 3: one trainer per run folder -----------------------------------------------------------------------


def _hold_lock(run: Path, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from vermeil.runs import lock_run
        with lock_run({os.fspath(run)!r}):
            Path({os.fspath(ready)!r}).touch()
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    for _ in range(600):
        if ready.exists():
            return proc
        if proc.poll() is not None:
            raise AssertionError("the lock holder exited early")
        import time

        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the lock holder never took the lock")


def test_second_trainer_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY, sort_keys=False))
    holder = _hold_lock(run, tmp_path)
    try:
        before = sorted(p.name for p in list_checkpoints(run))
        for argv in (
            ["train", "--resume", str(run), "train.steps=6"],
            ["train", str(cfg), "--out", str(run), "--overwrite"],
        ):
            code, _, err = _run(capsys, *argv)
            line = _one_error_line(err)
            assert code == 2 and "in use" in line and f"pid {holder.pid}" in line, line
        assert sorted(p.name for p in list_checkpoints(run)) == before  # --overwrite cleared nothing
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"), lock_run(run):
            pass
    finally:
        holder.kill()
        holder.wait()
    # The holder died without unlocking: its lock file is stale, the next trainer takes the folder.
    with lock_run(run) as info:
        assert info["pid"] == os.getpid()
    code, _, _ = _run(capsys, "train", "--resume", str(run), "train.steps=5")
    assert code == 0


def test_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    with lock_run(tmp_path) as outer, lock_run(tmp_path) as inner:  # a second flock in-process would deadlock
        assert outer == inner == {"pid": os.getpid(), "host": socket.gethostname()}
    with lock_run(tmp_path) as again:  # released: taken again at once
        assert again["pid"] == os.getpid()


def test_damaged_checkpoint_error_class() -> None:
    assert issubclass(DamagedCheckpointError, ValueError)


# -- item 2 at the command line: a diverging run exits non-zero with one line -------------------------------


def test_train_nonfinite_exits_nonzero_naming_the_step(tmp_path: Path, capsys, monkeypatch) -> None:
    import vermeil.recipes

    real = vermeil.recipes.build_run

    def nan_from_step_3(run, **kw):
        built = real(run, **kw)
        inner, calls = built.loss_fn, [0]

        def loss_fn(model, batch):
            calls[0] += 1
            out = inner(model, batch)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            return (loss * float("nan") if calls[0] >= 3 else loss), metrics

        built.loss_fn = loss_fn
        return built

    monkeypatch.setattr(vermeil.recipes, "build_run", nan_from_step_3)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY, sort_keys=False))
    code, out, err = _run(capsys, "train", str(cfg), "--out", str(tmp_path / "run"))
    assert code == 1 and "done" not in out
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "step 3" in lines[0] and "Traceback" not in err
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"


def test_resume_of_a_finished_run_says_how_to_continue(run: Path, capsys) -> None:
    code, _, err = _run(capsys, "train", "--resume", str(run))
    assert code == 0 and "already finished at step 4" in err and "train.steps=8" in err
