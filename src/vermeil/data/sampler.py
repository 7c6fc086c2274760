"""One seeded batch stream for every task (text windows, synthetic tasks, the flow job)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["SeededSampler"]


class SeededSampler:
    """An endless stream of batches `make(batch_size, generator=g, **kwargs)` with one CPU generator seeded once.

    The generator's state is the whole position of the stream, so `state_dict()` (weights_only-safe: one uint8
    tensor) saved with a checkpoint and `load_state_dict` on resume continue it exactly.

    Example:
        >>> sampler = SeededSampler(vermeil.data.mqar, 8, seed=0, seq_len=64, vocab_size=128)
        >>> inputs, targets = next(sampler)
        >>> state = sampler.state_dict()               # saved with the checkpoint
    """

    def __init__(self, make: Callable[..., Any], batch_size: int, seed: int = 0, **kwargs: Any) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an int")
        self.make, self.batch_size, self.kwargs = make, batch_size, kwargs
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> SeededSampler:
        return self

    def __next__(self) -> Any:
        return self.make(self.batch_size, generator=self.generator, **self.kwargs)

    def sample(self) -> Any:  # next(sampler)
        return next(self)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        value = state.get("generator") if isinstance(state, Mapping) else None
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
            got = type(state).__name__ if not isinstance(state, Mapping) else f"generator={value!r:.60}"
            raise ValueError(f"a sampler state must be {{'generator': a 1-D uint8 tensor}}, got {got}")
        self.generator.set_state(value)
