"""A short tour of Vermeil's blocks: build each one, run it forward and backward, print what it did.

Run with `python -m vermeil.tour` (or `make run`). Everything is random and small; it takes seconds on a CPU.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn


def _show(name: str, module: nn.Module | None, run: Callable[[], Tensor], note: str = "") -> None:
    """Run `run()` (a forward), backpropagate its mean square, and print a one-line summary."""
    start = time.perf_counter()
    out = run()
    out.float().pow(2).mean().backward()
    ms = (time.perf_counter() - start) * 1e3
    params = list(module.parameters()) if module is not None else []
    grads = sum(p.grad is not None for p in params)
    size = f"{sum(p.numel() for p in params):>9,}" if module is not None else " " * 9
    print(
        f"  {name:<28} params {size}  out {str(tuple(out.shape)):<16} grads {grads}/{len(params)}  {ms:7.1f} ms  {note}"
    )


def main() -> None:
    from vermeil.diffusion.losses import flow_matching_loss
    from vermeil.diffusion.samplers import sample_euler
    from vermeil.diffusion.schedules import get_schedule
    from vermeil.nn import (
        Attention,
        CrossAttention,
        EmbedND,
        LayerNorm,
        MambaBlock,
        Modulation,
        MoE,
        ParallelTransformerBlock,
        QKNorm,
        RMSNorm,
        RotaryEmbedding,
        SwiGLU,
        TransformerBlock,
        apply_lora,
        mark_only_lora_as_trainable,
        selective_scan,
    )

    torch.manual_seed(0)
    B, T, D, H = 2, 64, 128, 4
    x = torch.randn(B, T, D, requires_grad=True)
    context = torch.randn(B, 17, 96)
    print(f"Vermeil tour: batch {B}, length {T}, width {D}, {H} heads, torch {torch.__version__}\n")

    print("norms and positions")
    norm = RMSNorm(D)
    _show("RMSNorm", norm, lambda: norm(x))
    ln = LayerNorm(D, bias=False)
    _show("LayerNorm(bias=False)", ln, lambda: ln(x))
    qk = QKNorm(32, "rms")
    q = torch.randn(B, H, T, 32, requires_grad=True)
    _show("QKNorm('rms')", qk, lambda: torch.cat(qk(q, q), 1))
    rope = RotaryEmbedding(32, pairing="half", use_xpos=True)
    _show("RotaryEmbedding(xPos)", None, lambda: rope(q, q)[0], "half-split pairing, xPos scaling")
    embed = EmbedND(32, 10_000, [8, 12, 12])
    ids = torch.randint(0, 16, (B, T, 3))
    _show("EmbedND(3 axes)", None, lambda: embed(ids)[0].requires_grad_(), "Flux's axial RoPE tables")

    print("\nattention")
    attn = Attention(D, H, kv_heads=2, causal=True, rotary=RotaryEmbedding(D // H))
    _show("Attention(GQA, causal)", attn, lambda: attn(x), "2 kv heads for 4 query heads")
    cross = CrossAttention(D, 96, H)
    _show("CrossAttention", cross, lambda: cross(x, context), "keys and values from a 96-wide context")
    attn.eval()
    with torch.no_grad():
        full = attn(x)
        attn.setup_cache(B, T)
        steps = torch.cat([attn(x[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(T)], 1)
        attn.reset_cache()
        attn.delete_cache()
    diff = (steps - full).abs().max().item()
    print(f"  {'KV-cache decoding':<28} {T} single-token steps equal the full forward: max diff {diff:.1e}")

    print("\nfeed-forward, blocks, LoRA, MoE")
    ff = SwiGLU(D, 344)
    _show("SwiGLU", ff, lambda: ff(x))
    block = TransformerBlock(D, H, kv_heads=2, rotary=RotaryEmbedding(D // H))
    _show("TransformerBlock (Llama)", block, lambda: block(x))
    parallel = ParallelTransformerBlock(D, dim_head=32, heads=H)
    _show("ParallelTransformerBlock", parallel, lambda: parallel(x), "the Zeta/PaLM block API")
    lora_block = TransformerBlock(D, H, rotary=RotaryEmbedding(D // H))
    apply_lora(lora_block, ["wq", "wv"], rank=8, alpha=16)
    trainable = f"{len(mark_only_lora_as_trainable(lora_block))} adapter tensors trainable"
    _show("TransformerBlock + LoRA", lora_block, lambda: lora_block(x), trainable)
    moe = MoE(D, 256, num_experts=4, top_k=2)
    _show("MoE(4 experts, top-2)", moe, lambda: moe(x).out, "tokens sorted by expert, grouped matmuls")

    print("\nstate-space")
    mamba = MambaBlock(D)
    _show("MambaBlock", mamba, lambda: mamba(x), "chunked selective scan")
    u = torch.randn(B, 64, T, requires_grad=True)
    delta = torch.rand(B, 64, T)
    A = -torch.rand(64, 16)
    Bm, Cm = torch.randn(B, 16, T), torch.randn(B, 16, T)
    _show("selective_scan", None, lambda: selective_scan(u, delta, A, Bm, Cm), "no loop over time steps")

    print("\nconditioning and flow matching")
    mod = Modulation(D, double=False)
    vec = torch.randn(B, D)
    _show("Modulation (adaLN)", mod, lambda: mod(vec)[0].shift, "shift, scale, gate from a vector")
    velocity = nn.Linear(D, D)
    data = torch.randn(B, T, D)

    def field(z: Tensor, t: Tensor, **_: object) -> Tensor:  # a velocity model that ignores t
        return velocity(z)

    loss = functools.partial(flow_matching_loss, field, data, kind="logit_normal", seq_len=T)
    _show("flow_matching_loss", velocity, loss, "rectified flow, logit-normal t, Flux's shift")
    sample = sample_euler(field, torch.randn(B, T, D), get_schedule(8, T))
    print(f"  {'sample_euler (8 steps)':<28} out {tuple(sample.shape)} along Flux's shifted schedule")
    print("\nDone: every block ran forward and backward.")


if __name__ == "__main__":
    main()
