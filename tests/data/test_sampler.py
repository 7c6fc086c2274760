"""vermeil.data.sampler.SeededSampler: the one seeded, resumable batch stream of the text, synthetic and flow tasks."""

from __future__ import annotations

import pytest
import torch

from vermeil.data import WindowSampler, mqar, sample_windows
from vermeil.data.sampler import SeededSampler


def test_window_sampler_is_a_seeded_sampler_with_the_same_batches() -> None:
    data = torch.arange(1000, dtype=torch.uint8)
    sampler = WindowSampler(data, 4, 16, seed=3)
    assert isinstance(sampler, SeededSampler)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # the stream is sample_windows with one generator, as before
        x, y = next(sampler)
        ex, ey = sample_windows(data, 4, 16, g)
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert sampler.data is data and sampler.seq_len == 16 and sampler.batch_size == 4


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: WindowSampler(torch.arange(500) % 256, 3, 8, seed=seed),
        lambda seed: SeededSampler(mqar, 3, seed, vocab_size=40, seq_len=16, num_kv_pairs=2),
    ],
)
def test_resume_continues_the_stream(make) -> None:  # noqa: ANN001
    a = make(4)
    a.sample()
    state = a.state_dict()
    expected = [next(a) for _ in range(2)]
    b = make(99)
    b.load_state_dict(state)
    for want, got in zip(expected, (b.sample(), next(iter(b)))):
        assert all(torch.equal(w, g) for w, g in zip(want, got))


def test_batch_size_is_checked() -> None:
    with pytest.raises(ValueError, match="batch_size=0 must be an int >= 1"):
        SeededSampler(mqar, 0)


def test_seed_and_state_are_checked() -> None:
    """A float seed raised torch's "manual_seed expected a long" (naming no argument); a state without a
    generator tensor (a damaged state.pt) raised KeyError('generator') or set_state's own RuntimeError."""
    with pytest.raises(ValueError, match=r"seed=1.5 must be an int"):
        SeededSampler(mqar, 2, seed=1.5)
    with pytest.raises(ValueError, match=r"seed=None must be an int"):
        SeededSampler(mqar, 2, seed=None)
    sampler = SeededSampler(mqar, 2, seed=-1, vocab_size=40, seq_len=16, num_kv_pairs=2)
    for bad in ({}, {"generator": torch.zeros(3)}, [1, 2]):
        with pytest.raises(ValueError, match=r"a sampler state must be \{'generator': a 1-D uint8 tensor\}"):
            sampler.load_state_dict(bad)
