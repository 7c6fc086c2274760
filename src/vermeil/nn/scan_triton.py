"""Triton kernels for the selective scan (Mamba-1's S6 recurrence) and their autograd Function.

Same arguments and results as `vermeil.nn.scan.selective_scan_ref` (read it for the recurrence), computed in
float32 whatever the input dtype (float32, bfloat16, float16); y comes back in u.dtype, the final state in
float32. `vermeil.nn.scan.selective_scan(..., backend="auto"|"triton")` calls `selective_scan_triton`; this
module imports without triton (then only `scan_bytes` and the constants are usable).

Design (forward, `_scan_fwd_kernel`):

- Grid (B, cdiv(D, BLOCK_D)): a program per batch row and block of BLOCK_D channels keeps its state, a
  [BLOCK_D, N_pad] float32 tile (N_pad = N rounded up to a power of two, padding masked to A = B = C = 0),
  in registers for the whole sequence.
- Chunks of CHUNK positions: u, delta, z load as [BLOCK_D, CHUNK] tiles and B, C as [N_pad, CHUNK] tiles
  through their strides (MambaBlock's transposed views of (B, L, X)-contiguous tensors are read in place,
  coalesced along D); a = exp2(delta A log2 e) and x = delta u B form [BLOCK_D, N_pad, CHUNK] tiles scanned
  along time by `tl.associative_scan` with (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2) (mamba_ssm's
  `SSMScanOp`); the previous chunk's carry is folded in afterwards (h_t = A_cum_t h_carry + x_cum_t).
  An associative scan, not a per-position loop, because Triton cannot index a register tile by a runtime
  position: a loop would pay a load latency per step on a chain of L steps, where the scan issues CHUNK
  positions' loads at once and spends log2(CHUNK) combine levels of register arithmetic on them.
- Written to HBM: y, the final state, and (only when a gradient will be needed) the float32 state at the
  start of each chunk, (B, D, n_chunks, N). Nothing of shape (B, D, L, N).

Design (backward, `_scan_bwd_kernel`): same grid and tiles, chunks in reverse. A chunk recomputes its states
from its saved start, then scans the adjoint G_t = gy_t C_t + a_{t+1} G_{t+1} with `reverse=True` (a_{t+1}
from a second, shifted load of delta: an L1/L2 hit), the adjoint from the next chunk folded in like the
forward carry. The gradient through exp(delta A) needs a_t h_{t-1} = h_t - x_t: no shifted state (its
rounding error, float32 eps * |x_t|, is below that gradient's other terms). du, ddelta, dz are written per
position; dA, dD, d(delta_bias) are summed in registers and written as per-batch-row partials that torch sums
(deterministic, tiny); dB and dC, sums over all channels, are float32 `tl.atomic_add`s into (B, N, L)
buffers, as mamba_ssm, since per-block partials would cost cdiv(D, BLOCK_D) times the HBM traffic (the add
order makes their last bits nondeterministic); `atomic_bc=False` writes those partials instead (uncontended
atomics into a (B, n_blocks, N, L) buffer that torch sums: deterministic), for a GPU to weigh.

Sources: state-spaces/mamba `csrc/selective_scan/selective_scan_fwd_kernel.cuh` and
`selective_scan_bwd_kernel.cuh` (chunk-boundary states, recomputation in backward, the scan operator,
atomics for dB/dC), `csrc/selective_scan/reverse_scan.cuh` (the reverse adjoint scan);
srush/annotated-mamba `final.py` and sustcsonglin/mamba-triton `triton_sequential_scan.py` (a program per
(batch, channel block) with the state in registers, `tl.associative_scan` over time chunks).

Block sizes are named constants, adjustable per call. They were chosen without a GPU, from ptxas's register
report for sm_90 (Triton 3.9 compiling for an H100/H200 target on a CPU machine; N = 16, all options on,
registers per thread / spilled bytes):

    BLOCK_D x CHUNK, warps    forward      backward
    16 x 32, 4 / 8            255 / 16     255 / 164
    16 x 16, 4 / 8            184 / 0      246 / 0
     8 x 32, 8 / 8            105 / 0      237 / 0   <- the defaults
     8 x 16, 4 / 4             96 / 0      222 / 0
    32 x 16, 8 / 8            180 / 0      255 / 632

8 x 32 spills nothing, and CHUNK 32 halves the chunk-state traffic of CHUNK 16 (4 N / CHUNK bytes per
(b, d, l)). Their time is not measured: the kernels were checked in Triton's interpreter only, and the
associative scan above is argued, not timed; `block_d=`, `chunk=` and `num_warps=` (default NUM_WARPS /
BWD_NUM_WARPS) are the knobs to sweep on a GPU (`bench/gpu.py --only check,scan,sweep`).

Layouts (`selective_scan_triton(..., layout=)`; same arguments, results, saved state and numerics):

- "tile" (the default, described above): a [BLOCK_D, N_pad, CHUNK] tile scanned at once, short chunks.
- "channel" (`_chan_fwd_kernel`, `_chan_bwd_kernel`), organised as mamba_ssm's CUDA kernel: a program per
  (batch, CHANNEL_BLOCK_D channels, 1 by default), long chunks (CHANNEL_CHUNK = 512) of [BLOCK_D, CHUNK]
  tiles, and inside each chunk a loop over the N states (a runtime loop, or unrolled with `unroll_n=True`);
  per state n: the B_n, C_n rows, a = exp2(delta A_n log2 e), one 1-D associative scan along time from the
  carry h[:, n] (the [BLOCK_D, N_pad] carry tile updated with `tl.where(offs_n == n, ...)`), y += C_n h.
  Backward: per state, the forward scan recomputed from the chunk's saved start, the reverse adjoint scan,
  du/ddelta summed over n in registers, dA per (d, n), dB_n/dC_n summed over the program's channels and
  added by float32 atomics or, with `atomic_bc=False`, written as per-channel-block partials that torch sums
  (deterministic; cdiv(D, BLOCK_D) times the dB/dC traffic). ptxas (sm_90, N 16, every option on, runtime
  state loop), registers / spilled bytes, forward and backward: 1 x 512, 4 warps: 96 / 0 and 168 / 8;
  1 x 1024, 4 warps: 157 / 0 and 250 / 0; 4 x 256, 4 warps: 168 / 40 and 255 / 32 (unrolled: 255 / 56 and
  255 / 1180). Untimed: the default stays "tile" until a GPU measures both. With time-major inputs (D
  innermost) a small BLOCK_D reads each 32-byte sector for fewer channels than "tile" does (L2 serves the
  neighbouring programs).
  Sources: state-spaces/mamba `csrc/selective_scan/selective_scan_fwd_kernel.cuh`,
  `selective_scan_bwd_kernel.cuh` (a block per channel, chunks of up to 2048 steps, the sequential loop
  over states with one block scan each, dB/dC atomics).

The interpreter (TRITON_INTERPRET=1, CPU tensors: the tests) evaluates a user-combine
`tl.associative_scan` one element at a time in Python: keep interpreted shapes tiny.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # optional: `pip install "vermeil[gpu]"`
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by installs without triton
    triton = None
    tl = None

__all__ = ["BLOCK_D", "CHUNK", "NUM_WARPS", "TILE_ELEMENTS", "scan_bytes", "selective_scan_triton"]

# Channels per program and positions per chunk (module docstring: why). BLOCK_D shrinks as N grows so that one
# [BLOCK_D, N_pad, CHUNK] tile stays near TILE_ELEMENTS floats (register budget); these are the values for N = 16.
BLOCK_D = 8
CHUNK = 32
TILE_ELEMENTS = BLOCK_D * 16 * CHUNK
MIN_BLOCK_D, MAX_BLOCK_D = 4, 64
NUM_WARPS = 8
BWD_NUM_WARPS = 8
# The "channel" layout (module docstring): [BLOCK_D, CHUNK] tiles, a long chunk, a loop over the N states.
CHANNEL_BLOCK_D = 1
CHANNEL_CHUNK = 512
CHANNEL_NUM_WARPS = 4

# Set at import: the @triton.jit decorators below read TRITON_INTERPRET when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _n_pad(n_state: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n_state)))


def block_d_for(n_state: int, chunk: int = CHUNK) -> int:
    """Channels per program for state size N: a power of two in [MIN_BLOCK_D, MAX_BLOCK_D]."""
    per = TILE_ELEMENTS // (_n_pad(n_state) * chunk)
    return max(MIN_BLOCK_D, min(MAX_BLOCK_D, 1 << max(0, int(math.log2(max(1, per))))))


def scan_bytes(
    batch: int, dim: int, length: int, n_state: int, dtype: torch.dtype, *, backward: bool, chunk: int = CHUNK
) -> int:
    """HBM bytes one forward (or one backward) call of the Triton scan moves, for a bandwidth report.

    Counts each tensor once (B, C and the shifted delta are re-read by other channel blocks from L2), with
    z, D and delta_bias present (as in Mamba) and B, C in `dtype`; e is the element size of `dtype`; chunk:
    the kernel's chunk length (the saved chunk-start states), CHANNEL_CHUNK for the "channel" defaults.
    """
    e = torch.empty((), dtype=dtype).element_size()
    n_chunks = -(-length // chunk)
    bdl, bnl, bdn = batch * dim * length, batch * n_state * length, batch * dim * n_state
    small = dim * n_state * 4 + 2 * dim * 4  # A, D, delta_bias
    if not backward:  # u, delta, z read, y written; B, C read; chunk states, h0, final state
        return 4 * e * bdl + 2 * e * bnl + 4 * bdn * (n_chunks + 2) + small
    # u, delta, z, dy read; du, ddelta, dz written; B, C read; dB, dC float32 (atomics, written back once);
    # chunk states read; d(initial_state), dA partials written, d(final state) read; dD, dbias partials
    return 7 * e * bdl + (2 * e + 2 * 4) * bnl + 4 * bdn * (n_chunks + 3) + 2 * 4 * batch * dim + small


if triton is not None:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        """(a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2."""
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _softplus(v):
        """log(1 + exp(v)) without overflow, with log1p's accuracy for large negative v (Goldberg's trick)."""
        e = tl.exp(-tl.abs(v))
        one_e = 1.0 + e
        log1p = tl.where(one_e == 1.0, e, tl.log(one_e) * e / (one_e - 1.0))
        return tl.maximum(v, 0.0) + log1p

    @triton.jit
    def _sigmoid(v):
        return 1.0 / (1.0 + tl.exp(-v))

    @triton.jit
    def _load_tile(ptr, s_b, s_row, s_t, pid_b, rows, t, mask):
        """A [rows, CHUNK] tile of a (B, X, L) tensor at batch pid_b, positions t, in float32.

        Cast right after the load: bf16 arithmetic is wrong in Triton's interpreter (casts are right).
        """
        offs = pid_b * s_b + rows[:, None] * s_row + t[None, :] * s_t
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _store_tile(ptr, s_b, s_row, s_t, pid_b, rows, t, value, mask):
        offs = pid_b * s_b + rows[:, None] * s_row + t[None, :] * s_t
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_delta(
        ptr, s_b, s_d, s_l, pid_b, offs_d, t, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr
    ):
        """delta (+ bias), softplus'ed if asked; zero where masked (an identity step). Returns (delta, pre)."""
        pre = _load_tile(ptr, s_b, s_d, s_l, pid_b, offs_d, t, mask)
        if HAS_BIAS:
            pre = pre + bias[:, None]
        dt = pre
        if SOFTPLUS:
            dt = _softplus(pre)
        return tl.where(mask, dt, 0.0), pre

    @triton.jit
    def _chunk_states(dt, u, b, A2, h):
        """States after each position of a chunk from the state h before it: ([BLOCK_D, BLOCK_N, CHUNK], x).

        dt, u: [BLOCK_D, CHUNK]; b: [BLOCK_N, CHUNK]; A2 = A log2(e): [BLOCK_D, BLOCK_N]; h: [BLOCK_D, BLOCK_N].
        Also returns x = dt u B, the input term of each step.
        """
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])
        x = (dt * u)[:, None, :] * b[None, :, :]
        a_cum, x_cum = tl.associative_scan((a, x), axis=2, combine_fn=_combine)
        return a_cum * h[:, :, None] + x_cum, x

    @triton.jit
    def _at(tile, offs_t, position):
        """tile[:, :, position] of a [BLOCK_D, BLOCK_N, CHUNK] tile (registers cannot be indexed directly)."""
        return tl.sum(tl.where(offs_t[None, None, :] == position, tile, 0.0), axis=2)

    @triton.jit
    def _program_tiles(A_ptr, s_ad, s_an, bias_ptr, D_ptr, h_ptr, dim, n_state, n_chunks,
                       HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_H: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """This program's batch row, channels and states (offsets, masks), its A, delta_bias and D
        (zeros if absent), the offsets of its tiles of the (B, D, N) states and (B, D, n_chunks, N) chunk
        states (float32, contiguous), and the state tile read from h_ptr (zeros without HAS_H)."""
        pid_b = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < dim
        mask_n = offs_n < n_state
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mask_dn, other=0.0)
        A = A.to(tl.float32)
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        d_skip = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_D:
            d_skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        state_offs = pid_b * dim * n_state + offs_d[:, None] * n_state + offs_n[None, :]
        chunk_offs = (pid_b * dim + offs_d[:, None]) * n_chunks * n_state + offs_n[None, :]
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        if HAS_H:
            h = tl.load(h_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
        return pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn, A, bias, d_skip, state_offs, chunk_offs, h

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
        y_ptr, hlast_ptr, hchunk_ptr,
        dim, length, n_state, n_chunks,
        s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
        s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
        s_zb, s_zd, s_zl, s_yb, s_yd, s_yl,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
        SOFTPLUS: tl.constexpr, SAVE_CHUNKS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn, A, bias, d_skip, state_offs, chunk_offs, h = (
            _program_tiles(A_ptr, s_ad, s_an, bias_ptr, D_ptr, h0_ptr, dim, n_state, n_chunks,
                           HAS_BIAS, HAS_D, HAS_H0, BLOCK_D, BLOCK_N)
        )  # fmt: skip
        A2 = A * 1.4426950408889634  # exp(x A) = exp2(x A log2 e)
        offs_t = tl.arange(0, CHUNK)
        for c in range(0, n_chunks):
            if SAVE_CHUNKS:
                tl.store(hchunk_ptr + chunk_offs + c * n_state, h, mask=mask_dn)
            t = c * CHUNK + offs_t
            mask_t = t < length
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_nt = mask_n[:, None] & mask_t[None, :]
            u = _load_tile(u_ptr, s_ub, s_ud, s_ul, pid_b, offs_d, t, mask_dt)
            dt, _ = _load_delta(
                delta_ptr, s_db, s_dd, s_dl, pid_b, offs_d, t, mask_dt, bias, HAS_BIAS, SOFTPLUS
            )
            b = _load_tile(B_ptr, s_bb, s_bn, s_bl, pid_b, offs_n, t, mask_nt)
            cc = _load_tile(C_ptr, s_cb, s_cn, s_cl, pid_b, offs_n, t, mask_nt)
            hs, _ = _chunk_states(dt, u, b, A2, h)
            y = tl.sum(hs * cc[None, :, :], axis=1)  # (BLOCK_D, CHUNK)
            h = _at(hs, offs_t, CHUNK - 1)  # padded positions are identity steps
            if HAS_D:
                y += d_skip[:, None] * u
            if HAS_Z:
                z = _load_tile(z_ptr, s_zb, s_zd, s_zl, pid_b, offs_d, t, mask_dt)
                y = y * z * _sigmoid(z)
            _store_tile(y_ptr, s_yb, s_yd, s_yl, pid_b, offs_d, t, y, mask_dt)
        tl.store(hlast_ptr + state_offs, h, mask=mask_dn)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hchunk_ptr, dy_ptr, dlast_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
        dim, length, n_state, n_chunks,
        s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
        s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
        s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
        s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl, s_bcb, s_bcd,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
        SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        # g: adjoint of the state after the chunk being processed, entering through its last step
        pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn, A, bias, d_skip, state_offs, chunk_offs, g = (
            _program_tiles(A_ptr, s_ad, s_an, bias_ptr, D_ptr, dlast_ptr, dim, n_state, n_chunks,
                           HAS_BIAS, HAS_D, HAS_DLAST, BLOCK_D, BLOCK_N)
        )  # fmt: skip
        A2 = A * 1.4426950408889634
        offs_t = tl.arange(0, CHUNK)
        dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(0, n_chunks):
            c = n_chunks - 1 - i
            t = c * CHUNK + offs_t
            mask_t = t < length
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_nt = mask_n[:, None] & mask_t[None, :]
            u = _load_tile(u_ptr, s_ub, s_ud, s_ul, pid_b, offs_d, t, mask_dt)
            dt, pre = _load_delta(
                delta_ptr, s_db, s_dd, s_dl, pid_b, offs_d, t, mask_dt, bias, HAS_BIAS, SOFTPLUS
            )
            # a_{t+1}: the decay that carries G_{t+1} back to h_t; 1 past the last position
            mask_dt1 = mask_d[:, None] & (t + 1 < length)[None, :]
            dt1, _ = _load_delta(
                delta_ptr, s_db, s_dd, s_dl, pid_b, offs_d, t + 1, mask_dt1, bias, HAS_BIAS, SOFTPLUS
            )
            a1 = tl.exp2(dt1[:, None, :] * A2[:, :, None])
            b = _load_tile(B_ptr, s_bb, s_bn, s_bl, pid_b, offs_n, t, mask_nt)
            cc = _load_tile(C_ptr, s_cb, s_cn, s_cl, pid_b, offs_n, t, mask_nt)
            dy = _load_tile(dy_ptr, s_gb, s_gd, s_gl, pid_b, offs_d, t, mask_dt)
            # recompute the chunk's states from its saved start
            h = tl.load(hchunk_ptr + chunk_offs + c * n_state, mask=mask_dn, other=0.0)
            hs, x = _chunk_states(dt, u, b, A2, h)
            gy = dy  # gradient of y before gating: (y_ssm + D u) * silu(z)
            if HAS_Z:
                z = _load_tile(z_ptr, s_zb, s_zd, s_zl, pid_b, offs_d, t, mask_dt)
                sig = _sigmoid(z)
                y = tl.sum(hs * cc[None, :, :], axis=1) + d_skip[:, None] * u
                dz = dy * y * sig * (1.0 + z * (1.0 - sig))
                _store_tile(dz_ptr, s_dzb, s_dzd, s_dzl, pid_b, offs_d, t, dz, mask_dt)
                gy = dy * z * sig
            gy = tl.where(mask_dt, gy, 0.0)
            # adjoint: G_t = gy_t C_t + a_{t+1} G_{t+1}, scanned backwards from the carry g
            a1_cum, g_loc = tl.associative_scan(
                (a1, gy[:, None, :] * cc[None, :, :]), axis=2, combine_fn=_combine, reverse=True
            )
            G = tl.where(mask_t[None, None, :], a1_cum * g[:, :, None] + g_loc, 0.0)
            g = _at(G, offs_t, 0)  # G at the chunk's first position: the carry into the previous chunk
            q = G * (hs - x)  # G_t a_t h_{t-1}: the gradient through exp(delta_t A)
            s = tl.sum(G * b[None, :, :], axis=1)  # (BLOCK_D, CHUNK): sum_n G_t B_t
            ddt = u * s + tl.sum(q * A[:, :, None], axis=1)
            if SOFTPLUS:
                ddt = ddt * _sigmoid(pre)
            ddt = tl.where(mask_dt, ddt, 0.0)
            dA_acc += tl.sum(q * dt[:, None, :], axis=2)
            dD_acc += tl.sum(gy * u, axis=1)
            dbias_acc += tl.sum(ddt, axis=1)
            _store_tile(du_ptr, s_dub, s_dud, s_dul, pid_b, offs_d, t, dt * s + d_skip[:, None] * gy, mask_dt)
            _store_tile(ddelta_ptr, s_ddb, s_ddd, s_ddl, pid_b, offs_d, t, ddt, mask_dt)
            # dB, dC sum over every channel: float32 atomics into (B, N, L) buffers
            # (atomics into (B, N, L) buffers; with s_bcd != 0, uncontended into (B, n_blocks, N, L) partials)
            bc_offs = pid_b * s_bcb + tl.program_id(1) * s_bcd + offs_n[:, None] * length + t[None, :]
            tl.atomic_add(dB_ptr + bc_offs, tl.sum(G * (dt * u)[:, None, :], axis=0), mask=mask_nt)
            tl.atomic_add(dC_ptr + bc_offs, tl.sum(hs * gy[:, None, :], axis=0), mask=mask_nt)
        # d(initial state) = a_0 G_0 (g is G_0 now; with L == 0 it is the final state's gradient)
        mask_0 = mask_d[:, None] & ((offs_t < 1) & (offs_t < length))[None, :]
        dt0, _ = _load_delta(
            delta_ptr, s_db, s_dd, s_dl, pid_b, offs_d, offs_t, mask_0, bias, HAS_BIAS, SOFTPLUS
        )
        dt0 = tl.sum(dt0, axis=1)  # delta at position 0 (zero elsewhere, and 0 for L == 0: a_0 = 1)
        tl.store(dh0_ptr + state_offs, tl.exp2(dt0[:, None] * A2) * g, mask=mask_dn)
        tl.store(dA_ptr + state_offs, dA_acc, mask=mask_dn)
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
        tl.store(dbias_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)

    @triton.jit
    def _pick(tile, offs, i):
        """tile[:, i] of a 2-D register tile (registers cannot be indexed directly)."""
        return tl.sum(tl.where(offs[None, :] == i, tile, 0.0), axis=1)

    @triton.jit
    def _load_row(ptr, s_b, s_n, s_t, pid_b, n, n_state, t, mask_t):
        """Row n of a (B, N, L) tensor at positions t, float32 (zeros past N or L)."""
        return tl.load(
            ptr + pid_b * s_b + n * s_n + t * s_t, mask=mask_t & (t * 0 + n < n_state), other=0.0
        ).to(tl.float32)

    @triton.jit
    def _chan_fwd_state(n, B_ptr, C_ptr, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, pid_b, n_state, t, mask_t, offs_n,
                        offs_t, dt, du, A2, h, y, CHUNK: tl.constexpr):  # fmt: skip
        """State n over one chunk: its 1-D scan from the carry h[:, n]; returns (y + C_n h_n, h updated)."""
        b = _load_row(B_ptr, s_bb, s_bn, s_bl, pid_b, n, n_state, t, mask_t)
        cc = _load_row(C_ptr, s_cb, s_cn, s_cl, pid_b, n, n_state, t, mask_t)
        a = tl.exp2(dt * _pick(A2, offs_n, n)[:, None])
        a_cum, x_cum = tl.associative_scan((a, du * b[None, :]), axis=1, combine_fn=_combine)
        hs = a_cum * _pick(h, offs_n, n)[:, None] + x_cum
        h = tl.where(offs_n[None, :] == n, _pick(hs, offs_t, CHUNK - 1)[:, None], h)
        return y + hs * cc[None, :], h

    @triton.jit
    def _chan_bwd_state(n, B_ptr, C_ptr, dB_ptr, dC_ptr, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, pid_b, n_state,
                        length, t, mask_t, offs_n, offs_t, dt, dt1, du, gy, A, A2, h, g, y, s, qa, dA_acc,
                        bc_base, HAS_Z: tl.constexpr, ATOMIC_BC: tl.constexpr):  # fmt: skip
        """State n over one chunk, backward: the forward scan recomputed from the chunk's start h[:, n], the
        reverse adjoint scan from the carry g[:, n]; adds to y (with HAS_Z), s = sum_n G B,
        qa = sum_n G a h_prev A and dA, writes dB/dC row n; returns (y, s, qa, g, dA_acc)."""
        b = _load_row(B_ptr, s_bb, s_bn, s_bl, pid_b, n, n_state, t, mask_t)
        cc = _load_row(C_ptr, s_cb, s_cn, s_cl, pid_b, n, n_state, t, mask_t)
        A2_n = _pick(A2, offs_n, n)[:, None]
        x = du * b[None, :]
        a_cum, x_cum = tl.associative_scan((tl.exp2(dt * A2_n), x), axis=1, combine_fn=_combine)
        hs = a_cum * _pick(h, offs_n, n)[:, None] + x_cum
        if HAS_Z:
            y += hs * cc[None, :]
        a1_cum, g_loc = tl.associative_scan(
            (tl.exp2(dt1 * A2_n), gy * cc[None, :]), axis=1, combine_fn=_combine, reverse=True
        )
        G = tl.where(mask_t[None, :], a1_cum * _pick(g, offs_n, n)[:, None] + g_loc, 0.0)
        g = tl.where(offs_n[None, :] == n, _pick(G, offs_t, 0)[:, None], g)
        q = G * (hs - x)
        s += G * b[None, :]
        qa += q * _pick(A, offs_n, n)[:, None]
        dA_acc += tl.where(offs_n[None, :] == n, tl.sum(q * dt, axis=1)[:, None], 0.0)
        mask_bc = mask_t & (t * 0 + n < n_state)  # a vector: the interpreter's masks cannot be bools
        dB_n = tl.sum(G * du, axis=0)
        dC_n = tl.sum(hs * gy, axis=0)
        if ATOMIC_BC:
            tl.atomic_add(dB_ptr + bc_base + n * length + t, dB_n, mask=mask_bc)
            tl.atomic_add(dC_ptr + bc_base + n * length + t, dC_n, mask=mask_bc)
        else:
            tl.store(dB_ptr + bc_base + n * length + t, dB_n, mask=mask_bc)
            tl.store(dC_ptr + bc_base + n * length + t, dC_n, mask=mask_bc)
        return y, s, qa, g, dA_acc

    @triton.jit
    def _chan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
        y_ptr, hlast_ptr, hchunk_ptr,
        dim, length, n_state, n_chunks,
        s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
        s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
        s_zb, s_zd, s_zl, s_yb, s_yd, s_yl,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
        SOFTPLUS: tl.constexpr, SAVE_CHUNKS: tl.constexpr, UNROLL_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        """The "channel" layout: [BLOCK_D, CHUNK] tiles, one 1-D scan along time per state n (module docstring)."""
        pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn, A, bias, d_skip, state_offs, chunk_offs, h = (
            _program_tiles(A_ptr, s_ad, s_an, bias_ptr, D_ptr, h0_ptr, dim, n_state, n_chunks,
                           HAS_BIAS, HAS_D, HAS_H0, BLOCK_D, BLOCK_N)
        )  # fmt: skip
        A2 = A * 1.4426950408889634
        offs_t = tl.arange(0, CHUNK)
        for c in range(0, n_chunks):
            if SAVE_CHUNKS:
                tl.store(hchunk_ptr + chunk_offs + c * n_state, h, mask=mask_dn)
            t = c * CHUNK + offs_t
            mask_t = t < length
            mask_dt = mask_d[:, None] & mask_t[None, :]
            u = _load_tile(u_ptr, s_ub, s_ud, s_ul, pid_b, offs_d, t, mask_dt)
            dt, _ = _load_delta(
                delta_ptr, s_db, s_dd, s_dl, pid_b, offs_d, t, mask_dt, bias, HAS_BIAS, SOFTPLUS
            )
            du = dt * u
            y = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)
            if UNROLL_N:  # the N scans unrolled (independent: the compiler may interleave them)
                for n in tl.static_range(BLOCK_N):
                    y, h = _chan_fwd_state(n, B_ptr, C_ptr, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, pid_b, n_state,
                                           t, mask_t, offs_n, offs_t, dt, du, A2, h, y, CHUNK)  # fmt: skip
            else:  # one state after the other, as mamba_ssm (fewer live registers)
                for n in range(0, n_state):
                    y, h = _chan_fwd_state(n, B_ptr, C_ptr, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, pid_b, n_state,
                                           t, mask_t, offs_n, offs_t, dt, du, A2, h, y, CHUNK)  # fmt: skip
            if HAS_D:
                y += d_skip[:, None] * u
            if HAS_Z:
                z = _load_tile(z_ptr, s_zb, s_zd, s_zl, pid_b, offs_d, t, mask_dt)
                y = y * z * _sigmoid(z)
            _store_tile(y_ptr, s_yb, s_yd, s_yl, pid_b, offs_d, t, y, mask_dt)
        tl.store(hlast_ptr + state_offs, h, mask=mask_dn)

    @triton.jit
    def _chan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hchunk_ptr, dy_ptr, dlast_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
        dim, length, n_state, n_chunks,
        s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
        s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
        s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
        s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
        SOFTPLUS: tl.constexpr, ATOMIC_BC: tl.constexpr, UNROLL_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        """Backward of `_chan_fwd_kernel`: chunks in reverse; per state n, the chunk's forward scan recomputed
        from its saved start, then the reverse adjoint scan; du, ddelta, dz summed over n in registers."""
        pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn, A, bias, d_skip, state_offs, chunk_offs, g = (
            _program_tiles(A_ptr, s_ad, s_an, bias_ptr, D_ptr, dlast_ptr, dim, n_state, n_chunks,
                           HAS_BIAS, HAS_D, HAS_DLAST, BLOCK_D, BLOCK_N)
        )  # fmt: skip
        A2 = A * 1.4426950408889634
        offs_t = tl.arange(0, CHUNK)
        # dB/dC: atomics into (B, N, L), or this channel block's own slice of (B, n_blocks, N, L) partials
        bc_base = pid_b * n_state * length
        if not ATOMIC_BC:
            bc_base = (pid_b * tl.num_programs(1) + tl.program_id(1)) * n_state * length
        dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(0, n_chunks):
            c = n_chunks - 1 - i
            t = c * CHUNK + offs_t
            mask_t = t < length
            mask_dt = mask_d[:, None] & mask_t[None, :]
            u = _load_tile(u_ptr, s_ub, s_ud, s_ul, pid_b, offs_d, t, mask_dt)
            dt, pre = _load_delta(
                delta_ptr, s_db, s_dd, s_dl, pid_b, offs_d, t, mask_dt, bias, HAS_BIAS, SOFTPLUS
            )
            mask_dt1 = mask_d[:, None] & (t + 1 < length)[None, :]
            dt1, _ = _load_delta(
                delta_ptr, s_db, s_dd, s_dl, pid_b, offs_d, t + 1, mask_dt1, bias, HAS_BIAS, SOFTPLUS
            )
            dy = _load_tile(dy_ptr, s_gb, s_gd, s_gl, pid_b, offs_d, t, mask_dt)
            gy = dy
            if HAS_Z:
                z = _load_tile(z_ptr, s_zb, s_zd, s_zl, pid_b, offs_d, t, mask_dt)
                sig = _sigmoid(z)
                gy = dy * z * sig
            gy = tl.where(mask_dt, gy, 0.0)
            h = tl.load(hchunk_ptr + chunk_offs + c * n_state, mask=mask_dn, other=0.0)
            du = dt * u
            y = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)
            s = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)  # sum_n G_t B_t
            qa = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)  # sum_n G_t a_t h_{t-1} A
            if UNROLL_N:
                for n in tl.static_range(BLOCK_N):
                    y, s, qa, g, dA_acc = _chan_bwd_state(
                        n, B_ptr, C_ptr, dB_ptr, dC_ptr, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, pid_b, n_state,
                        length, t, mask_t, offs_n, offs_t, dt, dt1, du, gy, A, A2, h, g, y, s, qa, dA_acc,
                        bc_base, HAS_Z, ATOMIC_BC)  # fmt: skip
            else:
                for n in range(0, n_state):
                    y, s, qa, g, dA_acc = _chan_bwd_state(
                        n, B_ptr, C_ptr, dB_ptr, dC_ptr, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, pid_b, n_state,
                        length, t, mask_t, offs_n, offs_t, dt, dt1, du, gy, A, A2, h, g, y, s, qa, dA_acc,
                        bc_base, HAS_Z, ATOMIC_BC)  # fmt: skip
            if HAS_Z:
                y += d_skip[:, None] * u
                dz = dy * y * sig * (1.0 + z * (1.0 - sig))
                _store_tile(dz_ptr, s_dzb, s_dzd, s_dzl, pid_b, offs_d, t, dz, mask_dt)
            ddt = u * s + qa
            if SOFTPLUS:
                ddt = ddt * _sigmoid(pre)
            ddt = tl.where(mask_dt, ddt, 0.0)
            dD_acc += tl.sum(gy * u, axis=1)
            dbias_acc += tl.sum(ddt, axis=1)
            _store_tile(du_ptr, s_dub, s_dud, s_dul, pid_b, offs_d, t, dt * s + d_skip[:, None] * gy, mask_dt)
            _store_tile(ddelta_ptr, s_ddb, s_ddd, s_ddl, pid_b, offs_d, t, ddt, mask_dt)
        mask_0 = mask_d[:, None] & ((offs_t < 1) & (offs_t < length))[None, :]
        dt0, _ = _load_delta(
            delta_ptr, s_db, s_dd, s_dl, pid_b, offs_d, offs_t, mask_0, bias, HAS_BIAS, SOFTPLUS
        )
        dt0 = tl.sum(dt0, axis=1)
        tl.store(dh0_ptr + state_offs, tl.exp2(dt0[:, None] * A2) * g, mask=mask_dn)
        tl.store(dA_ptr + state_offs, dA_acc, mask=mask_dn)
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
        tl.store(dbias_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)


