"""Tests for vermeil/interop/transformers_llama.py: logits and greedy tokens equal to transformers' own
(LlamaForCausalLM with GQA, llama3 rope scaling, tied/untied; Llama4ForCausalLM with MoE, NoPE, chunked
attention, qk norm and temperature tuning), round trips both ways, and refusals.

Shapes: B batch, T length.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vermeil.generation import generate

transformers = pytest.importorskip("transformers")

from vermeil.interop.transformers_llama import (  # noqa: E402
    from_transformers_llama,
    permute_half_to_interleaved,
    permute_interleaved_to_half,
    to_transformers_llama,
)

TOL = dict(atol=1e-4, rtol=1e-4)
NO_SPECIAL = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: with the 2 shared cores busy, OpenMP threads spin-wait (see tests/models/test_llm.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,  # small, so the scaling bands matter at head_dim 8
        },
        tie_word_embeddings=tied,
        **NO_SPECIAL,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norm gains away from 1 so a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def llama4(chunk: int = 4, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(
        **{
            **dict(
                vocab_size=97,
                hidden_size=48,
                intermediate_size=24,  # expert width
                intermediate_size_mlp=40,  # dense width
                num_hidden_layers=4,
                num_attention_heads=6,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=64,
                num_local_experts=4,
                num_experts_per_tok=2,
                interleave_moe_layer_step=2,  # MoE layers 1, 3; dense 0, 2
                no_rope_layer_interval=2,  # NoPE layers 1, 3 (global); RoPE layers 0, 2 (chunked)
                attention_chunk_size=chunk,
                use_qk_norm=True,
                attn_temperature_tuning=True,
                floor_scale=3,  # temperature factors != 1 from position 2 on
                attn_scale=0.5,
                rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                **NO_SPECIAL,
            ),
            **overrides,
        }
    )
    model = transformers.Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers' 0.02 init gives near-uniform logits; spread them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model


def ids(b: int = 2, t: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


def check_parity(hf: torch.nn.Module, new_tokens: int = 8) -> torch.nn.Module:
    model = from_transformers_llama(hf).eval()
    x = ids()
    with torch.no_grad():
        assert_close(model(x).logits, hf(x).logits, **TOL)
        expected = hf.generate(x, max_new_tokens=new_tokens, do_sample=False)[:, x.shape[1] :]
    assert torch.equal(generate(model, x, new_tokens), expected)
    return model


def test_permutations_are_inverse() -> None:
    w = torch.randn(6 * 8, 5)
    assert torch.equal(permute_half_to_interleaved(permute_interleaved_to_half(w, 6), 6), w)
    # head 0's rows: interleaved (0, 1, 2, ..., 7) <-> half-split (0, 2, 4, 6, 1, 3, 5, 7)
    rows = torch.arange(16.0)[:, None]
    assert permute_interleaved_to_half(rows, 2)[:8, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("tied", [False, True])
def test_llama_logits_and_greedy_tokens(tied: bool) -> None:
    hf = llama(tied)
    model = check_parity(hf)
    assert model.args.use_scaled_rope and model.args.n_kv_heads == 2 and model.args.hidden_dim == 37
    assert (model.output.weight is model.tok_embeddings.weight) == tied


def test_llama_without_permutation_differs() -> None:
    # The q/k row permutation is what makes the half-split checkpoint right in the interleaved model.
    hf = llama(False)
    model = from_transformers_llama(hf).eval()
    with torch.no_grad():
        for layer, hf_layer in zip(model.layers, hf.model.layers):
            layer.attention.wq.weight.copy_(hf_layer.self_attn.q_proj.weight)
            layer.attention.wk.weight.copy_(hf_layer.self_attn.k_proj.weight)
        x = ids()
        assert (model(x).logits - hf(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("tied", [False, True])
def test_llama_round_trip(tied: bool) -> None:
    hf = llama(tied)
    back = to_transformers_llama(from_transformers_llama(hf))
    assert type(back).__name__ == "LlamaForCausalLM"
    sd, sd_back = hf.state_dict(), back.state_dict()
    assert sorted(sd) == sorted(sd_back)
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k


def test_llama4_logits_and_greedy_tokens() -> None:
    hf = llama4(chunk=4)  # 11 prompt tokens + 8 new: prefill and decode both cross chunk boundaries
    model = check_parity(hf)
    kinds = [
        (layer.is_nope_layer, layer.is_moe_layer, layer.attention.chunk_size, layer.attention.use_qk_norm)
        for layer in model.layers
    ]
    assert kinds == [(False, False, 4, True), (True, True, None, False)] * 2


def test_llama4_decode_logits_match_transformers_full_forward() -> None:
    # transformers' chunked decode (sliding cache + chunked_overlay) and its full forward agree; so do ours,
    # position by position, beyond the chunk size. (Meta's reference does not: its decode ignores the chunk,
    # see tests/models/test_llm.py::test_decode_applies_chunk_rule_unlike_meta_reference.)
    hf = llama4(chunk=3)
    model = from_transformers_llama(hf).eval()
    x = ids(1, 12)
    with torch.no_grad():
        ref = hf(x).logits
        model.setup_cache(1, 12)
        pre = model(x[:, :2], input_pos=torch.arange(2)).logits
        steps = [model(x[:, i : i + 1], input_pos=torch.tensor([i])).logits for i in range(2, 12)]
    assert_close(torch.cat([pre, *steps], 1), ref, **TOL)


def test_llama4_llama3_scaling_and_dense_only() -> None:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,  # Scout's constants: the empty smoothing band
        "original_max_position_embeddings": 8,
    }
    hf = llama4(chunk=5, rope_parameters=rope, moe_layers=[], use_qk_norm=False, tie_word_embeddings=True)
    model = check_parity(hf, new_tokens=5)
    assert model.args.moe_args is None and model.rope.scaling.high_freq_factor == 1.0


def test_llama4_round_trip() -> None:
    hf = llama4()
    back = to_transformers_llama(from_transformers_llama(hf))
    assert type(back).__name__ == "Llama4ForCausalLM"
    assert back.config.no_rope_layers == hf.config.no_rope_layers
    assert back.config.layer_types == hf.config.layer_types and back.config.moe_layers == hf.config.moe_layers
    sd, sd_back = hf.state_dict(), back.state_dict()
    assert sorted(sd) == sorted(sd_back)
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k


def test_refusals() -> None:
    with pytest.raises(ValueError, match="expected LlamaForCausalLM or Llama4ForCausalLM, got Linear"):
        from_transformers_llama(torch.nn.Linear(2, 2))
    hf = llama4()
    hf.config.layer_types = ["full_attention"] * 4  # chunked RoPE layers declared global: not Llama 4's rule
    with pytest.raises(ValueError, match="is not Llama 4's rule"):
        from_transformers_llama(hf)
    bias = transformers.LlamaConfig(
        vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        attention_bias=True, **NO_SPECIAL,
    )  # fmt: skip
    with pytest.raises(ValueError, match="attention_bias"):
        from_transformers_llama(transformers.LlamaForCausalLM(bias))
    llama4_model = from_transformers_llama(llama4())
    with pytest.raises(ValueError, match="target='llama' cannot express"):
        to_transformers_llama(llama4_model, target="llama")


def test_native_model_to_transformers_and_back() -> None:
    # A model built in Vermeil (the debug preset: MoE every 2nd layer, NoPE every 4th, chunk 5, qk norm,
    # temperature tuning with floor 3) gives transformers the same logits, and converts back losslessly.
    from vermeil.models.llm import build

    torch.manual_seed(0)
    model = build("debug", vocab_size=97).eval()
    hf = to_transformers_llama(model).eval()
    assert type(hf).__name__ == "Llama4ForCausalLM"
    x = ids(t=13)
    with torch.no_grad():
        assert_close(hf(x).logits, model(x).logits, **TOL)
    again = from_transformers_llama(hf)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.parametrize("qk_norm", [True, False])
def test_llama4_features_without_chunking_export(qk_norm: bool) -> None:
    # qk norm or MoE without chunked attention needs Llama4ForCausalLM, which always builds chunked masks for
    # its RoPE layers: the export gives it chunks of max_seq_len (no chunking), and the logits still agree.
    from vermeil.models.llm import build

    torch.manual_seed(0)
    model = build("debug", vocab_size=97, attention_chunk_size=None, use_qk_norm=qk_norm).eval()
    hf = to_transformers_llama(model).eval()
    assert hf.config.attention_chunk_size == model.args.max_seq_len
    x = ids(t=13)
    with torch.no_grad():
        assert_close(hf(x).logits, model(x).logits, **TOL)
