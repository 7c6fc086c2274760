"""Benchmark: Vermeil's Mamba-2 stack (Mamba2Block + chunked SSD) against transformers' Mamba2 CPU path.

Config (issue 16's "Speed" section): d_model 512, 4 layers, headdim 64, d_state 64, expand 2 (d_inner 1024,
16 heads), 1 group, conv 4, batch 2, float32, `--threads` threads (2). Everything runs in ONE process on the
same inputs and the same weights (Vermeil's are copied into transformers' `Mamba2Model`, whose keys
`layers.N.norm` / `layers.N.mixer.*` / `norm_f` are the stack's own); a parity check at L=100 runs first.

    vermeil   a stack of residual blocks as transformers' `Mamba2Block`: x + Mamba2Block(RMSNorm(x)),
              then a final RMSNorm; the SSD is `vermeil.nn.ssd.ssd_scan` (chunk `--chunk`, default 64)
    hf        transformers `Mamba2Model` (inputs_embeds, train mode), its pure-PyTorch path (no mamba_ssm
              kernels on a CPU): `mamba2_chunk_scan` with its config's chunk size (`--hf-chunk`, default 256,
              transformers' default)

Forward+backward: input (B, L, D) -> stack -> mean of squares -> backward into the parameters and the input.
Each case: one untimed warm-up run, then the median of `--runs` (3) timed runs.

Matmul floor: the FLOPs of the block's projections (in_proj D x (2I + 2GN + H), out_proj I x D; x3 for
forward+backward) over the stack, divided by the peak matmul rate measured in this process (best of seven
2048^3 float32 matmuls, at the start and at the end; the better one is used). "x floor" is a case's time over
that floor: what the rest of the layer (conv, SSD, norms, elementwise) costs on top of the projections.

Decoding: a small LM around each stack (vocabulary 1024, embedding and untied head, the same weights):
prefill of a prompt of 64 and of 2048 tokens (B=2), then `--new-tokens` greedy steps timed (ms per step, the
median). Vermeil: the blocks' caches (`setup_cache`, `forward(x, input_pos)`: the one-token path is
`ssd_step`), eager. transformers: `Mamba2ForCausalLM.generate(do_sample=False)`, the median time between
consecutive new tokens (a streamer that timestamps each token it receives).

Usage: .venv/bin/python bench/mamba2.py [--quick] [--threads 2] [--runs 3] [--new-tokens 32]
Run it alone: other processes on the machine change every number (the load average is printed).
"""

# Shapes: B batch, L length, D d_model, I d_inner, H heads, P head dim, G groups, N d_state, V vocabulary.

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vermeil.nn import Mamba2Block, RMSNorm

D_MODEL, N_LAYER, HEADDIM, D_STATE, EXPAND, NGROUPS, D_CONV, BATCH, VOCAB = 512, 4, 64, 64, 2, 1, 4, 2, 1024
D_INNER = EXPAND * D_MODEL
NHEADS = D_INNER // HEADDIM
EPS = 1e-5


