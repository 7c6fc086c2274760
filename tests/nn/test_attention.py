"""Tests for vermeil.nn.attention: the attention function (three backends) and the Attention module.

Sizes are tiny and odd (seq 7, dims like 36/40) so that shape mix-ups cannot cancel out. Float32 parity uses
atol=rtol=1e-5 (SDPA's fused kernel sums in another order than the math path); float64 checks use 1e-10.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from vermeil.nn.attention import (
    Attention,
    CrossAttention,
    FlashAttention,
    SelfAttention,
    _cpu_flash_combines_mask_and_causal,
    attention,
    chunked_causal_attention,
)
from vermeil.nn.cache import KVCache, RingKVCache
from vermeil.nn.masks import attention_mask
from vermeil.nn.norms import QKNorm
from vermeil.nn.positional import RopeTables, RotaryEmbedding, apply_rotary, temperature_scale

F32 = {"atol": 1e-5, "rtol": 1e-5}
F64 = {"atol": 1e-10, "rtol": 1e-10}


def qkv(b: int = 2, h: int = 4, hkv: int = 2, t: int = 7, s: int = 7, dh: int = 6, dtype=torch.float32):
    return (
        torch.randn(b, h, t, dh, dtype=dtype),
        torch.randn(b, hkv, s, dh, dtype=dtype),
        torch.randn(b, hkv, s, dh, dtype=dtype),
    )


def key_padding(b: int, s: int) -> torch.Tensor:
    """Row 0 unpadded, row 1 with its last two keys padded."""
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[1, -2:] = False
    return kpm


def mask_case(kind: str, b: int, t: int, s: int) -> tuple[torch.Tensor | None, bool]:
    """(mask, causal) for each mask kind, built from positions (bottom-right when T < S)."""
    q_pos, kv_pos = torch.arange(s - t, s), torch.arange(s)
    match kind:
        case "none":
            return None, False
        case "causal":
            return None, True
        case "padding":
            return key_padding(b, s)[:, None, None, :], False
        case "padding_causal":
            return key_padding(b, s)[:, None, None, :], True
        case "sliding":
            return attention_mask(q_pos, kv_pos, window=3), False
        case "chunked":
            return attention_mask(q_pos, kv_pos, chunk=3), False
        case "combined":
            return attention_mask(q_pos, kv_pos, window=4, chunk=3, key_padding_mask=key_padding(b, s)), True
    raise AssertionError(kind)


MASK_KINDS = ["none", "causal", "padding", "padding_causal", "sliding", "chunked", "combined"]


# ----------------------------------------------------------------------------------------------------------
# The function


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(("t", "s"), [(7, 7), (3, 7)], ids=["T=S", "T<S"])
@pytest.mark.parametrize("hkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_sdpa_equals_math_for_every_mask(kind: str, t: int, s: int, hkv: int) -> None:
    q, k, v = qkv(hkv=hkv, t=t, s=s)
    for x in (q, k, v):
        x.requires_grad_(True)
    mask, causal = mask_case(kind, 2, t, s)
    outs, grads = [], []
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, mask, causal=causal, backend=backend)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[0], outs[1], **F32)
    for g_sdpa, g_math in zip(*grads):
        torch.testing.assert_close(g_sdpa, g_math, **F32)


def test_causal_is_bottom_right_when_t_lt_s() -> None:
    q, k, v = qkv(t=3, s=7, dtype=torch.float64)
    out = attention(q, k, v, causal=True)
    bottom_right = torch.ones(3, 7, dtype=torch.bool).tril(4)[None, None]
    torch.testing.assert_close(out, attention(q, k, v, bottom_right, backend="math"), **F64)
    # SDPA's own is_causal is top-left aligned: different, and wrong for cached decoding (x-transformers #187).
    top_left = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    assert not torch.allclose(out, top_left)
    with pytest.raises(ValueError, match=r"causal attention needs T <= S"):
        attention(*qkv(t=7, s=3), causal=True)


def test_fully_masked_query_outputs_zero_on_both_paths() -> None:
    q, k, v = qkv()
    mask = torch.ones(1, 1, 7, 7, dtype=torch.bool)
    mask[..., 2, :] = False
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, mask, backend=backend)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, :, 2], torch.zeros_like(out[:, :, 2]))


def test_gqa_equals_mha_with_repeated_kv() -> None:
    q, k, v = qkv(h=6, hkv=2, dtype=torch.float64)
    mask, _ = mask_case("combined", 2, 7, 7)
    for backend in ("sdpa", "math", "flash"):
        got = attention(q, k, v, mask, causal=True, backend=backend)
        ref = attention(
            q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask, causal=True, backend="math"
        )
        torch.testing.assert_close(got, ref, **F64)


@pytest.mark.parametrize("kind", ["none", "causal", "padding", "sliding", "combined"])
def test_flash_equals_math_where_it_runs(kind: str) -> None:
    t, s = (3, 7) if kind == "combined" else (7, 7)
    q, k, v = qkv(t=t, s=s)
    mask, causal = mask_case(kind, 2, t, s)
    got = attention(q, k, v, mask, causal=causal, backend="flash")
    torch.testing.assert_close(got, attention(q, k, v, mask, causal=causal, backend="math"), **F32)


def test_flash_raises_clear_errors() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend='flash' cannot serve dropout_p=0.1 on cpu"):
        attention(q, k, v, dropout_p=0.1, backend="flash")
    # A strided head axis has no fused kernel: torch's "No available kernel" becomes a message with the reason.
    q_strided = torch.randn(2, 4, 7, 12)[..., ::2]
    with pytest.raises(RuntimeError, match=r"backend='flash': no fused SDPA kernel can serve .*stride 1"):
        attention(q_strided, k, v, backend="flash")
    torch.testing.assert_close(attention(q_strided, k, v), attention(q_strided, k, v, backend="math"), **F32)


def test_function_argument_errors() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"mask must have a shape broadcastable to \(B=2, H=4, T=7, S=7\)"):
        attention(q, k, v, torch.ones(2, 7, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must have a shape broadcastable"):
        attention(q, k, v, torch.ones(1, 2, 7, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a bool Tensor"):
        attention(q, k, v, torch.zeros(1, 1, 7, 7))
    with pytest.raises(ValueError, match=r"q heads=4 must be divisible by k heads=3"):
        attention(q, *qkv(hkv=3)[1:])
    with pytest.raises(ValueError, match=r"backend='cuda' must be one of"):
        attention(q, k, v, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dropout_p=1.0 must be in \[0, 1\)"):
        attention(q, k, v, dropout_p=1.0)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_gradcheck_function_with_masks(backend: str) -> None:
    q, k, v = qkv(b=2, h=2, hkv=1, t=3, s=5, dh=3, dtype=torch.float64)
    mask = attention_mask(torch.arange(2, 5), torch.arange(5), window=3, key_padding_mask=key_padding(2, 5))
    inputs = tuple(x.clone().requires_grad_(True) for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(a, b, c, mask, causal=True, backend=backend), inputs
    )


# ----------------------------------------------------------------------------------------------------------
# The module


def make(dim: int = 40, heads: int = 4, kv_heads: int | None = 2, **kwargs) -> Attention:
    torch.manual_seed(1)
    return Attention(dim, heads, kv_heads, **kwargs)


def rotary(head_dim: int = 10) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, max_seq_len=32)


MODULE_CONFIGS = {
    "plain": {},
    "rotary_qknorm": {"rotary": True, "qk_norm": "rms"},
    "rope_then_l2": {"rotary": True, "qk_norm": "l2", "qk_norm_after_rope": True},
    "window": {"window": 3, "rotary": True},
    "chunk": {"chunk": 3},
    "mqa_bias": {"kv_heads": 1, "bias": True},
}


def build(cfg: dict, **extra) -> Attention:
    cfg = {**cfg, **extra}
    if cfg.pop("rotary", False):
        cfg["rotary"] = rotary()
    return make(**cfg)


@pytest.mark.parametrize("name", list(MODULE_CONFIGS))
def test_module_sdpa_equals_math(name: str) -> None:
    x = torch.randn(2, 7, 40)
    kpm = key_padding(2, 7)
    for causal in (True, False):
        fast = build(MODULE_CONFIGS[name], causal=causal)
        ref = build(MODULE_CONFIGS[name], causal=causal, backend="math")
        ref.load_state_dict(fast.state_dict())
        torch.testing.assert_close(fast(x), ref(x), **F32)
        torch.testing.assert_close(fast(x, mask=kpm), ref(x, mask=kpm), **F32)


@pytest.mark.parametrize("name", list(MODULE_CONFIGS))
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_causality(name: str, backend: str) -> None:
    m = build(MODULE_CONFIGS[name], causal=True, backend=backend).double()
    x = torch.randn(2, 7, 40, dtype=torch.float64)
    out = m(x)
    for t in (0, 3, 6):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, 40, dtype=torch.float64)
        out2 = m(x2)
        torch.testing.assert_close(out2[:, :t], out[:, :t], atol=1e-12, rtol=0)
        assert not torch.allclose(out2[:, t], out[:, t])  # the change is seen at t itself


@pytest.mark.parametrize("name", list(MODULE_CONFIGS))
def test_kv_cache_decoding_equals_full_forward(name: str) -> None:
    m = build(MODULE_CONFIGS[name], causal=True).double()
    x = torch.randn(2, 7, 40, dtype=torch.float64)
    full = m(x)
    m.setup_cache(batch_size=3, max_seq_len=11)  # larger batch and length than used: unwritten slots ignored
    steps = [m(x[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **F64)
    # Prefill k tokens, then decode the rest, after a reset (stale values must not leak in).
    m.reset_cache()
    prefill = m(x[:, :4], input_pos=torch.arange(4))
    rest = [m(x[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat([prefill, *rest], 1), full, **F64)
    # The cached step equals the math path too (T < S with a position mask on both).
    ref = build(MODULE_CONFIGS[name], causal=True, backend="math").double()
    ref.load_state_dict(m.state_dict())
    ref.setup_cache(batch_size=3, max_seq_len=11)
    ref(x[:, :4], input_pos=torch.arange(4))
    torch.testing.assert_close(ref(x[:, 4:5], input_pos=torch.tensor([4])), rest[0], **F64)


def test_kv_cache_with_padding_mask_over_the_cache() -> None:
    m = make(causal=True).double()
    x = torch.randn(2, 7, 40, dtype=torch.float64)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, 1] = False  # hide key 1 of row 1 everywhere
    full = m(x, mask=kpm)
    m.setup_cache(2, 9)
    cache_kpm = torch.ones(2, 9, dtype=torch.bool)
    cache_kpm[:, :7] = kpm
    steps = [m(x[:, i : i + 1], input_pos=torch.tensor([i]), mask=cache_kpm) for i in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **F64)


def test_gqa_module_equals_mha_with_repeated_heads() -> None:
    x = torch.randn(2, 7, 40)
    gqa = make(40, 4, 2, causal=True, rotary=rotary(), qk_norm="rms")
    mha = make(40, 4, 4, causal=True, rotary=rotary(), qk_norm="rms")
    sd = gqa.state_dict()
    for name in ("wk.weight", "wv.weight"):
        w = sd[name].view(2, 10, 40)  # (Hkv, Dh, D): kv head j serves query heads 2j, 2j+1
        sd[name] = w.repeat_interleave(2, 0).reshape(40, 40)
    mha.load_state_dict(sd)
    torch.testing.assert_close(mha(x), gqa(x), **F32)


def test_rotary_relative_positions_through_the_module() -> None:
    m = make(causal=True, rotary=rotary(), qk_norm="rms").double()
    x = torch.randn(2, 7, 40, dtype=torch.float64)
    base = m(x, input_pos=torch.arange(7))
    # Tolerance 1e-6: the rotary tables are float32 (as in the references), so the shift is exact to ~1e-7.
    torch.testing.assert_close(m(x, input_pos=torch.arange(7) + 9), base, atol=1e-6, rtol=1e-6)
    # The positions matter when they are not a uniform shift.
    assert not torch.allclose(m(x, input_pos=torch.tensor([0, 1, 2, 3, 5, 8, 13])), base)


def test_padding_leaves_unpadded_rows_and_positions_unchanged() -> None:
    m = make().double()
    x = torch.randn(2, 7, 40, dtype=torch.float64)
    kpm = key_padding(2, 7)
    out = m(x, mask=kpm)
    torch.testing.assert_close(out[0], m(x[:1])[0], **F64)  # row 0 has no padding
    torch.testing.assert_close(out[1, :5], m(x[1:, :5])[0], **F64)  # row 1 = its 5 real tokens alone
    # Causal with left padding: the real suffix equals the unpadded sequence (no rotary, so positions agree).
    mc = make(causal=True).double()
    left = torch.ones(1, 7, dtype=torch.bool)
    left[0, :3] = False
    torch.testing.assert_close(mc(x[1:], mask=left)[0, 3:], mc(x[1:, 3:])[0], **F64)


def test_cross_attention() -> None:
    x, ctx = torch.randn(2, 5, 40), torch.randn(2, 9, 24)
    torch.manual_seed(2)
    cross = CrossAttention(40, 24, 4, kv_heads=2, qk_norm="rms")
    ref = CrossAttention(40, 24, 4, kv_heads=2, qk_norm="rms", backend="math")
    ref.load_state_dict(cross.state_dict())
    kpm = key_padding(2, 9)
    out = cross(x, ctx, mask=kpm)
    assert out.shape == (2, 5, 40)
    torch.testing.assert_close(out, ref(x, ctx, mask=kpm), **F32)
    torch.testing.assert_close(cross(x, ctx)[0], out[0], **F32)  # row 0 unpadded
    torch.testing.assert_close(out[1], cross(x[1:], ctx[1:, :7])[0], **F32)  # padding = dropping the keys
    with pytest.raises(ValueError, match=r"context of shape \(batch, seq, context_dim=24\) is required"):
        Attention.forward(cross, x)
    with pytest.raises(ValueError, match=r"context must have shape \(batch=2, seq, context_dim=24\)"):
        cross(x, torch.randn(2, 9, 40))
    with pytest.raises(TypeError, match=r"CrossAttention takes no causal"):
        CrossAttention(40, 24, 4, causal=True)
    with pytest.raises(ValueError, match=r"rotary must be None for cross-attention"):
        Attention(40, 4, context_dim=24, rotary=rotary())
    with pytest.raises(ValueError, match=r"rotary.head_dim=8 must equal head_dim=10"):
        Attention(40, 4, rotary=rotary(8))


def test_self_and_flash_attention() -> None:
    x = torch.randn(2, 7, 40)
    flash = FlashAttention(40, 4, 2, causal=True, window=3)
    ref = SelfAttention(40, 4, 2, causal=True, window=3, backend="math")
    ref.load_state_dict(flash.state_dict())
    assert flash.backend == "flash"
    torch.testing.assert_close(flash(x), ref(x), **F32)
    with pytest.raises(ValueError, match=r"context given to a self-attention module"):
        ref(x, torch.randn(2, 3, 40))
    # Dropout: only in training; the fused CPU kernel cannot serve it, and says so.
    drop = FlashAttention(40, 4, dropout=0.5)
    drop.eval()
    drop(x)
    drop.train()
    with pytest.raises(ValueError, match=r"backend='flash' cannot serve dropout_p=0.5"):
        drop(x)


def test_dropout_only_in_training() -> None:
    m = make(dropout=0.5, causal=True)
    x = torch.randn(2, 7, 40)
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    assert not torch.allclose(m(x), m(x))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_gradcheck_module(backend: str) -> None:
    m = Attention(
        8, 2, 1, causal=True, rotary=RotaryEmbedding(4), qk_norm="rms", bias=True, window=3, backend=backend
    )
    m = m.double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    kpm = key_padding(2, 5)
    assert torch.autograd.gradcheck(lambda inp: m(inp, mask=kpm), (x,))
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())

    def of_params(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(m, dict(zip(names, ps)), (x.detach(),), {"mask": kpm})

    assert torch.autograd.gradcheck(of_params, params, fast_mode=True)


def test_construction_meta_device_dtype_and_reset() -> None:
    meta = Attention(40, 4, 2, qk_norm="rms", bias=True, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    m = Attention(40, 4, 2, causal=True, qk_norm="rms", bias=(True, False), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert set(m.state_dict()) == {
        "wq.weight",
        "wq.bias",
        "wk.weight",
        "wk.bias",
        "wv.weight",
        "wv.bias",
        "wo.weight",
        "qk_norm.query_norm.scale",
        "qk_norm.key_norm.scale",
    }
    assert m.wk.weight.shape == (20, 40) and m.wo.weight.shape == (40, 40)
    flux = Attention(40, 4, bias=(False, True))  # BFL: a bias on the output projection only
    assert [w.bias is not None for w in (flux.wq, flux.wk, flux.wv, flux.wo)] == [False] * 3 + [True]
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    m.reset_parameters()
    assert m.wq.weight.abs().sum() > 0 and bool((m.qk_norm.query_norm.scale == 1).all())
    assert m.wq.weight.abs().max() <= 40**-0.5 + 1e-12  # nn.Linear's default bound 1/sqrt(fan_in)
    m.setup_cache(1, 8)
    assert "kv_cache.k_cache" not in m.state_dict()  # run-time state, never checkpointed
    explicit = Attention(40, 8, 2, head_dim=3)
    assert explicit(torch.randn(1, 2, 40)).shape == (1, 2, 40)


class OpRecorder(TorchDispatchMode):
    """Records every aten op that runs and the largest tensor (in bytes) any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.shapes: set[tuple[int, ...]] = set()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("kind", ["causal", "gqa", "padding", "sliding", "chunked", "decode"])
