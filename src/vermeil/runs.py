"""The run folder: where a training run, a conversion or a fine-tuning start keeps its files, and how to read it.

    config.yaml                         the resolved run config (what `vermeil train --resume` rebuilds from)
    metrics.jsonl                       one JSON row per log step and per evaluation (`vermeil.train.metrics`)
    loss.png, samples.png               plots (when matplotlib is installed)
    tokenizer.json                      a converted model's tokenizer (`vermeil convert` copies it; JSON, no code);
                                        it decodes the weights that carry no `tokenizer` record: a trainer's
                                        checkpoints record `tokenizer: bytes` (their data were byte tokens)
    checkpoints/step_000100/            model.safetensors (weights) and state.pt (the training state: optimizer,
                                        scheduler, RNG and data-sampler states, step, the config as a dict);
                                        a distributed run adds dcp/ (`vermeil.distributed.checkpoint`)
    checkpoints/step_000100/manifest.json  the size and sha256 of every file of the folder, and whether a
                                        distributed run wrote it (JSON, written last)
    checkpoints/latest                  the name of the newest complete checkpoint folder (`step_*` only)
    .lock                               held (`fcntl.flock`) by the one trainer writing the folder

A checkpoint folder is complete when it holds both `model.safetensors` and `state.pt`; files are written
atomically (`vermeil.checkpoint`) and `latest` moves only after a folder is complete, so a run killed at any
moment leaves the previous checkpoint loadable.

A run folder is untrusted input (SECURITY.md): nothing in it is unpickled; reading a checkpoint verifies it
against its manifest (folders from before manifests load unverified). Reading a run and writing one without
training (`write_run`, for `vermeil convert`) need no training code; `vermeil.train.Trainer` writes its
checkpoints through this module.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from vermeil.checkpoint import (
    atomic_write,
    clean_temp_files,
    load_torch,
    load_weights,
    save_torch,
    save_weights,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG",
    "DCP",
    "MANIFEST",
    "STATE",
    "TOKENIZER_KEY",
    "WEIGHTS",
    "DamagedCheckpointError",
    "RunLockedError",
    "checkpoint_name",
    "checkpoint_step",
    "clear_run",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "lock_run",
    "point_latest",
    "prune_checkpoints",
    "read_manifest",
    "read_run_config",
    "saved_distributed",
    "verify_checkpoint",
    "write_manifest",
    "write_run",
]

CHECKPOINTS_DIR = "checkpoints"
CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
DCP = "dcp"
MANIFEST = "manifest.json"
_LATEST = "latest"
_LOCK = ".lock"
_STEP_NAME = re.compile(r"step_[0-9]+")  # fullmatch only
# A converted model's tokenizer files (`vermeil.data.tokenizer.TOKENIZER_FILES`; not imported: runs reads no data).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The weights' metadata entry saying what their token ids are: "bytes" (the trainer's record: Vermeil's data are
# bytes). Weights without it read the run folder's tokenizer.json when it has one (`vermeil.data.tokenizer`).
TOKENIZER_KEY = "tokenizer"


class DamagedCheckpointError(ValueError):
    """A checkpoint file does not match its manifest (size or sha256), or cannot be read at all."""


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock (another trainer is writing it)."""


