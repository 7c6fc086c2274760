"""Tests for vermeil.nn.scan: the fast chunked scan against the reference loop, the step, and the anchors.

Axis legend: B batch, D channels, L length, N state size.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from vermeil.nn.scan import selective_scan, selective_scan_ref, selective_step


def make_inputs(bsz=2, dim=5, n=3, length=7, dtype=torch.float32, delta_shift=0.0):
    """Random scan inputs in the state-spaces layout; A = -exp(A_log) as Mamba parameterises it."""
    return {
        "u": torch.randn(bsz, dim, length, dtype=dtype),
        # positive step sizes, as after Mamba's softplus (negative ones make the recurrence explode)
        "delta": F.softplus(torch.randn(bsz, dim, length, dtype=dtype) + delta_shift),
        "A": -torch.exp(torch.randn(dim, n, dtype=dtype)),
        "B": torch.randn(bsz, n, length, dtype=dtype),
        "C": torch.randn(bsz, n, length, dtype=dtype),
        "D": torch.randn(dim, dtype=dtype),
        "z": torch.randn(bsz, dim, length, dtype=dtype),
        "delta_bias": torch.rand(dim, dtype=dtype),  # >= 0 keeps delta + bias >= 0 without softplus too
        "initial_state": torch.randn(bsz, dim, n, dtype=dtype),
    }


def mamba_ssm_selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Transcription of mamba_ssm.ops.selective_scan_interface.selective_scan_ref (real A, B/C (B, N, L)).

    Kept close to the original: deltaA and deltaB_u are formed for the whole sequence by einsum first.
    """
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    B = B.float()
    C = C.float()
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    last_state = None
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        if i == u.shape[2] - 1:
            last_state = x
        ys.append(y)
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    return out.to(dtype=dtype_in), last_state


def scan_kwargs(inputs, *, use_d, use_z, use_bias, softplus, use_state):
    return {
        "D": inputs["D"] if use_d else None,
        "z": inputs["z"] if use_z else None,
        "delta_bias": inputs["delta_bias"] if use_bias else None,
        "delta_softplus": softplus,
        "initial_state": inputs["initial_state"] if use_state else None,
    }


GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def outputs_and_grads(fn, inputs, options, **extra):
    """Run fn with fresh leaf copies, backprop a random cotangent through y and the final state."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    kwargs = scan_kwargs(leaves, **options)
    y, final = fn(
        leaves["u"],
        leaves["delta"],
        leaves["A"],
        leaves["B"],
        leaves["C"],
        **kwargs,
        return_final_state=True,
        **extra,
    )
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    gs = torch.randn(final.shape, generator=gen, dtype=final.dtype)
    ((y * gy).sum() + (final * gs).sum()).backward()
    grads = {k: leaves[k].grad for k in GRAD_NAMES if leaves[k].grad is not None}
    return y.detach(), final.detach(), grads


OPTION_SETS = [
    {"use_d": False, "use_z": False, "use_bias": False, "softplus": False, "use_state": False},
    {"use_d": True, "use_z": True, "use_bias": True, "softplus": True, "use_state": True},
    {"use_d": True, "use_z": False, "use_bias": False, "softplus": True, "use_state": False},
    {"use_d": False, "use_z": True, "use_bias": True, "softplus": False, "use_state": True},
]


def test_ref_matches_mamba_ssm_transcription():
    inputs = make_inputs(length=9, dtype=torch.float32)
    kw = {k: inputs[k] for k in ("D", "z", "delta_bias")}
    ours, ours_last = selective_scan_ref(
        inputs["u"],
        inputs["delta"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        **kw,
        delta_softplus=True,
        return_final_state=True,
    )
    theirs, theirs_last = mamba_ssm_selective_scan_ref(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], **kw, delta_softplus=True
    )
    assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert_close(ours_last, theirs_last, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize(
    ("length", "chunk_size", "compile"),
    [
        *[(n, c, False) for n, c in [(1, None), (7, 4), (16, 16), (17, 16), (37, 5), (1000, 64)]],
        # the compiled path (torch.compile'd chunks of 8, or of chunk_size): few shapes, since each compiles
        *[(n, c, True) for n, c in [(1, None), (8, None), (37, None), (37, 5)]],
    ],
)
def test_scan_matches_ref_float32(length, chunk_size, compile, options):
    dim, n = (6, 4) if length == 1000 else (5, 3)
    inputs = make_inputs(dim=dim, n=n, length=length)
    y_ref, s_ref, g_ref = outputs_and_grads(selective_scan_ref, inputs, options)
    y, s, g = outputs_and_grads(selective_scan, inputs, options, chunk_size=chunk_size, compile=compile)
    assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        # dA sums over every (batch, position): compare relative to its scale
        scale = g_ref[name].abs().max().clamp_min(1.0)
        assert_close(
            g[name] / scale,
            g_ref[name] / scale,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, name=name: f"grad of {name}: {m}",
        )


@pytest.mark.parametrize(("length", "chunk_size"), [(7, 4), (37, 5), (64, None)])
def test_time_major_inputs_equal_channel_major(length, chunk_size):
    """Models hand the scan transposed views of (B, L, X) tensors; it reads them without a copy."""
    inputs = make_inputs(dim=6, n=3, length=length)
    time_major = {
        k: v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "B", "C", "z") else v
        for k, v in inputs.items()
    }
    assert not time_major["u"].is_contiguous()
    options = OPTION_SETS[1]
    y, s, g = outputs_and_grads(selective_scan, inputs, options, chunk_size=chunk_size)
    y_t, s_t, g_t = outputs_and_grads(selective_scan, time_major, options, chunk_size=chunk_size)
    assert y_t.transpose(1, 2).is_contiguous()  # the output keeps u's layout
    assert_close(y_t, y, rtol=1e-6, atol=1e-6)
    assert_close(s_t, s, rtol=1e-6, atol=1e-6)
    for name in g:
        assert_close(
            g_t[name], g[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}"
        )


@pytest.mark.parametrize(
    ("chunk_size", "compile", "length"),
    [(4, False, 7), (5, False, 7), (7, False, 7), (None, False, 7), (None, True, 11)],  # compiled: 8 + 3
)
def test_gradcheck_float64(chunk_size, compile, length):
    inputs = make_inputs(bsz=2, dim=3, n=2, length=length, dtype=torch.float64)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    leaves = [inputs[k].requires_grad_() for k in names]

    def fn(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return selective_scan(
            u,
            delta,
            A,
            B,
            C,
            D=D,
            z=z,
            delta_bias=delta_bias,
            delta_softplus=True,
            initial_state=initial_state,
            return_final_state=True,
            chunk_size=chunk_size,
            compile=compile,
        )

    assert torch.autograd.gradcheck(fn, leaves)


def test_compiled_scan_large_decays_and_layouts():
    """exp(delta * A) far below float32's range of exp(-x) stays exact; time-major inputs give the same."""
    inputs = make_inputs(dim=6, n=4, length=37, delta_shift=4.0)
    inputs["A"] = inputs["A"] * 16
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    y = selective_scan(*args, delta_softplus=True, compile=True)
    assert torch.isfinite(y).all()
    assert_close(y, selective_scan_ref(*args, delta_softplus=True), rtol=1e-5, atol=1e-5)
    time_major = [t.transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 3 else t for t in args]
    assert_close(selective_scan(*time_major, delta_softplus=True, compile=True), y, rtol=1e-6, atol=1e-6)


