"""What `vermeil info` and `vermeil compare` report about a run config's model, without switching on its family:
each model describes itself (`vermeil.models.contract`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vermeil.recipes.build import build_model
from vermeil.recipes.config import RunConfig

__all__ = ["describe_model"]


def _linear_like_params(model: nn.Module) -> tuple[int, int]:
    """(matmul parameters used per token, embedding parameters), for FLOPs; MoE experts count top_k / E."""
    embeddings = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)}
    share: dict[int, float] = {}
    for module in model.modules():
        experts, top_k, n = getattr(module, "experts", None), getattr(module, "top_k", None), None
        if isinstance(experts, nn.Module) and isinstance(top_k, int):
            n = getattr(experts, "num_experts", None) or getattr(module, "num_experts", None)
        if n:
            share.update({id(p): top_k / n for p in experts.parameters()})
    per_token = 0.0
    for p in model.parameters():  # a tied tensor once
        if p.ndim >= 2 and id(p) not in embeddings:
            per_token += p.numel() * share.get(id(p), 1.0)
    # A head tied to the embedding is still a matmul per token.
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) in embeddings:
            per_token += m.weight.numel()
    return int(per_token), sum(embeddings.values())


def _state_elements(module: nn.Module) -> int:
    """Recurrent state elements a Mamba mixer updates per token (0 for other modules), read from `A_log`:
    Mamba-1's is (d_inner, d_state), one entry per element; Mamba-2's one scalar per head."""
    a_log = getattr(module, "A_log", None)
    if not isinstance(a_log, Tensor):
        return 0
    if a_log.ndim == 1 and hasattr(module, "d_inner") and hasattr(module, "d_state"):
        return int(module.d_inner) * int(module.d_state)
    return a_log.numel()


def describe_model(run: RunConfig, context: int | None = None, *, batch_size: int = 1) -> dict[str, Any]:
    """Parameters, forward FLOPs per token at a context length, and the inference cache's memory.

    The model is built on the meta device (no memory, any size). FLOPs follow Kaplan et al. (2020):
    `2 * N_matmul + 2 * n_attention_layers * context_eff * d_attention` per token forward (training about 3x),
    MoE experts counted at `top_k / num_experts`, the context capped by chunked attention windows, plus about
    9 per Mamba state element (exp(dt A), dt B x, the update, C h). The cache memory is what
    `model.setup_cache(batch_size, context)` allocates (None without a cache, as Flux). The context defaults to
    the length the model sees: the data's `model_sequence_length` (a flow job's points), else `train.seq_len`.
    """
    if context is None:
        context = getattr(run.data, "model_sequence_length", None) or run.train.seq_len
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    model = build_model(run, device="meta")
    matmul, embedding = _linear_like_params(model)
    attn = 0
    for width, window in getattr(model, "attention_layers", list)():  # per attention layer (Flux too)
        ctx = min(context, window) if window else context
        attn += 2 * ctx * width
    scan = 9 * sum(_state_elements(m) for m in model.modules())
    flops = 2 * matmul + 2 * attn + scan
    return {
        "family": run.family,
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),  # a tied tensor once
        "embedding_parameters": embedding,
        "context": context,
        "forward_flops_per_token": flops,
        "train_flops_per_token": 3 * flops,
        "cache_bytes": _cache_bytes(model, batch_size, context),
    }


def _cache_bytes(model: nn.Module, batch_size: int, context: int) -> int | None:
    """Bytes of the buffers `setup_cache` adds (measured on the meta device: shapes only, no memory)."""
    if not callable(getattr(model, "setup_cache", None)):
        return None

    def cache_buffers() -> dict[int, Tensor]:
        # Rotary tables also grow in setup_cache; they are not cache.
        return {
            id(b): b
            for m in model.modules()
            if "rotary" not in type(m).__name__.lower()
            for b in m.buffers(recurse=False)
        }

    before = set(cache_buffers())
    # The contract has every setup_cache run on meta: an error here is a bug to see, not a number to guess.
    model.setup_cache(batch_size, context, device="meta")
    return sum(b.numel() * b.element_size() for i, b in cache_buffers().items() if i not in before)
