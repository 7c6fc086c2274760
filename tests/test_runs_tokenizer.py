"""Which tokenizer a run's weights read (issue 13, item 9): a converted run keeps its tokenizer.json for the
converted weights; trained further on Vermeil's data (byte tokens), its new weights decode with bytes, although
the folder still holds the tokenizer.json."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from test_cli import _one_thread, _run  # noqa: F401 - the tests folder is on sys.path; one thread
from test_cli_user import _bpe_run

# Two steps of the text task on a little of the standard library's source, one checkpoint at the end.
FINE_TUNE = (
    "train.steps=2",
    "train.warmup=0",
    "train.batch_size=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.save_every=0",
    "train.plot=false",
    "train.threads=1",
    "data.max_bytes=20000",
)


def test_a_converted_run_trained_on_bytes_decodes_with_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vermeil train --resume` of a converted run fine-tunes it on byte tokens: `generate` then decodes the
    new weights with bytes (it decoded them with the converted model's BPE: gibberish), `info` says so, and
    `convert --to transformers` ships no tokenizer.json with them. The converted weights keep their tokenizer."""
    from vermeil.checkpoint import read_metadata
    from vermeil.data.tokenizer import ByteTokenizer, JSONTokenizer, load_tokenizer
    from vermeil.generation import generate
    from vermeil.recipes import load_trained
    from vermeil.runs import WEIGHTS, latest_checkpoint

    run, _ = _bpe_run(tmp_path)  # a converted run: step 0 and the model's tokenizer.json
    step0 = latest_checkpoint(run)
    assert isinstance(load_tokenizer(run), JSONTokenizer)  # only generated from: its own tokenizer
    code, _, err = _run(capsys, "train", "--resume", str(run), *FINE_TUNE)
    assert code == 0, err
    assert isinstance(load_tokenizer(run), ByteTokenizer)
    latest = latest_checkpoint(run)
    assert latest.name == "step_000002" and read_metadata(latest / WEIGHTS)["tokenizer"] == "bytes"
    assert (run / "tokenizer.json").is_file() and isinstance(load_tokenizer(run, step0), JSONTokenizer)

    prompt = "def main(argv):\n"
    code, out, err = _run(
        capsys, "generate", str(run), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0"
    )
    assert code == 0, err
    _, model, _ = load_trained(run)
    ids = list(prompt.encode())
    new = generate(model, [ids], 6, temperature=0.0, stop_tokens=(ByteTokenizer.eos_id,))[0]
    assert out == ByteTokenizer().decode([*ids, *(int(i) for i in new)]) + "\n"
    code, out, _ = _run(capsys, "info", str(run))
    assert code == 0 and "tokenizer   bytes" in out

    pytest.importorskip("transformers")
    code, _, err = _run(capsys, "convert", "--to", "transformers", str(run), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert (tmp_path / "hf" / "config.json").is_file() and not (tmp_path / "hf" / "tokenizer.json").exists()


def test_a_trainer_fed_the_runs_own_token_ids_records_nothing(tmp_path: Path) -> None:
    """`Trainer(tokenizer=None)`: fine-tuning a converted model on its own tokenizer's ids (the Python API)
    leaves the folder's tokenizer.json in charge; any other value than "bytes" or None is refused."""
    from vermeil.checkpoint import read_metadata
    from vermeil.data.tokenizer import JSONTokenizer, load_tokenizer
    from vermeil.recipes import load_trained
    from vermeil.runs import WEIGHTS, latest_checkpoint
    from vermeil.train import TrainConfig, Trainer, causal_lm_loss

    run, tok = _bpe_run(tmp_path)
    _, model, _ = load_trained(run)
    ids = torch.tensor([tok.encode("import os\nimport sys\nfor i in range(10):\n" * 4)[:9]] * 2)
    config = TrainConfig(
        steps=1, warmup=0, batch_size=2, seq_len=8, eval_every=0, save_every=0, plot=False, progress=False
    )
    batches = itertools.repeat((ids[:, :-1], ids[:, 1:]))
    with pytest.raises(ValueError, match="tokenizer='bpe' must be 'bytes' or None"):
        Trainer(model, batches, causal_lm_loss, config, out_dir=run, tokenizer="bpe")  # type: ignore[arg-type]
    trainer = Trainer(model, batches, causal_lm_loss, config, out_dir=run, tokenizer=None)
    trainer.load_checkpoint(run)
    trainer.fit()
    latest = latest_checkpoint(run)
    assert latest.name == "step_000001" and "tokenizer" not in read_metadata(latest / WEIGHTS)
    assert isinstance(load_tokenizer(run), JSONTokenizer)
