"""Tests for vermeil.nn.ssd: the chunked SSD scan equals the reference recurrence (values and gradients),
the split-sequence property, the decode step, transformers' torch path, and bad-input errors.

Axis legend: B batch, L length, H heads, P head dim, G groups, N state size.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vermeil.nn.ssd import ssd_scan, ssd_scan_ref, ssd_step


def make_inputs(bsz=2, length=13, heads=6, p=3, groups=2, n=4, dtype=torch.float32, seed=0, d_hdim=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    return {
        "x": r(bsz, length, heads, p),
        "dt": r(bsz, length, heads, scale=0.5),
        "A": -torch.rand(heads, generator=g).to(dtype) * 4 - 0.1,
        "B": r(bsz, length, groups, n),
        "C": r(bsz, length, groups, n),
        "D": r(heads, p) if d_hdim else r(heads),
        "dt_bias": r(heads, scale=0.5),
        "initial_state": r(bsz, heads, p, n),
    }


def split(inputs: dict) -> tuple[tuple, dict]:
    pos = tuple(inputs[k] for k in ("x", "dt", "A", "B", "C"))
    kw = {k: v for k, v in inputs.items() if k not in ("x", "dt", "A", "B", "C")}
    return pos, kw


def rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, name: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected| (float32 accumulation-order error, relative to scale)."""
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol} * scale {scale:.3e}"


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64])
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_reference_values_and_gradients(chunk_size, groups, with_state):
    inputs = make_inputs(groups=groups)
    if not with_state:
        inputs.pop("initial_state")
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    z = torch.randn(2, 13, 6, 3)
    pos, kw = split(leaves)
    y, s = ssd_scan(*pos, **kw, z=z, dt_softplus=True, chunk_size=chunk_size, return_final_state=True)
    pos_r, kw_r = split(ref_leaves)
    y_r, s_r = ssd_scan_ref(*pos_r, **kw_r, z=z, dt_softplus=True, return_final_state=True)
    rel_close(y, y_r, name="y")
    rel_close(s, s_r, name="final state")
    # gradients through both the outputs and the final state
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward((y, s), (gy, gs))
    torch.autograd.backward((y_r, s_r), (gy, gs))
    for k in leaves:
        rel_close(leaves[k].grad, ref_leaves[k].grad, name=f"grad {k}")


def test_dt_limit_and_per_channel_d():
    inputs = make_inputs(d_hdim=True)
    pos, kw = split(inputs)
    y, s = ssd_scan(*pos, **kw, dt_softplus=True, dt_limit=(0.2, 0.6), chunk_size=4, return_final_state=True)
    y_r, s_r = ssd_scan_ref(*pos, **kw, dt_softplus=True, dt_limit=(0.2, 0.6), return_final_state=True)
    rel_close(y, y_r)
    rel_close(s, s_r)
    # the limit changes the result (it is applied at all)
    assert not torch.allclose(y, ssd_scan(*pos, **kw, dt_softplus=True, chunk_size=4), atol=1e-3)


def test_gradcheck_float64_tiny():
    inputs = make_inputs(bsz=1, length=5, heads=4, p=2, groups=2, n=3, dtype=torch.float64)
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    names = list(leaves)

    def f(*tensors):
        kw = dict(zip(names, tensors))
        x, dt, A, B, C = (kw.pop(k) for k in ("x", "dt", "A", "B", "C"))
        return ssd_scan(x, dt, A, B, C, **kw, dt_softplus=True, chunk_size=2, return_final_state=True)

    assert torch.autograd.gradcheck(f, tuple(leaves.values()))


def test_float64_stays_float64_and_bf16_state_is_float32():
    inputs = make_inputs(dtype=torch.float64)
    pos, kw = split(inputs)
    y, s = ssd_scan(*pos, **kw, return_final_state=True)
    assert y.dtype == s.dtype == torch.float64
    y_r, s_r = ssd_scan_ref(*pos, **kw, return_final_state=True)
    assert_close(y, y_r, rtol=1e-10, atol=1e-10)
    inputs = make_inputs()
    inputs.pop("initial_state")
    pos, kw = split(inputs)
    pos = (pos[0].bfloat16(), *pos[1:])
    y, s = ssd_scan(*pos, **kw, chunk_size=4, return_final_state=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32


@pytest.mark.parametrize("cut", [1, 6, 8])
def test_split_sequence_property_with_gradients(cut):
    """scan of [a; b] == scan of b from the state after a, in values and in gradients through the state."""
    inputs = make_inputs(length=14)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    pos, kw = split(leaves)
    y, s = ssd_scan(*pos, **kw, dt_softplus=True, chunk_size=4, return_final_state=True)

    leaves2 = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    x, dt, A, B, C = (leaves2[k] for k in ("x", "dt", "A", "B", "C"))
    common = {"D": leaves2["D"], "dt_bias": leaves2["dt_bias"], "dt_softplus": True, "chunk_size": 4}
    y1, s1 = ssd_scan(
        x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut],
        initial_state=leaves2["initial_state"], return_final_state=True, **common,
    )  # fmt: skip
    y2, s2 = ssd_scan(
        x[:, cut:],
        dt[:, cut:],
        A,
        B[:, cut:],
        C[:, cut:],
        initial_state=s1,
        return_final_state=True,
        **common,
    )
    rel_close(torch.cat([y1, y2], 1), y, name="y")
    rel_close(s2, s, name="state")
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward((y, s), (gy, gs))
    torch.autograd.backward((torch.cat([y1, y2], 1), s2), (gy, gs))
    for k in leaves:
        rel_close(leaves2[k].grad, leaves[k].grad, name=f"grad {k}")