@pytest.mark.parametrize("grad", [False, True])
def test_sdpa_path_stays_fused_and_never_builds_scores(kind: str, grad: bool) -> None:
    # float32 B x H x T x S scores would take 2 * 8 * 96 * 96 * 4 bytes; the fused kernel keeps O(T x Dh).
    cfg = {"gqa": {"kv_heads": 2}, "sliding": {"window": 8}, "chunked": {"chunk": 16}}.get(kind, {})
    m = Attention(32, 8, cfg.pop("kv_heads", 8), causal=True, rotary=RotaryEmbedding(4), **cfg)
    x = torch.randn(2, 96, 32, requires_grad=grad)
    mask = key_padding(2, 96) if kind == "padding" else None
    if kind == "decode":
        m.setup_cache(2, 96)
        m(x[:, :95].detach(), input_pos=torch.arange(95))
    fast = _cpu_flash_combines_mask_and_causal()  # (its one-off probe runs the math path: not recorded)
    with OpRecorder() as rec:
        if kind == "decode":
            out = m(x[:, 95:], input_pos=torch.tensor([95]))
        else:
            out = m(x, mask=mask)
        if grad:
            out.sum().backward()
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in rec.ops
    assert not {"aten._softmax", "aten.bmm"} & rec.ops, rec.ops
    # The largest tensors allowed are masks: bool (B|1, 1, T, S), which torch's CPU kernel turns into a float
    # copy of the same shape, 1/8 of the scores at 8 heads.
    assert rec.largest < 2 * 8 * 96 * 96 * 4 // 4
    if kind == "padding" and fast:
        # is_causal with the (B, 1, 1, S) padding mask as given: no (T, S) mask at all.
        assert not [shape for shape in rec.shapes if shape[-2:] == (96, 96)]


