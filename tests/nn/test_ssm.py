"""Tests for vermeil.nn.ssm.MambaBlock: mambapy parity, cached decoding, init, construction, compile.

Axis legend: B batch, T length, D d_model, E d_inner, N d_state, K d_conv.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from vermeil.nn.cache import SSMState
from vermeil.nn.ssm import MambaBlock, MambaState

D_MODEL, T = 37, 7


def make_block(**kwargs) -> MambaBlock:
    block = MambaBlock(D_MODEL, d_state=5, d_conv=4, expand=2, **kwargs)
    with torch.no_grad():  # move D and A off their init so every term is exercised
        block.D.uniform_(-1.0, 1.0)
        block.A_log.add_(0.1 * torch.randn_like(block.A_log))
    return block


def mambapy_twin(block: MambaBlock):
    mamba = pytest.importorskip("mambapy.mamba")
    config = mamba.MambaConfig(
        d_model=block.d_model,
        n_layers=1,
        dt_rank=block.dt_rank,
        d_state=block.d_state,
        expand_factor=block.expand,
        d_conv=block.d_conv,
        bias=block.in_proj.bias is not None,
        conv_bias=block.conv1d.bias is not None,
        pscan=True,
    )
    twin = mamba.MambaBlock(config)
    twin.load_state_dict(block.state_dict())  # same parameter names: in_proj, conv1d, x_proj, dt_proj, ...
    return twin


@pytest.mark.parametrize("bias", [False, True])
def test_matches_mambapy_forward_and_gradients(bias):
    block = make_block(bias=bias)
    twin = mambapy_twin(block)
    x = torch.randn(2, T, D_MODEL)
    ours, theirs = block(x), twin(x)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(ours)
    (ours * gy).sum().backward()
    (theirs * gy).sum().backward()
    twin_params = dict(twin.named_parameters())
    for name, p in block.named_parameters():
        assert_close(p.grad, twin_params[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_matches_mambapy_step():
    block = make_block()
    twin = mambapy_twin(block)
    x = torch.randn(2, T, D_MODEL)
    block.setup_cache(batch_size=2)
    cache = (None, torch.zeros(2, block.d_inner, block.d_conv - 1))  # mambapy: (h, last K-1 inputs)
    with torch.no_grad():
        for t in range(T):
            ours = block(x[:, t : t + 1], input_pos=torch.tensor([t]))
            theirs, cache = twin.step(x[:, t], cache)
            assert_close(ours[:, 0], theirs, rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_full_forward():
    block = make_block()
    x = torch.randn(3, T, D_MODEL)
    with torch.no_grad():
        full = block(x)
        block.setup_cache(batch_size=3, max_seq_len=T)
        steps = torch.cat([block(x[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(T)], dim=1)
    assert_close(steps, full, rtol=1e-5, atol=1e-5)


def test_float64_block_decodes_in_float64():
    """A float64 block's cache keeps a float64 SSM state (at least float32, not exactly float32), so prefill +
    steps equal the forward to float64 rounding, not float32's."""
    block = make_block().double()
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        full = block(x)
        block.setup_cache(batch_size=2)
        outs = [block(x[:, :3], input_pos=torch.arange(3))]
        outs += [block(x[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(3, T)]
    assert block.cache.ssm_state.dtype == torch.float64
    assert_close(torch.cat(outs, dim=1), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 3])
def test_input_pos_of_the_wrong_shape_is_named(length):
    """input_pos must be (T,) or (1|B, T): another batch or more axes used to fail deep inside torch.where."""
    block = make_block()
    block.setup_cache(batch_size=4)
    x = torch.randn(2, length, D_MODEL)
    rows = torch.arange(length).expand(3, -1)
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"input_pos.shape\[0\]=3 must be 1 or the batch size 2"),
    ):
        block(x, input_pos=rows)
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"input_pos.shape=\(1, 1, \d\) must be \(T,\) or \(B, T\)"),
    ):
        block(x, input_pos=rows[:1, None])
    with torch.no_grad():  # (T,), (1, T) and (B, T) are accepted
        for pos in (rows[0], rows[:1], rows[:2]):
            block(x, input_pos=pos)


