"""Tests for vermeil/interop/transformers_mamba.py: a random small transformers MambaForCausalLM converts into a
MambaLM with the same logits (1e-4) and the same greedy generation token for token; the way back is exact.

Shapes: B batch, T length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.testing import assert_close

from vermeil.generation import generate
from vermeil.interop import from_transformers, to_transformers
from vermeil.interop.transformers_mamba import hf_to_vermeil_key, vermeil_to_hf_key
from vermeil.models.mamba import MambaLM, build

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one intra-op thread; on a shared, loaded machine extra OpenMP threads spin at
    every barrier (20x slower here). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_mamba(tie: bool = True, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A random MambaForCausalLM of odd sizes (D 37, E 74, N 5, R 7, V 101), weights spread so that logits and
    greedy choices vary from token to token (the default init gives near-constant outputs)."""
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(
        vocab_size=101,
        hidden_size=37,
        state_size=5,
        num_hidden_layers=3,
        conv_kernel=4,
        expand=2,
        time_step_rank=7,
        tie_word_embeddings=tie,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
        **overrides,
    )
    model = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", "D")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def tokens(b: int = 2, t: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 101, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers(tie: bool) -> None:
    hf = hf_mamba(tie=tie, use_bias=not tie)
    model = from_transformers(hf)
    assert isinstance(model, MambaLM)
    assert (model.lm_head.weight is model.backbone.embedding.weight) == tie
    x = tokens()
    with torch.no_grad():
        expected = hf(x).logits
        got = model(x)
    assert expected.std() > 0.5  # the weights make a difference
    assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers_token_for_token() -> None:
    hf = hf_mamba()
    model = from_transformers(hf)
    x = tokens(t=5)
    ref = hf.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 5:]
    out = generate(model, x, max_new_tokens=8)
    assert len(set(ref.flatten().tolist())) > 2  # not one repeated token
    assert torch.equal(out, ref)


def test_cached_decoding_matches_transformers_cache() -> None:
    """transformers' own prefill + one-token steps against Vermeil's cache, logits at every step."""
    hf = hf_mamba(seed=2)
    model = from_transformers(hf)
    x = tokens(t=8)
    with torch.no_grad():
        out = hf(x[:, :5], use_cache=True)
        ref = [out.logits]
        for t in range(5, 8):
            out = hf(x[:, t : t + 1], cache_params=out.cache_params, use_cache=True)
            ref.append(out.logits)
        model.setup_cache(2, 8)
        got = [model(x[:, :5], input_pos=torch.arange(5))]
        got += [model(x[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(5, 8)]
    assert_close(torch.cat(got, 1), torch.cat(ref, 1), atol=1e-4, rtol=1e-4)


def test_round_trip_to_transformers_is_exact() -> None:
    torch.manual_seed(0)
    model = build("debug", pad_vocab_size_multiple=1).eval()
    hf = to_transformers(model)
    assert type(hf).__name__ == "MambaForCausalLM"
    x = tokens()
    with torch.no_grad():
        assert_close(hf(x).logits, model(x), atol=1e-5, rtol=1e-5)
    back = from_transformers(hf)
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_padded_vocab_goes_to_transformers_as_real_rows() -> None:
    model = build("debug").eval()  # V 101 padded to 104
    hf = to_transformers(model)
    assert hf.config.vocab_size == 104
    with torch.no_grad():
        assert_close(hf(tokens()).logits[..., :101], model(tokens()), atol=1e-5, rtol=1e-5)


def test_key_map_and_refusals() -> None:
    assert hf_to_vermeil_key("backbone.embeddings.weight") == "backbone.embedding.weight"
    assert vermeil_to_hf_key("backbone.embedding.weight") == "backbone.embeddings.weight"
    assert hf_to_vermeil_key("backbone.layers.0.mixer.A_log") == "backbone.layers.0.mixer.A_log"
    with pytest.raises(ValueError, match="rms_norm=False"):
        to_transformers(build("debug", rms_norm=False))
    hf = hf_mamba(hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        from_transformers(hf)
