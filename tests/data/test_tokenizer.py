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
