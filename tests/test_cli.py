"""The `vermeil` command: one-line errors, train -> generate / compare / resume, info, `python -m vermeil`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vermeil.cli import main
from vermeil.train import latest_checkpoint, read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY_HYBRID = {
    "name": "tiny",
    "model": {"family": "hybrid", "dim": 24, "pattern": "MA", "heads": 2, "hidden_dim": 32, "d_state": 4},
    "data": {"task": "text", "max_bytes": 20000},
    "train": {
        "steps": 6,
        "lr": 1e-2,
        "warmup": 1,
        "batch_size": 4,
        "seq_len": 32,
        "log_every": 1,
        "eval_every": 3,
        "eval_batches": 2,
        "save_every": 3,
        "plot": False,
        "threads": 1,
    },
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _llm_config(**model: object) -> dict:
    base = yaml.safe_load((CONFIGS / "llm-tiny.yaml").read_text())
    base["model"].update(model)
    return base


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c["model"].update(n_head=4), "n_head"),
        (lambda c: c["train"].update(lr="fast"), "train.lr='fast' must be float"),
        (
            lambda c: c["model"].update(dim=100, n_heads=3, n_kv_heads=1),
            "dim=100 must be divisible by n_heads=3",
        ),
        (lambda c: c.update(trainer={}), "unknown config key 'trainer'"),
    ],
)
def test_bad_config_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], edit, needle: str) -> None:
    config = _llm_config()
    edit(config)
    path = _write(tmp_path / "bad.yaml", config)
    code, out, err = _run(capsys, "train", str(path), "--out", str(tmp_path / "run"))
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("vermeil train: error:") and needle in line, line
    assert not (tmp_path / "run").exists()  # nothing written for a config that does not load


def test_bad_override_and_yaml_and_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(CONFIGS / "llm-tiny.yaml")
    code, _, err = _run(capsys, "train", cfg, "model.n_hedas=4", "--out", str(tmp_path / "r"))
    assert code == 2 and "did you mean 'n_heads'" in _one_error_line(err)
    code, _, err = _run(capsys, "info", cfg, "train.lr")
    assert code == 2 and "malformed override 'train.lr'" in _one_error_line(err)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {family: llm\ntrain: [")
    code, _, err = _run(capsys, "train", str(broken))
    assert code == 2 and "malformed YAML" in _one_error_line(err)
    code, _, err = _run(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml does not exist" in _one_error_line(err)
    code, _, err = _run(capsys, "generate", str(tmp_path), "--prompt", "x")
    assert code == 2 and "holds no checkpoint" in _one_error_line(err)
    code, _, err = _run(capsys, "generate", str(tmp_path / "absent"), "--prompt", "x")
    assert code == 2 and "does not exist" in _one_error_line(err)


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        main(["train", str(tmp_path / "nope.yaml"), "--debug"])


def test_python_m_vermeil_subprocess(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.yaml", _llm_config(dim=100, n_heads=3, n_kv_heads=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vermeil", "train", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert _one_error_line(proc.stderr).startswith("vermeil train: error:")
    assert "dim=100 must be divisible by n_heads=3" in proc.stderr


def test_info_prints_params_flops_cache(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "info", str(CONFIGS / "llm-tiny.yaml"), "--context", "512")
    assert code == 0
    assert "parameters" in out and "FLOPs/token" in out and "context 512" in out and "cache" in out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("vermeil.models.hybrid")
    root = tmp_path_factory.mktemp("cli")
    cfg = _write(root / "tiny.yaml", TINY_HYBRID)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(cfg), "--out", str(root / "run")]) == 0
    finally:
        torch.set_num_threads(n)
    return root / "run"


def test_train_writes_a_run(trained_run: Path) -> None:
    assert latest_checkpoint(trained_run).name == "step_000006"
    rows = read_metrics(trained_run / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["split"] == "val"] == [3, 6]
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert saved["model"]["family"] == "hybrid" and saved["model"]["vocab_size"] == 256
    assert saved["train"]["out_dir"] == str(trained_run)


def test_generate_prints_text(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "generate", str(trained_run), "--prompt", "def ", "--max-new-tokens", "12")
    assert code == 0
    assert out.startswith("def ") and len(out.rstrip("\n")) > len("def ")
    code, again, _ = _run(capsys, "generate", str(trained_run), "--prompt", "def ", "--max-new-tokens", "12")
    assert again == out  # seeded sampling


def test_existing_run_needs_resume(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write(tmp_path / "tiny.yaml", TINY_HYBRID)
    code, _, err = _run(capsys, "train", str(cfg), "--out", str(trained_run))
    assert code == 2 and "--resume" in _one_error_line(err)


def test_resume_continues(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    code, out, _ = _run(capsys, "train", "--resume", str(copy), "train.steps=8")
    assert code == 0 and "done: step 8" in out
    steps = [r["step"] for r in read_metrics(copy / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_compare_prints_runs_side_by_side(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "compare", str(trained_run), str(trained_run))
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3 and "val_accuracy" in lines[0] and "hybrid" in lines[1]


def test_convert_to_transformers_matches_logits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    from vermeil.cli import _load_trained

    cfg = _write(
        tmp_path / "llama.yaml",
        {
            "model": {
                "family": "llm",
                "dim": 32,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "hidden_dim": 40,
                "multiple_of": 8,
                "rope_theta": 10000.0,
            },
            "data": {"task": "text", "max_bytes": 20000},
            "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_batches": 1, "plot": False},
        },
    )
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0
    code, out, _ = _run(capsys, "convert", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert code == 0 and "LlamaForCausalLM" in out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _, ours, _ = _load_trained(tmp_path / "run")
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits.float(), ours(tokens).logits, rtol=1e-4, atol=1e-4)


def test_sample_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("vermeil.models.flow_job")
    pytest.importorskip("matplotlib")
    cfg = _write(
        tmp_path / "flux.yaml",
        {
            "model": {
                "family": "flux",
                "hidden_size": 32,
                "num_heads": 2,
                "depth": 1,
                "depth_single_blocks": 1,
            },
            "data": {"task": "flow", "length": 8, "eval_samples": 4, "sample_steps": 3},
            "train": {"steps": 3, "batch_size": 8, "eval_batches": 1, "warmup": 1},
        },
    )
    code, out, _ = _run(capsys, "train", str(cfg), "--out", str(tmp_path / "run"))
    assert code == 0 and "val_distance" in out
    assert (tmp_path / "run" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = tmp_path / "more.png"
    code, out, _ = _run(capsys, "sample", str(tmp_path / "run"), "--steps", "2", "--out", str(png))
    assert code == 0 and str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = _run(capsys, "sample", str(tmp_path / "run"), "--guidance", "3")
    assert code == 2 and "guidance" in _one_error_line(err)
