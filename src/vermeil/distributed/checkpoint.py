"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP): each rank writes its own shards.

A checkpoint saved from any layout (DDP, FSDP2, TP, one process) loads into any other: DCP stores global
tensors with their shard offsets and reshards on load.

Flux's fused projections are split block by block (`_StridedShard`), which DCP (torch 2.13) cannot describe:
such tensors are written and read as plain `Shard(dim)` tensors (one redistribute each way).

DCP's `.metadata` is a pickle that torch's `FileSystemReader` loads with plain `pickle.load`: a crafted folder
would run code. Here an unpickler that resolves only a DCP plan's classes reads it (`read_metadata`). The
shards' non-tensor entries (an optimizer's param groups), which torch's load planners unpickle with
`weights_only=False`, are read with `weights_only=True` as the tensors are (`_SafeLoadPlanner`).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.optim import Optimizer

from vermeil.checkpoint import refusal_text, save_weights
from vermeil.distributed.runtime import is_main_process

__all__ = ["export_weights", "load_checkpoint", "read_metadata", "save_checkpoint"]

METADATA = ".metadata"

# Every global a DCP plan pickle (torch 2.4-2.13) refers to; anything else is refused unresolved.
_PLAN_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "StorageMeta",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "LoadItemType"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "slice"),
}


class _PlanUnpickler(pickle.Unpickler):
    """Resolves only the globals of a DCP plan; the error names the first other one (nothing is called)."""

    def __init__(self, file: io.BufferedIOBase, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAN_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))
        ):
            return super().find_class(module, name)
        raise ValueError(
            f"{self.path} refers to {module}.{name}, which a DCP checkpoint plan never holds: refused unread "
            "(a crafted or foreign file; see SECURITY.md)"
        )


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The plan (`.metadata`) of a DCP checkpoint folder, read without running anything it may hold."""
    file = os.path.join(os.fspath(path), METADATA)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{os.fspath(path)} is not a DCP checkpoint folder (no {METADATA} file)")
    with open(file, "rb") as f:
        try:
            metadata = _PlanUnpickler(f, file).load()
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{file} is damaged (not a DCP checkpoint plan): {e}") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{file} holds a {type(metadata).__name__}, not a DCP checkpoint plan")
    return metadata


class _SafeReader(FileSystemReader):
    """torch's `FileSystemReader` with `read_metadata` through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by `save_checkpoint`
            raise ValueError(f"{os.fspath(self.path)}: per-rank DCP metadata is not supported")
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """torch's `DefaultLoadPlanner`, whose `load_bytes` unpickles a shard's non-tensor entries with
    `weights_only=False` (a crafted shard would run code), reading them with `weights_only=True`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)  # tensors and plain containers, or an UnpicklingError
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _SafeEmptyLoadPlanner(_SafeLoadPlanner, _EmptyStateDictLoadPlanner):
    """`_SafeLoadPlanner` that rebuilds the whole state dict from the plan (as `dcp_to_torch_save` does)."""


def _check_errors(path: str | os.PathLike, fn: Callable[[], Any], saving: bool = False) -> Any:
    """Run a DCP read (or write); its `CheckpointException` (a BaseException, which `except Exception` misses,
    with a per-rank traceback as text) becomes one ValueError (OSError when saving) naming the folder and the
    first rank's error."""
    try:
        return fn()
    except CheckpointException as e:
        errors = [err[0] if isinstance(err, tuple) else err for err in e.failures.values()]
        first = next((" ".join(str(err).split()) for err in errors if str(err).strip()), "")
        if saving:
            ranks = sorted(e.failures)
            raise OSError(
                f"saving DCP checkpoint {os.fspath(path)} failed on rank(s) {ranks}: {first}"
            ) from None
        first = refusal_text(first, "a shard")
        raise ValueError(f"DCP checkpoint {os.fspath(path)} is damaged: {first or 'unreadable'}") from None


