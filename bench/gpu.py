"""Every GPU figure the project reports, in one call: correctness on the device first, then timed rows, a table.

Made for one H200 or H100 (torch 2.11, CUDA 13, Triton 3.6) in at most 8 minutes; `--tiny` runs the same
code at tiny shapes on the CPU (a smoke test of the script, CI-safe). Imports only torch, vermeil and, when present,
triton, transformers and diffusers.

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
           achieved GB/s against the measured copy bandwidth and the datasheet figure (`datasheet_gbs`); the
           Triton scan in both layouts (`selective_scan_triton(layout="tile"|"channel")`, each checked first).
  sweep    the Triton scan at the scan rows' shape over SWEEP (layout x block_d x chunk x num_warps, the
           dB/dC partials and the unrolled state loop): y checked against the default kernel, then fwd and
           fwd+bwd timed; a configuration that fails to compile is skipped with its error; the best fwd+bwd,
           then it (also after copying the inputs to L-contiguous, copies timed) and the default on
           time-major inputs (MambaBlock's views). At most 150 s, or what the
           budget leaves when no later group is to run (`--only check,scan,sweep`).
  conv     the block's causal depthwise conv (d_conv 4) + SiLU at the stack's shape (B 4, L 2048, E 2048),
           fwd+bwd: cuDNN's conv1d on channels-first views (today's CUDA path), the time-major shifted
           multiply-adds (the CPU path) and the shifted sum compiled by Inductor; each alone (its relative
           difference to the first reported), then the stack fwd+bwd with it swapped into every block.
  decode   batch 1, greedy, after 64 and after 4096 prompt tokens, MambaLM (the stack's config, vocabulary
           32000) and a HybridModel of the same width (pattern MMMAMMMA, no feed-forward), bf16 weights:
           `generate`'s eager step, its CUDA-graph step, and the graph of the step compiled by Inductor
           (`compile=True`; compiled in an untimed warm-up), ms per token = the median interval between
           consecutive decode steps over 32 tokens (CUDA events recorded from `generate`'s callback: the whole
           loop, sampling and bookkeeping included).

Rows (issue "The transformer path at GPU speed"); 1.1B Llama shape = dim 2048, 16 layers, 16 heads / 8 kv,
SwiGLU 5632, vocabulary 32000:
  llm      greedy decoding of the 1.1B shape: first the graph-captured (and, while the budget allows, the
           compiled) decode against eager in float32, token for token, batch 2; then bf16 ms/token after 128
           prompt tokens at batch 1, 8 and 32: eager, CUDA graph, and the compiled graph at batch 1, with
           tokens/s and the ratio to the bandwidth floor (non-embedding weight bytes / measured copy bandwidth).
  train    one AdamW step (fused on CUDA) of the 1.1B shape, batch 4 x 2048, bf16 autocast: eager, regional
           compilation (`vermeil.train.regional.compile_blocks`, what `train.compile` runs) and the same with the
           chunked head + cross-entropy (`chunked_lm_loss_fn`); tokens/s, MFU = tokens/s x (6N + 12 L T d) /
           the measured matmul peak (N non-embedding parameters, causal attention not halved, torchtitan's
           convention), the first step's time (compilation included) and peak memory.
  flex     chunked (2048) and sliding-window (1024) causal attention at B 1, 16 heads x 128, T 8192, bf16,
           forward + backward: FlexAttention (`vermeil.nn.flex`, cached block masks, compiled kernel) vs SDPA
           with the dense boolean mask (the reference), and for chunks SDPA's causal kernel per chunk. Checked
           first in float32 at T 1024 (outputs and gradients). On the CPU forward only: no flex backward there.
  moe      an MoE block (Mixtral routing, no shared expert), 16384 tokens, dim 2048, 8 experts x 1408, top-2,
           fwd+bwd, bf16 autocast: the grouped_mm path and the padded bmm against a dense SwiGLU of equal active
           FLOPs (hidden 2 x 1408); checked first against the per-expert loop (float32, and bf16 loosely).
  flux     Flux, hidden 3072, 24 heads, 4 double + 8 single blocks, 4096 data + 512 condition tokens, batch 1,
           bf16 weights: Vermeil vs diffusers' FluxTransformer2DModel on the same weights (checked equal in
           float32 first; rows skipped when diffusers is missing), forward and forward + backward, eager and
           both regionally compiled (`compile_blocks` / diffusers' `compile_repeated_blocks`). Vermeil's
           backward is first run with cuDNN attention enabled (a PASS/FAIL line: torch 2.11's cuDNN backward
           failed in diffusers at this shape), then the timed rows run with `enable_cudnn_sdp(False)`.
  recipes  every configs/*.yaml trains 30 steps with train.device=cuda through the public recipe API
           (`load_run_config`, `build_run`, `Trainer`), one PASS/FAIL line per config (2 steps on the CPU with
           --tiny, the text corpus cut to 200 kB); train.compile=false (the train group times compilation).
On the --tiny CPU run the "compiled" variants use Dynamo's eager backend: the same tracing (graph breaks,
fullgraph errors) in seconds, not Inductor's minutes.

Adding rows: write `def row_x(ctx: Ctx) -> None` that calls
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
from vermeil.models.flux import PRESETS as FLUX_PRESETS
from vermeil.models.hybrid import HybridConfig, HybridModel
from vermeil.models.mamba import MambaConfig, MambaLM
from vermeil.nn.scan import selective_scan, selective_scan_ref

# HBM bandwidth on the datasheet (GB/s), looked up in the name torch reports (the first key found in it wins):
# the H100's variants differ (SXM HBM3 3.35 TB/s, NVL 3.9, PCIe 2.0)
HBM_DATASHEET_GBS = {"H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0}


def datasheet_gbs(device_name: str) -> float | None:
    """The datasheet HBM bandwidth of a device named `device_name`; None for a device not in the table."""
    return next((gbs for key, gbs in HBM_DATASHEET_GBS.items() if key in device_name), None)


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
        self.datasheet_gbs = datasheet_gbs(torch.cuda.get_device_name(self.device)) if self.cuda else None

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


def scan_bytes(
    bsz: int,
    dim: int,
    length: int,
    n: int,
    dtype: torch.dtype,
    backward: bool,
    kernel: dict[str, Any] | None = None,
) -> int | None:
    """Bytes the Triton scan moves; `kernel` (layout, chunk) sets the chunk length of its saved states."""
    try:
        from vermeil.nn import scan_triton as st
    except ImportError:
        return None
    kernel = kernel or {}
    chunk = kernel.get("chunk") or (st.CHANNEL_CHUNK if kernel.get("layout") == "channel" else st.CHUNK)
    if "chunk" not in inspect.signature(st.scan_bytes).parameters:
        return int(st.scan_bytes(bsz, dim, length, n, dtype, backward=backward))
    return int(st.scan_bytes(bsz, dim, length, n, dtype, backward=backward, chunk=chunk))


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
        of_datasheet=ctx.copy_gbs / ctx.datasheet_gbs if ctx.datasheet_gbs else None,
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


def _scan_fn(backend: str, kernel: dict[str, Any] | None = None) -> Callable[..., Any]:
    """selective_scan with this backend, or with `kernel` (layout, block sizes) the Triton scan called directly."""
    if kernel is not None:
        from vermeil.nn.scan_triton import selective_scan_triton

        kernel = dict(kernel)
        # "contiguous": copy (B, X, L) inputs to L-contiguous first, as mamba_ssm's wrapper does
        if kernel.pop("contiguous", False):
            return lambda **kw: selective_scan_triton(
                **{k: v.contiguous() if isinstance(v, Tensor) and v.dim() == 3 else v for k, v in kw.items()},
                **kernel,
            )
        return lambda **kw: selective_scan_triton(**kw, **kernel)
    return lambda **kw: selective_scan(**kw, **_backend_kw(backend))


def _kernel_label(kernel: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in kernel.items())


def _check_scan_backend(ctx: Ctx, backend: str, kernel: dict[str, Any] | None = None) -> None:
    bsz, dim, n, length = ctx.shapes.check_scan
    inputs = _scan_inputs(bsz, dim, n, length, ctx.device, torch.float32)
    grads = {}
    outs = {}
    label = backend + (f" {_kernel_label(kernel)}" if kernel else "")
    for name, fn in (("ref", lambda **kw: selective_scan_ref(**kw)), (backend, _scan_fn(backend, kernel))):
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
        f"scan {label} == selective_scan_ref (fp32, y, final state, 9 grads; B{bsz} D{dim} N{n} L{length})",
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
    # the "channel" layout at its default block sizes (on the CPU: a short chunk, for the interpreter)
    _check_scan_backend(ctx, "triton", {"layout": "channel", **({"chunk": 8} if ctx.tiny else {})})
    _check_scan_backend(ctx, "triton", {"layout": "channel", "block_d": 2, "chunk": 8 if ctx.tiny else 128,
                                        "atomic_bc": False})  # fmt: skip


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
        # the "channel" layout beside the default one (its chunk shortened for the interpreter)
        kernels = (
            [None]
            if backend != "triton"
            else [None, {"layout": "channel", **({"chunk": 8} if ctx.tiny else {})}]
        )
        for kernel in kernels:
            name_k = label + (f" {_kernel_label(kernel)}" if kernel else "")
            for backward in (False, True):
                _time_scan(ctx, "scan", f"{name_k} {'fwd+bwd' if backward else 'fwd'}", inputs, backend, backward,
                           kernel, min_reps=20, max_s=4.0)  # fmt: skip


def _time_scan(
    ctx: Ctx, group: str, name: str, inputs: dict[str, Tensor], backend: str, backward: bool,
    kernel: dict[str, Any] | None, **timing: Any,
) -> float | None:  # fmt: skip
    """Time one scan call (a row with bytes moved and GB/s); None, and a skipped row naming the error, if it fails."""
    bsz, dim, length = inputs["u"].shape
    n, low = inputs["A"].shape[1], inputs["u"].dtype
    try:
        ms = _median(ctx.time_ms(_scan_call(inputs, backend, backward, kernel), **timing))
    except Exception as e:
        ctx.skip(group, name, f"error: {type(e).__name__}: {str(e)[:300]}")
        return None
    moved = scan_bytes(bsz, dim, length, n, low, backward, kernel) if backend == "triton" else None
    gbs = moved / (ms * 1e-3) / 1e9 if moved else None
    ctx.add(
        group,
        name,
        ms,
        mb_moved=moved / 1e6 if moved else None,
        gbs=gbs,
        of_copy=gbs / ctx.copy_gbs if gbs and ctx.copy_gbs else None,
        of_datasheet=gbs / ctx.datasheet_gbs if gbs and ctx.datasheet_gbs else None,
    )
    return ms


# layout, block_d, chunk, num_warps (+ atomic_bc) of the sweep, the likeliest first (the budget may cut it)
SWEEP: list[dict[str, Any]] = [
    {"layout": "channel", "block_d": bd, "chunk": ch, "num_warps": w}
    for bd, ch, w in [(1, 512, 4), (1, 1024, 8), (1, 256, 4), (1, 1024, 4), (2, 512, 8), (1, 2048, 16),
                      (1, 512, 8), (2, 256, 4), (4, 256, 8), (4, 512, 16), (1, 128, 1), (2, 1024, 16)]
] + [
    {"layout": "channel", "block_d": 1, "chunk": 512, "num_warps": 4, "unroll_n": True},
    {"layout": "channel", "block_d": 4, "chunk": 256, "num_warps": 8, "atomic_bc": False},
    {"layout": "channel", "block_d": 8, "chunk": 128, "num_warps": 8, "atomic_bc": False},
] + [
    {"layout": "tile", "block_d": bd, "chunk": ch, "num_warps": w}
    for bd, ch, w in [(8, 32, 8), (8, 16, 4), (16, 16, 8), (4, 32, 4), (4, 64, 8)]
] + [{"layout": "tile", "block_d": 8, "chunk": 32, "num_warps": 8, "atomic_bc": False}]  # fmt: skip
SWEEP_TINY = [{"layout": "channel", "block_d": 4, "chunk": 8, "num_warps": 4},
              {"layout": "tile", "block_d": 4, "chunk": 8, "num_warps": 4}]  # fmt: skip


def row_scan_sweep(ctx: Ctx) -> None:
    """Each SWEEP configuration at the scan rows' shape: forward checked against the default kernel's y (bf16
    rounding), then timed fwd and fwd+bwd; the best fwd+bwd printed last. Spends at most 150 s when later
    groups are to run, else what is left of the budget."""
    reason = triton_missing(ctx)
    if reason:
        ctx.skip("sweep", "scan sweep", reason)
        return
    later = list(GROUPS)[list(GROUPS).index("sweep") + 1 :]
    until = ctx.elapsed() + (150.0 if any(g in (ctx.args.only or GROUPS) for g in later) else ctx.left() - 10)
    bsz, dim, n, length = ctx.shapes.scan
    low = torch.bfloat16 if ctx.cuda else torch.float32
    inputs = _scan_inputs(bsz, dim, n, length, ctx.device, low)
    inputs.pop("initial_state")
    with torch.no_grad():
        y_ref = selective_scan(**inputs, delta_softplus=True, backend="triton").float()
    best: tuple[float, str, dict[str, Any]] | None = None
    for kernel in SWEEP_TINY if ctx.tiny else SWEEP:
        name = f"B{bsz} D{dim} N{n} L{length} {_kernel_label(kernel)}"
        if ctx.elapsed() > until or ctx.left() <= 0:
            ctx.skip("sweep", name, "sweep time spent")
            continue
        try:
            with torch.no_grad():
                y = _scan_fn("triton", kernel)(**inputs, delta_softplus=True).float()
        except Exception as e:  # a config that fails to compile (registers, shared memory): named, skipped
            ctx.skip("sweep", name, f"error: {type(e).__name__}: {str(e)[:300]}")
            continue
        err = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
        if not err < 2e-2:
            ctx.skip("sweep", name, f"error: y differs from the default kernel's by {err:.1e} of its max")
            continue
        _time_scan(ctx, "sweep", f"{name} fwd", inputs, "triton", False, kernel, min_reps=10, max_s=1.0)
        ms = _time_scan(
            ctx, "sweep", f"{name} fwd+bwd", inputs, "triton", True, kernel, min_reps=10, max_s=1.5
        )
        if ms is not None and (best is None or ms < best[0]):
            best = (ms, name, kernel)
    if best is None:
        return
    ctx.add("sweep", f"best fwd+bwd: {best[1]}", best[0])
    # MambaBlock passes time-major views (D innermost): the best configuration and the default on those, and
    # the best one after copying the inputs to L-contiguous (the copies timed with it)
    major = {
        k: v.transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 3 else v for k, v in inputs.items()
    }
    for kernel in (best[2], {**best[2], "contiguous": True}, None):
        if ctx.elapsed() > until:
            break
        label = _kernel_label(kernel) if kernel else "default (tile)"
        _time_scan(ctx, "sweep", f"time-major inputs {label} fwd+bwd", major, "triton", True, kernel, min_reps=10,
                   max_s=1.5)  # fmt: skip


def _scan_call(
    inputs: dict[str, Tensor], backend: str, backward: bool, kernel: dict[str, Any] | None = None
) -> Callable[[], None]:
    scan = _scan_fn(backend, kernel)
    if not backward:

        def fwd() -> None:
            with torch.no_grad():
                scan(**inputs, delta_softplus=True)

        return fwd
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}

    def fwd_bwd() -> None:
        y = scan(**leaves, delta_softplus=True)
        y.backward(torch.ones_like(y))
        for t in leaves.values():
            t.grad = None

    return fwd_bwd


# ----------------------------------------------------------------------------------------------------------
# 3. timed rows: the block's causal conv


def _shifted_sum_conv(hist: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The causal depthwise conv as K shifted products, left to autograd (what Inductor fuses when compiled):
    hist (B, K - 1 + L, E), weight (E, 1, K), bias (E,) or None -> (B, L, E)."""
    k = weight.shape[-1]
    length = hist.shape[1] - k + 1
    out = sum(hist[:, j : j + length] * weight[:, 0, j] for j in range(k))
    return out if bias is None else out + bias