def _empty_like_layout(x: Tensor) -> Tensor:
    """An empty (B, X, L) tensor laid out like x: time-major (D innermost) when x is, else (B, X, L)-contiguous."""
    if x.stride(1) == 1 and x.stride(2) != 1:
        return x.new_empty(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2)
    return x.new_empty(x.shape)


class SelectiveScanTritonFn(torch.autograd.Function):
    """The whole selective scan (bias, softplus, D, z included) as one forward and one backward kernel."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        initial_state: Tensor | None,
        delta_softplus: bool,
        block_d: int,
        chunk: int,
        layout: str = "tile",
        num_warps: int | None = None,
        atomic_bc: bool = True,
        unroll_n: bool = False,
    ) -> tuple[Tensor, Tensor]:
        bsz, dim, length = u.shape
        n_state = A.shape[1]
        n_chunks = -(-length // chunk)
        inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        save = any(t is not None and t.requires_grad for t in inputs)
        y = _empty_like_layout(u)
        h_last = u.new_empty(bsz, dim, n_state, dtype=torch.float32)
        # without a backward to come, the kernel saves nothing (it still needs a real pointer: h_last)
        h_chunks = u.new_empty(bsz, dim, n_chunks, n_state, dtype=torch.float32) if save else h_last
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        zz = z if z is not None else u
        grid = (bsz, triton.cdiv(dim, block_d))
        kernel, extra = (
            (_scan_fwd_kernel, {}) if layout == "tile" else (_chan_fwd_kernel, {"UNROLL_N": unroll_n})
        )
        kernel[grid](
            u, delta, A, B, C, D if D is not None else u, zz, delta_bias if delta_bias is not None else u,
            h0 if h0 is not None else h_last, y, h_last, h_chunks,
            dim, length, n_state, n_chunks,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zz.stride(), *y.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=h0 is not None,
            SOFTPLUS=bool(delta_softplus), SAVE_CHUNKS=save, **extra,
            BLOCK_D=block_d, BLOCK_N=_n_pad(n_state), CHUNK=chunk, num_warps=num_warps or NUM_WARPS,
        )  # fmt: skip
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h_chunks)
            ctx.softplus, ctx.block_d, ctx.chunk = bool(delta_softplus), block_d, chunk
            ctx.layout, ctx.num_warps, ctx.atomic_bc = layout, num_warps, atomic_bc
            ctx.unroll_n = unroll_n
            ctx.state_dtype = initial_state.dtype if initial_state is not None else None
        return y, h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor | None, dlast: Tensor | None):  # type: ignore[override]
        u, delta, A, B, C, D, z, delta_bias, h_chunks = saved = ctx.saved_tensors
        bsz, dim, length = u.shape
        n_state = A.shape[1]
        if dy is None:
            dy = torch.zeros_like(u)
        dlast = dlast.float().contiguous() if dlast is not None else None
        du, ddelta = _empty_like_layout(u), _empty_like_layout(delta)
        dz = _empty_like_layout(z) if z is not None else du
        f32 = {"dtype": torch.float32, "device": u.device}
        dA, dh0 = torch.empty(bsz, dim, n_state, **f32), torch.empty(bsz, dim, n_state, **f32)
        n_blocks = triton.cdiv(dim, ctx.block_d)
        bc_shape = (bsz, n_state, length) if ctx.atomic_bc else (bsz, n_blocks, n_state, length)
        dB, dC = torch.zeros(bc_shape, **f32), torch.zeros(bc_shape, **f32)
        dD, dbias = torch.empty(bsz, dim, **f32), torch.empty(bsz, dim, **f32)  # per batch row, summed below
        zz = z if z is not None else u
        grid = (bsz, n_blocks)
        # the arguments only one layout's kernel takes: the tile kernel's dB/dC strides (s_bcd 0 sums every
        # channel block into one (B, N, L) buffer), the channel kernel's switches
        if ctx.layout == "tile":
            layout_args = {"s_bcb": dB.stride(0), "s_bcd": 0 if ctx.atomic_bc else dB.stride(1)}
        else:
            layout_args = {"ATOMIC_BC": ctx.atomic_bc, "UNROLL_N": ctx.unroll_n}
        (_scan_bwd_kernel if ctx.layout == "tile" else _chan_bwd_kernel)[grid](
            u, delta, A, B, C, D if D is not None else u, zz, delta_bias if delta_bias is not None else u,
            h_chunks, dy, dlast if dlast is not None else dh0,
            du, ddelta, dz, dA, dB, dC, dD, dbias, dh0,
            dim, length, n_state, h_chunks.shape[2],
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zz.stride(), *dy.stride(),
            *du.stride(), *ddelta.stride(), *dz.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_DLAST=dlast is not None,
            SOFTPLUS=ctx.softplus, **layout_args,
            BLOCK_D=ctx.block_d, BLOCK_N=_n_pad(n_state), CHUNK=ctx.chunk,
            num_warps=ctx.num_warps or BWD_NUM_WARPS,
        )  # fmt: skip
        if not ctx.atomic_bc:  # per-channel-block partials (deterministic)
            dB, dC = dB.sum(1), dC.sum(1)
        grads = (du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dz, dbias.sum(0), dh0)  # dA, dD, dbias: tiny sums
        dtypes = [None if t is None else t.dtype for t in saved[:8]] + [ctx.state_dtype]
        need = ctx.needs_input_grad
        return (*(g.to(dt) if n else None for g, dt, n in zip(grads, dtypes, need)), *[None] * 7)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton scan cannot run on tensors of `device` in this process, or None if it can."""
    if triton is None:
        return "the triton package is not installed (pip install 'vermeil[gpu]')"
    if device.type == "cuda":
        return "TRITON_INTERPRET=1 is set, which runs kernels on CPU tensors only" if INTERPRETED else None
    if device.type == "cpu" and not INTERPRETED:
        return (
            "tensors are on the CPU, where Triton runs only in its interpreter: set TRITON_INTERPRET=1 before "
            "vermeil.nn.scan_triton is imported (tests do), or use backend='chunked'"
        )
    if device.type == "cpu":
        return None
    return f"Triton kernels run on CUDA tensors, got device {device}"