def test_mask_with_causal_fast_path_and_its_fallback() -> None:
    """Causal + mask at T == S runs as is_causal + mask on the CPU kernel; any other kernel gets a folded mask."""
    q, k, v = qkv(dtype=torch.float64)
    mask, _ = mask_case("combined", 2, 7, 7)
    ref = attention(q, k, v, mask, causal=True, backend="math")
    torch.testing.assert_close(attention(q, k, v, mask, causal=True), ref, **F64)
    with sdpa_kernel(SDPBackend.MATH):  # the math kernel rejects mask + is_causal: the fold must be used
        torch.testing.assert_close(attention(q, k, v, mask, causal=True), ref, **F64)
        m = make(causal=True, window=3).double()
        x, kpm = torch.randn(2, 7, 40, dtype=torch.float64), key_padding(2, 7)
        inside = m(x, mask=kpm)
    torch.testing.assert_close(inside, m(x, mask=kpm), **F64)
    torch.testing.assert_close(attention(q, k, v, mask, causal=True, dropout_p=0.0), ref, **F64)


def test_bfloat16_and_autocast() -> None:
    m = make(causal=True, window=3)
    x = torch.randn(2, 7, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)  # float32 input and weights, bf16 compute: no dtype error under autocast
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), atol=3e-2, rtol=3e-2)
    m16 = make(causal=True, window=3, dtype=torch.bfloat16)
    assert m16(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 500, "heads": 8}, r"dim=500 must be divisible by heads=8"),
        ({"dim": 48, "heads": 8, "kv_heads": 3}, r"heads=8 must be divisible by kv_heads=3"),
        ({"dim": 48, "heads": 0}, r"heads=0 must be a positive int"),
        ({"dim": 48, "heads": 8, "qk_norm": "layer"}, r"qk_norm='layer' must be None, 'rms' or 'l2'"),
        ({"dim": 48, "heads": 8, "backend": "cuda"}, r"backend='cuda' must be one of"),
        ({"dim": 48, "heads": 8, "window": 0}, r"window=0 must be a positive int"),
        ({"dim": 48, "heads": 8, "dropout": 1.5}, r"dropout=1.5 must be in \[0, 1\)"),
        ({"dim": 48, "heads": 8, "bias": (True,)}, r"bias=\(True,\) must be a bool or a pair"),
        ({"dim": 48, "heads": 8, "bias": (True, 1)}, r"bias=\(True, 1\) must be a bool or a pair"),
        ({"dim": 48, "heads": 8, "bias": None}, r"bias=None must be a bool or a pair"),
    ],
)
def test_construction_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Attention(**kwargs)


