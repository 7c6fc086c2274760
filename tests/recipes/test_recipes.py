"""Run configs -> model, data, loss, evaluation: every shipped config trains (tiny), strict sections, describe_model."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from vermeil.config import ConfigError, apply_overrides, load_yaml
from vermeil.recipes import (
    FAMILIES,
    TaskSampler,
    build_model,
    build_run,
    describe_model,
    load_run_config,
    run_config_from_dict,
)
from vermeil.train import Trainer, causal_lm_loss, head_loss, loss_head

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Tiny overrides per shipped config: same families and tasks, sizes that train in a second.
COMMON = [
    "train.steps=10",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.warmup=2",
    "train.lr=1e-2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.progress=false",
    "train.plot=false",
]
TEXT = ["data.max_bytes=20000"]
MQAR = ["data.vocab_size=64", "data.num_kv_pairs=8", "train.batch_size=16"]
TINY = {
    "llm-tiny": [
        "model.dim=32",
        "model.n_heads=2",
        "model.n_kv_heads=1",
        "model.hidden_dim=48",
        "model.moe_args.hidden_dim=24",
        "model.attention_chunk_size=16",
        *TEXT,
    ],
    "hybrid-lm": [
        "model.dim=32",
        "model.heads=2",
        "model.kv_heads=1",
        "model.hidden_dim=48",
        "model.d_state=4",
        *TEXT,
    ],
    "mqar-transformer": [
        "model.dim=32",
        "model.n_heads=2",
        "model.hidden_dim=48",
        "model.max_seq_len=32",
        *MQAR,
    ],
    "mqar-mamba": ["model.d_model=32", "model.n_layer=2", "model.d_state=4", *MQAR],
    "mqar-hybrid": ["model.dim=32", "model.heads=2", "model.hidden_dim=48", "model.d_state=4", *MQAR],
    "flux-seq2seq": [
        "model.hidden_size=32",
        "model.num_heads=2",
        "model.depth=1",
        "data.length=8",
        "data.eval_samples=8",
        "data.sample_steps=4",
        "train.batch_size=16",
    ],
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: one thread avoids OpenMP spinning against other processes.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _available(family: str) -> bool:
    module = FAMILIES[family].module
    if importlib.util.find_spec(module) is None:
        return False
    if family == "flux":
        return importlib.util.find_spec("vermeil.recipes.flow") is not None
    return True


@pytest.mark.parametrize("name", sorted(TINY))
def test_shipped_config_trains_with_falling_loss(name: str, tmp_path: Path) -> None:
    path = CONFIGS / f"{name}.yaml"
    family = "flux" if name.startswith("flux") else load_yaml(path)["model"]["family"]
    if not _available(family):
        pytest.skip(f"the {family} model is not in this tree yet")
    full = load_run_config(path)  # the config as shipped builds strictly
    assert full.name == name
    run = load_run_config(path, [*COMMON, *TINY[name]])
    built = build_run(run)
    result = Trainer(
        built.model,
        built.train_batches,
        built.loss_fn,
        run.train,
        eval_fn=built.eval_fn,
        run_config=run.to_dict(),
    ).fit()
    losses = [r["loss"] for r in result.history if r["split"] == "train"]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert result.final_eval and all(math.isfinite(v) for v in result.final_eval.values())


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in TINY))
def test_every_other_shipped_config_trains_two_steps(name: str) -> None:
    """The configs without a tiny variant above build as shipped and train two finite steps at their own width."""
    full = load_run_config(CONFIGS / f"{name}.yaml")
    data = TEXT if full.data.task == "text" else ["train.seq_len=64"]
    steps = ["train.steps=2", "train.batch_size=2", "train.warmup=1", "train.eval_batches=1"]
    run = load_run_config(CONFIGS / f"{name}.yaml", [*COMMON, *steps, *data])
    built = build_run(run)
    result = Trainer(built.model, built.train_batches, built.loss_fn, run.train, eval_fn=built.eval_fn).fit()
    losses = [r["loss"] for r in result.history if r["split"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert result.final_eval and all(math.isfinite(v) for v in result.final_eval.values())


def test_round_trip_of_resolved_config() -> None:
    run = load_run_config(CONFIGS / "llm-tiny.yaml")
    again = run_config_from_dict(run.to_dict())
    assert again.to_dict() == run.to_dict()
    assert run.to_dict()["model"]["vocab_size"] == 256  # filled in from the byte data


def test_preset_and_overrides_merge() -> None:
    run = run_config_from_dict({"model": {"family": "llm", "preset": "debug", "n_layers": 2}})
    assert run.model.n_layers == 2 and run.model.dim == 48  # the preset's dim, the config's depth
    assert run.model.vocab_size == 256


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            {"model": {"family": "llm", "preset": "debug", "n_head": 2}},
            r"'n_head' in model .*did you mean 'n_heads'",
        ),
        ({"model": {"family": "llm", "preset": "debug", "dim": "big"}}, r"model\.dim='big' must be int"),
        ({"model": {"family": "llm", "dim": 100, "n_heads": 3}}, r"dim=100 must be divisible by n_heads=3"),
        ({"model": {"family": "lm"}}, r"model\.family='lm' must be one of .*did you mean 'llm'"),
        (
            {"model": {"family": "llm", "preset": "debug", "vocab_size": 100}},
            r"vocab_size=100 must be >= .* 256",
        ),
        ({"model": {"family": "llm"}, "trian": {}}, r"unknown config key 'trian'.*did you mean 'train'"),
        (
            {
                "model": {"family": "llm"},
                "data": {"task": "mqar", "num_kv_pairs": 64},
                "train": {"seq_len": 128},
            },
            r"num_kv_pairs=64 is too many",
        ),
        ({"model": {"family": "llm"}, "data": {"task": "flow"}}, r"does not fit model.family='llm'"),
        (
            {"model": {"family": "llm"}, "data": {"task": "mqar", "power_a": float("inf")}},
            r"data: power_a=inf must be > 0 and finite",
        ),
        ({"model": {"family": "llm"}, "train": {"steps": 0}}, r"train: steps=0 must be an int >= 1"),
    ],
)
def test_bad_configs_name_the_key(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_config_from_dict(data)


def test_a_list_for_family_or_task_is_named() -> None:
    """`family: [llm]` or `task: [text]` in YAML raised TypeError("unhashable type: 'list'")."""
    with pytest.raises(ConfigError, match=r"model\.family=\['llm'\] must be one of"):
        run_config_from_dict({"model": {"family": ["llm"]}})
    with pytest.raises(ConfigError, match=r"data\.task=\['text'\] must be one of"):
        run_config_from_dict({"model": {"family": "llm"}, "data": {"task": ["text"]}})


def test_describe_model_counts_and_cache() -> None:
    run = run_config_from_dict({"model": {"family": "llm", "preset": "debug"}, "train": {"seq_len": 24}})
    info = describe_model(run, context=24, batch_size=2)
    model = build_model(run)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["forward_flops_per_token"] > 2 * (info["parameters"] - info["embedding_parameters"]) // 2
    before = {id(b) for b in model.buffers()}
    model.setup_cache(2, 24)
    added = [b for n, b in model.named_buffers() if id(b) not in before and "rope" not in n]
    assert info["cache_bytes"] == sum(b.numel() * b.element_size() for b in added)


def test_describe_a_flow_run_at_the_length_its_model_sees() -> None:
    """describe_model(run) of a flow run counted FLOPs at train.seq_len (256), a length the flow task never
    uses; its model sees 2 * data.length points (what `vermeil info` already used)."""
    run = load_run_config(CONFIGS / "flux-seq2seq.yaml", ["data.length=8"])
    assert describe_model(run)["context"] == 16
    assert describe_model(run, 16) == describe_model(run)


def test_describe_mamba_cache_measured_on_meta() -> None:
    if not _available("mamba"):
        pytest.skip("no mamba model yet")
    run = run_config_from_dict({"model": {"family": "mamba", "preset": "debug"}})
    info = describe_model(run, context=1000, batch_size=3)
    model = build_model(run)
    model.setup_cache(3, 1000)
    total = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "state" in n)
    assert info["cache_bytes"] == total > 0


def test_describe_counts_a_sliding_window_from_the_model() -> None:
    # The attention layout comes from model.attention_layers(): a hybrid's sliding window caps the attended
    # context (it used to be read from the config by family and counted as global attention).
    model = {"family": "hybrid", "preset": "debug", "vocab_size": 256}
    wide = describe_model(run_config_from_dict({"model": model}), context=48)
    narrow = describe_model(run_config_from_dict({"model": {**model, "window": 8}}), context=48)
    n_attention = len(build_model(run_config_from_dict({"model": model}), device="meta").attention_layers())
    width = 4 * 10  # the debug preset's heads * head_dim
    assert n_attention == 2
    assert (
        wide["forward_flops_per_token"] - narrow["forward_flops_per_token"]
        == 2 * n_attention * 2 * (48 - 8) * width
    )
    assert narrow["cache_bytes"] < wide["cache_bytes"]


def test_task_sampler_resumes_exactly() -> None:
    from vermeil.data import mqar

    a = TaskSampler(mqar, 3, seed=4, vocab_size=40, seq_len=16, num_kv_pairs=2)
    next(a)
    state = a.state_dict()
    x1, y1 = next(a)
    b = TaskSampler(mqar, 3, seed=99, vocab_size=40, seq_len=16, num_kv_pairs=2)
    b.load_state_dict(state)
    x2, y2 = next(b)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_eval_metrics_of_text_and_mqar() -> None:
    text = load_run_config(CONFIGS / "llm-tiny.yaml", [*COMMON, *TINY["llm-tiny"]])
    built = build_run(text)
    with torch.no_grad():
        out = built.eval_fn(built.model.eval())
    assert out["val_bpb"] == pytest.approx(out["val_loss"] / math.log(2))
    assert 4.0 < out["val_loss"] < 7.0  # an untrained byte model: about ln(256) = 5.5
    task = run_config_from_dict(
        apply_overrides(
            {"model": {"family": "llm", "preset": "debug"}, "data": {"task": "mqar"}},
            [*COMMON, *MQAR],
        )
    )
    built = build_run(task)
    with torch.no_grad():
        out = built.eval_fn(built.model.eval())
    assert 0.0 <= out["val_accuracy"] <= 1.0 and math.isfinite(out["val_loss"])


def test_hybrid_trains_on_its_configs_loss_head() -> None:
    if not _available("hybrid"):
        pytest.skip("no hybrid model yet")
    run = run_config_from_dict(
        {"model": {"family": "hybrid", "preset": "debug"}, "data": {"task": "mqar"}, "train": {"seq_len": 32}}
    )
    built = build_run(run)
    batch = next(built.train_batches)
    loss, _ = built.loss_fn(built.model, batch)
    head = loss_head(run.model)  # the config's loss_head: cross_entropy
    torch.testing.assert_close(loss, head_loss(built.model, head, *batch))
    torch.testing.assert_close(loss, causal_lm_loss(built.model, batch)[0])  # z_loss 0: plain cross-entropy
    with pytest.raises(ConfigError, match=r"model.loss_head='focal' must be one of \['cross_entropy'\]"):
        run_config_from_dict({"model": {"family": "hybrid", "preset": "debug", "loss_head": "focal"}})


def test_generate_and_convert_load_no_trainer() -> None:
    # `vermeil generate` / `convert` read run configs and folders through vermeil.recipes and vermeil.runs: the
    # training loop, its optimizer and metrics stay unloaded (only the train section's dataclass and the losses).
    import subprocess
    import sys

    code = (
        "import sys, vermeil.cli, vermeil.recipes, vermeil.runs, vermeil.generation, vermeil.data; "
        "print(sorted(m for m in sys.modules if m.startswith('vermeil.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "vermeil.recipes.build" in out, out
    for heavy in (
        "vermeil.train.trainer",
        "vermeil.train.optim",
        "vermeil.train.metrics",
        "vermeil.distributed.parallel",
    ):
        assert heavy not in out, (heavy, out)


def test_info_counts_mamba2_scan_flops_per_state_element() -> None:
    """Mamba-2's A_log is one scalar per head: the scan FLOPs count its (heads * headdim * d_state) state."""
    from vermeil.nn.mamba2 import Mamba2Block
    from vermeil.recipes import load_run_config
    from vermeil.recipes.build import build_model
    from vermeil.recipes.describe import _linear_like_params, describe_model

    run = load_run_config(Path(__file__).resolve().parents[2] / "configs" / "mamba2-lm.yaml")
    model = build_model(run, device="meta")
    blocks = [m for m in model.modules() if isinstance(m, Mamba2Block)]
    assert blocks
    state = sum(m.d_inner * m.d_state for m in blocks)
    matmul, _ = _linear_like_params(model)
    assert describe_model(run)["forward_flops_per_token"] == 2 * matmul + 9 * state


