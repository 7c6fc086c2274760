"""Bridges to the checkpoints of other libraries: `from_transformers`, `to_transformers`, `from_diffusers`.

Each foreign layout lives in its own module as a key map plus the few tensor transforms it needs (RoPE
row permutation, fused/split projections, swapped modulation halves). Those modules are imported only when
called, so `import vermeil.interop` needs neither transformers nor diffusers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from vermeil.nn.mamba2 import SegmentScaledLinear
from vermeil.nn.positional import RotaryEmbedding

M = TypeVar("M", bound=nn.Module)

# transformers class name -> "module.function" in vermeil.interop converting it to Vermeil
_TRANSFORMERS = {
    "LlamaForCausalLM": "transformers_llama.from_transformers_llama",
    "Llama4ForCausalLM": "transformers_llama.from_transformers_llama",
    "MambaForCausalLM": "transformers_mamba.from_transformers_mamba",
    "Mamba2ForCausalLM": "transformers_hybrids.from_transformers_hybrid",
    "JambaForCausalLM": "transformers_hybrids.from_transformers_hybrid",
    "BambaForCausalLM": "transformers_hybrids.from_transformers_hybrid",
    "FalconH1ForCausalLM": "transformers_hybrids.from_transformers_hybrid",
}
# Vermeil class name -> the transformers conversion that takes it back
_TO_TRANSFORMERS = {
    "LLM": "transformers_llama.to_transformers_llama",
    "MambaLM": "transformers_mamba.to_transformers_mamba",
    # the class follows the layer pattern (`transformers_hybrids.transformers_class_for`)
    "HybridModel": "transformers_hybrids.to_transformers_hybrid",
}
# Configs going out name no special tokens: Vermeil models have none (transformers' defaults, such as Llama's
# bos 1 and eos 2, would be made up).
_NO_SPECIAL_TOKENS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _convert(what: str, table: dict[str, str], model: nn.Module) -> Any:
    """Call the converter `table` names for `model`'s class ("module.function" in vermeil.interop)."""
    cls = type(model).__name__
    if cls not in table:
        raise ValueError(f"{what}: {cls} is not supported; supported: {sorted(table)}")
    module, _, name = table[cls].partition(".")
    return getattr(import_module(f"vermeil.interop.{module}"), name)(model)


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


def _build(model_cls: type[M], config: Any, state: dict[str, Tensor], like: nn.Module) -> M:
    """`model_cls(config)` holding `state` (checked by `_load_strict`), built on the meta device and placed on
    the device, in the dtype and in the train/eval mode of `like`, the model it is converted from."""
    weight = next(like.parameters())
    model = model_cls(config, device="meta", dtype=weight.dtype)  # type: ignore[call-arg]
    embedding, _, head = (model.get_submodule(name) for name in model.lm_parts)
    tied = head.weight is embedding.weight
    model.to_empty(device=weight.device)
    if tied:  # to_empty may give each name its own tensor
        head.weight = embedding.weight
    for mod in model.modules():  # non-persistent buffers hold garbage after to_empty: rebuild them
        if isinstance(mod, (RotaryEmbedding, SegmentScaledLinear)):
            mod.reset_parameters()
    _load_strict(model, state, f"from_transformers({type(like).__name__})")
    return model.train(like.training)


def from_transformers(hf_model: nn.Module) -> nn.Module:
    """Convert a transformers model into Vermeil's: LlamaForCausalLM and Llama4ForCausalLM into an `LLM`,
    MambaForCausalLM into a `MambaLM`, Mamba2ForCausalLM, JambaForCausalLM, BambaForCausalLM and
    FalconH1ForCausalLM into a `HybridModel`."""
    return _convert("from_transformers", _TRANSFORMERS, hf_model)


def to_transformers(model: nn.Module) -> Any:
    """Convert a Vermeil model (LLM, MambaLM, HybridModel) back into the matching transformers model; a
    HybridModel becomes the class of its layer pattern (Mamba2, Jamba, Bamba or FalconH1)."""
    return _convert("to_transformers", _TO_TRANSFORMERS, model)


def from_diffusers(transformer: nn.Module) -> nn.Module:
    """Convert a diffusers FluxTransformer2DModel into a Vermeil `Flux` with BFL's module names."""
    return _convert(
        "from_diffusers", {"FluxTransformer2DModel": "diffusers_flux.from_diffusers"}, transformer
    )


__all__ = ["from_diffusers", "from_transformers", "to_transformers"]
