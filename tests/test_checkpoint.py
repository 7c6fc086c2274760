"""Tests for vermeil/checkpoint.py: safetensors weights (tied, strict), atomic writes, weights_only loading."""

from __future__ import annotations

import os
import pickle
import signal

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vermeil.checkpoint import (
    atomic_write,
    clean_temp_files,
    load_torch,
    load_weights,
    read_metadata,
    read_weights,
    save_torch,
    save_weights,
)

safetensors = pytest.importorskip("safetensors")
st_torch = pytest.importorskip("safetensors.torch")


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 7, tie: bool = True) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("scale", torch.randn(dim))
        if tie:
            self.output.weight = self.tok_embeddings.weight


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_close(sa[k], sb[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_round_trip_tied_weights(tmp_path) -> None:
    src = TinyLM()
    path = tmp_path / "model.safetensors"
    save_weights(src, path, metadata={"step": "12"})
    with safetensors.safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
    assert stored == {"tok_embeddings.weight", "norm.weight", "norm.bias", "scale"}  # tied head stored once
    assert read_metadata(path) == {"format": "pt", "step": "12"}

    dst = TinyLM()
    assert not torch.equal(dst.tok_embeddings.weight, src.tok_embeddings.weight)
    result = load_weights(dst, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_same_state(src, dst)
    assert dst.output.weight is dst.tok_embeddings.weight  # the tie survives loading

    untied = TinyLM(tie=False)  # an untied model gets both names from the alias table
    load_weights(untied, path)
    _assert_same_state(src, untied)
    tensors = read_weights(path)
    assert tensors["output.weight"].data_ptr() == tensors["tok_embeddings.weight"].data_ptr()


def test_views_and_non_contiguous_tensors(tmp_path) -> None:
    fused = torch.randn(6, 5)
    state = {"q": fused[:3], "k": fused[3:], "t": torch.randn(5, 4).t(), "same": fused}
    path = tmp_path / "w.safetensors"
    save_weights(state, path)
    loaded = read_weights(path)
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert_close(loaded[k], v, rtol=0, atol=0)


def test_strict_mismatch_names_the_keys(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    state = TinyLM().state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["norm.bias"]
    save_weights(state, path)
    with pytest.raises(ValueError) as e:
        load_weights(TinyLM(), path)
    msg = str(e.value)
    assert "missing keys (in the model, not in the file): ['norm.bias']" in msg
    assert "unexpected keys (in the file, not in the model): ['extra.weight']" in msg

    model = TinyLM()
    result = load_weights(model, path, strict=False)
    assert result.missing_keys == ["norm.bias"] and result.unexpected_keys == ["extra.weight"]
    assert_close(model.norm.weight, state["norm.weight"], rtol=0, atol=0)

    save_weights(TinyLM(vocab=12), path)
    with pytest.raises(RuntimeError, match="size mismatch for tok_embeddings.weight"):
        load_weights(TinyLM(), path)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights(TinyLM(), tmp_path / "nope.safetensors")


def test_metadata_must_be_strings(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"'step': 3 \(int\)"):
        save_weights(TinyLM(), tmp_path / "m.safetensors", metadata={"step": 3})
    assert list(tmp_path.iterdir()) == []


def _partial_then_fail(n_bytes: int = 64):
    def writer(*args, **kwargs):
        target = args[1]
        if hasattr(target, "write"):
            target.write(b"\x00" * n_bytes)
            target.flush()
        else:
            with open(target, "wb") as f:
                f.write(b"\x00" * n_bytes)
        raise OSError("simulated crash mid-write")

    return writer


def test_interrupted_weights_write_keeps_previous_file(tmp_path, monkeypatch) -> None:
    old = TinyLM()
    path = tmp_path / "model.safetensors"
    save_weights(old, path)
    before = path.read_bytes()
    monkeypatch.setattr(st_torch, "save_file", _partial_then_fail())
    with pytest.raises(OSError, match="simulated crash"):
        save_weights(TinyLM(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file behind
    restored = TinyLM()
    load_weights(restored, path)
    _assert_same_state(old, restored)


def test_interrupted_torch_save_keeps_previous_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "state.pt"
    save_torch({"step": 1, "rng": torch.get_rng_state()}, path)
    monkeypatch.setattr(torch, "save", _partial_then_fail(100_000))
    with pytest.raises(OSError, match="simulated crash"):
        save_torch({"step": 2}, path)
    monkeypatch.undo()
    assert load_torch(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_atomic_write_text_and_interrupt(tmp_path) -> None:
    path = tmp_path / "runs" / "metrics.txt"  # the folder is created
    with atomic_write(path, "w") as f:
        f.write("naïve 1\n")
    assert path.read_text(encoding="utf-8") == "naïve 1\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0o600
    path.chmod(0o640)
    with atomic_write(path, "w") as f:
        f.write("naïve 1\n")
    assert path.stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode
    with pytest.raises(KeyboardInterrupt), atomic_write(path, "w") as f:
        f.write("half")
        raise KeyboardInterrupt
    assert path.read_text(encoding="utf-8") == "naïve 1\n"
    assert os.listdir(path.parent) == ["metrics.txt"]
    with pytest.raises(ValueError, match="mode='a'"), atomic_write(path, "a"):
        pass


def test_save_load_torch_plain_state(tmp_path) -> None:
    gen = torch.Generator().manual_seed(3)
    state = {
        "step": 5,
        "lr": 0.5,
        "name": "x",
        "opt": {"m": torch.randn(3)},
        "gen": gen.get_state(),
        "l": [1, 2],
    }
    save_torch(state, tmp_path / "s.pt")
    got = load_torch(tmp_path / "s.pt")
    assert got["step"] == 5 and got["lr"] == 0.5 and got["name"] == "x" and got["l"] == [1, 2]
    assert_close(got["opt"]["m"], state["opt"]["m"], rtol=0, atol=0)
    assert torch.equal(got["gen"], state["gen"])


class Payload:
    """A pickle that would create a marker file when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Custom:
    pass


def test_load_torch_refuses_custom_classes(tmp_path, monkeypatch) -> None:
    path = tmp_path / "evil.pt"
    marker = tmp_path / "executed"
    torch.save({"x": Payload(str(marker))}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # must not turn the safety off
    with pytest.raises(pickle.UnpicklingError):
        load_torch(path)
    assert not marker.exists()
    torch.save({"c": Custom()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_torch(path)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path) -> None:
    old = TinyLM()
    path = tmp_path / "model.safetensors"
    save_weights(old, path)
    pid = os.fork()
    if pid == 0:  # child: start writing, then die without any cleanup
        try:
            with atomic_write(path, "wb") as f:
                f.write(b"\x00" * 1000)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1  # a killed process cannot remove its temp file...
    restored = TinyLM()
    load_weights(restored, path)  # ...but the previous checkpoint is intact
    _assert_same_state(old, restored)
    (tmp_path / "notes.tmp").write_text("mine")
    assert clean_temp_files(tmp_path) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "notes.tmp"]


def test_safetensors_is_optional(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install vermeil\[train\]"):
        save_weights(TinyLM(), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    save_torch({"a": 1}, tmp_path / "s.pt")  # plain state needs only torch
    assert load_torch(tmp_path / "s.pt") == {"a": 1}


def test_load_torch_errors_name_the_file_and_never_suggest_unsafe_loading(tmp_path) -> None:
    path = tmp_path / "state.pt"
    torch.save({"c": Custom()}, path)
    with pytest.raises(ValueError) as info:
        load_torch(path)
    message = str(info.value)
    assert str(path) in message and "weights_only" not in message and len(message.splitlines()) == 1
    save_torch({"step": 1}, path)
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=f"{path}.*damaged"):
        load_torch(path)


def test_disk_full_keeps_the_errno_and_names_the_file(tmp_path) -> None:
    """A write past the file-size limit fails like a full disk; torch.save alone would say only
    'enforce fail at inline_container.cc'."""
    script = f"""
import errno, resource, signal, torch
from vermeil.checkpoint import save_torch, save_weights
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
for fn, name in ((save_torch, "state.pt"), (save_weights, "model.safetensors")):
    try:
        fn({{"w": torch.zeros(100000)}}, {str(tmp_path)!r} + "/" + name)
    except OSError as e:
        assert e.errno == errno.EFBIG and name in str(e) and "inline_container" not in str(e), e
        print("ok", name)
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["ok", "state.pt", "ok", "model.safetensors"], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left behind
