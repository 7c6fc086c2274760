"""Tests for vermeil/nn/blocks.py: Llama parity for TransformerBlock, PaLM parity for ParallelTransformerBlock,
caches, cross-attention, LoRA hooks, gradcheck, compile, errors, meta construction."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

from vermeil.compat.zeta import convert_palm_state_dict
from vermeil.nn.blocks import ParallelTransformerBlock, TransformerBlock
from vermeil.nn.lora import LoRA, apply_lora
from vermeil.nn.positional import RopeScaling, RotaryEmbedding

# Shapes: B batch, T length, S context length, D model dim, Dc context dim, H heads, Hkv kv heads,
# Dh head dim, F feed-forward hidden dim.
B, T = 2, 7


# ------------------------------------------------------------------------------------------------------------
# An independent transcription of lucidrains/PaLM-rlhf-pytorch `palm_rlhf_pytorch/palm.py` (RotaryEmbedding,
# apply_rotary_pos_emb, SwiGLU, LayerNorm, ParallelTransformerBlock with its non-flash attention), with PaLM's
# parameter and buffer names. It shares no code with vermeil.


class _PalmLayerNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class _PalmRotary(nn.Module):
    def __init__(self, dim: int, scale_base: float, use_xpos: bool) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))
        self.use_xpos, self.scale_base = use_xpos, scale_base
        self.register_buffer("scale", (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim))

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        t = torch.arange(seq_len).type_as(self.inv_freq)
        freqs = torch.einsum("i , j -> i j", t, self.inv_freq)
        freqs = torch.cat((freqs, freqs), dim=-1)
        if not self.use_xpos:
            return freqs, torch.ones(1)
        power = (t - (seq_len // 2)) / self.scale_base
        scale = self.scale ** power[:, None]
        return freqs, torch.cat((scale, scale), dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary_pos_emb(pos: Tensor, t: Tensor, scale: Tensor) -> Tensor:
    return (t * pos.cos() * scale) + (_rotate_half(t) * pos.sin() * scale)


class _PalmSwiGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class _PalmParallelBlock(nn.Module):
    def __init__(
        self, dim, dim_head, causal, heads, qk_rmsnorm, qk_scale, ff_mult, use_xpos, xpos_scale_base
    ):
        super().__init__()
        self.norm = _PalmLayerNorm(dim)
        attn_inner, ff_inner = dim_head * heads, dim * ff_mult
        self.fused_dims = (attn_inner, dim_head, dim_head, ff_inner * 2)
        self.qk_rmsnorm = qk_rmsnorm
        if qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.heads, self.causal = heads, causal
        self.scale = dim_head**-0.5 if not qk_rmsnorm else qk_scale
        self.rotary_emb = _PalmRotary(dim_head, xpos_scale_base, use_xpos and causal)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(attn_inner, dim, bias=False)
        self.ff_out = nn.Sequential(_PalmSwiGLU(), nn.Dropout(0.0), nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x, mask=None, finetune_modules=None):
        n, h = x.shape[1], self.heads
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        lora_o = None
        if finetune_modules is not None:
            lora_q, lora_k, lora_v, lora_o = finetune_modules
            q, k, v = q + lora_q(x), k + lora_k(x), v + lora_v(x)
        b = q.shape[0]
        q = q.reshape(b, n, h, -1).permute(0, 2, 1, 3)  # b n (h d) -> b h n d
        if self.qk_rmsnorm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            q, k = q * self.q_scale, k * self.k_scale
        positions, scale = self.rotary_emb(n)
        q = _apply_rotary_pos_emb(positions, q, scale)
        k = _apply_rotary_pos_emb(positions, k, scale**-1)
        sim = torch.einsum("b h i d, b j d -> b h i j", q, k) * self.scale
        if mask is not None:
            sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
        if self.causal:
            causal_mask = torch.ones((n, n), dtype=torch.bool).triu(1)
            sim = sim.masked_fill(causal_mask, -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("b h i j, b j d -> b h i d", attn, v)
        out = out.permute(0, 2, 1, 3).reshape(b, n, -1)  # b h n d -> b n (h d)
        attn_out = self.attn_out(out)
        ff_out = self.ff_out(ff)
        if lora_o is not None:
            attn_out = attn_out + lora_o(out)
        return attn_out + ff_out


# ------------------------------------------------------------------------------------------------------------
# ParallelTransformerBlock

PD, PDH, PH, PFF = 37, 8, 3, 2  # odd model dim; heads 3 of 8; ff_mult 2


def _palm_pair(
    *, causal: bool = True, qk_rmsnorm: bool = False, use_xpos: bool = True, **kwargs
) -> tuple[ParallelTransformerBlock, _PalmParallelBlock]:
    """Our block and the transcription with the same random weights, loaded through the PaLM key map."""
    config = {"dim": PD, "dim_head": PDH, "heads": PH, "ff_mult": PFF, "causal": causal}
    config |= {"qk_rmsnorm": qk_rmsnorm, "qk_scale": 8, "use_xpos": use_xpos, "xpos_scale_base": 16}
    ref = _PalmParallelBlock(**config)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))  # gains near 1, not 1
    block = ParallelTransformerBlock(**config, **kwargs)
    missing, unexpected = block.load_state_dict(convert_palm_state_dict(ref.state_dict()), strict=True)
    assert not missing and not unexpected
    return block.eval(), ref.eval()


@pytest.mark.parametrize(
    ("qk_rmsnorm", "use_xpos", "causal", "masked"), list(itertools.product([False, True], repeat=4))
)
def test_parallel_block_matches_palm(qk_rmsnorm: bool, use_xpos: bool, causal: bool, masked: bool) -> None:
    torch.manual_seed(0)
    block, ref = _palm_pair(causal=causal, qk_rmsnorm=qk_rmsnorm, use_xpos=use_xpos, residual=False)
    x = torch.randn(B, T, PD)
    # Right padding (row 0 keeps 4 tokens): every query keeps at least key 0 under causality.
    mask = torch.arange(T)[None, :] < torch.tensor([[4], [T]]) if masked else None
    expected = ref(x, mask=mask)
    assert_close(block(x, mask=mask), expected, rtol=1e-5, atol=1e-5)
    block.residual = True
    assert_close(block(x, mask=mask), x + expected, rtol=1e-5, atol=1e-5)


def test_parallel_block_masked_keys_are_ignored() -> None:
    torch.manual_seed(0)
    block, _ = _palm_pair(causal=False)
    x = torch.randn(B, T, PD)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -2:] = False
    y = block(x, mask=mask)
    x2 = x.clone()
    x2[:, -2:] = torch.randn(B, 2, PD)  # change only the padded tokens
    assert_close(block(x2, mask=mask)[:, :-2], y[:, :-2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(block(x2)[:, :-2], block(x)[:, :-2], atol=1e-3)  # without the mask they matter


def test_parallel_block_tables_grow_beyond_initial_rows() -> None:
    torch.manual_seed(0)
    block, ref = _palm_pair(residual=False)
    n0 = block.rotary_emb.max_seq_len
    x = torch.randn(1, n0 + 5, PD)
    assert_close(block(x), ref(x), rtol=1e-5, atol=1e-5)
    assert block.rotary_emb.max_seq_len >= n0 + 5
    assert not any(k.startswith(("rotary_emb", "causal_mask")) for k in block.state_dict())  # non-persistent


@pytest.mark.parametrize("causal", [True, False])
def test_parallel_block_causality(causal: bool) -> None:
    torch.manual_seed(0)
    block, _ = _palm_pair(causal=causal)
    x = torch.randn(B, T, PD)
    x2 = x.clone()
    x2[:, 4] += torch.randn(x.shape[0], x.shape[-1])
    diff = (block(x2) - block(x)).abs().amax(dim=(0, 2))  # (T,)
    if causal:
        assert diff[:4].max() == 0 and diff[4:].min() > 1e-3
    else:
        assert diff.min() > 1e-3


def test_parallel_block_lora_hooks_are_exact() -> None:
    torch.manual_seed(0)
    block, ref = _palm_pair(residual=False)
    x = torch.randn(B, T, PD)
    inner = PH * PDH
    lora_q, lora_k, lora_v = (nn.Linear(PD, n, bias=False) for n in (inner, PDH, PDH))
    lora_o = nn.Linear(inner, PD, bias=False)
    mods = (lora_q, lora_k, lora_v, lora_o)
    # Folding each adapter into the matching slice of the fused projection (and into attn_out) is the same
    # block, so the hooks add exactly lora_q(h), lora_k(h), lora_v(h) and lora_o(o).
    folded = ParallelTransformerBlock(
        PD, PDH, True, PH, ff_mult=PFF, xpos_scale_base=16, residual=False
    ).eval()
    folded.load_state_dict(block.state_dict())
    with torch.no_grad():
        w = folded.fused_attn_ff_proj.weight
        w[:inner] += lora_q.weight
        w[inner : inner + PDH] += lora_k.weight
        w[inner + PDH : inner + 2 * PDH] += lora_v.weight
        folded.attn_out.weight += lora_o.weight
    expected = folded(x)
    assert_close(block(x, finetune_modules=mods), expected, rtol=1e-5, atol=1e-5)
    assert_close(ref(x, finetune_modules=mods), expected, rtol=1e-5, atol=1e-5)
    # q only (others None): the q slice alone moves.
    folded.load_state_dict(block.state_dict())
    with torch.no_grad():
        folded.fused_attn_ff_proj.weight[:inner] += lora_q.weight
    assert_close(block(x, finetune_modules=(lora_q, None, None, None)), folded(x), rtol=1e-5, atol=1e-5)
    # Given to the constructor (the seed's example): registered, and the same result as per call.
    hooked = ParallelTransformerBlock(
        PD, PDH, True, PH, ff_mult=PFF, xpos_scale_base=16, residual=False, finetune_modules=mods
    ).eval()
    hooked.load_state_dict(
        block.state_dict() | {f"finetune_modules.{i}.weight": m.weight for i, m in enumerate(mods)}
    )
    assert "finetune_modules.3.weight" in hooked.state_dict()
    assert_close(hooked(x), expected, rtol=1e-5, atol=1e-5)


def test_parallel_block_zero_init_lora_adapters_change_nothing() -> None:
    torch.manual_seed(0)
    block, _ = _palm_pair()
    x = torch.randn(B, T, PD)
    inner = PH * PDH
    adapters = (
        LoRA(PD, inner, rank=2),
        LoRA(PD, PDH, rank=2),
        LoRA(PD, PDH, rank=2),
        LoRA(inner, PD, rank=2),
    )
    assert_close(block(x, finetune_modules=adapters), block(x), rtol=0, atol=0)
    with torch.no_grad():
        adapters[3].lora_b.weight.normal_()
    assert not torch.allclose(block(x, finetune_modules=adapters), block(x), atol=1e-4)


def test_parallel_block_flash_attn_on_cpu() -> None:
    torch.manual_seed(0)
    block, _ = _palm_pair()
    fused = ParallelTransformerBlock(
        PD, PDH, True, PH, ff_mult=PFF, xpos_scale_base=16, flash_attn=True
    ).eval()
    fused.load_state_dict(block.state_dict())
    x = torch.randn(B, T, PD)
    mask = torch.arange(T)[None, :] < torch.tensor([[5], [T]])
    assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)
    assert_close(fused(x, mask=mask), block(x, mask=mask), rtol=1e-5, atol=1e-5)
    dropping = ParallelTransformerBlock(PD, PDH, heads=PH, ff_mult=PFF, attn_dropout=0.1, flash_attn=True)
    with pytest.raises((RuntimeError, ValueError), match="flash"):
        dropping.train()(x.requires_grad_())  # the fused CPU kernel has no dropout


def test_parallel_block_gradcheck_float64() -> None:
    torch.manual_seed(0)
    block = ParallelTransformerBlock(
        6, dim_head=4, heads=2, ff_mult=2, qk_rmsnorm=True, xpos_scale_base=4, dtype=torch.float64
    )
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    assert torch.autograd.gradcheck(lambda x: block(x, mask=mask), (x,))


def test_parallel_block_compile_fullgraph() -> None:
    torch.manual_seed(0)
    block, _ = _palm_pair(qk_rmsnorm=True)
    x = torch.randn(B, T, PD)
    mask = torch.arange(T)[None, :] < torch.tensor([[5], [T]])
    adapters = (
        LoRA(PD, PH * PDH, rank=2),
        LoRA(PD, PDH, rank=2),
        LoRA(PD, PDH, rank=2),
        LoRA(PH * PDH, PD, rank=2),
    )
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    assert_close(compiled(x, mask=mask), block(x, mask=mask), rtol=1e-6, atol=1e-6)
    assert_close(compiled(x, finetune_modules=adapters), block(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"dim_head": 7}, "dim_head=7"),
        ({"heads": 0}, "heads=0"),
        ({"attn_dropout": 1.0}, "attn_dropout=1.0"),
        ({"qk_scale": -1}, "qk_scale=-1"),
        ({"finetune_modules": (nn.Identity(),)}, "finetune_modules"),
    ],
)
def test_parallel_block_bad_arguments(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        ParallelTransformerBlock(**({"dim": PD, "dim_head": PDH} | kwargs))


def test_parallel_block_bad_inputs() -> None:
    block = ParallelTransformerBlock(PD, PDH, heads=PH)
    with pytest.raises(ValueError, match="dim=37"):
        block(torch.randn(B, T, PD + 1))
    with pytest.raises(ValueError, match="mask of shape"):
        block(torch.randn(B, T, PD), mask=torch.ones(B, T + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask of shape"):
        block(torch.randn(B, T, PD), mask=torch.ones(B, T))  # float, not bool


def test_parallel_block_meta_device() -> None:
    block = ParallelTransformerBlock(PD, PDH, heads=PH, qk_rmsnorm=True, device="meta")
    assert all(p.is_meta for p in block.parameters())
    block.to_empty(device="cpu")
    block.reset_parameters()  # rebuilds the tables in place
    fresh = ParallelTransformerBlock(PD, PDH, heads=PH, qk_rmsnorm=True)
    assert_close(block.rotary_emb.cos_cached, fresh.rotary_emb.cos_cached)
    assert_close(block.rotary_emb.sin_cached, fresh.rotary_emb.sin_cached)
    block.load_state_dict(fresh.state_dict())
    x = torch.randn(B, T, PD)
    assert_close(block(x), fresh(x))  # the xPos scale too: the same function of the same weights
    assert torch.isfinite(block(torch.randn(B, T, PD))).all()


# ------------------------------------------------------------------------------------------------------------
# TransformerBlock

LD, LH, LKV, LF = 48, 4, 2, 37  # hidden 48, 4 heads of 12, 2 kv heads, intermediate 37
LLAMA3 = {
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _llama_pair() -> tuple[TransformerBlock, nn.Module, nn.Module]:
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    # theta 10000, Dh 12 and an original context of 64 put one frequency in each llama3 band (kept,
    # interpolated, divided), so the scaling is exercised, not just present.
    config = transformers.LlamaConfig(
        hidden_size=LD,
        intermediate_size=LF,
        num_attention_heads=LH,
        num_key_value_heads=LKV,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, **LLAMA3},
        attn_implementation="eager",
    )
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    scaling = RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)
    rotary = RotaryEmbedding(LD // LH, theta=10000.0, pairing="half", scaling=scaling)
    block = TransformerBlock(LD, LH, LKV, hidden_dim=LF, norm_eps=1e-5, rotary=rotary).eval()
    renames = {
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2",
    }
    state = {}
    for key, value in layer.state_dict().items():
        module, _, param = key.rpartition(".")
        state[f"{renames[module]}.{param}"] = value
    block.load_state_dict(state, strict=True)
    return block, layer, LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("offset", [0, 100])
def test_transformer_block_matches_llama_decoder_layer(offset: int) -> None:
    torch.manual_seed(0)
    block, layer, hf_rotary = _llama_pair()
    x = torch.randn(B, T, LD)
    position_ids = torch.arange(offset, offset + T)[None].expand(B, T)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)  # additive, as HF eager
    expected = layer(
        x, attention_mask=causal, position_ids=position_ids, position_embeddings=hf_rotary(x, position_ids)
    )
    got = block(x, input_pos=torch.arange(offset, offset + T) if offset else None)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _block(**kwargs) -> TransformerBlock:
    torch.manual_seed(0)
    config = {"dim": 24, "heads": 4, "kv_heads": 2, "hidden_dim": 37}
    block = TransformerBlock(**(config | kwargs)).eval()
    with torch.no_grad():  # non-trivial norm gains
        for p in block.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return block


def test_transformer_block_is_pre_norm_residual() -> None:
    block = _block(norm="layer", feed_forward="mlp", bias=True)
    x = torch.randn(B, T, 24)
    h = x + block.attention(block.attention_norm(x))
    expected = h + block.feed_forward(block.ffn_norm(h))
    assert_close(block(x), expected, rtol=1e-6, atol=1e-6)
    assert type(block.attention_norm).__name__ == "LayerNorm" and hasattr(block.feed_forward, "fc1")


def test_transformer_block_hidden_dim_rule() -> None:
    assert TransformerBlock(64, 4).feed_forward.hidden_dim == 256  # int(2 * 256 / 3) = 170 -> 256
    assert TransformerBlock(64, 4, multiple_of=32).feed_forward.hidden_dim == 192
    assert TransformerBlock(64, 4, multiple_of=32, ffn_dim_multiplier=1.3).feed_forward.hidden_dim == 224
    assert TransformerBlock(64, 4, feed_forward="mlp").feed_forward.hidden_dim == 256
    geglu = TransformerBlock(64, 4, feed_forward="geglu", hidden_dim=37)
    assert geglu.feed_forward.hidden_dim == 37 and geglu.feed_forward.activation == "gelu"


def test_transformer_block_cross_attention() -> None:
    block = _block(cross_attention=True, context_dim=10)
    assert {"cross_attention_norm.weight", "cross_attention.wk.weight"} <= set(block.state_dict())
    assert block.cross_attention.wk.weight.shape == (2 * 6, 10)
    x, context = torch.randn(B, T, 24), torch.randn(B, 5, 10)
    y = block(x, context)
    assert not torch.allclose(block(x, context + 1.0), y, atol=1e-4)  # the context matters
    keep = torch.tensor([[True, True, True, False, False]] * B)
    masked = block(x, context, context_mask=keep)
    context2 = context.clone()
    context2[:, 3:] = torch.randn(B, 2, 10) * 10  # change only padded context positions
    assert_close(block(x, context2, context_mask=keep), masked, rtol=1e-5, atol=1e-5)
    assert_close(block(x, context[:, :3]), masked, rtol=1e-5, atol=1e-5)  # padding == truncation
    with pytest.raises(ValueError, match="context"):
        block(x)
    with pytest.raises(ValueError, match="cross_attention=False"):
        _block()(x, context)


@pytest.mark.parametrize("cross", [False, True])
def test_transformer_block_kv_cache_decode_equals_full_forward(cross: bool) -> None:
    rotary = RotaryEmbedding(6, scaling=RopeScaling(original_max_seq_len=16))
    block = _block(rotary=rotary, qk_norm="rms", cross_attention=cross)
    x = torch.randn(B, T, 24)
    context = torch.randn(B, 5, 24) if cross else None
    full = block(x, context)
    block.setup_cache(B, max_seq_len=16)
    prefill = block(x[:, :3], context, input_pos=torch.arange(3))
    steps = [block(x[:, t : t + 1], context, input_pos=torch.tensor([t])) for t in range(3, T)]
    assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=1e-5, atol=1e-5)
    block.reset_cache()
    steps = [block(x[:, t : t + 1], context, input_pos=torch.tensor([t])) for t in range(T)]
    assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_transformer_block_causality_and_residual_dropout() -> None:
    block = _block(rotary=RotaryEmbedding(6), dropout=0.5)
    x = torch.randn(B, T, 24)
    x2 = x.clone()
    x2[:, 4] += torch.randn(x.shape[0], x.shape[-1])
    diff = (block(x2) - block(x)).abs().amax(dim=(0, 2))
    assert diff[:4].max() == 0 and diff[4:].min() > 1e-3
    assert not torch.equal(block.train()(x), block.eval()(x))  # dropout active in training only
    assert torch.equal(block.eval()(x), block(x))


def test_transformer_block_gradcheck_float64() -> None:
    torch.manual_seed(0)
    block = TransformerBlock(
        8,
        2,
        1,
        hidden_dim=5,
        rotary=RotaryEmbedding(4),
        cross_attention=True,
        context_dim=3,
        dtype=torch.float64,
    )
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: block(x, c), (x, context))


def test_transformer_block_compile_fullgraph_with_static_cache() -> None:
    block = _block(rotary=RotaryEmbedding(6, max_seq_len=16), cross_attention=True)
    x, context = torch.randn(B, T, 24), torch.randn(B, 5, 24)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    full = block(x, context)
    assert_close(compiled(x, context), full, rtol=1e-6, atol=1e-6)
    block.setup_cache(B, max_seq_len=16)
    block(x[:, :-1], context, input_pos=torch.arange(T - 1))  # eager prefill
    step = compiled(x[:, -1:], context, input_pos=torch.tensor([T - 1]))  # compiled decode step
    assert_close(step, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_apply_lora_targets_wq_wv() -> None:
    block = _block(rotary=RotaryEmbedding(6))
    x = torch.randn(B, T, 24)
    expected = block(x)
    apply_lora(block, ["wq", "wv"], rank=2, alpha=4.0)
    assert type(block.attention.wq).__name__ == "LoRALinear" and type(block.attention.wk) is nn.Linear
    assert_close(block(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"dim": 30, "heads": 4, "kv_heads": None}, "dim=30"),
        ({"kv_heads": 3}, "kv_heads=3"),
        ({"norm": "batch"}, "norm='batch'"),
        ({"feed_forward": "moe"}, "feed_forward='moe'"),
        ({"dropout": -0.1}, "dropout=-0.1"),
        ({"context_dim": 5}, "context_dim=5"),
    ],
)
def test_transformer_block_bad_arguments(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        TransformerBlock(**({"dim": 24, "heads": 4} | kwargs))


def test_transformer_block_bad_inputs() -> None:
    block = _block()
    with pytest.raises(ValueError, match="dim=24"):
        block(torch.randn(B, T, 25))
    with pytest.raises(ValueError, match="mask"):
        block(torch.randn(B, T, 24), mask=torch.ones(B, T + 2, dtype=torch.bool))


def test_transformer_block_meta_device() -> None:
    rotary = RotaryEmbedding(6, device="meta")
    block = TransformerBlock(24, 4, 2, rotary=rotary, cross_attention=True, device="meta")
    assert all(p.is_meta for p in block.parameters())
    block.to_empty(device="cpu")
    block.reset_parameters()  # parameters and the injected rotary tables
    assert_close(rotary.cos_cached, RotaryEmbedding(6).cos_cached)
    assert torch.isfinite(block(torch.randn(B, T, 24), torch.randn(B, 3, 24))).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"qk_scale": float("nan")}, "qk_scale=nan must be > 0 and finite"),
        ({"xpos_scale_base": float("inf")}, "xpos_scale_base=inf must be > 0 and finite"),
        ({"ff_mult": float("nan")}, "ff_mult=nan must be > 0"),
        ({"ff_mult": float("inf")}, "ff_mult=inf must be > 0"),
        ({"ff_mult": True}, "ff_mult=True must be > 0"),
    ],
)
def test_parallel_block_non_finite_numbers(kwargs: dict, message: str) -> None:
    # NaN qk_scale was accepted (NaN outputs); NaN/inf ff_mult failed in int() with an error naming nothing.
    with pytest.raises(ValueError, match=re.escape(message)):
        ParallelTransformerBlock(**({"dim": PD, "dim_head": PDH, "qk_rmsnorm": True} | kwargs))