def test_step_loop_matches_scan():
    inputs = make_inputs(length=11)
    y_scan, final_scan = selective_scan(
        inputs["u"],
        inputs["delta"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        D=inputs["D"],
        z=inputs["z"],
        delta_bias=inputs["delta_bias"],
        delta_softplus=True,
        initial_state=inputs["initial_state"],
        return_final_state=True,
        chunk_size=4,
    )
    state = inputs["initial_state"]
    ys = []
    for t in range(11):
        y_t, state = selective_step(
            state,
            inputs["u"][:, :, t],
            inputs["delta"][:, :, t],
            inputs["A"],
            inputs["B"][:, :, t],
            inputs["C"][:, :, t],
            D=inputs["D"],
            z_t=inputs["z"][:, :, t],
            delta_bias=inputs["delta_bias"],
            delta_softplus=True,
        )
        ys.append(y_t)
    assert_close(torch.stack(ys, dim=2), y_scan, rtol=1e-5, atol=1e-5)
    assert_close(state, final_scan, rtol=1e-5, atol=1e-5)


def test_split_with_state_handoff_equals_whole():
    """Truncated BPTT: scanning [0, 6) then [6, 13) from the handed-over state equals one scan of [0, 13)."""
    inputs = make_inputs(length=13)
    options = {"use_d": True, "use_z": True, "use_bias": True, "softplus": True, "use_state": True}
    y_whole, s_whole, g_whole = outputs_and_grads(selective_scan, inputs, options, chunk_size=4)

    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    kw = scan_kwargs(leaves, **options)
    cut = 6
    parts, state = [], kw.pop("initial_state")
    for sl in (slice(0, cut), slice(cut, None)):
        y, state = selective_scan(
            leaves["u"][:, :, sl],
            leaves["delta"][:, :, sl],
            leaves["A"],
            leaves["B"][:, :, sl],
            leaves["C"][:, :, sl],
            D=kw["D"],
            z=kw["z"][:, :, sl],
            delta_bias=kw["delta_bias"],
            delta_softplus=True,
            initial_state=state,
            return_final_state=True,
            chunk_size=4,
        )
        parts.append(y)
    y_split = torch.cat(parts, dim=2)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(y_split.shape, generator=gen)
    gs = torch.randn(state.shape, generator=gen)
    ((y_split * gy).sum() + (state * gs).sum()).backward()
    assert_close(y_split.detach(), y_whole, rtol=1e-5, atol=1e-5)
    assert_close(state.detach(), s_whole, rtol=1e-5, atol=1e-5)
    for name in GRAD_NAMES:
        assert_close(
            leaves[name].grad,
            g_whole[name],
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, name=name: f"grad of {name}: {m}",
        )


def test_large_decays_stay_exact():
    """delta*A down to about -800 per step: a log-space cumsum would overflow; the scan must not."""
    inputs = make_inputs(dim=4, n=3, length=40, delta_shift=4.0)
    inputs["A"] = inputs["A"] * 16
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    y_ref = selective_scan_ref(*args, delta_softplus=True)
    y = selective_scan(*args, delta_softplus=True, chunk_size=16)
    assert torch.isfinite(y).all()
    assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_low_precision_inputs_return_input_dtype():
    inputs = make_inputs(length=9)
    args = [inputs[k].bfloat16() for k in ("u", "delta", "A", "B", "C")]
    y, final = selective_scan(*args, delta_softplus=True, return_final_state=True)
    y_ref = selective_scan_ref(*args, delta_softplus=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["chunked", "ref"])
def test_autocast_keeps_the_scan_in_float32(backend):
    """Inside a bf16 autocast region the scan's state read-outs stay float32 products (documented: state and
    accumulation are float32): outputs and gradients equal those outside autocast, and so does the step."""
    inputs = make_inputs(length=19)
    names = ("u", "delta", "A", "B", "C", "D", "z", "initial_state")

    def run(amp):
        leaves = {k: inputs[k].clone().requires_grad_(True) for k in names}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y, final = selective_scan(**leaves, delta_softplus=True, return_final_state=True, backend=backend)
            y_step, state = selective_step(
                leaves["initial_state"].detach(), *(leaves[k].detach()[..., 0] for k in ("u", "delta")),
                leaves["A"].detach(), *(leaves[k].detach()[..., 0] for k in ("B", "C")), delta_softplus=True,
            )  # fmt: skip
        (y.square().sum() + final.sum()).backward()
        return [y, final, y_step, state] + [leaves[k].grad for k in names]

    for got, want in zip(run(True), run(False)):
        assert got.dtype == want.dtype
        assert_close(got, want, rtol=1e-6, atol=1e-6)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any ATen op."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_never_materialises_the_full_state_sequence():
    bsz, dim, n, length = 1, 4, 8, 512
    inputs = make_inputs(bsz=bsz, dim=dim, n=n, length=length)
    leaves = [inputs[k].requires_grad_() for k in ("u", "delta", "A", "B", "C")]
    with _MaxNumel() as probe:
        selective_scan(*leaves, delta_softplus=True, chunk_size=32).sum().backward()
    # inputs are (B, D, L) = volume / N; chunk tensors (32, B, N, D) = volume / 16; nothing near (B, D, L, N)
    assert probe.max_numel <= bsz * dim * length * n // 4


def test_matches_mambapy_pscan():
    mamba = pytest.importorskip("mambapy.mamba")
    inputs = make_inputs(dim=6, n=4, length=13)
    delta = F.softplus(inputs["delta"])
    args = (inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"])
    ours = selective_scan(*args, D=inputs["D"], chunk_size=4)
    # mambapy layout is (B, L, D); its selective_scan method uses no attribute of self
    theirs = mamba.MambaBlock.selective_scan(
        None,
        inputs["u"].transpose(1, 2),
        delta.transpose(1, 2),
        inputs["A"],
        inputs["B"].transpose(1, 2),
        inputs["C"].transpose(1, 2),
        inputs["D"],
    ).transpose(1, 2)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("delta", (2, 5, 6)),
        ("A", (4, 3)),
        ("B", (2, 3, 6)),
        ("C", (2, 4, 7)),
        ("D", (4,)),
        ("z", (2, 5, 8)),
        ("delta_bias", (3,)),
        ("initial_state", (2, 5, 4)),
    ],
)
def test_bad_shapes_raise_naming_the_argument(name, bad):
    inputs = make_inputs(length=7)
    inputs[name] = torch.randn(bad)
    kwargs = {k: inputs[k] for k in ("D", "z", "delta_bias", "initial_state")}
    for fn in (selective_scan, selective_scan_ref):
        with pytest.raises(ValueError, match=rf"{name}\.shape="):
            fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], **kwargs)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("u_t", (2, 5, 1)),
        ("delta_t", (1, 5)),
        ("A", (1, 3)),
        ("B_t", (1, 3)),
        ("C_t", (2, 1)),  # broadcasting used to sum the state over N against this one column
        ("D", (1,)),
        ("z_t", (2, 1)),
        ("delta_bias", (1,)),
    ],
)
def test_step_bad_shapes_raise_naming_the_argument(name, bad):
    """selective_step checks its shapes as selective_scan does, instead of broadcasting size-1 axes."""
    inputs = make_inputs(length=1)  # (B, D, N) = (2, 5, 3)
    step = {k: inputs[k][..., 0] for k in ("u", "delta", "B", "C", "z")}
    args = {"u_t": step["u"], "delta_t": step["delta"], "A": inputs["A"], "B_t": step["B"], "C_t": step["C"]}
    args |= {"D": inputs["D"], "z_t": step["z"], "delta_bias": inputs["delta_bias"]}
    state = inputs["initial_state"]
    selective_step(state, **args)  # the right shapes pass
    with pytest.raises(ValueError, match=r"state\.shape=\(2, 5\) must be \(B, D, N\)"):
        selective_step(state[..., 0], **args)
    args[name] = torch.randn(bad)
    with pytest.raises(ValueError, match=re.escape(f"{name}.shape={bad} must be")):
        selective_step(state, **args)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_u_raises_naming_the_argument_and_dtype(dtype):
    # An integer u used to come back as a truncated int64 result (the scan returns u's dtype).
    inputs = make_inputs(length=7)
    u = (inputs["u"] * 3).to(dtype)
    for fn in (selective_scan, selective_scan_ref):
        with pytest.raises(
            TypeError, match=rf"u has dtype {dtype}: the selective scan's inputs must be floating"
        ):
            fn(u, inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    state = torch.zeros(2, 5, 3)
    with pytest.raises(TypeError, match=rf"u_t has dtype {dtype}"):
        selective_step(
            state, u[..., 0], inputs["delta"][..., 0], inputs["A"], inputs["B"][..., 0], inputs["C"][..., 0]
        )


def test_bad_chunk_size_raises():
    inputs = make_inputs()
    with pytest.raises(ValueError, match="chunk_size=0"):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], chunk_size=0)


