"""Tests for vermeil/models/mamba.py: config checks, state-spaces key names, presets on meta, the residual order,
mamba_ssm's init, cache (prefill + steps) == full forward, generation, save/load, optimizer groups, bad inputs.

Shapes: B batch, T length, V vocabulary, D d_model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vermeil.checkpoint import load_weights, save_weights
from vermeil.generation import generate
from vermeil.models.mamba import PRESETS, MambaConfig, MambaLM, build
from vermeil.train.optim import param_groups

TOL = dict(atol=1e-5, rtol=1e-5)


def tiny(**overrides: object) -> MambaLM:
    """debug preset (D 37, 3 layers, N 5, V 101 padded to 104), weights nudged so every part matters."""
    torch.manual_seed(0)
    model = build("debug", **overrides).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def tokens(b: int = 2, t: int = 7, vocab: int = 101, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


# ---------------------------------------------------------------------------------------------------------
# Config, names, presets


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(d_model=0), "d_model=0"),
        (dict(n_layer=-1), "n_layer=-1"),
        (dict(d_state=2.5), "d_state=2.5"),
        (dict(dt_rank=0), "dt_rank=0"),
        (dict(norm_epsilon=0.0), "norm_epsilon=0.0"),
        (dict(compile_scan=1), "compile_scan=1 must be true or false"),
        (dict(dt_min=0.5, dt_max=0.1), "dt_min=0.5 must be <= dt_max=0.1"),
    ],
)
def test_config_errors_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MambaConfig(**kwargs)


def test_state_spaces_key_names() -> None:
    model = build("debug")
    keys = set(model.state_dict())
    mixer = {
        "in_proj.weight",
        "conv1d.weight",
        "conv1d.bias",
        "x_proj.weight",
        "dt_proj.weight",
        "dt_proj.bias",
    }
    mixer |= {"A_log", "D", "out_proj.weight"}
    expected = {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i in range(3):
        expected |= {f"backbone.layers.{i}.norm.weight"} | {f"backbone.layers.{i}.mixer.{k}" for k in mixer}
    assert keys == expected
    assert model.lm_head.weight is model.backbone.embedding.weight  # tied by default


def test_vocab_is_padded_but_logits_are_not() -> None:
    model = tiny()
    assert model.backbone.embedding.weight.shape == (104, 37)  # 101 rounded up to a multiple of 8
    assert model(tokens()).shape == (2, 7, 101)
    assert model(tokens()).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_on_meta(name: str) -> None:
    model = build(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    if name == "mamba-130m":  # the tensor shapes of state-spaces/mamba-130m (pytorch_model.bin)
        sd = model.state_dict()
        assert sd["backbone.embedding.weight"].shape == (50280, 768)
        assert sd["backbone.layers.0.mixer.in_proj.weight"].shape == (3072, 768)
        assert sd["backbone.layers.0.mixer.conv1d.weight"].shape == (1536, 1, 4)
        assert sd["backbone.layers.0.mixer.x_proj.weight"].shape == (80, 1536)
        assert sd["backbone.layers.0.mixer.dt_proj.weight"].shape == (1536, 48)
        assert sd["backbone.layers.0.mixer.A_log"].shape == (1536, 16)
        assert sd["backbone.layers.23.mixer.out_proj.weight"].shape == (768, 1536)
        assert 129e6 < model.num_params() < 130e6  # "130m": 129.1M with the tied head counted once


def test_meta_then_to_empty_and_init() -> None:
    model = build("debug", device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(tokens())).all()


def test_unknown_preset_is_named() -> None:
    with pytest.raises(ValueError, match="preset='mamba-7b' is not one of"):
        build("mamba-7b")


# ---------------------------------------------------------------------------------------------------------
# Math: the residual order and the init


def test_forward_equals_prenorm_residual_loop() -> None:
    """mamba_ssm's Add -> Norm -> Mixer with a separate residual equals h = h + mixer(norm(h)); norm_f at the end."""
    model = tiny()
    x = tokens()
    h = model.backbone.embedding(x)
    for layer in model.backbone.layers:
        h = h + layer.mixer(layer.norm(h))
    expected = model.lm_head(model.backbone.norm_f(h))[..., :101]
    assert_close(model(x), expected, **TOL)


