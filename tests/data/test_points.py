"""Tests for vermeil/data/points.py: the 2-D distributions have their shapes; paired sequences are deterministic."""

from __future__ import annotations

import math

import pytest
import torch

from vermeil.data.points import DISTRIBUTIONS, RING_RADII, paired_sequences, sample_points


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_shapes_determinism_and_range(name: str) -> None:
    x = sample_points(name, 301, _gen())
    assert x.shape == (301, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, sample_points(name, 301, _gen()))
    assert not torch.equal(x, sample_points(name, 301, _gen(1)))
    assert x.abs().max() < 6.0
    assert sample_points(name, 5, _gen(), dtype=torch.float64).dtype == torch.float64
    assert sample_points(name, 0, _gen()).shape == (0, 2)


def test_distributions_have_their_shapes() -> None:
    g = _gen()
    cb = sample_points("checkerboard", 2000, g, dtype=torch.float64)
    assert ((torch.floor(cb[:, 0] / 2) + torch.floor(cb[:, 1] / 2)) % 2 == 0).all()

    rings = sample_points("rings", 2000, g, dtype=torch.float64)
    dist = (
        (rings.norm(dim=1, keepdim=True) - torch.tensor(RING_RADII, dtype=torch.float64))
        .abs()
        .min(dim=1)
        .values
    )
    assert dist.mean() < 0.1

    gs = sample_points("gaussians", 2000, g, dtype=torch.float64)
    k = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 4 / math.sqrt(2) * torch.stack([k.cos(), k.sin()], dim=1)
    nearest = torch.cdist(gs, centres).argmin(dim=1)
    assert nearest.bincount(minlength=8).min() > 150  # all 8 modes used
    assert torch.cdist(gs, centres).min(dim=1).values.mean() < 0.6

    gauss = sample_points("gaussian", 4000, g, dtype=torch.float64)
    torch.testing.assert_close(gauss.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.08, rtol=0)
    torch.testing.assert_close(gauss.std(0), torch.ones(2, dtype=torch.float64), atol=0.05, rtol=0)


def test_unknown_distribution() -> None:
    with pytest.raises(ValueError, match=r"distribution 'mooons' must be one of \["):
        sample_points("mooons", 3)
    with pytest.raises(ValueError, match="n=-1"):
        sample_points("moons", -1)


def _angles(pts: torch.Tensor) -> torch.Tensor:
    c = pts - pts.mean(dim=1, keepdim=True)
    return torch.atan2(c[..., 1], c[..., 0])


def test_paired_sequences() -> None:
    cond, data = paired_sequences(3, 17, _gen())
    assert cond.shape == data.shape == (3, 17, 2) and cond.dtype == torch.float32
    c2, d2 = paired_sequences(3, 17, _gen())
    assert torch.equal(cond, c2) and torch.equal(data, d2)
    c3, _ = paired_sequences(3, 17, _gen(1))
    assert not torch.equal(cond, c3)
    assert (_angles(cond.double()).diff(dim=1) >= -1e-6).all()  # both sorted by angle: rank i matches rank i
    assert (_angles(data.double()).diff(dim=1) >= -1e-6).all()
    radii = data.double().norm(dim=-1, keepdim=True) - torch.tensor(RING_RADII, dtype=torch.float64)
    assert radii.abs().min(dim=-1).values.mean() < 0.15  # data come from the target shape ("rings")
    cb_cond, _ = paired_sequences(2, 9, _gen(), source="checkerboard", target="moons")
    assert ((torch.floor(cb_cond[..., 0] / 2) + torch.floor(cb_cond[..., 1] / 2)) % 2 == 0).all()
    with pytest.raises(ValueError, match="target='ring'"):
        paired_sequences(1, 4, target="ring")
    with pytest.raises(ValueError, match="length=0"):
        paired_sequences(1, 0)


def test_points_refuse_an_integer_dtype_and_a_name_that_is_no_string() -> None:
    """dtype=torch.long truncated every coordinate to an integer silently; a list as the name raised
    "unhashable type: 'list'"."""
    with pytest.raises(ValueError, match=r"dtype=torch.int64 must be a floating-point torch.dtype"):
        sample_points("moons", 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"dtype=torch.int64 must be a floating-point torch.dtype"):
        paired_sequences(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"distribution \['moons'\] must be one of"):
        sample_points(["moons"], 3)
    with pytest.raises(ValueError, match=r"source=\['moons'\] must be one of"):
        paired_sequences(2, 3, source=["moons"])
    assert sample_points("moons", 3, dtype=torch.bfloat16).dtype == torch.bfloat16
