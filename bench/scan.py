"""Selective-scan speed and memory: Vermeil's chunked `selective_scan` (eager, and `compile=True`: each chunk
a torch.compile'd kernel, compiled before the measurement) vs the plain sequential loop
(`selective_scan_ref`) vs mambapy's parallel scan (Blelloch `pscan`, the anchor; skipped with a message if
mambapy is missing).

Same inputs for every variant (B, D, N as below, delta through softplus, with D skip), float32, `--threads`
threads. Each (variant, L, mode) runs in its own subprocess so its peak memory can be read: peak memory is the
process's maximum resident set size (`resource.getrusage(...).ru_maxrss`) after the runs minus its resident
set size just before the first run (inputs and torch already loaded). Times are medians over `--repeats`
runs after one warm-up, in ms; ratios are the variant's time over Vermeil's. Run alone (no other torch process
on the machine):

    .venv/bin/python bench/scan.py                       # B=2, D=512, N=16, L=256/1024/2048
    .venv/bin/python bench/scan.py --lengths 4096 --repeats 3
    .venv/bin/python bench/scan.py --threads 1 --timer cpu   # on a loaded machine: process CPU time

On a shared, loaded machine wall-clock times of multi-threaded ops are dominated by descheduling (an OpenMP
region waits for its slowest thread); `--threads 1 --timer cpu` measures process CPU time instead, which
excludes time spent waiting for a core (with several threads it would count spin-waiting, so it requires 1).
"""

# Shapes: B batch, D channels (d_inner), L length, N state size.

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from vermeil.nn.scan import selective_scan, selective_scan_ref

VARIANTS = ("vermeil", "compiled", "loop", "mambapy")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(variant: str, length: int, mode: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    bsz, dim, n = args.batch, args.dim, args.state
    u = torch.randn(bsz, dim, length, generator=gen)
    delta = torch.randn(bsz, dim, length, generator=gen) - 3.0  # softplus(-3) ~ 0.05: Mamba's dt range
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1)  # S4D-real
    B = torch.randn(bsz, n, length, generator=gen)
    C = torch.randn(bsz, n, length, generator=gen)
    D = torch.ones(dim)
    leaves = [t.requires_grad_(mode == "fwd+bwd") for t in (u, delta, A, B, C, D)]

    if variant == "vermeil":

        def fn():
            return selective_scan(*leaves[:5], D=leaves[5], delta_softplus=True, chunk_size=args.chunk_size)

    elif variant == "compiled":

        def fn():
            return selective_scan(*leaves[:5], D=leaves[5], delta_softplus=True, compile=True)

        # compile before the memory baseline: the chunk kernels' shapes do not depend on L
        short = [t.detach()[..., :8].requires_grad_(t.requires_grad) if t.dim() == 3 else t for t in leaves]
        y = selective_scan(*short[:5], D=short[5], delta_softplus=True, compile=True)
        if mode == "fwd+bwd":
            y.sum().backward()

    elif variant == "loop":

        def fn():
            return selective_scan_ref(*leaves[:5], D=leaves[5], delta_softplus=True)

    else:
        try:
            from mambapy.mamba import MambaBlock
        except ImportError as err:
            return {"skipped": f"mambapy not importable ({err})"}

        def fn():
            # mambapy's layout is (B, L, D); its selective_scan method uses no attribute of self
            out = MambaBlock.selective_scan(
                None,
                leaves[0].transpose(1, 2),
                F.softplus(leaves[1]).transpose(1, 2),
                leaves[2],
                leaves[3].transpose(1, 2),
                leaves[4].transpose(1, 2),
                leaves[5],
            )
            return out.transpose(1, 2)

    def run():
        y = fn()
        if mode == "fwd+bwd":
            y.sum().backward()
            for t in leaves:
                t.grad = None

    base = _rss_bytes()
    run()  # warm-up, and the peak-memory measurement
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    times = []
    for _ in range(args.repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return {"ms": 1e3 * statistics.median(times), "peak_mb": max(0, peak) / 2**20}


def _spawn(variant: str, length: int, mode: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", variant, str(length), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2, help="B")
    parser.add_argument("--dim", type=int, default=512, help="D (Mamba's d_inner)")
    parser.add_argument("--state", type=int, default=16, help="N")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048], help="L values")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--timer", choices=("wall", "cpu"), default="wall", help="wall clock, or process CPU time (1 thread)"
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="selective_scan chunk_size (None: auto)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "L", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timer == "cpu" and args.threads != 1:
        parser.error("--timer cpu needs --threads 1 (CPU time of several threads counts their spin-waits)")
    if args.worker:
        variant, length, mode = args.worker
        print(json.dumps(_worker(variant, int(length), mode, args)))
        return

    argv = sys.argv[1:]
    print(
        f"selective scan, B={args.batch} D={args.dim} N={args.state}, float32, {args.threads} threads, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start, {args.timer} timer"
    )
    print("time: median ms; x: time / vermeil's time; peak: max RSS growth during the first run (MiB)")
    header = f"{'L':>6} {'mode':>8} | " + " | ".join(f"{v:>27}" for v in args.variants)
    print(header)
    print("-" * len(header))
    notes: set[str] = set()
    for length in args.lengths:
        for mode in ("fwd", "fwd+bwd"):
            results = {v: _spawn(v, length, mode, argv) for v in args.variants}
            base = results.get("vermeil", {}).get("ms")
            cells = []
            for v in args.variants:
                r = results[v]
                if "skipped" in r:
                    cells.append(f"{'skipped':>27}")
                    notes.add(f"{v}: {r['skipped']}")
                    continue
                ratio = f"{r['ms'] / base:5.1f}x" if base else "   - "
                cells.append(f"{r['ms']:9.1f} ms {ratio} {r['peak_mb']:6.0f} MiB")
            print(f"{length:>6} {mode:>8} | " + " | ".join(cells), flush=True)
    for note in sorted(notes):
        print(note)


if __name__ == "__main__":
    main()
