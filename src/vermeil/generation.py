"""Token generation for any model with a static cache: greedy, temperature, top-k, top-p, stop tokens, batches.

The contract a model must meet (the LLM, MambaLM and HybridModel all do):
    model.setup_cache(batch_size, max_seq_len, dtype=None, device=None)
    model(tokens, input_pos=positions) -> logits (B, T, V)  (or an object with a `.logits` field)
    model.reset_cache()

Prefill runs the whole prompt in one forward; decoding then feeds one token per step at its position,
so `prefill` and `decode_one_token` can each be compiled on their own (gpt-fast).

Axis legend: B batch, T prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


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


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    pad_token: int = 0,
    generator: torch.Generator | None = None,
    max_seq_len: int | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Generate up to `max_new_tokens` tokens after `prompt` for every row of the batch.

    Args:
        model: a model with `setup_cache`, `reset_cache` and `forward(tokens, input_pos=...)`.
        prompt: (B, T) long; all rows share the prompt length.
        max_new_tokens: N, the number of tokens to generate at most.
        temperature: 0 is greedy decoding; otherwise logits are divided by it before sampling.
        top_k, top_p: optional truncation of the distribution (see `logits_to_probs`).
        stop_tokens: a row stops after emitting one of these; its later slots hold `pad_token`.
        generator: for reproducible sampling.
        max_seq_len: cache length; defaults to T + N.
        callback: called as `callback(step, tokens)` with the (B,) tokens of each step.

    Returns:
        (B, T + n) long: the prompt followed by the n <= N generated tokens (n < N when every row stopped).
    """
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must have shape (batch, seq) with seq >= 1, got {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    _check_sampling(temperature, top_k, top_p)
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    max_seq_len = total if max_seq_len is None else max_seq_len
    if max_seq_len < total:
        raise ValueError(f"max_seq_len={max_seq_len} must be >= prompt length + max_new_tokens = {total}")
    device = prompt.device
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    model.setup_cache(batch, max_seq_len, device=device)
    try:
        logits = prefill(model, prompt, torch.arange(prompt_len, device=device))
        out = [prompt]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad_token), token)
            out.append(token[:, None])
            if callback is not None:
                callback(step, token)
            if stops.numel():
                done = done | torch.isin(token, stops)
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                pos = torch.tensor([prompt_len + step], device=device)
                logits = decode_one_token(model, token[:, None], pos)
    finally:
        model.reset_cache()
        model.train(was_training)
    return torch.cat(out, dim=1)
