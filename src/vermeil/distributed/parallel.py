"""Data and tensor parallelism on public torch APIs: DDP, FSDP2 (`fully_shard`) and DTensor TP plans.

Axis legend: B batch, T length, D model dim, H heads, Hkv kv heads, Dh head dim, F feed-forward hidden dim,
tp the tensor-parallel degree.

Tensor parallelism is applied from outside the model by module name (Megatron layout): in every
`vermeil.nn.Attention`, `wq`/`wk`/`wv` are column-parallel and `wo` row-parallel; in every `GLU`
(SwiGLU/GeGLU) `w1`/`w3` are column-parallel and `w2` row-parallel; in every `FeedForward` `fc1` is
column-parallel and `fc2` row-parallel. Each such module takes a replicated input and returns a replicated
output (one all-reduce after the row-parallel projection), so everything else (embeddings, norms, heads,
Mamba blocks) stays replicated and unchanged. Attention reads its head counts from the projections
(`view(b, t, -1, Dh)`), so each rank attends over its H/tp query heads and Hkv/tp kv heads; the contiguous
column shards keep GQA's grouping (query head i uses kv head i // (H/Hkv)) on every rank.

Not covered: `ParallelTransformerBlock` (one fused projection), `MambaBlock` and `vermeil.models.llm`'s own
`Attention` (it reshapes with the global head count) stay replicated, which is correct but not split. An
`Attention` KV cache (`setup_cache`) holds the global Hkv heads, so TP decoding is not supported (the plan
raises a ValueError while a cache is set up); a per-head (B, H, T, S) mask would need slicing to the local
heads (key-padding and (B, 1, T, S) masks work as they are).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from vermeil.nn.attention import Attention
from vermeil.nn.feedforward import GLU, FeedForward

__all__ = [
    "DEFAULT_BLOCK_NAMES",
    "STRATEGIES",
    "Parallelized",
    "apply_ddp",
    "apply_fsdp2",
    "apply_tensor_parallel",
    "mixed_precision_policy",
    "parallelize",
    "tensor_parallel_plan",
]

# Class names of the repeated blocks that FSDP2 shards one by one (vermeil.nn and vermeil.models).
DEFAULT_BLOCK_NAMES: tuple[str, ...] = (
    "TransformerBlock",
    "ParallelTransformerBlock",
    "MambaBlock",
    "MambaResidualBlock",
    "HybridLayer",
    "DoubleStreamBlock",
    "SingleStreamBlock",
)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# ------------------------------------------------------------------------------------------------ DDP


def apply_ddp(
    model: nn.Module, device: torch.device | None = None, **kwargs: object
) -> DistributedDataParallel:
    """Wrap `model` in `DistributedDataParallel` (gradients averaged over the default group).

    Args:
        model: already on `device`.
        device: the rank's device; a CUDA device becomes `device_ids=[device]`, cpu/None gives none.
        **kwargs: passed to `DistributedDataParallel` (e.g. `find_unused_parameters=True`).
    """
    device = device if device is not None else next(model.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **kwargs)


# ---------------------------------------------------------------------------------------------- FSDP2


def _to_dtype(name: str, value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"{name}={value!r} must be a torch.dtype, None or one of {sorted(_DTYPES)}")
    return _DTYPES[value]


def mixed_precision_policy(
    param_dtype: torch.dtype | str | None = None,
    reduce_dtype: torch.dtype | str | None = None,
    *,
    output_dtype: torch.dtype | str | None = None,
    cast_forward_inputs: bool = True,
) -> MixedPrecisionPolicy:
    """An FSDP2 `MixedPrecisionPolicy` from config values ("bf16", "float32", a torch.dtype or None).

    Typical: `mixed_precision_policy("bf16", "fp32")` computes in bfloat16 and reduces gradients in float32;
    the sharded parameters and the optimizer state stay in their own (float32) dtype.
    """
    return MixedPrecisionPolicy(
        param_dtype=_to_dtype("param_dtype", param_dtype),
        reduce_dtype=_to_dtype("reduce_dtype", reduce_dtype),
        output_dtype=_to_dtype("output_dtype", output_dtype),
        cast_forward_inputs=cast_forward_inputs,
    )


def _matches(name: str, module: nn.Module, selectors: tuple[type | str, ...]) -> bool:
    for sel in selectors:
        if isinstance(sel, type) and isinstance(module, sel):
            return True
        if isinstance(sel, str) and (type(module).__name__ == sel or name == sel):
            return True
    return False


def apply_fsdp2(
    model: nn.Module,
    block_types_or_names: Iterable[type | str] | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    *,
    mesh: DeviceMesh | None = None,
    reshard_after_forward: bool = True,
) -> FSDPModule:
    """Shard `model` with FSDP2: `fully_shard` on every matching block (innermost first), then on the root.

    Parameters become DTensors sharded along dim 0 over the data-parallel ranks; each block's parameters are
    all-gathered just before its forward/backward and gradients reduce-scattered (averaged) after. Build the
    optimizer after this call, on `model.parameters()`.

    Args:
        model: the model (in place; it also becomes an `FSDPModule`).
        block_types_or_names: which submodules get their own shard group: classes (`isinstance`), class
            names, or qualified module names (e.g. "layers.0"). None: `DEFAULT_BLOCK_NAMES`.
        mp_policy: mixed precision (see `mixed_precision_policy`); None keeps every dtype as is.
        mesh: a 1-D data-parallel mesh; None uses all ranks of the default group.
        reshard_after_forward: free gathered parameters after each block's forward (ZeRO-3); False keeps
            them until backward (ZeRO-2 like, more memory, less communication).

    Returns:
        The same model object, now an `FSDPModule`.
    """
    if isinstance(block_types_or_names, str):
        raise TypeError(
            f"block_types_or_names={block_types_or_names!r} must be an iterable of types or names"
        )
    selectors = tuple(DEFAULT_BLOCK_NAMES if block_types_or_names is None else block_types_or_names)
    for sel in selectors:
        if not isinstance(sel, (type, str)):
            raise TypeError(f"block_types_or_names entry {sel!r} must be a class or a str")
    kwargs: dict = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if mesh is not None:
        kwargs["mesh"] = mesh
    # Reverse pre-order visits children before parents, so nested blocks are sharded inside-out.
    for name, module in reversed(list(model.named_modules())):
        if module is not model and _matches(name, module, selectors):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- tensor parallel


def _check_divisible(module_name: str, what: str, value: int, tp_size: int, why: str) -> None:
    if value % tp_size:
        raise ValueError(
            f"{what}={value} of module {module_name!r} must be divisible by the tensor-parallel degree "
            f"tp_size={tp_size} ({why})"
        )


def tensor_parallel_plan(model: nn.Module, tp_size: int) -> dict[str, ParallelStyle]:
    """The Megatron TP plan for every `vermeil.nn` attention and feed-forward module inside `model`.

    Checks every constraint here, before any collective: query heads and kv heads must be divisible by
    `tp_size` (each rank holds whole heads; K/V replication is not implemented), and so must the
    feed-forward hidden size.

    Args:
        model: any module tree containing `Attention`, `GLU` or `FeedForward` modules (e.g. `TransformerBlock`s).
        tp_size: tensor-parallel degree (>= 1).

    Returns:
        {qualified module name: ParallelStyle} for `parallelize_module` (learnable QK-norm scales get a
        `SequenceParallel` over the head axis so their gradients sum over the ranks' heads).
    """
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tp_size={tp_size!r} must be an int >= 1")
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        label = name or "<root>"
        if isinstance(module, Attention):
            why = "each rank attends over whole local heads"
            _check_divisible(label, "heads", module.heads, tp_size, why)
            _check_divisible(label, "kv_heads", module.kv_heads, tp_size, why)
            if tp_size > 1 and getattr(module, "kv_cache", None) is not None:
                # The cache holds all Hkv heads while each rank would write only its Hkv / tp.
                raise ValueError(
                    f"module {label!r} has a KV cache: tensor-parallel decoding is not supported "
                    "(call delete_cache() before parallelizing)"
                )
            for proj in ("wq", "wk", "wv"):
                plan[prefix + proj] = ColwiseParallel()
            plan[prefix + "wo"] = RowwiseParallel()
            if module.qk_norm is not None:
                for half in ("query_norm", "key_norm"):
                    if getattr(module.qk_norm, half).scale is not None:
                        # q/k are (B, H/tp, T, Dh) local: dim 1 is the sharded head axis. The replicated
                        # scale's gradient is then a partial sum that DTensor all-reduces.
                        plan[f"{prefix}qk_norm.{half}"] = SequenceParallel(
                            sequence_dim=1, use_local_output=True
                        )
        elif isinstance(module, GLU):
            _check_divisible(label, "hidden_dim", module.w1.out_features, tp_size, "w1/w3 are split by rows")
            plan[prefix + "w1"] = ColwiseParallel()
            plan[prefix + "w3"] = ColwiseParallel()
            plan[prefix + "w2"] = RowwiseParallel()
        elif isinstance(module, FeedForward):
            _check_divisible(label, "hidden_dim", module.fc1.out_features, tp_size, "fc1 is split by rows")
            plan[prefix + "fc1"] = ColwiseParallel()
            plan[prefix + "fc2"] = RowwiseParallel()
    return plan


def apply_tensor_parallel(
    model: nn.Module, mesh: DeviceMesh, plan: dict[str, ParallelStyle] | None = None
) -> nn.Module:
    """Apply tensor parallelism in place with `parallelize_module`.

    Args:
        model: the full (unsharded) model, identical on every rank of `mesh` (same seed or same weights).
        mesh: a 1-D mesh of the TP ranks, or a multi-dim mesh with a dim named "tp".
        plan: None builds `tensor_parallel_plan(model, tp)` (which validates head counts first).

    Returns:
        The same model; its attention/feed-forward weights are DTensors (`Shard(0)` column-parallel,
        `Shard(1)` row-parallel), all inputs and outputs of the model stay plain replicated tensors.
    """
    if mesh.ndim > 1:
        names = mesh.mesh_dim_names or ()
        if "tp" not in names:
            raise ValueError(f"mesh has {mesh.ndim} dims {names}; name the tensor-parallel one 'tp'")
        mesh = mesh["tp"]
    if plan is None:
        plan = tensor_parallel_plan(model, mesh.size())
    if plan:
        parallelize_module(model, mesh, plan)
    return model


# ------------------------------------------------------------------------------------------ one entry point

STRATEGIES = ("none", "ddp", "fsdp2", "tp", "fsdp2+tp")


@dataclass
class Parallelized:
    """What `parallelize` returns: the wrapped model and how the caller must split its data.

    model: the model to train (DDP wrapper, FSDP2 module or the TP-sharded model).
    dp_rank, dp_size: this rank's data-parallel index and the number of data-parallel groups; ranks with the
        same dp_rank (the TP ranks of one group) must see the same batch.
    tp_size: tensor-parallel degree (1 without TP). mesh: the device mesh (None for "none" and "ddp").
    """

    model: nn.Module
    dp_rank: int
    dp_size: int
    tp_size: int
    mesh: DeviceMesh | None


def parallelize(
    model: nn.Module,
    strategy: str = "none",
    *,
    tp_size: int | None = None,
    device: torch.device | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    block_types_or_names: Iterable[type | str] | None = None,
) -> Parallelized:
    """Apply a named strategy (a config's `distributed.strategy`) after `init_distributed()`.

    "none": the model unchanged (and a single-process run of any strategy is "none"); "ddp": `apply_ddp`;
    "fsdp2": `apply_fsdp2` over all ranks; "tp": `apply_tensor_parallel` over all ranks (every rank sees the
    same data); "fsdp2+tp": a 2-D mesh ("dp", "tp") of world / tp_size by tp_size ranks, TP inside each
    group of tp_size consecutive ranks, then FSDP2 across the groups.

    Args:
        model: on `device`, identical on every rank (same seed or same weights).
        strategy: one of `STRATEGIES`.
        tp_size: TP degree; None means all ranks for "tp" (required for "fsdp2+tp").
        device: the rank's device (from `init_distributed`); None uses the model's.
        mp_policy, block_types_or_names: for FSDP2 (see `apply_fsdp2`).
    """
    from torch.distributed.device_mesh import init_device_mesh

    from vermeil.distributed.runtime import get_rank, get_world_size, is_distributed

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    device = device if device is not None else next(model.parameters()).device
    world, rank = get_world_size(), get_rank()
    if strategy == "none" or not is_distributed():
        return Parallelized(model, 0, 1, 1, None)
    if strategy == "ddp":
        return Parallelized(apply_ddp(model, device), rank, world, 1, None)
    if strategy == "fsdp2":
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
        fsdp = apply_fsdp2(model, block_types_or_names, mp_policy, mesh=mesh)
        return Parallelized(fsdp, rank, world, 1, mesh)
    if tp_size is None:
        if strategy == "fsdp2+tp":
            raise ValueError("strategy='fsdp2+tp' needs tp_size")
        tp_size = world
    if not isinstance(tp_size, int) or tp_size < 1 or world % tp_size:
        raise ValueError(f"tp_size={tp_size!r} must be a positive divisor of world_size={world}")
    plan = tensor_parallel_plan(model, tp_size)  # validates head counts before any collective
    if strategy == "tp":
        if tp_size != world:
            raise ValueError(f"strategy='tp' uses all ranks: tp_size={tp_size} must equal world_size={world}")
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
        return Parallelized(apply_tensor_parallel(model, mesh, plan), 0, 1, tp_size, mesh)
    mesh = init_device_mesh(device.type, (world // tp_size, tp_size), mesh_dim_names=("dp", "tp"))
    apply_tensor_parallel(model, mesh["tp"], plan)
    fsdp = apply_fsdp2(model, block_types_or_names, mp_policy, mesh=mesh["dp"])
    return Parallelized(fsdp, mesh.get_local_rank("dp"), world // tp_size, tp_size, mesh)
