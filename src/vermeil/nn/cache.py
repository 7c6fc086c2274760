"""Static inference caches: preallocated buffers written in place, so decoding keeps static shapes.

`KVCache` follows gpt-fast: buffers of the full `max_seq_len` are allocated once and written with
`index_copy_` at a position *tensor*; under `torch.compile(fullgraph=True)` a decode step is one graph that
never recompiles as the position advances (a Python-int slice recompiles at the second position; see
shared/ECOSYSTEM.md §2). Attention then runs over the whole static buffer with a position mask, so slots
not yet written are never attended. `SSMState` is the recurrent-state counterpart for a Mamba block.

Buffers are non-persistent: a cache is run-time state, never part of a checkpoint.

Axis legend: B batch, Hkv kv heads, S_max cache length, Dh head dim, T new tokens,
E inner (expanded) channels, K conv width, N state size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["KVCache", "SSMState"]


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")


class KVCache(nn.Module):
    """Preallocated key/value buffers for incremental decoding.

    Args:
        batch_size: largest batch the cache serves (a smaller batch uses the leading rows).
        max_seq_len: S_max, the number of positions held.
        kv_heads: Hkv.
        head_dim: Dh.
        dtype: buffer dtype (keys and values are cast to it on write).
        device: buffer device.

    Attributes:
        k_cache, v_cache: (B, Hkv, S_max, Dh) buffers, zero-initialised, non-persistent.
    """

    k_cache: Tensor
    v_cache: Tensor

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
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("max_seq_len", max_seq_len),
            ("kv_heads", kv_heads),
            ("head_dim", head_dim),
        ):
            _check_positive(name, value)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (batch_size, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def reset(self) -> None:
        """Zero both buffers (in place, so compiled graphs that captured them stay valid)."""
        self.k_cache.zero_()
        self.v_cache.zero_()

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new keys/values at `input_pos` and return the whole buffers.

        Args:
            input_pos: (T,) integer positions of the new tokens, each < max_seq_len.
            k: (B, Hkv, T, Dh) new keys, B <= batch_size.
            v: (B, Hkv, T, Dh) new values.

        Returns:
            (k_all, v_all), each (B, Hkv, S_max, Dh): views of the buffers after the write.

        Raises:
            ValueError: on shapes that do not fit the cache (static shape checks only), or, outside
                `torch.compile`, a position >= max_seq_len on a CPU `input_pos`.
        """
        expected = (self.kv_heads, self.head_dim)
        if k.ndim != 4 or (k.shape[1], k.shape[3]) != expected or k.shape[0] > self.batch_size:
            raise ValueError(
                f"k must have shape (B<={self.batch_size}, kv_heads={self.kv_heads}, T, "
                f"head_dim={self.head_dim}), got {tuple(k.shape)}"
            )
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
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
        # compile and a device sync on an accelerator (there, index_copy_ raises its own error).
        if not torch.compiler.is_compiling() and input_pos.device.type == "cpu" and input_pos.numel() > 0:
            last = int(input_pos.max())
            if last >= self.max_seq_len or int(input_pos.min()) < 0:
                raise ValueError(
                    f"input_pos up to {last} exceeds max_seq_len={self.max_seq_len} (positions must lie in "
                    f"[0, {self.max_seq_len}))"
                )
        b = k.shape[0]
        k_all, v_all = self.k_cache[:b], self.v_cache[:b]  # views: the writes land in the buffers
        k_all.index_copy_(2, input_pos, k.to(k_all.dtype))
        v_all.index_copy_(2, input_pos, v.to(v_all.dtype))
        return k_all, v_all

    def extra_repr(self) -> str:
        return (
            f"batch_size={self.batch_size}, max_seq_len={self.max_seq_len}, kv_heads={self.kv_heads}, "
            f"head_dim={self.head_dim}, dtype={self.k_cache.dtype}"
        )


class SSMState(nn.Module):
    """Recurrent state of a Mamba block for step-by-step decoding: a plain container of two buffers.

    Args:
        batch_size: B.
        d_inner: E, the expanded channel count.
        d_conv: K, the causal convolution width (the last K inputs are kept).
        d_state: N, the SSM state size.
        dtype: dtype of `conv_state`.
        ssm_dtype: dtype of `ssm_state`; None uses `dtype` (Mamba keeps it in float32 under mixed precision).
        device: buffer device.

    Attributes:
        conv_state: (B, E, K) zeros, non-persistent.
        ssm_state: (B, E, N) zeros, non-persistent.
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
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("d_inner", d_inner),
            ("d_conv", d_conv),
            ("d_state", d_state),
        ):
            _check_positive(name, value)
        self.batch_size, self.d_inner, self.d_conv, self.d_state = batch_size, d_inner, d_conv, d_state
        conv = torch.zeros(batch_size, d_inner, d_conv, dtype=dtype, device=device)
        ssm = torch.zeros(batch_size, d_inner, d_state, dtype=ssm_dtype or dtype, device=device)
        self.register_buffer("conv_state", conv, persistent=False)
        self.register_buffer("ssm_state", ssm, persistent=False)

    def reset(self) -> None:
        """Zero both states in place."""
        self.conv_state.zero_()
        self.ssm_state.zero_()

    def extra_repr(self) -> str:
        return (
            f"batch_size={self.batch_size}, d_inner={self.d_inner}, d_conv={self.d_conv}, "
            f"d_state={self.d_state}"
        )