def test_forward_errors() -> None:
    m = Attention(16, 4, causal=True)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, dim=16\), got \(2, 3, 15\)"):
        m(torch.randn(2, 3, 15))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, dim=16\), got \(3, 16\)"):
        m(torch.randn(3, 16))
    with pytest.raises(
        TypeError, match=r"x.dtype=torch.float64 does not match the module's dtype torch.float32"
    ):
        m(torch.randn(2, 3, 16, dtype=torch.float64))
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=r"mask must have shape \(B=2, S=3\) for key padding, got \(2, 4\)"):
        m(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must have shape \(B=2, S=3\) or \(B\|1, 1\|H=4, T=3, S=3\)"):
        m(x, mask=torch.ones(2, 2, 3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a bool Tensor"):
        m(x, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"a KV cache needs causal=True"):
        Attention(16, 4).setup_cache(1, 8)
    plain = m(x)
    m.setup_cache(2, 4)
    assert torch.equal(m(x), plain)  # no input_pos: a plain forward, the cache is neither read nor written
    assert not m.kv_cache.k_cache.any()
    with pytest.raises(ValueError, match=r"input_pos of 5 positions exceeds max_seq_len=4"):
        m(torch.randn(2, 5, 16), input_pos=torch.arange(5))
    with pytest.raises(ValueError, match=r"input_pos up to 5 exceeds max_seq_len=4"):
        m(x, input_pos=torch.arange(3, 6))
    with pytest.raises(ValueError, match=r"input_pos must have shape \(T=3,\) or \(B, T\)"):
        m(x, input_pos=torch.arange(4))
    m.delete_cache()
    assert m(x).shape == (2, 3, 16)


# ----------------------------------------------------------------------------------------------------------
# Local attention with a ring cache, tables passed in, qk norm order, the position-dependent q scale


@pytest.mark.parametrize("local", [{"chunk": 3}, {"window": 3}, {"window": 4, "chunk": 3}])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_ring_cache_decode_equals_full_forward(local: dict, backend: str) -> None:
    m = make(causal=True, rotary=rotary(), qk_norm="rms", backend=backend, **local).double()
    x = torch.randn(2, 11, 40, dtype=torch.float64)
    full = m(x)
    m.setup_cache(batch_size=3, max_seq_len=16)
    assert isinstance(m.kv_cache, RingKVCache) and m.kv_cache.k_cache.shape[2] == 3  # min(window, chunk)
    for split in (1, 2, 5, 8):  # prefills shorter and longer than the ring, then one token at a time
        m.reset_cache()
        pre = m(x[:, :split], input_pos=torch.arange(split))
        rest = [m(x[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(split, 11)]
        torch.testing.assert_close(torch.cat([pre, *rest], 1), full, **F64)
    m.reset_cache()  # multi-token steps after a prefill
    steps = [m(x[:, a:b], input_pos=torch.arange(a, b)) for a, b in ((0, 4), (4, 6), (6, 11))]
    torch.testing.assert_close(torch.cat(steps, 1), full, **F64)


def test_ring_cache_with_padding_mask_over_positions() -> None:
    m = make(causal=True, window=3).double()
    x = torch.randn(2, 7, 40, dtype=torch.float64)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, 4] = False
    full = m(x, mask=kpm)
    m.setup_cache(2, 9)
    cache_kpm = torch.ones(2, 9, dtype=torch.bool)
    cache_kpm[:, :7] = kpm  # indexed by position, whatever slot the ring keeps it in
    steps = [m(x[:, i : i + 1], input_pos=torch.tensor([i]), mask=cache_kpm) for i in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **F64)


def test_global_attention_keeps_the_full_cache() -> None:
    m = make(causal=True)
    m.setup_cache(1, 9)
    assert isinstance(m.kv_cache, KVCache) and m.kv_cache.k_cache.shape[2] == 9


def test_chunked_blocks_equal_the_chunk_mask_with_gradients() -> None:
    q, k, v = (t.requires_grad_(True) for t in qkv(t=11, s=11, dtype=torch.float64))
    pos = torch.arange(11)
    for chunk in (1, 3, 4, 11, 20):
        got = chunked_causal_attention(q, k, v, chunk)
        want = attention(q, k, v, attention_mask(pos, pos, chunk=chunk), backend="math")
        torch.testing.assert_close(got, want, **F64)
        g = torch.randn_like(got)
        torch.testing.assert_close(
            torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g), **F64
        )


def test_chunked_causal_attention_rejects_bad_chunks_and_lengths() -> None:
    q, k, v = qkv(t=6, s=6)
    for chunk in (0, -2, True):
        with pytest.raises(ValueError, match=rf"chunk={chunk!r} must be a positive int"):
            chunked_causal_attention(q, k, v, chunk)
    for s in (8, 10):  # keys padded to another number of chunks than the queries
        with pytest.raises(ValueError, match=rf"needs S == T, got T=6, S={s}"):
            chunked_causal_attention(q, *qkv(t=s, s=s)[1:], 4)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*")
@pytest.mark.parametrize("local", [{"window": 2}, {"chunk": 2}, {"window": 3, "chunk": 4}])
def test_local_cross_attention_with_a_shorter_context(local: dict) -> None:
    """T > S: queries sit at S - T + i (bottom-right, as FlexAttention's rules), some of them negative."""
    m = make(context_dim=12, dtype=torch.float64, **local)
    x, ctx = torch.randn(2, 7, 40, dtype=torch.float64), torch.randn(2, 3, 12, dtype=torch.float64)
    mask = attention_mask(torch.arange(-4, 3), torch.arange(3), causal=False, **local)
    q = m.wq(x).view(2, 7, 4, 10).transpose(1, 2)
    k, v = (w(ctx).view(2, 3, 2, 10).transpose(1, 2) for w in (m.wk, m.wv))
    want = m.wo(attention(q, k, v, mask, backend="math").transpose(1, 2).flatten(2))
    for backend in ("sdpa", "math", "flex"):
        m.backend = backend
        with torch.no_grad():  # FlexAttention has no CPU backward
            torch.testing.assert_close(m(x, ctx), want, **F64)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_tables_passed_in_equal_the_injected_rotary(pairing: str) -> None:
    injected = make(causal=True, rotary=RotaryEmbedding(10, pairing=pairing), qk_norm="rms", window=4)
    tabled = make(causal=True, qk_norm="rms", window=4)
    tabled.load_state_dict(injected.state_dict())
    rope = RotaryEmbedding(10, pairing=pairing)  # the model-level producer of the tables
    x = torch.randn(2, 9, 40)
    torch.testing.assert_close(tabled(x, rope=rope.tables(torch.arange(9))), injected(x), rtol=0, atol=0)
    pos = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(
        tabled(x, input_pos=pos, rope=rope.tables(pos)), injected(x, input_pos=pos), rtol=0, atol=0
    )
    injected.setup_cache(2, 9)
    tabled.setup_cache(2, 9)
    for i in range(9):
        p = torch.tensor([i])
        a = tabled(x[:, i : i + 1], input_pos=p, rope=rope.tables(p))
        torch.testing.assert_close(a, injected(x[:, i : i + 1], input_pos=p), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rope tables given to a module that has an injected rotary"):
        injected(x, rope=rope.tables(torch.arange(9)))


@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("learnable", [False, True])
def test_qk_norm_before_or_after_rope(after: bool, learnable: bool) -> None:
    torch.manual_seed(0)
    norm = QKNorm(10, "rms", learnable=learnable, eps=1e-5).double()
    if learnable:
        with torch.no_grad():
            norm.query_norm.scale.uniform_(0.5, 1.5)
            norm.key_norm.scale.uniform_(0.5, 1.5)
    m = make(causal=True, qk_norm=norm, qk_norm_after_rope=after, dtype=torch.float64)
    assert sorted(n for n, _ in m.named_parameters() if "qk_norm" in n) == (
        ["qk_norm.key_norm.scale", "qk_norm.query_norm.scale"] if learnable else []
    )
    x = torch.randn(2, 7, 40, dtype=torch.float64)
    rope = RotaryEmbedding(10, pairing="interleaved").tables(torch.arange(7))
    q = m.wq(x).view(2, 7, 4, 10).transpose(1, 2)
    k = m.wk(x).view(2, 7, 2, 10).transpose(1, 2)

    def rot(t: torch.Tensor) -> torch.Tensor:
        return apply_rotary(t, rope.cos, rope.sin, "interleaved")

    q, k = (rot(norm.query_norm(q)), rot(norm.key_norm(k))) if not after else (rot(q), rot(k))
    if after:
        q, k = norm.query_norm(q), norm.key_norm(k)
    want = m.wo(
        attention(q, k, m.wv(x).view(2, 7, 2, 10).transpose(1, 2), causal=True).transpose(1, 2).flatten(2)
    )
    torch.testing.assert_close(m(x, rope=rope), want, **F64)
    other = make(causal=True, qk_norm=norm, qk_norm_after_rope=not after, dtype=torch.float64)
    other.load_state_dict(m.state_dict())
    if learnable:  # a per-channel scale does not commute with the rotation: the order matters
        assert not torch.allclose(other(x, rope=rope), m(x, rope=rope))


def test_temperature_scale_values() -> None:
    pos = torch.tensor([0, 1, 2, 6, 7, 8, 15, 1000])
    got = temperature_scale(pos, floor_scale=4.0, attn_scale=0.1)
    want = torch.tensor(
        [1 + 0.1 * torch.log(torch.tensor(float((p + 1) // 4 + 1))).item() for p in pos.tolist()]
    )
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float32 and (got[:3] == 1).all()  # exactly 1 below floor_scale - 1
    assert temperature_scale(pos[None].expand(2, -1)).shape == (2, 8)
    with pytest.raises(ValueError, match=r"floor_scale=0.0 must be > 0"):
        temperature_scale(pos, floor_scale=0.0)


def test_q_scale_multiplies_the_queries() -> None:
    m = make(causal=True, dtype=torch.float64)
    x = torch.randn(2, 7, 40, dtype=torch.float64)
    scale = temperature_scale(torch.arange(7) + 20, floor_scale=4.0, attn_scale=0.3).double()
    q = m.wq(x).view(2, 7, 4, 10).transpose(1, 2) * scale[:, None]
    k, v = (w(x).view(2, 7, 2, 10).transpose(1, 2) for w in (m.wk, m.wv))
    want = m.wo(attention(q, k, v, causal=True).transpose(1, 2).flatten(2))
    torch.testing.assert_close(m(x, q_scale=scale), want, **F64)
    # and through the cache: decoding with per-step scales equals the full forward
    m.setup_cache(2, 7)
    steps = [m(x[:, i : i + 1], input_pos=torch.tensor([i]), q_scale=scale[i : i + 1]) for i in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), want, **F64)
    with pytest.raises(ValueError, match=r"q_scale must have shape \(T=7,\) or \(B, T\), got \(6,\)"):
        make(causal=True)(x.float(), q_scale=scale[:6].float())


def test_rope_tables_are_a_namedtuple_with_pairing() -> None:
    tables = RotaryEmbedding(6, pairing="interleaved").tables(torch.arange(4))
    assert isinstance(tables, RopeTables) and tables.pairing == "interleaved" and tables.cos.shape == (4, 3)
    with pytest.raises(ValueError, match="carries no xPos"):
        RotaryEmbedding(6, use_xpos=True).tables(torch.arange(4))


# ----------------------------------------------------------------------------------------------------------
# torch.compile (backend="eager": dynamo only, which is what graph breaks and recompiles depend on)


def test_compile_forward_fullgraph() -> None:
    m = make(causal=True, rotary=rotary(), qk_norm="rms", window=3)
    x, kpm = torch.randn(2, 7, 40), key_padding(2, 7)
    counter = CompileCounter()
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    torch.testing.assert_close(compiled(x, mask=kpm), m(x, mask=kpm), **F32)
    assert counter.frame_count == 1


def test_compile_flash_backend_fullgraph() -> None:
    m = make(causal=True, rotary=rotary(), backend="flash")
    x = torch.randn(2, 7, 40)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), m(x), **F32)


def test_compile_decode_step_does_not_recompile() -> None:
    m = make(causal=True, rotary=rotary(), qk_norm="rms")
    x = torch.randn(2, 7, 40)
    full = m(x)
    m.setup_cache(2, 16)
    m(x[:, :3], input_pos=torch.arange(3))  # eager prefill
    counter = CompileCounter()
    step = torch.compile(m, fullgraph=True, backend=counter)
    outs = [step(x[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(3, 7)]
    assert counter.frame_count == 1  # one graph for every position
    torch.testing.assert_close(torch.cat(outs, 1), full[:, 3:], **F32)


# ----------------------------------------------------------------------------------------------------------
# Properties (Hypothesis) over valid configurations


@st.composite
def configs(draw: st.DrawFn) -> dict:
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 6]))
    explicit = draw(st.booleans())  # head_dim given, or derived from dim
    dim = draw(st.integers(3, 20)) if explicit else heads * head_dim
    return {
        "dim": dim,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim if explicit else None,
        "batch": draw(st.integers(1, 3)),
        "seq": draw(st.integers(1, 9)),
        "window": draw(st.sampled_from([None, 1, 3])),
        "seed": draw(st.integers(0, 2**16)),
    }


def from_cfg(cfg: dict, **kwargs) -> tuple[Attention, torch.Tensor]:
    torch.manual_seed(cfg["seed"])
    m = Attention(cfg["dim"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], window=cfg["window"], **kwargs)
    return m, torch.randn(cfg["batch"], cfg["seq"], cfg["dim"])


@settings(max_examples=25, deadline=None)
@given(cfg=configs(), causal=st.booleans())
def test_property_shape_and_batch_invariance(cfg: dict, causal: bool) -> None:
    m, x = from_cfg(cfg, causal=causal)
    out = m(x)
    assert out.shape == x.shape
    for i in range(x.shape[0]):
        torch.testing.assert_close(m(x[i : i + 1])[0], out[i], atol=1e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(cfg=configs())
def test_property_causality(cfg: dict) -> None:
    m, x = from_cfg(cfg, causal=True)
    m, x = m.double(), x.double()
    t = x.shape[1] - 1
    x2 = x.clone()
    x2[:, t] = torch.randn_like(x2[:, t])
    torch.testing.assert_close(m(x2)[:, :t], m(x)[:, :t], atol=1e-12, rtol=0)


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 64), heads=st.integers(1, 12), kv_heads=st.integers(1, 12))
def test_property_invalid_configurations_rejected(dim: int, heads: int, kv_heads: int) -> None:
    if dim % heads == 0 and heads % kv_heads == 0:
        assert Attention(dim, heads, kv_heads).head_dim == dim // heads
        return
    with pytest.raises(ValueError, match=r"(dim|heads)=\d+ must be divisible by (heads|kv_heads)=\d+"):
        Attention(dim, heads, kv_heads)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_empty_batch_and_empty_context(backend: str) -> None:
    # A batch of no rows (e.g. no images in a vision batch) and a cross-attention context of no tokens are
    # legal: the head axis is known from head_dim, not inferred from zero elements.
    m = Attention(16, 4, 2, causal=True, window=3, backend=backend)
    assert m(torch.randn(0, 5, 16)).shape == (0, 5, 16)
    cross = CrossAttention(16, 8, 4, backend=backend)
    out = cross(torch.randn(2, 3, 16), torch.randn(2, 0, 8))
    assert out.shape == (2, 3, 16)
    assert torch.equal(out, torch.zeros_like(out))  # no key to attend: zero outputs, no bias


def test_per_row_positions_and_q_scale_must_match_the_batch() -> None:
    m = Attention(16, 4, 2, causal=True, window=3)
    x = torch.randn(2, 5, 16)
    with pytest.raises(
        ValueError, match=r"input_pos must have shape \(T=5,\) or \(B, T\) with B=2, got \(3, 5\)"
    ):
        m(x, input_pos=torch.arange(5).expand(3, 5))
    with pytest.raises(
        ValueError, match=r"q_scale must have shape \(T=5,\) or \(B, T\) with B=2, got \(3, 5\)"
    ):
        m(x, q_scale=torch.ones(3, 5))
    assert m(x, input_pos=torch.arange(5).expand(2, 5), q_scale=torch.ones(2, 5)).shape == (2, 5, 16)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -0.5, "0.5", True])
def test_scale_must_be_a_finite_positive_number(scale: object) -> None:
    # scale=nan silently gave all-zero outputs; a string was kept until the first forward.
    q, k, v = qkv()
    rule = re.escape(f"scale={scale!r} must be None or a finite number > 0")
    with pytest.raises(ValueError, match=rule):
        attention(q, k, v, scale=scale)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rule):
        Attention(16, 4, scale=scale)  # type: ignore[arg-type]
