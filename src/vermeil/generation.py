"""Token generation for any model with a static cache: greedy, temperature, top-k, top-p, stop tokens, batches.

The contract a model must meet (the LLM, MambaLM and HybridModel all do):
    model.setup_cache(batch_size, max_seq_len, dtype=None, device=None)
    model(tokens, input_pos=positions) -> logits (B, T, V)  (or an object with a `.logits` field)
    model.reset_cache()
    model.delete_cache()   (optional: when present, generate frees the cache with it afterwards)

Prefill runs the whole prompt in one forward; decoding then feeds one token per step at its position,
so `prefill` and `decode_one_token` can each be compiled on their own (gpt-fast). `generate(compile=True)`
compiles the decode step with `decode_backend`: Inductor, with the step's matrix-vector products lowered to
vectorised reductions (on the CPU, MKL's float32 GEMV streams weights at well under half the memory bandwidth
that a reduction over the contiguous rows of `nn.Linear.weight` reaches, and a decode step is nothing but
GEMVs; see `bench/llm.py`).

Axis legend: B batch, T prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

# Matrix products with at most this many rows are lowered to reductions by `decode_backend` (a decode step
# has B rows; prefill and training never go through that backend).
_GEMV_MAX_ROWS = 8


def _logits_of(output: object) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits  # type: ignore[attr-defined]


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


def logits_to_probs(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Turn last-position logits (B, V) into sampling probabilities (B, V), float32.

    Top-k keeps the k largest logits; top-p (nucleus) keeps the smallest set of tokens whose probability
    mass reaches `top_p` (the most likely token is always kept). Both can be combined.
    """
    _check_sampling(temperature, top_k, top_p)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p.
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample one token per row from logits (B, V) -> (B,) long. temperature=0 is greedy (argmax).

    Sampling uses the exponential-race trick (`argmax(p / E)`, E ~ Exp(1)), which draws from `p` without
    the host synchronisation of `torch.multinomial` (gpt-fast `multinomial_sample_one_no_sync`).
    """
    if temperature == 0:
        _check_sampling(temperature, top_k, top_p)
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(-1)


@torch.no_grad()
def prefill(model: nn.Module, tokens: Tensor, input_pos: Tensor) -> Tensor:
    """Run the prompt tokens (B, T) at positions (T,) through the model and return last logits (B, V)."""
    return _logits_of(model(tokens, input_pos=input_pos))[:, -1]


@torch.no_grad()
def decode_one_token(model: nn.Module, token: Tensor, input_pos: Tensor) -> Tensor:
    """Run one token (B, 1) at position (1,) and return its logits (B, V)."""
    return _logits_of(model(token, input_pos=input_pos))[:, -1]


def _mm_as_reduction(a: Tensor, b: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """aten.mm (M, K) @ (K, N) for small M on the CPU as a broadcast multiply and a sum over K.

    Inductor fuses it into one vectorised loop per output that reads `b` once; with `b` the transposed view
    of a `(N, K)` Linear weight, every output is a dot product over one contiguous weight row. Accumulates in
    at least float32 (bf16 inputs round once at the end, as a GEMM would; float64 stays float64).
    """
    if a.device.type != "cpu" or out_dtype is not None or a.shape[0] > _GEMV_MAX_ROWS:
        return NotImplemented
    acc = torch.promote_types(a.dtype, torch.float32)
    return (a.unsqueeze(-1) * b.unsqueeze(0)).sum(1, dtype=acc).to(a.dtype)


def decode_backend(graph: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
    """A `torch.compile` backend for decode steps: Inductor plus `_mm_as_reduction` for aten.mm.

    Falls back to plain Inductor when its internal entry points (`compile_fx`, `select_decomp_table`)
    move in a future torch.
    """
    try:
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table
    except ImportError:  # pragma: no cover - depends on the torch version
        from torch._inductor import compile as compile_fx

        return compile_fx(graph, example_inputs)
    decompositions = {**select_decomp_table(), torch.ops.aten.mm.default: _mm_as_reduction}
    return compile_fx(graph, example_inputs, decompositions=decompositions)


@functools.cache
def compiled_decode_one_token() -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """`decode_one_token` under `torch.compile(fullgraph=True, dynamic=False, backend=decode_backend)`.

    One compiled function per process: the first call for a model (or batch size, or dtype) compiles,
    later steps and later `generate` calls reuse the graph (the position is a tensor, so it never
    recompiles as decoding advances).
    """
    return torch.compile(decode_one_token, fullgraph=True, dynamic=False, backend=decode_backend)


def _as_padded_prompts(
    prompt_tokens: Tensor | Sequence[Sequence[int]], pad_token: int
) -> tuple[Tensor, Tensor]:
    """A (B, T) tensor or a list of token lists -> padded prompts (B, T_max) and lengths (B,)."""
    if isinstance(prompt_tokens, Tensor):
        if prompt_tokens.dim() != 2 or prompt_tokens.shape[1] == 0:
            raise ValueError(
                f"prompt_tokens must have shape (batch, seq) with seq >= 1, got {tuple(prompt_tokens.shape)}"
            )
        batch, length = prompt_tokens.shape
        return prompt_tokens.long(), torch.full(
            (batch,), length, dtype=torch.long, device=prompt_tokens.device
        )
    prompts = [list(p) for p in prompt_tokens]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompt_tokens must be a non-empty list of non-empty token lists")
    longest = max(len(p) for p in prompts)
    padded = torch.tensor([p + [pad_token] * (longest - len(p)) for p in prompts], dtype=torch.long)
    return padded, torch.tensor([len(p) for p in prompts], dtype=torch.long)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_tokens: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    *,
    pad_token: int = 0,
    max_seq_len: int | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
    compile: bool = False,
) -> Tensor:
    """Generate up to `max_new_tokens` tokens after each prompt.

    Prompts of different lengths share one static cache and one position per step, with no padding inside
    the model: the common prefix is prefilled at once, then each row is fed its own prompt tokens until
    they run out and its sampled tokens after that (teacher forcing). So every row sees exactly what it
    would see alone, for attention, Mamba and hybrid models alike.

    Args:
        model: a model with `setup_cache`, `reset_cache` and `forward(tokens, input_pos=...)`.
        prompt_tokens: (B, T) long, or a list of B token lists of any lengths.
        max_new_tokens: N, the number of tokens to generate per row at most.
        temperature: 0 (the default) is greedy decoding; otherwise logits are divided by it.
        top_k, top_p: optional truncation of the distribution (see `logits_to_probs`).
        stop_tokens: a row stops after emitting one of these; its later slots hold `pad_token`.
        seed: seeds the sampling generator, for reproducible sampling.
        pad_token: fills slots after a row stopped (and pads ragged prompts internally).
        max_seq_len: cache length; defaults to the longest prompt + N.
        callback: called as `callback(position, tokens)` with the (B,) tokens fed at each decode step.
        compile: run the decode steps through `compiled_decode_one_token()` (the first call per model and
            batch size pays the compilation, about 10 s on a CPU; float32 logits then differ from eager in
            the last bits, from the order of summation).

    Returns:
        (B, n) long, the new tokens of each row (the stop token included), n <= N: n < N only when every
        row stopped early.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    _check_sampling(temperature, top_k, top_p)
    prompts, lengths = _as_padded_prompts(prompt_tokens, pad_token)
    device = next((p.device for p in model.parameters()), prompts.device)
    prompts, lengths = prompts.to(device), lengths.to(device)
    batch, longest = prompts.shape
    shortest = int(lengths.min())
    total = longest + max_new_tokens
    max_seq_len = total if max_seq_len is None else max_seq_len
    if max_seq_len < total:
        raise ValueError(f"max_seq_len={max_seq_len} must be >= longest prompt + max_new_tokens = {total}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)

    new_tokens = torch.full((batch, max_new_tokens), pad_token, dtype=torch.long, device=device)
    counts = torch.zeros(batch, dtype=torch.long, device=device)  # tokens generated per row
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    model.setup_cache(batch, max_seq_len, device=device)
    decode = compiled_decode_one_token() if compile else decode_one_token
    try:
        logits = prefill(model, prompts[:, :shortest], torch.arange(shortest, device=device))
        for pos in range(shortest, total):
            sampled = sample(logits, temperature, top_k, top_p, generator)
            in_prompt = pos < lengths
            forced = prompts[:, min(pos, longest - 1)]
            token = torch.where(in_prompt, forced, sampled)
            # Rows past their prompt record what they sampled, until they have N tokens or stopped.
            record = ~in_prompt & ~done & (counts < max_new_tokens)
            slot = counts.clamp(max=max_new_tokens - 1)[:, None]
            kept = new_tokens.gather(1, slot)[:, 0]
            new_tokens.scatter_(1, slot, torch.where(record, sampled, kept)[:, None])
            counts = counts + record.long()
            if stops.numel():
                done = done | (record & torch.isin(sampled, stops))
            finished = done | (counts >= max_new_tokens)
            if pos == total - 1 or bool(finished.all()):
                break
            token = torch.where(finished, torch.full_like(token, pad_token), token)
            if callback is not None:
                callback(pos, token)
            logits = decode(model, token[:, None], torch.tensor([pos], device=device))
    finally:
        # Free the cache when the model can (plain forwards work again afterwards), else clear it.
        getattr(model, "delete_cache", model.reset_cache)()
        model.train(was_training)
    return new_tokens[:, : int(counts.max())]
