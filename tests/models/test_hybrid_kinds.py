"""Tests for the layer kinds of vermeil/models/hybrid.py beyond Mamba-1 + attention: Mamba-2 ("S"), global
attention ("G") beside sliding ("A" with `window`), parallel pairs ("S+A"), per-layer feed-forwards
(`ffn_pattern`: dense, MoE, none), partial RoPE, Jamba's inner norms and Falcon-H1's multipliers.

Mixed caches decode token by token equal to the full forward; the layer math is written out against the modules;
bad configs and states name the field and the value; the shipped configs of the new shapes build and train.

Shapes: B batch, T length, V vocabulary, D model dim.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vermeil.config import ConfigError, from_dict, to_dict
from vermeil.generation import generate
from vermeil.models.contract import split_output
from vermeil.models.hybrid import HybridConfig, HybridModel, HybridOutput
from vermeil.nn.cache import KVCache, RingKVCache
from vermeil.nn.hybrid_parts import InnerNormMambaBlock, PartialRotary, SegmentScaledLinear
from vermeil.nn.mamba2 import Mamba2Block
from vermeil.nn.moe import MoE
from vermeil.nn.ssm import MambaBlock

TOL = dict(atol=1e-5, rtol=1e-5)
V = 61
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# D 32, Mamba-2 of 4 heads of 16 (2 groups), chunk 3, attention of 4 heads of 8 with kv 2
BASE = dict(
    dim=32, vocab_size=V, d_state=5, headdim=16, ngroups=2, chunk_size=3, heads=4, kv_heads=2, hidden_dim=40
)


def model_of(seed: int = 0, **overrides: object) -> HybridModel:
    """A small hybrid with its weights nudged so that every part matters."""
    torch.manual_seed(seed)
    model = HybridModel(HybridConfig(**{**BASE, **overrides})).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", ".D")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def logits(out: object) -> torch.Tensor:
    return split_output(out)[0]


def tokens(b: int = 2, t: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Kinds and modules


def test_init_weights_keeps_each_mamba_blocks_own_init() -> None:
    """A block's own init (dt bias by inverse softplus in [dt_min, dt_max], S4D-real A) is not overwritten by the
    default init of its Linears, whichever order init_weights visits the modules in."""
    model = HybridModel(HybridConfig(**{**BASE, "pattern": ["M", "S", "P", "S+A"]}))
    mambas = [layer.mamba for layer in model.layers]
    for block in mambas:
        with torch.no_grad():
            for p in block.parameters():
                p.fill_(7.0)  # anything the init must replace
    model.init_weights()
    for block in mambas:
        bias = block.dt_proj.bias if isinstance(block, MambaBlock) else block.dt_bias
        dt = F.softplus(bias.detach())
        assert dt.min() >= block.dt_min * (1 - 1e-5) and dt.max() <= block.dt_max * (1 + 1e-5), block
        assert (block.D == 1).all()
        if isinstance(block, MambaBlock):
            want = torch.log(torch.arange(1, block.d_state + 1, dtype=torch.float32)).expand_as(block.A_log)
            assert_close(block.A_log.detach(), want)


def test_tokens_build_their_modules() -> None:
    model = model_of(
        pattern=["M", "S", "A", "G", "S+A", "P", "S+G"],
        window=4,
        ffn_pattern="DENDEND",
        rotary_dim=4,
        mamba_inner_norms=True,
    )
    kinds = [layer.kind for layer in model.layers]
    assert kinds == ["M", "S", "A", "G", "S+A", "P", "S+G"]
    layers = model.layers
    assert isinstance(layers[0].mamba, InnerNormMambaBlock) and layers[0].attention is None
    assert isinstance(layers[1].mamba, Mamba2Block) and layers[1].mamba.nheads == 4
    assert layers[2].attention.window == 4 and layers[3].attention.window is None  # "G" stays global
    assert isinstance(layers[4].mamba, Mamba2Block) and layers[4].attention is not None
    assert isinstance(layers[5].mamba, MambaBlock) and layers[5].attention is not None
    assert [layer.ffn for layer in layers] == ["swiglu", "moe", "none"] * 2 + ["swiglu"]
    assert isinstance(layers[1].feed_forward, MoE) and layers[2].feed_forward is None
    assert isinstance(model.rope, PartialRotary) and model.rope.rotary_dim == 4
    assert [a.window for a in model.attention_layers()] == [4, None, 4, 4, None]
    plan = model.sequence_parallel_plan()
    assert plan["layers.1.mamba"] == "whole" and plan["layers.1.feed_forward"] == "whole:out"


def test_routing_parallel_is_the_old_spelling_of_m_plus_a() -> None:
    assert HybridConfig(pattern="MAGS", routing="parallel").layer_kinds == ["M", "P", "M+G", "S"]
    assert HybridConfig(pattern=["M+A", "S+A"]).layer_kinds == ["P", "S+A"]


def test_config_round_trips_through_dict_with_new_fields() -> None:
    cfg = HybridConfig(
        **{
            **BASE,
            "pattern": ["S+A", "M"],
            "ffn_pattern": "ED",
            "ssm_proj_multipliers": [1, 2, 3, 4, 5],
            "dt_limit": [0.0, 0.5],
            "embedding_multiplier": 2.0,
        }
    )
    assert from_dict(HybridConfig, to_dict(cfg)) == cfg


def test_meta_construction_then_init_rebuilds_buffers() -> None:
    cfg = HybridConfig(
        **{**BASE, "pattern": ["S+A", "A"], "rotary_dim": 4, "ssm_proj_multipliers": [1, 2, 3, 4, 5]}
    )
    model = HybridModel(cfg, device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    scale = model.layers[0].mamba.in_proj.scale
    assert isinstance(model.layers[0].mamba.in_proj, SegmentScaledLinear)
    assert scale[:64].eq(1).all() and scale[-4:].eq(5).all()  # z rows x1, dt rows x5
    ref = HybridModel(cfg)
    ref.load_state_dict(model.state_dict())
    x = tokens()
    assert_close(model(x), ref(x), **TOL)


# ---------------------------------------------------------------------------------------------------------
# Cache == full forward


MIXED = [
    # attention full and sliding, Mamba-1 and Mamba-2, in one model
    dict(pattern=["M", "A", "S", "G", "S", "A"], window=3),
    # parallel pairs of both Mamba kinds, sliding and global
    dict(pattern=["S+A", "M+G", "S+G", "P"], window=4, merge="gate"),
    # MoE every other layer, Jamba's norms, no positions
    dict(pattern="MAMS", ffn_pattern="DE", mamba_inner_norms=True, rotary=False, num_experts=4),
    # partial RoPE, every multiplier away from 1, Mamba-2 width not a multiple of D, no gated norm
    dict(
        pattern=["S+A", "S"],
        rotary_dim=4,
        d_ssm=48,
        ngroups=1,
        ssm_norm=False,
        embedding_multiplier=1.3,
        lm_head_multiplier=0.7,
        ssm_in_multiplier=0.9,
        ssm_out_multiplier=1.1,
        attn_in_multiplier=0.8,
        attn_out_multiplier=1.2,
        key_multiplier=1.5,
        mlp_gate_multiplier=0.6,
        mlp_out_multiplier=1.4,
        ssm_proj_multipliers=[0.5, 1.5, 0.8, 1.2, 0.6],
        dt_limit=[0.0, 100.0],
    ),
]


@pytest.mark.parametrize(
    "case", MIXED, ids=["mixed-sequential", "mixed-parallel", "moe-jamba", "falcon-mults"]
)
def test_prefill_then_steps_equal_full_forward(case: dict) -> None:
    model = model_of(**case)
    x = tokens(t=11)
    full = logits(model(x))
    model.setup_cache(batch_size=2, max_seq_len=12)
    caches = [type(layer.attention.kv_cache) for layer in model.layers if layer.attention is not None]
    if case.get("window"):
        assert KVCache in caches and RingKVCache in caches
    # prefill in two pieces (the second continues the first: chunk 3 splits both), then one token at a time
    outs = [
        logits(model(x[:, :4], input_pos=torch.arange(4))),
        logits(model(x[:, 4:8], input_pos=torch.arange(4, 8))),
    ]
    outs += [logits(model(x[:, t : t + 1], input_pos=torch.tensor([t]))) for t in range(8, 11)]
    assert_close(torch.cat(outs, 1), full, **TOL)
    model.reset_cache()
    assert_close(logits(model(x[:, :1], input_pos=torch.arange(1))), full[:, :1], **TOL)


@pytest.mark.parametrize("case", MIXED[:3], ids=["mixed-sequential", "mixed-parallel", "moe-jamba"])
def test_generate_equals_uncached_argmax_loop(case: dict) -> None:
    model = model_of(seed=4, **case)
    x = tokens(t=5)
    out = generate(model, x, max_new_tokens=6)
    seq = x
    for _ in range(6):
        seq = torch.cat([seq, logits(model(seq))[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, 5:])


# ---------------------------------------------------------------------------------------------------------
# Layer math


def test_multipliers_are_the_falcon_h1_formulas() -> None:
    mults = dict(
        embedding_multiplier=1.3,
        lm_head_multiplier=0.7,
        ssm_in_multiplier=0.9,
        ssm_out_multiplier=1.1,
        attn_in_multiplier=0.8,
        attn_out_multiplier=1.2,
        mlp_gate_multiplier=0.6,
        mlp_out_multiplier=1.4,
    )
    model = model_of(pattern=["S+A"], **mults)
    plain = model_of(pattern=["S+A"])
    plain.load_state_dict(model.state_dict())
    layer, ref = model.layers[0], plain.layers[0]
    x = tokens()
    h = plain.embedding(x) * 1.3
    n = ref.norm(h)
    h = h + 1.1 * ref.mamba(0.9 * n) + 1.2 * ref.attention(0.8 * n)
    ff = ref.feed_forward
    z = ref.ffn_norm(h)
    h = h + 1.4 * ff.w2(F.silu(0.6 * ff.w1(z)) * ff.w3(z))
    assert_close(model(x), 0.7 * plain.lm_head(plain.norm_f(h)), **TOL)
    assert layer.attention.scale is None


def test_key_multiplier_scales_the_attention_logits() -> None:
    model = model_of(pattern="A", key_multiplier=1.7)
    attn = model.layers[0].attention
    assert attn.scale == pytest.approx(1.7 / math.sqrt(8))


def test_moe_layers_return_their_aux_loss() -> None:
    model = model_of(pattern="SA", ffn_pattern="EE", num_experts=4, moe_aux_loss_coef=0.01)
    seen = []
    for layer in model.layers:
        layer.feed_forward.register_forward_hook(lambda m, i, o: seen.append(o.load_balancing_loss))
    out = model(tokens())
    assert isinstance(out, HybridOutput) and out.logits.shape == (2, 11, V)
    assert len(seen) == 2
    assert_close(out.aux_loss, 0.01 * (seen[0] + seen[1]), **TOL)  # the Switch loss of each layer, summed
    assert not isinstance(model_of(pattern="SA")(tokens()), HybridOutput)  # no MoE: plain logits


def test_moe_router_is_not_renormalised_unless_asked() -> None:
    jamba, mixtral = (
        model_of(pattern="A", ffn_pattern="E"),
        model_of(pattern="A", ffn_pattern="E", moe_renormalize=True),
    )
    assert (
        not jamba.layers[0].feed_forward.router.renormalize
        and mixtral.layers[0].feed_forward.router.renormalize
    )
    assert jamba.layers[0].feed_forward.router.score_func == "softmax"


def test_bfloat16_mixed_model_runs_close_to_float32() -> None:
    ref = model_of(pattern=["M", "S+A", "G", "S"], ffn_pattern="DE", num_experts=4)
    low = HybridModel(ref.config, dtype=torch.bfloat16).eval()
    low.load_state_dict(ref.state_dict())
    x = tokens()
    assert_close(logits(low(x)), logits(ref(x)), atol=0.1, rtol=0.1)
    assert generate(low, x, max_new_tokens=2).shape == (2, 2)


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pattern="SA", headdim=24), r"headdim=24 must divide the Mamba-2 width expand \* dim = 64"),
        (dict(pattern="S", d_ssm=48, headdim=32), r"headdim=32 must divide the Mamba-2 width d_ssm=48"),
        (dict(pattern="S", ngroups=3), r"ngroups=3 must divide the Mamba-2 heads = .* = 4"),
        (dict(pattern="SA", dim=30, heads=4, kv_heads=2), r"dim=30 must be divisible by heads=4"),
        (dict(pattern="MXS"), r"pattern='MXS' has 'X' at position 1"),
        (dict(pattern="S+A"), r"has '\+' at position 1: .*needs the list form"),
        (dict(pattern=["S", "S+M"]), r"has 'S\+M' at position 1"),
        (dict(pattern="SA", ffn_pattern="DX"), r"ffn_pattern='DX' has 'X' at position 1"),
        (dict(pattern="SAS", ffn_pattern="DE"), r"ffn_pattern='DE' of length 2 must divide the 3 layers"),
        (
            dict(pattern="A", num_experts=2, experts_per_token=3),
            r"experts_per_token=3 must be <= num_experts=2",
        ),
        (dict(pattern="A", rotary_dim=5), r"rotary_dim=5 must be even"),
        (dict(pattern="S", dt_limit=[0.5]), r"dt_limit=\[0.5\] must be a list of 2 numbers"),
        (
            dict(pattern="S", ssm_proj_multipliers=[1, 2]),
            r"ssm_proj_multipliers=\[1, 2\] must be a list of 5",
        ),
        (
            dict(pattern="A", feed_forward="mlp", mlp_gate_multiplier=2.0),
            r"mlp_gate_multiplier=2.0 applies to SwiGLU",
        ),
        (dict(pattern="S", ssm_norm="yes"), r"ssm_norm='yes' must be true or false"),
        (dict(pattern="S", chunk_size=0), r"chunk_size=0 must be a positive int"),
    ],
)
def test_bad_configs_name_field_and_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HybridConfig(**{**BASE, **kwargs})


def test_unknown_kind_in_yaml_names_field_and_value(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  family: hybrid\n  dim: 32\n  pattern: [S, S+Q]\n")
    with pytest.raises(ConfigError, match=r"model: pattern=\['S', 'S\+Q'\] has 'S\+Q' at position 1"):
        HybridConfig.from_yaml(path)
    path.write_text("model:\n  pattern: SA\n  ffn_pattern: DM\n")
    with pytest.raises(ConfigError, match=r"ffn_pattern='DM' has 'M' at position 1"):
        HybridConfig.from_yaml(path)


def test_a_state_of_the_wrong_shape_is_named() -> None:
    block = model_of(pattern="S").layers[0].mamba
    x = torch.randn(2, 5, 32)
    conv = torch.zeros(2, block.conv_dim, block.d_conv)
    with pytest.raises(ValueError, match=r"ssm_state.shape=\(2, 4, 16, 4\) must be \(2, 4, 16, 5\)"):
        block(x, initial_state=(conv, torch.zeros(2, 4, 16, 4)))
    with pytest.raises(ValueError, match=r"conv_state.shape=\(2, 3, 4\) must be"):
        block(x, initial_state=(torch.zeros(2, 3, 4), torch.zeros(2, 4, 16, 5)))
    mamba1 = model_of(pattern="M").layers[0].mamba  # E 64, N 5, K 4
    with pytest.raises(ValueError, match=r"initial_state.shape=\(2, 64, 3\) must be \(2, 64, 5\)"):
        mamba1(x, initial_state=(torch.zeros(2, 64, 4), torch.zeros(2, 64, 3)))


# ---------------------------------------------------------------------------------------------------------
# Shipped configs of the new shapes


NEW_CONFIGS = ["mamba2-lm", "jamba-lm", "bamba-lm", "falcon-h1-lm"]
NEW_MQAR = ["mqar-mamba2", "mqar-jamba", "mqar-bamba", "mqar-falcon-h1"]
TINY_TRAIN = [
    "train.steps=4",
    "train.batch_size=2",
    "train.seq_len=32",
    "train.warmup=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.progress=false",
    "train.plot=false",
]


@pytest.mark.parametrize("name", NEW_CONFIGS + NEW_MQAR)
def test_shipped_configs_build_and_train(name: str) -> None:
    from vermeil.recipes import build_run, load_run_config
    from vermeil.train import Trainer

    data = ["data.max_bytes=20000"] if name in NEW_CONFIGS else ["data.vocab_size=64", "data.num_kv_pairs=4"]
    run = load_run_config(CONFIGS / f"{name}.yaml", [*TINY_TRAIN, *data])
    built = build_run(run)
    result = Trainer(built.model, built.train_batches, built.loss_fn, run.train, eval_fn=built.eval_fn).fit()
    losses = [r["loss"] for r in result.history if r["split"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert result.final_eval and all(math.isfinite(v) for v in result.final_eval.values())
