"""Weights and training state on disk: safetensors for weights, `torch.save` for plain state, every write atomic.

Every file is written to a temporary file beside it, fsync'ed, then moved over the destination with
`os.replace`, so a crash mid-write leaves the previous file intact (`torch.save` alone rewrites in place).
Tied weights are stored once, the other names recorded as aliases in the file's metadata. safetensors is an
optional extra (`pip install vermeil[train]`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "LoadResult",
    "UnsafePickleError",
    "atomic_path",
    "atomic_write",
    "clean_temp_files",
    "load_torch",
    "load_weights",
    "read_metadata",
    "read_weights",
    "refusal_text",
    "save_torch",
    "save_weights",
]

# Metadata key holding {alias: stored name} for tensors that shared storage with another one at save time.
ALIASES_KEY = "vermeil.aliases"
_MAX_NAMES = 25  # keys listed in an error message before "... and N more"


def _safetensors() -> Any:
    try:
        import safetensors
        import safetensors.torch
    except ImportError as e:
        raise ImportError(
            "saving and loading weights needs safetensors: pip install vermeil[train] (or pip install safetensors)"
        ) from e
    return safetensors


def _new_file_mode() -> int:
    # mkstemp creates 0o600 files; give the result the mode a plain open() would have (0o666 minus the umask).
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    return 0o644


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path beside `path` (for writers that take a file name); on success it is fsync'ed and
    moved onto `path`, on any exception removed. An existing file keeps its permission bits."""
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    mode = os.stat(target).st_mode & 0o7777 if os.path.exists(target) else _new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Makes the rename itself durable across power loss; not possible on every OS (Windows), hence best effort.
    with contextlib.suppress(OSError):
        _fsync(directory)


# The names `atomic_path` gives its temporary files: ".{name}.{8 random characters from mkstemp}.tmp".
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def clean_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove (and return) `atomic_path`'s temporary files that killed writes left in `directory`; call it
    when a run starts or resumes."""
    folder = Path(directory)
    removed: list[Path] = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        if p.is_file() and _TEMP_NAME.match(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "wb", *, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a file for writing ("wb", or "w" for text) so that it appears at `path` complete or not at all."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r} must be 'w' (text) or 'wb' (bytes)")
    # The file is closed (flushed) before atomic_path fsyncs and moves it.
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding if mode == "w" else None) as f:
        yield f


class _WriteErrors:
    """A file wrapper that keeps the OSError of a failed write: torch.save reports a failed write as
    "enforce fail at inline_container.cc ... unexpected pos", losing the errno (ENOSPC: the disk is full)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _write_error(code: int | None, path: str | os.PathLike[str]) -> OSError:
    """The OSError of a failed write, naming the destination (and saying "the disk is full" for ENOSPC)."""
    code = code or errno.EIO
    reason = "no space left on device (the disk is full)" if code == errno.ENOSPC else os.strerror(code)
    return OSError(code, f"writing {os.fspath(path)} failed: {reason}", os.fspath(path))


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """`torch.save` of plain state (dicts, lists, tensors, numbers, strings: `load_torch` refuses classes),
    atomically; a failed write raises an OSError with its errno (ENOSPC: the disk is full) naming `path`."""
    with atomic_write(path, "wb") as f:
        w = _WriteErrors(f)
        try:
            torch.save(obj, w)  # type: ignore[arg-type]
        except (OSError, RuntimeError):
            if w.error is None:
                raise
            raise _write_error(w.error.errno, path) from None


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A torch file holds a pickle of something other than tensors and plain containers: refused unread."""


_REFUSED = (
    "holds objects other than tensors and plain containers (a pickle Vermeil did not write): refused, "
    "nothing in it was run"
)


def refusal_text(text: str, subject: str = "it") -> str:
    """`text` cut where torch's refusal of a pickle starts ("Weights only load failed", which goes on to advise
    `weights_only=False`: never, for a file from a run folder), saying instead that `subject` was refused."""
    cut = text.find("Weights only load failed")
    return text if cut < 0 else f"{text[:cut]}{subject} {_REFUSED}"


def load_torch(path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu") -> Any:
    """`torch.load` with an explicit `weights_only=True` (an environment variable cannot turn it off):
    UnsafePickleError for anything but tensors and plain containers, ValueError for a truncated file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no state file at {os.fspath(path)}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False: not shown
        raise UnsafePickleError(f"{os.fspath(path)} {_REFUSED}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{os.fspath(path)} is damaged (not a complete torch file): {first}") from None


def _view_key(t: Tensor) -> tuple[Any, ...]:
    # Two state-dict entries are the same tensor (tied) when they are the same view of the same storage.
    if t.numel() == 0:  # empty tensors may all report data_ptr 0: never treat them as tied
        return ("empty", id(t))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)


