"""Text corpora from local files, by default the Python standard library's own source; random training windows.

The default corpus (the stdlib's `.py` files outside `EXCLUDED_DIRS`, about 12 MB on CPython 3.11) is on any
install and changes with the Python version, so a run records `corpus.fingerprint`. Files are split into train and
validation by a hash of their relative path: the same split on every machine, no file in both.
Axis legend: B batch, T window length, N corpus bytes.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from vermeil.data.sampler import SeededSampler
from vermeil.nn.checks import check_optional_positive_int, check_positive_ints

__all__ = [
    "EXCLUDED_DIRS",
    "CorpusFile",
    "TextCorpus",
    "WindowSampler",
    "corpus_fingerprint",
    "find_corpus_files",
    "is_validation_file",
    "load_text_corpus",
    "sample_windows",
    "sequential_windows",
    "stdlib_dir",
]

# Test suites are absent from many installs (Docker images, Debian's split packages): never rely on them.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus: `name` is its path relative to the folder it was found in (POSIX separators)."""

    path: Path
    name: str
    size: int


@dataclass(frozen=True)
class TextCorpus:
    """A corpus as two flat byte tensors (uint8, all files concatenated in name order)."""

    train: Tensor  # (N_train,) uint8
    val: Tensor  # (N_val,) uint8
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    fingerprint: str  # corpus_fingerprint of every file found (before any byte cap)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def find_corpus_files(
    paths: Sequence[str | os.PathLike[str]] | None = None,
    *,
    suffixes: Sequence[str] = (".py",),
    exclude_dirs: frozenset[str] | set[str] = EXCLUDED_DIRS,
) -> list[CorpusFile]:
    """Files of a corpus, sorted by name; raises FileNotFoundError for a missing path, ValueError if none found.

    `paths` (default: the standard library): a named file is always taken; a folder is searched recursively for
    files ending in one of `suffixes`, skipping folders named in `exclude_dirs` (and symlinked folders). A file
    reached twice (a folder and a file in it) is taken once, under its first name; two different files with the
    same name (the split's key) raise ValueError.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(suffixes, str):  # one suffix, not its characters
        suffixes = [suffixes]
    roots = [stdlib_dir()] if paths is None else [Path(p) for p in paths]
    found: dict[str, CorpusFile] = {}
    seen: set[str] = set()  # real paths taken

    def add(path: Path, name: str) -> None:
        real = os.path.realpath(path)
        if real in seen:
            return
        if name in found:
            raise ValueError(
                f"corpus files {os.fspath(found[name].path)} and {os.fspath(path)} have the same name {name!r} "
                "(relative to the paths given), which decides the train/validation split: pass a common parent folder"
            )
        seen.add(real)
        found[name] = CorpusFile(path, name, path.stat().st_size)

    for root in roots:
        if root.is_file():
            add(root, root.name)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"corpus path {os.fspath(root)} does not exist")
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(
                d for d in dirs if d not in exclude_dirs
            )  # prune: never descend into test/ (118 MB)
            for fname in sorted(files):
                if not fname.endswith(tuple(suffixes)):
                    continue
                path = Path(folder, fname)
                if not path.is_file():  # broken symlink
                    continue
                add(path, path.relative_to(root).as_posix())
    if not found:
        where = [os.fspath(r) for r in roots]
        raise ValueError(f"no corpus files with suffix {list(suffixes)} found under {where}")
    return [found[k] for k in sorted(found)]


def corpus_fingerprint(files: Sequence[CorpusFile]) -> str:
    """sha256 (hex) of the sorted names and sizes: changes when any file is added, removed or resized."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f"{f.name}\0{f.size}\n".encode())
    return h.hexdigest()


def _hash_fraction(name: str) -> float:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_validation_file(name: str, val_fraction: float = 0.1) -> bool:
    """Whether the file with relative name `name` belongs to validation (a fixed hash of the name, not random)."""
    return _hash_fraction(name) < val_fraction


def _read(files: Sequence[CorpusFile], cap: int | None) -> tuple[Tensor, tuple[str, ...]]:
    chunks, names, total = [], [], 0
    for f in files:
        if cap is not None and total >= cap:
            break
        data = f.path.read_bytes()
        if cap is not None:
            data = data[: cap - total]
        chunks.append(data)
        names.append(f.name)
        total += len(data)
    buf = bytearray(b"".join(chunks))  # frombuffer refuses an empty buffer
    data = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    return data, tuple(names)


