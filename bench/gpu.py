"""Every GPU figure the project reports, in one call: correctness on the device first, then timed rows, a table.

Made for one H200 (torch 2.11, CUDA 13, Triton 3.6) in at most 8 minutes; `--tiny` runs the same code at tiny
shapes on the CPU (a smoke test of the script, CI-safe). Imports only torch, vermeil and, when present,
triton and transformers.

    .venv/bin/python bench/gpu.py [--tiny] [--json PATH] [--only GROUPS] [--budget-s 420] [--no-anchors]

Sections, in this order:
 1. ceilings measured in this process: the bf16 matmul peak (8192^3 on random data: zeros run faster) and
    the device-to-device copy bandwidth (1 GiB; bytes moved = read + write);
 2. correctness (PASS/FAIL lines, the script keeps going): every fast path against its reference in float32:
    the Triton and chunked selective scans against `selective_scan_ref` (outputs, final state and every
    gradient at a small shape), a Mamba stack on both scan backends, and `generate`'s graph-captured
    decoding against the eager step (the same greedy tokens, LLM, MambaLM, HybridModel; on the CPU the
    static-buffer loop without the capture);
 3. timed rows: CUDA events around each call (perf_counter on the CPU), warm-up first, the median of >= 20
    calls where a call is cheap (fewer, down to 3, when it takes seconds); a row whose API does not exist
    yet, or whose library is missing, is reported as "skipped: <reason>";
 4. the table, and `--json`.

Rows (issue "Mamba at GPU speed"), bf16 autocast, d_model 1024, 8 layers, d_state 16, expand 2, batch 4, L 2048:
  stack    forward + backward of the 8-layer Mamba stack: MambaLM's residual blocks and final norm (the
           embedding and head left out) on an input (B, L, D) -> mean of squares -> backward into the weights
           and the input; scan_backend "triton" and "chunked"; the ratio between them, the ratio to the
           matmul floor (in/x/dt/out projections, x3 for fwd+bwd, at the measured bf16 peak), peak memory
           (max_memory_allocated after reset_peak_memory_stats; weights and input included).
  anchors  transformers' MambaModel (its torch fallback: no CUDA kernels) on the same weights (converted with
           vermeil.interop), same input and loss, one timed run (it takes ~35 s); `--no-anchors` skips it.
  scan     the scan alone at B 4, D 2048, N 16, L 2048 (bf16 u/delta/z/B/C, float32 A/D/delta_bias, z gating,
           softplus): forward and forward + backward; bytes moved (`vermeil.nn.scan_triton.scan_bytes`) and
           achieved GB/s against the measured copy bandwidth and the 4.8 TB/s datasheet figure.
  decode   batch 1, greedy, after 64 and after 4096 prompt tokens, MambaLM (the stack's config, vocabulary
           32000) and a HybridModel of the same width (pattern MMMAMMMA, no feed-forward), bf16 weights:
           `generate`'s eager step, its CUDA-graph step, and the graph of the step compiled by Inductor
           (`compile=True`; compiled in an untimed warm-up), ms per token = the median interval between
           consecutive decode steps over 32 tokens (CUDA events recorded from `generate`'s callback: the whole
           loop, sampling and bookkeeping included).

Adding rows (the next issue's transformer rows): write `def row_x(ctx: Ctx) -> None` that calls
`ctx.check(...)` / `ctx.add(...)`, and append it to a group in `GROUPS`.
"""

# Shapes: B batch, L length, D d_model, E d_inner, N d_state, R dt_rank, V vocabulary.

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

import vermeil
from vermeil.generation import _generate, generate
from vermeil.models.hybrid import HybridConfig, HybridModel
from vermeil.models.mamba import MambaConfig, MambaLM
from vermeil.nn.scan import selective_scan, selective_scan_ref

HBM_DATASHEET_GBS = 4800.0  # H200 SXM


