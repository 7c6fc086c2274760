"""The model contract, stated once: what `generate`, the trainer, `vermeil info` and tensor parallelism may
rely on in every model of `vermeil.models`, so that none of them switches on a model's class.

Every model (`LLM`, `MambaLM`, `HybridModel`, `Flux`):

- `.config`: its config dataclass (`LLM.args` and `Flux.params` remain as read-only aliases).
- `attention_layers() -> list[AttentionLayer]`, one per attention layer, for the FLOPs `vermeil info` reports.

Every language model (`LLM`, `MambaLM`, `HybridModel`; the `LanguageModel` protocol below) also has:

- `forward(tokens, input_pos=None)`: tokens (B, T) integer ids (`vermeil.models.checks.check_tokens`),
  input_pos None (a plain forward, no cache read or written) or (T,) positions into the cache
  (`check_input_pos`). The output is (B, T, V) float32 logits, or, for a model with an auxiliary loss, an
  output with `.logits` and `.aux_loss` (`LLM`'s `TransformerOutput`, `HybridOutput`): read any of them with
  `split_output(output) -> (logits, aux_loss | None)`.
- `setup_cache(batch_size, max_seq_len, *, dtype=None, device=None)` (dtype/device default to the embedding's;
  works on the meta device, which is how `vermeil info` measures the cache), `reset_cache()`,
  `delete_cache()`: the functions of the same names below, taken as methods, over the modules (attention
  layers, Mamba mixers) the model's `cache_modules()` lists; they keep `cache_max_seq_len` /
  `cache_batch_size` (None: no cache) for the model's position checks.
- `lm_parts`: the names of the (embedding, final norm, head) submodules, for loss and sequence parallelism.
- `check_tensor_parallel(*, sequence_parallel, loss_parallel)`: raises ValueError, naming the setting and the
  rule, where the model cannot run that way.

A model that supports sequence parallelism also has `sequence_parallel_plan() -> {module name: style}` with the
styles below as plain strings (models import no distributed code; `vermeil.distributed.tensor_parallel` maps
each to a torch `ParallelStyle`). The residual stream between blocks is sharded over the sequence (B, T/tp, D):

- `"local"`: the module runs per token on the local shard (norms: `SequenceParallel`).
- `"local_replicated"`: the same for a module with replicated weights whose output stays a plain tensor
  (a merge gate: `SequenceParallel(use_local_output=True)`).
- `"gather"` / `"gather:N"`: the first of the module's N positional inputs (default 1) is all-gathered to the
  whole sequence (attention and feed-forward inputs: `PrepareModuleInput`).
- `"row_scatter"`: a row-parallel output projection that reduce-scatters to the sequence shard
  (`RowwiseParallel(output_layouts=Shard(1))`).
- `"whole"` / `"whole:FIELD"`: a module that needs the whole sequence and stays replicated (Mamba, an MoE):
  its input is gathered and its output (or the dataclass field FIELD of it) cut back to the local shard.

Axis legend: B batch, T sequence length, V vocabulary, H heads, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from vermeil.nn.checks import check_positive_ints

__all__ = [
    "SEQUENCE_PARALLEL_STYLES",
    "AttentionLayer",
    "LanguageModel",
    "build_preset",
    "delete_cache",
    "fill_tied_keys",
    "preset_config",
    "reset_cache",
    "setup_cache",
    "split_output",
]

C = TypeVar("C")
M = TypeVar("M")

SEQUENCE_PARALLEL_STYLES = ("local", "local_replicated", "gather", "row_scatter", "whole")
"""The style names of `sequence_parallel_plan()` (before an optional ":argument")."""


class AttentionLayer(NamedTuple):
    """One attention layer as `vermeil info` counts it: query width H * Dh, attended window (None: global)."""

    width: int
    window: int | None


def split_output(output: Any) -> tuple[Tensor, Tensor | None]:
    """(logits, aux_loss or None) of a language model's output."""
    if isinstance(output, Tensor):
        return output, None
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"a language model must return logits or an output with a .logits tensor, got {type(output).__name__}"
        )
    aux = getattr(output, "aux_loss", None)
    return logits, aux if isinstance(aux, Tensor) else None


