"""Tests for vermeil/train/losses.py: causal_lm_loss, the cross-entropy head with ignore_index and z-loss, loss
heads by name from a model config, and the trainer's loss function of a language-model config.

Shapes: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vermeil.models.hybrid import PRESETS, HybridConfig, HybridModel, build
from vermeil.models.mamba import MambaConfig
from vermeil.train.losses import (
    LOSS_HEADS,
    CrossEntropyLoss,
    causal_lm_loss,
    head_loss,
    lm_loss_fn,
    loss_head,
    register_loss_head,
)


def tiny(**overrides: object) -> torch.nn.Module:
    """The hybrid's debug preset (V 101), seeded."""
    torch.manual_seed(0)
    return build("debug", **overrides).eval()  # type: ignore[arg-type]


def tokens(b: int = 2, t: int = 7, vocab: int = 101, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_cross_entropy_head_ignore_index_and_z_loss() -> None:
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = -100
    ce = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    assert_close(CrossEntropyLoss()(logits, targets), ce)
    keep = targets.reshape(-1) != -100
    z = torch.logsumexp(logits.reshape(-1, 11), -1)[keep].square().mean()
    assert_close(CrossEntropyLoss(z_loss=1e-2)(logits, targets), ce + 1e-2 * z)
    with pytest.raises(ValueError, match="z_loss=-1"):
        CrossEntropyLoss(z_loss=-1)


@pytest.mark.parametrize("z_loss", [float("nan"), float("inf")])
def test_cross_entropy_head_refuses_a_nonfinite_z_loss(z_loss: float) -> None:
    with pytest.raises(ValueError, match=rf"z_loss={z_loss} must be a finite number >= 0"):
        CrossEntropyLoss(z_loss=z_loss)  # accepted before: every loss came out nan or inf


def test_loss_head_is_pluggable() -> None:
    x = tokens()
    model = tiny()
    targets = torch.roll(x, -1, 1)
    expected = F.cross_entropy(model(x).reshape(-1, 101), targets.reshape(-1))
    head = loss_head(model.config)
    assert_close(head_loss(model, head, x, targets), expected)
    assert_close(
        head_loss(model, head, x), F.cross_entropy(model(x)[:, :-1].reshape(-1, 101), x[:, 1:].reshape(-1))
    )

    calls = []

    def mean_logit(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(targets.shape)
        return logits.mean()

    assert_close(head_loss(model, mean_logit, x, targets), model(x).mean())
    assert calls == [(2, 7)]

    register_loss_head("mean_logit_test", lambda cfg: mean_logit)
    try:
        by_name = tiny(loss_head="mean_logit_test")
        assert_close(head_loss(by_name, loss_head(by_name.config), x, targets), by_name(x).mean())
    finally:
        LOSS_HEADS.pop("mean_logit_test")
    with pytest.raises(ValueError, match=r"targets.shape=\(2, 6\) must equal tokens.shape=\(2, 7\)"):
        head_loss(model, head, x, targets[:, :6])
    with pytest.raises(ValueError, match="loss_head='focal' must be one of"):
        loss_head(HybridConfig(loss_head="focal"))
    with pytest.raises(TypeError, match="factory for loss head 'bad' must be callable"):
        register_loss_head("bad", "cross_entropy")  # type: ignore[arg-type]


def test_models_hold_no_loss() -> None:
    # The loss lives in training: a model takes no loss head and has no loss method.
    with pytest.raises(TypeError, match="loss_head"):
        HybridModel(HybridConfig(**PRESETS["debug"]), loss_head=CrossEntropyLoss())  # type: ignore[call-arg]
    assert not hasattr(tiny(), "loss") and not hasattr(tiny(), "loss_head")


def test_z_loss_from_the_config() -> None:
    x = tokens()
    model = tiny(z_loss=1e-3)
    targets = torch.roll(x, -1, 1)
    logits = model(x).reshape(-1, 101)
    expected = (
        F.cross_entropy(logits, targets.reshape(-1)) + 1e-3 * torch.logsumexp(logits, -1).square().mean()
    )
    assert_close(head_loss(model, loss_head(model.config), x, targets), expected)


def test_lm_loss_fn_per_config() -> None:
    x = tokens()
    targets = torch.roll(x, -1, 1)
    model = tiny(z_loss=1e-3)
    loss, metrics = lm_loss_fn(model.config)(model, (x, targets))
    assert_close(loss, head_loss(model, loss_head(model.config), x, targets))
    assert metrics == {}  # the head's loss alone, as the hybrid's runs always logged it
    # A config without a loss head trains on causal_lm_loss (cross-entropy, logged as "ce").
    assert lm_loss_fn(MambaConfig()) is causal_lm_loss
    loss, metrics = causal_lm_loss(model, (x, targets))
    assert_close(loss, F.cross_entropy(model(x).reshape(-1, 101), targets.reshape(-1)))
    assert set(metrics) == {"ce"}


def test_a_batch_with_every_target_ignored_is_a_zero_loss() -> None:
    """A micro-batch that scores nothing (every target -100: a prompt-only window, an MQAR batch without
    queries) gives loss 0 and zero gradients, as the chunked cross-entropy does (train.loss_chunk_size), not
    F.cross_entropy's nan mean, which the trainer takes for divergence (NonFiniteError)."""
    model = tiny().train()
    x = tokens()
    none = torch.full_like(x, -100)
    for loss in (
        causal_lm_loss(model, (x, none))[0],
        head_loss(model, CrossEntropyLoss(z_loss=1e-3), x, none),
    ):
        assert loss.item() == 0.0
        model.zero_grad()
        loss.backward()
        assert all(p.grad is None or not p.grad.abs().max() for p in model.parameters())
    # scored batches are unchanged, to the bit
    y = tokens(seed=2)
    y[0, :3] = -100
    model.eval()  # the same logits twice
    logits = model(x)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
    assert torch.equal(causal_lm_loss(model, (x, y))[0], ce)
    assert torch.equal(CrossEntropyLoss()(logits, y), ce)