def test_load_foreign_reads_only_safetensors(tmp_path: Path) -> None:
    """A diffusers folder holding only a pickled diffusion_pytorch_model.bin was loaded through torch.load (the
    library's fallback): `vermeil convert --from` reads safetensors and never unpickles a downloaded file."""
    diffusers = pytest.importorskip("diffusers")
    from vermeil.recipes import load_foreign

    flux = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=2,
        out_channels=2,
        num_layers=1,
        num_single_layers=0,
        attention_head_dim=8,
        num_attention_heads=1,
        joint_attention_dim=2,
        pooled_projection_dim=2,
        axes_dims_rope=(2, 2, 4),
    )
    flux.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(FileNotFoundError, match="no .safetensors weights: only safetensors are read"):
        load_foreign("diffusers", tmp_path)


def _tiny_mamba() -> tuple[object, torch.nn.Module]:
    run = run_config_from_dict(
        {"model": {"family": "mamba", "d_model": 16, "n_layer": 2, "d_state": 4}, "data": {"task": "mqar"}}
    )
    assert run.model.rescale_prenorm_residual  # MambaConfig's default, an init-only flag
    return run, build_model(run).eval()


def test_load_foreign_keeps_the_weights_of_a_mamba_folder_with_rescaled_init(tmp_path: Path) -> None:
    """transformers' Mamba `_init_weights` divided out_proj by sqrt(n_layers) after loading a folder whose config
    says rescale_prenorm_residual=true: the converted model's logits were off by 0.37. load_foreign now gives
    back the folder's tensors, and the flag on the converted config."""
    pytest.importorskip("transformers")
    from vermeil.interop import to_transformers
    from vermeil.recipes import foreign_run_config, load_foreign

    _, model = _tiny_mamba()
    hf = to_transformers(model)
    assert hf.config.rescale_prenorm_residual
    hf.save_pretrained(tmp_path)
    family, _, back = load_foreign("transformers", tmp_path)
    original, again = model.state_dict(), back.state_dict()
    assert family == "mamba" and original.keys() == again.keys()
    for key, value in original.items():
        torch.testing.assert_close(again[key], value, atol=0, rtol=0, msg=key)
    assert foreign_run_config(family, back).model.rescale_prenorm_residual


def test_a_mamba_export_loads_in_transformers_with_its_weights(tmp_path: Path) -> None:
    """`vermeil convert --to transformers` of a Mamba run wrote rescale_prenorm_residual=true, so transformers'
    from_pretrained rescaled out_proj after loading (logits off by 0.09): the folder now says false."""
    transformers = pytest.importorskip("transformers")
    from vermeil.recipes.convert import export_model

    run, model = _tiny_mamba()
    foreign = export_model("mamba", model, tmp_path)
    assert foreign.config.rescale_prenorm_residual  # the returned model keeps its config
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path, use_safetensors=True).eval()
    x = torch.randint(0, run.model.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits[..., : run.model.vocab_size], model(x))
