"""Benchmark: Vermeil's Attention block against bare SDPA, a plain matmul-softmax block and x-transformers.

All implementations run in ONE process on the same random inputs and the same projection weights (copied from
the Vermeil module; a parity check at a small size runs first), at B=2, 8 heads of 64 (dim 512), T=1024 and 4096:

    vermeil   vermeil.nn.Attention (backend "sdpa")
    sdpa      the floor: the same four projections around one F.scaled_dot_product_attention call with
              is_causal=True (enable_gqa for GQA) and, in masked cases, a bool mask built inline in the call
              holding only the non-causal part: torch 2.13's CPU flash kernel takes a mask and is_causal
              together (SDPA documents them as exclusive), and with is_causal it skips the blocks above the
              diagonal, twice as fast as a folded causal mask
    folded    masked cases only: the documented SDPA form, the causal part folded into one bool mask
    plain     matmul -> masked_fill -> softmax -> matmul (materialises B x H x T x S), K/V heads repeated
    xt        x_transformers.Attention(dim=512, dim_head=64, heads=8, causal=True, flash=True[, kv_heads])

Cases: causal MHA; causal GQA (kv_heads=2); causal + key padding (row 1: last quarter padded); causal sliding
window 256; causal chunked 512 (Llama 4). Modes: "fwd" (inference, under no_grad) and "fwd+bwd" (a forward with
autograd, then backward of a fixed random output gradient into the parameters).

Timing: medians of `reps` runs after a warm-up run and a memory run, implementations interleaved run by run so
that a load change hits them all alike. Memory: one untimed run is profiled with `torch.profiler`
(profile_memory=True); its CPU allocator events (allocations and frees, in time order) are summed, and the peak of the running sum is
the peak of memory allocated during the call beyond what was live before it (inputs and weights excluded).

To keep the run to a few minutes, at T=4096 the anchors and "folded" run once for memory and once timed (no
warm-up, no median), and the plain path (GBs of scores) runs for the causal case only.

Usage: python bench/attention.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from vermeil.nn.attention import Attention, _cpu_flash_combines_mask_and_causal

FAST = _cpu_flash_combines_mask_and_causal()

DIM, HEADS, DH, BATCH = 512, 8, 64, 2
ANCHORS = ("plain", "xt")
FEW_RUNS = ("plain", "xt", "folded")  # at T=4096: one memory run and one timed run
CLOCK: list[Callable[[], float]] = [time.perf_counter]  # set by --clock


@dataclass(frozen=True)
class Case:
    name: str
    t: int
    kv_heads: int = HEADS
    padding: bool = False
    window: int | None = None
    chunk: int | None = None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C++ writes to fd 2 (the profiler's USDT start/stop lines) so the table stays readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak of memory allocated during fn() beyond what was live before, from the profiler's allocator events."""
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))  # frees are negative
        stack.extend(node.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak / 2**20


def inline_mask(case: Case, kpm: Tensor | None, *, causal: bool = True) -> Tensor:
    """The (B|1, 1, T, T) bool mask a user of bare SDPA writes by hand (causal folded in, or left out)."""
    local = case.window is not None or case.chunk is not None
    if not causal and not local and kpm is not None:
        return kpm[:, None, None, :]  # padding beside is_causal: (B, 1, 1, S) only
    i = torch.arange(case.t)
    q, k = i[:, None], i[None, :]
    m = k <= q if causal or not local else None
    if case.window is not None:
        w = k > q - case.window
        m = w if m is None else m & w
    if case.chunk is not None:
        c = q // case.chunk == k // case.chunk
        m = c if m is None else m & c
    m = m[None, None]
    return m if kpm is None else m & kpm[:, None, None, :]


def build(case: Case) -> tuple[dict[str, Callable[[Tensor], Tensor]], Attention, Tensor | None]:
    torch.manual_seed(0)
    m = Attention(DIM, HEADS, case.kv_heads, causal=True, window=case.window, chunk=case.chunk)
    kpm = None
    if case.padding:
        kpm = torch.ones(BATCH, case.t, dtype=torch.bool)
        kpm[1, -case.t // 4 :] = False
    wq, wk, wv, wo = m.wq.weight, m.wk.weight, m.wv.weight, m.wo.weight
    masked = case.padding or case.window is not None or case.chunk is not None
    g = HEADS // case.kv_heads

    def heads(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q = F.linear(x, wq).view(b, t, HEADS, DH).transpose(1, 2)
        k = F.linear(x, wk).view(b, t, case.kv_heads, DH).transpose(1, 2)
        v = F.linear(x, wv).view(b, t, case.kv_heads, DH).transpose(1, 2)
        return q, k, v

    def vermeil(x: Tensor) -> Tensor:
        return m(x, mask=kpm)

    def sdpa(x: Tensor) -> Tensor:
        # The floor: is_causal (the kernel skips the blocks above the diagonal) and only the non-causal part
        # of the mask, a combination torch 2.13's CPU flash kernel takes although SDPA documents the two as
        # exclusive; where it does not, the documented form below.
        if masked and not FAST:
            return sdpa_folded(x)
        b, t, _ = x.shape
        mask = inline_mask(case, kpm, causal=False) if masked else None
        q, k, v = heads(x)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=g > 1)
        return F.linear(o.transpose(1, 2).reshape(b, t, DIM), wo)

    def sdpa_folded(x: Tensor) -> Tensor:
        # The documented form: one bool mask with the causal part folded in, no is_causal.
        b, t, _ = x.shape
        mask = inline_mask(case, kpm)
        q, k, v = heads(x)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=g > 1)
        return F.linear(o.transpose(1, 2).reshape(b, t, DIM), wo)

    def plain(x: Tensor) -> Tensor:
        b, t, _ = x.shape
        mask = inline_mask(case, kpm)
        q, k, v = heads(x)
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scores = (q @ k.transpose(-2, -1)) * DH**-0.5
        o = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return F.linear(o.transpose(1, 2).reshape(b, t, DIM), wo)

    impls: dict[str, Callable[[Tensor], Tensor]] = {"vermeil": vermeil, "sdpa": sdpa, "plain": plain}
    if masked:
        impls["folded"] = sdpa_folded
    try:
        from x_transformers import x_transformers as xt_lib
    except ImportError:
        xt_lib = None
    if xt_lib is not None:
        kw = {} if case.kv_heads == HEADS else {"kv_heads": case.kv_heads}
        xt = xt_lib.Attention(dim=DIM, dim_head=DH, heads=HEADS, causal=True, flash=True, **kw)
        # x-transformers repeats K/V as "(r kvh)": its query head r * Hkv + j uses kv head j, ours j * G + r
        # does. Permuting the query heads (wq rows, wo columns) makes the two modules the same function.
        perm = torch.arange(HEADS).view(case.kv_heads, g).t().reshape(-1)  # xt head -> vermeil head
        with torch.no_grad():
            xt.to_q.weight.copy_(wq.view(HEADS, DH, DIM)[perm].reshape(HEADS * DH, DIM))
            xt.to_out.weight.copy_(wo.view(DIM, HEADS, DH)[:, perm].reshape(DIM, HEADS * DH))
            xt.to_k.weight.copy_(wk)
            xt.to_v.weight.copy_(wv)
        local = None
        if case.window is not None or case.chunk is not None:
            local = inline_mask(Case("", case.t, window=case.window, chunk=case.chunk), None)[0, 0]

        def xt_fn(x: Tensor) -> Tensor:
            return xt(x, mask=kpm, attn_mask=local)

        impls["xt"] = xt_fn
    return impls, m, kpm


def cell(k: str, med: dict[str, float], mem: dict[str, float]) -> str:
    return f"{med[k]:8.1f} {mem[k]:6.0f}M" if k in med else f"{'-':>16}"


def clear_grads(params: list[Tensor]) -> None:
    for p in params:
        p.grad = None


def run_mode(fn: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor, mode: str) -> None:
    """fwd: a no_grad forward; fwd+bwd: a forward with autograd and a backward of `grad`."""
    if mode == "fwd":
        with torch.no_grad():
            fn(x)
        return
    fn(x).backward(grad)


def check_parity() -> None:
    """All implementations compute the same function (small T, same weights)."""
    for case in (
        Case("causal", 33),
        Case("gqa", 33, kv_heads=2),
        Case("pad", 33, padding=True),
        Case("sliding", 33, window=5),
        Case("chunked", 33, chunk=8),
    ):
        impls, m, kpm = build(case)
        x = torch.randn(BATCH, case.t, DIM)
        rows = kpm if kpm is not None else torch.ones(BATCH, case.t, dtype=torch.bool)
        ref = impls["vermeil"](x).detach()[rows]
        for name, fn in impls.items():
            # Only real (unpadded) query rows: x-transformers zeroes the outputs at padded positions.
            torch.testing.assert_close(
                fn(x).detach()[rows], ref, atol=2e-5, rtol=2e-5, msg=f"{name} on {case}"
            )


def bench_case(case: Case, heavy: bool, reps: int) -> None:
    """Time and measure every implementation on one case, both modes, and print two table rows."""
    impls, m, _ = build(case)
    if heavy and case.name != "causal":
        impls.pop("plain")
    torch.manual_seed(1)
    x = torch.randn(BATCH, case.t, DIM)
    grad = torch.randn(BATCH, case.t, DIM)
    params = list(m.parameters())
    for mode in ("fwd", "fwd+bwd"):
        times: dict[str, list[float]] = {k: [] for k in impls}
        mem: dict[str, float] = {}
        for name, fn in impls.items():
            if not (heavy and name in FEW_RUNS):
                clear_grads(params)
                run_mode(fn, x, grad, mode)  # warm-up: first-call allocations (autograd, pools) not measured
            clear_grads(params)  # outside the measured call: every run allocates its parameter grads anew
            mem[name] = peak_mib(functools.partial(run_mode, fn, x, grad, mode))
        for r in range(reps):
            for name, fn in impls.items():
                if heavy and name in FEW_RUNS and r > 0:
                    continue  # seconds per run and GBs of memory: one timed run shows the gap
                clear_grads(params)
                t0 = CLOCK[0]()
                run_mode(fn, x, grad, mode)
                times[name].append(CLOCK[0]() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
        anchors = [med[k] for k in ANCHORS if k in med]
        vs_anchor = f"{med['vermeil'] / min(anchors):9.2f}" if anchors else f"{'-':>9}"
        print(
            f"{case.name:<12} {case.t:>5} {mode:<8} | {cell('vermeil', med, mem)} | {cell('sdpa', med, mem)} | "
            f"{cell('folded', med, mem)} | {cell('plain', med, mem)} | {cell('xt', med, mem)} | {vs_anchor} "
            f"{med['sdpa'] / med['vermeil']:10.2f} {mem['vermeil'] / max(mem['sdpa'], 1e-9):9.2f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (T=128, 256; 2 reps)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time (steadier on a shared machine with --threads 1)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    check_parity()
    try:
        import x_transformers  # noqa: F401
    except ImportError:
        print("x_transformers not installed: its rows are skipped")

    sizes = (128, 256) if args.quick else (1024, 4096)
    small, large = sizes
    cases = [
        Case("causal", small),
        Case("gqa kv=2", small, kv_heads=2),
        Case("padding", small, padding=True),
        Case("sliding 256", small, window=256 if not args.quick else 32),
        Case("chunked 512", small, chunk=512 if not args.quick else 64),
        Case("causal", large),
        Case("gqa kv=2", large, kv_heads=2),
        Case("padding", large, padding=True),
        Case("sliding 256", large, window=256 if not args.quick else 32),
        Case("chunked 512", large, chunk=512 if not args.quick else 64),
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, B={BATCH}, dim={DIM}, "
        f"heads={HEADS}x{DH}, fp32 CPU; times are medians (ms), mem = peak MiB allocated during the call"
    )
    header = (
        f"{'case':<12} {'T':>5} {'mode':<8} | {'vermeil':>16} | {'sdpa (floor)':>16} | {'sdpa folded':>16} | "
        f"{'plain':>16} | {'xt':>16} | {'vs anchor':>9} {'floor/verm':>10} {'mem/floor':>9}"
    )
    print(header)
    print("-" * len(header))
    t_start = time.perf_counter()
    for case in cases:
        heavy = case.t == large and not args.quick  # anchors get fewer runs here (see the module docstring)
        bench_case(case, heavy, reps=2 if args.quick else (5 if case.t == small else 3))
    print(
        f"total {time.perf_counter() - t_start:.0f} s. vs anchor = vermeil time / faster anchor (<= 1 is faster); "
        "floor/verm = sdpa floor time / vermeil time (target >= 0.95); mem/floor = vermeil peak / floor peak "
        "(target <= 1.2)"
    )


if __name__ == "__main__":
    main()