def test_backend_keyword():
    """ "ref" is the loop itself, "chunked" (and "auto" on CPU tensors) the chunked scan; others are rejected."""
    inputs = make_inputs(length=9)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    kw = {k: inputs[k] for k in ("D", "z", "delta_bias")}
    ref = selective_scan_ref(*args, **kw, delta_softplus=True)
    assert torch.equal(selective_scan(*args, **kw, delta_softplus=True, backend="ref"), ref)
    chunked = selective_scan(*args, **kw, delta_softplus=True, backend="chunked")
    assert torch.equal(selective_scan(*args, **kw, delta_softplus=True), chunked)  # auto on the CPU
    assert_close(chunked, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"backend='cuda' must be one of \('auto', 'triton', 'chunked', 'ref'\)"
    ):
        selective_scan(*args, backend="cuda")
    with pytest.raises(ValueError, match="compile and chunk_size apply to backend='chunked' only"):
        selective_scan(*args, backend="ref", chunk_size=4)


def test_triton_backend_without_triton_says_how_to_install(monkeypatch):
    """Where triton is missing, backend='triton' names the package and the extra that installs it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a)
    )
    inputs = make_inputs()
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(
        RuntimeError, match=r"triton package is not installed \(pip install 'vermeil\[gpu\]'\)"
    ):
        selective_scan(*args, backend="triton")
    assert_close(selective_scan(*args), selective_scan_ref(*args), rtol=1e-5, atol=1e-5)  # auto still runs
