"""Tensor parallelism (Megatron layout) as DTensor plans applied from outside the model, by module name.

Axis legend: B batch, T length, D model dim, H heads, Hkv kv heads, Dh head dim, F feed-forward hidden dim,
E experts, M Flux MLP width, V vocabulary, tp the tensor-parallel degree.

What is split (`_module_plan`, by module type; every size, the vocabulary with loss or sequence parallelism,
is checked before any collective):
- Attention: `wq`/`wk`/`wv` column-, `wo` row-parallel, so each rank runs H/tp query and Hkv/tp kv heads and
  contiguous shards keep GQA's grouping; learnable qk-norm scales are replicated with summed gradients.
- Feed-forward: SwiGLU/GeGLU `w1`/`w3` column-, `w2` row-parallel; MLP `fc1` column-, `fc2` row-parallel.
- MoE: the routed experts' F is split with the "grouped" and "padded" backends (`_ExpertTensorParallel`);
  "loop" and "dense" keep them replicated.
- Flux: the fused `qkv`, `linear1`, `linear2` block by block (`_StridedShard`; M a multiple of D), the MLPs
  column/row-parallel; modulations, embedders and the final layer stay replicated.

Sequence parallel (torchtitan's layout): the residual stream is (B, T/tp, D), from the model's own
`sequence_parallel_plan()` (style names, `vermeil.models.contract`). Loss parallel: the head named in
`lm_parts` is vocab-sharded, for a cross-entropy under `torch.distributed.tensor.parallel.loss_parallel()`.

Not split: `ParallelTransformerBlock` and `MambaBlock` stay replicated. KV caches hold all Hkv heads, so TP
decoding is refused; a per-head (B, H, T, S) mask would need slicing to the local heads.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

from vermeil.nn.attention import Attention
from vermeil.nn.feedforward import GLU, FeedForward
from vermeil.nn.moe import Experts, MoE

__all__ = ["apply_tensor_parallel", "tensor_parallel_plan"]


def _distribute(
    style: ParallelStyle, module: nn.Module, pname: str, mesh: DeviceMesh, placement: Any
) -> None:
    """Replace `module.<pname>` by a DTensor Parameter with `placement`, keeping `requires_grad`."""
    param = module._parameters[pname]
    dist = distribute_tensor(param, mesh, [placement], src_data_rank=style.src_data_rank)
    module.register_parameter(pname, nn.Parameter(dist, requires_grad=param.requires_grad))


def _sum_over_ranks(mesh: DeviceMesh, partial_sum: Tensor) -> Tensor:
    """All-reduce (sum) a plain tensor that holds this rank's partial sum."""
    dt = DTensor.from_local(partial_sum, mesh, (Partial(),), run_check=False)
    return dt.redistribute(placements=(Replicate(),)).to_local()


