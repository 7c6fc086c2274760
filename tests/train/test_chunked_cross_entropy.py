"""Tests for the chunked cross-entropy fused with the head (vermeil/train/losses.py): `chunked_cross_entropy`
against `F.cross_entropy(hidden @ W.T + b)` in loss and in the gradients of hidden, weight and bias, a float64
gradcheck, and the trainer's loss functions built on it (`chunked_lm_loss_fn`) against the full-logits ones on
Vermeil's language models.

Shapes: N tokens, D hidden width, V vocabulary, B batch, T sequence length.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from vermeil.models import hybrid, llm, mamba
from vermeil.train.losses import (
    capture_head_input,
    causal_lm_loss,
    chunked_cross_entropy,
    chunked_lm_loss_fn,
    default_chunk_size,
    lm_head,
    lm_loss_fn,
)


def _problem(n: int = 37, d: int = 16, v: int = 53, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    bias = torch.randn(v, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[3, 10, n - 1]] = -100
    return hidden, weight, bias, targets


def _grads(loss: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, inputs, retain_graph=True)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 36, 37, 64, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_cross_entropy_loss_and_gradients(chunk_size: int | None, with_bias: bool) -> None:
    """37 tokens (3 ignored) in chunks that do and do not divide 37 (1, 5, 8, 36, 37, 64, the default)."""
    hidden, weight, bias, targets = _problem()
    b = bias if with_bias else None
    ref = F.cross_entropy(F.linear(hidden, weight, b), targets)
    out = chunked_cross_entropy(hidden, weight, targets, bias=b, chunk_size=chunk_size)
    assert out.dtype == torch.float32 and out.shape == ()
    assert_close(out, ref)
    inputs = (hidden, weight, bias) if with_bias else (hidden, weight)
    for got, want in zip(_grads(out, *inputs), _grads(ref, *inputs)):
        assert_close(got, want)
    # ignored tokens get no gradient at all
    assert (
        _grads(chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size), hidden)[0][
            targets == -100
        ]
        .abs()
        .max()
        == 0
    )


def test_z_loss_label_smoothing_reduction_ignore_index() -> None:
    hidden, weight, bias, targets = _problem()
    logits = F.linear(hidden, weight)
    keep = targets != -100
    z = torch.logsumexp(logits, -1)[keep].square().mean()
    for got, want in [
        (
            chunked_cross_entropy(hidden, weight, targets, z_loss=1e-2, chunk_size=6),
            F.cross_entropy(logits, targets) + 1e-2 * z,
        ),
        (
            chunked_cross_entropy(hidden, weight, targets, label_smoothing=0.1, chunk_size=6),
            F.cross_entropy(logits, targets, label_smoothing=0.1),
        ),
        (
            chunked_cross_entropy(hidden, weight, targets, reduction="sum", chunk_size=6),
            F.cross_entropy(logits, targets, reduction="sum"),
        ),
    ]:
        assert_close(got, want)
        for g1, g2 in zip(_grads(got, hidden, weight), _grads(want, hidden, weight)):
            assert_close(g1, g2)
    other = torch.where(keep, targets, 7)  # ignore class 7 instead of -100 (rows with target 7 drop out)
    assert_close(
        chunked_cross_entropy(hidden, weight, other, ignore_index=7, chunk_size=4),
        F.cross_entropy(logits, other, ignore_index=7),
    )
    # every token ignored: 0 (F.cross_entropy's mean is nan), and zero gradients
    none = torch.full_like(targets, -100)
    out = chunked_cross_entropy(hidden, weight, none)
    assert out.item() == 0.0 and _grads(out, hidden)[0].abs().max() == 0


def test_leading_axes_and_float64_gradcheck() -> None:
    hidden, weight, bias, targets = _problem(n=12, d=5, v=9, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_cross_entropy(
            h, w, targets, bias=b, chunk_size=5, z_loss=0.1, label_smoothing=0.2
        ),
        (hidden, weight, bias),
    )
    # (B, T, D) hidden with (B, T) targets equals the flattened problem
    assert_close(
        chunked_cross_entropy(hidden.view(3, 4, 5), weight, targets.view(3, 4), chunk_size=5),
        chunked_cross_entropy(hidden, weight, targets, chunk_size=5),
    )


def test_autocast_matches_linear_under_autocast() -> None:
    """Under bf16 autocast the chunks' matmuls run in bf16 as nn.Linear's would; the loss is float32."""
    hidden, weight, _, targets = _problem(n=64, d=32, v=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        out = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
    assert out.dtype == torch.float32
    assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for got, want in zip(_grads(out, hidden, weight), _grads(ref, hidden, weight)):
        assert_close(got, want, rtol=2e-2, atol=2e-3)  # bf16 products, summed in a different order
        assert got.dtype == want.dtype == torch.float32


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_full_logits() -> None:
    """Forward and backward create no tensor larger than one chunk of logits or the weight (V, D)."""
    n, d, v, chunk = 256, 8, 300, 32
    hidden, weight, _, targets = _problem(n=n, d=d, v=v)
    with _LargestTensor() as seen:
        chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk).backward()
    assert seen.largest <= max(chunk * v, v * d, n * d) < n * v
    with _LargestTensor() as seen_ref:
        F.cross_entropy(F.linear(hidden, weight), targets).backward()
    assert seen_ref.largest >= n * v  # the reference does hold them


def test_default_chunk_size_and_errors() -> None:
    # ceil(V / D) chunks, a power of two: a chunk of logits about the size of the hidden states
    assert default_chunk_size(8192, 32000, 2048) == 512
    assert default_chunk_size(10, 5, 100) == 16
    assert default_chunk_size(2048, 32000, 128) == 256  # at least 256 tokens a chunk (16 by the rule alone)
    hidden, weight, _, targets = _problem()
    with pytest.raises(ValueError, match="chunk_size=0 must be an int >= 1"):
        chunked_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, D=16\)"):
        chunked_cross_entropy(hidden, weight.T, targets)
    with pytest.raises(ValueError, match="targets.shape"):
        chunked_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="reduction='none'"):
        chunked_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="label_smoothing=1.0"):
        chunked_cross_entropy(hidden, weight, targets, label_smoothing=1.0)
    with pytest.raises(TypeError, match="must share a dtype"):
        chunked_cross_entropy(hidden.double(), weight, targets)
    with torch.no_grad():
        detached = chunked_cross_entropy(hidden, weight, targets)
    assert_close(detached, F.cross_entropy(F.linear(hidden, weight), targets).detach())


# ----------------------------------------------------------------------------------------------------------
# The trainer's loss functions on the models


def _models() -> list[tuple[str, nn.Module]]:
    torch.manual_seed(0)
    return [
        ("llm", llm.build("debug")),  # MoE layers: the aux loss rides along
        ("llm-tied", llm.build("debug", tie_word_embeddings=True, moe_args=None)),
        ("mamba", mamba.MambaLM(mamba.config_from_preset("debug"))),  # padded head: 104 rows, 101 logits
        ("hybrid", hybrid.build("debug")),
    ]


@pytest.mark.parametrize("name", ["llm", "llm-tied", "mamba", "hybrid"])
def test_chunked_lm_loss_equals_full_logits(name: str) -> None:
    model = dict(_models())[name].train()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 101, (2, 9), generator=g)
    y = torch.randint(0, 101, (2, 9), generator=g)
    y[0, 2] = -100
    chunked = chunked_lm_loss_fn(causal_lm_loss, model, chunk_size=5)
    assert chunked is not None
    params = [p for p in model.parameters() if p.requires_grad]
    ref, ref_metrics = causal_lm_loss(model, (x, y))
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    out, metrics = chunked(model, (x, y))
    grads = torch.autograd.grad(out, params, allow_unused=True)
    assert_close(out, ref)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        assert_close(metrics[k], ref_metrics[k])
    for got, want in zip(grads, ref_grads):
        if want is None:
            assert got is None or got.abs().max() == 0
        else:
            assert_close(got, want, atol=1e-6, rtol=1e-4)
    # the head is left as it was: the next plain forward computes logits again
    assert "forward" not in (model.output if hasattr(model, "output") else model.lm_head).__dict__
    assert model(x) is not None


def test_chunked_loss_head_keeps_ignore_index_and_z_loss() -> None:
    torch.manual_seed(0)
    model = hybrid.build("debug", ignore_index=5, z_loss=1e-3).train()
    full = lm_loss_fn(model.config)
    chunked = chunked_lm_loss_fn(full, model, chunk_size=4)
    assert chunked is not None
    x = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(4))
    y = torch.roll(x, -1, 1)
    y[:, -1] = 5  # ignored
    (ref, _), (out, _) = full(model, (x, y)), chunked(model, (x, y))
    assert_close(out, ref)
    w = model.lm_head.weight
    assert_close(torch.autograd.grad(out, w)[0], torch.autograd.grad(ref, w)[0], atol=1e-6, rtol=1e-4)


def test_chunked_lm_loss_fn_declines_and_refuses() -> None:
    class NoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 7)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.proj(torch.ones(*tokens.shape, 4))

    class Transforms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.lm_head = nn.Linear(4, 7)

        def forward(self, tokens: Tensor) -> Tensor:
            return torch.tanh(self.lm_head(self.emb(tokens))) * 30  # soft-capped logits

    assert chunked_lm_loss_fn(causal_lm_loss, NoHead()) is None
    assert chunked_lm_loss_fn(lambda m, b: torch.zeros(()), Transforms()) is None
    model = Transforms()
    chunked = chunked_lm_loss_fn(causal_lm_loss, model)
    assert chunked is not None
    x = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="transforms them: set train.loss_chunk_size=0"):
        chunked(model, (x, x))
    assert "forward" not in model.lm_head.__dict__  # restored after the error too
    with pytest.raises(ValueError, match="no output head"), capture_head_input(NoHead()):
        pass


def test_head_found_by_the_model_contract() -> None:
    """`lm_parts` (embedding, final norm, head) names the head, nested or not; else `output` / `lm_head`."""

    class Nested(nn.Module):
        lm_parts = ("emb", "norm", "out.proj")

        def __init__(self) -> None:
            super().__init__()
            self.emb, self.norm, self.out = nn.Embedding(7, 4), nn.LayerNorm(4), nn.Module()
            self.out.proj = nn.Linear(4, 7)
            self.lm_head = nn.Linear(4, 7)  # not the head: lm_parts says so

    model = Nested()
    assert lm_head(model) is model.out.proj
    models = dict(_models())
    assert lm_head(models["llm"]) is models["llm"].output
    assert lm_head(models["mamba"]) is models["mamba"].lm_head
