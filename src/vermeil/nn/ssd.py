"""Mamba-2's state space duality (SSD) scan: the reference recurrence, the fast chunked form, one decode step.

The recurrence, per batch b, head h (scalar A_h), head channel p and state index n (Dao & Gu, 2024,
arXiv:2405.21060, "Transformers are SSMs"; state-spaces/mamba `mamba_ssm/modules/ssd_minimal.py`):

    s_t = exp(dt_t * A_h) * s_{t-1} + dt_t * x_t (outer) B_t       s: (P, N) per head
    y_t = s_t C_t + D_h * x_t,   then optionally  y_t * silu(z_t)

with dt_t = softplus(dt_raw + dt_bias) (optional), clamped to `dt_limit` in the scan. Heads share B and C in
G groups: head h reads group h // (H / G) (`repeat_interleave` semantics, as mamba_ssm and transformers).
`ssd_scan_ref` is that loop (the definition, for tests), `ssd_step` one position of it (decoding), `ssd_scan`
the chunked matmul form (the paper's section 6, `ssd_minimal_discrete`). States and accumulation are float32
whatever the input dtype (float64 stays, for gradcheck); outputs are cast back to x's dtype. Inside an
autocast region `ssd_scan`'s matmuls take autocast's dtype, as every matmul there does (mamba_ssm's kernels
also multiply bf16 operands, but keep float32 products): with bf16, y's error is then about twice the
rounding of y itself (measured against float64). Call it outside autocast for float32 products throughout.

Axis legend: B batch, L length, H heads, P head dim, G groups, N state size, Q chunk length, c chunk count
(ceil(L / Q)), hg = H / G heads per group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vermeil.nn.scan import _LOG2_E, _compute_dtype

__all__ = ["ssd_scan", "ssd_scan_ref", "ssd_step"]

_NO_LIMIT = (0.0, float("inf"))


def _exp(x: Tensor) -> Tensor:
    """exp(x) as exp2(x * log2 e): torch's CPU exp2 kernel is several times faster than exp for float32."""
    return torch.exp2(x * _LOG2_E) if x.dtype == torch.float32 else torch.exp(x)


def _check(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    initial_state: Tensor | None,
    *,
    step: bool,
    dt_limit: tuple[float, float] | None = None,
) -> tuple[int, int]:
    """Static shape checks (compile friendly). Returns (G, N); raises ValueError naming argument and rule."""
    if dt_limit is not None and (len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]):
        raise ValueError(f"dt_limit={dt_limit!r} must be a pair (low, high) with low <= high")
    lead = "(B, H, P)" if step else "(B, L, H, P)"
    if x.dim() != (3 if step else 4):
        raise ValueError(f"x.shape={tuple(x.shape)} must be {lead}")
    bl, (heads, p) = tuple(x.shape[:-2]), x.shape[-2:]
    if B.dim() != len(bl) + 2:
        raise ValueError(f"B.shape={tuple(B.shape)} must be {bl + ('G', 'N')} (x is {lead})")
    groups, n = B.shape[-2:]
    if groups == 0 or heads % groups != 0:
        raise ValueError(
            f"B.shape={tuple(B.shape)} has G={groups} groups, which must divide the H={heads} heads of x "
            "(head h reads group h // (H / G))"
        )
    expected = {
        "dt": (dt, bl + (heads,)),
        "A": (A, (heads,)),
        "B": (B, bl + (groups, n)),
        "C": (C, bl + (groups, n)),
        "z": (z, tuple(x.shape)),
        "dt_bias": (dt_bias, (heads,)),
    }
    if not step:
        expected["initial_state"] = (initial_state, (bl[0], heads, p, n))
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"{name}.shape={tuple(t.shape)} must be {shape} (x is {lead} and B is (..., G, N))"
            )
    if D is not None and tuple(D.shape) not in ((heads,), (heads, p)):
        raise ValueError(f"D.shape={tuple(D.shape)} must be (H,)=({heads},) or (H, P)=({heads}, {p})")
    return groups, n


