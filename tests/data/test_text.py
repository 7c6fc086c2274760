"""Tests for vermeil/data/text.py: local corpora, the hash split, the fingerprint and window sampling."""

from __future__ import annotations

import shutil

import pytest
import torch

from vermeil.data.text import (
    WindowSampler,
    find_corpus_files,
    is_validation_file,
    load_text_corpus,
    sample_windows,
    sequential_windows,
    stdlib_dir,
)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "corpus"
    for i in range(40):
        sub = root / f"pkg{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i:02d}.py").write_text(f"# module {i}\n" + "x = 1\n" * (i + 1))
    (root / "tests").mkdir()
    (root / "tests" / "test_a.py").write_text("assert True\n")
    (root / "notes.txt").write_text("not python\n")
    return root


def test_stdlib_found_without_tests() -> None:
    root = stdlib_dir()
    assert (root / "os.py").is_file()
    files = find_corpus_files()
    names = {f.name for f in files}
    assert {"os.py", "json/__init__.py"} <= names
    assert [f.name for f in files] == sorted(names)
    for bad in ("test", "tests", "idle_test", "site-packages"):
        assert not any(bad in f.name.split("/")[:-1] for f in files), bad
    val = [n for n in names if is_validation_file(n)]
    assert 0.04 < len(val) / len(names) < 0.2  # about 10 %


def test_stdlib_corpus_with_byte_cap() -> None:
    corpus = load_text_corpus(max_bytes=20_000)
    assert corpus.train.dtype == torch.uint8 and corpus.train.dim() == 1
    assert corpus.train.numel() == 18_000 and corpus.val.numel() == 2_000
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert len(corpus.fingerprint) == 64
    text = bytes(corpus.train[:4000].tolist()).decode("utf-8", errors="replace")
    assert "import" in text or "def " in text


def test_deterministic_split_without_overlap(tree, tmp_path) -> None:
    a = load_text_corpus([tree])
    b = load_text_corpus([tree])
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and a.fingerprint == b.fingerprint
    all_names = {f"pkg{i % 4}/mod{i:02d}.py" for i in range(40)}
    assert set(a.train_files) | set(a.val_files) == all_names  # tests/ and .txt excluded
    assert not set(a.train_files) & set(a.val_files)
    assert a.val_files and a.train_files
    assert set(a.val_files) == {n for n in all_names if is_validation_file(n)}
    total = sum(len((tree / n).read_bytes()) for n in all_names)
    assert a.train.numel() + a.val.numel() == total

    moved = tmp_path / "elsewhere" / "copy"  # the split depends on relative names only
    shutil.copytree(tree, moved)
    c = load_text_corpus([moved])
    assert c.val_files == a.val_files and c.fingerprint == a.fingerprint

    (tree / "pkg0" / "mod00.py").write_text("changed size\n")
    assert load_text_corpus([tree]).fingerprint != a.fingerprint