def load_text_corpus(
    paths: Sequence[str | os.PathLike[str]] | None = None,
    *,
    val_fraction: float = 0.1,
    max_bytes: int | None = None,
    suffixes: Sequence[str] = (".py",),
) -> TextCorpus:
    """Load a corpus and split it into train and validation bytes.

    Args:
        paths, suffixes: see `find_corpus_files`.
        val_fraction: share of files (by name hash) held out for validation, in (0, 1).
        max_bytes: cap on the bytes read, for quick runs: train gets `(1 - val_fraction) * max_bytes`, validation
            the rest, both taken from the first files in name order (the last one cut).

    With a single file, the split is by position: the last `val_fraction` of its bytes is validation. With several
    files, when the hash puts every file on one side, the file with the lowest (highest) hash moves over so that
    both sides are non-empty.
    """
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0 < val_fraction < 1
    ):
        raise ValueError(f"val_fraction={val_fraction!r} must be a number in (0, 1)")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 2):
        raise ValueError(f"max_bytes={max_bytes!r} must be None or an int >= 2")
    files = find_corpus_files(paths, suffixes=suffixes)
    fingerprint = corpus_fingerprint(files)
    # Each side keeps at least one byte: a val_fraction near 0 or 1 never rounds one side away.
    val_cap = None if max_bytes is None else min(max_bytes - 1, max(1, round(max_bytes * val_fraction)))
    train_cap = None if max_bytes is None else max_bytes - val_cap

    if len(files) == 1:
        data, names = _read(files, None)
        n_val = min(len(data) - 1, max(1, round(len(data) * val_fraction)))
        cut = len(data) - n_val if len(data) > 1 else len(data)
        train, val = data[:cut][:train_cap], data[cut:][:val_cap]  # a cap of None slices nothing off
        return TextCorpus(train.clone(), val.clone(), names, names, fingerprint)

    ranked = sorted(files, key=lambda f: _hash_fraction(f.name))
    val_names = {f.name for f in files if is_validation_file(f.name, val_fraction)} or {ranked[0].name}
    if len(val_names) == len(files):
        val_names.discard(ranked[-1].name)
    train, train_names = _read([f for f in files if f.name not in val_names], train_cap)
    val, val_names_read = _read([f for f in files if f.name in val_names], val_cap)
    return TextCorpus(train, val, train_names, val_names_read, fingerprint)


def _check_window(data: Tensor, batch_size: int, seq_len: int) -> None:
    if not isinstance(data, Tensor) or data.dim() != 1:
        got = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be a 1-D token tensor, got {got}")
    if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
        raise ValueError(f"data must hold integer token ids (uint8 bytes or int64), got dtype {data.dtype}")
    check_positive_ints(batch_size=batch_size, seq_len=seq_len)
    if data.numel() < seq_len + 1:
        raise ValueError(f"data has {data.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")


def sample_windows(
    data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random windows of `seq_len + 1` tokens of data (N,) (uint8 bytes or int64 ids), split into inputs and
    next-token targets: (B, T) int64 each, `targets[:, t] == inputs[:, t + 1]`."""
    _check_window(data, batch_size, seq_len)
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T + 1)
    windows = data[idx].long()
    return windows[:, :-1], windows[:, 1:]


def sequential_windows(
    data: Tensor, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Non-overlapping windows covering `data` in order (a deterministic validation loss): (inputs, targets) of
    shape (b, T), b <= B (the last batch may be smaller); the tail shorter than one window is dropped.
    The arguments are checked at the call, not at the first batch."""
    _check_window(data, batch_size, seq_len)
    check_optional_positive_int("max_batches", max_batches)
    return _sequential_windows(data, batch_size, seq_len, max_batches)


def _sequential_windows(
    data: Tensor, batch_size: int, seq_len: int, max_batches: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    n_windows = (data.numel() - 1) // seq_len
    for i, start in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        rows = torch.arange(start, min(start + batch_size, n_windows)) * seq_len
        idx = rows[:, None] + torch.arange(seq_len + 1)
        windows = data[idx].long()
        yield windows[:, :-1], windows[:, 1:]


class WindowSampler(SeededSampler):
    """The `SeededSampler` of `sample_windows`: endless random (inputs, targets) windows of `data`.

    Example:
        >>> sampler = WindowSampler(corpus.train, batch_size=8, seq_len=256, seed=0)
        >>> x, y = next(sampler)                       # (8, 256) each
        >>> state = sampler.state_dict()               # saved with the checkpoint
    """

    def __init__(self, data: Tensor, batch_size: int, seq_len: int, seed: int = 0) -> None:
        _check_window(data, batch_size, seq_len)
        self.data, self.seq_len = data, seq_len
        super().__init__(partial(sample_windows, data), batch_size, seed, seq_len=seq_len)