def _state_dict(module_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(module_or_state_dict, nn.Module):
        state = module_or_state_dict.state_dict()
    elif isinstance(module_or_state_dict, Mapping):
        state = dict(module_or_state_dict)
    else:
        raise TypeError(f"expected an nn.Module or a state dict, got {type(module_or_state_dict).__name__}")
    for name, t in state.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict keys must be str, got {name!r}")
        if not isinstance(t, Tensor):
            raise TypeError(f"state dict entry {name!r} must be a Tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(f"state dict entry {name!r} is on the meta device: it has no data to save")
    return state


def _dedupe(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Store each tied tensor once; returns (tensors to write, {alias: stored name})."""
    first: dict[tuple[Any, ...], str] = {}  # view -> the first name holding it
    aliases: dict[str, str] = {}
    for name, t in state.items():
        stored = first.setdefault(_view_key(t), name)
        if stored != name:
            aliases[name] = stored
    kept = {name: t.detach() for name, t in state.items() if name not in aliases}
    # Distinct views of one storage (e.g. slices of a fused weight) cannot be stored as views: copy them apart.
    storages = Counter((t.device, t.untyped_storage().data_ptr()) for t in kept.values())
    out = {}
    for name, t in kept.items():
        shared = t.numel() > 0 and storages[(t.device, t.untyped_storage().data_ptr())] > 1
        out[name] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
    return out, aliases


def save_weights(
    module_or_state_dict: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save weights to a safetensors file, atomically; `metadata` adds `str -> str` header entries."""
    st = _safetensors()
    tensors, aliases = _dedupe(_state_dict(module_or_state_dict))
    meta: dict[str, str] = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"metadata must map str to str, got {k!r}: {v!r} ({type(v).__name__}); use str(value)"
            )
        if k == ALIASES_KEY:
            raise ValueError(f"metadata key {ALIASES_KEY!r} is reserved for tied-weight aliases")
        meta[k] = v
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    with atomic_path(path) as tmp:
        try:
            st.torch.save_file(tensors, tmp, metadata=meta)
        except st.SafetensorError as e:
            found = re.search(r"os error (\d+)", str(e))
            if found is None:
                raise
            raise _write_error(int(found.group(1)), path) from None


def read_weights(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Tensor]:
    """All tensors of a safetensors file as a dict, tied names restored (they share memory)."""
    st = _safetensors()
    if not Path(path).is_file():
        raise FileNotFoundError(f"no weights file at {os.fspath(path)}")
    try:
        with st.safe_open(os.fspath(path), framework="pt", device=device) as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a Mapping
    except (st.SafetensorError, OSError) as e:
        raise ValueError(f"{os.fspath(path)} is damaged (not a complete safetensors file): {e}") from None
    aliases: dict[str, str] = json.loads(meta.pop(ALIASES_KEY, "{}"))
    # Files from `safetensors.torch.save_model` record a removed tied name as metadata {removed: kept}.
    aliases = {k: v for k, v in meta.items() if k not in tensors and k != "format"} | aliases
    tensors.update({alias: tensors[name] for alias, name in aliases.items() if name in tensors})
    return tensors


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a safetensors file (without the alias table Vermeil adds for tied weights)."""
    st = _safetensors()
    with st.safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
    meta.pop(ALIASES_KEY, None)
    return meta


class LoadResult(NamedTuple):
    """Keys that did not match when loading weights (both empty after a successful strict load)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _names(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _MAX_NAMES} more" if len(keys) > _MAX_NAMES else ""
    return f"{keys[:_MAX_NAMES]}{more}"


def load_weights(
    module: nn.Module, path: str | os.PathLike[str], strict: bool = True, *, assign: bool = False
) -> LoadResult:
    """Load a safetensors file (`save_weights`, or safetensors' `save_file` / `save_model`) into `module`.

    A tied parameter stored under one of its names only is not missing. `strict` raises a ValueError naming
    the missing and unexpected keys; otherwise they are returned, sorted. `assign` loads into a model built on
    the meta device (re-tie after). A shape mismatch raises PyTorch's RuntimeError.
    """
    tensors = read_weights(path)
    own = module.state_dict()
    # A name of the model missing from the file is fine when the model ties it to a name the file holds.
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, t in own.items():
        if t.device.type != "meta":
            groups.setdefault(_view_key(t), []).append(name)
    tied_to = {n: names for names in groups.values() if len(names) > 1 for n in names}
    # Each name of the model -> the file's name it loads from (itself, or a name it is tied to), or None.
    sources = {
        n: n if n in tensors else next((m for m in tied_to.get(n, ()) if m in tensors), None) for n in own
    }
    missing = sorted(n for n, source in sources.items() if source is None)
    unexpected = sorted(n for n in tensors if n not in own)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys (in the model, not in the file): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys (in the file, not in the model): {_names(unexpected)}")
        raise ValueError(
            f"weights in {os.fspath(path)} do not match {type(module).__name__}: " + "; ".join(parts)
        )
    state = {n: tensors[source] for n, source in sources.items() if source is not None}
    module.load_state_dict(state, strict=False, assign=assign)
    return LoadResult(missing, unexpected)