@pytest.mark.parametrize("groups", [1, 3])
def test_step_after_prefill_equals_full_scan_at_every_position(groups):
    inputs = make_inputs(length=11, groups=groups)
    pos, kw = split(inputs)
    x, dt, A, B, C = pos
    z = torch.randn_like(x)
    y_full = ssd_scan(*pos, **kw, z=z, dt_softplus=True, chunk_size=4)
    prefill = 4
    common = {"D": kw["D"], "dt_bias": kw["dt_bias"], "dt_softplus": True}
    y0, state = ssd_scan(
        x[:, :prefill], dt[:, :prefill], A, B[:, :prefill], C[:, :prefill],
        z=z[:, :prefill], initial_state=kw["initial_state"], return_final_state=True, chunk_size=4, **common,
    )  # fmt: skip
    ys = [y0]
    for t in range(prefill, x.shape[1]):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], z=z[:, t], **common)
        ys.append(y_t[:, None])
    rel_close(torch.cat(ys, 1), y_full)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_step_in_place_equals_functional_step(state_dtype):
    """inplace=True writes the new state into the given tensor (a cache) and returns it; same values as the
    functional step, also when the state's dtype differs from the compute dtype (float32 inputs)."""
    inputs = make_inputs(length=1, groups=3)
    pos, kw = split(inputs)
    x, dt, A, B, C = (t[:, 0] if t.dim() > 1 else t for t in pos)
    state = kw.pop("initial_state").to(state_dtype)
    z = torch.randn_like(x)
    y_ref, s_ref = ssd_step(state, x, dt, A, B, C, **kw, z=z, dt_softplus=True)
    cache = state.clone()
    y, s = ssd_step(cache, x, dt, A, B, C, **kw, z=z, dt_softplus=True, inplace=True)
    assert s is cache and s.dtype == state_dtype
    assert_close(y, y_ref)
    assert_close(cache, s_ref)
    with pytest.raises(ValueError, match=r"inplace=True\) needs a contiguous state"):
        ssd_step(state.transpose(-1, -2).contiguous().transpose(-1, -2), x, dt, A, B, C, inplace=True)


def test_step_keep_mask_restarts_rows_from_zero():
    """The private `keep` of the decoding hot path: rows with keep False start from a zero state."""
    from vermeil.nn.ssd import _ssd_step

    inputs = make_inputs(length=1, groups=2)
    pos, kw = split(inputs)
    x, dt, A, B, C = (t[:, 0] if t.dim() > 1 else t for t in pos)
    state = kw.pop("initial_state")
    keep = torch.tensor([[True], [False]])
    fresh = torch.where(keep[..., None, None], state, 0.0)
    y_ref, s_ref = ssd_step(fresh, x, dt, A, B, C, **kw, dt_softplus=True)
    for inplace in (False, True):
        s0 = state.clone()
        y, s = _ssd_step(s0, x, dt, A, B, C, kw["D"], None, kw["dt_bias"], True, inplace=inplace, keep=keep)
        assert_close(y, y_ref)
        assert_close(s, s_ref)


def test_step_does_not_clamp_dt():
    """As mamba_ssm and transformers: the limit is a scan-only clamp."""
    inputs = make_inputs(length=1)
    inputs.pop("initial_state")
    pos, kw = split(inputs)
    x, dt, A, B, C = pos
    state = torch.zeros(2, 6, 3, 4)
    y_step, _ = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], **kw, dt_softplus=True)
    y_free = ssd_scan_ref(*pos, **kw, dt_softplus=True)
    y_clamped = ssd_scan_ref(*pos, **kw, dt_softplus=True, dt_limit=(0.0, 0.05))
    assert_close(y_step, y_free[:, 0])
    assert not torch.allclose(y_step, y_clamped[:, 0], atol=1e-3)


