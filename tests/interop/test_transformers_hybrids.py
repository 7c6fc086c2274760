"""Tests for vermeil/interop/transformers_hybrids.py: random small transformers Mamba2ForCausalLM,
JambaForCausalLM, BambaForCausalLM and FalconH1ForCausalLM (every feature on: several heads and groups, a
chunk size below the sequence length that does not divide it, MoE layers, attention at irregular indices,
Falcon-H1's multipliers away from 1) convert into a HybridModel with the same logits (1e-4, float32, the
pure-PyTorch path) and the same greedy tokens for a batch of prompts of different lengths (left-padded in
transformers, ragged in Vermeil); the way back is exact; configs Vermeil cannot express are refused by name.

Shapes: B batch, T length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch.testing import assert_close

from vermeil.generation import generate
from vermeil.interop import from_transformers, to_transformers
from vermeil.interop.transformers_hybrids import transformers_class_for
from vermeil.models.hybrid import HybridConfig, HybridModel, HybridOutput

transformers = pytest.importorskip("transformers")

V = 101
NO_SPECIAL = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one intra-op thread on a shared, loaded machine. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _spread(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Nudge every weight so that logits and greedy choices vary from token to token (the default inits give
    near-constant outputs); A_log and D stay as initialised, dt_bias stays moderate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", ".D")):
                continue
            scale = 0.1 if name.endswith("dt_bias") else 0.3
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return model.eval()


def hf_mamba2(seed: int = 0, **overrides: object) -> torch.nn.Module:
    """D 32, 8 heads of 8 (expand 2), 2 groups, N 6, chunk 5, 3 layers."""
    torch.manual_seed(seed)
    kw: dict = dict(
        vocab_size=V,
        hidden_size=32,
        num_heads=8,
        head_dim=8,
        expand=2,
        n_groups=2,
        state_size=6,
        num_hidden_layers=3,
        conv_kernel=4,
        chunk_size=5,
        **NO_SPECIAL,
    )
    kw.update(overrides)
    return _spread(transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kw)), seed)


def hf_jamba(seed: int = 0, **overrides: object) -> torch.nn.Module:
    """D 32, 6 layers: attention at 1 and 4 (period 3, offset 1), MoE (4 experts, top 2) at odd layers."""
    torch.manual_seed(seed)
    kw: dict = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=3,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=6,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=5,
        use_mamba_kernels=False,
        **NO_SPECIAL,
    )
    kw.update(overrides)
    return _spread(transformers.JambaForCausalLM(transformers.JambaConfig(**kw)), seed)


def hf_bamba(seed: int = 0, **overrides: object) -> torch.nn.Module:
    """D 32, 5 layers with attention at 0 and 3 (half-width RoPE), Mamba-2 of 8 heads of 8, 2 groups, chunk 5."""
    torch.manual_seed(seed)
    kw: dict = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_indices=[0, 3],
        mamba_n_heads=8,
        mamba_d_head=8,
        mamba_n_groups=2,
        mamba_d_state=6,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=5,
        **NO_SPECIAL,
    )
    kw.update(overrides)
    return _spread(transformers.BambaForCausalLM(transformers.BambaConfig(**kw)), seed)


FALCON_MULTIPLIERS = dict(
    embedding_multiplier=1.3,
    lm_head_multiplier=0.7,
    attention_in_multiplier=0.8,
    attention_out_multiplier=1.2,
    key_multiplier=1.5,
    ssm_in_multiplier=0.9,
    ssm_out_multiplier=1.1,
    ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.6],
    mlp_multipliers=[0.7, 1.4],
)


def hf_falcon_h1(seed: int = 0, **overrides: object) -> torch.nn.Module:
    """D 32, 3 parallel layers; Mamba-2 width 48 (not a multiple of D: mamba_d_ssm), 6 heads of 8, 2 groups,
    chunk 5; every multiplier away from 1; the gated norm on (norm before gate)."""
    torch.manual_seed(seed)
    kw: dict = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_d_ssm=48,
        mamba_n_heads=6,
        mamba_d_head=8,
        mamba_n_groups=2,
        mamba_d_state=6,
        mamba_d_conv=4,
        mamba_chunk_size=5,
        mamba_rms_norm=True,
        **FALCON_MULTIPLIERS,
        **NO_SPECIAL,
    )
    kw.update(overrides)
    return _spread(transformers.FalconH1ForCausalLM(transformers.FalconH1Config(**kw)), seed)


MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "Mamba2ForCausalLM": hf_mamba2,
    "JambaForCausalLM": hf_jamba,
    "BambaForCausalLM": hf_bamba,
    "FalconH1ForCausalLM": hf_falcon_h1,
}
VARIANTS = [
    ("Mamba2ForCausalLM", {}),
    ("Mamba2ForCausalLM", dict(use_bias=True, tie_word_embeddings=True, time_step_limit=(0.0, 0.5))),
    ("JambaForCausalLM", {}),
    ("JambaForCausalLM", dict(mamba_proj_bias=True, tie_word_embeddings=True)),
    ("BambaForCausalLM", {}),
    ("BambaForCausalLM", dict(attention_bias=True, mlp_bias=True, mamba_proj_bias=True)),
    ("FalconH1ForCausalLM", {}),
    ("FalconH1ForCausalLM", dict(mamba_rms_norm=False, mamba_proj_bias=True, projectors_bias=True)),
    ("FalconH1ForCausalLM", dict(mamba_norm_before_gate=False, attention_bias=True, mlp_bias=True)),
    ("BambaForCausalLM", dict(head_dim=12)),  # head width apart from D / heads: RoPE on 6 of 12 channels
    ("FalconH1ForCausalLM", dict(head_dim=12, mamba_d_ssm=None, mamba_n_heads=4, mamba_d_head=16)),
]


def tokens(b: int = 2, t: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def logits_of(out: object) -> torch.Tensor:
    return out.logits if isinstance(out, HybridOutput) else out  # type: ignore[return-value]


@pytest.mark.parametrize(("cls", "overrides"), VARIANTS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_logits_match_transformers(cls: str, overrides: dict) -> None:
    hf = MODELS[cls](**overrides)
    assert type(hf).__name__ == cls
    model = from_transformers(hf)
    assert isinstance(model, HybridModel)
    x = tokens()  # T 13: chunk 5 does not divide it
    with torch.no_grad():
        expected = hf(x).logits
        got = logits_of(model(x))
    assert expected.std() > 0.5  # the weights make a difference
    assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_layouts_carry_over() -> None:
    jamba = from_transformers(hf_jamba()).config
    assert jamba.layer_kinds == list("MAMMAM") and jamba.layer_ffns == ["swiglu", "moe"] * 3
    assert jamba.mamba_inner_norms and not jamba.rotary and not jamba.moe_renormalize
    bamba = from_transformers(hf_bamba()).config
    assert bamba.layer_kinds == list("ASSAS") and bamba.rotary_dim == 4  # head_dim 8 * 0.5
    falcon = from_transformers(hf_falcon_h1()).config
    assert falcon.layer_kinds == ["S+A"] * 3 and falcon.d_ssm == 48 and falcon.key_multiplier == 1.5
    assert from_transformers(hf_mamba2()).config.layer_ffns == ["none"] * 3


@pytest.mark.parametrize("cls", sorted(MODELS))
def test_greedy_generation_of_ragged_prompts_matches_transformers(cls: str) -> None:
    """transformers left-pads the batch (attention mask, positions from the mask); Vermeil feeds each row its own
    prompt (no padding inside the model): the greedy tokens must be the same."""
    hf = MODELS[cls](seed=3)
    model = from_transformers(hf)
    prompts = [
        tokens(1, 9, seed=4)[0].tolist(),
        tokens(1, 4, seed=5)[0].tolist(),
        tokens(1, 6, seed=6)[0].tolist(),
    ]
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    new = 8
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)[
        :, longest:
    ]
    out = generate(model, prompts, max_new_tokens=new)
    assert len(set(ref.flatten().tolist())) > 3  # not one repeated token
    assert torch.equal(out, ref), (out, ref)


@pytest.mark.parametrize("cls", sorted(MODELS))
def test_cached_decoding_matches_full_forward(cls: str) -> None:
    """Prefill 7 (chunk 5: a partial chunk) then one token at a time equals the full forward at every position."""
    model = from_transformers(MODELS[cls](seed=2))
    x = tokens(t=12)
    with torch.no_grad():
        full = logits_of(model(x))
        model.setup_cache(2, 12)
        got = [logits_of(model(x[:, :7], input_pos=torch.arange(7)))]
        got += [logits_of(model(x[:, t : t + 1], input_pos=torch.tensor([t]))) for t in range(7, 12)]
    assert_close(torch.cat(got, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("cls", "overrides"), VARIANTS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_round_trip_to_transformers_is_exact(cls: str, overrides: dict) -> None:
    hf = MODELS[cls](**overrides)
    model = from_transformers(hf)
    assert transformers_class_for(model.config) == cls
    back = to_transformers(model)
    assert type(back).__name__ == cls
    hf_state, back_state = hf.state_dict(), back.state_dict()
    assert hf_state.keys() == back_state.keys()
    for k, v in hf_state.items():
        assert torch.equal(back_state[k], v), k
    x = tokens()
    with torch.no_grad():
        assert_close(back(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)
    again = from_transformers(back)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


NATIVE = {
    "Mamba2ForCausalLM": dict(
        pattern="S", n_layers=2, feed_forward="none", headdim=16, ngroups=2, chunk_size=5
    ),
    "JambaForCausalLM": dict(
        pattern="MAM", ffn_pattern="DED", mamba_inner_norms=True, rotary=False, num_experts=4, hidden_dim=40
    ),
    "BambaForCausalLM": dict(
        pattern="SSAS", headdim=16, ngroups=2, rotary_dim=4, hidden_dim=40, chunk_size=5
    ),
    "FalconH1ForCausalLM": dict(
        pattern=["S+A"],
        n_layers=2,
        d_ssm=48,
        headdim=16,
        ssm_norm_before_gate=True,
        hidden_dim=40,
        key_multiplier=1.5,
        embedding_multiplier=0.8,
        ssm_proj_multipliers=[0.5, 1.5, 0.8, 1.2, 0.6],
        mlp_gate_multiplier=0.7,
    ),
}


@pytest.mark.parametrize("cls", sorted(NATIVE))
def test_native_configs_go_to_their_class(cls: str) -> None:
    """A HybridModel built from config fields (not converted) maps to the class of its pattern, same logits."""
    torch.manual_seed(0)
    cfg = HybridConfig(dim=32, vocab_size=V, heads=4, **NATIVE[cls])  # type: ignore[arg-type]
    native = _spread(HybridModel(cfg), seed=1)
    hf = to_transformers(native)
    assert type(hf).__name__ == cls
    x = tokens()
    with torch.no_grad():
        assert_close(hf(x).logits, logits_of(native(x)), atol=1e-4, rtol=1e-4)


def _with(make: Callable[[], torch.nn.Module], **fields: object) -> Callable[[], torch.nn.Module]:
    """A model whose config is edited after construction (transformers itself may not build such a model)."""

    def build() -> torch.nn.Module:
        hf = make()
        for k, v in fields.items():
            setattr(hf.config, k, v)
        return hf

    return build


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_with(hf_mamba2, hidden_act="gelu"), r"Mamba2ForCausalLM: hidden_act='gelu'"),
        (_with(hf_bamba, hidden_act="relu"), r"BambaForCausalLM: hidden_act='relu'"),
        (
            _with(hf_falcon_h1, mamba_proj_bias=True),
            r"FalconH1ForCausalLM: mamba_proj_bias=True must equal projectors_bias=False",
        ),
        (
            _with(hf_falcon_h1, ssm_multipliers=[1.0, 1.0]),
            r"FalconH1ForCausalLM: ssm_multipliers=\[1.0, 1.0\] must hold 5",
        ),
        (
            _with(hf_falcon_h1, mlp_multipliers=[1.0]),
            r"FalconH1ForCausalLM: mlp_multipliers=\[1.0\] must hold 2",
        ),
        (
            _with(hf_bamba, attn_layer_indices=[1, 7]),
            r"BambaForCausalLM: attn_layer_indices=\[1, 7\] must lie in \[0, num_hidden_layers=5\)",
        ),
        (
            _with(hf_bamba, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
            r"rope_parameters\['rope_type'\]='linear'",
        ),
        (
            _with(
                hf_bamba,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.4},
            ),
            r"partial_rotary_factor=0.4 gives a rotary width int\(head_dim=8 \* factor\)=3: it must be even",
        ),
        (
            _with(hf_bamba, mamba_n_groups=3),
            r"ngroups=3 must divide the Mamba-2 heads",
        ),
    ],
)
def test_configs_vermeil_cannot_express_are_refused_by_name(make: Callable, match: str) -> None:
    hf = make()
    with pytest.raises(ValueError, match=match):
        from_transformers(hf)


def test_layouts_without_a_transformers_class_are_refused_by_name() -> None:
    mixed = HybridModel(HybridConfig(dim=32, vocab_size=V, pattern="MSA", headdim=16, heads=4))
    with pytest.raises(ValueError, match=r"pattern='MSA' .* matches none of"):
        to_transformers(mixed)
    windowed = HybridModel(HybridConfig(dim=32, vocab_size=V, pattern="SA", headdim=16, heads=4, window=8))
    with pytest.raises(
        ValueError, match=r"to_transformers\(BambaForCausalLM\): window=8 cannot be expressed"
    ):
        to_transformers(windowed)
    jamba = HybridModel(HybridConfig(dim=32, vocab_size=V, pattern="MAAM", heads=4, rotary=False))
    with pytest.raises(ValueError, match=r"mamba_inner_norms=False cannot be expressed"):
        to_transformers(jamba)


def _grads_by_vermeil_key(model: torch.nn.Module, cls: str) -> dict[str, torch.Tensor]:
    from vermeil.interop.transformers_hybrids import hf_to_vermeil_state_dict

    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return hf_to_vermeil_state_dict(grads, cls)


@pytest.mark.parametrize("cls", sorted(MODELS))
def test_gradients_match_transformers(cls: str) -> None:
    """Fine-tuning sees the same gradients: the multipliers are applied at run time, not folded into weights."""
    hf = MODELS[cls](seed=7)
    model = from_transformers(hf)
    x = tokens(t=9)
    hf.train()
    model.train()
    _lm_loss(hf(x).logits, x).backward()
    _lm_loss(logits_of(model(x)), x).backward()
    expected = _grads_by_vermeil_key(hf, cls)
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for k, g in got.items():
        assert_close(g, expected[k], atol=1e-4, rtol=1e-3, msg=k)


def _lm_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())


def test_jamba_preset_is_transformers_default_jamba() -> None:
    """The `jamba-v0.1-shape` preset is what transformers' JambaConfig defaults (Jamba-v0.1) convert to."""
    from vermeil.interop.transformers_hybrids import jamba_config
    from vermeil.models.hybrid import PRESETS

    converted = jamba_config(transformers.JambaConfig())
    preset = HybridConfig(**PRESETS["jamba-v0.1-shape"])
    assert preset.layer_kinds == converted.layer_kinds and preset.layer_ffns == converted.layer_ffns
    # the router loss: the preset trains with Jamba's 0.001; a conversion keeps transformers' switch (off)
    assert preset.moe_aux_loss_coef == transformers.JambaConfig().router_aux_loss_coef
    for field in (
        "dim",
        "vocab_size",
        "heads",
        "kv_heads",
        "d_state",
        "d_conv",
        "expand",
        "dt_rank",
        "hidden_dim",
        "num_experts",
        "experts_per_token",
        "norm_eps",
        "mamba_inner_norms",
        "rotary",
        "tie_embeddings",
    ):
        assert getattr(preset, field) == getattr(converted, field), field