def _map(fn: Callable[..., Any], tree: Any, *like: Any) -> Any:
    """`fn(leaf, *leaves_of_like)` over nested dicts and lists (state dicts of one structure), kept as is."""
    if isinstance(tree, Mapping):
        return {k: _map(fn, v, *(other[k] for other in like)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(fn, *leaves) for leaves in zip(tree, *like, strict=True)]
    return fn(tree, *like)


def _is_strided(t: Any) -> bool:
    # 1-D meshes only: FSDP2's own 2-D (_StridedShard, Shard) layout is one box per rank, which DCP handles.
    return isinstance(t, DTensor) and t.device_mesh.ndim == 1 and isinstance(t.placements[0], _StridedShard)


def _to_file_layout(t: Any) -> Any:
    """A block-by-block (`_StridedShard`) shard as a plain `Shard` of the same dim; anything else unchanged."""
    return t.redistribute(placements=(Shard(t.placements[0].dim),)) if _is_strided(t) else t


def _from_file_layout(loaded: Any, original: Any) -> Any:
    return loaded.redistribute(placements=original.placements) if _is_strided(original) else loaded


def _check_no_expert_parallel(model: nn.Module) -> None:
    """Refuse `ExpertParallelExperts` (before any collective): each rank holds other experts under the same
    names, and DCP keeps one rank's copy of a plain tensor, so the others' experts would be lost."""
    from vermeil.distributed.expert import ExpertParallelExperts

    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            raise ValueError(
                f"module {name!r} holds expert-parallel experts (ExpertParallelExperts): DCP would keep one "
                "rank's experts under their shared names and lose the others'; gather the experts into a plain "
                "MoE before saving or loading"
            )


def _check_model_keys(path: str | os.PathLike, metadata: Metadata, model_state: Mapping[str, Any]) -> None:
    """Strict load: every model entry of the checkpoint must be one of the model's (DCP reads only the keys it
    is asked for, so a checkpoint of a larger model would otherwise load silently, its extra layers dropped)."""
    own = set(model_state)
    unexpected = []
    for key in metadata.state_dict_metadata:
        if not key.startswith("model."):
            continue
        parts = key.removeprefix("model.").split(".")  # DCP flattens nested entries with dots
        if not any(".".join(parts[:i]) in own for i in range(1, len(parts) + 1)):
            unexpected.append(key.removeprefix("model."))
    if unexpected:
        unexpected.sort()
        more = f" ... and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ValueError(
            f"DCP checkpoint {os.fspath(path)} does not match the model: unexpected keys (in the checkpoint, "
            f"not in the model): {unexpected[:5]}{more}"
        )


