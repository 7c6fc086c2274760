"""Tests for vermeil.nn.scan_triton: the Triton selective scan against the reference loop.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported). The interpreter costs about half a millisecond per program instance and per tile operation, so
the shapes are small and the option grid is covered at one short length, the lengths at two option sets.
Small block sizes (block_d=4, chunk=4 or 8) make even short sequences cross channel blocks and chunks.

The interpreter runs a `tl.associative_scan` with a user combine one element at a time (a Python call per
element of the whole tile: minutes for these shapes); `vectorised_interpreter_scan` runs the same combine in
the same order along the scan axis, vectorised over the other axes (bitwise equal:
`test_vectorised_interpreter_scan_is_exact`), and every other test uses it. The same fixture stops the
interpreter from re-patching `triton.language` at each device-function call, a walk of its modules that cost
more than the kernels' own work (`test_patching_the_language_once_is_exact`). Together: 33 s instead of 75 s
for this file on 2 cores.

Tolerances: float32 outputs and gradients at rtol = atol = 1e-5, gradients divided by their largest
magnitude (dA and dB/dC sum over many terms, accumulated in another order than the loop); bfloat16/float16
inputs at the rounding of their output dtype.

Axis legend: B batch, D channels, L length, N state size.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[test]' (or '.[gpu]')")

from vermeil.nn import scan_triton  # noqa: E402
from vermeil.nn.scan import selective_scan, selective_scan_ref  # noqa: E402
from vermeil.nn.scan_triton import scan_bytes, selective_scan_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
OPTION_NAMES = ("use_d", "use_z", "use_bias", "softplus", "use_state")
ALL_ON = dict.fromkeys(OPTION_NAMES, True)
ALL_OFF = dict.fromkeys(OPTION_NAMES, False)


def _vectorised_generic_scan(self, inputs):
    """Triton interpreter's `ScanOps.generic_scan`, one combine call per position along the axis. The
    kernels' combine is plain arithmetic, so on float arrays it runs on the numpy arrays themselves (the
    interpreter's float ops are these numpy ops), without a tile-op dispatch per call."""
    data = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in inputs]
    outs = [np.empty_like(d) for d in data]
    plain = all(d.dtype in (np.float32, np.float64) for d in data)

    def combine(acc, cur):
        if plain:
            ret = self.combine_fn.fn(*acc, *cur)
            return ret if isinstance(ret, tuple) else (ret,)
        wrap = [
            self.to_tensor(np.ascontiguousarray(x), arg.dtype) for x, arg in zip((*acc, *cur), inputs * 2)
        ]
        ret = self.combine_fn.fn(*wrap)
        return tuple(r.handle.data for r in (ret if isinstance(ret, tuple) else (ret,)))

    acc = tuple(d[0] for d in data)
    for k in range(data[0].shape[0]):
        if k:
            acc = combine(acc, tuple(d[k] for d in data))
        for out, a in zip(outs, acc):
            out[k] = a
    return [
        self.to_tensor(np.ascontiguousarray(np.moveaxis(o, 0, self.axis)), a.dtype)
        for o, a in zip(outs, inputs)
    ]


def _patch_lang_once(patch_lang):
    """The interpreter's `_patch_lang`, which re-patches `triton.language` (an `inspect.getmembers` walk of its
    modules) at every device-function call, skipped while a kernel has it patched already."""
    import triton.language as tl
    from triton.runtime import interpreter

    def patch(fn):
        # the language modules `fn` sees (as `_patch_lang` finds them), each patched already or not
        langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if not any(tl.core.is_builtin(lang.full) for lang in langs):
            return interpreter._LangPatchScope()  # nothing to patch, nothing to restore
        return patch_lang(fn)

    return patch


