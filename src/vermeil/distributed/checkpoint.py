"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP): each rank writes its own shards.

Axis legend: none (state dicts only).

A checkpoint saved from any layout (DDP, FSDP2, TP, one process) loads into any other: DCP stores global
tensors with their shard offsets and reshards on load. Loading in a plain process without a process group
works too (torch warns that it assumes a single process).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

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
from torch.optim import Optimizer

__all__ = ["export_weights", "load_checkpoint", "save_checkpoint"]


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
    dcp.save(state, checkpoint_id=os.fspath(path))


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Optimizer | None = None) -> None:
    """Load the folder `path` (written by `save_checkpoint`) into `model` (and `optimizer`) in place.

    Works for any layout of `model` (plain, DDP, FSDP2, TP); call it on every rank of that layout. Missing or
    unexpected keys and shape mismatches raise as in `load_state_dict(strict=True)`.
    """
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=os.fspath(path))
        set_model_state_dict(model, state["model"])
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=os.fspath(path))
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