def test_layernorm_variant() -> None:
    model = tiny(rms_norm=False)
    assert "backbone.norm_f.bias" in model.state_dict()
    assert torch.isfinite(model(tokens())).all()


def test_mamba_ssm_init() -> None:
    torch.manual_seed(0)
    cfg = MambaConfig(**{**PRESETS["debug"], "n_layer": 4, "bias": True})
    model = MambaLM(cfg)
    mixer = model.backbone.layers[1].mixer
    a = torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand(cfg.d_inner, -1)
    assert_close(mixer.A_log.detach(), a)  # S4D-real
    assert_close(mixer.D.detach(), torch.ones(cfg.d_inner))
    dt = F.softplus(mixer.dt_proj.bias.detach())  # inverse softplus of a log-uniform dt in [dt_min, dt_max]
    assert dt.min() >= cfg.dt_min * (1 - 1e-4) and dt.max() <= cfg.dt_max * (1 + 1e-4)
    assert mixer.dt_proj.bias.abs().sum() > 0  # not zeroed with the other biases
    assert mixer.in_proj.bias.abs().sum() == 0 and mixer.out_proj.bias.abs().sum() == 0
    # rescale_prenorm_residual: Kaiming-uniform bound 1/sqrt(fan_in), divided by sqrt(n_layer)
    bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layer)
    assert mixer.out_proj.weight.abs().max() <= bound
    assert mixer.out_proj.weight.abs().max() > 0.8 * bound
    assert abs(model.backbone.embedding.weight.std().item() - cfg.initializer_range) < 0.005
    assert (model.backbone.layers[0].norm.weight == 1).all()


# ---------------------------------------------------------------------------------------------------------
# Cache


@pytest.mark.parametrize("prompt", [1, 4, 7])
def test_prefill_then_steps_equals_full_forward(prompt: int) -> None:
    model = tiny()
    x = tokens(t=9)
    full = model(x)
    model.setup_cache(batch_size=2, max_seq_len=16)
    outs = [model(x[:, :prompt], input_pos=torch.arange(prompt))]
    for t in range(prompt, 9):
        outs.append(model(x[:, t : t + 1], input_pos=torch.tensor([t])))
    assert_close(torch.cat(outs, 1), full, **TOL)
    # a prompt at position 0 starts a new sequence, with or without reset_cache
    assert_close(model(x[:, :prompt], input_pos=torch.arange(prompt)), full[:, :prompt], **TOL)
    model.reset_cache()
    assert_close(model(x[:, :prompt], input_pos=torch.arange(prompt)), full[:, :prompt], **TOL)


def test_compile_scan_equals_eager_forward_and_cached_prefill() -> None:
    eager, compiled = tiny(), tiny(compile_scan=True)
    assert all(layer.mixer.compile_scan for layer in compiled.backbone.layers)
    x = tokens(t=19)
    full = eager(x)
    assert_close(compiled(x), full, **TOL)
    compiled.setup_cache(batch_size=2, max_seq_len=24)
    outs = [compiled(x[:, :10], input_pos=torch.arange(10))]  # prefill through the compiled scan
    outs += [compiled(x[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(10, 19)]
    assert_close(torch.cat(outs, 1), full, **TOL)


def test_untied_head_cache_and_plain_forward_after_cache() -> None:
    model = tiny(tie_embeddings=False)
    assert model.lm_head.weight is not model.backbone.embedding.weight
    x = tokens()
    full = model(x)
    model.setup_cache(2, 8)
    model(x[:, :3], input_pos=torch.arange(3))
    assert_close(model(x), full, **TOL)  # no input_pos: the cache is neither read nor written
    assert_close(model(x[:, 3:4], input_pos=torch.tensor([3])), full[:, 3:4], **TOL)


def test_generate_greedy_matches_uncached_argmax_loop() -> None:
    model = tiny()
    x = tokens(t=5)
    out = generate(model, x, max_new_tokens=6)
    seq = x
    for _ in range(6):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq[:, 5:])


def test_ragged_prompts_generate_as_alone() -> None:
    model = tiny()
    prompts = [[3, 5, 7, 11, 13], [17, 19]]
    both = generate(model, prompts, max_new_tokens=4)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=4)
        assert torch.equal(both[i], alone[0])