def _prepare_dt(
    dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float] | None = None
) -> Tensor:
    """dt (+ dt_bias), softplus if asked, clamped to dt_limit: mamba_ssm's and transformers' order."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit is not None and tuple(dt_limit) != _NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D * x (D per head, or per head channel), then times silu(z). x, y: (..., H, P)."""
    if D is not None:
        d = D.to(y.dtype)
        y = y + x * (d[:, None] if d.dim() == 1 else d)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _decay_mask(a_cum: Tensor) -> Tensor:
    """exp(a_cum[l] - a_cum[s]) for s <= l, exactly 0 above the diagonal (-inf before the exponential):
    (..., Q) -> (..., Q, Q), one allocation and in-place passes. Kept exponents are <= 0 (a_cum decreases)."""
    q = a_cum.shape[-1]
    seg = a_cum[..., :, None] - a_cum[..., None, :]
    # adding a (Q, Q) matrix of 0 / -inf is one vectorised pass; a broadcast masked_fill_ measured ~5x slower
    seg.add_(torch.full((q, q), -math.inf, dtype=seg.dtype, device=seg.device).triu_(1))
    # torch's CPU exp2 is several times faster than exp for float32 (_exp)
    return seg.mul_(_LOG2_E).exp2_() if seg.dtype == torch.float32 else seg.exp_()


def _pad_steps(t: Tensor, pad: int) -> Tensor:
    """t (B, L, ...) followed by `pad` zero steps -> (B, L + pad, ...)."""
    # cat, not F.pad: F.pad's gradient (a negative pad) is a strided view in eager, but a new contiguous
    # tensor to torch.compile's shape rule once L is dynamic (torch 2.13), so a view of it failed at run time
    return torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)


class _IntraChunk(torch.autograd.Function):
    """The diagonal blocks of the chunked scan, `y = (decay_mask(a_cum) * CB) @ xdt` per chunk and head.

    a_cum (B, G, c, hg, Q), cb (B, G, c, Q, Q) (C B^T, shared by a group's heads), xdt (B, G, c, Q, hg, P)
    -> y (B, G, c, hg, Q, P). By hand so that no (B, G, c, hg, Q, Q) tensor is saved for backward (the mask
    is recomputed from a_cum). With gS = dy @ xdt^T: d CB is the head sum of gS * mask, and since
    d mask / d a_cum = mask * (+-1), d a_cum is the row sums minus the column sums of gS * mask * CB.
    """

    @staticmethod
    def forward(ctx, a_cum: Tensor, cb: Tensor, xdt: Tensor) -> Tensor:  # type: ignore[override]
        scores = _decay_mask(a_cum).mul_(cb[:, :, :, None])  # (B, G, c, hg, Q, Q)
        ctx.save_for_backward(a_cum, cb, xdt)
        return scores @ xdt.transpose(3, 4)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a_cum, cb, xdt = ctx.saved_tensors
        mask = _decay_mask(a_cum)  # (B, G, c, hg, Q, Q)
        cb_h = cb[:, :, :, None]
        grad_xdt = ((mask * cb_h).transpose(-1, -2) @ grad).transpose(3, 4)  # (B, G, c, Q, hg, P)
        g = (grad @ xdt.permute(0, 1, 2, 4, 5, 3)).mul_(mask)  # dL/dscores * mask, (B, G, c, hg, Q, Q)
        grad_cb = g.sum(3)
        g.mul_(cb_h)  # dL/d(a_cum[l] - a_cum[s])
        grad_a = g.sum(-1) - g.sum(-2)
        return grad_a, grad_cb, grad_xdt


