"""What a new user of the `vermeil` command trips on (issue 13, items 7, 9, 12, 13): one-line errors, `info` on a
run folder and at the job's real sequence length, a run's own tokenizer.json, prompt bytes, the labels of
loss.png, `generate --compile` saying that it compiles, `train --help`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from test_cli import TINY_HYBRID, _one_error_line, _run  # the tests folder is on sys.path
from vermeil.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# test_cli's tiny hybrid, shorter: two steps, one evaluation and one checkpoint at the end
TINY = {
    **TINY_HYBRID,
    "train": {**TINY_HYBRID["train"], "steps": 2, "batch_size": 2, "seq_len": 16, "eval_every": 2},
}
_one_line = _one_error_line


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("user")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(root / "tiny.yaml"), "--out", str(root / "run")]) == 0
    finally:
        torch.set_num_threads(n)
    return root / "run"


# ----------------------------------------------------------------------------------------------------------
# item 7: one-line errors


def test_info_accepts_a_run_folder(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "info", str(run_dir))
    assert code == 0, err
    assert "family      hybrid (HybridModel)" in out
    assert "tokenizer   bytes" in out  # our own runs: the byte tokenizer
    code, out, _ = _run(capsys, "info", str(run_dir), "model.n_layers=4", "--context", "64")
    assert code == 0 and "at context 64" in out


def test_a_raw_checkpoint_exception_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's CheckpointException derives from BaseException and carries a traceback per failed rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    import vermeil.cli as cli

    def fail(args: object) -> int:
        try:
            raise RuntimeError("shard __0_0.distcp:\n  truncated\n  at offset 12")
        except RuntimeError as e:
            import traceback

            raise CheckpointException("read failed", {0: (e, traceback.extract_stack())}) from None

    monkeypatch.setattr(cli, "cmd_info", fail)
    code, _, err = _run(capsys, "info", "whatever.yaml")
    line = _one_line(err)
    assert line == (
        "vermeil info: error: distributed checkpoint failed on rank 0: RuntimeError: shard __0_0.distcp: "
        "truncated at offset 12"
    )
    assert code == 2


def _damaged_dcp(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    from vermeil.distributed.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "dcp", model, opt)
    shard = next((tmp_path / "dcp").glob("*.distcp"))
    shard.write_bytes(b"\0" * shard.stat().st_size)  # the size is right, the content is not
    return tmp_path / "dcp", model, opt


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_damaged_dcp_folder_is_one_line_without_torch_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged dcp/ shard makes torch.load refuse it and advise weights_only=False: never shown."""
    import warnings

    import vermeil.cli as cli
    from vermeil.distributed.checkpoint import load_checkpoint

    folder, model, opt = _damaged_dcp(tmp_path)

    def load(args: object) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "single process" warnings of torch and vermeil
            load_checkpoint(folder, model, opt)
        return 0

    monkeypatch.setattr(cli, "cmd_info", load)
    code, _, err = _run(capsys, "info", "whatever.yaml")
    line = _one_line(err)
    assert code == 2 and "is damaged" in line and "dcp" in line
    assert "weights_only" not in line and "nothing in it was run" in line


def test_torch_unpickle_advice_is_never_shown() -> None:
    from vermeil.cli import _one_line as one_line

    torch_text = (
        "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument "
        "in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will "
        "likely succeed, but it can result in arbitrary code execution."
    )
    line = one_line(ValueError(f"run/checkpoints/step_000002/state.pt: {torch_text}"))
    assert line.startswith("run/checkpoints/step_000002/state.pt: ")
    assert "weights_only" not in line and "refused, nothing in it was run" in line


# ----------------------------------------------------------------------------------------------------------
# item 9: a run's own tokenizer.json; prompt bytes


