"""Static inference caches: preallocated non-persistent buffers written in place, so decoding keeps static
shapes and no cache lands in a checkpoint.

As gpt-fast, writes use `index_copy_` at a position *tensor*, so under `torch.compile(fullgraph=True)` a
decode step never recompiles as the position advances. Both KV caches answer
`update_with_positions(input_pos, k, v) -> (k_all, v_all, kv_pos)`, so one attention module serves either.

Axis legend: B batch, Hkv kv heads, S_max cache length, Dh head dim, T new tokens,
E inner (expanded) channels, K conv width, N state size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vermeil.nn.checks import check_positive_int, check_positive_ints, tracing

__all__ = ["KVCache", "RingKVCache", "SSMState"]


class _KVBuffers(nn.Module):
    """What both KV caches share: zeroed buffers `k_cache`, `v_cache` (B, Hkv, slots, Dh), the update checks."""

    k_cache: Tensor
    v_cache: Tensor

    def __init__(
        self, batch_size: int, max_seq_len: int, kv_heads: int, head_dim: int, slots: int, **factory: Any
    ) -> None:
        super().__init__()
        check_positive_ints(
            batch_size=batch_size, max_seq_len=max_seq_len, kv_heads=kv_heads, head_dim=head_dim
        )
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.kv_heads, self.head_dim = kv_heads, head_dim
        for name in ("k_cache", "v_cache"):
            buffer = torch.zeros(batch_size, kv_heads, slots, head_dim, **factory)
            self.register_buffer(name, buffer, persistent=False)

    def reset(self) -> None:
        """Zero both buffers in place (compiled graphs that captured them stay valid)."""
        self.k_cache.zero_()
        self.v_cache.zero_()

    def _check_update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Static shape checks, and the eager CPU-only value check of `input_pos`."""
        heads_dim = (self.kv_heads, self.head_dim)
        if k.ndim != 4 or (k.shape[1], k.shape[3]) != heads_dim or k.shape[0] > self.batch_size:
            raise ValueError(
                f"k must have shape (B<={self.batch_size}, kv_heads={self.kv_heads}, T, "
                f"head_dim={self.head_dim}), got {tuple(k.shape)}"
            )
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        if input_pos.dtype.is_floating_point or input_pos.dtype.is_complex or input_pos.dtype == torch.bool:
            raise TypeError(f"input_pos must hold integer positions, got dtype={input_pos.dtype}")
        if input_pos.ndim != 1 or input_pos.shape[0] != k.shape[2]:
            raise ValueError(
                f"input_pos must have shape (T={k.shape[2]},) to match k, got {tuple(input_pos.shape)} "
                "(per-row positions (B, T) cannot be written into a shared static cache)"
            )
        if input_pos.shape[0] > self.max_seq_len:
            raise ValueError(
                f"input_pos holds {input_pos.shape[0]} positions, which exceeds max_seq_len={self.max_seq_len}"
            )
        # Value check only in eager mode and on CPU: it reads the tensor, which would be a graph break under
        # compile, a baked-in constant under jit.trace, and a device sync on an accelerator.
        if not tracing() and input_pos.device.type == "cpu" and input_pos.numel() > 0:
            first, last = torch.stack(torch.aminmax(input_pos)).tolist()  # one read for both ends
            if last >= self.max_seq_len or first < 0:
                raise ValueError(
                    f"input_pos up to {last} exceeds max_seq_len={self.max_seq_len} (positions must lie in "
                    f"[0, {self.max_seq_len}))"
                )

    def extra_repr(self) -> str:
        return (
            f"batch_size={self.batch_size}, max_seq_len={self.max_seq_len}, kv_heads={self.kv_heads}, "
            f"head_dim={self.head_dim}, dtype={self.k_cache.dtype}"
        )


