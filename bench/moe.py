"""MoE block speed: Vermeil's sorted grouped_mm dispatch vs its per-expert loop, the dense "every expert on
every token" formulation (Meta's reference, transformers' Llama4TextMoe), transformers' MixtralSparseMoeBlock,
and a dense SwiGLU with the same active FLOPs.

All variants run in one process on the same inputs and the same weights, reps interleaved; medians in ms and
ratios to Vermeil's grouped path. Run alone (no other torch process on the machine):

    .venv/bin/python bench/moe.py                      # T=2048, D=512, F=1024, E=8, top-1 and top-2
    .venv/bin/python bench/moe.py --hidden 1536 --top-k 2  # the issue's MoE speed target
"""

# Shapes: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vermeil.nn.feedforward import SwiGLU
from vermeil.nn.moe import MoE, grouped_mm_supported


def _copy_from(moe: MoE, backend: str) -> MoE:
    twin = MoE(
        moe.dim,
        moe.hidden_dim,
        moe.num_experts,
        moe.top_k,
        score_func=moe.router.score_func,
        prescale_input=moe.prescale_input,
        shared_expert=moe.shared_expert is not None,
        renormalize=moe.router.renormalize,
        backend=backend,
    )
    twin.load_state_dict(moe.state_dict())
    return twin


def _hf_llama4(moe: MoE) -> nn.Module | str:
    try:
        from transformers import Llama4TextConfig
        from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
    except ImportError as err:
        return f"skipped: transformers Llama4TextMoe not importable ({err})"
    config = Llama4TextConfig(
        hidden_size=moe.dim,
        intermediate_size=moe.hidden_dim,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        hidden_act="silu",
    )
    ref = Llama4TextMoe(config)
    with torch.no_grad():
        ref.router.weight.copy_(moe.router.router_DE.T)
        ref.experts.gate_up_proj.copy_(torch.cat([moe.experts.w1, moe.experts.w3], dim=-1))
        ref.experts.down_proj.copy_(moe.experts.w2)
        ref.shared_expert.gate_proj.weight.copy_(moe.shared_expert.w1.weight)
        ref.shared_expert.up_proj.weight.copy_(moe.shared_expert.w3.weight)
        ref.shared_expert.down_proj.weight.copy_(moe.shared_expert.w2.weight)
    return ref


def _hf_mixtral(moe: MoE, implementation: str) -> nn.Module | str:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as err:
        return f"skipped: transformers MixtralSparseMoeBlock not importable ({err})"
    config = MixtralConfig(
        hidden_size=moe.dim,
        intermediate_size=moe.hidden_dim,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_jitter_noise=0.0,
        experts_implementation=implementation,
    )
    ref = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        ref.gate.weight.copy_(moe.router.router_DE.T)
        ref.experts.gate_up_proj.copy_(torch.cat([moe.experts.w1, moe.experts.w3], dim=-1).transpose(1, 2))
        ref.experts.down_proj.copy_(moe.experts.w2.transpose(1, 2))
    return ref


def _output(module: nn.Module, x: Tensor) -> Tensor:
    out = module(x)
    if isinstance(out, tuple):  # Llama4TextMoe: (out, router_logits)
        out = out[0]
    out = getattr(out, "out", out)  # MoE: MoEOutput
    return out.reshape(x.shape)  # Llama4TextMoe flattens the leading axes


def _runner(module: nn.Module, x: Tensor, backward: bool) -> Callable[[], None]:
    if not backward:

        def fwd() -> None:
            with torch.no_grad():
                _output(module, x)

        return fwd
    g = torch.randn(x.shape)

    def fwd_bwd() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        _output(module, x).backward(g)

    return fwd_bwd


