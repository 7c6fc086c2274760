"""Smoke test of bench/gpu.py: `--tiny` runs end to end on the CPU and writes its JSON (no time is asserted)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_tiny(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`bench/gpu.py --tiny ARGS --json OUT` in a fresh process (Triton's interpreter where there is no GPU);
    asserts it exits 0."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # the Triton rows run in Triton's interpreter on CPU tensors
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_gpu_bench_tiny_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = run_tiny(out)
    assert "| group | row | time | figures |" in proc.stdout  # the table is printed last
    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["torch"] == torch.__version__
    assert report["checks"] and all(c["ok"] for c in report["checks"]), report["checks"]
    rows = report["rows"]
    assert {r["group"] for r in rows} >= {
        "ceiling",
        "stack",
        "scan",
        "conv",
        "decode",
        "anchors",
        "llm",
        "train",
        "flex",
        "moe",
        "flux",
        "recipes",
    }
    for row in rows:
        assert row["status"] == "ok" or row["status"].startswith("skipped: "), row
        assert "error" not in row["status"], row  # a row may be skipped for a reason, never crash
        if row["status"] == "ok" and row["ms"] is not None:
            assert row["ms"] > 0, row
    ran = {r["group"] for r in rows if r["status"] == "ok"}
    timed = {"ceiling", "stack", "scan", "conv", "decode", "llm", "train", "flex", "moe", "flux", "recipes"}
    assert timed <= ran, timed - ran
    # decoding is checked token for token on every cached model
    names = " ".join(c["name"] for c in report["checks"])
    for model in ("LLM", "MambaLM", "HybridModel"):
        assert f"{model}: " in names
    # the transformer rows check before they time: decode tokens, flex vs dense masks, MoE vs the loop
    for check in ("LLM tiny: static-buffer", "flex chunk", "flex window", "MoE backend='grouped'"):
        assert check in names, check
    # the compiled train variants (regional compilation) ran, on Dynamo's eager backend here
    train = [r["name"] for r in rows if r["group"] == "train" and r["status"] == "ok"]
    assert any("regional compile" in n for n in train), train
    # every recipe config trained its 2 steps
    configs = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    recipe_checks = [c for c in report["checks"] if c["name"].startswith("recipe ")]
    assert len(recipe_checks) == len(configs) and all(c["ok"] for c in recipe_checks), recipe_checks


def test_gpu_bench_rejects_an_unknown_group() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--only", "stack,nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown group(s) ['nope']" in proc.stderr


def test_gpu_bench_tiny_checks_and_sweeps_both_scan_layouts(tmp_path: Path) -> None:
    """The Triton scan's "channel" layout is checked against the reference and timed beside the default one,
    and the sweep times each configuration and names the best (Triton's interpreter on the CPU)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip(
            "triton is not installed: these rows are skipped with a reason (the test above covers that)"
        )
    out = tmp_path / "gpu.json"
    run_tiny(out, "--only", "check,scan,sweep")
    report = json.loads(out.read_text())
    checks = [c["name"] for c in report["checks"] if c["ok"]]
    assert any("scan triton layout=channel" in c for c in checks), checks
    assert any("atomic_bc=False" in c for c in checks), checks
    ok = [r["name"] for r in report["rows"] if r["status"] == "ok"]
    assert any("layout=channel" in n and n.endswith("fwd+bwd") for n in ok if "scan B" in n), ok
    sweep = [r for r in report["rows"] if r["group"] == "sweep"]
    assert any(r["name"].startswith("best fwd+bwd: ") and r["status"] == "ok" for r in sweep), sweep
    assert any(r["name"].startswith("time-major inputs") and r["status"] == "ok" for r in sweep), sweep


def test_gpu_bench_datasheet_bandwidth_follows_the_device_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan rows' "of_datasheet" divides by the card's own HBM bandwidth, not the H200's on every card."""
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.datasheet_gbs("NVIDIA H200") == 4800.0
    assert bench.datasheet_gbs("NVIDIA H100 80GB HBM3") == 3350.0  # SXM
    assert bench.datasheet_gbs("NVIDIA H100 NVL") == 3900.0
    assert bench.datasheet_gbs("NVIDIA H100 PCIe") == 2000.0
    assert bench.datasheet_gbs("NVIDIA A100-SXM4-80GB") is None  # unknown: the ratio is left out