@pytest.mark.parametrize("prompt", [2, 3, 5])
def test_prefill_then_steps_equals_full_forward(prompt):
    block = make_block()
    x = torch.randn(2, T, D_MODEL)
    with torch.no_grad():
        full = block(x)
        block.setup_cache(batch_size=2)
        outs = [block(x[:, :prompt], input_pos=torch.arange(prompt))]
        outs += [block(x[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(prompt, T)]
    assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_and_restart_at_position_zero():
    block = make_block()
    x = torch.randn(2, T, D_MODEL)
    other = torch.randn(2, T, D_MODEL)
    with torch.no_grad():
        full = block(x)
        block.setup_cache(batch_size=2)
        block(other, input_pos=torch.arange(T))  # a previous sequence left state in the cache
        # a new sequence from position 0, without reset_cache, in two multi-token pieces then one step
        a = block(x[:, :3], input_pos=torch.arange(3))
        b = block(x[:, 3:6], input_pos=torch.arange(3, 6))
        c = block(x[:, 6:], input_pos=torch.tensor([6]))
        # a one-token prompt at position 0 also starts from zeros
        one = block(x[:, :1], input_pos=torch.tensor([0]))
    assert_close(torch.cat([a, b, c], dim=1), full, rtol=1e-5, atol=1e-5)
    assert_close(one, full[:, :1], rtol=1e-5, atol=1e-5)


def test_reset_cache_zeroes_the_state():
    block = make_block()
    block.setup_cache(batch_size=2)
    with torch.no_grad():
        block(torch.randn(2, 3, D_MODEL), input_pos=torch.arange(3))
    assert block.cache.ssm_state.abs().sum() > 0 and block.cache.conv_state.abs().sum() > 0
    block.reset_cache()
    assert block.cache.ssm_state.abs().sum() == 0 and block.cache.conv_state.abs().sum() == 0
    assert isinstance(block.cache, MambaState)
    assert block.cache.ssm_state.dtype == torch.float32
    assert block.cache.conv_state.shape == (2, block.d_inner, block.d_conv)
    assert block.cache.ssm_state.shape == (2, block.d_inner, block.d_state)


def test_state_handoff_equals_whole_sequence_with_gradients():
    """Truncated BPTT at block level: forward [0, 4) then [4, 7) from the returned state == one forward."""
    block = make_block()
    x = torch.randn(2, T, D_MODEL, requires_grad=True)
    gy = torch.randn(2, T, D_MODEL)
    full = block(x)
    grads_full = torch.autograd.grad((full * gy).sum(), [x, *block.parameters()])
    first, state = block(x[:, :4], return_final_state=True)
    second = block(x[:, 4:], initial_state=state)
    split = torch.cat([first, second], dim=1)
    grads_split = torch.autograd.grad((split * gy).sum(), [x, *block.parameters()])
    assert_close(split, full, rtol=1e-5, atol=1e-5)
    for g_split, g_full in zip(grads_split, grads_full):
        assert_close(g_split, g_full, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    block = MambaBlock(6, d_state=3, d_conv=3, expand=1.5, dtype=torch.float64)
    with torch.no_grad():
        block.A_log.copy_(block.A_log.double())
    block = block.double()
    names = [n for n, _ in block.named_parameters()]
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    assert all(p.dtype == torch.float64 for p in params)

    def fn(x, *ps):
        return functional_call(block, dict(zip(names, ps)), (x,))

    # fast mode (random projections of the Jacobian) keeps this under a few seconds; the scan itself has
    # full-Jacobian gradchecks in test_scan.py
    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


@pytest.mark.parametrize("bias", [True, False])
def test_causal_depthwise_conv_equals_conv1d(bias):
    """The time-major K-tap conv (custom backward) is F.conv1d over channels-first inputs, values and grads."""
    from vermeil.nn.ssm import _causal_depthwise_conv

    hist = torch.randn(2, 3 + 6, 5, dtype=torch.float64, requires_grad=True)  # K - 1 = 3 history rows, L = 6
    weight = torch.randn(5, 1, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    ref = F.conv1d(hist.mT, weight, b, groups=5).mT
    assert_close(_causal_depthwise_conv(hist, weight, b), ref)
    inputs = (hist, weight, b) if bias else (hist, weight)
    assert torch.autograd.gradcheck(
        lambda h, w, *bb: _causal_depthwise_conv(h, w, bb[0] if bb else None), inputs
    )


def test_compile_scan_equals_eager():
    """compile_scan=True (torch.compile'd chunk kernels) gives the eager block's outputs, states and gradients."""
    torch.manual_seed(0)
    block = MambaBlock(D_MODEL, d_state=5, d_conv=4, expand=2)
    x = torch.randn(2, 19, D_MODEL, requires_grad=True)  # 2 chunks of 8 and a padded one
    params = [x, *block.parameters()]
    results = []
    for compile_scan in (False, True):
        block.compile_scan = compile_scan
        out, (conv, ssm) = block(x, return_final_state=True)
        grads = torch.autograd.grad(out.square().sum() + ssm.sum(), params)
        results.append((out, conv, ssm, grads))
    (out, conv, ssm, grads), (out_c, conv_c, ssm_c, grads_c) = results
    assert_close(out_c, out, rtol=1e-5, atol=1e-5)
    assert_close(conv_c, conv)
    assert_close(ssm_c, ssm, rtol=1e-5, atol=1e-5)
    for (name, _), g, g_c in zip([("x", x), *block.named_parameters()], grads, grads_c):
        scale = g.abs().max().clamp_min(1.0)
        assert_close(g_c / scale, g / scale, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("dt_init", ["random", "constant"])
def test_init_invariants(dt_init):
    block = MambaBlock(D_MODEL, d_state=7, dt_min=0.01, dt_max=0.2, dt_init=dt_init, dt_scale=0.5)
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.2 * (1 + 1e-5)
    assert dt.std() > 0  # log-uniform draws, not a constant
    assert_close(-torch.exp(block.A_log), -torch.arange(1.0, 8.0).expand(block.d_inner, 7))
    assert torch.equal(block.D, torch.ones(block.d_inner))
    bound = block.dt_rank**-0.5 * 0.5
    assert block.dt_proj.weight.abs().max() <= bound + 1e-7
    if dt_init == "constant":
        assert torch.all(block.dt_proj.weight == bound)
    assert block.dt_rank == math.ceil(D_MODEL / 16)
    assert block.A_log.dtype == torch.float32 and block.D.dtype == torch.float32


def test_init_floor_applies():
    block = MambaBlock(16, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-3)
    assert_close(F.softplus(block.dt_proj.bias), torch.full((32,), 1e-3), rtol=1e-4, atol=0)


def test_no_weight_decay_names():
    block = MambaBlock(16)
    names = block.no_weight_decay()
    assert names == {"A_log", "D"}
    params = dict(block.named_parameters())
    assert all(getattr(params[n], "_no_weight_decay", False) for n in names)
    assert block.dt_proj.bias._no_reinit


def test_meta_device_construction():
    block = MambaBlock(D_MODEL, device="meta")
    assert all(p.is_meta for p in block.parameters())
    block.to_empty(device="cpu")
    block.reset_parameters()
    assert_close(-torch.exp(block.A_log), -torch.arange(1.0, 17.0).expand(block.d_inner, 16))
    assert torch.isfinite(block(torch.randn(1, 3, D_MODEL))).all()


def test_low_precision_parameters_keep_ssm_parameters_float32():
    block = MambaBlock(16, dtype=torch.bfloat16)
    assert block.in_proj.weight.dtype == torch.bfloat16
    assert block.A_log.dtype == torch.float32 and block.D.dtype == torch.float32
    y = block(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 0}, "d_model=0"),
        ({"d_state": -1}, "d_state=-1"),
        ({"d_conv": 0}, "d_conv=0"),
        ({"expand": 0}, "expand=0"),
        ({"dt_rank": "big"}, "dt_rank='big'"),
        ({"dt_rank": 0}, "dt_rank=0"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min=0.2"),
        ({"dt_init": "xavier"}, "dt_init='xavier'"),
        ({"dt_init_floor": -1.0}, "dt_init_floor=-1.0"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, match):
    args = {"d_model": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        MambaBlock(**args)


def test_bad_forward_usage_raises():
    block = MambaBlock(16)
    with pytest.raises(ValueError, match="setup_cache"):
        block(torch.randn(1, 1, 16), input_pos=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"x\.shape="):
        block(torch.randn(1, 3, 15))
    block.setup_cache(batch_size=1)
    with pytest.raises(ValueError, match="batch size 2"):
        block(torch.randn(2, 1, 16), input_pos=torch.tensor([0]))


def test_state_of_the_wrong_shape_is_named_with_both_shapes():
    """A state of another shape (given, or a cache set up for another block) is refused naming the state, its
    shape and the expected one, not with an error about another tensor deep inside the conv or the step (the
    SSM state of `initial_state` by selective_scan's own check)."""
    block = make_block()
    e, x = block.d_inner, torch.randn(2, 3, D_MODEL)
    bad = (torch.zeros(2, e, 3), torch.zeros(2, e, 5))
    with pytest.raises(
        ValueError, match=rf"initial_state conv_state.shape=\(2, {e}, 3\) must be \(2, {e}, 4\)"
    ):
        block(x, initial_state=bad)
    with pytest.raises(ValueError, match=rf"initial_state.shape=\(1, {e}, 5\) must be \(2, {e}, 5\)"):
        block(x, initial_state=(torch.zeros(2, e, 4), torch.zeros(1, e, 5)))
    block.cache = SSMState(2, e, 4, 6)  # d_state 6: another block's cache
    for piece in (x, x[:, :1]):  # the prefill and the one-token paths
        with pytest.raises(
            ValueError, match=rf"the cache's ssm_state.shape=\(2, {e}, 6\) must be \(2, {e}, 5\)"
        ):
            block(piece, input_pos=torch.arange(piece.shape[1]))


def test_compiled_decode_step_matches_eager():
    block = make_block()
    x = torch.randn(2, T, D_MODEL)
    with torch.no_grad():
        full = block(x)
        block.setup_cache(batch_size=2)
        block(x[:, :3], input_pos=torch.arange(3))
        step = torch.compile(block, fullgraph=True, backend="eager")
        outs = [step(x[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(3, T)]
    assert_close(torch.cat(outs, dim=1), full[:, 3:], rtol=1e-5, atol=1e-5)


def test_scan_backend_is_validated_and_applied():
    with pytest.raises(
        ValueError, match=r"scan_backend='cuda' must be one of \('auto', 'triton', 'chunked', 'ref'\)"
    ):
        MambaBlock(16, scan_backend="cuda")
    block = make_block(scan_backend="ref")
    x = torch.randn(2, T, D_MODEL)
    out_ref = block(x)
    block.scan_backend = "chunked"
    assert_close(block(x), out_ref, rtol=1e-5, atol=1e-5)


def test_triton_scan_backend_equals_chunked(monkeypatch):
    """scan_backend="triton" (Triton's interpreter on the CPU) gives the chunked block's outputs, final states
    and gradients; the block hands the kernels (B, L, X)-major views, which they read in place."""
    pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[test]'")
    if not torch.cuda.is_available():
        from test_scan_triton import _vectorised_generic_scan  # the interpreter's scan, vectorised
        from triton.runtime import interpreter

        monkeypatch.setattr(interpreter.ScanOps, "generic_scan", _vectorised_generic_scan)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block = make_block().to(device)
    x = torch.randn(2, 19, D_MODEL, device=device, requires_grad=True)
    ssm0 = torch.randn(2, block.d_inner, block.d_state, device=device, requires_grad=True)
    conv0 = torch.randn(2, block.d_inner, block.d_conv, device=device)
    params = [x, ssm0, *block.parameters()]
    results = []
    for backend in ("chunked", "triton"):
        block.scan_backend = backend
        out, (conv, ssm) = block(x, initial_state=(conv0, ssm0), return_final_state=True)
        grads = torch.autograd.grad(out.square().sum() + ssm.sum(), params)
        results.append((out, conv, ssm, grads))
    (out, conv, ssm, grads), (out_t, conv_t, ssm_t, grads_t) = results
    assert_close(out_t, out, rtol=1e-5, atol=1e-5)
    assert_close(conv_t, conv)
    assert_close(ssm_t, ssm, rtol=1e-5, atol=1e-5)
    names = ["x", "ssm0", *(n for n, _ in block.named_parameters())]
    for name, g, g_t in zip(names, grads, grads_t):
        scale = g.abs().max().clamp_min(1.0)
        assert_close(g_t / scale, g / scale, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")


class _HostSyncs(TorchDispatchMode):
    """Records ops that copy a tensor's value to the host (.item(), bool(t), nonzero): each is a CUDA sync."""

    SYNCING = ("_local_scalar_dense", "is_nonzero", "nonzero", "equal")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.SYNCING):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_decode_step_has_no_host_syncs():
    """A cached one-token step reads no tensor value on the host, so a CUDA graph can capture it."""
    block = make_block()
    block.setup_cache(batch_size=2)
    with torch.no_grad():
        block(torch.randn(2, 3, D_MODEL), input_pos=torch.arange(3))
        with _HostSyncs() as mode:
            block(torch.randn(2, 1, D_MODEL), input_pos=torch.tensor([3]))
            block(torch.randn(2, 1, D_MODEL), input_pos=torch.tensor([0]))  # restart: decided on the device
    assert mode.seen == []


def test_block_compiles_without_graph_breaks():
    """torch.compile(block, fullgraph=True) traces the whole block, chunked scan included, forward and backward
    (AOTAutograd's eager backend: the same tracing as Inductor's, in seconds), and equals the eager block."""
    block = make_block()
    x = torch.randn(2, 11, D_MODEL, requires_grad=True)  # 11: sub-chunks of unequal count, the strided paths
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, block):
        out = fn(x)
        grads.append((out, *torch.autograd.grad(out.square().sum(), [x, *block.parameters()])))
    for got, want in zip(*grads):
        assert_close(got, want, rtol=1e-6, atol=1e-6)