def _bpe(tmp_path: Path, vocab_size: int = 300) -> Path:
    """A tiny byte-level BPE trained here (no download), saved as tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "def main(argv):\n    return argv\n",
        "import os\nimport sys\n",
        "for i in range(10):\n    pass\n",
    ]
    tok.train_from_iterator(corpus * 50, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def _bpe_run(tmp_path: Path, vocab_size: int | None = None) -> tuple[Path, object]:
    """A tiny LLM run whose vocabulary is the BPE's (or `vocab_size`), with the tokenizer.json beside its
    weights."""
    from vermeil.data.tokenizer import JSONTokenizer
    from vermeil.recipes import build_model, run_config_from_dict
    from vermeil.runs import write_run

    tok = JSONTokenizer(_bpe(tmp_path))
    config = {
        "name": "bpe",
        "model": {
            "family": "llm",
            "dim": 32,
            "n_layers": 1,
            "n_heads": 2,
            "n_kv_heads": 1,
            "vocab_size": vocab_size or tok.vocab_size,
            "max_seq_len": 64,
        },
        "data": {"task": "text"},
        "train": {"seq_len": 32},
    }
    run = run_config_from_dict(config)
    model = build_model(run)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # sharp logits: greedy decoding differs from token to token
    out = tmp_path / "run"
    write_run(run.to_dict(), model, out)
    shutil.copyfile(tok.path, out / "tokenizer.json")
    return out, tok


def test_generate_uses_the_runs_tokenizer_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vermeil.generation import generate
    from vermeil.recipes import load_trained

    run, tok = _bpe_run(tmp_path)
    prompt = "def main(argv):\n"
    code, out, err = _run(
        capsys, "generate", str(run), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0"
    )
    assert code == 0, err
    _, model, _ = load_trained(run)
    ids = tok.encode(prompt)
    assert max(ids) >= 256  # merged tokens: the byte tokenizer would read other ids
    new = generate(model, [ids], 6, temperature=0.0)[0]
    assert out == prompt + tok.decode(new) + "\n"
    code, out, _ = _run(capsys, "info", str(run))
    assert code == 0 and f"tokenizer   {run / 'tokenizer.json'} (the tokenizers library)" in out


def test_a_tokenizer_that_does_not_fit_the_model_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = _bpe_run(tmp_path, vocab_size=256)  # the model reads bytes; the BPE's merges lie above 255
    code, _, err = _run(capsys, "generate", str(run), "--prompt", "import os\nimport sys\n")
    line = _one_line(err)
    assert code == 2 and "outside the model's vocabulary" in line
    (run / "tokenizer.json").write_text("{not json")
    code, _, err = _run(capsys, "generate", str(run), "--prompt", "x")
    assert code == 2 and "is not a readable tokenizer.json" in _one_line(err)


def test_convert_copies_the_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    tok_path = _bpe(tmp_path)
    vocab = json.loads(tok_path.read_text())["model"]["vocab"]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab) + 1,  # + <eos>
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = tmp_path / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf)
    shutil.copyfile(tok_path, hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<eos>"}}))
    run = tmp_path / "run"
    code, out, err = _run(capsys, "convert", "--from", "transformers", str(hf), "--out", str(run))
    assert code == 0, err
    assert "with tokenizer.json and tokenizer_config.json" in out
    assert (run / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    from vermeil.data.tokenizer import load_tokenizer

    tok = load_tokenizer(run)
    assert tok.eos_id == tok._tok.token_to_id("<eos>") == 0  # type: ignore[union-attr]
    code, out, err = _run(capsys, "generate", str(run), "--prompt", "import os", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("import os"), err
    back = tmp_path / "back"
    code, out, _ = _run(capsys, "convert", "--to", "transformers", str(run), "--out", str(back))
    assert code == 0 and (back / "tokenizer.json").is_file()
    # --overwrite with a model that has no tokenizer leaves no stale tokenizer.json behind
    (hf / "tokenizer.json").unlink()
    code, _, err = _run(
        capsys, "convert", "--from", "transformers", str(hf), "--out", str(run), "--overwrite"
    )
    assert code == 0 and not (run / "tokenizer.json").exists(), err


def test_non_utf8_prompt_bytes_reach_a_byte_model(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt of bytes that are not UTF-8 arrives in argv as lone surrogates (PEP 383); the byte model gets
    the bytes themselves. `--prompt-file` passes a file's bytes."""
    import os

    import vermeil.generation as generation

    seen: list[list[int]] = []
    real = generation.generate

    def spy(model, prompts, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(list(prompts[0]))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    raw = b"caf\xe9 \xff"  # Latin-1 bytes: not UTF-8
    code, out, err = _run(
        capsys, "generate", str(run_dir), "--prompt", os.fsdecode(raw), "--max-new-tokens", "2"
    )
    assert code == 0, err
    assert seen[-1] == list(raw) and out.startswith("caf\ufffd \ufffd")
    (tmp_path / "p.bin").write_bytes(raw)
    code, _, err = _run(
        capsys, "generate", str(run_dir), "--prompt-file", str(tmp_path / "p.bin"), "--max-new-tokens", "2"
    )
    assert code == 0 and seen[-1] == list(raw), err
    code, _, err = _run(capsys, "generate", str(run_dir))
    assert code == 2 and "--prompt TEXT or --prompt-file PATH" in _one_line(err)


# ----------------------------------------------------------------------------------------------------------
# item 12: loss.png labelled by task


@pytest.mark.parametrize(
    ("config", "label"),
    [
        ("hybrid-lm.yaml", "cross-entropy (nats per byte)"),
        ("mqar-mamba.yaml", "cross-entropy (nats per answer token)"),
        ("flux-seq2seq.yaml", "flow-matching loss (MSE of the velocity)"),
    ],
)
def test_loss_label_per_task(config: str, label: str) -> None:
    from vermeil.recipes import load_run_config
    from vermeil.recipes.build import loss_label

    assert loss_label(load_run_config(CONFIGS / config)) == label


def test_loss_png_says_what_the_loss_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    drawn: list[tuple[str, str]] = []
    real = Figure.savefig

    def record(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        ax = self.axes[0]
        drawn.append((ax.get_ylabel(), ax.get_title()))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    config = {**TINY, "train": {**TINY["train"], "plot": True}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    code, _, err = _run(capsys, "train", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert (tmp_path / "run" / "loss.png").is_file()
    assert drawn[-1] == ("cross-entropy (nats per byte)", "tiny: data.task=text")


# ----------------------------------------------------------------------------------------------------------
# item 13: small CLI gaps


def test_info_counts_flops_at_the_flow_jobs_sequence(capsys: pytest.CaptureFixture[str]) -> None:
    """The flow job's model attends over condition + target points (2 * data.length), not train.seq_len."""
    config = str(CONFIGS / "flux-seq2seq.yaml")
    code, out, _ = _run(capsys, "info", config)
    assert code == 0 and "at context 32," in out
    code, out, _ = _run(capsys, "info", config, "data.length=8")
    assert code == 0 and "at context 16," in out
    code, out, _ = _run(capsys, "info", config, "--context", "100")
    assert code == 0 and "at context 100," in out


def test_generate_compile_says_it_compiles(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import vermeil.generation as generation

    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: real(*a, **{**k, "compile": False}))
    code, _, err = _run(
        capsys, "generate", str(run_dir), "--prompt", "x", "--max-new-tokens", "2", "--compile"
    )
    assert code == 0 and err.count("compiling the decode step") == 1
    code, _, err = _run(capsys, "generate", str(run_dir), "--prompt", "x", "--max-new-tokens", "2")
    assert code == 0 and "compiling" not in err


def test_train_help_has_a_description_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "Train a model from a run config" in out
    assert "examples:" in out and "vermeil train --resume runs/hybrid-lm train.steps=" in out


def test_tokenizers_is_an_optional_extra_pinned_in_the_constraints() -> None:
    import importlib.metadata

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("tokenizers") for r in extras["tokenizers"])
    assert "tokenizers" in extras["dev"][0]
    pins = dict(
        line.split("==") for line in (root / "constraints.txt").read_text().splitlines() if "==" in line
    )
    assert pins["tokenizers"] == importlib.metadata.version("tokenizers")


def test_a_character_split_between_prompt_and_output_prints_whole(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prompt ends with the first byte of "é" and the model adds the second: one "é", not two U+FFFD."""
    import vermeil.generation as generation

    monkeypatch.setattr(generation, "generate", lambda *a, **k: [[0xA9]])
    (tmp_path / "p.bin").write_bytes(b"caf\xc3")
    code, out, err = _run(capsys, "generate", str(run_dir), "--prompt-file", str(tmp_path / "p.bin"))
    assert code == 0 and out == "café\n", err


@pytest.mark.filterwarnings("ignore")
def test_a_damaged_dcp_folder_raises_without_torch_advice_for_library_callers(tmp_path: Path) -> None:
    from vermeil.distributed.checkpoint import load_checkpoint

    folder, model, opt = _damaged_dcp(tmp_path)
    with pytest.raises(ValueError, match="is damaged") as info:
        load_checkpoint(folder, model, opt)
    assert "weights_only" not in str(info.value) and "nothing in it was run" in str(info.value)