@dataclasses.dataclass(frozen=True)
class Shapes:
    d_model: int
    n_layer: int
    d_state: int
    expand: int
    batch: int
    length: int
    scan: tuple[int, int, int, int]  # (B, D, N, L) of the scan-alone rows
    vocab: int
    contexts: tuple[int, ...]  # prompt lengths of the decode rows
    new_tokens: int  # timed decode steps
    matmul: int  # n of the n^3 matmul peak
    copy_bytes: int
    check_scan: tuple[int, int, int, int]  # (B, D, N, L) of the scan parity checks


FULL = Shapes(
    d_model=1024,
    n_layer=8,
    d_state=16,
    expand=2,
    batch=4,
    length=2048,
    scan=(4, 2048, 16, 2048),
    vocab=32000,
    contexts=(64, 4096),
    new_tokens=32,
    matmul=8192,
    copy_bytes=1 << 30,
    check_scan=(2, 67, 16, 300),
)
# Small enough for Triton's interpreter (seconds per scan call) on a shared 2-core CPU.
TINY = dataclasses.replace(
    FULL,
    d_model=16,
    n_layer=2,
    d_state=4,
    batch=1,
    length=16,
    scan=(1, 8, 4, 16),
    vocab=128,
    contexts=(8, 24),
    new_tokens=6,
    matmul=256,
    copy_bytes=1 << 22,
    check_scan=(1, 5, 4, 20),
)


# ----------------------------------------------------------------------------------------------------------
# Context: device, timing, results


