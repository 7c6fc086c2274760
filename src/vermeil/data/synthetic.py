"""Synthetic long-range tasks: multi-query associative recall (MQAR) and selective copying, and their accuracy.

Both return `(inputs, targets)`, each (B, L) int64, with -100 in `targets` wherever nothing is asked (the default
`ignore_index` of `F.cross_entropy`), generated with one `torch.Generator` and no Python loop over tokens.
Axis legend: B batch, L sequence length, N key-value pairs, K tokens to copy, V vocabulary size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vermeil.nn.checks import check_positive_ints

__all__ = ["IGNORE_INDEX", "accuracy", "mqar", "selective_copying"]

IGNORE_INDEX = -100


def _distinct(batch: int, n: int, k: int, generator: torch.Generator | None) -> Tensor:
    """(B, k) distinct integers from [0, n) per row, uniformly (the first k of a random permutation)."""
    return torch.rand(batch, n, generator=generator).argsort(dim=1)[:, :k]


def mqar(
    batch_size: int,
    *,
    vocab_size: int = 8192,
    seq_len: int = 256,
    num_kv_pairs: int = 16,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Multi-query associative recall, as `zoology/data/multiquery_ar.py` (Arora, Eyuboglu et al. 2023).

    The sequence starts with N distinct pairs `k1 v1 ... kN vN` (keys from [1, V/2), values from [V/2, V), both
    distinct within a row). Each key is then queried once, at position `2N + 2 * (g - 1)` (from 2N to L - 2), with
    the N values of g drawn without replacement from a power law `p(g) ∝ a * g^(a - 1)` over g = 1..(L - 2N) / 2
    (short gaps are likely).
    The target at a query position is the value paired with its key; every other target is -100. Every other
    input position holds a random token from [0, V) (or 0 with `random_non_queries=False`).

    Args:
        vocab_size: V > seq_len (Zoology's rule). The paper uses 8192; 256-1024 is plenty on CPU.
        seq_len: L, even, with 4N <= L.
        power_a: the power-law exponent a (0.01 in Zoology).
    """
    check_positive_ints(
        batch_size=batch_size, vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs
    )
    if seq_len % 2 != 0:
        raise ValueError(f"seq_len={seq_len} must be even (pairs and queries take two positions each)")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size={vocab_size} must be > seq_len={seq_len} (Zoology's MQAR rule)")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"num_kv_pairs={num_kv_pairs} is too many for seq_len={seq_len}: 4 * num_kv_pairs must be <= seq_len"
        )
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not 0 < power_a < math.inf:
        raise ValueError(f"power_a={power_a!r} must be > 0 and finite")
    B, N, L, V = batch_size, num_kv_pairs, seq_len, vocab_size
    half = V // 2
    keys = _distinct(B, half - 1, N, generator) + 1  # (B, N) in [1, V/2)
    values = _distinct(B, V - half, N, generator) + half  # (B, N) in [V/2, V)

    context = 2 * N
    space = (L - context) // 2
    g = torch.arange(1, space + 1, dtype=torch.float64)
    # ∝ a * g^(a - 1), scaled into (0, space] so that no finite a overflows; never 0, so N gaps can always be drawn
    p = ((g / space) ** (power_a - 1)).clamp_min(torch.finfo(torch.float64).tiny)
    gaps = torch.multinomial(
        (p / p.sum()).expand(B, space).contiguous(), N, replacement=False, generator=generator
    )
    query_pos = context + 2 * gaps  # (B, N), even positions after the pairs

    inputs = torch.zeros(B, L, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.long).scatter_(1, query_pos, values)
    if random_non_queries:  # keys are >= 1 and values >= V/2, so 0 marks exactly the free positions
        noise = torch.randint(0, V, (B, L), generator=generator)
        inputs = torch.where(inputs == 0, noise, inputs)
    return inputs, targets


def selective_copying(
    batch_size: int,
    *,
    vocab_size: int = 16,
    seq_len: int = 256,
    num_tokens_to_copy: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Selective copying (Gu & Dao 2023, Mamba §3.1; layout of the MAD suite's generator).

    Token ids: data tokens [0, V - 2), blank (noise) `V - 2`, copy `V - 1`. A row is the K data tokens (drawn
    with replacement) at random ordered positions among blanks in the first `L - K - 1` positions, then the copy
    token, then K blank output slots. The targets at the output slots are the data tokens in order of
    appearance; every other target is -100. Unlike MAD's insertion scheme, the positions are uniform over all
    K-subsets (MAD never puts a blank after the last data token).

    Args:
        vocab_size: V >= 3 (16 in Mamba and MAD).
        seq_len: L > 2K + 1 (MAD's rule).
    """
    check_positive_ints(
        batch_size=batch_size, vocab_size=vocab_size, seq_len=seq_len, num_tokens_to_copy=num_tokens_to_copy
    )
    if vocab_size < 3:
        raise ValueError(f"vocab_size={vocab_size} must be >= 3 (data tokens, blank and copy)")
    if seq_len <= 2 * num_tokens_to_copy + 1:
        raise ValueError(
            f"seq_len={seq_len} must be > 2 * num_tokens_to_copy + 1 = {2 * num_tokens_to_copy + 1} "
            f"(num_tokens_to_copy={num_tokens_to_copy})"
        )
    B, K, L, V = batch_size, num_tokens_to_copy, seq_len, vocab_size
    blank, copy = V - 2, V - 1
    prefix = L - K - 1
    tokens = torch.randint(0, V - 2, (B, K), generator=generator)
    positions = _distinct(B, prefix, K, generator).sort(dim=1).values  # (B, K), increasing
    inputs = torch.full((B, L), blank, dtype=torch.long).scatter_(1, positions, tokens)
    inputs[:, prefix] = copy
    targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    targets[:, prefix + 1 :] = tokens
    return inputs, targets


def accuracy(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Share of scored positions (target != ignore_index) whose argmax is right: logits (..., V), targets (...)
    -> a 0-dim float tensor (no host sync), NaN when no position is scored."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} must be targets shape {tuple(targets.shape)} plus a vocabulary axis"
        )
    scored = targets != ignore_index
    correct = (logits.argmax(dim=-1) == targets) & scored
    return correct.sum().float() / scored.sum().float()