def setup_cache(
    model: Any,
    batch_size: int,
    max_seq_len: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Also sizes the model's rotary table (`model.rope`) up front, so that decode lookups never grow it."""
    check_positive_ints(batch_size=batch_size, max_seq_len=max_seq_len)
    weight = model.get_submodule(model.lm_parts[0]).weight
    dtype = dtype or weight.dtype
    device = torch.device(device) if device is not None else weight.device
    for module in model.cache_modules():
        module.setup_cache(batch_size, max_seq_len, dtype=dtype, device=device)
    if getattr(model, "rope", None) is not None:
        model.rope.reserve(max_seq_len)
    model.cache_max_seq_len, model.cache_batch_size = max_seq_len, batch_size


def reset_cache(model: Any) -> None:
    """Zero every cache in place (a new sequence)."""
    for module in model.cache_modules():
        module.reset_cache()


def delete_cache(model: Any) -> None:
    """Drop the caches (back to plain training forwards)."""
    for module in model.cache_modules():
        module.delete_cache()
    model.cache_max_seq_len = model.cache_batch_size = None


@runtime_checkable
class LanguageModel(Protocol):
    """What `vermeil.generation.generate`, the trainer and the recipes use of a language model."""

    config: Any
    lm_parts: ClassVar[tuple[str, str, str]]
    setup_cache, reset_cache, delete_cache = setup_cache, reset_cache, delete_cache  # the functions above

    def __call__(self, tokens: Tensor, input_pos: Tensor | None = None) -> Any: ...
    def attention_layers(self) -> list[AttentionLayer]: ...
    def check_tensor_parallel(self, *, sequence_parallel: bool, loss_parallel: bool) -> None: ...


def fill_tied_keys(model: Any, state_dict: dict[str, Tensor], prefix: str) -> None:
    """In a load hook of a model whose head shares the embedding matrix: a checkpoint holding only one of the
    two names (`lm_parts` embedding and head) loads into both; one holding two different matrices raises
    (loading both into the one matrix would silently keep the later)."""
    first, second = (f"{prefix}{model.lm_parts[i]}.weight" for i in (0, 2))
    if first in state_dict and second in state_dict:
        a, b = state_dict[first], state_dict[second]
        if a is not b and not (a.is_meta or b.is_meta) and not _same_values(a, b):
            raise ValueError(
                f"the checkpoint's {first} and {second} differ, but {type(model).__name__} ties them (one "
                "matrix); build the model with untied embeddings to load it"
            )
        return
    for have, fill in ((first, second), (second, first)):
        if have in state_dict:
            state_dict.setdefault(fill, state_dict[have])


def _same_values(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b.to(a.device, a.dtype))


def preset_config(
    config_cls: Callable[..., C], presets: Mapping[str, Any], preset: str, overrides: dict[str, Any]
) -> C:
    """`config_cls(**presets[preset], **overrides)`, a preset being a dict of fields or a config dataclass."""
    if preset not in presets:
        raise ValueError(f"preset={preset!r} is not one of {sorted(presets)}")
    fields = presets[preset]
    return config_cls(**{**(fields if isinstance(fields, dict) else asdict(fields)), **overrides})


def build_preset(
    model_cls: Callable[..., M],
    config_cls: Callable[..., Any],
    presets: Mapping[str, Any],
    preset: str,
    overrides: dict[str, Any],
) -> M:
    """Every model's `build(preset, **overrides)`: `device` and `dtype` among the overrides go to the model,
    the other keys override the preset's config fields; an unknown preset raises with the valid names."""
    factory = {k: overrides.pop(k) for k in ("device", "dtype") if k in overrides}
    return model_cls(preset_config(config_cls, presets, preset, overrides), **factory)
