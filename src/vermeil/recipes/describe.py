"""What `vermeil info` and `vermeil compare` report about a run config's model: parameters, FLOPs per token and
the inference cache's memory, computed on the meta device (no memory, any size).

Family switches live here, and only here among the recipes: the attention layout per layer (`_attention_layers`)
and the analytic cache size of models whose `setup_cache` cannot run on meta (`_analytic_cache_bytes`) are read
from each family's config by name. They are model-side descriptions waiting to move next to each model.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vermeil.recipes.build import build_model
from vermeil.recipes.config import RunConfig

__all__ = ["describe_model"]


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


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


def _attention_layers(run: RunConfig) -> list[tuple[int, int | None]]:
    """(query width H * Dh, attended window or None for global) per attention layer."""
    # FAMILY SWITCH: a model-side description (its attention layout), to move next to each model.
    m = run.model
    if run.family == "llm":
        out = []
        for i in range(m.n_layers):
            window = None if m.is_nope_layer(i) else m.attention_chunk_size
            out.append((m.n_heads * m.head_dim, window))
        return out
    if run.family == "hybrid":
        return [(m.heads * m.attention_head_dim, None) for k in m.layer_kinds if k != "M"]
    if run.family == "flux":
        return [(m.hidden_size, None)] * (m.depth + m.depth_single_blocks)
    return []


def describe_model(run: RunConfig, context: int | None = None, *, batch_size: int = 1) -> dict[str, Any]:
    """Parameters, forward FLOPs per token at a context length, and the inference cache's memory.

    The model is built on the meta device (no memory, any size). FLOPs follow Kaplan et al. (2020):
    `2 * N_matmul + 2 * n_attention_layers * context_eff * d_attention` per token for the forward pass (training
    is about 3x that), with MoE experts counted at `top_k / num_experts`, the attended context capped by
    chunked attention windows, plus about `9 * d_inner * d_state` per Mamba layer for the selective scan. The cache memory is what `model.setup_cache(batch_size, context)` allocates.
    """
    context = context if context is not None else run.train.seq_len
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    model = build_model(run, device="meta")
    params = _count_params(model)
    matmul, embedding = _linear_like_params(model)
    attn = 0
    for width, window in _attention_layers(run):
        ctx = min(context, window) if window else context
        attn += 2 * ctx * width
    # Selective scan: about 9 FLOPs per state element and token (exp(dt A), dt B x, the update, C h).
    scan = sum(9 * p.numel() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "A_log")
    flops = 2 * matmul + 2 * attn + scan
    info: dict[str, Any] = {
        "family": run.family,
        "model": type(model).__name__,
        "parameters": params,
        "embedding_parameters": embedding,
        "context": context,
        "forward_flops_per_token": flops,
        "train_flops_per_token": 3 * flops,
    }
    measured = _cache_bytes(model, batch_size, context)
    info["cache_bytes"] = (
        measured if measured is not None else _analytic_cache_bytes(run, batch_size, context)
    )
    return info


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
    try:
        model.setup_cache(batch_size, context, device="meta")
    except Exception:  # a cache that cannot be built on meta: report nothing rather than a wrong number
        return None
    return sum(b.numel() * b.element_size() for i, b in cache_buffers().items() if i not in before)


def _analytic_cache_bytes(run: RunConfig, batch_size: int, context: int) -> int | None:
    """float32 cache bytes by formula, for models whose `setup_cache` reads data (so cannot run on meta):
    2 * B * Hkv * S * Dh per attention layer (S capped by a chunked layer's window), B * E * (K + N) per Mamba
    layer (conv and SSM states)."""
    # FAMILY SWITCH: a model-side description (its cache layout), to move next to each model.
    m, b, f32 = run.model, batch_size, 4
    if run.family == "llm":  # chunked layers keep a ring of min(chunk, context) slots
        total = 0
        for i in range(m.n_layers):
            window = None if m.is_nope_layer(i) else m.attention_chunk_size
            s = min(context, window) if window else context
            total += 2 * b * m.n_kv_heads * s * m.head_dim * f32
            if window:
                total += 8 * s  # the ring cache's int64 slot positions
        return total
    if run.family == "hybrid":
        kv = m.kv_heads or m.heads
        e = m.expand * m.dim
        total = 0
        for kind in m.layer_kinds:
            if kind in ("A", "P"):
                total += 2 * b * kv * context * m.attention_head_dim
            if kind in ("M", "P"):
                total += b * e * (m.d_conv + m.d_state)
        return total * f32
    return None
