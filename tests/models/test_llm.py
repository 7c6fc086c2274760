"""Tests for vermeil/models/llm.py: config checks, presets on meta, cache == full forward (ragged batches too),
the chunk rule (prefill and decode), Meta raw-key loading, save/load, training, bad inputs.

Shapes: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.testing import assert_close

from vermeil.generation import generate
from vermeil.models.llm import (
    LLM,
    PRESETS,
    Attention,
    ModelArgs,
    MoEArgs,
    TransformerInput,
    TransformerOutput,
    build,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def tiny(**overrides: object) -> LLM:
    """The debug preset (MoE every 2nd layer, NoPE every 4th, chunk 5, qk norm, temperature tuning on)."""
    torch.manual_seed(0)
    return build("debug", **overrides).eval()  # type: ignore[arg-type]


def tokens(b: int = 3, t: int = 13, vocab: int = 101, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


# ---------------------------------------------------------------------------------------------------------
# Config and presets


def test_debug_layer_rules() -> None:
    m = tiny()
    assert [layer.is_nope_layer for layer in m.layers] == [False, False, False, True]
    assert [layer.is_moe_layer for layer in m.layers] == [False, True, False, True]
    att = [layer.attention for layer in m.layers]
    assert [a.chunk_size for a in att] == [5, 5, 5, None]  # NoPE layers attend globally
    assert [a.use_qk_norm for a in att] == [True, True, True, False]  # qk norm on RoPE layers only
    assert [a.temperature_tuning for a in att] == [False, False, False, True]  # NoPE layers only


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_on_meta(name: str) -> None:
    m = build(name, device="meta")
    assert all(p.is_meta for p in m.parameters())
    if name == "llama3.2-1b":
        assert m.output.weight is m.tok_embeddings.weight
        assert m.layers[0].feed_forward.w1.weight.shape == (8192, 2048)
        assert m.layers[0].attention.wk.weight.shape == (8 * 64, 2048)
        assert abs(m.num_params() - 1.236e9) < 0.01e9  # Llama 3.2 1B: 1.24 B parameters
    if name == "llama4-scout-text":
        moe = m.layers[0].feed_forward
        assert moe.experts.w1.shape == (16, 5120, 8192)  # transformers' intermediate_size
        assert moe.shared_expert.w1.weight.shape == (8192, 5120)
        assert [i for i, layer in enumerate(m.layers) if layer.is_nope_layer][:3] == [3, 7, 11]
        assert m.rope.scaling.factor == 16.0 and m.rope.scaling.high_freq_factor == 1.0


def test_meta_model_materialises() -> None:
    m = build("debug", device="meta")
    m.to_empty(device="cpu")
    m.init_weights()
    out = m(tokens())
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dim=50, n_heads=6), "dim=50 must be divisible by n_heads=6"),
        (dict(n_heads=6, n_kv_heads=4), "n_heads=6 must be divisible by n_kv_heads=4"),
        (dict(dim=30, n_heads=2, head_dim=15), "head_dim=15 must be even"),
        (dict(vocab_size=0), "vocab_size=0 must be a positive int"),
        (dict(moe_args=MoEArgs(num_experts=4)), "needs ffn_exp"),
        (dict(nope_layers=[7], n_layers=4), "nope_layers=[7] must hold layer indices"),
        (dict(attention_chunk_size=0), "attention_chunk_size=0"),
        (dict(use_scaled_rope=True, rope_scaling_factor=-1.0), "factor=-1.0 must be > 0"),
        (dict(embedding_init_std=0.0), "embedding_init_std=0.0 must be > 0"),
    ],
)
def test_model_args_errors(kwargs: dict, message: str) -> None:
    base = dict(dim=48, n_layers=2, n_heads=6, vocab_size=11)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ModelArgs(**{**base, **kwargs})


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_init_std(tied: bool) -> None:
    base = dict(dim=64, n_layers=1, n_heads=4, vocab_size=4096, tie_word_embeddings=tied)
    default = LLM(ModelArgs(**base)).tok_embeddings.weight.std().item()
    assert default == pytest.approx(64**-0.5 if tied else 1.0, rel=0.05)  # init_weights' rule
    small = LLM(ModelArgs(**base, embedding_init_std=0.02)).tok_embeddings.weight.std().item()
    assert small == pytest.approx(0.02, rel=0.05)


def test_moe_args_errors() -> None:
    with pytest.raises(ValueError, match="top_k=3 must be <= num_experts=2"):
        MoEArgs(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="score_func='relu'"):
        MoEArgs(score_func="relu")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Forward forms


def test_transformer_input_and_output() -> None:
    m = tiny()
    x = tokens()
    ref = m(x)
    assert isinstance(ref, TransformerOutput) and ref.logits.shape == (3, 13, 101)
    assert ref.logits.dtype == torch.float32 and ref.aux_loss.shape == ()
    assert_close(m(TransformerInput(x, 0)).logits, ref.logits, **TOL)
    # explicit positions, an int start and per-row starts (Meta's tensor form) agree
    assert_close(m(x, input_pos=torch.arange(13)).logits, ref.logits, **TOL)
    shifted = m(x, input_pos=4).logits
    assert_close(m(TransformerInput(x, torch.tensor([4, 4, 4]))).logits, shifted, **TOL)
    assert not torch.allclose(shifted, ref.logits)  # positions matter (RoPE, chunks, temperature)


def test_block_chunked_path_equals_mask_path() -> None:
    # input_pos=None takes the block-diagonal is_causal path for T > chunk; explicit positions a mask.
    m = tiny()
    x = tokens(t=17)
    assert_close(m(x).logits, m(x, input_pos=torch.arange(17)).logits, **TOL)


def test_tied_embeddings() -> None:
    m = tiny(tie_word_embeddings=True)
    assert m.output.weight is m.tok_embeddings.weight
    assert "output.weight" in m.state_dict()


# ---------------------------------------------------------------------------------------------------------
# Cache


@pytest.mark.parametrize("chunk", [5, 32])  # 32 > cache length: the ring is the whole cache
def test_cache_decode_matches_full_forward(chunk: int) -> None:
    m = tiny(attention_chunk_size=chunk)
    x = tokens(t=13)
    full = m(x).logits
    m.setup_cache(3, 20)
    step = torch.cat([m(x[:, i : i + 1], input_pos=torch.tensor([i])).logits for i in range(13)], 1)
    assert_close(step, full, **TOL)
    for split in (1, 4, 6, 11):  # prefill of various lengths (crossing chunk boundaries), then decode
        m.reset_cache()
        pre = m(x[:, :split], input_pos=torch.arange(split)).logits
        rest = [m(x[:, i : i + 1], input_pos=torch.tensor([i])).logits for i in range(split, 13)]
        assert_close(torch.cat([pre, *rest], 1), full, **TOL)
    m.reset_cache()  # two multi-token chunks
    two = torch.cat(
        [m(x[:, :7], input_pos=torch.arange(7)).logits, m(x[:, 7:], input_pos=torch.arange(7, 13)).logits], 1
    )
    assert_close(two, full, **TOL)


def test_chunk_cache_is_bounded() -> None:
    m = tiny()
    m.setup_cache(2, 40)
    caches = [layer.attention.kv_cache for layer in m.layers]
    assert [c.k_cache.shape[2] for c in caches] == [5, 5, 5, 40]


def test_chunked_layers_share_the_ring_cache_of_vermeil_nn() -> None:
    # One attention implementation: the LLM's layers are vermeil.nn.Attention, chunked ones decode through the
    # same RingKVCache a sliding-window layer uses, global ones through the full KVCache.
    from vermeil.nn.attention import Attention as NNAttention
    from vermeil.nn.cache import KVCache, RingKVCache

    m = tiny()
    assert all(isinstance(layer.attention, NNAttention) for layer in m.layers)
    m.setup_cache(2, 40)
    caches = [layer.attention.kv_cache for layer in m.layers]
    assert [type(c) for c in caches] == [RingKVCache, RingKVCache, RingKVCache, KVCache]
    assert [c.max_seq_len for c in caches] == [40] * 4


def test_generate_ragged_batch_matches_single_rows() -> None:
    m = tiny()
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (3, 8, 6)]
    batch = generate(m, prompts, 9)
    for row, p in zip(batch, prompts):
        alone = generate(m, [p], 9)[0]
        assert torch.equal(row, alone)
        # and equal to greedy decoding by full forwards without any cache
        seq = list(p)
        for _ in range(9):
            seq.append(int(m(torch.tensor([seq])).logits[0, -1].argmax()))
        assert row.tolist() == seq[len(p) :]


# ---------------------------------------------------------------------------------------------------------
# Chunked attention


def test_chunk_boundary_is_never_crossed() -> None:
    # RoPE-only model (no NoPE layer, which would attend globally): perturbing a token in chunk 0 leaves every
    # output of the later chunks unchanged, in a full forward, a masked forward and a cached decode.
    m = tiny(nope_layer_interval=None, attention_chunk_size=4)
    assert not any(layer.is_nope_layer for layer in m.layers)
    x = tokens(2, 11)
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % 101
    for fwd in (lambda t: m(t).logits, lambda t: m(t, input_pos=torch.arange(11)).logits):
        a, b = fwd(x), fwd(y)
        # not bitwise: the MoE's grouped matmul blocks rows by expert counts, which the perturbation changes
        assert_close(a[:, 4:], b[:, 4:], atol=1e-6, rtol=0)
        assert (a[:, 2:4] - b[:, 2:4]).abs().max() > 1e-3  # the same chunk does see it
    m.setup_cache(2, 11)
    dec = []
    for t in (x, y):
        m.reset_cache()
        dec.append(torch.cat([m(t[:, i : i + 1], input_pos=torch.tensor([i])).logits for i in range(11)], 1))
    assert_close(dec[0][:, 4:], dec[1][:, 4:], atol=1e-6, rtol=0)


def test_nope_layer_sees_across_chunks() -> None:
    m = tiny(attention_chunk_size=4)  # layer 3 is NoPE: global attention
    x = tokens(2, 11)
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % 101
    assert (m(x).logits[:, 8:] - m(y).logits[:, 8:]).abs().max() > 1e-3


def test_decode_applies_chunk_rule_unlike_meta_reference() -> None:
    # Meta's reference builds masks only when seqlen > 1, so its one-token decode attends to the whole cache
    # (llama_models/llama4/model.py, Transformer.forward). With a prompt inside chunk 0 its decode equals the
    # same weights without chunking. Vermeil (and transformers) apply the chunk rule at every step: equal to
    # the chunked full forward, and different from Meta's result from position C on.
    chunk = 4
    m = tiny(nope_layer_interval=None, attention_chunk_size=chunk)
    meta_like = tiny(nope_layer_interval=None, attention_chunk_size=None)
    meta_like.load_state_dict(m.state_dict())
    x = tokens(1, 10)
    m.setup_cache(1, 10)
    pre = m(x[:, :3], input_pos=torch.arange(3)).logits
    ours = torch.cat(
        [pre] + [m(x[:, i : i + 1], input_pos=torch.tensor([i])).logits for i in range(3, 10)], 1
    )
    assert_close(ours, m(x).logits, **TOL)
    meta = meta_like(x).logits
    assert_close(ours[:, :chunk], meta[:, :chunk], **TOL)
    assert (ours[:, chunk:] - meta[:, chunk:]).abs().amax(-1).min() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs() -> None:
    m = tiny()
    with pytest.raises(ValueError, match=r"token id 101 is outside the vocabulary \[0, vocab_size=101\)"):
        m(torch.tensor([[1, 101]]))
    with pytest.raises(ValueError, match="token id -1"):
        m(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer ids"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        m(torch.zeros(3, dtype=torch.long))
    m.setup_cache(2, 8)
    with pytest.raises(ValueError, match="prompt of 9 tokens is longer than the cache"):
        m(tokens(2, 9), input_pos=torch.arange(9))
    assert_close(m(tokens(2, 3)).logits, tiny()(tokens(2, 3)).logits, **TOL)  # no input_pos: cache unused
    with pytest.raises(ValueError, match=r"input_pos spans \[7, 8\]"):
        m(tokens(2, 2), input_pos=torch.tensor([7, 8]))
    with pytest.raises(ValueError, match="batch of 3 rows exceeds"):
        m(tokens(3, 2), input_pos=torch.arange(2))
    with pytest.raises(ValueError, match="no vision encoder"):
        m.embed_images(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def meta_raw_state_dict(m: LLM) -> dict[str, torch.Tensor]:
    """Rewrite `m`'s weights in the layout of Meta's raw shards (the inverse of the load hooks)."""
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    out: dict[str, torch.Tensor] = {"rope.freqs": torch.zeros(4)}
    for k in ("tok_embeddings.weight", "norm.weight", "output.weight"):
        out[k] = sd.pop(k)
    for i, layer in enumerate(m.layers):
        p = f"layers.{i}."
        out[p + "attention.wqkv.weight"] = torch.cat([sd.pop(p + f"attention.w{n}.weight") for n in "qkv"])
        out[p + "attention.wo.weight"] = sd.pop(p + "attention.wo.weight")
        out[p + "attention.wqkv.layer_norm_weight"] = sd.pop(p + "attention_norm.weight")
        out[p + "attention.wqkv._extra_state"] = torch.zeros(0)
        if layer.is_moe_layer:
            e, d = layer.feed_forward.num_experts, layer.feed_forward.dim
            f = p + "feed_forward."
            out[f + "norm.weight"] = sd.pop(p + "ffn_norm.weight")
            out[f + "router_DE"] = sd.pop(f + "router.router_DE")
            out[f + "experts.moe_w_in_eD_F"] = sd.pop(f + "experts.w1").reshape(e * d, -1)
            out[f + "experts.moe_w_swiglu_eD_F"] = sd.pop(f + "experts.w3").reshape(e * d, -1)
            out[f + "experts.moe_w_out_eF_D"] = sd.pop(f + "experts.w2").reshape(-1, d)
            out[f + "w_in_shared_FD.weight"] = sd.pop(f + "shared_expert.w1.weight")
            out[f + "w_swiglu_FD.weight"] = sd.pop(f + "shared_expert.w3.weight")
            out[f + "w_out_shared_DF.weight"] = sd.pop(f + "shared_expert.w2.weight")
            out[f + "running_gate_stats_3E"] = torch.zeros(3, e)
            out[f + "experts.mlp._extra_state"] = torch.zeros(0)
        else:
            out[p + "feed_forward.mlp.layer_norm_weight"] = sd.pop(p + "ffn_norm.weight")
            out[p + "feed_forward.mlp.fc1_weight"] = torch.cat(
                [sd.pop(p + "feed_forward.w1.weight"), sd.pop(p + "feed_forward.w3.weight")]
            )
            out[p + "feed_forward.mlp.fc2_weight"] = sd.pop(p + "feed_forward.w2.weight")
    assert not sd, f"untranslated keys: {sorted(sd)}"
    return out


def test_meta_raw_keys_load_through_hooks() -> None:
    src = tiny()
    raw = meta_raw_state_dict(src)
    assert "layers.0.attention.wqkv.weight" in raw and "layers.1.feed_forward.experts.moe_w_in_eD_F" in raw
    torch.manual_seed(123)
    dst = build("debug").eval()
    x = tokens()
    assert not torch.allclose(dst(x).logits, src(x).logits)
    dst.load_state_dict(raw, strict=True)
    assert_close(dst(x).logits, src(x).logits, atol=0, rtol=0)


def test_missing_and_unexpected_keys_are_named() -> None:
    m = tiny()
    sd = m.state_dict()
    del sd["layers.2.attention.wk.weight"]
    sd["layers.0.attention.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as err:
        m.load_state_dict(sd)
    assert "layers.2.attention.wk.weight" in str(err.value) and "layers.0.attention.bogus" in str(err.value)
    bad = m.state_dict()
    bad["layers.0.attention.wqkv.weight"] = torch.zeros(7, 48)
    del bad["layers.0.attention.wq.weight"]
    with pytest.raises(ValueError, match="wqkv.weight has 7 rows"):
        m.load_state_dict(bad)


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied: bool) -> None:
    checkpoint = pytest.importorskip("vermeil.checkpoint")
    pytest.importorskip("safetensors")
    src = tiny(tie_word_embeddings=tied)
    path = tmp_path / "llm.safetensors"
    checkpoint.save_weights(src, path)
    torch.manual_seed(7)
    dst = build("debug", tie_word_embeddings=tied).eval()
    checkpoint.load_weights(dst, path)
    x = tokens()
    assert_close(dst(x).logits, src(x).logits, atol=0, rtol=0)
    if tied:
        assert dst.output.weight is dst.tok_embeddings.weight


# ---------------------------------------------------------------------------------------------------------
# Training


def test_training_lowers_loss_and_reaches_router() -> None:
    torch.manual_seed(0)
    args = dataclasses.replace(ModelArgs(**PRESETS["debug"]), n_layers=2)
    args.moe_args = dataclasses.replace(args.moe_args, aux_loss_coef=0.01, z_loss_coef=0.001)
    m = LLM(args).train()
    x = tokens(4, 16)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = m(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert out.aux_loss.item() > 0
    router = m.layers[1].feed_forward.router.router_DE
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_attention_gradcheck_float64() -> None:
    # NoPE layer with temperature tuning (floor 2: scales != 1) and a chunked RoPE layer with qk norm.
    torch.manual_seed(0)
    for kwargs in (
        dict(use_rope=False, temperature_tuning=True, floor_scale=2.0, attn_scale=0.3),
        dict(use_rope=True, use_qk_norm=True, chunk_size=3),
    ):
        att = Attention(12, 3, 1, 4, backend="math", dtype=torch.float64, **kwargs)  # type: ignore[arg-type]
        t = 7
        cos, sin = torch.randn(t, 2, dtype=torch.float64).cos(), torch.randn(t, 2, dtype=torch.float64).sin()
        x = torch.randn(2, t, 12, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, att=att, cs=(cos, sin): att(x, cs, None), (x,))


def test_deepcopy_and_meta_args_untouched() -> None:
    # PRESETS hold plain data: building twice gives independent configs
    a, b = build("debug", device="meta"), build("debug", device="meta")
    a.args.moe_args.top_k = 1
    assert b.args.moe_args.top_k == 2 and PRESETS["debug"]["moe_args"]["top_k"] == 2
    copy.deepcopy(tiny())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_backend_equals_sdpa_on_chunked_and_global_layers() -> None:
    """attention_backend="flex" (FlexAttention's block masks: Llama 4 chunks on RoPE layers, causal on NoPE
    layers) gives the SDPA + dense-mask logits; a sequence longer than the chunk and not a multiple of it."""
    torch.manual_seed(0)
    kw = dict(
        dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, attention_chunk_size=8, max_seq_len=64
    )
    ref = LLM(ModelArgs(**kw)).eval()
    flex = LLM(ModelArgs(**kw, attention_backend="flex")).eval()
    flex.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert_close(flex(tokens).logits, ref(tokens).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_backend='fast' must be"):
        ModelArgs(**kw, attention_backend="fast")


def test_an_int_start_past_the_rope_table_needs_no_position_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # Meta's int start (`tokens_position`) past the initial RoPE table: eager on the CPU the lookup grows the
    # table; on an accelerator or under compile it reads no positions back, and indexed past the table
    # (IndexError here, an out-of-bounds read on CUDA). The int end is known without a read.
    model, x = tiny(max_seq_len=16), tokens(b=2, t=6)
    with torch.no_grad():
        ref = model(x, input_pos=40).logits  # eager CPU: grown by the lookup
        fresh = tiny(max_seq_len=16)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA graph capture, faked
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert_close(fresh(x, input_pos=40).logits, ref, rtol=0, atol=0)
        assert_close(fresh(TransformerInput(x, tokens_position=50)).logits, model(x, input_pos=50).logits)


def test_prefill_without_reset_equals_a_fresh_cache() -> None:
    torch.manual_seed(0)
    for chunk in (None, 5):  # a full cache on every layer, or rings on the chunked ones
        model = build("debug", attention_chunk_size=chunk).double().eval()
        first, second = torch.randint(0, 101, (1, 4)), torch.randint(0, 101, (1, 3))
        with torch.no_grad():
            model.setup_cache(1, 16)
            model(first, input_pos=torch.arange(4))
            again = model(second, input_pos=torch.arange(3)).logits
            assert_close(again, model(second).logits, rtol=1e-12, atol=1e-12)
