"""The run folder: where a training run, a conversion or a fine-tuning start keeps its files, and how to read it.

    config.yaml                         the resolved run config (what `vermeil train --resume` rebuilds from)
    metrics.jsonl                       one JSON row per log step and per evaluation
    loss.png, samples.png               plots (when matplotlib is installed)
    tokenizer.json                      a converted model's tokenizer (weights without a `tokenizer` record)
    checkpoints/step_000100/            model.safetensors and state.pt (optimizer, scheduler, RNG, sampler,
                                        step, config); a distributed run adds dcp/
    checkpoints/step_000100/manifest.json  size and sha256 of every file, written last
    checkpoints/latest                  the name of the newest complete checkpoint folder
    .lock                               held (`fcntl.flock`) by the one trainer writing the folder

A checkpoint folder is complete when it holds model.safetensors and state.pt; files are written atomically
and `latest` moves last, so a run killed at any moment leaves the previous checkpoint loadable. A run folder
is untrusted input (SECURITY.md): nothing in it is unpickled, and checkpoints are verified against their
manifests. Nothing here imports training code.
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

from torch import Tensor, nn

from vermeil.checkpoint import (
    atomic_write,
    clean_temp_files,
    load_torch,
    load_weights,
    save_torch,
    save_weights,
)
from vermeil.config import load_yaml, save_yaml

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG",
    "DCP",
    "MANIFEST",
    "STATE",
    "TOKENIZER_KEY",
    "WEIGHTS",
    "DamagedCheckpointError",
    "RunExistsError",
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
    "read_state",
    "refuse_existing_run",
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
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # vermeil.data.tokenizer's (runs reads no data)
TOKENIZER_KEY = "tokenizer"  # weights' metadata: "bytes" when a trainer wrote them (its data are byte tokens)


class DamagedCheckpointError(ValueError):
    """A checkpoint file does not match its manifest (size or sha256), or cannot be read at all."""


class RunExistsError(ValueError):
    """A new run was pointed at a folder that holds another run's checkpoints (the two would mix)."""


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock (another trainer is writing it)."""


def checkpoint_name(step: int) -> str:
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


def refuse_existing_run(run_dir: str | os.PathLike[str], *, resume: str, start_over: str) -> None:
    """Raise `RunExistsError` when `run_dir` holds a complete checkpoint: a new run there would write its own
    beside them, move `latest` and prune them. `resume` and `start_over` say how to continue that run or
    begin afresh (the CLI's flags, or the Python calls)."""
    found = list_checkpoints(run_dir)
    if found:
        raise RunExistsError(
            f"{os.fspath(run_dir)} already holds a run (checkpoints up to {found[-1].name}): continue it with "
            f"{resume}, or {start_over}"
        )


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
    """The newest complete and intact checkpoint folder of a run (or `run_dir` itself if it is one).

    With `verify`, a damaged candidate is named in a `UserWarning` and the next older one is tried.

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
    errors: list[DamagedCheckpointError] = []
    for folder in candidates:
        try:
            verify_checkpoint(folder)
        except DamagedCheckpointError as e:
            errors.append(e)
            continue
        if errors:
            warnings.warn(f"{errors[0]}; using {os.fspath(folder)} instead", stacklevel=2)
        return folder
    raise DamagedCheckpointError(f"{errors[0]}; no intact checkpoint left in {os.fspath(run)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike[str], *, distributed: bool = False) -> dict[str, Any]:
    """Write `manifest.json` into a complete checkpoint folder: each file's size and sha256, and whether a
    distributed run saved it (what the trainer trusts before reading `dcp/`)."""
    folder = Path(folder)
    shards = sorted(p for p in (folder / DCP).rglob("*") if not p.name.endswith(".tmp"))  # none without dcp/
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in [folder / WEIGHTS, folder / STATE, *shards]
        if p.is_file()
    }
    manifest = {"format": 1, "distributed": bool(distributed), "files": files}
    with atomic_write(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    _verified.pop(os.fspath(folder), None)
    return manifest


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A checkpoint folder's manifest, or None without one; DamagedCheckpointError when it is not valid."""
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
    """Whether the checkpoint's manifest records that a distributed run wrote it."""
    manifest = read_manifest(folder)
    return bool(manifest and manifest.get("distributed") is True)


# Folders verified in this process, by path -> (size, mtime) of each file: reading a run twice hashes it once.
_verified: dict[str, tuple[tuple[str, int, int], ...]] = {}


def verify_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Check every file a checkpoint's manifest lists (size, then sha256), or without one that its files are
    non-empty; a DamagedCheckpointError names the first bad file."""
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
        st = (folder / name).stat() if (folder / name).is_file() else None
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


def _check(path: Path, ok: bool, why: str) -> None:
    if not ok:
        raise DamagedCheckpointError(f"checkpoint file {os.fspath(path)} is damaged: {why}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _entry(state: Mapping[str, Any], key: str) -> str:
    return f"it has no {key}" if key not in state else f"its {key} is a {_kind(state[key])}"


def read_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's state.pt (`weights_only`), checked for the layout a trainer or `write_run` gives it: any
    tensors and containers unpickle safely, so the shape is checked here, and a DamagedCheckpointError names
    the file and the entry instead of a KeyError deep in a load."""
    path = Path(folder) / STATE
    state = load_torch(path)
    _check(path, isinstance(state, dict), f"it holds a {_kind(state)}, not a dict of training state")
    step = state.get("step")
    _check(path, type(step) is int and step >= 0, f"its step is {step!r}, not an int >= 0")
    config = state.get("config", {})
    _check(path, isinstance(config, dict), f"its config is a {_kind(config)}, not a mapping")
    if "optimizer" not in state:  # write_run's: the step and the config alone
        return state
    maybe = (dict, type(None))
    for key, types in {
        "optimizer": maybe,
        "scheduler": dict,
        "rng": dict,
        "data": maybe,
        "scaler": maybe,
    }.items():
        _check(path, isinstance(state.get(key), types), _entry(state, key))
    sched = state["scheduler"]
    _check(
        path,
        type(sched.get("last_epoch")) is int
        and isinstance(sched.get("lr_lambdas"), list)
        and all(isinstance(f, (dict, type(None))) for f in sched["lr_lambdas"])
        and "optimizer" not in sched,  # LambdaLR.load_state_dict sets every entry as an attribute
        "its scheduler is not a saved LambdaLR",
    )
    rng = state["rng"]
    _check(
        path,
        isinstance(rng.get("torch"), Tensor) and isinstance(rng.get("python"), (list, tuple)),
        "its rng holds no torch and python generator states",
    )
    window = state.get("window")
    if window is not None:
        _check(
            path,
            isinstance(window, dict)
            and all(isinstance(window.get(k), Tensor) for k in ("loss", "skipped"))
            and isinstance(window.get("metrics"), dict)
            and all(isinstance(v, Tensor) for v in window["metrics"].values())
            and all(isinstance(window.get(k), (int, float)) for k in ("steps", "tokens", "seconds")),
            "its metrics window is not a saved MetricsWindow",
        )
    nonfinite = state.get("nonfinite")
    _check(
        path,
        nonfinite is None or (isinstance(nonfinite, Tensor) and nonfinite.shape == (6,)),
        "its nonfinite counters are not 6 numbers",
    )
    for key in ("tokens", "elapsed_s"):
        _check(path, isinstance(state.get(key, 0), (int, float)), _entry(state, key))
    return state


def read_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run config of a run folder as a plain dict: its config.yaml, else the newest checkpoint's copy."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {os.fspath(run)} does not exist")
    if (run / CONFIG).is_file():
        return load_yaml(run / CONFIG)
    folder = latest_checkpoint(run)
    state = read_state(folder)
    _check(
        folder / STATE, "config" in state, f"it holds no config (and {os.fspath(run / CONFIG)} is missing)"
    )
    return dict(state["config"])


def point_latest(run_dir: str | os.PathLike[str], folder: Path) -> None:
    """Point `checkpoints/latest` at a complete checkpoint folder (atomically)."""
    with atomic_write(Path(run_dir) / CHECKPOINTS_DIR / _LATEST, "w") as f:
        f.write(folder.name + "\n")


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int, current: Path) -> None:
    """Delete all but the `keep` newest complete checkpoints (and `current`), and folders left incomplete."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep={keep!r} must be an int >= 0")
    root = Path(run_dir) / CHECKPOINTS_DIR
    kept = set(list_checkpoints(run_dir)[-keep:] if keep else []) | {current}
    for old in root.iterdir():
        if _is_step_folder(old) and old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def write_run(run_config: Mapping[str, Any], model: nn.Module, run_dir: str | os.PathLike[str]) -> Path:
    """Write `model` as step 0 of a run folder (no optimizer state: `train --resume` fine-tunes from it
    afresh); `run_config` is `RunConfig.to_dict()`. Returns the checkpoint folder."""
    run = Path(run_dir)
    folder = run / CHECKPOINTS_DIR / checkpoint_name(0)
    folder.mkdir(parents=True, exist_ok=True)
    clean_temp_files(folder)
    save_yaml(dict(run_config), run / CONFIG)
    save_weights(model, folder / WEIGHTS, metadata={"step": "0"})
    save_torch({"step": 0, "config": dict(run_config)}, folder / STATE)  # marks the folder complete
    write_manifest(folder)
    point_latest(run, folder)
    return folder


def clear_run(run_dir: str | os.PathLike[str]) -> None:
    """Remove what a run wrote into a folder (a converted model's tokenizer too); other files stay."""
    run = Path(run_dir)
    if (run / CHECKPOINTS_DIR).is_dir():
        shutil.rmtree(run / CHECKPOINTS_DIR)
    for name in ("metrics.jsonl", "loss.png", "samples.png", CONFIG, *TOKENIZER_FILES):
        (run / name).unlink(missing_ok=True)


# Resolved run folders whose lock this process holds (a trainer inside the CLI's lock re-enters it).
_held: set[str] = set()


@contextlib.contextmanager
def lock_run(run_dir: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Hold the exclusive lock of a run folder (`fcntl.flock` on `RUN/.lock`, which records the holder's pid
    and host); re-entrant within one process. Yields {"pid", "host"}; RunLockedError names another holder.

    The kernel releases a flock when its holder dies (SIGKILL included): a dead process's lock file is stale
    by construction. Without `fcntl` (Windows) nothing is locked.
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
    with open(run / _LOCK, "a+", encoding="utf-8") as f:
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