class Ctx:
    """What a row needs: the device, the shapes, timers, the measured ceilings, and where results go."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny: bool = args.tiny
        self.shapes = TINY if args.tiny else FULL
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.cuda = self.device.type == "cuda"
        # bf16 autocast on the GPU (the setting); float32 on the CPU smoke run
        self.amp_dtype = torch.bfloat16 if self.cuda else None
        self.dtype = torch.bfloat16 if self.cuda else torch.float32  # decode weights
        self.start = time.perf_counter()
        self.checks: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.matmul_tflops: float | None = None
        self.copy_gbs: float | None = None

    # -- time and budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object], *, min_reps: int = 20, max_s: float = 3.0) -> list[float]:
        """Call fn once to warm up, once more to size the run, then time >= 3 (up to min_reps, within about
        max_s seconds) calls one by one; return each call's milliseconds. With --tiny: one call, no warm-up
        (a smoke run: the Triton interpreter takes seconds per call)."""
        if self.tiny:
            return [self._time_once(fn)]
        fn()
        self.sync()
        probe = self._time_once(fn)
        reps = max(3, min(min_reps, int(max_s * 1e3 / max(probe, 1e-3))))
        return [self._time_once(fn) for _ in range(reps)]

    def _time_once(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None

    # -- results

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)

    def add(self, group: str, name: str, ms: float | None = None, **metrics: Any) -> dict[str, Any]:
        row = {"group": group, "name": name, "ms": ms, "status": "ok", **metrics}
        self.rows.append(row)
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if v is not None)
        print(f"  {group:8s} {name:44s} {_fmt_ms(ms):>12s}  {shown}", flush=True)
        return row

    def skip(self, group: str, name: str, reason: str) -> None:
        self.rows.append({"group": group, "name": name, "ms": None, "status": f"skipped: {reason}"})
        print(f"  {group:8s} {name:44s} skipped: {reason}", flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


# ----------------------------------------------------------------------------------------------------------
# What exists in this checkout (other work lands concurrently: rows without their API are skipped)


def scan_backend_missing() -> str | None:
    if "backend" not in inspect.signature(selective_scan).parameters:
        return "selective_scan has no backend= keyword in this checkout"
    return None


def _backend_kw(backend: str) -> dict[str, str]:
    """selective_scan's backend keyword; {} for "chunked" in a checkout without it (the chunked scan is then
    the only one)."""
    return {} if backend == "chunked" and scan_backend_missing() else {"backend": backend}


def _config_has_backend() -> bool:
    return "scan_backend" in {f.name for f in dataclasses.fields(MambaConfig)}


def config_backend_missing() -> str | None:
    """Why a MambaLM cannot pick its scan backend here (MambaConfig's field, or MambaBlock's attribute)."""
    from vermeil.nn.ssm import MambaBlock

    if _config_has_backend() or "scan_backend" in inspect.signature(MambaBlock.__init__).parameters:
        return None
    return "neither MambaConfig nor MambaBlock takes scan_backend in this checkout"


def triton_missing(ctx: Ctx) -> str | None:
    """Why the Triton scan cannot run here, or None."""
    reason = scan_backend_missing()
    if reason:
        return reason
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    try:
        import vermeil.nn.scan_triton  # noqa: F401
    except ImportError as e:
        return f"vermeil.nn.scan_triton does not import ({e})"
    if not ctx.cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "on the CPU the Triton scan runs only under TRITON_INTERPRET=1"
    return None


def scan_bytes(bsz: int, dim: int, length: int, n: int, dtype: torch.dtype, backward: bool) -> int | None:
    try:
        from vermeil.nn.scan_triton import scan_bytes as count
    except ImportError:
        return None
    return int(count(bsz, dim, length, n, dtype, backward=backward))


# ----------------------------------------------------------------------------------------------------------
# 1. ceilings


def row_matmul_peak(ctx: Ctx) -> None:
    n = ctx.shapes.matmul
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    ms = ctx.time_ms(lambda: a @ b, min_reps=30, max_s=2.0)
    ctx.matmul_tflops = 2 * n**3 / (min(ms) * 1e-3) / 1e12
    ctx.add(
        "ceiling",
        f"matmul {n}^3 {str(dtype).removeprefix('torch.')} (peak = best)",
        _median(ms),
        tflops_best=ctx.matmul_tflops,
        tflops_median=2 * n**3 / (_median(ms) * 1e-3) / 1e12,
    )


def row_copy_bandwidth(ctx: Ctx) -> None:
    numel = ctx.shapes.copy_bytes // 4
    src = torch.randn(numel, device=ctx.device)
    dst = torch.empty_like(src)
    ms = ctx.time_ms(lambda: dst.copy_(src), min_reps=30, max_s=2.0)
    ctx.copy_gbs = 2 * ctx.shapes.copy_bytes / (_median(ms) * 1e-3) / 1e9  # read + write
    ctx.add(
        "ceiling",
        f"copy {ctx.shapes.copy_bytes / 2**30:.3g} GiB device-to-device",
        _median(ms),
        gbs=ctx.copy_gbs,
        of_datasheet=ctx.copy_gbs / HBM_DATASHEET_GBS if ctx.cuda else None,
    )


# ----------------------------------------------------------------------------------------------------------
# 2. correctness


def _scan_inputs(bsz: int, dim: int, n: int, length: int, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device)

    low = dict(dtype=dtype)
    return dict(
        u=r(bsz, dim, length).to(**low),
        delta=r(bsz, dim, length, scale=0.5).to(**low),
        A=-torch.exp(r(dim, n, scale=0.5)),
        B=r(bsz, n, length).to(**low),
        C=r(bsz, n, length).to(**low),
        D=r(dim),
        z=r(bsz, dim, length).to(**low),
        delta_bias=r(dim, scale=0.1),
        initial_state=r(bsz, dim, n),
    )


def _scan_loss(out: tuple[Tensor, Tensor]) -> Tensor:
    y, final = out
    return y.float().square().mean() + final.square().mean()


def _check_scan_backend(ctx: Ctx, backend: str) -> None:
    bsz, dim, n, length = ctx.shapes.check_scan
    inputs = _scan_inputs(bsz, dim, n, length, ctx.device, torch.float32)
    grads = {}
    outs = {}
    for name, fn in (
        ("ref", lambda **kw: selective_scan_ref(**kw)),
        (backend, lambda **kw: selective_scan(**kw, **_backend_kw(backend))),
    ):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
        out = fn(**leaves, delta_softplus=True, return_final_state=True)
        _scan_loss(out).backward()
        outs[name] = [t.detach() for t in out]
        grads[name] = {k: v.grad for k, v in leaves.items()}
    names = ["y", "final_state", *(f"d{k}" for k in inputs)]
    refs = outs["ref"] + list(grads["ref"].values())
    ours = outs[backend] + list(grads[backend].values())
    # error relative to each tensor's scale: fp32 summation order moves elements near zero by more
    errors = {
        k: ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for k, a, b in zip(names, ours, refs)
    }
    worst = max(errors, key=errors.__getitem__)
    ctx.check(
        f"scan {backend} == selective_scan_ref (fp32, y, final state, 9 grads; B{bsz} D{dim} N{n} L{length})",
        errors[worst] < 1e-5,
        f"max |diff| / max |ref| {errors[worst]:.1e} at {worst} (tolerance 1e-5)",
    )


def row_check_scans(ctx: Ctx) -> None:
    _check_scan_backend(ctx, "chunked")
    reason = triton_missing(ctx)
    if reason:
        ctx.skip("check", "scan triton == selective_scan_ref", reason)
        return
    _check_scan_backend(ctx, "triton")


def row_check_stack_backends(ctx: Ctx) -> None:
    reason = config_backend_missing() or triton_missing(ctx)
    if reason:
        ctx.skip("check", "Mamba stack: triton == chunked", reason)
        return
    s = ctx.shapes
    models = {b: _mamba_lm(ctx, b, vocab=64, n_layer=2) for b in ("chunked", "triton")}
    models["triton"].load_state_dict(models["chunked"].state_dict())
    tokens = torch.randint(0, 64, (min(s.batch, 2), min(s.length, 200)), device=ctx.device)
    with torch.no_grad():
        a, b = (models[k](tokens) for k in ("chunked", "triton"))
    err = ((a - b).abs().max() / b.abs().max()).item()
    ctx.check(
        "MambaLM logits: scan_backend triton == chunked (fp32)", err < 1e-4, f"max error / max {err:.1e}"
    )


def _decode_check_models(ctx: Ctx) -> dict[str, torch.nn.Module]:
    from vermeil.models import hybrid, llm, mamba

    torch.manual_seed(0)
    return {
        "LLM": llm.LLM(llm.ModelArgs(**llm.PRESETS["debug"])),
        "MambaLM": mamba.MambaLM(mamba.MambaConfig(**mamba.PRESETS["debug"])),
        "HybridModel": hybrid.HybridModel(hybrid.HybridConfig(**hybrid.PRESETS["debug"])),
    }


def row_check_decode(ctx: Ctx) -> None:
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15]]
    for name, model in _decode_check_models(ctx).items():
        try:
            model = model.to(ctx.device)
            eager = generate(model, prompts, 12, cuda_graph=False)
            stops = [int(eager[0, 3]), int(eager[1, 5])]
            eager_stop = generate(model, prompts, 12, stop_tokens=stops, cuda_graph=False)
            if ctx.cuda:
                fast, fast_stop = (generate(model, prompts, 12, stop_tokens=s) for s in ((), stops))
                what = "CUDA-graph decode"
                if name == "MambaLM":  # the compiled step, captured (one compilation, on a small model)
                    compiled = generate(model, prompts, 12, stop_tokens=stops, compile=True)
                    ctx.check(
                        f"{name}: compiled CUDA-graph decode == eager greedy tokens (fp32)",
                        torch.equal(compiled, eager_stop),
                    )
            else:  # no graphs here: the same static-buffer loop without the capture
                fast, fast_stop = (
                    _generate(
                        model, prompts, 12, stop_tokens=s, static=True, capture=False, stop_check_every=3
                    )
                    for s in ((), stops)
                )
                what = "static-buffer decode (no capture on the CPU)"
            ok = torch.equal(fast, eager) and torch.equal(fast_stop, eager_stop)
            ctx.check(f"{name}: {what} == eager greedy tokens (fp32, ragged, stop tokens)", ok)
        except Exception as e:  # keep going: a failure is a FAIL line, not a crash
            ctx.check(f"{name}: graph decode == eager greedy tokens", False, f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------------------
# 3. timed rows: the Mamba stack


def _mamba_cfg(ctx: Ctx, backend: str | None, vocab: int, n_layer: int | None = None) -> MambaConfig:
    s = ctx.shapes
    kw: dict[str, Any] = {"scan_backend": backend} if backend is not None and _config_has_backend() else {}
    return MambaConfig(
        d_model=s.d_model,
        n_layer=n_layer or s.n_layer,
        d_state=s.d_state,
        expand=s.expand,
        vocab_size=vocab,
        **kw,
    )


def _mamba_lm(
    ctx: Ctx, backend: str | None, vocab: int, n_layer: int | None = None, dtype: torch.dtype | None = None
) -> MambaLM:
    """A MambaLM of the bench's config; `backend` (None: the default) set through MambaConfig's scan_backend,
    or on each MambaBlock (a plain attribute) where the config has no such field yet."""
    torch.manual_seed(0)
    lm = MambaLM(_mamba_cfg(ctx, backend, vocab, n_layer), device=ctx.device, dtype=dtype)
    if backend is not None and not _config_has_backend():
        for layer in lm.backbone.layers:
            layer.mixer.scan_backend = backend
    return lm


def _stack_fn(lm: MambaLM) -> Callable[[Tensor], Tensor]:
    """MambaLM's residual blocks and final norm on an input (B, L, D): the backbone without the embedding."""
    layers, norm_f = lm.backbone.layers, lm.backbone.norm_f

    def run(x: Tensor) -> Tensor:
        hidden, residual = x, None
        for layer in layers:
            hidden, residual = layer(hidden, residual)
        return norm_f((hidden + residual).to(norm_f.weight.dtype))

    return run


