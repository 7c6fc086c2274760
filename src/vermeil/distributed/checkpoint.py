"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP): each rank writes its own shards.

Axis legend: none (state dicts only).

A checkpoint saved from any layout (DDP, FSDP2, TP, one process) loads into any other: DCP stores global
tensors with their shard offsets and reshards on load. Loading in a plain process without a process group
works too (torch warns that it assumes a single process).

Tensor parallelism splits Flux's fused projections block by block (`_StridedShard`): a rank's shard is then
several pieces of the tensor, which DCP (torch 2.13) cannot describe (it writes one offset per shard and
rejects the plan as overlapping). Such tensors, model and optimizer state alike, are written and read as plain
`Shard(dim)` tensors (one redistribute each way), so the files hold the original layout.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.optim import Optimizer

__all__ = ["export_weights", "load_checkpoint", "save_checkpoint"]


def _map(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """`fn` on every leaf of nested dicts and lists (a state dict), keeping the structure."""
    if isinstance(tree, Mapping):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(v, fn) for v in tree]
    return fn(tree)


def _zip_map(tree: Any, like: Any, fn: Callable[[Any, Any], Any]) -> Any:
    """`fn(leaf, leaf_of_like)` over two state dicts of the same structure."""
    if isinstance(tree, Mapping):
        return {k: _zip_map(v, like[k], fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_zip_map(v, w, fn) for v, w in zip(tree, like, strict=True)]
    return fn(tree, like)


def _is_strided(t: Any) -> bool:
    # 1-D meshes only: FSDP2's own 2-D (_StridedShard, Shard) layout is one box per rank, which DCP handles.
    return isinstance(t, DTensor) and t.device_mesh.ndim == 1 and isinstance(t.placements[0], _StridedShard)


def _to_file_layout(t: Any) -> Any:
    """A block-by-block (`_StridedShard`) shard as a plain `Shard` of the same dim; anything else unchanged."""
    return t.redistribute(placements=(Shard(t.placements[0].dim),)) if _is_strided(t) else t


def _from_file_layout(loaded: Any, original: Any) -> Any:
    return loaded.redistribute(placements=original.placements) if _is_strided(original) else loaded


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Optimizer | None = None) -> None:
    """Save `model` (and `optimizer`) to the folder `path`; call it on every rank (it is a collective).

    Keys are the plain module names ("layers.0.attention.wq.weight"): DDP's `module.` prefix and FSDP2/TP
    wrappers do not appear, so any layout can load the result.
    """
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    dcp.save(_map(state, _to_file_layout), checkpoint_id=os.fspath(path))


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Optimizer | None = None) -> None:
    """Load the folder `path` (written by `save_checkpoint`) into `model` (and `optimizer`) in place.

    Works for any layout of `model` (plain, DDP, FSDP2, TP); call it on every rank of that layout. Missing or
    unexpected keys and shape mismatches raise as in `load_state_dict(strict=True)`.
    """
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    file_state = _map(state, _to_file_layout)
    dcp.load(file_state, checkpoint_id=os.fspath(path))  # in place, into file_state's tensors
    state = _zip_map(file_state, state, _from_file_layout)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def export_weights(
    checkpoint_dir: str | os.PathLike, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Convert the model of a DCP checkpoint into one safetensors file (for `vermeil generate`), in one process.

    Needs no model and no process group: the shards are read and stitched into full tensors
    (`dcp_to_torch_save` into a temporary file, loaded with `weights_only=True`), then written with
    `vermeil.checkpoint.save_weights` (atomic). Returns the exported state dict.
    """
    from vermeil.checkpoint import save_weights

    with tempfile.TemporaryDirectory() as tmp:
        full = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(os.fspath(checkpoint_dir), full)
        state = torch.load(full, map_location="cpu", weights_only=True)
    if "model" not in state:
        raise ValueError(
            f"checkpoint {os.fspath(checkpoint_dir)!r} holds no 'model' entry (keys: {sorted(state)})"
        )
    save_weights(state["model"], path, metadata)
    return state["model"]
