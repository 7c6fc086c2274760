"""Tests for vermeil.nn.mamba2.Mamba2Block: transformers parity, cached decoding, chunked prefill, init, errors.

Axis legend: B batch, T length, D d_model, I d_inner, H heads, P head dim, G groups, N d_state, K d_conv.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vermeil.nn.cache import SSMState
from vermeil.nn.mamba2 import Mamba2Block

D_MODEL = 24


def make_block(**kwargs) -> Mamba2Block:
    """A small block with every parameter moved off its init, so each term is exercised."""
    cfg = {"d_state": 5, "d_conv": 4, "expand": 2, "headdim": 6, "ngroups": 2, "chunk_size": 4}
    block = Mamba2Block(D_MODEL, **{**cfg, **kwargs})
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return block


def rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol} * scale {scale:.3e}"


@pytest.mark.parametrize(
    ("heads", "headdim", "groups", "chunk", "limit"),
    [(8, 6, 1, 5, None), (8, 6, 2, 3, None), (8, 6, 8, 7, None), (4, 12, 2, 64, (0.0, 0.2))],
)
def test_matches_transformers_mamba2_mixer(heads, headdim, groups, chunk, limit):
    modeling = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    from transformers import Mamba2Config

    d_model = heads * headdim // 2
    extra = {} if limit is None else {"time_step_limit": limit}
    cfg = Mamba2Config(
        hidden_size=d_model, num_heads=heads, head_dim=headdim, n_groups=groups, state_size=5, expand=2,
        conv_kernel=4, chunk_size=chunk, num_hidden_layers=1, vocab_size=8, **extra,
    )  # fmt: skip
    hf = modeling.Mamba2Mixer(cfg, layer_idx=0)
    block = Mamba2Block(
        d_model, d_state=5, d_conv=4, expand=2, headdim=headdim, ngroups=groups, chunk_size=4, **extra
    )
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(2, 19, d_model)
    x_hf = x.clone().requires_grad_(True)
    x_v = x.clone().requires_grad_(True)
    y_hf, y = hf(x_hf), block(x_v)
    rel_close(y, y_hf)
    g = torch.randn_like(y)
    y_hf.backward(g)
    y.backward(g)
    rel_close(x_v.grad, x_hf.grad)
    hf_params = dict(hf.named_parameters())
    for name, p in block.named_parameters():
        rel_close(p.grad, hf_params[name].grad, rtol=2e-5)


def test_parameter_names_and_shapes_are_mamba_ssm_and_transformers():
    block = Mamba2Block(32, d_state=16, d_conv=4, expand=2, headdim=8, ngroups=2)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    i, h, gn = 64, 8, 32
    assert shapes == {
        "in_proj.weight": (2 * i + 2 * gn + h, 32),
        "conv1d.weight": (i + 2 * gn, 1, 4),
        "conv1d.bias": (i + 2 * gn,),
        "dt_bias": (h,),
        "A_log": (h,),
        "D": (h,),
        "norm.weight": (i,),
        "out_proj.weight": (32, i),
    }
    biased = Mamba2Block(32, d_state=16, headdim=8, bias=True, D_has_hdim=True, rmsnorm=False)
    keys = set(biased.state_dict())
    assert {"in_proj.bias", "out_proj.bias"} <= keys and "norm.weight" not in keys
    assert biased.D.shape == (64,)


def test_init_is_mamba_ssm():
    torch.manual_seed(1)
    block = Mamba2Block(64, d_state=8, headdim=4, dt_min=0.01, dt_max=0.05)
    a = torch.exp(block.A_log)
    assert a.min() >= 1.0 and a.max() <= 16.0 and a.std() > 1.0  # uniform in [1, 16], not arange
    dt = torch.nn.functional.softplus(block.dt_bias)
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.05 + 1e-6
    assert torch.equal(block.D, torch.ones(32))
    for p in (block.A_log, block.D, block.dt_bias, block.norm.weight):
        assert getattr(p, "_no_weight_decay", False)
    assert not getattr(block.in_proj.weight, "_no_weight_decay", False)
    assert block.A_log.dtype == block.D.dtype == block.dt_bias.dtype == torch.float32


@pytest.mark.parametrize("bsz_pos", [False, True])
def test_prefill_then_decode_equals_full_forward(bsz_pos):
    block = make_block()
    x = torch.randn(2, 13, D_MODEL)
    with torch.no_grad():
        full = block(x)
        block.setup_cache(3, 32)
        prompt = 5

        def positions(start: int, stop: int) -> torch.Tensor:
            pos = torch.arange(start, stop)
            return pos.expand(2, -1) if bsz_pos else pos

        outs = [block(x[:, :prompt], positions(0, prompt))]
        for t in range(prompt, x.shape[1]):
            outs.append(block(x[:, t : t + 1], positions(t, t + 1)))
    rel_close(torch.cat(outs, 1), full)


def test_chunked_prefill_of_odd_pieces_and_restart_at_zero():
    block = make_block(chunk_size=3)
    x = torch.randn(2, 17, D_MODEL)
    with torch.no_grad():
        full = block(x)
        block.setup_cache(2)
        outs, start = [], 0
        for piece in (1, 4, 2, 7, 1, 2):
            outs.append(block(x[:, start : start + piece], torch.arange(start, start + piece)))
            start += piece
        rel_close(torch.cat(outs, 1), full)
        # position 0 starts a new sequence from zero state, without reset_cache()
        rel_close(block(x[:, :6], torch.arange(6)), full[:, :6])
        rel_close(block(x[:, 6:7], torch.tensor([6])), full[:, 6:7])


def test_token_by_token_from_position_zero():
    block = make_block()
    x = torch.randn(1, 9, D_MODEL)
    with torch.no_grad():
        full = block(x)
        block.setup_cache(1)
        steps = [block(x[:, t : t + 1], torch.tensor([t])) for t in range(9)]
    rel_close(torch.cat(steps, 1), full)


def test_decode_step_per_row_restart_and_grad_mode():
    """One-token steps with per-row positions: a row at position 0 restarts from zero state while the other
    continues. The no-grad step (cache updated in place) and the autograd step agree, and the latter
    gives gradients."""
    block = make_block()
    x = torch.randn(2, 8, D_MODEL)
    with torch.no_grad():
        full = block(x)
        fresh = block(x[:, 5:6])  # a sequence whose first token is x[:, 5]
    results = []
    for grad in (False, True):
        block.setup_cache(2)
        with torch.no_grad():
            block(x[:, :5], torch.arange(5))
        with torch.set_grad_enabled(grad):
            xt = x[:, 5:6].clone().requires_grad_(grad)
            out, (conv, ssm) = block(xt, torch.tensor([[0], [5]]), return_final_state=True)
        rel_close(out[0], fresh[0])
        rel_close(out[1], full[1, 5:6])
        assert_close(conv, block.cache.conv_state)
        assert_close(ssm, block.cache.ssm_state)
        results.append((out.detach(), block.cache.ssm_state.clone()))
        if grad:
            out.square().sum().backward()
            assert xt.grad is not None and block.in_proj.weight.grad is not None
        else:  # the returned states are copies: the next step must not change them
            before = ssm.clone()
            with torch.no_grad():
                block(x[:, 6:7], torch.tensor([6]))
            assert_close(ssm, before)
    assert_close(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1])


def test_few_row_projection_equals_linear():
    """The decoding projections (`weight @ x.T` for a few rows on the CPU) equal F.linear; anything that is
    not a plain nn.Linear is called as a module."""
    from vermeil.nn.mamba2 import _FEW_ROWS, _project

    for bias in (False, True):
        lin = torch.nn.Linear(7, 5, bias=bias)
        for rows in range(1, _FEW_ROWS + 3):
            x = torch.randn(rows, 7)
            assert_close(_project(lin, x), lin(x))

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    lin = Doubled(7, 5)
    x = torch.randn(2, 7)
    assert_close(_project(lin, x), 2 * torch.nn.functional.linear(x, lin.weight, lin.bias))


@pytest.mark.parametrize("segment_tokens", [1, 16, 40])
def test_cpu_pieces_equal_one_piece_with_gradients(segment_tokens):
    """segment_tokens cuts a long CPU forward into pieces chained by their states (pieces of 4, 8 and 20
    positions at batch 2 and chunk 4; the last one shorter): outputs, final states and every gradient equal
    the one-piece forward."""
    block = make_block(segment_tokens=None)
    pieces = make_block(segment_tokens=segment_tokens)
    pieces.load_state_dict(block.state_dict())
    x = torch.randn(2, 23, D_MODEL)
    init = (torch.randn(2, block.conv_dim, 4), torch.randn(2, block.nheads, block.headdim, 5))
    results = []
    for b in (block, pieces):
        xg = x.clone().requires_grad_(True)
        state = tuple(t.clone().requires_grad_(True) for t in init)
        y, (conv, ssm) = b(xg, initial_state=state, return_final_state=True)
        (y.square().sum() + ssm.sum() + conv.sum()).backward()
        grads = [xg.grad, *(t.grad for t in state)] + [p.grad for p in b.parameters()]
        results.append(([y, conv, ssm], grads))
    for actual, expected in zip(results[1][0] + results[1][1], results[0][0] + results[0][1]):
        rel_close(actual, expected)
    with pytest.raises(ValueError, match=r"segment_tokens=0 must be a positive int"):
        Mamba2Block(32, headdim=8, segment_tokens=0)


def test_initial_state_and_final_state_compose_with_gradients():
    """forward([a; b]) == forward(b, initial_state=state after a), gradients included (truncated BPTT)."""
    block = make_block()
    x = torch.randn(2, 11, D_MODEL, requires_grad=True)
    y, (conv, ssm) = block(x, return_final_state=True)
    y1, state = block(x[:, :4], return_final_state=True)
    y2, (conv2, ssm2) = block(x[:, 4:], initial_state=state, return_final_state=True)
    rel_close(torch.cat([y1, y2], 1), y)
    rel_close(conv2, conv)
    rel_close(ssm2, ssm)
    (g,) = torch.autograd.grad(y.square().sum() + ssm.sum(), x)
    (g2,) = torch.autograd.grad(torch.cat([y1, y2], 1).square().sum() + ssm2.sum(), x)
    rel_close(g2, g)


def test_cache_api_dtypes_and_reset():
    block = make_block()
    block.setup_cache(2, 16, dtype=torch.bfloat16)
    assert block.cache.conv_state.shape == (2, block.conv_dim, 4)
    assert block.cache.conv_state.dtype == torch.bfloat16
    assert block.cache.ssm_state.shape == (2, block.nheads, block.headdim, 5)
    assert block.cache.ssm_state.dtype == torch.float32
    assert not list(block.state_dict().keys() - {n for n, _ in block.named_parameters()})  # not persistent
    with torch.no_grad():
        block.to(torch.bfloat16)
        block.setup_cache(2)
        block(torch.randn(2, 3, D_MODEL, dtype=torch.bfloat16), torch.arange(3))
    assert block.cache.ssm_state.dtype == torch.float32 and block.cache.ssm_state.abs().sum() > 0
    block.reset_cache()
    assert block.cache.ssm_state.abs().sum() == 0 and block.cache.conv_state.abs().sum() == 0
    block.delete_cache()
    assert block.cache is None


def test_float64_block_decodes_in_float64():
    """The SSM state of a float64 block's cache is float64 (at least float32), so prefill + steps equal the
    forward to float64 rounding."""
    block = make_block().double()
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        full = block(x)
        block.setup_cache(2)
        outs = [block(x[:, :5], torch.arange(5))]
        outs += [block(x[:, t : t + 1], torch.tensor([t])) for t in range(5, 9)]
    assert block.cache.ssm_state.dtype == torch.float64
    rel_close(torch.cat(outs, 1), full, rtol=1e-12)


def test_decode_step_makes_no_host_sync():
    """The one-token path reads no tensor value on the host (CUDA-graph capturable): checked by running
    it on the meta device, where any .item() or data-dependent branch would fail."""
    block = make_block().to("meta")
    block.setup_cache(2, device="meta")
    out = block(torch.empty(2, 1, D_MODEL, device="meta"), torch.empty(1, dtype=torch.long, device="meta"))
    assert out.shape == (2, 1, D_MODEL)


def test_bad_arguments_raise_naming_the_field():
    with pytest.raises(ValueError, match=r"ngroups=3 must divide nheads = d_inner / headdim = 8"):
        Mamba2Block(32, headdim=8, ngroups=3)
    with pytest.raises(ValueError, match=r"headdim=7 must divide d_inner"):
        Mamba2Block(32, headdim=7)
    with pytest.raises(ValueError, match=r"chunk_size=0 must be a positive int"):
        Mamba2Block(32, headdim=8, chunk_size=0)
    with pytest.raises(ValueError, match=r"time_step_limit=\(0.5, 0.1\)"):
        Mamba2Block(32, headdim=8, time_step_limit=(0.5, 0.1))
    block = make_block()
    with pytest.raises(ValueError, match=r"x.shape=\(2, 3, 5\) must be \(B, T, d_model=24\)"):
        block(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"no cache is set up"):
        block(torch.randn(2, 3, D_MODEL), torch.arange(3))
    bad_state = (torch.zeros(2, block.conv_dim, 4), torch.zeros(2, block.nheads, block.headdim, 6))
    with pytest.raises(ValueError, match=r"ssm_state.shape=\(2, 8, 6, 6\) must be \(2, 8, 6, 5\)"):
        block(torch.randn(2, 3, D_MODEL), initial_state=bad_state)
    block.setup_cache(1)
    with pytest.raises(ValueError, match=r"batch size 2 exceeds the cache's batch_size=1"):
        block(torch.randn(2, 3, D_MODEL), torch.arange(3))


def test_cache_of_the_wrong_shape_is_named_with_both_shapes():
    block = make_block()
    h, p = block.nheads, block.headdim
    block.cache = SSMState(2, block.conv_dim, 4, 6, ssm_shape=(h, p, 6))  # d_state 6: another block's cache
    x = torch.randn(2, 3, D_MODEL)
    for piece in (x, x[:, :1]):  # the prefill and the one-token paths
        with pytest.raises(
            ValueError, match=rf"the cache's ssm_state.shape=\(2, {h}, {p}, 6\) must be \(2, {h}, {p}, 5\)"
        ):
            block(piece, torch.arange(piece.shape[1]))
    with pytest.raises(
        ValueError, match=rf"initial_state conv_state.shape=\(2, 3, 4\) must be \(2, {block.conv_dim}, 4\)"
    ):
        block(x, initial_state=(torch.zeros(2, 3, 4), torch.zeros(2, h, p, 5)))


def test_d_inner_given_is_expand_when_a_multiple_and_decodes_when_not():
    torch.manual_seed(0)
    ref = make_block()
    block = Mamba2Block(D_MODEL, d_inner=2 * D_MODEL, d_state=5, headdim=6, ngroups=2, chunk_size=4)
    block.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 9, D_MODEL)
    assert_close(block(x), ref(x))
    # Falcon-H1's shape: an inner width that is not a multiple of d_model (18 = 3 heads of 6 for d_model 24)
    odd = make_block(d_inner=18, ngroups=3)
    assert odd.in_proj.weight.shape == (2 * 18 + 2 * 3 * 5 + 3, D_MODEL)
    assert odd.out_proj.weight.shape == (D_MODEL, 18) and odd.conv_dim == 18 + 2 * 3 * 5
    with torch.no_grad():
        full = odd(x)
        odd.setup_cache(2)
        steps = torch.cat([odd(x[:, t : t + 1], torch.tensor([t])) for t in range(x.shape[1])], 1)
    rel_close(steps, full)
    with pytest.raises(ValueError, match=r"headdim=6 must divide d_inner = 20"):
        Mamba2Block(D_MODEL, d_inner=20, headdim=6)


def test_in_proj_multipliers_scale_the_row_segments():
    block = make_block()
    mults = (0.5, 2.0, 1.5, 0.25, 3.0)  # [z, x, B, C, dt]
    scaled = make_block(in_proj_multipliers=mults)
    scaled.load_state_dict(block.state_dict(), strict=True)  # the same keys: the scale is not a parameter
    rows = (block.d_inner, block.d_inner, 2 * 5, 2 * 5, block.nheads)
    with torch.no_grad():
        block.in_proj.weight.mul_(torch.cat([torch.full((n,), m) for n, m in zip(rows, mults)])[:, None])
    x = torch.randn(2, 7, D_MODEL)
    rel_close(scaled(x), block(x))
    with torch.no_grad():  # the one-token path (a few-row projection) applies the scale too
        scaled.setup_cache(2)
        block.setup_cache(2)
        rel_close(scaled(x[:, :1], torch.tensor([0])), block(x[:, :1], torch.tensor([0])))


def test_gated_norm_groups():
    block = make_block(norm_eps=1e-6)
    y, z = torch.randn(3, block.d_inner), torch.randn(3, block.d_inner)
    g = (y * torch.nn.functional.silu(z)).view(3, 2, -1)
    ref = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)).flatten(1) * block.norm.weight
    assert_close(block.norm(y, z), ref)
    assert math.isclose(block.norm.eps, 1e-6)
