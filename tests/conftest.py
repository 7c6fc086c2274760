"""Shared test settings: a fixed seed for every test, one intra-op thread, Triton's interpreter without CUDA.

The suite runs tiny, odd-sized tensors, where OpenMP's thread wake-ups cost more than the arithmetic; on a
shared or small machine two threads make such tests many times slower and no more exact.
"""

import os

import pytest
import torch

torch.set_num_threads(1)
# Without CUDA, Triton kernels run in Triton's interpreter (tests/nn/test_scan_triton.py). The variable is
# read when a @triton.jit function is defined, so it is set here, before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _default_malloc():
    """`vermeil train` makes glibc keep freed memory for the rest of its process (vermeil.train.allocator);
    the CLI tests call it in this process, which must stay as it is: the real call is tested in a subprocess."""
    import vermeil.train

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vermeil.train, "keep_freed_memory", lambda: False)
        yield
