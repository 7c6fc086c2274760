"""Tests for vermeil.nn.cache: static KV cache writes and the SSM state container."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from vermeil.nn.cache import KVCache, RingKVCache, SSMState

B, HKV, S_MAX, DH = 3, 2, 11, 5


def test_update_writes_at_positions_and_leaves_the_rest() -> None:
    torch.manual_seed(0)
    cache = KVCache(B, S_MAX, HKV, DH, dtype=torch.float32)
    k, v = torch.randn(B, HKV, 3, DH), torch.randn(B, HKV, 3, DH)
    k_all, v_all = cache.update(torch.tensor([4, 5, 6]), k, v)
    assert k_all.shape == v_all.shape == (B, HKV, S_MAX, DH)
    torch.testing.assert_close(k_all[:, :, 4:7], k, rtol=0, atol=0)
    torch.testing.assert_close(v_all[:, :, 4:7], v, rtol=0, atol=0)
    untouched = torch.ones(S_MAX, dtype=torch.bool)
    untouched[4:7] = False
    assert not k_all[:, :, untouched].any() and not v_all[:, :, untouched].any()
    # The returned tensors are the buffers: a later write is visible through them.
    cache.update(torch.tensor([0]), k[:, :, :1], v[:, :, :1])
    torch.testing.assert_close(k_all[:, :, 0], k[:, :, 0], rtol=0, atol=0)


def test_smaller_batch_uses_leading_rows_and_casts_dtype() -> None:
    cache = KVCache(B, S_MAX, HKV, DH, dtype=torch.float64)
    k = torch.randn(2, HKV, 1, DH)
    k_all, _ = cache.update(torch.tensor([2]), k, k)
    assert k_all.shape[0] == 2 and k_all.dtype == torch.float64
    torch.testing.assert_close(cache.k_cache[:2, :, 2], k[:, :, 0].double())
    assert not cache.k_cache[2].any()


def test_reset_and_buffers_are_not_checkpointed() -> None:
    cache = KVCache(B, S_MAX, HKV, DH)
    cache.update(torch.tensor([0]), torch.ones(B, HKV, 1, DH), torch.ones(B, HKV, 1, DH))
    buf = cache.k_cache
    cache.reset()
    assert cache.k_cache is buf and not buf.any() and not cache.v_cache.any()
    assert cache.state_dict() == {}
    assert {name for name, _ in cache.named_buffers()} == {"k_cache", "v_cache"}


def test_update_errors() -> None:
    cache = KVCache(B, S_MAX, HKV, DH)
    k = torch.randn(B, HKV, 2, DH)
    with pytest.raises(ValueError, match=r"k must have shape \(B<=3, kv_heads=2, T, head_dim=5\)"):
        cache.update(torch.arange(2), torch.randn(B, 3, 2, DH), torch.randn(B, 3, 2, DH))
    with pytest.raises(ValueError, match=r"v must have the shape of k"):
        cache.update(torch.arange(2), k, k[:, :, :1])
    with pytest.raises(ValueError, match=r"input_pos must have shape \(T=2,\)"):
        cache.update(torch.arange(3), k, k)
    with pytest.raises(ValueError, match=r"input_pos up to 11 exceeds max_seq_len=11"):
        cache.update(torch.tensor([10, 11]), k, k)
    with pytest.raises(ValueError, match=r"exceeds max_seq_len=11"):
        big = torch.randn(B, HKV, 12, DH)
        cache.update(torch.arange(12), big, big)
    with pytest.raises(ValueError, match=r"max_seq_len=0 must be a positive int"):
        KVCache(1, 0, 1, 1)
    for bad in (torch.arange(2.0), torch.tensor([True, False])):  # index_copy_ would fail inside torch
        with pytest.raises(TypeError, match=rf"input_pos must hold integer positions, got dtype={bad.dtype}"):
            cache.update(bad, k, k)
        with pytest.raises(TypeError, match=r"input_pos must hold integer positions"):
            RingKVCache(B, 3, HKV, DH, max_seq_len=6).update(bad, k, k)


def test_update_compiles_to_one_graph_across_positions() -> None:
    cache = KVCache(1, S_MAX, HKV, DH)
    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def step(pos: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        k_all, _ = cache.update(pos, k, k)
        return k_all.sum(2)

    for p in range(4):
        k = torch.full((1, HKV, 1, DH), float(p + 1))
        step(torch.tensor([p]), k)
    assert counter.frame_count == 1  # a Python-int slice would recompile at the second position
    torch.testing.assert_close(cache.k_cache[0, 0, :4, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_ssm_state() -> None:
    state = SSMState(2, 7, 4, 3, dtype=torch.bfloat16, ssm_dtype=torch.float32)
    assert state.conv_state.shape == (2, 7, 4) and state.conv_state.dtype == torch.bfloat16
    assert state.ssm_state.shape == (2, 7, 3) and state.ssm_state.dtype == torch.float32
    state.conv_state.fill_(1.0)
    state.ssm_state.fill_(2.0)
    state.reset()
    assert not state.conv_state.any() and not state.ssm_state.any()
    assert state.state_dict() == {}
    assert SSMState(1, 2, 3, 4, dtype=torch.float64).ssm_state.dtype == torch.float64
    with pytest.raises(ValueError, match=r"d_state=0 must be a positive int"):
        SSMState(1, 2, 3, 0)
    assert SSMState(1, 2, 3, 4, device="meta").conv_state.is_meta


# ----------------------------------------------------------------------------------------------------------
# RingKVCache


def test_ring_returns_the_positions_it_holds() -> None:
    torch.manual_seed(0)
    ring = RingKVCache(2, 4, HKV, DH, max_seq_len=10, dtype=torch.float64)
    k = torch.randn(2, HKV, 10, DH, dtype=torch.float64)
    v = torch.randn(2, HKV, 10, DH, dtype=torch.float64)
    # Prefill of 3: the old (empty) ring then the new keys; afterwards the ring holds 0, 1, 2 in slots 0..2.
    k_all, v_all, pos = ring.update_with_positions(torch.arange(3), k[:, :, :3], v[:, :, :3])
    assert pos.tolist() == [10, 10, 10, 10, 0, 1, 2]  # empty slots hold max_seq_len: in every query's future
    torch.testing.assert_close(k_all[:, :, 4:], k[:, :, :3], rtol=0, atol=0)
    assert ring.kv_pos.tolist() == [0, 1, 2, 10]
    # One token at a time: written first, slot = position % 4; the returned views are the buffers.
    for p in range(3, 7):
        k_all, v_all, pos = ring.update_with_positions(
            torch.tensor([p]), k[:, :, p : p + 1], v[:, :, p : p + 1]
        )
        assert k_all.data_ptr() == ring.k_cache.data_ptr()
    assert pos.tolist() == [4, 5, 6, 3]
    for slot, p in enumerate(pos.tolist()):
        torch.testing.assert_close(k_all[:, :, slot], k[:, :, p], rtol=0, atol=0)
        torch.testing.assert_close(v_all[:, :, slot], v[:, :, p], rtol=0, atol=0)
    # A prefill longer than the ring keeps its last 4 positions.
    ring.reset()
    assert ring.kv_pos.tolist() == [10] * 4 and not ring.k_cache.any()
    _, _, pos = ring.update_with_positions(torch.arange(7), k[:, :, :7], v[:, :, :7])
    assert pos.tolist() == [10, 10, 10, 10, 0, 1, 2, 3, 4, 5, 6]
    assert sorted(ring.kv_pos.tolist()) == [3, 4, 5, 6]
    assert ring.state_dict() == {}


def test_ring_update_errors() -> None:
    ring = RingKVCache(B, 3, HKV, DH, max_seq_len=6)
    with pytest.raises(ValueError, match=r"input_pos up to 6 exceeds max_seq_len=6"):
        ring.update(torch.tensor([6]), torch.zeros(B, HKV, 1, DH), torch.zeros(B, HKV, 1, DH))
    with pytest.raises(ValueError, match=r"k must have shape"):
        ring.update(torch.tensor([0]), torch.zeros(B + 1, HKV, 1, DH), torch.zeros(B + 1, HKV, 1, DH))
    with pytest.raises(ValueError, match=r"slots=0 must be a positive int"):
        RingKVCache(B, 0, HKV, DH)


def test_full_cache_positions_are_every_slot() -> None:
    cache = KVCache(B, S_MAX, HKV, DH)
    k = torch.ones(B, HKV, 2, DH)
    k_all, _, pos = cache.update_with_positions(torch.tensor([3, 4]), k, k)
    assert pos.tolist() == list(range(S_MAX)) and k_all.shape[2] == S_MAX


def test_ring_rewrite_from_a_position_replaces_what_it_held_there_as_the_full_cache_does() -> None:
    # A new sequence written from position 0 without `reset` (gpt-fast reuses its caches so): the full
    # cache overwrites slots 0.. and causality hides the rest. The ring used to return its old keys at the
    # rewritten positions next to the new ones, so a prefill attended to both sequences.
    torch.manual_seed(0)
    ring = RingKVCache(1, 5, HKV, DH, max_seq_len=16, dtype=torch.float64)
    old, new = (torch.randn(1, HKV, 5, DH, dtype=torch.float64) for _ in range(2))
    ring.update_with_positions(torch.arange(5), old, old)  # positions 0..4 of the first sequence
    _, _, pos = ring.update_with_positions(torch.arange(3), new[:, :, :3], new[:, :, :3])
    assert pos.tolist() == [16, 16, 16, 16, 16, 0, 1, 2]  # the old 0..4 are gone, as in a fresh ring
    # a rewrite from a later position keeps the earlier keys
    ring.reset()
    ring.update_with_positions(torch.arange(5), old, old)
    _, _, pos = ring.update_with_positions(torch.arange(3, 5), new[:, :, :2], new[:, :, :2])
    assert pos.tolist() == [0, 1, 2, 16, 16, 3, 4]
