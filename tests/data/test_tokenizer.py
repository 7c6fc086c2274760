"""Tests for vermeil/data/tokenizer.py: lossless bytes, special tokens, padded batches."""

from __future__ import annotations

import pytest
import torch

from vermeil.data.tokenizer import ByteTokenizer

TEXT = "naïve café 🤖 東京"


def test_round_trip_unicode() -> None:
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert len(ids) == len(TEXT.encode("utf-8")) > len(TEXT)  # multi-byte characters
    assert tok.decode(ids) == TEXT
    assert tok.decode(torch.tensor(ids)) == TEXT
    assert tok.decode(tok.encode("")) == ""


def test_special_tokens() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    ids = tok.encode("ab", bos=True, eos=True)
    assert ids == [256, 97, 98, 257]
    assert tok.decode([258, 256, *tok.encode(TEXT), 257, 258]) == TEXT  # specials skipped
    with pytest.raises(ValueError, match="token id 259 is outside the vocabulary"):
        tok.decode([259])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])
    assert tok.decode([0xE6, 0x9D]) == "\ufffd"  # a cut multi-byte character does not raise


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_batch_padding(side: str) -> None:
    tok = ByteTokenizer()
    texts = ["a", TEXT, ""]
    ids, mask = tok.encode_batch(texts, bos=True, padding_side=side)
    lengths = [len(tok.encode(t, bos=True)) for t in texts]
    assert ids.shape == mask.shape == (3, max(lengths))
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == lengths
    assert (ids[~mask] == tok.pad_id).all()
    for row, t, n in zip(ids, texts, lengths):
        real = row[:n] if side == "right" else row[row.numel() - n :]
        assert real.tolist() == tok.encode(t, bos=True)
    if side == "left":
        assert mask[:, -1].all()  # every prompt ends at the last position
    else:
        assert mask[:, 0].all()
    assert tok.decode_batch(ids) == texts


def test_encode_batch_rejects_bad_args() -> None:
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="padding_side='middle'"):
        tok.encode_batch(["a"], padding_side="middle")
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode_batch("abc")


def test_encode_bytes_takes_any_bytes() -> None:
    tok = ByteTokenizer()
    raw = b"caf\xe9\xff"  # not UTF-8
    assert tok.encode_bytes(raw, bos=True, eos=True) == [256, *raw, 257]
    assert tok.encode("hé") == tok.encode_bytes("hé".encode())
    with pytest.raises(TypeError, match="data must be bytes, got str"):
        tok.encode_bytes("text")  # type: ignore[arg-type]


def _tiny_bpe(path, with_config: bool):  # noqa: ANN001, ANN202
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["import torch\nimport torch.nn as nn\n"] * 20, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    if with_config:
        (path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    return tok


def test_load_tokenizer_picks_a_runs_tokenizer_json(tmp_path) -> None:  # noqa: ANN001
    from vermeil.data.tokenizer import JSONTokenizer, describe_tokenizer, load_tokenizer

    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert describe_tokenizer(tmp_path).startswith("bytes")
    reference = _tiny_bpe(tmp_path, with_config=True)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, JSONTokenizer) and "tokenizer.json" in describe_tokenizer(tmp_path)
    text = "import torch.nn as nn\n"
    ids = tok.encode(text)
    assert ids == reference.encode(text).ids and len(ids) < len(text.encode())  # merges, not bytes
    assert tok.decode(ids) == tok.decode(torch.tensor(ids)) == text
    assert tok.eos_id == reference.token_to_id("</s>") and tok.vocab_size == reference.get_vocab_size()
    (tmp_path / "tokenizer_config.json").unlink()
    assert (
        load_tokenizer(tmp_path).eos_id is None
    )  # no config naming the EOS token: generate never stops early


