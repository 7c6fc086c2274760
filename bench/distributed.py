"""Data-parallel throughput: 1 process (2 threads) vs 2 ranks (1 thread each), DDP and FSDP2, same global batch.

Axis legend: B global batch, T sequence length (tokens per step = B * T).

Every configuration trains the same model (configs/llm-tiny.yaml by default, built with `vermeil.recipes`) with
the same global batch of random byte tokens, a fused AdamW step and causal-LM loss. The 2-rank runs use
`torch.multiprocessing.spawn` with a file store (gloo on CPU, nccl on CUDA when there are 2 GPUs), each rank
taking B / 2 rows, exactly as `vermeil train` under torchrun does.

The communication share of a step is measured two ways:
    sync cost   (step - step without gradient sync) / step: DDP under `no_sync()`, FSDP2 with
                `set_requires_gradient_sync(False)` (that removes the gradient all-reduce / reduce-scatter;
                FSDP2's parameter all-gathers stay in both);
    collectives (time of the step's collectives run alone on buffers of the model's size) / step: DDP one
                all-reduce of all gradients, FSDP2 two all-gathers of the parameters (forward and backward, it
                reshards after forward) and one reduce-scatter of the gradients.

    .venv/bin/python bench/distributed.py [--quick] [--config configs/llm-tiny.yaml] [--batch 16] [--seq 256]

Prints a table of median seconds per step, tokens/s and speed-up over the single process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from vermeil.recipes import build_model, load_run_config
from vermeil.train.optim import build_optimizer
from vermeil.train.trainer import causal_lm_loss

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _setup(args: argparse.Namespace) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
    run = load_run_config(args.config, [f"train.seq_len={args.seq}", f"train.batch_size={args.batch}"])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(256, (args.batch, args.seq + 1), generator=g)
    return run, (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def _time_steps(model, opt, batch, steps: int, warmup: int, no_sync=None) -> float:
    """Median seconds of a full training step (forward, backward, AdamW); `no_sync()` wraps forward+backward."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with no_sync() if no_sync is not None else nullcontext():
            loss, _ = causal_lm_loss(model, batch)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _optimizer(model):
    return build_optimizer(model, 1e-4, 0.0, (0.9, 0.95), fused=None)


def single_process(args: argparse.Namespace) -> float:
    torch.set_num_threads(2)
    run, batch = _setup(args)
    model = build_model(run)
    return _time_steps(model, _optimizer(model), batch, args.steps, args.warmup)


def _time_collective(fn, repeats: int) -> float:
    import torch.distributed as dist

    fn()
    dist.barrier()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _collectives(strategy: str, n: int, device: torch.device) -> Callable[[], None]:
    """The collectives of one step on buffers of n float32 parameters (see the module docstring)."""
    import torch.distributed as dist

    if strategy == "ddp":
        flat = torch.zeros(n, device=device)
        return lambda: dist.all_reduce(flat)
    # torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor; older versions have the old names.
    gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
    shard = torch.zeros((n + WORLD - 1) // WORLD, device=device)
    full = torch.zeros(shard.numel() * WORLD, device=device)

    def run() -> None:
        gather(full, shard)  # forward
        gather(full, shard)  # backward (resharded after forward)
        scatter(shard, full)  # gradients

    return run


def _worker(rank: int, args: argparse.Namespace, store: str, out: str) -> None:
    import torch.distributed as dist

    from vermeil.distributed import init_distributed, parallelize, shutdown

    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.device_count() >= WORLD else "gloo"  # one GPU: 2 ranks cannot share it
    _, _, device = init_distributed(backend, init_method=f"file://{store}", rank=rank, world_size=WORLD)
    run, (inputs, targets) = _setup(args)
    k = args.batch // WORLD
    batch = (inputs[rank * k : (rank + 1) * k].to(device), targets[rank * k : (rank + 1) * k].to(device))
    results: dict[str, Any] = {}
    for strategy in ("ddp", "fsdp2"):
        model = build_model(run).to(device)
        n = sum(p.numel() for p in model.parameters())
        par = parallelize(model, strategy, device=device)
        model = par.model
        opt = _optimizer(model)
        step = _time_steps(model, opt, batch, args.steps, args.warmup)
        if strategy == "ddp":
            nosync = _time_steps(model, opt, batch, args.steps, args.warmup, no_sync=model.no_sync)
        else:
            model.set_requires_gradient_sync(False)
            nosync = _time_steps(model, opt, batch, args.steps, args.warmup)
            model.set_requires_gradient_sync(True)
        comm = _time_collective(_collectives(strategy, n, device), args.steps)
        # The slowest rank sets the pace: report the max over ranks of each median.
        t = torch.tensor([step, nosync, comm], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        results[strategy] = {"step": t[0].item(), "nosync": t[1].item(), "comm": t[2].item()}
        del model, opt
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    shutdown(exit_code=0)  # barrier, destroy the group, os._exit: no gloo teardown abort


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.fspath(ROOT / "configs" / "llm-tiny.yaml"))
    p.add_argument("--batch", type=int, default=16, help="global batch B (default 16)")
    p.add_argument("--seq", type=int, default=256, help="sequence length T (default 256)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--quick", action="store_true", help="B 8, T 128, 3 timed steps, 1 warm-up")
    args = p.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup = 8, 128, 3, 1
    if args.batch % WORLD:
        p.error(f"--batch={args.batch} must be divisible by {WORLD}")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        os.environ.pop(var, None)

    single = single_process(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(args, os.path.join(tmp, "store"), out), nprocs=WORLD, join=True)
        multi = json.loads(Path(out).read_text())

    tokens = args.batch * args.seq
    backend = "nccl" if torch.cuda.device_count() >= WORLD else "gloo"
    print(
        f"{Path(args.config).name}: global batch {args.batch} x {args.seq} = {tokens} tokens/step, {backend}"
    )
    header = f"{'setup':<26}{'s/step':>9}{'tokens/s':>11}{'speed-up':>10}{'sync cost':>11}{'collectives':>13}"
    print(header)
    print("-" * len(header))
    print(f"{'1 process, 2 threads':<26}{single:>9.4f}{tokens / single:>11.0f}{1.0:>9.2f}x{'-':>11}{'-':>13}")
    for strategy in ("ddp", "fsdp2"):
        r = multi[strategy]
        sync = max(0.0, (r["step"] - r["nosync"]) / r["step"])
        print(
            f"{f'2 ranks x 1 thread, {strategy}':<26}{r['step']:>9.4f}{tokens / r['step']:>11.0f}"
            f"{single / r['step']:>9.2f}x{sync:>10.1%}{r['comm'] / r['step']:>12.1%}"
        )


if __name__ == "__main__":
    main()
