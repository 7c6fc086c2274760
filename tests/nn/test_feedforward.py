import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vermeil.nn.feedforward import GLU, FeedForward, GeGLU, SwiGLU, llama_hidden_dim


def test_llama_hidden_dim_published_sizes():
    assert llama_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert llama_hidden_dim(2048, 256, 1.5) == 8192  # Llama 3.2 1B
    assert llama_hidden_dim(4096, 256) == 11008  # Llama 2 7B
    assert llama_hidden_dim(5120, 2048, 1.2, hidden_dim=4 * 5120) == 16384  # Llama 4 Scout dense rule


def test_swiglu_matches_transformers_llama_mlp():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=24, intermediate_size=37, num_attention_heads=4, hidden_act="silu")
    ref = LlamaMLP(config)
    ours = SwiGLU(24, 37)
    ours.load_state_dict(
        {
            "w1.weight": ref.gate_proj.weight,
            "w3.weight": ref.up_proj.weight,
            "w2.weight": ref.down_proj.weight,
        }
    )
    x = torch.randn(2, 7, 24)
    assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)


def test_glu_gate_and_up_order():
    ff = GeGLU(6, 11)
    x = torch.randn(3, 6)
    expected = ff.w2(F.gelu(ff.w1(x)) * ff.w3(x))
    assert_close(ff(x), expected)
    swapped = ff.w2(F.gelu(ff.w3(x)) * ff.w1(x))
    assert not torch.allclose(ff(x), swapped)


def test_feed_forward_mlp():
    ff = FeedForward(6, 13, activation="gelu_tanh")
    x = torch.randn(2, 4, 6)
    assert_close(ff(x), ff.fc2(F.gelu(ff.fc1(x), approximate="tanh")))


def test_gradcheck_float64():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    for module in (SwiGLU(5, 7, bias=True, dtype=torch.float64), FeedForward(5, 7, dtype=torch.float64)):
        assert torch.autograd.gradcheck(module, (x,))


def test_errors():
    with pytest.raises(ValueError, match="activation='tanh' must be one of"):
        GLU(4, 8, activation="tanh")
    with pytest.raises(ValueError, match="hidden_dim=0 must be a positive int"):
        SwiGLU(4, 0)
    with pytest.raises(ValueError, match="dropout=1.5 must be in"):
        FeedForward(4, 8, dropout=1.5)
    with pytest.raises(ValueError, match=r"x must have last dim=4, got shape \(2, 5\)"):
        SwiGLU(4, 8)(torch.randn(2, 5))


def test_meta_device_and_compile():
    ff = SwiGLU(8, 16, device="meta")
    assert ff.w1.weight.is_meta
    ff = SwiGLU(8, 16)
    compiled = torch.compile(ff, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 8)
    assert_close(compiled(x), ff(x))


def test_llama_hidden_dim_rejects_what_gives_no_width():
    # A bad hidden_dim or multiplier gave a negative or zero width (or "cannot convert float NaN to integer").
    with pytest.raises(ValueError, match="hidden_dim=-8 must be a positive int or None"):
        llama_hidden_dim(8, 4, hidden_dim=-8)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"ffn_dim_multiplier={bad} must be > 0 and finite"):
            llama_hidden_dim(8, 4, ffn_dim_multiplier=bad)
    with pytest.raises(ValueError, match=r"gives a hidden size of 0 \(dim=8, hidden_dim=1,"):
        llama_hidden_dim(8, 4, hidden_dim=1)
    with pytest.raises(ValueError, match=r"gives a hidden size of 0 \(dim=1, .*ffn_dim_multiplier=0.1\)"):
        llama_hidden_dim(1, 1, ffn_dim_multiplier=0.1)