def checkpoint_name(step: int) -> str:
    """The folder name of step `step`: `step_000100`."""
    return f"step_{step:06d}"


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step of a checkpoint folder named `step_000100`."""
    name = Path(path).name
    if not _STEP_NAME.fullmatch(name):
        raise ValueError(f"{os.fspath(path)} is not a checkpoint folder (expected a name like step_000100)")
    return int(name[5:])


def _is_step_folder(p: Path) -> bool:
    return p.is_dir() and _STEP_NAME.fullmatch(p.name) is not None


def _complete(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / STATE).is_file()


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _is_step_folder(p) and _complete(p)), key=checkpoint_step)


def _pointed(run: Path) -> Path | None:
    """The folder `checkpoints/latest` names, when it is a `step_*` name beside it (never a path elsewhere)."""
    pointer = run / CHECKPOINTS_DIR / _LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not _STEP_NAME.fullmatch(name):
        warnings.warn(
            f"{os.fspath(pointer)} names {name!r}, not a checkpoint folder beside it (step_NNNNNN): ignored",
            stacklevel=3,
        )
        return None
    return run / CHECKPOINTS_DIR / name


def latest_checkpoint(run_dir: str | os.PathLike[str], *, verify: bool = True) -> Path:
    """The newest complete and intact checkpoint folder of a run (or `run_dir` itself when it is a checkpoint
    folder).

    With `verify` (the default) each candidate, newest first, is checked against its manifest
    (`verify_checkpoint`); a damaged one is named in a `UserWarning` and the next older one is tried.

    Raises:
        FileNotFoundError: the folder does not exist, is a file, or holds no complete checkpoint.
        DamagedCheckpointError: every checkpoint is damaged (the message names the newest one's bad file).
    """
    run = Path(run_dir)
    if run.is_file():
        raise FileNotFoundError(f"{os.fspath(run)} is a file, not a run folder")
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {os.fspath(run)} does not exist")
    if _complete(run):
        if verify:
            verify_checkpoint(run)
        return run
    candidates = list(reversed(list_checkpoints(run)))
    pointed = _pointed(run)
    if pointed is not None and _complete(pointed):
        candidates = [pointed] + [c for c in candidates if c != pointed]
    if not candidates:
        raise FileNotFoundError(f"{os.fspath(run)} holds no checkpoint (no {CHECKPOINTS_DIR}/step_*/{STATE})")
    if not verify:
        return candidates[0]
    first_error: DamagedCheckpointError | None = None
    for folder in candidates:
        try:
            verify_checkpoint(folder)
        except DamagedCheckpointError as e:
            first_error = first_error or e
            continue
        if first_error is not None:
            warnings.warn(f"{first_error}; using {os.fspath(folder)} instead", stacklevel=2)
        return folder
    assert first_error is not None
    raise DamagedCheckpointError(f"{first_error}; no intact checkpoint left in {os.fspath(run)}")


# --------------------------------------------------------------------------------------------------------------
# manifests: what a checkpoint folder holds, written last


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    # The checkpoint's own files: weights, state and (distributed) dcp/; temporary files are not part of it.
    out = [folder / WEIGHTS, folder / STATE]
    if (folder / DCP).is_dir():
        out += sorted(p for p in (folder / DCP).rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    return [p for p in out if p.is_file()]


def write_manifest(folder: str | os.PathLike[str], *, distributed: bool = False) -> dict[str, Any]:
    """Write `manifest.json` into a complete checkpoint folder: each file's size and sha256, and whether a
    distributed run saved it (the only record the trainer trusts before reading a `dcp/` folder)."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(folder)
    }
    manifest = {"format": 1, "distributed": bool(distributed), "files": files}
    with atomic_write(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    _verified.pop(os.fspath(folder), None)
    return manifest


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a checkpoint folder, or None for a folder written before manifests existed.

    Raises:
        DamagedCheckpointError: the manifest is not the JSON `write_manifest` writes.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DamagedCheckpointError(f"checkpoint file {os.fspath(path)} is damaged: {e}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        raise DamagedCheckpointError(f"checkpoint file {os.fspath(path)} is damaged: not a Vermeil manifest")
    return manifest


def saved_distributed(folder: str | os.PathLike[str]) -> bool:
    """Whether the manifest of a checkpoint folder records that a distributed run wrote it (False without one)."""
    manifest = read_manifest(folder)
    return bool(manifest and manifest.get("distributed") is True)


# Folders verified in this process, by path -> (size, mtime) of each file: reading a run twice hashes it once.
_verified: dict[str, tuple[tuple[str, int, int], ...]] = {}


def verify_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Check every file a checkpoint's manifest lists (size, then sha256); without a manifest, that its state.pt
    and weights are non-empty.

    Raises:
        DamagedCheckpointError: naming the first file that is missing, of the wrong size or with the wrong hash.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        for p in (folder / WEIGHTS, folder / STATE):
            if p.stat().st_size == 0:
                raise DamagedCheckpointError(f"checkpoint file {os.fspath(p)} is damaged: it is empty")
        return
    entries = sorted(manifest["files"].items())
    stamp = []
    for name, _ in entries:
        p = folder / name
        st = p.stat() if p.is_file() else None
        stamp.append((name, st.st_size if st else -1, st.st_mtime_ns if st else -1))
    if _verified.get(os.fspath(folder)) == tuple(stamp):
        return
    for (name, want), (_, size, _) in zip(entries, stamp):
        p = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise DamagedCheckpointError(f"checkpoint file {os.fspath(folder / MANIFEST)} names {name!r}")
        if size < 0:
            raise DamagedCheckpointError(f"checkpoint file {os.fspath(p)} is missing")
        if size != want["size"]:
            raise DamagedCheckpointError(
                f"checkpoint file {os.fspath(p)} is damaged: {size} bytes, its manifest says {want['size']}"
            )
        if _sha256(p) != want["sha256"]:
            raise DamagedCheckpointError(
                f"checkpoint file {os.fspath(p)} is damaged: its sha256 differs from its manifest's"
            )
    _verified[os.fspath(folder)] = tuple(stamp)


def load_model_weights(model: nn.Module, run_dir: str | os.PathLike[str]) -> Path:
    """Load the newest checkpoint's weights of a run into `model` (strict); returns the checkpoint folder."""
    folder = latest_checkpoint(run_dir)
    load_weights(model, folder / WEIGHTS)
    return folder


def read_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run config of a run folder as a plain dict: its config.yaml, else the copy inside its newest
    checkpoint's state.pt.

    Raises:
        FileNotFoundError: no such folder, or neither a config.yaml nor a checkpoint in it.
    """
    from vermeil.config import load_yaml

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {os.fspath(run)} does not exist")
    if (run / CONFIG).is_file():
        return load_yaml(run / CONFIG)
    return dict(load_torch(latest_checkpoint(run) / STATE)["config"])


def point_latest(run_dir: str | os.PathLike[str], folder: Path) -> None:
    """Point `checkpoints/latest` at a complete checkpoint folder (atomically)."""
    with atomic_write(Path(run_dir) / CHECKPOINTS_DIR / _LATEST, "w") as f:
        f.write(folder.name + "\n")


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int, current: Path) -> None:
    """Delete all but the `keep` newest complete checkpoints (and `current`), and folders left incomplete."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    kept = set(list_checkpoints(run_dir)[-keep:]) | {current}
    for old in root.iterdir():
        if _is_step_folder(old) and old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def write_run(run_config: Mapping[str, Any], model: nn.Module, run_dir: str | os.PathLike[str]) -> Path:
    """Write `model` as step 0 of a run folder (config.yaml, checkpoints/step_000000/ with model.safetensors and
    a state.pt holding the step and the config, checkpoints/latest), so that `vermeil generate`, `sample` and
    `train --resume` (fine-tuning from these weights, with a fresh optimizer) read it. Returns the checkpoint
    folder.

    Args:
        run_config: the resolved run config as a plain dict (`RunConfig.to_dict()`).
    """
    from vermeil.config import save_yaml

    run = Path(run_dir)
    folder = run / CHECKPOINTS_DIR / checkpoint_name(0)
    folder.mkdir(parents=True, exist_ok=True)
    clean_temp_files(folder)
    save_yaml(dict(run_config), run / CONFIG)
    save_weights(model, folder / WEIGHTS, metadata={"step": "0"})
    # No optimizer state: a trainer resuming here starts its optimizer, schedule and data afresh.
    save_torch({"step": 0, "config": dict(run_config)}, folder / STATE)  # marks the folder complete
    write_manifest(folder)
    point_latest(run, folder)
    return folder


def clear_run(run_dir: str | os.PathLike[str]) -> None:
    """Remove what a run wrote into a folder (checkpoints, metrics, the plots, the config, a converted model's
    tokenizer files, which would otherwise decode a new model's tokens); other files stay."""
    run = Path(run_dir)
    if (run / CHECKPOINTS_DIR).is_dir():
        shutil.rmtree(run / CHECKPOINTS_DIR)
    for name in ("metrics.jsonl", "loss.png", "samples.png", CONFIG, *TOKENIZER_FILES):
        (run / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# one writer per run folder

# Resolved run folders whose lock this process holds (a trainer inside the CLI's lock re-enters it).
_held: set[str] = set()


@contextlib.contextmanager
def lock_run(run_dir: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Hold the exclusive lock of a run folder (`fcntl.flock` on `RUN/.lock`, which records the holder's pid and
    host) for the duration of the block; re-entrant within one process. Yields {"pid", "host"}.

    The kernel releases a flock when its holder dies (SIGKILL included), so a lock file left by a dead process
    is stale by construction: the next trainer takes it. Without `fcntl` (Windows) nothing is locked.

    Raises:
        RunLockedError: another process holds the folder (the message names its pid and host).
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    key = os.fspath(run.resolve())
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fcntl = None
    if key in _held or fcntl is None:
        yield me
        return
    f = open(run / _LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole block
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunLockedError(
                f"run folder {os.fspath(run)} is in use by {holder}: wait for that trainer to finish (or stop "
                "it), or pass --out NEW_DIR"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {me['pid']} on {me['host']}\n")
        f.flush()
        _held.add(key)
        try:
            yield me
        finally:
            _held.discard(key)
            with contextlib.suppress(OSError):
                f.seek(0)
                f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        f.close()