def test_copy_tokenizer_files(tmp_path) -> None:  # noqa: ANN001
    from vermeil.data.tokenizer import copy_tokenizer_files

    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    assert copy_tokenizer_files(src, dest) == [] and not dest.exists()
    (src / "tokenizer_config.json").write_text("{}")
    assert copy_tokenizer_files(src, dest) == []  # a config alone is no tokenizer
    _tiny_bpe(src, with_config=False)
    assert copy_tokenizer_files(src, dest) == ["tokenizer.json", "tokenizer_config.json"]
    assert (dest / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_tokenizer_file_lists_agree() -> None:
    """vermeil.runs.clear_run removes the files convert copies (runs does not import data: two lists)."""
    from vermeil.data.tokenizer import TOKENIZER_FILES
    from vermeil.runs import TOKENIZER_FILES as CLEARED

    assert CLEARED == TOKENIZER_FILES


def test_a_hostile_tokenizer_config_neither_hangs_nor_crashes(tmp_path) -> None:  # noqa: ANN001
    """A run folder's tokenizer_config.json that is a FIFO blocked load_tokenizer forever (read_text waits
    for a writer), and one of nested brackets raised RecursionError; both now read as no EOS token."""
    import os
    import threading

    from vermeil.data.tokenizer import load_tokenizer

    _tiny_bpe(tmp_path, with_config=False)
    config = tmp_path / "tokenizer_config.json"
    config.write_text("[" * 100_000)
    assert load_tokenizer(tmp_path).eos_id is None
    config.unlink()
    os.mkfifo(config)
    result = []
    worker = threading.Thread(target=lambda: result.append(load_tokenizer(tmp_path).eos_id), daemon=True)
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():
        with open(config, "w"):  # let the blocked reader go
            pass
        worker.join()
        pytest.fail("load_tokenizer blocked on a FIFO tokenizer_config.json")
    assert result == [None]


def test_decode_refuses_ids_that_are_not_integers(tmp_path) -> None:  # noqa: ANN001
    """decode truncated float ids (97.7 -> 'a', a float tensor too) and took True as byte 1; decode_batch of a
    1-D tensor failed with "'int' object is not iterable"."""
    import numpy as np

    tok = ByteTokenizer()
    for ids in ([97.7], torch.tensor([97.7, 98.2]), [True]):
        with pytest.raises(TypeError, match="token ids must be integers, got"):
            tok.decode(ids)
    assert tok.decode([np.int64(97), torch.tensor(98)]) == "ab"  # integer types are ids
    with pytest.raises(ValueError, match=r"decode_batch takes a \(B, L\) tensor of ids, got shape \(2,\)"):
        tok.decode_batch(torch.tensor([97, 98]))
    from vermeil.data.tokenizer import JSONTokenizer

    _tiny_bpe(tmp_path, with_config=False)
    json_tok = JSONTokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(TypeError, match="token ids must be integers, got 3.5"):
        json_tok.decode([3.5])
    with pytest.raises(ValueError, match="token id -1 must be >= 0"):
        json_tok.decode([-1])
    with pytest.raises(ValueError, match=r"decode takes a 1-D tensor of ids, got shape \(1, 2\)"):
        json_tok.decode(torch.tensor([[1, 2]]))


def test_a_crafted_tokenizer_json_fails_in_one_value_error(tmp_path) -> None:  # noqa: ANN001
    """A tokenizer.json whose unknown-token rule its vocabulary breaks made encode raise tokenizers' bare
    Exception, and one with a backtracking pre-tokenizer regex a Rust panic (pyo3's PanicException, a
    BaseException that `except Exception` misses): `vermeil generate` called either an internal error."""
    import json

    pytest.importorskip("tokenizers")
    from vermeil.data.tokenizer import JSONTokenizer

    bpe = {"type": "BPE", "unk_token": "zz", "vocab": {"a": 0, "b": 1}, "merges": []}
    (tmp_path / "unk.json").write_text(json.dumps({"version": "1.0", "model": bpe}))
    with pytest.raises(ValueError, match=r"unk.json fails to encode the text: Unk token `zz` not found"):
        JSONTokenizer(tmp_path / "unk.json").encode("ab c")
    split = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    evil = {"version": "1.0", "pre_tokenizer": split, "model": {**bpe, "unk_token": None}}
    (tmp_path / "evil.json").write_text(json.dumps(evil))
    with pytest.raises(ValueError, match=r"evil.json fails to encode the text: .*retry-limit"):
        JSONTokenizer(tmp_path / "evil.json").encode("a" * 30 + "b")