def test_unmapped_keys_are_named() -> None:
    from vermeil.interop.transformers_hybrids import hf_to_vermeil_state_dict, vermeil_to_hf_state_dict

    with pytest.raises(
        ValueError, match=r"'model.layers.0.foo.weight': layer key 'foo.weight' has no counterpart"
    ):
        hf_to_vermeil_state_dict({"model.layers.0.foo.weight": torch.zeros(1)}, "BambaForCausalLM")
    with pytest.raises(ValueError, match=r"Vermeil key 'bias' has no counterpart"):
        vermeil_to_hf_state_dict({"bias": torch.zeros(1)}, "Mamba2ForCausalLM")


@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_bfloat16_mamba2_keeps_transformers_residual_rule(residual_in_fp32: bool) -> None:
    """transformers' Mamba2 keeps its residual stream in float32 in a bf16 model (`residual_in_fp32`, the
    default): the converted model does too (every layer hands on float32), and its logits stay within bf16
    rounding of transformers' (the mixers round differently inside, so not closer than that)."""
    hf = hf_mamba2(residual_in_fp32=residual_in_fp32).to(torch.bfloat16)
    model = from_transformers(hf)
    assert model.config.residual_in_fp32 is residual_in_fp32
    dtypes = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x = tokens()
    with torch.no_grad():
        expected, got = hf(x).logits.float(), model(x)
    assert set(dtypes) == {torch.float32 if residual_in_fp32 else torch.bfloat16}
    assert (got - expected).abs().mean() < 0.1 * expected.abs().mean()