def projection_flops(ctx: Ctx, backward: bool = True) -> float:
    """2 x multiply-adds of in_proj, x_proj, dt_proj, out_proj over the stack; backward costs 2x forward."""
    s = ctx.shapes
    e, r = s.expand * s.d_model, math.ceil(s.d_model / 16)
    per_token = 2 * (s.d_model * 2 * e + e * (r + 2 * s.d_state) + r * e + e * s.d_model)
    return per_token * s.batch * s.length * s.n_layer * (3 if backward else 1)


def _stack_input(ctx: Ctx) -> Tensor:
    s = ctx.shapes
    g = torch.Generator(device="cpu").manual_seed(1)
    return torch.randn(s.batch, s.length, s.d_model, generator=g).to(ctx.device)


def _fwd_bwd(ctx: Ctx, fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    def run() -> None:
        xg = x.detach().requires_grad_(True)
        with ctx.autocast():
            out = fn(xg)
        out.float().square().mean().backward()

    return run


def _floor_ms(ctx: Ctx) -> float | None:
    if ctx.matmul_tflops is None:
        return None
    return projection_flops(ctx) / (ctx.matmul_tflops * 1e12) * 1e3


def row_stack(ctx: Ctx) -> None:
    s = ctx.shapes
    x = _stack_input(ctx)
    floor = _floor_ms(ctx)
    times: dict[str, float] = {}
    label = f"{s.n_layer}-layer stack fwd+bwd B{s.batch} L{s.length} D{s.d_model}"
    for backend in ("triton", "chunked"):
        if backend == "triton":
            reason = config_backend_missing() or triton_missing(ctx)
            if reason:
                ctx.skip("stack", f"{label} triton", reason)
                continue
        name = f"{label} {backend}" + (" (default scan)" if config_backend_missing() else "")
        try:
            lm = _mamba_lm(ctx, backend, vocab=256)
            step = _fwd_bwd(ctx, _stack_fn(lm), x)
            ms = _median(ctx.time_ms(step, min_reps=20, max_s=6.0))
            peak = None
            if ctx.cuda:  # one more call, for its peak memory
                ctx.reset_peak()
                step()
                peak = ctx.peak_gb()
            times[backend] = ms
            ctx.add(
                "stack",
                name,
                ms,
                x_floor=ms / floor if floor else None,
                peak_gb=peak,
                x_triton=ms / times["triton"] if backend != "triton" and "triton" in times else None,
            )
            for p in lm.parameters():
                p.grad = None
            del lm
        except Exception as e:
            ctx.skip("stack", name, f"error: {type(e).__name__}: {e}")
            traceback.print_exc()
    if floor is not None:
        ctx.add("stack", "matmul floor (in/x/dt/out proj, x3) at the measured peak", floor)


def row_anchor_transformers(ctx: Ctx) -> None:
    s = ctx.shapes
    name = f"transformers MambaModel (torch fallback) fwd+bwd B{s.batch} L{s.length}"
    if not ctx.args.anchors:
        ctx.skip("anchors", name, "--no-anchors (off by default with --tiny)")
        return
    try:
        import transformers  # noqa: F401

        from vermeil.interop.transformers_mamba import to_transformers_mamba
    except ImportError:
        ctx.skip("anchors", name, "transformers is not installed")
        return
    if ctx.left() < 90:
        ctx.skip("anchors", name, f"time budget: {ctx.left():.0f} s left, the anchor takes ~35 s")
        return
    lm = _mamba_lm(ctx, None, vocab=256)
    hf = to_transformers_mamba(lm).backbone
    x = _stack_input(ctx)
    with torch.no_grad():  # same weights, same function: check at a short length first
        xs = x[:, :64]
        ours, theirs = _stack_fn(lm)(xs), hf(inputs_embeds=xs, use_cache=False).last_hidden_state
        err = (ours - theirs).abs().max().item()
    ctx.check("transformers MambaModel == Vermeil's stack (fp32, L 64)", err < 1e-3, f"max |diff| {err:.1e}")
    step = _fwd_bwd(ctx, lambda t: hf(inputs_embeds=t, use_cache=False).last_hidden_state, x)
    ctx.reset_peak()
    ms = ctx._time_once(step)  # one run: it takes tens of seconds
    ctx.add("anchors", name + " (1 run)", ms, peak_gb=ctx.peak_gb())


# ----------------------------------------------------------------------------------------------------------
# 3. timed rows: the scan alone


def row_scan(ctx: Ctx) -> None:
    bsz, dim, n, length = ctx.shapes.scan
    low = torch.bfloat16 if ctx.cuda else torch.float32
    inputs = _scan_inputs(bsz, dim, n, length, ctx.device, low)
    inputs.pop("initial_state")  # as a model's whole-sequence forward: from zeros
    for backend in ("triton", "chunked"):
        reason = triton_missing(ctx) if backend == "triton" else None
        label = f"scan B{bsz} D{dim} N{n} L{length} {str(low).removeprefix('torch.')} {backend}"
        label += " (default scan)" if not _backend_kw(backend) else ""
        if reason:
            ctx.skip("scan", label, reason)
            continue
        for backward in (False, True):
            name = f"{label} {'fwd+bwd' if backward else 'fwd'}"
            try:
                ms = _median(ctx.time_ms(_scan_call(inputs, backend, backward), min_reps=20, max_s=4.0))
            except Exception as e:
                ctx.skip("scan", name, f"error: {type(e).__name__}: {e}")
                continue
            moved = scan_bytes(bsz, dim, length, n, low, backward) if backend == "triton" else None
            gbs = moved / (ms * 1e-3) / 1e9 if moved else None
            ctx.add(
                "scan",
                name,
                ms,
                mb_moved=moved / 1e6 if moved else None,
                gbs=gbs,
                of_copy=gbs / ctx.copy_gbs if gbs and ctx.copy_gbs else None,
                of_datasheet=gbs / HBM_DATASHEET_GBS if gbs and ctx.cuda else None,
            )


def _scan_call(inputs: dict[str, Tensor], backend: str, backward: bool) -> Callable[[], None]:
    if not backward:

        def fwd() -> None:
            with torch.no_grad():
                selective_scan(**inputs, delta_softplus=True, **_backend_kw(backend))

        return fwd
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}

    def fwd_bwd() -> None:
        y = selective_scan(**leaves, delta_softplus=True, **_backend_kw(backend))
        y.backward(torch.ones_like(y))
        for t in leaves.values():
            t.grad = None

    return fwd_bwd


