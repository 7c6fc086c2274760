"""Benchmark: Vermeil's Mamba stack and MambaLM decoding against mambapy and transformers' CPU path (issue 4).

Config (the issue's "Speed" section): d_model 512, 4 layers, d_state 16, expand 2 (d_inner 1024, dt_rank 32),
batch 2, float32, `--threads` threads (2). Everything runs in ONE process on the same inputs and the same weights
(Vermeil's are copied into mambapy's `Mamba` and transformers' `MambaModel`, whose keys `layers.N.norm` /
`layers.N.mixer.*` are state-spaces' too); a parity check at L=64 runs first.

    vermeil   vermeil.models.mamba: the residual blocks of MambaLM (MambaBlock + RMSNorm, chunked scan)
    compiled  the same blocks and weights with `compile_scan=True` (the scan's chunks run as torch.compile'd
              kernels; compiled in an untimed warm-up)
    mambapy   mambapy.mamba.Mamba (parallel Blelloch pscan, pads L to a power of two)
    hf        transformers MambaModel (inputs_embeds), its CPU path: a sequential loop over time steps

Forward+backward: input (B, L, D) -> stack -> mean of squares -> backward into the parameters and the input.
A case runs once, and when that took under 10 s twice more (median of 3); a case predicted (from a shorter run of
the same implementation) to take more than `--max-case-s` seconds is skipped and reported as such, and so is a
case predicted to need more than half of the memory available now (mambapy at L=4096 needs ~12 GB, which would
starve other processes on a shared machine; `--allow-big` runs it anyway).

Matmul floor: the FLOPs of the block's projections (in_proj, x_proj, dt_proj, out_proj; x3 for forward+backward)
divided by the peak matmul rate measured in this process (best of seven 2048^3 float32 matmuls, before and
after the stacks); "x floor" is a
case's time over that floor.

Peak memory: the process's peak resident set size during the case (VmHWM after resetting it through
/proc/self/clear_refs) minus the resident set size just before: memory the case allocated beyond inputs and
weights (Linux only; "n/a" elsewhere). Memory an earlier case freed may still be held by the process (glibc
keeps part of it), so a case that needs less than an earlier one reads low ("compiled" after "vermeil" at the
same L reads near 0): compare the first case at each length, or run bench/scan.py, which uses one process per case.

Decoding: MambaLM (vocab 1024, weights converted from a transformers MambaForCausalLM) after prompts of 64 and
4096 tokens (B=2): prefill, then `--new-tokens` greedy steps timed (ms per step, and tokens/s = B / step time),
"vermeil" eager and "compiled" through `vermeil.generation.compiled_decode_one_token()` (generate(compile=True));
transformers: `generate(do_sample=False)`, the median time between consecutive new tokens (a streamer that
timestamps each token it receives).

Usage: .venv/bin/python bench/mamba.py [--quick] [--threads 2] [--max-case-s 60] [--allow-big]
Run it alone: other processes on the machine change every number.
"""

# Shapes: B batch, L length, D d_model, E d_inner, N d_state, R dt_rank, V vocabulary.

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from vermeil.generation import compiled_decode_one_token, decode_one_token, prefill
from vermeil.interop.transformers_mamba import from_transformers_mamba
from vermeil.models.mamba import MambaConfig, MambaLM

D_MODEL, N_LAYER, D_STATE, EXPAND, BATCH = 512, 4, 16, 2, 2
D_INNER, DT_RANK = EXPAND * D_MODEL, math.ceil(D_MODEL / 16)


# ----------------------------------------------------------------------------------------------------------
# Memory and timing helpers


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _available_mib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def measure(fn: Callable[[], object], fast_s: float = 10.0) -> tuple[float, float | None, int]:
    """(median seconds, peak MiB beyond the RSS before, runs) of fn().

    The first run is timed and gives the peak memory; when it took less than `fast_s`, two more runs follow and
    the median of the three is reported (the first run's one-time costs drop out).
    """
    times: list[float] = []
    rss0 = _status_kib("VmRSS")
    ok = _reset_peak()
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
    hwm = _status_kib("VmHWM")
    peak = (hwm - rss0) / 1024 if ok and hwm is not None and rss0 is not None else None
    if times[0] < fast_s:
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), peak, len(times)


