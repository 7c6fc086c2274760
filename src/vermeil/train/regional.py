"""Regional compilation: `torch.compile` on each repeated block of a model instead of on the whole model.

Identical blocks run the same Python code, so Dynamo traces it once and every block of one structure reuses
the compiled graph (torchtitan `distributed/compile.py` `apply_compile`; diffusers
`ModelMixin.compile_repeated_blocks`). Each block's `forward` becomes an instance attribute, so weights and
state-dict names do not change and deleting it restores eager execution.
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

_MARK = "_vermeil_compiled_forward"


def resolve_compile(setting: bool | str, device: torch.device | str, *, world_size: int = 1) -> bool:
    """`train.compile` as a yes/no: "auto" is True on CUDA in a single process (on the CPU the compile time
    outweighs the gain at the sizes trained here; under torchrun, compiling with sharding stays explicit)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"compile={setting!r} must be true, false or 'auto'")
    return torch.device(device).type == "cuda" and world_size == 1


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of each block to compile, in model order: the modules whose class a model's
    `_repeated_blocks` names (diffusers-style), else the children of every outermost `nn.ModuleList` of one
    class (`LLM.layers`, `Flux.double_blocks`, ...); lists inside a chosen block are left to its graph."""
    declared = getattr(model, "_repeated_blocks", None)
    chosen: list[tuple[str, nn.Module]] = []

    def inside(name: str) -> bool:  # in a chosen block: left to its graph
        return any(name == p or name.startswith(p + ".") for p, _ in chosen)

    if declared:
        names = {declared} if isinstance(declared, str) else set(declared)
        for name, module in model.named_modules():
            if name and not inside(name) and type(module).__name__ in names:
                chosen.append((name, module))
        return chosen
    for name, module in model.named_modules():
        if inside(name) or not isinstance(module, nn.ModuleList) or len({type(c) for c in module}) != 1:
            continue
        chosen += [(f"{name}.{i}" if name else str(i), child) for i, child in enumerate(module)]
    return chosen


def compile_blocks(model: nn.Module, **options: Any) -> list[str]:
    """Compile each repeated block of `model` in place with `torch.compile(**options)`; returns their names.
    Default `dynamic=False`: a training run has one shape per micro-batch."""
    options = {"dynamic": False, **options}
    names = []
    for name, block in repeated_blocks(model):
        if getattr(block, _MARK, None) is not None:
            continue
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