def _saved_state_only(metadata: Metadata, optim_state: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `optim_state["state"]` (a fresh optimizer's, one per parameter) the checkpoint holds: a
    parameter that never had a gradient had no state when saved (AdamW creates it lazily), and gets none now."""
    prefix = "optimizer.state."
    saved = {key.rpartition(".")[0] for key in metadata.state_dict_metadata if key.startswith(prefix)}
    return {fqn: v for fqn, v in optim_state["state"].items() if prefix + fqn in saved}


def _saved_param_groups(path: str | os.PathLike, metadata: Metadata) -> list[dict[str, Any]]:
    """Placeholders for the checkpoint's optimizer param groups, for DCP to fill: the file's own groups, whose
    number may differ from ours (`split_dtensor_groups` splits the groups of a TP model, not of FSDP2's)."""
    root: dict[str, Any] = {}
    for key, where in (metadata.planner_data or {}).items():
        if tuple(where[:2]) == ("optimizer", "param_groups"):
            item = metadata.state_dict_metadata.get(key)
            size, props = getattr(item, "size", None), getattr(item, "properties", None)
            # a tensor entry (a tensor lr) is loaded into a tensor; any other value is replaced
            value = torch.empty(size, dtype=props.dtype) if size is not None and props is not None else None
            set_element(root, where, value)
    groups = root.get("optimizer", {}).get("param_groups")
    if not groups:
        raise ValueError(f"DCP checkpoint {os.fspath(path)} holds no optimizer param groups")
    return groups


def _match_param_groups(
    path: str | os.PathLike, saved: list[dict[str, Any]], ours: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Our param groups, each with the settings of the saved group that holds its parameters (by name)."""
    owner = {fqn: group for group in saved for fqn in group.get("params") or ()}
    matched = []
    for group in ours["param_groups"]:
        sources = [owner.get(fqn) for fqn in group["params"]]
        if not sources:  # an empty group: nothing to match, kept as it is
            matched.append(group)
            continue
        if any(src is None for src in sources):
            missing = next((f for f, src in zip(group["params"], sources, strict=True) if src is None), None)
            raise ValueError(
                f"DCP checkpoint {os.fspath(path)} does not match the optimizer: no saved param group holds "
                f"{missing!r}"
            )
        first = sources[0]
        # settings only: the parameters (and their names) stay ours
        settings = {k: first.get(k, v) for k, v in group.items() if k not in ("params", "param_names")}
        for src in sources[1:]:
            if src is not first and any(src.get(k) != v for k, v in settings.items()):
                raise ValueError(
                    f"DCP checkpoint {os.fspath(path)} does not match the optimizer: one of its param groups "
                    f"holds parameters saved with different settings ({group['params'][0]!r} ...)"
                )
        matched.append({**group, **settings})
    return matched


def _state(model: nn.Module, optimizer: Optimizer | None) -> dict[str, Any]:
    _check_no_expert_parallel(model)
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Optimizer | None = None) -> None:
    """Save `model` (and `optimizer`) to the folder `path` under plain module names; a collective.

    Over an earlier checkpoint, its plan is removed first: DCP writes the new one last, so a save that fails
    (a rank's disk full) leaves a folder that is refused, never the old plan over a mix of old and new shards.
    """
    state = _map(_to_file_layout, _state(model, optimizer))
    if is_main_process():  # DCP's coordinator; the other ranks write nothing before its first collective
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(os.fspath(path), METADATA))
    _check_errors(path, lambda: dcp.save(state, checkpoint_id=os.fspath(path)), saving=True)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Optimizer | None = None) -> None:
    """Load `save_checkpoint`'s folder into `model` (and `optimizer`) of any layout, strictly (collective)."""
    state = _state(model, optimizer)
    metadata = read_metadata(path)
    _check_model_keys(path, metadata, state["model"])
    file_state = _map(_to_file_layout, state)
    if optimizer is not None:  # read the file's param groups as they are, matched to ours after the load
        file_state["optimizer"]["param_groups"] = _saved_param_groups(path, metadata)
        file_state["optimizer"]["state"] = _saved_state_only(metadata, file_state["optimizer"])
    reader = _SafeReader(os.fspath(path))
    load = partial(dcp.load, checkpoint_id=os.fspath(path), storage_reader=reader, planner=_SafeLoadPlanner())
    _check_errors(path, lambda: load(file_state))
    if optimizer is not None:
        saved = file_state["optimizer"]["param_groups"]
        file_state["optimizer"]["param_groups"] = _match_param_groups(path, saved, state["optimizer"])
    state = _map(_from_file_layout, file_state, state)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        # not strict about the parameters `_saved_state_only` left without state (DCP checked the rest)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=False),
        )  # fmt: skip


def export_weights(
    checkpoint_dir: str | os.PathLike, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Stitch the model of a DCP checkpoint into one safetensors file, in one process without a model or a
    process group; returns the exported state dict."""
    read_metadata(checkpoint_dir)  # a missing or foreign plan: its own error before DCP's machinery
    state: dict[str, Any] = {}
    # torch's `dcp_to_torch_save`, through the safe reader and planner: no process group (rank 0 of a run
    # calls this alone), the whole state rebuilt from the plan.
    reader, planner = _SafeReader(os.fspath(checkpoint_dir)), _SafeEmptyLoadPlanner()
    load = partial(_load_state_dict, storage_reader=reader, planner=planner, no_dist=True)
    _check_errors(checkpoint_dir, lambda: load(state))
    if "model" not in state:
        raise ValueError(
            f"checkpoint {os.fspath(checkpoint_dir)!r} holds no 'model' entry (keys: {sorted(state)})"
        )
    save_weights(state["model"], path, metadata)
    return state["model"]