def test_single_file_split_and_errors(tmp_path) -> None:
    f = tmp_path / "book.txt"
    f.write_bytes(bytes(range(100)))
    corpus = load_text_corpus([f])
    assert corpus.train.tolist() == list(range(90)) and corpus.val.tolist() == list(range(90, 100))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_corpus([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no corpus files with suffix \['.py'\]"):
        load_text_corpus([tmp_path / "empty"])
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        load_text_corpus([f], val_fraction=1.5)


def test_windows_reproducible_and_shifted() -> None:
    data = torch.arange(1000)
    x, y = sample_windows(data, 4, 9, torch.Generator().manual_seed(0))
    x2, y2 = sample_windows(data, 4, 9, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == y.shape == (4, 9) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # each window is a contiguous slice; targets are the next tokens
    x3, _ = sample_windows(data, 4, 9, torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)
    assert sample_windows(torch.arange(256, dtype=torch.uint8), 2, 5)[0].dtype == torch.long
    with pytest.raises(ValueError, match="fewer than seq_len \\+ 1 = 11"):
        sample_windows(torch.arange(10), 1, 10)


def test_window_sampler_resumes() -> None:
    data = torch.arange(500)
    s = WindowSampler(data, batch_size=3, seq_len=7, seed=5)
    next(s)
    state = s.state_dict()
    expected = [next(s) for _ in range(2)]
    r = WindowSampler(data, batch_size=3, seq_len=7, seed=123)
    r.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, [next(r) for _ in range(2)]):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)


def test_sequential_windows_cover_data_in_order() -> None:
    data = torch.arange(50)
    batches = list(sequential_windows(data, batch_size=3, seq_len=7))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert xs.shape == (7, 7)  # (50 - 1) // 7 windows
    assert torch.equal(xs.flatten(), torch.arange(49)) and torch.equal(ys, xs + 1)
    assert [x.shape[0] for x, _ in batches] == [3, 3, 1]
    assert len(list(sequential_windows(data, 3, 7, max_batches=2))) == 2


def test_a_file_reached_twice_is_read_once_and_same_names_are_refused(tmp_path) -> None:
    """A folder and a file inside it both read the file, under two names that the hash could split into train and
    validation (the same bytes on both sides); two folders holding the same relative name kept only the first's
    file and dropped the other's silently."""
    root = tmp_path / "c"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "m.py").write_text("y = 2\n" * 10)
    (root / "n.py").write_text("z = 3\n")
    assert [f.name for f in find_corpus_files([root, root / "sub" / "m.py"])] == ["n.py", "sub/m.py"]
    assert [f.name for f in find_corpus_files([root / "sub" / "m.py", root])] == ["m.py", "n.py"]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "util.py").write_text(f"print({name!r})\n")
    with pytest.raises(ValueError, match=r"a/util.py and .*b/util.py have the same name 'util.py'"):
        find_corpus_files([tmp_path / "a", tmp_path / "b"])


def test_suffixes_may_be_one_string(tree) -> None:
    """suffixes=".txt" was taken character by character: every file ending in '.', 't' or 'x'."""
    (tree / "script.rst").write_text("not text\n")
    assert [f.name for f in find_corpus_files([tree], suffixes=".txt")] == ["notes.txt"]


def test_window_arguments_are_checked() -> None:
    """A float batch_size or seq_len reached torch.randint (an unreadable TypeError), float data was truncated to
    token ids silently, and a negative max_batches gave no validation batch at all (a NaN loss)."""
    data = torch.arange(100)
    for kwargs, match in (
        ({"batch_size": 2.0, "seq_len": 5}, r"batch_size=2.0 must be a positive int"),
        ({"batch_size": True, "seq_len": 5}, r"batch_size=True must be a positive int"),
        ({"batch_size": 2, "seq_len": 5.0}, r"seq_len=5.0 must be a positive int"),
        ({"batch_size": 2, "seq_len": 0}, r"seq_len=0 must be a positive int"),
    ):
        with pytest.raises(ValueError, match=match):
            sample_windows(data, **kwargs)
        with pytest.raises(ValueError, match=match):
            sequential_windows(data, **kwargs)  # at the call, not at the first batch
    with pytest.raises(ValueError, match=r"integer token ids .* got dtype torch.float32"):
        sample_windows(torch.rand(100), 2, 5)
    with pytest.raises(ValueError, match=r"max_batches=-1 must be a positive int or None"):
        sequential_windows(data, 2, 5, max_batches=-1)


def test_both_sides_keep_a_byte_at_an_extreme_val_fraction(tmp_path) -> None:
    """val_fraction=0.97 of a 10-byte file, or of max_bytes=10, rounded validation up to all 10 bytes and left
    train empty; a string val_fraction raised "'<' not supported"."""
    f = tmp_path / "book.txt"
    f.write_bytes(b"abcdefghij")
    corpus = load_text_corpus([f], val_fraction=0.97)
    assert corpus.train.tolist() == [ord("a")] and bytes(corpus.val.tolist()) == b"bcdefghij"
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_bytes(b"x" * 20)
    capped = load_text_corpus([tmp_path], max_bytes=10, val_fraction=0.97)
    assert (capped.train.numel(), capped.val.numel()) == (1, 9)
    with pytest.raises(ValueError, match=r"val_fraction='0.1' must be a number in \(0, 1\)"):
        load_text_corpus([f], val_fraction="0.1")
