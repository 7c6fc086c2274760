"""Tests for vermeil.nn.flex (FlexAttention mask rules and block masks) and the "flex"/"auto" attention backends.

The reference is today's path: dense masks from vermeil.nn.masks and SDPA (tests/nn/test_attention.py checks
that against the math definition). FlexAttention has no backward on the CPU (torch 2.13 raises), so CPU tests
compare forwards under no_grad, and the gradient test runs on CUDA only.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from vermeil.nn.attention import Attention, attention
from vermeil.nn.flex import dense_mask_mod, flex_attention, flex_available, flex_block_mask, mask_mod
from vermeil.nn.masks import attention_mask, document_mask

pytestmark = [
    pytest.mark.skipif(not flex_available(), reason="torch has no FlexAttention"),
    # eager FlexAttention on the CPU warns that it is the unfused reference; that is what the tests want
    pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*"),
]

F32 = {"atol": 2e-6, "rtol": 2e-6}


def _positions(t: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(s - t, s), torch.arange(s)


def _documents(b: int, s: int) -> torch.Tensor:
    """(B, S) ids: row 0 three packed documents, row 1 one document then padding-like short ones."""
    ids = torch.zeros(b, s, dtype=torch.long)
    ids[0, s // 3 :] = 1
    ids[0, 2 * s // 3 :] = 2
    ids[1, s - 5 :] = 7
    return ids


def _padding(b: int, s: int) -> torch.Tensor:
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[1, -(s // 4) :] = False
    kpm[1, :3] = False
    return kpm


RULES = [
    dict(causal=True),
    dict(causal=True, window=5),
    dict(causal=False, window=5),
    dict(causal=True, chunk=6),
    dict(causal=False, chunk=6),
    dict(causal=True, window=9, chunk=6),
    dict(causal=False),
]


def _dense(rule: dict, t: int, s: int, b: int, padding: bool, documents: bool) -> torch.Tensor:
    q_pos, kv_pos = _positions(t, s)
    mask = attention_mask(q_pos, kv_pos, key_padding_mask=_padding(b, s) if padding else None, **rule)
    if documents:
        ids = _documents(b, s)
        mask = mask & document_mask(ids[:, s - t :], ids)
    return mask.expand(b, 1, t, s)


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize(("t", "s"), [(19, 19), (7, 19)], ids=["T=S", "T<S"])
@pytest.mark.parametrize("extra", ["none", "padding", "documents"])
def test_mask_mod_equals_the_dense_masks(rule: dict, t: int, s: int, extra: str) -> None:
    from torch.nn.attention.flex_attention import create_mask

    b = 2
    kw = {}
    if extra == "padding":
        kw["key_padding_mask"] = _padding(b, s)
    if extra == "documents":
        kw["document_ids"] = _documents(b, s)
    mod = mask_mod(**rule, q_offset=s - t, **kw)
    expected = _dense(rule, t, s, b, extra == "padding", extra == "documents")
    if mod is None:  # no rule at all: every key visible
        assert expected.all()
        return
    got = create_mask(mod, b, 1, t, s, device="cpu")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("rule", [r for r in RULES if not r["causal"]], ids=str)
def test_non_causal_rules_with_more_queries_than_keys(rule: dict) -> None:
    """T > S (a long x over a short, padded context): queries sit at S - T + i, the first T - S of them at
    negative positions, and still see every key their rules allow."""
    from torch.nn.attention.flex_attention import create_mask

    b, t, s = 2, 19, 7
    kpm = _padding(b, s)
    expected = _dense(rule, t, s, b, True, False)
    mod = mask_mod(**rule, q_offset=s - t, key_padding_mask=kpm)
    assert torch.equal(create_mask(mod, b, 1, t, s, device="cpu"), expected)
    torch.manual_seed(0)
    q, k, v = torch.randn(b, 4, t, 8), torch.randn(b, 2, s, 8), torch.randn(b, 2, s, 8)
    with torch.no_grad():
        got = flex_attention(q, k, v, **rule, key_padding_mask=kpm)
    torch.testing.assert_close(got, attention(q, k, v, expected), **F32)
    if rule == {"causal": False}:  # the cross-attention module's flex path: key padding only
        ref = Attention(32, 4, context_dim=24)
        flex = Attention(32, 4, context_dim=24, backend="flex")
        flex.load_state_dict(ref.state_dict())
        x, ctx = torch.randn(b, t, 32), torch.randn(b, s, 24)
        with torch.no_grad():
            torch.testing.assert_close(flex(x, ctx, mask=kpm), ref(x, ctx, mask=kpm), **F32)


@pytest.mark.parametrize("rule", RULES[:-1], ids=str)
def test_block_mask_marks_exactly_the_non_empty_tiles(rule: dict) -> None:
    t = s = 300  # 3 tiles of 128 (the last one partial)
    block = flex_block_mask(t, s, device="cpu", **rule)
    dense = _dense(rule, t, s, 1, False, False)[0, 0]
    tiles = torch.nn.functional.pad(dense, (0, 84, 0, 84)).view(3, 128, 3, 128).any(dim=(1, 3))
    assert torch.equal(block.to_dense()[0, 0].bool(), tiles)


def test_static_block_masks_are_cached_and_data_masks_are_not() -> None:
    a = flex_block_mask(64, 64, device="cpu", causal=True, window=8)
    assert flex_block_mask(64, 64, device="cpu", causal=True, window=8) is a
    assert flex_block_mask(64, 64, device="cpu", causal=True, window=16) is not a
    assert flex_block_mask(32, 64, device="cpu", causal=True, window=8) is not a
    assert flex_block_mask(64, 64, device="cpu", causal=False) is None  # nothing masked
    kpm = torch.ones(2, 64, dtype=torch.bool)
    p1 = flex_block_mask(64, 64, device="cpu", key_padding_mask=kpm)
    assert p1 is not flex_block_mask(64, 64, device="cpu", key_padding_mask=kpm)
    assert p1.shape[0] == 2  # a batch axis: one mask per row


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize(("t", "s"), [(150, 150), (37, 150)], ids=["T=S", "T<S"])
@pytest.mark.parametrize("extra", ["none", "padding", "documents"])
@pytest.mark.parametrize("hkv", [2], ids=["gqa"])  # MHA: the module and cross-attention tests
def test_flex_attention_equals_sdpa_with_the_dense_mask(
    rule: dict, t: int, s: int, extra: str, hkv: int
) -> None:
    torch.manual_seed(0)
    b, h, dh = 2, 4, 8
    q, k, v = torch.randn(b, h, t, dh), torch.randn(b, hkv, s, dh), torch.randn(b, hkv, s, dh)
    kw = {}
    if extra == "padding":
        kw["key_padding_mask"] = _padding(b, s)
    if extra == "documents":
        kw["document_ids"] = _documents(b, s)
    with torch.no_grad():
        got = flex_attention(q, k, v, **rule, **kw)
        ref = attention(q, k, v, _dense(rule, t, s, b, extra == "padding", extra == "documents"))
    torch.testing.assert_close(got, ref, **F32)


def test_fully_masked_queries_output_zeros_like_sdpa() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 8) for _ in range(3))
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[1, :30] = False  # with a window of 4, queries 0..29 of row 1 see nothing
    with torch.no_grad():
        got = flex_attention(q, k, v, causal=True, window=4, key_padding_mask=kpm)
    ref = attention(
        q, k, v, attention_mask(torch.arange(40), torch.arange(40), window=4, key_padding_mask=kpm)
    )
    assert got[1, :, :30].abs().max() == 0
    torch.testing.assert_close(got, ref, **F32)


def test_dense_mask_and_custom_scale() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    mask = torch.rand(2, 4, 9, 20) > 0.4
    with torch.no_grad():
        got = flex_attention(q, k, v, mask=mask, causal=True, scale=0.3)
    ref = attention(q, k, v, mask, causal=True, scale=0.3)
    torch.testing.assert_close(got, ref, **F32)
    # the mask_mod form of a broadcast (B, 1, 1, S) mask
    pad = mask[:, :1, :1, :]
    rule = dense_mask_mod(pad.expand(-1, -1, 9, 20))
    assert bool(rule(torch.tensor(1), torch.tensor(3), torch.tensor(2), torch.tensor(5))) == bool(
        pad[1, 0, 0, 5]
    )


@pytest.mark.parametrize(
    "kind", ["none", "causal", "padding", "padding_causal", "sliding", "chunked", "combined"]
)
def test_function_backend_flex_equals_sdpa(kind: str) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 6), torch.randn(2, 2, 7, 6), torch.randn(2, 2, 7, 6)
    pos, pad = torch.arange(7), _padding(2, 7)[:, None, None, :]
    mask, causal = {
        "none": (None, False),
        "causal": (None, True),
        "padding": (pad, False),
        "padding_causal": (pad, True),
        "sliding": (attention_mask(pos, pos, window=3), False),
        "chunked": (attention_mask(pos, pos, chunk=3), False),
        "combined": (attention_mask(pos, pos, window=4, chunk=3, key_padding_mask=_padding(2, 7)), True),
    }[kind]
    with torch.no_grad():
        got = attention(q, k, v, mask, causal=causal, backend="flex")
    torch.testing.assert_close(got, attention(q, k, v, mask, causal=causal), **F32)


LOCAL = [dict(window=5), dict(chunk=6), dict(window=9, chunk=6), dict()]


@pytest.mark.parametrize("local", LOCAL, ids=str)
@pytest.mark.parametrize("padding", [False, True])
def test_module_backend_flex_equals_sdpa(local: dict, padding: bool) -> None:
    torch.manual_seed(0)
    ref = Attention(32, 4, 2, causal=True, **local)
    flex = Attention(32, 4, 2, causal=True, backend="flex", **local)
    flex.load_state_dict(ref.state_dict())
    x = torch.randn(2, 23, 32)
    mask = _padding(2, 23) if padding else None
    with torch.no_grad():
        torch.testing.assert_close(flex(x, mask=mask), ref(x, mask=mask), **F32)
        # given positions (a dense mask through the flex backend) and a 4-D mask
        pos = torch.arange(5, 28)
        torch.testing.assert_close(flex(x, input_pos=pos), ref(x, input_pos=pos), **F32)
        m4 = torch.rand(2, 1, 23, 23) > 0.3
        torch.testing.assert_close(flex(x, mask=m4), ref(x, mask=m4), **F32)


def test_module_flex_cross_attention_and_cache_path() -> None:
    torch.manual_seed(0)
    ref = Attention(32, 4, context_dim=24)
    flex = Attention(32, 4, context_dim=24, backend="flex")
    flex.load_state_dict(ref.state_dict())
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 11, 24)
    with torch.no_grad():
        torch.testing.assert_close(
            flex(x, ctx, mask=_padding(2, 11)), ref(x, ctx, mask=_padding(2, 11)), **F32
        )
    # with a KV cache the flex module decodes on SDPA: same tokens as the full forward
    m = Attention(32, 4, 2, causal=True, window=4, backend="flex")
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        full = m(x)
        m.setup_cache(1, 16)
        steps = [m(x[:, :5], input_pos=torch.arange(5))] + [
            m(x[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(5, 9)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, **F32)


def test_flex_errors_are_clear() -> None:
    q, k, v = (torch.randn(1, 2, 8, 8, requires_grad=True) for _ in range(3))
    with pytest.raises(NotImplementedError, match="no backward on the CPU"):
        flex_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="no dropout"):
        attention(q, k, v, causal=True, dropout_p=0.1, backend="flex")
    m = Attention(16, 2, causal=True, window=4, dropout=0.1, backend="flex")
    with pytest.raises(ValueError, match="backend='flex' has no dropout"):
        m(torch.randn(1, 8, 16))
    with pytest.raises(ValueError, match="block_mask is used as given"):
        flex_attention(q, k, v, causal=True, block_mask=object())
    with pytest.raises(ValueError, match="window=0"):
        mask_mod(window=0)
    with pytest.raises(ValueError, match=r"must be one of \('sdpa', 'math', 'flash', 'flex', 'auto'\)"):
        Attention(16, 2, backend="fast")
    with pytest.raises(ValueError, match="must be one of"):
        attention(q, k, v, backend="auto")  # "auto" belongs to the module, which knows its rules
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B=1, S=8\)"):
        flex_block_mask(8, 8, device="cpu", key_padding_mask=torch.ones(1, 9, dtype=torch.bool))


def test_document_ids_with_more_queries_than_keys_raise() -> None:
    """Queries at negative positions have no document: an error, not ids read from the end of the row."""
    ids = torch.tensor([[0, 0, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match=r"need T <= S; got q_offset = S - T = -2"):
        mask_mod(causal=False, document_ids=ids, q_offset=-2)
    q, kv = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 3, 4)
    with pytest.raises(ValueError, match=r"need T <= S"):
        flex_attention(q, kv, kv, document_ids=ids)


def test_auto_backend_is_sdpa_on_the_cpu_and_trains() -> None:
    torch.manual_seed(0)
    ref = Attention(32, 4, 2, causal=True, window=5)
    auto = Attention(32, 4, 2, causal=True, window=5, backend="auto")
    auto.load_state_dict(ref.state_dict())
    assert auto._backend_for(torch.randn(1, 3, 32), None, None, 0.0) == "sdpa"
    x = torch.randn(2, 13, 32, requires_grad=True)
    out = auto(x)
    out.square().sum().backward()  # gradients work: SDPA was chosen
    torch.testing.assert_close(out, ref(x), **F32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only")
@pytest.mark.parametrize("rule", [dict(causal=True, chunk=64), dict(causal=True, window=48)], ids=str)
@pytest.mark.parametrize("padding", [False, True])
def test_cuda_flex_outputs_and_gradients_equal_sdpa(rule: dict, padding: bool) -> None:
    torch.manual_seed(0)
    b, h, hkv, t, dh = 2, 4, 2, 320, 64
    base = [torch.randn(b, n, t, dh, device="cuda") for n in (h, hkv, hkv)]
    kpm = _padding(b, t).cuda() if padding else None
    dense = _dense(rule, t, t, b, padding, False).cuda()
    grads, outs = [], []
    for run in (
        lambda q, k, v: flex_attention(q, k, v, key_padding_mask=kpm, **rule),
        lambda q, k, v: attention(q, k, v, dense),
    ):
        leaves = [x.clone().requires_grad_(True) for x in base]
        out = run(*leaves)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append([x.grad for x in leaves])
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CUDA path is the compiled kernel: no "unfused" warning
        flex_attention(*base, **rule)


def test_module_flex_traces_fullgraph() -> None:
    # the block mask is built inside the graph (the cache's Python is not traced); Dynamo's eager backend
    # checks the tracing in seconds (Inductor's CPU flex kernel compiles too, in ~30 s: not run here)
    m = Attention(32, 4, 2, causal=True, window=5, backend="flex")
    x = torch.randn(2, 40, 32)
    kpm = _padding(2, 40)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), **F32)
        torch.testing.assert_close(compiled(x, mask=kpm), m(x, mask=kpm), **F32)


def test_auto_backend_decision_table() -> None:
    """Where "auto" picks FlexAttention (CUDA, no cache, no dropout, local masks, power-of-two head dim)."""
    from types import SimpleNamespace

    cuda_x = SimpleNamespace(device=SimpleNamespace(type="cuda"))  # the decision reads only x.device.type
    cpu_x = torch.zeros(1, 1, 64)
    pad = torch.ones(1, 3, dtype=torch.bool)
    window = Attention(64, 4, causal=True, window=8, backend="auto")  # head_dim 16
    chunk = Attention(64, 4, causal=True, chunk=8, backend="auto")
    assert window._backend_for(cuda_x, None, None, 0.0) == "flex"
    assert window._backend_for(cpu_x, None, None, 0.0) == "sdpa"  # CPU: no flex backward
    assert window._backend_for(cuda_x, object(), None, 0.0) == "sdpa"  # a cache: decoding stays on SDPA
    assert window._backend_for(cuda_x, None, None, 0.1) == "sdpa"  # dropout: flex has none
    assert chunk._backend_for(cuda_x, None, None, 0.0) == "sdpa"  # chunks alone: causal blocks on flash
    assert chunk._backend_for(cuda_x, None, pad, 0.0) == "flex"  # chunks with padding: a block mask
    assert (
        Attention(48, 2, causal=True, window=8, backend="auto")._backend_for(cuda_x, None, None, 0.0)
        == "sdpa"
    )
    assert Attention(64, 4, causal=True, backend="auto")._backend_for(cuda_x, None, None, 0.0) == "sdpa"
    flex = Attention(64, 4, causal=True, window=8, backend="flex")
    assert flex._backend_for(cpu_x, object(), None, 0.0) == "sdpa"  # explicit flex: the cache path is SDPA's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only")
@pytest.mark.parametrize("local", [dict(window=48), dict(chunk=64)], ids=str)
def test_cuda_module_flex_and_auto_train_like_sdpa(local: dict) -> None:
    torch.manual_seed(0)
    ref = Attention(256, 4, 2, causal=True, **local).cuda()  # head_dim 64
    x = torch.randn(2, 300, 256, device="cuda")
    mask = _padding(2, 300).cuda()
    out_ref = ref(x, mask=mask)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), list(ref.parameters()))
    for backend in ("flex", "auto"):
        m = Attention(256, 4, 2, causal=True, backend=backend, **local).cuda()
        m.load_state_dict(ref.state_dict())
        assert m._backend_for(x, None, mask, 0.0) == "flex"
        out = m(x, mask=mask)
        torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=2e-5)
        for g, r in zip(torch.autograd.grad(out.square().sum(), list(m.parameters())), grads_ref):
            torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-4)
