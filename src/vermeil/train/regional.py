"""Regional compilation: `torch.compile` on each repeated block of a model instead of on the whole model.

Identical blocks (the layers of a decoder, the double/single blocks of Flux) run the same Python code, so
Dynamo traces that code once and every block of the same structure reuses the one compiled graph: the first
step pays for one block per distinct kind, not for the whole unrolled stack. torchtitan compiles its
TransformerBlocks this way (`torchtitan/distributed/compile.py`, `apply_compile`); diffusers' equivalent is
`ModelMixin.compile_repeated_blocks`.

Which blocks: a model may name them diffusers-style with a `_repeated_blocks` attribute (class names);
otherwise every outermost `nn.ModuleList` whose children all share one class (`LLM.layers`,
`MambaLM.backbone.layers`, `HybridModel.layers`, `Flux.double_blocks` and `Flux.single_blocks`). Lists inside
a chosen block (an MoE's experts) are left to the block's graph.

Each block's `forward` is replaced by its compiled version (an instance attribute, so the weights, their
names and the state dict do not change, and `uncompile_blocks` restores eager execution by deleting it).
Shapes are static (`dynamic=False`): a training run has one shape per micro-batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "compile_blocks",
    "compiled_calls",
    "is_compiled",
    "repeated_blocks",
    "resolve_compile",
    "uncompile_blocks",
]

# Marks a block whose forward this module replaced (so uncompile touches only those).
_MARK = "_vermeil_compiled_forward"


def resolve_compile(setting: bool | str, device: torch.device | str, *, world_size: int = 1) -> bool:
    """`train.compile` as a yes/no: an explicit bool wins; "auto" is True on CUDA in a single process (a
    compiled step pays off there; on the CPU the compile time outweighs the gain at the sizes trained here,
    and under torchrun the order of compilation and sharding is left to an explicit choice).

    Raises:
        ValueError: a value other than True, False or "auto".
    """
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"compile={setting!r} must be true, false or 'auto'")
    return torch.device(device).type == "cuda" and world_size == 1


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of each block to compile, in model order (see the module docstring)."""
    declared = getattr(model, "_repeated_blocks", None)
    chosen: list[tuple[str, nn.Module]] = []
    taken: list[str] = []  # prefixes of chosen blocks: nothing inside them is chosen again

    def inside(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in taken)

    if declared:
        names = {declared} if isinstance(declared, str) else set(declared)
        for name, module in model.named_modules():
            if name and not inside(name) and type(module).__name__ in names:
                chosen.append((name, module))
                taken.append(name)
        return chosen
    for name, module in model.named_modules():
        if inside(name) or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        for i, child in enumerate(module):
            qualified = f"{name}.{i}" if name else str(i)
            chosen.append((qualified, child))
            taken.append(qualified)
    return chosen


def compile_blocks(model: nn.Module, **options: Any) -> list[str]:
    """Compile each repeated block of `model` in place; returns their names ([] when there are none).

    Args:
        options: `torch.compile` keywords; default `dynamic=False` (one shape per run: no symbolic sizes).
    """
    options = {"dynamic": False, **options}
    names = []
    for name, block in repeated_blocks(model):
        if getattr(block, _MARK, None) is not None:
            continue
        # The bound forward, compiled: all blocks of one class share its code object, hence Dynamo's cache.
        compiled = torch.compile(block.forward, **options)
        calls = [0]  # how often the compiled forward ran (`compiled_calls`)

        def forward(*args: Any, _compiled: Any = compiled, _calls: list[int] = calls, **kwargs: Any) -> Any:
            _calls[0] += 1
            return _compiled(*args, **kwargs)

        block.forward = forward  # type: ignore[method-assign]
        setattr(block, _MARK, calls)
        names.append(name)
    return names


def _compiled(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, _MARK, None) is not None]


def compiled_calls(model: nn.Module) -> int:
    """How many times the compiled forwards of `model`'s blocks have run. A model that calls its blocks by
    another method than `block(...)` / `block.forward(...)` never runs them: 0 after a step says so."""
    return sum(getattr(m, _MARK)[0] for m in _compiled(model))


def uncompile_blocks(model: nn.Module) -> int:
    """Undo `compile_blocks`: the blocks run their eager forward again. Returns how many were restored."""
    blocks = _compiled(model)
    for module in blocks:
        module.__dict__.pop("forward", None)
        delattr(module, _MARK)
    return len(blocks)


def is_compiled(model: nn.Module) -> bool:
    """Whether any block of `model` runs a forward compiled by `compile_blocks`."""
    return bool(_compiled(model))