@pytest.fixture(autouse=True)
def vectorised_interpreter_scan(monkeypatch):
    """Replace the interpreter's element-by-element scan, and its re-patching of the language at every
    device-function call (neither is used on CUDA, where kernels are compiled)."""
    if DEVICE == "cpu":
        from triton.runtime import interpreter

        monkeypatch.setattr(interpreter.ScanOps, "generic_scan", _vectorised_generic_scan)
        monkeypatch.setattr(interpreter, "_patch_lang", _patch_lang_once(interpreter._patch_lang))


def make_inputs(bsz=2, dim=5, n=4, length=7, dtype=torch.float32):
    """Random scan inputs in the state-spaces layout; A = -exp(A_log) as Mamba parameterises it."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    return {
        "u": randn(bsz, dim, length),
        "delta": F.softplus(randn(bsz, dim, length)),  # positive, as after Mamba's softplus
        "A": -torch.exp(randn(dim, n)).float(),  # A, D, delta_bias, the state: float32 as in Mamba
        "B": randn(bsz, n, length),
        "C": randn(bsz, n, length),
        "D": randn(dim).float(),
        "z": randn(bsz, dim, length),
        "delta_bias": torch.rand(dim, generator=g).to(DEVICE),
        "initial_state": randn(bsz, dim, n).float(),
    }


def run(fn, inputs, options, *, grad_y=True, grad_state=True, **extra):
    """y, the final state and every input gradient, for a random cotangent on y and the final state."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, final = fn(
        leaves["u"],
        leaves["delta"],
        leaves["A"],
        leaves["B"],
        leaves["C"],
        D=leaves["D"] if options["use_d"] else None,
        z=leaves["z"] if options["use_z"] else None,
        delta_bias=leaves["delta_bias"] if options["use_bias"] else None,
        delta_softplus=options["softplus"],
        initial_state=leaves["initial_state"] if options["use_state"] else None,
        return_final_state=True,
        **extra,
    )
    gen = torch.Generator().manual_seed(1)
    loss = y.new_zeros((), dtype=torch.float32)
    if grad_y:
        loss = loss + (y.float() * torch.randn(y.shape, generator=gen).to(DEVICE)).sum()
    if grad_state:
        loss = loss + (final * torch.randn(final.shape, generator=gen).to(DEVICE)).sum()
    loss.backward()
    grads = {k: leaves[k].grad for k in GRAD_NAMES if leaves[k].grad is not None}
    return y.detach(), final.detach(), grads


def assert_matches_ref(inputs, options, *, rtol=1e-5, atol=1e-5, grad_y=True, grad_state=True, **kernel):
    """The Triton scan (block sizes in `kernel`) equals selective_scan_ref in y, final state and gradients."""
    y_ref, s_ref, g_ref = run(selective_scan_ref, inputs, options, grad_y=grad_y, grad_state=grad_state)
    y, s, g = run(selective_scan_triton, inputs, options, grad_y=grad_y, grad_state=grad_state, **kernel)
    assert y.dtype == inputs["u"].dtype and s.dtype == torch.float32
    assert y.stride() == inputs["u"].stride()  # y takes u's layout
    assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)
    assert_close(s, s_ref, rtol=rtol, atol=atol)
    for name in g.keys() - g_ref.keys():  # inputs that cannot reach the loss: the reference has no grad
        assert not g[name].any(), name
    assert g_ref.keys() <= g.keys()
    for name in g_ref:
        assert g[name].dtype == g_ref[name].dtype, name
        scale = g_ref[name].float().abs().max().clamp_min(1.0)
        assert_close(
            g[name].float() / scale,
            g_ref[name].float() / scale,
            rtol=rtol,
            atol=atol,
            msg=lambda m, name=name: f"grad of {name}: {m}",
        )


@pytest.mark.parametrize(
    "options", [dict(zip(OPTION_NAMES, flags)) for flags in itertools.product((False, True), repeat=5)]
)
def test_every_option_combination(options):
    """All 32 combinations of D, z, delta_bias, softplus and initial_state, at L = 7 across 2 chunks (one
    channel block: the other tests cross blocks), with gradients through y and the returned final state."""
    assert_matches_ref(make_inputs(dim=5, n=4, length=7), options, block_d=8, chunk=4)


