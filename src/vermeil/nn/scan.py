"""Selective scan (Mamba-1's S6 recurrence): the reference loop, a fast chunked scan, and the one-token step.

The recurrence, per batch b, channel d and state index n (Gu & Dao, 2023, arXiv:2312.00752, Algorithm 2):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t        (A exact, B by Euler, as mamba_ssm)
    y_t = <C_t, h_t> + D * u_t,  then  y_t * silu(z_t)

`selective_scan_ref` is that loop, the definition (tests/nn/test_scan.py checks it against mamba_ssm's);
`selective_scan` is the path for training and prefill, `selective_step` one recurrent step for decoding.

Why this algorithm for `selective_scan` (measured on a 2-core CPU; bench/scan.py prints the table):

- The log-space form `h_t = exp(cum_t) * (h_0 + sum_s exp(-cum_s) x_s)` overflows float32 once
  `|A| * sum(delta)` inside a chunk passes ~88: already at initialisation (dt 0.1, A = -16, 64 steps: 102).
- The masked form `exp(cum_t - cum_s)` (s <= t, Mamba-2's segsum) is safe, but Mamba-1's A is per (d, n):
  a (B, D, K, K, N) tensor per chunk, K times the loop's exponentials, and exp dominates on CPU.
- Blelloch/Hillis-Steele trees (mambapy's pscan) are exact but make log2(L) strided passes over a full
  (B, L, D, N) tensor; they lose to the loop on this CPU and use gigabytes.

So the scan here is a blocked, two-level ("strided") scan with the loop's own arithmetic, every exponent
`delta * A <= 0`. Chunks of `chunk_size` positions run one after another, carrying the state; inside a chunk
the positions form G sub-chunks of length k ~ sqrt(chunk_size), all advanced together one position per
Python step (about 2k + G steps on (B, G, N, D) tensors instead of chunk_size steps on (B, D, N) ones; the
three passes are numbered in `_SelectiveScanFn.forward`). Backward saves only the inputs and the sub-chunk
start states (1/k of the state volume) and recomputes each chunk, running the passes in reverse. Working
memory is a few (chunk, B, N, D) tensors: nothing of size (B, D, L, N). The state is laid out (N, D) so
reductions vectorise along D, and exp(x) is exp2(x * log2 e), about 4x faster in torch's CPU kernels (the
error stays within float32 rounding of x).

`selective_scan(..., compile=True)` runs the loop's own steps over chunks of 8 positions, each chunk one
torch.compile'd call (`_chunk_forward`, `_chunk_backward`, notes above them); no exp(-x) there either.

On CUDA, `selective_scan` runs Triton kernels instead (`vermeil.nn.scan_triton`, whose docstring gives their
design): one forward and one backward kernel keep the state on chip and save only chunk-boundary states.

Axis legend: B batch, D channels (Mamba's d_inner), L length, N state size, k/G sub-chunk length/count,
X = k*B*G flattened positions of a chunk.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vermeil.nn.checks import check_optional_positive_int

__all__ = ["BACKENDS", "selective_scan", "selective_scan_ref", "selective_step"]

# Elements of one (chunk, B, N, D) working tensor when chunk_size is chosen automatically: 2**20 floats is
# 4 MiB; forward holds two such tensors and backward three (measured best: bench/scan.py, chunk 32-64).
_AUTO_BLOCK_ELEMENTS = 1 << 20
_LOG2_E = math.log2(math.e)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (so gradcheck sees the exact function), else float32."""
    float64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if float64 else torch.float32


def _check_floating(**tensors: Tensor | None) -> None:
    """Every given input must be a floating tensor: the scan computes in float32/float64 and returns u's dtype,
    so integer (or bool) inputs would come back silently truncated."""
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise TypeError(
                f"{name} has dtype {t.dtype}: the selective scan's inputs must be floating tensors"
            )


