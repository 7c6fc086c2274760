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

Matmul floor: the time of the stack's projections alone, measured in the same process on the same shapes:
per layer, `in_proj` (B*L, D) x (D, 2I + 2GN + H) and `out_proj` (B*L, I) x (I, D), forward and backward
(the input and weight gradients: three matmuls each), median of `--runs`. "x floor" is a case's time over
that floor: what the rest of the layer (conv, SSD, norms, elementwise) costs on top of the projections.

Decoding: a small LM around each stack (vocabulary 1024, embedding and untied head, the same weights):
prefill of a prompt of 64 and of 4096 tokens (B=2), then `--new-tokens` greedy steps timed (ms per step, the
median). Vermeil: the blocks' caches (`setup_cache`, `forward(x, input_pos)`: the one-token path is
`ssd_step`), eager; with `--compile` also the same loop with the stack under `torch.compile` (compiled once
for the one-token shape, before timing). transformers: `Mamba2ForCausalLM.generate(do_sample=False)` (its
cached one-token step path), the median time between consecutive new tokens (a streamer that timestamps each
token it receives).

Measured (2026-12-05, `--runs 2 --new-tokens 24 --compile`, 2 threads of a 2-core AMD EPYC VM shared with
other jobs, load average 0.2 at the start: one run, noisy; torch 2.13 CPU, transformers 5.23):

        L     hf s  vermeil s  floor s  hf/vermeil  vermeil x floor
     1024    2.075      0.768    0.456       2.70x            1.69x
     4096   11.766      3.182    1.734       3.70x            1.83x

    prompt    hf ms  vermeil ms  hf/vermeil  compiled ms  hf/compiled  tokens equal to hf's
        64     7.16        2.74       2.62x         1.40        5.12x  24/24
      4096     6.93        2.77       2.50x         1.42        4.89x  24/24
    (vermeil step after 4096 vs after 64 tokens: 1.01x; torch.compile's first call 2.3 s)

Usage: .venv/bin/python bench/mamba2.py [--quick] [--threads 2] [--runs 3] [--new-tokens 32] [--compile]
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

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.mixer.reset_cache()


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


def projection_floor(stack: Stack, length: int, runs: int) -> float:
    """Median seconds of the stack's in_proj and out_proj matmuls alone, forward and backward, at length L."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, length, D_MODEL, generator=gen)
    y = torch.randn(BATCH, length, D_INNER, generator=gen)
    mixers = [layer.mixer for layer in stack.layers]
    grad_in = torch.randn(BATCH, length, mixers[0].in_proj.out_features, generator=gen)
    grad_out = torch.randn(BATCH, length, D_MODEL, generator=gen)

    def run() -> None:
        for m in mixers:
            xg, yg = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
            torch.autograd.backward([m.in_proj(xg), m.out_proj(yg)], [grad_in, grad_out])

    return timed(run, runs)


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


def _vermeil_decode(step: Callable, stack: Stack, first: Tensor, start: int, new_tokens: int) -> tuple:
    """Greedy steps from `first` (B, 1) at position `start`; returns (median s/step, tokens (B, new_tokens))."""
    steps, tokens, token = [], [first], first
    for i in range(new_tokens - 1):
        t0 = time.perf_counter()
        token = step(token, torch.tensor([start + i]))
        steps.append(time.perf_counter() - t0)
        tokens.append(token)
    return statistics.median(steps[3:]), torch.cat(tokens, 1)


def bench_decoding(stack: Stack, hf_chunk: int, prompts: list[int], new_tokens: int, compile_: bool) -> dict:
    import transformers

    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(hf_config(hf_chunk)).eval()
    embed, head = nn.Embedding(VOCAB, D_MODEL), nn.Linear(D_MODEL, VOCAB, bias=False)
    with torch.no_grad():
        embed.weight.copy_(hf.backbone.embeddings.weight)
        head.weight.copy_(hf.lm_head.weight)
    hf.backbone.load_state_dict({"embeddings.weight": embed.weight, **stack.state_dict()}, strict=True)

    def step(token: Tensor, pos: Tensor) -> Tensor:
        return head(stack(embed(token), pos)).argmax(-1)

    stack.setup_cache(BATCH)  # the cache modules exist before compiling: one graph, cache buffers mutated
    compiled = torch.compile(step, dynamic=False) if compile_ else None
    rows = {}
    for p in prompts:
        prompt = torch.randint(0, VOCAB, (BATCH, p), generator=torch.Generator().manual_seed(p))
        with torch.no_grad():
            stack.reset_cache()
            first = head(stack(embed(prompt), torch.arange(p))[:, -1:]).argmax(-1)
            rows[("vermeil", p)], tokens = _vermeil_decode(step, stack, first, p, new_tokens)
            if compiled is not None:
                stack.reset_cache()
                head(stack(embed(prompt), torch.arange(p))[:, -1:])
                t0 = time.perf_counter()
                compiled(first, torch.tensor([p]))  # compiles (first call only), then a throw-away step
                rows[("compile_s", p)] = time.perf_counter() - t0
                stack.reset_cache()
                head(stack(embed(prompt), torch.arange(p))[:, -1:])
                rows[("compiled", p)], tokens_c = _vermeil_decode(compiled, stack, first, p, new_tokens)
                rows[("compiled_agree", p)] = bool(torch.equal(tokens_c, tokens))
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
        rows[("agree", p)] = int((out[:, p:] == tokens).all(0).sum())
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
    parser.add_argument(
        "--compile", action="store_true", help="also time the decode loop under torch.compile"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
    import transformers

    transformers.logging.set_verbosity_error()  # its "falling back to PyTorch" notices are expected here

    if args.quick:
        lengths, prompts, new_tokens = [256, 512], [64, 256], 12
    else:
        lengths, prompts, new_tokens = [1024, 4096], [64, 4096], args.new_tokens

    print(
        f"config: d_model {D_MODEL}, {N_LAYER} layers, headdim {HEADDIM} ({NHEADS} heads), d_state {D_STATE}, "
        f"expand {EXPAND}, ngroups {NGROUPS}, batch {BATCH}, float32, threads {args.threads}; chunk: vermeil "
        f"{args.chunk}, transformers {args.hf_chunk} (transformers {transformers.__version__}, torch "
        f"{torch.__version__}); medians of {args.runs} runs"
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
        results[("floor", length)] = projection_floor(stack, length, args.runs)
        for name, fn in impls.items():
            results[(name, length)] = timed(fwd_bwd(fn, x), args.runs)
        print(f"  ran L={length}", flush=True)

    print()
    print("forward+backward (s, median); x floor = time / the projections' matmuls alone")
    print(
        f"{'L':>5s} {'hf s':>8s} {'vermeil s':>10s} {'floor s':>8s} {'hf/vermeil':>11s} {'vermeil x floor':>16s}"
    )
    for length in lengths:
        h, v, f = (results[(k, length)] for k in ("hf", "vermeil", "floor"))
        print(f"{length:5d} {h:8.3f} {v:10.3f} {f:8.3f} {h / v:10.2f}x {v / f:15.2f}x")
    if hasattr(os, "getloadavg"):
        print(
            "load average after the stacks (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        )

    print()
    rows = bench_decoding(stack, args.hf_chunk, prompts, new_tokens, args.compile)
    print(f"decoding, B={BATCH}, vocab {VOCAB}, {new_tokens} greedy tokens after the prompt (median ms/step)")
    comp = f" {'compiled ms':>12s} {'hf/compiled':>12s}" if args.compile else ""
    print(f"{'prompt':>6s} {'hf ms':>8s} {'vermeil ms':>11s} {'hf/vermeil':>11s}{comp}  tokens equal to hf's")
    for p in prompts:
        v, h = rows[("vermeil", p)], rows[("hf", p)]
        line = f"{p:6d} {h * 1e3:8.2f} {v * 1e3:11.2f} {h / v:10.2f}x"
        if args.compile:
            c = rows[("compiled", p)]
            line += f" {c * 1e3:12.2f} {h / c:11.2f}x"
        print(f"{line}  {rows[('agree', p)]}/{new_tokens}")
    v0, v1 = rows[("vermeil", prompts[0])], rows[("vermeil", prompts[-1])]
    print(f"vermeil step time after {prompts[-1]} vs after {prompts[0]} tokens: {v1 / v0:.2f}x")
    if args.compile:
        same = all(rows[("compiled_agree", p)] for p in prompts)
        print(f"compiled: first call {rows[('compile_s', prompts[0])]:.1f} s; tokens equal to eager: {same}")


if __name__ == "__main__":
    main()
