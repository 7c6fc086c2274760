"""Shared test settings: a fixed seed for every test and a deterministic, single-threaded-friendly setup."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