_TENSOR_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _check_shapes(*tensors: Tensor | None) -> None:
    """Static shape and dtype checks (compile friendly) of the scan's tensors, given in `_TENSOR_ARGS` order:
    raise naming the argument and the rule."""
    _check_floating(**dict(zip(_TENSOR_ARGS, tensors)))
    u, delta, A, B, C, D, z, delta_bias, initial_state = tensors
    if u.dim() != 3:
        raise ValueError(f"u.shape={tuple(u.shape)} must be (B, D, L)")
    bsz, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A.shape={tuple(A.shape)} must be (D, N) with D={dim} from u")
    n = A.shape[1]
    expected = {
        "delta": (delta, (bsz, dim, length)),
        "B": (B, (bsz, n, length)),
        "C": (C, (bsz, n, length)),
        "D": (D, (dim,)),
        "z": (z, (bsz, dim, length)),
        "delta_bias": (delta_bias, (dim,)),
        "initial_state": (initial_state, (bsz, dim, n)),
    }
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}.shape={tuple(t.shape)} must be {shape} (u is (B, D, L), A is (D, N))")


def _check_step_shapes(
    state: Tensor,
    u_t: Tensor,
    delta_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Tensor | None,
    z_t: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    """`selective_step`'s static shape checks, against state (B, D, N): raise naming the argument and the rule
    (broadcasting would otherwise accept e.g. a (B, 1) C_t and silently sum the state over N)."""
    if state.dim() != 3:
        raise ValueError(f"state.shape={tuple(state.shape)} must be (B, D, N)")
    bsz, dim, n = state.shape
    row, channel = (bsz, dim), (dim,)
    for name, t, shape in (
        ("u_t", u_t, row),
        ("delta_t", delta_t, row),
        ("A", A, (dim, n)),
        ("B_t", B_t, (bsz, n)),
        ("C_t", C_t, (bsz, n)),
        ("D", D, channel),
        ("z_t", z_t, row),
        ("delta_bias", delta_bias, channel),
    ):
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name}.shape={tuple(t.shape)} must be {shape} (state.shape={tuple(state.shape)} is (B, D, N))"
            )


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    """A (D,) vector shaped to broadcast over the channel axis 1 of a (B, D) or (B, D, L) tensor."""
    return v.to(like.dtype).view(-1, *(1,) * (like.dim() - 2))


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """delta (+ bias per channel), then softplus if asked: mamba_ssm's order."""
    if delta_bias is not None:
        delta = delta + _per_channel(delta_bias, delta)
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype: torch.dtype) -> Tensor:
    """y + D * u, times silu(z), cast to the input dtype."""
    if D is not None:
        y = y + u * _per_channel(D, y)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype)


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in the operands' dtype, also inside an autocast region: the scans' matrix-vector products (state
    read-outs, memory-bound) would gain nothing from bf16 and would round the float32 state to it."""
    with torch.autocast(a.device.type, enabled=False):
        return torch.matmul(a, b)


def _step(
    x: Tensor, u_t: Tensor, delta_t: Tensor, A: Tensor, B_t: Tensor, C_t: Tensor
) -> tuple[Tensor, Tensor]:
    """One step from state x (B, D, N): u_t, delta_t (B, D), B_t, C_t (B, N) -> (y_t (B, D), the new state)."""
    x = torch.exp(delta_t[:, :, None] * A) * x + (delta_t * u_t)[:, :, None] * B_t[:, None, :]
    return _matmul(x, C_t[:, :, None]).squeeze(-1), x


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan as a plain sequential loop over time in float32: the definition.

    Same semantics as `mamba_ssm.ops.selective_scan_interface.selective_scan_ref` (real A, time-varying B and
    C), plus an initial state. The discretised tensors are formed one step at a time, so memory stays
    O(B * D * N) besides the output.

    Args:
        u: (B, D, L) input. delta: (B, D, L) step sizes (before `delta_bias` and softplus).
        A: (D, N) state matrix (diagonal, usually negative: `-exp(A_log)`).
        B, C: (B, N, L) input and output projections. D: (D,) skip connection, optional.
        z: (B, D, L) gate, optional: the output is multiplied by silu(z).
        delta_bias: (D,) added to delta, optional. delta_softplus: apply softplus to delta (after the bias).
        initial_state: (B, D, N) state before the first step; zeros if None.
        return_final_state: also return the state after the last step.

    Returns:
        y: (B, D, L) in u.dtype, and the final state (B, D, N) in float32 (float64 for float64 inputs) if
        `return_final_state`.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    cdt = _compute_dtype(u, delta, A, B, C, initial_state)
    u, A, B, C = u.to(cdt), A.to(cdt), B.to(cdt), C.to(cdt)
    delta = _prepare_delta(delta.to(cdt), delta_bias, delta_softplus)
    bsz, dim, length = u.shape
    x = u.new_zeros(bsz, dim, A.shape[1]) if initial_state is None else initial_state.to(cdt)  # (B, D, N)
    ys = []
    for t in range(length):
        y_t, x = _step(x, u[:, :, t], delta[:, :, t], A, B[:, :, t], C[:, :, t])
        ys.append(y_t)
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(bsz, dim, 0)  # (B, D, L)
    out = _finish(y, u, D, z, dtype_in)
    return (out, x) if return_final_state else out


def selective_step(
    state: Tensor,
    u_t: Tensor,
    delta_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Tensor | None = None,
    z_t: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """One step of the recurrence (decoding): O(1) in the sequence length, functional (no in-place update).

    Equals one iteration of `selective_scan_ref` (and mamba_ssm's `Mamba.step` without the fused kernel).
    This torch code is also the CUDA decode path: a dozen elementwise ops on (B, D, N) with no host sync
    and no data-dependent branch, so a CUDA graph captures it and `torch.compile` fuses it into a couple of
    kernels; a hand-written Triton step kernel would only save launches that a graph replay already removes.

    Args:
        state: (B, D, N) state before the step. The others: as `selective_scan_ref` at one position, so u_t,
            delta_t, z_t are (B, D) and B_t, C_t (B, N).

    Returns:
        y_t: (B, D) in u_t.dtype, and the new state (B, D, N) in state.dtype.
    """
    _check_floating(
        state=state, u_t=u_t, delta_t=delta_t, A=A, B_t=B_t, C_t=C_t, D=D, z_t=z_t, delta_bias=delta_bias
    )
    _check_step_shapes(state, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias)
    return _selective_step(state, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, delta_softplus)


def _selective_step(
    state: Tensor,
    u_t: Tensor,
    delta_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Tensor | None = None,
    z_t: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """`selective_step` without the checks (MambaBlock's decoding hot path, whose shapes hold by construction)."""
    cdt = _compute_dtype(state, u_t, delta_t, A, B_t, C_t)
    u = u_t.to(cdt)
    delta = _prepare_delta(delta_t.to(cdt), delta_bias, delta_softplus)
    y, new_state = _step(state.to(cdt), u, delta, A.to(cdt), B_t.to(cdt), C_t.to(cdt))
    return _finish(y, u, D, z_t, u_t.dtype), new_state.to(state.dtype)


# ----------------------------------------------------------------------------------------------------------
# The fast path.


def _auto_chunk_size(bsz: int, dim: int, n: int, length: int) -> int:
    """Positions per chunk so that one (chunk, B, N, D) tensor holds about _AUTO_BLOCK_ELEMENTS elements."""
    target = max(16, _AUTO_BLOCK_ELEMENTS // max(1, bsz * dim * n))
    chunk = 1 << int(math.log2(target))  # a power of two, at least 16
    return max(1, min(chunk, 1024, length))


def _grid(x: Tensor, p0: int, n: int, groups: int, k: int) -> Tensor:
    """(B, X, L) -> (k, B, G, X) for positions p0..p0+n, zero-padded to G*k (position p0 + g*k + j)."""
    xs = x[:, :, p0 : p0 + n]
    if groups * k != n:
        xs = F.pad(xs, (0, groups * k - n))  # zero delta: identity steps, state passes unchanged
    return xs.unflatten(-1, (groups, k)).permute(3, 0, 2, 1).contiguous()


def _ungrid_into(out: Tensor, xg: Tensor, p0: int, n: int) -> None:
    """Write (k, B, G, X) back into out[:, :, p0:p0+n] (out: (B, X, L)), dropping padding: one strided copy
    per part, whatever out's layout (flattening (G, k) first would copy twice)."""
    k = xg.shape[0]
    src = xg.permute(1, 3, 2, 0)  # (B, X, G, k)
    full = n // k  # sub-chunks without padding
    if full:
        out[:, :, p0 : p0 + full * k].unflatten(-1, (full, k)).copy_(src[:, :, :full])
    if n > full * k:
        out[:, :, p0 + full * k : p0 + n].copy_(src[:, :, full, : n - full * k])


def _chunks(length: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """(start, length, k, G) of every chunk; the last one may be shorter and uses a smaller grid. The sub-chunk
    length k ~ sqrt(chunk) is a power of two (dividing power-of-two chunks: no padding): a chunk then costs
    about 2k + chunk/k Python steps."""
    sub = 1 << max(0, round(math.log2(chunk) / 2))
    sizes = [(p0, min(chunk, length - p0)) for p0 in range(0, length, chunk)]
    return [(p0, n, min(sub, n), -(-n // min(sub, n))) for p0, n in sizes]


def _workspace(like: Tensor, chunks: list, bsz: int, n_state: int, dim: int, count: int) -> list[Tensor]:
    """`count` flat buffers big enough for the largest chunk's (k, B, G, N, D) tensor."""
    # max(..., default=0) would be a graph break: Dynamo refuses the keyword
    numel = max([0] + [k * groups for _, _, k, groups in chunks]) * bsz * n_state * dim
    return [like.new_empty(numel) for _ in range(count)]


def _dense(x: Tensor) -> Tensor:
    """x as is when it is (B, X, L)-contiguous or the transpose of a (B, L, X)-contiguous tensor, else a copy:
    `_grid` reads either layout, so models whose projections produce (B, L, X) save two transposing copies."""
    return x if x.is_contiguous() or x.transpose(1, 2).is_contiguous() else x.contiguous()


def _view(buf: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A contiguous view of the first prod(shape) elements of a flat buffer."""
    return buf[: math.prod(shape)].view(shape)


def _chunk_terms(
    u: Tensor, delta: Tensor, B: Tensor, C: Tensor, A2_t: Tensor, spec: tuple[int, ...], work: list[Tensor]
) -> tuple[Tensor, ...]:
    """A chunk's gridded inputs d, u, d * u (k, B, G, D), b, c (k, B, G, N), and in work[0], work[1] as
    (k, B, G, N, D): dA = exp(delta_t A) (every exponent <= 0 for A <= 0) and delta_t u_t B_t (the states
    once rescanned)."""
    p0, n, k, groups = spec  # one of _chunks
    d, uu, b, c = (_grid(t, p0, n, groups, k) for t in (delta, u, B, C))
    du = d * uu
    shape = (k, *d.shape[1:3], *A2_t.shape)
    dA = torch.exp2_(torch.mul(d.unsqueeze(-2), A2_t, out=_view(work[0], shape)))
    h = torch.mul(du.unsqueeze(-2), b.unsqueeze(-1), out=_view(work[1], shape))
    return d, uu, du, b, c, dA, h


class _SelectiveScanFn(torch.autograd.Function):
    """Core scan y_t = <C_t, h_t>, h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, with hand-written backward.

    Inputs are already in the compute dtype, delta already biased and softplus'ed, and the state uses the
    internal (B, N, D) layout; A_t is A transposed to (N, D).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, u: Tensor, delta: Tensor, A_t: Tensor, B: Tensor, C: Tensor, h0: Tensor, chunk: int
    ) -> tuple[Tensor, Tensor]:
        bsz, dim, length = u.shape
        n_state = A_t.shape[0]
        A2_t = A_t * _LOG2_E  # exp(x A) = exp2(x A log2 e): exp2 is ~4x faster than exp here (Sleef, AVX-512)
        y = torch.empty_like(u)  # u's layout: (B, L, D)-major input gives (B, L, D)-major output
        carry = h0  # (B, N, D): the state before the current chunk
        starts_all = []
        chunks = _chunks(length, chunk)
        # two workspaces reused by every chunk instead of fresh multi-MiB allocations per chunk
        work = _workspace(u, chunks, bsz, n_state, dim, 2)
        for p0, n, k, groups in chunks:
            d, _, _, b, c, dA, h = _chunk_terms(u, delta, B, C, A2_t, (p0, n, k, groups), work)
            # (B, G + 1, N, D): true state before each sub-chunk, then after the chunk; written in place
            starts_ext = u.new_empty(bsz, groups + 1, n_state, dim)
            starts_ext[:, 0] = carry
            starts = starts_ext[:, :groups]
            if groups > 1:
                # (1) local final states of the G sub-chunks from a zero start, all advanced together
                local = h[0]
                for j in range(1, k):
                    local = torch.addcmul(h[j], dA[j], local)
                # (2) true starts: a sub-chunk's total decay is exp(A * sum(delta)) (exponent <= 0)
                decay = torch.exp2_(d.sum(0).unsqueeze(-2) * A2_t)  # (B, G, N, D)
                for g in range(groups - 1):
                    starts_ext[:, g + 1] = torch.addcmul(local[:, g], decay[:, g], starts_ext[:, g])
            # (3) rescan from the true starts; h[j] becomes the state after position j
            prev = starts
            for j in range(k):
                prev = h[j].addcmul_(dA[j], prev)
            carry = h[k - 1, :, groups - 1].clone()  # the chunk's final state (the padded tail keeps it)
            yg = _matmul(c.unsqueeze(-2), h).squeeze(-2)  # (k, B, G, D) = <C_t, h_t>
            _ungrid_into(y, yg, p0, n)
            starts_all.append(starts)
        if length == 0:
            carry = h0.clone()
        ctx.save_for_backward(u, delta, A_t, B, C, *starts_all)
        ctx.chunks = chunks
        return y, carry

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor | None, grad_final: Tensor | None):  # type: ignore[override]
        u, delta, A_t, B, C, *starts_all = ctx.saved_tensors
        bsz, dim, _ = u.shape
        n_state = A_t.shape[0]
        A2_t = A_t * _LOG2_E
        grad_u, grad_delta, grad_B, grad_C = (torch.empty_like(t) for t in (u, delta, B, C))
        grad_A_t = torch.zeros_like(A_t)
        grad_y = torch.zeros_like(u) if grad_y is None else grad_y
        # adjoint flowing into the state after the current chunk's last position (from later positions)
        adj = grad_final if grad_final is not None else u.new_zeros(bsz, n_state, dim)
        work = _workspace(u, ctx.chunks, bsz, n_state, dim, 3)
        for (p0, n, k, groups), starts in zip(reversed(ctx.chunks), reversed(starts_all)):
            d, uu, du, b, c, dA, h = _chunk_terms(u, delta, B, C, A2_t, (p0, n, k, groups), work)
            gy = _grid(grad_y, p0, n, groups, k)  # (k, B, G, D), zero on padding
            prev = starts
            for j in range(k):  # recompute the states of the chunk
                prev = h[j].addcmul_(dA[j], prev)
            gC = (h * gy.unsqueeze(-2)).sum(-1)  # (k, B, G, N): sum_d gy_t h_t
            gy_e = gy.unsqueeze(-2)  # (k, B, G, 1, D)
            c_e = c.unsqueeze(-1)  # (k, B, G, N, 1)
            ends = u.new_empty(bsz, groups, n_state, dim)  # adjoint into each sub-chunk's last state
            ends[:, groups - 1] = adj
            if groups > 1:
                # local adjoint leaving each sub-chunk through its first step, from a zero end
                msg = dA[k - 1] * (gy_e[k - 1] * c_e[k - 1])
                for j in range(k - 2, -1, -1):
                    msg = dA[j] * torch.addcmul(msg, gy_e[j], c_e[j])
                decay = torch.exp2_(d.sum(0).unsqueeze(-2) * A2_t)  # (B, G, N, D)
                for g in range(groups - 1, 0, -1):
                    ends[:, g - 1] = torch.addcmul(msg[:, g], decay[:, g], ends[:, g])
            # full reverse pass: g_t = gy_t C_t + a_{t+1} g_{t+1}; dA[j] becomes a_t * g_t in place
            g_all = _view(work[2], dA.shape)
            msg = ends
            for j in range(k - 1, -1, -1):
                torch.addcmul(msg, gy_e[j], c_e[j], out=g_all[j])
                msg = dA[j].mul_(g_all[j])
            adj = dA[0, :, 0].clone()  # the adjoint leaving the chunk through its first step
            s = _matmul(b.unsqueeze(-2), g_all).squeeze(-2)  # (k, B, G, D): sum_n g_t B_t
            gB = (g_all * du.unsqueeze(-2)).sum(-1)  # (k, B, G, N): sum_d g_t delta_t u_t
            # a_t * g_t * h_{t-1}: the gradient through exp(delta_t A)
            dA[1:].mul_(h[:-1])
            dA[0].mul_(starts)
            grad_A_t += torch.mul(dA, d.unsqueeze(-2), out=g_all).flatten(0, 2).sum(0)
            gd = uu * s + dA.mul_(A_t).sum(-2)
            for grad, part in zip((grad_u, grad_delta, grad_B, grad_C), (d * s, gd, gB, gC)):
                _ungrid_into(grad, part, p0, n)
        return grad_u, grad_delta, grad_A_t, grad_B, grad_C, adj, None


# ----------------------------------------------------------------------------------------------------------
# The compiled path: each chunk's recurrence unrolled over its K positions as plain ops on (B, K, X) chunks
# (X innermost, so the generated C++ vectorises along D). Slow in eager mode; under Inductor the K steps
# become one loop over (B, N, D) with the state in registers, where the eager path above makes ~15 passes
# over a (k, B, G, N, D) tensor per chunk. Measured on 2 threads, B=2, D=1024, N=16, L=1024,
# time-major inputs as MambaBlock passes them: forward 36.9 -> 18.8 ms, forward+backward 94 -> 70 ms. The
# kernels themselves take 7 + 24 ms of that; the rest is the per-chunk Python loop. K = 8 was the fastest
# of 4, 8, 16, 32 (larger K: bigger unrolled graphs, slower compiles, no faster kernels).
_COMPILED_CHUNK = 8


def _chunk_forward(
    u: Tensor, d: Tensor, b: Tensor, c: Tensor, A2_t: Tensor, h: Tensor
) -> tuple[Tensor, Tensor]:
    """K steps from state h: u, d (B, K, D); b, c (B, K, N); A2_t (N, D) = A^T log2(e); h (B, N, D) -> y
    (B, K, D) and the state after the K steps."""
    ys = []
    for t in range(u.shape[1]):
        d_t = d[:, t].unsqueeze(1)  # (B, 1, D)
        h = torch.exp2(d_t * A2_t) * h + (d_t * u[:, t].unsqueeze(1)) * b[:, t].unsqueeze(-1)
        ys.append((h * c[:, t].unsqueeze(-1)).sum(1))
    return torch.stack(ys, 1), h


def _chunk_backward(
    u: Tensor, d: Tensor, b: Tensor, c: Tensor, A_t: Tensor, h: Tensor, gy: Tensor, g: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Adjoint of `_chunk_forward`, recomputing the chunk's states from its start state h.

    gy: (B, K, D) gradient of y; g: (B, N, D) adjoint of the state after the chunk. Returns the gradients of
    u, d (B, K, D), b, c (B, K, N), A_t (N, D), and the adjoint of the state before the chunk.
    """
    a = torch.exp2(d.unsqueeze(2) * (A_t * _LOG2_E))  # (B, K, N, D)
    du = d * u  # (B, K, D)
    x = du.unsqueeze(2) * b.unsqueeze(-1)  # (B, K, N, D)
    hs = [h]
    for t in range(u.shape[1]):
        hs.append(a[:, t] * hs[-1] + x[:, t])
    states = torch.stack(hs, 1)  # (B, K + 1, N, D): the state before each step, then after the last
    from_y = gy.unsqueeze(2) * c.unsqueeze(-1)  # (B, K, N, D): what y_t sends to h_t
    gs = []
    for t in range(u.shape[1] - 1, -1, -1):
        g = g + from_y[:, t]  # adjoint of h_t
        gs.append(g)
        g = g * a[:, t]  # adjoint of h_{t-1}
    gh = torch.stack(gs[::-1], 1)  # (B, K, N, D)
    s = (gh * b.unsqueeze(-1)).sum(2)  # (B, K, D): sum_n g_t B_t
    q = gh * a * states[:, :-1]  # (B, K, N, D): a_t g_t h_{t-1}, the gradient through exp(delta_t A)
    grad_d = u * s + (q * A_t).sum(2)
    grad_b = (gh * du.unsqueeze(2)).sum(-1)
    grad_c = (gy.unsqueeze(2) * states[:, 1:]).sum(-1)
    grad_A_t = (q * d.unsqueeze(2)).sum((0, 1))
    return d * s, grad_d, grad_b, grad_c, grad_A_t, g


@functools.cache
def _compiled_chunk_fns() -> tuple:
    """The two chunk functions under torch.compile, built once per process (Inductor caches kernels on disk)."""
    return torch.compile(_chunk_forward, fullgraph=True), torch.compile(_chunk_backward, fullgraph=True)


def _chunk_of(x: Tensor, p0: int, chunk: int) -> Tensor:
    """x[:, p0 : p0 + chunk] of a (B, L, X) tensor as a fresh contiguous tensor, zero-padded to `chunk` rows.

    Every chunk then looks the same to torch.compile (shape, strides, no storage offset, no autograd
    history): one compiled graph serves all chunks and all lengths. Zero delta makes padded steps the
    identity (exp(0) = 1, no input), and zero gy sends nothing back.
    """
    part = x[:, p0 : p0 + chunk].detach()
    if part.shape[1] < chunk:
        return F.pad(part, (0, 0, 0, chunk - part.shape[1]))
    return part.clone(memory_format=torch.contiguous_format)


class _CompiledScanFn(torch.autograd.Function):
    """The scan over (B, L, X)-contiguous inputs, chunk by chunk through the compiled chunk functions.

    Saves the inputs and the state before each chunk ((B, N, D) per K positions) and recomputes the chunk
    in backward, like `_SelectiveScanFn`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, u: Tensor, delta: Tensor, A_t: Tensor, B: Tensor, C: Tensor, h0: Tensor, chunk: int
    ) -> tuple[Tensor, Tensor]:
        forward_fn, _ = _compiled_chunk_fns()
        A2_t = A_t * _LOG2_E
        length = u.shape[1]
        y = torch.empty_like(u)  # (B, L, D)
        h = h0.detach()  # detached inputs: requires_grad is part of what torch.compile guards on
        starts = []
        for p0 in range(0, length, chunk):
            n = min(chunk, length - p0)
            starts.append(h)
            yc, h = forward_fn(*(_chunk_of(t, p0, chunk) for t in (u, delta, B, C)), A2_t, h)
            y[:, p0 : p0 + n] = yc[:, :n]
        ctx.save_for_backward(u, delta, A_t, B, C, *starts)
        ctx.chunk = chunk
        return y, h.clone() if length == 0 else h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor | None, grad_final: Tensor | None):  # type: ignore[override]
        u, delta, A_t, B, C, *starts = ctx.saved_tensors
        _, backward_fn = _compiled_chunk_fns()
        chunk, length = ctx.chunk, u.shape[1]
        A_t = A_t.detach()
        grad_y = torch.zeros_like(u) if grad_y is None else grad_y.contiguous()
        adj = grad_final.contiguous() if grad_final is not None else u.new_zeros(u.shape[0], *A_t.shape)
        grads = [torch.empty_like(t) for t in (u, delta, B, C)]
        grad_A_t = torch.zeros_like(A_t)
        for p0, h in zip(reversed(range(0, length, chunk)), reversed(starts)):
            n = min(chunk, length - p0)
            u_c, delta_c, B_c, C_c, gy_c = (_chunk_of(t, p0, chunk) for t in (u, delta, B, C, grad_y))
            *parts, g_A, adj = backward_fn(u_c, delta_c, B_c, C_c, A_t, h, gy_c, adj)
            for grad, part in zip(grads, parts):
                grad[:, p0 : p0 + n] = part[:, :n]
            grad_A_t += g_A
        return grads[0], grads[1], grad_A_t, grads[2], grads[3], adj, None


BACKENDS = ("auto", "triton", "chunked", "ref")


def _triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device` here, or None; imports triton only when it is installed."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install 'vermeil[gpu]')"
    from vermeil.nn.scan_triton import unavailable_reason

    return unavailable_reason(device)


def _resolve_backend(
    backend: str, tensors: tuple[Tensor | None, ...], *, chunk_size: int | None, compile: bool
) -> str:
    """The backend to run ("triton", "chunked" or "ref") for `backend`, raising naming the reason if it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    u = tensors[0]
    float64 = _compute_dtype(*tensors) == torch.float64
    if backend == "auto":
        return "triton" if u.is_cuda and not float64 and _triton_unavailable(u.device) is None else "chunked"
    if backend in ("triton", "ref") and (compile or chunk_size is not None):
        raise ValueError(f"compile and chunk_size apply to backend='chunked' only, got backend={backend!r}")
    if backend == "triton":
        if float64:
            raise ValueError("backend='triton' computes in float32: float64 inputs need 'chunked' or 'ref'")
        devices = {t.device for t in tensors if t is not None}
        if len(devices) > 1:
            raise ValueError(
                f"backend='triton' needs every tensor on one device, got {sorted(map(str, devices))}"
            )
        reason = _triton_unavailable(u.device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
    return backend


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    *,
    chunk_size: int | None = None,
    compile: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan, fast: Triton kernels on CUDA, a blocked two-level scan elsewhere.

    Same arguments and results as `selective_scan_ref` (equal to it up to float rounding, in outputs and in
    gradients), differentiable in every tensor including `initial_state`, and through the returned final
    state, so a long sequence can be trained in pieces (truncated backpropagation through time) or a prefill
    handed to `selective_step`. See the module docstring for the algorithm and why it was chosen.

    Args:
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state: as
            `selective_scan_ref`; each of u, delta, B, C may also be the transpose of a (B, L, X)-contiguous
            tensor, as models produce them: read without a copy, and y then has u's layout.
        chunk_size: positions processed together (memory knob: the working set is a few
            (chunk_size, B, N, D) tensors). None picks the power of two giving ~2**20 elements, in [16, 1024]
            (8 with `compile`).
        compile: run each chunk's recurrence as one kernel generated by torch.compile (Inductor; needs a C++
            compiler on the CPU): 1.2-2x faster than the eager chunked scan (module notes). The first call per
            dtype and chunk size compiles (seconds; Inductor caches the kernels on disk).
        backend: one of `BACKENDS`. "auto": the Triton kernels (`vermeil.nn.scan_triton`, float32) for CUDA
            inputs, none float64, when triton imports, else "chunked", the blocked scan (the only one that
            takes `chunk_size` and `compile`). "triton" runs on CUDA, or on CPU under TRITON_INTERPRET=1
            (tests), and raises naming the reason elsewhere; "ref" is `selective_scan_ref`.
    """
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    _check_shapes(*tensors)
    check_optional_positive_int("chunk_size", chunk_size)
    backend = _resolve_backend(backend, tensors, chunk_size=chunk_size, compile=compile)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state)
    if backend == "ref":
        return selective_scan_ref(*args)
    if backend == "triton":
        from vermeil.nn.scan_triton import selective_scan_triton  # lazily: triton is an optional extra

        return selective_scan_triton(*args)
    cdt = _compute_dtype(u, delta, A, B, C, initial_state)
    bsz, dim, length = u.shape
    n_state = A.shape[1]
    u_c, B_c, C_c = u.to(cdt), B.to(cdt), C.to(cdt)
    delta_c = _prepare_delta(delta.to(cdt), delta_bias, delta_softplus)
    h0 = u_c.new_zeros(bsz, dim, n_state) if initial_state is None else initial_state.to(cdt)
    h0 = h0.transpose(1, 2).contiguous()  # (B, N, D): the internal layout
    A_t = A.to(cdt).t().contiguous()  # (N, D)
    if compile:
        # (B, L, X)-contiguous: a free transpose for the projections' outputs that MambaBlock passes
        u_l, delta_l, B_l, C_l = (t.transpose(1, 2).contiguous() for t in (u_c, delta_c, B_c, C_c))
        chunk = chunk_size if chunk_size is not None else _COMPILED_CHUNK
        y, final = _CompiledScanFn.apply(u_l, delta_l, A_t, B_l, C_l, h0, chunk)
        y = y.transpose(1, 2)
    else:
        chunk = chunk_size if chunk_size is not None else _auto_chunk_size(bsz, dim, n_state, length)
        u_d, delta_d, B_d, C_d = map(_dense, (u_c, delta_c, B_c, C_c))
        y, final = _SelectiveScanFn.apply(u_d, delta_d, A_t, B_d, C_d, h0, chunk)
    out = _finish(y, u_c, D, z, u.dtype)
    return (out, final.transpose(1, 2)) if return_final_state else out
