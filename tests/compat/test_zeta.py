"""Tests for vermeil/compat/zeta.py: zeta's `TransformerBlock` usage examples run unchanged through vermeil."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vermeil.compat.zeta import TransformerBlock, convert_palm_state_dict
from vermeil.nn.blocks import ParallelTransformerBlock
from vermeil.nn.lora import LoRA, mark_only_lora_as_trainable

# Shapes: B batch, T length, D model dim (the seed's 512), H heads, Dh head dim.
B, T, D, H, DH = 2, 7, 512, 8, 64

SEED_SIGNATURE = {
    "dim": inspect.Parameter.empty,
    "dim_head": 64,
    "causal": True,
    "heads": 8,
    "qk_rmsnorm": False,
    "qk_scale": 8,
    "ff_mult": 4,
    "attn_dropout": 0.0,
    "ff_dropout": 0.0,
    "use_xpos": True,
    "xpos_scale_base": 512,
    "flash_attn": False,
}


def test_signature_is_the_seeds() -> None:
    params = list(inspect.signature(TransformerBlock).parameters.values())
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert {p.name: p.default for p in positional} == SEED_SIGNATURE
    assert [p.name for p in positional] == list(SEED_SIGNATURE)  # the seed's order, for positional calls
    assert list(inspect.signature(TransformerBlock.forward).parameters) == [
        "self",
        "x",
        "mask",
        "finetune_modules",
    ]


def test_seed_initialization_example() -> None:
    block = TransformerBlock(
        dim=512,
        dim_head=64,
        causal=True,
        heads=8,
        qk_rmsnorm=False,
        qk_scale=8,
        ff_mult=4,
        attn_dropout=0.0,
        ff_dropout=0.0,
        use_xpos=True,
        xpos_scale_base=512,
        flash_attn=False,
    )
    assert block.fused_attn_ff_proj.weight.shape == (H * DH + DH + DH + 2 * 4 * D, D)
    assert block(torch.randn(B, T, D)).shape == (B, T, D)


def test_seed_basic_usage_is_palms_contract() -> None:
    torch.manual_seed(0)
    transformer_block = TransformerBlock(dim=512, heads=8).eval()
    input_data = torch.randn(B, T, D)
    output = transformer_block(input_data)
    assert output.shape == (B, T, D)
    # Zeta/PaLM return attn + ff without the residual; vermeil.nn's block adds it by default.
    nn_block = ParallelTransformerBlock(dim=512, heads=8).eval()
    nn_block.load_state_dict(transformer_block.state_dict())
    assert_close(nn_block(input_data), input_data + output, rtol=1e-5, atol=1e-5)
    with_residual = TransformerBlock(dim=512, heads=8, residual=True).eval()
    with_residual.load_state_dict(transformer_block.state_dict())
    assert_close(with_residual(input_data), input_data + output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "lora"])
def test_seed_fine_tuning_example(kind: str) -> None:
    torch.manual_seed(0)

    def YourCustomModule(out_dim: int, in_dim: int = D) -> nn.Module:  # noqa: N802 (the seed's name)
        return nn.Linear(in_dim, out_dim, bias=False) if kind == "linear" else LoRA(in_dim, out_dim, rank=4)

    lora_q = YourCustomModule(H * DH)
    lora_k = YourCustomModule(DH)
    lora_v = YourCustomModule(DH)
    lora_o = YourCustomModule(D, in_dim=H * DH)

    transformer_block = TransformerBlock(dim=512, heads=8, finetune_modules=(lora_q, lora_k, lora_v, lora_o))
    input_data = torch.randn(B, T, D)
    output = transformer_block(input_data)
    assert output.shape == (B, T, D)

    plain = TransformerBlock(dim=512, heads=8)
    plain.load_state_dict(transformer_block.state_dict(), strict=False)
    if kind == "lora":  # zero-initialised B: the adapters start as an exact no-op
        assert_close(output, plain(input_data), rtol=0, atol=0)
        trainable = mark_only_lora_as_trainable(transformer_block)
        assert sorted(trainable) == sorted(
            f"finetune_modules.{i}.lora_{ab}.weight" for i in range(4) for ab in "ab"
        )
    else:
        assert not torch.allclose(output, plain(input_data), atol=1e-4)
        assert_close(plain(input_data, finetune_modules=(lora_q, lora_k, lora_v, lora_o)), output)


def test_stacked_with_caller_residual() -> None:
    """PaLM's model adds the residual itself: `x = block(x) + x` keeps working."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(TransformerBlock(dim=64, dim_head=16, heads=4) for _ in range(2))
    x0 = torch.randn(B, T, 64)
    x = x0
    for block in blocks:
        x = block(x) + x
    assert torch.isfinite(x).all()
    # the same stack as vermeil.nn blocks that add the residual themselves
    y = x0
    for block in blocks:
        nn_block = ParallelTransformerBlock(dim=64, dim_head=16, heads=4)
        nn_block.load_state_dict(block.state_dict())
        y = nn_block(y)
    assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x, x0, atol=1e-2)  # the blocks did change the stream


def test_convert_palm_state_dict() -> None:
    block = TransformerBlock(dim=64, dim_head=16, heads=4, qk_rmsnorm=True)
    palm = {("norm.gamma" if k == "norm.weight" else k): v for k, v in block.state_dict().items()}
    palm |= {
        "norm.beta": torch.zeros(64),
        "rotary_emb.inv_freq": torch.ones(8),
        "rotary_emb.scale": torch.ones(8),
    }
    assert set(convert_palm_state_dict(palm)) == set(block.state_dict())
    with pytest.raises(ValueError, match="layers.0.fn.attn_out.weight"):
        convert_palm_state_dict({"layers.0.fn.attn_out.weight": torch.zeros(1)})