def selective_scan_triton(
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
    block_d: int | None = None,
    chunk: int | None = None,
    layout: str = "tile",
    num_warps: int | None = None,
    atomic_bc: bool = True,
    unroll_n: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan by the Triton kernels: arguments and results of `selective_scan_ref`.

    Shapes are checked by the caller (`vermeil.nn.scan.selective_scan`). block_d (channels per program)
    and chunk (positions per associative scan) must be powers of two; None picks `block_d_for(N)` and CHUNK
    for layout "tile" (the default), CHANNEL_BLOCK_D and CHANNEL_CHUNK for "channel" (module docstring).
    num_warps: None for NUM_WARPS / BWD_NUM_WARPS (tile) or CHANNEL_NUM_WARPS. atomic_bc=False writes dB/dC
    as per-channel-block partials summed by torch instead of contended float32 atomics (deterministic);
    unroll_n=True unrolls the loop over the N states ("channel" only; a runtime loop by default).
    """
    reason = unavailable_reason(u.device)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    if layout not in ("tile", "channel"):
        raise ValueError(f"layout={layout!r}: expected 'tile' or 'channel'")
    if unroll_n and layout != "channel":
        raise ValueError(f"unroll_n=True applies to layout='channel' only (got layout={layout!r})")
    if layout == "channel":
        chunk = CHANNEL_CHUNK if chunk is None else chunk
        block_d = CHANNEL_BLOCK_D if block_d is None else block_d
        num_warps = CHANNEL_NUM_WARPS if num_warps is None else num_warps
    chunk = CHUNK if chunk is None else chunk
    block_d = block_d_for(A.shape[1], chunk) if block_d is None else block_d
    for name, value in (("block_d", block_d), ("chunk", chunk)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value} must be a power of two")
    if u.numel() == 0:  # nothing to scan (and no zero-size buffers for the kernels): the loop is exact
        from vermeil.nn.scan import selective_scan_ref

        args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state)
        return selective_scan_ref(*args)
    y, last = SelectiveScanTritonFn.apply(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        initial_state,
        delta_softplus,
        block_d,
        chunk,
        layout,
        num_warps,
        atomic_bc,
        unroll_n,
    )
    return (y, last) if return_final_state else y
