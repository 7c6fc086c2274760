"""Tests for vermeil/nn/lora.py: exact no-op at init, merge/unmerge, freezing, apply_lora targeting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vermeil.nn.lora import (
    LoRA,
    LoRALinear,
    apply_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
)

# Shapes: B batch, T length, I input features, O output features, R rank.
B, T, I, O, R = 2, 7, 37, 23, 4


def _trained(lora: LoRALinear | LoRA) -> LoRALinear | LoRA:
    """Give B a non-zero value, as after some training steps."""
    with torch.no_grad():
        lora.lora_b.weight.normal_()
    return lora


def test_keys_and_init() -> None:
    torch.manual_seed(0)
    lora = LoRALinear(I, O, rank=R, alpha=8.0, bias=True)
    assert set(lora.state_dict()) == {"weight", "bias", "lora_a.weight", "lora_b.weight"}
    assert lora.lora_a.weight.shape == (R, I) and lora.lora_b.weight.shape == (O, R)
    assert lora.scale == 2.0
    assert torch.count_nonzero(lora.lora_b.weight) == 0
    # kaiming uniform with a=sqrt(5): bound 1/sqrt(I)
    assert lora.lora_a.weight.abs().max() <= 1 / math.sqrt(I) + 1e-7
    assert lora.lora_a.weight.abs().max() > 0.5 / math.sqrt(I)
    assert not lora.weight.requires_grad and lora.lora_a.weight.requires_grad


def test_zero_b_leaves_output_unchanged() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(I, O, bias=True)
    x = torch.randn(B, T, I)
    expected = linear(x)
    lora = LoRALinear.from_linear(linear, rank=R, alpha=16.0)
    assert lora.weight is linear.weight and lora.bias is linear.bias
    assert_close(lora(x), expected, rtol=0, atol=0)


def test_forward_matches_definition() -> None:
    torch.manual_seed(0)
    lora = _trained(LoRALinear(I, O, rank=R, alpha=3.0))
    x = torch.randn(B, T, I)
    expected = x @ lora.weight.T + (3.0 / R) * (x @ lora.lora_a.weight.T @ lora.lora_b.weight.T)
    assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores() -> None:
    torch.manual_seed(0)
    lora = _trained(LoRALinear(I, O, rank=R, alpha=8.0, bias=True))
    base = lora.weight.detach().clone()
    x = torch.randn(B, T, I)
    unmerged = lora(x)
    lora.merge()
    assert lora.merged
    assert not torch.equal(lora.weight, base)
    assert_close(lora(x), unmerged, rtol=1e-5, atol=1e-5)  # no double counting
    lora.merge()  # idempotent
    assert_close(lora(x), unmerged, rtol=1e-5, atol=1e-5)
    lora.unmerge()
    assert_close(lora.weight, base, rtol=0, atol=1e-6)
    assert_close(lora(x), unmerged, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_adapter() -> None:
    torch.manual_seed(0)
    lora = _trained(LoRALinear(I, O, rank=R, alpha=8.0, bias=True))
    lora(torch.randn(B, T, I)).sum().backward()
    assert lora.weight.grad is None and lora.bias.grad is None
    assert lora.lora_a.weight.grad is not None and lora.lora_b.weight.grad is not None


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    lora = _trained(LoRALinear(5, 3, rank=2, alpha=4.0, dtype=torch.float64))
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lora(x), (x,))


def test_lora_adapter_module() -> None:
    torch.manual_seed(0)
    adapter = LoRA(I, O, rank=R)
    x = torch.randn(B, T, I)
    assert_close(adapter(x), torch.zeros(B, T, O), rtol=0, atol=0)
    _trained(adapter)
    assert adapter.scale == 1.0  # PaLM-rlhf-pytorch: alpha defaults to the rank
    assert_close(adapter(x), x @ adapter.delta_weight().T, rtol=1e-5, atol=1e-5)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(I, I, bias=False)
        self.wv = nn.Linear(I, I, bias=False)
        self.inner = nn.ModuleDict({"wq": nn.Linear(I, I), "wqx": nn.Linear(I, I)})
        self.norm = nn.LayerNorm(I)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.inner["wqx"](self.inner["wq"](self.wv(self.wq(x)))))


def test_apply_lora_suffix_match_and_helpers() -> None:
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.randn(B, T, I)
    expected = model(x)
    apply_lora(model, ["wq"], rank=R, alpha=8.0)
    assert isinstance(model.wq, LoRALinear) and isinstance(model.inner["wq"], LoRALinear)
    assert type(model.wv) is nn.Linear and type(model.inner["wqx"]) is nn.Linear  # "wq" is no prefix match
    assert_close(model(x), expected, rtol=0, atol=0)  # zero-init B

    trainable = mark_only_lora_as_trainable(model)
    assert sorted(trainable) == sorted(
        ["wq.lora_a.weight", "wq.lora_b.weight", "inner.wq.lora_a.weight", "inner.wq.lora_b.weight"]
    )
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert set(lora_state_dict(model)) == set(trainable)

    _trained(model.wq)
    _trained(model.inner["wq"])
    unmerged = model(x)
    merge_lora(model)
    assert model.wq.merged and model.inner["wq"].merged
    assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


def test_apply_lora_callable_and_no_match() -> None:
    model = _Tiny()
    apply_lora(model, lambda name, m: name == "wv", rank=2, alpha=2.0)
    assert isinstance(model.wv, LoRALinear) and type(model.wq) is nn.Linear
    with pytest.raises(ValueError, match="wo"):
        apply_lora(_Tiny(), ["wo"], rank=2, alpha=2.0)
    apply_lora(model, lambda name, m: True, rank=2, alpha=2.0)  # everything, but never an adapter's A or B
    assert type(model.wv.lora_a) is nn.Linear and isinstance(model.wq, LoRALinear)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"rank": 0}, "rank=0"), ({"dropout": 1.5}, "dropout=1.5"), ({"in_dim": -1}, "in_dim=-1")],
)
def test_bad_arguments(kwargs: dict, word: str) -> None:
    args = {"in_dim": I, "out_dim": O, "rank": R, "alpha": 1.0} | kwargs
    with pytest.raises(ValueError, match=word):
        LoRALinear(**args)


def test_bad_input_dim() -> None:
    with pytest.raises(ValueError, match="last dim=37"):
        LoRALinear(I, O, rank=R, alpha=1.0)(torch.randn(B, T, I + 1))


def test_meta_device() -> None:
    lora = LoRALinear(I, O, rank=R, alpha=1.0, bias=True, device="meta")
    assert lora.weight.is_meta and lora.lora_a.weight.is_meta
    assert LoRA(I, O, device="meta").lora_b.weight.is_meta


def test_compile_fullgraph() -> None:
    torch.manual_seed(0)
    lora = _trained(LoRALinear(I, O, rank=R, alpha=8.0))
    x = torch.randn(B, T, I)
    compiled = torch.compile(lora, fullgraph=True, backend="eager")
    assert_close(compiled(x), lora(x), rtol=1e-6, atol=1e-6)


def test_merged_state_round_trips_through_the_state_dict() -> None:
    """A merged layer's checkpoint loads merged (the update is not added twice), an unmerged one into a merged
    layer loads unmerged, and adapters loaded alone under a merged weight replace the folded-in update."""
    torch.manual_seed(0)
    x = torch.randn(B, T, I)
    src = _trained(LoRALinear(I, O, rank=R, alpha=8.0, bias=True))
    want = src(x)
    src.merge()
    fresh = LoRALinear(I, O, rank=R, alpha=8.0, bias=True)
    fresh.load_state_dict(src.state_dict())
    assert fresh.merged
    assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)

    src.unmerge()
    assert set(src.state_dict()) == {"weight", "bias", "lora_a.weight", "lora_b.weight"}
    merged = _trained(LoRALinear(I, O, rank=R, alpha=8.0, bias=True)).merge()
    merged.load_state_dict(src.state_dict())
    assert not merged.merged
    assert_close(merged(x), want, rtol=1e-5, atol=1e-5)

    # adapters alone (lora_state_dict) under a merged weight: the old update leaves, the new one is folded in
    base = LoRALinear(I, O, rank=R, alpha=8.0, bias=True)
    base.load_state_dict(
        {k: v for k, v in src.state_dict().items() if not k.startswith("lora_")}, strict=False
    )
    _trained(base).merge()
    base.load_state_dict(lora_state_dict(src), strict=False)
    assert base.merged
    assert_close(base(x), want, rtol=1e-5, atol=1e-5)