class Stack(nn.Module):
    """transformers' Mamba2 backbone without the embedding: x + mixer(norm(x)) per layer, then norm_f.

    Keys `layers.N.norm.weight`, `layers.N.mixer.*`, `norm_f.weight`, as `Mamba2Model`'s.
    """

    def __init__(self, chunk: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(N_LAYER):
            layer = nn.Module()
            layer.norm = RMSNorm(D_MODEL, eps=EPS)
            layer.mixer = Mamba2Block(
                D_MODEL,
                D_STATE,
                D_CONV,
                EXPAND,
                HEADDIM,
                NGROUPS,
                chunk_size=chunk,
                norm_eps=EPS,
                layer_idx=i,
            )
            self.layers.append(layer)
        self.norm_f = RMSNorm(D_MODEL, eps=EPS)

    def forward(self, x: Tensor, input_pos: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = x + layer.mixer(layer.norm(x), input_pos)
        return self.norm_f(x)

    def setup_cache(self, batch_size: int) -> None:
        for layer in self.layers:
            layer.mixer.setup_cache(batch_size)


def hf_config(chunk: int, vocab: int = VOCAB):
    import transformers

    return transformers.Mamba2Config(
        vocab_size=vocab,
        hidden_size=D_MODEL,
        num_hidden_layers=N_LAYER,
        num_heads=NHEADS,
        head_dim=HEADDIM,
        state_size=D_STATE,
        expand=EXPAND,
        n_groups=NGROUPS,
        conv_kernel=D_CONV,
        chunk_size=chunk,
        layer_norm_epsilon=EPS,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )


# ----------------------------------------------------------------------------------------------------------
# Timing helpers


def peak_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * 2048**3 / min(ts) / 1e9  # the best run: a peak


def projection_flops(length: int) -> float:
    """2 x multiply-adds of in_proj and out_proj over the stack, forward + backward (backward = 2x forward)."""
    per_token = 2 * (D_MODEL * (2 * D_INNER + 2 * NGROUPS * D_STATE + NHEADS) + D_INNER * D_MODEL)
    return 3 * per_token * BATCH * length * N_LAYER


def timed(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up (allocator, first-call costs)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def fwd_bwd(fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    def run() -> None:
        xg = x.detach().requires_grad_(True)
        fn(xg).pow(2).mean().backward()

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


def bench_decoding(stack: Stack, hf_chunk: int, prompts: list[int], new_tokens: int) -> dict:
    import transformers

    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(hf_config(hf_chunk)).eval()
    embed, head = nn.Embedding(VOCAB, D_MODEL), nn.Linear(D_MODEL, VOCAB, bias=False)
    with torch.no_grad():
        embed.weight.copy_(hf.backbone.embeddings.weight)
        head.weight.copy_(hf.lm_head.weight)
    hf.backbone.load_state_dict({"embeddings.weight": embed.weight, **stack.state_dict()}, strict=True)
    rows = {}
    for p in prompts:
        prompt = torch.randint(0, VOCAB, (BATCH, p), generator=torch.Generator().manual_seed(p))
        with torch.no_grad():
            stack.setup_cache(BATCH)
            token = head(stack(embed(prompt), torch.arange(p))[:, -1:]).argmax(-1)
            steps, first = [], token
            for i in range(new_tokens):
                t0 = time.perf_counter()
                token = head(stack(embed(token), torch.tensor([p + i]))).argmax(-1)
                steps.append(time.perf_counter() - t0)
        rows[("vermeil", p)] = statistics.median(steps[3:])
        clock = _StepClock()
        kw = {"do_sample": False, "pad_token_id": 0}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf.generate(prompt[:, :8], max_new_tokens=2, **kw)  # warm-up
            out = hf.generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock, **kw
            )
        stamps = clock.stamps  # [0]: the prompt (before prefill), [1]: first new token (after prefill)
        rows[("hf", p)] = statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:]))
        rows[("agree", p)] = bool(torch.equal(out[:, p], first[:, 0]))
    return rows


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short lengths, few tokens (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=64, help="Vermeil's SSD chunk size")
    parser.add_argument("--hf-chunk", type=int, default=256, help="transformers' chunk_size (its default)")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
    import transformers

    transformers.logging.set_verbosity_error()  # its "falling back to PyTorch" notices are expected here

    if args.quick:
        lengths, prompts, new_tokens = [256, 512], [64, 256], 8
    else:
        lengths, prompts, new_tokens = [1024, 4096], [64, 2048], args.new_tokens

    peak = peak_gflops()
    print(f"threads={args.threads}  matmul peak (best 2048^3 fp32 mm) = {peak:.1f} GFLOP/s")
    print(
        f"config: d_model {D_MODEL}, {N_LAYER} layers, headdim {HEADDIM} ({NHEADS} heads), d_state {D_STATE}, "
        f"expand {EXPAND}, ngroups {NGROUPS}, batch {BATCH}, float32; chunk: vermeil {args.chunk}, "
        f"transformers {args.hf_chunk} (transformers {transformers.__version__}, torch {torch.__version__})"
    )
    if hasattr(os, "getloadavg"):  # other processes change every number: say how busy the machine was
        print("load average at start (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))

    torch.manual_seed(0)
    stack = Stack(args.chunk)
    hf = transformers.Mamba2Model(hf_config(args.hf_chunk)).train()
    hf.load_state_dict({"embeddings.weight": hf.embeddings.weight, **stack.state_dict()}, strict=True)
    impls = {"vermeil": stack, "hf": lambda x: hf(inputs_embeds=x, use_cache=False).last_hidden_state}

    x = torch.randn(BATCH, 100, D_MODEL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = impls["hf"](x)
        err = ((stack(x) - ref).abs().max() / ref.abs().max()).item()
    print(f"parity at L=100: max |vermeil - transformers| / max |transformers| = {err:.1e}")
    if err > 1e-4:
        raise SystemExit("vermeil disagrees with transformers: the comparison would be meaningless")

    results = {}
    gen = torch.Generator().manual_seed(2)
    for length in lengths:
        x = torch.randn(BATCH, length, D_MODEL, generator=gen)
        for name, fn in impls.items():
            results[(name, length)] = timed(fwd_bwd(fn, x), args.runs)
            print(f"  ran {name:8s} L={length:5d} fwd+bwd {results[(name, length)]:8.3f} s", flush=True)
    peak = max(peak, peak_gflops())  # measured again: a busy moment at the start would inflate "x floor"

    print()
    print(f"matmul peak, best of start and end: {peak:.1f} GFLOP/s")
    print(f"{'impl':8s} {'L':>5s} {'fwd+bwd s':>10s} {'x floor':>8s} {'hf / vermeil':>13s}")
    for (name, length), t in results.items():
        floor = projection_flops(length) / (peak * 1e9)
        ratio = results[("hf", length)] / results[("vermeil", length)]
        speed = f"{ratio:12.2f}x" if name == "vermeil" else f"{'':>13s}"
        print(f"{name:8s} {length:5d} {t:10.3f} {t / floor:7.2f}x {speed}")
    if hasattr(os, "getloadavg"):
        print(
            "load average after the stacks (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        )

    print()
    rows = bench_decoding(stack, args.hf_chunk, prompts, new_tokens)
    print(f"decoding, B={BATCH}, vocab {VOCAB}, {new_tokens} greedy steps after the prompt (median ms/step)")
    print(f"{'prompt':>6s} {'vermeil ms':>11s} {'hf ms':>8s} {'hf / vermeil':>13s}  first token agrees")
    for p in prompts:
        v, h = rows[("vermeil", p)], rows[("hf", p)]
        print(f"{p:6d} {v * 1e3:11.2f} {h * 1e3:8.2f} {h / v:12.2f}x  {rows[('agree', p)]}")
    v0, v1 = rows[("vermeil", prompts[0])], rows[("vermeil", prompts[-1])]
    print(f"vermeil step time after {prompts[-1]} vs after {prompts[0]} tokens: {v1 / v0:.2f}x")


if __name__ == "__main__":
    main()
