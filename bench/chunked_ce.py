"""Memory of the loss: the full-logits cross-entropy vs `chunked_cross_entropy` (head fused, chunked), on the CPU.

Each variant runs forward + backward of `cross_entropy(hidden @ W.T, targets)` (float32, N tokens, width D,
vocabulary V) in a fresh Python process, and reports the peak resident memory above what the process held
once its inputs were built (`resource.getrusage(...).ru_maxrss`; large tensors are their own mmap'd blocks, so
RSS follows the live tensors), the time of one forward + backward (noisy on a shared machine: read it as an
order of magnitude), and the largest difference of the loss and gradients from the reference.

    .venv/bin/python bench/chunked_ce.py [--tokens 2048] [--dim 128] [--vocab 32000] [--json out.json]

The reference holds the (N, V) logits, their float32 softmax and their gradient; the chunked loss holds one
chunk of logits, grad_hidden (N, D) and grad_weight (V, D).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from vermeil.train.losses import chunked_cross_entropy
torch.set_num_threads(1)
n, d, v, variant, chunk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, d, generator=g).requires_grad_()
weight = (torch.randn(v, d, generator=g) * d**-0.5).requires_grad_()
targets = torch.randint(0, v, (n,), generator=g)
def ref():
    return F.cross_entropy(F.linear(hidden, weight), targets)
def chunked():
    return chunked_cross_entropy(hidden, weight, targets, chunk_size=None if chunk == "auto" else int(chunk))
fn = ref if variant == "reference" else chunked
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
start = time.perf_counter()
loss = fn()
loss.backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"peak_extra_mb": (peak - before) / 1024, "seconds": seconds}
if variant != "reference":
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    r = ref()
    r.backward()
    out["max_abs_diff"] = max(
        (loss - r).abs().item(), (gh - hidden.grad).abs().max().item(), (gw - weight.grad).abs().max().item()
    )
print(json.dumps(out))
"""


def run(tokens: int, dim: int, vocab: int, variant: str, chunk: str) -> dict:
    args = [sys.executable, "-c", CHILD, str(tokens), str(dim), str(vocab), variant, chunk]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = parser.parse_args()
    logits_mb = a.tokens * a.vocab * 4 / 2**20
    print(f"N={a.tokens} D={a.dim} V={a.vocab}: one float32 (N, V) tensor is {logits_mb:.0f} MB")
    rows = []
    for variant, chunk in (("reference", "-"), ("chunked", "auto"), ("chunked", "256")):
        row = {"variant": variant, "chunk_size": chunk, **run(a.tokens, a.dim, a.vocab, variant, chunk)}
        rows.append(row)
        diff = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else "-"
        print(
            f"{variant:10s} chunk {chunk:>5s}  peak +{row['peak_extra_mb']:8.1f} MB  "
            f"{row['seconds'] * 1e3:8.1f} ms  max |diff| {diff}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
