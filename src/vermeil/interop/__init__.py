"""Bridges to the checkpoints of other libraries: `from_transformers`, `to_transformers`, `from_diffusers`.

Each foreign layout lives in its own module as a key map plus the few tensor transforms it needs (RoPE
row permutation, fused/split projections, swapped modulation halves). Those modules are imported only when
called, so `import vermeil.interop` needs neither transformers nor diffusers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

import torch
from torch import Tensor, nn

# transformers class name -> (module in vermeil.interop, converter to Vermeil, converter back)
_TRANSFORMERS = {
    "LlamaForCausalLM": ("transformers_llama", "from_transformers_llama", "to_transformers_llama"),
    "Llama4ForCausalLM": ("transformers_llama", "from_transformers_llama", "to_transformers_llama"),
    "MambaForCausalLM": ("transformers_mamba", "from_transformers_mamba", "to_transformers_mamba"),
    "Mamba2ForCausalLM": ("transformers_hybrids", "from_transformers_mamba2", "to_transformers_mamba2"),
    "JambaForCausalLM": ("transformers_hybrids", "from_transformers_jamba", "to_transformers_jamba"),
    "BambaForCausalLM": ("transformers_hybrids", "from_transformers_bamba", "to_transformers_bamba"),
    "FalconH1ForCausalLM": (
        "transformers_hybrids",
        "from_transformers_falcon_h1",
        "to_transformers_falcon_h1",
    ),
}
# Vermeil class name -> the transformers conversion that takes it back
_TO_TRANSFORMERS = {
    "LLM": ("transformers_llama", "to_transformers_llama"),
    "MambaLM": ("transformers_mamba", "to_transformers_mamba"),
    # the class follows the layer pattern (`transformers_hybrids.transformers_class_for`)
    "HybridModel": ("transformers_hybrids", "to_transformers_hybrid"),
}


def _converter(module: str, name: str) -> Any:
    return getattr(import_module(f"vermeil.interop.{module}"), name)


# The checks the converter modules share.


def _check_silu(cls: str, config: Any) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(
            f"{cls}: hidden_act={act!r} is not supported: every Vermeil mixer and SwiGLU uses silu"
        )


@torch.no_grad()
def _load_strict(model: nn.Module, state_dict: dict[str, Tensor], what: str) -> None:
    """Load `state_dict` into `model` after checking that every key is present, none is extra and every shape
    is equal (each named otherwise)."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:20]}, unexpected keys {unexpected[:20]}")
    for key, value in expected.items():
        if value.shape != state_dict[key].shape:
            raise ValueError(
                f"{what}: {key} has shape {tuple(state_dict[key].shape)}, expected {tuple(value.shape)}"
            )
    model.load_state_dict(state_dict, strict=True)


def from_transformers(hf_model: nn.Module) -> nn.Module:
    """Convert a transformers model into Vermeil's: LlamaForCausalLM and Llama4ForCausalLM into an `LLM`,
    MambaForCausalLM into a `MambaLM`, Mamba2ForCausalLM, JambaForCausalLM, BambaForCausalLM and
    FalconH1ForCausalLM into a `HybridModel`."""
    cls = type(hf_model).__name__
    if cls not in _TRANSFORMERS:
        raise ValueError(f"from_transformers: {cls} is not supported; supported: {sorted(_TRANSFORMERS)}")
    module, forward, _ = _TRANSFORMERS[cls]
    return _converter(module, forward)(hf_model)


def to_transformers(model: nn.Module) -> Any:
    """Convert a Vermeil model (LLM, MambaLM, HybridModel) back into the matching transformers model; a
    HybridModel becomes the class of its layer pattern (Mamba2, Jamba, Bamba or FalconH1)."""
    cls = type(model).__name__
    if cls not in _TO_TRANSFORMERS:
        raise ValueError(f"to_transformers: {cls} is not supported; supported: {sorted(_TO_TRANSFORMERS)}")
    return _converter(*_TO_TRANSFORMERS[cls])(model)


def from_diffusers(transformer: nn.Module) -> nn.Module:
    """Convert a diffusers FluxTransformer2DModel into a Vermeil `Flux` with BFL's module names."""
    cls = type(transformer).__name__
    if cls != "FluxTransformer2DModel":
        raise ValueError(f"from_diffusers: {cls} is not supported; supported: ['FluxTransformer2DModel']")
    return _converter("diffusers_flux", "from_diffusers")(transformer)


__all__ = ["from_diffusers", "from_transformers", "to_transformers"]