def test_matches_transformers_chunk_scan():
    modeling = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    inputs = make_inputs(length=17, heads=8, groups=4)
    pos, kw = split(inputs)
    y_hf, s_hf = modeling.mamba2_chunk_scan(
        *pos, chunk_size=5, D=kw["D"], dt_bias=kw["dt_bias"], dt_softplus=True,
        initial_states=kw["initial_state"], dt_limit=(0.0, 0.7), return_final_states=True,
    )  # fmt: skip
    y, s = ssd_scan(*pos, **kw, dt_softplus=True, dt_limit=(0.0, 0.7), chunk_size=5, return_final_state=True)
    rel_close(y, y_hf)
    rel_close(s, s_hf)


def test_groups_map_to_heads_by_repeat_interleave():
    """Head h reads group h // (H / G): giving every head of group g the B, C of g equals G = H."""
    inputs = make_inputs(groups=2)
    inputs.pop("initial_state")
    pos, kw = split(inputs)
    x, dt, A, B, C = pos
    y = ssd_scan(*pos, **kw, chunk_size=4)
    y_full = ssd_scan(x, dt, A, B.repeat_interleave(3, 2), C.repeat_interleave(3, 2), **kw, chunk_size=4)
    rel_close(y, y_full)


def test_empty_sequence():
    inputs = make_inputs(length=0)
    pos, kw = split(inputs)
    y, s = ssd_scan(*pos, **kw, return_final_state=True)
    assert y.shape == (2, 0, 6, 3)
    assert_close(s, kw["initial_state"])


def test_bad_inputs_raise_naming_the_argument():
    inputs = make_inputs()
    pos, kw = split(inputs)
    x, dt, A, B, C = pos
    with pytest.raises(ValueError, match=r"G=4 groups, which must divide the H=6"):
        ssd_scan(x, dt, A, torch.randn(2, 13, 4, 4), torch.randn(2, 13, 4, 4))
    with pytest.raises(ValueError, match=r"initial_state.shape=\(2, 6, 3, 5\) must be \(2, 6, 3, 4\)"):
        ssd_scan(*pos, initial_state=torch.randn(2, 6, 3, 5))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"chunk_size={bad!r} must be an int >= 1"):
            ssd_scan(*pos, chunk_size=bad)
    with pytest.raises(ValueError, match=r"dt.shape=\(2, 13\) must be \(2, 13, 6\)"):
        ssd_scan(x, dt[..., 0], A, B, C)
    with pytest.raises(ValueError, match=r"D.shape=\(5,\) must be"):
        ssd_scan(*pos, D=torch.randn(5))
    with pytest.raises(ValueError, match=r"x.shape=\(2, 13, 18\) must be \(B, L, H, P\)"):
        ssd_scan(x.flatten(2), dt, A, B, C)
    with pytest.raises(ValueError, match=r"dt_limit=\(1.0, 0.5\) must be a pair"):
        ssd_scan(*pos, dt_limit=(1.0, 0.5))
    with pytest.raises(ValueError, match=r"state.shape=\(2, 6, 3, 5\) must be \(B, H, P, N\)"):
        ssd_step(torch.randn(2, 6, 3, 5), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])


def test_compiled_scan_runs_for_a_second_length():
    """Under torch.compile (AOTAutograd's eager backend: Inductor's tracing, in seconds) a second length,
    which Dynamo retraces with a symbolic length, runs forward and backward equal to eager. B and C come as
    views of one projection, as Mamba2Block passes them: the gradient of the padded last chunk reached them
    as a strided view that the symbolic trace took for contiguous (a failing view at run time)."""

    def scan(x, dt, A, bc, D, dt_bias):  # bc (B, L, 2 * G * N) -> B, C (B, L, G, N) views
        b, c = (t.unflatten(-1, (2, 4)) for t in bc.split(8, dim=-1))
        return ssd_scan(x, dt, A, b, c, D=D, dt_bias=dt_bias, dt_softplus=True, chunk_size=4)

    compiled = torch.compile(scan, fullgraph=True, backend="aot_eager")
    for length in (3, 7):  # each ends in a padded chunk
        inputs = make_inputs(length=length, groups=2)
        bc = torch.cat([inputs["B"].flatten(2), inputs["C"].flatten(2)], dim=-1).requires_grad_(True)
        x = inputs["x"].requires_grad_(True)
        args = (x, inputs["dt"], inputs["A"], bc, inputs["D"], inputs["dt_bias"])
        results = []
        for fn in (compiled, scan):
            y = fn(*args)
            results.append((y, *torch.autograd.grad(y.square().sum(), [x, bc])))
        for got, want in zip(*results):
            assert_close(got, want, rtol=1e-5, atol=1e-5)