class _Chunked:
    """A fused-projection style: `chunks` equal blocks, each split over the ranks on its own."""

    def __init__(self, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks

    def __repr__(self) -> str:
        return f"{type(self).__name__}(chunks={self.chunks})"


class _FusedColwiseParallel(_Chunked, ColwiseParallel):
    """ColwiseParallel for a Linear whose output stacks `chunks` equal blocks (Flux's [q; k; v; mlp]): each
    block split on its own, so a rank's output is [q_r; k_r; v_r] (a plain one gives rank 0 all of q)."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        for pname, _ in list(module.named_parameters(recurse=False)):
            _distribute(self, module, pname, device_mesh, _StridedShard(0, split_factor=self.chunks))

    @staticmethod
    def _prepare_output_fn(
        output_layouts: Any, use_local_output: bool, mod: nn.Module, outputs: DTensor, device_mesh: DeviceMesh
    ) -> Tensor:
        # DTensor propagates the weight's strided placement to the last axis: the local part is already the
        # rank's [q_r; k_r; v_r] (a redistribute to Shard(-1) would reorder it).
        (placement,) = outputs.placements
        if not isinstance(placement, _StridedShard):  # internal: sharding propagation changed
            raise RuntimeError(
                f"fused column-parallel output has placement {placement}, expected _StridedShard"
            )
        return outputs.to_local()


class _FusedRowwiseParallel(_Chunked, RowwiseParallel):
    """RowwiseParallel for a Linear whose input concatenates `chunks` equal blocks (Flux's `linear2` on
    [attention; mlp]), split block by block to match a `_FusedColwiseParallel` output upstream."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        _distribute(self, module, "weight", device_mesh, _StridedShard(1, split_factor=self.chunks))
        if module.bias is not None:
            _distribute(self, module, "bias", device_mesh, Replicate())

    def _prepare_input_fn(  # type: ignore[override]  # RowwiseParallel._apply binds it with its layouts
        self, layouts: Any, desired_layouts: Any, mod: nn.Module, inputs: Any, device_mesh: DeviceMesh
    ) -> DTensor:
        x = inputs[0]  # (..., K/tp) local: the rank's piece of each block, concatenated (no redistribute)
        placement = _StridedShard(x.ndim - 1, split_factor=self.chunks)
        return DTensor.from_local(x, device_mesh, (placement,), run_check=False)


class _HeadPartialGradients(ParallelStyle):
    """Keep a module's parameters plain and replicated; all-reduce their gradients (a hook per parameter).

    For Flux's QK-norm scales, read directly by the blocks: each rank's q/k hold its own heads, so a scale's
    gradient is a partial sum. flux.py needs no DTensor.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for param in module.parameters():
            if param.requires_grad:
                param.register_hook(partial(_sum_over_ranks, device_mesh))
        return module


class _ExpertTensorParallel(ParallelStyle):
    """Split the hidden dim F of stacked SwiGLU experts (`vermeil.nn.moe.Experts`) over the ranks.

    w1/w3 (E, D, F) become `Shard(2)`, w2 (E, F, D) `Shard(1)`: on rank r expert e computes
    `silu(x @ w1[e][:, Fr]) * (x @ w3[e][:, Fr]) @ w2[e][Fr]`, a partial sum; the hooks sum the output and the
    input's gradient over the ranks (every rank holds all routed rows (S, D)).
    """

    _WEIGHTS = (("w1", 2), ("w3", 2), ("w2", 1))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, Experts):
            raise NotImplementedError(
                f"{type(self).__name__} supports Experts only, got {type(module).__name__}"
            )
        for pname, dim in self._WEIGHTS:
            _distribute(self, module, pname, device_mesh, Shard(dim))
        module.register_forward_pre_hook(partial(self._partial_input_grad, device_mesh))
        module.register_forward_hook(lambda module, args, y_SD: _sum_over_ranks(device_mesh, y_SD))
        return module

    @staticmethod
    def _partial_input_grad(mesh: DeviceMesh, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x_SD, *rest = args
        # The backward of this pair all-reduces x's gradient (Partial -> Replicate); forward is a no-op.
        x_SD = DTensor.from_local(x_SD, mesh, (Replicate(),), run_check=False).to_local(
            grad_placements=(Partial(),)
        )
        return (x_SD, *rest)


@dataclasses.dataclass(eq=False)
class _SequenceGathered(ParallelStyle):
    """Sequence parallel around a replicated module that needs the whole sequence (Mamba, an MoE).

    The first input (B, T/tp, D) is all-gathered to (B, T, D); the output (or its dataclass `output_field`,
    e.g. `MoEOutput.out`) is cut back to this rank's T/tp positions. Other inputs pass unchanged.
    """

    output_field: str | None = None

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.register_forward_pre_hook(partial(self._gather, device_mesh))
        module.register_forward_hook(partial(self._scatter, device_mesh, self.output_field))
        return module

    @staticmethod
    def _gather(mesh: DeviceMesh, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x, *rest = args
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (Shard(1),), run_check=False)
        return (x.redistribute(placements=(Replicate(),)).to_local(), *rest)

    @staticmethod
    def _scatter(
        mesh: DeviceMesh, field: str | None, module: nn.Module, args: tuple[Any, ...], output: Any
    ) -> Any:
        full = output if field is None else getattr(output, field)
        local = DTensor.from_local(full, mesh, (Replicate(),), run_check=False)
        local = local.redistribute(placements=(Shard(1),)).to_local()
        return local if field is None else dataclasses.replace(output, **{field: local})


class _SequenceShardedEmbedding(RowwiseParallel):
    """Vocab-parallel embedding (rows `Shard(0)`), output reduce-scattered to `Shard(1)`; T % tp == 0."""

    def __init__(self) -> None:
        super().__init__(input_layouts=Replicate(), output_layouts=Shard(1))

    @staticmethod
    def _prepare_input_fn(
        layouts: Any, desired_layouts: Any, mod: nn.Module, inputs: tuple[Any, ...], device_mesh: DeviceMesh
    ) -> Any:
        tokens, tp = inputs[0], device_mesh.size()
        if tokens.ndim < 2 or tokens.shape[1] % tp:
            raise ValueError(
                f"sequence_parallel=True needs tokens (B, T) with T divisible by tp_size={tp}, "
                f"got shape {tuple(tokens.shape)}"
            )
        return RowwiseParallel._prepare_input_fn(layouts, desired_layouts, mod, inputs, device_mesh)


class _VocabParallelHead(ColwiseParallel):
    """The LM head for loss parallelism, rows `Shard(0)`: (B, T, V) logits sharded over V in training,
    all-gathered into a plain tensor in eval mode (evaluation and sampling run unchanged)."""

    def __init__(self, *, input_layouts: Any = None) -> None:
        super().__init__(input_layouts=input_layouts, output_layouts=Shard(-1), use_local_output=False)

    @staticmethod
    def _prepare_output_fn(
        output_layouts: Any, use_local_output: bool, mod: nn.Module, outputs: DTensor, device_mesh: DeviceMesh
    ) -> Tensor:
        return outputs if mod.training else outputs.redistribute(placements=(Replicate(),)).to_local()


def _check_divisible(module_name: str, what: str, value: int, tp_size: int, why: str) -> None:
    if value % tp_size:
        raise ValueError(
            f"{what}={value} of module {module_name!r} must be divisible by the tensor-parallel degree "
            f"tp_size={tp_size} ({why})"
        )


def _module_plan(name: str, module: nn.Module, tp: int) -> dict[str, ParallelStyle]:
    """The Megatron entries for one module (attention, feed-forward, MoE, Flux blocks), by its type."""
    from vermeil.models.flux import DoubleStreamBlock, FluxSelfAttention, SingleStreamBlock

    p = f"{name}." if name else ""
    label = name or "<root>"
    heads_why = "each rank attends over whole local heads"
    plan: dict[str, ParallelStyle] = {}
    if isinstance(module, Attention):  # every attention of the house (the LLM's maps Meta's names onto it)
        for what, value in zip(module.head_names, (module.heads, module.kv_heads), strict=True):
            _check_divisible(label, what, value, tp, heads_why)  # named as the user's config spells them
        if tp > 1 and module.kv_cache is not None:  # it holds all Hkv heads; each rank writes Hkv / tp
            raise ValueError(
                f"module {label!r} has a KV cache: tensor-parallel decoding is not supported "
                "(call delete_cache() before parallelizing)"
            )
        for proj in ("wq", "wk", "wv"):
            plan[p + proj] = ColwiseParallel()
        plan[p + "wo"] = RowwiseParallel()
        for half in ("query_norm", "key_norm"):
            norm = getattr(module.qk_norm, half, None)
            if getattr(norm, "scale", None) is not None:  # a learnable QKNorm (Llama 4's has no weight)
                # q/k are (B, H/tp, T, Dh) local: dim 1 is the sharded head axis
                plan[f"{p}qk_norm.{half}"] = SequenceParallel(sequence_dim=1, use_local_output=True)
    elif isinstance(module, GLU):
        _check_divisible(label, "hidden_dim", module.w1.out_features, tp, "w1/w3 are split by rows")
        plan[p + "w1"] = ColwiseParallel()
        plan[p + "w3"] = ColwiseParallel()
        plan[p + "w2"] = RowwiseParallel()
    elif isinstance(module, FeedForward):
        _check_divisible(label, "hidden_dim", module.fc1.out_features, tp, "fc1 is split by rows")
        plan[p + "fc1"] = ColwiseParallel()
        plan[p + "fc2"] = RowwiseParallel()
    elif isinstance(module, MoE):
        # the shared expert is a GLU: its own entry
        if module.backend in ("grouped", "padded") and isinstance(module.experts, Experts):
            _check_divisible(label, "hidden_dim", module.hidden_dim, tp, "each expert's hidden dim is split")
            plan[p + "experts"] = _ExpertTensorParallel()
    elif isinstance(module, FluxSelfAttention):
        _check_divisible(label, "num_heads", module.num_heads, tp, heads_why)
        plan[p + "qkv"] = _FusedColwiseParallel(3)  # [q; k; v]
        plan[p + "proj"] = RowwiseParallel()
        plan[p + "norm"] = _HeadPartialGradients()
    elif isinstance(module, DoubleStreamBlock):
        for mlp in ("img_mlp", "txt_mlp"):
            hidden = getattr(module, mlp)[0].out_features
            _check_divisible(p + mlp, "mlp_hidden_dim", hidden, tp, "the MLP is split")
            plan[f"{p}{mlp}.0"] = ColwiseParallel()
            plan[f"{p}{mlp}.2"] = RowwiseParallel()
    elif isinstance(module, SingleStreamBlock):
        d, m = module.hidden_size, module.mlp_hidden_dim
        _check_divisible(label, "num_heads", module.num_heads, tp, heads_why)
        if m % d:
            raise ValueError(
                f"mlp_hidden_dim={m} of module {label!r} must be a multiple of hidden_size={d} for tensor "
                f"parallelism (linear1 fuses [q; k; v; mlp] and is split in blocks of hidden_size)"
            )
        plan[p + "linear1"] = _FusedColwiseParallel(3 + m // d)  # [q; k; v; mlp] in blocks of D
        plan[p + "linear2"] = _FusedRowwiseParallel(1 + m // d)  # input [attention; mlp] in blocks of D
        plan[p + "norm"] = _HeadPartialGradients()
    return plan


def _sequence_style(name: str, style: str) -> ParallelStyle:
    """The `ParallelStyle` of a `sequence_parallel_plan()` style name (`vermeil.models.contract`)."""
    kind, _, arg = style.partition(":")
    if kind == "local" and not arg:
        return SequenceParallel()
    if kind == "local_replicated" and not arg:
        # Replicated weights on the local tokens; their gradients are partial sums DTensor all-reduces.
        return SequenceParallel(use_local_output=True)
    if kind == "gather" and (not arg or arg.isdigit()):
        # the first of N inputs all-gathered (B, T/tp, D) -> (B, T, D) as a plain tensor, the others unchanged
        rest = (None,) * (int(arg or 1) - 1)
        return PrepareModuleInput(
            input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest), use_local_output=True
        )
    if kind == "row_scatter" and not arg:
        return RowwiseParallel(output_layouts=Shard(1))
    if kind == "whole":
        return _SequenceGathered(arg or None)
    raise ValueError(
        f"sequence_parallel_plan() entry {name!r} has style {style!r}; the styles are "
        "'local', 'local_replicated', 'gather[:N]', 'row_scatter' and 'whole[:FIELD]' (vermeil.models.contract)"
    )


def _sequence_parallel_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """The model's sequence-parallel entries; they override the Megatron row-parallel outputs (reduce-scatter
    to `Shard(1)` in place of all-reduce)."""
    describe = getattr(model, "sequence_parallel_plan", None)
    if describe is None:
        raise ValueError(
            "sequence_parallel=True supports models that describe a sequence_parallel_plan(): "
            f"vermeil.models.llm.LLM and vermeil.models.hybrid.HybridModel, got {type(model).__name__}"
        )
    return {name: _sequence_style(name, style) for name, style in describe().items()}


def _head_plan(
    model: nn.Module, tp: int, sequence_parallel: bool, loss_parallel: bool
) -> dict[str, ParallelStyle]:
    """Embedding, final norm and head entries for sequence and/or loss parallelism."""
    parts = getattr(model, "lm_parts", None)  # (embedding, final norm, head) of a language model
    if parts is None:
        raise ValueError(
            f"loss_parallel=True needs a language model with a known head (LLM, HybridModel, MambaLM), "
            f"got {type(model).__name__}"
        )
    emb_name, norm_name, head_name = parts
    head, emb = model.get_submodule(head_name), model.get_submodule(emb_name)
    _check_divisible(
        head_name, "vocab_size", head.out_features, tp, "the head's rows, the vocabulary, are split"
    )
    plan: dict[str, ParallelStyle] = {}
    if sequence_parallel:
        plan[emb_name] = _SequenceShardedEmbedding()
        plan[norm_name] = SequenceParallel()
        style = _VocabParallelHead if loss_parallel else partial(ColwiseParallel, output_layouts=Replicate())
        plan[head_name] = style(input_layouts=Shard(1))
        return plan
    plan[head_name] = _VocabParallelHead()
    if head.weight is emb.weight:
        # Tied: the embedding's rows take the same Shard(0) as the head's, so one DTensor can serve both.
        plan[emb_name] = RowwiseParallel(input_layouts=Replicate())
    return plan


def tensor_parallel_plan(
    model: nn.Module, tp_size: int, *, sequence_parallel: bool = False, loss_parallel: bool = False
) -> dict[str, ParallelStyle]:
    """{module name: ParallelStyle} for `parallelize_module` (the module docstring says what is split and
    checked); prefer `apply_tensor_parallel`, which also keeps tied embeddings tied."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tp_size={tp_size!r} must be an int >= 1")
    for flag, value in (("sequence_parallel", sequence_parallel), ("loss_parallel", loss_parallel)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag}={value!r} must be a bool")
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        plan.update(_module_plan(name, module, tp_size))
    check = getattr(model, "check_tensor_parallel", None)
    if check is not None:  # the model's own limits (vermeil.models.contract)
        check(sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    if sequence_parallel:
        plan.update(_sequence_parallel_plan(model))
    if sequence_parallel or loss_parallel:
        plan.update(_head_plan(model, tp_size, sequence_parallel, loss_parallel))
    return plan


def _tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (module, parameter name) that hold one Parameter object (tied embeddings)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():  # each module object once, even where it is shared
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, pname))
    return [group for group in owners.values() if len(group) > 1]