def _bench(runners: dict[str, Callable[[], None]], reps: int, clock: Callable[[], float]) -> dict[str, float]:
    for run in runners.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):  # interleaved, so drifts in machine load hit every variant alike
        for name, run in runners.items():
            t0 = clock()
            run()
            times[name].append(clock() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def _section(
    title: str, variants: dict[str, nn.Module | str], x: Tensor, reps: int, clock: Callable[[], float]
) -> None:
    modules = {name: v for name, v in variants.items() if not isinstance(v, str)}
    with torch.no_grad():
        ref = _output(modules["vermeil grouped"], x)
    print(f"\n## {title}")
    print("| variant | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | max abs diff vs grouped |")
    print("|---|---:|---:|---:|---:|---:|")
    fwd = _bench({n: _runner(m, x, False) for n, m in modules.items()}, reps, clock)
    bwd = _bench({n: _runner(m, x, True) for n, m in modules.items()}, reps, clock)
    base_f, base_b = fwd["vermeil grouped"], bwd["vermeil grouped"]
    for name, v in variants.items():
        if isinstance(v, str):
            print(f"| {name} | {v} | | | | |")
            continue
        diff = "n/a (different block)" if name.startswith("dense SwiGLU") else ""
        if not diff:
            with torch.no_grad():
                diff = f"{(_output(v, x) - ref).abs().max().item():.1e}"
        print(
            f"| {name} | {fwd[name]:.1f} | {fwd[name] / base_f:.2f}x | {bwd[name]:.1f} | "
            f"{bwd[name] / base_b:.2f}x | {diff} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048, help="T, tokens per call (batch*seq)")
    parser.add_argument("--dim", type=int, default=512, help="D")
    parser.add_argument("--hidden", type=int, default=1024, help="F, expert hidden size")
    parser.add_argument("--experts", type=int, default=8, help="E")
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2], help="K values to run")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-dense", action="store_true", help="skip the every-expert variants (slow)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: this process's CPU time, steadier on a shared machine (use --threads 1)",
    )
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    T, D, F, E = args.tokens, args.dim, args.hidden, args.experts
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, {args.clock} clock")
    print(f"T={T} D={D} F={F} E={E}, reps={args.reps} (median), ratio = time / vermeil grouped time")
    torch.manual_seed(0)
    # (B, T, D): MixtralSparseMoeBlock wants three axes. x requires grad as inside a network, so every variant
    # also computes the gradient of its input.
    x = torch.randn(1, T, D, requires_grad=True)

    for k in args.top_k:
        torch.manual_seed(k)
        llama = MoE(D, F, E, k)  # sigmoid, pre-scaled input, shared expert
        assert grouped_mm_supported(x, llama.experts.w1, llama.experts.w2)
        variants: dict[str, nn.Module | str] = {
            "vermeil grouped": llama,
            "vermeil loop (reference)": _copy_from(llama, "loop"),
        }
        if not args.no_dense:
            variants["vermeil dense (every expert)"] = _copy_from(llama, "dense")
            variants["transformers Llama4TextMoe (every expert)"] = _hf_llama4(llama)
        variants[f"dense SwiGLU, hidden {(k + 1) * F} (same active FLOPs)"] = SwiGLU(D, (k + 1) * F)
        _section(
            f"Llama 4 style (sigmoid, pre-scaled input, shared expert), top-{k}",
            variants,
            x,
            args.reps,
            clock,
        )

        torch.manual_seed(100 + k)
        mixtral = MoE(
            D, F, E, k, score_func="softmax", renormalize=True, shared_expert=False, prescale_input=False
        )
        variants = {
            "vermeil grouped": mixtral,
            "vermeil loop (reference)": _copy_from(mixtral, "loop"),
            "transformers Mixtral, grouped_mm": _hf_mixtral(mixtral, "grouped_mm"),
            "transformers Mixtral, eager loop": _hf_mixtral(mixtral, "eager"),
            f"dense SwiGLU, hidden {k * F} (same active FLOPs)": SwiGLU(D, k * F),
        }
        _section(
            f"Mixtral style (softmax, top-k renormalised, weighted output), top-{k}",
            variants,
            x,
            args.reps,
            clock,
        )


if __name__ == "__main__":
    main()
