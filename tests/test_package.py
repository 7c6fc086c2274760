"""Package-level promises: importing Vermeil is light and has no side effects."""

import os
import subprocess
import sys
import textwrap

import vermeil

OPTIONAL = (
    "yaml",
    "safetensors",
    "tqdm",
    "matplotlib",
    "transformers",
    "diffusers",
    "einops",
    "x_transformers",
)


def _run(code: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_core_imports_only_torch(tmp_path):
    code = f"""
        import sys, pkgutil, importlib
        import torch  # torch itself may import some of these (tqdm) when they are installed
        before = set(sys.modules)
        import vermeil, vermeil.nn, vermeil.generation
        for info in pkgutil.iter_modules(vermeil.nn.__path__):
            importlib.import_module("vermeil.nn." + info.name)
        loaded = sorted(m for m in {OPTIONAL!r} if m in set(sys.modules) - before)
        print("LOADED", loaded)
    """
    result = _run(code, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout


def test_import_creates_no_files(tmp_path):
    result = _run("import vermeil, vermeil.nn", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path) == []


def test_version():
    assert isinstance(vermeil.__version__, str) and vermeil.__version__.count(".") == 2