def _retie(group: list[tuple[nn.Module, str]]) -> None:
    """Point every owner of a tied parameter at one DTensor again (parallelize_module splits each copy)."""
    first = getattr(*group[0])
    for module, pname in group[1:]:
        if (p := getattr(module, pname)) is first:
            continue
        sharded_alike = (
            isinstance(p, DTensor) and isinstance(first, DTensor) and p.placements == first.placements
        )
        if not sharded_alike or p.shape != first.shape:
            where = [f"{type(m).__name__}.{n}" for m, n in group]
            raise ValueError(
                f"tied parameters {where} were sharded differently by the plan; shard them alike or untie them"
            )
        setattr(module, pname, first)


def apply_tensor_parallel(
    model: nn.Module,
    mesh: DeviceMesh,
    plan: dict[str, ParallelStyle] | None = None,
    *,
    sequence_parallel: bool = False,
    loss_parallel: bool = False,
) -> nn.Module:
    """Apply tensor parallelism in place with `parallelize_module`; tied parameters stay tied.

    Args:
        model: the full model, identical on every rank of `mesh`.
        mesh: a 1-D mesh of the TP ranks, or a multi-dim mesh with a dim named "tp".
        plan: None builds `tensor_parallel_plan(model, tp, sequence_parallel=..., loss_parallel=...)`.
    """
    if mesh.ndim > 1:
        names = mesh.mesh_dim_names or ()
        if "tp" not in names:
            raise ValueError(f"mesh has {mesh.ndim} dims {names}; name the tensor-parallel one 'tp'")
        mesh = mesh["tp"]
    if plan is None:
        plan = tensor_parallel_plan(
            model, mesh.size(), sequence_parallel=sequence_parallel, loss_parallel=loss_parallel
        )
    if plan:
        tied = _tied_parameters(model)
        parallelize_module(model, mesh, plan)
        for group in tied:
            _retie(group)
    return model