def _conv_variants(ctx: Ctx) -> dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]]:
    """The candidates for `vermeil.nn.ssm._causal_depthwise_conv`, each with its dtype promotion."""
    from torch.nn import functional as F

    from vermeil.nn import ssm

    def promoted(conv: Callable[..., Tensor]) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
        def run(hist: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            dtype = torch.promote_types(hist.dtype, weight.dtype)  # as the library's function
            return conv(hist.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

        return run

    return {
        "cuDNN conv1d, channels-first views": promoted(
            lambda h, w, b: F.conv1d(h.transpose(1, 2), w, b, groups=w.shape[0]).transpose(1, 2)
        ),
        "time-major multiply-adds": promoted(
            lambda h, w, b: ssm._CausalDepthwiseConv.apply(h, w[:, 0].t(), b)
        ),
        f"shifted sum, compiled{_compiled_label(ctx)}": promoted(
            torch.compile(_shifted_sum_conv, dynamic=False, **_compile_kw(ctx))
        ),
    }


def row_conv(ctx: Ctx) -> None:
    """The Mamba block's causal depthwise conv (d_conv 4) + SiLU at the stack's shape, fwd+bwd under the
    bench's autocast: each candidate alone, then the whole stack with it swapped in (the block looks
    `_causal_depthwise_conv` up at call time), so the faster one can become the CUDA default."""
    from torch.nn import functional as F

    from vermeil.nn import ssm

    s = ctx.shapes
    e, k = s.expand * s.d_model, 4
    g = torch.Generator(device="cpu").manual_seed(2)
    low = torch.bfloat16 if ctx.cuda else torch.float32
    hist = torch.randn(s.batch, k - 1 + s.length, e, generator=g).to(ctx.device, low)
    weight = (torch.randn(e, 1, k, generator=g) / 2).to(ctx.device).requires_grad_(True)
    bias = torch.randn(e, generator=g).to(ctx.device).requires_grad_(True)
    backend = "chunked" if triton_missing(ctx) or config_backend_missing() else "triton"
    x = _stack_input(ctx)
    original, reference = ssm._causal_depthwise_conv, None
    for name, conv in _conv_variants(ctx).items():
        label = f"conv+SiLU B{s.batch} L{s.length} E{e} K{k} {name}"
        try:
            h = hist.detach().requires_grad_(True)
            with ctx.autocast():
                out = F.silu(conv(h, weight, bias))
            out.float().square().mean().backward()
            got = (out.float(), h.grad.float(), weight.grad.float(), bias.grad.float())
            weight.grad = bias.grad = None
            reference = reference or got
            diff = max(
                (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6) for a, b in zip(got, reference)
            )

            def alone(conv: Callable[..., Tensor] = conv) -> None:
                h = hist.detach().requires_grad_(True)
                with ctx.autocast():
                    out = F.silu(conv(h, weight, bias))
                out.float().square().mean().backward()

            ctx.add("conv", label + " fwd+bwd", _median(ctx.time_ms(alone, min_reps=20, max_s=3.0)),
                    rel_diff_vs_first=diff)  # fmt: skip
            weight.grad = bias.grad = None
            ssm._causal_depthwise_conv = conv
            lm = _mamba_lm(ctx, backend, vocab=256)
            ms = _median(ctx.time_ms(_fwd_bwd(ctx, _stack_fn(lm), x), min_reps=10, max_s=3.0))
            ctx.add("conv", f"{s.n_layer}-layer stack fwd+bwd ({backend} scan) with {name}", ms)
            del lm
        except Exception as e:
            ctx.skip("conv", label, f"error: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
        finally:
            ssm._causal_depthwise_conv = original


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


def _ms_per_token(
    ctx: Ctx,
    model: torch.nn.Module,
    context: int,
    *,
    batch: int = 1,
    new_tokens: int | None = None,
    vocab: int | None = None,
    **kw: Any,
) -> float:
    """Greedy generate after `context` tokens (a batch of `batch` prompts); the median interval between
    consecutive decode steps over `new_tokens` (default: the Mamba rows')."""
    s = ctx.shapes
    new_tokens = s.new_tokens if new_tokens is None else new_tokens
    prompt = torch.randint(1, vocab or s.vocab, (batch, context), device=ctx.device)
    stamps: list[Any] = []

    def clock(pos: int, token: Tensor) -> None:
        if ctx.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            stamps.append(event)
        else:
            stamps.append(time.perf_counter())

    # one cache length for both calls: a compiled step is specialised to the cache's shape
    kw = dict(kw, max_seq_len=context + new_tokens + 2)
    generate(model, prompt, 2, **kw)  # warm-up: kernels, cuBLAS handles, compilation, the prefill path
    generate(model, prompt, new_tokens + 2, callback=clock, **kw)
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
            _decode_rows(ctx, "decode", f"{label} B1 after {context} {dtype}", model, context)
        del model


def _decode_rows(
    ctx: Ctx,
    group: str,
    label: str,
    model: torch.nn.Module,
    context: int,
    *,
    variants: dict[str, dict[str, bool]] = DECODE_VARIANTS,
    batch: int = 1,
    metrics: Callable[[float], dict[str, Any]] = lambda ms: {},
    **kw: Any,
) -> None:
    """One row per decode variant (`_ms_per_token`), each with tokens/s, `metrics(ms)` and its speedup over
    eager; graph variants are skipped off CUDA, compiled ones when under 90 s of budget are left."""
    eager_ms = None
    for variant, options in variants.items():
        name = f"{label} {variant}"
        if options["cuda_graph"] and not ctx.cuda:
            ctx.skip(group, name, "CUDA graphs need a CUDA device")
            continue
        if ctx.left() < (90 if options.get("compile") else 15):
            ctx.skip(group, name, f"time budget: {ctx.left():.0f} s left")
            continue
        try:
            ms = _ms_per_token(ctx, model, context, batch=batch, **options, **kw)
        except Exception as e:
            ctx.skip(group, name, f"error: {type(e).__name__}: {e}")
            traceback.print_exc()
            continue
        eager_ms = ms if variant == "eager" else eager_ms
        ctx.add(
            group,
            name,
            ms,
            tok_s=batch * 1e3 / ms,
            **metrics(ms),
            speedup=eager_ms / ms if variant != "eager" and eager_ms else None,
        )


# ----------------------------------------------------------------------------------------------------------
# Transformer rows (issue "The transformer path at GPU speed")


@dataclasses.dataclass(frozen=True)
class TShapes:
    llm: dict[str, Any]  # ModelArgs of the decode and train rows (the 1.1B Llama shape)
    decode_batches: tuple[int, ...]
    prompt: int  # decode rows: prompt tokens before the timed steps
    decode_new: int  # decode rows: timed steps
    train_batch: int
    train_seq: int
    flex: tuple[int, int, int, int, int, int]  # (B, H, T, Dh, chunk, window)
    flex_check_t: int  # T of the flex parity check (float32)
    moe: tuple[int, int, int, int, int]  # (tokens, D, E, F, K)
    flux: dict[str, Any]  # FluxParams fields
    flux_grid: int  # data tokens = grid^2
    flux_cond: int  # condition tokens
    recipe_steps: int


T_FULL = TShapes(
    llm=dict(
        dim=2048,
        n_layers=16,
        n_heads=16,
        n_kv_heads=8,
        hidden_dim=5632,
        vocab_size=32000,
        rope_theta=10000.0,
        max_seq_len=4096,
    ),
    decode_batches=(1, 8, 32),
    prompt=128,
    decode_new=32,
    train_batch=4,
    train_seq=2048,
    flex=(1, 16, 8192, 128, 2048, 1024),
    flex_check_t=1024,
    moe=(16384, 2048, 8, 1408, 2),
    # flux-dev's blocks (BFL util.py), 4 double + 8 single of them, no guidance embedding
    flux=dict(
        dataclasses.asdict(FLUX_PRESETS["flux-dev"]), depth=4, depth_single_blocks=8, guidance_embed=False
    ),
    flux_grid=64,
    flux_cond=512,
    recipe_steps=30,
)
T_TINY = dataclasses.replace(
    T_FULL,
    llm=dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        multiple_of=16,
        vocab_size=256,
        rope_theta=10000.0,
        max_seq_len=256,
    ),
    decode_batches=(1, 2),
    prompt=8,
    decode_new=6,
    train_batch=2,
    train_seq=32,
    flex=(1, 2, 256, 16, 64, 32),
    flex_check_t=200,
    moe=(64, 32, 4, 48, 2),
    flux={
        **T_FULL.flux,
        "in_channels": 8,
        "out_channels": 8,
        "vec_in_dim": 16,
        "context_in_dim": 32,
        "hidden_size": 48,
        "num_heads": 3,
        "depth": 1,
        "depth_single_blocks": 2,
        "axes_dim": [4, 6, 6],
    },
    flux_grid=4,
    flux_cond=8,
    recipe_steps=2,
)


def _tshapes(ctx: Ctx) -> TShapes:
    return T_TINY if ctx.tiny else T_FULL


def _compile_kw(ctx: Ctx) -> dict[str, Any]:
    """torch.compile keywords of the compiled variants: Inductor on CUDA; on the --tiny CPU run Dynamo's eager
    backend, which traces the same graphs (graph breaks, fullgraph errors) in seconds instead of minutes."""
    return {} if ctx.cuda else {"backend": "eager"}


def _compiled_label(ctx: Ctx) -> str:
    return "" if ctx.cuda else " (dynamo eager backend on the CPU)"


def _llm(ctx: Ctx, dtype: torch.dtype | None = None) -> torch.nn.Module:
    from vermeil.models.llm import LLM, ModelArgs

    torch.manual_seed(0)
    return LLM(ModelArgs(**_tshapes(ctx).llm), device=ctx.device, dtype=dtype)


def _non_embedding_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads at least once: every weight but the token embedding (a row gather)."""
    return sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if not n.startswith("tok_embeddings")
    )


def row_llm_decode(ctx: Ctx) -> None:
    """Greedy decoding of the 1.1B Llama shape: token equality in float32 first, then ms/token in bf16 (eager,
    CUDA graph, Inductor-compiled graph at batch 1) against the bandwidth floor."""
    ts = _tshapes(ctx)
    label = "LLM 1.1B" if not ctx.tiny else "LLM tiny"
    prompt_len, new = ts.prompt, ts.decode_new
    model = _llm(ctx, torch.float32).eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    prompts = torch.randint(1, ts.llm["vocab_size"], (2, prompt_len), generator=g).to(ctx.device)
    eager = generate(model, prompts, new, cuda_graph=False)
    if ctx.cuda:
        fast, what = generate(model, prompts, new, cuda_graph=True), "CUDA-graph"
    else:
        fast = _generate(model, prompts, new, static=True, capture=False, stop_check_every=3)
        what = "static-buffer (no capture on the CPU)"
    ctx.check(
        f"{label}: {what} decode == eager greedy tokens (fp32, batch 2, {new} tokens)",
        torch.equal(fast, eager),
    )
    if ctx.cuda and ctx.left() > 240:  # one more compilation (fp32), worth it while the budget is young
        compiled = generate(model, prompts, new, cuda_graph=True, compile=True)
        ctx.check(
            f"{label}: compiled CUDA-graph decode == eager greedy tokens (fp32, batch 2, {new} tokens)",
            torch.equal(compiled, eager),
        )
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    model = model.to(dtype)
    floor_ms = None
    weight_bytes = _non_embedding_bytes(model)
    if ctx.copy_gbs:
        floor_ms = weight_bytes / (ctx.copy_gbs * 1e9) * 1e3
    dname = str(dtype).removeprefix("torch.")
    for batch in ts.decode_batches:
        # one compilation (tens of seconds) is enough to report: the compiled variant at the first batch only
        variants = {
            k: v for k, v in DECODE_VARIANTS.items() if not v.get("compile") or batch == ts.decode_batches[0]
        }
        _decode_rows(
            ctx,
            "llm",
            f"{label} {dname} B{batch} after {prompt_len}",
            model,
            prompt_len,
            variants=variants,
            batch=batch,
            new_tokens=new,
            vocab=ts.llm["vocab_size"],
            metrics=lambda ms: {
                "x_floor": ms / floor_ms if floor_ms else None,
                "gbs": weight_bytes / (ms * 1e-3) / 1e9,
            },
        )
    if floor_ms is not None:
        ctx.add(
            "llm",
            f"{label} bandwidth floor: {weight_bytes / 1e9:.3g} GB non-embedding weights / copy",
            floor_ms,
        )
    del model


def _train_flops_per_token(model: torch.nn.Module, ts: TShapes) -> float:
    """6N + 12 L T d (torchtitan's convention: causal attention not halved), N = non-embedding parameters."""
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("tok_embeddings"))
    a = ts.llm
    head_dim = a["dim"] // a["n_heads"]
    return 6 * n + 12 * a["n_layers"] * ts.train_seq * a["n_heads"] * head_dim


def row_train_step(ctx: Ctx) -> None:
    """One optimizer step of the 1.1B Llama shape (bf16 autocast, fused AdamW): eager, regionally compiled
    (`vermeil.train.regional.compile_blocks`, what `train.compile` runs), and compiled with the chunked head +
    cross-entropy (`train.loss_chunk_size`): first-step time, tokens/s, MFU against the measured peak, peak
    memory."""
    from vermeil.train.losses import causal_lm_loss

    ts = _tshapes(ctx)
    label = "LLM 1.1B" if not ctx.tiny else "LLM tiny"
    try:
        from vermeil.train.regional import compile_blocks
    except ImportError:
        compile_blocks = None
    try:
        from vermeil.train.losses import chunked_lm_loss_fn
    except ImportError:
        chunked_lm_loss_fn = None
    model = _llm(ctx)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if ctx.cuda else None)
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, ts.llm["vocab_size"], (ts.train_batch, ts.train_seq + 1), generator=g).to(
        ctx.device
    )
    batch = (tokens[:, :-1], tokens[:, 1:])
    flops = _train_flops_per_token(model, ts)
    n_tokens = ts.train_batch * ts.train_seq
    variants: list[tuple[str, Any, bool]] = [("eager", causal_lm_loss, False)]
    if compile_blocks is not None:
        variants.append(("regional compile" + _compiled_label(ctx), causal_lm_loss, True))
        if chunked_lm_loss_fn is not None:
            chunked = chunked_lm_loss_fn(causal_lm_loss, model)
            if chunked is not None:
                variants.append(("regional compile + chunked CE" + _compiled_label(ctx), chunked, True))
    else:
        ctx.skip("train", f"{label} regional compile", "vermeil.train.regional is not in this checkout")
    eager_ms = None
    for variant, loss_fn, compiled in variants:
        name = f"{label} train step B{ts.train_batch} T{ts.train_seq} {variant}"
        if ctx.left() < (120 if compiled and ctx.cuda else 20):
            ctx.skip("train", name, f"time budget: {ctx.left():.0f} s left")
            continue
        if compiled and compile_blocks is not None:
            compile_blocks(model, **_compile_kw(ctx))

        def step(loss_fn: Any = loss_fn) -> None:
            with ctx.autocast():
                loss, _ = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            ctx.reset_peak()
            first_ms = ctx._time_once(step)  # compilation, cuBLAS/cuDNN set-up, optimizer state
            ms = _median(ctx.time_ms(step, min_reps=10, max_s=8.0))
            ctx.reset_peak()
            step()
            peak = ctx.peak_gb()
        except Exception as e:
            ctx.skip("train", name, f"error: {type(e).__name__}: {e}")
            traceback.print_exc()
            continue
        eager_ms = ms if variant == "eager" else eager_ms
        tflops = flops * n_tokens / (ms * 1e-3) / 1e12
        ctx.add(
            "train",
            name,
            ms,
            tok_s=n_tokens / (ms * 1e-3),
            mfu=tflops / ctx.matmul_tflops if ctx.matmul_tflops else None,
            first_step_s=first_ms / 1e3,
            peak_gb=peak,
            speedup=eager_ms / ms if variant != "eager" and eager_ms else None,
        )


