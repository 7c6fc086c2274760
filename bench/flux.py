"""Flux speed: Vermeil `Flux` vs diffusers `FluxTransformer2DModel`, same configuration and weights, one process.

Config (issue 5): hidden 512 (8 heads of 64), axes_dim (16, 24, 24), 2 double + 4 single blocks, 1024 data tokens
+ 256 condition tokens, batch 2, 2 threads. Prints medians of forward and forward+backward (a training step's
gradients w.r.t. all parameters), the speedup (diffusers time / Vermeil time), and each one's fraction of the
matmul peak measured in this process (a 2048^3 matmul in the same dtype). Runs are interleaved (ours, theirs,
ours, ...) so that load from other processes hits both alike.

    .venv/bin/python bench/flux.py                  # float32 and bfloat16
    .venv/bin/python bench/flux.py --quick          # fewer repeats, float32 only
    .venv/bin/python bench/flux.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from vermeil.interop.diffusers_flux import from_diffusers

HIDDEN, HEADS, AXES = 512, 8, (16, 24, 24)
DEPTH, DEPTH_SINGLE = 2, 4
L_DATA, L_COND, BATCH = 1024, 256, 2
IN_CH, COND_CH, VEC = 64, 512, 256


def build(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    theirs = FluxTransformer2DModel(
        patch_size=1,
        in_channels=IN_CH,
        num_layers=DEPTH,
        num_single_layers=DEPTH_SINGLE,
        attention_head_dim=HIDDEN // HEADS,
        num_attention_heads=HEADS,
        joint_attention_dim=COND_CH,
        pooled_projection_dim=VEC,
        guidance_embeds=False,
        axes_dims_rope=AXES,
    )
    if dtype != torch.float32:
        theirs = theirs.to(dtype)
    ours = from_diffusers(theirs)
    return ours, theirs


def make_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, w = 32, 32  # 1024 data tokens on a 32 x 32 grid, as Flux image ids
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        data=torch.randn(BATCH, L_DATA, IN_CH, generator=g).to(dtype),
        cond=torch.randn(BATCH, L_COND, COND_CH, generator=g).to(dtype),
        y=torch.randn(BATCH, VEC, generator=g).to(dtype),
        t=torch.rand(BATCH, generator=g).to(dtype),
        img_ids=img_ids.view(L_DATA, 3),
        txt_ids=torch.zeros(L_COND, 3),
    )


def forward_fns(
    ours: torch.nn.Module, theirs: torch.nn.Module, x: dict
) -> dict[str, Callable[[], torch.Tensor]]:
    return {
        "vermeil": lambda: ours(x["data"], x["img_ids"][None], x["cond"], x["txt_ids"][None], x["t"], x["y"]),
        "diffusers": lambda: theirs(
            hidden_states=x["data"],
            encoder_hidden_states=x["cond"],
            pooled_projections=x["y"],
            timestep=x["t"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            return_dict=False,
        )[0],
    }


def model_flops() -> float:
    """Forward FLOPs (2 per multiply-add) of the matmuls and attention; embedders and elementwise ops left out."""
    d, m, b = HIDDEN, 4 * HIDDEN, BATCH
    seq = L_DATA + L_COND
    per_token_double = 3 * d * d + d * d + 2 * d * m  # qkv, proj, mlp (per stream)
    per_token_single = d * (3 * d + m) + (d + m) * d  # linear1, linear2
    attention = 2 * 2 * b * seq * seq * HIDDEN  # q k^T and p v, all heads
    total = DEPTH * (2 * b * seq * per_token_double + attention)
    total += DEPTH_SINGLE * (2 * b * seq * per_token_single + attention)
    return float(total)


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)  # best case: the peak this process can reach now


CLOCK: Callable[[], float] = time.perf_counter


def interleaved_medians(
    fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = CLOCK()
            fn()
            times[name].append(CLOCK() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(dtype: torch.dtype, repeats: int) -> list[str]:
    ours, theirs = build(dtype)
    x = make_inputs(dtype)
    fwd = forward_fns(ours, theirs, x)
    with torch.no_grad():
        diff = (fwd["vermeil"]() - fwd["diffusers"]()).abs().max().item()

    def no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                fn()

        return step

    def train(fn: Callable[[], torch.Tensor], model: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            fn().float().square().mean().backward()

        return step

    peak = matmul_peak(dtype)
    f_times = interleaved_medians({k: no_grad(f) for k, f in fwd.items()}, repeats)
    b_times = interleaved_medians(
        {"vermeil": train(fwd["vermeil"], ours), "diffusers": train(fwd["diffusers"], theirs)}, repeats
    )
    peak = max(peak, matmul_peak(dtype))
    flops = model_flops()
    name = str(dtype).removeprefix("torch.")
    rows = [f"{name}: matmul peak {peak / 1e9:.0f} GFLOP/s, max |ours - diffusers| = {diff:.2e}"]
    header = f"{'':<18}{'vermeil ms':>12}{'diffusers ms':>14}{'speedup':>9}{'vermeil %peak':>15}{'diffusers %peak':>17}"
    rows.append(header)
    for label, times, mult in (("forward", f_times, 1.0), ("forward+backward", b_times, 3.0)):
        ours_t, theirs_t = times["vermeil"], times["diffusers"]
        rows.append(
            f"{label:<18}{ours_t * 1e3:>12.1f}{theirs_t * 1e3:>14.1f}{theirs_t / ours_t:>8.2f}x"
            f"{100 * mult * flops / ours_t / peak:>14.0f}%{100 * mult * flops / theirs_t / peak:>16.0f}%"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, float32 only")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (issue: 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model and mode (median)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "both"],
        default=None,
        help="default: both (float32 with --quick)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time; with --threads 1 it is robust to other load on a shared machine",
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("float32" if args.quick else "both")
    repeats = 3 if args.quick else args.repeats
    dtypes = [torch.float32, torch.bfloat16] if dtype == "both" else [getattr(torch, dtype)]
    print(
        f"Flux bench: hidden {HIDDEN} ({HEADS} heads), axes {AXES}, {DEPTH} double + {DEPTH_SINGLE} single blocks, "
        f"{L_DATA} data + {L_COND} cond tokens, batch {BATCH}, {args.threads} threads, torch {torch.__version__}, "
        f"{model_flops() / 1e9:.0f} GFLOP per forward; %peak counts backward as 2x forward; {args.clock} clock"
    )
    for dt in dtypes:
        print("\n".join(run(dt, repeats)))


if __name__ == "__main__":
    main()