@pytest.mark.parametrize("options", [ALL_ON, ALL_OFF], ids=["all_on", "all_off"])
@pytest.mark.parametrize("n", [4, 16])
@pytest.mark.parametrize("length", [1, 7, 64, 130])
def test_lengths_and_state_sizes(length, n, options):
    """Odd D; default block sizes (chunk 32: L = 64 fills two chunks exactly, L = 130 pads the fifth)."""
    assert_matches_ref(make_inputs(dim=7, n=n, length=length), options)


def test_small_blocks_long_sequence():
    """Many chunks and channel blocks, with a state size that is not a power of two (padded to 8)."""
    assert_matches_ref(make_inputs(dim=9, n=5, length=130), ALL_ON, block_d=8, chunk=16)


@pytest.mark.parametrize(("grad_y", "grad_state"), [(True, False), (False, True)])
def test_gradient_through_one_output_only(grad_y, grad_state):
    """A backward that receives no gradient for y (or for the final state) treats it as zero."""
    assert_matches_ref(make_inputs(), ALL_ON, grad_y=grad_y, grad_state=grad_state, block_d=4, chunk=4)


def test_empty_sequence_passes_the_state_through():
    inputs = make_inputs(length=0)
    y, s = selective_scan_triton(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
        initial_state=inputs["initial_state"], return_final_state=True,
    )  # fmt: skip
    assert y.shape == (2, 5, 0)
    assert_close(s, inputs["initial_state"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """bf16/fp16 u, delta, B, C, z: float32 state and arithmetic, y and gradients in the input dtype.

    The reference sees the same rounded inputs, so what differs is the rounding of y and of the gradients
    to the input dtype (a few ulps: 2**-8 relative for bfloat16).
    """
    inputs = make_inputs(dim=7, n=4, length=37, dtype=dtype)
    assert_matches_ref(inputs, ALL_ON, rtol=2e-2, atol=2e-2, block_d=8, chunk=16)


def test_split_sequence_equals_whole():
    """Scan of [a; b] == scan of b started from the state after a, in outputs and in every gradient."""
    inputs = make_inputs(dim=5, n=4, length=23)
    opts = dict(delta_softplus=True, block_d=4, chunk=8)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    seq = ("u", "delta", "B", "C", "z")
    kw = {"D": leaves["D"], "delta_bias": leaves["delta_bias"]}

    def piece(lo, hi, state):
        part = {k: leaves[k][:, :, lo:hi] for k in seq}
        return selective_scan_triton(
            part["u"], part["delta"], leaves["A"], part["B"], part["C"], z=part["z"], **kw,
            initial_state=state, return_final_state=True, **opts,
        )  # fmt: skip

    y_whole, s_whole = piece(0, 23, leaves["initial_state"])
    grads_whole = torch.autograd.grad(y_whole.square().sum() + s_whole.sum(), list(leaves.values()))
    y_a, s_a = piece(0, 10, leaves["initial_state"])
    y_b, s_b = piece(10, 23, s_a)
    y_split = torch.cat([y_a, y_b], dim=2)
    grads_split = torch.autograd.grad(y_split.square().sum() + s_b.sum(), list(leaves.values()))
    assert_close(y_split, y_whole, rtol=1e-5, atol=1e-5)
    assert_close(s_b, s_whole, rtol=1e-5, atol=1e-5)
    for name, g_split, g_whole in zip(leaves, grads_split, grads_whole):
        scale = g_whole.abs().max().clamp_min(1.0)
        assert_close(
            g_split / scale, g_whole / scale, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_strided_inputs_read_in_place():
    """Transposes of (B, L, X)-contiguous tensors (as MambaBlock passes them) and a non-dense slice for z
    give the results of contiguous inputs; y and the gradients of time-major inputs come back time-major."""
    inputs = make_inputs(dim=6, n=4, length=19)
    strided = dict(inputs)
    for k in ("u", "delta", "B", "C"):
        strided[k] = inputs[k].transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.cat([inputs["z"].transpose(1, 2), torch.zeros_like(inputs["z"]).transpose(1, 2)], dim=-1)
    strided["z"] = wide[..., :6].transpose(1, 2)  # (B, D, L) view of every other block of columns
    assert strided["u"].stride(1) == 1 and not strided["z"].is_contiguous()
    y, s, g = run(selective_scan_triton, inputs, ALL_ON, block_d=4, chunk=8)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in strided.items()}
    y_s, s_s = selective_scan_triton(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
        delta_bias=leaves["delta_bias"], delta_softplus=True, initial_state=leaves["initial_state"],
        return_final_state=True, block_d=4, chunk=8,
    )  # fmt: skip
    assert y_s.stride(1) == 1  # time-major like u
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(y_s.shape, generator=gen).to(DEVICE)
    gs = torch.randn(s_s.shape, generator=gen).to(DEVICE)
    ((y_s * gy).sum() + (s_s * gs).sum()).backward()
    assert_close(y_s, y, rtol=1e-6, atol=1e-6)
    assert_close(s_s, s, rtol=1e-6, atol=1e-6)
    assert leaves["u"].grad.stride(1) == 1
    for name in g:
        assert_close(leaves[name].grad, g[name], rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_selective_scan_dispatches_to_triton():
    """backend='triton' on selective_scan runs these kernels and equals the chunked scan."""
    inputs = make_inputs(dim=5, n=4, length=9)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    kw = dict(D=inputs["D"], z=inputs["z"], delta_bias=inputs["delta_bias"], delta_softplus=True)
    y_t, s_t = selective_scan(
        *args, **kw, initial_state=inputs["initial_state"], return_final_state=True, backend="triton"
    )
    y_c, s_c = selective_scan(
        *args, **kw, initial_state=inputs["initial_state"], return_final_state=True, backend="chunked"
    )
    assert_close(y_t, y_c, rtol=1e-5, atol=1e-5)
    assert_close(s_t, s_c, rtol=1e-5, atol=1e-5)


def test_backend_errors_name_the_reason(monkeypatch):
    inputs = make_inputs()
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(ValueError, match="float64"):
        selective_scan(*[a.double() for a in args], backend="triton")
    with pytest.raises(ValueError, match="compile and chunk_size apply to backend='chunked' only"):
        selective_scan(*args, backend="triton", compile=True)
    with pytest.raises(ValueError, match="block_d=3 must be a power of two"):
        selective_scan_triton(*args, block_d=3)
    if DEVICE == "cpu":
        # kernels defined without the interpreter cannot take CPU tensors: the error says what to set
        monkeypatch.setattr(scan_triton, "INTERPRETED", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            selective_scan(*args, backend="triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            selective_scan_triton(*args)
    monkeypatch.setattr(scan_triton, "triton", None)
    with pytest.raises(RuntimeError, match="triton package is not installed"):
        selective_scan_triton(*args)


def test_scan_bytes_counts_every_stream():
    """Forward: 4 (b, d, l) streams and 2 (b, n, l) ones in bf16, plus float32 chunk states; backward more."""
    b, d, n, length = 4, 2048, 16, 2048
    fwd = scan_bytes(b, d, length, n, torch.bfloat16, backward=False)
    bwd = scan_bytes(b, d, length, n, torch.bfloat16, backward=True)
    streams = 4 * 2 * b * d * length + 2 * 2 * b * n * length
    chunk_states = 4 * b * d * n * (length // scan_triton.CHUNK)
    assert streams + chunk_states < fwd < streams + chunk_states + 4 * b * d * n * 3 + 4 * d * (n + 2)
    assert bwd > fwd
    assert scan_bytes(b, d, length, n, torch.float32, backward=False) > fwd


def test_vectorised_interpreter_scan_is_exact(monkeypatch):
    """The vectorised scan these tests use gives the interpreter's own element-by-element results, bitwise."""
    from triton.runtime import interpreter

    monkeypatch.undo()  # the interpreter's own scan (the autouse fixture patched it)
    inputs = make_inputs(bsz=1, dim=3, n=2, length=6)
    slow = run(selective_scan_triton, inputs, ALL_ON, block_d=4, chunk=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.ScanOps, "generic_scan", _vectorised_generic_scan)
        fast = run(selective_scan_triton, inputs, ALL_ON, block_d=4, chunk=4)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


def test_patching_the_language_once_is_exact(monkeypatch):
    """Skipping the interpreter's re-patching at device-function calls changes nothing, bitwise (both layouts,
    whose kernels call device functions)."""
    from triton.runtime import interpreter

    inputs = make_inputs(bsz=1, dim=3, n=2, length=6)
    fast = [
        run(selective_scan_triton, inputs, ALL_ON, block_d=4, chunk=4, layout=x) for x in ("tile", "channel")
    ]
    monkeypatch.undo()  # the interpreter's own `_patch_lang`
    monkeypatch.setattr(interpreter.ScanOps, "generic_scan", _vectorised_generic_scan)
    slow = [
        run(selective_scan_triton, inputs, ALL_ON, block_d=4, chunk=4, layout=x) for x in ("tile", "channel")
    ]
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


def test_large_decays_stay_exact():
    """delta * A down to about -100 per step (exp underflows to 0 within a chunk): no inf or NaN, equal to
    the loop, also in the backward's reverse scan."""
    inputs = make_inputs(dim=5, n=4, length=21)
    inputs["delta"] = inputs["delta"] + 4.0
    inputs["A"] = inputs["A"] * 8.0
    assert_matches_ref(inputs, ALL_ON, block_d=4, chunk=8)


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vermeil.nn import scan_triton as st

assert not st.INTERPRETED
ptrs = {"A_ptr", "D_ptr", "bias_ptr", "h0_ptr", "hlast_ptr", "hchunk_ptr", "dlast_ptr", "dA_ptr", "dB_ptr",
        "dC_ptr", "dD_ptr", "dbias_ptr", "dh0_ptr"}  # float32; the other pointers are bfloat16
for kernel, warps, flags in [
    (st._scan_fwd_kernel, st.NUM_WARPS, {"HAS_H0": True, "SAVE_CHUNKS": True}),
    (st._scan_bwd_kernel, st.BWD_NUM_WARPS, {"HAS_DLAST": True}),
]:
    constexprs = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, BLOCK_D=st.BLOCK_D, BLOCK_N=16,
                      CHUNK=st.CHUNK, **flags)
    signature = {name: ("*fp32" if name in ptrs else "*bf16") if name.endswith("_ptr") else "i32"
                 for name in kernel.arg_names if name not in constexprs}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})
    assert compiled.asm["cubin"], kernel
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter accepts code that the compiler may not: compile both kernels (defaults, every option
    on, bfloat16 inputs) to an sm_90 cubin with Triton's own toolchain, which needs no GPU (~15 s)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("layout", ["tile", "channel"])
def test_saves_only_inputs_and_chunk_states(layout):
    """What the forward keeps for the backward: the inputs and the (B, D, n_chunks, N) chunk-start states,
    nothing of size (B, D, L, N)."""
    inputs = make_inputs(dim=5, n=4, length=64)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan_triton(
            leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
            delta_bias=leaves["delta_bias"], initial_state=leaves["initial_state"], chunk=16, layout=layout,
        )  # fmt: skip
    assert (2, 5, 4, 4) in shapes  # 64 / 16 chunk-start states
    assert max(math.prod(s) for s in shapes) == 2 * 5 * 64  # the largest: u, delta, z


# The "channel" layout (mamba_ssm's organisation): the same contract, at small chunks so that several carry.
CHANNEL = {"layout": "channel"}


@pytest.mark.parametrize(
    "options", [dict(zip(OPTION_NAMES, flags)) for flags in itertools.product((False, True), repeat=5)]
)
def test_channel_every_option_combination(options):
    """All 32 option combinations at L = 7 across 2 chunks (one channel block: the other tests cross blocks)."""
    assert_matches_ref(make_inputs(dim=5, n=4, length=7), options, block_d=8, chunk=4, **CHANNEL)


@pytest.mark.parametrize("options", [ALL_ON, ALL_OFF], ids=["all_on", "all_off"])
@pytest.mark.parametrize("n", [4, 16])
@pytest.mark.parametrize("length", [1, 7, 64, 130])
def test_channel_lengths_and_state_sizes(length, n, options):
    """Odd D across channel blocks; chunk 32: L = 64 fills two chunks, L = 130 pads the fifth (batch 1:
    the interpreter's time grows with the number of programs)."""
    inputs = make_inputs(bsz=1, dim=7, n=n, length=length)
    assert_matches_ref(inputs, options, block_d=4, chunk=32, **CHANNEL)


def test_channel_default_blocks_and_padded_state():
    """The layout's default block sizes (one long chunk here), N = 5 padded to 8 (3 programs: the interpreter
    runs a 512-position scan one position at a time)."""
    assert_matches_ref(make_inputs(bsz=1, dim=3, n=5, length=130), ALL_ON, **CHANNEL)


@pytest.mark.parametrize("block_d", [1, 2])
def test_channel_per_block_partials_for_db_dc(block_d):
    """atomic_bc=False: dB/dC as per-channel-block partials summed by torch (one channel per program too)."""
    assert_matches_ref(
        make_inputs(dim=5, n=4, length=21), ALL_ON, block_d=block_d, chunk=8, atomic_bc=False, **CHANNEL
    )


@pytest.mark.parametrize(("grad_y", "grad_state"), [(True, False), (False, True)])
def test_channel_gradient_through_one_output_only(grad_y, grad_state):
    assert_matches_ref(
        make_inputs(), ALL_ON, grad_y=grad_y, grad_state=grad_state, block_d=4, chunk=4, **CHANNEL
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_low_precision_inputs(dtype):
    inputs = make_inputs(dim=7, n=4, length=37, dtype=dtype)
    assert_matches_ref(inputs, ALL_ON, rtol=2e-2, atol=2e-2, block_d=4, chunk=16, **CHANNEL)


def test_channel_large_decays_stay_exact():
    inputs = make_inputs(dim=5, n=4, length=21)
    inputs["delta"] = inputs["delta"] + 4.0
    inputs["A"] = inputs["A"] * 8.0
    assert_matches_ref(inputs, ALL_ON, block_d=4, chunk=8, **CHANNEL)


def test_channel_split_sequence_equals_whole():
    """Scan of [a; b] == scan of b started from the state after a, in outputs and every gradient."""
    inputs = make_inputs(dim=5, n=4, length=23)
    opts = dict(delta_softplus=True, block_d=4, chunk=8, **CHANNEL)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    kw = {"D": leaves["D"], "delta_bias": leaves["delta_bias"]}

    def piece(lo, hi, state):
        part = {k: leaves[k][:, :, lo:hi] for k in ("u", "delta", "B", "C", "z")}
        return selective_scan_triton(
            part["u"], part["delta"], leaves["A"], part["B"], part["C"], z=part["z"], **kw,
            initial_state=state, return_final_state=True, **opts,
        )  # fmt: skip

    y_whole, s_whole = piece(0, 23, leaves["initial_state"])
    grads_whole = torch.autograd.grad(y_whole.square().sum() + s_whole.sum(), list(leaves.values()))
    y_a, s_a = piece(0, 10, leaves["initial_state"])
    y_b, s_b = piece(10, 23, s_a)
    grads_split = torch.autograd.grad(
        torch.cat([y_a, y_b], dim=2).square().sum() + s_b.sum(), list(leaves.values())
    )
    assert_close(torch.cat([y_a, y_b], dim=2), y_whole, rtol=1e-5, atol=1e-5)
    assert_close(s_b, s_whole, rtol=1e-5, atol=1e-5)
    for name, g_split, g_whole in zip(leaves, grads_split, grads_whole):
        scale = g_whole.abs().max().clamp_min(1.0)
        assert_close(
            g_split / scale, g_whole / scale, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_channel_strided_inputs_equal_the_tile_layout():
    """Time-major views and a non-dense z read in place; the two layouts agree (to float32 rounding)."""
    inputs = make_inputs(dim=6, n=4, length=19)
    for k in ("u", "delta", "B", "C"):
        inputs[k] = inputs[k].transpose(1, 2).contiguous().transpose(1, 2)
    y, s, g = run(selective_scan_triton, inputs, ALL_ON, block_d=4, chunk=8)
    y_c, s_c, g_c = run(selective_scan_triton, inputs, ALL_ON, block_d=2, chunk=8, **CHANNEL)
    assert y_c.stride(1) == 1
    assert_close(y_c, y, rtol=1e-5, atol=1e-5)
    assert_close(s_c, s, rtol=1e-5, atol=1e-5)
    for name in g:
        assert g_c[name].stride() == g[name].stride(), name
        assert_close(g_c[name], g[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_layout_is_checked():
    inputs = make_inputs()
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(ValueError, match="layout='rows'"):
        selective_scan_triton(*args, layout="rows")
    with pytest.raises(ValueError, match="unroll_n=True applies to layout='channel' only"):
        selective_scan_triton(*args, layout="tile", unroll_n=True)


@pytest.mark.parametrize("options", [ALL_ON, ALL_OFF], ids=["all_on", "all_off"])
def test_channel_unrolled_state_loop(options):
    """unroll_n=True (a static loop over the padded N: N = 5 runs 8 iterations, 3 of them masked)."""
    assert_matches_ref(
        make_inputs(dim=5, n=5, length=21), options, block_d=4, chunk=8, unroll_n=True, **CHANNEL
    )


_COMPILE_CHANNEL_FOR_SM90 = _COMPILE_FOR_SM90.replace(
    """    (st._scan_fwd_kernel, st.NUM_WARPS, {"HAS_H0": True, "SAVE_CHUNKS": True}),
    (st._scan_bwd_kernel, st.BWD_NUM_WARPS, {"HAS_DLAST": True}),""",
    """    (st._chan_fwd_kernel, st.CHANNEL_NUM_WARPS, {"HAS_H0": True, "SAVE_CHUNKS": True, "UNROLL_N": False}),
    (st._chan_bwd_kernel, st.CHANNEL_NUM_WARPS, {"HAS_DLAST": True, "ATOMIC_BC": True, "UNROLL_N": False}),""",
).replace(
    "BLOCK_D=st.BLOCK_D, BLOCK_N=16,\n                      CHUNK=st.CHUNK",
    "BLOCK_D=st.CHANNEL_BLOCK_D,\n                      BLOCK_N=16, CHUNK=st.CHANNEL_CHUNK",
)


@pytest.mark.slow
def test_channel_kernels_compile_for_hopper_without_a_gpu():
    """As test_kernels_compile_for_hopper_without_a_gpu, for the "channel" kernels at their defaults."""
    import os
    import subprocess
    import sys

    assert "_chan_bwd_kernel" in _COMPILE_CHANNEL_FOR_SM90 and "CHANNEL_CHUNK" in _COMPILE_CHANNEL_FOR_SM90
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = _COMPILE_CHANNEL_FOR_SM90
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_tile_per_block_partials_for_db_dc():
    """atomic_bc=False on the default layout: dB/dC as per-channel-block partials (3 blocks), summed by torch."""
    assert_matches_ref(make_inputs(dim=9, n=5, length=21), ALL_ON, block_d=4, chunk=8, atomic_bc=False)