def _dense_local_mask(kind: str, t: int, size: int, device: torch.device) -> Tensor:
    from vermeil.nn.masks import attention_mask

    pos = torch.arange(t, device=device)
    return attention_mask(pos, pos, **{kind: size})


def row_flex(ctx: Ctx) -> None:
    """Chunked (Llama 4) and sliding-window attention: FlexAttention with cached block masks against SDPA with
    the dense boolean mask (the reference), forward + backward on CUDA (the CPU has no flex backward: forward
    only there). Checked first in float32: outputs (and gradients on CUDA) equal."""
    from vermeil.nn.attention import attention, chunked_causal_attention
    from vermeil.nn.flex import flex_attention, flex_available

    if not flex_available():
        ctx.skip("flex", "flex attention", f"torch {torch.__version__} has no FlexAttention")
        return
    ts = _tshapes(ctx)
    b, h, t, dh, chunk, window = ts.flex
    backward = ctx.cuda
    # correctness, float32, a shorter sequence
    tc = ts.flex_check_t
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(b, h, tc, dh, generator=g).to(ctx.device) for _ in range(3)]
    for kind, size in (("chunk", chunk // 4 or 1), ("window", window // 4 or 1)):
        outs, grads = [], []
        for fn in (
            lambda q, k, v, kind=kind, size=size: flex_attention(q, k, v, causal=True, **{kind: size}),
            lambda q, k, v, kind=kind, size=size: attention(
                q, k, v, _dense_local_mask(kind, tc, size, ctx.device)
            ),
        ):
            leaves = [x.clone().requires_grad_(backward) for x in base]
            with torch.set_grad_enabled(backward):
                out = fn(*leaves)
                if backward:
                    out.backward(torch.ones_like(out))
            outs.append(out.detach())
            grads.append([x.grad for x in leaves] if backward else [])
        err = max(
            [((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()]
            + [((a - r).abs().max() / r.abs().max()).item() for a, r in zip(*grads)]
        )
        ctx.check(
            f"flex {kind} {size} == SDPA + dense mask (fp32, T{tc}, {'outputs and grads' if backward else 'outputs'})",
            err < 1e-4,
            f"max error / max {err:.1e}",
        )
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    dname = str(dtype).removeprefix("torch.")
    leaves = [
        torch.randn(b, h, t, dh, generator=g).to(ctx.device, dtype).requires_grad_(backward) for _ in range(3)
    ]
    what = "fwd+bwd" if backward else "fwd (no flex backward on the CPU)"

    def timed(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.set_grad_enabled(backward):
                out = fn()
                if backward:
                    out.backward(torch.ones_like(out))

        return run

    for kind, size in (("chunk", chunk), ("window", window)):
        dense = _dense_local_mask(kind, t, size, ctx.device)
        variants: dict[str, Callable[[], Tensor]] = {
            "SDPA + dense bool mask": lambda dense=dense: attention(*leaves, dense),
            "flex (cached block mask)": lambda kind=kind, size=size: flex_attention(
                *leaves, causal=True, **{kind: size}
            ),
        }
        if kind == "chunk":
            variants["SDPA causal per chunk (chunked_causal_attention)"] = lambda size=size: (
                chunked_causal_attention(*leaves, size)
            )
        ref_ms = None
        for variant, fn in variants.items():
            name = f"{kind} {size} B{b} H{h} T{t} Dh{dh} {dname} {what} {variant}"
            if ctx.left() < (60 if "flex" in variant and ctx.cuda else 10):
                ctx.skip("flex", name, f"time budget: {ctx.left():.0f} s left")
                continue
            try:
                ms = _median(ctx.time_ms(timed(fn), min_reps=20, max_s=3.0))
            except Exception as e:
                ctx.skip("flex", name, f"error: {type(e).__name__}: {e}")
                traceback.print_exc()
                continue
            is_ref = variant.startswith("SDPA + dense")
            ref_ms = ms if is_ref else ref_ms
            ctx.add("flex", name, ms, x_dense_sdpa=ref_ms / ms if ref_ms and not is_ref else None)
            for x in leaves:
                x.grad = None


def row_moe(ctx: Ctx) -> None:
    """An MoE block (Mixtral routing, no shared expert) forward + backward against a dense SwiGLU of the same
    active FLOPs (hidden K x F), bf16 autocast; checked first against the per-expert loop in float32 (and the
    grouped_mm path under bf16 autocast against it, loosely)."""
    from vermeil.nn.feedforward import SwiGLU
    from vermeil.nn.moe import MoE, grouped_mm_supported

    ts = _tshapes(ctx)
    tokens, dim, experts, hidden, k = ts.moe

    def build(backend: str) -> MoE:
        torch.manual_seed(0)
        return MoE(
            dim,
            hidden,
            experts,
            k,
            score_func="softmax",
            renormalize=True,
            shared_expert=False,
            prescale_input=False,
            backend=backend,
            device=ctx.device,
        )

    g = torch.Generator(device="cpu").manual_seed(0)
    x_small = torch.randn(min(tokens, 512), dim, generator=g).to(ctx.device)
    gout = torch.randn(min(tokens, 512), dim, generator=g).to(ctx.device)

    def out_and_grads(model: MoE, amp: bool) -> list[Tensor]:
        x = x_small.clone().requires_grad_(True)
        with ctx.autocast() if amp else nullcontext():
            out = model(x).out
        grads = torch.autograd.grad((out.float() * gout).sum(), [x, *model.parameters()])
        return [out.detach().float(), *grads]

    ref = out_and_grads(build("loop"), amp=False)
    fast = build("grouped")
    for amp, tol in ((False, 1e-4), (True, 3e-2)):
        if amp and ctx.amp_dtype is None:
            continue
        with ctx.autocast() if amp else nullcontext():
            path = "grouped_mm" if grouped_mm_supported(x_small, fast.experts.w1) else "padded bmm"
        got = out_and_grads(fast, amp=amp)
        err = max(((a - r).abs().max() / r.abs().max().clamp(min=1e-30)).item() for a, r in zip(got, ref))
        ctx.check(
            f"MoE backend='grouped' ({'bf16 autocast, ' if amp else 'fp32, '}{path}) == loop (out + grads)",
            err < tol,
            f"max error / max {err:.1e} (tolerance {tol:g})",
        )
    x = torch.randn(tokens, dim, generator=g).to(ctx.device)
    dense = SwiGLU(dim, k * hidden, device=ctx.device)
    padded = build("padded")
    padded.load_state_dict(fast.state_dict())
    variants: dict[str, Callable[[Tensor], Tensor]] = {
        f"dense SwiGLU {dim}x{k * hidden} (equal active FLOPs)": dense,
        "MoE grouped": lambda t: fast(t).out,
        "MoE padded (bmm; syncs once per call for its capacity)": lambda t: padded(t).out,
    }
    dense_ms = None
    for variant, fn in variants.items():
        name = f"T{tokens} D{dim} E{experts}x{hidden} top-{k} fwd+bwd {variant}"
        if ctx.left() < 10:
            ctx.skip("moe", name, f"time budget: {ctx.left():.0f} s left")
            continue
        try:
            ms = _median(ctx.time_ms(_fwd_bwd(ctx, fn, x), min_reps=20, max_s=3.0))
        except Exception as e:
            ctx.skip("moe", name, f"error: {type(e).__name__}: {e}")
            traceback.print_exc()
            continue
        dense_ms = ms if variant.startswith("dense") else dense_ms
        ctx.add(
            "moe", name, ms, x_dense=ms / dense_ms if dense_ms and not variant.startswith("dense") else None
        )


def _flux_inputs(ctx: Ctx, params: Any, dtype: torch.dtype) -> dict[str, Tensor]:
    ts = _tshapes(ctx)
    g = torch.Generator(device="cpu").manual_seed(0)
    grid = ts.flux_grid
    img_ids = torch.zeros(grid, grid, 3)
    img_ids[..., 1] = torch.arange(grid)[:, None]
    img_ids[..., 2] = torch.arange(grid)[None, :]

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(ctx.device, dtype)

    return dict(
        data=r(1, grid * grid, params.in_channels),
        cond=r(1, ts.flux_cond, params.context_in_dim),
        y=r(1, params.vec_in_dim),
        t=torch.rand(1, generator=g).to(ctx.device, dtype),
        img_ids=img_ids.view(-1, 3).to(ctx.device),
        txt_ids=torch.zeros(ts.flux_cond, 3, device=ctx.device),
    )


def _flux_fns(ours: Any, theirs: Any, x: dict[str, Tensor]) -> dict[str, Callable[[], Tensor]]:
    fns = {
        "Vermeil": lambda: ours(x["data"], x["img_ids"][None], x["cond"], x["txt_ids"][None], x["t"], x["y"])
    }
    if theirs is not None:
        fns["diffusers"] = lambda: theirs(
            hidden_states=x["data"],
            encoder_hidden_states=x["cond"],
            pooled_projections=x["y"],
            timestep=x["t"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            return_dict=False,
        )[0]
    return fns


def row_flux(ctx: Ctx) -> None:
    """Flux (hidden 3072, 24 heads, 4 double + 8 single blocks, 4096 data + 512 condition tokens, batch 1, bf16
    weights): Vermeil against diffusers' FluxTransformer2DModel on the same weights, forward and forward +
    backward, eager and both regionally compiled (Vermeil: `compile_blocks`; diffusers:
    `compile_repeated_blocks`). cuDNN's SDPA is tried first on Vermeil's backward (torch 2.11's cuDNN attention
    backward failed in diffusers at this shape), then disabled for the timed rows, as the issue's figures."""
    from vermeil.models.flux import Flux, FluxParams

    ts = _tshapes(ctx)
    params = FluxParams(**ts.flux)
    label = f"Flux D{params.hidden_size} {params.depth}+{params.depth_single_blocks} L{ts.flux_grid**2}+{ts.flux_cond}"
    theirs = None
    try:
        from diffusers import FluxTransformer2DModel

        from vermeil.interop.diffusers_flux import from_diffusers
    except ImportError:
        FluxTransformer2DModel = None
        ctx.skip("flux", f"{label} diffusers anchor", "diffusers is not installed")
    torch.manual_seed(0)
    with torch.device(ctx.device):
        if FluxTransformer2DModel is not None:
            theirs = FluxTransformer2DModel(
                patch_size=1,
                in_channels=params.in_channels,
                out_channels=params.out_channels,
                num_layers=params.depth,
                num_single_layers=params.depth_single_blocks,
                attention_head_dim=params.hidden_size // params.num_heads,
                num_attention_heads=params.num_heads,
                joint_attention_dim=params.context_in_dim,
                pooled_projection_dim=params.vec_in_dim,
                guidance_embeds=False,
                axes_dims_rope=tuple(params.axes_dim),
            )
            ours = from_diffusers(theirs)
        else:
            ours = Flux(params)
    x32 = _flux_inputs(ctx, params, torch.float32)
    if theirs is not None:
        with torch.no_grad():
            fns = _flux_fns(ours, theirs, x32)
            a, b = fns["Vermeil"](), fns["diffusers"]()
            err = ((a - b).abs().max() / b.abs().max()).item()
        ctx.check(
            f"{label}: Vermeil == diffusers (fp32 forward, same weights)",
            err < 1e-4,
            f"max error / max {err:.1e}",
        )
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    ours = ours.to(dtype)
    theirs = theirs.to(dtype) if theirs is not None else None
    x = _flux_inputs(ctx, params, dtype)
    fns = _flux_fns(ours, theirs, x)
    cudnn_was = torch.backends.cuda.cudnn_sdp_enabled() if ctx.cuda else None
    if ctx.cuda:
        try:  # does cuDNN attention's backward fail on Vermeil's Flux too?
            fns["Vermeil"]().float().square().mean().backward()
            torch.cuda.synchronize()
            ctx.check(f"{label}: Vermeil fwd+bwd runs with cuDNN SDPA enabled (bf16)", True)
        except Exception as e:
            ctx.check(
                f"{label}: Vermeil fwd+bwd runs with cuDNN SDPA enabled (bf16)",
                False,
                f"{type(e).__name__}: {e}",
            )
        ours.zero_grad(set_to_none=True)
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        _time_flux(ctx, label, ours, theirs, fns)
    finally:
        if cudnn_was is not None:
            torch.backends.cuda.enable_cudnn_sdp(cudnn_was)


def _time_flux(ctx: Ctx, label: str, ours: Any, theirs: Any, fns: dict[str, Callable[[], Tensor]]) -> None:
    try:
        from vermeil.train.regional import compile_blocks
    except ImportError:
        compile_blocks = None
    dname = "bf16" if ctx.cuda else "fp32"

    def fwd(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()

        return run

    def fwd_bwd(fn: Callable[[], Tensor], model: Any) -> Callable[[], None]:
        def run() -> None:
            fn().float().square().mean().backward()
            model.zero_grad(set_to_none=True)

        return run

    models = {"Vermeil": ours, "diffusers": theirs}
    eager: dict[tuple[str, str], float] = {}
    for compiled in (False, True):
        if compiled:
            if ctx.left() < 150 and ctx.cuda:
                ctx.skip("flux", f"{label} compiled rows", f"time budget: {ctx.left():.0f} s left")
                return
            if compile_blocks is not None:
                compile_blocks(ours, **_compile_kw(ctx))
            else:
                ctx.skip(
                    "flux", f"{label} Vermeil compiled", "vermeil.train.regional is not in this checkout"
                )
                fns = {k: v for k, v in fns.items() if k != "Vermeil"}
            if theirs is not None and not ctx.cuda:
                # Dynamo re-traces diffusers' blocks between the no-grad and the grad calls: ~30 s of a CPU
                # smoke run for nothing the GPU run does not show
                ctx.skip(
                    "flux",
                    f"{label} diffusers compiled",
                    "--tiny on the CPU: compiled anchor rows on CUDA only",
                )
                fns = {k: v for k, v in fns.items() if k != "diffusers"}
            elif theirs is not None:
                try:  # diffusers >= 0.35 names FluxTransformer2DModel's repeated blocks
                    theirs.compile_repeated_blocks(**_compile_kw(ctx))
                except Exception as e:
                    reason = f"compile_repeated_blocks: {type(e).__name__}: {e}"
                    ctx.skip("flux", f"{label} diffusers compiled", reason)
                    fns = {k: v for k, v in fns.items() if k != "diffusers"}
        for who, fn in fns.items():
            for what, call in (("fwd", fwd(fn)), ("fwd+bwd", fwd_bwd(fn, models[who]))):
                variant = ("regional compile" + _compiled_label(ctx)) if compiled else "eager"
                name = f"{label} {dname} {what} {who} {variant}"
                if ctx.left() < 10:
                    ctx.skip("flux", name, f"time budget: {ctx.left():.0f} s left")
                    continue
                try:
                    first = ctx._time_once(call)
                    ms = _median(ctx.time_ms(call, min_reps=10, max_s=4.0))
                except Exception as e:
                    ctx.skip("flux", name, f"error: {type(e).__name__}: {e}")
                    traceback.print_exc()
                    continue
                if not compiled:
                    eager[(who, what)] = ms
                base = eager.get(("diffusers", what))
                ctx.add(
                    "flux",
                    name,
                    ms,
                    x_diffusers_eager=base / ms if base and (who, compiled) != ("diffusers", False) else None,
                    first_call_s=first / 1e3 if compiled else None,
                )


def _recipe_overrides(ctx: Ctx) -> list[str]:
    ts = _tshapes(ctx)
    device = "cuda" if ctx.cuda else "cpu"
    over = [
        f"train.steps={ts.recipe_steps}",
        f"train.device={device}",
        "train.eval_every=0",
        "train.eval_batches=1",
    ]
    over += ["train.plot=false", "train.progress=false", "train.save_every=0", "train.log_every=1000"]
    # compilation is timed in the train group; here each config's placement and steps (and the budget: nine
    # compilations would take minutes)
    over.append("train.compile=false")
    if ctx.tiny:
        over.append("train.batch_size=2")
    return over


def row_recipes(ctx: Ctx) -> None:
    """Every configs/*.yaml trains through the public recipe API (`load_run_config`, `build_run`, `Trainer`)
    for 30 steps on CUDA (2 on the CPU with --tiny), each in its own try block: ok or the error, per config.
    Uncompiled (train.compile=false): the train group times compilation; here it is placement and steps."""
    from vermeil.recipes import build_run, load_run_config
    from vermeil.train import Trainer

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
    configs = sorted(f for f in os.listdir(root) if f.endswith(".yaml"))
    overrides = _recipe_overrides(ctx)
    for name in configs:
        label = f"{name} {_tshapes(ctx).recipe_steps} steps on {ctx.device.type}"
        if ctx.left() < 20:
            ctx.skip("recipes", label, f"time budget: {ctx.left():.0f} s left")
            continue
        t0 = time.perf_counter()
        try:
            run = load_run_config(os.path.join(root, name), overrides)
            max_bytes = getattr(run.data, "max_bytes", "absent")  # the text task's corpus size
            if ctx.tiny and max_bytes != "absent" and (max_bytes is None or max_bytes > 200_000):
                run.data.max_bytes = 200_000  # a smoke run: a slice of the corpus
            built = build_run(run)
            trainer = Trainer(built.model, built.train_batches, built.loss_fn, run.train)
            result = trainer.fit()
            loss = result.history[-1].get("loss") if result.history else None
            ok = result.step == run.train.steps and (loss is None or math.isfinite(float(loss)))
            ctx.check(f"recipe {label}", ok, f"step {result.step}, last loss {loss}")
            ctx.add("recipes", label, (time.perf_counter() - t0) * 1e3, step=result.step, status_ok=ok)
        except Exception as e:
            ctx.check(
                f"recipe {label}", False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            traceback.print_exc()
        finally:
            if ctx.cuda:
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Groups, in running order.

GROUPS: dict[str, list[Callable[[Ctx], None]]] = {
    "ceiling": [row_matmul_peak, row_copy_bandwidth],
    "check": [row_check_scans, row_check_stack_backends, row_check_decode],
    "stack": [row_stack],
    "scan": [row_scan],
    "sweep": [row_scan_sweep],
    "conv": [row_conv],
    "decode": [row_decode],
    "llm": [row_llm_decode],
    "train": [row_train_step],
    "flex": [row_flex],
    "moe": [row_moe],
    "flux": [row_flux],
    "recipes": [row_recipes],
    "anchors": [row_anchor_transformers],
}
# the groups whose figures are ratios to the measured ceilings (matmul peak, copy bandwidth)
NEEDS_CEILINGS = ("stack", "scan", "sweep", "llm", "train")


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
    if any(g in groups for g in NEEDS_CEILINGS) and "ceiling" not in groups:
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
