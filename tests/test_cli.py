"""The `vermeil` command: one-line errors, train -> generate / compare / resume, info, `python -m vermeil`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vermeil.cli import main
from vermeil.train import latest_checkpoint, list_checkpoints, read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY_HYBRID = {
    "name": "tiny",
    "model": {"family": "hybrid", "dim": 24, "pattern": "MA", "heads": 2, "hidden_dim": 32, "d_state": 4},
    "data": {"task": "text", "max_bytes": 20000},
    "train": {
        "steps": 6,
        "lr": 1e-2,
        "warmup": 1,
        "batch_size": 4,
        "seq_len": 32,
        "log_every": 1,
        "eval_every": 3,
        "eval_batches": 2,
        "save_every": 3,
        "plot": False,
        "threads": 1,
    },
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what came before (e.g. save_pretrained's progress bar)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _llm_config(**model: object) -> dict:
    base = yaml.safe_load((CONFIGS / "llm-tiny.yaml").read_text())
    base["model"].update(model)
    return base


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c["model"].update(n_head=4), "n_head"),
        (lambda c: c["train"].update(lr="fast"), "train.lr='fast' must be float"),
        (
            lambda c: c["model"].update(dim=100, n_heads=3, n_kv_heads=1),
            "dim=100 must be divisible by n_heads=3",
        ),
        (lambda c: c.update(trainer={}), "unknown config key 'trainer'"),
    ],
)
def test_bad_config_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], edit, needle: str) -> None:
    config = _llm_config()
    edit(config)
    path = _write(tmp_path / "bad.yaml", config)
    code, out, err = _run(capsys, "train", str(path), "--out", str(tmp_path / "run"))
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("vermeil train: error:") and needle in line, line
    assert not (tmp_path / "run").exists()  # nothing written for a config that does not load


def test_bad_override_and_yaml_and_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(CONFIGS / "llm-tiny.yaml")
    code, _, err = _run(capsys, "train", cfg, "model.n_hedas=4", "--out", str(tmp_path / "r"))
    assert code == 2 and "did you mean 'n_heads'" in _one_error_line(err)
    code, _, err = _run(capsys, "info", cfg, "train.lr")
    assert code == 2 and "malformed override 'train.lr'" in _one_error_line(err)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {family: llm\ntrain: [")
    code, _, err = _run(capsys, "train", str(broken))
    assert code == 2 and "malformed YAML" in _one_error_line(err)
    code, _, err = _run(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml does not exist" in _one_error_line(err)
    code, _, err = _run(capsys, "generate", str(tmp_path), "--prompt", "x")
    assert code == 2 and "holds no checkpoint" in _one_error_line(err)
    code, _, err = _run(capsys, "generate", str(tmp_path / "absent"), "--prompt", "x")
    assert code == 2 and "does not exist" in _one_error_line(err)


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        main(["train", str(tmp_path / "nope.yaml"), "--debug"])


def test_python_m_vermeil_subprocess(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.yaml", _llm_config(dim=100, n_heads=3, n_kv_heads=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vermeil", "train", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert _one_error_line(proc.stderr).startswith("vermeil train: error:")
    assert "dim=100 must be divisible by n_heads=3" in proc.stderr


def test_info_prints_params_flops_cache(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "info", str(CONFIGS / "llm-tiny.yaml"), "--context", "512")
    assert code == 0
    assert "parameters" in out and "FLOPs/token" in out and "context 512" in out and "cache" in out


def test_train_keeps_freed_memory_unless_asked_not_to(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vermeil.train

    calls: list[bool] = []
    monkeypatch.setattr(vermeil.train, "keep_freed_memory", lambda: calls.append(True) or True)
    missing = str(tmp_path / "nope.yaml")  # fails after the allocator choice, before any work
    assert _run(capsys, "train", missing)[0] == 2 and calls == [True]
    assert _run(capsys, "train", missing, "--default-malloc")[0] == 2 and calls == [True]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("vermeil.models.hybrid")
    root = tmp_path_factory.mktemp("cli")
    cfg = _write(root / "tiny.yaml", TINY_HYBRID)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(cfg), "--out", str(root / "run")]) == 0
    finally:
        torch.set_num_threads(n)
    return root / "run"


def test_train_writes_a_run(trained_run: Path) -> None:
    assert latest_checkpoint(trained_run).name == "step_000006"
    rows = read_metrics(trained_run / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["split"] == "val"] == [3, 6]
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert saved["model"]["family"] == "hybrid" and saved["model"]["vocab_size"] == 256
    assert saved["train"]["out_dir"] == str(trained_run)


def test_generate_prints_text(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "generate", str(trained_run), "--prompt", "def ", "--max-new-tokens", "12")
    assert code == 0
    assert out.startswith("def ") and len(out.rstrip("\n")) > len("def ")
    code, again, _ = _run(capsys, "generate", str(trained_run), "--prompt", "def ", "--max-new-tokens", "12")
    assert again == out  # seeded sampling
    code, compiled, _ = _run(
        capsys, "generate", str(trained_run), "--prompt", "def ", "--max-new-tokens", "12", "--compile"
    )
    assert code == 0 and compiled.startswith("def ")


def test_existing_run_needs_resume(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write(tmp_path / "tiny.yaml", TINY_HYBRID)
    code, _, err = _run(capsys, "train", str(cfg), "--out", str(trained_run))
    assert code == 2 and "--resume" in _one_error_line(err)


def test_resume_continues(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    code, out, _ = _run(capsys, "train", "--resume", str(copy), "train.steps=8")
    assert code == 0 and "done: step 8" in out
    steps = [r["step"] for r in read_metrics(copy / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_resume_from_a_checkpoint_folder_continues_its_run(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--resume RUN/checkpoints/step_N` resumes RUN from step N: nothing is written inside the checkpoint."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    step3 = copy / "checkpoints" / "step_000003"
    alone = tmp_path / "alone"
    shutil.copytree(step3, alone)  # a checkpoint folder outside any run: nowhere to write the run
    before = sorted(p.name for p in alone.iterdir())
    code, out, err = _run(capsys, "train", "--resume", str(step3), "train.steps=8")
    assert code == 0 and "done: step 8" in out and "step_000003 (step 3)" in err
    nested = [
        p
        for p in (copy / "checkpoints").rglob("*")
        if p.name in ("checkpoints", "config.yaml", "metrics.jsonl")
    ]
    assert nested == []  # no run nested in a checkpoint folder
    assert [p.name for p in list_checkpoints(copy)] == ["step_000006", "step_000008"]
    assert latest_checkpoint(copy).name == "step_000008"
    steps = [r["step"] for r in read_metrics(copy / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    code, _, err = _run(capsys, "train", "--resume", str(alone))
    assert code == 2 and "checkpoint folder" in _one_error_line(err)
    assert sorted(p.name for p in alone.iterdir()) == before


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config that fails to build (a corpus path that does not exist) must not cost the run it would replace."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    broken = {**TINY_HYBRID, "data": {**TINY_HYBRID["data"], "paths": [str(tmp_path / "missing")]}}
    cfg = _write(tmp_path / "broken.yaml", broken)
    code, _, err = _run(capsys, "train", str(cfg), "--out", str(copy), "--overwrite")
    assert code == 2 and "does not exist" in _one_error_line(err)
    assert latest_checkpoint(copy).name == "step_000006" and (copy / "metrics.jsonl").is_file()


def test_compare_prints_runs_side_by_side(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "compare", str(trained_run), str(trained_run))
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3 and "val_accuracy" in lines[0] and "hybrid" in lines[1]


def test_convert_to_transformers_matches_logits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    from vermeil.recipes import load_trained

    cfg = _write(
        tmp_path / "llama.yaml",
        {
            "model": {
                "family": "llm",
                "dim": 32,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "hidden_dim": 40,
                "multiple_of": 8,
                "rope_theta": 10000.0,
            },
            "data": {"task": "text", "max_bytes": 20000},
            "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_batches": 1, "plot": False},
        },
    )
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0
    code, out, _ = _run(capsys, "convert", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert code == 0 and "LlamaForCausalLM" in out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _, ours, _ = load_trained(tmp_path / "run")
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits.float(), ours(tokens).logits, rtol=1e-4, atol=1e-4)


def test_sample_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("vermeil.recipes.flow")
    pytest.importorskip("matplotlib")
    cfg = _write(
        tmp_path / "flux.yaml",
        {
            "model": {
                "family": "flux",
                "hidden_size": 32,
                "num_heads": 2,
                "depth": 1,
                "depth_single_blocks": 1,
            },
            "data": {"task": "flow", "length": 8, "eval_samples": 4, "sample_steps": 3},
            "train": {"steps": 3, "batch_size": 8, "eval_batches": 1, "warmup": 1},
        },
    )
    code, out, _ = _run(capsys, "train", str(cfg), "--out", str(tmp_path / "run"))
    assert code == 0 and "val_distance" in out
    assert (tmp_path / "run" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from vermeil.checkpoint import read_metadata
    from vermeil.runs import WEIGHTS, latest_checkpoint

    # points, not tokens: the weights record no tokenizer (token tasks record "bytes")
    assert "tokenizer" not in read_metadata(latest_checkpoint(tmp_path / "run") / WEIGHTS)
    png = tmp_path / "more.png"
    code, out, _ = _run(capsys, "sample", str(tmp_path / "run"), "--steps", "2", "--out", str(png))
    assert code == 0 and str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = _run(capsys, "sample", str(tmp_path / "run"), "--guidance", "3")
    assert code == 2 and "guidance" in _one_error_line(err)


# ----------------------------------------------------------------------------------------------------------
# convert --from transformers / diffusers: a save_pretrained folder -> a run folder generate / sample can use


def _logits(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits  # type: ignore[attr-defined]


def _randomize(model: torch.nn.Module, scale: float = 0.3, skip: tuple[str, ...] = ()) -> None:
    """Spread the weights so that logits vary (a default init gives near-constant outputs that hide bugs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(skip):
                p.add_(scale * torch.randn_like(p))


def _tiny_llama(transformers, vocab_size: int = 259, **extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,  # 259: the byte tokenizer's 256 bytes + BOS/EOS/PAD, so `generate` can stop on EOS
        hidden_size=40,
        intermediate_size=44,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **extra,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    _randomize(model)
    return model


def _check_converted_run(run_dir: Path, reference: torch.nn.Module, family: str, vocab: int) -> None:
    from vermeil.recipes import load_run_config, load_trained

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["family"] == family and saved["data"]["task"] == "text"
    assert load_run_config(run_dir / "config.yaml").model.vocab_size == vocab  # it validates as a run config
    assert latest_checkpoint(run_dir).name == "step_000000"
    run, ours, _ = load_trained(run_dir)  # built from config.yaml, weights from the checkpoint, as generate
    assert run.family == family
    tokens = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits.float()
        got = _logits(ours(tokens))
    assert expected.std() > 0.3  # the weights make a difference
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_convert_from_transformers_llama(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    hf = _tiny_llama(transformers, rope_theta=500.0)
    hf.save_pretrained(tmp_path / "hf")
    run_dir = tmp_path / "run"
    code, out, _ = _run(
        capsys, "convert", "--from", "transformers", str(tmp_path / "hf"), "--out", str(run_dir)
    )
    assert code == 0 and "llm run from LlamaForCausalLM" in out
    _check_converted_run(run_dir, hf, "llm", 259)
    code, out, _ = _run(capsys, "generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "8")
    assert code == 0 and out.startswith("def ") and len(out.rstrip("\n")) > len("def ")
    # and back: the exported folder gives transformers' logits again
    code, out, _ = _run(
        capsys, "convert", "--to", "transformers", str(run_dir), "--out", str(tmp_path / "back")
    )
    assert code == 0 and "LlamaForCausalLM" in out
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    tokens = torch.randint(0, 259, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_convert_from_transformers_llama4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Llama 4 text: MoE on layer 1, NoPE on layer 1, chunked attention on layer 0, qk norm, temperature tuning."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(
        vocab_size=259,
        hidden_size=48,
        intermediate_size=24,  # expert width
        intermediate_size_mlp=40,  # dense width
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=2,
        attention_chunk_size=4,
        use_qk_norm=True,
        attn_temperature_tuning=True,
        floor_scale=3,
        attn_scale=0.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = transformers.Llama4ForCausalLM(cfg).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path / "hf")
    run_dir = tmp_path / "run"
    code, out, _ = _run(
        capsys, "convert", "--from", "transformers", str(tmp_path / "hf"), "--out", str(run_dir)
    )
    assert code == 0 and "llm run from Llama4ForCausalLM" in out
    _check_converted_run(run_dir, hf, "llm", 259)
    code, out, _ = _run(capsys, "generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "8")
    assert code == 0 and out.startswith("def ") and len(out.rstrip("\n")) > len("def ")


def test_converted_run_resumes_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The converted run is a real step-0 checkpoint: `train --resume` fine-tunes it."""
    transformers = pytest.importorskip("transformers")
    _tiny_llama(transformers).save_pretrained(tmp_path / "hf")
    run_dir = tmp_path / "run"
    assert main(["convert", "--from", "transformers", str(tmp_path / "hf"), "--out", str(run_dir)]) == 0
    capsys.readouterr()
    overrides = ["train.steps=2", "train.batch_size=2", "train.seq_len=16", "train.eval_batches=1"]
    code, out, err = _run(capsys, "train", "--resume", str(run_dir), *overrides, "data.max_bytes=20000")
    assert code == 0 and "done: step 2" in out, err
    assert latest_checkpoint(run_dir).name == "step_000002"


def test_convert_from_transformers_mamba(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("vermeil.interop.transformers_mamba")
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        vocab_size=263,
        hidden_size=37,
        state_size=5,
        num_hidden_layers=2,
        conv_kernel=4,
        expand=2,
        time_step_rank=7,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    hf = transformers.MambaForCausalLM(cfg).eval()
    _randomize(hf, skip=("A_log", "D"))
    hf.save_pretrained(tmp_path / "hf")
    run_dir = tmp_path / "run"
    code, out, _ = _run(
        capsys, "convert", "--from", "transformers", str(tmp_path / "hf"), "--out", str(run_dir)
    )
    assert code == 0 and "mamba run from MambaForCausalLM" in out
    _check_converted_run(run_dir, hf, "mamba", 263)
    code, out, _ = _run(capsys, "generate", str(run_dir), "--prompt", "x = ", "--max-new-tokens", "6")
    assert code == 0 and out.startswith("x = ") and len(out.rstrip("\n")) > len("x = ")


def test_convert_from_diffusers_flux(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    diffusers = pytest.importorskip("diffusers")
    from vermeil.recipes import load_trained

    torch.manual_seed(0)
    flux = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=5,
        out_channels=3,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=24,  # = sum(axes_dims_rope)
        num_attention_heads=2,
        joint_attention_dim=7,
        pooled_projection_dim=6,
        guidance_embeds=False,
        axes_dims_rope=(4, 10, 10),
    ).eval()
    with torch.no_grad():
        for p in flux.parameters():
            p.normal_(0.0, 0.2)
    flux.save_pretrained(tmp_path / "flux")
    run_dir = tmp_path / "run"
    code, out, _ = _run(
        capsys, "convert", "--from", "diffusers", str(tmp_path / "flux"), "--out", str(run_dir)
    )
    assert code == 0 and "flux run from FluxTransformer2DModel" in out
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["family"] == "flux" and saved["model"]["in_channels"] == 5
    run, ours, _ = load_trained(run_dir)
    assert run.model.out_channels == 3 and run.model.context_in_dim == 7 and run.model.vec_in_dim == 6
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 5, generator=g)
    ctx = torch.randn(2, 4, 7, generator=g)
    y = torch.randn(2, 6, generator=g)
    t = torch.rand(2, generator=g)
    img_ids = torch.randint(0, 16, (9, 3), generator=g).float()
    txt_ids = torch.randint(0, 16, (4, 3), generator=g).float()
    with torch.no_grad():
        expected = flux(
            hidden_states=x,
            encoder_hidden_states=ctx,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        got = ours(x, img_ids[None], ctx, txt_ids[None], t, y)
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and back: without --to, a flux run goes to diffusers
    code, out, _ = _run(capsys, "convert", str(run_dir), "--out", str(tmp_path / "back"))
    assert code == 0 and "FluxTransformer2DModel" in out
    back = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    with torch.no_grad():
        again = back(
            hidden_states=x,
            encoder_hidden_states=ctx,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)
    code, _, err = _run(capsys, "convert", "--to", "transformers", str(run_dir), "--out", str(tmp_path / "h"))
    assert code == 2 and "needs a run of family llm, mamba or hybrid" in _one_error_line(err)


def test_convert_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    x = str(tmp_path / "x")
    code, _, err = _run(capsys, "convert", "--from", "transformers", str(tmp_path / "absent"), "--out", x)
    assert code == 2 and "absent does not exist" in _one_error_line(err)
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "convert", "--from", "transformers", str(tmp_path / "empty"), "--out", x)
    assert code == 2 and "has no config.json" in _one_error_line(err)
    # an unsupported class is named, before anything is loaded
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(
        '{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}'
    )
    code, _, err = _run(capsys, "convert", "--from", "transformers", str(tmp_path / "gpt2"), "--out", x)
    line = _one_error_line(err)
    assert code == 2 and "GPT2LMHeadModel" in line and "LlamaForCausalLM" in line
    code, _, err = _run(capsys, "convert", "--from", "diffusers", str(tmp_path / "gpt2"), "--out", x)
    assert code == 2 and "supported diffusers classes" in _one_error_line(err)
    assert not (tmp_path / "x").exists()
    # an existing output needs --overwrite; no output at all is an error
    hf = _tiny_llama(transformers)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep")
    argv = ["convert", "--from", "transformers", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "--overwrite" in _one_error_line(err)
    assert not (tmp_path / "run" / "config.yaml").exists()
    code, _, _ = _run(capsys, *argv, "--overwrite")
    assert code == 0 and latest_checkpoint(tmp_path / "run").name == "step_000000"
    code, _, err = _run(
        capsys, "convert", "--to", "transformers", str(tmp_path / "run"), "--out", str(tmp_path / "hf")
    )
    assert code == 2 and "--overwrite" in _one_error_line(err)
    code, _, err = _run(capsys, "convert", "--from", "transformers", str(tmp_path / "hf"))
    assert code == 2 and "--out" in _one_error_line(err)
    # a vocabulary smaller than the byte tokenizer's cannot make a text run
    _tiny_llama(transformers, vocab_size=100).save_pretrained(tmp_path / "small")
    code, _, err = _run(
        capsys, "convert", "--from", "transformers", str(tmp_path / "small"), "--out", str(tmp_path / "r2")
    )
    assert code == 2 and "vocab_size=100" in _one_error_line(err)


@pytest.mark.parametrize("arch", ["Mamba2", "Bamba"])
def test_convert_from_transformers_hybrids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arch: str
) -> None:
    """A Mamba-2 and a Bamba folder become hybrid runs with transformers' logits, generate, and go back."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    special = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if arch == "Mamba2":
        cfg = transformers.Mamba2Config(
            vocab_size=259, hidden_size=32, num_heads=8, head_dim=8, expand=2, n_groups=2, state_size=6,
            num_hidden_layers=2, conv_kernel=4, chunk_size=5, **special,
        )  # fmt: skip
    else:
        cfg = transformers.BambaConfig(
            vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2,
            mamba_d_state=6, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=5, **special,
        )  # fmt: skip
    cls = getattr(transformers, f"{arch}ForCausalLM")
    hf = cls(cfg).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path / "hf")
    run_dir = tmp_path / "run"
    code, out, _ = _run(
        capsys, "convert", "--from", "transformers", str(tmp_path / "hf"), "--out", str(run_dir)
    )
    assert code == 0 and f"hybrid run from {arch}ForCausalLM" in out
    _check_converted_run(run_dir, hf, "hybrid", 259)
    code, out, _ = _run(capsys, "generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("def ")
    code, out, _ = _run(
        capsys, "convert", "--to", "transformers", str(run_dir), "--out", str(tmp_path / "back")
    )
    assert code == 0 and f"{arch}ForCausalLM" in out
    back = cls.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    tokens = torch.randint(0, 259, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, hf(tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argv", [["info", "configs/llm-tiny.yaml"], ["--help"]])
def test_a_closed_pipe_ends_quietly(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    """`vermeil info RUN | head -1`: the reader left; no 'Broken pipe' error, no traceback at exit."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    stdout = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    capsys.readouterr()
    try:
        code = main([*argv])
    except SystemExit as e:  # pragma: no cover - what the old code did for --help
        code = e.code
    finally:
        monkeypatch.undo()
    print("after", file=stdout)  # stdout now points at devnull: the flush at exit stays quiet
    stdout.close()
    assert code == 141 and capsys.readouterr().err == ""