def peak_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * 2048**3 / min(ts) / 1e9  # the best run: a peak


def projection_flops(length: int, backward: bool) -> float:
    """Multiply-adds x2 of in_proj, x_proj, dt_proj, out_proj over the stack; backward costs 2x forward."""
    per_token = 2 * (
        D_MODEL * 2 * D_INNER + D_INNER * (DT_RANK + 2 * D_STATE) + DT_RANK * D_INNER + D_INNER * D_MODEL
    )
    fwd = per_token * BATCH * length * N_LAYER
    return fwd * (3 if backward else 1)


# ----------------------------------------------------------------------------------------------------------
# The three stacks, same weights


def build_stacks(want_mambapy: bool, want_hf: bool) -> dict[str, Callable[[Tensor], Tensor]]:
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=D_MODEL, n_layer=N_LAYER, d_state=D_STATE, expand=EXPAND, vocab_size=256)
    lm = MambaLM(cfg)
    layers, norm_f = lm.backbone.layers, lm.backbone.norm_f
    stack_sd = {
        k[len("backbone.") :]: v for k, v in lm.state_dict().items() if k.startswith("backbone.layers.")
    }

    def vermeil(x: Tensor) -> Tensor:
        hidden, residual = x, None
        for layer in layers:
            hidden, residual = layer(hidden, residual)
        return norm_f(hidden + residual)

    # the same weights with compile_scan=True: the scan through torch.compile'd chunk kernels
    lm_c = MambaLM(dataclasses.replace(cfg, compile_scan=True))
    lm_c.load_state_dict(lm.state_dict())
    layers_c = lm_c.backbone.layers

    def compiled(x: Tensor) -> Tensor:
        hidden, residual = x, None
        for layer in layers_c:
            hidden, residual = layer(hidden, residual)
        return norm_f(hidden + residual)

    stacks: dict[str, Callable[[Tensor], Tensor]] = {"vermeil": vermeil, "compiled": compiled}
    if want_mambapy:
        try:
            from mambapy.mamba import Mamba as MPMamba
            from mambapy.mamba import MambaConfig as MPConfig

            mp = MPMamba(
                MPConfig(d_model=D_MODEL, n_layers=N_LAYER, d_state=D_STATE, expand_factor=EXPAND, pscan=True)
            )
            mp.load_state_dict(stack_sd, strict=True)
            stacks["mambapy"] = lambda x: norm_f(mp(x))
        except ImportError:
            print("mambapy is not installed: its rows are skipped")
    if want_hf:
        try:
            import transformers

            hf_cfg = transformers.MambaConfig(
                vocab_size=256,
                hidden_size=D_MODEL,
                state_size=D_STATE,
                num_hidden_layers=N_LAYER,
                expand=EXPAND,
                use_mambapy=False,
            )
            hf = transformers.MambaModel(hf_cfg).train()
            hf.load_state_dict(
                {**stack_sd, "embeddings.weight": hf.embeddings.weight, "norm_f.weight": norm_f.weight}
            )
            stacks["hf"] = lambda x: hf(inputs_embeds=x, use_cache=False).last_hidden_state
        except ImportError:
            print("transformers is not installed: its rows are skipped")
    return stacks


