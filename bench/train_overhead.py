"""What the Trainer adds to a training step: its loop vs a bare forward/backward/clip/AdamW/scheduler loop.

Both loops train the same model (same weights, same batches, same fused AdamW, the same warm-up + cosine
schedule and gradient clipping) on the default config (configs/hybrid-lm.yaml), in alternating rounds so that
machine load hits both alike. The Trainer's extra work is its bookkeeping: the start-of-step data/RNG snapshot
(for a clean Ctrl-C), the metric sums, the progress bar, and a metrics.jsonl row every `log_every` steps.

    .venv/bin/python bench/train_overhead.py [--config configs/hybrid-lm.yaml] [--steps 12] [--rounds 3]

Prints the median seconds per step of each loop and the ratio (the issue asks for at most 1.05).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vermeil.recipes import build_run, load_run_config
from vermeil.train import Hook, Trainer
from vermeil.train.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]


class StepTimes(Hook):
    """Wall time between consecutive step ends: one whole iteration of the Trainer's loop each."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
        self.ends.append(time.perf_counter())


def bare_loop(model, batches, loss_fn, cfg, steps: int) -> list[float]:
    """The reference: the same math with nothing around it."""
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, eps=cfg.eps, fused=cfg.fused_adamw)
    sched = build_scheduler(opt, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    params = [p for g in opt.param_groups for p in g["params"]]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for _ in range(cfg.grad_accum):
            out = loss_fn(model, next(batches))
            loss = out[0] if isinstance(out, tuple) else out
            (loss / cfg.grad_accum).backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def trainer_loop(model, batches, loss_fn, cfg, steps: int, out_dir: Path) -> list[float]:
    cfg = copy.deepcopy(cfg)
    cfg.steps, cfg.eval_every, cfg.save_every, cfg.plot, cfg.progress = steps + 1, 0, 0, False, None
    hook = StepTimes()
    trainer = Trainer(model, batches, loss_fn, cfg, hooks=[hook], out_dir=out_dir)
    trainer.fit()
    # Intervals between step ends; the last step also evaluates and saves (end of run): left out.
    return [b - a for a, b in zip(hook.ends[:-2], hook.ends[1:-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "hybrid-lm.yaml"), help="run config YAML")
    parser.add_argument("--steps", type=int, default=12, help="steps per round and loop (default 12)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.batch_size=8")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = load_run_config(args.config, args.overrides)
    built = build_run(run)
    cfg = run.train
    state = copy.deepcopy(built.model.state_dict())
    bare: list[float] = []
    ours: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            built.model.load_state_dict(state)
            bare += bare_loop(built.model, built.train_batches, built.loss_fn, cfg, args.steps)
            built.model.load_state_dict(state)
            ours += trainer_loop(
                built.model, built.train_batches, built.loss_fn, cfg, args.steps, Path(tmp) / f"r{r}"
            )
    b, t = statistics.median(bare), statistics.median(ours)
    tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    print(
        f"config {Path(args.config).name}: {type(built.model).__name__}, batch {cfg.batch_size} x seq {cfg.seq_len}"
        f" x accum {cfg.grad_accum}, {torch.get_num_threads()} threads, {len(bare)} + {len(ours)} steps"
    )
    print("| loop | median s/step | tokens/s |")
    print("| --- | --- | --- |")
    print(f"| bare forward/backward/clip/AdamW/schedule | {b:.4f} | {tokens / b:,.0f} |")
    print(f"| Trainer.fit | {t:.4f} | {tokens / t:,.0f} |")
    print(f"ratio Trainer / bare = {t / b:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