# ----------------------------------------------------------------------------------------------------------
# 3. timed rows: decoding


def _hybrid_pattern(s: Shapes) -> str:
    return "MMMAMMMA" if s.n_layer % 8 == 0 else "MA"


def _hybrid(ctx: Ctx) -> HybridModel:
    s = ctx.shapes
    torch.manual_seed(0)
    cfg = HybridConfig(
        dim=s.d_model,
        vocab_size=s.vocab,
        pattern=_hybrid_pattern(s),
        n_layers=s.n_layer,
        d_state=s.d_state,
        expand=s.expand,
        heads=max(1, s.d_model // 128),
        feed_forward="none",
        max_seq_len=max(s.contexts) + s.new_tokens + 2,
    )
    return HybridModel(cfg, device=ctx.device, dtype=ctx.dtype)


def _ms_per_token(ctx: Ctx, model: torch.nn.Module, context: int, **kw: Any) -> float:
    """Greedy generate after `context` tokens; the median interval between consecutive decode steps."""
    s = ctx.shapes
    prompt = torch.randint(1, s.vocab, (1, context), device=ctx.device)
    stamps: list[Any] = []

    def clock(pos: int, token: Tensor) -> None:
        if ctx.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            stamps.append(event)
        else:
            stamps.append(time.perf_counter())

    # one cache length for both calls: a compiled step is specialised to the cache's shape
    kw = dict(kw, max_seq_len=context + s.new_tokens + 2)
    generate(model, prompt, 2, **kw)  # warm-up: kernels, cuBLAS handles, compilation, the prefill path
    generate(model, prompt, s.new_tokens + 2, callback=clock, **kw)
    ctx.sync()
    if ctx.cuda:
        gaps = [a.elapsed_time(b) for a, b in zip(stamps, stamps[1:])]
    else:
        gaps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return _median(gaps)


# generate's decode variants: the eager step (the reference), the CUDA-graph step, and the same step compiled
# by Inductor and then captured (the compilation, tens of seconds, happens in the untimed warm-up call)
DECODE_VARIANTS: dict[str, dict[str, bool]] = {
    "eager": dict(cuda_graph=False),
    "cuda-graph": dict(cuda_graph=True),
    "compiled cuda-graph": dict(cuda_graph=True, compile=True),
}


def row_decode(ctx: Ctx) -> None:
    s = ctx.shapes
    dtype = str(ctx.dtype).removeprefix("torch.")
    models: dict[str, Callable[[], torch.nn.Module]] = {
        f"MambaLM D{s.d_model} x{s.n_layer} V{s.vocab}": lambda: _mamba_lm(
            ctx, None, s.vocab, dtype=ctx.dtype
        ),
        f"HybridModel D{s.d_model} x{s.n_layer} ({_hybrid_pattern(s)}) V{s.vocab}": lambda: _hybrid(ctx),
    }
    for label, build in models.items():
        model = build().eval()
        for context in s.contexts:
            eager_ms = None
            for variant, kw in DECODE_VARIANTS.items():
                name = f"{label} B1 after {context} {dtype} {variant}"
                if kw["cuda_graph"] and not ctx.cuda:
                    ctx.skip("decode", name, "CUDA graphs need a CUDA device")
                    continue
                if ctx.left() < (90 if kw.get("compile") else 15):
                    ctx.skip("decode", name, f"time budget: {ctx.left():.0f} s left")
                    continue
                try:
                    ms = _ms_per_token(ctx, model, context, **kw)
                except Exception as e:
                    ctx.skip("decode", name, f"error: {type(e).__name__}: {e}")
                    traceback.print_exc()
                    continue
                eager_ms = ms if variant == "eager" else eager_ms
                ctx.add(
                    "decode",
                    name,
                    ms,
                    tok_s=1e3 / ms,
                    speedup=eager_ms / ms if variant != "eager" and eager_ms else None,
                )
        del model


# ----------------------------------------------------------------------------------------------------------
# Groups, in running order. The next issue appends its rows (transformer decode, train step, MoE, Flux).

GROUPS: dict[str, list[Callable[[Ctx], None]]] = {
    "ceiling": [row_matmul_peak, row_copy_bandwidth],
    "check": [row_check_scans, row_check_stack_backends, row_check_decode],
    "stack": [row_stack],
    "scan": [row_scan],
    "decode": [row_decode],
    "anchors": [row_anchor_transformers],
}


def header(ctx: Ctx) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "device": torch.cuda.get_device_name() if ctx.cuda else f"cpu ({platform.processor() or 'unknown'})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "vermeil": getattr(vermeil, "__version__", None),
        "python": platform.python_version(),
        "tiny": ctx.tiny,
        "amp_dtype": str(ctx.amp_dtype) if ctx.amp_dtype else None,
        "shapes": dataclasses.asdict(ctx.shapes),
    }
    for k in ("device", "torch", "cuda", "triton", "triton_interpret", "tiny"):
        print(f"{k}: {info[k]}")
    return info


