"""Tests for vermeil/models/hybrid.py: the Mamba + attention hybrid. Config and YAML errors, layer kinds per routing, the merge
formulas, cache (prefill + steps) == full forward for both routings and every merge, the seed's YAML files
(build, train, save, load, generate), weight-decay groups of the model's parameters, presets on meta. The loss
heads the config names are tested in tests/train/test_train_losses.py.

Shapes: B batch, T length, V vocabulary, D model dim.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vermeil.checkpoint import load_weights, save_weights
from vermeil.config import ConfigError
from vermeil.generation import generate
from vermeil.models import hybrid as hybrid_module
from vermeil.models.hybrid import PRESETS, HybridConfig, HybridModel, build
from vermeil.train import head_loss, loss_head, param_groups

TOL = dict(atol=1e-5, rtol=1e-5)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
YAMLS = ["hybrid_sequential.yaml", "hybrid_parallel.yaml"]


def tiny(**overrides: object) -> HybridModel:
    """debug preset (D 37, pattern MAMA, 4 heads of 10, kv 2, V 101), weights nudged so every part matters
    (the learned gate starts at zero: nudged, it differs per channel and token)."""
    torch.manual_seed(0)
    model = build("debug", **overrides).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tokens(b: int = 2, t: int = 7, vocab: int = 101, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


# ---------------------------------------------------------------------------------------------------------
# Config and YAML


def test_layer_kinds_follow_routing() -> None:
    seq = HybridConfig(pattern="MMAMMMAM")
    par = HybridConfig(pattern="MMAMMMAM", routing="parallel")
    assert seq.layer_kinds == list("MMAMMMAM")
    assert par.layer_kinds == list("MMPMMMPM")
    assert HybridConfig(pattern=["M", "A"], n_layers=6).layer_kinds == list("MAMAMA")
    model = build("debug", routing="parallel", merge="concat")
    kinds = [(layer.mamba is not None, layer.attention is not None) for layer in model.layers]
    assert kinds == [(True, False), (True, True), (True, False), (True, True)]
    assert model.layers[1].merge_proj is not None and model.layers[0].merge_proj is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pattern="MMXM"), "pattern='MMXM' has 'X' at position 2"),
        (dict(pattern=""), "pattern=''"),
        (dict(pattern=["M", "a"]), "has 'a' at position 1"),
        (dict(routing="diagonal"), "routing='diagonal' must be one of"),
        (dict(merge="max"), "merge='max' must be one of"),
        (dict(feed_forward="moe"), "feed_forward='moe' must be one of"),
        (dict(n_layers=6, pattern="MMAM"), "n_layers=6 must be a multiple of len\\(pattern\\)=4"),
        (dict(heads=4, kv_heads=3), "heads=4 must be divisible by kv_heads=3"),
        (dict(dim=30, heads=4), "dim=30 must be divisible by heads=4"),
        (dict(dim=36, heads=4), "head_dim=9 must be even with rotary=True"),
        (dict(loss_head=""), "loss_head='' must be a loss head's name"),
        (dict(dim=0), "dim=0"),
        (dict(z_loss=-1.0), "z_loss=-1.0"),
        (dict(compile_scan="yes"), "compile_scan='yes' must be true or false"),
    ],
)
def test_config_errors_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HybridConfig(**kwargs)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_errors_name_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'n_head' in model \(did you mean 'heads'\?\)"):
        HybridConfig.from_yaml(_write(tmp_path, "model:\n  dim: 32\n  n_head: 4\n"))
    with pytest.raises(
        ConfigError, match=r"model.routing='paralel' must be one of \['sequential', 'parallel'\]"
    ):
        HybridConfig.from_yaml(_write(tmp_path, "model:\n  routing: paralel\n"))
    with pytest.raises(ConfigError, match="model: pattern='MQM' has 'Q' at position 1"):
        HybridModel.from_yaml(_write(tmp_path, "model:\n  pattern: MQM\n"))
    with pytest.raises(ConfigError, match="model.dim='64' must be int"):
        HybridConfig.from_yaml(_write(tmp_path, "model:\n  dim: '64'\n"))
    with pytest.raises(ConfigError, match="model.family='mamba' must be 'hybrid'"):
        HybridConfig.from_yaml(_write(tmp_path, "model:\n  family: mamba\n"))
    # a file without a model section is the model config itself; presets and overrides work too
    cfg = HybridConfig.from_yaml(_write(tmp_path, "preset: debug\nrouting: parallel\n"), ["merge=concat"])
    assert (cfg.dim, cfg.routing, cfg.merge) == (37, "parallel", "concat")


@pytest.mark.parametrize("name", YAMLS)
def test_repo_yaml_files_build(name: str) -> None:
    cfg = HybridConfig.from_yaml(CONFIGS / name)
    assert cfg.layer_letters == list("MMAMMMAM")
    assert cfg.routing == name.split("_")[1].split(".")[0]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_on_meta(name: str) -> None:
    model = build(name, device="meta")
    assert all(p.is_meta for p in model.parameters())


def test_small_preset_keeps_its_older_name() -> None:
    # "small" is the plain name of the seed's hybrid; "vio-small", its older name, gives the same config, in
    # Python and in a YAML `preset:` key.
    small = HybridConfig.from_dict({"preset": "small"})
    assert (small.dim, small.pattern, small.max_seq_len) == (128, "MMAMMMAM", 1024)
    assert HybridConfig.from_dict({"preset": "vio-small"}) == small == HybridConfig(**PRESETS["vio-small"])
    assert build("vio-small", device="meta").config == build("small", device="meta").config == small


def test_meta_then_to_empty_and_reset() -> None:
    model = build("debug", device="meta")
    model.to_empty(device="cpu")
    model.reset_parameters()
    assert model.lm_head.weight is model.embedding.weight
    assert torch.isfinite(model(tokens())).all()


def test_models_do_not_import_training_code() -> None:
    for mod in ("hybrid", "mamba"):
        tree = ast.parse((Path(hybrid_module.__file__).parent / f"{mod}.py").read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if n.startswith("vermeil.train")], names


# ---------------------------------------------------------------------------------------------------------
# Layer math


def test_parallel_sum_is_falcon_h1_formula() -> None:
    model = tiny(
        routing="parallel",
        merge="sum",
        ssm_out_multiplier=0.7,
        attn_out_multiplier=1.3,
        attn_in_multiplier=0.5,
    )
    layer = model.layers[1]
    h = torch.randn(2, 7, 37)
    x = layer.norm(h)
    mid = h + 0.7 * layer.mamba(x) + 1.3 * layer.attention(0.5 * x)
    expected = mid + layer.feed_forward(layer.ffn_norm(mid))
    assert_close(layer(h), expected, **TOL)


def test_parallel_gate_and_concat_merges() -> None:
    h = torch.randn(2, 7, 37)
    gated = tiny(routing="parallel", merge="gate").layers[1]
    x = gated.norm(h)
    g = torch.sigmoid(gated.gate(x))
    mid = h + g * gated.mamba(x) + (1 - g) * gated.attention(x)
    assert_close(gated(h), mid + gated.feed_forward(gated.ffn_norm(mid)), **TOL)
    cat = tiny(routing="parallel", merge="concat", feed_forward="none").layers[1]
    x = cat.norm(h)
    assert_close(cat(h), h + cat.merge_proj(torch.cat([cat.mamba(x), cat.attention(x)], -1)), **TOL)


def test_sequential_layers_run_one_mixer_each() -> None:
    model = tiny(feed_forward="mlp")
    x = tokens()
    h = model.embedding(x)
    for layer in model.layers:
        mixer = layer.mamba if layer.kind == "M" else layer.attention
        h = h + mixer(layer.norm(h))
        h = h + layer.feed_forward.fc2(F.gelu(layer.feed_forward.fc1(layer.ffn_norm(h))))
    assert_close(model(x), model.lm_head(model.norm_f(h)), **TOL)


def test_gate_starts_even() -> None:
    layer = build("debug", routing="parallel", merge="gate").layers[1]
    assert layer.gate.weight.abs().sum() == 0 and layer.gate.bias.abs().sum() == 0  # sigmoid(0) = 1/2


# ---------------------------------------------------------------------------------------------------------
# Cache == full forward


CASES = [
    dict(routing="sequential"),
    dict(routing="parallel", merge="sum", ssm_out_multiplier=0.5, attn_in_multiplier=2.0),
    dict(routing="parallel", merge="gate"),
    dict(routing="parallel", merge="concat"),
    dict(routing="sequential", rotary=False, feed_forward="none", pattern="AMMA"),  # Jamba: no positions
    dict(routing="parallel", merge="gate", feed_forward="mlp", qk_norm="rms", kv_heads=1),
    dict(routing="sequential", window=3),  # sliding-window attention: ring caches
    dict(routing="parallel", merge="sum", window=4, qk_norm="rms"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_prefill_then_steps_equals_full_forward(case: dict) -> None:
    model = tiny(**case)
    x = tokens(t=9)
    full = model(x)
    model.setup_cache(batch_size=2, max_seq_len=12)
    # prefill in two chunks (the second continues the first), then one token at a time
    outs = [model(x[:, :3], input_pos=torch.arange(3)), model(x[:, 3:6], input_pos=torch.arange(3, 6))]
    for t in range(6, 9):
        outs.append(model(x[:, t : t + 1], input_pos=torch.tensor([t])))
    assert_close(torch.cat(outs, 1), full, **TOL)
    assert_close(model(x), full, **TOL)  # without input_pos the caches are neither read nor written
    assert_close(model(x[:, :3], input_pos=torch.arange(3)), full[:, :3], **TOL)  # position 0: a new sequence
    model.reset_cache()
    assert_close(model(x[:, :1], input_pos=torch.arange(1)), full[:, :1], **TOL)


def test_sliding_window_attention_decodes_through_a_bounded_ring() -> None:
    from vermeil.nn.cache import RingKVCache

    model = tiny(routing="sequential", window=3)
    model.setup_cache(batch_size=2, max_seq_len=12)
    rings = [layer.attention.kv_cache for layer in model.layers if layer.attention is not None]
    assert rings and all(isinstance(c, RingKVCache) and c.k_cache.shape[2] == 3 for c in rings)
    model.delete_cache()
    x = tokens(t=9)
    glob = tiny(routing="sequential")
    assert not torch.allclose(model(x), glob(x), atol=1e-4)  # the window changes the attention layers


def test_compile_scan_equals_eager() -> None:
    case = dict(routing="parallel", merge="gate")
    eager, compiled = tiny(**case), tiny(**case, compile_scan=True)
    x = tokens(t=13)
    full = eager(x)
    assert_close(compiled(x), full, **TOL)
    compiled.setup_cache(batch_size=2, max_seq_len=16)
    outs = [compiled(x[:, :9], input_pos=torch.arange(9))]
    outs += [compiled(x[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(9, 13)]
    assert_close(torch.cat(outs, 1), full, **TOL)


@pytest.mark.parametrize("routing", ["sequential", "parallel"])
def test_generate_greedy_matches_uncached_argmax_loop(routing: str) -> None:
    model = tiny(routing=routing, merge="gate")
    x = tokens(t=5)
    out = generate(model, x, max_new_tokens=5)
    seq = x
    for _ in range(5):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, 5:])


def test_cache_input_checks() -> None:
    model = tiny()
    model.setup_cache(2, 8)
    with pytest.raises(ValueError, match="outside the cache's positions"):
        model(tokens(t=2), input_pos=torch.arange(7, 9))
    with pytest.raises(ValueError, match=r"input_pos must have shape \(T=2,\)"):
        model(tokens(t=2), input_pos=torch.arange(3))
    with pytest.raises(ValueError, match="token id 101 is outside the vocabulary"):
        model(torch.tensor([[0, 101]]))


# ---------------------------------------------------------------------------------------------------------
# The seed's YAML files: build, train, save, load, generate


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_model_trains_saves_loads_generates(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = HybridModel.from_yaml(CONFIGS / name).train()
    groups = param_groups(model, weight_decay=0.1)
    opt = torch.optim.AdamW(groups, lr=3e-3)  # the groups go in as they are (param_names included)
    head = loss_head(model.config)  # the config's loss head (cross_entropy)
    batch = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(4):
        loss = head_loss(model, head, batch)  # next-token loss on the fixed batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[0]) and losses[-1] < losses[0] - 0.1, losses

    model.eval()
    path = tmp_path / "hybrid.safetensors"
    save_weights(model, path)
    fresh = HybridModel.from_yaml(CONFIGS / name).eval()
    assert not torch.equal(fresh(batch), model(batch))
    load_weights(fresh, path)
    assert_close(fresh(batch), model(batch), atol=0, rtol=0)
    out = generate(fresh, batch[:, :5], max_new_tokens=3)
    assert out.shape == (2, 3)
    assert torch.equal(out, generate(model, batch[:, :5], max_new_tokens=3))


# ---------------------------------------------------------------------------------------------------------
# Weight decay: the model's parameters under training's one rule


def test_optimizer_groups() -> None:
    model = tiny(routing="parallel", merge="gate", feed_forward="mlp")
    decay, no_decay = param_groups(model, 0.1, no_decay_embeddings=False)
    d, nd = set(decay["param_names"]), set(no_decay["param_names"])
    assert {
        "layers.1.mamba.A_log",
        "layers.1.mamba.D",
        "layers.1.norm.weight",
        "layers.1.ffn_norm.weight",
    } <= nd
    assert {
        "layers.1.gate.bias",
        "layers.1.mamba.dt_proj.bias",
        "layers.1.mamba.conv1d.bias",
        "norm_f.weight",
    } <= nd
    assert {"layers.1.feed_forward.fc1.weight", "layers.1.attention.wq.weight", "layers.1.gate.weight"} <= d
    assert {"layers.0.mamba.in_proj.weight", "embedding.weight"} <= d
    assert not d & nd and len(d) + len(nd) == len(list(model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    no_emb = param_groups(tiny(), 0.1, no_decay_embeddings=True)
    assert "embedding.weight" in no_emb[1]["param_names"]


@pytest.mark.parametrize("routing", ["sequential", "parallel"])
def test_bfloat16_model_runs_close_to_float32(routing: str) -> None:
    ref = tiny(routing=routing, merge="gate")
    low = build("debug", routing=routing, merge="gate", dtype=torch.bfloat16).eval()
    low.load_state_dict(ref.state_dict())
    x = tokens()
    assert_close(low(x), ref(x), atol=0.05, rtol=0.05)
    assert generate(low, x, max_new_tokens=2).shape == (2, 2)


@pytest.mark.parametrize("pattern", ["MMAM", ["M", "A", "A"]])
def test_config_round_trips_through_dict(pattern: str | list[str]) -> None:
    from vermeil.config import from_dict, to_dict

    cfg = HybridConfig(**{**PRESETS["debug"], "pattern": pattern, "routing": "parallel", "merge": "concat"})
    assert from_dict(HybridConfig, to_dict(cfg)) == cfg
