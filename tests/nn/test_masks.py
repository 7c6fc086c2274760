"""Tests for vermeil.nn.masks: every rule against a brute-force loop over positions."""

from __future__ import annotations

import pytest
import torch

from vermeil.nn.masks import (
    attention_mask,
    causal_mask,
    chunked_mask,
    document_mask,
    padding_mask,
    sliding_window_mask,
)


def brute(q_pos: list[int], kv_pos: list[int], rule) -> torch.Tensor:
    return torch.tensor([[bool(rule(q, k)) for k in kv_pos] for q in q_pos])


def test_causal_equals_tril_when_square() -> None:
    pos = torch.arange(7)
    torch.testing.assert_close(causal_mask(pos, pos)[0], torch.ones(7, 7, dtype=torch.bool).tril())


def test_causal_is_bottom_right_when_t_lt_s() -> None:
    # Three new queries at the end of an 8-long sequence: query i sits at position 5 + i (x-transformers #187).
    q_pos, kv_pos = torch.arange(5, 8), torch.arange(8)
    got = causal_mask(q_pos, kv_pos)[0]
    torch.testing.assert_close(got, brute(list(range(5, 8)), list(range(8)), lambda q, k: k <= q))
    torch.testing.assert_close(got, torch.ones(3, 8, dtype=torch.bool).tril(5))
    assert not torch.equal(got, torch.ones(3, 8, dtype=torch.bool).tril())  # not top-left


@pytest.mark.parametrize("window", [1, 3, 20])
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(window: int, causal: bool) -> None:
    q_pos, kv_pos = [4, 5, 6, 9], list(range(11))
    got = sliding_window_mask(torch.tensor(q_pos), torch.tensor(kv_pos), window, causal=causal)[0]
    rule = (lambda q, k: 0 <= q - k < window) if causal else (lambda q, k: abs(q - k) < window)
    torch.testing.assert_close(got, brute(q_pos, kv_pos, rule))
    # The last `window` positions including itself: each causal row has min(window, q + 1) keys.
    if causal:
        assert got.sum(-1).tolist() == [min(window, q + 1) for q in q_pos]


@pytest.mark.parametrize("chunk", [1, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_chunked(chunk: int, causal: bool) -> None:
    q_pos, kv_pos = list(range(3, 11)), list(range(11))
    got = chunked_mask(torch.tensor(q_pos), torch.tensor(kv_pos), chunk, causal=causal)[0]
    if causal:
        rule = lambda q, k: q // chunk == k // chunk and k <= q  # noqa: E731
    else:
        rule = lambda q, k: q // chunk == k // chunk  # noqa: E731
    torch.testing.assert_close(got, brute(q_pos, kv_pos, rule))


def test_padding_mask_is_a_broadcast_view() -> None:
    kpm = torch.tensor([[True, True, False], [True, False, False]])
    got = padding_mask(kpm)
    assert got.shape == (2, 1, 1, 3)
    torch.testing.assert_close(got[:, 0, 0], kpm)


def test_attention_mask_is_the_conjunction() -> None:
    torch.manual_seed(0)
    q_pos, kv_pos = torch.arange(2, 9), torch.arange(9)
    kpm = torch.rand(3, 9) > 0.3
    got = attention_mask(q_pos, kv_pos, causal=True, window=4, chunk=3, key_padding_mask=kpm)
    assert got.shape == (3, 1, 7, 9)
    expected = (
        causal_mask(q_pos, kv_pos) & sliding_window_mask(q_pos, kv_pos, 4) & chunked_mask(q_pos, kv_pos, 3)
    )[:, None] & kpm[:, None, None, :]
    torch.testing.assert_close(got, expected)


def test_attention_mask_without_rules_is_all_true_and_batched_positions() -> None:
    got = attention_mask(torch.arange(3), torch.arange(5), causal=False)
    assert got.shape == (1, 1, 3, 5) and bool(got.all())
    # Per-row positions (B, T), e.g. left-padded rows with shifted ids.
    pos = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]])
    got = attention_mask(pos, pos, causal=True)
    assert got.shape == (2, 1, 4, 4)
    torch.testing.assert_close(got[1, 0], brute([0, 0, 1, 2], [0, 0, 1, 2], lambda q, k: k <= q))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window": 0}, ValueError, r"window=0 must be a positive int"),
        ({"chunk": -2}, ValueError, r"chunk=-2 must be a positive int"),
        ({"window": 2.5}, ValueError, r"window=2.5 must be a positive int"),
        (
            {"key_padding_mask": torch.ones(2, 4, dtype=torch.bool)},
            ValueError,
            r"key_padding_mask must have shape",
        ),
        ({"key_padding_mask": torch.ones(2, 5)}, TypeError, r"key_padding_mask must be a bool Tensor"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        attention_mask(torch.arange(5), torch.arange(5), **kwargs)


def test_bad_positions() -> None:
    with pytest.raises(TypeError, match=r"q_pos must hold integer positions"):
        causal_mask(torch.arange(3.0), torch.arange(3))
    with pytest.raises(ValueError, match=r"kv_pos must have shape \(T,\) or \(B, T\)"):
        causal_mask(torch.arange(3), torch.zeros(1, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must share the batch size"):
        causal_mask(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))


def test_document_mask_against_brute_force() -> None:
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 6, 6]])
    got = document_mask(ids, ids)
    assert got.shape == (2, 1, 6, 6)
    for b in range(2):
        row = ids[b].tolist()
        torch.testing.assert_close(got[b, 0], brute(row, row, lambda q, k: q == k))
    # queries at the last T positions (T < S)
    assert torch.equal(document_mask(ids[:, 4:], ids), got[:, :, 4:])
    with pytest.raises(TypeError, match="integer document ids"):
        document_mask(ids.float(), ids)
    with pytest.raises(ValueError, match="batch"):
        document_mask(ids[:1], ids)


def test_window_and_chunk_are_required_by_their_own_masks() -> None:
    # None passed the check (it allowed None) and failed in the arithmetic: "- NoneType" / div() arguments.
    pos = torch.arange(4)
    with pytest.raises(ValueError, match="window=None must be a positive int"):
        sliding_window_mask(pos, pos, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk=None must be a positive int"):
        chunked_mask(pos, pos, None)  # type: ignore[arg-type]