def check_parity(stacks: dict[str, Callable[[Tensor], Tensor]]) -> None:
    x = torch.randn(BATCH, 64, D_MODEL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = stacks["vermeil"](x)
        for name, fn in stacks.items():
            err = (fn(x) - ref).abs().max().item()
            print(f"parity at L=64: {name:8s} max |diff| vs vermeil = {err:.2e}")
            if err > 1e-3:
                raise SystemExit(
                    f"{name} disagrees with vermeil ({err:.2e}): the comparison would be meaningless"
                )


def fwd_bwd(fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    def run() -> None:
        xg = x.detach().requires_grad_(True)
        fn(xg).pow(2).mean().backward()

    return run


def fwd_only(fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn(x)

    return run


# ----------------------------------------------------------------------------------------------------------
# Decoding


class _StepClock:
    """A transformers streamer that only records when each batch of tokens is handed out."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def bench_decoding(
    prompts: list[int], new_tokens: int, max_case_s: float
) -> list[tuple[str, int, float | None]]:
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.MambaConfig(
        vocab_size=1024,
        hidden_size=D_MODEL,
        state_size=D_STATE,
        num_hidden_layers=N_LAYER,
        expand=EXPAND,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    hf = transformers.MambaForCausalLM(hf_cfg).eval()
    model = from_transformers_mamba(hf).eval()
    rows: list[tuple[str, int, float | None]] = []
    hf_prefill_s = None
    for p in prompts:
        prompt = torch.randint(0, 1024, (BATCH, p), generator=torch.Generator().manual_seed(p))
        # Vermeil: prefill, then timed greedy steps, eager and compiled (generate(compile=True)'s step)
        for impl, step in (("vermeil", decode_one_token), ("compiled", compiled_decode_one_token())):
            with torch.no_grad():
                model.setup_cache(BATCH, p + new_tokens + 1)
                token = prefill(model, prompt, torch.arange(p)).argmax(-1, keepdim=True)
                for i in range(3):  # warm-up steps (not timed; the first compiled one compiles)
                    token = step(model, token, torch.tensor([p + i])).argmax(-1, keepdim=True)
                steps = []
                for i in range(new_tokens - 3):
                    t0 = time.perf_counter()
                    token = step(model, token, torch.tensor([p + 3 + i])).argmax(-1, keepdim=True)
                    steps.append(time.perf_counter() - t0)
                model.delete_cache()
            rows.append((impl, p, statistics.median(steps)))
        # transformers: its own generate loop; a streamer timestamps every token it hands out
        predicted = (hf_prefill_s or 0.0) * p / prompts[0] + new_tokens * 0.05
        if hf_prefill_s is not None and predicted > max_case_s:
            print(f"skipped: hf generate after {p} tokens (predicted {predicted:.0f} s > --max-case-s)")
            rows.append(("hf", p, None))
            continue
        clock = _StepClock()
        kw = dict(do_sample=False, pad_token_id=0)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf.generate(prompt[:, :8], max_new_tokens=2, **kw)  # warm-up
            hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock, **kw)
        stamps = clock.stamps  # [0]: the prompt (before prefill), [1]: first new token (after prefill)
        if p == prompts[0]:
            hf_prefill_s = stamps[1] - stamps[0]
        rows.append(("hf", p, statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))))
    return rows


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short lengths, few tokens (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-case-s", type=float, default=60.0, help="skip cases predicted to take longer")
    parser.add_argument("--allow-big", action="store_true", help="run cases needing > half the free memory")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

    if args.quick:
        lengths, hf_fb, hf_f, prompts, new_tokens = [128, 512], [64], [256], [64, 256], 8
    else:
        lengths, hf_fb, hf_f, prompts, new_tokens = [1024, 4096], [256], [4096], [64, 4096], args.new_tokens

    peak = peak_gflops()
    print(f"threads={args.threads}  matmul peak (best 2048^3 fp32 mm) = {peak:.1f} GFLOP/s")
    print(
        f"config: d_model {D_MODEL}, {N_LAYER} layers, d_state {D_STATE}, expand {EXPAND}, batch {BATCH}, float32"
    )
    if hasattr(os, "getloadavg"):  # other processes change every number: say how busy the machine was
        print("load average at start (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    stacks = build_stacks(want_mambapy=True, want_hf=True)
    check_parity(stacks)

    # (impl, L, mode) in order; per impl, the previous case predicts the next one
    plan = [
        *[(impl, L, "fwd+bwd") for impl in ("vermeil", "compiled") for L in sorted({*hf_fb, *lengths})],
        *[(impl, L, "fwd") for impl in ("vermeil", "compiled") for L in hf_f],
    ]
    # compile the scan kernels (forward and backward) before anything is timed
    fwd_bwd(stacks["compiled"], torch.randn(BATCH, 64, D_MODEL))()
    plan += [("mambapy", L, "fwd+bwd") for L in lengths]
    plan += [("hf", L, "fwd+bwd") for L in hf_fb] + [("hf", L, "fwd") for L in hf_f]
    results: dict[tuple[str, int, str], tuple[float | None, float | None, str]] = {}
    last: dict[tuple[str, str], tuple[int, float, float | None]] = {}
    gen = torch.Generator().manual_seed(2)
    for impl, length, mode in plan:
        if impl not in stacks:
            continue
        x = torch.randn(BATCH, length, D_MODEL, generator=gen)
        prev = last.get((impl, mode))
        if prev is not None:
            p_len, p_time, p_mem = prev
            scale = length / p_len
            # hf's backward grows quadratically in L; the others about linearly
            t_pred = p_time * (scale**2 if (impl == "hf" and mode == "fwd+bwd") else scale)
            m_pred = (p_mem or 0.0) * scale
            if t_pred > args.max_case_s:
                results[(impl, length, mode)] = (None, None, f"skipped: predicted {t_pred:.0f} s")
                continue
            if m_pred > 0.5 * _available_mib() and not args.allow_big:
                results[(impl, length, mode)] = (None, None, f"skipped: predicted {m_pred / 1024:.1f} GiB")
                continue
        fn = fwd_bwd(stacks[impl], x) if mode == "fwd+bwd" else fwd_only(stacks[impl], x)
        t, mem, runs = measure(fn)
        last[(impl, mode)] = (length, t, mem)
        results[(impl, length, mode)] = (t, mem, "median of 3" if runs == 3 else "one run")
        print(f"  ran {impl:8s} L={length:5d} {mode:8s} {t:8.3f} s", flush=True)

    print()
    peak = max(peak, peak_gflops())  # measured again: a busy moment at the start would inflate "x floor"
    print(f"matmul peak, best of start and end: {peak:.1f} GFLOP/s")
    print(
        f"{'impl':8s} {'L':>5s} {'mode':8s} {'time s':>9s} {'vs vermeil':>11s} {'x floor':>8s} {'peak MiB':>9s}  note"
    )
    for (impl, length, mode), (t, mem, note) in results.items():
        ref = results.get(("vermeil", length, mode), (None, None, ""))[0]
        floor = projection_flops(length, mode == "fwd+bwd") / (peak * 1e9)
        if t is None:
            print(f"{impl:8s} {length:5d} {mode:8s} {'-':>9s} {'-':>11s} {'-':>8s} {'-':>9s}  {note}")
            continue
        ratio = f"{t / ref:.1f}x" if ref else "-"
        mem_s = f"{mem:.0f}" if mem is not None else "n/a"
        print(f"{impl:8s} {length:5d} {mode:8s} {t:9.3f} {ratio:>11s} {t / floor:7.1f}x {mem_s:>9s}  {note}")
    if hasattr(os, "getloadavg"):
        print(
            "load average after the stacks (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        )
    print(
        "(vs vermeil: the implementation's time over Vermeil's at the same L and mode; x floor: time over the"
    )
    print(" projections' matmul floor at the measured peak)")
    print("speed-up of vermeil compiled (compile_scan=True) over each other implementation:")
    for (impl, length, mode), (t, _, _) in results.items():
        mine = results.get(("compiled", length, mode), (None, None, ""))[0]
        if impl != "compiled" and t is not None and mine:
            print(f"  {impl:8s} L={length:5d} {mode:8s} {t / mine:6.1f}x")

    print()
    rows = bench_decoding(prompts, new_tokens, args.max_case_s)
    print(f"decoding, B={BATCH}, vocab 1024, {new_tokens} greedy steps after the prompt")
    print(f"{'impl':8s} {'prompt':>6s} {'ms/step':>8s} {'tokens/s':>9s}")
    by = {(i, p): s for i, p, s in rows}
    for impl, p, s in rows:
        if s is None:
            print(f"{impl:8s} {p:6d} {'-':>8s} {'-':>9s}  skipped")
        else:
            print(f"{impl:8s} {p:6d} {s * 1e3:8.2f} {BATCH / s:9.0f}")
    for impl in ("vermeil", "compiled"):
        v0, v1 = by.get((impl, prompts[0])), by.get((impl, prompts[-1]))
        if v0 and v1:
            print(f"{impl} step time after {prompts[-1]} vs after {prompts[0]} tokens: {v1 / v0:.2f}x")
        for p in prompts:
            h, v = by.get(("hf", p)), by.get((impl, p))
            if h and v:
                print(f"after {p} tokens: {impl} is {h / v:.1f}x faster per step than transformers' generate")


if __name__ == "__main__":
    main()