class KVCache(_KVBuffers):
    """Key/value buffers `k_cache`, `v_cache` (B, Hkv, S_max, Dh) for incremental decoding.

    A smaller batch than `batch_size` uses the leading rows; keys and values are cast to `dtype` on write.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(batch_size, max_seq_len, kv_heads, head_dim, max_seq_len, dtype=dtype, device=device)
        self._positions = torch.arange(max_seq_len, device=device)  # slot i holds position i (not state)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, Dh) at `input_pos` (T,); return views (B, Hkv, S_max, Dh) of the buffers."""
        self._check_update(input_pos, k, v)
        b = k.shape[0]
        k_all, v_all = self.k_cache[:b], self.v_cache[:b]  # views: the writes land in the buffers
        k_all.index_copy_(2, input_pos, k.to(k_all.dtype))
        v_all.index_copy_(2, input_pos, v.to(v_all.dtype))
        return k_all, v_all

    def update_with_positions(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`update`, plus the position of every slot: `kv_pos` (S_max,) = 0 .. S_max - 1."""
        k_all, v_all = self.update(input_pos, k, v)
        if self._positions.device != k_all.device:  # the module was moved after construction
            self._positions = self._positions.to(k_all.device)
        return k_all, v_all, self._positions


class RingKVCache(_KVBuffers):
    """A KV cache of `slots` positions for local attention: position p lives in slot p % slots.

    A query under a sliding window W sees the last W keys, under Llama 4's chunks of C at most C, so
    `slots = min(W, C)` holds all any query needs. `kv_pos` (slots,) records the position each slot holds, so
    the mask rule applies to real positions (as transformers' `SlidingWindowCache`); an empty slot holds
    `max_seq_len` (None: `slots`), past every position served, so the causal rule alone hides it.
    """

    kv_pos: Tensor

    def __init__(
        self,
        batch_size: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        *,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_positive_int("slots", slots)  # the rest is checked by the base
        max_seq_len = slots if max_seq_len is None else max_seq_len
        super().__init__(batch_size, max_seq_len, kv_heads, head_dim, slots, dtype=dtype, device=device)
        self.slots = slots
        empty = torch.full((slots,), max_seq_len, dtype=torch.long, device=device)
        self.register_buffer("kv_pos", empty, persistent=False)

    def reset(self) -> None:
        """Empty the ring in place (compiled graphs that captured the buffers stay valid)."""
        super().reset()
        self.kv_pos.fill_(self.max_seq_len)

    def _write(self, input_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Write the last min(T, slots) new positions (consecutive ones: no two land in one slot)."""
        n = min(k.shape[2], self.slots)  # static shapes: no data-dependent branch
        pos = input_pos[-n:]
        slot = pos % self.slots
        b = k.shape[0]
        self.k_cache[:b].index_copy_(2, slot, k[:, :, -n:].to(self.k_cache.dtype))
        self.v_cache[:b].index_copy_(2, slot, v[:, :, -n:].to(self.v_cache.dtype))
        self.kv_pos.index_copy_(0, slot, pos)

    def update_with_positions(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write k, v (B, Hkv, T, Dh) at consecutive `input_pos` (T,); return what the queries may attend over.

        For T = 1, the ring after the write (the overwritten slot held p - slots, which no query at p sees):
        (B, Hkv, slots, Dh) views and `kv_pos` (slots,). For several, the ring *before* the write followed by
        the new keys, (B, Hkv, slots + T, Dh) and (slots + T,): an early new token may need a key a later one
        overwrites. Old keys at the written positions or later count as empty there: as in `KVCache`, a write
        from position p replaces what the cache held from p on (a new sequence from 0 without `reset`).
        """
        self._check_update(input_pos, k, v)
        b = k.shape[0]
        if k.shape[2] == 1:
            self._write(input_pos, k, v)
            return self.k_cache[:b], self.v_cache[:b], self.kv_pos
        k_all = torch.cat([self.k_cache[:b], k.to(self.k_cache.dtype)], dim=2)
        v_all = torch.cat([self.v_cache[:b], v.to(self.v_cache.dtype)], dim=2)
        old_pos = self.kv_pos.masked_fill(self.kv_pos >= input_pos[0], self.max_seq_len)
        kv_pos = torch.cat([old_pos, input_pos])
        self._write(input_pos, k, v)  # after the copies above: they keep the old ring
        return k_all, v_all, kv_pos

    update = update_with_positions

    def extra_repr(self) -> str:
        return f"slots={self.slots}, {super().extra_repr()}"


class SSMState(nn.Module):
    """Recurrent state of a Mamba or Mamba-2 block: `conv_state` (B, E, K) and `ssm_state` (B, *ssm_shape).

    Args:
        d_inner: E, the channels of the causal convolution (Mamba-2's conv_dim = I + 2 * G * N).
        d_conv: K, the causal convolution width (the last K inputs are kept).
        ssm_dtype: None uses `dtype` (Mamba keeps the SSM state in float32 under mixed precision).
        ssm_shape: per sequence; None means (E, N) (Mamba-1); Mamba-2's is (H, P, N).
    """

    conv_state: Tensor
    ssm_state: Tensor

    def __init__(
        self,
        batch_size: int,
        d_inner: int,
        d_conv: int,
        d_state: int,
        *,
        dtype: torch.dtype | None = None,
        ssm_dtype: torch.dtype | None = None,
        ssm_shape: tuple[int, ...] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        ssm_shape = (d_inner, d_state) if ssm_shape is None else tuple(ssm_shape)
        shape = {f"ssm_shape[{i}]": v for i, v in enumerate(ssm_shape)}
        check_positive_ints(batch_size=batch_size, d_inner=d_inner, d_conv=d_conv, d_state=d_state, **shape)
        self.batch_size = batch_size
        conv = torch.zeros(batch_size, d_inner, d_conv, dtype=dtype, device=device)
        ssm = torch.zeros(batch_size, *ssm_shape, dtype=ssm_dtype or dtype, device=device)
        self.register_buffer("conv_state", conv, persistent=False)
        self.register_buffer("ssm_state", ssm, persistent=False)

    def reset(self) -> None:
        """Zero both states in place."""
        self.conv_state.zero_()
        self.ssm_state.zero_()

    def extra_repr(self) -> str:
        return f"conv_state={tuple(self.conv_state.shape)}, ssm_state={tuple(self.ssm_state.shape)}"
