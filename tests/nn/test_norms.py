import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vermeil.nn.norms import LayerNorm, QKNorm, RMSNorm, rms_norm


def test_rms_norm_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(37, eps=1e-5)
    ours = RMSNorm(37, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_()
        ours.weight.copy_(ref.weight)
    x = torch.randn(2, 7, 37)
    assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)
    assert transformers is not None


def test_rms_norm_statistics_in_float32_then_cast_back():
    x = (torch.randn(3, 37) * 50).bfloat16()
    weight = torch.randn(37).bfloat16()
    expected = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * weight
    out = rms_norm(x, weight)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_layer_norm_bias_options():
    x = torch.randn(2, 5, 37)
    with_bias = LayerNorm(37)
    no_bias = LayerNorm(37, bias=False)
    no_affine = LayerNorm(37, elementwise_affine=False, eps=1e-6)
    assert sorted(dict(no_bias.named_parameters())) == ["weight"]
    assert list(no_affine.parameters()) == []
    with torch.no_grad():
        with_bias.weight.normal_()
        with_bias.bias.normal_()
    assert_close(with_bias(x), F.layer_norm(x, (37,), with_bias.weight, with_bias.bias, 1e-5))
    assert_close(no_affine(x), F.layer_norm(x, (37,), eps=1e-6))


def test_qk_norm_variants():
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    rms = QKNorm(16, "rms")
    assert sorted(n for n, _ in rms.named_parameters()) == ["key_norm.scale", "query_norm.scale"]
    with torch.no_grad():
        rms.query_norm.scale.normal_()
    qn, kn = rms(q, k)
    assert_close(qn, rms_norm(q, rms.query_norm.scale))
    assert_close(kn, rms_norm(k))

    weightless = QKNorm(16, "rms", learnable=False, eps=1e-5)
    assert list(weightless.parameters()) == []
    qn, _ = weightless(q, k)
    assert_close(qn, q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-5))

    l2 = QKNorm(16, "l2")
    with torch.no_grad():
        l2.key_norm.scale.uniform_(1, 2)
    _, kn = l2(q, k)
    assert_close(kn, F.normalize(k, dim=-1) * l2.key_norm.scale)


def test_gradcheck_float64():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    for module in (RMSNorm(5, dtype=torch.float64), LayerNorm(5, bias=False, dtype=torch.float64)):
        with torch.no_grad():
            module.weight.normal_()
        assert torch.autograd.gradcheck(module, (x,))
    qk = QKNorm(5, "l2", dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: qk(a, b), (x, x.detach().clone().requires_grad_()))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="dim=0 must be a positive int"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="kind='batch' must be 'rms' or 'l2'"):
        QKNorm(8, "batch")
    with pytest.raises(ValueError, match=r"RMSNorm: input of shape \(2, 3, 15\) must have last dim=16"):
        RMSNorm(16)(torch.randn(2, 3, 15))


def test_meta_device_construction():
    norm = RMSNorm(8, device="meta")
    assert norm.weight.is_meta
    norm.to_empty(device="cpu").reset_parameters()
    assert torch.equal(norm.weight, torch.ones(8))


@pytest.mark.parametrize("eps", [-1e-6, float("nan"), float("inf"), None, "1e-6", True])
@pytest.mark.parametrize("make", [RMSNorm, LayerNorm, QKNorm], ids=["rms", "layer", "qk"])
def test_eps_must_be_a_finite_number_at_least_zero(make, eps) -> None:
    # A negative eps made RMSNorm return NaN for small inputs, None failed in forward ('+ NoneType').
    with pytest.raises(ValueError, match=rf"eps={eps!r} must be a finite number >= 0".replace("(", r"\(")):
        make(8, eps=eps)
