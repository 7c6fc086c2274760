"""Small command-line gaps a new user trips on: --version, sample --steps 0, config paths of the wrong kind,
an empty config."""

from __future__ import annotations

from pathlib import Path

import pytest

from vermeil.cli import main


def _err(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("vermeil ")


def test_sample_steps_zero_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _err(capsys, "sample", str(tmp_path), "--steps", "0")
    assert code == 2 and "--steps=0 must be >= 1" in line


def test_config_paths_of_the_wrong_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _err(capsys, "train", str(tmp_path))
    assert code == 2 and "is a folder, not a config file" in line
    cfg = tmp_path / "x.yaml"
    cfg.write_text("")
    code, line = _err(capsys, "train", "--resume", str(cfg))
    assert code == 2 and "is a file" in line and "vermeil train" in line
    code, line = _err(capsys, "train", str(cfg), "--out", str(tmp_path / "run"))
    assert code == 2 and "no model section" in line and "_Sections" not in line


def test_make_run_installs_only_the_main_job_and_keeps_a_run() -> None:
    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    run = text[text.index("\nrun:") :].split("\n\n")[0]
    assert "--overwrite" not in run and "--resume" in run and "$(RUN_STAMP)" in run.splitlines()[1]
    run_install = text[text.index("$(RUN_STAMP):") :].split("\n\n")[0]
    assert ".[train,plot]" in run_install and "dev" not in run_install


def test_compare_headline_and_time_formats() -> None:
    from vermeil.cli import _headline, _seconds

    assert _headline({"val_loss": 1.0, "val_bpb": 1.5}) == "val_bpb 1.5000"
    assert _headline({"val_distance": 0.25}) == "val_distance 0.2500"
    assert [_seconds(v) for v in (3.14159, 245.0, 3725.0)] == ["3.1 s", "4m05s", "1h02m"]


def test_cuda_device_on_a_cpu_only_torch_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = Path(__file__).resolve().parents[1] / "configs" / "llm-tiny.yaml"
    code, line = _err(capsys, "train", str(cfg), "--out", str(tmp_path / "run"), "train.device=cuda")
    assert code == 2 and "train.device='cuda'" in line and "train.device=cpu" in line


def test_disk_full_is_said(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import vermeil.cli as cli

    def full(args):
        raise OSError(
            errno.ENOSPC, "writing run/state.pt failed: no space left on device (the disk is full)", "x"
        )

    monkeypatch.setattr(cli, "cmd_info", full)
    code, line = _err(capsys, "info", "whatever.yaml")
    assert code == 2 and "disk is full" in line and "checkpoints written before are intact" in line