def ssd_scan_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The SSD recurrence one position at a time (the definition; O(L) Python steps, for tests).

    Args:
        x: (B, L, H, P). dt: (B, L, H), before bias and softplus. A: (H,), negative.
        B, C: (B, L, G, N), G dividing H. D: (H,) or (H, P) skip. z: (B, L, H, P) gate.
        dt_limit: (low, high) clamp of dt after the softplus.
        initial_state: (B, H, P, N); zeros if None.

    Returns:
        y (B, L, H, P) in x.dtype, and the final state (B, H, P, N) in float32 (float64 for float64
        inputs) if `return_final_state`.
    """
    groups, n = _check(x, dt, A, B, C, D, z, dt_bias, initial_state, step=False, dt_limit=dt_limit)
    bsz, length, heads, p = x.shape
    cdt = _compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    dt = _prepare_dt(dt.to(cdt), dt_bias, dt_softplus, dt_limit)
    xf, a = x.to(cdt), A.to(cdt)
    rep = heads // groups
    bh = B.to(cdt).repeat_interleave(rep, dim=2)  # (B, L, H, N): head h reads group h // rep
    ch = C.to(cdt).repeat_interleave(rep, dim=2)
    state = xf.new_zeros(bsz, heads, p, n) if initial_state is None else initial_state.to(cdt)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * a)[:, :, None, None]  # (B, H, 1, 1)
        state = decay * state + (dt[:, t, :, None] * xf[:, t])[..., None] * bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(bsz, 0, heads, p)
    y = _skip_and_gate(y, xf, D, z).to(x.dtype)
    return (y, state) if return_final_state else y


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 64,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The chunked SSD scan (matmul form): `ssd_scan_ref`'s arguments and results, plus `chunk_size` Q.

    Equals the recurrence for any Q >= 1 (L is padded with dt = 0, x = 0 steps). Differentiable in every
    input and through the final state. Memory kept for backward is linear in L. Q = 32 and 64 measured alike,
    128 slower (one thread of a 2-core CPU, bench/mamba2.py); mamba_ssm's CUDA kernels default to 256.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1")
    groups, n = _check(x, dt, A, B, C, D, z, dt_bias, initial_state, step=False, dt_limit=dt_limit)
    bsz, length, heads, p = x.shape
    cdt = _compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    hg = heads // groups
    q = chunk_size
    nc = max(1, -(-length // q))
    pad = nc * q - length

    dt = _prepare_dt(dt.to(cdt), dt_bias, dt_softplus, dt_limit)  # (B, L, H)
    xf = x.to(cdt)
    xdt = xf * dt[..., None]  # (B, L, H, P)
    a = dt * A.to(cdt)  # (B, L, H), <= 0
    bf, cf = B.to(cdt), C.to(cdt)
    if pad:  # padded steps along L: dt = 0, so no decay and no input
        xdt, a, bf, cf = (_pad_steps(t, pad) for t in (xdt, a, bf, cf))
    # Group-major chunked layout: (B, G, c, Q, hg, P); for G = 1 it is a view of x's own layout, and the
    # per-group matmuls below read all hg heads of a group as one (Q, hg*P) matrix.
    xdt = xdt.view(bsz, nc, q, groups, hg, p).permute(0, 3, 1, 2, 4, 5)
    bc = bf.view(bsz, nc, q, groups, n).permute(0, 3, 1, 2, 4)  # (B, G, c, Q, N)
    cc = cf.view(bsz, nc, q, groups, n).permute(0, 3, 1, 2, 4)  # (B, G, c, Q, N)
    a_cum = a.view(bsz, nc, q, groups, hg).permute(0, 3, 1, 4, 2).cumsum(-1)  # (B, G, c, hg, Q)

    # 1. Intra-chunk (diagonal blocks): y[l] = sum_{s <= l} (C_l . B_s) exp(a_cum[l] - a_cum[s]) dt_s x_s
    cb = cc @ bc.transpose(-1, -2)  # (B, G, c, Q, Q), shared by the hg heads of a group
    y_diag = _IntraChunk.apply(a_cum, cb, xdt)  # (B, G, c, hg, Q, P)

    # 2. Each chunk's own final state (from zero): S^T[n, (hg p)] = sum_l B[l, n] exp(a_cum[-1] - a_cum[l]) xdt[l]
    to_end = _exp(a_cum[..., -1:] - a_cum).transpose(-1, -2)  # (B, G, c, Q, hg)
    states = bc.transpose(-1, -2) @ (xdt * to_end[..., None]).reshape(bsz, groups, nc, q, hg * p)
    states = states.view(bsz, groups, nc, n, hg, p)  # (B, G, c, N, hg, P): the state transposed

    # 3. Inter-chunk: the state entering chunk k is decay_{k-1} * state_in[k-1] + states[k-1]. A loop of L/Q
    # steps, not transformers' segsum form, which is O((L/Q)^2) and loses float32 precision once the summed
    # decay is large; the loop measured no slower at L/Q = 64 (2-core CPU, bench/mamba2.py).
    chunk_decay = _exp(a_cum[..., -1])[:, :, :, None, :, None]  # (B, G, c, 1, hg, 1)
    if initial_state is None:
        s = states.new_zeros(bsz, groups, n, hg, p)
    else:  # (B, H, P, N) -> (B, G, N, hg, P)
        s = initial_state.to(cdt).reshape(bsz, groups, hg, p, n).permute(0, 1, 4, 2, 3)
    entering = []
    # unbind once: indexing inside the loop would make each step's backward zero-fill a full-size gradient
    for decay_k, states_k in zip(chunk_decay.unbind(2), states.unbind(2)):
        entering.append(s)
        s = s * decay_k + states_k
    state_in = torch.stack(entering, dim=2).view(bsz, groups, nc, n, hg * p)  # (B, G, c, N, hg*P)

    # 4. States to outputs: y[l] += exp(a_cum[l]) * C_l . state_in
    from_start = _exp(a_cum).transpose(-1, -2)[..., None]  # (B, G, c, Q, hg, 1)
    y_off = (cc @ state_in).view(bsz, groups, nc, q, hg, p) * from_start  # (B, G, c, Q, hg, P)
    y = y_off + y_diag.transpose(3, 4)  # (B, G, c, Q, hg, P)
    y = y.permute(0, 2, 3, 1, 4, 5).reshape(bsz, nc * q, heads, p)[:, :length]
    y = _skip_and_gate(y, xf, D, z).to(x.dtype)
    if not return_final_state:
        return y
    final = s.permute(0, 1, 3, 4, 2).reshape(bsz, heads, p, n)  # (B, G, N, hg, P) -> (B, H, P, N)
    return y, final


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """One position of the recurrence (decoding), CUDA-graph capturable. No dt limit: mamba_ssm's
    `selective_state_update` and transformers' step do not clamp either (with no limit, step == scan).

    Args:
        state: (B, H, P, N), float32 in a low-precision model. x: (B, H, P). dt: (B, H). A: (H,).
        B, C: (B, G, N). D: (H,) or (H, P). z: (B, H, P).
        inplace: update `state` (a contiguous cache that autograd does not need) instead of allocating: two
            passes over the state instead of four.

    Returns:
        y (B, H, P) in x.dtype, and the new state (B, H, P, N) in state.dtype (`state` itself if `inplace`).
    """
    _check(x, dt, A, B, C, D, z, dt_bias, None, step=True)
    bsz, heads, p = x.shape
    n = B.shape[-1]
    if tuple(state.shape) != (bsz, heads, p, n):
        raise ValueError(f"state.shape={tuple(state.shape)} must be (B, H, P, N)={(bsz, heads, p, n)}")
    if inplace and not state.is_contiguous():
        raise ValueError("ssd_step(inplace=True) needs a contiguous state (it is updated through a view)")
    return _ssd_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, inplace=inplace)


def _ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    *,
    inplace: bool = False,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`ssd_step` without the checks (Mamba2Block's decoding hot path).

    keep: (B|1, 1) bool; where False the old state counts as zeros (a restart), folded into the decay at no
    cost. Assumes the stale state is finite (0 * inf is nan), as any state a model wrote is.
    """
    bsz, heads, p = x.shape
    groups, n = B.shape[-2:]
    hg = heads // groups
    cdt = _compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    dt = _prepare_dt(dt.to(cdt), dt_bias, dt_softplus)  # (B, H)
    xf = x.to(cdt)
    decay = torch.exp(dt * A.to(cdt))  # (B, H)
    if keep is not None:
        decay = torch.where(keep, decay, 0.0)
    # heads as (G, hg): group g's B and C broadcast over its hg heads (no repeat_interleave copy)
    decay = decay.view(bsz, groups, hg, 1, 1)
    dtx = (dt[..., None] * xf).reshape(bsz, groups, hg, p, 1)
    b5 = B.to(cdt).view(bsz, groups, 1, 1, n)
    written = inplace and state.dtype == cdt
    if written:
        new_state = state.view(bsz, groups, hg, p, n).mul_(decay).addcmul_(dtx, b5)
    else:
        new_state = torch.addcmul(state.to(cdt).reshape(bsz, groups, hg, p, n) * decay, dtx, b5)
    # one (hg*P, N) @ (N,) product per batch row and group; einsum picks it over a broadcast bmm of hg tiny ones
    y = torch.einsum("bghpn,bgn->bghp", new_state, C.to(cdt)).reshape(bsz, heads, p)
    y = _skip_and_gate(y, xf, D, z)
    new_state = new_state.view(bsz, heads, p, n)
    if not inplace:
        return y.to(x.dtype), new_state.to(state.dtype)
    if not written:  # computed in another dtype than the state's
        state.copy_(new_state)
    return y.to(x.dtype), state
