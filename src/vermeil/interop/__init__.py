"""Bridges to the checkpoints of other libraries: `from_transformers`, `to_transformers`, `from_diffusers`.

One module per foreign layout (a key map plus its few tensor transforms), imported only when called, so
`import vermeil.interop` needs neither transformers nor diffusers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from vermeil.nn.mamba2 import SegmentScaledLinear
from vermeil.nn.positional import RotaryEmbedding

M = TypeVar("M", bound=nn.Module)

# class name -> "module.function" in vermeil.interop that converts it
_TRANSFORMERS = {
    "LlamaForCausalLM": "transformers_llama.from_transformers_llama",
    "Llama4ForCausalLM": "transformers_llama.from_transformers_llama",
    "MambaForCausalLM": "transformers_mamba.from_transformers_mamba",
    "Mamba2ForCausalLM": "transformers_hybrids.from_transformers_hybrid",
    "JambaForCausalLM": "transformers_hybrids.from_transformers_hybrid",
    "BambaForCausalLM": "transformers_hybrids.from_transformers_hybrid",
    "FalconH1ForCausalLM": "transformers_hybrids.from_transformers_hybrid",
}
_TO_TRANSFORMERS = {
    "LLM": "transformers_llama.to_transformers_llama",
    "MambaLM": "transformers_mamba.to_transformers_mamba",
    "HybridModel": "transformers_hybrids.to_transformers_hybrid",
}
_DIFFUSERS = {"FluxTransformer2DModel": "diffusers_flux.from_diffusers"}
_TO_DIFFUSERS = {"Flux": "diffusers_flux.to_diffusers"}
# Vermeil models have no special tokens; transformers' defaults (Llama's bos 1, eos 2) would be made up.
_NO_SPECIAL_TOKENS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _convert(what: str, table: dict[str, str], model: nn.Module) -> Any:
    cls = type(model).__name__
    if cls not in table:
        raise ValueError(f"{what}: {cls} is not supported; supported: {sorted(table)}")
    module, _, name = table[cls].partition(".")
    return getattr(import_module(f"vermeil.interop.{module}"), name)(model)


def _check_silu(cls: str, config: Any) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{cls}: hidden_act={act!r} is not supported: Vermeil's mixers and SwiGLU use silu")


@torch.no_grad()
def _load_strict(model: nn.Module, state_dict: dict[str, Tensor], what: str) -> None:
    """`model.load_state_dict(state_dict)`, naming every missing or unexpected key and any shape mismatch."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:20]}, unexpected keys {unexpected[:20]}")
    for key, value in expected.items():
        if (got := tuple(state_dict[key].shape)) != tuple(value.shape):
            raise ValueError(f"{what}: {key} has shape {got}, expected {tuple(value.shape)}")
    model.load_state_dict(state_dict, strict=True)


def _build(model_cls: type[M], config: Any, state: dict[str, Tensor], like: nn.Module) -> M:
    """`model_cls(config)` holding `state`, built on meta, then given the device, dtype and train/eval mode of
    `like` (the model it is converted from)."""
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
    """A transformers model as Vermeil's: Llama and Llama 4 -> `LLM`, Mamba -> `MambaLM`, Mamba2, Jamba, Bamba
    and FalconH1 -> `HybridModel`."""
    return _convert("from_transformers", _TRANSFORMERS, hf_model)


def to_transformers(model: nn.Module) -> Any:
    """The inverse of `from_transformers`; a HybridModel becomes the class of its layer pattern."""
    return _convert("to_transformers", _TO_TRANSFORMERS, model)


def from_diffusers(transformer: nn.Module) -> nn.Module:
    """A diffusers FluxTransformer2DModel as a Vermeil `Flux` with BFL's module names."""
    return _convert("from_diffusers", _DIFFUSERS, transformer)


def to_diffusers(model: nn.Module) -> Any:
    """The inverse of `from_diffusers`: a Vermeil `Flux` as a diffusers FluxTransformer2DModel."""
    return _convert("to_diffusers", _TO_DIFFUSERS, model)


__all__ = ["from_diffusers", "from_transformers", "to_diffusers", "to_transformers"]