# ---------------------------------------------------------------------------------------------------------
# Weights, optimizer groups, bad inputs


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_roundtrip(tmp_path, tie: bool) -> None:
    model = tiny(tie_embeddings=tie)
    path = tmp_path / "mamba.safetensors"
    save_weights(model, path)
    fresh = build("debug", tie_embeddings=tie).eval()
    load_weights(fresh, path)
    assert_close(fresh(tokens()), model(tokens()), atol=0, rtol=0)


def test_optimizer_groups_no_decay_on_norms_biases_a_log_d() -> None:
    model = tiny()  # training's one rule on the model's parameters (A_log and D carry mamba_ssm's marks)
    assert (
        model.backbone.layers[0].mixer.A_log._no_weight_decay
        and model.backbone.layers[0].mixer.D._no_weight_decay
    )
    decay, no_decay = param_groups(model, 0.1, no_decay_embeddings=False)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    nd = set(no_decay["param_names"])
    for i in range(3):
        p = f"backbone.layers.{i}."
        assert {p + "norm.weight", p + "mixer.A_log", p + "mixer.D", p + "mixer.dt_proj.bias"} <= nd
        assert p + "mixer.conv1d.bias" in nd
        assert p + "mixer.in_proj.weight" in decay["param_names"]
    assert "backbone.norm_f.weight" in nd
    assert "backbone.embedding.weight" in decay["param_names"]
    n_params = len(list(model.parameters()))
    assert len(decay["params"]) + len(no_decay["params"]) == n_params  # the tied head counted once
    _, no_decay2 = param_groups(model, 0.1, no_decay_embeddings=True)
    assert "backbone.embedding.weight" in no_decay2["param_names"]
    opt = torch.optim.AdamW([decay, no_decay], lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="weight_decay=-1"):
        param_groups(model, -1)


def test_gradients_reach_every_parameter() -> None:
    model = tiny().train()
    x = tokens()
    F.cross_entropy(model(x)[:, :-1].reshape(-1, 101), x[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs_are_named() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="token id 101 is outside the vocabulary"):
        model(torch.tensor([[1, 101]]))
    with pytest.raises(TypeError, match="integer ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(torch.zeros(3, dtype=torch.long))
    model.setup_cache(2, 8)
    with pytest.raises(ValueError, match=r"input_pos must have shape \(T=3,\)"):
        model(tokens(t=3), input_pos=torch.arange(4))
    with pytest.raises(ValueError, match="outside the cache's positions"):
        model(tokens(t=3), input_pos=torch.arange(6, 9))
    with pytest.raises(ValueError, match="batch of 3 rows exceeds the cache's batch_size=2"):
        model(tokens(b=3, t=2), input_pos=torch.arange(2))
    with pytest.raises(TypeError, match="MambaConfig"):
        MambaLM(dict(d_model=8))  # type: ignore[arg-type]


def test_bfloat16_model_keeps_ssm_parameters_and_residual_in_float32() -> None:
    ref = tiny()
    low = build("debug", dtype=torch.bfloat16).eval()
    low.load_state_dict(ref.state_dict())
    mixer = low.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32  # Mamba's precision rule
    x = tokens()
    assert_close(low(x), ref(x), atol=0.05, rtol=0.05)
    low.setup_cache(2, 8)
    steps = [low(x[:, :3], input_pos=torch.arange(3))]
    steps += [low(x[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(3, 7)]
    assert_close(torch.cat(steps, 1), low(x), atol=0.05, rtol=0.05)
