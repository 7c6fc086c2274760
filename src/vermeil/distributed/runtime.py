"""Process-group lifecycle: start from torchrun's environment (gloo on CPU, nccl on CUDA), rank helpers, a
clean shutdown. Without `WORLD_SIZE` every helper answers as rank 0 of a world of 1 and does nothing.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import ParamSpec, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "rank_zero_only",
    "shutdown",
]

P = ParamSpec("P")
R = TypeVar("R")


def is_distributed() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, and in a single-process run."""
    return get_rank() == 0


def rank_zero_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Decorator: run `fn` on rank 0 only (others get None); never with a collective inside (a deadlock)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def init_distributed(
    backend: str | None = None,
    *,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout: timedelta | None = None,
) -> tuple[int, int, torch.device]:
    """Join (or create) the default process group; returns (rank, world_size, device).

    Without `WORLD_SIZE` (or `world_size`): a single-process run, `(0, 1, device)`, nothing initialised.
    The device is `cuda:LOCAL_RANK` (made current) under CUDA, else cpu.

    Args:
        backend: None picks nccl when CUDA is available, else gloo.
        init_method: e.g. "file:///path/store" (tests); None means torchrun's `env://`.
        rank, world_size: None reads `RANK` / `WORLD_SIZE`.
    """
    cuda = torch.cuda.is_available() and backend != "gloo"
    world = world_size if world_size is not None else _env_int("WORLD_SIZE")
    rank = rank if rank is not None else _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank or 0)
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if is_distributed():
        return dist.get_rank(), dist.get_world_size(), device
    if world is None:
        return 0, 1, device
    if world < 1:
        raise ValueError(f"world_size={world} must be >= 1")
    if rank is None:
        raise ValueError(f"rank is required with world_size={world} (set RANK or pass rank=)")
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, world_size={world})")
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(device)
    # device_id binds an nccl communicator to this GPU (eager init, no guessing).
    nccl_device = device if cuda and backend == "nccl" else None
    init = init_method or "env://"
    dist.init_process_group(
        backend, init_method=init, timeout=timeout, world_size=world, rank=rank, device_id=nccl_device
    )
    return rank, world, device


def shutdown(*, exit_code: int | None = None) -> None:
    """Leave the process group cleanly: barrier, then `destroy_process_group` (no-op without a group).

    `exit_code` also flushes stdout/stderr and leaves with `os._exit`, skipping the interpreter teardown where
    gloo can abort ("terminate called without an active exception", pytorch/pytorch#190489).
    """
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
    if exit_code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
