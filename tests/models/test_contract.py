"""One contract every language model passes: the LLM, MambaLM and both routings of HybridModel.

- decoding one token at a time with the static cache equals the full forward, at every position;
- a save/load round trip (safetensors) gives identical logits;
- construction on the meta device, then `to_empty` + `init_weights`, gives a working model;
- `vermeil.generation.generate` with greedy decoding equals argmax decoding by full forwards.
"""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from vermeil.generation import generate
from vermeil.models import llm, mamba
from vermeil.models.hybrid import HybridConfig, HybridModel

VOCAB = 61


def _hybrid(routing: str, merge: str = "sum") -> Callable[..., nn.Module]:
    def build(device=None) -> nn.Module:
        cfg = HybridConfig(
            dim=32,
            vocab_size=VOCAB,
            pattern="MAM",
            routing=routing,
            merge=merge,
            heads=4,
            kv_heads=2,
            d_state=5,
            max_seq_len=64,
        )
        return HybridModel(cfg, device=device)

    return build


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "llm": lambda device=None: llm.build("debug", vocab_size=VOCAB, device=device),
    "mamba": lambda device=None: mamba.build("debug", vocab_size=VOCAB, device=device),
    "hybrid-sequential": _hybrid("sequential"),
    "hybrid-parallel-gate": _hybrid("parallel", "gate"),
}


def logits(model: nn.Module, tokens: Tensor, **kwargs) -> Tensor:
    out = model(tokens, **kwargs)
    return out if isinstance(out, Tensor) else out.logits


@pytest.fixture(params=sorted(BUILDERS))
def name(request) -> str:
    return request.param


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


def test_decode_with_cache_matches_full_forward(name):
    model = build(name)
    tokens = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        full = logits(model, tokens)
        model.setup_cache(2, 16)
        prefill = logits(model, tokens[:, :4], input_pos=torch.arange(4))
        steps = [logits(model, tokens[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(4, 11)]
    assert_close(torch.cat([prefill, *steps], 1), full, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip(name, tmp_path):
    pytest.importorskip("safetensors")
    from vermeil.checkpoint import load_weights, save_weights

    model = build(name)
    save_weights(model, tmp_path / "model.safetensors")
    torch.manual_seed(123)
    fresh = BUILDERS[name]().eval()
    tokens = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert not torch.allclose(logits(fresh, tokens), logits(model, tokens))
        load_weights(fresh, tmp_path / "model.safetensors")
        assert torch.equal(logits(fresh, tokens), logits(model, tokens))


def test_meta_construction_then_init(name):
    model = BUILDERS[name](device="meta")
    assert all(p.is_meta for p in model.parameters())
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # to_empty leaves whatever was in memory: make anything left uninitialised loud
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan"))
    model.init_weights()
    out = logits(model.eval(), torch.randint(0, VOCAB, (1, 5)))
    assert out.shape == (1, 5, out.shape[-1]) and torch.isfinite(out).all()


def test_greedy_generate_equals_argmax_of_full_forwards(name):
    model = build(name)
    prompt = torch.randint(0, VOCAB, (2, 5))
    new = generate(model, prompt, 6)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, logits(model, seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(new, seq[:, 5:])