def print_table(ctx: Ctx) -> None:
    print("\n| group | row | time | figures |\n| --- | --- | --- | --- |")
    for r in ctx.rows:
        extra = {k: v for k, v in r.items() if k not in ("group", "name", "ms", "status") and v is not None}
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in extra.items())
        if r["status"] != "ok":
            figures = r["status"]
        print(f"| {r['group']} | {r['name']} | {_fmt_ms(r['ms'])} | {figures} |")
    failed = [c["name"] for c in ctx.checks if not c["ok"]]
    print(
        f"\nchecks: {len(ctx.checks) - len(failed)} passed, {len(failed)} failed"
        + (f": {failed}" if failed else "")
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test that runs on the CPU")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    p.add_argument("--json", metavar="PATH", help="write the header, checks and rows as JSON")
    p.add_argument("--only", metavar="GROUPS", help=f"comma-separated groups among {','.join(GROUPS)}")
    p.add_argument(
        "--budget-s", type=float, default=420.0, help="skip the remaining rows past this many seconds"
    )
    anchors = p.add_mutually_exclusive_group()
    anchors.add_argument(
        "--anchors", dest="anchors", action="store_true", default=None, help="time the anchors"
    )
    anchors.add_argument("--no-anchors", dest="anchors", action="store_false", help="skip the anchors")
    args = p.parse_args(argv)
    if args.anchors is None:
        args.anchors = not args.tiny
    if args.only:
        wanted = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = [g for g in wanted if g not in GROUPS]
        if unknown:
            p.error(f"--only {args.only!r}: unknown group(s) {unknown}; groups are {list(GROUPS)}")
        args.only = wanted
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2 if args.tiny else 16))
    ctx = Ctx(args)
    info = header(ctx)
    groups = args.only or list(GROUPS)
    if any(g in groups for g in ("stack", "scan")) and "ceiling" not in groups:
        groups = ["ceiling", *groups]  # the floors and bandwidth ratios need the ceilings
    for group in GROUPS:
        if group not in groups:
            continue
        print(f"\n== {group} ({ctx.elapsed():.0f} s)", flush=True)
        for row in GROUPS[group]:
            if ctx.left() <= 0:
                ctx.skip(group, row.__name__, f"time budget ({args.budget_s:.0f} s) spent")
                continue
            try:
                row(ctx)
            except Exception as e:  # a broken row must not hide the others
                traceback.print_exc()
                ctx.skip(group, row.__name__, f"error: {type(e).__name__}: {e}")
            if ctx.cuda:
                torch.cuda.empty_cache()
    print_table(ctx)
    print(f"total {ctx.elapsed():.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "seconds": ctx.elapsed(), "checks": ctx.checks, "rows": ctx.rows}, f, indent=1)
    return 1 if any(not c["ok"] for c in ctx.checks) else 0


if __name__ == "__main__":
    sys.exit(main())
