"""Benchmark: Vermeil's LLM against transformers' LlamaForCausalLM and x-transformers' decoder, in one process.

Config (issue 3, Speed): dim 512, 8 layers, 8 heads, 4 kv heads, SwiGLU hidden 1536, vocab 32000, float32,
2 threads. Every model gets the same token batch and the same loss (`F.cross_entropy` on the logits).

    train      one step: forward, backward, fused AdamW (`torch.optim.AdamW(fused=True)` for all), batch 4 x 512;
               tokens/s and model FLOPs utilisation (6 N + 12 L T D per token, N = non-embedding matmul weights
               incl. the output head) against the fp32 matmul peak measured here (best of a 2048^3 matmul)
    train bf16 Vermeil under bf16 autocast, against the transformers fp32 step (MFU against the bf16 peak)
    prefill    forward of a 128-token prompt, batch 4, no grad
    decode     greedy, batch 1, 128 new tokens after a 128-token prompt: ms per new token from
               (t(128 new) - t(1 new)) / 127, i.e. without the prefill; transformers' `generate(do_sample=False)`
               against `vermeil.generation.generate`. Floor: bytes of the non-embedding weights / copy bandwidth
               (STREAM copy of 256 MiB: (read + write bytes) / time), what one token must stream at least.
               A GEMV only reads, so a fast one can pass this floor ("% of floor" above 100).
               "vermeil compiled": `generate(compile=True)` (the decode step under torch.compile with
               `vermeil.generation.decode_backend`; compilation happens in the untimed warm-up run)
    decode bf16 the same with bfloat16 weights (both libraries)

Timing: medians over `reps` runs after a warm-up, implementations interleaved run by run so that a change of
load hits them all alike (the machine is shared: read the ratios, not the absolute numbers).

    moe        (--moe) an MoE LLM (8 experts x 1536, top-2, every layer) against the dense LLM of equal active
               FLOPs (SwiGLU 3072): training-step time ratio (median of 9 interleaved steps each, 3 with --quick)

    --keep-freed-memory  glibc keeps freed blocks for reuse (`vermeil.train.keep_freed_memory`), for every
               implementation alike: big tensors are no longer page-faulted in again at every step

Usage: python bench/llm.py [--quick] [--threads N] [--no-bf16] [--moe] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vermeil.generation import generate
from vermeil.models.llm import LLM, ModelArgs, MoEArgs

DIM, LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB = 512, 8, 8, 4, 1536, 32000


def vermeil_model(dtype: torch.dtype = torch.float32, **overrides: object) -> LLM:
    args = ModelArgs(
        **{
            **dict(
                dim=DIM,
                n_layers=LAYERS,
                n_heads=HEADS,
                n_kv_heads=KV_HEADS,
                vocab_size=VOCAB,
                hidden_dim=HIDDEN,
                rope_theta=10000.0,
                max_seq_len=1024,
            ),
            **overrides,
        }
    )
    return LLM(args, dtype=dtype)


def moe_pair() -> tuple[LLM, LLM]:
    """An MoE LLM (8 experts of width 1536, top-2, no shared expert, every layer) and the dense LLM with the
    same active FLOPs per token (SwiGLU width 2 x 1536 = 3072)."""
    moe = MoEArgs(num_experts=8, top_k=2, shared_expert=False, hidden_dim=HIDDEN)
    return vermeil_model(moe_args=moe), vermeil_model(hidden_dim=2 * HIDDEN)


def hf_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def xt_model() -> torch.nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(
        num_tokens=VOCAB,
        max_seq_len=1024,
        attn_layers=Decoder(
            dim=DIM,
            depth=LAYERS,
            heads=HEADS,
            attn_kv_heads=KV_HEADS,
            attn_dim_head=DIM // HEADS,
            attn_flash=True,
            ff_mult=HIDDEN / DIM,
            ff_glu=True,
            ff_swish=True,
            ff_no_bias=True,
            use_rmsnorm=True,
            rotary_pos_emb=True,
        ),
    )


def logits_of(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits  # type: ignore[attr-defined]


def median_times(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak(n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best


def copy_bandwidth(mib: int = 256, reps: int = 5) -> float:
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(reps))
    return 2 * src.numel() * 4 / best  # read + write bytes


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def train_step_fn(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False
) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = logits_of(model(x))
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def non_embedding_matmul_params(model: LLM) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "tok_embeddings" not in n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (2 timed train steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 rows")
    parser.add_argument("--moe", action="store_true", help="add the MoE vs dense training-step rows")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="vermeil.train.keep_freed_memory() first (process-wide: every implementation gets it; "
        "what `vermeil train` does)",
    )
    opts = parser.parse_args()
    if opts.keep_freed_memory:
        from vermeil.train import keep_freed_memory

        print(f"glibc malloc keeps freed memory (process-wide): {keep_freed_memory()}")
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    reps_train = 2 if opts.quick else 5
    reps_fast = 3 if opts.quick else 7
    bf16 = not opts.no_bf16
    rows: list[tuple[str, str, str]] = []

    def add(row: tuple[str, str, str]) -> None:
        rows.append(row)
        print(f"  {row[0]}: {row[1].strip()}  {row[2]}", flush=True)  # progress; the table comes at the end

    peak = matmul_peak()
    bandwidth = copy_bandwidth()
    print(
        f"threads={opts.threads}  fp32 matmul peak {peak / 1e9:.1f} GFLOP/s  copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )

    # ---- training step ----
    batch, seq = 4, 512
    x = torch.randint(0, VOCAB, (batch, seq))
    y = torch.randint(0, VOCAB, (batch, seq))
    ours = vermeil_model()
    n_matmul = non_embedding_matmul_params(ours)
    flops_per_token = 6 * n_matmul + 12 * LAYERS * seq * DIM
    models = {"vermeil": ours, "transformers": hf_model()}
    with contextlib.suppress(ImportError):  # x-transformers is an optional anchor
        models["x-transformers"] = xt_model()
    steps = {k: train_step_fn(m, x, y) for k, m in models.items()}
    if bf16:
        ours_bf16 = vermeil_model()
        steps["vermeil bf16"] = train_step_fn(ours_bf16, x, y, bf16=True)
    t = median_times(steps, reps_train)
    tokens = batch * seq
    peak_bf16 = matmul_peak(dtype=torch.bfloat16) if bf16 else peak
    if bf16:
        print(f"bf16 matmul peak {peak_bf16 / 1e9:.1f} GFLOP/s (the bf16 rows' MFU is against it)")
    for k, secs in t.items():
        tps = tokens / secs
        mfu = tps * flops_per_token / (peak_bf16 if "bf16" in k else peak)  # bf16 rows: against the bf16 peak
        ratio = t["transformers"] / secs
        note = " (vs transformers fp32)" if "bf16" in k else ""
        add((f"train step {k}", f"{tps:8.0f} tok/s  MFU {mfu:5.1%}", f"{ratio:5.2f}x transformers{note}"))
    if "x-transformers" in t:
        add(("train step vermeil / x-transformers", "", f"{t['x-transformers'] / t['vermeil']:5.2f}x"))
    del steps, models, ours

    # ---- MoE training step against the dense model with equal active FLOPs ----
    if opts.moe:
        moe, dense = moe_pair()
        # a ratio of two ~5 s steps that drift apart by +-8% from one run to the next here: more repetitions
        reps_moe = 3 if opts.quick else 9
        t = median_times({"moe": train_step_fn(moe, x, y), "dense": train_step_fn(dense, x, y)}, reps_moe)
        add(
            (
                "train step MoE 8x1536 top-2",
                f"{tokens / t['moe']:8.0f} tok/s",
                f"{t['moe'] / t['dense']:5.2f}x the dense step's time",
            )
        )
        add(("train step dense 3072 (same active)", f"{tokens / t['dense']:8.0f} tok/s", ""))
        del moe, dense

    # ---- prefill ----
    ours, theirs = vermeil_model().eval(), hf_model().eval()
    prompt = torch.randint(0, VOCAB, (4, 128))
    with torch.no_grad():
        t = median_times({"vermeil": lambda: ours(prompt), "transformers": lambda: theirs(prompt)}, reps_fast)
    for k, secs in t.items():
        add((f"prefill 4x128 {k}", f"{secs * 1e3:8.1f} ms", f"{t['transformers'] / secs:5.2f}x transformers"))

    # ---- greedy decode ----
    def decode_rows(dtype: torch.dtype, label: str, hf_fp32_ms: float | None = None) -> float:
        ours_d, theirs_d = vermeil_model(dtype).eval(), hf_model(dtype).eval()
        one = torch.randint(0, VOCAB, (1, 128))

        def v(n: int, compile: bool = False) -> Callable[[], object]:
            return lambda: generate(ours_d, one, n, compile=compile)

        def h(n: int) -> Callable[[], object]:
            return lambda: theirs_d.generate(one, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        reps = 2 if opts.quick else 5
        t = median_times(
            {
                "vermeil 128": v(128),
                "vermeil 1": v(1),
                "compiled 128": v(128, compile=True),
                "compiled 1": v(1, compile=True),
                "hf 128": h(128),
                "hf 1": h(1),
            },
            reps,
        )
        ms_ours = (t["vermeil 128"] - t["vermeil 1"]) / 127 * 1e3
        ms_compiled = (t["compiled 128"] - t["compiled 1"]) / 127 * 1e3
        ms_hf = (t["hf 128"] - t["hf 1"]) / 127 * 1e3
        weight_bytes = sum(
            p.numel() * p.element_size() for n, p in ours_d.named_parameters() if "tok_embeddings" not in n
        )
        floor = weight_bytes / bandwidth * 1e3
        vs_fp32 = "" if hf_fp32_ms is None else f", {hf_fp32_ms / ms_ours:5.2f}x transformers fp32"
        add(
            (
                f"decode {label} vermeil",
                f"{ms_ours:8.2f} ms/token",
                f"{ms_hf / ms_ours:5.2f}x transformers{vs_fp32}",
            )
        )
        vs_fp32_c = "" if hf_fp32_ms is None else f", {hf_fp32_ms / ms_compiled:5.2f}x transformers fp32"
        add(
            (
                f"decode {label} vermeil compiled",
                f"{ms_compiled:8.2f} ms/token",
                f"{ms_hf / ms_compiled:5.2f}x transformers{vs_fp32_c}, {floor / ms_compiled:5.1%} of floor",
            )
        )
        add((f"decode {label} transformers", f"{ms_hf:8.2f} ms/token", ""))
        add(
            (
                f"decode {label} weight-streaming floor",
                f"{floor:8.2f} ms/token",
                f"vermeil at {floor / ms_ours:5.1%}",
            )
        )
        return ms_hf

    hf_fp32_ms = decode_rows(torch.float32, "fp32")
    if bf16:
        decode_rows(torch.bfloat16, "bf16", hf_fp32_ms)

    width = max(len(r[0]) for r in rows)
    print()
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:<28} {ratio}")


if __name__ == "__main__":
    main()
